"""Proteins of a fitted totalVI: per-cell outputs and differential expression.

:func:`protein_differential_expression` runs the existing Bayesian DE
(:func:`lvmzoo.analysis.de.differential_expression`, unchanged) on the
proteins of a fitted :class:`~lvmzoo.models.TotalVI`, through a *protein
view* (:func:`protein_view`) of the fitted model and of its cells:

* the view's cells have the protein counts as their matrix (so the DE's raw
  statistics, ``raw_mean`` and ``non_zeros_proportion``, are those of the
  protein counts) and the RNA counts as an extra ``obsm`` block that the
  model reads back;
* the view's registry names the proteins as its "genes";
* the view model's ``expression`` is totalVI's denoised, foreground-only
  protein expression ``(1 - pi) alpha beta``
  (:meth:`~lvmzoo.models.TotalVI.denoised_protein`), so the DE compares the
  proteins' foreground levels, background (ambient antibody) removed.  With
  batch correction a cell is decoded as if from each batch of the two groups
  and a protein's decodings are averaged over those batches that measured it;
* a prior count (``prior_count``, default 0.1, as scvi-tools' totalVI DE)
  is added to that expression, so that a protein whose foreground is near
  zero in both groups does not get a huge fold change from tiny numbers.

Unlike RNA's ``rho`` the denoised proteins are counts, not frequencies that
sum to one: ``scale1``/``scale2`` are expected foreground counts, and in
``mode="change"`` an estimated pseudocount is on that scale (pass
``pseudocounts=`` to set it).

The view holds the RNA densely (cells × genes float32): fine for the CITE-seq
experiments of today (10⁴–10⁵ cells × a few thousand genes); cells on disk
are read into memory first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import numpy as np
import pandas as pd

from lvmzoo.data.registry import CellData, DataError

RNA_KEY = "_totalvi_rna_counts"  # the view's obsm block holding the RNA counts


@dataclasses.dataclass(frozen=True)
class ProteinModel:
    """A fitted TotalVI seen from its proteins (what :mod:`lvmzoo.analysis.de` reads).

    ``expression(params, batch, key, n_samples, transform_batch)`` is the
    denoised foreground protein expression of the view's cells; ``guide``,
    ``sample_posterior``, ``generative`` and ``observation`` are the
    underlying model's (the view decodes through it).
    """

    totalvi: Any
    prior_count: float = 0.0
    name: ClassVar[str] = "totalvi_proteins"

    @property
    def guide(self):
        return self.totalvi.guide

    def __getattr__(self, attribute):  # sample_posterior, generative, observation, ...
        if attribute in ("totalvi", "prior_count"):  # not yet set (copy / unpickling)
            raise AttributeError(attribute)
        return getattr(self.totalvi, attribute)

    def rna_batch(self, batch):
        """The view's batch back as the model's: RNA as ``x``, the original ``obsm`` blocks."""
        keys, sizes = batch.obsm_keys, batch.obsm_sizes
        i = keys.index(RNA_KEY)
        start = sum(sizes[:i])
        obsm = batch.obsm[:, :start]  # the RNA block is the last one
        return batch.replace(x=batch.obsm[:, start:start + sizes[i]], obsm=obsm,
                             obsm_keys=keys[:i], obsm_sizes=sizes[:i])

    def expression(self, params, batch, key, n_samples: int = 25, transform_batch=None,
                   library_size: Optional[float] = 1.0):
        """Denoised foreground protein expression plus ``prior_count``, ``(B, P)``
        (``library_size`` scales it)."""
        value = self.totalvi.denoised_protein(params, self.rna_batch(batch), key, n_samples,
                                              transform_batch) + self.prior_count
        return value if library_size is None else value * library_size


@dataclasses.dataclass(frozen=True)
class ProteinFitted:
    """The fitted-model face of the view: ``model``, ``guide``, ``params``, ``registry``."""

    model: ProteinModel
    params: Any
    registry: Any

    @property
    def guide(self):
        return self.model.guide


@dataclasses.dataclass(frozen=True)
class ProteinEnsemble:
    """The view of a seed ensemble of totalVI fits: one :class:`ProteinFitted` per replicate."""

    members: tuple

    @property
    def registry(self):
        return self.members[0].registry


def _protein_key(fitted) -> str:
    from lvmzoo.models.totalvi import TotalVI

    fitted = getattr(fitted, "members", [fitted])[0]  # a seed ensemble: its first replicate
    model = fitted.model
    if not isinstance(model, TotalVI):
        raise TypeError(f"protein outputs need a fitted totalvi model, got {model.name!r}")
    if model.protein_key not in fitted.registry.obsm_keys:
        raise DataError(f"the model's registry has no obsm[{model.protein_key!r}] (its proteins)")
    return model.protein_key


def protein_names(fitted) -> tuple[str, ...]:
    """The proteins of a fitted totalVI, in the model's order."""
    key = _protein_key(fitted)
    registry = fitted.registry
    return tuple(registry.obsm_columns[registry.obsm_keys.index(key)])


