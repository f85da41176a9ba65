"""Pseudotime as a latent variable: one time per cell, smooth trends per gene.

Generative story, for each cell ``c`` in batch ``b`` (``u_c = logit t_c``)::

    t_c ~ Beta(1, 1) = Uniform(0, 1)                 # Beta(1, root_strength) for root cells;
                                                     # Beta(m_c k, (1 - m_c) k) with capture times
    eta_cg = f_g(t_c) + o_bg + sum_j gamma_jg z_cj   # o: additive batch offset (o_0g = 0);
                                                     # z: standardised continuous covariates
    x_cg ~ N(eta_cg, sigma_g^2)                      # likelihood="gaussian" (log-normalised x),
                                                     # sigma_g = noise_floor + s_g
    x_cg ~ NB(l_c exp(eta_cg), theta_g)              # likelihood="nb" (counts, l_c = sum_g x_cg)

:class:`Pseudotime`: ``f_g`` is a Gaussian process with a squared-exponential
kernel in its Hilbert-space basis-function approximation (Solin & Särkkä, 2020;
Riutort-Mayol et al., 2023) on ``[0, 1]``: with ``M = n_basis`` Laplacian
eigenfunctions ``phi_m`` on ``[-L, L]`` (``L = 0.75``, centred at ``t = 0.5``)
and their square-root eigenvalues ``s_m = m pi / 2L``::

    f_g(t) = beta_g + alpha_g * sum_m sqrt(S(s_m; ell)) phi_m(t - 1/2) w_gm,   w_gm ~ N(0, 1)

where ``S(s; ell) = sqrt(2 pi) ell exp(-s^2 ell^2 / 2)`` is the kernel's
spectral density: linear in cells, ``O(G M)`` per cell.  Chosen over sparse inducing
points by measurement (``benchmarks/bench_gp_form.py``, results/pseudotime_gp_form.md):
with 16 whitened inducing points instead, the fits ordered a simulated path and
amphioxus alike (tau 0.95 / 0.58-0.66 against 0.94-0.95 / 0.59-0.61), with held-out
likelihoods within 0.3 nats per cell and the same time per epoch; but at ``L = 0.75`` this
basis shrinks a curve's prior variance at ``t = 0`` and ``1`` for long lengthscales (0.75
of the kernel's at ``ell = 0.3``, 0.39 at 0.5), which inducing points do not.  The weights ``w`` are
latent with a mean-field Normal guide (so trends come with a band); the
baseline ``beta_g``, amplitude ``alpha_g``, shared lengthscale ``ell``, noise
``sigma_g`` / inverse dispersion ``theta_g`` and batch offsets are
point-estimated.

:class:`SwitchPseudotime` (Ouija, Campbell & Yau 2018, with a baseline):
``f_g(t) = beta_g + mu_g sigmoid(k_g (t - t0_g))``, ``mu_g > 0``, ``t0_g in
(0, 1)``, every parameter point-estimated: each gene switches on (``k > 0``)
or off (``k < 0``) once.

Guide (both): amortised, ``q(u_c | x_c) = N(m(x_c), s(x_c)^2 + floor)`` from
an encoder MLP (:class:`lvmzoo.nn.GaussianEncoder`) on the log-normalised
values, so new cells get a time without refitting and minibatches work.  The
encoder sd has a floor (``scale_floor``, on the logit scale).

Noise floor.  Log-normalised counts are mostly exact zeros, and a Gaussian's
density at a point mass grows without bound as its sd shrinks: without a floor a
gene that is (nearly) zero in the training cells gets a tiny ``sigma_g``, the
training likelihood climbs, and a new cell that expresses the gene pays
thousands of nats.  600 random amphioxus cells fitted (root = blastula,
``datasets.amphioxus``), 200 others held out, seeds 0/1/2: with no floor the
held-out log-likelihood was -27,802 / -26,465 / -29,110 per cell against
-377 / -379 / -376 on the training cells, and the order (Kendall tau against the
stage) 0.27 / 0.30 / 0.15; with ``noise_floor = 0.1`` held-out -1,151 against
training -570, tau 0.72 / 0.71 / 0.63; with 0.2 (the default) held-out -849
against -646, tau 0.69 / 0.72 / 0.71.  On HSMM (log FPKM) and paul15 the floor
changed neither the order nor the likelihood (HSMM held-out -2,008 / -2,009 at
0 / 0.2; paul15 tau 0.466 / 0.466).  The floor is in the data's units: 0.2 on
the log1p-CP10k scale is the Poisson sd of a gene's log at about 25 counts;
give data on another scale a floor to match (0 turns it off).

Reported scale.  The likelihood identifies ``t`` only up to a monotone warp
(the trends absorb any warp), so the model's own ``t`` orders cells well but
its scale drifts: on ``simulate_trajectory`` cells at true ``t = 0.96`` sat at
``0.83`` and the guide's intervals covered ~10 % of the true times.  The prior
fixes the scale: it says the cells are spread Uniform(0, 1) in time, so a cell
whose time is above a fraction ``p`` of the cells has a time near ``p``.  The
outputs are therefore on that scale:

* ``F``, the CDF of the training cells' aggregate posterior of ``u = logit t``,
  is kept as ``params["time_reference"]``: its ``K = 100`` quantiles at levels
  ``(k - 1/2) / K`` (stored in logit units divided by ``REFERENCE_SPEED``),
  learned during the fit by a pinball (quantile) loss on the sampled ``u``
  (``numpyro.factor("time_reference_fit")`` in the model: zero in value and
  without gradient for any other parameter, so the ELBO is unchanged).  Being
  a param it is saved and reloaded with the model, and new cells are placed by
  the same ``F``.  ``F`` is piecewise linear between the quantiles, with the
  prior's tails beyond them; a model fitted without it uses the identity.
* Each guide draw ``u`` gives a rank ``F(u)``; given its rank among the
  ``N = reference_cells`` training cells, a cell's time under iid Uniform(0, 1)
  times is the order statistic ``Beta(N F(u) + 1/2, N (1 - F(u)) + 1/2)``.  The
  reported time is that Beta mixed over the guide (at its ``J = 64`` quantiles):
  ``obs["pseudotime"]`` its mean, ``obs["pseudotime_lower"/"_upper"]`` its
  2.5 % / 97.5 % quantiles (bisection).  The interval thus holds the guide's
  uncertainty about the rank *and* the sampling spread of a rank's time
  (``~ sqrt(p (1 - p) / N)``), which is what the mean-field guide's own
  interval missed.  Measured on ``simulate_trajectory(300, 60)`` (200
  epochs, 5 data/fit seeds): 95 % intervals cover 0.80-0.97 of the true times
  (0.87 in ``tests/test_pseudotime.py``), Kendall tau 0.94-0.95.
* Caveats: root cells' ``Beta(1, root_strength)`` prior is ignored by the
  scale (it assumes Uniform for all cells); the scale is only as uniform as the
  cells' true times are (a trajectory sampled unevenly in time gets times
  proportional to the cell density); ``F`` is a stochastic estimate (its
  quantiles are off by ~0.05-0.1 on the logit scale at the end of a fit).

Direction.  Without a root the likelihood is unchanged by ``t -> 1 - t`` (a
trend read backwards), so the data do not say which end is 0.  The one-path models
then report the direction in which more genes rise than fall (a convention, not the
likelihood's choice): among the genes whose fitted trend is monotone where the cells are
(Spearman correlation with ``t`` beyond ``MONOTONE_CORRELATION`` = 0.9 in size) and whose
amplitude is in the upper half, if more fall than rise every reported output reads ``t``
backwards (:meth:`_TimeModel.runs_backwards`; a function of the fitted trend, so new
cells and saved models read it the same way).  Measured (unsupervised Pseudotime and
SwitchPseudotime, seeds 0-2 each): the early cells came first in all 6 fits of amphioxus
(blastula) and of paul15 (MPP), and in 1 of 6 on HSMM, whose unsupervised fits do not
order the hours (tau -0.24 to 0.07); progenitor genes falling off more often than lineage
genes rise would defeat it too, so where early cells are known orient with them
(:func:`lvmzoo.analysis.trajectory.orient`, or a root; on branching data the ends
themselves are arbitrary: see below).  With ``root_key`` / ``root_value``
the cells whose ``obs[root_key]`` is ``root_value`` get the prior
``Beta(1, root_strength)`` (mean ``1 / (1 + root_strength)``), which pulls
them, and so the direction, to ``t = 0``.

Capture times (DeLorean, Reid & Wernisch 2016).  When the cells were collected at known
times (hours, days, stages: a numeric ``obs[capture_key]``), each cell's time gets the prior
``Beta(m_c k, (1 - m_c) k)`` with ``k = capture_strength`` (20 by default: a prior sd of
about 0.1, half the rank band of each of 4 equal capture groups) and ``m_c`` the mid-rank of
its capture time among the cells (cells captured earlier plus half those captured with it,
over all cells): the prior says "the cells of this capture are about here" on the reported
uniform scale, and the likelihood orders the cells within and across captures.  New cells
(``lvmzoo evaluate``, :meth:`pseudotime`) need the column too; times between the training
ones are interpolated, times outside them clipped to the first or last.  The fit starts the
trend fitted to the capture ranks (:meth:`_TimeModel._capture_start`; for
:class:`SwitchPseudotime` each gene's best switch on a grid, which took amphioxus from a
folded order on 2 of 3 seeds, tau -0.29 / 0.76 / -0.30 at a training loss of 716 / 710 /
716 nats per cell, to 0.822 on all 3 at 707.6-707.9).  Measured
(``benchmarks/results/pseudotime.md``): on ``simulate_trajectory`` with the true time cut
into 4 capture groups the fits order the cells within each group as well as without the
times (Kendall tau within groups about 0.8) and in the right direction; on HSMM and
amphioxus the capture times themselves order the cells better than any fit (they are the
truth there), and the fits order them at tau 0.60-0.82 (medians of 3 seeds; SwitchPseudotime
on HSMM 0.35).  Not with a root (the capture
times give the direction).

Marker genes (:class:`SwitchPseudotime`; Ouija, Campbell & Yau 2018).  A user who knows
genes that switch on or off along the path gives them as ``markers``: ``"GENE:up"`` /
``"GENE:down"``, optionally with the switch time on the reported scale, ``"MYOG:up@0.6"``.
Each marker's slope gets ``Normal(+-MARKER_SLOPE, MARKER_SLOPE_SD)`` = ``Normal(+-10,
2.5)`` by its direction, and a timed one's switch time (mapped to the reported scale by the
reference, without a gradient through it) ``Normal(T, MARKER_TIME_SD = 0.1)``; the priors
set the direction (no genes-rise convention then) and the fit starts from the cells' rank
in a marker score (the mean of the standardised marker values, signed), the trend fitted
to it and the encoder at random, as with capture times.  On a simulated path two rising
and one falling marker give Kendall tau +0.94 forward, and the same markers marked the
other way round -0.94 (``tests/test_pseudotime.py``).  Measured on HSMM with six textbook
markers (``benchmarks/results/pseudotime.md``): tau 0.257 (0.252-0.259) on 3 seeds
against the unsupervised 0.213 (-0.019-0.240): the direction is right on every seed, but
the order stays behind the best principal component (0.377); with 271 cells the data
outweigh a switch-time prior of sd 0.1 (MYOG given at 0.8 was fitted at 0.92).

Covariates (all three models).  ``continuous_covariate_keys`` names numeric obs columns of
technical variation (the cells' detection rate, share of mitochondrial counts); each is
standardised by the training cells' mean and sd (kept, so new cells are read alike) and
enters ``eta`` with a per-gene linear effect ``gamma_jg`` beside the trend (a point
estimate, ``var["<key>_effect"]``); :func:`lvmzoo.analysis.trajectory.changing_genes`
holds them in both of its fits.  On a simulated path with a planted technical effect the
order goes from Kendall tau 0.86 to 0.95 and the effects are recovered (correlation
0.999).  A covariate that follows the biology takes the order with it (as scanpy's
``regress_out`` would): with the detection rate (``benchmarks/results/pseudotime.md``,
rows ``*_cdr``), HSMM, where it is technical (tau -0.04 against the hours), gains (rooted
Pseudotime 0.39 against 0.33, ahead of the best PC's 0.377), but paul15 and amphioxus,
where it changes along the differentiation (0.43, 0.28 against the stages), lose most
rows.  Off by default.

Branching data.  :class:`Pseudotime` and :class:`SwitchPseudotime` have one curve per
gene, so they assume one path.  On data that branches (a progenitor giving two or more
fates) they cannot put the fates side by side: they lay the branches end to end
(progenitors, then one fate, then the other) or put the progenitors in the middle with a
fate at each end; either way the cells of at least one lineage are ordered wrongly
relative to the root, and the intervals are honest only about the rank along that chain.
:class:`BranchingPseudotime` is the answer in the zoo: a mixture of lineages (cell ->
lineage marginalised exactly) whose trends share a trunk and meet at ``t = 0``, with a
number of lineages ``n_lineages`` chosen by the user (too few lays fates end to end again
within a lineage).  Per-cell lineage probabilities are exact given ``t``; the time's
interval does not include the lineage's uncertainty beyond that.

The root of a branching trajectory is not in the likelihood: give it.  A tree can be read
from any of its tips (a Y's three tips are interchangeable), and the fits that start it
elsewhere explain the cells as well or better, so neither the ELBO nor more restarts find
the progenitors.  Measured on ``lvmzoo.datasets.paul15()`` (progenitors (MPP) to erythroid
and myeloid fates; per-cell log-likelihood, 30 importance samples, globals at their
means): unsupervised :class:`Pseudotime` reached the chain MPP -> myeloid -> erythroid on
3 of 5 seeds (-402.4 nats at seed 0) and the MPP in the middle on 2 (-402.8, -401.9);
unsupervised :class:`BranchingPseudotime` (K = 4) put the junction at a fate on 3 of 3
seeds, at -401.2 / -399.5 / -400.1 against -400.2 to -400.5 for fits with the MPP as root;
on ``simulate_branching_trajectory(400, 60)`` the unsupervised fits started at a branch
tip (Kendall tau -0.57 / 0.01 / -0.59 against the true time) with a better
log-likelihood than the rooted ones (-54.6 / -49.7 / -54.3 against -55.2 / -50.7 /
-54.5), which order the cells at tau 0.80-0.93.  A data-driven start does not help
either: the longest path of paul15's neighbour graph runs from erythrocytes to
monocytes, so a start from its end (as Monocle 2 roots its trees) puts the junction at a
fate too.  So without a root the direction and the junction are arbitrary (orient a
one-path fit with :func:`lvmzoo.analysis.trajectory.orient`); with ``root_key`` /
``root_value`` :class:`BranchingPseudotime` puts the junction at the root cells (prior
strength ``root_strength`` 300 by default) and starts its time at each cell's distance
from them along the neighbour graph (:meth:`_TimeModel._root_start`), which made its
paul15 fits agree across seeds (``benchmarks/results/pseudotime.md``).

Outputs: ``latent`` is the reported time's posterior mean ``(B, 1)``;
:meth:`annotate` writes ``obs["pseudotime"]``, ``obs["pseudotime_lower"]`` /
``obs["pseudotime_upper"]`` (above) and ``uns["pseudotime_trends"]``: each
gene's trend ``f_g`` on a 50-point grid of reported times (batch 0,
log-normalised units for Gaussian data, log expected counts per 10,000 for
NB), with a 95 % band over ``q(w)`` for :class:`Pseudotime`; and
``obs["arc_length"]`` (``_lower`` / ``_upper``): the distance travelled along the fitted
curve(s) up to the cell's time (:meth:`_TimeModel.arc_length`; for
:class:`BranchingPseudotime` the lineages' times made comparable, the better order on
paul15).  :class:`SwitchPseudotime` writes ``var["switch_time"]`` on the reported scale.

References:
  Solin, A. & Särkkä, S. (2020). Hilbert space methods for reduced-rank
  Gaussian process regression. Statistics and Computing 30, 419–446.
  Riutort-Mayol, G. et al. (2023). Practical Hilbert space approximate
  Bayesian Gaussian processes for probabilistic programming. Statistics and
  Computing 33, 17.
  Campbell, K. R. & Yau, C. (2018). A descriptive marker gene approach to
  single-cell pseudotime inference. Bioinformatics 35, 28–35.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import scipy.special
from numpyro import handlers
from numpyro.contrib.module import flax_module
from numpyro.distributions import constraints

from lvmzoo.data.source import Batch
from lvmzoo.data.streaming import EvaluationBatches
from lvmzoo.models.base import LatentModel, cell_plate, hyperparameter
from lvmzoo.models.likelihoods import COUNT_LIKELIHOODS
from lvmzoo.nn import GaussianEncoder

LIKELIHOODS = {"gaussian": ("continuous", "log1p_cp10k"), "nb": ("counts", "none")}
GRID_POINTS = 50
DOMAIN_HALF_WIDTH = 0.75  # L: 1.5 times the half-width of [0, 1], as Riutort-Mayol et al. advise
# Basis terms whose spectral density's exponent is below -this are 0 (``Pseudotime._basis``).
SPECTRAL_EXPONENT_FLOOR = 80.0
MIN_CELLS = 3
Z95 = 1.959964
# Reference quantiles of the time scale: levels p_k = (k - 1/2) / K of the aggregate posterior
# of logit t, learned during the fit (see ``_TimeModel._reference_quantiles``).
N_REFERENCE = 100
REFERENCE_LEVELS = (np.arange(N_REFERENCE) + 0.5) / N_REFERENCE
# The reference param is stored in logit units divided by this, so that Adam (whose step
# is about the learning rate whatever the gradient) moves it ~5x faster than its unit.
REFERENCE_SPEED = 5.0
# Draws of the guide (at its quantiles (j - 1/2) / J) mixed for the reported interval.
N_INTERVAL_NODES = 64
BISECTION_STEPS = 24
# A Beta(a, b) CDF is a Normal's when both shapes exceed this (``_mixture_cdf``); the
# exact ``betainc`` runs on at most EXACT_ROWS rows of a batch, in FEW_EXACT_ROWS slots
# when that many suffice (``_mixture_quantiles``).
NORMAL_SHAPES = 30.0
EXACT_ROWS = 128
FEW_EXACT_ROWS = 8
# A batch of at most this many rows (a small data set, where most rows need betainc, or
# the last rows of a large one) bisects the full mixture CDF: one program to compile
# instead of four, for at most about a second of betainc.
FULL_ROWS = 512
assert FULL_ROWS >= EXACT_ROWS > FEW_EXACT_ROWS > 0
# ``lvmzoo fit`` draws the cells' values in pseudotime.png for in-memory data up to this
# many cells x genes (the figure reads them densely).
FIGURE_VALUES = 50_000_000
# The arc length (``_TimeModel.arc_length``): grid of reported times, and the obs columns.
ARC_GRID_POINTS = 201
ARC_LENGTH_COLUMNS = ("arc_length", "arc_length_lower", "arc_length_upper")
# The start from a root (``_TimeModel._root_start``): cells it sees, and Adam steps of
# START_BATCH cells that fit the encoder's location to their distance from the root.
START_CELLS = 4096
START_STEPS = 400
START_BATCH = 256
START_LEARNING_RATE = 1e-2
# Without a root, a gene counts as rising (falling) along t when its fitted trend's
# correlation with t is above this (below minus this): ``_TimeModel.runs_backwards``.
MONOTONE_CORRELATION = 0.9
# SwitchPseudotime's start (``_trend_start``): the slope of the switches it tries.
START_SLOPE = 10.0
# Capture times' prior means of t stay this far inside (0, 1) (``_TimeModel._capture_rank``).
CAPTURE_RANK_MARGIN = 0.01
# SwitchPseudotime's marker genes (Ouija's priors): a marker's slope ~ Normal(+-MARKER_SLOPE,
# MARKER_SLOPE_SD) by its direction, its switch time (reported scale) ~ Normal(T, MARKER_TIME_SD).
MARKER_SLOPE = 10.0
MARKER_SLOPE_SD = 2.5
MARKER_TIME_SD = 0.1
MARKER_DIRECTIONS = {"up": 1.0, "down": -1.0}


class LogitBeta(dist.Distribution):
    """``logit t`` for ``t ~ Beta(a, b)``, with a log density stable in the tails:
    ``a log sigmoid(u) + b log sigmoid(-u) - log B(a, b)``."""

    arg_constraints = {"a": constraints.positive, "b": constraints.positive}
    support = constraints.real
    reparametrized_params = []

    def __init__(self, a, b, *, validate_args=None):
        self.a, self.b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32),
                                              jnp.asarray(b, jnp.float32))
        super().__init__(batch_shape=jnp.shape(self.a), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        t = dist.Beta(self.a, self.b).sample(key, sample_shape)
        t = jnp.clip(t, 1e-6, 1 - 1e-6)
        return jnp.log(t) - jnp.log1p(-t)

    def log_prob(self, value):
        log_beta = (jax.scipy.special.gammaln(self.a) + jax.scipy.special.gammaln(self.b)
                    - jax.scipy.special.gammaln(self.a + self.b))
        return (self.a * jax.nn.log_sigmoid(value) + self.b * jax.nn.log_sigmoid(-value)
                - log_beta)


@dataclasses.dataclass(frozen=True)
class _TimeModel(LatentModel):
    """Shared parts of the pseudotime models: time prior, encoder, likelihood, outputs.

    A subclass declares its trend's global sites (:meth:`_trend_sites`) and
    evaluates it (:meth:`_trend`); everything per cell lives here.
    """

    n_hidden: int = 64
    n_layers: int = hyperparameter(1, minimum=0)
    likelihood: str = "gaussian"
    scale_floor: float = hyperparameter(0.1, minimum=0)
    noise_floor: float = hyperparameter(0.2, minimum=0)
    root_key: Optional[str] = None
    root_value: Optional[str] = None
    root_strength: float = 10.0
    root_code: Optional[int] = hyperparameter(None, cli=False)
    reference_cells: Optional[int] = hyperparameter(None, cli=False)
    capture_key: Optional[str] = None
    capture_strength: float = 20.0
    capture_times: Optional[tuple] = hyperparameter(None, cli=False)
    capture_ranks: Optional[tuple] = hyperparameter(None, cli=False)
    continuous_covariate_keys: tuple[str, ...] = ()
    covariate_centres: Optional[tuple] = hyperparameter(None, cli=False)
    covariate_scales: Optional[tuple] = hyperparameter(None, cli=False)

    default_learning_rate: ClassVar[float] = 5e-3
    # Saves written before noise_floor existed fitted without one (lvmzoo.infer.saving).
    older_saves_meant: ClassVar[dict] = {"noise_floor": 0.0}
    # annotate reads the cells chunk by chunk (EvaluationBatches), so `lvmzoo fit --backed`
    # writes the same per-cell outputs as an in-memory fit (lvmzoo.cli.fit_outputs).
    annotates_on_disk: ClassVar[bool] = True
    # With a root, start the time at the cells' distance from it (``_root_start``)?
    starts_from_root: ClassVar[bool] = False
    # Without a root or capture times, report the direction in which more genes rise
    # (``runs_backwards``)?  Not where t = 0 is fixed by the model (BranchingPseudotime).
    directed_by_genes: ClassVar[bool] = True

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; choose one of "
                             f"{', '.join(LIKELIHOODS)}")
        if self.n_hidden < 1 or self.n_layers < 0:
            raise ValueError("n_hidden must be >= 1 and n_layers >= 0")
        if not self.scale_floor >= 0:
            raise ValueError(f"scale_floor must be >= 0, got {self.scale_floor}")
        if not self.noise_floor >= 0:
            raise ValueError(f"noise_floor must be >= 0, got {self.noise_floor}")
        if not self.root_strength > 1:
            raise ValueError(f"root_strength must be > 1, got {self.root_strength}")
        if (self.root_key is None) != (self.root_value is None):
            raise ValueError("give both root_key and root_value (the obs column and the value "
                             "that marks the early cells), or neither")
        if self.capture_key is not None and self.root_key is not None:
            raise ValueError("give capture times (capture_key) or a root (root_key), not both: "
                             "the capture times already put the earliest cells first")
        if not self.capture_strength > 2:
            raise ValueError(f"capture_strength must be > 2, got {self.capture_strength}")
        for name in ("capture_times", "capture_ranks", "covariate_centres",
                     "covariate_scales"):  # lists when read from model.json
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        keys = self.continuous_covariate_keys
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        object.__setattr__(self, "continuous_covariate_keys", keys)
        if len(set(keys)) != len(keys) or self.capture_key in keys:
            raise ValueError(f"continuous_covariate_keys repeat a column (or the capture_key): "
                             f"{keys}")

    @property
    def data_kind(self) -> str:
        return LIKELIHOODS[self.likelihood][0]

    @property
    def default_transform(self) -> str:
        return LIKELIHOODS[self.likelihood][1]

    @property
    def _hidden(self) -> tuple[int, ...]:
        return (self.n_hidden,) * self.n_layers

    # ------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------

    def registration(self) -> dict[str, tuple[str, ...]]:
        """The root column, as a categorical covariate, when there is a root; the capture
        times, as a numeric covariate, when there are some."""
        keys = {}
        continuous = ((self.capture_key,) if self.capture_key else ()) + \
            self.continuous_covariate_keys
        if continuous:
            keys["covariate_keys"] = continuous
        if self.root_key and not self.capture_key:
            keys["categorical_covariate_keys"] = (self.root_key,)
        return keys

    def for_data(self, data) -> "_TimeModel":
        """Checks that ``data`` can be ordered, records its number of cells (``N`` of the
        reported scale, see the module docstring) and resolves ``root_value`` to its code."""
        from lvmzoo.data.registry import DataError

        if data.n_cells < MIN_CELLS:
            raise DataError(f"{self.name} orders cells along a trajectory and needs at least "
                            f"{MIN_CELLS} cells; got {data.n_cells}")
        if self.reference_cells is None:
            self = dataclasses.replace(self, reference_cells=int(data.n_cells))
        if self.continuous_covariate_keys:
            self = self._with_covariate_scales(data)
        if self.capture_key is not None:
            return self._with_capture_ranks(data)
        if self.root_key is None:
            return self
        registry = data.registry
        if self.root_key not in registry.categorical_covariate_keys:
            raise DataError(f"root_key {self.root_key!r} is not registered: set up the data "
                            f"with setup_anndata(..., **model.registration())")
        categories = registry.categorical_covariate_categories[
            registry.categorical_covariate_keys.index(self.root_key)]
        if str(self.root_value) not in categories:
            shown = ", ".join(categories[:10]) + (" …" if len(categories) > 10 else "")
            raise DataError(f"no cell has obs[{self.root_key!r}] == {self.root_value!r} "
                            f"(root_value); its values: {shown}")
        code = categories.index(str(self.root_value))
        return dataclasses.replace(self, root_code=code)

    def _with_covariate_scales(self, data) -> "_TimeModel":
        """Records each continuous covariate's mean and sd over the cells (new cells are
        standardised with the training cells' values)."""
        from lvmzoo.data.registry import DataError

        registry = data.registry
        missing = [k for k in self.continuous_covariate_keys if k not in registry.covariate_keys]
        if missing:
            raise DataError(f"continuous covariate(s) {', '.join(map(repr, missing))} not "
                            "registered: set up the data with setup_anndata(..., "
                            "**model.registration())")
        if self.covariate_centres is not None:  # fitted already
            return self
        columns = [registry.covariate_keys.index(k) for k in self.continuous_covariate_keys]
        values = np.asarray(data.covariates[:, columns], np.float64)
        centres, scales = values.mean(0), values.std(0)
        constant = [k for k, sd in zip(self.continuous_covariate_keys, scales) if not sd > 0]
        if constant:
            raise DataError(f"obs column(s) {', '.join(map(repr, constant))} take one value in "
                            "every cell: a covariate that does not vary explains nothing; leave "
                            "it out of continuous_covariate_keys")
        return dataclasses.replace(self, covariate_centres=tuple(map(float, centres)),
                                   covariate_scales=tuple(map(float, scales)))

    def _standardised_covariates(self, batch: Batch) -> jax.Array:
        """``(B, C)`` the continuous covariates, standardised by the training cells."""
        if self.covariate_centres is None:
            raise ValueError(f"{self.name} has continuous covariates but was not resolved "
                             "against the data: fit it with lvmzoo.fit, or use "
                             "model.for_data(data)")
        values = jnp.stack([batch.covariate(k) for k in self.continuous_covariate_keys], -1)
        return (values - jnp.asarray(self.covariate_centres, jnp.float32)) / jnp.asarray(
            self.covariate_scales, jnp.float32)

    def _with_capture_ranks(self, data) -> "_TimeModel":
        """Records each capture time's mid-rank among the cells (the prior's mean of ``t``
        for the cells captured then; see "Capture times" in the module docstring)."""
        from lvmzoo.data.registry import DataError

        registry = data.registry
        if self.capture_key not in registry.covariate_keys:
            raise DataError(f"capture_key {self.capture_key!r} is not registered: set up the "
                            "data with setup_anndata(..., **model.registration())")
        if self.capture_times is not None:  # fitted already: new cells keep its scale
            return self
        times = np.asarray(data.covariates[:, registry.covariate_keys.index(self.capture_key)],
                           np.float64)
        distinct, counts = np.unique(times, return_counts=True)
        if distinct.size < 2:
            raise DataError(f"every cell has obs[{self.capture_key!r}] == {distinct[0]:g}: "
                            "capture times order cells only when they differ; leave out "
                            "capture_key")
        ranks = (np.cumsum(counts) - counts / 2) / times.size
        return dataclasses.replace(self, capture_times=tuple(map(float, distinct)),
                                   capture_ranks=tuple(map(float, ranks)))

    def _capture_rank(self, batch: Batch) -> Optional[jax.Array]:
        """``(B,)`` the prior mean of each cell's ``t`` from its capture time (linear between
        the training cells' times, clipped to their range), or ``None`` without times."""
        if self.capture_key is None:
            return None
        if self.capture_times is None:
            raise ValueError(f"{self.name} has capture times but was not resolved against the "
                             "data: fit it with lvmzoo.fit, or use model.for_data(data)")
        rank = jnp.interp(batch.covariate(self.capture_key),
                          jnp.asarray(self.capture_times, jnp.float32),
                          jnp.asarray(self.capture_ranks, jnp.float32))
        return jnp.clip(rank, CAPTURE_RANK_MARGIN, 1.0 - CAPTURE_RANK_MARGIN)

    def _is_root(self, batch: Batch) -> Optional[jax.Array]:
        if self.root_key is None:
            return None
        if self.root_code is None:
            raise ValueError(f"{self.name} has a root but was not resolved against the data: "
                             "fit it with lvmzoo.fit, or use model.for_data(data)")
        codes, _ = batch.categorical(self.root_key)
        return codes == self.root_code

    def _encoder_input(self, batch: Batch) -> jax.Array:
        """What the encoder sees: the values for Gaussian data, log1p CP10k for counts."""
        if self.likelihood == "gaussian":
            return batch.x
        library = jnp.maximum(batch.x.sum(-1, keepdims=True), 1.0)
        return jnp.log1p(1e4 * batch.x / library)

    # ------------------------------------------------------------------
    # Generative model
    # ------------------------------------------------------------------

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        sites = self._trend_sites(n_genes)  # globals: outside the plate
        offset = self._batch_offset(batch, n_genes)
        noise = self._noise(n_genes)
        reference = numpyro.param("time_reference",
                                  jnp.asarray(_LOGIT_LEVELS / REFERENCE_SPEED, jnp.float32))
        self._known_genes_prior(sites, reference)
        with cell_plate(batch):
            u = numpyro.sample("logit_t", self.prior(batch))
            eta = self._trend(jax.nn.sigmoid(u), sites)
            numpyro.sample("x", self._x_distribution(eta, offset, noise, batch), obs=batch.x)
            numpyro.factor("time_reference_fit", _reference_fit(u, reference))

    def _known_genes_prior(self, sites: dict, reference: jax.Array) -> None:
        """Priors on the trend's sites from what is known about genes (none by default)."""

    def prior(self, batch: Batch) -> dist.Distribution:
        """``p(logit t)`` of each cell: ``t ~ Beta(1, 1)``, or ``Beta(1, root_strength)`` at a
        root, or ``Beta(m kappa, (1 - m) kappa)`` around its capture time's rank ``m``."""
        rank = self._capture_rank(batch)
        if rank is not None:
            return LogitBeta(rank * self.capture_strength, (1.0 - rank) * self.capture_strength)
        is_root = self._is_root(batch)
        b = jnp.ones(batch.size) if is_root is None else jnp.where(is_root, self.root_strength, 1.0)
        return LogitBeta(jnp.ones(batch.size), b)

    def _batch_offset(self, batch: Batch, n_genes: int) -> jax.Array:
        """Per-cell additive offset ``(B, G)``: the batch's (the first batch is the
        reference, 0) plus each standardised continuous covariate times its per-gene
        effect (0 at the training cells' mean)."""
        offset = jnp.zeros((1, n_genes))
        if batch.n_batches > 1:
            table = numpyro.param("batch_offset", jnp.zeros((batch.n_batches - 1, n_genes)))
            offset = jnp.concatenate([jnp.zeros((1, n_genes)), table])[batch.batch]
        if self.continuous_covariate_keys:
            effect = numpyro.param("covariate_effect",
                                   jnp.zeros((len(self.continuous_covariate_keys), n_genes)))
            offset = offset + self._standardised_covariates(batch) @ effect
        return offset

    def _noise(self, n_genes: int) -> jax.Array:
        if self.likelihood == "gaussian":
            return self.noise_floor + numpyro.param("x_scale", jnp.full(n_genes, 0.5),
                                                    constraint=constraints.positive)
        return numpyro.param("inverse_dispersion", jnp.full(n_genes, 5.0),
                             constraint=constraints.positive)

    def _fitted_noise(self, params) -> jax.Array:
        """:meth:`_noise` at fitted ``params``: the Gaussian sd (floor included) or the NB
        inverse dispersion, ``(G,)``."""
        if self.likelihood == "gaussian":
            return self.noise_floor + params["x_scale"]
        return params["inverse_dispersion"]

    def _x_distribution(self, trend, offset, noise, batch: Batch) -> dist.Distribution:
        """``p(x_c | t_c)`` of each cell (event: the genes), from the trend ``(B, G)``."""
        return self._observation(trend + offset, noise, batch).to_event(1)

    def _observation(self, eta, noise, batch: Batch) -> dist.Distribution:
        if self.likelihood == "gaussian":
            return dist.Normal(eta, noise)
        log_library = jnp.log(jnp.maximum(batch.x.sum(-1, keepdims=True), 1.0))
        return COUNT_LIKELIHOODS["nb"].build(eta + log_library, noise, None)

    def init_params(self, batch: Batch, key: jax.Array):
        """Gene baselines at their means (log frequencies for NB) and noise at their sd; with
        capture times, the trend fitted to the cells' capture ranks (:meth:`_capture_start`),
        or with a root and :attr:`starts_from_root`, the encoder at the cells' distance from
        the root (:meth:`_root_start`) and the trend fitted to it (:meth:`_trend_start`)."""
        x = self._encoder_input(batch)
        mean, sd = x.mean(0), jnp.maximum(x.std(0), 1e-2)
        if self.likelihood == "gaussian":
            start = {"baseline": mean, "x_scale": jnp.maximum(sd - self.noise_floor, 1e-2)}
        else:
            counts = batch.x.sum(0) + 0.5
            start = {"baseline": jnp.log(counts / counts.sum())}
        known = self._known_genes_start(x, key)
        if self.capture_key is not None:
            cells, time = self._capture_start(x.shape[0], self._capture_rank(batch), key)
        elif known is not None:
            cells, time = known
        elif self.root_key is not None and self.starts_from_root:
            root_start = self._root_start(x, np.asarray(self._is_root(batch)), key)
            if root_start is None:
                return start
            start["encoder$params"], cells, time = root_start
        else:
            return start
        start.update(self._trend_start(time, x[cells] - start["baseline"]
                                       if self.likelihood == "gaussian"
                                       else x[cells] - x[cells].mean(0)))
        if "baseline_shift" in start:  # the trend's own intercept, into the baseline
            start["baseline"] = start["baseline"] + start.pop("baseline_shift")
        return start

    def _known_genes_start(self, x, key) -> Optional[tuple]:
        """``(cells, times)`` to start the trend from what is known about genes (none by
        default; :class:`SwitchPseudotime` with markers)."""
        return None

    def _trend_start(self, time, residual) -> dict:
        """Start values of the trend's params given start times ``(n,)`` of cells whose
        values less the baseline are ``residual`` ``(n, G)`` (log scale); none by default.
        An entry ``"baseline_shift"`` ``(G,)`` is added to the baseline's start."""
        return {}

    def _root_start(self, x, is_root, key) -> Optional[tuple]:
        """``(encoder params, cells, times)``: encoder weights whose ``logit t`` is, at the
        start, each cell's rank in distance from the root cells along the k-nearest-neighbour
        graph (:func:`lvmzoo.analysis.trajectory.geodesic_time`), computed on at most
        :data:`START_CELLS` of the sampled cells ``x`` (``cells``: their rows; all root
        cells among them up to half) and those cells' ranks (``times``, ``(n,)``); ``None``
        when the sample has no root cell.

        Why (BranchingPseudotime: its lineages run side by side in time from the root, as
        the distances do): from a random encoder the fit reaches different optima; on
        ``simulate_branching_trajectory(400, 60, seed=1)`` with the root, 4 fit seeds gave
        Kendall tau 0.69-0.89 (lineages of the late cells 66-95 % right) and from this
        start, with the trend fitted to it, 0.91-0.94 (94-99 %), at a better ELBO every
        time (loss 52.7-54.0 against 54.5-56.7 nats per cell); on paul15 (K = 4, root MPP)
        tau 0.465-0.474 over 4 seeds against 0.398-0.479, per-cell log-likelihood
        -400.2 to -400.5 against -400.7 to -400.9.  Not for the one-path models: on
        branching data the distance puts the fates side by side, which one curve per gene
        cannot fit (paul15, Pseudotime with the root: log-likelihood -403.1 / -403.3 from
        this start against -401.6 / -402.0 from a random one).  The time is then the
        model's: the fit moves it freely."""
        from lvmzoo.analysis.trajectory import geodesic_time

        x = np.asarray(x, np.float32)
        if not is_root.any():
            return None
        key_roots, key_others, key_init, key_steps = jax.random.split(key, 4)
        roots = np.asarray(jax.random.permutation(key_roots, np.flatnonzero(is_root)))
        roots = roots[:START_CELLS // 2]
        others = np.asarray(jax.random.permutation(key_others, np.flatnonzero(~is_root)))
        cells = np.sort(np.concatenate([roots, others[:START_CELLS - roots.size]]))
        rank = geodesic_time(x[cells], is_root[cells])
        target = jnp.asarray(np.log(rank) - np.log1p(-rank), jnp.float32)
        encoder = _regress_encoder(GaussianEncoder(1, hidden=self._hidden),
                                   jnp.asarray(x[cells]), target, key_init, key_steps)
        return encoder, cells, jnp.asarray(rank, jnp.float32)

    def _capture_start(self, n_cells: int, rank, key) -> tuple:
        """``(cells, times)``: at most :data:`START_CELLS` of the ``n_cells`` sampled cells and
        their capture times' ranks (the prior's means), to which :meth:`_trend_start` fits the
        trend.  The encoder starts at random: started at the ranks too (as
        :meth:`_root_start` starts it), its ReLU units all went silent in the first steps on
        HSMM (log FPKM, 1,000 genes: Adam moves a unit's weights alike for inputs that are
        all positive) and every cell got one time; from a random encoder and the fitted
        trend HSMM ordered at Kendall tau 0.58-0.65 (Pseudotime, 3 seeds) and amphioxus at
        0.80, against 0.30-0.54 / 0.76 without a start."""
        cells = np.sort(np.asarray(jax.random.permutation(key, n_cells))[:START_CELLS])
        return cells, jnp.asarray(np.asarray(rank, np.float32)[cells])

    @abc.abstractmethod
    def _trend_sites(self, n_genes: int) -> dict[str, jax.Array]:
        """Declare (model) the trend's global sites; return their values by name."""

    @abc.abstractmethod
    def _trend(self, t: jax.Array, sites: dict[str, jax.Array]) -> jax.Array:
        """``f(t)``: ``(..., B, G)`` for times ``t`` ``(..., B)``."""

    # ------------------------------------------------------------------
    # Guide
    # ------------------------------------------------------------------

    def guide(self, batch: Batch) -> None:
        self._guide_sites(batch.x.shape[-1])
        loc, scale = self._encode(batch)
        with cell_plate(batch):
            numpyro.sample("logit_t", dist.Normal(loc, scale))

    def _guide_sites(self, n_genes: int) -> None:
        """The guide of the trend's latent global sites (none by default)."""

    def _encode(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)`` of ``q(logit t | x)``, each ``(B,)``."""
        x = self._encoder_input(batch)
        encoder = flax_module("encoder", GaussianEncoder(1, hidden=self._hidden), x)
        loc, scale = encoder(x)
        return loc[..., 0], scale[..., 0] + self.scale_floor

    # ------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------

    def _time_mixture(self, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """``(a, b)``, each ``(B, J)``: the reported time of each cell is the equal-weight
        mixture over ``j`` of ``Beta(a_j, b_j)`` (see the module docstring), where
        ``a_j = N F(u_j) + 1/2``, ``b_j = N (1 - F(u_j)) + 1/2`` and ``u_j`` are the
        guide's ``(j - 1/2) / J`` quantiles of ``logit t``."""
        loc, scale = handlers.substitute(self._encode, data=params)(batch)
        nodes = loc[:, None] + scale[:, None] * jnp.asarray(_INTERVAL_NODES, jnp.float32)
        rank = self._directed(params, to_rank(nodes, reference_quantiles(params)))
        n = float(self.reference_cells or batch.n_cells)
        return n * rank + 0.5, n * (1.0 - rank) + 0.5

    def pseudotime(self, params, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(mean, lower, upper)`` of each cell's reported time, each ``(B,)``: the mean and
        the 2.5 % / 97.5 % quantiles (by bisection) of the mixture of :meth:`_time_mixture`."""
        a, b = self._time_mixture(params, batch)
        mean = jnp.mean(a / (a + b), -1)
        lower, upper = _mixture_quantiles(a, b, (0.025, 0.975))
        return mean, lower, upper

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        """The reported pseudotime's posterior mean (on the prior's scale), ``(B, 1)``."""
        a, b = self._time_mixture(params, batch)
        return jnp.mean(a / (a + b), -1)[:, None]

    def model_time(self, params, time) -> jax.Array:
        """The model's own ``t`` (the trends' argument) at reported times ``time``:
        ``sigmoid(F^-1(time))``."""
        time = self._directed(params, jnp.asarray(time, jnp.float32))
        return jax.nn.sigmoid(from_rank(time, reference_quantiles(params)))

    def reported_time(self, params, t) -> jax.Array:
        """The reported time (rank scale, ``F(logit t)``) of model times ``t``."""
        t = jnp.clip(jnp.asarray(t, jnp.float32), 1e-7, 1 - 1e-7)
        return self._directed(params, to_rank(jnp.log(t) - jnp.log1p(-t),
                                              reference_quantiles(params)))

    def runs_backwards(self, params) -> jax.Array:
        """Whether the reported time reads the model's ``t`` backwards: without a root or
        capture times (and for one-path models), when more of the genes whose fitted trend is
        monotone in ``t`` where the cells are (Spearman correlation on the reported grid
        beyond :data:`MONOTONE_CORRELATION` in size) and of large amplitude (the upper half)
        fall along ``t`` than rise ("Direction" in the module docstring)."""
        if self._direction_given() or not self.directed_by_genes:
            return jnp.asarray(False)
        # The trend where the cells are: at the model times of the reported grid's points.
        ranks = (jnp.arange(GRID_POINTS) + 0.5) / GRID_POINTS
        t = jax.nn.sigmoid(from_rank(ranks, reference_quantiles(params)))
        trend = self._trend(t, self._fitted_sites(params))  # (T, G)
        # Spearman correlation of each gene's trend with t (ties: none on a smooth curve)
        order = jnp.argsort(jnp.argsort(trend, axis=0), axis=0).astype(jnp.float32)
        centred = order - order.mean(0)
        grid = jnp.arange(GRID_POINTS, dtype=jnp.float32) - (GRID_POINTS - 1) / 2
        correlation = (grid @ centred) / jnp.sqrt(
            (grid**2).sum() * jnp.maximum((centred**2).sum(0), 1e-12))
        amplitude = trend.max(0) - trend.min(0)
        large = amplitude >= jnp.median(amplitude)
        rising = jnp.sum(large & (correlation > MONOTONE_CORRELATION))
        falling = jnp.sum(large & (correlation < -MONOTONE_CORRELATION))
        return falling > rising

    def _direction_given(self) -> bool:
        """Whether the fit is told which end is early (a root or capture times)."""
        return self.root_key is not None or self.capture_key is not None

    def _directed(self, params, rank) -> jax.Array:
        """``rank`` on the reported scale's direction: ``1 - rank`` when
        :meth:`runs_backwards` (the map is its own inverse)."""
        return jnp.where(self.runs_backwards(params), 1.0 - rank, rank)

    def trends(self, params, grid, key: Optional[jax.Array] = None,
               n_samples: int = 200) -> dict[str, np.ndarray]:
        """Each gene's fitted trend on ``grid`` ``(T,)`` (batch 0) of reported times (the
        scale of ``obs["pseudotime"]``; the trends are evaluated at :meth:`model_time`).

        Returns:
          ``{"grid": (T,), "mean": (G, T)}`` plus ``"lower"`` / ``"upper"``
          (95 % band) where the trend has a posterior; units: log-normalised
          values (Gaussian) or log expected counts per 10,000 (NB).
        """
        grid = jnp.asarray(grid, jnp.float32)
        times = self.model_time(params, grid)
        shift = 0.0 if self.likelihood == "gaussian" else math.log(1e4)
        out = {"grid": np.asarray(grid),
               "mean": np.asarray(self._trend(times, self._fitted_sites(params)).T + shift)}
        draws = self._posterior_sites(params, key if key is not None else jax.random.PRNGKey(0),
                                      n_samples)
        if draws is not None:
            curves = jax.vmap(lambda s: self._trend(times, s))(draws) + shift  # (S, T, G)
            low, high = jnp.quantile(curves, jnp.array([0.025, 0.975]), axis=0)
            out["lower"], out["upper"] = np.asarray(low.T), np.asarray(high.T)
        return out

    def _fitted_sites(self, params) -> dict[str, jax.Array]:
        """The trend's sites at their fitted (posterior mean or point) values."""
        return {name: params[name] for name in self._site_names}

    def _posterior_sites(self, params, key, n_samples) -> Optional[dict[str, jax.Array]]:
        """``n_samples`` draws of the sites from the guide; ``None`` if all are point estimates."""
        return None

    _site_names: ClassVar[tuple[str, ...]] = ()

    def annotate(self, adata, params, latent, data) -> list[str]:
        """``obs["pseudotime"]`` (posterior mean), ``obs["pseudotime_lower"]`` /
        ``obs["pseudotime_upper"]`` (95 % interval), ``uns["pseudotime_trends"]`` and
        ``obs["arc_length"]`` / ``"arc_length_lower"`` / ``"arc_length_upper"``
        (:meth:`arc_length`: the same cells' distance along the fitted curves) and, with
        continuous covariates, ``var["<key>_effect"]`` (each gene's change per sd of it).

        All on the prior's scale, not the model's own ``t``: a cell's time is where
        its rank among the ``reference_cells`` training cells puts it under the
        Uniform(0, 1) prior (``F``, the CDF of the training cells' aggregate
        posterior, learned as ``params["time_reference"]`` during the fit, so new
        cells get the same map); the interval mixes the guide's uncertainty about
        the rank with the order statistic's ``Beta`` spread (module docstring)."""
        parts = [[np.asarray(v) for v in _pseudotime_program(self, params, batch)]
                 for batch in EvaluationBatches(data, 4096)]
        mean, lower, upper = (np.concatenate(p) for p in zip(*parts))
        adata.obs["pseudotime"] = mean.astype(np.float64)
        adata.obs["pseudotime_lower"] = lower.astype(np.float64)
        adata.obs["pseudotime_upper"] = upper.astype(np.float64)
        # grid midpoints: the ends 0 and 1 map to the far tails of the model's own time
        trends = self.trends(params, (np.arange(GRID_POINTS) + 0.5) / GRID_POINTS)
        trends["genes"] = np.asarray(data.registry.gene_names, dtype=object).astype(str)
        adata.uns["pseudotime_trends"] = trends
        keys = ['obs["pseudotime"]', 'obs["pseudotime_lower"]', 'obs["pseudotime_upper"]',
                'uns["pseudotime_trends"]']
        weights, lineage_keys = self._annotate_lineages(adata, params, data)
        along = self.arc_length(params, np.stack([mean, lower, upper], 1), weights)
        for j, column in enumerate(ARC_LENGTH_COLUMNS):
            adata.obs[column] = along[:, j]
        keys = keys + lineage_keys + [f'obs["{c}"]' for c in ARC_LENGTH_COLUMNS]
        for key, effect in zip(self.continuous_covariate_keys,
                               np.asarray(params.get("covariate_effect", ()))):
            # a one-sd change of the covariate's effect on each gene, in the trend's units
            adata.var[f"{key}_effect"] = effect.astype(np.float64)
            keys.append(f'var["{key}_effect"]')
        return keys

    def align_member_outputs(self, adata, rotation) -> None:
        """A seed ensemble's member whose time runs the other way from member 0's (its
        latent's alignment onto member 0's is a reflection, ``rotation`` ``[[-1]]``) is read
        backwards: ``pseudotime`` and ``arc_length`` become ``1 - `` themselves, their
        interval ends swapped, so that the ensemble averages times of one direction
        (without a root the direction of each fit is arbitrary: module docstring)."""
        if float(np.asarray(rotation).reshape(-1)[0]) >= 0:
            return
        for name in ("pseudotime", "arc_length"):
            lower = adata.obs[f"{name}_lower"].to_numpy()
            upper = adata.obs[f"{name}_upper"].to_numpy()
            adata.obs[name] = 1.0 - adata.obs[name].to_numpy()
            adata.obs[f"{name}_lower"], adata.obs[f"{name}_upper"] = 1.0 - upper, 1.0 - lower

    def _annotate_lineages(self, adata, params, data) -> tuple[Optional[np.ndarray], list[str]]:
        """Each cell's weights over the curves ``(n, K)`` (``None``: one curve) and the
        outputs written for them; nothing for one-path models."""
        return None, []

    def arc_length(self, params, times, weights=None, *, n_grid: int = ARC_GRID_POINTS
                   ) -> np.ndarray:
        """The distance travelled along the fitted curve(s) up to reported times ``times``
        ``(n, ...)``: each curve's cumulative Euclidean length (every gene's fitted trend, in
        the units of :meth:`trends`, on ``n_grid`` points of the reported time), divided by
        the longest curve's total, so ``1`` is the end of the longest; with several curves
        (lineages) averaged over ``weights`` ``(n, K)``.

        Why (Slingshot's and principal curves' pseudotime): the one time a branching model
        shares across its lineages is not comparable between them (any monotone re-timing
        of one lineage explains its cells as well, so where one lineage's cells sit against
        another's is not identified), the distance along each lineage's curve is.  On one
        curve it is a monotone re-reading of the time (the same order).  paul15 (rooted
        K = 4, 3 seeds): Kendall tau against the stages 0.474-0.485 against the time's
        0.465-0.473 (benchmarks/results/pseudotime.md)."""
        grid = np.linspace(0.0, 1.0, n_grid)
        sites = self._fitted_sites(params)
        curves = np.asarray(self._trend(self.model_time(params, grid), sites), np.float64)
        curves = curves[:, None, :] if curves.ndim == 2 else curves  # (T, K, G)
        steps = np.linalg.norm(np.diff(curves, axis=0), axis=-1)  # (T - 1, K)
        lengths = np.concatenate([np.zeros((1, curves.shape[1])), np.cumsum(steps, 0)])
        lengths /= max(float(lengths[-1].max()), np.finfo(float).tiny)
        times = np.asarray(times, np.float64)
        along = np.stack([np.interp(times, grid, lengths[:, k])
                          for k in range(lengths.shape[1])], -1)  # (n, ..., K)
        if weights is None:
            return along[..., 0]
        weights = np.asarray(weights, np.float64).reshape(
            (times.shape[0],) + (1,) * (times.ndim - 1) + (lengths.shape[1],))
        return (weights * along).sum(-1)

    def _figure_genes(self, data) -> tuple[str, ...]:
        """Genes ``pseudotime.png`` draws before the largest-range ones (none by default)."""
        return ()

    def write_files(self, out, annotated, fitted, data) -> list[str]:
        """Files ``lvmzoo fit`` writes beside ``result.h5ad``: ``pseudotime_trends.csv``
        (every gene's trend on the grid, with its 95 % band where the model has one, and
        its symbol where the data registers them),
        ``pseudotime.png`` (:func:`lvmzoo.analysis.trajectory.trajectory_figure`; the
        cells' values in its trend panels for cells in memory up to
        :data:`FIGURE_VALUES` values) and ``changing_genes.csv``
        (:func:`lvmzoo.analysis.trajectory.changing_genes`, read block by block, so on
        disk too)."""
        from pathlib import Path

        from lvmzoo.analysis import trajectory
        from lvmzoo.io import atomic_write_text
        from lvmzoo.plotting import save_figure

        out = Path(out)
        written = []
        table = trajectory.trends_table(annotated.uns["pseudotime_trends"])
        if data.registry.gene_symbols:  # --gene-symbols: each row's symbol beside its gene
            symbol = dict(zip(data.registry.gene_names, data.registry.gene_symbols))
            table.insert(list(table.columns).index("gene") + 1, "symbol",
                         table["gene"].map(symbol))
        atomic_write_text(out / "pseudotime_trends.csv", table.to_csv(index=False))
        written.append("pseudotime_trends.csv")
        genes = trajectory.changing_genes(fitted, data)
        atomic_write_text(out / "changing_genes.csv", genes.sort_values("pvalue").to_csv())
        written.append("changing_genes.csv")
        small = (not data.is_backed) and data.n_cells * data.n_genes <= FIGURE_VALUES
        values = trajectory.expression_values(data) if small else None
        symbols = data.registry.gene_symbols_key
        save_figure(trajectory.trajectory_figure(
            annotated, values=values, first=self._figure_genes(data),
            gene_symbols=symbols if symbols in annotated.var else None),
                    out / "pseudotime.png")
        written.append("pseudotime.png")
        return written


