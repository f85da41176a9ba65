"""Count likelihoods for models of raw UMI counts, as small composable pieces.

All are NumPyro distributions with a batch shape equal to the broadcast shape
of their arguments (e.g. ``(B, G)``: one count per cell and gene) and an empty
event shape, so a model writes ``likelihood(...).to_event(1)`` for a cell.

* :class:`NegativeBinomial` – mean ``mu`` (or its log) and inverse dispersion
  ``theta``:

  .. math::

     \\log p(x) = \\log\\Gamma(x + \\theta) - \\log\\Gamma(\\theta) - \\log\\Gamma(x + 1)
       + \\theta \\log\\frac{\\theta}{\\theta + \\mu} + x \\log\\frac{\\mu}{\\theta + \\mu},

  mean ``mu`` and variance ``mu + mu^2 / theta`` (scipy's ``nbinom`` with
  ``n = theta``, ``p = theta / (theta + mu)``).
* :class:`ZeroInflatedNegativeBinomial` – with probability
  ``pi = sigmoid(dropout_logits)`` the count is a structural zero, otherwise
  negative binomial: ``p(0) = pi + (1 - pi) NB(0)``, ``p(x) = (1 - pi) NB(x)``.
* Poisson with rate ``mu`` (NumPyro's own ``Poisson``).

:data:`COUNT_LIKELIHOODS` maps a name to a :class:`CountLikelihood`, which says
which decoder outputs the likelihood needs (so a model computes no unused
heads) and builds the distribution from them.

Accuracy and cost.  A model evaluates these on every count of every minibatch,
so each term is written to be both stable in float32 and cheap:

* with ``d = log mu - log theta`` the two fractions are
  ``log(theta / (theta + mu)) = -softplus(d)`` and
  ``log(mu / (theta + mu)) = -softplus(-d)``, which share one
  ``log1p(exp(-|d|))`` — one ``exp`` and one ``log1p`` per count, and no
  cancellation at any ratio (models pass ``log mu`` directly, so a tiny mean
  never underflows);
* the log binomial coefficient is exactly ``0`` for ``x = 0`` (most entries of
  a count matrix); otherwise it is Stirling's form with its large terms
  combined analytically into ``log1p`` s, plus the Stirling remainders
  (:func:`stirling_remainder`), so neither large counts with small ``theta``
  nor large ``theta`` with small counts cancel catastrophically.  This is as
  accurate as ``-betaln(theta, x) - log x`` and about 8× cheaper with its
  gradient (``betaln`` evaluates several series on every element);
* the zero-inflation mixture goes through ``logaddexp``;
* gradients are analytic (a ``jax.custom_jvp`` on the elementwise log-pmf):
  the partial derivatives reuse the forward pass's exponentials and
  logarithms, and the derivative of the log binomial coefficient,
  ``psi(x + theta) - psi(theta)``, comes from the same Stirling split
  (:func:`digamma_remainder`).  Automatic differentiation of the expressions
  above cost more (measured on 2 CPU cores, value and gradient on a
  128 × 2,000 minibatch: ZINB 8.4 → 3.9 ms, NB 4.8 → 3.7 ms; a scVI epoch of
  10,000 × 2,000 counts: ZINB 1.06 → 0.75 s, NB 0.65 → 0.56 s); forward mode
  (Hessians) still works, through the derivative rule.
* sparse counts (``sparse=True``; the default is :data:`SPARSE_LOG_PMF`):
  the log binomial coefficient and its derivative, most of the per-count
  work, are ``0`` at ``x = 0``, so they can be evaluated on the nonzero
  counts only, compacted into a buffer of static size (a quarter of the
  counts; a block with more nonzeros takes the dense form) and scattered
  back.  The values are the same expressions on the same numbers.  It does
  not pay in a model: a scVI epoch took 1.00× (2,000 genes, 78 % zeros) to
  1.12× (10,000 genes, 93 % zeros) the dense path's CPU time
  (``benchmarks/bench_sparse_likelihood.py``), so it is off by default.  The
  log-pmf's value and gradient alone are slower too: finding the nonzeros of
  a dense minibatch (a prefix count and a scatter over every count) costs
  more than the coefficient saves.  Given the nonzeros' coordinates instead
  (which a CSR source has when it densifies a minibatch), the same
  evaluation was 1.5× (2,000 genes) to 2.8× (10,000 genes) faster than dense
  in that benchmark's log-pmf-only rows: the route worth taking next.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

_HALF_LOG_2PI = 0.5 * float(np.log(2.0 * np.pi))
# Below this the remainder series is shifted up by recurrence (see stirling_remainder).
_SHIFT = 6.0


def _stirling_main(z: jax.Array) -> jax.Array:
    """``(z - 1/2) log z - z + log(2 pi) / 2``: Stirling's approximation of ``log Gamma(z)``."""
    return (z - 0.5) * jnp.log(z) - z + _HALF_LOG_2PI


