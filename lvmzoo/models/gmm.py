"""Gaussian mixture model with diagonal covariances.

Generative story, for each cell::

    c ~ Categorical(weights)                      # which cluster the cell is in
    x | c ~ N(means[c], diag(scales[c]^2))

``weights`` (a point on the simplex), ``means`` and ``scales`` are
point-estimated, so the guide is empty.  The discrete ``c`` is summed out
exactly by parallel enumeration (:class:`numpyro.infer.TraceEnum_ELBO`), so the
loss is the negative marginal log-likelihood

.. math::

   \\log p(x) = \\log \\sum_{k=1}^K w_k \\prod_g N(x_g \\mid m_{kg}, s_{kg}^2)

plus, by default, the log-density of a prior on the variances (a MAP fit):

.. math::

   s_{kg}^2 \\sim \\mathrm{InverseGamma}(a / 2,\\; (a / 2)\\, v_g),

``a = variance_prior`` pseudo-cells pulling each component's variance of gene
``g`` towards ``v_g``, the gene's variance over all cells (at least a tenth of
the average gene's, :data:`PRIOR_VARIANCE_FLOOR`, so genes with no variance
in the training cells are covered too).  The optimum is the conjugate one,
``s^2 = (sum of r (x - m)^2 + a v_g) / (N_k + a + 2)`` for a component with
``N_k`` cells: a large component keeps its own variance, while a small one,
or a gene that is zero in every cell of a component, keeps a variance of the
order of ``a v_g / N_k`` instead of collapsing.

Why a prior.  Log-normalised single-cell data has many exact zeros, and with
diagonal covariances maximum likelihood sends the variance of every gene that
is zero throughout a component to its floor; one new cell with a count in such
a gene then costs millions of nats (scikit-learn's default ``reg_covar=1e-6``
has the same weakness).  On the bundled 10x mouse cells (10 components,
``log1p_cp10k``, 20 % held out; ``benchmarks/results/classical.md``) the
held-out log-likelihood per cell of scikit-learn's ``GaussianMixture`` is
−248,331 at ``reg_covar=1e-6``, −75 at ``1e-3`` (its best) and −215 at
``1e-2``, and that of this prior with ``a = 1`` (EM, the same start) +326;
on a random 30 % of the cells −634,715 / −452 / −251 against +107.  Of
``a`` in {0.1, 0.3, 1, 3} and a prior floor of {0.1, 1} times the average
variance, ``a = 1`` with 0.1 was best on both; a floor on each variance
relative to its gene's variance did worse (−59 and −202).  The prior has a
price where maximum likelihood does not collapse: on 287 genes detected in
at least 5 % of cells with 5 components, scikit-learn's ``1e-6`` scores −430
per held-out cell and this prior −468 (9 % lower); with 10 components (the
``filtered`` view of ``benchmarks/results/classical.md``) −399 against −448
(12 % lower; the SVI ``gmm`` row there, 3 repeats: −400 vs −480, 20 %); there
pass ``variance_prior=None`` (lvmzoo's maximum-likelihood fit then scores −380).  With ``variance_prior=None`` the fit is maximum
likelihood with the floor ``min_scale`` alone, which matches scikit-learn at
``reg_covar = min_scale**2``.

Reports the responsibilities ``p(c = k | x)`` per cell and the exact marginal
log-likelihood above.

With ``global_prior_scale = s`` the globals are random too, so that MCMC
(:func:`lvmzoo.infer.mcmc.run_nuts`, with ``c`` still enumerated out) or a
guide over them can be used::

    weights ~ Dirichlet(1, ..., 1)
    means_kg ~ N(0, s^2)
    scales_kg = min_scale + h_kg,   h_kg ~ HalfNormal(s)

(sample sites ``weights``, ``means`` and ``scales``; the components are
exchangeable, so only label-invariant summaries such as the per-cell
log-likelihood are identified across chains).

Parameterisation.  The optimised values are ``weights``, ``scales`` and
``whitened_means`` ``u = m / s``; the model computes ``means = u * scales``.
Adam moves every unconstrained coordinate by about the learning rate per
step, whatever the curvature; with ``means`` as the parameter a mean would
move by ``lr`` (0.05) even where its scale is 1e-3, i.e. by 50 standard
deviations, which throws that component's cells out and kills it.  In
whitened units a step moves a mean by ``lr * s``, a fixed fraction of its
own spread, and ``scales`` (``min_scale + exp(theta)``) move multiplicatively,
so a component can settle on a gene that is exactly zero in all its cells
(``u = 0``, ``s`` at the floor).  Rescaling ``s`` at fixed ``u`` also moves
the mean (by ``u ds``), which the gradient accounts for; in practice it
converges in a few hundred steps.

Scales are also kept above ``min_scale`` (default 1e-3, variance 1e-6 as
scikit-learn's default ``reg_covar``), so that the likelihood stays finite
whatever the prior.  scikit-learn adds ``reg_covar`` to every variance, this
model floors each scale, so at ``reg_covar = min_scale**2`` the two agree up
to how near to the floor a variance sits.

References:
  Bishop, C. M. (2006). Pattern Recognition and Machine Learning, §9.2.
  Arthur, D. & Vassilvitskii, S. (2007). k-means++: the advantages of careful
  seeding. SODA.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints
from numpyro.infer import TraceEnum_ELBO

from lvmzoo.data.source import Batch
from lvmzoo.models.base import LatentModel, cell_plate, compiled


@dataclasses.dataclass(frozen=True)
class GaussianMixture(LatentModel):
    """Diagonal-covariance Gaussian mixture with ``n_components`` clusters.

    Attributes:
      n_components: number of mixture components ``K``.
      min_scale: lower bound of every per-gene standard deviation.
      variance_prior: ``a``, the strength in pseudo-cells of the inverse-gamma
        prior on every component's per-gene variances (module docstring);
        ``None`` fits by maximum likelihood.  Default 1.  Not used with
        ``global_prior_scale``, which has its own priors.
      n_lloyd_iterations: k-means refinements after k-means++ seeding in
        :meth:`init_params`.
      global_prior_scale: ``None`` (default) point-estimates the weights,
        means and scales; a float ``s`` gives them the priors in the module
        docstring.
    """

    n_components: int = 10
    min_scale: float = 1e-3
    variance_prior: Optional[float] = 1.0
    n_lloyd_iterations: int = 10
    global_prior_scale: Optional[float] = None

    name: ClassVar[str] = "gmm"
    data_kind: ClassVar[str] = "continuous"
    default_transform: ClassVar[str] = "log1p_cp10k"
    default_learning_rate: ClassVar[float] = 5e-2

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        k = self.n_components
        s = self.global_prior_scale
        if s is None:  # maximum likelihood
            weights = numpyro.param("weights", jnp.full(k, 1.0 / k), constraint=constraints.simplex)
            scales = numpyro.param(
                "scales", jnp.ones((k, n_genes)), constraint=constraints.greater_than(self.min_scale)
            )
            # Means in units of their own scale, so optimiser steps are relative
            # to each component's spread (see the module docstring).
            whitened_means = numpyro.param("whitened_means", jnp.zeros((k, n_genes)))
            means = whitened_means * scales
            if self.variance_prior:
                # v_g: a statistic of the data set by init_params, never trained.
                gene_variance = jax.lax.stop_gradient(numpyro.param(
                    "prior_variance", jnp.ones(n_genes), constraint=constraints.positive))
                half = 0.5 * self.variance_prior
                prior = dist.InverseGamma(half, half * gene_variance)
                numpyro.factor("variance_prior", prior.log_prob(scales**2).sum())
        else:
            weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(k)))
            means = numpyro.sample("means", dist.Normal(0.0, s).expand([k, n_genes]).to_event(2))
            above_floor = numpyro.sample(
                "scales_above_floor", dist.HalfNormal(s).expand([k, n_genes]).to_event(2))
            scales = numpyro.deterministic("scales", self.min_scale + above_floor)
        with cell_plate(batch):
            # Enumerated: c has shape (K, 1) under TraceEnum_ELBO, (B,) otherwise.
            c = numpyro.sample(
                "component", dist.Categorical(weights), infer={"enumerate": "parallel"}
            )
            numpyro.sample("x", dist.Normal(means[c], scales[c]).to_event(1), obs=batch.x)

    def guide(self, batch: Batch) -> None:
        """Empty: all globals are point estimates and ``c`` is enumerated out."""

    def elbo(self) -> TraceEnum_ELBO:
        # One plate (cells, dim=-1); enumeration dims go to its left.
        return TraceEnum_ELBO(max_plate_nesting=1)

    @compiled
    def init_params(self, batch: Batch, key: jax.Array) -> dict:
        """k-means++ seeding and Lloyd iterations on ``batch.x`` ``(N, G)``.

        Means are the cluster centres (returned whitened, divided by the
        scales), scales the within-cluster standard deviations (the global
        spread for empty clusters; with the variance prior, its optimum given
        the clusters) just above ``min_scale``, weights the cluster sizes
        (plus one cell, so none is zero).
        """
        if self.global_prior_scale is not None:
            return None  # the globals are sample sites: their guide (or sampler) starts them
        x = batch.x
        centres = kmeans_plus_plus(x, self.n_components, key)
        centres = jax.lax.fori_loop(
            0, self.n_lloyd_iterations, lambda _, c: _lloyd_step(x, c), centres
        )
        onehot = jax.nn.one_hot(_nearest(x, centres), self.n_components)  # (N, K)
        sizes = onehot.sum(0)  # (K,)
        safe = jnp.maximum(sizes, 1.0)[:, None]
        means = jnp.where(sizes[:, None] > 0, onehot.T @ x / safe, centres)
        spread = onehot.T @ x**2 / safe - means**2  # E[x^2] - E[x]^2 within each cluster
        variance = jnp.where(sizes[:, None] > 1, jnp.maximum(spread, 0.0), x.var(0))
        start = {}
        if self.variance_prior:
            a = self.variance_prior
            gene_variance = prior_gene_variance(x)
            variance = (sizes[:, None] * variance + a * gene_variance) / (sizes[:, None] + a + 2)
            start["prior_variance"] = gene_variance
        # Strictly above the floor: the unconstrained value of exactly
        # min_scale would be -inf.
        scales = jnp.maximum(jnp.sqrt(variance), 1.5 * self.min_scale)
        weights = (sizes + 1.0) / (sizes.sum() + self.n_components)
        return {"weights": weights, "scales": scales, "whitened_means": means / scales, **start}

    def default_epochs(self, n_cells: int) -> int:
        """30: the fit starts from k-means clusters of a sample of cells."""
        return 30

    def mixture(self, params) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(weights (K,), means (K, G), scales (K, G))`` from fitted ``params``.

        ``params`` as :func:`lvmzoo.fit` returns them (``weights``, ``scales``,
        ``whitened_means``; ``means = whitened_means * scales``), or values of
        the sample sites with ``global_prior_scale`` (``weights``, ``means``,
        and ``scales`` or ``scales_above_floor``).
        """
        if "whitened_means" in params:
            scales = params["scales"]
            return params["weights"], params["whitened_means"] * scales, scales
        scales = params["scales"] if "scales" in params else (
            self.min_scale + params["scales_above_floor"])
        return params["weights"], params["means"], scales

    def config(self) -> dict:
        config = super().config()
        if self.global_prior_scale is None:  # runs saved before the option read the same
            del config["global_prior_scale"]
        return config

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        """Responsibilities ``p(c = k | x)``, ``(B, K)``; rows sum to one."""
        joint = component_log_joint(batch.x, *self.mixture(params))
        return jax.nn.softmax(joint, axis=-1)

    def log_likelihood(self, params, batch: Batch) -> jax.Array:
        """``log sum_k w_k N(x | m_k, diag(s_k^2))`` per cell, ``(B,)``."""
        joint = component_log_joint(batch.x, *self.mixture(params))
        return logsumexp(joint, axis=-1)

    def annotate(self, adata, params, latent, data) -> list[str]:
        """Adds ``obs["gmm_component"]``: the most responsible component (categorical)."""
        best = np.asarray(latent).argmax(axis=1)
        adata.obs["gmm_component"] = pd.Categorical(
            best.astype(str), categories=[str(k) for k in range(self.n_components)]
        )
        return ['obs["gmm_component"]']


