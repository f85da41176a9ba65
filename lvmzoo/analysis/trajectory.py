"""Trajectory analysis of a fitted pseudotime model: which genes change along t, and
which way t runs.

:func:`changing_genes` tests each gene's trend against a flat line, tradeSeq's
``associationTest`` in spirit: for each gene it regresses the (log-normalised)
expression on a cosine basis of the fitted pseudotime ``t`` (posterior mean)
plus per-batch intercepts, and compares that with the intercepts alone by an F
test; p-values are Benjamini-Hochberg adjusted.  Caveat, as for every
pseudotime test: ``t`` was estimated from the same data, so the p-values are
optimistic (anti-conservative) for genes that drove the ordering.

:func:`orient` flips a pseudotime so that given early cells have low values
(the models' direction is arbitrary without a root).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["benjamini_hochberg", "changing_genes", "expression_values", "orient"]


def changing_genes(fitted, data, *, n_basis: int = 4, seed: int = 0) -> pd.DataFrame:
    """Test every gene for change along the fitted pseudotime.

    Args:
      fitted: a :class:`~lvmzoo.FittedModel` of :class:`~lvmzoo.models.Pseudotime`
        or :class:`~lvmzoo.models.SwitchPseudotime` (any model whose latent is
        one column in ``[0, 1]`` works for the test itself).
      data: the cells (CellData registered like the fit's).
      n_basis: cosine functions ``cos(k pi t)``, ``k = 1..n_basis``, of the
        alternative (the F test's numerator degrees of freedom).
      seed: seed of :meth:`FittedModel.latent`.

    Returns:
      DataFrame indexed by gene name, in the data's gene order, with
      ``r2`` (share of the within-batch variance explained by the curve),
      ``f_stat``, ``pvalue``, ``qvalue`` (BH FDR), ``amplitude`` (max - min
      of the model's fitted trend on a 50-point grid, in its units; NaN for a
      model without :meth:`trends`) and ``peak_time`` (where that trend is
      largest).
    """
    t = np.asarray(fitted.latent(data, seed=seed), np.float64)
    if t.ndim != 2 or t.shape[1] != 1:
        raise ValueError(f"changing_genes needs a one-column latent (a pseudotime); got "
                         f"shape {t.shape}")
    t = t[:, 0]
    y = expression_values(data)
    n = y.shape[0]
    batches = np.asarray(data.batch)
    null = np.eye(data.registry.n_batches)[batches][:, np.unique(batches)]  # batch intercepts
    curve = np.cos(np.pi * np.arange(1, n_basis + 1)[None, :] * t[:, None])
    full = np.concatenate([null, curve], axis=1)
    rss0 = _rss(null, y)
    rss1 = _rss(full, y)
    df1, df2 = n_basis, n - full.shape[1]
    if df2 < 1:
        raise ValueError(f"{n} cells are too few for a curve of {n_basis} basis functions")
    with np.errstate(divide="ignore", invalid="ignore"):
        f_stat = ((rss0 - rss1) / df1) / (rss1 / df2)
        r2 = np.where(rss0 > 0, 1.0 - rss1 / rss0, 0.0)
    f_stat = np.where(np.isfinite(f_stat), f_stat, 0.0)
    pvalue = stats.f.sf(f_stat, df1, df2)
    out = pd.DataFrame({"r2": r2, "f_stat": f_stat, "pvalue": pvalue,
                        "qvalue": benjamini_hochberg(pvalue)},
                       index=pd.Index(data.registry.gene_names, name="gene"))
    trends = getattr(fitted.model, "trends", None)
    if trends is not None:
        curves = trends(fitted.params, np.linspace(0.0, 1.0, 50))
        out["amplitude"] = curves["mean"].max(1) - curves["mean"].min(1)
        out["peak_time"] = curves["grid"][curves["mean"].argmax(1)]
    else:
        out["amplitude"] = np.nan
        out["peak_time"] = np.nan
    return out


def expression_values(data) -> np.ndarray:
    """Dense ``(n_cells, n_genes)`` float64 values to test: ``data``'s own values when they
    are continuous (e.g. log-normalised), ``log1p`` of counts per 10,000 for raw counts."""
    x = data.dense_x() if hasattr(data, "dense_x") else np.asarray(data.x)
    x = np.asarray(x, np.float64)
    if data.registry.kind == "counts" and data.registry.transform == "none":
        library = np.maximum(x.sum(1, keepdims=True), 1.0)
        x = np.log1p(1e4 * x / library)
    return x


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order."""
    p = np.asarray(pvalues, np.float64)
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def orient(pseudotime, early) -> tuple[np.ndarray, bool]:
    """``(pseudotime, flipped)``: ``1 - t`` when the ``early`` cells (a boolean mask) have a
    higher mean ``t`` than the others, so that they come first; else ``t`` unchanged."""
    t = np.asarray(pseudotime, np.float64)
    early = np.asarray(early, bool)
    if early.shape != t.shape[:1] or not early.any() or early.all():
        raise ValueError("early must be a boolean mask over the cells with some, not all, "
                         "cells set")
    flipped = bool(t[early].mean() > t[~early].mean())
    return (1.0 - t if flipped else t), flipped


def _rss(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residual sum of squares of least squares of every column of ``y`` on ``design``."""
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    return (residual ** 2).sum(0)