def stirling_remainder(z: jax.Array) -> jax.Array:
    """``log Gamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2]`` for ``z > 0``, elementwise.

    For ``z >= 6`` the asymptotic series ``1/(12 z) - 1/(360 z^3) + 1/(1260 z^5)
    - 1/(1680 z^7)`` (error below ``1e-9``); smaller ``z`` is shifted up by the
    recurrence ``log Gamma(z) = log Gamma(z + 6) - log(z (z + 1) ... (z + 5))``.
    The remainder is small (``< 4`` even for ``z = 1e-3``), so adding it to
    large terms loses nothing.
    """
    small = z < _SHIFT
    shifted = jnp.where(small, z + _SHIFT, z)
    inv = 1.0 / shifted
    inv2 = inv * inv
    series = inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))
    z_small = jnp.where(small, z, 1.0)  # keeps the unused branch finite
    rising = z_small * (z_small + 1) * (z_small + 2) * (z_small + 3) * (z_small + 4) * (z_small + 5)
    from_shift = series + _stirling_main(shifted) - _stirling_main(z_small) - jnp.log(rising)
    return jnp.where(small, from_shift, series)


def digamma_remainder(z: jax.Array) -> jax.Array:
    """``psi(z) - [log z - 1/(2 z)]`` for ``z > 0``: the derivative of :func:`stirling_remainder`.

    For ``z >= 6`` the asymptotic series ``-1/(12 z^2) + 1/(120 z^4) - 1/(252 z^6)
    + 1/(240 z^8)`` (error below ``1e-10``); smaller ``z`` is shifted up by the
    recurrence ``psi(z) = psi(z + 6) - sum_{k<6} 1/(z + k)``.
    """
    small = z < _SHIFT
    shifted = jnp.where(small, z + _SHIFT, z)
    inv = 1.0 / shifted
    inv2 = inv * inv
    series = -inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 / 240)))
    z_small = jnp.where(small, z, 1.0)  # keeps the unused branch finite
    harmonic = (1 / z_small + 1 / (z_small + 1) + 1 / (z_small + 2) + 1 / (z_small + 3)
                + 1 / (z_small + 4) + 1 / (z_small + 5))
    from_shift = series + jnp.log1p(_SHIFT / z_small) - 0.5 / shifted + 0.5 / z_small - harmonic
    return jnp.where(small, from_shift, series)


def _log_binomial_coefficient_terms(x, theta):
    """:func:`log_binomial_coefficient` and its derivative ``psi(x + theta) - psi(theta)``.

    The derivative comes from the same Stirling split: the main terms give
    ``log1p(x / theta) + x / (2 theta (theta + x))``, the remainders
    :func:`digamma_remainder` ``(x + theta) - (theta)``; both are ``0`` at ``x = 0``.
    """
    positive = x > 0
    x_pos = jnp.maximum(x, 1.0)  # keeps the unused branch (and its derivative) finite
    log1p_ratio = jnp.log1p(x_pos / theta)
    main = (
        (x_pos + 0.5) * jnp.log1p((theta - 1.0) / (x_pos + 1.0))
        + (theta - 1.0) * log1p_ratio
        - 0.5 * jnp.log(theta)
        + (1.0 - _HALF_LOG_2PI)
    )
    remainders = (
        stirling_remainder(x_pos + theta) - stirling_remainder(theta) - stirling_remainder(x_pos + 1.0)
    )
    derivative = (log1p_ratio + 0.5 * x_pos / (theta * (theta + x_pos))
                  + digamma_remainder(x_pos + theta) - digamma_remainder(theta))
    return jnp.where(positive, main + remainders, 0.0), jnp.where(positive, derivative, 0.0)


