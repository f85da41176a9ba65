"""The zoo: one file per model, each a NumPyro generative program.

``MODELS`` maps the CLI / saved-run name of each model to its class.
"""

from lvmzoo.models.base import LatentModel, cell_plate
from lvmzoo.models.cpa import CPA
from lvmzoo.models.factor_analysis import FactorAnalysis
from lvmzoo.models.gmm import GaussianMixture
from lvmzoo.models.linear_scvi import LinearSCVI
from lvmzoo.models.ppca import PPCA
from lvmzoo.models.scanvi import SCANVI
from lvmzoo.models.scvi import SCVI
from lvmzoo.models.vae import VAE

MODELS: dict[str, type[LatentModel]] = {
    cls.name: cls
    for cls in (PPCA, FactorAnalysis, GaussianMixture, VAE, SCVI, LinearSCVI, SCANVI, CPA)
}


def get_model(name: str) -> type[LatentModel]:
    """The model class registered under ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


__all__ = ["CPA", "MODELS", "FactorAnalysis", "GaussianMixture", "LatentModel", "LinearSCVI",
           "PPCA", "SCANVI", "SCVI", "VAE", "cell_plate", "get_model"]
