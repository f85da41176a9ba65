"""Probabilistic PCA (Tipping & Bishop, 1999).

Generative story, for each cell::

    z ~ N(0, I_K)
    x | z ~ N(W z + mu, sigma^2 I_G)

``W``, ``mu`` and ``sigma`` are point-estimated (maximum likelihood, as
scikit-learn's ``PCA`` does); ``z`` is a local latent with the amortised linear
guide of :mod:`lvmzoo.models.linear_gaussian`.  Reports the exact posterior
mean of ``z`` and the exact marginal log-likelihood.

With ``global_prior_scale = s`` the globals are random too, so that MCMC
(:func:`lvmzoo.infer.mcmc.run_nuts`) can sample them::

    W_gk ~ N(0, s^2),   mu_g ~ N(0, s^2),   sigma ~ HalfNormal(s)

(``latent`` / ``log_likelihood`` then need point values of them in ``params``;
fits with a guide from :func:`lvmzoo.infer.guides.make_guide` plug in their
posterior means, and the model's own guide covers ``z`` only, so fit it by
name, ``guide="amortized"``, which adds mean-field Normals for the globals.)

References:
  Tipping, M. E. & Bishop, C. M. (1999). Probabilistic principal component
  analysis. JRSS B 61(3). https://doi.org/10.1111/1467-9868.00196
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
from lvmzoo.models.base import LatentModel, compiled


@dataclasses.dataclass(frozen=True)
class PPCA(LatentModel):
    """Probabilistic PCA with ``n_latent`` components.

    Attributes:
      n_latent: number of components ``K``.
      global_prior_scale: ``None`` (default) point-estimates ``W``, ``mu``,
        ``sigma``; a float ``s`` gives them the priors in the module docstring.
    """

    n_latent: int = 10
    global_prior_scale: Optional[float] = None

    name: ClassVar[str] = "ppca"
    data_kind: ClassVar[str] = "continuous"
    default_transform: ClassVar[str] = "log1p_cp10k"
    default_learning_rate: ClassVar[float] = 1e-2

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        s = self.global_prior_scale
        if s is None:  # maximum likelihood
            W = numpyro.param("W", jnp.zeros((n_genes, self.n_latent)))
            mu = numpyro.param("mu", jnp.zeros(n_genes))
            sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        else:
            W = numpyro.sample("W", dist.Normal(0.0, s).expand([n_genes, self.n_latent]).to_event(2))
            mu = numpyro.sample("mu", dist.Normal(0.0, s).expand([n_genes]).to_event(1))
            sigma = numpyro.sample("sigma", dist.HalfNormal(s))
        lg.generative_story(batch, self.n_latent, sigma, W, mu)

    def config(self) -> dict:
        config = super().config()
        if self.global_prior_scale is None:  # runs saved before the option read the same
            del config["global_prior_scale"]
        return config

    def guide(self, batch: Batch) -> None:
        lg.linear_encoder_guide(batch, self.n_latent)

    @compiled
    def init_params(self, batch: Batch, key: jax.Array) -> dict:
        """The closed-form maximum-likelihood solution on the driver's sample of cells.

        With point-estimated globals SVI then only refines it (and the guide
        starts at the exact posterior), so a few epochs suffice; with priors
        on the globals, small random loadings.
        """
        if self.global_prior_scale is not None:
            return self.init_params_per_cell(batch, key)
        mu, W, sigma2 = lg.principal_subspace(batch.x, self.n_latent)
        return {"W": W, "mu": mu, "sigma": jnp.sqrt(sigma2), **lg.exact_encoder(W, mu, sigma2)}

    @compiled
    def init_params_per_cell(self, batch: Batch, key: jax.Array) -> dict:
        """Small random loadings, the data's mean and variance: with the cells' latents
        at zero, maximum-likelihood loadings would first inflate ``sigma`` (measured:
        mean-field ELBO 2 nats/cell worse after 100 epochs)."""
        start = lg.init_from_data(batch, self.n_latent, key)
        return {"W": start["W"], "mu": start["mu"], "sigma": jnp.sqrt(start["variance"].mean())}

    def default_epochs(self, n_cells: int) -> int:
        """20: the fit starts at the maximum-likelihood solution of a sample of cells."""
        return 20

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        mean, _ = lg.posterior(batch.x, params["W"], params["mu"], params["sigma"] ** 2)
        return mean

    def log_likelihood(self, params, batch: Batch) -> jax.Array:
        return lg.marginal_log_likelihood(batch.x, params["W"], params["mu"], params["sigma"] ** 2)
