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

``a`` pseudo-cells pulling each component's variance of gene ``g`` towards
``v_g``, the gene's variance over the training cells, floored at ``f`` times
the average gene's (so genes with no variance in the training cells are
covered too).  The optimum is the conjugate one,
``s^2 = (sum of r (x - m)^2 + a v_g) / (N_k + a + 2)`` for a component with
``N_k`` cells: a large component keeps its own variance, while a small one,
or a gene that is zero in every cell of a component, keeps a variance of the
order of ``a v_g / N_k`` instead of collapsing.

Why a prior.  Log-normalised single-cell data has many exact zeros, and with
diagonal covariances maximum likelihood sends the variance of every gene that
is zero throughout a component to its floor; one new cell with a count in such
a gene then costs millions of nats (scikit-learn's default ``reg_covar=1e-6``
has the same weakness: on the bundled 10x mouse cells, 10 components,
``log1p_cp10k``, 20 % held out, it scores −248,331 nats per held-out cell,
``1e-3`` −75).  But the prior has a price where maximum likelihood does not
collapse: on the 287 genes of those cells detected in at least 5 % of them a
fixed ``a = 1`` scored −448.9 against −399.4 for scikit-learn's ``1e-6``
(12 % lower), while on unfiltered genes (many rare ones, e.g. 1,000 PBMCs ×
6,397 genes) it trailed scikit-learn's ``1e-3`` by 2.9 %.  No fixed strength
suits both kinds of data, so by default it is chosen from the data.

