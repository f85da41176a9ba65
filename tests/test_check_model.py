"""lvmzoo.testing.check_model: every built-in model conforms; planted mistakes are caught.

Two parts:

* every model in :data:`lvmzoo.models.MODELS` (small hyperparameters from
  :data:`CONFIGS`, the defaults for a model added later) passes the battery
  on a simulated counts AnnData (2 batches, 3 cell types with a partly
  labelled ``label`` column for SCANVI, a ``condition`` for CPA);
* a small correct model written here passes, and six versions of it with one
  planted mistake each fail exactly the check that names the mistake.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import lvmzoo
from lvmzoo import datasets
from lvmzoo.models import MODELS, LatentModel, cell_plate
from lvmzoo.testing import (CheckReport, ModelCheckError, assert_model_conforms,
                            check_model)

# --------------------------------------------------------------------------
# Built-in models
# --------------------------------------------------------------------------

# Small versions of the built-in models (n_hidden avoids the checks' minibatch sizes 12/16/20).
NETWORK = dict(n_latent=4, n_hidden=32)
CONFIGS = {
    "ppca": dict(n_latent=4),
    "fa": dict(n_latent=4),
    "gmm": dict(n_components=3),
    "vae": dict(NETWORK, n_layers=0),
    "scvi": dict(NETWORK, n_layers=1),  # one hidden layer: batch-norm state is exercised
    "linear_scvi": dict(NETWORK),
    "scanvi": dict(NETWORK, n_layers=0),
    "cpa": dict(NETWORK, n_layers=0),
    "totalvi": dict(NETWORK, n_layers=1),
    "pseudotime": dict(n_hidden=32),
    "switch_pseudotime": dict(n_hidden=32),
}
# Over 30 s on 2 busy cores with a cold compilation cache.
SLOW = {"scvi", "linear_scvi", "scanvi", "cpa", "totalvi"}
# A built-in case that fails because of a library bug: name -> reason (none at present).
KNOWN_FAILURES: dict[str, str] = {}


def _case(name):
    marks = []
    if name in SLOW:
        marks.append(pytest.mark.slow)
    if name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(scope="module")
def cells():
    """96 simulated cells × 50 genes (check_model subsamples 64 of them)."""
    adata = datasets.simulate_counts(n_cells=96, n_genes=50, n_batches=2, n_cell_types=3,
                                     n_de_genes_per_type=5, perturbed_fraction=0.5,
                                     n_response_genes=10, seed=1)
    labelled = np.random.default_rng(0).random(adata.n_obs) < 0.4
    adata.obs["label"] = np.where(labelled, adata.obs["cell_type"].astype(str), "Unknown")
    # Surface-protein counts for totalVI (read through its registration, obsm_keys).
    adata.obsm["protein_expression"] = np.random.default_rng(1).poisson(
        20.0, size=(adata.n_obs, 5)).astype(np.float32)
    return adata


def _register(model, adata):
    keys = dict(batch_key="batch", **model.registration())
    if model.name == "scanvi":
        keys["labels_key"] = "label"
    if model.data_kind == "counts":
        return lvmzoo.setup_anndata(adata, **keys)
    return lvmzoo.setup_anndata(adata, transform="log1p_cp10k", **keys)


@pytest.mark.parametrize("name", [_case(name) for name in sorted(MODELS)])
def test_builtin_model_conforms(name, cells):
    model = MODELS[name](**CONFIGS.get(name, {}))
    report = assert_model_conforms(model, _register(model, cells))
    print(report)
    assert report.ok
    assert report["fit"].status == "passed"
    assert report["save_load"].status == "passed"  # built-ins are registered
    expected_ll = "passed" if name in ("ppca", "fa", "gmm") else "skipped"
    assert report["log_likelihood"].status == expected_ll


# --------------------------------------------------------------------------
# A small model written by a user, correct, and six ways to get it wrong
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TinyFactors(LatentModel):
    """z ~ N(0, I_K), x | z ~ N(W z + mu, sigma^2 I); an amortised full-covariance guide."""

    n_latent: int = 2

    name: ClassVar[str] = "tiny_factors"
    data_kind: ClassVar[str] = "continuous"
    default_learning_rate: ClassVar[float] = 0.02
    # What the model claims, and check_model then checks: these guides, and NUTS.
    supported_guides: ClassVar[tuple[str, ...]] = ("mean_field", "map", "low_rank")
    supports_nuts: ClassVar[bool] = True

    def model(self, batch):
        n_genes = batch.x.shape[-1]
        W = numpyro.param("W", 0.5 * jnp.eye(n_genes, self.n_latent))
        mu = numpyro.param("mu", jnp.zeros(n_genes))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with cell_plate(batch):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([self.n_latent]).to_event(1))
            numpyro.sample("x", dist.Normal(z @ W.T + mu, sigma).to_event(1), obs=batch.x)

    def guide(self, batch):
        n_genes = batch.x.shape[-1]
        A = numpyro.param("encoder_weight", jnp.zeros((n_genes, self.n_latent)))
        c = numpyro.param("encoder_bias", jnp.zeros(self.n_latent))
        L = numpyro.param("posterior_scale_tril", jnp.eye(self.n_latent),
                          constraint=constraints.lower_cholesky)
        with cell_plate(batch):
            numpyro.sample("z", dist.MultivariateNormal(batch.x @ A + c, scale_tril=L))

    def init_params(self, batch, key):
        """PCA loadings and the exact posterior's encoder for them."""
        x = batch.x
        mu = x.mean(0)
        _, singular, vt = jnp.linalg.svd(x - mu, full_matrices=False)
        variance = singular**2 / x.shape[0]
        sigma2 = variance[self.n_latent:].sum() / (x.shape[1] - self.n_latent)
        W = vt[:self.n_latent].T * jnp.sqrt(jnp.maximum(variance[:self.n_latent] - sigma2, 1e-3))
        covariance = jnp.linalg.inv(jnp.eye(self.n_latent) + W.T @ W / sigma2)
        A = W @ covariance / sigma2
        return {"W": W, "mu": mu, "sigma": jnp.sqrt(sigma2), "encoder_weight": A,
                "encoder_bias": -mu @ A, "posterior_scale_tril": jnp.linalg.cholesky(covariance)}

    def latent(self, params, batch, key):
        return batch.x @ params["encoder_weight"] + params["encoder_bias"]

    def log_likelihood(self, params, batch):
        W, mu, sigma = params["W"], params["mu"], params["sigma"]
        covariance = W @ W.T + sigma**2 * jnp.eye(W.shape[0])
        return dist.MultivariateNormal(mu, covariance_matrix=covariance).log_prob(batch.x)


