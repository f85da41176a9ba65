"""Figures written by the CLI: the loss curve of a fit.

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


def _finite(values) -> list[float]:
    return [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]
