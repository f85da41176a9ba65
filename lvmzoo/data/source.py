"""Minibatches for the SVI driver.

A *source* owns the arrays of a data set and turns each step's inputs into a
:class:`Batch`.  The driver only ever calls

* ``source.arrays`` – a pytree of arrays passed into the compiled epoch;
* ``source.gather(arrays, step)`` – a traceable function building the Batch
  of one step from its inputs (here: a ``(batch_size,)`` vector of cells);
* ``source.chunk_specs(n_steps, batch_size)`` – the shapes of the chunks of
  step inputs an epoch is fed in, one compiled program per shape;
* ``source.epoch_inputs(order)`` – those chunks for an epoch whose cells are
  ``order`` ``(n_steps, batch_size)``;
* ``source.head(n)`` – the first ``n`` cells, to initialise the optimiser;
* ``source.sample(n, key)`` – about ``n`` random cells, for the model's
  data-dependent start values.

:class:`DeviceSource` puts everything on the device(s) once and feeds an
epoch as one chunk, its cell order; a sparse matrix stays compressed there
(CSR) and each minibatch is densified inside the compiled step.  On a mesh
(:class:`~lvmzoo.data.placement.Placement`) the arrays are replicated on
every device and each device gathers its share of every minibatch.  Data
larger than memory streams from disk through
:class:`lvmzoo.data.streaming.StreamingSource`, chunk by chunk, into the
same programs.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lvmzoo.data.aligned import is_aligned
from lvmzoo.data.compact import CompactCSR, narrow_arrays
from lvmzoo.data.placement import Placement
from lvmzoo.data.registry import CellData, DataError


@struct.dataclass
class Batch:
    """What a model program sees: a minibatch of ``B`` cells.

    Attributes:
      x: ``(B, n_genes)`` float32 observations (counts or transformed values).
      index: ``(B,)`` int32 positions of the cells in the full data set; the
        ``"cells"`` plate uses them, so per-cell parameters can be indexed.
      batch: ``(B,)`` int32 batch codes.
      labels: ``(B,)`` int32 label codes, ``-1`` when unlabelled.
      covariates: ``(B, n_covariates)`` float32.
      categorical_covariates: ``(B, n_categorical_covariates)`` int32 codes,
        one column per key of ``categorical_covariate_keys``.
      obsm: ``(B, n_obsm_columns)`` float32: the registered ``obsm`` matrices
        side by side (read one with :meth:`obsm_matrix`).
      epoch: ``()`` float32, the driver's current epoch (0-based), for
        schedules such as KL warm-up; 0 outside training.
      n_epochs: ``()`` float32, the fit's number of epochs (its maximum with
        early stopping), so a schedule can span a share of the fit; 1 outside
        training.
      n_cells: total number of cells the minibatch is drawn from (static);
        the plate rescales log-densities by ``n_cells / B``.
      n_batches / n_labels: numbers of categories (static).
      covariate_keys: ``obs`` names of the columns of ``covariates`` (static).
      categorical_covariate_keys: ``obs`` names of the columns of
        ``categorical_covariates`` (static).
      categorical_covariate_sizes: number of categories of each (static).
      obsm_keys / obsm_sizes: registered ``obsm`` keys and their numbers of
        columns (static).
      training: ``True`` while fitting (dropout on); ``False`` for evaluation.
    """

    x: jax.Array
    index: jax.Array
    batch: jax.Array
    labels: jax.Array
    covariates: jax.Array
    n_cells: int = struct.field(pytree_node=False)
    epoch: Any = 0.0
    n_epochs: Any = 1.0
    n_batches: int = struct.field(pytree_node=False, default=1)
    n_labels: int = struct.field(pytree_node=False, default=0)
    training: bool = struct.field(pytree_node=False, default=True)
    categorical_covariates: Any = None
    covariate_keys: tuple[str, ...] = struct.field(pytree_node=False, default=())
    categorical_covariate_keys: tuple[str, ...] = struct.field(pytree_node=False, default=())
    categorical_covariate_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=())
    obsm: Any = None
    obsm_keys: tuple[str, ...] = struct.field(pytree_node=False, default=())
    obsm_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=())

    @property
    def size(self) -> int:
        return self.x.shape[0]

    def categorical(self, key: str) -> tuple[jax.Array, int]:
        """``(codes (B,) int32, number of categories)`` of categorical covariate ``key``.

        Raises:
          KeyError: ``key`` was not registered (``setup_anndata(...,
            categorical_covariate_keys=[key])``).
        """
        if key not in self.categorical_covariate_keys:
            raise KeyError(
                f"obs column {key!r} is not a registered categorical covariate (registered: "
                f"{', '.join(self.categorical_covariate_keys) or 'none'}); pass it in "
                "setup_anndata(..., categorical_covariate_keys=[...])")
        i = self.categorical_covariate_keys.index(key)
        return self.categorical_covariates[:, i], self.categorical_covariate_sizes[i]

    def covariate(self, key: str) -> jax.Array:
        """``(B,)`` float32 values of continuous covariate ``key``.

        Raises:
          KeyError: ``key`` was not registered (``setup_anndata(...,
            covariate_keys=[key])``).
        """
        if key not in self.covariate_keys:
            raise KeyError(
                f"obs column {key!r} is not a registered covariate (registered: "
                f"{', '.join(self.covariate_keys) or 'none'}); pass it in "
                "setup_anndata(..., covariate_keys=[...])")
        return self.covariates[:, self.covariate_keys.index(key)]

    def obsm_matrix(self, key: str) -> jax.Array:
        """``(B, n_columns)`` float32 values of registered ``obsm`` matrix ``key``.

        Raises:
          KeyError: ``key`` was not registered (``setup_anndata(...,
            obsm_keys=[key])``).
        """
        if key not in self.obsm_keys:
            raise KeyError(
                f"obsm[{key!r}] is not registered (registered: "
                f"{', '.join(self.obsm_keys) or 'none'}); pass it in "
                "setup_anndata(..., obsm_keys=[...])")
        i = self.obsm_keys.index(key)
        start = sum(self.obsm_sizes[:i])
        return self.obsm[:, start:start + self.obsm_sizes[i]]


def n_steps_per_epoch(n_cells: int, batch_size: int) -> int:
    """Minibatches in an epoch: ``ceil(n_cells / batch_size)``, so an epoch trains every cell.

    The last minibatch is filled up with the first cells of the epoch's order
    (:func:`epoch_steps`), which then train twice that epoch: shapes stay
    static for the compiled epoch and every minibatch is still a uniform draw
    of cells.  (Dropping the remainder instead trained 128 of 200 cells per
    epoch at batch size 128: half the steps of scvi-tools' epochs, whose last
    minibatch is smaller.)
    """
    return -(-n_cells // batch_size)


def epoch_steps(order, n_steps: int, batch_size: int):
    """An epoch's cell ``order`` (all cells, numpy or JAX) as ``(n_steps, batch_size)``.

    Wraps around to the start of ``order`` to fill the last step (see
    :func:`n_steps_per_epoch`).
    """
    positions = np.arange(n_steps * batch_size) % order.shape[0]
    return order[positions].reshape(n_steps, batch_size)


# The per-cell fields of a Batch besides ``x``, held per cell by every source.
PER_CELL_FIELDS = ("batch", "labels", "covariates", "categorical_covariates", "obsm")


def assemble_batch(x, index, cells, registry, n_cells: int, training: bool = True) -> Batch:
    """A :class:`Batch` of rows ``x`` (cells ``index``) whose per-cell fields ``cells[name]``
    (:data:`PER_CELL_FIELDS`) are already selected; the one constructor every source uses."""
    fields = {name: jnp.asarray(cells[name]) for name in PER_CELL_FIELDS}
    fields["categorical_covariates"] = fields["categorical_covariates"].astype(jnp.int32)
    fields["obsm"] = fields["obsm"].astype(jnp.float32)
    return Batch(x=x, index=index, **fields, n_cells=n_cells, n_batches=registry.n_batches,
                 n_labels=registry.n_labels, training=training, **batch_static_fields(registry))


def batch_static_fields(registry) -> dict[str, Any]:
    """The static covariate fields of every :class:`Batch` of a registry's cells."""
    return dict(
        covariate_keys=tuple(registry.covariate_keys),
        categorical_covariate_keys=tuple(registry.categorical_covariate_keys),
        categorical_covariate_sizes=tuple(
            len(c) for c in registry.categorical_covariate_categories),
        obsm_keys=tuple(getattr(registry, "obsm_keys", ())),
        obsm_sizes=tuple(len(c) for c in getattr(registry, "obsm_columns", ())),
    )


