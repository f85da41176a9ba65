"""Scale: lvmzoo scVI in memory and out-of-core vs scvi-tools ``SCVI``, 10 k to 1 M cells.

For each size ``N`` (default 10,000, 100,000 and 1,000,000 cells × 2,000
genes, ``lvmzoo.datasets.simulate_counts(n_cells=N, n_genes=2000,
n_batches=2, seed=0)``, written once to a temporary ``.h5ad``), each in a
fresh process:

==================  ========================================================
``lvmzoo``          ``anndata.read_h5ad`` (whole matrix in memory) →
                    ``setup_anndata`` → ``fit`` (the matrix on the device)
``lvmzoo-ooc``      ``read_h5ad(backed="r")`` → ``setup_anndata`` (validates
                    block by block) → ``fit``, streaming the cells from the
                    file (``BlockShuffle()``: blocks of 1,024 cells, windows of
                    16 blocks, read in a background thread)
``scvi-tools``      ``read_h5ad`` → ``SCVI.setup_anndata`` → ``SCVI(...)`` →
                    ``train`` (as ``bench_scvi.py``)
``loader``          the out-of-core loader alone: one epoch of chunks read,
                    assembled and put on the device, no training
==================  ========================================================

The model, optimiser (scvi-tools' Adam settings for both tools, lvmzoo's
full-data gradient divided by ``n_train``), batch size 128, likelihood NB and
KL warm-up are those of ``bench_scvi.py`` (imported from it); every cell
trains (no held-out split) and nothing is scored: this benchmark measures
time and memory.  Per run: seconds per epoch (steady state: the median of
epochs 2..E; compilation is outside every epoch), cells/s, and the peak
resident memory of the process (``VmHWM``), which includes the libraries and,
in memory, the data set; the OS page cache holding the file is not resident
memory of the process.

A variant whose peak memory, extrapolated linearly in ``N`` from the smaller
sizes measured in the same run, would exceed ``--memory-share`` (80 %) of
this machine's available RAM is skipped with that reason recorded (on a
23 GiB machine: lvmzoo in memory at 1 M cells).

Targets: out-of-core peak RSS over 1 M cells < 2 GiB; out-of-core throughput
≥ 80 % of in-memory at 100 k cells; ratios to scvi-tools at every size.
Outputs ``results/scale.{json,md,png}`` (atomically).

Usage::

    python benchmarks/bench_scale.py                          # 10k, 100k, 1M: ~40 min on 2 quiet cores
    python benchmarks/bench_scale.py --sizes 10000 --output-dir /tmp/scale   # a quick check
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
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import load_average, write_text  # noqa: E402
from bench_scvi import (  # noqa: E402  (the same model and optimiser as the scVI benchmark)
    ARCHITECTURE, BATCH_SIZE, _epoch_summary, _peak_rss_mib, _rss_mib, machine_info,
    run_scvi_tools, scvi_tools_adam,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "BENCH_SCALE_RESULT "
VARIANTS = ("lvmzoo", "lvmzoo-ooc", "scvi-tools", "loader")
GENES = 2000
N_BATCHES = 2
LIKELIHOOD = "nb"
# Targets of issue 12.
OOC_PEAK_RSS_TARGET_MIB = 2048
OOC_THROUGHPUT_TARGET = 0.8


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    epochs: tuple[int, ...] = (4, 2, 2)
    gene_sweep: tuple[int, ...] = (1000, 4000)  # extra gene counts, at the smallest size
    variants: tuple[str, ...] = VARIANTS
    memory_share: float = 0.8
    worker_timeout: float = 4 * 3600.0
    torch_threads: int = os.cpu_count() or 1


# --------------------------------------------------------------------------
# Data: written once per size, in a process of its own (1 M cells × 2,000
# genes is ~5 GiB of CSR; the parent stays small)
# --------------------------------------------------------------------------


def prepare(n_cells: int, n_genes: int, directory: Path) -> tuple[Path, dict[str, Any]]:
    path = directory / f"simulated_{n_cells}x{n_genes}.h5ad"
    command = [sys.executable, str(Path(__file__).resolve()), "--prepare", str(n_cells),
               "--genes", str(n_genes), "--data", str(path)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"preparing {n_cells} cells failed:\n{proc.stderr[-4000:]}")
    info = json.loads(lines[-1][len(RESULT_PREFIX):])
    info["prepare_seconds"] = time.perf_counter() - started
    return path, info


def prepare_main(n_cells: int, n_genes: int, path: Path) -> None:
    from lvmzoo import datasets

    adata = datasets.simulate_counts(n_cells=n_cells, n_genes=n_genes, n_batches=N_BATCHES,
                                     seed=0)
    adata.obs = adata.obs[["batch"]].copy()
    adata.obsm.clear()
    adata.uns.clear()
    adata.var = adata.var.iloc[:, :0].copy()
    adata.write_h5ad(path)
    info = {"n_cells": n_cells, "n_genes": n_genes, "nnz": int(adata.X.nnz),
            "density": adata.X.nnz / (n_cells * n_genes),
            "file_mib": path.stat().st_size / 2**20,
            "source": f"lvmzoo.datasets.simulate_counts(n_cells={n_cells}, n_genes={n_genes}, "
                      f"n_batches={N_BATCHES}, seed=0)"}
    path.with_suffix(".json").write_text(json.dumps(info))  # for --keep-data reruns
    print(RESULT_PREFIX + json.dumps(info), flush=True)


# --------------------------------------------------------------------------
# Workers: one variant, one data set, one fresh process
# --------------------------------------------------------------------------


def run_lvmzoo(path: Path, epochs: int, on_disk: bool, seed: int) -> dict[str, Any]:
    import anndata as ad

    import lvmzoo
    from lvmzoo.models import SCVI

    started = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r") if on_disk else ad.read_h5ad(path)
    read_seconds = time.perf_counter() - started
    rss_read = _rss_mib()
    t0 = time.perf_counter()
    data = lvmzoo.setup_anndata(adata, batch_key="batch", kind="counts")
    setup_seconds = time.perf_counter() - t0
    model = SCVI(**ARCHITECTURE, likelihood=LIKELIHOOD, dispersion="gene",
                 n_epochs_kl_warmup=max(1, epochs // 2))
    rss_before = _rss_mib()
    result = lvmzoo.fit(model, data, optimizer=scvi_tools_adam(data.n_cells), epochs=epochs,
                        batch_size=BATCH_SIZE, seed=seed, validation_fraction=0.0,
                        progress=False)
    history = result.history
    out = _epoch_summary([float(s) for s in history["seconds"]],
                         int(history["steps_per_epoch"]) * int(history["batch_size"]))
    out.update({
        "read_seconds": read_seconds, "setup_seconds": setup_seconds,
        "compile_seconds": float(history["compile_seconds"]),
        "rss_after_read_mib": rss_read, "rss_before_train_mib": rss_before,
        "final_train_loss": float(history["loss"][-1]), "diverged": result.diverged,
    })
    return out


def run_loader(path: Path, seed: int) -> dict[str, Any]:
    """One epoch of the out-of-core loader alone: read, assemble, place on the device."""
    import anndata as ad
    import jax

    import lvmzoo
    from lvmzoo.data.placement import Placement
    from lvmzoo.data.streaming import BlockShuffle, StreamingSource

    data = lvmzoo.setup_anndata(ad.read_h5ad(path, backed="r"), batch_key="batch")
    shuffle = BlockShuffle()
    source = StreamingSource(data, shuffle, Placement())
    steps = data.n_cells // BATCH_SIZE
    order = shuffle.order(jax.random.PRNGKey(seed), 0, data.n_cells, steps, BATCH_SIZE)
    started = time.perf_counter()
    n_chunks = 0
    for chunk in source.epoch_inputs(order):
        jax.block_until_ready(chunk)
        n_chunks += 1
    seconds = time.perf_counter() - started
    return {"epoch_seconds": [seconds], "steady_epoch_seconds": seconds,
            "cells_per_epoch": steps * BATCH_SIZE,
            "cells_per_second": steps * BATCH_SIZE / seconds, "n_chunks": n_chunks,
            "steps_per_chunk": source.steps_per_chunk(steps, BATCH_SIZE),
            "format": "dense rows" if source.max_row_nnz is None else
                      f"padded rows ({source.max_row_nnz} entries)"}


def run_scvi(path: Path, epochs: int, seed: int, threads: int) -> dict[str, Any]:
    import anndata as ad

    adata = ad.read_h5ad(path)
    rss_read = _rss_mib()
    args = argparse.Namespace(seed=seed, torch_threads=threads, epochs=epochs,
                              likelihood=LIKELIHOOD, kl_warmup=max(1, epochs // 2), n_samples=0)
    out = run_scvi_tools(adata, None, "batch", args)
    out.update({"rss_after_read_mib": rss_read})
    return out


def worker_main(args) -> None:
    if args.worker == "loader":
        out = run_loader(args.data, args.seed)
    elif args.worker == "scvi-tools":
        out = run_scvi(args.data, args.epochs, args.seed, args.torch_threads)
    else:
        out = run_lvmzoo(args.data, args.epochs, args.worker == "lvmzoo-ooc", args.seed)
    out.update({"variant": args.worker, "epochs": args.epochs, "seed": args.seed,
                "peak_rss_mib": _peak_rss_mib()})
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def launch(variant: str, path: Path, epochs: int, settings: Settings) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
               "--data", str(path), "--epochs", str(epochs),
               "--torch-threads", str(settings.torch_threads)]
    load = load_average()
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          timeout=settings.worker_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "failed": f"exit {proc.returncode}: "
                                              f"{proc.stderr.strip().splitlines()[-1:]}",
                "load_average_at_start": load}
    out = json.loads(lines[-1][len(RESULT_PREFIX):])
    out["process_seconds"] = time.perf_counter() - started
    out["load_average_at_start"] = load
    return out


# --------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**10
    return float("inf")


def predicted_peak_mib(runs: list[dict[str, Any]], variant: str, n_cells: int) -> Optional[float]:
    """Peak RSS at ``n_cells``, a line through the two largest earlier sizes (or ``None``)."""
    points = sorted((r["n_cells"], r["peak_rss_mib"]) for r in runs
                    if r["variant"] == variant and "peak_rss_mib" in r and r["n_genes"] == GENES)
    if len(points) < 2:
        return None
    (n0, m0), (n1, m1) = points[-2:]
    return m1 + (m1 - m0) / (n1 - n0) * (n_cells - n1)


def growth(runs: list[dict[str, Any]], variant: str, key: str) -> Optional[dict[str, float]]:
    """Least-squares ``key ≈ a + b · n_cells`` over the 2,000-gene sizes of ``variant``."""
    points = [(r["n_cells"], r[key]) for r in runs
              if r["variant"] == variant and key in r and r["n_genes"] == GENES]
    if len(points) < 2:
        return None
    n, y = np.array(points, float).T
    b, a = np.polyfit(n, y, 1)
    return {"intercept": float(a), "per_100k_cells": float(b * 1e5), "n_points": len(points)}


def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def find(variant, n):
        for r in runs:
            if r["variant"] == variant and r["n_cells"] == n and r["n_genes"] == GENES \
                    and "steady_epoch_seconds" in r:
                return r
        return None

    out: dict[str, Any] = {}
    big = find("lvmzoo-ooc", 1_000_000)
    if big:
        out["ooc_peak_rss_1m_mib"] = big["peak_rss_mib"]
        out["ooc_peak_rss_1m_met"] = big["peak_rss_mib"] < OOC_PEAK_RSS_TARGET_MIB
    mem, ooc = find("lvmzoo", 100_000), find("lvmzoo-ooc", 100_000)
    if mem and ooc:
        share = ooc["cells_per_second"] / mem["cells_per_second"]
        out["ooc_throughput_share_100k"] = share
        out["ooc_throughput_share_100k_met"] = share >= OOC_THROUGHPUT_TARGET
    ratios = {}
    for n in sorted({r["n_cells"] for r in runs if r["n_genes"] == GENES}):
        scvi = find("scvi-tools", n)
        for variant in ("lvmzoo", "lvmzoo-ooc"):
            ours = find(variant, n)
            if scvi and ours:
                ratios[f"{variant}@{n}"] = scvi["steady_epoch_seconds"] / ours["steady_epoch_seconds"]
    out["epoch_time_ratio_scvi_tools_over"] = ratios
    return out


def render_markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["machine"]["versions"]
    lines = [
        "# Scale: lvmzoo scVI in memory and out-of-core vs scvi-tools",
        "",
        "Simulated counts (`simulate_counts(n_cells=N, n_genes=G, n_batches=2, seed=0)`), "
        "scVI with n_latent 10, n_hidden 128, 1 hidden layer, NB, batch norm, batch size "
        f"{BATCH_SIZE}, scvi-tools' Adam for both; every cell trains. One fresh process per "
        "row. Epoch s: steady-state epoch (median of epochs 2..E; lvmzoo's compilation is "
        "outside every epoch). Peak RSS: `VmHWM` of the process (libraries and, in memory, "
        "the data set; not the OS page cache). `loader`: one epoch of the out-of-core loader "
        "alone (read, assemble, put on the device). **vs scvi-tools** = scvi-tools epoch s / "
        "this epoch s (> 1: faster than scvi-tools).",
        "",
        "| cells | genes | file MiB | variant | epoch s | cells/s | peak RSS MiB | setup s "
        "| compile s | **vs scvi-tools** |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = report["runs"]
    by_size = {}
    for r in runs:
        by_size.setdefault((r["n_cells"], r["n_genes"]), []).append(r)
    for (n, g), rows in sorted(by_size.items(), key=lambda kv: (kv[0][1] != GENES, kv[0])):
        scvi = next((r for r in rows if r["variant"] == "scvi-tools"
                     and "steady_epoch_seconds" in r), None)
        for r in rows:
            head = f"| {n:,} | {g:,} | {r.get('file_mib', 0):,.0f} | {r['variant']} "
            if "steady_epoch_seconds" not in r:
                lines.append(head + f"| {r.get('skipped') or r.get('failed')} | | | | | |")
                continue
            ratio = ""
            if scvi and r["variant"] in ("lvmzoo", "lvmzoo-ooc"):
                ratio = f"**{scvi['steady_epoch_seconds'] / r['steady_epoch_seconds']:.2f}**"
            setup = f"{r['setup_seconds']:.1f}" if "setup_seconds" in r else ""
            compile_ = f"{r['compile_seconds']:.1f}" if "compile_seconds" in r else ""
            lines.append(head + f"| {r['steady_epoch_seconds']:.2f} | "
                         f"{r['cells_per_second']:,.0f} | {r['peak_rss_mib']:,.0f} | {setup} "
                         f"| {compile_} | {ratio} |")
    t = report["targets"]
    lines += ["", "Targets:", ""]
    if "ooc_peak_rss_1m_mib" in t:
        lines.append(f"* out-of-core peak RSS over 1 M cells × {GENES:,} genes: "
                     f"{t['ooc_peak_rss_1m_mib']:,.0f} MiB (target < {OOC_PEAK_RSS_TARGET_MIB:,}: "
                     f"{'met' if t['ooc_peak_rss_1m_met'] else 'NOT met'})")
    else:
        lines.append("* out-of-core peak RSS over 1 M cells: not measured in this run")
    if "ooc_throughput_share_100k" in t:
        lines.append(f"* out-of-core throughput at 100 k cells: "
                     f"{100 * t['ooc_throughput_share_100k']:.0f} % of in-memory (target ≥ "
                     f"{100 * OOC_THROUGHPUT_TARGET:.0f} %: "
                     f"{'met' if t['ooc_throughput_share_100k_met'] else 'NOT met'})")
    else:
        lines.append("* out-of-core vs in-memory throughput at 100 k cells: not measured in "
                     "this run")
    lines += ["", "Growth with cells (least squares over the sizes with "
              f"{GENES:,} genes): value ≈ a + b per 100 k cells.", "",
              "| variant | quantity | a | b per 100 k cells |", "|---|---|---|---|"]
    for variant, fits in report["growth"].items():
        for key, fit in fits.items():
            if fit:
                lines.append(f"| {variant} | {key} | {fit['intercept']:,.1f} "
                             f"| {fit['per_100k_cells']:,.2f} |")
    loads = [r["load_average_at_start"][0] for r in runs if r.get("load_average_at_start")]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, jax {v['jax']}, numpyro {v['numpyro']}, flax {v['flax']}, "
        f"anndata {v['anndata']}, torch {v['torch']}, scvi-tools {v['scvi-tools']}; "
        f"{m['date']}; 1-min load average {min(loads, default=0):.1f}–"
        f"{max(loads, default=0):.1f} at the start of the runs. No GPU. "
        f"Benchmark wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def render_figure(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lvmzoo.io import atomic_write_file

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in report["settings"]["variants"]:
        points = sorted((r["n_cells"], r["steady_epoch_seconds"], r["peak_rss_mib"])
                        for r in report["runs"] if r["variant"] == variant
                        and r["n_genes"] == GENES and "steady_epoch_seconds" in r)
        if not points:
            continue
        n, seconds, rss = np.array(points).T
        axes[0].plot(n, seconds, "o-", label=variant)
        if variant != "loader":
            axes[1].plot(n, rss, "o-", label=variant)
    axes[1].axhline(OOC_PEAK_RSS_TARGET_MIB, color="grey", ls=":", label="2 GiB target")
    for ax, label in zip(axes, ("seconds per epoch", "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"cells (× {GENES:,} genes)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("scVI epoch time and peak memory vs cells (one CPU process)")
    fig.tight_layout()
    atomic_write_file(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None,
                        help="comma-separated numbers of cells (default 10000,100000,1000000)")
    parser.add_argument("--epochs", default=None,
                        help="one number, or one per size (default 4,2,2; at least 2)")
    parser.add_argument("--gene-sweep", default=None,
                        help="extra gene counts measured at the smallest size for the lvmzoo "
                             "variants (default 1000,4000; 'none' skips)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--memory-share", type=float, default=Settings.memory_share,
                        help="skip a run whose extrapolated peak RSS exceeds this share of "
                             "the available RAM (default 0.8)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help=f"where to write scale.json/.md/.png (default {RESULTS_DIR})")
    parser.add_argument("--keep-data", type=Path, default=None,
                        help="write (or reuse) the .h5ad files in this directory instead of a "
                             "temporary one")
    # Internal: one worker run, or writing one data set.
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--genes", type=int, default=GENES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.prepare:
        args.epochs = int(args.epochs or 2)
        return None, args
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else Settings.sizes
    if args.epochs:
        epochs = tuple(int(e) for e in args.epochs.split(","))
    else:
        epochs = tuple(4 if n <= 10_000 else 2 for n in sizes)
    if len(epochs) == 1:
        epochs = epochs * len(sizes)
    if len(epochs) != len(sizes) or min(epochs) < 2:
        parser.error("--epochs needs one value >= 2, or one per size")
    sweep = Settings.gene_sweep if args.gene_sweep is None else (
        () if args.gene_sweep == "none" else tuple(int(g) for g in args.gene_sweep.split(",")))
    variants = tuple(v.strip() for v in args.variants.split(","))
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {set(variants) - set(VARIANTS)}")
    return Settings(sizes=sizes, epochs=epochs, gene_sweep=sweep, variants=variants,
                    memory_share=args.memory_share), args


def main(argv=None) -> Optional[dict[str, Any]]:
    settings, args = parse_args(argv)
    if settings is None:
        if args.prepare:
            prepare_main(args.prepare, args.genes, args.data)
        else:
            worker_main(args)
        return None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    machine = machine_info()
    print(f"load average at start: {machine['load_average_at_start']}", flush=True)
    directory = args.keep_data or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    directory.mkdir(parents=True, exist_ok=True)
    plan = [(n, GENES, e) for n, e in zip(settings.sizes, settings.epochs)]
    plan += [(min(settings.sizes), g, settings.epochs[settings.sizes.index(min(settings.sizes))])
             for g in settings.gene_sweep]
    runs: list[dict[str, Any]] = []
    data_info = []
    try:
        for n_cells, n_genes, epochs in plan:
            path = directory / f"simulated_{n_cells}x{n_genes}.h5ad"
            if args.keep_data and path.exists() and path.with_suffix(".json").exists():
                info = json.loads(path.with_suffix(".json").read_text())
                data_info.append(info)
            else:
                path, info = prepare(n_cells, n_genes, directory)
                data_info.append(info)
                print(f"data {n_cells:,} × {n_genes:,}: {info['file_mib']:,.0f} MiB, density "
                      f"{info['density']:.2f}, {info['prepare_seconds']:.0f} s", flush=True)
            variants = settings.variants if n_genes == GENES else \
                tuple(v for v in settings.variants if v in ("lvmzoo", "lvmzoo-ooc"))
            for variant in variants:
                predicted = predicted_peak_mib(runs, variant, n_cells)
                limit = settings.memory_share * available_mib()
                base = {"n_cells": n_cells, "n_genes": n_genes, "file_mib": info["file_mib"]}
                if predicted is not None and predicted > limit:
                    runs.append({**base, "variant": variant,
                                 "skipped": f"needs ~{predicted / 1024:.0f} GiB "
                                            f"(extrapolated), > {limit / 1024:.0f} GiB allowed"})
                    print(f"{n_cells:>9,} {variant:11s} skipped: {runs[-1]['skipped']}", flush=True)
                    continue
                run = {**base, **launch(variant, path, epochs, settings)}
                runs.append(run)
                if "steady_epoch_seconds" in run:
                    print(f"{n_cells:>9,} × {n_genes:,} {variant:11s} epoch "
                          f"{run['steady_epoch_seconds']:8.2f} s {run['cells_per_second']:9,.0f} "
                          f"cells/s peak {run['peak_rss_mib']:7,.0f} MiB "
                          f"[load {run['load_average_at_start'][0]}]", flush=True)
                else:
                    print(f"{n_cells:>9,} {variant:11s} FAILED {run['failed']}", flush=True)
    finally:
        if args.keep_data is None:
            shutil.rmtree(directory, ignore_errors=True)
    report = {
        "benchmark": "scale",
        "settings": {**dataclasses.asdict(settings), "batch_size": BATCH_SIZE,
                     "architecture": ARCHITECTURE, "likelihood": LIKELIHOOD, "genes": GENES},
        "machine": {**machine, "load_average_at_end": load_average()},
        "data": data_info,
        "runs": runs,
        "growth": {v: {k: growth(runs, v, k) for k in ("steady_epoch_seconds", "peak_rss_mib")}
                   for v in settings.variants},
        "targets": targets(runs),
        "wall_seconds": time.perf_counter() - started,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.output_dir / "scale.json", json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    write_text(args.output_dir / "scale.md", markdown)
    render_figure(report, args.output_dir / "scale.png")
    print(markdown)
    print(f"wrote {args.output_dir}/scale.{{json,md,png}}")
    return report


if __name__ == "__main__":
    main()
