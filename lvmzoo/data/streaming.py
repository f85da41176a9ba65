"""Training from data larger than memory: a host-streaming source for the one driver.

The matrix stays on disk (:class:`~lvmzoo.data.backed.BackedMatrix`); what
the device sees per epoch is a sequence of *chunks* of steps, each the
minibatch rows of ``n_steps`` steps, fed to the same compiled epoch program
that in-memory data runs in one call.  Only the small per-cell arrays (batch
and label codes, covariates) live on the device for the whole fit.

The cell order is :class:`BlockShuffle`'s, the scheme of scverse's
``annbatch`` (whose ``chunk_size`` and ``preload_nchunks`` are our
``block_size`` and ``window_blocks``): the cells are cut into contiguous
blocks, the blocks are shuffled, and the cells of each *window* of
consecutive shuffled blocks are shuffled together.  Every read is then one
contiguous range of rows, and every minibatch mixes cells from
``window_blocks`` places of the file.  annbatch needs Python >= 3.12, so
this is a small loader of our own built on its design, not annbatch itself:

* a background thread reads the blocks a chunk needs (contiguous slices of
  the CSR arrays, see :mod:`lvmzoo.data.backed`), keeps the current and
  next window's blocks, assembles the chunk's rows and puts them on the
  device(s) while the previous chunk trains;
* rows stay sparse until then: a chunk holds, per cell, either its dense
  row or, when that is smaller, its stored entries padded to the widest cell
  (``values``/``columns``, ``(n_steps, B, max_row_nnz)``), scattered into
  the dense minibatch inside the compiled step as :class:`DeviceSource` does;
* on several devices or hosts each process assembles only its own columns
  of every minibatch (:meth:`Placement.local_columns`).

The in-memory :class:`~lvmzoo.data.source.DeviceSource` accepts the same
order (``fit(..., shuffle=BlockShuffle(...))``), so a streamed fit can be
checked against an in-memory one step for step.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from lvmzoo.data.backed import BackedMatrix
from lvmzoo.data.placement import Placement
from lvmzoo.data.registry import CellData, DataError
from lvmzoo.data.source import (PER_CELL_FIELDS, Batch, DeviceSource, assemble_batch,
                                 epoch_steps, scatter_rows)

# Bytes of step inputs per chunk fed from the host (the rows of ~16 steps of
# 128 cells × 2,000 genes); big enough that per-call overhead vanishes,
# small enough that a few chunks in flight cost little memory.
CHUNK_BYTES = 16 * 2**20
# Chunks assembled ahead of the one training.
PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class BlockShuffle:
    """Shuffle contiguous blocks of cells, then cells within windows of blocks.

    Attributes:
      block_size: cells per contiguous block, the unit of reading (annbatch's
        ``chunk_size``).
      window_blocks: blocks whose cells are shuffled together (annbatch's
        ``preload_nchunks``); the loader holds about two windows of rows.

    A file sorted by sample or cell type still gives well-mixed minibatches
    when ``window_blocks`` blocks span many samples; for a strongly sorted
    file, shuffle its rows once on disk (as annbatch recommends).
    """

    block_size: int = 1024
    window_blocks: int = 16

    def __post_init__(self):
        if self.block_size < 1 or self.window_blocks < 1:
            raise ValueError("block_size and window_blocks must be at least 1")

    def order(self, key: jax.Array, epoch: int, n_cells: int, steps_per_epoch: int,
              batch_size: int) -> np.ndarray:
        """This epoch's cell positions, ``(steps_per_epoch, batch_size)`` int32.

        A pure function of the PRNG ``key``, ``epoch`` and the sizes: the same
        in every process and for any number of devices.
        """
        if batch_size == n_cells:
            # A full batch keeps the cells in order (see svi.epoch_order).
            return np.arange(n_cells, dtype=np.int32).reshape(1, n_cells)
        entropy = np.asarray(jax.random.fold_in(key, epoch), np.uint32)
        rng = np.random.default_rng(entropy.tolist())
        starts = rng.permutation(np.arange(0, n_cells, self.block_size))
        pieces = []
        for w in range(0, len(starts), self.window_blocks):
            window = np.concatenate([np.arange(s, min(s + self.block_size, n_cells))
                                     for s in starts[w:w + self.window_blocks]])
            pieces.append(window[rng.permutation(len(window))])
        return epoch_steps(np.concatenate(pieces), steps_per_epoch, batch_size).astype(np.int32)


class StreamingSource:
    """Cells on disk, streamed to the device(s) chunk by chunk; minibatches built inside jit.

    Args:
      data: validated cells whose ``x`` is a :class:`BackedMatrix`.
      shuffle: the block structure the epoch orders follow (reads are whole
        blocks of ``shuffle.block_size`` cells).
      placement: the fit's devices.
      chunk_bytes: host bytes of step inputs per chunk (default
        :data:`CHUNK_BYTES`).
    """

    def __init__(self, data: CellData, shuffle: BlockShuffle,
                 placement: Optional[Placement] = None, chunk_bytes: Optional[int] = None):
        if not isinstance(data.x, BackedMatrix):
            raise TypeError("StreamingSource streams on-disk data; use DeviceSource in memory")
        self.data = data
        self.matrix = data.x
        self.shuffle = shuffle
        self.placement = placement or Placement()
        self.n_cells = data.n_cells
        self.n_genes = data.n_genes
        self.n_batches = data.registry.n_batches
        self.n_labels = data.registry.n_labels
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.arrays: dict[str, Any] = self.placement.replicate(dict(
            batch=data.batch, labels=data.labels, covariates=data.covariates,
            categorical_covariates=np.asarray(data.categorical_covariates, np.int32),
            obsm=np.asarray(data.obsm, np.float32)))
        # Padded entries cost 8 bytes (value + column) against 4 per dense
        # entry: send whichever is smaller.
        width = int(self.matrix.row_nnz().max(initial=1))
        self.max_row_nnz = None if 2 * width >= self.n_genes else max(width, 1)

    # -- inside the compiled step -----------------------------------------

    def gather(self, arrays: dict[str, Any], step: dict[str, jax.Array]) -> Batch:
        """The minibatch of one step from its streamed inputs; traceable."""
        index = step["index"]
        if self.max_row_nnz is None:
            x = step["x"]
        else:
            x = scatter_rows(step["values"], step["columns"], self.n_genes)
        return assemble_batch(self.placement.constrain_cells(x), index,
                              {name: arrays[name][index] for name in PER_CELL_FIELDS},
                              self.data.registry, self.n_cells)

    # -- on the host -------------------------------------------------------

    def head(self, n: int) -> Batch:
        """The first ``n`` cells as a training Batch on the default device (for ``svi.init``)."""
        return self._batch(np.arange(n), self.matrix.read(0, n))

    def sample(self, n: int, key: jax.Array) -> Batch:
        """About ``n`` cells from random whole blocks, as a training Batch (for ``init_params``).

        Whole blocks keep the reads contiguous; random ones keep the sample
        representative of a file stored in some order.
        """
        size = self.shuffle.block_size
        n_blocks = -(-self.n_cells // size)
        chosen = np.sort(np.asarray(jax.random.permutation(key, n_blocks))[: -(-n // size)])
        starts = chosen * size
        stops = np.minimum(starts + size, self.n_cells)
        rows = sp.vstack([self.matrix.read(a, b) for a, b in zip(starts, stops)], format="csr")
        return self._batch(np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]), rows)

    def _batch(self, cells: np.ndarray, rows) -> Batch:
        return assemble_batch(jnp.asarray(rows.toarray()), jnp.asarray(cells, jnp.int32),
                              {name: getattr(self.data, name)[cells] for name in PER_CELL_FIELDS},
                              self.data.registry, self.n_cells)

    def steps_per_chunk(self, steps_per_epoch: int, batch_size: int) -> int:
        """Steps per chunk: at most ``chunk_bytes`` of inputs, dividing the epoch if it can.

        An epoch whose steps divide into equal chunks needs one compiled
        program; otherwise the last, shorter chunk compiles a second one.
        """
        per_cell = 4 * (self.n_genes if self.max_row_nnz is None else 2 * self.max_row_nnz)
        most = int(np.clip(self.chunk_bytes // (batch_size * per_cell), 1, steps_per_epoch))
        divisors = [n for n in range(most, (most + 1) // 2 - 1, -1) if steps_per_epoch % n == 0]
        return divisors[0] if divisors else most

    def chunk_specs(self, steps_per_epoch: int, batch_size: int) -> dict[int, Any]:
        """``{n_steps: input shapes}`` of the (at most two) chunk lengths of an epoch."""
        size = self.steps_per_chunk(steps_per_epoch, batch_size)
        lengths = {size} | ({steps_per_epoch % size} if steps_per_epoch % size else set())
        return {n: self.placement.step_spec(self._shapes(n, batch_size)) for n in lengths}

    def _shapes(self, n_steps: int, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shapes = {"index": jax.ShapeDtypeStruct((n_steps, batch_size), jnp.int32)}
        if self.max_row_nnz is None:
            shapes["x"] = jax.ShapeDtypeStruct((n_steps, batch_size, self.n_genes), jnp.float32)
        else:
            padded = (n_steps, batch_size, self.max_row_nnz)
            shapes["values"] = jax.ShapeDtypeStruct(padded, jnp.float32)
            shapes["columns"] = jax.ShapeDtypeStruct(padded, jnp.int32)
        return shapes

    def epoch_inputs(self, order: np.ndarray) -> Iterator[dict[str, jax.Array]]:
        """The inputs of an epoch's steps, chunk by chunk, read and placed in a background thread.

        Args:
          order: ``(n_steps, B)`` cell positions of the epoch (every process
            passes the whole matrix; each reads only its own columns).
        """
        order = np.asarray(order)
        n_steps, batch_size = order.shape
        size = self.steps_per_chunk(n_steps, batch_size)
        start, stop = self.placement.local_columns(batch_size)
        reader = _BlockReader(self.matrix, self.shuffle.block_size,
                              capacity=2 * self.shuffle.window_blocks + 1)

        def chunks():
            for first in range(0, n_steps, size):
                cells = order[first:first + size, start:stop]
                inputs = {"index": cells, **self._rows(reader, cells)}
                yield self.placement.shard_steps(inputs, batch_size)

        return prefetch(chunks(), PREFETCH)

    def _rows(self, reader: "_BlockReader", cells: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of ``cells`` ``(n_steps, b)``: ``{"x"}`` dense or ``{"values", "columns"}`` padded."""
        flat = cells.ravel()
        if self.max_row_nnz is None:
            x = np.zeros((flat.size, self.n_genes), np.float32)
        else:
            values = np.zeros((flat.size, self.max_row_nnz), np.float32)
            columns = np.zeros((flat.size, self.max_row_nnz), np.int32)
        blocks = flat // self.shuffle.block_size
        # Blocks in order of first use: the order they are read in.
        _, first_use = np.unique(blocks, return_index=True)
        for block in blocks[np.sort(first_use)]:
            where = np.flatnonzero(blocks == block)
            rows = reader.block(int(block))
            within = flat[where] - block * self.shuffle.block_size
            if self.max_row_nnz is None:
                x[where] = rows[within].toarray()
            else:
                values[where], columns[where] = _padded(rows, within, self.max_row_nnz)
        shape = cells.shape
        if self.max_row_nnz is None:
            return {"x": x.reshape(*shape, self.n_genes)}
        return {"values": values.reshape(*shape, -1), "columns": columns.reshape(*shape, -1)}