class DeviceSource:
    """All of a data set on the device(s); minibatches gathered inside jit.

    Args:
      data: validated cells, in memory.
      n_cells: value of ``Batch.n_cells``; defaults to ``data.n_cells``.
      placement: the devices; default one device.  On a mesh every device
        holds all of the (compressed) data.
      rows: the cells this source draws from, as rows of ``data`` (default
        all).  Positions ``0 .. len(rows) - 1`` are what ``Batch.index``,
        orders and ``full_batch`` speak of; the matrix is placed whole, so a
        fit's training cells are not copied out of it (at 200,000 cells the
        copy, and its copy onto the device, held the matrix 2.8 times).

    Sparse ``x`` is stored as CSR arrays ``(values, columns, row_starts)`` and
    each row is read through a fixed window of ``max_row_nnz`` entries, so the
    gather has static shapes and device memory stays ``O(nnz)``.
    """

    def __init__(self, data: CellData, n_cells: int | None = None,
                 placement: Placement | None = None, rows: np.ndarray | None = None):
        if not isinstance(data.x, np.ndarray) and not data.is_sparse:
            raise DataError("this needs the cells in memory but they are on disk "
                            f"({type(data.x).__name__}); load them first, e.g. with "
                            "data.to_memory() on a subset small enough")
        self.data = data
        self.placement = placement or Placement()
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.n_rows = data.n_cells if rows is None else len(self.rows)
        self.n_cells = self.n_rows if n_cells is None else n_cells
        self.n_genes = data.n_genes
        self.n_batches = data.registry.n_batches
        self.n_labels = data.registry.n_labels
        common = dict(batch=data.batch, labels=data.labels, covariates=data.covariates,
                      categorical_covariates=np.asarray(data.categorical_covariates, np.int32),
                      obsm=np.asarray(data.obsm, np.float32))
        if isinstance(data.x, CompactCSR):  # narrow stores, cast per minibatch in the gather
            compact = data.x
            self.max_row_nnz = max(int(np.diff(compact.row_starts).max()), 1)
            arrays: dict[str, Any] = dict(
                values=compact.values, columns=compact.columns,
                row_starts=np.asarray(compact.row_starts, np.int32), **common)
        elif data.is_sparse:
            csr = data.x
            self.max_row_nnz = max(int(np.diff(csr.indptr).max()), 1)
            if self._used_in_place(csr):
                values, columns = csr.data, csr.indices
            else:  # copied onto the device anyway: 4 bytes per count there, not 8
                values, columns = narrow_arrays(csr.data, csr.indices, csr.shape[1])
            arrays = dict(values=values, columns=columns,
                          row_starts=np.asarray(csr.indptr, np.int32), **common)
        else:
            self.max_row_nnz = None
            arrays = dict(x=np.asarray(data.x, np.float32), **common)
        if self.rows is not None:
            arrays["rows"] = self.rows.astype(np.int32)
        # On the CPU an aligned host matrix (lvmzoo.data.aligned.read_h5ad) becomes the
        # device's without a copy: the cells are held once, not twice.
        self.arrays: dict[str, Any] = self.placement.replicate(arrays, alias_host=True)

    def _used_in_place(self, csr) -> bool:
        """Whether the device will use the CSR buffers as they are: float32 values and int32
        columns, 64-byte aligned, on one CPU device (lvmzoo.data.aligned); narrowing them
        would then add a copy rather than halve one."""
        return (self.placement.mesh is None and jax.default_backend() == "cpu"
                and csr.data.dtype == np.float32 and csr.indices.dtype == np.int32
                and is_aligned(csr.data) and is_aligned(csr.indices))

    def view(self, rows: np.ndarray, n_cells: int | None = None) -> "DeviceSource":
        """A source of the cells ``rows`` of this one's data that shares its device arrays."""
        view = copy.copy(self)
        view.rows = np.asarray(rows, np.int64)
        view.n_rows = len(view.rows)
        view.n_cells = view.n_rows if n_cells is None else n_cells
        view.arrays = {**self.arrays, "rows": self.placement.replicate(
            {"rows": view.rows.astype(np.int32)})["rows"]}
        view.__dict__.pop("_compiled_gather", None)
        return view

    def gather(self, arrays: dict[str, Any], index: jax.Array) -> Batch:
        """The minibatch of cells ``index`` (positions, shape ``(B,)``); traceable."""
        rows = arrays["rows"][index] if "rows" in arrays else index
        if self.max_row_nnz is None:
            x = arrays["x"][rows]
        else:
            x = _densify_rows(arrays, rows, self.max_row_nnz, self.n_genes)
        return assemble_batch(self.placement.constrain_cells(x), index,
                              {name: arrays[name][rows] for name in PER_CELL_FIELDS},
                              self.data.registry, self.n_cells)

    def _data_rows(self, positions: np.ndarray) -> CellData:
        """The cells at ``positions`` as a CellData of their own (for one device of a mesh)."""
        positions = np.asarray(positions)
        return self.data.subset(positions if self.rows is None else self.rows[positions])

    def head(self, n: int) -> Batch:
        """The first ``n`` cells as a training Batch on the default device (for ``svi.init``)."""
        if self.placement.mesh is None:
            return self._compiled_gather(self.arrays, jnp.arange(n))
        local = DeviceSource(self._data_rows(np.arange(n)), n_cells=self.n_cells)
        return local.gather(local.arrays, jnp.arange(n))

    def sample(self, n: int, key: jax.Array) -> Batch:
        """``n`` random cells (in data order) as a training Batch on the default device.

        What ``model.init_params`` sees, so that data stored in some order
        still gives a representative start.
        """
        cells = jnp.sort(jax.random.permutation(key, self.n_rows)[:n]).astype(jnp.int32)
        if self.placement.mesh is None:
            return self._compiled_gather(self.arrays, cells)
        local = DeviceSource(self._data_rows(np.asarray(cells)), n_cells=self.n_cells)
        return local.gather(local.arrays, jnp.arange(n)).replace(index=jnp.asarray(cells))

    def chunk_specs(self, n_steps: int, batch_size: int) -> dict[int, Any]:
        """An epoch is one chunk: its ``(n_steps, batch_size)`` cell order."""
        order = jax.ShapeDtypeStruct((n_steps, batch_size), jnp.int32)
        return {n_steps: self.placement.step_spec(order)}

    def epoch_inputs(self, order) -> list[jax.Array]:
        """The epoch's one chunk: ``order`` on the device(s), split along cells on a mesh."""
        if self.placement.mesh is None:
            return [jnp.asarray(order, jnp.int32)]
        start, stop = self.placement.local_columns(order.shape[1])
        local = np.asarray(order, np.int32)[:, start:stop]
        return [self.placement.shard_steps(local, order.shape[1])]

    def full_batch(self, index: np.ndarray | None = None) -> Batch:
        """Cells ``index`` (default all) as one evaluation Batch, plate not rescaled."""
        index = jnp.arange(self.n_rows) if index is None else jnp.asarray(index)
        # One compiled gather per chunk size; run as it is, the gather dispatches (and
        # first compiles) each of its operations one by one.
        gather = self.gather if self.placement.mesh is not None else self._compiled_gather
        batch = gather(self.arrays, index)
        return batch.replace(n_cells=batch.size, training=False)

    @functools.cached_property
    def _compiled_gather(self):
        return jax.jit(self.gather)


def _densify_rows(arrays, index, window, n_genes):
    starts = arrays["row_starts"][index]
    ends = arrays["row_starts"][index + 1]
    positions = starts[:, None] + jnp.arange(window)[None, :]
    inside = positions < ends[:, None]
    positions = jnp.where(inside, positions, 0)
    # A CompactCSR's uint16 counts and columns become float32 / int32 here, per minibatch.
    values = jnp.where(inside, arrays["values"][positions].astype(jnp.float32), 0.0)
    return scatter_rows(values, arrays["columns"][positions].astype(jnp.int32), n_genes)


def scatter_rows(values: jax.Array, columns: jax.Array, n_genes: int) -> jax.Array:
    """Dense ``(B, n_genes)`` rows from ``(B, W)`` stored entries (padding: value 0)."""
    rows = jnp.broadcast_to(jnp.arange(values.shape[0])[:, None], columns.shape)
    dense = jnp.zeros((values.shape[0], n_genes), jnp.float32)
    return dense.at[rows, columns].add(values)
