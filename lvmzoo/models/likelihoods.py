"""Count likelihoods for models of raw UMI counts, as small composable pieces.

All are NumPyro distributions with a batch shape equal to the broadcast shape
of their arguments (e.g. ``(B, G)``: one count per cell and gene) and an empty
event shape, so a model writes ``likelihood(...).to_event(1)`` for a cell.

* :class:`NegativeBinomial` – mean ``mu`` and inverse dispersion ``theta``:

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

Every log-density is evaluated in log space: ``log(theta / (theta + mu))`` and
``log(mu / (theta + mu))`` through :func:`log_fraction` (no cancellation at any
ratio), ``log Gamma`` differences through ``betaln`` (stable for large counts
and small ``theta``), and the zero-inflation mixture through ``logaddexp``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import betaln
from numpyro.distributions import constraints

# A ratio that underflowed to 0 would give log 0 = -inf and 0 * -inf = NaN for
# a zero count; the smallest normal float32 changes no representable result.
_TINY = float(jnp.finfo(jnp.float32).tiny)


def log_fraction(a: jax.Array, b: jax.Array) -> jax.Array:
    """``log(a / (a + b))`` for ``a, b > 0``, elementwise, accurate at any ratio.

    With ``r = min(a, b) / max(a, b)`` in ``(0, 1]``: ``-log1p(r)`` when
    ``a >= b``, else ``log r - log1p(r)``.  Differencing ``log a - log(a + b)``
    instead loses all digits when ``b << a`` (e.g. ``theta << mu`` with a large
    count multiplying the result).
    """
    r = jnp.maximum(jnp.minimum(a, b) / jnp.maximum(a, b), _TINY)
    return jnp.where(a >= b, 0.0, jnp.log(r)) - jnp.log1p(r)


def log_binomial_coefficient(x: jax.Array, theta: jax.Array) -> jax.Array:
    """``log Gamma(x + theta) - log Gamma(theta) - log Gamma(x + 1)``, elementwise.

    Written as ``-log B(theta, x) - log x`` for ``x >= 1`` and exactly ``0`` for
    ``x = 0``: ``betaln`` avoids the cancellation of two large ``log Gamma``
    values when ``x`` is large, and the zero case (most entries of a count
    matrix) carries no rounding error at all.
    """
    x_pos = jnp.maximum(x, 1.0)  # keeps the unused branch (and its gradient) finite
    return jnp.where(x > 0, -betaln(theta, x_pos) - jnp.log(x_pos), 0.0)


def negative_binomial_log_prob(x, mean, inverse_dispersion) -> jax.Array:
    """Elementwise NB log-pmf of counts ``x`` (see the module docstring)."""
    return (
        log_binomial_coefficient(x, inverse_dispersion)
        + inverse_dispersion * log_fraction(inverse_dispersion, mean)
        + x * log_fraction(mean, inverse_dispersion)
    )


class NegativeBinomial(dist.Distribution):
    """Negative binomial with mean ``mean`` and inverse dispersion ``inverse_dispersion``.

    Args:
      mean: ``mu > 0``, any shape.
      inverse_dispersion: ``theta > 0`` (the NB "size" / "total count");
        variance is ``mu + mu^2 / theta``.  Broadcast against ``mean``.
    """

    arg_constraints = {"mean": constraints.positive, "inverse_dispersion": constraints.positive}
    support = constraints.nonnegative_integer
    pytree_data_fields = ("mean_", "inverse_dispersion")

    def __init__(self, mean, inverse_dispersion, *, validate_args=None):
        batch_shape = jax.lax.broadcast_shapes(jnp.shape(mean), jnp.shape(inverse_dispersion))
        self.mean_ = jnp.broadcast_to(mean, batch_shape)
        self.inverse_dispersion = jnp.broadcast_to(inverse_dispersion, batch_shape)
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @property
    def mean(self):
        return self.mean_

    @property
    def variance(self):
        return self.mean_ + self.mean_**2 / self.inverse_dispersion

    def sample(self, key, sample_shape=()):
        # Gamma–Poisson mixture: rate ~ Gamma(theta, theta / mu), x ~ Poisson(rate).
        key_gamma, key_poisson = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        rate = jax.random.gamma(key_gamma, self.inverse_dispersion, shape) * (
            self.mean_ / self.inverse_dispersion
        )
        return jax.random.poisson(key_poisson, rate, shape)

    def log_prob(self, value):
        return negative_binomial_log_prob(value, self.mean_, self.inverse_dispersion)


class ZeroInflatedNegativeBinomial(dist.Distribution):
    """NB with extra zeros: a structural zero with probability ``sigmoid(dropout_logits)``.

    Args:
      mean, inverse_dispersion: of the negative-binomial component.
      dropout_logits: logit of the structural-zero probability ``pi``.
    """

    arg_constraints = {
        "mean": constraints.positive,
        "inverse_dispersion": constraints.positive,
        "dropout_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    pytree_data_fields = ("mean_", "inverse_dispersion", "dropout_logits")

    def __init__(self, mean, inverse_dispersion, dropout_logits, *, validate_args=None):
        batch_shape = jax.lax.broadcast_shapes(
            jnp.shape(mean), jnp.shape(inverse_dispersion), jnp.shape(dropout_logits)
        )
        self.mean_ = jnp.broadcast_to(mean, batch_shape)
        self.inverse_dispersion = jnp.broadcast_to(inverse_dispersion, batch_shape)
        self.dropout_logits = jnp.broadcast_to(dropout_logits, batch_shape)
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    @property
    def base(self) -> NegativeBinomial:
        """The negative-binomial component."""
        return NegativeBinomial(self.mean_, self.inverse_dispersion)

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
        # log pi and log(1 - pi) from the logits, without forming pi itself.
        log_dropout = -jax.nn.softplus(-self.dropout_logits)
        log_kept = -jax.nn.softplus(self.dropout_logits)
        log_nb = self.base.log_prob(value)
        return jnp.where(
            value == 0, jnp.logaddexp(log_dropout, log_kept + log_nb), log_kept + log_nb
        )


class CountLikelihood(NamedTuple):
    """A count likelihood and the decoder outputs it needs.

    Attributes:
      needs_dispersion: uses an inverse dispersion ``theta``.
      needs_dropout: uses zero-inflation logits (a decoder head).
      build: ``(mean, inverse_dispersion, dropout_logits) -> Distribution``;
        arguments a likelihood does not need are ``None``.
    """

    needs_dispersion: bool
    needs_dropout: bool
    build: Callable[[jax.Array, Optional[jax.Array], Optional[jax.Array]], dist.Distribution]


COUNT_LIKELIHOODS: dict[str, CountLikelihood] = {
    "nb": CountLikelihood(True, False, lambda mu, theta, _: NegativeBinomial(mu, theta)),
    "zinb": CountLikelihood(True, True, ZeroInflatedNegativeBinomial),
    "poisson": CountLikelihood(False, False, lambda mu, _, __: dist.Poisson(mu)),
}
