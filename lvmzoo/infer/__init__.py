"""Inference: the one SVI driver, fitted-model results, evaluation."""

from lvmzoo.infer.evaluate import importance_sampled_scores, log_weights
from lvmzoo.infer.results import FittedModel
from lvmzoo.infer.svi import FitDivergedError, fit

__all__ = ["FitDivergedError", "FittedModel", "fit", "importance_sampled_scores", "log_weights"]
