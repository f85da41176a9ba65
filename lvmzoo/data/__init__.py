"""Data layer: AnnData validation and registry, transforms, minibatch sources, devices."""

from lvmzoo.data.backed import BackedMatrix, read_backed
from lvmzoo.data.placement import Placement
from lvmzoo.data.registry import (
    CellData, DataError, DataRegistry, DataWarning, query_anndata, setup_anndata,
)
from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.data.streaming import BlockShuffle, StreamingSource
from lvmzoo.data.transforms import TRANSFORMS, apply_transform

__all__ = [
    "BackedMatrix", "Batch", "BlockShuffle", "CellData", "DataError", "DataRegistry",
    "DataWarning", "DeviceSource", "Placement", "StreamingSource", "TRANSFORMS",
    "apply_transform", "query_anndata", "read_backed", "setup_anndata",
]
