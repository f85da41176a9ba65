"""Count matrices held in 4 bytes per stored count instead of 8.

A CSR matrix as anndata reads it spends 8 bytes on every stored count: a
float32 value and an int32 column.  Gene counts are small integers and gene
panels have fewer than 65,536 genes, so both fit 16 bits: the matrix of
200,000 cells × 2,000 genes takes 505 MiB instead of 1,011 MiB, and at a
million cells 2.5 GiB instead of 5.  :class:`CompactCSR` is that matrix; the
compiled minibatch gather (:class:`lvmzoo.data.source.DeviceSource`) casts the
entries of each minibatch to float32 and int32 as it densifies them, so a fit
computes exactly what it computes on the float32 matrix.

Values that do not fit (non-integers, counts above 65,535) keep float32 and
more than 65,536 genes keep int32 columns: the narrowing is per array and only
where it is exact.  :meth:`lvmzoo.data.backed.BackedMatrix.to_compact` reads a
matrix on disk straight into this form, block by block, so the wide matrix is
never in memory (``lvmzoo fit`` does that for an ``.h5ad`` file of counts).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import scipy.sparse as sp

from lvmzoo.data.aligned import aligned_empty

# The narrowest exact stores: counts up to 65,535 and up to 65,536 genes.
NARROW_VALUES = np.dtype(np.uint16)
NARROW_COLUMNS = np.dtype(np.uint16)
# Cells whose entries one step of a selection copies (the positions it computes for them
# are int64: at ~1,000 entries per cell, 8 MiB).
ROWS_PER_COPY = 1024


class CompactCSR:
    """A cells × genes CSR matrix with narrow value and column types; reads as float32.

    Args:
      values: ``(nnz,)`` stored entries (uint16 counts, or float32).
      columns: ``(nnz,)`` their genes (uint16, or int32 above 65,536 genes).
      row_starts: ``(n_cells + 1,)`` int64 offsets of each cell's entries.
      shape: ``(n_cells, n_genes)``.

    Selecting cells (``matrix[rows]``), :meth:`toarray` and :meth:`tocsr` give
    float32 (SciPy CSR or dense), as the wide matrix would.
    """

    ndim = 2
    dtype = np.dtype(np.float32)  # what its entries read as

    def __init__(self, values: np.ndarray, columns: np.ndarray, row_starts: np.ndarray,
                 shape: tuple[int, int]):
        self.values, self.columns = values, columns
        self.row_starts = np.asarray(row_starts, np.int64)
        self.shape = (int(shape[0]), int(shape[1]))
        if len(self.row_starts) != self.shape[0] + 1 or len(values) != len(columns) \
                or int(self.row_starts[-1]) != len(values):
            raise ValueError("CompactCSR: row_starts, values and columns do not describe "
                             f"a {self.shape} matrix")

    @property
    def nnz(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.columns.nbytes + self.row_starts.nbytes

    def __repr__(self) -> str:
        return (f"CompactCSR({self.shape[0]} × {self.shape[1]}, {self.nnz:,} stored: "
                f"{self.values.dtype} values, {self.columns.dtype} columns)")

    def __getitem__(self, index) -> sp.csr_matrix:
        """Rows ``index`` (a slice, positions or a boolean mask) as a float32 SciPy CSR."""
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step == 1:
                return self._row_range(start, max(start, stop))
            index = np.arange(start, stop, step)
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64).reshape(-1)
        starts = self.row_starts[index]
        lengths = self.row_starts[index + 1] - starts
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        values = np.empty(indptr[-1], np.float32)
        columns = np.empty(indptr[-1], np.int32)
        for first in range(0, len(index), ROWS_PER_COPY):  # bounded temporaries
            last = min(first + ROWS_PER_COPY, len(index))
            lo, hi = indptr[first], indptr[last]
            # Positions of the block's entries: each row's run, one after the other.
            entries = (np.repeat(starts[first:last] - indptr[first:last], lengths[first:last])
                       + np.arange(lo, hi))
            values[lo:hi] = self.values[entries]
            columns[lo:hi] = self.columns[entries]
        return sp.csr_matrix((values, columns, indptr), shape=(len(index), self.shape[1]))

    def _row_range(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self.row_starts[start]), int(self.row_starts[stop])
        return sp.csr_matrix(
            (self.values[lo:hi].astype(np.float32), self.columns[lo:hi].astype(np.int32),
             self.row_starts[start:stop + 1] - lo), shape=(stop - start, self.shape[1]))

    def tocsr(self) -> sp.csr_matrix:
        """The whole matrix as a float32 SciPy CSR (8 bytes per stored entry)."""
        return self._row_range(0, self.shape[0])

    def toarray(self) -> np.ndarray:
        return self.tocsr().toarray()


def compact_from_blocks(blocks: Iterable[sp.csr_matrix], row_starts: np.ndarray,
                        n_genes: int) -> CompactCSR:
    """A :class:`CompactCSR` filled from consecutive CSR ``blocks`` of rows.

    ``row_starts`` (the matrix's row pointers, known before reading) sizes the
    arrays once, 64-byte aligned so that a CPU device uses them without a copy
    (:mod:`lvmzoo.data.aligned`); values start as uint16 and widen to float32 at
    the first block whose values are not all integers in 0..65,535.
    """
    row_starts = np.asarray(row_starts, np.int64) - int(row_starts[0])
    nnz = int(row_starts[-1])
    values = aligned_empty(nnz, NARROW_VALUES)
    columns = aligned_empty(nnz, _column_type(n_genes))
    filled = 0
    for block in blocks:
        stop = filled + block.nnz
        data = np.asarray(block.data)
        if values.dtype == NARROW_VALUES and not _fits(data, NARROW_VALUES):
            wide = aligned_empty(nnz, np.float32)
            wide[:filled] = values[:filled]
            values = wide
        values[filled:stop] = data
        columns[filled:stop] = block.indices
        filled = stop
    if filled != nnz:
        raise ValueError(f"the blocks held {filled:,} entries, the row pointers {nnz:,}")
    return CompactCSR(values, columns, row_starts, (len(row_starts) - 1, n_genes))


def narrow_arrays(values: np.ndarray, columns: np.ndarray, n_genes: int,
                  block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """New 64-byte aligned copies of a CSR matrix's ``values`` and ``columns``, as narrow as
    is exact (uint16 counts, uint16 columns up to 65,536 genes; else float32 / int32).

    For data that is copied onto a device anyway (a GPU; a CPU buffer that is not
    aligned), so that the device holds 4 bytes per stored count instead of 8.  Converted
    in blocks of ``block`` entries: the temporaries stay small.
    """
    narrow_values = all(_fits(values[i:i + block], NARROW_VALUES)
                        for i in range(0, len(values), block))
    out_values = aligned_empty(len(values), NARROW_VALUES if narrow_values else np.float32)
    out_columns = aligned_empty(len(columns), _column_type(n_genes))
    for i in range(0, len(values), block):
        out_values[i:i + block] = values[i:i + block]
        out_columns[i:i + block] = columns[i:i + block]
    return out_values, out_columns


def _column_type(n_genes: int) -> np.dtype:
    """uint16 gene columns up to 65,536 genes, else int32."""
    return NARROW_COLUMNS if n_genes <= np.iinfo(NARROW_COLUMNS).max + 1 else np.dtype(np.int32)


def _fits(data: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every value is an integer that ``dtype`` holds exactly."""
    if data.size == 0:
        return True
    info = np.iinfo(dtype)
    if data.min() < info.min or data.max() > info.max:
        return False
    return data.dtype.kind in "iu" or bool(np.all(data == np.round(data)))


__all__ = ["CompactCSR", "compact_from_blocks", "narrow_arrays"]
