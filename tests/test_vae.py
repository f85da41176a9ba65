"""The VAE: trains through the driver, importance-sampled evaluation, dropout, Bernoulli.

The Gaussian tests share one module fixture: a VAE fitted for 15 epochs to 2,000
cells of the bundled mouse 10k data (log1p of counts per 10k), the same VAE
untrained (``epochs=0``: the driver's initial parameters), 200 held-out cells
and the log importance weights of 111 guide draws on them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

import lvmzoo
from lvmzoo import datasets
from lvmzoo.data.source import DeviceSource
from lvmzoo.infer import log_weights
from lvmzoo.models import MODELS, VAE
from lvmzoo.nn import MLP, GaussianEncoder

N_TRAIN, N_HELD_OUT = 2000, 200
N_DRAWS = 111  # disjoint draws for K = 1, 10 and 100


@pytest.fixture(scope="module")
def gaussian():
    data = lvmzoo.setup_anndata(
        datasets.load_mouse_10k(), kind="counts", transform="log1p_cp10k"
    )
    order = np.random.default_rng(0).permutation(data.n_cells)
    train = data.subset(np.sort(order[:N_TRAIN]))
    held_out = data.subset(np.sort(order[N_TRAIN:N_TRAIN + N_HELD_OUT]))
    model = VAE()
    fit = lambda epochs: lvmzoo.fit(model, train, epochs=epochs, batch_size=128, progress=False)
    batch = DeviceSource(held_out).full_batch()
    keys = jax.random.split(jax.random.PRNGKey(1), N_DRAWS)
    # log p(x, z) - log q(z | x) per draw and cell, (N_DRAWS, cells); params are an
    # argument so one compiled program serves the trained and the untrained VAE.
    weights = jax.jit(lambda params: jax.vmap(
        lambda k: log_weights(model.model, model.guide, params, batch, k))(keys))
    return dict(model=model, held_out=held_out, untrained=fit(0), trained=fit(15),
                weights=weights)


def _iwae(weights):
    """Average over cells of the IWAE bound log (1/K) sum_k w_k, for each K."""
    return {
        K: float(jnp.mean(logsumexp(w, axis=0) - jnp.log(K)))
        for K, w in ((1, weights[:1]), (10, weights[1:11]), (100, weights[11:]))
    }


def test_registered_and_likelihood_sets_data_kind():
    assert MODELS["vae"] is VAE
    assert (VAE().data_kind, VAE().default_transform) == ("continuous", "log1p_cp10k")
    bernoulli = VAE(likelihood="bernoulli")
    assert (bernoulli.data_kind, bernoulli.default_transform) == ("binary", "none")
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="poisson")


def test_trained_far_above_untrained(gaussian):
    """Held-out IS log-likelihood (K = 100): measured -919 vs -1,467 nats per cell."""
    assert gaussian["untrained"].history["loss"] == []  # epochs=0: the initial parameters
    trained = gaussian["weights"](gaussian["trained"].params)
    untrained = gaussian["weights"](gaussian["untrained"].params)
    assert bool(jnp.all(jnp.isfinite(trained))) and bool(jnp.all(jnp.isfinite(untrained)))
    assert _iwae(trained)[100] > _iwae(untrained)[100] + 300.0


def test_importance_sampled_bound_tightens_with_samples(gaussian):
    """IWAE(K) on the same 200 held-out cells rises with K, and beats the ELBO.

    Disjoint draws for K = 1, 10, 100.  Measured: -925.0, -920.5, -919.2 (ELBO
    -924.6); over other draw sets the averages vary by s.d. about 0.4 (K = 1),
    0.12 (K = 10) and 0.05 (K = 100), so the margins below are several s.d.
    """
    iwae = _iwae(gaussian["weights"](gaussian["trained"].params))
    assert iwae[1] + 1.0 < iwae[10] < iwae[100] - 0.3, iwae
    # FittedModel.evaluate: the importance-sampled path (no closed form) and an
    # independent ELBO (numpyro's Trace_ELBO).  K = 1 is itself an ELBO estimate.
    result = gaussian["trained"].evaluate(gaussian["held_out"], n_samples=10)
    assert result["method"] == "importance_sampling" and result["n_samples"] == 10
    assert abs(result["avg_log_likelihood"] - iwae[10]) < 1.0, (result, iwae)
    assert abs(iwae[1] - result["elbo"]) < 2.0, (result, iwae)
    assert iwae[10] > result["elbo"] + 1.0 and iwae[100] > result["elbo"] + 1.0, (result, iwae)


def test_dropout_only_while_training(gaussian):
    model, params = gaussian["model"], gaussian["trained"].params
    evaluation = DeviceSource(gaussian["held_out"]).full_batch(np.arange(100))
    assert evaluation.training is False
    z1 = model.latent(params, evaluation, jax.random.PRNGKey(1))
    z2 = model.latent(params, evaluation, jax.random.PRNGKey(2))
    assert z1.shape == (100, model.n_latent)
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(z2))
    fitted = gaussian["trained"]
    np.testing.assert_array_equal(
        fitted.latent(gaussian["held_out"], seed=0), fitted.latent(gaussian["held_out"], seed=3)
    )
    # The same cells as a training batch: dropout draws differ between keys.
    training = evaluation.replace(training=True)
    t1 = model.latent(params, training, jax.random.PRNGKey(1))
    t2 = model.latent(params, training, jax.random.PRNGKey(2))
    assert float(jnp.max(jnp.abs(t1 - t2))) > 1e-3


def test_bernoulli_vae_on_binarised_data():
    adata = datasets.load_mouse_10k()
    adata = adata[np.random.default_rng(1).permutation(adata.n_obs)[:1000]].copy()
    adata.X = (adata.X > 0).astype(np.float32)
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()  # genes seen in the subset
    data = lvmzoo.setup_anndata(adata, kind="binary")
    model = VAE(likelihood="bernoulli", n_latent=5)
    fitted = lvmzoo.fit(model, data, epochs=8, batch_size=128, progress=False)
    loss = np.array(fitted.history["loss"])
    assert np.all(np.isfinite(loss))
    # Measured: about 400 -> 160 nats per cell over 8 epochs.
    assert loss[-1] < 0.7 * loss[0] and loss[-1] < loss[-3], loss
    assert fitted.latent(data).shape == (data.n_cells, 5)
    # The driver refuses to fit a Bernoulli likelihood to non-binary data.
    continuous = lvmzoo.CellData.from_arrays(np.full((20, 3), 0.5), kind="continuous")
    with pytest.raises(ValueError, match="binary"):
        lvmzoo.fit(model, continuous, epochs=1, progress=False)


def test_nn_blocks_covariate_norms_and_positive_scale():
    x = jnp.ones((4, 6))
    one_hot = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)
    mlp = MLP(hidden=(8, 8), n_out=5, batch_norm=True, layer_norm=True, dropout_rate=0.5)
    variables = jax.jit(mlp.init)(jax.random.PRNGKey(0), x, one_hot)
    assert variables["params"]["Dense_0"]["kernel"].shape == (6 + 3, 8)  # covariate at layer 1
    assert "batch_stats" in variables
    evaluate = jax.jit(lambda v: mlp.apply(v, x, one_hot))  # no rng, no state update
    assert evaluate(variables).shape == (4, 5)
    train = jax.jit(lambda v, k: mlp.apply(
        v, x, one_hot, training=True, rngs={"dropout": k}, mutable=["batch_stats"]))
    out, state = train(variables, jax.random.PRNGKey(1))
    assert out.shape == (4, 5) and "batch_stats" in state
    encoder = GaussianEncoder(n_latent=2, hidden=())  # linear heads
    enc_vars = jax.jit(encoder.init)(jax.random.PRNGKey(0), x)
    loc, scale = jax.jit(encoder.apply)(enc_vars, -1e3 * x)
    assert loc.shape == scale.shape == (4, 2) and bool(jnp.all(scale > 0))
