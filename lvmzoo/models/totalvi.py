"""totalVI: RNA and surface proteins of CITE-seq cells in one latent space (Gayoso et al., 2021).

Generative story, for each cell ``c`` in batch ``b`` (``s_b`` its one-hot
code), genes ``g`` and proteins ``p``::

    z ~ N(0, I_K)                                        # shared by RNA and proteins
    # RNA: exactly scVI (lvmzoo.models.scvi), NB by default
    l = sum_g x_g                                        # observed library size
    rho = softmax(decoder_rna(z, s_b))
    x_g ~ NB(l * rho_g, theta_g)
    # proteins: background or foreground, a two-component NB mixture
    log beta_p ~ N(mu_{b,p}, sigma_{b,p})               # background level of the cell
    alpha_p = 1 + softplus(f_p(z, s_b))                  # foreground / background > 1
    pi_p = sigmoid(m_p(z, s_b))                          # P(background)
    y_p ~ pi_p NB(beta_p, phi_p) + (1 - pi_p) NB(alpha_p beta_p, phi_p)

``f`` and ``m`` are the heads of a second decoder MLP (:class:`ProteinDecoder`);
``phi`` (the protein inverse dispersion) is per protein, or per protein and
batch (``protein_dispersion="protein-batch"``).  The prior of the background,
``mu`` and ``sigma`` (``(n_batches, n_proteins)``), starts from the data
(:meth:`TotalVI.init_params`): for each batch and protein, the lower component
of a two-component Gaussian mixture fitted to ``log(1 + y)``, as totalVI does;
it is then learned with the rest.

Missing proteins.  A protein with no count in any cell of a batch (a panel
that lacked it) was not measured there: ``measured[b, p] = 0``.  Both its
count ``y_p`` and its background ``log beta_p`` are masked out of every cell
of batch ``b`` (their log-densities are zero in model and guide), and the
encoders see ``log(1 + y) * measured``, so the unmeasured counts, whatever
the matrix holds there, change nothing.  The mask is a fixed param
(``"protein_measured"``, behind a ``stop_gradient``), computed in
:meth:`~TotalVI.init_params` from the driver's sample of cells.

Variational family (amortised, as totalVI).  An encoder of
``[log(1 + x), log(1 + y) * measured]`` gives ``q(z | x, y)``; a second one
gives ``q(log beta | x, y) = N(mu_b + delta, diag(s^2))`` per protein — the
background is a latent variable of the guide, centred on its prior mean so
that it starts at the data's background level.  Like scVI, the ``z`` and the
background KL terms are warmed up (totalVI scales both by its KL weight).

Outputs (:meth:`~TotalVI.protein_outputs`, averaged over posterior draws):

* foreground probability: the posterior probability that a measured count
  came from the foreground, ``P(fg | y) = (1 - pi) NB(y; alpha beta) /
  [pi NB(y; beta) + (1 - pi) NB(y; alpha beta)]``; for an unmeasured protein,
  the decoder's prior ``1 - pi`` (an imputation);
* denoised protein: the foreground-only expected count ``(1 - pi) alpha beta``
  (totalVI's ``include_protein_background=False``).

Differences from scvi-tools' ``TOTALVI``: the background posterior comes from
an encoder head rather than from the decoder given ``z``; the protein
dispersion and the background prior are per batch only as options above;
no library-size latent for proteins (as totalVI); encoder and decoder
details are those of :mod:`lvmzoo.models.scvi`.

References:
  Gayoso, A., Steier, Z., Lopez, R., Regier, J., Nazor, K. L., Streets, A. &
  Yosef, N. (2021). Joint probabilistic modeling of single-cell multi-omic
  data with totalVI. Nature Methods 18, 272–282.
  https://doi.org/10.1038/s41592-020-01050-x
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from numpyro.contrib.module import flax_module
from numpyro.distributions import constraints

from lvmzoo.data.registry import DataError
from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.models.base import cell_plate
from lvmzoo.models.likelihoods import NegativeBinomial, negative_binomial_log_prob
from lvmzoo.models.scvi import SCVI, _expression_program, _one_hot, _with_params
from lvmzoo.nn import MLP, Dense, GaussianEncoder

PROTEIN_KEY = "protein_expression"  # scvi-tools' obsm key
PROTEIN_DISPERSIONS = ("protein", "protein-batch")
NORMALIZED_LAYER = "totalvi_normalized"
NORMALIZED_SCALE = 1e4
FOREGROUND_KEY = "totalvi_protein_foreground_probability"
DENOISED_KEY = "totalvi_denoised_protein"
# Floor on the sd of the background prior set from the data.
MIN_BACKGROUND_SCALE = 0.05


class NegativeBinomialMixture(dist.Distribution):
    """``pi NB(mu_back, phi) + (1 - pi) NB(mu_fore, phi)``, ``pi = sigmoid(mixture_logits)``.

    Args:
      log_mean_background, log_mean_foreground: ``log`` of the two means.
      inverse_dispersion: ``phi > 0``, shared by both components.
      mixture_logits: logit of ``pi``, the probability of the background.
    """

    arg_constraints = {
        "log_mean_background": constraints.real,
        "log_mean_foreground": constraints.real,
        "inverse_dispersion": constraints.positive,
        "mixture_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    pytree_data_fields = ("log_mean_background", "log_mean_foreground", "inverse_dispersion",
                          "mixture_logits")

    def __init__(self, log_mean_background, log_mean_foreground, inverse_dispersion,
                 mixture_logits, validate_args=None):
        self.log_mean_background = log_mean_background
        self.log_mean_foreground = log_mean_foreground
        self.inverse_dispersion = inverse_dispersion
        self.mixture_logits = mixture_logits
        batch_shape = jax.lax.broadcast_shapes(
            jnp.shape(log_mean_background), jnp.shape(log_mean_foreground),
            jnp.shape(inverse_dispersion), jnp.shape(mixture_logits))
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    def _components(self, value):
        """``(log pi + log NB_back(value), log(1 - pi) + log NB_fore(value))``."""
        back = negative_binomial_log_prob(value, self.log_mean_background, self.inverse_dispersion)
        fore = negative_binomial_log_prob(value, self.log_mean_foreground, self.inverse_dispersion)
        return (jax.nn.log_sigmoid(self.mixture_logits) + back,
                jax.nn.log_sigmoid(-self.mixture_logits) + fore)

    def log_prob(self, value):
        return jnp.logaddexp(*self._components(value))

    def foreground_probability(self, value):
        """Posterior probability that ``value`` came from the foreground component."""
        back, fore = self._components(value)
        return jax.nn.sigmoid(fore - back)

    @property
    def mean(self):
        pi = jax.nn.sigmoid(self.mixture_logits)
        value = pi * jnp.exp(self.log_mean_background) + (1 - pi) * jnp.exp(self.log_mean_foreground)
        return jnp.broadcast_to(value, self.batch_shape)

    def sample(self, key, sample_shape=()):
        key_back, key_fore, key_pick = jax.random.split(key, 3)
        shape = self.batch_shape
        back = NegativeBinomial(inverse_dispersion=self.inverse_dispersion,
                                log_mean=jnp.broadcast_to(self.log_mean_background, shape))
        fore = NegativeBinomial(inverse_dispersion=self.inverse_dispersion,
                                log_mean=jnp.broadcast_to(self.log_mean_foreground, shape))
        is_back = jax.random.bernoulli(key_pick, jax.nn.sigmoid(self.mixture_logits),
                                       sample_shape + shape)
        return jnp.where(is_back, back.sample(key_back, sample_shape),
                         fore.sample(key_fore, sample_shape))


class ProteinDecoder(nn.Module):
    """``[z, s] -> (log alpha, mixture logits)``, each ``(..., P)``: an MLP body, two heads."""

    n_proteins: int
    hidden: Sequence[int] = (128,)
    batch_norm: bool = False
    freeze_batch_norm: bool = False

    @nn.compact
    def __call__(self, z, covariate=None, training: bool = False):
        h = z if covariate is None else jnp.concatenate([z, covariate], axis=-1)
        if self.hidden:
            h = MLP(hidden=self.hidden, batch_norm=self.batch_norm,
                    freeze_batch_norm=self.freeze_batch_norm)(h, training=training)
        log_alpha = jnp.log1p(nn.softplus(Dense(self.n_proteins, name="foreground")(h)))
        return log_alpha, Dense(self.n_proteins, name="mixing")(h)


class ProteinGenerative(NamedTuple):
    """What the decoders say about the proteins, each broadcastable to ``(..., B, P)``."""

    log_background: jax.Array  # log beta
    log_foreground: jax.Array  # log (alpha beta)
    mixture_logits: jax.Array  # logit of pi = P(background)
    inverse_dispersion: jax.Array  # phi

    def distribution(self) -> NegativeBinomialMixture:
        return NegativeBinomialMixture(self.log_background, self.log_foreground,
                                       self.inverse_dispersion, self.mixture_logits)


@dataclasses.dataclass(frozen=True)
class TotalVI(SCVI):
    """totalVI: joint model of RNA and surface-protein counts (CITE-seq).

    Register the data with the proteins as an ``obsm`` matrix of raw counts
    (``setup_anndata(adata, batch_key=..., **TotalVI().registration())``; the
    CLI does it).  Proteins with no count in any cell of a batch are treated
    as not measured there (masked out of that batch's likelihood).

    ``n_latent``, ``n_hidden``, ``n_layers``, ``dropout_rate``, ``dispersion``, ``latent_library``,
    ``encode_batch``, ``use_batch_norm``, ``n_epochs_kl_warmup``, ``kl_weight``,
    ``freeze_batch_norm``: as :class:`~lvmzoo.models.scvi.SCVI` (the KL
    warm-up also weights the background's KL term; the encoders read RNA
    and proteins; the protein decoder has the RNA decoder's shape).

    Args:
      likelihood: of the RNA counts, as in scVI; default ``"nb"`` (totalVI's).
      protein_key: ``obsm`` key of the cells × proteins raw counts (a
        DataFrame or an array; names from its columns or
        ``uns["protein_names"]``).
      protein_dispersion: what the protein inverse dispersion depends on:
        ``"protein"`` or ``"protein-batch"``.
    """

    likelihood: str = "nb"
    protein_key: str = PROTEIN_KEY
    protein_dispersion: str = "protein"

    name: ClassVar[str] = "totalvi"
    data_kind: ClassVar[str] = "counts"
    default_transform: ClassVar[str] = "none"

    def __post_init__(self):
        super().__post_init__()
        if not self.protein_key:
            raise ValueError("protein_key must name an obsm matrix")
        if self.protein_dispersion not in PROTEIN_DISPERSIONS:
            raise ValueError(f"unknown protein_dispersion {self.protein_dispersion!r}; "
                             f"choose one of {', '.join(PROTEIN_DISPERSIONS)}")

    def registration(self) -> dict[str, tuple[str, ...]]:
        """The proteins, an ``obsm`` matrix of counts: ``setup_anndata(adata, **registration())``."""
        return {"obsm_keys": (self.protein_key,), "obsm_kinds": ("counts",)}

    # ------------------------------------------------------------------
    # Generative model
    # ------------------------------------------------------------------

    def model(self, batch: Batch) -> None:
        y = self._proteins(batch)
        n_genes, n_proteins = batch.x.shape[-1], y.shape[-1]
        theta_table = self._dispersion_table(batch, n_genes)  # globals: outside the plate
        library_prior = self._library_prior(batch) if self.latent_library else None
        measured = self._measured(batch, n_proteins)
        background_loc, background_scale = self._background_prior(batch, n_proteins)
        phi_table = numpyro.param("protein_inverse_dispersion", jnp.ones(
            ((batch.n_batches,) if self.protein_dispersion == "protein-batch" else ())
            + (n_proteins,)), constraint=constraints.positive)
        with cell_plate(batch):
            with self._kl_warmup(batch):
                z = numpyro.sample("z", self.prior(batch))
            # RNA, as in scVI.
            self._observe_counts(z, batch, theta_table, library_prior)
            # Proteins: background level, then the background/foreground mixture.
            with self._kl_warmup(batch):
                log_background = numpyro.sample(
                    "log_background",
                    dist.Normal(background_loc, background_scale).mask(measured).to_event(1))
            proteins = self._protein_generate(z, log_background, batch, batch.batch, phi_table,
                                              batch.training)
            numpyro.sample("y", proteins.distribution().mask(measured).to_event(1), obs=y)

    def _proteins(self, batch: Batch) -> jax.Array:
        """``(B, P)`` protein counts of the cells."""
        if self.protein_key not in batch.obsm_keys:
            raise DataError(
                f"totalvi reads the protein counts from obsm[{self.protein_key!r}], which was "
                "not registered; register the data with setup_anndata(adata, ..., "
                "**TotalVI().registration())")
        return batch.obsm_matrix(self.protein_key)

    def _measured(self, batch: Batch, n_proteins: int) -> jax.Array:
        """``(B, P)`` bool: whether each protein was measured in each cell's batch."""
        table = numpyro.param("protein_measured", jnp.ones((batch.n_batches, n_proteins)))
        return jax.lax.stop_gradient(table)[batch.batch] > 0.5

    def _background_prior(self, batch: Batch, n_proteins: int) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)`` of each cell's ``log beta``, ``(B, P)`` each (learned params)."""
        loc = numpyro.param("background_prior_loc", jnp.zeros((batch.n_batches, n_proteins)))
        scale = numpyro.param("background_prior_scale", jnp.ones((batch.n_batches, n_proteins)),
                              constraint=constraints.positive)
        return loc[batch.batch], scale[batch.batch]

    def _imputation_prior(self, batch: Batch, n_proteins: int) -> tuple[jax.Array, jax.Array]:
        """``(loc, scale)`` tables ``(n_batches, P)`` of ``log beta`` for the outputs.

        A batch's own (learned) prior where it measured the protein; where it
        did not, the mean prior of the batches that did (all batches' if none
        did), so that imputed proteins are on the measured scale, also for
        batches added later (:func:`lvmzoo.analysis.map_query`).
        """
        loc = numpyro.param("background_prior_loc", jnp.zeros((batch.n_batches, n_proteins)))
        scale = numpyro.param("background_prior_scale", jnp.ones((batch.n_batches, n_proteins)),
                              constraint=constraints.positive)
        table = jax.lax.stop_gradient(
            numpyro.param("protein_measured", jnp.ones((batch.n_batches, n_proteins))))
        measured = table > 0.5
        weight = jnp.where(measured.any(0), measured.astype(loc.dtype), 1.0)
        weight = weight / weight.sum(0)
        pooled_loc, pooled_scale = (weight * loc).sum(0), (weight * scale).sum(0)
        return jnp.where(measured, loc, pooled_loc), jnp.where(measured, scale, pooled_scale)

    def _protein_generate(self, z, log_background, batch: Batch, codes, phi_table,
                          training: bool) -> ProteinGenerative:
        """Protein decoder outputs for ``z`` ``(..., B, K)`` and ``log beta`` ``(..., B, P)``."""
        n_proteins = log_background.shape[-1]
        code = _one_hot(codes, batch.n_batches)
        module = ProteinDecoder(n_proteins, hidden=self._hidden, batch_norm=self.use_batch_norm,
                                freeze_batch_norm=self.freeze_batch_norm)
        example_code = None if code is None else jnp.zeros((1, code.shape[-1]))
        decoder = flax_module("protein_decoder", module, jnp.zeros((1, self.n_latent)),
                              example_code, mutable=self._mutable)
        if code is not None:  # broadcast draws against (counterfactual) batch codes
            cells = jnp.broadcast_shapes(z.shape[:-1], code.shape[:-1])
            z = jnp.broadcast_to(z, cells + z.shape[-1:])
            code = jnp.broadcast_to(code, cells + code.shape[-1:])
        log_alpha, mixing = decoder(z, code, training=training)
        phi = phi_table[codes] if self.protein_dispersion == "protein-batch" else phi_table
        return ProteinGenerative(log_background, log_background + log_alpha, mixing, phi)

    def init_params(self, batch: Batch, key: jax.Array) -> Optional[dict]:
        """The protein mask and background prior from the data (plus scVI's library prior).

        For each batch of ``batch`` (the driver's sample of training cells): a
        protein is measured iff some cell has a count of it; the prior of
        ``log beta`` is the lower component of a two-component Gaussian mixture
        fitted by EM to ``log(1 + y)`` (mean and sd, sd at least
        :data:`MIN_BACKGROUND_SCALE`).  An unmeasured protein's prior (never
        trained: it is masked) is the mean over the batches that measured it,
        so that imputed values are on the measured scale.  A batch absent from
        the sample counts every protein as measured, with the pooled prior.
        """
        start = dict(super().init_params(batch, key) or {})
        y = np.asarray(self._proteins(batch), np.float64)
        codes = np.asarray(batch.batch)
        n_proteins = y.shape[1]
        pooled_loc, pooled_scale = _background_mixture(np.log1p(y))
        measured = np.ones((batch.n_batches, n_proteins), np.float32)
        loc = np.tile(pooled_loc, (batch.n_batches, 1))
        scale = np.tile(pooled_scale, (batch.n_batches, 1))
        for b in np.unique(codes):
            values = y[codes == b]
            measured[b] = (values.sum(0) > 0).astype(np.float32)
            if values.shape[0] > 1:
                loc[b], scale[b] = _background_mixture(np.log1p(values))
        for p in range(n_proteins):  # unmeasured: the prior of the batches that measured it
            seen = measured[:, p] > 0
            if seen.any() and not seen.all():
                loc[~seen, p] = loc[seen, p].mean()
                scale[~seen, p] = scale[seen, p].mean()
        start.update(protein_measured=jnp.asarray(measured),
                     background_prior_loc=jnp.asarray(loc, jnp.float32),
                     background_prior_scale=jnp.asarray(
                         np.maximum(scale, MIN_BACKGROUND_SCALE), jnp.float32))
        return start

    # ------------------------------------------------------------------
    # Variational family
    # ------------------------------------------------------------------

    def guide(self, batch: Batch) -> None:
        loc, scale = self._encode(batch, "encoder", self.n_latent)
        if self.latent_library:
            library_loc, library_scale = self._encode(batch, "library_encoder", 1)
        n_proteins = self._proteins(batch).shape[-1]
        measured = self._measured(batch, n_proteins)
        background_loc, background_scale = self._background_posterior(batch, n_proteins)
        with cell_plate(batch):
            with self._kl_warmup(batch):
                numpyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if self.latent_library:
                numpyro.sample("log_library", dist.Normal(library_loc[..., 0], library_scale[..., 0]))
            with self._kl_warmup(batch):
                numpyro.sample(
                    "log_background",
                    dist.Normal(background_loc, background_scale).mask(measured).to_event(1))

    def _encoder_input(self, batch: Batch) -> jax.Array:
        """``[log(1 + x), log(1 + y) * measured]``, ``(B, G + P)``: unmeasured proteins read 0."""
        y = self._proteins(batch)
        measured = self._measured(batch, y.shape[-1])
        return jnp.concatenate([jnp.log1p(batch.x), jnp.where(measured, jnp.log1p(y), 0.0)], -1)

    def _encode(self, batch: Batch, name: str, n_out: int) -> tuple[jax.Array, jax.Array]:
        """scVI's encoder (``(loc, scale)``, each ``(B, n_out)``) on RNA and measured proteins."""
        h = self._encoder_input(batch)
        code = _one_hot(batch.batch, batch.n_batches) if self.encode_batch else None
        module = GaussianEncoder(n_out, hidden=self._hidden, dropout_rate=self.dropout_rate,
                                 batch_norm=self.use_batch_norm,
                                 freeze_batch_norm=self.freeze_batch_norm)
        encoder = flax_module(name, module, h, code, apply_rng=["dropout"], mutable=self._mutable)
        if batch.training:
            return encoder(h, code, training=True, rngs={"dropout": numpyro.prng_key()})
        return encoder(h, code, training=False)

    def _background_posterior(self, batch: Batch, n_proteins: int):
        """``q(log beta | x, y)``: ``(loc, scale)``, ``(B, P)``, centred on the prior mean."""
        delta, scale = self._encode(batch, "background_encoder", n_proteins)
        prior_loc = numpyro.param("background_prior_loc", jnp.zeros((batch.n_batches, n_proteins)))
        return jax.lax.stop_gradient(prior_loc)[batch.batch] + delta, scale

    # ------------------------------------------------------------------
    # Outputs (evaluation mode, traceable)
    # ------------------------------------------------------------------

    def protein_outputs(self, params, batch: Batch, key: jax.Array,
                        n_samples: int = 25) -> dict[str, jax.Array]:
        """Per-cell protein outputs, each ``(B, P)``, averaged over ``n_samples`` posterior draws.

        Returns:
          ``{"foreground_probability": P(foreground | y) (prior 1 - pi where
          unmeasured), "denoised": (1 - pi) alpha beta, "background": beta}``.
        """
        batch = batch.replace(training=False)
        key_z, key_background = jax.random.split(key)
        z, _ = self.sample_posterior(params, batch, key_z, n_samples)
        y = self._proteins(batch)

        def decode():
            n_proteins = y.shape[-1]
            measured = self._measured(batch, n_proteins)
            loc, scale = self._background_posterior(batch, n_proteins)
            loc_table, scale_table = self._imputation_prior(batch, n_proteins)
            prior_loc, prior_scale = loc_table[batch.batch], scale_table[batch.batch]
            # Unmeasured proteins: the background from its prior (q was never trained there).
            loc, scale = jnp.where(measured, loc, prior_loc), jnp.where(measured, scale, prior_scale)
            noise = jax.random.normal(key_background, (n_samples,) + loc.shape)
            log_background = loc + scale * noise
            phi_table = params["protein_inverse_dispersion"]
            out = self._protein_generate(z, log_background, batch, batch.batch, phi_table, False)
            posterior = out.distribution().foreground_probability(y)
            prior = jax.nn.sigmoid(-out.mixture_logits)
            foreground = jnp.where(measured, posterior, prior)
            denoised = prior * jnp.exp(out.log_foreground)
            return {"foreground_probability": foreground.mean(0), "denoised": denoised.mean(0),
                    "background": jnp.exp(log_background).mean(0)}

        return _with_params(decode, params)()

    def denoised_protein(self, params, batch: Batch, key: jax.Array, n_samples: int = 25,
                         transform_batch=None) -> jax.Array:
        """Foreground-only protein expression ``(1 - pi) alpha beta``, ``(B, P)``.

        Averaged over ``n_samples`` draws of ``(z, log beta)`` from the guide
        (evaluation mode).  With ``transform_batch`` (a code or ``(n,)`` codes)
        every cell is decoded *as if* from each of those batches: the decoder
        reads that batch's code and the cell's background moves with the
        batches' background priors (``log beta + mu_{b'} - mu_b``); a protein's
        decodings are averaged over the given batches that measured it (over
        all of them when none did).  ``None`` keeps each cell's own batch.
        """
        batch = batch.replace(training=False)
        key_z, key_background = jax.random.split(key)
        z, _ = self.sample_posterior(params, batch, key_z, n_samples)
        n_proteins = self._proteins(batch).shape[-1]

        def decode():
            measured = self._measured(batch, n_proteins)
            loc, scale = self._background_posterior(batch, n_proteins)
            loc_table, scale_table = self._imputation_prior(batch, n_proteins)
            prior_loc, prior_scale = loc_table[batch.batch], scale_table[batch.batch]
            loc, scale = jnp.where(measured, loc, prior_loc), jnp.where(measured, scale, prior_scale)
            log_background = loc + scale * jax.random.normal(key_background,
                                                             (n_samples,) + loc.shape)
            phi_table = params["protein_inverse_dispersion"]
            if transform_batch is None:
                out = self._protein_generate(z, log_background, batch, batch.batch, phi_table,
                                             False)
                return (jax.nn.sigmoid(-out.mixture_logits) * jnp.exp(out.log_foreground)).mean(0)
            targets = jnp.reshape(jnp.asarray(transform_batch, jnp.int32), (-1,))
            # (n, 1, B, P): each target batch's background prior relative to the cell's own.
            shift = (loc_table[targets][:, None, None, :] - prior_loc[None, None])
            codes = targets[:, None, None]
            out = self._protein_generate(z[None], log_background[None] + shift, batch, codes,
                                         phi_table, False)
            value = (jax.nn.sigmoid(-out.mixture_logits) * jnp.exp(out.log_foreground)).mean(1)
            weight = jax.lax.stop_gradient(
                numpyro.param("protein_measured", jnp.ones((batch.n_batches, n_proteins))))
            weight = (weight[targets] > 0.5).astype(value.dtype)  # (n, P)
            weight = jnp.where(weight.sum(0) > 0, weight, 1.0)
            weight = weight / weight.sum(0)
            return jnp.einsum("nbp,np->bp", value, weight)

        return _with_params(decode, params)()

    def annotate(self, adata, params, latent, data) -> list[str]:
        """Adds ``obsm["totalvi_protein_foreground_probability"]`` and
        ``obsm["totalvi_denoised_protein"]`` (cells × proteins DataFrames, 25 draws per cell)."""
        outputs = _map_chunks(lambda batch, key: _protein_program(self, params, batch, key), data)
        start = data.registry.obsm_keys.index(self.protein_key)
        names = list(data.registry.obsm_columns[start])
        for key, field in ((FOREGROUND_KEY, "foreground_probability"), (DENOISED_KEY, "denoised")):
            adata.obsm[key] = pd.DataFrame(outputs[field], index=adata.obs_names, columns=names)
        return [f'obsm["{FOREGROUND_KEY}"]', f'obsm["{DENOISED_KEY}"]']

    def annotate_per_gene(self, adata, params, data) -> list[str]:
        """Adds ``layers["totalvi_normalized"]``: RNA ``rho`` per 10,000 counts (10 draws per cell)."""
        rho = _map_chunks(lambda batch, key: _expression_program(self, params, batch, key), data)
        adata.layers[NORMALIZED_LAYER] = (rho * NORMALIZED_SCALE).astype(np.float32)
        return [f'layers["{NORMALIZED_LAYER}"]']


def _background_mixture(log_counts: np.ndarray, n_iter: int = 50):
    """Mean and sd ``(P,)`` of the lower component of a 2-Gaussian mixture per column (EM)."""
    n, _ = log_counts.shape
    loc = np.stack([np.quantile(log_counts, 0.1, axis=0), np.quantile(log_counts, 0.9, axis=0)])
    spread = np.maximum(log_counts.std(0), 1e-2)
    scale = np.stack([spread, spread]) / 2 + 1e-2
    weight = np.full((2, log_counts.shape[1]), 0.5)
    for _ in range(n_iter):
        log_density = (-0.5 * ((log_counts[None] - loc[:, None]) / scale[:, None]) ** 2
                       - np.log(scale[:, None]) + np.log(weight[:, None]))
        resp = np.exp(log_density - np.logaddexp(log_density[0], log_density[1])[None])
        total = resp.sum(1) + 1e-8
        weight = np.clip(total / n, 1e-3, None)
        loc = (resp * log_counts[None]).sum(1) / total
        scale = np.sqrt((resp * (log_counts[None] - loc[:, None]) ** 2).sum(1) / total) + 1e-2
    lower = np.argmin(loc, axis=0)
    columns = np.arange(log_counts.shape[1])
    return loc[lower, columns], scale[lower, columns]


def _map_chunks(program, data, chunk: int = 1024):
    """``program(batch, key)`` over chunks of cells of ``data`` (a pytree of ``(B, ...)``), joined."""
    source = DeviceSource(data)
    key = jax.random.PRNGKey(0)
    outputs = []
    for start in range(0, data.n_cells, chunk):
        batch = source.full_batch(np.arange(start, min(start + chunk, data.n_cells)))
        outputs.append(jax.tree.map(np.asarray, program(batch, jax.random.fold_in(key, start))))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


@functools.partial(jax.jit, static_argnames=("model",))
def _protein_program(model: TotalVI, params, batch: Batch, key: jax.Array):
    return model.protein_outputs(params, batch, key, n_samples=25)
