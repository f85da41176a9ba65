"""Real-data smoke tests: every zoo model on real cells as users bring them.

Each model is fitted to three views of the bundled 10x mouse cells — the data
set itself, a random 30 % of its cells (which leaves genes with no counts, as
any subset of real cells does) and a panel of 100 genes — through ``fit``, and
scored on held-out cells through ``evaluate``.  Every score must be finite;
PPCA, factor analysis and the Gaussian mixture must also be within 2 % of
scikit-learn's held-out score on the same split and transform (or better).

Every view has genes with no counts in the training cells and some in the
held-out ones (13 of 715 on the whole data set).  scikit-learn fits such a
gene a variance of ~0 (factor analysis: ``psi >= 1e-12``; the mixture at its
default ``reg_covar=1e-6``), which scores the held-out cells at -1e5 to -1e11
nats: a reference every model beats, so a test against it cannot fail.  The
references are therefore scikit-learn's fits scored as a user would want them:
factor analysis with its noise variances floored where lvmzoo floors them
(``NOISE_FLOOR`` times the mean gene variance; the held-out density computed
in closed form), the mixture at its best ``reg_covar`` of {1e-6, 1e-3, 1e-2};
and a reference below -1e4 nats per cell fails the test as degenerate.

Fits are short (the classical models start from their closed-form or k-means
solution; the deep models get a few epochs of small networks): the point is
robustness on real inputs, not convergence, which other tests cover.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import lvmzoo
from lvmzoo import datasets
from lvmzoo.data import DataWarning
from lvmzoo.models import PPCA, SCVI, VAE, FactorAnalysis, GaussianMixture

sklearn = pytest.importorskip("sklearn")  # in the test extra
from sklearn.decomposition import PCA, FactorAnalysis as SkFactorAnalysis  # noqa: E402
from sklearn.mixture import GaussianMixture as SkGaussianMixture  # noqa: E402
from scipy.stats import multivariate_normal  # noqa: E402

from lvmzoo.models.factor_analysis import NOISE_FLOOR  # noqa: E402

pytestmark = pytest.mark.slow

N_LATENT = 10
SEED = 0
HELD_OUT = 0.2


def _views():
    adata = datasets.load_mouse_10k()
    rng = np.random.default_rng(SEED)
    subset = adata[np.sort(rng.choice(adata.n_obs, int(0.3 * adata.n_obs), replace=False))].copy()
    panel = adata[:, np.sort(rng.choice(adata.n_vars, 100, replace=False))].copy()
    # A 100-gene panel leaves some cells with no counts; users drop those (the
    # data layer refuses them for count models, with a message saying so).
    panel = panel[np.asarray(panel.X.sum(axis=1)).ravel() > 0].copy()
    return {"bundled": adata, "subset30": subset, "panel100": panel}


VIEWS = _views()
assert (np.asarray(VIEWS["subset30"].X.sum(axis=0)).ravel() == 0).any()  # the point of it

MODELS = {
    "ppca": (lambda: PPCA(n_latent=N_LATENT), dict(epochs=5)),
    "fa": (lambda: FactorAnalysis(n_latent=N_LATENT), dict(epochs=5)),
    "gmm": (lambda: GaussianMixture(n_components=10), dict(epochs=10)),
    "vae": (lambda: VAE(n_latent=N_LATENT, n_hidden=32), dict(epochs=2, batch_size=512)),
    "scvi": (lambda: SCVI(n_latent=N_LATENT, n_hidden=32), dict(epochs=2, batch_size=512)),
}


def _split(n_cells):
    order = np.random.default_rng(SEED).permutation(n_cells)
    n_held = int(HELD_OUT * n_cells)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _sklearn_held_out(name, train_x, held_x):
    """scikit-learn's average held-out log-likelihood of the same model on the same cells.

    Factor analysis: scikit-learn's loadings and noise variances, the latter
    floored as lvmzoo floors them, scored in closed form.  Mixture: the best
    of ``reg_covar`` in {1e-6 (its default), 1e-3, 1e-2} (1-2 s each).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        if name == "ppca":
            return float(PCA(n_components=N_LATENT, random_state=SEED).fit(train_x).score(held_x))
        if name == "fa":
            peer = SkFactorAnalysis(n_components=N_LATENT, random_state=SEED).fit(train_x)
            floor = NOISE_FLOOR * train_x.var(axis=0).mean()
            covariance = (peer.components_.T @ peer.components_
                          + np.diag(np.maximum(peer.noise_variance_, floor)))
            return float(multivariate_normal(peer.mean_, covariance).logpdf(held_x).mean())
        peers = [SkGaussianMixture(10, covariance_type="diag", random_state=SEED, reg_covar=r)
                 for r in (1e-6, 1e-3, 1e-2)]
        return max(float(peer.fit(train_x).score(held_x)) for peer in peers)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("name", list(MODELS))
def test_fit_then_evaluate_held_out_cells(name, view):
    make, options = MODELS[name]
    model = make()
    adata = VIEWS[view]
    train, held = _split(adata.n_obs)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", DataWarning)
        data = lvmzoo.setup_anndata(adata[train].copy(), transform=model.default_transform)
    unobserved = int((np.asarray(adata[train].X.sum(axis=0)).ravel() == 0).sum())
    assert sum(issubclass(w.category, DataWarning) for w in seen) == (1 if unobserved else 0)

    fitted = lvmzoo.fit(model, data, seed=SEED, progress=False, **{"batch_size": 256, **options})
    held_data = lvmzoo.query_anndata(adata[held].copy(), fitted.registry)
    # Deep models: a 5-sample importance-sampled bound (finite is what is tested here).
    score = fitted.evaluate(held_data, n_samples=5)["avg_log_likelihood"]
    assert np.isfinite(score), (name, view)
    assert np.all(np.isfinite(fitted.latent(held_data)))

    if name in ("ppca", "fa", "gmm"):
        peer = _sklearn_held_out(name, data.dense_x(), held_data.dense_x())
        assert peer > -1e4, ("degenerate reference", name, view, peer)
        # Within 2 % of scikit-learn, or better.
        assert score >= peer - 0.02 * abs(peer), (name, view, score, peer)