# The prior's v_g is at least this share of the average gene's variance.
PRIOR_VARIANCE_FLOOR = 0.1


def prior_gene_variance(x) -> jax.Array:
    """``v_g`` of the variance prior: each gene's variance over the rows of ``x``, floored.

    The floor, :data:`PRIOR_VARIANCE_FLOOR` times the mean over genes, gives
    genes with no variance in these cells (e.g. zero in all of them) a prior
    of the data's own scale.  ``(G,)``.
    """
    variance = x.var(0)
    floor = PRIOR_VARIANCE_FLOOR * variance.mean()
    return jnp.maximum(variance, jnp.where(floor > 0, floor, 1.0))


def component_log_joint(x, weights, means, scales) -> jax.Array:
    """``log w_k + log N(x | m_k, diag(s_k^2))`` for every cell and component, ``(B, K)``.

    Args:
      x: ``(B, G)`` observations.
      weights: ``(K,)`` mixture weights.
      means, scales: ``(K, G)`` per-component means and standard deviations.
    """
    # One component at a time: memory stays O(B G) and, unlike expanding the
    # square into matrix products, there is no cancellation in float32.
    def quadratic(component):
        mean, scale = component
        return jnp.sum(((x - mean) / scale) ** 2, axis=-1)  # (B,)

    quadratic = jax.lax.map(quadratic, (means, scales)).T  # (B, K)
    log_norm = -jnp.sum(jnp.log(scales), axis=1) - 0.5 * x.shape[-1] * jnp.log(2 * jnp.pi)
    return jnp.log(weights) + log_norm - 0.5 * quadratic


