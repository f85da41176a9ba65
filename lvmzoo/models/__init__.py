"""The zoo: one file per model, each a NumPyro generative program.

``MODELS`` maps the CLI / saved-run name of each model to its class; a model
written outside the package joins it through :func:`register_model`, the
``lvmzoo.models`` entry-point group or an import path (see
:mod:`lvmzoo.models.registry`).
"""

from lvmzoo.models.base import LatentModel, cell_plate
from lvmzoo.models.cpa import CPA
from lvmzoo.models.factor_analysis import FactorAnalysis
from lvmzoo.models.gmm import GaussianMixture
from lvmzoo.models.linear_scvi import LinearSCVI
from lvmzoo.models.ppca import PPCA
from lvmzoo.models.pseudotime import BranchingPseudotime, Pseudotime, SwitchPseudotime
from lvmzoo.models.registry import (MODELS, ModelNotFoundError, available_models, get_model,
                                    register_model, resolve_model)
from lvmzoo.models.scanvi import SCANVI
from lvmzoo.models.scvi import SCVI
from lvmzoo.models.totalvi import TotalVI
from lvmzoo.models.vae import VAE

for _cls in (PPCA, FactorAnalysis, GaussianMixture, VAE, SCVI, LinearSCVI, SCANVI, CPA, Pseudotime,
             SwitchPseudotime, BranchingPseudotime, TotalVI):
    register_model(_cls)

__all__ = ["BranchingPseudotime", "CPA", "MODELS", "FactorAnalysis", "GaussianMixture", "LatentModel", "LinearSCVI",
           "ModelNotFoundError", "PPCA", "Pseudotime", "SCANVI", "SCVI", "SwitchPseudotime",
           "TotalVI", "VAE", "available_models",
           "cell_plate", "get_model", "register_model", "resolve_model"]
