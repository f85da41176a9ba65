"""Variational autoencoder (Kingma & Welling, 2014): a non-linear factor model.

Generative story, for each cell::

    z ~ N(0, I_K)
    eta = decoder(z)                              # an MLP, R^K -> R^G
    x | z ~ N(eta, diag(sigma^2))                 # likelihood="gaussian"
    x | z ~ Bernoulli(sigmoid(eta))               # likelihood="bernoulli"

The decoder's weights and the Gaussian's per-gene scale ``sigma`` are
point-estimated.  The guide is amortised: an encoder MLP maps each cell's
``x`` to ``q(z | x) = N(loc(x), diag(scale(x)^2))``, with dropout in its
hidden layers while training (``batch.training``) and none when evaluating.
There is no closed-form ``log p(x)``; :meth:`FittedModel.evaluate
<lvmzoo.infer.results.FittedModel.evaluate>` estimates it by importance
sampling with the encoder as proposal (the IWAE bound).

Reports the encoder mean ``E_q[z | x]`` as the latent representation.

References:
  Kingma, D. P. & Welling, M. (2014). Auto-encoding variational Bayes. ICLR.
  https://arxiv.org/abs/1312.6114
  Burda, Y., Grosse, R. & Salakhutdinov, R. (2016). Importance weighted
  autoencoders. ICLR. https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module
from numpyro.distributions import constraints

from lvmzoo.data.source import Batch
from lvmzoo.models.base import LatentModel, cell_plate, hyperparameter
from lvmzoo.nn import MLP, GaussianEncoder

# Given the decoder output eta (B, G), the distribution of x (batch shape (B, G)).
Observation = Callable[[jax.Array], dist.Distribution]


class Likelihood(NamedTuple):
    """An observation model ``p(x | eta)`` and the data it is meant for.

    Attributes:
      data_kind: what ``batch.x`` must hold (see :class:`LatentModel`).
      default_transform: the transform the CLI applies to count input.
      declare: called with ``n_genes`` *outside* the cells plate, so that any
        global parameters it declares are not subsampled; returns the
        per-cell :data:`Observation`.
    """

    data_kind: str
    default_transform: str
    declare: Callable[[int], Observation]


def _gaussian(n_genes: int) -> Observation:
    """``x_g ~ N(eta_g, sigma_g^2)`` with a learned scale ``sigma`` per gene."""
    scale = numpyro.param("x_scale", jnp.ones(n_genes), constraint=constraints.positive)
    return lambda mean: dist.Normal(mean, scale)


def _bernoulli(n_genes: int) -> Observation:
    """``x_g ~ Bernoulli(sigmoid(eta_g))``: the decoder outputs logits."""
    return lambda logits: dist.Bernoulli(logits=logits)


LIKELIHOODS: dict[str, Likelihood] = {
    "gaussian": Likelihood("continuous", "log1p_cp10k", _gaussian),
    "bernoulli": Likelihood("binary", "none", _bernoulli),
}


@dataclasses.dataclass(frozen=True)
class VAE(LatentModel):
    """Variational autoencoder with ``n_latent`` latent dimensions.

    Args:
      n_latent: dimension ``K`` of ``z``.
      n_hidden: width of every hidden layer of the encoder and the decoder.
      n_layers: number of hidden layers of each (``0``: linear maps).
      dropout_rate: dropout probability in the encoder's hidden layers while
        training.  The decoder has none, so ``p(x | z)`` is one fixed function.
      likelihood: ``"gaussian"`` (continuous data, e.g. log1p-normalised
        counts) or ``"bernoulli"`` (binary data).  Sets :attr:`data_kind` and
        :attr:`default_transform`.
    """

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = hyperparameter(1, minimum=0)
    dropout_rate: float = hyperparameter(0.1, minimum=0)
    likelihood: str = "gaussian"

    name: ClassVar[str] = "vae"
    default_learning_rate: ClassVar[float] = 1e-3

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}"
            )
        if self.n_latent < 1 or self.n_hidden < 1 or self.n_layers < 0:
            raise ValueError("n_latent and n_hidden must be >= 1 and n_layers >= 0")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    # The likelihood decides what data the model takes, so these two are
    # per-instance rather than the ClassVars of the base class.
    @property
    def data_kind(self) -> str:
        return LIKELIHOODS[self.likelihood].data_kind

    @property
    def default_transform(self) -> str:
        return LIKELIHOODS[self.likelihood].default_transform

    @property
    def _hidden(self) -> tuple[int, ...]:
        return (self.n_hidden,) * self.n_layers

    def model(self, batch: Batch) -> None:
        decoder, observation = self._decoder(batch.x.shape[-1])
        with cell_plate(batch):
            z = numpyro.sample("z", self.prior(batch))
            numpyro.sample("x", observation(decoder(z)).to_event(1), obs=batch.x)

    def prior(self, batch: Batch) -> dist.Distribution:
        """``p(z)`` of each cell, event shape ``(n_latent,)``, default ``N(0, I)``: an
        extension hook (see :meth:`lvmzoo.models.SCVI.prior`)."""
        return dist.Normal(0.0, 1.0).expand([self.n_latent]).to_event(1)

    def _decoder(self, n_genes: int):
        """The decoder network and the observation model it feeds (globals: outside the plate)."""
        decoder = flax_module(
            "decoder", MLP(hidden=self._hidden, n_out=n_genes), jnp.zeros((1, self.n_latent))
        )
        return decoder, LIKELIHOODS[self.likelihood].declare(n_genes)

    def guide(self, batch: Batch) -> None:
        loc, scale = self._encode(batch)
        with cell_plate(batch):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def _encode(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Encoder output ``(loc, scale)``, each ``(B, n_latent)``; dropout iff training."""
        encoder = flax_module(
            "encoder",
            GaussianEncoder(self.n_latent, hidden=self._hidden, dropout_rate=self.dropout_rate),
            batch.x,
            apply_rng=["dropout"],
        )
        if batch.training:
            return encoder(batch.x, training=True, rngs={"dropout": numpyro.prng_key()})
        # Evaluation: deterministic, so no random key is drawn.
        return encoder(batch.x, training=False)

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        """Encoder mean ``E_q[z | x]``, ``(B, n_latent)`` (deterministic unless ``batch.training``)."""
        loc, _ = handlers.seed(handlers.substitute(self._encode, data=params), key)(batch)
        return loc

    def decode(self, params, batch: Batch, z: jax.Array) -> dist.Distribution:
        """``p(x | z)`` for latents ``z`` ``(..., B, K)``: batch shape ``(..., B, G)``."""

        def program():
            decoder, observation = self._decoder(batch.x.shape[-1])
            return observation(decoder(z))

        return handlers.substitute(program, data=params)()
