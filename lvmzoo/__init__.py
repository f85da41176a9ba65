"""lvmzoo: a JAX model zoo of latent variable models for single-cell biology."""

from lvmzoo import cache

cache.enable_compilation_cache()  # before anything compiles; see lvmzoo.cache
cache.use_fast_cpu_compilation()

from lvmzoo import data, models  # noqa: E402
from lvmzoo.data import CellData, DataError, DataWarning, query_anndata, setup_anndata
from lvmzoo.infer import FitDivergedError, FittedModel, fit
from lvmzoo.infer.saving import load_model, save_model
from lvmzoo.models.registry import register_model

__version__ = "0.1.0"

__all__ = [
    "CellData", "DataError", "DataWarning", "FitDivergedError", "FittedModel", "data", "fit", "load_model",
    "models", "query_anndata", "register_model", "save_model", "setup_anndata",
]
