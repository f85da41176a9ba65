"""The one place where AnnData becomes model input.

:func:`setup_anndata` validates an AnnData once and returns :class:`CellData`:
host arrays (dense or CSR, never densified here) plus a frozen
:class:`DataRegistry` describing them (which layer, gene names, category →
index maps, the transform).  The registry is saved with every fitted model;
:func:`query_anndata` validates new cells against it, so a model is never fed
genes or categories it has not seen.

Nothing here writes to the user's AnnData.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lvmzoo.data.backed import SCAN_BLOCK, BackedMatrix, backed_matrix, is_on_disk
from lvmzoo.data.compact import CompactCSR
from lvmzoo.data.transforms import TRANSFORMS, apply_transform

KINDS = ("counts", "continuous", "binary")


class DataError(ValueError):
    """Input data that a model cannot be fitted to; the message says how to fix it."""


class DataWarning(UserWarning):
    """Input data that is usable but worth knowing about (e.g. genes never observed)."""


# query_anndata(missing_genes="zero") refuses data sharing fewer of the model's genes.
MIN_SHARED_GENES = 0.5
# The label value that means "unlabelled" unless setup_anndata is told otherwise (scvi-tools' name).
UNLABELED_CATEGORY = "Unknown"


@dataclasses.dataclass(frozen=True)
class DataRegistry:
    """Immutable description of registered data, saved alongside a fitted model.

    Attributes:
      kind: what the *input* values are: ``"counts"`` (non-negative integers),
        ``"continuous"`` or ``"binary"`` (0/1).
      transform: name of the host transform applied after validation
        (see :mod:`lvmzoo.data.transforms`).
      layer: AnnData layer holding the observations, ``None`` for ``.X``.
      batch_key / labels_key: ``obs`` columns, or ``None``.
      covariate_keys: continuous ``obs`` columns passed to models as covariates.
      gene_names: ``(n_genes,)`` feature names, in model order.
      batch_categories: batch names; index ``i`` is batch code ``i``.  A single
        ``"all"`` category when there is no batch key.
      label_categories: label names; unlabelled cells get code ``-1``.
      n_obs: number of cells at registration.
      unlabeled_category: the label value that means "unlabelled" (like a
        missing value); not one of ``label_categories``.
      categorical_covariate_keys: categorical ``obs`` columns passed to models
        as integer codes (e.g. a perturbation and a cell type), as scvi-tools'
        ``categorical_covariate_keys``.
      categorical_covariate_categories: for each of those keys, its category
        names; index ``i`` is code ``i``.
      obsm_keys: ``obsm`` matrices carried per cell to models (e.g. scvi-tools'
        ``"protein_expression"``), as ``Batch.obsm``, one block of columns each.
      obsm_kinds: for each of those keys, what its values are (``"counts"`` or
        ``"continuous"``; see :func:`setup_anndata`).
      obsm_columns: for each of those keys, its column names, in model order.
      gene_symbols_key: the ``var`` column of gene symbols (scanpy's
        ``gene_symbols``), ``None`` when the names are only ``var_names``.
      gene_symbols: ``(n_genes,)`` that column's values, in model order (``()``
        without one); :meth:`gene_positions` accepts them beside ``var_names``.
    """

    kind: str
    transform: str
    layer: Optional[str]
    batch_key: Optional[str]
    labels_key: Optional[str]
    covariate_keys: tuple[str, ...]
    gene_names: tuple[str, ...]
    batch_categories: tuple[str, ...]
    label_categories: tuple[str, ...]
    n_obs: int
    unlabeled_category: Optional[str] = None
    categorical_covariate_keys: tuple[str, ...] = ()
    categorical_covariate_categories: tuple[tuple[str, ...], ...] = ()
    obsm_keys: tuple[str, ...] = ()
    obsm_kinds: tuple[str, ...] = ()
    obsm_columns: tuple[tuple[str, ...], ...] = ()
    gene_symbols_key: Optional[str] = None
    gene_symbols: tuple[str, ...] = ()

    def __post_init__(self):
        if self.gene_symbols and len(self.gene_symbols) != len(self.gene_names):
            raise ValueError(f"{len(self.gene_symbols)} gene symbols for "
                             f"{len(self.gene_names)} genes")

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def n_batches(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataRegistry":
        tuples = {
            k: tuple(d[k])
            for k in ("covariate_keys", "gene_names", "batch_categories", "label_categories")
        }
        # Registries saved before categorical covariates existed have neither field.
        tuples["categorical_covariate_keys"] = tuple(d.get("categorical_covariate_keys", ()))
        tuples["categorical_covariate_categories"] = tuple(
            tuple(c) for c in d.get("categorical_covariate_categories", ()))
        # Nor obsm matrices.
        tuples["obsm_keys"] = tuple(d.get("obsm_keys", ()))
        tuples["obsm_kinds"] = tuple(d.get("obsm_kinds", ()))
        tuples["obsm_columns"] = tuple(tuple(c) for c in d.get("obsm_columns", ()))
        # Nor gene symbols.
        tuples["gene_symbols"] = tuple(d.get("gene_symbols", ()))
        # Registries saved before unlabeled_category existed treated every value as a label.
        return cls(**{"unlabeled_category": None, **d, **tuples})

    def gene_positions(self, genes: Sequence[str], what: str = "gene") -> tuple[int, ...]:
        """The model-order positions of ``genes``, each a ``var_names`` entry or, when
        symbols are registered (``gene_symbols_key``), a symbol naming one gene.

        Raises:
          DataError: a name that is neither (with a few of the names there are), or a
            symbol shared by several genes (give one of their ``var_names`` instead).
        """
        position = {name: i for i, name in enumerate(self.gene_names)}
        by_symbol: dict[str, list[int]] = {}
        for i, symbol in enumerate(self.gene_symbols):
            by_symbol.setdefault(symbol, []).append(i)
        found, missing = [], []
        for gene in map(str, genes):
            if gene in position:
                found.append(position[gene])
            elif len(by_symbol.get(gene, ())) == 1:
                found.append(by_symbol[gene][0])
            elif gene in by_symbol:
                names = ", ".join(self.gene_names[i] for i in by_symbol[gene][:4])
                raise DataError(f"{what} {gene!r} is the symbol of {len(by_symbol[gene])} "
                                f"genes ({names}); give one of these var_names instead")
            else:
                missing.append(gene)
        if missing:
            shown = ", ".join(self.gene_names[:3]) + (" ..." if self.n_genes > 3 else "")
            where = f"var_names ({shown})"
            if self.gene_symbols_key:
                symbols = ", ".join(self.gene_symbols[:3]) + (" ..." if self.n_genes > 3 else "")
                where += f" or var[{self.gene_symbols_key!r}] ({symbols})"
                fix = "check the spelling"
            else:
                fix = ("if var_names are IDs, name the var column of gene symbols: "
                       "--gene-symbols COLUMN (setup_anndata(..., gene_symbols_key=COLUMN))")
            raise DataError(f"{what}(s) {', '.join(map(repr, missing))} not in the data's "
                            f"{where}; {fix}")
        return tuple(found)

    def categorical_codes(self, key: str, values: Sequence[str]) -> np.ndarray:
        """Codes ``(n,)`` int32 of ``values`` of categorical covariate ``key``.

        Raises:
          DataError: ``key`` is not a registered categorical covariate, or a
            value is not one of its categories.
        """
        if key not in self.categorical_covariate_keys:
            raise DataError(
                f"{key!r} is not a categorical covariate of this registry; registered: "
                f"{', '.join(self.categorical_covariate_keys) or 'none'}")
        categories = self.categorical_covariate_categories[
            self.categorical_covariate_keys.index(key)]
        lookup = {c: i for i, c in enumerate(categories)}
        unknown = sorted({str(v) for v in values} - set(lookup))
        if unknown:
            raise DataError(f"obs[{key!r}] has no category {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(categories)}")
        return np.array([lookup[str(v)] for v in values], np.int32)


@dataclasses.dataclass(frozen=True)
class CellData:
    """Validated host arrays for ``n_cells`` cells, ready for a data source.

    Attributes:
      x: ``(n_cells, n_genes)`` float32 ndarray or CSR matrix, transformed; or
        a :class:`~lvmzoo.data.backed.BackedMatrix` when the AnnData's matrix
        is on disk (read in blocks, transformed as it is read); or a
        :class:`~lvmzoo.data.compact.CompactCSR` (counts in 4 bytes per
        stored entry; ``to_memory(compact=True)``).
      batch: ``(n_cells,)`` int32 batch codes.
      labels: ``(n_cells,)`` int32 label codes, ``-1`` for unlabelled.
      covariates: ``(n_cells, n_covariates)`` float32.
      obs_names: ``(n_cells,)`` cell names, to write results back.
      registry: the description the codes refer to.
      categorical_covariates: ``(n_cells, n_categorical_covariates)`` int32
        codes, one column per ``registry.categorical_covariate_keys``.
      obsm: ``(n_cells, n_obsm_columns)`` float32: the registered ``obsm``
        matrices (``registry.obsm_keys``) side by side.
    """

    x: Any
    batch: np.ndarray
    labels: np.ndarray
    covariates: np.ndarray
    obs_names: np.ndarray
    registry: DataRegistry
    categorical_covariates: Optional[np.ndarray] = None
    obsm: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.categorical_covariates is None:  # none registered: zero columns
            object.__setattr__(self, "categorical_covariates",
                               np.zeros((len(self.batch), 0), np.int32))
        if self.obsm is None:
            object.__setattr__(self, "obsm", np.zeros((len(self.batch), 0), np.float32))

    def obsm_matrix(self, key: str) -> np.ndarray:
        """``(n_cells, n_columns)`` float32 values of registered ``obsm`` matrix ``key``."""
        start, stop = _obsm_span(self.registry, key)
        return self.obsm[:, start:stop]

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]

    @property
    def n_genes(self) -> int:
        return self.x.shape[1]

    @property
    def is_sparse(self) -> bool:
        """Whether ``x`` is held as CSR (SciPy's, or a :class:`~lvmzoo.data.compact.CompactCSR`)."""
        return sp.issparse(self.x) or isinstance(self.x, CompactCSR)

    @property
    def is_backed(self) -> bool:
        """Whether ``x`` stays on disk (a backed ``.h5ad`` or a Zarr store)."""
        return isinstance(self.x, BackedMatrix)

    def to_memory(self, compact: bool = False) -> "CellData":
        """The same cells with ``x`` read into memory; itself if already there.

        ``x`` becomes a float32 CSR matrix, or with ``compact=True`` a
        :class:`~lvmzoo.data.compact.CompactCSR` where that is exact (counts in 4
        bytes per stored entry instead of 8; fits read it as the float32 matrix).
        """
        if not self.is_backed:
            return self
        return dataclasses.replace(self, x=self.x.to_compact() if compact
                                   else self.x.to_memory())

    def subset(self, index: np.ndarray) -> "CellData":
        """The cells at ``index`` (integer positions), as a new CellData."""
        index = np.asarray(index)
        return dataclasses.replace(
            self,
            x=self.x[index],
            batch=self.batch[index],
            labels=self.labels[index],
            covariates=self.covariates[index],
            obs_names=self.obs_names[index],
            categorical_covariates=self.categorical_covariates[index],
            obsm=self.obsm[index],
        )

    def dense_x(self) -> np.ndarray:
        if self.is_backed:
            return self.x.to_memory().toarray()
        return self.x.toarray() if self.is_sparse else np.asarray(self.x)

    @classmethod
    def from_arrays(
        cls,
        x,
        *,
        batch: Optional[Sequence] = None,
        labels: Optional[Sequence] = None,
        kind: str = "continuous",
        transform: str = "none",
        gene_names: Optional[Sequence[str]] = None,
    ) -> "CellData":
        """Register plain arrays (no AnnData) with the same validation.

        Args:
          x: ``(n_cells, n_genes)`` ndarray or scipy sparse matrix.
          batch / labels: optional ``(n_cells,)`` sequences of categories.
        """
        x = x if sp.issparse(x) else np.asarray(x)
        if x.ndim != 2:
            raise DataError(f"x must be 2-D (cells × genes), got shape {x.shape}")
        obs = pd.DataFrame(index=[str(i) for i in range(x.shape[0])])
        for key, values in (("batch", batch), ("labels", labels)):
            if values is not None:
                values = np.asarray(values)
                if values.shape != (x.shape[0],):
                    raise DataError(
                        f"{key} has shape {values.shape} but x has {x.shape[0]} cells; "
                        f"pass one {key} value per row of x"
                    )
                obs[key] = pd.Categorical(values.astype(str))
        var = pd.DataFrame(
            index=[str(g) for g in gene_names] if gene_names is not None
            else [f"feature_{j}" for j in range(x.shape[1])]
        )
        if len(var) != x.shape[1]:
            raise DataError(
                f"{len(var)} gene names for {x.shape[1]} columns of x; pass one name per column"
            )
        adata = ad.AnnData(X=x, obs=obs, var=var)
        return setup_anndata(
            adata,
            batch_key="batch" if batch is not None else None,
            labels_key="labels" if labels is not None else None,
            kind=kind,
            transform=transform,
        )


def setup_anndata(
    adata: ad.AnnData,
    *,
    layer: Optional[str] = None,
    batch_key: Optional[str] = None,
    labels_key: Optional[str] = None,
    covariate_keys: Sequence[str] = (),
    categorical_covariate_keys: Sequence[str] = (),
    kind: str = "counts",
    transform: str = "none",
    unlabeled_category: Optional[str] = UNLABELED_CATEGORY,
    obsm_keys: Sequence[str] = (),
    obsm_kinds: Optional[Sequence[str]] = None,
    gene_symbols_key: Optional[str] = None,
) -> CellData:
    """Validate ``adata`` and register it.

    Args:
      adata: cells × genes. Not modified.
      layer: layer with the observations; ``None`` uses ``adata.X``.
      batch_key: categorical ``obs`` column of batches (experiments, donors).
      labels_key: categorical ``obs`` column of cell labels; missing values
        and ``unlabeled_category`` mean "unlabelled" (code ``-1``).
      covariate_keys: numeric ``obs`` columns.
      categorical_covariate_keys: categorical ``obs`` columns (no missing
        values) that models read as integer codes, e.g. a perturbation and a
        cell type; ``Batch.categorical_covariates`` holds one column per key.
      kind: ``"counts"``, ``"continuous"`` or ``"binary"``: what the values are.
      transform: host transform applied after validation (e.g.
        ``"log1p_cp10k"`` for Gaussian models on counts).
      unlabeled_category: the label value marking unlabelled cells
        (scvi-tools' ``unlabeled_category``; default ``"Unknown"``); ``None``:
        only missing values do.
      obsm_keys: ``adata.obsm`` matrices (cells × columns, an array or a
        DataFrame) that models read per cell as ``Batch.obsm_matrix(key)``,
        e.g. scvi-tools' ``"protein_expression"`` for CITE-seq.  Column names
        come from a DataFrame's columns, else ``adata.uns[key + "_names"]``,
        else (for ``"<name>_expression"``) ``adata.uns["<name>_names"]``
        (scvi-tools' ``"protein_names"``), else ``"<key>_<i>"``.
      obsm_kinds: what each obsm matrix holds: ``"continuous"`` (default; any
        finite values) or ``"counts"`` (non-negative integers; cells may be
        all zero there, e.g. where a panel was not measured).
      gene_symbols_key: ``var`` column of gene symbols when ``var_names`` are IDs
        (scanpy's ``gene_symbols``): genes may then be named by symbol (marker
        genes) and outputs that name genes show them.

    Returns:
      CellData whose ``registry`` records all of the above.

    Raises:
      DataError: naming the problem and the fix.
    """
    # Structural checks (types, shapes, layers, keys, categories) come first and
    # are cheap; only then are the values scanned, so a missing key is reported
    # as such even when the values have problems too.
    x = _observations(adata, layer)
    _check_kind_and_transform(kind, transform)
    batch, batch_categories = _codes(adata, batch_key, "batch_key", allow_missing=False)
    labels, label_categories = _codes(adata, labels_key, "labels_key", allow_missing=True,
                                      unlabeled=unlabeled_category)
    if batch_key is None:
        batch_categories = ("all",)
    covariates = _covariates(adata, covariate_keys)
    categorical, categorical_categories = _categorical_covariates(
        adata, categorical_covariate_keys)
    obsm_keys = (obsm_keys,) if isinstance(obsm_keys, str) else tuple(obsm_keys)
    obsm_kinds = ("continuous",) * len(obsm_keys) if obsm_kinds is None else (
        (obsm_kinds,) if isinstance(obsm_kinds, str) else tuple(obsm_kinds))
    obsm, obsm_columns = _obsm(adata, obsm_keys, obsm_kinds)
    gene_symbols = _gene_symbols(adata, gene_symbols_key)
    _check_values(x, kind)
    registry = DataRegistry(
        kind=kind,
        transform=transform,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        covariate_keys=tuple(covariate_keys),
        gene_names=tuple(str(g) for g in adata.var_names),
        batch_categories=batch_categories,
        label_categories=label_categories,
        n_obs=adata.n_obs,
        unlabeled_category=unlabeled_category if labels_key is not None else None,
        categorical_covariate_keys=tuple(categorical_covariate_keys),
        categorical_covariate_categories=categorical_categories,
        obsm_keys=obsm_keys,
        obsm_kinds=obsm_kinds,
        obsm_columns=obsm_columns,
        gene_symbols_key=gene_symbols_key,
        gene_symbols=gene_symbols,
    )
    return _cell_data(adata, x, batch, labels, covariates, registry, categorical, obsm)


def _gene_symbols(adata, key: Optional[str]) -> tuple[str, ...]:
    """The ``var[key]`` gene symbols as strings (``()`` without a key)."""
    if key is None:
        return ()
    if key not in adata.var.columns:
        shown = ", ".join(map(str, adata.var.columns[:8])) or "none"
        raise DataError(f"gene_symbols_key {key!r} is not a var column (var columns: "
                        f"{shown}); name the column that holds the gene symbols")
    symbols = adata.var[key]
    if symbols.isna().any():
        raise DataError(f"var[{key!r}] has {int(symbols.isna().sum())} missing gene symbols; "
                        "fill them (e.g. with the var_names) before registering")
    return tuple(str(s) for s in symbols)


def query_anndata(
    adata: ad.AnnData,
    registry: DataRegistry,
    *,
    missing_genes: str = "error",
    min_shared_genes: float = MIN_SHARED_GENES,
    cells: Optional[np.ndarray] = None,
) -> CellData:
    """Validate new cells against a saved registry and encode them the same way.

    Genes are matched by name and put in the registry's order; extra genes are
    dropped.  Unknown batch or label categories are errors.

    Args:
      adata: the new cells. Not modified.
      registry: the registry saved with a fitted model.
      missing_genes: what to do with registry genes the data lacks:
        ``"error"`` (default, e.g. to score new cells) refuses them;
        ``"zero"`` (query mapping) fills them with zeros, with a
        :class:`DataWarning` saying how many; a gene that is zero in every
        query cell is what a count model expects of an unmeasured gene.
      min_shared_genes: with ``missing_genes="zero"``, the smallest share of
        the registry's genes the data must have (default 0.5); below it the
        query is refused, as zero-filling most of a profile would describe
        cells that were not measured.
      cells: increasing positions (or a boolean mask) of the cells to
        register, as ``adata[cells]`` but with a matrix on disk left there;
        the other cells are neither read nor checked.  ``None``: all.
    """
    if missing_genes not in ("error", "zero"):
        raise ValueError(f"missing_genes must be 'error' or 'zero', got {missing_genes!r}")
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"expected an AnnData, got {type(adata).__name__}")
    if not adata.var_names.is_unique:
        raise DataError("var_names are not unique; call adata.var_names_make_unique() first")
    present = set(map(str, adata.var_names))
    missing = [g for g in registry.gene_names if g not in present]
    if missing and missing_genes == "error":
        raise DataError(
            f"the data lacks {len(missing)} of the model's {registry.n_genes} genes "
            f"(e.g. {', '.join(missing[:5])}); subset or reorder it to the genes the "
            "model was trained on (saved in its registry)"
        )
    n_shared = registry.n_genes - len(missing)
    if missing and n_shared < min_shared_genes * registry.n_genes:
        raise DataError(
            f"the data has only {n_shared} of the model's {registry.n_genes} genes "
            f"({n_shared / registry.n_genes:.0%}; at least {min_shared_genes:.0%} needed); "
            "check that the gene names use the same convention (symbols vs Ensembl IDs)"
        )
    if missing:
        warnings.warn(
            f"the data lacks {len(missing)} of the model's {registry.n_genes} genes "
            f"(e.g. {', '.join(missing[:3])}); they are filled with zeros",
            DataWarning, stacklevel=2)
        adata = _with_zero_genes(adata, missing, registry.layer)
    if not np.array_equal(np.asarray(adata.var_names, dtype=str),
                          np.asarray(registry.gene_names, dtype=str)):
        # Subsetting genes reads the matrix: a backed file with the model's genes in the
        # model's order (e.g. the training file) stays on disk.
        adata = adata[:, list(registry.gene_names)]
    x = _observations(adata, registry.layer)
    if cells is not None:  # a view's obs; rows of the matrix by contiguous spans on disk
        x, adata = x[np.asarray(cells)], adata[np.asarray(cells)]
    batch, _ = _codes(
        adata, registry.batch_key, "batch_key", allow_missing=False,
        categories=registry.batch_categories if registry.batch_key else None,
    )
    labels, _ = _codes(
        adata, registry.labels_key, "labels_key", allow_missing=True,
        categories=registry.label_categories if registry.labels_key else None,
        unlabeled=registry.unlabeled_category,
    )
    covariates = _covariates(adata, registry.covariate_keys)
    categorical, _ = _categorical_covariates(
        adata, registry.categorical_covariate_keys, registry.categorical_covariate_categories)
    obsm, _ = _obsm(adata, registry.obsm_keys, registry.obsm_kinds, registry.obsm_columns)
    # New cells may well leave genes unobserved: no warning for those here.
    _check_values(x, registry.kind, warn_unobserved_genes=False)
    return _cell_data(adata, x, batch, labels, covariates, registry, categorical, obsm)