class _BlockReader:
    """Blocks of ``block_size`` cells of a backed matrix, the last ``capacity`` kept."""

    def __init__(self, matrix: BackedMatrix, block_size: int, capacity: int):
        self.matrix, self.block_size, self.capacity = matrix, block_size, capacity
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()

    def block(self, k: int) -> sp.csr_matrix:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        start = k * self.block_size
        rows = self.matrix.read(start, min(start + self.block_size, self.matrix.shape[0]))
        self._cache[k] = rows
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return rows


def _padded(block: sp.csr_matrix, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored entries of ``rows`` of ``block``, padded with zeros to ``width``: ``(n, width)`` each."""
    starts = block.indptr[rows]
    lengths = block.indptr[rows + 1] - starts
    offsets = np.arange(width)
    inside = offsets[None, :] < lengths[:, None]
    if block.nnz == 0:
        return np.zeros(inside.shape, np.float32), np.zeros(inside.shape, np.int32)
    positions = np.where(inside, starts[:, None] + offsets[None, :], 0)
    values = np.where(inside, block.data[positions], 0).astype(np.float32)
    columns = np.where(inside, block.indices[positions], 0).astype(np.int32)
    return values, columns


def prefetch(items: Iterable, depth: int = PREFETCH) -> Iterator:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead.

    Reading (h5py holds its own global lock, Zarr does not) and assembling
    happen while the device trains on the previous item; XLA releases the
    GIL while it runs.  Stopping early (``close()``, an exception) stops the
    thread; an exception in the thread is raised here.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # forwarded to the consumer
            put(err)

    finished = _WORKERS.run(work)
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        finished.wait()


class _Workers:
    """Daemon threads that run :func:`prefetch` jobs, kept and reused from epoch to epoch.

    A new thread per epoch would make glibc give each its own malloc arena,
    and every arena keeps the memory its thread freed: resident memory would
    grow by about a window of rows per epoch until the arena limit.
    """

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def run(self, job) -> threading.Event:
        """Run ``job()`` on an idle worker (or a new one); the event is set when it returns."""
        finished = threading.Event()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._serve, name="lvmzoo-prefetch", daemon=True).start()
        self._tasks.put((job, finished))
        return finished

    def _serve(self):
        while True:
            job, finished = self._tasks.get()
            try:
                job()
            finally:
                finished.set()
                with self._lock:
                    self._idle += 1


_WORKERS = _Workers()


# In-memory data up to this many values is evaluated from one device copy (see below).
DEVICE_EVALUATION_VALUES = 20_000_000


class EvaluationBatches:
    """Re-iterable evaluation Batches of ``chunk`` cells (plate not rescaled, ``training=False``).

    Each iteration takes the cells in order, a chunk ahead of use: read from the
    file for cells on disk, sliced from the host matrix in memory (no device
    copy of all cells: at 200,000 × 2,000 building one took 5x longer than
    slicing, and held the matrix a second time).  Small data (up to
    :data:`DEVICE_EVALUATION_VALUES` values) is gathered from one
    :class:`DeviceSource`, which is faster for many small evaluations.
    """

    def __init__(self, data: CellData, chunk: int):
        self.data, self.chunk = data, chunk
        small = data.n_cells * data.n_genes <= DEVICE_EVALUATION_VALUES
        self._source = (DeviceSource(data) if small and not isinstance(data.x, BackedMatrix)
                        else None)

    def __len__(self) -> int:
        return -(-self.data.n_cells // self.chunk)

    def __iter__(self) -> Iterator[Batch]:
        starts = range(0, self.data.n_cells, self.chunk)
        if self._source is not None:
            return (self._source.full_batch(np.arange(s, min(s + self.chunk, self.data.n_cells)))
                    for s in starts)
        return prefetch((self._read(s) for s in starts), PREFETCH)

    def _read(self, start: int) -> Batch:
        stop = min(start + self.chunk, self.data.n_cells)
        d = self.data
        rows = d.x.read(start, stop) if isinstance(d.x, BackedMatrix) else d.x[start:stop]
        rows = rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)
        return assemble_batch(jnp.asarray(rows, jnp.float32),
                              jnp.arange(start, stop, dtype=jnp.int32),
                              {name: getattr(d, name)[start:stop] for name in PER_CELL_FIELDS},
                              d.registry, stop - start, training=False)


def make_source(data: CellData, placement: Placement, shuffle,
                rows: np.ndarray | None = None) -> Any:
    """The source a fit trains from: streamed for on-disk cells, else device-resident.

    ``rows`` (default all) selects the cells: a view of the file's rows for
    cells on disk, an index into the matrix placed whole for cells in memory.
    """
    if isinstance(data.x, BackedMatrix):
        if not isinstance(shuffle, BlockShuffle):
            raise DataError("cells on disk are read in contiguous blocks; train them with "
                            "shuffle=BlockShuffle(...) (the default for on-disk data)")
        return StreamingSource(data if rows is None else data.subset(rows), shuffle, placement)
    return DeviceSource(data, placement=placement, rows=rows)


__all__ = ["BlockShuffle", "EvaluationBatches", "StreamingSource", "make_source", "prefetch"]