def protein_view(fitted, data: CellData, prior_count: float = 0.1
                 ) -> tuple[ProteinFitted, CellData]:
    """``(fitted, data)`` seen from the proteins; see the module docstring.

    Args:
      fitted: a fitted :class:`~lvmzoo.models.TotalVI`.
      data: its cells, registered against ``fitted.registry`` (the training
        data or ``lvmzoo.query_anndata(adata, fitted.registry)``).
      prior_count: added to the denoised protein expression (counts).

    Returns:
      ``(view_fitted, view_data)``: any function of :mod:`lvmzoo.analysis.de`
      takes them in place of ``(fitted, data)``.  For a seed ensemble of
      totalVI fits the view is one of its replicates' views (``members``).
    """
    key = _protein_key(fitted)
    names = protein_names(fitted)
    if tuple(data.registry.gene_names) != tuple(fitted.registry.gene_names) or \
            tuple(data.registry.obsm_keys) != tuple(fitted.registry.obsm_keys):
        raise DataError("the cells were registered with other genes or obsm matrices than the "
                        "model's; register them with lvmzoo.query_anndata(adata, fitted.registry)")
    data = data.to_memory()
    registry = fitted.registry
    view_registry = dataclasses.replace(
        registry, gene_names=names, gene_symbols_key=None, gene_symbols=(),
        obsm_keys=(*registry.obsm_keys, RNA_KEY),
        obsm_kinds=(*registry.obsm_kinds, "counts"),
        obsm_columns=(*registry.obsm_columns, tuple(registry.gene_names)))
    data_registry = dataclasses.replace(
        data.registry, gene_names=names, gene_symbols_key=None, gene_symbols=(),
        obsm_keys=view_registry.obsm_keys,
        obsm_kinds=view_registry.obsm_kinds, obsm_columns=view_registry.obsm_columns)
    proteins = np.ascontiguousarray(data.obsm_matrix(key), np.float32)
    rna = np.asarray(data.dense_x(), np.float32)
    view_data = dataclasses.replace(
        data, x=proteins, registry=data_registry,
        obsm=np.concatenate([np.asarray(data.obsm, np.float32), rna], axis=1))
    if hasattr(fitted, "members"):  # a seed ensemble: every replicate seen from its proteins
        return ProteinEnsemble(tuple(
            ProteinFitted(ProteinModel(m.model, prior_count), m.params, view_registry)
            for m in fitted.members)), view_data
    return (ProteinFitted(ProteinModel(fitted.model, prior_count), fitted.params, view_registry),
            view_data)


def protein_differential_expression(fitted, data: CellData, groupby, group1=None,
                                    group2=None, *, prior_count: float = 0.1,
                                    **kwargs) -> pd.DataFrame:
    """Bayesian differential expression of every protein between two groups of cells.

    :func:`lvmzoo.analysis.de.differential_expression` (same arguments, same
    columns) on :func:`protein_view`: one row per protein (index: protein
    names), comparing denoised foreground protein expression plus ``prior_count``.
    """
    from lvmzoo.analysis.de import differential_expression

    view, view_data = protein_view(fitted, data, prior_count)
    return differential_expression(view, view_data, groupby, group1, group2, **kwargs)


def protein_outputs(fitted, data: CellData, n_samples: int = 25,
                    seed: int = 0) -> dict[str, pd.DataFrame]:
    """Per-cell protein outputs of a fitted totalVI, cells × proteins DataFrames.

    Returns:
      ``{"foreground_probability", "denoised", "background"}``: see
      :meth:`lvmzoo.models.TotalVI.protein_outputs` (index: the cells' names).
    """
    from lvmzoo.data.source import DeviceSource

    _protein_key(fitted)
    names = list(protein_names(fitted))
    if tuple(data.registry.obsm_keys) != tuple(fitted.registry.obsm_keys):
        raise DataError("the cells were registered with other obsm matrices than the model's; "
                        "register them with lvmzoo.query_anndata(adata, fitted.registry)")
    data = data.to_memory()
    source = DeviceSource(data)
    key = jax.random.PRNGKey(seed)
    parts = []
    for start in range(0, data.n_cells, 1024):
        batch = source.full_batch(np.arange(start, min(start + 1024, data.n_cells)))
        out = _outputs_program(fitted.model, fitted.params, batch,
                               jax.random.fold_in(key, start), n_samples)
        parts.append(jax.tree.map(np.asarray, out))
    index = pd.Index(np.asarray(data.obs_names).astype(str))
    return {field: pd.DataFrame(np.concatenate([p[field] for p in parts]), index=index,
                                columns=names)
            for field in ("foreground_probability", "denoised", "background")}


def _outputs(model, params, batch, key, n_samples):
    return model.protein_outputs(params, batch, key, n_samples=n_samples)


_outputs_program = jax.jit(_outputs, static_argnames=("model", "n_samples"))
