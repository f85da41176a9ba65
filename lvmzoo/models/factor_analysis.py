"""Factor analysis: probabilistic PCA with a separate noise variance per gene.

Generative story, for each cell::

    z ~ N(0, I_K)
    x | z ~ N(W z + mu, diag(psi))

``W``, ``mu`` and ``psi`` are point-estimated (maximum likelihood, as
scikit-learn's ``FactorAnalysis`` does); ``z`` uses the amortised linear guide
of :mod:`lvmzoo.models.linear_gaussian`.  Reports the exact posterior mean of
``z`` and the exact marginal log-likelihood.

A gene with (nearly) no variance in the training cells, e.g. one that is
zero in all of them, would drive its ``psi_g`` to 0 and the likelihood to
infinity.  The noise variance is therefore ``psi_floor + psi``: a floor of
:data:`NOISE_FLOOR` times the average per-gene variance of the data (set
from the data by :meth:`FactorAnalysis.init_params`, stored with the fit and
never trained), in the spirit of scikit-learn's ``psi >= 1e-12`` but relative
to the data's scale, so that a new cell with a count in such a gene costs a
large but finite number of nats.

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
from lvmzoo.models.base import LatentModel, compiled

# Floor of every per-gene noise variance, relative to the data's mean per-gene variance.
NOISE_FLOOR = 1e-3


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
            # The floor is a data statistic set by init_params, not trained.
            floor = jax.lax.stop_gradient(numpyro.param("psi_floor", jnp.zeros(())))
            psi = floor + numpyro.param("psi", jnp.ones(n_genes), constraint=constraints.positive)
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

    @compiled
    def init_params(self, batch: Batch, key: jax.Array) -> dict:
        """Maximum likelihood on the driver's sample of cells: PPCA, then EM iterations.

        With priors on the globals, small random loadings instead.
        """
        if self.global_prior_scale is not None:
            start = lg.init_from_data(batch, self.n_latent, key)
            return {"W": start["W"], "mu": start["mu"], "psi": start["variance"]}
        floor = self._floor(batch)
        mu, W, sigma2 = lg.principal_subspace(batch.x, self.n_latent)
        psi = jnp.maximum(jnp.full_like(mu, sigma2), floor)
        W, psi = lg.factor_analysis_em(batch.x, W, psi, floor)
        return {"W": W, "mu": mu, "psi_floor": floor,
                # strictly above the floor: the unconstrained value of 0 would be -inf
                "psi": jnp.maximum(psi - floor, 1e-3 * floor),
                **lg.exact_encoder(W, mu, psi)}

    @compiled
    def init_params_per_cell(self, batch: Batch, key: jax.Array) -> dict:
        """Small random loadings, the data's mean and variance (see PPCA's)."""
        start = lg.init_from_data(batch, self.n_latent, key)
        if self.global_prior_scale is not None:
            return {"W": start["W"], "mu": start["mu"], "psi": start["variance"]}
        floor = self._floor(batch)
        return {"W": start["W"], "mu": start["mu"], "psi_floor": floor,
                "psi": jnp.maximum(start["variance"] - floor, 1e-3 * floor)}

    @staticmethod
    def _floor(batch: Batch) -> jax.Array:
        floor = NOISE_FLOOR * jnp.mean(batch.x.var(0))
        return jnp.where(floor > 0, floor, NOISE_FLOOR)  # constant data: any positive floor

    def default_epochs(self, n_cells: int) -> int:
        """30: the fit starts at an EM solution on a sample of cells."""
        return 30

    def noise_variance(self, params) -> jax.Array:
        """``psi_floor + psi``, ``(G,)`` (runs saved without a floor: ``psi``)."""
        return params.get("psi_floor", 0.0) + params["psi"]

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        mean, _ = lg.posterior(batch.x, params["W"], params["mu"], self.noise_variance(params))
        return mean

    def log_likelihood(self, params, batch: Batch) -> jax.Array:
        return lg.marginal_log_likelihood(batch.x, params["W"], params["mu"],
                                          self.noise_variance(params))
