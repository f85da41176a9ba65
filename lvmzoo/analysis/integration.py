"""Integration metrics: does an embedding remove batch effects and keep the biology?

:func:`benchmark` scores cell embeddings (``adata.obsm`` keys such as
``X_pca`` or ``X_scvi``) with the metrics of the scIB benchmark (Luecken et
al. 2022) as implemented by `scib-metrics <https://scib-metrics.readthedocs.io>`_
0.5.10 (itself JAX) and returns one row per embedding::

    table = benchmark(adata, "batch", "cell_type", ["X_pca", "X_scvi"])
    table["total"]          # 0.6 * bio_conservation + 0.4 * batch_correction

Every metric lies in [0, 1] (ARI can dip just below 0, for clusterings worse
than chance), higher is better:

Bio conservation (cells of a label stay together, labels stay apart):
  * ``isolated_labels`` – silhouette (rescaled to [0, 1]) of the labels present
    in the fewest batches, against all other labels;
  * ``nmi``, ``ari`` – normalised mutual information / adjusted Rand index of
    a clustering of the embedding against the labels.  ``clustering="kmeans"``
    (default, as scib-metrics' ``Benchmarker``): k-means with k = number of
    labels, k-means++, best of 10 starts, seeded.  ``clustering="leiden"``:
    Leiden modularity clustering of the 15-NN UMAP connectivity graph at the
    resolutions 0.2, 0.4, …, 2.0, keeping the one with the best NMI (as scIB);
  * ``silhouette_label`` – mean silhouette width of the labels, ``(s + 1) / 2``;
  * ``clisi`` – cell-type LISI: the median over cells of the inverse Simpson
    index of labels among the 90 nearest neighbours (Gaussian-kernel weights
    calibrated to perplexity 30), scaled as ``(L - cLISI) / (L - 1)`` for L
    labels (1: every neighbourhood holds one label).

Batch correction (within a label, batches are mixed):
  * ``bras`` – batch-removal adapted silhouette (Rautenstrauch & Ohler 2025):
    per label, the silhouette of batches with cosine distance and the mean
    distance to all other batches, ``1 - |s|`` averaged over cells of a label,
    then over labels (labels seen in one batch only are skipped);
    ``silhouette_batch`` (not in the default set) is the scIB original with the
    nearest other batch and Euclidean distance;
  * ``ilisi`` – integration LISI: the median inverse Simpson index of batches
    among the 90 nearest neighbours, scaled as ``(iLISI - 1) / (B - 1)`` for B
    batches (1: every neighbourhood holds all batches in equal shares);
  * ``kbet`` – kBET acceptance rate (Büttner et al. 2019) per label, averaged
    over labels: within each label, a chi-square test per cell of its
    neighbours' batch counts against the label's batch frequencies, at
    alpha = 0.05, on k0 = clip(mean cells per batch / 4, 10, 70) neighbours
    in a diffusion-map embedding of the label's part of the 50-NN UMAP
    connectivity graph (labels with fewer than 10 cells or one batch are
    skipped; a label whose graph falls apart into small pieces scores 0);
  * ``graph_connectivity`` – per label, the share of its cells in the largest
    connected component of the 15-NN graph restricted to the label, averaged;
  * ``pcr_comparison`` – the relative drop of the variance explained by batch
    (principal component regression) from the unintegrated embedding
    (``pre_integrated``, by default ``X_pca``) to this one; 0 for the
    unintegrated embedding itself and for any embedding that does not reduce it.

Aggregates, as scib-metrics' ``Benchmarker.get_results()`` without min-max
scaling: ``bio_conservation`` and ``batch_correction`` are the means of the
metrics of each kind that were computed (NaN metrics skipped), and
``total = 0.6 * bio_conservation + 0.4 * batch_correction`` (the weights of the
scIB paper).  The default metric set is that of the ``Benchmarker`` (BRAS, not
the silhouette batch).  Against the ``Benchmarker`` itself (2,000 simulated
cells, 3 batches, 5 types; PCA and a batch-centred PCA) every metric agrees to
4 decimals except kBET (within 0.002: its neighbours are approximate) and the
k-means NMI/ARI (one start there, ten here; see below).

Neighbours: one exact Euclidean k-nearest-neighbour search per embedding
(scikit-learn, each cell its own first neighbour), cut to 15 (graph
connectivity, Leiden), 50 (kBET) and 90 (LISI) neighbours as in the
``Benchmarker``, or to all cells when there are fewer.

scib-metrics 0.5.10 installs beside jax 0.10.2 and every one of its metric
functions runs unchanged on it (checked one by one, its pynndescent search and
Benchmarker included): nothing here works around a break.  What is not
delegated to it is about speed on CPUs, each replacement tested against
scib-metrics' own function (tests/test_integration_metrics.py):
  * no ``Benchmarker``: it finds neighbours with pynndescent, an approximate
    search whose numba compilation takes ~75 s in every new process on
    2 CPU cores; it also computes ``X_pca`` in place on the user's AnnData and
    draws with pyplot.  The metric functions get exact neighbours instead.
  * kBET per label (:func:`_kbet_per_label`, the steps and constants of
    ``kbet_per_label``): its diffusion-map neighbours call pynndescent inside,
    so we search them exactly, and its per-cell test (:func:`kbet_acceptance`)
    is numpy, as scib-metrics' JAX ``kbet`` compiles anew for every label
    (~2 s each).  One deliberate difference: scib-metrics lowers
    ``diffusion_n_comps`` for a small label and keeps the lowered value for
    every later label; here each label uses ``min(100, its cells - 1)``.
  * BRAS and silhouette batch (:func:`_batch_silhouette`): one pass over all
    cells with one compiled distance kernel; scib-metrics' compile once per
    label size (~2 s each, minutes with many labels).
  * UMAP connectivities (kBET's diffusion, Leiden) in numpy
    (:func:`umap_connectivities`): umap-learn's numba kernels, which
    scib-metrics calls, compile for 8-20 s in every new process.
  * k-means for NMI/ARI is scikit-learn's ``KMeans`` (k = number of labels,
    k-means++), seeded by ``seed``, with the best of 10 starts where
    ``nmi_ari_cluster_labels_kmeans`` makes one: a single start can stop in a
    poor local optimum and move NMI more than the embeddings differ (on a
    2,000-cell, 5-type simulation it gave NMI 0.86 / ARI 0.72 for an embedding
    whose 10-start clustering recovers the types exactly).  scib-metrics' JAX
    ``KMeans`` also re-compiles its loop on every call (its jitted method is
    static in ``self``), ~2.5 s per embedding.
scib-metrics' own functions compute the rest: isolated labels, silhouette
label, iLISI/cLISI, graph connectivity, PCR comparison and Leiden NMI/ARI.

``X_pca``, when asked for (as an embedding or as ``pre_integrated``) and not in
``adata.obsm``, is computed and not stored: ``n_pcs`` (default 50, as scanpy)
principal components of all genes of ``adata.X`` (or ``layer``), after
``log1p(1e4 * x / cell total)`` when the values are counts (non-negative
integers) and as they are otherwise (taken to be normalised already), centred,
by ARPACK (scanpy's default solver).  The user's AnnData is never modified.

References:
  Luecken, M. D. et al. (2022). Benchmarking atlas-level data integration in
  single-cell genomics. Nature Methods 19, 41–50.
  Korsunsky, I. et al. (2019). Fast, sensitive and accurate integration of
  single-cell data with Harmony. Nature Methods 16, 1289–1296.
  Büttner, M. et al. (2019). A test metric for assessing single-cell RNA-seq
  batch correction. Nature Methods 16, 43–49.
  Rautenstrauch, P. & Ohler, U. (2025). Shortcomings of silhouette in
  single-cell integration benchmarking. Nature Biotechnology.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lvmzoo.data.registry import DataError
from lvmzoo.data.transforms import apply_transform

# What to install when scib-metrics (and its scanpy/umap/igraph stack) is missing.
INSTALL_HINT = "pip install 'lvmzoo[integration]'"

BIO = "bio_conservation"
BATCH = "batch_correction"
TOTAL = "total"
AGGREGATES = (BIO, BATCH, TOTAL)
# scIB's weighting of the two kinds in the total score (Luecken et al. 2022).
BIO_WEIGHT = 0.6

# Neighbourhood sizes of scib-metrics' Benchmarker.
GRAPH_NEIGHBORS = 15   # graph connectivity, Leiden clustering
KBET_NEIGHBORS = 50    # the connectivity graph kBET diffuses over
LISI_NEIGHBORS = 90    # iLISI, cLISI
KBET_ALPHA = 0.05
KBET_DIFFUSION_COMPONENTS = 100
KMEANS_STARTS = 10     # scib-metrics: 1 (see the module docstring)
CLUSTERINGS = ("kmeans", "leiden")


class Metric(NamedTuple):
    """A column of :func:`benchmark`'s table."""

    kind: str   # BIO or BATCH
    title: str  # name in tables and figures