How ``a`` and ``f`` are chosen (``variance_prior="auto"``, the default).
Held-out selection inside :meth:`GaussianMixture.init_params`, on the sample
of training cells the driver hands it (all of them up to 2**24 values): a
random 80 % of those cells is fitted by closed-form EM (MAP,
:data:`SELECTION_EM_ITERATIONS` steps from one k-means++ / Lloyd start) at
every point of :data:`PRIOR_GRID` — ``a`` in :data:`PRIOR_STRENGTHS` (0, i.e.
maximum likelihood, to 100 pseudo-cells) × ``f`` in :data:`PRIOR_FLOORS`,
all in one vmapped program — and the point whose fit gives the other 20 % the
highest average log-likelihood wins (ties: the weaker prior).  ``v_g`` is
computed on the 80 % only, so genes unobserved in it but expressed in the
20 % are penalised there as genes unobserved in training will be on new
cells.  Chosen this way rather than by the marginal likelihood of ``a``
(empirical Bayes): what fails is prediction of *new* cells with counts in
genes a cluster never showed, which the training cells' marginal likelihood
does not see (with a gene exactly zero throughout a cluster it grows without
bound as ``a -> 0``, the collapse itself); held-out cells measure it directly, and the fit's
validation split is not visible to the model, so the model holds out its
own.  The chosen ``a`` and ``f`` (and the grid's held-out scores) are params
of the fit, held fixed by SVI: ``variance_prior_strength``,
``variance_prior_floor``, ``variance_prior_scores``;
:meth:`GaussianMixture.prior_choice` reports them as plain numbers.  In the
benchmark (``benchmarks/results/classical.md``, "GMM default vs
scikit-learn's best", 12 views of the three bundled real data sets) it
chose maximum likelihood on the detected-gene views of the mouse and Kang
PBMC cells (thousands of cells, no gene unobserved in training), ``a`` of 1
to 30 on their unfiltered and subset views, and 10 to 100 on the 160 cells of
``wu2020``; the default's held-out log-likelihood per cell was above
scikit-learn's best ``reg_covar`` × ``n_init`` on every view (by 4.6 % to
577 %; −380.5 vs −399.4 on the detected mouse genes, where a fixed ``a = 1``
had been 12 % below).

Overrides.  ``variance_prior=A`` (a number > 0; ``lvmzoo fit gmm
--variance-prior A``) forces ``a = A`` with the floor ``f`` =
:data:`PRIOR_VARIANCE_FLOOR` (0.1), as before the choice existed;
``variance_prior=None`` (or 0) fits by maximum likelihood with the floor
``min_scale`` alone, which matches scikit-learn at ``reg_covar =
min_scale**2``.

Starts.  ``n_init`` (default 3, as scikit-learn's ``n_init``) k-means++
seedings, each refined by ``n_lloyd_iterations`` Lloyd steps and (with
``n_em_iterations > 0``) closed-form EM, all in one vmapped program; the one
with the highest training objective (log-likelihood plus the prior's
log-density) starts SVI.  Start ``i`` uses ``fold_in(key, i)``, so more
starts only add candidates and never lower that objective.  No EM by default:
SVI from the k-means start found better maximum-likelihood optima than from
EM's (on the detected mouse genes −380.5 per held-out cell against −401.5
after 5 EM steps and −402.1 after 30; scikit-learn −399.4).

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
from typing import ClassVar, Optional, Union

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
from lvmzoo.models.base import LatentModel, cell_plate, compiled, hyperparameter


@dataclasses.dataclass(frozen=True)
class GaussianMixture(LatentModel):
    """Diagonal-covariance Gaussian mixture with ``n_components`` clusters.

    Attributes:
      n_components: number of mixture components ``K``.
      min_scale: lower bound of every per-gene standard deviation.
      variance_prior: ``a``, the strength in pseudo-cells of the inverse-gamma
        prior on every component's per-gene variances (module docstring):
        ``"auto"`` (default) chooses it and the prior's floor by held-out
        likelihood on the training cells; a number > 0 forces it; ``None``
        or 0 fits by maximum likelihood.  Not used with
        ``global_prior_scale``, which has its own priors.
      n_lloyd_iterations: k-means refinements after k-means++ seeding in
        :meth:`init_params`.
      global_prior_scale: ``None`` (default) point-estimates the weights,
        means and scales; a float ``s`` gives them the priors in the module
        docstring.
      n_init: k-means++ starts compared in :meth:`init_params` (default 3);
        the best by training objective starts SVI.
      n_em_iterations: closed-form EM steps from each start before they are
        compared (default 0: SVI does the fitting).
    """

    n_components: int = 10
    min_scale: float = 1e-3
    variance_prior: Union[float, str, None] = hyperparameter("auto", minimum=0)
    n_lloyd_iterations: int = 10
    global_prior_scale: Optional[float] = None
    n_init: int = 3
    n_em_iterations: int = 0

    def __post_init__(self):
        a = self.variance_prior
        if isinstance(a, str) and a != "auto":
            raise ValueError(f"variance_prior must be 'auto', a number >= 0 or None, got {a!r}")
        if not isinstance(a, str) and a is not None and not a >= 0:
            raise ValueError(f"variance_prior must be 'auto', a number >= 0 or None, got {a!r}")
        if self.n_init < 1:
            raise ValueError(f"n_init must be at least 1, got {self.n_init}")

    @property
    def auto_prior(self) -> bool:
        """Whether the prior's strength and floor are chosen from the data (``"auto"``)."""
        return self.variance_prior == "auto"

    @property
    def maximum_likelihood(self) -> bool:
        """``variance_prior`` ``None`` or 0: no prior, the scale floor alone."""
        return not self.auto_prior and not self.variance_prior

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
            if not self.maximum_likelihood:
                # v_g (and with "auto" a and its floor): statistics of the data set by
                # init_params, never trained.
                gene_variance = jax.lax.stop_gradient(numpyro.param(
                    "prior_variance", jnp.ones(n_genes), constraint=constraints.positive))
                if self.auto_prior:
                    strength = jax.lax.stop_gradient(numpyro.param(
                        "variance_prior_strength", jnp.ones(())))
                    # Recorded only: what the choice saw (see init_params).
                    numpyro.param("variance_prior_floor", jnp.full((), PRIOR_VARIANCE_FLOOR))
                    numpyro.param("variance_prior_scores", jnp.zeros(len(PRIOR_GRID)))
                else:
                    strength = self.variance_prior
                numpyro.factor("variance_prior",
                               log_variance_prior(scales**2, strength, gene_variance))
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
        """EM from the best of ``n_init`` k-means++ starts on ``batch.x`` ``(N, G)``.

        With ``variance_prior="auto"`` the prior's strength ``a`` and floor
        are chosen first (:func:`select_variance_prior`: EM on 80 % of these
        cells for every point of :data:`PRIOR_GRID`, scored on the other 20 %).
        Then, for each of ``n_init`` starts (k-means++ seeding, then
        ``n_lloyd_iterations`` Lloyd steps; start ``i`` uses
        ``fold_in(key, i)``, so more starts only add candidates),
        ``n_em_iterations`` closed-form EM (MAP) steps on all of these cells;
        the start with the highest training objective (log-likelihood per
        cell plus the prior's log-density over the cells) is returned: means
        (whitened, divided by the scales), scales just above ``min_scale``,
        weights, and the prior's ``v_g`` (and with ``"auto"`` ``a``, the
        floor and the grid's held-out scores).
        """
        if self.global_prior_scale is not None:
            return None  # the globals are sample sites: their guide (or sampler) starts them
        x = batch.x
        centre = x.mean(0)
        xc = x - centre  # EM and the prior are translation-equivariant; centred, float32 is safer
        key_select, key_starts = jax.random.split(key)
        start = {}
        if self.auto_prior:
            strength, floor, scores = select_variance_prior(
                xc, self.n_components, key_select, self.min_scale, self.n_lloyd_iterations,
                SELECTION_EM_ITERATIONS)
            gene_variance = prior_gene_variance(x, floor)
            start = {"variance_prior_strength": strength, "variance_prior_floor": floor,
                     "variance_prior_scores": scores, "prior_variance": gene_variance}
        elif self.maximum_likelihood:
            strength, gene_variance = jnp.zeros(()), jnp.ones(x.shape[1])
        else:
            strength = jnp.asarray(float(self.variance_prior))
            gene_variance = prior_gene_variance(x)
            start = {"prior_variance": gene_variance}

        def one_start(i):
            k = jax.random.fold_in(key_starts, i)
            mixture = kmeans_start(xc, self.n_components, k, self.n_lloyd_iterations,
                                   strength, gene_variance, self.min_scale)
            mixture = em(xc, mixture, strength, gene_variance, self.min_scale,
                         self.n_em_iterations)
            return mixture, em_objective(xc, mixture, strength, gene_variance)

        mixtures, objectives = jax.vmap(one_start)(jnp.arange(self.n_init))
        best = jnp.argmax(jnp.where(jnp.isfinite(objectives), objectives, -jnp.inf))
        weights, means, variances = (m[best] for m in mixtures)
        # Strictly above the floor: the unconstrained value of exactly
        # min_scale would be -inf.
        scales = jnp.maximum(jnp.sqrt(variances), 1.05 * self.min_scale)
        return {"weights": weights, "scales": scales,
                "whitened_means": (means + centre) / scales, **start}

    def prior_choice(self, params) -> dict:
        """The variance prior a fit used, for reports (e.g. a run's metrics).

        ``{"variance_prior": "auto" | a | None, "strength": a (0: maximum
        likelihood), "floor": share of the mean gene variance below which no
        ``v_g`` goes, "grid": {f"a={a:g},floor={f:g}": held-out log-likelihood per
        cell of the choice's EM} (with ``"auto"`` only)}``.
        """
        out = {"variance_prior": self.variance_prior}
        if self.global_prior_scale is not None:
            return {**out, "strength": None, "floor": None}
        if self.auto_prior:
            scores = np.asarray(params["variance_prior_scores"], np.float64)
            out.update(strength=float(params["variance_prior_strength"]),
                       floor=float(params["variance_prior_floor"]),
                       grid={f"a={a:g},floor={f:g}": float(s)
                             for (a, f), s in zip(PRIOR_GRID, scores)})
        elif self.maximum_likelihood:
            out.update(strength=0.0, floor=None)
        else:
            out.update(strength=float(self.variance_prior), floor=PRIOR_VARIANCE_FLOOR)
        return out

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


# The prior's v_g is at least this share of the average gene's variance
# (the floor of a forced variance_prior; "auto" chooses it, see PRIOR_GRID).
PRIOR_VARIANCE_FLOOR = 0.1

# (a, floor) pairs variance_prior="auto" compares: a in pseudo-cells (0: maximum
# likelihood, the scale floor alone) and the floor of v_g as a share of the mean
# gene variance.  Ordered from the weakest prior: ties go to the weaker.
PRIOR_STRENGTHS = (0.0, 0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0)
PRIOR_FLOORS = (0.1, 1.0)
PRIOR_GRID = tuple((a, f) for a in PRIOR_STRENGTHS for f in PRIOR_FLOORS if a > 0 or f == 0.1)
# Share of init_params' cells the choice holds out, and its EM steps per grid point.
SELECTION_HELD_OUT = 0.2
SELECTION_EM_ITERATIONS = 20


def prior_gene_variance(x, floor=PRIOR_VARIANCE_FLOOR) -> jax.Array:
    """``v_g`` of the variance prior: each gene's variance over the rows of ``x``, floored.

    The floor, ``floor`` times the mean over genes, gives genes with no
    variance in these cells (e.g. zero in all of them) a prior of the data's
    own scale.  ``(G,)``.
    """
    variance = x.var(0)
    floor = floor * variance.mean()
    return jnp.maximum(variance, jnp.where(floor > 0, floor, 1.0))


def log_variance_prior(variances, strength, gene_variance) -> jax.Array:
    """``sum_kg log InverseGamma(s_kg^2 | a / 2, (a / 2) v_g)``; 0 where ``a = 0``.

    Args:
      variances: ``(K, G)``; strength: ``a`` (a traced scalar is fine);
      gene_variance: ``v_g``, ``(G,)``.
    """
    positive = strength > 0
    half = 0.5 * jnp.where(positive, strength, 1.0)
    log_prob = dist.InverseGamma(half, half * gene_variance).log_prob(variances).sum()
    return jnp.where(positive, log_prob, 0.0)


# ----------------------------------------------------------------- closed-form EM
# The start values: EM in closed form on the sample init_params sees.  A mixture
# here is (weights (K,), means (K, G), variances (K, G)).

_HIGHEST = jax.lax.Precision.HIGHEST  # no reduced-precision float32 matmuls (TF32) on GPUs


def fast_log_joint(x, weights, means, variances) -> jax.Array:
    """:func:`component_log_joint` by matrix products (``x`` centred), ``(N, K)``."""
    precision = 1.0 / variances
    quadratic = (jnp.dot(x * x, precision.T, precision=_HIGHEST)
                 - 2.0 * jnp.dot(x, (means * precision).T, precision=_HIGHEST)
                 + jnp.sum(means**2 * precision, axis=1))
    log_norm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * variances), axis=1)
    return jnp.log(weights) + log_norm - 0.5 * jnp.maximum(quadratic, 0.0)


