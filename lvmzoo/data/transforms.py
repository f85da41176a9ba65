"""Deterministic per-cell transforms applied on the host before fitting.

Gaussian models (PPCA, factor analysis, mixtures, the Gaussian VAE) describe
continuous data; on raw counts they are fitted to a transform of the counts.
The transform's name is stored in the data registry so that `evaluate` and
query data go through exactly the same map.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse as sp

TRANSFORMS: dict[str, str] = {
    "none": "use the values as they are",
    "log1p_cp10k": "log(1 + 1e4 * x / total counts of the cell)",
}


def _log1p_cp10k(x):
    """``log1p(1e4 * x / rowsum(x))``; keeps CSR input sparse (log1p(0) = 0)."""
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    scale = (1e4 / totals).astype(np.float32)
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float32, copy=True)
        out.data *= np.repeat(scale, np.diff(out.indptr))
        np.log1p(out.data, out=out.data)
        return out
    return np.log1p(np.asarray(x, dtype=np.float32) * scale[:, None])


def _identity(x):
    return x


_FUNCTIONS: dict[str, Callable] = {"none": _identity, "log1p_cp10k": _log1p_cp10k}


def apply_transform(name: str, x):
    """Apply the named transform to a ``(n_cells, n_genes)`` matrix.

    Args:
      name: one of :data:`TRANSFORMS`.
      x: dense ndarray or scipy sparse matrix, cells in rows.

    Returns:
      The transformed matrix, of the same kind (dense or CSR) as the input.
    """
    if name not in _FUNCTIONS:
        raise ValueError(
            f"unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}"
        )
    return _FUNCTIONS[name](x)
