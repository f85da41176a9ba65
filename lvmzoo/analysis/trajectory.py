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

:func:`geodesic_time` orders cells by their distance from given root cells along a
k-nearest-neighbour graph (the start the pseudotime models take when they have a root).

:func:`arc_length` re-reads a fitted pseudotime as the distance travelled along the
fitted curves (Slingshot's pseudotime): the one time a branching model shares across
its lineages is not comparable between them (any monotone re-timing of one lineage
explains its cells as well), the distance along each lineage's curve is.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["arc_length", "benjamini_hochberg", "changing_genes", "expression_values",
           "geodesic_time", "orient"]


def changing_genes(fitted, data, *, n_basis: int = 4, seed: int = 0) -> pd.DataFrame:
    """Test every gene for change along the fitted pseudotime.

    Args:
      fitted: a :class:`~lvmzoo.FittedModel` of :class:`~lvmzoo.models.Pseudotime`
        or :class:`~lvmzoo.models.SwitchPseudotime` (any model whose latent is
        one column in ``[0, 1]`` works for the test itself), or a seed ensemble of
        one (its averaged time; the amplitudes from member 0's trends).
      data: the cells (CellData registered like the fit's).
      n_basis: cosine functions ``cos(k pi t)``, ``k = 1..n_basis``, of the
        alternative (the F test's numerator degrees of freedom).
      seed: seed of :meth:`FittedModel.latent`.

    Returns:
      DataFrame indexed by gene name, in the data's gene order, with
      ``symbol`` (where the data registers gene symbols, ``gene_symbols_key``),
      ``r2`` (share of the within-batch variance explained by the curve; the model's
      continuous covariates, if any, are in both fits, as batches are),
      ``f_stat``, ``pvalue``, ``qvalue`` (BH FDR), ``amplitude`` (max - min
      of the model's fitted trend on a 50-point grid, in its units; NaN for a
      model without :meth:`trends`; with one trend per lineage, the lineage
      where it is largest) and ``peak_time`` (where that trend is largest).
      The test itself is of one curve in ``t`` for all cells: on branching
      data a gene that differs between lineages at the same ``t`` but not
      along ``t`` is not found.
    """
    t = np.asarray(fitted.latent(data, seed=seed), np.float64)
    if t.ndim != 2 or t.shape[1] != 1:
        raise ValueError(f"changing_genes needs a one-column latent (a pseudotime); got "
                         f"shape {t.shape}")
    t = t[:, 0]
    batches = np.asarray(data.batch)
    null_columns = np.unique(batches)  # batch intercepts of the batches present
    # the model's continuous covariates (technical variation) in both fits, as in the model
    keys = tuple(getattr(fitted.model, "continuous_covariate_keys", ()))
    registry = data.registry
    covariates = np.asarray(data.covariates[:, [registry.covariate_keys.index(k) for k in keys]],
                            np.float64) if keys else np.zeros((t.size, 0))
    n = t.size
    df1, df2 = n_basis, n - (null_columns.size + covariates.shape[1] + n_basis)
    if df2 < 1:
        raise ValueError(f"{n} cells are too few for a curve of {n_basis} basis functions")
    rss0, rss1 = _curve_rss(data, t, batches, null_columns, n_basis, covariates)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_stat = ((rss0 - rss1) / df1) / (rss1 / df2)
        r2 = np.where(rss0 > 0, 1.0 - rss1 / rss0, 0.0)
    f_stat = np.where(np.isfinite(f_stat), f_stat, 0.0)
    pvalue = stats.f.sf(f_stat, df1, df2)
    out = pd.DataFrame({"r2": r2, "f_stat": f_stat, "pvalue": pvalue,
                        "qvalue": benjamini_hochberg(pvalue)},
                       index=pd.Index(data.registry.gene_names, name="gene"))
    if data.registry.gene_symbols:
        out.insert(0, "symbol", list(data.registry.gene_symbols))
    trends = getattr(fitted.model, "trends", None)
    if trends is not None:
        # a seed ensemble has no one set of parameters: the trends of member 0 (whose
        # uns["pseudotime_trends"] the ensemble's annotate keeps)
        params = fitted.members[0].params if hasattr(fitted, "members") else fitted.params
        curves = trends(params, (np.arange(50) + 0.5) / 50)
        mean = np.asarray(curves["mean"])
        if mean.ndim == 3:  # one trend per lineage (BranchingPseudotime): the widest
            widest = (mean.max(-1) - mean.min(-1)).argmax(0)
            mean = mean[widest, np.arange(mean.shape[1])]
        out["amplitude"] = mean.max(-1) - mean.min(-1)
        out["peak_time"] = curves["grid"][mean.argmax(-1)]
    else:
        out["amplitude"] = np.nan
        out["peak_time"] = np.nan
    return out