@functools.partial(jax.jit, static_argnames=("model",))
def _pseudotime_program(model, params, batch):
    return model.pseudotime(params, batch)


@functools.partial(jax.jit, static_argnames=("encoder",))
def _regress_encoder(encoder, x, target, key_init, key_steps):
    """Flax params of ``encoder`` fitted by least squares so that its location is ``target``
    ``(n,)`` at ``x`` ``(n, G)`` (and its scale small): :data:`START_STEPS` Adam steps on
    random batches of :data:`START_BATCH` cells."""
    import optax

    params = encoder.init(key_init, x[:1])["params"]
    optimizer = optax.adam(START_LEARNING_RATE)

    def loss(p, rows):
        loc, scale = encoder.apply({"params": p}, x[rows])
        return jnp.mean((loc[:, 0] - target[rows]) ** 2) + jnp.mean(scale[:, 0] ** 2)

    def step(carry, key):
        p, state = carry
        rows = jax.random.randint(key, (START_BATCH,), 0, x.shape[0])
        updates, state = optimizer.update(jax.grad(loss)(p, rows), state)
        return (optax.apply_updates(p, updates), state), None

    keys = jax.random.split(key_steps, START_STEPS)
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params


_LOGIT_LEVELS = np.log(REFERENCE_LEVELS) - np.log1p(-REFERENCE_LEVELS)
# scipy, not jax: a jax computation at import would start jax's backend, after
# which `lvmzoo fit --distributed` can no longer call jax.distributed.initialize.
_INTERVAL_NODES = np.sqrt(2.0) * scipy.special.erfinv(
    2.0 * (np.arange(N_INTERVAL_NODES) + 0.5) / N_INTERVAL_NODES - 1.0).astype(np.float32)


