"""Figures written by the CLI: the loss curve of a fit, a perturbation prediction.

Figures are drawn on Matplotlib's Agg canvas directly (no ``pyplot``), so no
global backend is selected and nothing needs a display.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lvmzoo.io import PathLike, atomic_write_bytes


def loss_figure(history: Mapping[str, Any], title: str = "") -> Figure:
    """Training and validation loss per epoch.

    Args:
      history: ``FittedModel.history``: ``epoch``, ``loss`` and
        ``validation_loss`` lists (negative ELBO, nats per cell; NaN or
        ``None`` where there was no validation set).
      title: figure title, e.g. the model name.

    Returns:
      A Matplotlib figure attached to an Agg canvas.
    """
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = list(history.get("epoch", []))
    ax.plot(epochs, _finite(history.get("loss", [])), marker=".", label="training")
    validation = _finite(history.get("validation_loss", []))
    if any(not math.isnan(v) for v in validation):
        ax.plot(epochs, validation, marker=".", label="validation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (−ELBO, nats per cell)")
    # Losses of count models can fall by orders of magnitude in the first
    # epochs; a log axis keeps the later epochs readable.
    values = [v for v in _finite(history.get("loss", [])) + validation if not math.isnan(v)]
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend()
    return fig


def save_loss_plot(history: Mapping[str, Any], path: PathLike, title: str = "") -> Path:
    """Write :func:`loss_figure` as a PNG to ``path`` atomically."""
    buffer = io.BytesIO()
    loss_figure(history, title).savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


def perturbation_figure(evaluation, n_labels: int = 10) -> Figure:
    """Predicted vs measured mean expression of the held-out type's perturbed cells.

    One panel per method (the predictions, then the mean-shift baseline): each
    gene's mean log-normalised expression in the measured perturbed cells (x)
    and in the predicted ones (y), the top differentially expressed genes in
    colour and the ``n_labels`` most significant named, with the diagonal and
    the panel's ``R²`` (all genes / top genes).

    Args:
      evaluation: a :class:`~lvmzoo.analysis.perturbation.PerturbationEvaluation`.
      n_labels: top genes to name in each panel.

    Returns:
      A Matplotlib figure attached to an Agg canvas.
    """
    means, metrics = evaluation.gene_means, evaluation.metrics
    methods = [m for m in metrics.index if m != "no change"]
    fig = Figure(figsize=(4.2 * len(methods), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    top = evaluation.top_genes
    observed = means["observed"]
    shown = means.drop(columns="control")  # a Gaussian model's means may dip below 0
    limits = (min(0.0, float(shown.min().min())), float(max(shown.max().max(), 1e-3)) * 1.05)
    for ax, method in zip(axes, methods):
        predicted = means[method]
        ax.scatter(observed, predicted, s=4, c="0.6", label="all genes", rasterized=True)
        ax.scatter(observed[top], predicted[top], s=8, c="tab:red",
                   label=f"top {len(top)} DE genes")
        for gene in top[:n_labels]:
            ax.annotate(gene, (observed[gene], predicted[gene]), fontsize=7,
                        xytext=(2, 2), textcoords="offset points")
        ax.plot(limits, limits, c="k", lw=0.8)
        ax.set_xlim(limits)
        ax.set_ylim(limits)
        row = metrics.loc[method]
        ax.set_title(f"{method}\nR² {row['r2']:.3f} (top genes {row['r2_top']:.3f})",
                     fontsize=9)
        ax.set_xlabel("measured mean (log1p CP10k)")
    axes[0].set_ylabel("predicted mean (log1p CP10k)")
    axes[0].legend(fontsize=7, loc="upper left")
    design = evaluation.design
    fig.suptitle(f"{design.cell_type}: {design.control} → {design.perturbed}", fontsize=10)
    return fig


def save_perturbation_plot(evaluation, path: PathLike, n_labels: int = 10) -> Path:
    """Write :func:`perturbation_figure` as a PNG to ``path`` atomically."""
    buffer = io.BytesIO()
    perturbation_figure(evaluation, n_labels).savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


def _finite(values) -> list[float]:
    return [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]
