"""What ``lvmzoo fit`` writes and prints after the fit: metrics, latent.png, result.h5ad, the summary.

Every step after the fit is bounded by a sample or a size, so that what follows a
fit of a million cells costs a small share of the fit (issue: a 41 s fit followed
by 19 minutes of outputs):

* the likelihood in ``metrics.json`` is scored on at most :data:`SCORE_CELLS`
  random cells per split (``--score-cells N|all``), with its standard error;
  with the cells in memory the split's average is the regression estimate on
  each cell's total, log total and number of nonzero values
  (:func:`regression_estimate`), which every cell has without being scored;
* ``latent.png`` shows at most :data:`PLOT_CELLS` random cells, and its 2-D view
  is PCA of the latent unless ``--plot-method umap`` is asked for;
* cells × genes outputs (scVI's normalised expression layer) are written only
  when they hold at most :data:`PER_GENE_VALUES` values (``--per-gene-outputs``);
* each step prints one line with its time, and the times go to ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from lvmzoo.cli._common import release_freed_memory

# metrics.json scores at most this many random cells per split by default: importance
# sampling costs ~100 forward passes per cell (1,000 scVI cells at 2,000 genes: ~3 s on one
# core; 10,000 cells took longer than a 1-epoch fit of 10,000 cells).  A cell's
# log-likelihood is mostly its size: on simulated counts its total, log total and number of
# detected genes explain 98.6 % of the variance between cells, so the regression estimate
# from 1,000 cells has a standard error of ~1 nat per cell where the plain average of 2,000
# had ~5.7 (scVI, 200,000 cells).
SCORE_CELLS = 1_000
# Rows per block when cell_sizes sums a sparse matrix's rows (bounded temporaries).
SIZES_BLOCK = 16_384
# latent.png draws at most this many random cells.
PLOT_CELLS = 20_000
# Cells × genes outputs are written by default up to this many values (200 MB of float32).
PER_GENE_VALUES = 50_000_000


class PostFitSteps:
    """Times the steps after the fit and says each one on stderr as it ends."""

    def __init__(self, quiet: bool = False):
        self.seconds: dict[str, float] = {}
        self.quiet = quiet

    @contextlib.contextmanager
    def __call__(self, key: str, doing: str):
        if not self.quiet:
            print(f"lvmzoo: {doing} ...", end="", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        release_freed_memory()  # so the next step's peak does not sit on this one's
        self.seconds[key] = round(time.perf_counter() - started, 3)
        if not self.quiet:
            print(f" {self.seconds[key]:.1f} s", file=sys.stderr, flush=True)


def per_gene_outputs(choice: str, data) -> bool:
    """``--per-gene-outputs``: ``all``, ``none`` or ``auto`` (up to :data:`PER_GENE_VALUES`)."""
    if choice == "auto":
        return not data.is_backed and data.n_cells * data.n_genes <= PER_GENE_VALUES
    return choice == "all"


def _save_latent_plot(path: Path, annotated, name: str, data, args) -> str:
    """``latent.png``: one panel per batch key, labels key and model clusters; returns the view."""
    import numpy as np

    from lvmzoo.data.backed import is_on_disk
    from lvmzoo.plotting import cells_figure, embed_2d, save_figure

    latent = annotated.obsm[f"X_{name}"]
    cells = np.arange(annotated.n_obs)
    if annotated.n_obs > PLOT_CELLS:  # a bounded sample: the picture, not the atlas
        cells = np.sort(np.random.default_rng(args.seed).choice(annotated.n_obs, PLOT_CELLS,
                                                                replace=False))
    obs = annotated.obs.iloc[cells].copy()
    color = [k for k in (args.batch_key, args.labels_key) if k]
    color += [k for k in obs.columns if k.startswith(f"{name}_") and k not in color]
    x = annotated.layers.get(args.layer) if args.layer else annotated.X  # None when on disk
    if x is not None and is_on_disk(x):  # read compactly: the same counts are in memory
        x = data.x if data.is_sparse and data.registry.transform == "none" else None
    if not color and data.registry.kind == "counts" and x is not None:
        # Nothing categorical to show: the first thing that structures a latent of counts.
        # In blocks: the sampled cells' rows are summed, never held at once.
        totals = [np.asarray(x[cells[i:i + 4096]].sum(axis=1)).ravel()
                  for i in range(0, len(cells), 4096)]
        obs["log10 total counts"] = np.log10(np.concatenate(totals))
        color = ["log10 total counts"]
    method = "pca" if args.plot_method == "auto" else args.plot_method
    if method == "umap":
        _numba_cache_beside_lvmzoos()
    coordinates, view = embed_2d(np.asarray(latent)[cells], method, args.seed)
    title = name if len(cells) == annotated.n_obs else f"{name} ({len(cells):,} random cells)"
    save_figure(cells_figure(coordinates, view, obs, color, title=title), path)
    return {"UMAP": "UMAP", "PC": "PCA"}.get(view, "the latent itself")


def _numba_cache_beside_lvmzoos() -> None:
    """Let numba keep umap-learn's compiled functions (those it marks cacheable) on disk,
    under lvmzoo's cache directory, so a second run does not compile them again."""
    import os

    from lvmzoo.cache import compilation_cache_dir

    directory = compilation_cache_dir()
    if directory is not None and "NUMBA_CACHE_DIR" not in os.environ:
        os.environ["NUMBA_CACHE_DIR"] = str(Path(directory) / "numba")