def parse_marker(text: str) -> tuple[str, str, Optional[float]]:
    """``"GENE:up"``, ``"GENE:down"`` or ``"GENE:up@0.6"`` -> ``(gene, direction, time)``."""
    gene, _, rest = str(text).rpartition(":")
    direction, _, time = rest.partition("@")
    direction = direction.strip().lower()
    if not gene.strip() or direction not in MARKER_DIRECTIONS:
        raise ValueError(f"marker {text!r}: write GENE:up or GENE:down, optionally with the "
                         "switch time, e.g. MYOG:up@0.6")
    if not time:
        return gene.strip(), direction, None
    try:
        value = float(time)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ValueError(f"marker {text!r}: the switch time after @ must be a number in "
                         "(0, 1), the reported pseudotime scale")
    return gene.strip(), direction, value


def _reference_fit(u, reference) -> jax.Array:
    """Per-cell log factor that is 0 in value but whose gradient moves ``reference`` to the
    quantiles (levels :data:`REFERENCE_LEVELS`) of the sampled ``u = logit t``: minus the
    pinball (quantile) loss, less its own value.  ``u`` enters without a gradient, so the
    ELBO and every other parameter's gradient are unchanged."""
    diff = jax.lax.stop_gradient(u)[..., None] - REFERENCE_SPEED * reference  # (..., B, K)
    levels = jnp.asarray(REFERENCE_LEVELS, jnp.float32)
    pinball = jnp.maximum(levels * diff, (levels - 1.0) * diff).sum(-1)
    return jax.lax.stop_gradient(pinball) - pinball


