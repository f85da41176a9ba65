"""First-run defaults: wall time of the README's first command, cold and warm, and what the
new defaults (epochs rule, early stopping, KL warm-up within the fit) do to scVI.

Part 1, *first run*: fresh processes, as a user runs them, each timed from start to exit:

* ``lvmzoo fit ppca --out DIR`` with an empty compilation cache (cold) and again (warm);
* the same for ``lvmzoo fit scvi --out DIR`` (its default epochs and early stopping);
* the peer: a Python process that reads the same bundled file, applies the same
  ``log1p(1e4 x / total)`` transform and fits scikit-learn's ``PCA(10)``;
* scVI before / after: the old defaults (100 epochs, no early stopping, a 400-epoch
  KL warm-up) against the new ones, same split and seed; held-out log-likelihood
  (importance sampled, 100 samples, the CLI's ``metrics.json``) and wall time.

Part 2, *warm-up*: scVI on a multi-batch data set with scvi-tools' 400-epoch warm-up and
with the new default (a quarter of the fit's epochs), everything else at its default:
held-out log-likelihood, batch mixing (share of each cell's 30 nearest neighbours in the
latent from another batch, divided by that share if neighbours were drawn at random) and
label purity (share of the 30 neighbours with the cell's own label).

Usage::

    python benchmarks/bench_defaults.py               # writes results/defaults.{json,md}
    python benchmarks/bench_defaults.py --quick       # small settings, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import hardware, load_average, write_text  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

SKLEARN_PROCESS = """
import time
started = time.perf_counter()
from importlib import resources
import anndata as ad, numpy as np
from sklearn.decomposition import PCA
with resources.as_file(resources.files("lvmzoo") / "data" / "files" / "mouse_10x_10k.h5ad") as p:
    adata = ad.read_h5ad(p)