def kmeans_plus_plus(x, n_clusters: int, key: jax.Array) -> jax.Array:
    """k-means++ seeds: each next centre drawn with probability ∝ squared distance.

    Args:
      x: ``(N, G)`` points.

    Returns:
      ``(n_clusters, G)`` centres, all rows of ``x``.
    """
    keys = jax.random.split(key, n_clusters)
    first = jax.random.randint(keys[0], (), 0, x.shape[0])
    centres = jnp.zeros((n_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    closest = jnp.sum((x - x[first]) ** 2, axis=1)  # (N,) squared distance to nearest seed

    def add_seed(k, state):
        centres, closest = state
        # Points already chosen have distance 0 and so are never drawn again
        # (unless all points coincide, when any choice is as good).
        logits = jnp.log(jnp.maximum(closest, 0.0) + 1e-30)
        pick = jax.random.categorical(keys[k], logits)
        centres = centres.at[k].set(x[pick])
        closest = jnp.minimum(closest, jnp.sum((x - x[pick]) ** 2, axis=1))
        return centres, closest

    centres, _ = jax.lax.fori_loop(1, n_clusters, add_seed, (centres, closest))
    return centres


def _squared_distances(x, centres) -> jax.Array:
    """``|x_i - c_k|^2``, ``(N, K)``."""
    return jnp.sum(x**2, 1)[:, None] - 2.0 * x @ centres.T + jnp.sum(centres**2, 1)[None, :]


def _nearest(x, centres) -> jax.Array:
    return jnp.argmin(_squared_distances(x, centres), axis=1)


def _lloyd_step(x, centres) -> jax.Array:
    """Move each centre to the mean of its points; an empty cluster keeps its centre."""
    onehot = jax.nn.one_hot(_nearest(x, centres), centres.shape[0])
    sizes = onehot.sum(0)[:, None]
    return jnp.where(sizes > 0, onehot.T @ x / jnp.maximum(sizes, 1.0), centres)