def expression_values(data) -> np.ndarray:
    """Dense ``(n_cells, n_genes)`` float64 values to test: ``data``'s own values when they
    are continuous (e.g. log-normalised), ``log1p`` of counts per 10,000 for raw counts."""
    x = data.dense_x() if hasattr(data, "dense_x") else np.asarray(data.x)
    return _tested_values(x, data.registry)


def _tested_values(x, registry) -> np.ndarray:
    """Dense float64 rows ``x`` as tested: as they are, or log1p CP10k of raw counts."""
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float64)
    if registry.kind == "counts" and registry.transform == "none":
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


def arc_length(fitted, annotated) -> pd.DataFrame:
    """Each cell's distance travelled along its fitted curve, from the start of time.

    ``fitted.annotate`` writes it as ``obs["arc_length"]`` (and ``_lower`` /
    ``_upper``); this computes it for an ``annotated`` AnnData that holds only
    ``obs["pseudotime"]`` and its interval (and, for lineages,
    ``obsm["lineage_probability"]``), e.g. one annotated before that existed.  See
    :meth:`lvmzoo.models.pseudotime._TimeModel.arc_length`: the cumulative Euclidean
    length of each curve's trend (every gene's log expression on 201 points of the
    reported time) up to the cell's time and its interval's ends, divided by the longest
    curve's length; a branching model's cells average over their lineage probabilities.

    On one path this is a monotone re-reading of the time (same order); across
    lineages it makes the times comparable.  On paul15 (rooted K=4, 3 seeds) it
    ordered the cells by their stage at Kendall tau 0.474-0.485 against the
    time's 0.465-0.473 (benchmarks/results/pseudotime.md).

    Args:
      fitted: the fitted pseudotime model.
      annotated: its ``annotate`` output.

    Returns:
      DataFrame indexed by cell with columns ``arc_length``, ``arc_length_lower``,
      ``arc_length_upper``.
    """
    if "pseudotime" not in annotated.obs:
        raise ValueError("annotated has no obs['pseudotime']: pass what fitted.annotate "
                         "returned for a pseudotime model")
    times = np.stack([annotated.obs[c].to_numpy(np.float64)
                      for c in ("pseudotime", "pseudotime_lower", "pseudotime_upper")], 1)
    weights = annotated.obsm.get("lineage_probability")
    along = fitted.model.arc_length(fitted.params, times, weights)
    return pd.DataFrame(along, index=annotated.obs_names,
                        columns=["arc_length", "arc_length_lower", "arc_length_upper"])


