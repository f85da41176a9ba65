"""The scVI family: SCANVI label transfer and scVI integration, lvmzoo vs scvi-tools.

For each data set, each tool runs the same two-phase recipe in its own fresh
process (``python bench_family.py --worker TOOL ...``, one JSON line):

1. **scVI** on all cells for ``scvi_epochs`` epochs; its latent ``X_scvi``
   is the tool's integrated embedding;
2. **SCANVI warm-started from that scVI** for ``scanvi_epochs`` epochs
   (lvmzoo: ``SCANVI.from_scvi`` + ``fit(initial_params=scvi_result)``;
   scvi-tools: ``SCANVI.from_scvi_model``) with 10 % of the cells labelled —
   the same cells for both tools (seed 0), the others set to ``"Unknown"``.

=========================  ==================================================
architecture               scvi-tools' defaults: ``n_latent=10``,
                           ``n_hidden=128``, 1 hidden layer, dropout 0.1,
                           batch norm, ZINB, per-gene dispersion, observed
                           library, batch one-hot into the decoder; SCANVI's
                           classifier an MLP, ``classification_ratio`` 50
optimiser                  scvi-tools' Adam (lr 1e-3, eps 1e-2, L2 decay 1e-6;
                           lvmzoo's full-data gradient rescaled per cell, see
                           ``bench_scvi.scvi_tools_adam``); batch size 128;
                           all cells train (``train_size=1.0`` /
                           ``validation_fraction=0``), no early stopping
KL warm-up                 half of each phase's epochs, the same for both
labels scored              the predicted labels of the unlabelled cells
                           against the truth: accuracy, macro F1 and expected
                           calibration error (``lvmzoo.analysis.labels``, 15
                           bins), both tools through the same functions
integration                ``lvmzoo.analysis.integration.benchmark`` (scIB
                           metrics) of PCA (50 components of log1p-cp10k),
                           each tool's ``X_scvi`` and each tool's SCANVI latent,
                           against the true labels
speed                      steady-state seconds per epoch (median of epochs
                           2..E) of each phase; lvmzoo's compilation is apart;
                           the ratio compares cells trained per second
repeats                    ``--repeats N``: seeds 0..N-1, each tool each seed in
                           a fresh process; medians (integration metrics too)
=========================  ==================================================

SCANVI's objectives differ on purpose (see ``lvmzoo/models/scanvi.py``):
lvmzoo observes the known labels (Kingma's M2), scvi-tools sums them out for
every cell; both add 50 × the labelled cells' cross-entropy.

Targets: lvmzoo's accuracy and integration ``total`` at least scvi-tools';
SCANVI epoch time ≥ 3× faster.

Usage::

    python benchmarks/bench_family.py            # writes results/family.{json,md}
    python benchmarks/bench_family.py --quick    # tiny sizes and epochs; prints, writes nothing
    python benchmarks/bench_family.py --data-sets kang_ifnb --repeats 3   # results/family_kang_ifnb.*

Data sets: a 10,000 × 2,000 simulation (3 batches, 6 types), the bundled
wu2020 (200 T cells, ``patient`` as batch, 16 clusters) and the bundled Kang
PBMCs (``condition`` as batch, the 10 marker-derived types; its
``unassigned`` cells are left out). Beside the tools: 1-NN on 10 PCs, and the
best kNN on PCA over k ∈ {1, 5, 15} × {10, 50} PCs picked on the scored
labels themselves (an optimistic bar).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import load_average, write_text  # noqa: E402
from bench_scvi import (  # noqa: E402  (the shared pieces of the scVI benchmark)
    ADAM_EPS, ARCHITECTURE, BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY, _epoch_summary,
    _peak_rss_mib, epoch_clock, machine_info, scvi_tools_adam)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "BENCH_FAMILY_RESULT "
TOOLS = ("lvmzoo", "scvi-tools")
LABEL_FRACTION = 0.1
LABEL_SEED = 0
UNLABELED = "Unknown"
LIKELIHOOD = "zinb"


@dataclass(frozen=True)
class DataSet:
    """A data set of the benchmark: where its batches and true labels are."""

    name: str
    batch_key: str
    truth_key: str
    scvi_epochs: int
    scanvi_epochs: int
    n_cells: int = 0  # simulated cells (0: bundled data)
    n_genes: int = 0
    drop_truth: tuple[str, ...] = ()  # cells with these true labels are left out


@dataclass(frozen=True)
class Settings:
    data_sets: tuple[DataSet, ...] = (
        DataSet("simulated", "batch", "cell_type", 50, 20, n_cells=10_000, n_genes=2_000),
        DataSet("wu2020", "patient", "cluster_orig", 400, 100),
        DataSet("kang_ifnb", "condition", "cell_type", 100, 20, drop_truth=("unassigned",)),
    )
    repeats: int = 1
    worker_timeout: float = 7200.0
    integration: bool = True


# --------------------------------------------------------------------------
# Data (parent)
# --------------------------------------------------------------------------


def prepare_data(spec: DataSet, directory: Path) -> tuple[Path, dict[str, Any]]:
    """Write ``spec``'s cells with obs["label"]: the truth for 10 % of cells, else "Unknown"."""
    from lvmzoo import datasets

    if spec.n_cells:
        adata = datasets.simulate_counts(n_cells=spec.n_cells, n_genes=spec.n_genes,
                                         n_batches=3, n_cell_types=6, batch_effect_scale=0.5,
                                         seed=0)
        source = (f"lvmzoo.datasets.simulate_counts(n_cells={spec.n_cells}, "
                  f"n_genes={spec.n_genes}, n_batches=3, n_cell_types=6, "
                  "batch_effect_scale=0.5, seed=0)")
        adata.obsm.clear()
        adata.varm.clear()
        adata.uns.clear()
    else:
        adata = datasets.load(spec.name)
        source = f"bundled {spec.name}"
        if spec.drop_truth:
            dropped = adata.obs[spec.truth_key].astype(str).isin(spec.drop_truth).to_numpy()
            adata = adata[~dropped].copy()
            source += (f" without its {int(dropped.sum())} cells labelled "
                       f"{', '.join(spec.drop_truth)}")
    labelled = np.random.default_rng(LABEL_SEED).random(adata.n_obs) < LABEL_FRACTION
    truth = adata.obs[spec.truth_key].astype(str).to_numpy()
    adata.obs["label"] = np.where(labelled, truth, UNLABELED)
    adata.obs["labelled"] = labelled
    path = directory / f"{spec.name}.h5ad"
    adata.write_h5ad(path)
    return path, {
        "name": spec.name, "source": source, "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars), "batch_key": spec.batch_key, "truth_key": spec.truth_key,
        "n_batches": int(adata.obs[spec.batch_key].nunique()),
        "n_labels": int(len(set(truth))), "n_labelled": int(labelled.sum()),
        "n_labelled_categories": int(len(set(truth[labelled]))),
        "scvi_epochs": spec.scvi_epochs, "scanvi_epochs": spec.scanvi_epochs,
    }


