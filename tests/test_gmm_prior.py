"""The Gaussian mixture's data-chosen variance prior and its restarts.

* ``variance_prior="auto"`` (the default) chooses a weaker prior on clean genes
  (all detected in >= 5 % of cells) than on the unfiltered genes of the same
  cells, where many genes are zero throughout a cluster;
* more k-means++ starts (``n_init``) never lower the training objective of
  the start :meth:`GaussianMixture.init_params` returns;
* an explicit strength (``variance_prior=A``, ``lvmzoo fit gmm
  --variance-prior A``) is used as given, and ``None`` / 0 fit by maximum
  likelihood.
"""

from __future__ import annotations

import io as _io
import json
from contextlib import redirect_stderr, redirect_stdout

import jax
import numpy as np
import pytest
from numpyro import handlers

import lvmzoo
from lvmzoo import datasets
from lvmzoo.data.source import DeviceSource
from lvmzoo.infer.svi import initial_params_of
from lvmzoo.models import GaussianMixture
from lvmzoo.models.gmm import PRIOR_GRID, PRIOR_STRENGTHS, log_variance_prior

N_CELLS = 2000


@pytest.fixture(scope="module")
def mouse_views():
    """(unfiltered, clean): the same 2,000 bundled cells, log1p_cp10k over all 715
    genes, then all genes or only those detected in >= 5 % of all cells."""
    full = lvmzoo.setup_anndata(datasets.load_mouse_10k(), kind="counts",
                                transform="log1p_cp10k")
    x = full.dense_x()
    rows = np.sort(np.random.default_rng(0).choice(full.n_cells, N_CELLS, replace=False))
    genes = (x > 0).mean(axis=0) >= 0.05
    names = np.asarray(full.registry.gene_names)
    unfiltered = lvmzoo.CellData.from_arrays(x[rows], kind="continuous", gene_names=names)
    clean = lvmzoo.CellData.from_arrays(x[rows][:, genes], kind="continuous",
                                        gene_names=names[genes])
    return unfiltered, clean


def _objective(model, params, data) -> float:
    """The fit's training objective per cell: mean log p(x) + log prior / N."""
    ll = float(np.mean(model.log_likelihood(params, DeviceSource(data).full_batch())))
    if model.maximum_likelihood:
        return ll
    strength = (params["variance_prior_strength"] if model.auto_prior
                else model.variance_prior)
    prior = log_variance_prior(params["scales"] ** 2, strength, params["prior_variance"])
    return ll + float(prior) / data.n_cells


def test_auto_prior_is_weaker_on_clean_genes_than_unfiltered(mouse_views):
    unfiltered, clean = mouse_views
    model = GaussianMixture(n_components=10)
    assert model.variance_prior == "auto"
    chosen = {}
    for name, data in (("unfiltered", unfiltered), ("clean", clean)):
        params = initial_params_of(model, data, seed=0)
        choice = model.prior_choice(params)
        assert choice["strength"] in PRIOR_STRENGTHS
        assert len(choice["grid"]) == len(PRIOR_GRID)
        assert np.isfinite(max(choice["grid"].values()))
        chosen[name] = choice["strength"]
    # Documented direction: rare genes, zero throughout clusters, need the
    # stronger prior; clean genes the weaker (there: maximum likelihood).
    assert chosen["clean"] < chosen["unfiltered"], chosen


def test_auto_choice_is_in_the_fitted_params(mouse_views):
    _, clean = mouse_views
    fitted = lvmzoo.fit(GaussianMixture(n_components=5), clean, epochs=2, seed=0,
                        progress=False)
    choice = fitted.model.prior_choice(fitted.params)
    # Held fixed by SVI: the values init_params chose.
    start = initial_params_of(fitted.model, clean.subset(fitted.train_index), seed=0)
    assert choice["strength"] == pytest.approx(float(start["variance_prior_strength"]))
    assert choice["floor"] == pytest.approx(float(start["variance_prior_floor"]))
    json.dumps(choice)  # plain numbers: fit for a report