def _with_zero_genes(adata, genes, layer) -> ad.AnnData:
    """A new AnnData with ``genes`` appended as all-zero columns of ``layer`` (or X)."""
    x = adata.X if layer is None else adata.layers[layer] if layer in adata.layers else None
    if x is None:
        return adata  # _observations reports the missing layer
    if is_on_disk(x):  # read into memory, as a reordering of the genes is
        x = backed_matrix(x).to_memory()
    zeros = sp.csr_matrix((adata.n_obs, len(genes)), dtype=x.dtype)
    x = sp.hstack([sp.csr_matrix(x), zeros], format="csr")
    var = pd.DataFrame(index=pd.Index([*map(str, adata.var_names), *genes]))
    filled = ad.AnnData(X=x if layer is None else None, obs=adata.obs.copy(), var=var,
                        obsm=dict(adata.obsm), uns=dict(adata.uns))
    if layer is not None:
        filled.layers[layer] = x
    return filled


def _cell_data(adata, x, batch, labels, covariates, registry, categorical,
               obsm=None) -> CellData:
    if isinstance(x, BackedMatrix):
        x = x.with_transform(registry.transform)  # applied block by block as cells are read
    else:
        x = apply_transform(registry.transform, x)
        x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else np.asarray(x, np.float32)
    return CellData(
        x=x,
        batch=batch,
        labels=labels,
        covariates=covariates,
        obs_names=np.asarray(adata.obs_names),
        registry=registry,
        categorical_covariates=categorical,
        obsm=obsm,
    )