x = adata.X.toarray()
x = np.log1p(1e4 * x / x.sum(1, keepdims=True))
PCA(10).fit(x)
"""


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "stdout": done.stdout[-2000:]}


def _fit_run(model: str, out: Path, extra: list[str], env, cwd) -> dict[str, Any]:
    lvmzoo = str(Path(sys.executable).parent / "lvmzoo")
    run = _timed([lvmzoo, "fit", model, "--out", str(out), "--no-progress", *extra], env, cwd)
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "seconds": run["seconds"],
        "epochs_run": len(history["epoch"]),
        "stop_reason": history.get("stop_reason", "epoch_limit"),
        "compile_seconds": history["compile_seconds"],
        "fit_seconds": float(sum(history["seconds"])),
        "train_ll": metrics["train"]["avg_log_likelihood"],
        "held_out_ll": (metrics["validation"] or {}).get("avg_log_likelihood"),
        "summary": run["stdout"].strip().splitlines(),
    }


def first_run(quick: bool) -> dict[str, Any]:
    """Part 1: cold / warm CLI wall times against a scikit-learn process; scVI before/after."""
    work = Path(tempfile.mkdtemp(prefix="lvmzoo-defaults-"))
    env = {**os.environ, "LVMZOO_CACHE_DIR": str(work / "cache")}
    # As on a plain `pip install -e .`: umap-learn (a dev/notebook extra) is hidden behind
    # a `umap` module that fails to import, so latent.png uses principal components
    # (with umap-learn the first run also pays about a minute of numba compilation).
    hidden = work / "plain_install"
    (hidden / "umap").mkdir(parents=True)
    (hidden / "umap" / "__init__.py").write_text(
        'raise ImportError("umap-learn hidden by bench_defaults.py")\n')
    with_umap = dict(env)  # the same install with umap-learn (the test / integration extras)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH")]))
    out: dict[str, Any] = {}
    out["sklearn_pca_process"] = _timed([sys.executable, "-c", SKLEARN_PROCESS], env, work)[
        "seconds"]
    print(f"sklearn PCA process: {out['sklearn_pca_process']:.1f} s", flush=True)
    for model, extra in (("ppca", []), ("scvi", ["--epochs", "5"] if quick else [])):
        for label in ("cold", "warm"):
            key = f"{model}_{label}"
            out[key] = _fit_run(model, work / key, extra, env, work)
            print(f"{key}: {out[key]['seconds']:.1f} s ({out[key]['stop_reason']}, "
                  f"{out[key]['epochs_run']} epochs, compile {out[key]['compile_seconds']:.1f} s)",
                  flush=True)
    import importlib.util

    if importlib.util.find_spec("umap") is None:
        print("umap-learn is not installed: no rows with it", flush=True)
    else:
        # The same first command once umap-learn is installed (cache: the warm runs' own),
        # and once with the UMAP view asked for.
        for key, extra in (("ppca_cold_umap_installed", []), ("ppca_warm_umap_installed", []),
                           ("ppca_warm_umap_requested", ["--plot-method", "umap"])):
            environment = dict(with_umap)
            if key.startswith("ppca_cold"):
                environment["LVMZOO_CACHE_DIR"] = str(work / "cache_umap")
            elif key == "ppca_warm_umap_installed":
                environment["LVMZOO_CACHE_DIR"] = str(work / "cache_umap")
            out[key] = _fit_run("ppca", work / key, extra, environment, work)
            print(f"{key}: {out[key]['seconds']:.1f} s", flush=True)
    old = ["--epochs", "5" if quick else "100", "--no-early-stopping", "--kl-warmup", "400"]
    out["scvi_old_defaults"] = _fit_run("scvi", work / "scvi_old", old, env, work)
    print(f"scvi old defaults: {out['scvi_old_defaults']['seconds']:.1f} s, held-out "
          f"{out['scvi_old_defaults']['held_out_ll']:.2f}", flush=True)
    return out


def _neighbour_scores(latent, batches, labels, k: int = 30) -> dict[str, float]:
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(latent) - 1)
    index = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)[1][:, 1:]
    other_batch = (batches[index] != batches[:, None]).mean()
    shares = np.unique(batches, return_counts=True)[1] / len(batches)
    expected = 1.0 - np.sum(shares**2)  # chance that a random other cell is from another batch
    purity = (labels[index] == labels[:, None]).mean() if labels is not None else float("nan")
    return {"batch_mixing": float(other_batch / expected), "label_purity": float(purity)}


def warmup(quick: bool, dataset: str) -> dict[str, Any]:
    """Part 2: scVI with a 400-epoch warm-up and with the default, on a multi-batch data set."""
    import lvmzoo
    from lvmzoo import datasets
    from lvmzoo.models import SCVI

    adata = datasets.load(dataset)
    batch_key, labels_key = {"wu2020": ("patient", "cluster_orig"),
                             "kang_ifnb": ("condition", "cell_type")}[dataset]
    data = lvmzoo.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
    rows = {}
    for label, warmup_epochs in (("warm-up 400 epochs (scvi-tools)", 400), ("warm-up auto", "auto")):
        model = SCVI(n_epochs_kl_warmup=warmup_epochs)
        started = time.perf_counter()
        fitted = lvmzoo.fit(model, data, epochs=5 if quick else None, validation_fraction=0.1,
                            seed=0, progress=False)
        seconds = time.perf_counter() - started
        held = data.subset(fitted.validation_index)
        latent = fitted.latent(data)
        scores = _neighbour_scores(latent, data.batch, data.labels)
        rows[label] = {
            "n_epochs_kl_warmup": warmup_epochs,
            "epochs_run": len(fitted.history["epoch"]),
            "max_epochs": fitted.history["max_epochs"],
            "stop_reason": fitted.history["stop_reason"],
            "seconds": seconds,
            "held_out_ll": fitted.evaluate(held, n_samples=100)["avg_log_likelihood"],
            **scores,
        }
        print(f"{dataset} {label}: {rows[label]}", flush=True)
    return {"dataset": dataset, "batch_key": batch_key, "labels_key": labels_key,
            "n_cells": data.n_cells, "n_genes": data.n_genes, "rows": rows}


def render_markdown(report: dict[str, Any]) -> str:
    first, m = report["first_run"], report["machine"]
    ratio = lambda s: s / first["sklearn_pca_process"]
    lines = [
        "# First-run defaults",
        "",
        "Wall time of whole processes (start to exit), bundled mouse_10k (9,999 cells × 715 "
        "genes), fresh compilation cache for the cold run, the same cache for the warm one. Peer: "
        "a Python process that reads the same file, applies log1p(1e4 x / total) and fits "
        "scikit-learn's PCA(10).",
        "",
        "| command | wall s | × sklearn process | epochs run | stop | compile s | held-out LL |",
        "|---|---|---|---|---|---|---|",
        f"| sklearn PCA(10) process | {first['sklearn_pca_process']:.1f} | 1 | | | | |",
    ]
    for key, name in (("ppca_cold", "lvmzoo fit ppca (cold cache)"),
                      ("ppca_warm", "lvmzoo fit ppca (warm cache)"),
                      ("scvi_cold", "lvmzoo fit scvi (cold cache)"),
                      ("scvi_warm", "lvmzoo fit scvi (warm cache)"),
                      ("scvi_old_defaults", "lvmzoo fit scvi, old defaults (100 epochs, "
                                            "400-epoch warm-up, no early stopping; warm)"),
                      ("ppca_cold_umap_installed", "lvmzoo fit ppca, umap-learn installed "
                                                   "(cold cache)"),
                      ("ppca_warm_umap_installed", "lvmzoo fit ppca, umap-learn installed "
                                                   "(warm cache)"),
                      ("ppca_warm_umap_requested", "lvmzoo fit ppca --plot-method umap "
                                                   "(warm cache)")):
        if key not in first:
            continue
        r = first[key]
        held = "" if r["held_out_ll"] is None else f"{r['held_out_ll']:.2f}"
        lines.append(f"| {name} | {r['seconds']:.1f} | {ratio(r['seconds']):.1f} "
                     f"| {r['epochs_run']} | {r['stop_reason']} | {r['compile_seconds']:.1f} "
                     f"| {held} |")
    new, old = first["scvi_warm"]["held_out_ll"], first["scvi_old_defaults"]["held_out_ll"]
    lines += ["", f"scVI held-out log-likelihood, new defaults vs old: {new:.2f} vs {old:.2f} "
              f"({100 * (new - old) / abs(old):+.2f} %)."]
    w = report.get("warmup")
    if w:
        lines += ["", f"## KL warm-up on a multi-batch data set: {w['dataset']} "
                  f"({w['n_cells']:,} cells × {w['n_genes']:,} genes, batch = {w['batch_key']}, "
                  f"labels = {w['labels_key']})", "",
                  "Batch mixing: share of the 30 nearest neighbours (in the latent) from another "
                  "batch, over that share at random (1 = perfectly mixed). Label purity: share of "
                  "the 30 neighbours with the cell's own label.", "",
                  "| warm-up | epochs run / max | stop | held-out LL | batch mixing | label purity "
                  "| seconds |", "|---|---|---|---|---|---|---|"]
        for name, r in w["rows"].items():
            lines.append(f"| {name} | {r['epochs_run']} / {r['max_epochs']} | {r['stop_reason']} "
                         f"| {r['held_out_ll']:.2f} | {r['batch_mixing']:.3f} "
                         f"| {r['label_purity']:.3f} | {r['seconds']:.0f} |")
    load = m.get("load_average_at_start")
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
              f"Python {m['python']}; {m['date']}"
              + (f"; load average at start {load[0]}" if load else "")
              + f". Benchmark wall time {report['wall_seconds']:.0f} s. In the first rows "
              "umap-learn was hidden from the `lvmzoo` processes (a `umap` module raising "
              "ImportError on `PYTHONPATH`), as on a plain `pip install -e .`; the 'umap-learn "
              "installed' rows are the same command with it importable (the test and "
              "integration extras bring it). `latent.png` uses PCA of the latent unless "
              "`--plot-method umap` is given, so an installed umap-learn costs nothing by "
              "default; asked for, UMAP (of at most 20,000 cells) adds its numba compilation.",
              ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs; prints only")
    parser.add_argument("--warmup-dataset", default="kang_ifnb",
                        help="bundled multi-batch data set of part 2 (default: %(default)s; "
                             "wu2020 also works)")
    parser.add_argument("--skip-warmup", action="store_true", help="only part 1")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where to write defaults.json/.md (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = hardware()
    report: dict[str, Any] = {"benchmark": "defaults", "machine": machine, "quick": args.quick}
    report["first_run"] = first_run(args.quick)
    if not args.skip_warmup:
        report["warmup"] = warmup(args.quick, args.warmup_dataset)
    report["machine"]["load_average_at_end"] = load_average()
    report["wall_seconds"] = time.perf_counter() - started
    markdown = render_markdown(report)
    print(markdown)
    output = args.output_dir or (None if args.quick else RESULTS_DIR)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "defaults.json", json.dumps(report, indent=2) + "\n")
        write_text(output / "defaults.md", markdown)
        print(f"wrote {output / 'defaults.json'} and {output / 'defaults.md'}")
    return report


if __name__ == "__main__":
    main()
