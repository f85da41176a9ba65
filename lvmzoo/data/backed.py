"""Cells × genes matrices that stay on disk: backed ``.h5ad`` and Zarr-stored AnnData.

:class:`BackedMatrix` is what :func:`lvmzoo.setup_anndata` puts in
``CellData.x`` when the AnnData's matrix is on disk (``anndata.read_h5ad(path,
backed="r")``, or :func:`read_backed` of a ``.zarr`` store).  It never loads
the matrix: it reads **contiguous row ranges**, one slice each of the CSR
``indptr``/``indices``/``data`` arrays (integer-array row indexing reads row
by row and is orders of magnitude slower on h5py and Zarr), keeps each block
sparse, and applies the registry's transform block by block (every transform
is per cell, so a block's rows come out exactly as the in-memory ones).

A selection of rows (e.g. the training cells of a validation split) is a
sorted vector of file rows; block ``[start, stop)`` of the selection is read
as the file range it spans, in pieces of at most ``max_span`` rows, so a
sparse selection never reads more than ``max_span`` rows at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

import anndata as ad
import numpy as np
import scipy.sparse as sp

from lvmzoo.data.transforms import apply_transform

# Rows per read when scanning a whole matrix (validation, to_memory).
SCAN_BLOCK = 4096


class BackedMatrix:
    """Rows ``rows`` of an on-disk ``(n_file_rows, n_genes)`` matrix, read in contiguous blocks.

    Args:
      store: an anndata CSR dataset (``anndata.abc.CSRDataset``, what
        ``adata.X`` is in backed mode) or a dense 2-D h5py/Zarr array.
      rows: ``(n_cells,)`` strictly increasing file rows of this selection;
        ``None``: every row.
      transform: name of the per-cell transform applied after reading (see
        :mod:`lvmzoo.data.transforms`).
      max_span: most file rows read at once.
    """

    def __init__(self, store, rows: Optional[np.ndarray] = None, transform: str = "none",
                 max_span: int = 16384):
        self.store = store
        self._sparse = isinstance(store, ad.abc.CSRDataset)
        self._n_file_rows = int(store.shape[0])
        if rows is not None:
            rows = np.asarray(rows, np.int64)
            if rows.ndim != 1 or (rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0
                                                 or rows[-1] >= self._n_file_rows)):
                raise ValueError("rows must be strictly increasing positions within the matrix")
        self.rows = rows
        self.transform = transform
        self.max_span = max_span
        self._indptr = None  # the CSR row pointers of the whole file, read once (8 B per cell)

    # -- what it is --------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        n = self._n_file_rows if self.rows is None else len(self.rows)
        return (n, int(self.store.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store.dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def file_rows(self) -> np.ndarray:
        """``(n_cells,)`` file rows of this selection."""
        return np.arange(self._n_file_rows) if self.rows is None else self.rows

    def __repr__(self) -> str:
        kind = "CSR" if self._sparse else "dense"
        return f"BackedMatrix({self.shape[0]} × {self.shape[1]}, {kind} on disk, " \
               f"transform={self.transform!r})"

    def row_nnz(self) -> np.ndarray:
        """``(n_cells,)`` stored entries per cell, from the row pointers alone."""
        if not self._sparse:
            return np.full(self.shape[0], self.shape[1], np.int64)
        indptr = self._row_pointers()
        rows = self.file_rows
        return indptr[rows + 1] - indptr[rows]

    # -- new selections ----------------------------------------------------

    def __getitem__(self, index) -> "BackedMatrix":
        """The cells at ``index`` (increasing positions within this selection), still on disk."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.size and np.any(np.diff(index) <= 0):
            raise ValueError("a backed matrix is subset by increasing positions only; sort them")
        rows = self.file_rows[index]
        out = BackedMatrix(self.store, rows, self.transform, self.max_span)
        out._indptr = self._indptr
        return out

    def with_transform(self, transform: str) -> "BackedMatrix":
        out = BackedMatrix(self.store, self.rows, transform, self.max_span)
        out._indptr = self._indptr
        return out

    # -- reading -----------------------------------------------------------

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``[start, stop)`` of the selection: float32 CSR, transformed."""
        block = self.read_raw(start, stop)
        return sp.csr_matrix(apply_transform(self.transform, block), dtype=np.float32)

    def read_raw(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``[start, stop)`` as stored (dtype of the file), untransformed, CSR."""
        if self.rows is None:
            return self._read_file_range(start, stop)
        rows = self.rows[start:stop]
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        pieces, i = [], 0
        while i < len(rows):
            # Rows of the selection within one readable span of the file.
            j = int(np.searchsorted(rows, rows[i] + self.max_span, side="left"))
            first = int(rows[i])
            piece = self._read_file_range(first, int(rows[j - 1]) + 1)
            pieces.append(piece[rows[i:j] - first])
            i = j
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")

    def blocks(self, block_size: Optional[int] = None,
               raw: bool = False) -> Iterator[sp.csr_matrix]:
        """The whole selection, ``block_size`` (default :data:`SCAN_BLOCK`) cells at a time."""
        block_size = block_size or SCAN_BLOCK
        read = self.read_raw if raw else self.read
        for start in range(0, self.shape[0], block_size):
            yield read(start, min(start + block_size, self.shape[0]))

    def to_memory(self) -> sp.csr_matrix:
        """Every cell of the selection in memory (float32 CSR, transformed)."""
        blocks = list(self.blocks())
        if not blocks:
            return sp.csr_matrix(self.shape, dtype=np.float32)
        return sp.vstack(blocks, format="csr")

    def to_compact(self):
        """Every cell of the selection in memory, as narrow as is exact.

        A :class:`~lvmzoo.data.compact.CompactCSR` (counts in uint16, columns in
        uint16: 4 bytes per stored count instead of 8), read block by block so the
        float32 matrix is never held; a dense store, or a transform other than
        ``"none"``, gives :meth:`to_memory`'s float32 CSR.
        """
        from lvmzoo.data.compact import compact_from_blocks

        if not self._sparse or self.transform != "none":
            return self.to_memory()
        row_starts = np.concatenate([[0], np.cumsum(self.row_nnz())])
        return compact_from_blocks(self.blocks(raw=True), row_starts, self.shape[1])

    def _row_pointers(self) -> np.ndarray:
        if self._indptr is None:
            self._indptr = np.asarray(self.store.group["indptr"][...], np.int64)
        return self._indptr

    def _read_file_range(self, start: int, stop: int) -> sp.csr_matrix:
        """File rows ``[start, stop)``: one slice of each CSR array (or of the dense array)."""
        n_genes = self.shape[1]
        if not self._sparse:
            return sp.csr_matrix(np.asarray(self.store[start:stop]))
        indptr = self._row_pointers()
        lo, hi = int(indptr[start]), int(indptr[stop])
        group = self.store.group
        data = np.asarray(group["data"][lo:hi])
        indices = np.asarray(group["indices"][lo:hi])
        return sp.csr_matrix((data, indices, indptr[start:stop + 1] - lo),
                             shape=(stop - start, n_genes))


