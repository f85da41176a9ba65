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

Training objective.  While fitting, the ``z`` term of the ELBO,
``E_q[log p(z) - log q(z | x)]`` (minus the KL divergence), is weighted by
scvi-tools' linear warm-up ``w(e) = kl_weight * min(1, e / W)`` at 0-based
epoch ``e`` (``Batch.epoch``): ``w = 0`` in the first epoch, ``kl_weight``
from epoch ``W`` on.  By default (``n_epochs_kl_warmup="auto"``) ``W`` is a
quarter of the fit's epochs (``Batch.n_epochs``), so the warm-up always ends
within the fit and the model is trained on the ELBO it reports; scvi-tools'
fixed ``W = 400`` outlasts its own default fit above 20,000 cells, whose
latent then keeps more batch structure and a worse held-out likelihood.  The weight is a
``numpyro.handlers.scale`` on the ``z`` site in *both* the model and the guide,
so ``log p(z)`` and ``log q(z | x)`` are scaled alike and the loss is
``reconstruction + w * KL_z (+ KL_library)``.  As in scvi-tools the library
KL is never warmed up.  Every evaluation (``batch.training=False``: validation
loss, ``FittedModel.evaluate``, the IWAE bound) uses the ELBO itself, ``w = 1``.

Batch normalisation (``use_batch_norm``, on by default as scvi-tools'
``use_batch_norm="both"``) normalises every hidden layer of the encoder(s)
and the decoder; its running statistics (momentum 0.99 / epsilon 1e-3 in
Flax's convention, torch's ``BatchNorm1d(momentum=0.01, eps=1e-3)``) are
Flax mutable state, which the driver keeps in the fitted params
(``"encoder$state"``, ``"decoder$state"``, ...).  Training uses minibatch
statistics and updates the running ones; evaluation uses the running ones, so
it is deterministic.

Differences from scvi-tools' ``SCVI`` (same defaults otherwise): the batch
code enters the decoder's first layer only (identical for ``n_layers=1``),
the gene-cell dispersion is ``softplus`` of a decoder head rather than
``exp``, the encoder scale is ``softplus(.) + 1e-4`` rather than
``sqrt(exp(.) + 1e-4)``, batch norm's running variance is the biased
minibatch variance (torch keeps the unbiased one), and the validation loss is
the unweighted ELBO (scvi-tools applies the current warm-up weight).  Weights
start as torch's ``Linear`` does (``lvmzoo.nn.Dense``; biases at zero): with
Flax's larger default the batch-normalised decoder learned batch effects too
slowly and the latent kept them.

References:
  Lopez, R., Regier, J., Cole, M. B., Jordan, M. I. & Yosef, N. (2018). Deep
  generative modeling for single-cell transcriptomics. Nature Methods 15,
  1053–1058. https://doi.org/10.1038/s41592-018-0229-2
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import ClassVar, NamedTuple, Optional, Sequence, Union

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
from lvmzoo.models.base import LatentModel, cell_plate, hyperparameter
from lvmzoo.models.likelihoods import COUNT_LIKELIHOODS
from lvmzoo.nn import MLP, Dense, GaussianEncoder

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
# Floor on a decoder-predicted inverse dispersion, so NB stays well defined.
MIN_DISPERSION = 1e-4
NORMALIZED_LAYER = "scvi_normalized"
NORMALIZED_SCALE = 1e4  # layers["scvi_normalized"] is rho per 10,000 counts
# NumPyro refuses a concrete scale of 0 (e.g. when SVI.init runs the model at
# epoch 0.0); the smallest normal float32 changes no loss value.
_SMALLEST_SCALE = float(jnp.finfo(jnp.float32).tiny)


# n_epochs_kl_warmup="auto": the warm-up lasts this share of the fit's epochs.
KL_WARMUP_SHARE = 0.25


