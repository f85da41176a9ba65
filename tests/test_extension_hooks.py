"""scVI's extension hooks: a new variant is a subclass of a few lines, trained by the one driver."""

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
from lvmzoo.models import SCVI


@dataclasses.dataclass(frozen=True)
class MixturePriorSCVI(SCVI):
    """scVI whose latent prior is a mixture of Gaussians (the hook: :meth:`SCVI.prior`).

    Attributes:
      n_prior_components: components of the prior mixture.
    """

    n_prior_components: int = 4
    name: ClassVar[str] = "scvi_mog_test"

    def prior(self, batch):
        k, d = self.n_prior_components, self.n_latent
        logits = numpyro.param("prior_logits", jnp.zeros(k))
        locs = numpyro.param("prior_locs", jnp.linspace(-1.0, 1.0, k * d).reshape(k, d))
        scales = numpyro.param("prior_scales", jnp.ones((k, d)), constraint=constraints.positive)
        components = dist.Normal(locs, scales).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


@pytest.fixture(scope="module")
def cells():
    adata = datasets.simulate_counts(n_cells=300, n_genes=40, n_batches=2, n_de_genes_per_type=3,
                                     seed=4)
    return adata, lvmzoo.setup_anndata(adata, batch_key="batch")


def test_a_prior_subclass_trains_saves_and_scores_through_the_driver(cells, tmp_path):
    adata, data = cells
    model = MixturePriorSCVI(n_hidden=16, n_latent=3, n_epochs_kl_warmup=None)
    fitted = lvmzoo.fit(model, data, epochs=5, batch_size=100, learning_rate=1e-2,
                        progress=False, seed=0)
    # The prior's own parameters were learnt (they moved from their start).
    assert set(fitted.params) >= {"prior_logits", "prior_locs", "prior_scales"}
    assert not np.allclose(fitted.params["prior_locs"],
                           np.linspace(-1.0, 1.0, 12).reshape(4, 3))
    scores = fitted.evaluate(data, n_samples=10)
    assert np.isfinite(scores["avg_log_likelihood"]) and np.isfinite(scores["elbo"])
    assert fitted.latent(data).shape == (300, 3)
    fitted.save(tmp_path / "run")
    loaded = lvmzoo.load_model(tmp_path / "run")  # found through the run's recorded class
    np.testing.assert_array_equal(loaded.latent(data), fitted.latent(data))


def test_the_default_prior_is_unchanged(cells):
    """SCVI with the hook gives the log-density of N(0, I) it always had."""
    z = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    prior = SCVI(n_latent=3).prior(None)
    expected = dist.Normal(0.0, 1.0).expand([3]).to_event(1).log_prob(z)
    np.testing.assert_allclose(prior.log_prob(z), expected)