METRICS: dict[str, Metric] = {
    "isolated_labels": Metric(BIO, "Isolated labels"),
    "nmi": Metric(BIO, "NMI"),
    "ari": Metric(BIO, "ARI"),
    "silhouette_label": Metric(BIO, "Silhouette label"),
    "clisi": Metric(BIO, "cLISI"),
    "bras": Metric(BATCH, "BRAS"),
    "silhouette_batch": Metric(BATCH, "Silhouette batch"),
    "ilisi": Metric(BATCH, "iLISI"),
    "kbet": Metric(BATCH, "kBET"),
    "graph_connectivity": Metric(BATCH, "Graph connectivity"),
    "pcr_comparison": Metric(BATCH, "PCR comparison"),
}
# scib-metrics' Benchmarker defaults: everything but the original silhouette batch.
DEFAULT_METRICS = tuple(name for name in METRICS if name != "silhouette_batch")
TITLES = {**{name: m.title for name, m in METRICS.items()}, "aggregate": "Aggregate scores",
          BIO: "Bio conservation", BATCH: "Batch correction", TOTAL: "Total"}


def benchmark(
    adata,
    batch_key: str,
    labels_key: str,
    embeddings: Sequence[str] = ("X_pca",),
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    clustering: str = "kmeans",
    pre_integrated: Optional[str] = "X_pca",
    layer: Optional[str] = None,
    n_pcs: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Batch-correction and bio-conservation metrics of cell embeddings.

    Args:
      adata: AnnData with the embeddings in ``obsm`` and the batch and label
        columns in ``obs``; not modified.
      batch_key: categorical ``obs`` column of batches (at least 2).
      labels_key: categorical ``obs`` column of cell labels (at least 2).
      embeddings: ``obsm`` keys, each ``(n_cells, n_dims)``; ``"X_pca"`` is
        computed from the expression when absent (see the module docstring).
      metrics: names from :data:`METRICS` (default :data:`DEFAULT_METRICS`).
      clustering: ``"kmeans"`` or ``"leiden"``, the clustering behind NMI/ARI.
      pre_integrated: ``obsm`` key of the unintegrated embedding that
        ``pcr_comparison`` compares against (``"X_pca"``: computed when
        absent); ``None`` only when ``pcr_comparison`` is not asked for.
      layer: layer with the expression ``X_pca`` is computed from (default ``X``).
      n_pcs: components of a computed ``X_pca``.
      seed: seed of k-means, Leiden and the PCA solver.
      progress: show a progress bar over the embeddings.

    Returns:
      A DataFrame indexed by embedding (index name ``"embedding"``): one column
      per metric, bio-conservation metrics first, then ``bio_conservation``,
      ``batch_correction`` (means of the metrics of each kind) and ``total``
      (``0.6 * bio + 0.4 * batch``; only when both kinds were computed).
      ``table.attrs`` records the keys, the clustering, the numbers of cells,
      batches and labels, how ``X_pca`` was obtained and the scib-metrics version.

    Raises:
      DataError: unknown keys or metric names, fewer than 2 batches or labels,
        missing batch or label values, non-finite embeddings.
      ImportError: scib-metrics is not installed (``pip install 'lvmzoo[integration]'``).
    """
    scib = require_scib_metrics()
    names = _checked_metrics(metrics, clustering)
    embeddings = _checked_embeddings(adata, embeddings)
    if "pcr_comparison" in names and pre_integrated is None:
        raise DataError("pcr_comparison compares against an unintegrated embedding; give "
                        "pre_integrated (e.g. 'X_pca') or leave pcr_comparison out of metrics")
    batches = _codes(adata, batch_key, "batch_key")
    labels = _codes(adata, labels_key, "labels_key")
    pca = _LazyPCA(adata, layer, n_pcs, seed)
    x_pre = pca.get_or_obsm(pre_integrated) if "pcr_comparison" in names else None
    rows = {}
    keys = embeddings
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(embeddings, desc="integration metrics", unit="embedding")
    for key in keys:
        x = pca.get_or_obsm(key)
        with warnings.catch_warnings():
            # The table shows the clipped 0 and the docstring says why.
            warnings.filterwarnings("ignore", "PCR comparison score is negative")
            rows[key] = _embedding_scores(scib, x, batches, labels, x_pre, names, clustering,
                                          seed)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=names)
    table.index.name = "embedding"
    table = aggregate_scores(table)
    table.attrs.update({
        "batch_key": batch_key, "labels_key": labels_key, "clustering": clustering,
        "pre_integrated": pre_integrated if "pcr_comparison" in names else None,
        "n_cells": int(adata.n_obs), "n_batches": int(batches.max() + 1),
        "n_labels": int(labels.max() + 1), "x_pca": pca.description,
        "scib_metrics": scib.__version__,
    })
    return table


def aggregate_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``bio_conservation``, ``batch_correction`` and ``total`` columns.

    Args:
      table: one row per embedding, metric columns named as in :data:`METRICS`
        (other columns are ignored; existing aggregate columns are replaced).

    Returns:
      A new DataFrame: the metric columns ordered bio first, then the means of
      each kind's metrics (NaN skipped) and ``total = 0.6 * bio + 0.4 * batch``
      when both kinds are present.
    """
    bio = [c for c in table.columns if c in METRICS and METRICS[c].kind == BIO]
    batch = [c for c in table.columns if c in METRICS and METRICS[c].kind == BATCH]
    out = table[bio + batch].astype(float)
    if bio:
        out[BIO] = out[bio].mean(axis=1)
    if batch:
        out[BATCH] = out[batch].mean(axis=1)
    if bio and batch:
        out[TOTAL] = BIO_WEIGHT * out[BIO] + (1 - BIO_WEIGHT) * out[BATCH]
    out.attrs.update(table.attrs)
    return out


def require_scib_metrics():
    """The ``scib_metrics`` module, or an ImportError saying which extra to install."""
    try:
        import scib_metrics
    except ImportError as err:
        raise ImportError(f"integration metrics need scib-metrics ({err}); install them "
                          f"with {INSTALL_HINT}") from None
    return scib_metrics


# --------------------------------------------------------------------------
# Neighbours and the metrics of one embedding
# --------------------------------------------------------------------------


def neighbors(x: np.ndarray, n_neighbors: int):
    """Exact Euclidean k nearest neighbours of every row, itself first.

    Args:
      x: ``(n_cells, n_dims)`` embedding.
      n_neighbors: neighbours per cell, the cell itself included; cut to
        ``n_cells``.

    Returns:
      A scib-metrics ``NeighborsResults`` (``indices`` and ``distances``, both
      ``(n_cells, n_neighbors)``, nearest first) whose
      ``knn_graph_connectivities`` are :func:`umap_connectivities`.
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(int(n_neighbors), x.shape[0])
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return _neighbors_class()(indices=indices, distances=distances.astype(np.float32))


@functools.cache
def _neighbors_class():
    from scib_metrics.nearest_neighbors import NeighborsResults

    class Neighbors(NeighborsResults):
        """scib-metrics' neighbours with numpy UMAP connectivities (no numba compile)."""

        @functools.cached_property
        def knn_graph_connectivities(self) -> sp.csr_matrix:
            return umap_connectivities(self.indices, self.distances)

    return Neighbors


# umap-learn's constants of smooth_knn_dist.
_SMOOTH_K_TOLERANCE = 1e-5
_MIN_K_DIST_SCALE = 1e-3


def umap_connectivities(indices: np.ndarray, distances: np.ndarray,
                        n_iter: int = 64) -> sp.csr_matrix:
    """UMAP's fuzzy-union connectivity graph of a kNN graph (scanpy's ``connectivities``).

    For cell ``i`` with neighbours ``j`` (itself first) at distances ``d_ij``:
    ``rho_i`` is the smallest positive ``d_ij``, ``sigma_i`` solves
    ``sum_{j != i} exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(k)`` by
    bisection, and ``w_ij = exp(-max(d_ij - rho_i, 0) / sigma_i)``; the graph is
    the fuzzy union ``W + W^T - W * W^T``.  The arithmetic of umap-learn's
    ``fuzzy_simplicial_set`` (``local_connectivity=1``, ``set_op_mix_ratio=1``,
    the defaults scib-metrics uses), vectorised over cells in numpy: umap-learn's
    numba kernels take 8-20 s to compile in every new process.

    Args:
      indices: ``(n_cells, k)`` neighbour indices, each cell first in its row.
      distances: ``(n_cells, k)`` their distances, ascending.
      n_iter: bisection steps.

    Returns:
      The symmetric ``(n_cells, n_cells)`` connectivity matrix (CSR, float32).
    """
    d = np.asarray(distances, np.float32)
    n, k = d.shape
    positive = d > 0
    rho = np.where(positive.any(1), np.where(positive, d, np.inf).min(1), 0).astype(np.float32)
    excess = (d[:, 1:] - rho[:, None]).astype(np.float64)   # first neighbour = the cell itself
    target = np.log2(k)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    done = np.zeros(n, bool)
    for _ in range(n_iter):
        with np.errstate(over="ignore"):
            psum = np.where(excess > 0, np.exp(-excess / mid[:, None]), 1.0).sum(1)
        done |= np.abs(psum - target) < _SMOOTH_K_TOLERANCE
        if done.all():
            break
        too_big = ~done & (psum > target)
        too_small = ~done & ~(psum > target)
        hi = np.where(too_big, mid, hi)
        lo = np.where(too_small, mid, lo)
        mid = np.where(too_big | (too_small & np.isfinite(hi)), (lo + hi) / 2,
                       np.where(too_small, mid * 2, mid))
    sigma = mid.astype(np.float32)
    floor = _MIN_K_DIST_SCALE * np.where(rho > 0, d.mean(1), d.mean())
    sigma = np.maximum(sigma, floor.astype(np.float32))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # np.where's unused side
        excess = d - rho[:, None]
        weights = np.where((excess <= 0) | (sigma[:, None] == 0), np.float32(1),
                           np.exp(-(excess / sigma[:, None]))).astype(np.float32)
    weights[indices == np.arange(n)[:, None]] = 0                  # no self loops
    graph = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), indices.ravel())),
                          shape=(n, n))
    graph.eliminate_zeros()
    transpose = graph.T.tocsr()
    union = (graph + transpose - graph.multiply(transpose)).tocsr()
    union.eliminate_zeros()
    return union