def _observations(adata, layer):
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"expected an AnnData, got {type(adata).__name__}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"the AnnData is empty ({adata.n_obs} cells × {adata.n_vars} genes); "
            "pass data with at least one cell and one gene"
        )
    if layer is None:
        x = adata.X
        if x is None:
            raise DataError("adata.X is empty; pass layer= naming the layer with the data")
    else:
        if layer not in adata.layers:
            raise DataError(
                f"layer {layer!r} not found; available layers: {sorted(adata.layers) or 'none'}"
            )
        x = adata.layers[layer]
    if is_on_disk(x):
        try:
            return backed_matrix(x)
        except ValueError as err:
            raise DataError(str(err)) from None
    if sp.issparse(x):
        return sp.csr_matrix(x)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape != (adata.n_obs, adata.n_vars):
        raise DataError(f"observations have shape {x.shape}, expected {adata.shape}")
    return x


def _check_kind_and_transform(kind, transform):
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; choose one of {KINDS}")
    if transform not in TRANSFORMS:
        raise DataError(f"unknown transform {transform!r}; choose one of {sorted(TRANSFORMS)}")
    if transform == "log1p_cp10k" and kind != "counts":
        raise DataError("transform 'log1p_cp10k' needs raw counts (kind='counts')")


def _check_values(x, kind, warn_unobserved_genes=True):
    """Scan the values: finite, and for counts non-negative integers in non-empty cells.

    Genes that are zero in every cell are normal (any subset of cells has
    some) and only draw a :class:`DataWarning`.  A matrix on disk is scanned
    block by block (never loaded whole); the counts in the messages are over
    all cells either way.  A matrix in memory is scanned in the same blocks of
    cells, so the scan's temporaries (e.g. rounded values) stay a few MiB
    rather than a multiple of the matrix (1.6 GiB more for a 1 GiB matrix).
    """
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise DataError(f"observations have non-numeric dtype {x.dtype}")
    blocks = (x.blocks(raw=True) if isinstance(x, BackedMatrix) else
              (x[start:start + SCAN_BLOCK] for start in range(0, x.shape[0], SCAN_BLOCK)))
    counts = None
    for block in blocks:
        found = _value_counts(block, kind)
        counts = found if counts is None else {k: counts[k] + v for k, v in found.items()}
    if counts["bad"]:
        raise DataError(
            f"the data contains {counts['bad']} NaN or infinite values; remove or impute them first"
        )
    if counts["negative"]:
        raise DataError(
            f"count data has {counts['negative']} negative values; pass raw UMI counts "
            "(e.g. layer='counts'), not scaled or centred data"
        )
    if counts["fractional"]:
        raise DataError(
            f"count data has {counts['fractional']} non-integer values; pass raw counts "
            "(e.g. layer='counts'), or, for log-normalised or other continuous values, "
            "kind='continuous' with transform='none' (CLI: --kind continuous --transform none) "
            "and a model with a Gaussian likelihood"
        )
    if counts["above_one"]:
        raise DataError("binary data must be 0/1; binarise it first (e.g. x > 0)")
    if counts["empty"]:
        # Count models and the log1p_cp10k transform divide by each cell's total.
        raise DataError(
            f"{counts['empty']} cells have zero total counts; remove them first "
            "(e.g. scanpy.pp.filter_cells(adata, min_counts=1))"
        )
    n_unobserved = int(np.count_nonzero(counts["observed"] == 0))
    if warn_unobserved_genes and n_unobserved:
        warnings.warn(
            f"{n_unobserved} of {x.shape[1]} genes are zero in every cell; they are kept "
            "(models learn a near-zero expression for them)", DataWarning, stacklevel=3)


