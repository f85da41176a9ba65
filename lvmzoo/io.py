"""Files: atomic writes, strict JSON, the run directory's file names and parameter bytes.

Everything lvmzoo writes goes through these helpers: to a temporary sibling,
then ``os.replace``, so a crash or a full disk never leaves a half-written
file behind.  The run directory of a fitted model (``model.json``,
``registry.json``, ``params.msgpack``, ``history.json``) is assembled by
:mod:`lvmzoo.infer.saving`, which owns saving and loading fitted models; this
module imports nothing from :mod:`lvmzoo.infer` (the dependency runs one way:
``infer`` -> ``io``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization


PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
REGISTRY_FILE = "registry.json"
PARAMS_FILE = "params.msgpack"
HISTORY_FILE = "history.json"
RUN_FILES = (MODEL_FILE, REGISTRY_FILE, PARAMS_FILE, HISTORY_FILE)
# A seed ensemble's run: replicate 0's files as above (so it reads as one fit),
# this file, and replicate r's files under ``replicates/<r>/``.
ENSEMBLE_FILE = "ensemble.json"
REPLICATES_DIR = "replicates"


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it to ``path``.

    The temporary file keeps ``path``'s suffix (some writers, e.g.
    ``AnnData.write_h5ad``, care about it).  If the body raises, the temporary
    file is removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    # A fresh name rather than tempfile.mkstemp, whose 0600 mode would stick
    # to the final file; the writer creates it with the usual permissions.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_file(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``.

    Args:
      path: destination file; its directory must exist.
      write: writes the complete file at the path it is given.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.
    """
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_h5ad(path: PathLike, adata) -> Path:
    """Write ``adata`` to ``path`` atomically, as ``adata.write_h5ad`` does.

    For an AnnData whose ``X`` is on disk (``backed="r"``), ``X`` is copied from
    its file by HDF5 itself, chunk by chunk, so the matrix is never loaded
    (anndata's own writer reads it in pieces of hundreds of MiB); everything
    else (obs, var, obsm, layers, uns, ...) is written by anndata.
    """
    if not getattr(adata, "isbacked", False) or adata.raw is not None:
        return atomic_write_file(path, adata.write_h5ad)

    import anndata as ad
    import h5py

    def write(tmp: Path) -> None:
        rest = ad.AnnData(obs=adata.obs, var=adata.var, uns=adata.uns,
                          obsm=dict(adata.obsm), varm=dict(adata.varm),
                          obsp=dict(adata.obsp), varp=dict(adata.varp),
                          layers=dict(adata.layers))
        rest.write_h5ad(tmp)
        with h5py.File(adata.filename, "r") as source, h5py.File(tmp, "a") as target:
            source.copy(source["X"], target, name="X")

    return atomic_write_file(path, write)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf become ``null``) atomically."""
    return atomic_write_text(path, to_json(obj))


def to_json(obj: Any) -> str:
    """Strict JSON text of ``obj``: numpy scalars/arrays become numbers/lists,
    non-finite floats become ``null`` (plain JSON has no NaN)."""
    return json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} value {obj!r} as JSON")


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------


def params_to_bytes(params: dict[str, Any]) -> bytes:
    """Flax msgpack of a params pytree (nested dicts of arrays, moved to the host)."""
    state = serialization.to_state_dict(jax.device_get(params))
    return serialization.msgpack_serialize(state)


def params_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`params_to_bytes`: nested dicts of ``jax.Array``."""
    restored = serialization.msgpack_restore(data)
    return jax.tree.map(jnp.asarray, restored)
