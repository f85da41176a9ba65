"""Figures written by the CLI: the loss curve of a fit, a picture of the cells, a
perturbation prediction (scored against measured cells, or on its own).

Figures are drawn on Matplotlib's Agg canvas directly (no ``pyplot``), so no
global backend is selected and nothing needs a display; in a notebook a
returned :class:`~matplotlib.figure.Figure` displays itself.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

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
    return save_figure(loss_figure(history, title), path)


# Categories shown in one legend; further ones are drawn and counted in the title.
MAX_LEGEND_ENTRIES = 24


def embed_2d(latent, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """A 2-D view of a ``(n_cells, K)`` latent, and what it is.

    Args:
      latent: per-cell representation.
      method: ``"umap"`` (needs the optional ``umap-learn``), ``"pca"`` (the
        first two principal components), or ``"auto"``: UMAP when
        ``umap-learn`` is installed, otherwise PCA.  A latent with at most two
        dimensions is shown as it is.
      seed: UMAP's random state.

    Returns:
      ``(coordinates (n_cells, 2), name)``, the name e.g. ``"UMAP"`` or
      ``"PC"`` for the axis labels.
    """
    x = np.asarray(latent, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"latent must be (n_cells, K) with cells, got shape {x.shape}")
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method must be 'auto', 'umap' or 'pca', got {method!r}")
    if x.shape[1] <= 2:
        padded = np.zeros((x.shape[0], 2))
        padded[:, : x.shape[1]] = x
        return padded, "latent"
    if method in ("auto", "umap") and x.shape[0] > 15:
        try:
            import umap  # optional: pip install umap-learn
        except ImportError:
            if method == "umap":
                raise ImportError("method='umap' needs umap-learn: pip install umap-learn") from None
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed, n_jobs=1)
            return reducer.fit_transform(x), "UMAP"
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PC"


def latent_figure(
    latent,
    obs: Optional[pd.DataFrame] = None,
    color: Sequence[str] = (),
    *,
    title: str = "",
    method: str = "auto",
    seed: int = 0,
) -> Figure:
    """The cells in a 2-D view of their latent, one panel per ``obs`` column in ``color``.

    Categorical (or string) columns get one colour per category and a legend;
    numeric ones a colour bar.  With no columns, one uncoloured panel.

    Args:
      latent: ``(n_cells, K)`` representation (e.g. ``obsm["X_scvi"]``).
      obs: per-cell annotations, one row per row of ``latent``.
      color: columns of ``obs`` to colour by, one panel each.
      title: figure title; the view used (UMAP or PCA) is added to it.
      method, seed: see :func:`embed_2d`.

    Returns:
      A Matplotlib figure attached to an Agg canvas.
    """
    coordinates, view = embed_2d(latent, method, seed)
    return cells_figure(coordinates, view, obs, color, title=title)


def cells_figure(
    coordinates, view: str, obs: Optional[pd.DataFrame] = None, color: Sequence[str] = (),
    *, title: str = "",
) -> Figure:
    """:func:`latent_figure` for 2-D ``coordinates`` already computed by :func:`embed_2d` (``view``)."""
    color = list(color)
    missing = [c for c in color if obs is None or c not in obs.columns]
    if missing:
        raise ValueError(f"obs has no column(s) {', '.join(missing)} to colour by")
    panels = color or [None]
    fig = Figure(figsize=(5.2 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    size = float(np.clip(3e4 / len(coordinates), 0.5, 12.0))  # fewer cells, bigger dots
    for i, key in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if key is None:
            ax.scatter(*coordinates.T, s=size, c="tab:blue", linewidths=0, rasterized=True)
        else:
            _colour_panel(ax, coordinates, obs[key], key, size)
        ax.set_xlabel(f"{view} 1")
        ax.set_ylabel(f"{view} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    what = "UMAP of the latent" if view == "UMAP" else (
        "first two principal components of the latent" if view == "PC" else "latent")
    fig.suptitle(f"{title}: {what}" if title else what)
    return fig


def _colour_panel(ax, coordinates, values: pd.Series, key: str, size: float) -> None:
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric and not isinstance(values.dtype, pd.CategoricalDtype):
        points = ax.scatter(*coordinates.T, s=size, c=values.to_numpy(float), cmap="viridis",
                            linewidths=0, rasterized=True)
        ax.figure.colorbar(points, ax=ax, shrink=0.8)
        ax.set_title(key)
        return
    labels = values.astype("category") if not isinstance(values.dtype, pd.CategoricalDtype) else values
    categories = [c for c in labels.cat.categories if (labels == c).any()]
    palette = _palette(len(categories))
    order = np.random.default_rng(0).permutation(len(coordinates))  # no category drawn on top
    codes = pd.Categorical(labels, categories=categories).codes[order]
    colours = np.array([palette[c] if c >= 0 else (0.8, 0.8, 0.8, 1.0) for c in codes])
    ax.scatter(*coordinates[order].T, s=size, c=colours, linewidths=0, rasterized=True)
    shown = categories[:MAX_LEGEND_ENTRIES]
    handles = [ax.scatter([], [], s=25, color=palette[j], label=str(c)) for j, c in enumerate(shown)]
    more = len(categories) - len(shown)
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
              fontsize=7 if len(shown) > 12 else 8, ncol=2 if len(shown) > 12 else 1,
              title=f"+{more} more" if more else None, markerscale=1.0, handletextpad=0.2)
    ax.set_title(f"{key} ({len(categories)})")


def _palette(n: int) -> list:
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20"
    if n <= 20:
        return [colormaps[name](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def save_figure(figure: Figure, path: PathLike, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
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


def prediction_figure(prediction, n_labels: int = 10) -> Figure:
    """Predicted vs control mean expression of the held-out type, when nothing measured compares.

    One panel per method (the predictions, then the mean-shift baseline when
    there is one): each gene's mean log-normalised expression in the held-out
    type's measured control cells (x) and in the prediction (y), the genes the
    first prediction changes most in colour and the ``n_labels`` most changed
    named, with the diagonal (no change).  The baseline panels give the Pearson
    correlation of their change with the first prediction's.

    Args:
      prediction: a :class:`~lvmzoo.analysis.perturbation.PerturbationPrediction`.
      n_labels: most changed genes to name in each panel.

    Returns:
      A Matplotlib figure attached to an Agg canvas.
    """
    from lvmzoo.analysis.perturbation import pearson

    means = prediction.gene_means
    methods = [m for m in means.columns if m != "control"]
    fig = Figure(figsize=(4.2 * len(methods), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    top = prediction.top_genes
    control = means["control"]
    limits = (min(0.0, float(means.min().min())), float(max(means.max().max(), 1e-3)) * 1.05)
    first = methods[0]
    for ax, method in zip(axes, methods):
        predicted = means[method]
        ax.scatter(control, predicted, s=4, c="0.6", label="all genes", rasterized=True)
        ax.scatter(control[top], predicted[top], s=8, c="tab:red",
                   label=f"{len(top)} most changed by {first}" if len(methods) > 1
                   else f"{len(top)} most changed")
        for gene in top[:n_labels]:
            ax.annotate(gene, (control[gene], predicted[gene]), fontsize=7,
                        xytext=(2, 2), textcoords="offset points")
        ax.plot(limits, limits, c="k", lw=0.8)
        ax.set_xlim(limits)
        ax.set_ylim(limits)
        title = method
        if method != first:
            r = pearson(means[first] - control, predicted - control)
            title += f"\nchange vs {first}: Pearson {r:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("control mean (log1p CP10k)")
    axes[0].set_ylabel("predicted mean (log1p CP10k)")
    axes[0].legend(fontsize=7, loc="upper left")
    design = prediction.design
    fig.suptitle(f"{design.cell_type}: {design.control} → {design.perturbed} "
                 f"(predicted; no measured {design.perturbed} cells to compare)", fontsize=10)
    return fig


def save_prediction_plot(prediction, path: PathLike, n_labels: int = 10) -> Path:
    """Write :func:`prediction_figure` as a PNG to ``path`` atomically."""
    return save_figure(prediction_figure(prediction, n_labels), path)


def _finite(values) -> list[float]:
    return [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]