def geodesic_time(values, root, *, n_components: int = 20,
                  n_neighbours: int = 15) -> np.ndarray:
    """Each cell's rank, in ``(0, 1)``, by its distance from the ``root`` cells along the
    data's k-nearest-neighbour graph (a diffusion-free DPT: the shortest path from the
    nearest root cell through neighbouring cells).

    The graph joins each cell to its ``n_neighbours`` nearest cells (Euclidean, on the
    first ``n_components`` principal components of ``values``, centred), edges weighted
    by that distance and made symmetric; cells the root cannot reach come last.

    Args:
      values: ``(n_cells, n_genes)`` log-normalised expression.
      root: boolean mask over the cells, at least one set.
      n_components: principal components the distances are measured in.
      n_neighbours: ``k`` of the graph.

    Returns:
      ``(n_cells,)`` float64: ``(rank + 1/2) / n_cells`` of the distance (ties broken
      by order), the root cells first.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra
    from scipy.spatial import cKDTree

    x = np.asarray(values, np.float64)
    root = np.asarray(root, bool)
    n = x.shape[0]
    if root.shape != (n,) or not root.any():
        raise ValueError("root must be a boolean mask over the cells with at least one set")
    components = _principal_components(x - x.mean(0), min(n_components, n - 1, x.shape[1]))
    neighbours = min(n_neighbours, n - 1)
    distance, index = cKDTree(components).query(components, neighbours + 1)
    rows = np.repeat(np.arange(n), neighbours)
    graph = coo_matrix((np.maximum(distance[:, 1:].ravel(), 1e-12),
                        (rows, index[:, 1:].ravel())), shape=(n, n)).tocsr()
    graph = graph.maximum(graph.T)
    far = dijkstra(graph, directed=False, indices=np.flatnonzero(root), min_only=True)
    finite = np.isfinite(far)
    far[~finite] = far[finite].max() + 1.0 if finite.any() else 0.0
    return (np.argsort(np.argsort(far, kind="stable")) + 0.5) / n


def _principal_components(x: np.ndarray, k: int, power_steps: int = 3) -> np.ndarray:
    """Scores ``(n, k)`` of the top ``k`` principal components of centred ``x``, by a
    randomised range finder (Halko et al. 2011) with ``power_steps`` power iterations:
    ``O(n G k)``, where a full SVD of a few thousand cells took seconds."""
    probe = np.random.default_rng(0).normal(size=(x.shape[1], min(k + 10, x.shape[1])))
    basis, _ = np.linalg.qr(x @ probe)
    for _ in range(power_steps):
        basis, _ = np.linalg.qr(x @ (x.T @ basis))
    u, singular, _ = np.linalg.svd(basis.T @ x, full_matrices=False)
    return (basis @ u[:, :k]) * singular[:k]


def _curve_rss(data, t, batches, null_columns, n_basis, covariates
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per gene, the residual sums of squares of least squares on the batch intercepts and
    the ``covariates`` columns (``rss0``) and on them plus ``cos(k pi t)``, ``k =
    1..n_basis`` (``rss1``).

    Read :data:`TEST_BLOCK` cells at a time (on disk or in memory: the memory of one dense
    block, not of the matrix) and accumulated as the normal equations' sums.  The values are
    shifted by the first block's gene means first: the intercepts absorb any shift, and it
    keeps ``sum y^2`` from swamping the residuals of genes far from zero.
    """
    n_batches = null_columns.size
    n_null = n_batches + covariates.shape[1]
    code = np.full(int(batches.max()) + 1, -1)
    code[null_columns] = np.arange(n_batches)
    # centred, so that they and the intercepts are not nearly collinear
    covariates = covariates - covariates.mean(0)
    k = np.arange(1, n_basis + 1)
    p = n_null + n_basis
    gram, cross, squares, shift = np.zeros((p, p)), None, None, None
    for start, y in _expression_blocks(data):
        rows = slice(start, start + y.shape[0])
        design = np.zeros((y.shape[0], p))
        design[np.arange(y.shape[0]), code[batches[rows]]] = 1.0
        design[:, n_batches:n_null] = covariates[rows]
        design[:, n_null:] = np.cos(np.pi * k[None, :] * t[rows, None])
        if shift is None:
            shift = y.mean(0)
            cross, squares = np.zeros((p, y.shape[1])), np.zeros(y.shape[1])
        y = y - shift
        gram += design.T @ design
        cross += design.T @ y
        squares += (y ** 2).sum(0)

    def rss(columns):
        g, c = gram[np.ix_(columns, columns)], cross[columns]
        coef = np.linalg.lstsq(g, c, rcond=None)[0]
        return np.maximum(squares - (c * coef).sum(0), 0.0)

    rss0, rss1 = rss(np.arange(n_null)), rss(np.arange(p))
    # What is left of a gene that the intercepts fit exactly is rounding: call it zero.
    exact = rss0 <= 1e-12 * np.maximum(squares, 1.0)
    return np.where(exact, 0.0, rss0), np.where(exact, 0.0, np.minimum(rss1, rss0))


# Cells per block of the change test (:func:`changing_genes`): 4,096 cells x 2,000 genes of
# float64 is 64 MiB.
TEST_BLOCK = 4096