def reference_quantiles(params) -> jax.Array:
    """The sorted reference quantiles ``r_k`` of ``logit t`` ``(K,)``; a model fitted
    before they existed gets the prior's own (``logit p_k``: ``F`` = the identity)."""
    if "time_reference" not in params:
        return jnp.asarray(_LOGIT_LEVELS, jnp.float32)
    return jnp.sort(REFERENCE_SPEED * jnp.asarray(params["time_reference"], jnp.float32))


def to_rank(u, reference) -> jax.Array:
    """``F(u)``: piecewise linear through ``(r_k, p_k)``, beyond them ``sigmoid`` of a unit
    slope in ``logit`` (the prior's tails); monotone, into ``(0, 1)``."""
    levels = jnp.asarray(REFERENCE_LEVELS, jnp.float32)
    logit_levels = jnp.asarray(_LOGIT_LEVELS, jnp.float32)
    inside = jnp.interp(u, reference, levels)
    below = jax.nn.sigmoid(logit_levels[0] + (u - reference[0]))
    above = jax.nn.sigmoid(logit_levels[-1] + (u - reference[-1]))
    return jnp.where(u < reference[0], below, jnp.where(u > reference[-1], above, inside))


def from_rank(p, reference) -> jax.Array:
    """``F^-1(p)`` (``logit t``) for ``p`` in ``[0, 1]``."""
    levels = jnp.asarray(REFERENCE_LEVELS, jnp.float32)
    logit_levels = jnp.asarray(_LOGIT_LEVELS, jnp.float32)
    p = jnp.clip(p, 1e-7, 1 - 1e-7)
    logit_p = jnp.log(p) - jnp.log1p(-p)
    inside = jnp.interp(p, levels, reference)
    below = reference[0] + (logit_p - logit_levels[0])
    above = reference[-1] + (logit_p - logit_levels[-1])
    return jnp.where(p < levels[0], below, jnp.where(p > levels[-1], above, inside))