# --------------------------------------------------------------------------
# Workers: one tool, both phases, one fresh process
# --------------------------------------------------------------------------


def run_lvmzoo(adata, args) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import lvmzoo
    from lvmzoo.models import SCANVI, SCVI

    data = lvmzoo.setup_anndata(adata, batch_key=args.batch_key, labels_key="label",
                                unlabeled_category=UNLABELED)
    optimizer = scvi_tools_adam(data.n_cells)
    scvi_model = SCVI(**ARCHITECTURE, likelihood=LIKELIHOOD, dispersion="gene",
                      latent_library=False, encode_batch=False, use_batch_norm=True,
                      n_epochs_kl_warmup=max(1, args.scvi_epochs // 2))
    started = time.perf_counter()
    scvi_result = lvmzoo.fit(scvi_model, data, optimizer=optimizer, epochs=args.scvi_epochs,
                             batch_size=BATCH_SIZE, seed=args.seed, validation_fraction=0.0,
                             progress=False)
    scvi_seconds = time.perf_counter() - started
    model = SCANVI.from_scvi(scvi_result, n_epochs_kl_warmup=max(1, args.scanvi_epochs // 2))
    started = time.perf_counter()
    result = lvmzoo.fit(model, data, optimizer=optimizer, initial_params=scvi_result,
                        epochs=args.scanvi_epochs, batch_size=BATCH_SIZE, seed=args.seed,
                        validation_fraction=0.0, progress=False)
    scanvi_seconds = time.perf_counter() - started
    _, probabilities = result.predict(data, soft=True)
    out = {
        "scvi": {**_epoch_summary(scvi_result.history["seconds"], _cells(scvi_result)),
                 "compile_seconds": scvi_result.history["compile_seconds"],
                 "train_seconds": scvi_seconds},
        "scanvi": {**_epoch_summary(result.history["seconds"], _cells(result)),
                   "compile_seconds": result.history["compile_seconds"],
                   "train_seconds": scanvi_seconds},
    }
    arrays = {"X_scvi": scvi_result.latent(data), "X_scanvi": result.latent(data),
              "probabilities": probabilities.to_numpy(),
              "categories": np.asarray(probabilities.columns, dtype=str)}
    return out, arrays


def _cells(result) -> int:
    return int(result.history["steps_per_epoch"]) * int(result.history["batch_size"])


def run_scvi_tools(adata, args) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import scvi
    import torch

    scvi.settings.seed = args.seed
    torch.set_num_threads(args.torch_threads)
    plan = lambda epochs: dict(optimizer="Adam", lr=LEARNING_RATE, eps=ADAM_EPS,  # noqa: E731
                               weight_decay=WEIGHT_DECAY, n_epochs_kl_warmup=max(1, epochs // 2),
                               n_steps_kl_warmup=None, reduce_lr_on_plateau=False)
    common = dict(accelerator="cpu", devices=1, train_size=1.0, batch_size=BATCH_SIZE,
                  early_stopping=False, enable_progress_bar=False)
    scvi.model.SCVI.setup_anndata(adata, batch_key=args.batch_key, labels_key="label")
    scvi_model = scvi.model.SCVI(adata, **ARCHITECTURE, dispersion="gene",
                                 gene_likelihood=LIKELIHOOD, use_observed_lib_size=True,
                                 use_batch_norm="both", use_layer_norm="none",
                                 encode_covariates=False)
    clock = epoch_clock()
    started = time.perf_counter()
    scvi_model.train(max_epochs=args.scvi_epochs, callbacks=[clock],
                     plan_kwargs=plan(args.scvi_epochs), **common)
    scvi_seconds = time.perf_counter() - started
    scvi_clock = clock.seconds()
    model = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category=UNLABELED)
    clock = epoch_clock()
    started = time.perf_counter()
    model.train(max_epochs=args.scanvi_epochs, callbacks=[clock],
                plan_kwargs=plan(args.scanvi_epochs), **common)
    scanvi_seconds = time.perf_counter() - started
    probabilities = model.predict(soft=True)
    probabilities = probabilities[[c for c in probabilities.columns if c != UNLABELED]]
    out = {
        "scvi": {**_epoch_summary(scvi_clock, adata.n_obs), "train_seconds": scvi_seconds},
        "scanvi": {**_epoch_summary(clock.seconds(), adata.n_obs),
                   "train_seconds": scanvi_seconds},
        "torch_threads": torch.get_num_threads(),
    }
    arrays = {"X_scvi": scvi_model.get_latent_representation(),
              "X_scanvi": model.get_latent_representation(),
              "probabilities": probabilities.to_numpy(),
              "categories": np.asarray(probabilities.columns, dtype=str)}
    return out, arrays


def worker_main(args) -> None:
    import anndata as ad

    adata = ad.read_h5ad(args.data)
    run = run_lvmzoo if args.worker == "lvmzoo" else run_scvi_tools
    out, arrays = run(adata, args)
    np.savez(args.arrays, **arrays)
    out.update({"tool": args.worker, "seed": args.seed, "peak_rss_mib": _peak_rss_mib()})
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def launch(tool: str, path: Path, info: dict[str, Any], seed: int, directory: Path,
           settings: Settings) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    arrays = directory / f"{info['name']}_{tool}_{seed}.npz"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--data",
               str(path), "--arrays", str(arrays), "--batch-key", info["batch_key"],
               "--scvi-epochs", str(info["scvi_epochs"]), "--scanvi-epochs",
               str(info["scanvi_epochs"]), "--seed", str(seed),
               "--torch-threads", str(os.cpu_count() or 1)]
    load = load_average()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          timeout=settings.worker_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out.update({"process_seconds": time.perf_counter() - started, "load_average_at_start": load})
    with np.load(arrays) as stored:
        return out, {k: stored[k] for k in stored.files}


# --------------------------------------------------------------------------
# Scores (parent)
# --------------------------------------------------------------------------


def label_metrics(adata, truth_key: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy, macro F1 and ECE of the unlabelled cells' predictions."""
    import pandas as pd

    from lvmzoo.analysis.labels import label_scores

    unlabelled = ~adata.obs["labelled"].to_numpy()
    probabilities = pd.DataFrame(arrays["probabilities"], columns=list(arrays["categories"]))
    truth = adata.obs[truth_key].astype(str).to_numpy()
    scores = label_scores(truth[unlabelled], probabilities[unlabelled])
    predicted = np.asarray(arrays["categories"])[arrays["probabilities"].argmax(1)]
    # Over every unlabelled cell, those of types nobody labelled counted wrong.
    scores["accuracy_all_unlabelled"] = float(np.mean(predicted[unlabelled] == truth[unlabelled]))
    return scores


def integration_table(adata, info: dict[str, Any], latents: dict[str, dict[str, np.ndarray]]):
    from lvmzoo.analysis.integration import benchmark

    adata = adata.copy()
    keys = ["X_pca"]
    for tool, arrays in latents.items():
        for name in ("X_scvi", "X_scanvi"):
            key = f"{name} ({tool})"
            adata.obsm[key] = arrays[name]
            keys.append(key)
    return benchmark(adata, info["batch_key"], info["truth_key"], keys)


KNN_GRID = {"k": (1, 5, 15), "n_pcs": (10, 50)}


def knn_pca_scores(adata, truth_key: str) -> list[dict[str, Any]]:
    """Accuracy of kNN on PCA of log1p-cp10k for every setting of :data:`KNN_GRID`.

    The labelled cells are the reference, the unlabelled ones are scored. The
    fixed baseline is 1-NN on 10 PCs; the best of the grid is an optimistic
    bar (its two settings are picked on the labels it is scored against).
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    from lvmzoo.data.transforms import apply_transform

    x = apply_transform("log1p_cp10k", adata.X.astype(np.float32))
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    labelled = adata.obs["labelled"].to_numpy()
    truth = adata.obs[truth_key].astype(str).to_numpy()
    scores = []
    for n_pcs in KNN_GRID["n_pcs"]:
        pcs = PCA(n_pcs, random_state=0).fit_transform(x)
        for k in KNN_GRID["k"]:
            if k <= labelled.sum():
                knn = KNeighborsClassifier(k).fit(pcs[labelled], truth[labelled])
                scores.append({"k": k, "n_pcs": n_pcs, "accuracy": float(
                    np.mean(knn.predict(pcs[~labelled]) == truth[~labelled]))})
    return scores


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _median(values):
    return float(np.median(values))


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [
        "# The scVI family: lvmzoo vs scvi-tools",
        "",
        "Each tool: scVI on all cells, then SCANVI warm-started from it with 10 % of the cells "
        "labelled (the same cells). scvi-tools' default architecture (n_latent 10, n_hidden 128, "
        "ZINB, batch norm), scvi-tools' Adam for both, batch size 128, KL warm-up over half of "
        "each phase. Labels scored on the unlabelled cells (macro F1 over the labels that occur; "
        "ECE with 15 bins); *acc. (all)* counts cells of labels no labelled cell has as wrong. "
        "Epoch s: median of epochs 2..E; cells/s: cells trained per epoch / epoch s; "
        "**ratio** = lvmzoo cells/s / scvi-tools cells/s (target ≥ 3). Both tools' epochs take "
        "`ceil(n_cells / 128)` steps: scvi-tools' last minibatch is smaller, lvmzoo's is "
        "topped up with the epoch's first cells (10,000 cells: 10,112 vs 10,000 cells per "
        "epoch; wu2020's 200: 256 vs 200). "
        "Each tool in its own fresh process; medians over repeats (seeds 0, 1, ...).",
        "",
        "| data | cells × genes | labelled | epochs scVI + SCANVI | tool | accuracy | acc. (all) "
        "| macro F1 | ECE | SCANVI epoch s | cells/s | **ratio** | scVI epoch s | cells/s "
        "| **ratio** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    integration_lines = []
    for entry in report["results"]:
        d = entry["data"]
        head = (f"| {d['name']} | {d['n_cells']:,} × {d['n_genes']:,} | {d['n_labelled']} "
                f"({d['n_labelled_categories']}/{d['n_labels']} labels) "
                f"| {d['scvi_epochs']} + {d['scanvi_epochs']} ")
        summary = entry["summary"]
        for tool in TOOLS:
            s = summary[tool]
            ratio = lambda phase: (  # noqa: E731
                f"**{s[phase + '_cells_per_second'] / summary['scvi-tools'][phase + '_cells_per_second']:.2f}**"  # noqa: E501
                if tool == "lvmzoo" else "")
            lines.append(
                f"{head}| {tool} | {s['accuracy']:.3f} | {s['accuracy_all_unlabelled']:.3f} "
                f"| {s['macro_f1']:.3f} | {s['ece']:.3f} | {s['scanvi_epoch_seconds']:.3f} "
                f"| {s['scanvi_cells_per_second']:,.0f} | {ratio('scanvi')} "
                f"| {s['scvi_epoch_seconds']:.3f} | {s['scvi_cells_per_second']:,.0f} "
                f"| {ratio('scvi')} |")
        lines.append(f"{head}| kNN on PCA (1-NN, 10 PCs) | | {entry['knn_pca_accuracy']:.3f} "
                     "| | | | | | | | |")
        if "knn_pca_best" in entry:
            best = entry["knn_pca_best"]
            lines.append(f"{head}| best kNN on PCA (k ∈ {{1, 5, 15}} × {{10, 50}} PCs, picked on "
                         f"these labels: k={best['k']}, {best['n_pcs']} PCs) | | "
                         f"{best['accuracy']:.3f} | | | | | | | | |")
        if entry.get("integration"):
            from lvmzoo.analysis.integration import markdown_table
            import pandas as pd

            table = pd.DataFrame(entry["integration"]).set_index("embedding")
            totals = entry.get("integration_totals_by_repeat", {})
            integration_lines += ["", f"Integration metrics, {d['name']} (batch "
                                      f"`{d['batch_key']}`, labels `{d['truth_key']}`; each "
                                      f"metric's median over {report['settings']['repeats']} "
                                      "repeat(s)):", "", markdown_table(table)]
            if totals:
                integration_lines += ["", "Total by repeat: " + "; ".join(
                    f"{name} " + ", ".join(f"{t:.3f}" for t in values)
                    for name, values in totals.items()) + "."]
    lines += integration_lines
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, jax {v['jax']}, numpyro {v['numpyro']}, flax {v['flax']}, "
        f"torch {v['torch']}, scvi-tools {v['scvi-tools']}; {m['date']}; 1-min load average "
        f"{m['load_average_at_start'][0] if m.get('load_average_at_start') else '?'} at start. "
        f"Benchmark wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = ("accuracy", "accuracy_all_unlabelled", "macro_f1", "ece")
    out = {}
    for tool, tool_runs in runs.items():
        out[tool] = {k: _median([r["labels"][k] for r in tool_runs]) for k in keys}
        for phase in ("scvi", "scanvi"):
            out[tool][f"{phase}_epoch_seconds"] = _median(
                [r[phase]["steady_epoch_seconds"] for r in tool_runs])
            out[tool][f"{phase}_cells_per_second"] = _median(
                [r[phase]["cells_per_second"] for r in tool_runs])
    return out


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 simulated cells × 200 genes, wu2020 and Kang, 3 + 3 epochs; "
                             "prints only (unless --output-dir is given)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per tool (default 1)")
    parser.add_argument("--data-sets", default=None, metavar="NAME[,NAME...]",
                        help="run only these data sets (simulated, wu2020, kang_ifnb); the "
                             "results go to family_NAME[_NAME...].{json,md} instead of "
                             "family.{json,md}")
    parser.add_argument("--no-integration", action="store_true",
                        help="skip the integration metrics")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where to write family.json/.md (default {RESULTS_DIR})")
    # Internal: one worker run.
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--arrays", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-key", help=argparse.SUPPRESS)
    parser.add_argument("--scvi-epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scanvi-epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return None, None, args
    data_sets = Settings.data_sets
    if args.quick:
        data_sets = (DataSet("simulated", "batch", "cell_type", 3, 3, n_cells=1000, n_genes=200),
                     DataSet("wu2020", "patient", "cluster_orig", 3, 3),
                     DataSet("kang_ifnb", "condition", "cell_type", 3, 3,
                             drop_truth=("unassigned",)))
    if args.data_sets:
        wanted = args.data_sets.split(",")
        unknown = sorted(set(wanted) - {spec.name for spec in data_sets})
        if unknown:
            parser.error(f"unknown data set(s) {', '.join(unknown)}; known: "
                         f"{', '.join(spec.name for spec in data_sets)}")
        data_sets = tuple(spec for spec in data_sets if spec.name in wanted)
    settings = Settings(data_sets=data_sets, repeats=args.repeats or 1,
                        integration=not args.no_integration)
    output = args.output_dir or (None if args.quick else RESULTS_DIR)
    return settings, output, args


def main(argv=None) -> Optional[dict[str, Any]]:
    import anndata as ad
    import pandas as pd

    from lvmzoo.io import to_json

    settings, output, args = parse_args(argv)
    if settings is None:
        worker_main(args)
        return None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    machine = machine_info()
    cache = Path(tempfile.mkdtemp(prefix="bench_family_"))
    results = []
    try:
        for spec in settings.data_sets:
            path, info = prepare_data(spec, cache)
            adata = ad.read_h5ad(path)
            runs = {tool: [] for tool in TOOLS}
            latents = {}
            for repeat in range(settings.repeats):
                order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
                for tool in order:
                    run, arrays = launch(tool, path, info, repeat, cache, settings)
                    run["labels"] = label_metrics(adata, spec.truth_key, arrays)
                    runs[tool].append(run)
                    latents.setdefault(repeat, {})[tool] = arrays
                    print(f"{spec.name:>10s} repeat {repeat} {tool:10s} accuracy "
                          f"{run['labels']['accuracy']:.3f} ECE {run['labels']['ece']:.3f} "
                          f"SCANVI epoch {run['scanvi']['steady_epoch_seconds']:.3f} s, scVI "
                          f"epoch {run['scvi']['steady_epoch_seconds']:.3f} s", flush=True)
            knn = knn_pca_scores(adata, spec.truth_key)
            entry = {"data": info, "summary": summarise(runs), "runs": runs,
                     "knn_pca_accuracy": next(score["accuracy"] for score in knn
                                              if (score["k"], score["n_pcs"]) == (1, 10)),
                     "knn_pca_best": max(knn, key=lambda score: score["accuracy"])}
            if settings.integration:
                tables = [integration_table(adata, info, latents[r]) for r in sorted(latents)]
                for r, table in enumerate(tables):
                    print(f"repeat {r}:\n{table.round(3).to_string()}", flush=True)
                median = pd.concat(tables).groupby(level=0, sort=False).median()
                entry["integration"] = median.reset_index().to_dict(orient="list")
                entry["integration_totals_by_repeat"] = {
                    name: [float(t.loc[name, "total"]) for t in tables] for name in median.index}
            results.append(entry)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    report = {
        "benchmark": "family",
        "settings": {**dataclasses.asdict(settings), "batch_size": BATCH_SIZE,
                     "learning_rate": LEARNING_RATE, "adam_eps": ADAM_EPS,
                     "weight_decay": WEIGHT_DECAY, "architecture": ARCHITECTURE,
                     "likelihood": LIKELIHOOD, "label_fraction": LABEL_FRACTION,
                     "label_seed": LABEL_SEED},
        "machine": {**machine, "load_average_at_end": load_average()},
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    stem = "family" if not args.data_sets else "family_" + "_".join(
        spec.name for spec in settings.data_sets)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / f"{stem}.json", to_json(report))
    markdown = render_markdown(report)
    print(markdown)
    if output is not None:
        write_text(output / f"{stem}.md", markdown)
        print(f"wrote {output / stem}.json and {output / stem}.md")
    return report


if __name__ == "__main__":
    main()
