"""The zoo: one file per model, each a NumPyro generative program.

``MODELS`` maps the CLI / saved-run name of each model to its class.
"""

from lvmzoo.models.base import LatentModel, cell_plate
from lvmzoo.models.factor_analysis import FactorAnalysis
from lvmzoo.models.ppca import PPCA

MODELS: dict[str, type[LatentModel]] = {
    cls.name: cls for cls in (PPCA, FactorAnalysis)
}


def get_model(name: str) -> type[LatentModel]:
    """The model class registered under ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


__all__ = ["MODELS", "FactorAnalysis", "LatentModel", "PPCA", "cell_plate", "get_model"]