def _expression_blocks(data):
    """``(first cell, values)`` of :func:`expression_values`, :data:`TEST_BLOCK` cells at a time."""
    x = data.x
    blocks = (x.blocks(TEST_BLOCK) if data.is_backed else
              (x[start:start + TEST_BLOCK] for start in range(0, data.n_cells, TEST_BLOCK)))
    start = 0
    for block in blocks:
        y = _tested_values(block, data.registry)
        yield start, y
        start += y.shape[0]


# ----------------------------------------------------------------------
# Outputs: trends table and figure
# ----------------------------------------------------------------------

# Cells drawn in the figure's panels (a picture, not the atlas).
FIGURE_CELLS = 5_000


def trends_table(trends) -> pd.DataFrame:
    """``uns["pseudotime_trends"]`` (``grid`` ``(T,)``, ``mean`` ``(G, T)``, optional
    ``lower`` / ``upper``, ``genes``) as a long table: one row per gene and grid point,
    columns ``gene``, ``pseudotime``, ``mean`` and, where the model has a band,
    ``lower`` / ``upper`` (95 %)."""
    grid = np.asarray(trends["grid"], np.float64)
    mean = np.asarray(trends["mean"], np.float64)
    lineages = mean.shape[0] if mean.ndim == 3 else None
    mean = mean if lineages else mean[None]
    n_genes = mean.shape[1]
    genes = np.asarray(trends.get("genes", [f"gene{g}" for g in range(n_genes)])).astype(str)
    out = pd.DataFrame({"gene": np.tile(np.repeat(genes, grid.size), mean.shape[0]),
                        "pseudotime": np.tile(grid, mean.shape[0] * n_genes),
                        "mean": mean.ravel()})
    if lineages:
        out.insert(0, "lineage", np.repeat(np.arange(1, lineages + 1), n_genes * grid.size))
    for band in ("lower", "upper"):
        if band in trends:
            out[band] = np.asarray(trends[band], np.float64).ravel()
    return out


def top_trend_genes(trends, n: int = 6) -> np.ndarray:
    """Indices of the ``n`` genes whose fitted trend changes most (max - min of the mean;
    with one trend per lineage, of all lineages' trends together)."""
    mean = np.asarray(trends["mean"], np.float64)
    if mean.ndim == 3:
        mean = np.concatenate(list(mean), axis=1)
    return np.argsort(-(mean.max(1) - mean.min(1)), kind="stable")[:n]


