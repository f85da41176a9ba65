"""Host arrays that a CPU device can use without copying them.

On the CPU, ``jax.device_put`` of a NumPy array whose buffer is aligned to 64
bytes makes a device array that *is* that buffer; any other array is copied.
NumPy's own allocations of large arrays are 16-byte aligned (the allocator's
header), so the matrix a fit places on the device was held twice: the AnnData's
and the device's copy (2 GiB for a 1 GiB matrix of 200,000 cells).
:func:`read_h5ad` reads an ``.h5ad`` file's matrices (``X`` and ``layers``)
straight into aligned buffers, so that a fit on the CPU holds them once
(:class:`lvmzoo.data.source.DeviceSource` places them with ``jax.device_put``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

# What the CPU client needs to alias a host buffer (XLA's minimum alignment).
ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array whose buffer starts on a :data:`ALIGNMENT`-byte boundary.

    The array is a slice of one a few elements longer, of the same dtype (so that
    SciPy, which copies views of much larger arrays, keeps it as it is).
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64))
    spare = -(-ALIGNMENT // dtype.itemsize)
    buffer = np.empty(n + spare, dtype)
    offset = (-buffer.ctypes.data % ALIGNMENT) // dtype.itemsize
    return buffer[offset:offset + n].reshape(shape)


def is_aligned(array: np.ndarray) -> bool:
    """Whether ``array``'s buffer starts on a :data:`ALIGNMENT`-byte boundary."""
    return array.ctypes.data % ALIGNMENT == 0


def _read_dataset(dataset) -> np.ndarray:
    out = aligned_empty(dataset.shape, dataset.dtype)
    if out.size:
        dataset.read_direct(out)
    return out


def _read_matrix(group, encoding: str):
    """A CSR / CSC group or a numeric dense dataset read into aligned arrays; else ``None``."""
    import h5py
    import scipy.sparse as sp

    if encoding in ("csr_matrix", "csc_matrix") and isinstance(group, h5py.Group):
        kind = sp.csr_matrix if encoding == "csr_matrix" else sp.csc_matrix
        arrays = tuple(_read_dataset(group[name]) for name in ("data", "indices", "indptr"))
        return kind(arrays, shape=tuple(int(n) for n in group.attrs["shape"]), copy=False)
    if (encoding == "array" and isinstance(group, h5py.Dataset) and group.ndim == 2
            and group.dtype.kind in "biuf"):
        return _read_dataset(group)
    return None


def read_h5ad(path: Union[str, Path]):
    """``anndata.read_h5ad(path)``, its ``X`` and ``layers`` in 64-byte aligned buffers.

    The same AnnData (values, dtypes, obs, var, obsm, uns); files in an older
    layout than anndata's element encoding (a ``raw`` section, or obs stored as a
    record array) are read by ``anndata.read_h5ad`` itself.
    """
    import anndata as ad
    import h5py
    from anndata.experimental import read_dispatched

    with h5py.File(path, "r") as f:
        modern = (f.attrs.get("encoding-type") == "anndata" and "raw" not in f
                  and "raw.X" not in f and isinstance(f.get("obs"), h5py.Group))
        if not modern:
            return ad.read_h5ad(path)

        def callback(read, name: str, element, iospec):
            if iospec.encoding_type == "anndata" or name.endswith("/"):
                return ad.AnnData(**{key: read_dispatched(element[key], callback)
                                     for key in element})
            if name == "/X" or name.startswith("/layers/"):
                matrix = _read_matrix(element, iospec.encoding_type)
                if matrix is not None:
                    return matrix
            return read(element)

        return read_dispatched(f, callback=callback)


__all__ = ["ALIGNMENT", "aligned_empty", "is_aligned", "read_h5ad"]
