"""scVI: a deep generative model of raw UMI counts (Lopez et al., 2018).

Generative story, for each cell ``c`` in batch ``b`` (``s_b`` its one-hot code)::

    z ~ N(0, I_K)
    log l = log sum_g x_g                              # latent_library=False (observed)
    log l ~ N(m_b, v_b)                                # latent_library=True
    h = decoder(z, s_b)                                # an MLP
    rho = softmax(W_rho h)                             # expression frequencies, sum to 1
    mu = l * rho                                       # expected counts
    theta = inverse dispersion: per gene | gene-batch | gene-label | decoder head (gene-cell)
    pi = sigmoid(W_pi h)                               # zinb only: structural-zero probability
    x_g ~ ZINB(mu_g, theta_g, pi_g) | NB(mu_g, theta_g) | Poisson(mu_g)

The decoder weights and dispersions are point-estimated.  The guide is
amortised: ``q(z | x) = N(loc, diag(scale^2))`` from an encoder MLP on
``log(1 + x)`` (plus ``s_b`` with ``encode_batch``), with dropout in its
hidden layers while training, and with a latent library a second encoder
gives ``q(log l | x)``.  The latent representation is the encoder mean.

Differences from scvi-tools' ``SCVI`` (same defaults otherwise): no batch
normalisation (the zoo's driver does not carry Flax mutable state), the batch
code enters the decoder's first layer only (identical for ``n_layers=1``),
the gene-cell dispersion is ``softplus`` of a decoder head rather than ``exp``,
and the KL term is weighted by a constant ``kl_weight`` (no warm-up schedule).

References:
  Lopez, R., Regier, J., Cole, M. B., Jordan, M. I. & Yosef, N. (2018). Deep
  generative modeling for single-cell transcriptomics. Nature Methods 15,
  1053–1058. https://doi.org/10.1038/s41592-018-0229-2
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module
from numpyro.distributions import constraints

from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.models.base import LatentModel, cell_plate
from lvmzoo.models.likelihoods import COUNT_LIKELIHOODS
from lvmzoo.nn import MLP, GaussianEncoder

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
# Floor on a decoder-predicted inverse dispersion, so NB stays well defined.
MIN_DISPERSION = 1e-4
NORMALIZED_LAYER = "scvi_normalized"
NORMALIZED_SCALE = 1e4  # layers["scvi_normalized"] is rho per 10,000 counts


class DecoderOutput(NamedTuple):
    """Per-cell decoder heads, each ``(..., G)``; unused ones are ``None``."""

    expression_logits: jax.Array  # softmax gives rho
    dispersion: Optional[jax.Array]  # inverse dispersion (gene-cell only)
    dropout_logits: Optional[jax.Array]  # zero-inflation logits (zinb only)


class Decoder(nn.Module):
    """``[z, s] -> heads``: a shared :class:`MLP` body and one linear head per output.

    Only the heads a configuration uses are created, so an NB model with a
    per-gene dispersion pays for exactly one ``hidden -> G`` layer.
    """

    n_genes: int
    hidden: Sequence[int] = (128,)
    dispersion_head: bool = False
    dropout_head: bool = False

    @nn.compact
    def __call__(self, z, covariate=None) -> DecoderOutput:
        h = z if covariate is None else jnp.concatenate([z, covariate], axis=-1)
        if self.hidden:  # no hidden layers: the heads are linear in [z, s]
            h = MLP(hidden=self.hidden)(h)
        dispersion = dropout = None
        if self.dispersion_head:
            dispersion = nn.softplus(nn.Dense(self.n_genes, name="dispersion")(h)) + MIN_DISPERSION
        if self.dropout_head:
            dropout = nn.Dense(self.n_genes, name="dropout")(h)
        return DecoderOutput(nn.Dense(self.n_genes, name="expression")(h), dispersion, dropout)


@dataclasses.dataclass(frozen=True)
class SCVI(LatentModel):
    """scVI: deep generative model of raw counts with batch correction.

    Args:
      n_latent: dimension ``K`` of ``z``.
      n_hidden: width of every hidden layer of the encoder(s) and decoder.
      n_layers: hidden layers of each network (``0``: linear maps).
      dropout_rate: dropout probability in the encoders' hidden layers while
        training (the decoder has none).
      likelihood: ``"zinb"``, ``"nb"`` or ``"poisson"`` (see
        :mod:`lvmzoo.models.likelihoods`).
      dispersion: what the inverse dispersion ``theta`` depends on:
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` (unlabelled cells share
        one extra row) or ``"gene-cell"`` (a decoder head).  Ignored for Poisson.
      latent_library: ``False`` uses each cell's observed total count as its
        library size (scvi-tools' ``use_observed_lib_size=True``); ``True``
        makes ``log l`` latent with a per-batch log-normal prior whose mean and
        variance are the empirical ones of the cells the driver passes to
        :meth:`init_params`.
      encode_batch: also give the encoder(s) the one-hot batch code.
      kl_weight: constant weight of the ``z`` KL term in the training
        objective (``1`` is the ELBO).  scvi-tools warms it up from 0 to 1
        over 400 epochs; that needs the epoch inside the model and is not done.
    """

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    likelihood: str = "zinb"
    dispersion: str = "gene"
    latent_library: bool = False
    encode_batch: bool = False
    kl_weight: float = 1.0

    name: ClassVar[str] = "scvi"
    data_kind: ClassVar[str] = "counts"
    default_transform: ClassVar[str] = "none"
    default_learning_rate: ClassVar[float] = 1e-3

    def __post_init__(self):
        if self.likelihood not in COUNT_LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; "
                             f"choose one of {', '.join(COUNT_LIKELIHOODS)}")
        if self.dispersion not in DISPERSIONS:
            raise ValueError(f"unknown dispersion {self.dispersion!r}; "
                             f"choose one of {', '.join(DISPERSIONS)}")
        if self.n_latent < 1 or self.n_hidden < 1 or self.n_layers < 0:
            raise ValueError("n_latent and n_hidden must be >= 1 and n_layers >= 0")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if not self.kl_weight >= 0.0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    @property
    def _hidden(self) -> tuple[int, ...]:
        return (self.n_hidden,) * self.n_layers

    @property
    def _needs_dispersion(self) -> bool:
        return COUNT_LIKELIHOODS[self.likelihood].needs_dispersion

    # ------------------------------------------------------------------
    # Generative model
    # ------------------------------------------------------------------

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        likelihood = COUNT_LIKELIHOODS[self.likelihood]
        theta_table = self._dispersion_table(batch, n_genes)  # global: outside the plate
        library_prior = self._library_prior(batch) if self.latent_library else None
        with cell_plate(batch):
            with handlers.scale(scale=self.kl_weight):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([self.n_latent]).to_event(1))
            if library_prior is None:
                log_library = jnp.log(batch.x.sum(-1))
            else:
                log_library = numpyro.sample("log_library", dist.Normal(*library_prior))
            heads = self._decode(z, _batch_code(batch), n_genes)
            mean = jnp.exp(log_library[..., None] + jax.nn.log_softmax(heads.expression_logits))
            theta = self._inverse_dispersion(theta_table, heads, batch)
            numpyro.sample(
                "x", likelihood.build(mean, theta, heads.dropout_logits).to_event(1), obs=batch.x
            )

    def _decode(self, z: jax.Array, code: Optional[jax.Array], n_genes: int) -> DecoderOutput:
        """The decoder heads for latent ``z`` ``(..., K)`` and batch one-hot ``code``."""
        module = Decoder(
            n_genes,
            hidden=self._hidden,
            dispersion_head=self._needs_dispersion and self.dispersion == "gene-cell",
            dropout_head=COUNT_LIKELIHOODS[self.likelihood].needs_dropout,
        )
        example_code = None if code is None else jnp.zeros((1, code.shape[-1]))
        decoder = flax_module("decoder", module, jnp.zeros((1, self.n_latent)), example_code)
        if code is not None:
            code = jnp.broadcast_to(code, z.shape[:-1] + code.shape[-1:])
        return decoder(z, code)

    def _dispersion_table(self, batch: Batch, n_genes: int) -> Optional[jax.Array]:
        """Global inverse-dispersion parameter: ``(G,)``, ``(n_batches, G)`` or ``(n_labels + 1, G)``."""
        if not self._needs_dispersion or self.dispersion == "gene-cell":
            return None
        rows = {"gene": (), "gene-batch": (batch.n_batches,), "gene-label": (batch.n_labels + 1,)}
        shape = rows[self.dispersion] + (n_genes,)
        return numpyro.param("inverse_dispersion", jnp.ones(shape), constraint=constraints.positive)

    def _inverse_dispersion(self, table, heads: DecoderOutput, batch: Batch):
        """Per-cell ``theta``, broadcastable to ``(B, G)``; ``None`` for Poisson."""
        if not self._needs_dispersion:
            return None
        if self.dispersion == "gene-cell":
            return heads.dispersion
        if self.dispersion == "gene-batch":
            return table[batch.batch]
        if self.dispersion == "gene-label":
            # Unlabelled cells have code -1, which indexes the extra last row.
            return table[batch.labels]
        return table

    def _library_prior(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)`` of each cell's log-library prior, ``(B,)`` each.

        The per-batch values are data statistics set by :meth:`init_params`.
        They are stored as params (so they are saved with the model) behind a
        ``stop_gradient``: their gradient is zero, so Adam never moves them.
        """
        loc = numpyro.param("library_log_mean", jnp.zeros(batch.n_batches))
        scale = numpyro.param("library_log_scale", jnp.ones(batch.n_batches),
                              constraint=constraints.positive)
        loc, scale = jax.lax.stop_gradient((loc, scale))
        return loc[batch.batch], scale[batch.batch]

    def init_params(self, batch: Batch, key: jax.Array) -> Optional[dict]:
        """Per-batch empirical mean and sd of log library size, when it is latent.

        ``batch`` is the driver's sample of training cells (up to 2,048); a
        batch absent from it gets the statistics of the whole sample.
        """
        if not self.latent_library:
            return None
        log_library = np.log(np.asarray(batch.x).sum(-1))
        codes = np.asarray(batch.batch)
        loc = np.full(batch.n_batches, log_library.mean(), np.float32)
        scale = np.full(batch.n_batches, max(log_library.std(), 1e-2), np.float32)
        for b in np.unique(codes):
            values = log_library[codes == b]
            loc[b] = values.mean()
            if values.size > 1:
                scale[b] = max(values.std(), 1e-2)  # a single-cell batch keeps the pooled sd
        return {"library_log_mean": jnp.asarray(loc), "library_log_scale": jnp.asarray(scale)}

    # ------------------------------------------------------------------
    # Variational family
    # ------------------------------------------------------------------

    def guide(self, batch: Batch) -> None:
        loc, scale = self._encode(batch, "encoder", self.n_latent)
        if self.latent_library:
            library_loc, library_scale = self._encode(batch, "library_encoder", 1)
        with cell_plate(batch):
            with handlers.scale(scale=self.kl_weight):
                numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if self.latent_library:
                numpyro.sample("log_library", dist.Normal(library_loc[..., 0], library_scale[..., 0]))

    def _encode(self, batch: Batch, name: str, n_out: int) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)``, each ``(B, n_out)``, from ``log(1 + x)``; dropout iff training."""
        x = jnp.log1p(batch.x)  # counts span orders of magnitude; the network sees logs
        code = _batch_code(batch) if self.encode_batch else None
        module = GaussianEncoder(n_out, hidden=self._hidden, dropout_rate=self.dropout_rate)
        encoder = flax_module(name, module, x, code, apply_rng=["dropout"])
        if batch.training:
            return encoder(x, code, training=True, rngs={"dropout": numpyro.prng_key()})
        return encoder(x, code, training=False)

    # ------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        """Encoder mean ``E_q[z | x]``, ``(B, n_latent)``."""
        encode = handlers.seed(handlers.substitute(self._encode, data=params), key)
        loc, _ = encode(batch, "encoder", self.n_latent)
        return loc

    def expression(
        self,
        params,
        batch: Batch,
        key: jax.Array,
        n_samples: int = 25,
        transform_batch: Optional[int] = None,
        library_size: Optional[float] = 1.0,
    ) -> jax.Array:
        """Denoised expression ``E_q[rho(z, s)] * library_size``, ``(B, G)``.

        Averages the decoder's frequencies ``rho`` over ``n_samples`` draws of
        ``z ~ q(z | x)`` (encoder without dropout).

        Args:
          params: fitted params.
          batch: cells to decode.
          key: PRNG key of the draws.
          n_samples: posterior draws per cell.
          transform_batch: batch code to decode every cell *as if* it came
            from (batch-corrected expression); ``None`` keeps each cell's own.
          library_size: scale of the frequencies (``1.0``: ``rho`` itself);
            ``None`` uses each cell's observed total count, giving ``mu``.
        """
        n_genes = batch.x.shape[-1]
        key_seed, key_draw = jax.random.split(key)
        substituted = lambda fn: handlers.seed(handlers.substitute(fn, data=params), key_seed)
        loc, scale = substituted(self._encode)(batch.replace(training=False), "encoder",
                                               self.n_latent)
        z = loc + scale * jax.random.normal(key_draw, (n_samples,) + loc.shape)
        if transform_batch is not None:
            batch = batch.replace(batch=jnp.full_like(batch.batch, transform_batch))
        heads = substituted(self._decode)(z, _batch_code(batch), n_genes)
        rho = jax.nn.softmax(heads.expression_logits, axis=-1).mean(0)
        scale_by = batch.x.sum(-1, keepdims=True) if library_size is None else library_size
        return rho * scale_by

    def annotate(self, adata, params, latent, data) -> list[str]:
        """Adds ``layers["scvi_normalized"]``: ``rho`` per 10,000 counts (10 draws per cell)."""
        source = DeviceSource(data)
        expression = jax.jit(lambda b, k: self.expression(params, b, k, n_samples=10))
        key = jax.random.PRNGKey(0)
        chunks = []
        for start in range(0, data.n_cells, 1024):
            batch = source.full_batch(np.arange(start, min(start + 1024, data.n_cells)))
            chunks.append(np.asarray(expression(batch, jax.random.fold_in(key, start))))
        adata.layers[NORMALIZED_LAYER] = (np.concatenate(chunks) * NORMALIZED_SCALE).astype(
            np.float32
        )
        return [f'layers["{NORMALIZED_LAYER}"]']


def _batch_code(batch: Batch) -> Optional[jax.Array]:
    """One-hot batch code ``(B, n_batches)``; ``None`` with a single batch (it carries nothing)."""
    if batch.n_batches <= 1:
        return None
    return jax.nn.one_hot(batch.batch, batch.n_batches)