def kl_warmup_weight(epoch, n_epochs_kl_warmup, max_weight: float = 1.0, n_epochs=None):
    """scvi-tools' KL warm-up: ``max_weight * min(1, epoch / W)``.

    Matches ``scvi.train._trainingplans._compute_kl_weight`` with
    ``min_kl_weight=0``, evaluated at Lightning's 0-based ``current_epoch``:
    0 at epoch 0, 0.5 at epoch 200 of a 400-epoch warm-up, ``max_weight``
    from epoch 400 on; ``None`` or ``0`` epochs means no warm-up.

    Args:
      epoch: 0-based epoch, a Python number or a traced ``()`` array.
      n_epochs_kl_warmup: ``W``, the length of the warm-up in epochs, or
        ``"auto"``: :data:`KL_WARMUP_SHARE` of ``n_epochs`` (at least one epoch).
      max_weight: the weight once warmed up.
      n_epochs: the fit's epochs (``Batch.n_epochs``), needed for ``"auto"``.

    Returns:
      ``()`` float32 array.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    if not n_epochs_kl_warmup:
        return jnp.full_like(epoch, max_weight)
    if n_epochs_kl_warmup == "auto":
        if n_epochs is None:
            raise ValueError("n_epochs_kl_warmup='auto' needs the fit's n_epochs")
        n_epochs_kl_warmup = jnp.maximum(KL_WARMUP_SHARE * jnp.asarray(n_epochs, jnp.float32), 1.0)
    return max_weight * jnp.minimum(epoch / n_epochs_kl_warmup, 1.0)


class DecoderOutput(NamedTuple):
    """Per-cell decoder heads, each ``(..., G)``; unused ones are ``None``."""

    expression_logits: jax.Array  # softmax gives rho
    dispersion: Optional[jax.Array]  # inverse dispersion (gene-cell only)
    dropout_logits: Optional[jax.Array]  # zero-inflation logits (zinb only)


class Posterior(NamedTuple):
    """The guide's Gaussians for ``B`` cells.

    Attributes:
      z_loc, z_scale: ``(B, K)`` mean and sd of ``q(z | x)``.
      library_loc, library_scale: ``(B,)`` of ``q(log l | x)``, or ``None``
        when the library is observed.
    """

    z_loc: jax.Array
    z_scale: jax.Array
    library_loc: Optional[jax.Array]
    library_scale: Optional[jax.Array]


class Generative(NamedTuple):
    """What the decoder says about the counts, each broadcastable to ``(..., B, G)``.

    Attributes:
      rho: expression frequencies (each cell's row sums to 1).
      mean: expected counts ``l * rho``.
      log_mean: ``log l + log rho``, what the likelihood reads (never underflows).
      inverse_dispersion: ``theta``; ``None`` for Poisson.
      dropout_logits: zero-inflation logits; ``None`` unless zinb.
    """

    rho: jax.Array
    mean: jax.Array
    log_mean: jax.Array
    inverse_dispersion: Optional[jax.Array]
    dropout_logits: Optional[jax.Array]


class Decoder(nn.Module):
    """``[z, s] -> heads``: a shared :class:`MLP` body and one linear head per output.

    Only the heads a configuration uses are created, so an NB model with a
    per-gene dispersion pays for exactly one ``hidden -> G`` layer.
    """

    n_genes: int
    hidden: Sequence[int] = (128,)
    batch_norm: bool = False
    freeze_batch_norm: bool = False
    dispersion_head: bool = False
    dropout_head: bool = False

    @nn.compact
    def __call__(self, z, covariate=None, training: bool = False) -> DecoderOutput:
        h = z if covariate is None else jnp.concatenate([z, covariate], axis=-1)
        if self.hidden:  # no hidden layers: the heads are linear in [z, s]
            h = MLP(hidden=self.hidden, batch_norm=self.batch_norm,
                    freeze_batch_norm=self.freeze_batch_norm)(h, training=training)
        dispersion = dropout = None
        if self.dispersion_head:
            dispersion = nn.softplus(Dense(self.n_genes, name="dispersion")(h)) + MIN_DISPERSION
        if self.dropout_head:
            dropout = Dense(self.n_genes, name="dropout")(h)
        return DecoderOutput(Dense(self.n_genes, name="expression")(h), dispersion, dropout)


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
      use_batch_norm: batch-normalise every hidden layer of every network
        (scvi-tools' default ``use_batch_norm="both"``).
      n_epochs_kl_warmup: epochs over which the weight of the ``z`` KL term
        rises linearly from 0 to ``kl_weight`` during training; ``"auto"``
        (default): a quarter of the fit's epochs (see the module docstring;
        scvi-tools uses 400); ``None`` or ``0``: no warm-up.
      kl_weight: the weight of the ``z`` KL term once warmed up (scvi-tools'
        ``max_kl_weight``); ``1`` trains on the ELBO.  Evaluation always
        uses the ELBO.
      freeze_batch_norm: batch norm normalises with its running statistics
        while training too and never updates them (set by
        :func:`lvmzoo.analysis.query.map_query` for the query fine-tune).
    """

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = hyperparameter(1, minimum=0)
    dropout_rate: float = hyperparameter(0.1, minimum=0)
    likelihood: str = "zinb"
    dispersion: str = "gene"
    latent_library: bool = False
    encode_batch: bool = False
    use_batch_norm: bool = True
    n_epochs_kl_warmup: Union[int, str, None] = hyperparameter("auto", minimum=0, flag="kl-warmup")
    kl_weight: float = 1.0
    freeze_batch_norm: bool = False

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
        warmup = self.n_epochs_kl_warmup
        if warmup is not None and warmup != "auto" and not (
                isinstance(warmup, (int, float)) and warmup >= 0):
            raise ValueError(
                f"n_epochs_kl_warmup must be 'auto', None or >= 0, got {warmup!r}")

    @property
    def _hidden(self) -> tuple[int, ...]:
        return (self.n_hidden,) * self.n_layers

    @property
    def _needs_dispersion(self) -> bool:
        return COUNT_LIKELIHOODS[self.likelihood].needs_dispersion

    @property
    def _mutable(self) -> Optional[list[str]]:
        """Flax collections the networks update: batch-norm statistics, if any layer has them."""
        return ["batch_stats"] if self.use_batch_norm and self.n_layers > 0 else None

    # ------------------------------------------------------------------
    # Generative model
    # ------------------------------------------------------------------

    def model(self, batch: Batch) -> None:
        n_genes = batch.x.shape[-1]
        theta_table = self._dispersion_table(batch, n_genes)  # global: outside the plate
        library_prior = self._library_prior(batch) if self.latent_library else None
        with cell_plate(batch):
            with self._kl_warmup(batch):
                z = numpyro.sample("z", self.prior(batch))
            self._observe_counts(z, batch, theta_table, library_prior)

    def _observe_counts(self, z, batch: Batch, theta_table, library_prior) -> None:
        """Inside the cells plate: each cell's library size (observed, or the ``log_library``
        site when ``latent_library``), then its counts ``x`` decoded from ``z``."""
        if library_prior is None:
            log_library = jnp.log(batch.x.sum(-1))
        else:
            log_library = numpyro.sample("log_library", dist.Normal(*library_prior))
        out = self._generate(z, log_library, batch, batch.batch, theta_table, batch.training)
        numpyro.sample("x", self.observation(out).to_event(1), obs=batch.x)

    def prior(self, batch: Batch) -> dist.Distribution:
        """``p(z)`` of each cell, event shape ``(n_latent,)``; the default is ``N(0, I)``.

        An extension hook: a subclass that overrides it changes scVI's prior and
        nothing else (e.g. a mixture of Gaussians, whose weights, means and scales
        are ``numpyro.param`` sites declared here).  It is called inside the cells
        plate, so per-cell batch shapes broadcast against ``(B,)``.
        """
        return dist.Normal(0.0, 1.0).expand([self.n_latent]).to_event(1)

    def _kl_warmup(self, batch: Batch):
        """Context scaling the ``z`` site by the warm-up weight while training.

        Used around ``z`` in both model and guide, so ``log p(z) - log q(z | x)``
        (the KL term) is scaled as a whole; evaluation leaves the ELBO unscaled.
        """
        if not batch.training:
            return contextlib.nullcontext()
        weight = kl_warmup_weight(batch.epoch, self.n_epochs_kl_warmup, self.kl_weight,
                                  batch.n_epochs)
        return handlers.scale(scale=jnp.maximum(weight, _SMALLEST_SCALE))

    def _generate(self, z, log_library, batch: Batch, codes, theta_table, training: bool):
        """Decoder outputs for ``z`` ``(..., B, K)``, ``log_library`` ``(..., B)`` and ``codes``."""
        heads = self._decode(z, _one_hot(codes, batch.n_batches), batch.x.shape[-1], training)
        log_rho = jax.nn.log_softmax(heads.expression_logits)
        log_mean = log_library[..., None] + log_rho
        theta = self._inverse_dispersion(theta_table, heads, codes, batch.labels)
        # rho and mean are for readers; a fit's loss uses log_mean only (the rest is pruned).
        return Generative(jnp.exp(log_rho), jnp.exp(log_mean), log_mean, theta,
                          heads.dropout_logits)

    def observation(self, out: Generative) -> dist.Distribution:
        """``p(x | z, l)``, batch shape ``(..., B, G)``, from the decoder outputs.

        An extension hook like :meth:`prior`: override it for another count
        likelihood built from ``out`` (``mean``, ``log_mean``,
        ``inverse_dispersion``, ``dropout_logits``).
        """
        build = COUNT_LIKELIHOODS[self.likelihood].build
        return build(out.log_mean, out.inverse_dispersion, out.dropout_logits)

    def _decoder_module(self, n_genes: int) -> nn.Module:
        """The Flax decoder ``[z, s] -> DecoderOutput`` (an MLP body and linear heads)."""
        return Decoder(
            n_genes,
            hidden=self._hidden,
            batch_norm=self.use_batch_norm,
            freeze_batch_norm=self.freeze_batch_norm,
            dispersion_head=self._needs_dispersion and self.dispersion == "gene-cell",
            dropout_head=COUNT_LIKELIHOODS[self.likelihood].needs_dropout,
        )

    def _decode(self, z, code, n_genes: int, training: bool) -> DecoderOutput:
        """The decoder heads for latent ``z`` ``(..., K)`` and batch one-hot ``code``."""
        module = self._decoder_module(n_genes)
        example_code = None if code is None else jnp.zeros((1, code.shape[-1]))
        decoder = flax_module("decoder", module, jnp.zeros((1, self.n_latent)), example_code,
                              mutable=self._mutable)
        if code is not None:  # e.g. z (S, B, K) with codes of several counterfactual batches
            cells = jnp.broadcast_shapes(z.shape[:-1], code.shape[:-1])
            z = jnp.broadcast_to(z, cells + z.shape[-1:])
            code = jnp.broadcast_to(code, cells + code.shape[-1:])
        return decoder(z, code, training=training)

    def _dispersion_table(self, batch: Batch, n_genes: int) -> Optional[jax.Array]:
        """Global inverse-dispersion parameter: ``(G,)``, ``(n_batches, G)`` or ``(n_labels + 1, G)``."""
        if not self._needs_dispersion or self.dispersion == "gene-cell":
            return None
        rows = {"gene": (), "gene-batch": (batch.n_batches,), "gene-label": (batch.n_labels + 1,)}
        shape = rows[self.dispersion] + (n_genes,)
        return numpyro.param("inverse_dispersion", jnp.ones(shape), constraint=constraints.positive)

    def _inverse_dispersion(self, table, heads: DecoderOutput, codes, labels):
        """Per-cell ``theta``, broadcastable to ``(..., B, G)``; ``None`` for Poisson."""
        if not self._needs_dispersion:
            return None
        if self.dispersion == "gene-cell":
            return heads.dispersion
        if self.dispersion == "gene-batch":
            return table[codes]
        if self.dispersion == "gene-label":
            # Unlabelled cells have code -1, which indexes the extra last row.
            return table[labels]
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
            with self._kl_warmup(batch):
                numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if self.latent_library:
                numpyro.sample("log_library", dist.Normal(library_loc[..., 0], library_scale[..., 0]))

    def _encode(self, batch: Batch, name: str, n_out: int) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)``, each ``(B, n_out)``, from ``log(1 + x)``; dropout iff training."""
        x = jnp.log1p(batch.x)  # counts span orders of magnitude; the network sees logs
        code = _one_hot(batch.batch, batch.n_batches) if self.encode_batch else None
        module = GaussianEncoder(n_out, hidden=self._hidden, dropout_rate=self.dropout_rate,
                                 batch_norm=self.use_batch_norm,
                                 freeze_batch_norm=self.freeze_batch_norm)
        encoder = flax_module(name, module, x, code, apply_rng=["dropout"], mutable=self._mutable)
        if batch.training:
            return encoder(x, code, training=True, rngs={"dropout": numpyro.prng_key()})
        return encoder(x, code, training=False)

    # ------------------------------------------------------------------
    # Outputs: pure functions of fitted params, evaluation mode (no dropout,
    # batch norm with running statistics), traceable under jit.
    # ------------------------------------------------------------------

    def latent(self, params, batch: Batch, key: jax.Array) -> jax.Array:
        """Encoder mean ``E_q[z | x]``, ``(B, n_latent)``."""
        return self.posterior(params, batch).z_loc

    def posterior(self, params, batch: Batch) -> Posterior:
        """The guide's ``q(z | x)`` (and ``q(log l | x)``) for the cells of ``batch``."""
        batch = batch.replace(training=False)
        encode = _with_params(self._encode, params)
        z_loc, z_scale = encode(batch, "encoder", self.n_latent)
        if not self.latent_library:
            return Posterior(z_loc, z_scale, None, None)
        library_loc, library_scale = encode(batch, "library_encoder", 1)
        return Posterior(z_loc, z_scale, library_loc[..., 0], library_scale[..., 0])

    def sample_posterior(
        self, params, batch: Batch, key: jax.Array, n_samples: int
    ) -> tuple[jax.Array, jax.Array]:
        """``n_samples`` draws per cell from the guide.

        Returns:
          ``(z, log_library)``: ``(n_samples, B, K)`` and ``(n_samples, B)``; an
          observed library is the cell's log total count in every draw.
        """
        q = self.posterior(params, batch)
        key_z, key_library = jax.random.split(key)
        z = q.z_loc + q.z_scale * jax.random.normal(key_z, (n_samples,) + q.z_loc.shape)
        if q.library_loc is None:
            log_library = jnp.broadcast_to(jnp.log(batch.x.sum(-1)), (n_samples, batch.size))
        else:
            noise = jax.random.normal(key_library, (n_samples, batch.size))
            log_library = q.library_loc + q.library_scale * noise
        return z, log_library

    def generative(
        self, params, batch: Batch, z: jax.Array, log_library: jax.Array,
        codes: Optional[jax.Array] = None,
    ) -> Generative:
        """Decoder outputs for latents ``z`` ``(..., B, K)`` and ``log_library`` ``(..., B)``.

        Args:
          codes: batch codes to decode the cells as, broadcastable to ``(..., B)``
            (a counterfactual batch); ``None`` uses each cell's own.
        """
        batch = batch.replace(training=False)
        codes = batch.batch if codes is None else codes

        def decode():
            table = self._dispersion_table(batch, batch.x.shape[-1])
            return self._generate(z, log_library, batch, codes, table, False)

        return _with_params(decode, params)()

    def decode(self, params, batch: Batch, z: jax.Array) -> dist.Distribution:
        """``p(x | z, l)`` for latents ``z`` ``(..., B, K)`` of the cells of ``batch``.

        Decoded in each cell's own batch at its own library size: its observed
        total count, or the posterior mean of ``log l`` when the library is
        latent.  Batch shape ``(..., B, G)``.
        """
        if self.latent_library:
            log_library = self.posterior(params, batch).library_loc
        else:
            log_library = jnp.log(batch.x.sum(-1))
        return self.observation(self.generative(params, batch, z, log_library))

    def expression(
        self,
        params,
        batch: Batch,
        key: jax.Array,
        n_samples: int = 25,
        transform_batch=None,
        library_size: Optional[float] = 1.0,
    ) -> jax.Array:
        """Denoised expression ``E_q[rho(z, s)] * library_size``, ``(B, G)``.

        Averages the decoder's frequencies ``rho`` over ``n_samples`` draws of
        ``z ~ q(z | x)`` (evaluation mode).

        Args:
          params: fitted params.
          batch: cells to decode.
          key: PRNG key of the draws.
          n_samples: posterior draws per cell.
          transform_batch: batch code, or ``(n,)`` codes, to decode every cell
            *as if* it came from (averaging ``rho`` over the ``n`` batches);
            ``None`` keeps each cell's own.
          library_size: scale of the frequencies (``1.0``: ``rho`` itself);
            ``None`` gives ``mu``: ``rho`` times each cell's library (its
            observed total count, or a draw from ``q(log l | x)`` when latent).
        """
        z, log_library = self.sample_posterior(params, batch, key, n_samples)
        if transform_batch is None:
            codes = batch.batch
        else:
            # (n_codes, 1, 1): one decoding of every draw per counterfactual batch.
            codes = jnp.reshape(jnp.asarray(transform_batch, jnp.int32), (-1, 1, 1))
            z, log_library = z[None], log_library[None]
        out = self.generative(params, batch, z, log_library, codes)
        value = out.rho if library_size is not None else out.mean
        value = value.reshape((-1,) + value.shape[-2:]).mean(0)
        return value if library_size is None else value * library_size

    def annotate_per_gene(self, adata, params, data) -> list[str]:
        """Adds ``layers["scvi_normalized"]``: ``rho`` per 10,000 counts (10 draws per cell)."""
        source = DeviceSource(data)
        key = jax.random.PRNGKey(0)
        chunks = []
        for start in range(0, data.n_cells, 1024):
            batch = source.full_batch(np.arange(start, min(start + 1024, data.n_cells)))
            rho = _expression_program(self, params, batch, jax.random.fold_in(key, start))
            chunks.append(np.asarray(rho))
        adata.layers[NORMALIZED_LAYER] = (np.concatenate(chunks) * NORMALIZED_SCALE).astype(
            np.float32
        )
        return [f'layers["{NORMALIZED_LAYER}"]']


# Params are a traced argument (not a closure), so this compiles once per model
# and chunk shape, and batch-norm state updates cannot leak tracers out of it.
@functools.partial(jax.jit, static_argnames=("model",))
def _expression_program(model: SCVI, params, batch: Batch, key: jax.Array) -> jax.Array:
    return model.expression(params, batch, key, n_samples=10)


def _with_params(fn, params):
    """``fn`` with its ``numpyro.param`` / Flax sites read from fitted ``params``."""
    # No seed handler: evaluation-mode networks draw no randomness.
    return handlers.substitute(fn, data=params)


def _one_hot(codes: jax.Array, n_batches: int) -> Optional[jax.Array]:
    """One-hot batch codes ``(..., n_batches)``; ``None`` with a single batch (nothing to carry)."""
    if n_batches <= 1:
        return None
    return jax.nn.one_hot(codes, n_batches)