def _value_counts(x, kind) -> dict[str, Any]:
    """Numbers of each kind of bad value in ``x`` (dense or CSR), and cells per gene observed."""
    values = x.data if sp.issparse(x) else np.asarray(x)
    counts = {"bad": int(np.size(values) - np.count_nonzero(np.isfinite(values))),
              "negative": 0, "fractional": 0, "above_one": 0, "empty": 0}
    if kind in ("counts", "binary") and not counts["bad"]:
        counts["negative"] = int(np.count_nonzero(values < 0))
        counts["fractional"] = int(np.count_nonzero(values != np.round(values)))
    if kind == "binary":
        counts["above_one"] = int(np.count_nonzero(values > 1))
    if kind == "counts":
        totals = np.asarray(x.sum(axis=1)).ravel()
        counts["empty"] = int(np.count_nonzero(totals == 0))
    observed = (x != 0).sum(axis=0) if sp.issparse(x) else np.count_nonzero(x, axis=0)
    counts["observed"] = np.asarray(observed).ravel()
    return counts


def _codes(adata, key, argname, *, allow_missing, categories=None, unlabeled=None):
    """Integer codes of a categorical obs column (``-1`` for missing values and ``unlabeled``)."""
    if key is None or (allow_missing and categories is not None and key not in adata.obs):
        # No column: one batch (code 0), or every cell unlabelled (code -1).
        fill = -1 if allow_missing else 0
        return np.full(adata.n_obs, fill, np.int32), ()
    if key not in adata.obs.columns:
        raise DataError(
            f"{argname} {key!r} is not a column of adata.obs; "
            f"available columns: {', '.join(map(str, adata.obs.columns)) or 'none'}"
        )
    column = adata.obs[key]
    missing = column.isna().to_numpy()
    if missing.any() and not allow_missing:
        raise DataError(
            f"obs[{key!r}] has {int(missing.sum())} missing values; give every cell a "
            f"{argname[:-4] if argname.endswith('_key') else 'value'}"
        )
    values = column.astype(str).to_numpy()
    if unlabeled is not None:
        missing = missing | (values == str(unlabeled))
    if categories is None:
        if isinstance(column.dtype, pd.CategoricalDtype):
            present = set(values[~missing])
            categories = tuple(str(c) for c in column.cat.categories if str(c) in present)
        else:
            categories = tuple(sorted(set(values[~missing])))
    lookup = {c: i for i, c in enumerate(categories)}
    unknown = sorted(set(values[~missing]) - set(lookup))
    if unknown:
        raise DataError(
            f"obs[{key!r}] has categories the model has not seen: {', '.join(unknown[:10])}; "
            f"known: {', '.join(categories[:10])}{' …' if len(categories) > 10 else ''}"
            + ("; to place cells of new batches in the model's latent space, map them first "
               "(lvmzoo.analysis.map_query / 'lvmzoo map-query')" if argname == "batch_key" else "")
        )
    codes = np.array([lookup.get(v, -1) for v in values], np.int32)
    codes[missing] = -1
    return codes, tuple(categories)