def log_binomial_coefficient(x: jax.Array, theta: jax.Array) -> jax.Array:
    """``log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1)``, elementwise.

    Exactly ``0`` for ``x = 0``.  Otherwise, writing each ``log Gamma`` as
    Stirling's main term plus :func:`stirling_remainder` ``R``, the main terms
    combine into::

        (x + 1/2) log1p((theta - 1) / (x + 1)) + (theta - 1) log1p(x / theta)
          - log(theta) / 2 + 1 - log(2 pi) / 2

    whose pieces are each of the size of the result, then
    ``+ R(x + theta) - R(theta) - R(x + 1)``.
    """
    return _log_binomial_coefficient_terms(x, theta)[0]


# ---------------------------------------------------------------------------
# The log binomial coefficient on the nonzero counts only
# ---------------------------------------------------------------------------

#: Whether the NB / ZINB log-pmfs evaluate their log binomial coefficient on the
#: nonzero counts only (read when a program is traced; ``sparse=`` overrides it).
#: Off: measured slower in a scVI epoch (see the module docstring).
SPARSE_LOG_PMF = False
# Below this many counts the dense form is used (the compaction costs more).
_SPARSE_MIN_ENTRIES = 16_384
# Static capacity of the compacted nonzeros, as a share of the counts; a block
# of counts with more nonzeros takes the dense form (one branch runs).
_SPARSE_CAPACITY = 0.25
_SCAN_BLOCK = 32


def _use_sparse(sparse, x, *parameters) -> bool:
    """The ``sparse`` argument, or the default: :data:`SPARSE_LOG_PMF` and enough counts."""
    if sparse is not None:
        return bool(sparse)
    size = int(np.prod(jax.lax.broadcast_shapes(jnp.shape(x), *map(jnp.shape, parameters))))
    return SPARSE_LOG_PMF and size >= _SPARSE_MIN_ENTRIES


def _nonzero_positions(flat: jax.Array, capacity: int) -> jax.Array:
    """Positions of the first ``capacity`` nonzeros of ``flat`` in order, then ``flat.size``.

    The running count of nonzeros is two products with a ``32 x 32``
    triangular matrix (within blocks of 32, then of 1,024; exact in float32)
    and a cumulative sum over the blocks of 1,024 (int32): on CPU several
    times cheaper than ``jnp.cumsum`` or ``jnp.nonzero`` of the whole array.
    Each nonzero then scatters its position to its rank.
    """
    n = flat.shape[0]
    b = _SCAN_BLOCK
    mask = jnp.pad(flat != 0, (0, (-n) % (b * b))).astype(jnp.float32).reshape(-1, b)
    upper = jnp.triu(jnp.ones((b, b), jnp.float32))
    within = mask @ upper  # inclusive count inside each block of 32
    block_totals = within[:, -1].reshape(-1, b)
    within_super = block_totals @ upper  # inclusive count of blocks inside each block of 1,024
    super_totals = within_super[:, -1].astype(jnp.int32)
    super_offsets = jnp.cumsum(super_totals) - super_totals
    block_offsets = ((within_super - block_totals).astype(jnp.int32)
                     + super_offsets[:, None]).reshape(-1)
    rank = (within.astype(jnp.int32) + block_offsets[:, None]).reshape(-1)[:n] - 1
    # Zeros (and any overflow) target index ``capacity``, out of bounds, and are
    # dropped: the elements actually written are distinct (``unique_indices``).
    target = jnp.where(flat != 0, rank, capacity)
    return jnp.full((capacity,), n, jnp.int32).at[target].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)


def _gather_broadcast(a: jax.Array, shape: tuple[int, ...], flat_index: jax.Array) -> jax.Array:
    """``broadcast_to(a, shape).reshape(-1)[flat_index]`` without materialising the broadcast."""
    a = jnp.asarray(a)
    a = a.reshape((1,) * (len(shape) - a.ndim) + a.shape)
    if a.size == 1:
        return jnp.broadcast_to(a.reshape(()), flat_index.shape)
    coordinates = jnp.unravel_index(flat_index, shape)
    return a[tuple(c if size != 1 else 0 for c, size in zip(coordinates, a.shape))]


