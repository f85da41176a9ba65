"""Flax Linen building blocks shared by the zoo's neural models.

Every neural model (VAE, scVI, ...) is built from two pieces:

* :class:`MLP` – a stack of ``Dense -> [BatchNorm | LayerNorm] -> activation ->
  Dropout`` layers, with an optional linear output layer and an optional
  covariate (e.g. a one-hot batch code) concatenated to the input;
* :class:`GaussianEncoder` – an MLP body with two heads giving the mean and the
  (positive) standard deviation of a diagonal Gaussian, ``q(z | x)``.

Every ``__call__`` takes ``training``: ``True`` turns dropout on (the caller
must then pass ``rngs={"dropout": key}``) and makes batch norm use, and
update, minibatch statistics; ``False`` (evaluation) makes both deterministic.
``freeze_batch_norm=True`` makes batch norm use (and keep) its running
statistics while training too, as when a reference model is fine-tuned on a
query (:func:`lvmzoo.analysis.query.map_query`).
Inside a NumPyro program wrap the modules with
``numpyro.contrib.module.flax_module`` (see :mod:`lvmzoo.models.vae`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Floor on the encoder's standard deviation: keeps log q(z | x) finite when the
# network drives the pre-activation very negative.
MIN_SCALE = 1e-4
# torch's BatchNorm1d(momentum=0.01, eps=1e-3), as scvi-tools uses (Flax's momentum is 1 - torch's).
BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3
# torch.nn.Linear's weight initialisation, as scvi-tools' networks start: uniform with
# variance 1 / (3 fan_in). Flax's default (LeCun normal, variance 1 / fan_in) is 1.7 times
# larger, and behind batch norm larger weights learn more slowly (the output does not
# depend on their scale, so each Adam step turns them by less): scVI's decoder then
# under-learned batch effects and its latent kept them (batch mixing 0.04 vs 0.48 with
# this init, scvi-tools 0.47; 4,000 simulated cells, 3 batches, 40 epochs).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def Dense(features: int, **kwargs) -> nn.Dense:
    """``flax.linen.Dense`` with torch's weight initialisation (:data:`TORCH_LINEAR_INIT`)."""
    return nn.Dense(features, kernel_init=TORCH_LINEAR_INIT, **kwargs)


def _with_covariate(x: jax.Array, covariate: Optional[jax.Array]) -> jax.Array:
    """``[x, covariate]`` along features; ``x`` is ``(..., D)``, ``covariate`` ``(..., C)``."""
    if covariate is None:
        return x
    covariate = jnp.broadcast_to(covariate, x.shape[:-1] + covariate.shape[-1:])
    return jnp.concatenate([x, covariate.astype(x.dtype)], axis=-1)


class MLP(nn.Module):
    """Fully connected network ``(..., D [+ C]) -> (..., n_out or hidden[-1])``.

    Attributes:
      hidden: width of each hidden layer, e.g. ``(128,)`` or ``(256, 128)``;
        ``()`` makes the network a single linear map (``n_out`` required).
      n_out: size of a final linear layer (no activation); ``None`` returns the
        last hidden layer, for callers that add their own heads.
      dropout_rate: dropout probability after each hidden layer (training only).
      batch_norm: batch-normalise each hidden layer before the activation; the
        running statistics live in the ``"batch_stats"`` collection, so wrap
        with ``flax_module(..., mutable=["batch_stats"])``.
      freeze_batch_norm: normalise with the running statistics even while
        training, leaving them unchanged.
      layer_norm: layer-normalise each hidden layer before the activation.
      activation: elementwise non-linearity of the hidden layers.
    """

    hidden: Sequence[int] = (128,)
    n_out: Optional[int] = None
    dropout_rate: float = 0.0
    batch_norm: bool = False
    freeze_batch_norm: bool = False
    layer_norm: bool = False
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(
        self, x: jax.Array, covariate: Optional[jax.Array] = None, training: bool = False
    ) -> jax.Array:
        """Apply the network.

        Args:
          x: ``(..., D)`` inputs.
          covariate: optional ``(..., C)`` extra inputs (e.g. ``jax.nn.one_hot``
            of batch codes), concatenated to ``x`` at the first layer.
          training: dropout on and batch statistics from this minibatch.
        """
        if not self.hidden and self.n_out is None:
            raise ValueError("an MLP with no hidden layers needs n_out")
        h = _with_covariate(x, covariate)
        for width in self.hidden:
            h = Dense(width)(h)
            if self.batch_norm:
                h = batch_norm(h, training, self.freeze_batch_norm)
            if self.layer_norm:
                h = nn.LayerNorm()(h)
            h = self.activation(h)
            if self.dropout_rate > 0:
                h = nn.Dropout(self.dropout_rate, deterministic=not training)(h)
        if self.n_out is not None:
            h = Dense(self.n_out)(h)
        return h


def batch_norm(h: jax.Array, training: bool, frozen: bool = False, name=None) -> jax.Array:
    """Batch-normalise ``h`` over all but its last axis (inside a compact module).

    torch's ``BatchNorm1d(momentum=0.01, eps=1e-3)``, as scvi-tools uses;
    minibatch statistics while training unless ``frozen``.
    """
    return nn.BatchNorm(use_running_average=not training or frozen,
                        momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, name=name)(h)


class GaussianEncoder(nn.Module):
    """Amortised diagonal Gaussian ``q(z | x) = N(loc(x), diag(scale(x)^2))``.

    An :class:`MLP` body followed by two linear heads; the scale is
    ``softplus(.) + MIN_SCALE`` so it is positive with gradients that neither
    vanish nor explode as it shrinks (unlike ``exp``).

    Attributes:
      n_latent: dimension ``K`` of ``z``.
      hidden: hidden-layer widths of the body; ``()`` gives linear heads.
      dropout_rate, batch_norm, freeze_batch_norm, layer_norm, activation: as
        in :class:`MLP`.
    """

    n_latent: int
    hidden: Sequence[int] = (128,)
    dropout_rate: float = 0.0
    batch_norm: bool = False
    freeze_batch_norm: bool = False
    layer_norm: bool = False
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(
        self, x: jax.Array, covariate: Optional[jax.Array] = None, training: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)``, each ``(..., n_latent)``; arguments as in :class:`MLP`."""
        h = _with_covariate(x, covariate)
        if self.hidden:  # otherwise linear heads: an amortised linear encoder
            body = MLP(
                hidden=self.hidden,
                dropout_rate=self.dropout_rate,
                batch_norm=self.batch_norm,
                freeze_batch_norm=self.freeze_batch_norm,
                layer_norm=self.layer_norm,
                activation=self.activation,
            )
            h = body(h, training=training)
        loc = Dense(self.n_latent, name="loc")(h)
        scale = nn.softplus(Dense(self.n_latent, name="scale")(h)) + MIN_SCALE
        return loc, scale