def _fit_metrics(fitted, data, score_cells: Optional[int] = SCORE_CELLS) -> dict[str, Any]:
    """Train and validation scores, each on at most ``score_cells`` random cells (``None``: all)."""
    import numpy as np

    sizes = None  # each cell's size, for the regression estimate of a sampled split

    def score(split):
        nonlocal sizes
        n_split, sample = len(split), split
        if score_cells is not None and n_split > score_cells:
            # Scoring a whole atlas costs many epochs; a random sample estimates the average.
            rng = np.random.default_rng(fitted.seed)
            sample = np.sort(rng.choice(split, score_cells, replace=False))
        scores = fitted.evaluate(data.subset(sample), standard_error=True)
        sd = scores.pop("log_likelihood_sd")
        cells = scores.pop("cell_log_likelihoods", None)
        n = len(sample)
        scores["estimator"] = "all cells" if n == n_split else "sample mean"
        scores["sample_avg_log_likelihood"] = scores["avg_log_likelihood"]
        if n < n_split and cells is not None:
            sizes = cell_sizes(data) if sizes is None else sizes
            if sizes is not None:
                scores["avg_log_likelihood"], sd = regression_estimate(
                    cells, sizes[sample], sizes[split].mean(0))
                scores["estimator"] = ("regression on each cell's total, log total and "
                                       "nonzero values")
        # Sampling without replacement from the split: the finite-population correction.
        scores["standard_error"] = (None if sd is None else
                                    sd / math.sqrt(n) * math.sqrt(max(n_split - n, 0) / n_split))
        scores["n_cells_in_split"] = n_split
        return scores

    validation = score(fitted.validation_index) if len(fitted.validation_index) else None
    metrics = {"train": score(fitted.train_index), "validation": validation}
    if validation is not None and hasattr(fitted.model, "predict_proba"):
        held_out = data.subset(fitted.validation_index)
        if (held_out.labels >= 0).any():
            # Labelled validation cells were never seen by the classifier: an honest accuracy.
            metrics["validation_labels"] = _label_scores(fitted, held_out)
    return metrics


def cell_sizes(data):
    """``(n_cells, 3)`` float64: each cell's total, ``log1p`` of it, and its number of
    nonzero values, read from the matrix in memory (``None`` for cells on disk, or a
    matrix of another kind): what predicts a cell's log-likelihood before it is scored."""
    import numpy as np
    import scipy.sparse as sp

    from lvmzoo.data.compact import CompactCSR

    x = data.x
    if data.is_backed:
        return None
    if isinstance(x, CompactCSR) or (sp.issparse(x) and x.format == "csr"):
        starts, values = ((x.row_starts, x.values) if isinstance(x, CompactCSR)
                          else (x.indptr, x.data))
        starts = np.asarray(starts, np.int64)
        nonzero = np.diff(starts).astype(np.float64)
        totals = np.zeros(len(nonzero))
        # In blocks of rows: reduceat casts the values it sums, and a whole matrix's
        # worth of float64 would be twice the matrix again.
        for first in range(0, len(nonzero), SIZES_BLOCK):
            last = min(first + SIZES_BLOCK, len(nonzero))
            filled = np.flatnonzero(nonzero[first:last] > 0) + first  # reduceat's segments
            if len(filled):
                block = values[starts[first]:starts[last]]
                totals[filled] = np.add.reduceat(block, starts[filled] - starts[first],
                                                 dtype=np.float64)
    elif isinstance(x, np.ndarray):
        totals = np.concatenate([x[i:i + 4096].sum(1, dtype=np.float64)
                                 for i in range(0, len(x), 4096)])
        nonzero = np.concatenate([np.count_nonzero(x[i:i + 4096], axis=1)
                                  for i in range(0, len(x), 4096)]).astype(np.float64)
    else:
        return None
    return np.column_stack([totals, np.log1p(np.abs(totals)), nonzero])


