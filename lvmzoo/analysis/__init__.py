"""Downstream analysis of fitted models: per-cell outputs, differential expression,
query mapping, label scores and perturbation prediction.

All functions take a :class:`~lvmzoo.infer.results.FittedModel` and the
:class:`~lvmzoo.data.registry.CellData` of the cells to describe, and return
numpy arrays or pandas DataFrames; none writes to an AnnData.
"""

from lvmzoo.analysis.de import differential_expression, posterior_fdr_calls
from lvmzoo.analysis.expression import (
    batch_codes,
    cell_scores,
    latent_representation,
    likelihood_parameters,
    normalized_expression,
    posterior_predictive_sample,
    reconstruction_error,
)
from lvmzoo.analysis.labels import expected_calibration_error, label_scores
from lvmzoo.analysis.proteins import (
    protein_differential_expression,
    protein_outputs,
    protein_view,
)
from lvmzoo.analysis.query import map_query
from lvmzoo.analysis.trajectory import arc_length, changing_genes, orient
from lvmzoo.analysis.perturbation import (
    compare_perturbation,
    evaluate_perturbation,
    exclude_cells,
    predict_perturbation,
    prediction_profiles,
)

__all__ = [
    "arc_length", "batch_codes", "cell_scores", "changing_genes", "compare_perturbation",
    "differential_expression", "orient",
    "evaluate_perturbation", "exclude_cells", "latent_representation", "predict_perturbation",
    "prediction_profiles",
    "likelihood_parameters", "normalized_expression", "posterior_fdr_calls",
    "posterior_predictive_sample", "reconstruction_error",
    "expected_calibration_error", "label_scores", "map_query",
    "protein_differential_expression", "protein_outputs", "protein_view",
]