def m_step(x, responsibilities, strength, gene_variance, min_scale, previous_means):
    """The MAP mixture given responsibilities ``(N, K)``.

    Variances ``(S_kg + a v_g) / (N_k + a + 2)`` (``S_kg / N_k`` at ``a = 0``),
    at least ``min_scale**2``; a component with under one cell keeps its
    previous mean and (at ``a = 0``) takes the data's variance.
    """
    sizes = responsibilities.sum(0)  # (K,)
    safe = jnp.maximum(sizes, 1e-12)[:, None]
    means = jnp.dot(responsibilities.T, x, precision=_HIGHEST) / safe
    spread = jnp.dot(responsibilities.T, x * x, precision=_HIGHEST) / safe - means**2
    scatter = sizes[:, None] * jnp.maximum(spread, 0.0)
    extra = jnp.where(strength > 0, strength + 2.0, 0.0)
    variances = (scatter + strength * gene_variance) / jnp.maximum(sizes + extra, 1e-12)[:, None]
    alive = (sizes >= 1.0)[:, None]
    variances = jnp.where(alive | (strength > 0), variances, x.var(0))
    means = jnp.where(alive, means, previous_means)
    variances = jnp.maximum(variances, min_scale**2)
    weights = jnp.maximum(sizes, 1e-6)
    return weights / weights.sum(), means, variances


