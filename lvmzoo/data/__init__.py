"""Data layer: AnnData validation and registry, transforms, minibatch sources, devices."""

from lvmzoo.data.backed import BackedMatrix, read_backed
from lvmzoo.data.compact import CompactCSR
from lvmzoo.data.multimodal import from_mudata, read_h5mu
from lvmzoo.data.placement import Placement
from lvmzoo.data.registry import (
    CellData, DataError, DataRegistry, DataWarning, query_anndata, setup_anndata,
)
from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.data.streaming import BlockShuffle, StreamingSource
from lvmzoo.data.transforms import TRANSFORMS, apply_transform

__all__ = [
    "BackedMatrix", "Batch", "BlockShuffle", "CellData", "CompactCSR", "DataError", "DataRegistry",
    "DataWarning", "DeviceSource", "Placement", "StreamingSource", "TRANSFORMS",
    "apply_transform", "from_mudata", "query_anndata", "read_backed", "read_h5mu",
    "setup_anndata",
]