def _mixture_cdf(x, a, b) -> jax.Array:
    """CDF at ``x`` ``(B,)`` of the equal-weight mixture of ``Beta(a_j, b_j)`` ``(B, J)``;
    a Normal with the Beta's moments where both shapes exceed :data:`NORMAL_SHAPES`
    (float32 ``betainc`` loses accuracy there)."""
    return jnp.mean(jnp.where(jnp.minimum(a, b) > NORMAL_SHAPES, _normal_cdf(x, a, b),
                              jax.scipy.special.betainc(a, b, jnp.clip(x[:, None], 0.0, 1.0))),
                    -1)


def _normal_cdf(x, a, b) -> jax.Array:
    n = a + b
    mean, sd = a / n, jnp.sqrt(a * b / (n * n * (n + 1.0)))
    return jax.scipy.special.ndtr((x[:, None] - mean) / sd)


def _mixture_quantiles(a, b, levels) -> tuple[jax.Array, ...]:
    """The ``levels`` quantiles ``(B,)`` each of :func:`_mixture_cdf`'s mixtures, by
    :data:`BISECTION_STEPS` bisection steps.

    Why not simply bisect :func:`_mixture_cdf`: its ``betainc`` (a continued fraction)
    is nearly all the cost, and it is needed only where a shape is at most
    :data:`NORMAL_SHAPES`, i.e. for cells ranked among the first or last ~30 of the
    ``N`` training cells.  So ``betainc`` runs on those rows alone, gathered into
    :data:`FEW_EXACT_ROWS` or :data:`EXACT_ROWS` slots, or on none; a batch with more
    such rows (small ``N``), or of at most :data:`FULL_ROWS` rows, takes the full
    computation.  The same numbers on every path
    (each entry is computed as before); at 200,000 training cells the per-cell outputs of
    ``lvmzoo fit`` took 225 s, nearly all here, before the rows were gathered."""
    n_rows = a.shape[0]
    small = jnp.minimum(a, b) <= NORMAL_SHAPES
    needs_exact = small.any(-1)

    def gathered_cdf(slots):
        rows = jnp.nonzero(needs_exact, size=slots, fill_value=0)[0]

        def cdf(x):
            normal = _normal_cdf(x, a, b)
            exact = jax.scipy.special.betainc(a[rows], b[rows],
                                              jnp.clip(x[rows, None], 0.0, 1.0))
            mixed = normal.at[rows].set(jnp.where(small[rows], exact, normal[rows]))
            return jnp.mean(mixed, -1)

        return cdf

    def bisect(cdf):
        def quantile(level):
            def step(_, bounds):
                low, high = bounds
                mid = 0.5 * (low + high)
                below = cdf(mid) < level
                return jnp.where(below, mid, low), jnp.where(below, high, mid)

            start = (jnp.zeros(n_rows, a.dtype), jnp.ones(n_rows, a.dtype))
            low, high = jax.lax.fori_loop(0, BISECTION_STEPS, step, start)
            return 0.5 * (low + high)

        return tuple(quantile(level) for level in levels)

    if n_rows <= FULL_ROWS:
        return bisect(lambda x: _mixture_cdf(x, a, b))
    # betainc costs its slots whether they are used or not, so a batch takes the fewest that
    # hold its exact rows: none (nearly every batch of a fit to many cells: about 2 x 30 / N
    # of the cells need one), FEW_EXACT_ROWS (a rooted fit's batches hold a few cells at the
    # root), EXACT_ROWS, or every row (small N).  Per 4,096 cells at N = 1,000,000: 16 ms
    # without betainc, 102 ms with 128 slots.
    # (Here n_rows > FULL_ROWS >= EXACT_ROWS, so every tier fits in the batch.)
    branch = jnp.searchsorted(jnp.asarray([0, FEW_EXACT_ROWS, EXACT_ROWS]), needs_exact.sum())
    return jax.lax.switch(branch, [
        lambda: bisect(lambda x: jnp.mean(_normal_cdf(x, a, b), -1)),
        lambda: bisect(gathered_cdf(FEW_EXACT_ROWS)),
        lambda: bisect(gathered_cdf(EXACT_ROWS)),
        lambda: bisect(lambda x: _mixture_cdf(x, a, b)),
    ])