def em(x, mixture, strength, gene_variance, min_scale, n_iterations):
    """``n_iterations`` EM steps from ``mixture`` on ``x`` ``(N, G)``."""
    def step(_, mixture):
        responsibilities = jax.nn.softmax(fast_log_joint(x, *mixture), axis=1)
        return m_step(x, responsibilities, strength, gene_variance, min_scale, mixture[1])

    return jax.lax.fori_loop(0, n_iterations, step, mixture)


def em_objective(x, mixture, strength, gene_variance) -> jax.Array:
    """The training objective per cell: mean ``log p(x)`` plus the prior's log-density / N."""
    log_likelihood = logsumexp(fast_log_joint(x, *mixture), axis=1).mean()
    return log_likelihood + log_variance_prior(mixture[2], strength, gene_variance) / x.shape[0]


def kmeans_start(x, n_components, key, n_lloyd_iterations, strength, gene_variance, min_scale):
    """The mixture of k-means++ seeds refined by Lloyd steps (hard responsibilities)."""
    centres = kmeans_plus_plus(x, n_components, key)
    centres = jax.lax.fori_loop(0, n_lloyd_iterations, lambda _, c: _lloyd_step(x, c), centres)
    onehot = jax.nn.one_hot(_nearest(x, centres), n_components)
    return m_step(x, onehot, strength, gene_variance, min_scale, centres)