def trajectory_figure(annotated, *, genes=None, n_genes: int = 6, coordinates=None,
                      view: str = "", values=None, seed: int = 0, first=None,
                      gene_symbols: Optional[str] = None):
    """``pseudotime.png``: the cells in a 2-D view coloured by pseudotime, then the fitted
    trends (mean and 95 % band) of the genes that change most, over the cells' values.

    Args:
      annotated: AnnData with ``obs["pseudotime"]`` and ``uns["pseudotime_trends"]``
        (from ``FittedModel.annotate`` of a pseudotime model).
      genes: gene names to draw (default: the ``n_genes`` with the largest trend range).
      first: gene names drawn before those; the largest-range genes then fill the
        panels up to ``n_genes`` in all.  Default: the marker genes of a
        :class:`~lvmzoo.models.SwitchPseudotime` fit (``var["marker"]``), if any.
      coordinates: ``(n_cells, 2)`` view of the cells; default ``obsm["X_umap"]`` when
        present, else the first two principal components of ``values``, else
        pseudotime against its rank.
      view: the name of the view's axes (e.g. ``"UMAP"``).
      values: ``(n_cells, n_genes)`` expression on the trends' scale (log-normalised) to
        draw behind the trends; ``None`` draws the trends alone.
      seed: which cells are drawn when there are more than :data:`FIGURE_CELLS`.
      gene_symbols: ``var`` column whose symbols title the trend panels (scanpy's
        ``gene_symbols``); ``genes`` and ``first`` stay ``var_names``.

    Returns:
      A Matplotlib figure attached to an Agg canvas.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trends = annotated.uns["pseudotime_trends"]
    names = list(np.asarray(trends.get("genes", annotated.var_names)).astype(str))
    if first is None:
        first = list(annotated.var_names[annotated.var["marker"].astype(str) != ""]) \
            if "marker" in annotated.var else []
    if genes is None:
        marked = [names.index(str(g)) for g in first]
        ranked = [g for g in top_trend_genes(trends, n_genes + len(marked)) if g not in marked]
        chosen = np.array(marked + ranked[:max(n_genes - len(marked), 0)], int)
    else:
        chosen = np.array([names.index(str(g)) for g in genes])
    symbol = {} if gene_symbols is None else dict(zip(
        map(str, annotated.var_names), map(str, annotated.var[gene_symbols])))
    titles = [symbol.get(name, name) for name in names]
    t = annotated.obs["pseudotime"].to_numpy(np.float64)
    cells = np.arange(t.size)
    if t.size > FIGURE_CELLS:
        cells = np.sort(np.random.default_rng(seed).choice(t.size, FIGURE_CELLS, replace=False))
    if values is not None:
        values = np.asarray(values[cells] if values.shape[0] == t.size else values, np.float64)
    if coordinates is None:
        if "X_umap" in annotated.obsm:
            coordinates, view = np.asarray(annotated.obsm["X_umap"])[cells, :2], "UMAP"
        elif values is not None and values.shape[1] >= 2:
            centred = values - values.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            coordinates, view = centred @ vt[:2].T, "PC of the expression"
        else:
            coordinates = np.column_stack([t[cells], np.argsort(np.argsort(t[cells]))])
            view = "pseudotime / rank"
    else:
        coordinates = np.asarray(coordinates)[cells] if len(coordinates) == t.size \
            else np.asarray(coordinates)
    n_panels = 1 + len(chosen)
    columns = min(n_panels, 4)
    rows = -(-n_panels // columns)
    fig = Figure(figsize=(4.2 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    size = float(np.clip(2e4 / len(cells), 0.5, 10.0))
    ax = fig.add_subplot(rows, columns, 1)
    points = ax.scatter(*np.asarray(coordinates, np.float64).T, c=t[cells], s=size,
                        cmap="viridis", vmin=0, vmax=1, linewidths=0, rasterized=True)
    fig.colorbar(points, ax=ax, shrink=0.8)  # the title names the colour (a label sat
    # beside the next panel's axis and read as its own)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{view} 1" if view else "")
    ax.set_ylabel(f"{view} 2" if view else "")
    ax.set_title("cells coloured by pseudotime")
    grid = np.asarray(trends["grid"])
    mean = np.asarray(trends["mean"])
    branching = mean.ndim == 3
    curves = [(mean[k], trends.get("lower", [None] * mean.shape[0])[k],
               trends.get("upper", [None] * mean.shape[0])[k], f"lineage {k + 1}")
              for k in range(mean.shape[0])] if branching else \
        [(mean, trends.get("lower"), trends.get("upper"), "trend")]
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:olive"]
    lineage = annotated.obs["lineage"].cat.codes.to_numpy()[cells] \
        if branching and "lineage" in annotated.obs else None
    for i, g in enumerate(chosen):
        ax = fig.add_subplot(rows, columns, i + 2)
        if values is not None:
            dots = "0.6" if lineage is None else [colours[k % len(colours)] for k in lineage]
            ax.scatter(t[cells], values[:, g], s=size, c=dots, alpha=0.3, linewidths=0,
                       rasterized=True)
        for k, (centre, low, high, label) in enumerate(curves):
            colour = colours[k % len(colours)]
            if low is not None:
                ax.fill_between(grid, low[g], high[g], color=colour, alpha=0.25, linewidth=0)
            ax.plot(grid, centre[g], color=colour, label=label)
        if branching and i == 0:
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(titles[g] + (" (marker)" if names[g] in set(map(str, first)) else ""))
        ax.set_xlabel("pseudotime")
        if i % columns == columns - 1 or i == 0:  # the first panel of each row of trends
            ax.set_ylabel("expression (log scale)")
        ax.set_xlim(0, 1)
    shown = ["marker genes"] if len(first) else []
    if len(chosen) > len(first):
        shown.append("genes that change most")
    fig.suptitle("pseudotime and the trends of the " + " and of the ".join(shown))
    return fig