@dataclasses.dataclass(frozen=True)
class GlobalLookingZ(TinyFactors):
    """Mistake: z drawn for the B cells of the minibatch before the plate, not inside it."""

    name: ClassVar[str] = "tiny_z_outside_plate"

    def model(self, batch):
        n_genes = batch.x.shape[-1]
        W = numpyro.param("W", 0.5 * jnp.eye(n_genes, self.n_latent))
        mu = numpyro.param("mu", jnp.zeros(n_genes))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([batch.size, self.n_latent])
                           .to_event(1))
        with cell_plate(batch):
            numpyro.sample("x", dist.Normal(z @ W.T + mu, sigma).to_event(1), obs=batch.x)


@dataclasses.dataclass(frozen=True)
class ForgetsScaleInGuide(TinyFactors):
    """Mistake: a per-cell size factor added to the model, not to the guide."""

    name: ClassVar[str] = "tiny_guide_missing_site"

    def model(self, batch):
        n_genes = batch.x.shape[-1]
        W = numpyro.param("W", 0.5 * jnp.eye(n_genes, self.n_latent))
        mu = numpyro.param("mu", jnp.zeros(n_genes))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with cell_plate(batch):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([self.n_latent]).to_event(1))
            size = numpyro.sample("size", dist.LogNormal(0.0, 0.1))
            mean = size[:, None] * (z @ W.T + mu)
            numpyro.sample("x", dist.Normal(mean, sigma).to_event(1), obs=batch.x)

    def log_likelihood(self, params, batch):
        return None  # no closed form with the size factor


