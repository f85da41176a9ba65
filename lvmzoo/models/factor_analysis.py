"""Factor analysis: probabilistic PCA with a separate noise variance per gene.

Generative story, for each cell::

    z ~ N(0, I_K)
    x | z ~ N(W z + mu, diag(psi))

``W``, ``mu`` and ``psi`` are point-estimated (maximum likelihood, as
scikit-learn's ``FactorAnalysis`` does); ``z`` uses the amortised linear guide
of :mod:`lvmzoo.models.linear_gaussian`.  Reports the exact posterior mean of
``z`` and the exact marginal log-likelihood.

With ``global_prior_scale = s`` the globals are random too, so that MCMC
(:func:`lvmzoo.infer.mcmc.run_nuts`) can sample them::

    W_gk ~ N(0, s^2),   mu_g ~ N(0, s^2),   psi_g ~ HalfNormal(s)   # a variance

(as for :class:`~lvmzoo.models.ppca.PPCA`: fit by guide name, e.g.
``guide="amortized"``, whose plug-in posterior means ``latent`` and
``log_likelihood`` use.)

References:
  Bishop, C. M. (2006). Pattern Recognition and Machine Learning, §12.2.4.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from lvmzoo.data.source import Batch
from lvmzoo.models import linear_gaussian as lg
from lvmzoo.models.base import LatentModel


@dataclasses.dataclass(frozen=True)
class FactorAnalysis(LatentModel):
    """Factor analysis with ``n_latent`` factors.

    Attributes:
      n_latent: number of factors ``K``.
      global_prior_scale: ``None`` (default) point-estimates ``W``, ``mu``,
        ``psi``; a float ``s`` gives them the priors in the module docstring.
    """

    n_latent: int = 10
    global_prior_scale: Optional[float] = None

    name: ClassVar[str] = "fa"
    data_kind: ClassVar[str] = "continuous"
    default_transform: ClassVar[str] = "log1p_cp10k"
    default_learning_rate: ClassVar[float] = 1e-2

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        s = self.global_prior_scale
        if s is None:  # maximum likelihood
            W = numpyro.param("W", jnp.zeros((n_genes, self.n_latent)))
            mu = numpyro.param("mu", jnp.zeros(n_genes))
            psi = numpyro.param("psi", jnp.ones(n_genes), constraint=constraints.positive)
        else:
            W = numpyro.sample("W", dist.Normal(0.0, s).expand([n_genes, self.n_latent]).to_event(2))
            mu = numpyro.sample("mu", dist.Normal(0.0, s).expand([n_genes]).to_event(1))
            psi = numpyro.sample("psi", dist.HalfNormal(s).expand([n_genes]).to_event(1))
        lg.generative_story(batch, self.n_latent, jnp.sqrt(psi), W, mu)

    def config(self) -> dict:
        config = super().config()
        if self.global_prior_scale is None:  # runs saved before the option read the same
            del config["global_prior_scale"]
        return config

    def guide(self, batch: Batch) -> None:
        lg.linear_encoder_guide(batch, self.n_latent)

    def init_params(self, batch: Batch, key: jax.Array) -> dict:
        start = lg.init_from_data(batch, self.n_latent, key)
        return {"W": start["W"], "mu": start["mu"], "psi": start["variance"]}

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        mean, _ = lg.posterior(batch.x, params["W"], params["mu"], params["psi"])
        return mean

    def log_likelihood(self, params, batch: Batch) -> jax.Array:
        return lg.marginal_log_likelihood(batch.x, params["W"], params["mu"], params["psi"])
