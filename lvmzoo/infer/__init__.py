"""Inference: the one SVI driver, fitted-model results, evaluation, guides by name, NUTS.

ArviZ conversion and diagnostics live in :mod:`lvmzoo.infer.diagnostics`
(imported on demand: ArviZ is slow to import).
"""

from lvmzoo.infer.evaluate import importance_sampled_scores, log_weights
from lvmzoo.infer.guides import GUIDES, make_guide, refit_local
from lvmzoo.infer.mcmc import NutsResult, run_nuts
from lvmzoo.infer.results import FittedModel
from lvmzoo.infer.svi import FitDivergedError, fit

__all__ = ["FitDivergedError", "FittedModel", "GUIDES", "NutsResult", "fit",
           "importance_sampled_scores", "log_weights", "make_guide", "refit_local", "run_nuts"]