@dataclasses.dataclass(frozen=True)
class Pseudotime(_TimeModel):
    """Pseudotime: per-cell time in (0, 1) with Gaussian-process gene trends (HSGP).

    Attributes:
      n_basis: number ``M`` of basis functions of the Hilbert-space GP of each
        gene's trend (resolves lengthscales down to about 0.08).
      n_hidden: width of the encoder's hidden layers.
      n_layers: hidden layers of the encoder (``0``: linear).
      likelihood: ``"gaussian"`` (log-normalised data; counts are
        log1p-CP10k transformed by default) or ``"nb"`` (raw counts, mean
        ``library * exp(f(t))``).
      scale_floor: floor added to the encoder's sd of ``logit t``.
      noise_floor: floor added to each gene's Gaussian noise sd, in the data's
        units (``likelihood="gaussian"`` only; see "Noise floor" in the module
        docstring; 0 turns it off).
      root_key: obs column marking early cells (registered as a categorical
        covariate); with root_value.
      root_value: value of root_key of the early (root) cells, whose prior
        ``Beta(1, root_strength)`` pulls them, and the direction, to t = 0.
      root_strength: ``b`` of the root cells' ``Beta(1, b)`` prior (mean
        ``1 / (1 + b)``).
      root_code: the category code of root_value, set by ``lvmzoo.fit``
        (not a flag).
      capture_key: numeric obs column of the times at which the cells were captured
        (hours, days, stage numbers), a prior on each cell's time (see "Capture times" in
        the module docstring); not with root_key.
      capture_strength: ``k`` of the capture prior ``Beta(m k, (1 - m) k)`` (larger:
        cells stay closer to their capture's rank).
      capture_times: the distinct capture times, set by ``lvmzoo.fit`` (not a flag).
      capture_ranks: their mid-ranks among the cells, set by ``lvmzoo.fit`` (not a flag).
      continuous_covariate_keys: numeric obs columns of technical variation (the
        cells' detection rate, share of mitochondrial counts), each with a per-gene
        linear effect on ``eta`` beside the trend (scvi-tools'
        ``continuous_covariate_keys``; see "Covariates" in the module docstring).
      covariate_centres: their training cells' means, set by ``lvmzoo.fit`` (not a flag).
      covariate_scales: their training cells' sds, set by ``lvmzoo.fit`` (not a flag).
      reference_cells: ``N`` of the reported scale (the cells given to
        ``lvmzoo.fit``), set by it (not a flag).
    """

    n_basis: int = 16

    name: ClassVar[str] = "pseudotime"
    _site_names: ClassVar[tuple[str, ...]] = ("baseline", "amplitude", "lengthscale", "w")

    def __post_init__(self):
        super().__post_init__()
        if self.n_basis < 2:
            raise ValueError(f"n_basis must be >= 2, got {self.n_basis}")

    def _basis(self, t: jax.Array, lengthscale) -> jax.Array:
        """``phi_m(t - 1/2) sqrt(S(s_m))``: ``(..., M)`` for ``t`` ``(...)``."""
        L = DOMAIN_HALF_WIDTH
        sqrt_eig = jnp.arange(1, self.n_basis + 1) * jnp.pi / (2 * L)
        phi = jnp.sin(sqrt_eig * ((t[..., None] - 0.5) + L)) / jnp.sqrt(L)
        # Where exp(-s^2 ell^2 / 2) underflows float32 (s ell above about 13-14: M > 21 at
        # the start lengthscale 0.3, or ell above about 0.4 at M = 16), sqrt(0)'s infinite
        # derivative times the exponential's zero one made the gradient NaN and the fit
        # diverge (n_basis=24: at its first step); such terms (sqrt(S) below e^-40) are set
        # to 0 with a zero gradient.  Elsewhere the values are those of sqrt(S(s_m; ell)).
        exponent = -0.5 * (sqrt_eig * lengthscale) ** 2
        kept = exponent > -SPECTRAL_EXPONENT_FLOOR
        spd = jnp.sqrt(2 * jnp.pi) * lengthscale * jnp.exp(jnp.where(kept, exponent, 0.0))
        return phi * jnp.where(kept, jnp.sqrt(spd), 0.0)

    def _trend_sites(self, n_genes: int) -> dict[str, jax.Array]:
        sites = {
            "baseline": numpyro.param("baseline", jnp.zeros(n_genes)),
            "amplitude": numpyro.param("amplitude", jnp.ones(n_genes),
                                       constraint=constraints.positive),
            "lengthscale": numpyro.param("lengthscale", jnp.asarray(0.3),
                                         constraint=constraints.interval(0.08, 2.0)),
        }
        sites["w"] = numpyro.sample(
            "w", dist.Normal(0.0, 1.0).expand([n_genes, self.n_basis]).to_event(2))
        return sites

    def _trend_start(self, time, residual) -> dict:
        """``w_loc``: the posterior mean of the weights given the start times, by ridge
        regression of the residuals on the basis (amplitude 1, the start lengthscale 0.3,
        a noise sd of 0.5; the prior ``N(0, 1)`` is the ridge)."""
        basis = self._basis(time, 0.3)  # (n, M)
        gram = basis.T @ basis / 0.25 + jnp.eye(self.n_basis)
        return {"w_loc": jnp.linalg.solve(gram, basis.T @ residual / 0.25).T}

    def _guide_sites(self, n_genes: int) -> None:
        shape = (n_genes, self.n_basis)
        loc = numpyro.param("w_loc", lambda key: 0.1 * jax.random.normal(key, shape))
        scale = numpyro.param("w_scale", jnp.full(shape, 0.1), constraint=constraints.positive)
        numpyro.sample("w", dist.Normal(loc, scale).to_event(2))

    def _trend(self, t, sites):
        weights = sites["w"] * sites["amplitude"][..., :, None]  # (..., G, M)
        basis = self._basis(t, sites["lengthscale"])  # (..., B, M)
        return sites["baseline"][..., None, :] + jnp.einsum("...bm,...gm->...bg", basis, weights)

    def _fitted_sites(self, params):
        return {"baseline": params["baseline"], "amplitude": params["amplitude"],
                "lengthscale": params["lengthscale"], "w": params["w_loc"]}

    def _posterior_sites(self, params, key, n_samples):
        noise = jax.random.normal(key, (n_samples,) + params["w_loc"].shape)
        fixed = {k: jnp.broadcast_to(params[k], (n_samples,) + jnp.shape(params[k]))
                 for k in ("baseline", "amplitude", "lengthscale")}
        return {**fixed, "w": params["w_loc"] + params["w_scale"] * noise}