@dataclasses.dataclass(frozen=True)
class SqueezedLatent(TinyFactors):
    """Mistake: the latent squeezed to ``(B,)`` for a one-dimensional model."""

    name: ClassVar[str] = "tiny_squeezed_latent"

    def latent(self, params, batch, key):
        return jnp.squeeze(super().latent(params, batch, key))


@dataclasses.dataclass(frozen=True)
class ForgetsNormaliser(TinyFactors):
    """Mistake: log_likelihood without the ``-G/2 log(2 pi)`` of the Gaussian density."""

    name: ClassVar[str] = "tiny_log_likelihood_offset"

    def log_likelihood(self, params, batch):
        n_genes = batch.x.shape[-1]
        return super().log_likelihood(params, batch) + 0.5 * n_genes * np.log(2 * np.pi)


@dataclasses.dataclass(frozen=True)
class CountsItsSteps(TinyFactors):
    """Mistake: a Python-side step counter kept on the model (e.g. for a warm-up schedule).

    It only counts traces, not steps: a compiled program keeps the value it was
    traced with.  And each trace changes a field, hence the model's hash, so a
    jitted program taking the model as a static argument misses its cache for
    every copy of the model (a loaded run, ``dataclasses.replace``) and traces
    again, each time moving the counter on.
    """

    steps: int = 0

    name: ClassVar[str] = "tiny_retraces"

    def model(self, batch):
        object.__setattr__(self, "steps", self.steps + 1)
        super().model(batch)


@dataclasses.dataclass(frozen=True)
class MisspeltStart(TinyFactors):
    """Mistake: init_params returns ``"sigm"`` for the param ``"sigma"`` (silently ignored)."""

    name: ClassVar[str] = "tiny_misspelt_init"

    def init_params(self, batch, key):
        start = dict(super().init_params(batch, key))
        start["sigm"] = start.pop("sigma")
        return start