def _embedding_scores(scib, x, batches, labels, x_pre, names, clustering, seed) -> dict:
    """Every metric in ``names`` of one ``(n_cells, n_dims)`` float32 embedding."""
    knn = neighbors(x, LISI_NEIGHBORS)
    graph = knn.subset_neighbors(min(GRAPH_NEIGHBORS, knn.n_neighbors))
    scores: dict[str, float] = {}
    if "nmi" in names or "ari" in names:
        if clustering == "kmeans":
            scores.update(_nmi_ari_kmeans(x, labels, seed))
        else:
            scores.update(scib.nmi_ari_cluster_labels_leiden(graph, labels, seed=seed))
    compute = {
        "isolated_labels": lambda: scib.isolated_labels(x, labels, batches),
        "silhouette_label": lambda: scib.silhouette_label(x, labels),
        "clisi": lambda: scib.clisi_knn(knn, labels),
        "bras": lambda: _batch_silhouette(x, labels, batches, metric="cosine",
                                          between="mean_other"),
        "silhouette_batch": lambda: _batch_silhouette(x, labels, batches, metric="euclidean",
                                                      between="nearest"),
        "ilisi": lambda: scib.ilisi_knn(knn, batches),
        "kbet": lambda: _kbet_per_label(
            knn.subset_neighbors(min(KBET_NEIGHBORS, knn.n_neighbors)), batches, labels),
        "graph_connectivity": lambda: scib.graph_connectivity(graph, labels),
        "pcr_comparison": lambda: scib.pcr_comparison(x_pre, x, batches, categorical=True),
    }
    for name in names:
        if name in compute:
            scores[name] = float(compute[name]())
    return {name: scores[name] for name in names}