def select_variance_prior(x, n_components, key, min_scale, n_lloyd_iterations,
                          n_em_iterations):
    """``(a, floor, scores)``: the point of :data:`PRIOR_GRID` whose EM fit to a
    random 80 % of the rows of ``x`` gives the other 20 % the highest average
    log-likelihood (``scores``, one per grid point, in grid order).

    Every grid point starts from the same k-means++ / Lloyd clusters of the 80 %
    and runs ``n_em_iterations`` EM steps (all points in one vmapped program);
    ``v_g`` is computed on the 80 % too, so genes unobserved there but seen
    in the held-out cells are scored as the fit's held-out cells will be.
    """
    n = x.shape[0]
    n_held = min(max(1, int(round(SELECTION_HELD_OUT * n))), n - 1)
    key_split, key_start = jax.random.split(key)
    order = jax.random.permutation(key_split, n)
    held, fit = x[order[:n_held]], x[order[n_held:]]
    centres = kmeans_plus_plus(fit, n_components, key_start)
    centres = jax.lax.fori_loop(0, n_lloyd_iterations, lambda _, c: _lloyd_step(fit, c), centres)
    onehot = jax.nn.one_hot(_nearest(fit, centres), n_components)
    strengths = jnp.asarray([a for a, _ in PRIOR_GRID], x.dtype)
    floors = jnp.asarray([f for _, f in PRIOR_GRID], x.dtype)

    def score(strength, floor):
        gene_variance = prior_gene_variance(fit, floor)
        mixture = m_step(fit, onehot, strength, gene_variance, min_scale, centres)
        mixture = em(fit, mixture, strength, gene_variance, min_scale, n_em_iterations)
        return logsumexp(fast_log_joint(held, *mixture), axis=1).mean()

    scores = jax.vmap(score)(strengths, floors)
    best = jnp.argmax(jnp.where(jnp.isfinite(scores), scores, -jnp.inf))
    return strengths[best], floors[best], scores


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