@dataclasses.dataclass(frozen=True)
class SwitchPseudotime(_TimeModel):
    """Switch-like pseudotime (Ouija): each gene switches on or off once along t.

    Attributes:
      n_hidden: width of the encoder's hidden layers.
      n_layers: hidden layers of the encoder (``0``: linear).
      likelihood: ``"gaussian"`` (log-normalised data) or ``"nb"`` (raw counts).
      scale_floor: floor added to the encoder's sd of ``logit t``.
      noise_floor: floor added to each gene's Gaussian noise sd, in the data's
        units (``likelihood="gaussian"`` only; see "Noise floor" in the module
        docstring; 0 turns it off).
      root_key: obs column marking early cells; with root_value.
      root_value: value of root_key of the early (root) cells, pulled to t = 0.
      root_strength: ``b`` of the root cells' ``Beta(1, b)`` prior.
      root_code: the category code of root_value, set by ``lvmzoo.fit``
        (not a flag).
      capture_key: as in :class:`Pseudotime` (capture times as a prior).
      capture_strength: as in :class:`Pseudotime`.
      capture_times: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      capture_ranks: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      continuous_covariate_keys: as in :class:`Pseudotime` (covariates).
      covariate_centres: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      covariate_scales: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      reference_cells: ``N`` of the reported scale, set by ``lvmzoo.fit``
        (not a flag).
      markers: known marker genes (Ouija's priors), each ``"GENE:up"`` or
        ``"GENE:down"`` (it switches on / off along the trajectory), optionally
        with the time of its switch on the reported scale: ``"MYOG:up@0.6"``.
        Names from ``var_names``, or symbols where the data registers them
        (``--gene-symbols``).  They set the direction and start the fit
        ("Marker genes" in the module docstring).
      marker_index: the markers' gene positions, set by ``lvmzoo.fit`` (not a flag).
    """

    markers: tuple[str, ...] = ()
    marker_index: Optional[tuple] = hyperparameter(None, cli=False)

    name: ClassVar[str] = "switch_pseudotime"
    _site_names: ClassVar[tuple[str, ...]] = ("baseline", "switch_amplitude", "switch_slope",
                                              "switch_time")
    max_slope: ClassVar[float] = 50.0

    def __post_init__(self):
        super().__post_init__()
        markers = (self.markers,) if isinstance(self.markers, str) else tuple(self.markers)
        object.__setattr__(self, "markers", markers)
        genes = [parse_marker(text)[0] for text in markers]  # checks each entry
        repeated = sorted({g for g in genes if genes.count(g) > 1})
        if repeated:
            raise ValueError(f"marker gene(s) given twice: {', '.join(repeated)}")
        if self.marker_index is not None:  # a list when read from model.json
            object.__setattr__(self, "marker_index", tuple(int(i) for i in self.marker_index))

    def for_data(self, data) -> "SwitchPseudotime":
        """As :class:`Pseudotime`, and resolves the marker genes to their positions."""
        from lvmzoo.data.registry import DataError

        model = super().for_data(data)
        if not model.markers:
            return model
        index = data.registry.gene_positions([parse_marker(text)[0] for text in model.markers],
                                             what="marker gene")
        if model.marker_index is not None and model.marker_index != index:
            raise DataError("the data's genes are not in the order the markers were fitted "
                            "on; register new cells with lvmzoo.query_anndata")
        return dataclasses.replace(model, marker_index=index)

    def _markers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(positions, directions +-1, times or NaN)`` of the marker genes."""
        if self.marker_index is None:
            raise ValueError(f"{self.name} has markers but was not resolved against the data: "
                             "fit it with lvmzoo.fit, or use model.for_data(data)")
        parsed = [parse_marker(text) for text in self.markers]
        return (np.asarray(self.marker_index, np.int32),
                np.asarray([MARKER_DIRECTIONS[d] for _, d, _ in parsed], np.float32),
                np.asarray([np.nan if t is None else t for _, _, t in parsed], np.float32))

    def _direction_given(self) -> bool:
        return super()._direction_given() or bool(self.markers)

    def _figure_genes(self, data) -> tuple[str, ...]:
        """The marker genes (their var_names), drawn first in ``pseudotime.png``."""
        return tuple(data.registry.gene_names[i] for i in self.marker_index or ())

    def _known_genes_prior(self, sites, reference) -> None:
        """The markers' priors: slope ``~ Normal(+-MARKER_SLOPE, MARKER_SLOPE_SD)`` by
        direction; switch time on the reported scale ``~ Normal(T, MARKER_TIME_SD)`` where
        given (the map to it, the reference, enters without a gradient)."""
        if not self.markers:
            return
        index, direction, time = self._markers()
        slope = sites["switch_slope"][index]
        log_density = dist.Normal(MARKER_SLOPE * direction, MARKER_SLOPE_SD).log_prob(slope).sum()
        timed = np.flatnonzero(~np.isnan(time))
        if timed.size:
            quantiles = jnp.sort(REFERENCE_SPEED * jax.lax.stop_gradient(reference))
            t0 = jnp.clip(sites["switch_time"][index[timed]], 1e-6, 1 - 1e-6)
            reported = to_rank(jnp.log(t0) - jnp.log1p(-t0), quantiles)
            log_density = log_density + dist.Normal(time[timed], MARKER_TIME_SD).log_prob(
                reported).sum()
        numpyro.factor("marker_prior", log_density)

    def _known_genes_start(self, x, key) -> Optional[tuple]:
        """With markers: ``(cells, times)``, at most :data:`START_CELLS` cells and the rank
        of each one's marker score (the mean of its standardised marker values, signed by
        their directions), to which :meth:`_trend_start` fits the trend; the encoder
        starts at random, as with capture times."""
        if not self.markers:
            return None
        index, direction, _ = self._markers()
        cells = np.sort(np.asarray(jax.random.permutation(key, x.shape[0]))[:START_CELLS])
        values = jnp.asarray(x)[cells][:, index]
        standardised = (values - values.mean(0)) / jnp.maximum(values.std(0), 1e-6)
        score = (standardised * direction).mean(1)
        rank = (jnp.argsort(jnp.argsort(score)) + 0.5) / score.size
        return cells, rank.astype(jnp.float32)

    def _trend_sites(self, n_genes: int) -> dict[str, jax.Array]:
        bound = self.max_slope
        return {
            "baseline": numpyro.param("baseline", jnp.zeros(n_genes)),
            "switch_amplitude": numpyro.param("switch_amplitude", jnp.ones(n_genes),
                                              constraint=constraints.positive),
            "switch_slope": numpyro.param(
                "switch_slope", lambda key: 5.0 * jax.random.normal(key, (n_genes,)),
                constraint=constraints.interval(-bound, bound)),
            "switch_time": numpyro.param("switch_time", jnp.full(n_genes, 0.5),
                                         constraint=constraints.interval(0.0, 1.0)),
        }

    def _trend_start(self, time, residual) -> dict:
        """Each gene's switch fitted to the start times: over slopes ``+-START_SLOPE`` and
        switch times on a grid, the one whose least-squares fit of the residuals on
        ``sigmoid(k (t - t0))`` explains most of their variance with an amplitude > 0
        (the baseline then absorbs the fit's intercept)."""
        grid = jnp.linspace(0.1, 0.9, 9)
        slope = jnp.concatenate([jnp.full(9, START_SLOPE), jnp.full(9, -START_SLOPE)])
        switch_time = jnp.concatenate([grid, grid])
        feature = jax.nn.sigmoid(slope * (time[:, None] - switch_time))  # (n, C)
        feature = feature - feature.mean(0)
        centred = residual - residual.mean(0)  # (n, G)
        covariance = feature.T @ centred  # (C, G)
        explained = jnp.where(covariance > 0, covariance**2 / (feature**2).sum(0)[:, None], -1.0)
        best = jnp.argmax(explained, 0)  # (G,)
        amplitude = covariance[best, jnp.arange(best.size)] / (feature**2).sum(0)[best]
        shift = residual.mean(0) - amplitude * jax.nn.sigmoid(
            slope[best] * (time[:, None] - switch_time[best])).mean(0)
        return {"switch_amplitude": jnp.maximum(amplitude, 1e-2), "switch_slope": slope[best],
                "switch_time": switch_time[best], "baseline_shift": shift}

    def _trend(self, t, sites):
        t = t[..., None]
        switch = jax.nn.sigmoid(sites["switch_slope"] * (t - sites["switch_time"]))
        return sites["baseline"] + sites["switch_amplitude"] * switch

    def annotate(self, adata, params, latent, data) -> list[str]:
        """As :class:`Pseudotime`, plus ``var["switch_time"]``, ``var["switch_slope"]`` and
        ``var["switch_amplitude"]`` (``t0_g``, ``k_g``, ``mu_g``)."""
        keys = super().annotate(adata, params, latent, data)
        if self.markers:
            index, direction, _ = self._markers()
            marker = np.full(adata.n_vars, "", dtype=object)
            marker[index] = np.where(direction > 0, "up", "down")
            adata.var["marker"] = marker
            keys.append('var["marker"]')
        for name in ("switch_time", "switch_slope", "switch_amplitude"):
            adata.var[name] = np.asarray(params[name], np.float64)
            keys.append(f'var["{name}"]')
        # the switch time on the reported scale (that of obs["pseudotime"])
        adata.var["switch_time"] = np.asarray(self.reported_time(params, params["switch_time"]),
                                              np.float64)
        return keys


# Guide quantiles of logit t over which a cell's lineage probabilities are averaged.
N_LINEAGE_NODES = 8


@dataclasses.dataclass(frozen=True)
class BranchingPseudotime(Pseudotime):
    """Pseudotime on a branching trajectory: a mixture of lineages that share their root.

    Each cell has a time ``t_c`` (as :class:`Pseudotime`) and a lineage
    ``k_c in {1..K}``, marginalised exactly (a K-component mixture, no
    enumeration needed)::

        k_c ~ Categorical(pi)                                   # pi: point-estimated
        f_gk(t) = beta_g + alpha_g [ sum_m psi_m(t) w_gm         # trunk, shared
                                   + sum_m (psi_m(t) - psi_m(0)) v_gkm ]  # lineage k
        x_cg | t_c, k_c ~ N(f_gk(t_c) + o_bg, sigma_g^2)         # or NB, as Pseudotime

    with ``psi_m`` the HSGP basis of :class:`Pseudotime` and ``w, v ~ N(0, 1)``
    (mean-field Normal guides).  Every lineage's curve starts from the trunk's
    value at ``t = 0`` (the root, where the lineages meet) and departs from it
    smoothly (the shared lengthscale), so ``t = 0`` is where the branches join
    and the direction is no longer arbitrary; which cells the junction takes is,
    without a root (any tip of the tree fits as well: module docstring).  With a
    root, the fit starts the time at each cell's distance from the root cells
    along the data's 15-nearest-neighbour graph and the trunk's curves fitted to
    it (:meth:`_root_start`).  The guide of ``t`` is the same
    amortised encoder; the lineage of a cell is not in the guide: its posterior
    given ``t`` is exact, ``p(k | x, t) ∝ pi_k p(x | f_k(t))``.

    Outputs: as :class:`Pseudotime`, plus ``obs["lineage"]`` (the most probable
    lineage, ``"1"`` .. ``"K"``) and ``obsm["lineage_probability"]`` ``(n, K)``
    (``p(k | x, t)`` averaged over 8 quantiles of the guide of ``t``);
    ``uns["pseudotime_trends"]["mean"]`` (and the band) are ``(K, G, T)``: one
    trend per lineage.

    Attributes:
      n_lineages: ``K``, the number of lineages (fates) the cells may follow; too
        few lays fates end to end within a lineage.
      n_basis: basis functions ``M`` of each HSGP curve (trunk and lineages).
      n_hidden: width of the encoder's hidden layers.
      n_layers: hidden layers of the encoder (``0``: linear).
      likelihood: ``"gaussian"`` (log-normalised data) or ``"nb"`` (raw counts).
      scale_floor: floor added to the encoder's sd of ``logit t``.
      noise_floor: floor added to each gene's Gaussian noise sd, in the data's
        units (``likelihood="gaussian"`` only; see "Noise floor" in the module
        docstring; 0 turns it off).
      root_key: obs column marking the root (early) cells, where the lineages
        meet; with root_value.  Needed: without it the junction lands at any tip
        of the tree (module docstring); with it the time starts at each cell's
        distance from the root cells.
      root_value: value of root_key of the root cells.
      root_strength: ``b`` of the root cells' ``Beta(1, b)`` prior; default 300
        (a few hundred puts the junction at the root cells; :class:`Pseudotime`'s
        10 left the progenitors mid-way on paul15).
      root_code: the category code of root_value, set by ``lvmzoo.fit`` (not a flag).
      capture_key: as in :class:`Pseudotime` (capture times as a prior).
      capture_strength: as in :class:`Pseudotime`.
      capture_times: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      capture_ranks: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      continuous_covariate_keys: as in :class:`Pseudotime` (covariates).
      covariate_centres: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      covariate_scales: as in :class:`Pseudotime` (set by ``lvmzoo.fit``).
      reference_cells: ``N`` of the reported scale, set by ``lvmzoo.fit`` (not a flag).
    """

    n_lineages: int = hyperparameter(2, minimum=2)
    root_strength: float = 300.0

    starts_from_root: ClassVar[bool] = True
    directed_by_genes: ClassVar[bool] = False  # the lineages meet at t = 0, the model's start

    name: ClassVar[str] = "branching_pseudotime"
    _site_names: ClassVar[tuple[str, ...]] = ("baseline", "amplitude", "lengthscale", "w",
                                              "v", "lineage_logits")

    def _trend_sites(self, n_genes: int) -> dict[str, jax.Array]:
        sites = super()._trend_sites(n_genes)
        sites["v"] = numpyro.sample(
            "v", dist.Normal(0.0, 1.0).expand([self.n_lineages, n_genes, self.n_basis])
            .to_event(3))
        sites["lineage_logits"] = numpyro.param("lineage_logits", jnp.zeros(self.n_lineages))
        return sites

    def _guide_sites(self, n_genes: int) -> None:
        super()._guide_sites(n_genes)
        shape = (self.n_lineages, n_genes, self.n_basis)
        loc = numpyro.param("v_loc", lambda key: 0.3 * jax.random.normal(key, shape))
        scale = numpyro.param("v_scale", jnp.full(shape, 0.1), constraint=constraints.positive)
        numpyro.sample("v", dist.Normal(loc, scale).to_event(3))

    def _trend(self, t, sites):
        """``f_gk(t)``: ``(..., B, K, G)`` for times ``(..., B)``."""
        amplitude = sites["amplitude"][..., :, None]  # (..., G, 1)
        basis = self._basis(t, sites["lengthscale"])  # (..., B, M)
        root = self._basis(jnp.zeros(()), sites["lengthscale"])  # (..., M)
        trunk = jnp.einsum("...bm,...gm->...bg", basis, sites["w"] * amplitude)
        branch = jnp.einsum("...bm,...kgm->...bkg", basis - root[..., None, :],
                            sites["v"] * amplitude[..., None, :, :])
        return sites["baseline"][..., None, None, :] + trunk[..., :, None, :] + branch

    def _components(self, trend, offset, noise, batch: Batch) -> dist.Distribution:
        """``p(x_c | t_c, k)`` per lineage: batch shape ``(B, K)``, event the genes."""
        eta = trend + offset[..., :, None, :]
        if self.likelihood == "gaussian":
            return dist.Normal(eta, noise).to_event(1)
        log_library = jnp.log(jnp.maximum(batch.x.sum(-1), 1.0))[:, None, None]
        return COUNT_LIKELIHOODS["nb"].build(eta + log_library, noise, None).to_event(1)

    def _x_distribution(self, trend, offset, noise, batch: Batch) -> dist.Distribution:
        logits = numpyro.param("lineage_logits", jnp.zeros(self.n_lineages))
        mixing = dist.Categorical(logits=jnp.broadcast_to(jax.nn.log_softmax(logits),
                                                          trend.shape[:-1]))
        return dist.MixtureSameFamily(mixing, self._components(trend, offset, noise, batch))

    def _fitted_sites(self, params):
        return {**super()._fitted_sites(params), "v": params["v_loc"],
                "lineage_logits": params["lineage_logits"]}

    def _posterior_sites(self, params, key, n_samples):
        key_w, key_v = jax.random.split(key)
        sites = super()._posterior_sites(params, key_w, n_samples)
        noise = jax.random.normal(key_v, (n_samples,) + params["v_loc"].shape)
        return {**sites, "v": params["v_loc"] + params["v_scale"] * noise}

    def lineage_probability(self, params, batch: Batch) -> jax.Array:
        """``p(k | x_c)`` ``(B, K)``: the exact ``p(k | x_c, t)`` averaged over
        :data:`N_LINEAGE_NODES` quantiles of the guide of ``logit t``."""
        loc, scale = handlers.substitute(self._encode, data=params)(batch)
        levels = (np.arange(N_LINEAGE_NODES) + 0.5) / N_LINEAGE_NODES
        nodes = np.sqrt(2.0) * scipy.special.erfinv(2.0 * levels - 1.0)
        u = loc[None, :] + scale[None, :] * jnp.asarray(nodes, jnp.float32)[:, None]  # (J, B)
        n_genes = batch.x.shape[-1]
        trend = self._trend(jax.nn.sigmoid(u), self._fitted_sites(params))  # (J, B, K, G)
        offset = handlers.substitute(self._batch_offset, data=params)(batch, n_genes)
        noise = self._fitted_noise(params)
        log_lik = self._components(trend, offset, noise, batch).log_prob(batch.x[:, None, :])
        log_post = log_lik + jax.nn.log_softmax(params["lineage_logits"])
        return jnp.mean(jax.nn.softmax(log_post, -1), 0)

    def trends(self, params, grid, key: Optional[jax.Array] = None,
               n_samples: int = 200) -> dict[str, np.ndarray]:
        """As :meth:`Pseudotime.trends`, one per lineage: ``"mean"`` (and the band) are
        ``(K, G, T)``."""
        grid = jnp.asarray(grid, jnp.float32)
        times = self.model_time(params, grid)
        shift = 0.0 if self.likelihood == "gaussian" else math.log(1e4)
        mean = jnp.transpose(self._trend(times, self._fitted_sites(params)), (1, 2, 0)) + shift
        draws = self._posterior_sites(params, key if key is not None else jax.random.PRNGKey(0),
                                      n_samples)
        curves = jax.vmap(lambda s: self._trend(times, s))(draws) + shift  # (S, T, K, G)
        low, high = jnp.quantile(curves, jnp.array([0.025, 0.975]), axis=0)
        return {"grid": np.asarray(grid), "mean": np.asarray(mean),
                "lower": np.asarray(jnp.transpose(low, (1, 2, 0))),
                "upper": np.asarray(jnp.transpose(high, (1, 2, 0)))}

    def align_member_outputs(self, adata, rotation) -> None:
        """Nothing: the lineages meet at ``t = 0``, so the time's direction is the model's
        own (a member that disagrees put the junction elsewhere; reading it backwards would
        not make it agree)."""

    def _annotate_lineages(self, adata, params, data) -> tuple[np.ndarray, list[str]]:
        """``obs["lineage"]`` (the most probable) and ``obsm["lineage_probability"]``."""
        probability = np.concatenate([np.asarray(_lineage_program(self, params, batch))
                                      for batch in EvaluationBatches(data, 1024)])
        probability = probability.astype(np.float64)
        adata.obsm["lineage_probability"] = probability
        labels = [str(k + 1) for k in range(self.n_lineages)]
        adata.obs["lineage"] = pd.Categorical(np.asarray(labels)[probability.argmax(1)],
                                              categories=labels)
        return probability, ['obs["lineage"]', 'obsm["lineage_probability"]']


@functools.partial(jax.jit, static_argnames=("model",))
def _lineage_program(model, params, batch):
    return model.lineage_probability(params, batch)
