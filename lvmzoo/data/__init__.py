"""Data layer: AnnData validation and registry, transforms, minibatch sources."""

from lvmzoo.data.registry import (
    CellData, DataError, DataRegistry, DataWarning, query_anndata, setup_anndata,
)
from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.data.transforms import TRANSFORMS, apply_transform

__all__ = [
    "Batch", "CellData", "DataError", "DataRegistry", "DataWarning", "DeviceSource", "TRANSFORMS",
    "apply_transform", "query_anndata", "setup_anndata",
]