def is_on_disk(x) -> bool:
    """Whether ``x`` (an AnnData's X or layer) is a matrix that stays on disk."""
    if isinstance(x, (BackedMatrix, ad.abc.CSRDataset, ad.abc.CSCDataset)):
        return True
    import h5py

    if isinstance(x, h5py.Dataset):
        return True
    try:
        import zarr
    except ImportError:  # pragma: no cover - anndata depends on zarr
        return False
    return isinstance(x, zarr.Array)


def backed_matrix(x) -> BackedMatrix:
    """Wrap an AnnData's on-disk X (or layer) in a :class:`BackedMatrix`.

    Raises:
      ValueError: for a column-major (CSC) store, whose rows cannot be read
        contiguously.
    """
    if isinstance(x, BackedMatrix):
        return x
    if isinstance(x, ad.abc.CSCDataset):
        raise ValueError("the matrix is stored column-major (CSC), so cells cannot be read in "
                         "contiguous blocks; rewrite it as CSR once, e.g. adata.X = "
                         "adata.X.tocsr(); adata.write_h5ad(...), in memory")
    if len(x.shape) != 2:
        raise ValueError(f"observations have shape {x.shape}, expected (cells, genes)")
    return BackedMatrix(x)


def read_backed(path) -> ad.AnnData:
    """Open an ``.h5ad`` file or a ``.zarr`` AnnData store without loading its matrix.

    ``.h5ad``: ``anndata.read_h5ad(path, backed="r")`` (anndata keeps only
    ``X`` on disk; layers are loaded).  ``.zarr``: ``obs`` and ``var`` are
    read; ``X`` and every layer stay in the store as an
    ``anndata.io.sparse_dataset`` (CSR) or a Zarr array (dense).  Either
    result goes to :func:`lvmzoo.setup_anndata` like an in-memory AnnData.

    Args:
      path: the file or store.

    Raises:
      FileNotFoundError / ValueError: a missing path or an unknown format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() == ".h5ad" and path.is_file():
        return ad.read_h5ad(path, backed="r")
    if path.is_dir():
        return _read_zarr_backed(path)
    raise ValueError(f"{path} is neither an .h5ad file nor a .zarr AnnData store")


def _read_zarr_backed(path: Path) -> ad.AnnData:
    import zarr

    group = zarr.open(str(path), mode="r")
    if "obs" not in group or "var" not in group:
        raise ValueError(f"{path} is not an AnnData Zarr store (no obs/var groups)")

    def lazy(element):
        return ad.io.sparse_dataset(element) if isinstance(element, zarr.Group) else element

    layers = {name: lazy(group["layers"][name]) for name in group["layers"]} \
        if "layers" in group else {}
    return ad.AnnData(
        X=lazy(group["X"]) if "X" in group else None,
        layers=layers,
        obs=ad.io.read_elem(group["obs"]),
        var=ad.io.read_elem(group["var"]),
    )


def file_size(path) -> int:
    """Bytes of an ``.h5ad`` file or of all files of a ``.zarr`` directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def total_memory() -> int:
    """Bytes of RAM of this machine (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0