def _sparse_log_binomial_coefficient_terms(x, theta, shape):
    """:func:`_log_binomial_coefficient_terms` of ``x`` and ``theta`` broadcast to ``shape``,
    evaluated on the nonzero counts only.

    Both are exactly ``0`` at ``x = 0`` (most counts), so the nonzeros are
    compacted (:func:`_nonzero_positions`, a static capacity of
    :data:`_SPARSE_CAPACITY` of the counts), the terms evaluated there with the
    same expressions and scattered back into zeros.  A block with more
    nonzeros than the capacity takes the dense form (``lax.cond``: one branch
    runs; under ``vmap`` with a per-member block both do).
    """
    n = int(np.prod(shape))
    capacity = min(n, -(-int(n * _SPARSE_CAPACITY) // 1024) * 1024)
    counts = jnp.broadcast_to(x, shape).reshape(-1)

    def compacted(counts, theta):
        index = _nonzero_positions(counts, capacity)
        valid = index < n
        safe = jnp.where(valid, index, 0)
        x_nz = jnp.where(valid, counts[safe], 0.0)  # padding: x = 0, terms exactly 0
        theta_nz = _gather_broadcast(theta, shape, safe)
        value, derivative = _log_binomial_coefficient_terms(x_nz, theta_nz)
        zeros = jnp.zeros(n, value.dtype)
        scatter = lambda v: zeros.at[index].set(v, mode="drop", unique_indices=True)  # noqa: E731
        return scatter(value).reshape(shape), scatter(derivative).reshape(shape)

    def dense(counts, theta):
        value, derivative = _log_binomial_coefficient_terms(counts.reshape(shape), theta)
        return jnp.broadcast_to(value, shape), jnp.broadcast_to(derivative, shape)

    nonzeros = jnp.count_nonzero(counts)
    return jax.lax.cond(nonzeros <= capacity, compacted, dense, counts, theta)


def _log1p_exp_and_sigmoids(a):
    """``log1p(exp(-|a|))``, ``sigmoid(a)`` and ``sigmoid(-a)`` from one ``exp``, stable at any ``a``.

    ``softplus(a) = max(a, 0) + log1p(exp(-|a|))`` and ``softplus(-a) =
    max(-a, 0) + log1p(exp(-|a|))``; neither sigmoid cancels.
    """
    e = jnp.exp(-jnp.abs(a))
    inv = 1.0 / (1.0 + e)
    positive = a >= 0
    return jnp.log1p(e), jnp.where(positive, inv, e * inv), jnp.where(positive, e * inv, inv)


def _negative_binomial_terms(x, log_mean, theta, sparse=False):
    """The NB log-pmf and its partial derivatives in ``log mu`` and ``theta``, elementwise.

    With ``d = log mu - log theta``, ``s = sigmoid(d) = mu / (theta + mu)``::

        d/d log mu = x (1 - s) - theta s
        d/d theta  = psi(x + theta) - psi(theta) - softplus(d) + s - x (1 - s) / theta

    ``sparse``: the log binomial coefficient on the nonzero counts only
    (:func:`_sparse_log_binomial_coefficient_terms`); the same values.
    """
    if sparse:
        shape = jax.lax.broadcast_shapes(jnp.shape(x), jnp.shape(log_mean), jnp.shape(theta))
        lbc, lbc_theta = _sparse_log_binomial_coefficient_terms(x, theta, shape)
    else:
        lbc, lbc_theta = _log_binomial_coefficient_terms(x, theta)
    d = log_mean - jnp.log(theta)
    # mean_share = mu / (theta + mu), theta_share = theta / (theta + mu)
    shared, mean_share, theta_share = _log1p_exp_and_sigmoids(d)
    softplus_d = jnp.maximum(d, 0.0) + shared
    value = lbc - x * (jnp.maximum(-d, 0.0) + shared) - theta * softplus_d
    d_log_mean = x * theta_share - theta * mean_share
    d_theta = lbc_theta - softplus_d + mean_share - x * theta_share / theta
    return value, d_log_mean, d_theta


def negative_binomial_log_prob(x, log_mean, inverse_dispersion, *, sparse=None) -> jax.Array:
    """Elementwise NB log-pmf of counts ``x`` given ``log mu`` and ``theta`` (see the module docstring).

    Differentiable in ``log_mean`` and ``inverse_dispersion`` by its analytic
    derivatives (a custom JVP); the counts are data (no derivative in ``x``).
    ``sparse``: evaluate the log binomial coefficient on the nonzero counts
    only (see :data:`SPARSE_LOG_PMF`, the default); the values are the same.
    """
    return _negative_binomial_log_prob(x, log_mean, inverse_dispersion,
                                       _use_sparse(sparse, x, log_mean, inverse_dispersion))


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _negative_binomial_log_prob(x, log_mean, inverse_dispersion, sparse):
    return _negative_binomial_terms(x, log_mean, inverse_dispersion, sparse)[0]


@_negative_binomial_log_prob.defjvp
def _negative_binomial_jvp(sparse, primals, tangents):
    x, log_mean, theta = primals
    _, log_mean_dot, theta_dot = tangents
    value, d_log_mean, d_theta = _negative_binomial_terms(x, log_mean, theta, sparse)
    return value, d_log_mean * log_mean_dot + d_theta * theta_dot


def _zero_inflated_terms(x, log_mean, theta, dropout_logits, sparse=False):
    """The ZINB log-pmf and its partial derivatives in ``log mu``, ``theta`` and the logits.

    With ``l`` the logit of ``pi``: ``log(1 - pi) = -softplus(l)``, and at
    ``x = 0`` the mixture ``log(pi + (1 - pi) NB(0)) = -softplus(l) +
    logaddexp(l, log NB(0))``.  ``w = sigmoid(l - log NB(0))`` is the posterior
    probability of a structural zero (``0`` for ``x > 0``): the NB terms'
    derivatives are weighted by ``1 - w`` and ``d/dl = w - sigmoid(l)``.
    """
    nb, d_log_mean, d_theta = _negative_binomial_terms(x, log_mean, theta, sparse)
    zero = x == 0
    shared_l, dropout, _ = _log1p_exp_and_sigmoids(dropout_logits)  # dropout = pi
    softplus_l = jnp.maximum(dropout_logits, 0.0) + shared_l
    gap = dropout_logits - nb
    shared_gap, posterior_zero, _ = _log1p_exp_and_sigmoids(gap)
    mixture = jnp.maximum(dropout_logits, nb) + shared_gap  # logaddexp(l, log NB(0))
    structural = jnp.where(zero, posterior_zero, 0.0)
    value = jnp.where(zero, mixture, nb) - softplus_l
    kept = 1.0 - structural
    return value, kept * d_log_mean, kept * d_theta, structural - dropout


def zero_inflated_negative_binomial_log_prob(x, log_mean, inverse_dispersion, dropout_logits,
                                             *, sparse=None):
    """Elementwise ZINB log-pmf (see :class:`ZeroInflatedNegativeBinomial`), analytic derivatives.

    ``sparse`` as in :func:`negative_binomial_log_prob`.
    """
    return _zero_inflated_negative_binomial_log_prob(
        x, log_mean, inverse_dispersion, dropout_logits,
        _use_sparse(sparse, x, log_mean, inverse_dispersion, dropout_logits))


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _zero_inflated_negative_binomial_log_prob(x, log_mean, inverse_dispersion, dropout_logits,
                                              sparse):
    return _zero_inflated_terms(x, log_mean, inverse_dispersion, dropout_logits, sparse)[0]


@_zero_inflated_negative_binomial_log_prob.defjvp
def _zero_inflated_jvp(sparse, primals, tangents):
    x, log_mean, theta, dropout_logits = primals
    _, log_mean_dot, theta_dot, logits_dot = tangents
    value, d_log_mean, d_theta, d_logits = _zero_inflated_terms(
        x, log_mean, theta, dropout_logits, sparse)
    return value, d_log_mean * log_mean_dot + d_theta * theta_dot + d_logits * logits_dot


class NegativeBinomial(dist.Distribution):
    """Negative binomial with mean ``mean`` and inverse dispersion ``inverse_dispersion``.

    Args:
      mean: ``mu > 0``, any shape; or give ``log_mean`` instead (what a
        decoder produces: it never underflows, and the log-pmf needs only it).
      inverse_dispersion: ``theta > 0`` (the NB "size" / "total count");
        variance is ``mu + mu^2 / theta``.  Broadcast against the mean; it is
        kept at its own shape (e.g. ``(G,)`` per gene), so terms that depend
        on ``theta`` alone are computed once per gene, not per count.
      log_mean: ``log mu``, instead of ``mean``.
    """

    arg_constraints = {"log_mean": constraints.real, "inverse_dispersion": constraints.positive}
    support = constraints.nonnegative_integer
    pytree_data_fields = ("log_mean", "inverse_dispersion")

    def __init__(self, mean=None, inverse_dispersion=None, *, log_mean=None, validate_args=None):
        if (mean is None) == (log_mean is None) or inverse_dispersion is None:
            raise ValueError("give inverse_dispersion and exactly one of mean and log_mean")
        self.log_mean = jnp.log(mean) if log_mean is None else log_mean
        self.inverse_dispersion = inverse_dispersion
        batch_shape = jax.lax.broadcast_shapes(
            jnp.shape(self.log_mean), jnp.shape(inverse_dispersion))
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @property
    def mean(self):
        return jnp.broadcast_to(jnp.exp(self.log_mean), self.batch_shape)

    @property
    def variance(self):
        return self.mean + self.mean**2 / self.inverse_dispersion

    def sample(self, key, sample_shape=()):
        # Gamma–Poisson mixture: rate ~ Gamma(theta, theta / mu), x ~ Poisson(rate).
        key_gamma, key_poisson = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        theta = jnp.broadcast_to(self.inverse_dispersion, self.batch_shape)
        rate = jax.random.gamma(key_gamma, theta, shape) * (self.mean / theta)
        return jax.random.poisson(key_poisson, rate, shape)

    def log_prob(self, value):
        return negative_binomial_log_prob(value, self.log_mean, self.inverse_dispersion)


class ZeroInflatedNegativeBinomial(dist.Distribution):
    """NB with extra zeros: a structural zero with probability ``sigmoid(dropout_logits)``.

    Args:
      mean, inverse_dispersion, log_mean: of the negative-binomial component
        (see :class:`NegativeBinomial`).
      dropout_logits: logit of the structural-zero probability ``pi``.
    """

    arg_constraints = {
        "log_mean": constraints.real,
        "inverse_dispersion": constraints.positive,
        "dropout_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    pytree_data_fields = ("log_mean", "inverse_dispersion", "dropout_logits")

    def __init__(self, mean=None, inverse_dispersion=None, dropout_logits=None, *,
                 log_mean=None, validate_args=None):
        if dropout_logits is None:
            raise ValueError("give dropout_logits")
        base = NegativeBinomial(mean, inverse_dispersion, log_mean=log_mean)
        self.log_mean, self.inverse_dispersion = base.log_mean, inverse_dispersion
        self.dropout_logits = dropout_logits
        batch_shape = jax.lax.broadcast_shapes(base.batch_shape, jnp.shape(dropout_logits))
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @property
    def base(self) -> NegativeBinomial:
        """The negative-binomial component, with this distribution's batch shape."""
        return NegativeBinomial(inverse_dispersion=self.inverse_dispersion,
                                log_mean=jnp.broadcast_to(self.log_mean, self.batch_shape))

    @property
    def mean(self):
        return jax.nn.sigmoid(-self.dropout_logits) * self.base.mean

    def sample(self, key, sample_shape=()):
        key_base, key_zero = jax.random.split(key)
        counts = self.base.sample(key_base, sample_shape)
        zero = jax.random.bernoulli(
            key_zero, jax.nn.sigmoid(self.dropout_logits), sample_shape + self.batch_shape
        )
        return jnp.where(zero, 0.0, counts)

    def log_prob(self, value):
        return zero_inflated_negative_binomial_log_prob(
            value, self.log_mean, self.inverse_dispersion, self.dropout_logits)


class CountLikelihood(NamedTuple):
    """A count likelihood and the decoder outputs it needs.

    Attributes:
      needs_dispersion: uses an inverse dispersion ``theta``.
      needs_dropout: uses zero-inflation logits (a decoder head).
      build: ``(log_mean, inverse_dispersion, dropout_logits) -> Distribution``;
        arguments a likelihood does not need are ``None``.
    """

    needs_dispersion: bool
    needs_dropout: bool
    build: Callable[[jax.Array, Optional[jax.Array], Optional[jax.Array]], dist.Distribution]


def _negative_binomial(log_mean, inverse_dispersion, _):
    return NegativeBinomial(inverse_dispersion=inverse_dispersion, log_mean=log_mean)


def _zero_inflated(log_mean, inverse_dispersion, dropout_logits):
    return ZeroInflatedNegativeBinomial(
        inverse_dispersion=inverse_dispersion, dropout_logits=dropout_logits, log_mean=log_mean)


def _poisson(log_mean, _, __):
    return dist.Poisson(jnp.exp(log_mean))


COUNT_LIKELIHOODS: dict[str, CountLikelihood] = {
    "nb": CountLikelihood(True, False, _negative_binomial),
    "zinb": CountLikelihood(True, True, _zero_inflated),
    "poisson": CountLikelihood(False, False, _poisson),
}