@pytest.fixture(scope="module")
def continuous():
    """80 cells × 10 genes from a 2-factor model (check_model uses 64)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(80, 2))
    x = z @ rng.normal(size=(2, 10)) + 1.0 + 0.5 * rng.normal(size=(80, 10))
    return lvmzoo.CellData.from_arrays(x.astype(np.float32))


@pytest.fixture(scope="module")
def reports(continuous):
    """Reports of the planted models, each checked once (named guides and NUTS left out:
    not the point)."""
    cache = {}

    def get(cls, **options):
        key = (cls, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = check_model(cls(**options), continuous, guides=(), nuts=False,
                                     raise_on_failure=False)
            print(cache[key])
        return cache[key]

    return get


def failed(report: CheckReport) -> dict[str, str]:
    return {r.name: r.message for r in report.failures}


def test_correct_user_model_conforms(continuous):
    report = check_model(TinyFactors(), continuous, raise_on_failure=False)
    print(report)
    assert report.ok, str(report)
    statuses = {r.name: r.status for r in report.results}
    assert statuses["log_likelihood"] == "passed"
    # The class attributes choose the guides (a joint one included) and turn NUTS on.
    assert [n for n in statuses if n.startswith("guide:")] == [
        "guide:mean_field", "guide:map", "guide:low_rank"]
    assert statuses["guide:low_rank"] == statuses["nuts"] == "passed"
    # A user's class is not in MODELS: the round trip passes where load_model can import it
    # from the path the run recorded, and is skipped (saying why) where it cannot.
    assert statuses["save_load"] in ("passed", "skipped")
    if statuses["save_load"] == "skipped":
        assert "not registered" in report["save_load"].message
    text = str(report)
    assert "minibatch_scaling" in text and "passed" in text


def test_latent_outside_the_plate_is_caught_by_plate_and_scaling_checks(reports):
    problems = failed(reports(GlobalLookingZ))
    # The log-likelihood check fails too: the fit optimised a mis-scaled objective, and the
    # per-cell importance weights (sites in the plate) miss z altogether.
    assert set(problems) == {"cells_plate", "minibatch_scaling", "log_likelihood"}, problems
    assert "'z'" in problems["cells_plate"] and "outside the 'cells' plate" in problems["cells_plate"]
    assert "cell_plate(batch)" in problems["cells_plate"]
    assert "'z'" in problems["minibatch_scaling"]
    assert "not multiplied by n_cells / B" in problems["minibatch_scaling"]


def test_guide_missing_a_site_is_caught(reports):
    problems = failed(reports(ForgetsScaleInGuide))
    assert set(problems) == {"guide_covers_latents"}, problems
    message = problems["guide_covers_latents"]
    assert "no sample site for the model's latent 'size'" in message
    assert "positive" in message and "guide='mean_field'" in message


def test_wrongly_shaped_latent_is_caught(reports):
    problems = failed(reports(SqueezedLatent, n_latent=1))
    assert set(problems) == {"latent_shape"}, problems
    assert "shape (12,)" in problems["latent_shape"]
    assert "(B, n_latent)" in problems["latent_shape"]
    assert "z[:, None]" in problems["latent_shape"]


def test_log_likelihood_off_by_a_constant_is_caught(reports):
    problems = failed(reports(ForgetsNormaliser))
    assert set(problems) == {"log_likelihood"}, problems
    # G/2 log(2 pi) = 9.19 nats per cell too high
    assert "log_likelihood exceeds the importance-sampled estimate by 9.1" in \
        problems["log_likelihood"]


def test_model_with_a_python_side_counter_retraces_and_is_caught(reports):
    report = reports(CountsItsSteps)
    problems = failed(report)
    # Where load_model can rebuild a user's class, the saved config (steps=k) is not the
    # model's any more either.
    expected = {"no_retracing"} | ({"save_load"} if report["save_load"].status == "failed"
                                   else set())
    assert set(problems) == expected, problems
    if "save_load" in problems:
        assert "steps=" in problems["save_load"]
    message = problems["no_retracing"]
    assert "traced model() again on every call ([1, 1, 1]" in message
    assert "changed while it ran (field steps:" in message and "Python-side state" in message


def test_misspelt_init_params_key_is_caught(reports):
    problems = failed(reports(MisspeltStart))
    assert set(problems) == {"init_params_keys"}, problems
    assert "'sigm'" in problems["init_params_keys"]
    assert "did you mean 'sigma'?" in problems["init_params_keys"]


def test_failures_raise_one_error_listing_all_of_them(continuous):
    with pytest.raises(ModelCheckError) as caught:
        check_model(GlobalLookingZ(), continuous, guides=(), nuts=False)
    error = caught.value
    assert isinstance(error, AssertionError)
    assert len(error.report.failures) == 3
    message = str(error)
    assert "fails 3 model check(s)" in message
    assert "- cells_plate:" in message and "- minibatch_scaling:" in message
    assert not error.report.ok


# --------------------------------------------------------------------------
# A library bug the log-likelihood check steps around
# --------------------------------------------------------------------------


def test_importance_sampling_of_a_latent_left_to_its_prior(cells):
    """A latent the guide leaves to its prior (the GMM's component) is proposed from that
    prior, so its density is not counted in the weight: the estimate is then unbiased and
    meets the exact log-likelihood (it was ~E[-log w_c] nats/cell below before)."""
    from lvmzoo.models import GaussianMixture

    model = GaussianMixture(n_components=3)
    data = _register(model, cells)
    fitted = lvmzoo.fit(model, data, epochs=5, batch_size=32, progress=False)
    exact = fitted.evaluate(data)["avg_log_likelihood"]
    sampled = fitted.evaluate(data, n_samples=256, method="importance_sampling")
    assert abs(sampled["avg_log_likelihood"] - exact) < 0.1, (sampled, exact)


def test_settings_that_name_the_data_are_resolved_before_the_checks():
    """A model whose settings name the data (a root category, marker genes) is checked as
    lvmzoo.fit fits it, resolved against the data first; unresolved, every check that
    runs the model itself failed ("was not resolved against the data")."""
    from lvmzoo.models import SwitchPseudotime

    cells = datasets.simulate_trajectory(120, 20, seed=2)
    model = SwitchPseudotime(markers=("gene1:up",), root_key="early", root_value="yes")
    data = lvmzoo.setup_anndata(cells, kind="counts", transform="log1p_cp10k",
                                **model.registration())
    report = check_model(model, data, guides=())
    assert report.ok, str(report)