@pytest.mark.parametrize("variance_prior", ["auto", 1.0, None])
def test_restarts_never_lower_the_training_objective(mouse_views, variance_prior):
    unfiltered, _ = mouse_views
    batch = DeviceSource(unfiltered).full_batch()
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        objectives = []
        for n_init in (1, 2, 4):
            model = GaussianMixture(n_components=8, variance_prior=variance_prior,
                                    n_init=n_init)
            objectives.append(_objective(model, model.init_params(batch, key), unfiltered))
        # Start i is the same for every n_init > i: more starts only add candidates
        # (the same start can differ in the last float32 digits between programs).
        for fewer, more in zip(objectives, objectives[1:]):
            assert more >= fewer - 1e-6 * abs(fewer), (variance_prior, seed, objectives)


def test_restarts_keep_the_best_start(mouse_views):
    _, clean = mouse_views
    batch = DeviceSource(clean).full_batch()
    key = jax.random.PRNGKey(0)
    best = GaussianMixture(n_components=8, variance_prior=1.0, n_init=4)
    single = GaussianMixture(n_components=8, variance_prior=1.0, n_init=1)
    ours = _objective(best, best.init_params(batch, key), clean)
    # Start 0 alone is n_init=1's; the others are k-means++ draws of other keys.
    reference = _objective(single, single.init_params(batch, key), clean)
    assert ours >= reference - 1e-6 * abs(reference)


def test_explicit_strength_is_used_as_given(mouse_views):
    _, clean = mouse_views
    model = GaussianMixture(n_components=5, variance_prior=2.5)
    fitted = lvmzoo.fit(model, clean, epochs=1, seed=0, progress=False)
    assert "variance_prior_strength" not in fitted.params
    assert model.prior_choice(fitted.params)["strength"] == 2.5
    # The loss's prior term is the inverse-gamma density at a = 2.5.
    batch = DeviceSource(clean).full_batch()
    params = dict(fitted.params)
    seeded = handlers.seed(handlers.substitute(model.model, data=params), rng_seed=0)
    trace = handlers.trace(seeded).get_trace(batch)
    expected = log_variance_prior(params["scales"] ** 2, 2.5, params["prior_variance"])
    np.testing.assert_allclose(float(trace["variance_prior"]["fn"].log_factor),
                               float(expected), rtol=1e-5)


@pytest.mark.parametrize("variance_prior", [None, 0.0])
def test_maximum_likelihood_spellings(mouse_views, variance_prior):
    _, clean = mouse_views
    model = GaussianMixture(n_components=5, variance_prior=variance_prior)
    assert model.maximum_likelihood
    params = initial_params_of(model, clean, seed=0)
    assert "prior_variance" not in params and "variance_prior_strength" not in params
    assert model.prior_choice(params)["strength"] == 0.0


def test_invalid_variance_prior_is_rejected():
    with pytest.raises(ValueError, match="variance_prior"):
        GaussianMixture(variance_prior="ml")
    with pytest.raises(ValueError, match="variance_prior"):
        GaussianMixture(variance_prior=-1.0)


def test_cli_variance_prior_forces_the_strength(tmp_path):
    from lvmzoo import cli

    cells = datasets.load_mouse_10k()[:600].copy()
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    out = tmp_path / "run"
    stdout, stderr = _io.StringIO(), _io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        rc = cli.main(["fit", "gmm", str(path), "--out", str(out), "--epochs", "1",
                       "--no-progress", "--plot-method", "pca", "--n-components", "3",
                       "--variance-prior", "2.5"])
    assert rc == 0, stderr.getvalue()
    fitted = lvmzoo.load_model(out / "model")
    assert fitted.model.variance_prior == 2.5
    assert fitted.model.prior_choice(fitted.params)["strength"] == 2.5
    assert "variance_prior_strength" not in fitted.params
