"""Minibatches for the SVI driver.

A *source* owns the arrays of a data set and turns a ``(batch_size,)`` vector
of cell indices into a :class:`Batch`.  The driver only ever calls

* ``source.arrays`` – a pytree of arrays passed into the compiled epoch, and
* ``source.gather(arrays, index)`` – a traceable function building a Batch,

so a source that keeps data on the host and streams chunks, or one that shards
arrays over devices, plugs into the same driver.  :class:`DeviceSource` puts
everything on the default device once; a sparse matrix stays compressed there
(CSR) and each minibatch is densified inside the compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lvmzoo.data.registry import CellData


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
      epoch: ``()`` float32, the driver's current epoch (0-based), for
        schedules such as KL warm-up; 0 outside training.
      n_cells: total number of cells the minibatch is drawn from (static);
        the plate rescales log-densities by ``n_cells / B``.
      n_batches / n_labels: numbers of categories (static).
      covariate_keys: ``obs`` names of the columns of ``covariates`` (static).
      categorical_covariate_keys: ``obs`` names of the columns of
        ``categorical_covariates`` (static).
      categorical_covariate_sizes: number of categories of each (static).
      training: ``True`` while fitting (dropout on); ``False`` for evaluation.
    """

    x: jax.Array
    index: jax.Array
    batch: jax.Array
    labels: jax.Array
    covariates: jax.Array
    n_cells: int = struct.field(pytree_node=False)
    epoch: Any = 0.0
    n_batches: int = struct.field(pytree_node=False, default=1)
    n_labels: int = struct.field(pytree_node=False, default=0)
    training: bool = struct.field(pytree_node=False, default=True)
    categorical_covariates: Any = None
    covariate_keys: tuple[str, ...] = struct.field(pytree_node=False, default=())
    categorical_covariate_keys: tuple[str, ...] = struct.field(pytree_node=False, default=())
    categorical_covariate_sizes: tuple[int, ...] = struct.field(pytree_node=False, default=())

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


class DeviceSource:
    """All of a data set on one device; minibatches gathered inside jit.

    Args:
      data: validated cells.
      n_cells: value of ``Batch.n_cells``; defaults to ``data.n_cells``.

    Sparse ``x`` is stored as CSR arrays ``(values, columns, row_starts)`` and
    each row is read through a fixed window of ``max_row_nnz`` entries, so the
    gather has static shapes and device memory stays ``O(nnz)``.
    """

    def __init__(self, data: CellData, n_cells: int | None = None):
        self.data = data
        self.n_cells = data.n_cells if n_cells is None else n_cells
        self.n_genes = data.n_genes
        self.n_batches = data.registry.n_batches
        self.n_labels = data.registry.n_labels
        registry = data.registry
        self.static = dict(
            covariate_keys=tuple(registry.covariate_keys),
            categorical_covariate_keys=tuple(registry.categorical_covariate_keys),
            categorical_covariate_sizes=tuple(
                len(c) for c in registry.categorical_covariate_categories),
        )
        common = dict(
            batch=jnp.asarray(data.batch),
            labels=jnp.asarray(data.labels),
            covariates=jnp.asarray(data.covariates),
            categorical_covariates=jnp.asarray(data.categorical_covariates, jnp.int32),
        )
        if data.is_sparse:
            csr = data.x
            self.max_row_nnz = max(int(np.diff(csr.indptr).max()), 1)
            self.arrays: dict[str, Any] = dict(
                values=jnp.asarray(csr.data, jnp.float32),
                columns=jnp.asarray(csr.indices, jnp.int32),
                row_starts=jnp.asarray(csr.indptr, jnp.int32),
                **common,
            )
        else:
            self.max_row_nnz = None
            self.arrays = dict(x=jnp.asarray(data.x, jnp.float32), **common)

    def gather(self, arrays: dict[str, Any], index: jax.Array) -> Batch:
        """The minibatch of cells ``index`` (shape ``(B,)``); traceable."""
        if self.max_row_nnz is None:
            x = arrays["x"][index]
        else:
            x = _densify_rows(arrays, index, self.max_row_nnz, self.n_genes)
        return Batch(
            x=x,
            index=index,
            batch=arrays["batch"][index],
            labels=arrays["labels"][index],
            covariates=arrays["covariates"][index],
            categorical_covariates=arrays["categorical_covariates"][index],
            n_cells=self.n_cells,
            n_batches=self.n_batches,
            n_labels=self.n_labels,
            **self.static,
        )

    def full_batch(self, index: np.ndarray | None = None) -> Batch:
        """Cells ``index`` (default all) as one evaluation Batch, plate not rescaled."""
        index = jnp.arange(self.data.n_cells) if index is None else jnp.asarray(index)
        batch = self.gather(self.arrays, index)
        return batch.replace(n_cells=batch.size, training=False)


def _densify_rows(arrays, index, window, n_genes):
    starts = arrays["row_starts"][index]
    ends = arrays["row_starts"][index + 1]
    positions = starts[:, None] + jnp.arange(window)[None, :]
    inside = positions < ends[:, None]
    positions = jnp.where(inside, positions, 0)
    values = jnp.where(inside, arrays["values"][positions], 0.0)
    columns = arrays["columns"][positions]
    rows = jnp.broadcast_to(jnp.arange(index.shape[0])[:, None], columns.shape)
    dense = jnp.zeros((index.shape[0], n_genes), jnp.float32)
    return dense.at[rows, columns].add(values)