def _nmi_ari_kmeans(x, labels, seed) -> dict[str, float]:
    """NMI and ARI of k-means (k = number of labels, best of 10 starts) vs the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    n_labels = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_labels, init="k-means++", n_init=KMEANS_STARTS,
                      random_state=seed).fit_predict(x)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters,
                                                      average_method="arithmetic")),
            "ari": float(adjusted_rand_score(labels, clusters))}


def _batch_silhouette(x, labels, batches, *, metric: str, between: str,
                      chunk_size: int = 256) -> float:
    """BRAS / silhouette batch: how little batches separate within each label.

    Within every label ``l``, each cell ``i`` of batch ``b`` gets the silhouette
    ``s_i = (b_i - a_i) / max(a_i, b_i)``, where ``a_i`` is its mean distance to
    the other cells of ``(l, b)`` and ``b_i`` its mean distance to the cells of
    label ``l`` in the other batches: all of them (``between="mean_other"``,
    BRAS), the nearest batch (``"nearest"``, the scIB silhouette batch) or the
    furthest (``"furthest"``).  The score is ``1 - |s_i|`` averaged over the
    cells of a label, then over the labels that have cells of at least two
    batches and not one cell per batch; NaN when there are none.  A cell alone
    in its batch gets ``s_i = 0`` (scikit-learn's convention).

    scib-metrics' ``bras`` / ``silhouette_batch`` compute the same numbers
    label by label, jit-compiling its distance kernel anew for every label size
    (~2 s each on 2 CPU cores, minutes on data with many labels).  Here one
    pass over all cells sums the distances to every (label, batch) group with a
    single compiled kernel (chunks padded to one shape).

    Args:
      x: ``(n_cells, n_dims)`` embedding.
      labels, batches: ``(n_cells,)`` integer codes.
      metric: ``"euclidean"`` or ``"cosine"``.
      between: ``"mean_other"``, ``"nearest"`` or ``"furthest"``.
      chunk_size: cells per distance block.
    """
    groups, group_of_cell = np.unique(np.stack([labels, batches], 1), axis=0,
                                      return_inverse=True)
    group_of_cell = group_of_cell.ravel()
    group_label = groups[:, 0]
    group_size = np.bincount(group_of_cell, minlength=len(groups)).astype(np.float64)
    sums = _group_distance_sums(x, group_of_cell, len(groups), metric, chunk_size)
    same_label = group_label[None, :] == labels[:, None]           # (n_cells, n_groups)
    other = same_label & (np.arange(len(groups))[None, :] != group_of_cell[:, None])
    own_size = group_size[group_of_cell]
    with np.errstate(invalid="ignore", divide="ignore"):
        a = sums[np.arange(len(x)), group_of_cell] / (own_size - 1)
        if between == "mean_other":
            label_size = np.bincount(labels)[labels]
            b = np.where(other, sums, 0).sum(1) / (label_size - own_size)
        elif between == "nearest":
            b = np.where(other, sums / group_size, np.inf).min(1)
        elif between == "furthest":
            b = np.where(other, sums / group_size, -np.inf).max(1)
        else:
            raise ValueError(f"unknown between={between!r}")
        s = np.nan_to_num((b - a) / np.maximum(a, b))  # singletons: 0
    per_label = pd.DataFrame({"label": labels, "batch": batches, "score": 1 - np.abs(s)})
    stats = per_label.groupby("label").agg(n_batches=("batch", "nunique"),
                                           n_cells=("batch", "size"), score=("score", "mean"))
    usable = (stats.n_batches > 1) & (stats.n_batches < stats.n_cells)
    return float(stats.score[usable].mean()) if usable.any() else float("nan")


def _group_distance_sums(x, group_of_cell, n_groups: int, metric: str,
                         chunk_size: int) -> np.ndarray:
    """``(n_cells, n_groups)`` sums of the distances from each cell to each group."""
    n = x.shape[0]
    chunk_size = min(chunk_size, n)
    padded = np.concatenate([x, np.zeros(((-n) % chunk_size, x.shape[1]), x.dtype)])
    xs, codes = jnp.asarray(x), jnp.asarray(group_of_cell)
    blocks = [np.asarray(_distance_sums_block(jnp.asarray(padded[i:i + chunk_size]), xs, codes,
                                              n_groups, metric))
              for i in range(0, n, chunk_size)]
    return np.concatenate(blocks)[:n].astype(np.float64)


@functools.partial(jax.jit, static_argnames=("n_groups", "metric"))
def _distance_sums_block(block, x, codes, n_groups, metric):
    from scib_metrics.utils import cdist

    distances = cdist(block, x, metric=metric)                     # (chunk, n_cells)
    return jax.vmap(lambda row: jnp.bincount(codes, weights=row, length=n_groups))(distances)


def _kbet_per_label(knn, batches, labels, alpha=KBET_ALPHA) -> float:
    """scib-metrics' ``kbet_per_label`` with exact diffusion-map neighbours.

    Args:
      knn: ``NeighborsResults`` of the whole embedding (50 neighbours).
      batches, labels: ``(n_cells,)`` integer codes.
      alpha: significance level of each cell's chi-square test.

    Returns:
      The mean over labels of the kBET acceptance rate (NaN when no label has
      10 cells and two batches).
    """
    from scipy.sparse.csgraph import connected_components

    connectivities = sp.csr_matrix(knn.knn_graph_connectivities)
    scores = []
    for label in np.unique(labels):
        mask = labels == label
        graph = connectivities[mask][:, mask]
        graph.sort_indices()
        label_batches = batches[mask]
        n_obs = graph.shape[0]
        if n_obs < 10 or len(np.unique(label_batches)) == 1:
            scores.append(np.nan)  # too small, or nothing to mix
            continue
        cells_per_batch = pd.Series(label_batches).value_counts().mean()
        k0 = int(min(70, max(10, np.floor(cells_per_batch / 4))))
        k0 = min(k0, (2**31 - 1) // n_obs)  # scib's bound on k0 * n_obs
        n_components, component = connected_components(graph, connection="strong")
        keep = np.ones(n_obs, bool)
        if n_components > 1:
            # Diffusion cannot cross components: keep those with at least
            # 3 * k0 cells, if they hold 75 % of the label; else 0 (rejected).
            sizes = np.bincount(component)
            keep = sizes[component] >= 3 * k0
            if keep.mean() < 0.75:
                scores.append(0.0)
                continue
            graph = graph[keep][:, keep]
            graph.sort_indices()
        try:
            diffusion = _diffusion_neighbors(graph, k0, min(KBET_DIFFUSION_COMPONENTS,
                                                            graph.shape[0] - 1))
            scores.append(kbet_acceptance(diffusion.indices, label_batches[keep], alpha))
        except ValueError:  # as scib: a failed diffusion map counts as 100 % rejection
            scores.append(0.0)
    scores = np.asarray(scores, float)
    return float(np.mean(scores[~np.isnan(scores)])) if (~np.isnan(scores)).any() else np.nan


def kbet_acceptance(indices: np.ndarray, batches: np.ndarray, alpha: float = KBET_ALPHA) -> float:
    """kBET acceptance rate: share of cells whose neighbourhood matches the batch mix.

    For every cell, Pearson's chi-square statistic of the batch counts among
    its neighbours (itself included) against the expected counts
    ``k * (share of each batch among all cells)``, tested with ``B - 1``
    degrees of freedom for the B batches present; a cell is accepted when the
    p-value is at least ``alpha`` (Büttner et al. 2019, without the R
    package's adaptive neighbourhood size, as scib-metrics' ``kbet``).

    scib-metrics' ``kbet`` computes the same in JAX, but re-compiles for every
    neighbourhood size and number of batches (once per label in kBET per
    label, ~2 s each on 2 CPU cores); this is the same arithmetic in numpy.

    Args:
      indices: ``(n_cells, k)`` neighbour indices.
      batches: ``(n_cells,)`` batch of each cell (any labels).
      alpha: significance level.

    Returns:
      The acceptance rate in [0, 1].
    """
    from scipy.special import gammaincc

    codes = pd.factorize(np.asarray(batches))[0]
    n_batches = codes.max() + 1
    expected = np.bincount(codes, minlength=n_batches) / len(codes) * indices.shape[1]
    observed = np.zeros((len(codes), n_batches))
    np.add.at(observed, (np.arange(len(codes))[:, None], codes[indices]), 1)
    statistic = np.sum((observed - expected) ** 2 / expected, axis=1)
    # P(chi2_{B-1} >= statistic); scib-metrics: 1 - gammainc, in float32.
    p_values = gammaincc((n_batches - 1) / 2, statistic / 2)
    return float(np.mean(p_values >= alpha))


def _diffusion_neighbors(connectivities, k: int, n_comps: int):
    """``k`` + 1 exact neighbours in the diffusion map of a connectivity graph.

    The multiscale diffusion map of scib-metrics' ``diffusion_nn`` (scanpy's
    density-normalised transition matrix; eigenvectors scaled by
    ``lambda / (1 - lambda)``, the leading one left as is), whose Euclidean
    distances approximate diffusion distances.
    """
    from scipy.sparse.linalg import eigsh

    q = np.asarray(connectivities.sum(axis=0)).ravel()
    density = sp.diags(1.0 / q)
    kernel = density @ connectivities @ density
    z = sp.diags(1.0 / np.sqrt(np.asarray(kernel.sum(axis=0)).ravel()))
    transitions = (z @ kernel @ z).astype(np.float64)
    values, vectors = eigsh(transitions, k=n_comps, which="LM")
    values, vectors = values.astype(np.float32)[::-1], vectors.astype(np.float32)[:, ::-1]
    values = values + np.float32(1e-8)
    scale = np.array([v if v == 1 else v / (1 - v) for v in values], np.float32)
    return neighbors(vectors * scale, k + 1)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _checked_metrics(metrics: Iterable[str], clustering: str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(dict.fromkeys(metrics))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise DataError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from {', '.join(METRICS)}")
    if clustering not in CLUSTERINGS:
        raise DataError(f"unknown clustering {clustering!r}; choose from {', '.join(CLUSTERINGS)}")
    # Bio conservation first, in METRICS order within each kind.
    return [m for kind in (BIO, BATCH) for m in METRICS if m in names and METRICS[m].kind == kind]


def _checked_embeddings(adata, embeddings: Sequence[str]) -> list[str]:
    if isinstance(embeddings, str):
        embeddings = [embeddings]
    keys = list(dict.fromkeys(embeddings))
    if not keys:
        raise DataError("no embeddings given; name obsm keys such as 'X_pca' or 'X_scvi'")
    unknown = [k for k in keys if k not in adata.obsm and k != "X_pca"]
    if unknown:
        raise DataError(
            f"embedding(s) {', '.join(map(repr, unknown))} not in adata.obsm; available: "
            f"{', '.join(adata.obsm.keys()) or 'none'} ('X_pca' is computed when absent)")
    return keys


def _codes(adata, key: str, argname: str) -> np.ndarray:
    """``(n_cells,)`` integer codes of a categorical obs column with at least 2 values."""
    if key not in adata.obs.columns:
        raise DataError(f"{argname} {key!r} is not a column of adata.obs; available columns: "
                        f"{', '.join(map(str, adata.obs.columns)) or 'none'}")
    column = adata.obs[key]
    missing = int(column.isna().sum())
    if missing:
        raise DataError(f"obs[{key!r}] has {missing} missing values; drop those cells or "
                        f"fill them before computing integration metrics")
    codes = pd.factorize(column.astype(str), sort=True)[0].astype(np.int32)
    if codes.max(initial=-1) < 1:
        what = "batches" if argname == "batch_key" else "labels"
        raise DataError(f"obs[{key!r}] has {codes.max(initial=-1) + 1} distinct value(s); "
                        f"integration metrics need at least 2 {what}")
    return codes


class _LazyPCA:
    """``obsm`` embeddings as float32 arrays, ``X_pca`` computed once if absent."""

    def __init__(self, adata, layer, n_pcs, seed):
        self.adata, self.layer, self.n_pcs, self.seed = adata, layer, n_pcs, seed
        self.description = "from adata.obsm" if "X_pca" in adata.obsm else "not used"
        self._pca = None

    def get_or_obsm(self, key: str) -> np.ndarray:
        if key in self.adata.obsm:
            return _as_embedding(self.adata.obsm[key], key)
        if key != "X_pca":
            raise DataError(f"pre_integrated {key!r} is not in adata.obsm; available: "
                            f"{', '.join(self.adata.obsm.keys()) or 'none'}")
        if self._pca is None:
            self._pca, self.description = pca_embedding(self.adata, layer=self.layer,
                                                        n_pcs=self.n_pcs, seed=self.seed)
        return self._pca


def _as_embedding(value, key: str) -> np.ndarray:
    x = value.toarray() if sp.issparse(value) else np.asarray(value)
    if x.ndim != 2 or x.shape[1] < 1:
        raise DataError(f"obsm[{key!r}] has shape {x.shape}; an embedding is (n_cells, n_dims)")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise DataError(f"obsm[{key!r}] has non-finite or non-numeric values; "
                        "an embedding must be finite numbers")
    return np.array(x, np.float32)  # a copy: nothing below can touch the user's array


def pca_embedding(adata, *, layer: Optional[str] = None, n_pcs: int = 50,
                  seed: int = 0) -> tuple[np.ndarray, str]:
    """The ``X_pca`` that :func:`benchmark` uses when ``obsm`` has none.

    Args:
      adata: AnnData with expression in ``X`` or ``layer``; not modified.
      layer: layer to use instead of ``X``.
      n_pcs: components, cut to ``min(n_cells, n_genes) - 1``.
      seed: seed of the ARPACK starting vector.

    Returns:
      ``(pcs, description)``: ``(n_cells, n_pcs)`` float32 principal component
      scores of ``log1p(1e4 * x / cell total)`` when ``x`` holds counts (or of
      ``x`` itself otherwise), and a one-line description of what was done.
    """
    from sklearn.decomposition import PCA

    if layer is not None and layer not in adata.layers:
        raise DataError(f"layer {layer!r} is not in adata.layers; available: "
                        f"{', '.join(adata.layers.keys()) or 'none'}")
    x = adata.layers[layer] if layer is not None else adata.X
    source = f"layers[{layer!r}]" if layer is not None else "X"
    if x is None:
        raise DataError("X_pca is not in adata.obsm and adata.X is empty; add obsm['X_pca'] "
                        "or give a layer with the expression")
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    values = x.data if sp.issparse(x) else x
    if not np.isfinite(values).all():
        raise DataError(f"adata.{source} has NaN or infinite values; X_pca cannot be computed "
                        "from it (add obsm['X_pca'] or clean the data)")
    n_comps = min(int(n_pcs), min(x.shape) - 1)
    if n_comps < 1:
        raise DataError(f"adata.{source} of shape {x.shape} is too small for a PCA")
    is_counts = bool(values.size == 0 or (values.min() >= 0 and np.all(values == np.round(values))))
    if is_counts:
        empty = int(np.count_nonzero(np.asarray(x.sum(axis=1)).ravel() == 0))
        if empty:
            raise DataError(f"{empty} cells have zero total counts in adata.{source}; remove "
                            "them first (e.g. scanpy.pp.filter_cells(adata, min_counts=1))")
        x = apply_transform("log1p_cp10k", x.astype(np.float32))
    pcs = PCA(n_components=n_comps, svd_solver="arpack", random_state=seed).fit_transform(x)
    what = f"log1p_cp10k({source})" if is_counts else source
    return pcs.astype(np.float32), f"computed: {n_comps} principal components of {what}"


# --------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------


def markdown_table(table: pd.DataFrame) -> str:
    """:func:`benchmark`'s table as markdown, metrics titled, 3 decimals."""
    shown = table.rename(columns=TITLES).reset_index()
    header = "| " + " | ".join(map(str, shown.columns)) + " |"
    rule = "|---|" + "---:|" * (len(shown.columns) - 1)
    rows = ["| " + " | ".join([str(row[0])] + [_number(v) for v in row[1:]]) + " |"
            for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def _number(value: Any) -> str:
    return "" if pd.isna(value) else f"{value:.3f}"


def integration_figure(table: pd.DataFrame, title: str = ""):
    """Heat map of metrics (columns, grouped by kind) × embeddings (rows).

    Every metric is in [0, 1], so one colour scale serves all; each cell shows
    its value; NaN cells (a metric that could not be computed) say "n/a".

    Args:
      table: :func:`benchmark`'s table.
      title: figure title.

    Returns:
      A Matplotlib figure on an Agg canvas (nothing shown).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = list(table.columns)
    values = table.to_numpy(float)
    n_rows, n_cols = values.shape
    figure = Figure(figsize=(2.2 + 0.95 * n_cols, 1.6 + 0.45 * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1,
                      aspect="auto")
    cmap = image.get_cmap()
    for (i, j), v in np.ndenumerate(values):
        if not np.isfinite(v):
            ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="grey")
        else:
            red, green, blue, _ = cmap(v)
            # Dark text on light cells, light text on dark ones.
            colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour,
                    fontweight="bold" if columns[j] in AGGREGATES else "normal")
    ax.set_xticks(range(n_cols), [TITLES.get(c, c) for c in columns], rotation=40,
                  ha="right", fontsize=9)
    ax.set_yticks(range(n_rows), [str(i) for i in table.index], fontsize=9)
    # Bio metrics | batch metrics | aggregates: white lines between, names on top.
    kinds = [METRICS[c].kind if c in METRICS else "aggregate" for c in columns]
    starts = [j for j in range(n_cols) if j == 0 or kinds[j] != kinds[j - 1]]
    for j in starts[1:]:
        ax.axvline(j - 0.5, color="white", linewidth=3)
    ends = starts[1:] + [n_cols]
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)],
                   [TITLES.get(kinds[a], kinds[a]).lower() for a in starts], fontsize=9)
    top.tick_params(length=0)
    figure.colorbar(image, ax=ax, shrink=0.8, label="score (higher is better)")
    if title:
        ax.set_title(title, fontsize=10)
    return figure


def save_integration_figure(table: pd.DataFrame, path, title: str = "") -> Path:
    """Write :func:`integration_figure` as a PNG to ``path`` atomically."""
    from lvmzoo.io import atomic_write_bytes

    buffer = io.BytesIO()
    integration_figure(table, title).savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())
