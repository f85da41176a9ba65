"""LinearSCVI: scVI with a linear decoder, whose weights are gene loadings (Svensson et al., 2020).

Generative story, for each cell ``c`` in batch ``b`` (``s_b`` its one-hot code)::

    z ~ N(0, I_K)
    log l ~ N(m_b, v_b)                                # latent_library=True (default)
    eta = BN(W [z, s_b])                               # linear in z; BN: per-gene batch norm
    rho = softmax(eta)                                 # expression frequencies
    x_g ~ NB(l * rho_g, theta_g)                       # or ZINB / Poisson, as scVI

``W`` is ``(K + n_batches) × G`` with no bias (scvi-tools' ``bias=False``);
batch norm over the ``G`` outputs (on by default, as scvi-tools) is an affine
map per gene, ``BN(y)_g = gamma_g (y_g - mean_g) / sqrt(var_g + eps) + beta_g``,
so at evaluation ``eta`` stays linear in ``z`` with slope
``W_kg * gamma_g / sqrt(var_g + eps)``: the *loadings*
(:meth:`LinearSCVI.loadings`, genes × ``K``).  A gene with a large positive
loading on ``Z_k`` rises with factor ``k``, relative to the other genes.

Everything else is scVI (:mod:`lvmzoo.models.scvi`): the amortised encoder
(non-linear, with ``n_layers`` hidden layers), the likelihoods, the library
model, KL warm-up and batch-norm state.  Defaults follow scvi-tools'
``LinearSCVI``: NB likelihood, per-gene dispersion, a latent library size
with a per-batch log-normal prior, batch norm in encoder and decoder.

Differences from scvi-tools' ``LDVAE``: the zero-inflation head (zinb) is
linear with its own batch norm as there, and a ``gene-cell`` dispersion is a
softplus of one more linear head (scvi-tools' linear decoder has none).

References:
  Svensson, V., Gayoso, A., Yosef, N. & Pachter, L. (2020). Interpretable
  factor models of single-cell RNA-seq via variational autoencoders.
  Bioinformatics 36, 3418–3421. https://doi.org/10.1093/bioinformatics/btaa169
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lvmzoo.models.likelihoods import COUNT_LIKELIHOODS
from lvmzoo.models.scvi import MIN_DISPERSION, SCVI, DecoderOutput
from lvmzoo.nn.mlp import BATCH_NORM_EPSILON, Dense, batch_norm

LOADINGS_VARM = "linear_scvi_loadings"


class LinearDecoder(nn.Module):
    """``[z, s] -> heads``, each head ``BN(W [z, s])``: linear, no bias, optional per-gene BN."""

    n_genes: int
    batch_norm: bool = True
    freeze_batch_norm: bool = False
    dispersion_head: bool = False
    dropout_head: bool = False

    @nn.compact
    def __call__(self, z, covariate=None, training: bool = False) -> DecoderOutput:
        h = z if covariate is None else jnp.concatenate([z, covariate], axis=-1)

        def head(name):
            y = Dense(self.n_genes, use_bias=False, name=name)(h)
            if self.batch_norm:
                y = batch_norm(y, training, self.freeze_batch_norm, name=f"{name}_norm")
            return y

        dispersion = dropout = None
        if self.dispersion_head:
            dispersion = nn.softplus(head("dispersion")) + MIN_DISPERSION
        if self.dropout_head:
            dropout = head("dropout")
        return DecoderOutput(head("expression"), dispersion, dropout)


@dataclasses.dataclass(frozen=True)
class LinearSCVI(SCVI):
    """LinearSCVI: scVI with a linear decoder; its weights are gene loadings.

    ``n_latent``, ``n_hidden``, ``dropout_rate``, ``dispersion``, ``encode_batch``,
    ``n_epochs_kl_warmup``, ``kl_weight``, ``freeze_batch_norm``: as :class:`SCVI`.

    Args:
      n_layers: hidden layers of the encoder(s); the decoder is always linear.
      likelihood: ``"nb"`` (default, as scvi-tools' ``LinearSCVI``), ``"zinb"``
        or ``"poisson"``.
      latent_library: default ``True`` (scvi-tools' ``use_observed_lib_size=False``).
      use_batch_norm: batch norm in the encoder's hidden layers and on the
        decoder's outputs (folded into :meth:`loadings`).
    """

    likelihood: str = "nb"
    latent_library: bool = True

    name: ClassVar[str] = "linear_scvi"

    @property
    def _mutable(self) -> Optional[list[str]]:
        # The decoder normalises its outputs even without hidden layers.
        return ["batch_stats"] if self.use_batch_norm else None

    def _decoder_module(self, n_genes: int) -> nn.Module:
        return LinearDecoder(
            n_genes,
            batch_norm=self.use_batch_norm,
            freeze_batch_norm=self.freeze_batch_norm,
            dispersion_head=self._needs_dispersion and self.dispersion == "gene-cell",
            dropout_head=COUNT_LIKELIHOODS[self.likelihood].needs_dropout,
        )

    def loadings(self, params, gene_names) -> pd.DataFrame:
        """Gene loadings ``d eta_g / d z_k``: ``W`` with the decoder's batch-norm scale folded in.

        Args:
          params: fitted params.
          gene_names: the ``G`` gene names (the registry's), the index.

        Returns:
          ``(G, n_latent)`` DataFrame with columns ``Z_0 … Z_{K-1}``; the batch
          rows of ``W`` are dropped.
        """
        decoder = params["decoder$params"]
        weights = np.asarray(decoder["expression"]["kernel"], np.float64)[: self.n_latent].T
        if self.use_batch_norm:
            variance = np.asarray(params["decoder$state"]["batch_stats"]["expression_norm"]["var"],
                                  np.float64)
            gamma = np.asarray(decoder["expression_norm"]["scale"], np.float64)
            weights = weights * (gamma / np.sqrt(variance + BATCH_NORM_EPSILON))[:, None]
        columns = [f"Z_{k}" for k in range(self.n_latent)]
        return pd.DataFrame(weights, index=pd.Index(list(gene_names)), columns=columns)

    def annotate(self, adata, params, latent, data) -> list[str]:
        """Adds ``varm["linear_scvi_loadings"]`` (G × K); scVI's layer comes from
        :meth:`annotate_per_gene`."""
        keys = super().annotate(adata, params, latent, data)
        adata.varm[LOADINGS_VARM] = self.loadings(params, data.registry.gene_names).to_numpy(
            np.float32)
        return [*keys, f'varm["{LOADINGS_VARM}"]']