def _categorical_covariates(adata, keys, categories=None):
    """``(n_obs, len(keys))`` int32 codes and the categories of each key.

    With ``categories`` (a saved registry's), values are encoded against them
    and unknown ones are errors; otherwise each key's categories are read
    from the column, as for batches.
    """
    if len(set(keys)) != len(keys):
        raise DataError(f"categorical_covariate_keys repeats a column: {list(keys)}")
    columns, found = [], []
    for i, key in enumerate(keys):
        codes, cats = _codes(adata, key, "categorical covariate", allow_missing=False,
                             categories=None if categories is None else categories[i])
        columns.append(codes)
        found.append(cats)
    if not columns:
        return np.zeros((adata.n_obs, 0), np.int32), ()
    return np.stack(columns, axis=1), tuple(found)


def _covariates(adata, keys):
    columns = []
    for key in keys:
        if key not in adata.obs.columns:
            raise DataError(
                f"covariate {key!r} is not a column of adata.obs; "
                f"available columns: {', '.join(map(str, adata.obs.columns))}"
            )
        column = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(np.float32)
        bad = ~np.isfinite(column)
        if bad.any():
            # Numeric columns serve as covariates and as capture times (a model's
            # registration()), so the message names the column, not its role.
            first = int(np.argmax(bad))
            value = adata.obs[key].iloc[first]
            value = repr(value) if isinstance(value, str) else str(value)
            raise DataError(f"obs[{key!r}] must hold a number for every cell, but "
                            f"{int(bad.sum())} of {len(column)} are missing or not numbers "
                            f"(first: cell {str(adata.obs_names[first])!r}, value {value}); "
                            "give a column of numbers (e.g. map stage names to their order)")
        columns.append(column)
    if not columns:
        return np.zeros((adata.n_obs, 0), np.float32)
    return np.stack(columns, axis=1)


