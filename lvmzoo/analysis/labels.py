"""Scores of predicted cell labels: accuracy, macro F1 and calibration.

A classifier's probabilities are *calibrated* when, among the cells it
predicts with confidence ``p``, a share ``p`` is right.  The expected
calibration error (Guo et al., 2017) bins cells by their confidence (the
largest predicted probability) into ``n_bins`` equal-width bins of ``[0, 1]``
and averages the gap between accuracy and mean confidence per bin, weighted
by the share of cells in it:

.. math::

   \\mathrm{ECE} = \\sum_{b=1}^{M} \\frac{|B_b|}{n}
       \\left| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\right|.

0 is perfectly calibrated; an over-confident classifier has ECE close to
``confidence - accuracy``.

References:
  Guo, C., Pleiss, G., Sun, Y. & Weinberger, K. Q. (2017). On calibration of
  modern neural networks. ICML. https://arxiv.org/abs/1706.04599
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def expected_calibration_error(probabilities, labels, n_bins: int = 15) -> float:
    """ECE of predicted probabilities ``(n, C)`` against true label codes ``(n,)``.

    Bins are ``(b/M, (b+1)/M]`` (the first also holds confidence 0).

    Args:
      probabilities: ``(n_cells, n_labels)``, rows summing to 1.
      labels: ``(n_cells,)`` integer codes of the true labels (columns of
        ``probabilities``).
      n_bins: number ``M`` of equal-width confidence bins.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != probabilities.shape[:1]:
        raise ValueError(f"need (n, C) probabilities and (n,) labels, got {probabilities.shape} "
                         f"and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no cells to score")
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def label_scores(true: Sequence[str], probabilities: pd.DataFrame, n_bins: int = 15) -> dict:
    """Accuracy, macro F1 and ECE of predictions against true labels.

    Args:
      true: ``(n_cells,)`` true label names; cells whose label is not a column
        of ``probabilities`` (unknown to the classifier) are left out.
      probabilities: cells × labels DataFrame (what ``FittedModel.predict(data,
        soft=True)`` returns second).

    Returns:
      ``{"n_cells", "accuracy", "macro_f1", "ece"}``; macro F1 averages the F1
      of every label that occurs among the true or the predicted labels.
    """
    true = np.asarray(true).astype(str)
    columns = [str(c) for c in probabilities.columns]
    known = np.isin(true, columns)
    if not known.any():
        raise ValueError("none of the true labels is a label the classifier knows")
    probs = probabilities.to_numpy()[known]
    codes = np.array([columns.index(t) for t in true[known]])
    predicted = probs.argmax(1)
    f1 = []
    for c in np.union1d(codes, predicted):
        tp = np.sum((predicted == c) & (codes == c))
        denominator = np.sum(predicted == c) + np.sum(codes == c)
        f1.append(2 * tp / denominator)
    return {"n_cells": int(known.sum()), "accuracy": float(np.mean(predicted == codes)),
            "macro_f1": float(np.mean(f1)),
            "ece": expected_calibration_error(probs, codes, n_bins)}
