"""NUTS on zoo models, and ArviZ conversion / diagnostics of MCMC and SVI fits."""

import dataclasses

import arviz as az
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import lvmzoo
from lvmzoo.data.registry import CellData
from lvmzoo.infer import diagnostics
from lvmzoo.infer.mcmc import run_nuts
from lvmzoo.models import PPCA
from lvmzoo.models.base import LatentModel, cell_plate

K = 2


def simulate(n_cells, seed=0):
    """PPCA data: 6 genes, K = 2, noise sd 0.5."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(6, K)) * np.array([2.0, 1.0])
    x = rng.normal(size=(n_cells, K)) @ W.T + 0.5 * rng.normal(size=(n_cells, 6))
    return CellData.from_arrays(x.astype(np.float32))


def ml_covariance(x):
    """Closed-form PPCA ML covariance ``W W^T + sigma^2 I`` (Tipping & Bishop, 1999)."""
    values, vectors = np.linalg.eigh(np.cov(np.asarray(x, np.float64).T, bias=True))
    values, vectors = values[::-1], vectors[:, ::-1]
    noise = values[K:].mean()
    top = vectors[:, :K]
    return top @ np.diag(values[:K] - noise) @ top.T + noise * np.eye(x.shape[1])


def test_run_nuts_explains_point_estimated_globals():
    with pytest.raises(ValueError, match=r"point-estimates W, mu, sigma.*global_prior_scale"):
        run_nuts(PPCA(n_latent=K), simulate(20), num_warmup=1, num_samples=1, num_chains=1)


@pytest.fixture(scope="module")
def posterior_nuts():
    """PPCA with random globals, 100 cells: 4 chains x (400 warm-up + 800 draws) of NUTS in 219
    dimensions (~20 s with a cold compilation cache on one core), shared by the two tests below.

    Chosen for the convergence asserts below, measured on NUTS seeds 1-5: max R-hat
    1.0027-1.0050, min bulk ESS 883-1099.  The 200 cells x (400 + 400) used before cost the
    same and were marginal (seeds 1-5: R-hat 1.0059-1.0199, ESS 284-515: seeds 3 and 5 fail);
    100 cells x (300 + 500) fail on seed 5 (R-hat 1.0133, ESS 390).
    """
    data = simulate(100)
    return data, run_nuts(PPCA(n_latent=K, global_prior_scale=2.0), data, num_warmup=400,
                          num_samples=800, num_chains=4, seed=1)


@pytest.mark.slow  # ~50 s on the loaded 2-core machine: 4 chains x 1200 NUTS steps in 219 dimensions
def test_nuts_posterior_covariance_matches_maximum_likelihood(posterior_nuts):
    """``C = W W^T + sigma^2 I`` is identifiable (``W`` only up to rotation).

    Tolerance per entry: ``|E[C | x] - C_ML| <= 1 posterior sd + 4 MCSE``.  By
    Bernstein-von Mises the posterior is ``N(C_ML, sd^2)`` up to ``O(1/n)``
    terms (prior, skew) that are well below one sd at n = 100 (the largest
    error is 0.51-0.55 of its tolerance on NUTS seeds 1-5; 0.34-0.39 at
    n = 200); ``4 MCSE`` bounds the Monte Carlo error of the estimated
    posterior mean.
    """
    data, result = posterior_nuts
    W, sigma = result.samples["W"], result.samples["sigma"]
    C = np.einsum("cdgk,cdhk->cdgh", W, W) + sigma[..., None, None] ** 2 * np.eye(6)
    upper = np.triu_indices(6)
    draws = az.convert_to_dataset({"C": C[:, :, upper[0], upper[1]]})
    table = az.summary(draws, kind="all", round_to="none")
    target = ml_covariance(data.x)[upper]
    error = np.abs(table["mean"].to_numpy() - target)
    tolerance = table["sd"].to_numpy() + 4 * table["mcse_mean"].to_numpy()
    assert np.all(error <= tolerance), (error / tolerance).max()
    assert table["r_hat"].max() < 1.01
    assert table["ess_bulk"].min() > 400
    checks = diagnostics.mcmc_checks(diagnostics.to_inference_data(result), var_names=["sigma"])
    assert checks["divergences"] == 0


@pytest.mark.slow  # the covariance test's NUTS run (a run of its own: ~10 s more, cold cache)
def test_nuts_inference_data_has_named_dims_checks_and_loo(posterior_nuts):
    data, result = posterior_nuts
    idata = diagnostics.to_inference_data(result)
    post = idata.posterior
    assert post["z"].dims == ("chain", "draw", "cells", "latent")
    assert post["W"].dims == ("chain", "draw", "genes", "latent")
    assert post["mu"].dims == ("chain", "draw", "genes")
    assert post["sigma"].dims == ("chain", "draw")
    assert post.sizes["chain"] == 4 and post.sizes["draw"] == 800
    np.testing.assert_array_equal(post["cells"].values, data.obs_names)
    np.testing.assert_array_equal(post["genes"].values, data.registry.gene_names)
    assert "diverging" in idata.sample_stats
    # Exact marginal log p(x_i | W, mu, sigma) per cell and draw: PSIS-LOO over cells.
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "cells")
    loo = diagnostics.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (100,)
    checks = diagnostics.mcmc_checks(idata, var_names=["sigma", "mu"])
    assert set(checks) == {"max_r_hat", "min_ess_bulk", "min_ess_tail", "max_mcse_mean",
                           "divergences"}
    assert all(np.isfinite(v) for v in checks.values())
    table = diagnostics.summary(idata, var_names=["sigma"])
    assert {"r_hat", "ess_bulk", "ess_tail", "mcse_mean", "mcse_sd"} <= set(table.columns)


def test_svi_inference_data_has_named_dims_elbo_trace_and_pareto_k():
    data = simulate(60, seed=3)
    fitted = lvmzoo.fit(PPCA(n_latent=K), data, guide="mean_field", epochs=20, batch_size=20,
                        learning_rate=0.05, validation_fraction=0.25, progress=False)
    idata = diagnostics.to_inference_data(fitted, data, n_samples=30, importance_samples=40)
    train_names = data.obs_names[fitted.train_index]
    assert idata.posterior["z"].dims == ("chain", "draw", "cells", "latent")
    assert idata.posterior.sizes["draw"] == 30
    np.testing.assert_array_equal(idata.posterior["cells"].values, train_names)
    svi = idata["svi"]
    np.testing.assert_allclose(svi["loss"].values, fitted.history["loss"])
    assert svi["loss"].dims == ("epoch",)
    k = svi["pareto_k"]
    assert k.dims == ("cells",) and k.shape == (45,)
    assert np.all(np.isfinite(k.values))
    assert np.isfinite(svi.attrs["joint_pareto_k"])
    report = diagnostics.pareto_k_summary(k.values)
    assert 0.0 <= report["share_ok"] <= 1.0 and np.isfinite(report["max"])
    assert not hasattr(idata, "log_likelihood")  # point-estimated globals: LOO does not apply


@pytest.mark.slow  # ~35 s on the loaded 2-core machine, mostly XLA compilation
def test_svi_with_global_priors_has_global_draws_and_loo():
    data = simulate(60, seed=4)
    fitted = lvmzoo.fit(PPCA(n_latent=K, global_prior_scale=2.0), data, guide="amortized",
                        epochs=300, batch_size=60, learning_rate=0.05, progress=False)
    idata = diagnostics.to_inference_data(fitted, data, n_samples=40, importance_samples=20)
    assert idata.posterior["W"].dims == ("chain", "draw", "genes", "latent")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "cells")
    assert np.isfinite(diagnostics.loo(idata).elpd_loo)


@dataclasses.dataclass(frozen=True)
class TwoMeans(LatentModel):
    """1-D mixture of two unit-variance clusters with random means; equal weights."""

    name = "two_means"

    def model(self, batch):
        means = numpyro.sample("means", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        with cell_plate(batch):
            c = numpyro.sample("c", dist.Categorical(jnp.array([0.5, 0.5])),
                               infer={"enumerate": "parallel"})
            numpyro.sample("x", dist.Normal(means[c], 1.0), obs=batch.x[:, 0])

    def guide(self, batch):
        pass

    def latent(self, params, batch, key):
        return batch.x


def test_nuts_sums_out_enumerated_discrete_sites():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-3, 1, 30), rng.normal(4, 1, 30)])[:, None]
    data = CellData.from_arrays(x.astype(np.float32))
    result = run_nuts(TwoMeans(), data, num_warmup=150, num_samples=150, num_chains=2)
    assert set(result.samples) == {"means"}  # c is summed out, never sampled
    means = np.sort(result.samples["means"], axis=-1).reshape(-1, 2)  # labels may switch
    sd = means.std(0)
    np.testing.assert_allclose(means.mean(0), [x[:30].mean(), x[30:].mean()], atol=4 * sd.max())


def test_nuts_samples_a_gaussian_mixture_with_random_globals():
    """GaussianMixture(global_prior_scale=...): NUTS over weights, means and scales, c summed out.

    Three well-separated clusters of 40 cells in 3 dimensions.  Components
    may be labelled differently in each chain, so the checks use
    label-invariant quantities (as compare() does): the sorted weights match
    the cluster shares within 4 posterior sd, and the per-draw average
    log-likelihood is within 1 nat/cell below scikit-learn's maximum
    likelihood (a posterior average sits ~ dim / (2 n) = 0.1 below it) and
    mixes (R-hat < 1.05).
    """
    from sklearn.mixture import GaussianMixture as SkMixture

    from lvmzoo.infer.compare import _identifiable
    from lvmzoo.models import GaussianMixture

    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 2.0], [0.0, 5.0, -2.0]])
    sizes = np.array([60, 40, 20])
    x = np.concatenate([c + 0.7 * rng.normal(size=(n, 3)) for c, n in zip(centres, sizes)])
    data = CellData.from_arrays(x.astype(np.float32))
    model = GaussianMixture(n_components=3, global_prior_scale=5.0)
    result = run_nuts(model, data, num_warmup=300, num_samples=300, num_chains=2, seed=1)
    assert {"weights", "means", "scales_above_floor"} <= set(result.samples)
    assert "component" not in result.samples
    weights = np.sort(result.samples["weights"].reshape(-1, 3), axis=-1)
    np.testing.assert_array_less(np.abs(weights.mean(0) - np.sort(sizes / sizes.sum())),
                                 4 * weights.std(0))
    idata = _identifiable(result, random_globals=True)
    checks = diagnostics.mcmc_checks(idata, var_names=["mean_log_likelihood"])
    assert checks["max_r_hat"] < 1.05
    ml = SkMixture(3, covariance_type="diag", n_init=3, random_state=0).fit(x).score(x)
    average = float(idata.posterior["mean_log_likelihood"].mean())
    assert ml - 1.0 < average < ml + 0.05