OBSM_KINDS = ("counts", "continuous")


def _obsm_span(registry: DataRegistry, key: str) -> tuple[int, int]:
    """Columns ``[start, stop)`` of registered obsm matrix ``key`` in ``CellData.obsm``."""
    if key not in registry.obsm_keys:
        raise KeyError(f"obsm[{key!r}] is not registered (registered: "
                       f"{', '.join(registry.obsm_keys) or 'none'}); pass it in "
                       "setup_anndata(..., obsm_keys=[...])")
    sizes = [len(c) for c in registry.obsm_columns]
    i = registry.obsm_keys.index(key)
    start = sum(sizes[:i])
    return start, start + sizes[i]


def _obsm(adata, keys, kinds, columns=None):
    """``(n_obs, total columns)`` float32 of the obsm matrices ``keys`` and their column names.

    With ``columns`` (a saved registry's), a DataFrame's columns are matched by
    name and put in that order; an array must have that many columns.
    """
    if len(set(keys)) != len(keys):
        raise DataError(f"obsm_keys repeats a key: {list(keys)}")
    if len(kinds) != len(keys):
        raise DataError(f"{len(kinds)} obsm_kinds for {len(keys)} obsm_keys; give one per key")
    blocks, names = [], []
    try:
        obsm = adata.obsm if keys else {}
    except ValueError as err:  # AnnData checks every matrix's shape as it hands obsm out
        raise DataError(f"adata.obsm has a matrix without one row per cell of the data "
                        f"({adata.n_obs} cells): {err}") from None
    for i, (key, kind) in enumerate(zip(keys, kinds)):
        if kind not in OBSM_KINDS:
            raise DataError(f"unknown kind {kind!r} of obsm[{key!r}]; choose one of {OBSM_KINDS}")
        if key not in obsm:
            raise DataError(
                f"obsm[{key!r}] not found; available obsm keys: "
                f"{', '.join(map(str, obsm.keys())) or 'none'}")
        value = obsm[key]
        if isinstance(value, pd.DataFrame):
            found = tuple(str(c) for c in value.columns)
            if columns is not None:
                missing = [c for c in columns[i] if c not in found]
                if missing:
                    raise DataError(f"obsm[{key!r}] lacks {len(missing)} of the model's columns "
                                    f"(e.g. {', '.join(missing[:5])})")
                value = value[list(columns[i])]
                found = tuple(columns[i])
            matrix = value.to_numpy()
        else:
            matrix = value.toarray() if sp.issparse(value) else np.asarray(value)
            found = _obsm_column_names(adata, key, matrix)
        if matrix.ndim != 2 or matrix.shape[0] != adata.n_obs:
            raise DataError(f"obsm[{key!r}] has shape {matrix.shape}: it does not have one "
                            f"row per cell of the data ({adata.n_obs} cells)")
        if columns is not None and len(found) != len(columns[i]):
            raise DataError(f"obsm[{key!r}] has {matrix.shape[1]} columns but the model was "
                            f"trained on {len(columns[i])}")
        if columns is not None:
            found = tuple(columns[i])
        if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == bool):
            raise DataError(f"obsm[{key!r}] has non-numeric dtype {matrix.dtype}")
        matrix = matrix.astype(np.float32)
        n_bad = int(matrix.size - np.count_nonzero(np.isfinite(matrix)))
        if n_bad:
            raise DataError(f"obsm[{key!r}] contains {n_bad} NaN or infinite values; "
                            "remove or impute them first")
        if kind == "counts":
            n_negative = int(np.count_nonzero(matrix < 0))
            if n_negative:
                raise DataError(f"obsm[{key!r}] has {n_negative} negative values; it must hold "
                                "raw counts (non-negative integers)")
            n_fractional = int(np.count_nonzero(matrix != np.round(matrix)))
            if n_fractional:
                raise DataError(f"obsm[{key!r}] has {n_fractional} non-integer values; it must "
                                "hold raw counts (non-negative integers)")
        blocks.append(matrix)
        names.append(found)
    if not blocks:
        return np.zeros((adata.n_obs, 0), np.float32), ()
    return np.concatenate(blocks, axis=1), tuple(names)


def _obsm_column_names(adata, key, matrix) -> tuple[str, ...]:
    """Names of the columns of an array in ``obsm[key]`` (see :func:`setup_anndata`)."""
    n = matrix.shape[1] if matrix.ndim == 2 else 0
    candidates = [f"{key}_names"]
    if key.endswith("_expression"):
        candidates.append(key[: -len("_expression")] + "_names")  # scvi-tools' protein_names
    for name in candidates:
        if name in adata.uns:
            names = tuple(str(v) for v in np.asarray(adata.uns[name]).ravel())
            if len(names) != n:
                raise DataError(f"uns[{name!r}] has {len(names)} names for the {n} columns "
                                f"of obsm[{key!r}]")
            return names
    return tuple(f"{key}_{j}" for j in range(n))