def regression_estimate(values, sample_sizes, split_means) -> tuple[float, float]:
    """The split's average of ``values`` from a random sample of its cells, by regression on
    what every cell of the split has (Cochran, *Sampling Techniques*, ch. 7).

    ``values`` ``(n,)`` are the sampled cells' scores, ``sample_sizes`` ``(n, p)`` their
    sizes and ``split_means`` ``(p,)`` the sizes' means over the whole split.  The estimate
    is ``mean(values) + (split_means - mean(sample_sizes)) @ b`` with ``b`` the
    least-squares slopes; returns it with the residuals' standard deviation (``n - p - 1``
    degrees of freedom), which takes the place of the values' own in the standard error.
    Sizes that do not vary in the sample are left out; with too few cells for the slopes,
    the plain average and standard deviation.
    """
    import numpy as np

    y = np.asarray(values, np.float64)
    x = np.asarray(sample_sizes, np.float64)
    spread = x.std(0)
    varying = spread > 1e-12 * np.maximum(1.0, np.abs(x).max(0))
    if len(y) <= int(varying.sum()) + 2 or not varying.any():
        return float(y.mean()), float(y.std(ddof=1)) if len(y) > 1 else 0.0
    scaled = (x[:, varying] - x[:, varying].mean(0)) / spread[varying]
    slopes, *_ = np.linalg.lstsq(scaled, y - y.mean(), rcond=None)
    residuals = y - y.mean() - scaled @ slopes
    shift = (np.asarray(split_means, np.float64)[varying] - x[:, varying].mean(0)) / spread[varying]
    dof = len(y) - int(varying.sum()) - 1
    return float(y.mean() + shift @ slopes), float(np.sqrt(residuals @ residuals / dof))


def _label_scores(fitted, data) -> dict[str, Any]:
    from lvmzoo.analysis.labels import label_scores

    _, probabilities = fitted.predict(data, soft=True)
    labelled = data.labels >= 0
    truth = [data.registry.label_categories[c] for c in data.labels[labelled]]
    return label_scores(truth, probabilities[labelled])


def _annotate_backed(fitted, adata, data):
    """result.h5ad of an on-disk fit: obs, var and the latent, without the matrix; plus the
    model's own per-cell outputs (``annotate``) when it reads the cells in chunks
    (``annotates_on_disk``, e.g. the pseudotime models), as an in-memory fit writes them."""
    import anndata as ad

    key = f"X_{fitted.model.name}"
    result = ad.AnnData(obs=adata.obs.copy(), var=adata.var.copy())
    latent = fitted.latent(data)
    result.obsm[key] = latent
    extras = []
    if fitted.model.annotates_on_disk:
        extras = fitted.model.annotate(result, fitted.params, latent, data)
    return result, [f'obsm["{key}"] (obs and var; the matrix stays in DATA)', *extras]


def _summary(fitted, data, source, metrics, added, out, seconds, view) -> str:
    from lvmzoo.infer.svi import stop_message

    history = fitted.history
    registry = data.registry
    n_epochs = len(history["epoch"])
    val_loss = history["validation_loss"][-1] if n_epochs else math.nan
    lines = [
        f"{fitted.model.name} fitted to {source}: {data.n_cells:,} cells × {data.n_genes:,} "
        f"genes (kind {registry.kind}, transform {registry.transform})",
        f"{stop_message(history)}: {sum(history['seconds']):.1f} s "
        f"(+ {history['compile_seconds']:.1f} s compiling; {seconds:.1f} s in all)"
        + (f"; final loss {history['loss'][-1]:.4g}" if n_epochs else "")
        + (f", validation loss {val_loss:.4g}" if math.isfinite(val_loss) else ""),
        f"log-likelihood per cell ({metrics['train']['method']}): "
        f"train {_score_text(metrics['train'])}"
        + (f", validation {_score_text(metrics['validation'])}" if metrics["validation"] else ""),
        f"wrote {out}/: latent.png (the cells, {view}), loss.png, metrics.json, history.json, "
        f"model/, result.h5ad (added {', '.join(added)})",
        f"look at {out / 'latent.png'} first; 'lvmzoo evaluate {out} NEW.h5ad' scores new cells",
    ]
    if hasattr(fitted, "members"):  # a seed ensemble
        train = metrics["train"]
        lines.insert(3, f"seed ensemble of {len(fitted.members)} replicates (seeds "
                        f"{', '.join(map(str, fitted.seeds))}): its log-likelihood is the "
                        f"replicates' mixture; one replicate alone scores "
                        f"{train['single_fit_avg_log_likelihood']:.4g} on average (train)"
                        + (f", {metrics['validation']['single_fit_avg_log_likelihood']:.4g} "
                           "(validation)" if metrics["validation"] else ""))
    if registry.labels_key is not None and hasattr(fitted.model, "predict_proba"):
        scores = metrics.get("validation_labels")
        lines.insert(-1, f"labels: {int((data.labels >= 0).sum()):,} of {data.n_cells:,} cells "
                         f"labelled ({registry.n_labels} categories of obs[{registry.labels_key!r}])"
                         + (f"; held-out labelled cells: accuracy {scores['accuracy']:.3f}, macro "
                            f"F1 {scores['macro_f1']:.3f}, ECE {scores['ece']:.3f} "
                            f"({scores['n_cells']} cells)" if scores else ""))
    return "\n".join(lines)


def _score_text(scores: dict[str, Any]) -> str:
    """``-512.3`` or, for a sample of the split, ``-512.3 ± 1.2 (10,000 random cells)``."""
    text = f"{scores['avg_log_likelihood']:.4g}"
    if scores["n_cells"] < scores.get("n_cells_in_split", scores["n_cells"]):
        error = scores.get("standard_error")
        text += (f" ± {error:.2g}" if error is not None else "") + \
            f" ({scores['n_cells']:,} random cells; --score-cells all for every cell)"
    return text
