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

Differential expression (issue 21), after the epoch rows: the whole ``lvmzoo de``
command as a user runs it, timed from start to exit with the peak resident
memory of its process (``ru_maxrss`` of the only child of a small wrapper), on
the same files::

    lvmzoo de RUN DATA --groupby batch --group1 batch0 --out de.csv --backed | --no-backed

(vanilla mode, 5,000 posterior samples per group, seed 0) for 100 k cells in
memory and from disk and 1 M cells from disk (``--de-rows``).  ``RUN`` is one
epoch of ``lvmzoo fit scvi`` on the 100 k file (``--backed``, no validation
split; DE needs the model's genes and batches, which every size shares), fitted
once and not timed.  Target: peak RSS of ``lvmzoo de --backed`` on 1 M cells
< 2 GiB.  Outputs ``results/de_scale.{json,md}``; ``--de only`` runs just these
rows (and leaves ``scale.*`` alone), ``--de skip`` leaves them out.

The whole ``lvmzoo fit scvi`` command (issue 24), last: wall time and peak resident
memory of ``lvmzoo fit scvi DATA --epochs 1 --validation-fraction 0 --no-progress
--out RUN`` with its default outputs, in memory and ``--backed``, beside the fit's
own time (epoch + compilation), at ``--cli-sizes`` (default 10 k, 100 k, 1 M) on the
same files: ``bench_cli_scale.py``'s measurement, run from here.  Targets: wall ≤ 2 ×
(fit + compile); peak RSS in memory ≤ 1.5 × the matrix, ``--backed`` ≤ 2 GiB.
Outputs ``results/cli_scale.{json,md}``; ``--cli only`` runs just these rows (and
leaves ``scale.*`` alone), ``--cli skip`` leaves them out.

Usage::

    python benchmarks/bench_scale.py                          # 10k, 100k, 1M: ~40 min on 2 quiet cores
    python benchmarks/bench_scale.py --sizes 10000 --output-dir /tmp/scale   # a quick check
    python benchmarks/bench_scale.py --de only --keep-data /tmp/scale_data   # DE rows only
    python benchmarks/bench_scale.py --cli only --de skip --cli-sizes 10000,200000 \
        --keep-data /tmp/scale_data                                        # CLI rows only
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
# lvmzoo de rows (issue 21): (cells, from disk), the cells of the model they use, the target.
DE_ROWS = ((100_000, False), (100_000, True), (1_000_000, True))
DE_FIT_CELLS = 100_000
DE_PEAK_RSS_TARGET_MIB = 2048
DE_COMMAND = ("--groupby", "batch", "--group1", "batch0")


@dataclasses.dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    epochs: tuple[int, ...] = (4, 2, 2)
    gene_sweep: tuple[int, ...] = (1000, 4000)  # extra gene counts, at the smallest size
    variants: tuple[str, ...] = VARIANTS
    memory_share: float = 0.8
    worker_timeout: float = 4 * 3600.0
    torch_threads: int = os.cpu_count() or 1
    de: str = "include"  # lvmzoo de rows: include, only, skip
    de_rows: tuple[tuple[int, bool], ...] = DE_ROWS
    cli: str = "include"  # lvmzoo fit (the whole command) rows: include, only, skip
    cli_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)


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


def prepare_tiled(n_cells: int, base: Path, path: Path) -> None:
    """``n_cells`` cells written as copies of the cells of ``base``, in bounded memory.

    For a machine without the ~6 GiB free that simulating a million cells at
    once takes: the file has the same genes, batches, density and layout on
    disk (CSR, rows appended in place); the cells are ``base``'s repeated
    (renamed ``cell0``..), which is all a benchmark of reading and memory
    needs.  Recorded in the sidecar JSON's ``source``.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    cells = ad.read_h5ad(base)
    copies, rest = divmod(n_cells, cells.n_obs)
    if rest:
        raise ValueError(f"{n_cells} is not a multiple of the {cells.n_obs} cells of {base}")
    obs = pd.concat([cells.obs] * copies)
    obs.index = pd.Index([f"cell{i}" for i in range(n_cells)])
    ad.AnnData(X=cells.X, obs=cells.obs, var=cells.var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        x = sparse_dataset(f["X"])
        for _ in range(copies - 1):
            x.append(cells.X)
        del f["obs"]
        write_elem(f, "obs", obs)
    nnz = int(cells.X.nnz) * copies
    info = {"n_cells": n_cells, "n_genes": cells.n_vars, "nnz": nnz,
            "density": nnz / (n_cells * cells.n_vars), "file_mib": path.stat().st_size / 2**20,
            "source": f"the {cells.n_obs:,} cells of {base.name} repeated {copies} times "
                      f"(bench_scale.py --prepare {n_cells} --tile-from {base.name})"}
    path.with_suffix(".json").write_text(json.dumps(info))
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
# lvmzoo de: the whole command, in a fresh process under a small wrapper
# --------------------------------------------------------------------------

# ru_maxrss of the children is that of the only child, lvmzoo (Linux carries a
# parent's peak across fork + exec, so the wrapper must stay small: it is).
TIMED = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"returncode": done.returncode, "seconds": time.perf_counter() - started,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stdout": done.stdout[-4000:], "stderr": done.stderr[-4000:]}))
"""


def timed_command(command: list[str], timeout: float) -> dict[str, Any]:
    """``{"seconds", "peak_rss_mib", "stdout", "stderr"}`` of ``command`` run start to exit."""
    done = subprocess.run([sys.executable, "-c", TIMED, *command], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result['stderr'][-3000:]}")
    return {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_kib"] / 1024,
            "stdout": result["stdout"], "stderr": result["stderr"]}


def _lvmzoo() -> str:
    return str(Path(sys.executable).parent / "lvmzoo")


def fit_for_de(path: Path, run_dir: Path, timeout: float) -> dict[str, Any]:
    """The scVI run DE uses: one epoch from disk, no validation split, few cells scored."""
    command = [_lvmzoo(), "fit", "scvi", str(path), "--epochs", "1", "--validation-fraction",
               "0", "--no-progress", "--backed", "--per-gene-outputs", "none",
               "--score-cells", "100", "--out", str(run_dir)]
    result = timed_command(command, timeout)
    return {"command": " ".join(["lvmzoo", *command[1:]]), "seconds": result["seconds"],
            "peak_rss_mib": result["peak_rss_mib"]}


def run_de(run_dir: Path, path: Path, backed: bool, out: Path, timeout: float) -> dict[str, Any]:
    import pandas as pd

    command = [_lvmzoo(), "de", str(run_dir), str(path), *DE_COMMAND, "--out", str(out),
               "--backed" if backed else "--no-backed"]
    load = load_average()
    result = timed_command(command, timeout)
    table = pd.read_csv(out, index_col=0)
    top = table.sort_values("bayes_factor", ascending=False).head(5)
    return {"wall_seconds": result["seconds"], "peak_rss_mib": result["peak_rss_mib"],
            "n_genes_tested": int(len(table)), "top_genes": list(map(str, top.index)),
            "top_bayes_factors": [float(b) for b in top["bayes_factor"]],
            "command": " ".join(["lvmzoo", *command[1:]]), "load_average_at_start": load}


def run_de_rows(settings: Settings, paths: dict[int, Path], directory: Path,
                infos: dict[int, dict[str, Any]], keep: bool) -> dict[str, Any]:
    """Fit the model once (not timed), then every ``lvmzoo de`` row in its own process.

    Under ``--keep-data`` a model fitted by an earlier run (``de_run/`` beside
    the files) is reused.
    """
    run_dir = directory / "de_run"
    record = directory / "de_run.json"
    if keep and (run_dir / "model").is_dir() and record.is_file():
        fit = {**json.loads(record.read_text()), "reused": True}
    else:
        fit = fit_for_de(paths[DE_FIT_CELLS], run_dir, settings.worker_timeout)
        record.write_text(json.dumps(fit))
    print(f"de model: {fit['command']} ({fit['seconds']:.0f} s)", flush=True)
    rows = []
    for n_cells, backed in settings.de_rows:
        info = infos[n_cells]
        row = {"n_cells": n_cells, "n_genes": GENES, "mode": "backed" if backed else "in memory",
               "file_mib": info["file_mib"],
               "data_in_memory_mib": (info["nnz"] * 8 + (n_cells + 1) * 8) / 2**20}
        try:
            row.update(run_de(run_dir, paths[n_cells], backed, directory / "de.csv",
                              settings.worker_timeout))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            row["failed"] = str(err).strip().splitlines()[-1:] or ["?"]
            print(f"{n_cells:>9,} de {row['mode']:9s} FAILED {row['failed']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        print(f"{n_cells:>9,} de {row['mode']:9s} wall {row['wall_seconds']:7.1f} s peak "
              f"{row['peak_rss_mib']:7,.0f} MiB [load {row['load_average_at_start'][0]}]",
              flush=True)
    big = [r for r in rows if r["n_cells"] == 1_000_000 and r["mode"] == "backed"
           and "peak_rss_mib" in r]
    target = ({"backed_peak_rss_1m_mib": big[0]["peak_rss_mib"],
               "backed_peak_rss_1m_met": big[0]["peak_rss_mib"] < DE_PEAK_RSS_TARGET_MIB}
              if big else {})
    return {"model": fit, "rows": rows, "targets": target}


def render_de_markdown(report: dict[str, Any]) -> str:
    m, de = report["machine"], report["de"]
    lines = [
        "# `lvmzoo de` at scale: 100 k cells in memory and from disk, 1 M cells from disk",
        "",
        "Written by `benchmarks/bench_scale.py` (`--de only` for these rows alone). The whole "
        "command, in a fresh process, start to exit; peak RSS is `ru_maxrss` of that process "
        "(the only child of a small wrapper). Simulated counts × 2,000 genes, 33 % non-zero "
        "(the files are described under Data, below); vanilla mode, 5,000 posterior samples "
        "per group, batch-corrected, seed 0:",
        "",
        "```bash",
        de["model"]["command"].replace(str(Path(report["data_directory"])) + "/", ""),
        f"lvmzoo de RUN simulated_Nx2000.h5ad {' '.join(DE_COMMAND)} --out de.csv "
        "--backed   # or --no-backed",
        "```",
        "",
        f"The model (one epoch of scVI from disk on {DE_FIT_CELLS:,} cells, fitted once, "
        f"{de['model']['seconds']:.0f} s, not part of the rows) is the same for every row: "
        "DE needs its genes and batches, which every file shares. In memory, `lvmzoo de` "
        "loads the matrix; from disk (`--backed`) it reads only the cells drawn for the "
        "posterior samples and accumulates the raw group means block by block.",
        "",
        "| cells × genes | mode | file MiB | matrix in memory MiB | wall s | peak RSS MiB "
        "| target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in de["rows"]:
        head = (f"| {r['n_cells']:,} × {r['n_genes']:,} | {r['mode']} | {r['file_mib']:,.0f} "
                f"| {r['data_in_memory_mib']:,.0f} ")
        if "wall_seconds" not in r:
            lines.append(head + f"| failed: {r['failed']} | | |")
            continue
        target = ""
        if r["n_cells"] == 1_000_000 and r["mode"] == "backed":
            met = r["peak_rss_mib"] < DE_PEAK_RSS_TARGET_MIB
            target = f"< {DE_PEAK_RSS_TARGET_MIB:,} {'✓' if met else '✗ NOT met'}"
        lines.append(head + f"| {r['wall_seconds']:.1f} | {r['peak_rss_mib']:,.0f} | {target} |")
    loads = [r["load_average_at_start"][0] for r in de["rows"] if r.get("load_average_at_start")]
    lines += ["", "Data:", ""]
    lines += [f"* {info['n_cells']:,} × {info['n_genes']:,} ({info['file_mib']:,.0f} MiB): "
              f"{info['source']}" for info in report["data"]]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, jax {m['versions']['jax']}, anndata {m['versions']['anndata']}; "
        f"{m['date']}; 1-min load average {min(loads, default=0):.1f}–"
        f"{max(loads, default=0):.1f} at the start of the rows (other processes shared the "
        "cores: wall times are upper bounds; peak RSS does not depend on the load). No GPU.",
        "",
    ]
    return "\n".join(lines)


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
    if report.get("de"):
        lines += ["", "`lvmzoo de` (the whole command; details in `de_scale.md`):", "",
                  "| cells | mode | wall s | peak RSS MiB |", "|---|---|---|---|"]
        for r in report["de"]["rows"]:
            if "wall_seconds" in r:
                lines.append(f"| {r['n_cells']:,} | {r['mode']} | {r['wall_seconds']:.1f} "
                             f"| {r['peak_rss_mib']:,.0f} |")
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
    parser.add_argument("--de", choices=("include", "only", "skip"), default="include",
                        help="the lvmzoo de rows: after the epoch rows (include), alone "
                             "(only: scale.* is not rewritten), or not at all (default include)")
    parser.add_argument("--de-rows", default=None,
                        help="comma-separated CELLS:memory|backed lvmzoo de rows (default "
                             "100000:memory,100000:backed,1000000:backed)")
    parser.add_argument("--cli", choices=("include", "only", "skip"), default="include",
                        help="the whole 'lvmzoo fit scvi' rows (bench_cli_scale.py): last "
                             "(include), alone (only: scale.* is not rewritten), or not at all "
                             "(default include)")
    parser.add_argument("--cli-sizes", default=None,
                        help="comma-separated numbers of cells of the lvmzoo fit rows, each "
                             "in memory and --backed (default 10000,100000,1000000)")
    parser.add_argument("--keep-data", type=Path, default=None,
                        help="write (or reuse) the .h5ad files in this directory instead of a "
                             "temporary one")
    # Internal: one worker run, or writing one data set.
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--genes", type=int, default=GENES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tile-from", type=Path, default=None,
                        help="with --prepare N: write N cells as copies of this .h5ad's cells "
                             "(bounded memory) instead of simulating them; put the file in "
                             "--keep-data's directory to have the benchmark use it")
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
    de_rows = DE_ROWS
    if args.de_rows:
        try:
            de_rows = tuple((int(n), {"memory": False, "backed": True}[mode])
                            for n, mode in (item.split(":") for item in args.de_rows.split(",")))
        except (KeyError, ValueError):
            parser.error("--de-rows takes CELLS:memory or CELLS:backed, comma-separated")
    cli_sizes = (tuple(int(n) for n in args.cli_sizes.split(",")) if args.cli_sizes
                 else Settings.cli_sizes)
    return Settings(sizes=sizes, epochs=epochs, gene_sweep=sweep, variants=variants,
                    memory_share=args.memory_share, de=args.de, de_rows=de_rows,
                    cli=args.cli, cli_sizes=cli_sizes), args


def run_cli_rows(settings: Settings, directory: Path, output_dir: Path) -> dict[str, Any]:
    """The whole ``lvmzoo fit scvi`` rows: bench_cli_scale.py's measurement on these files."""
    import bench_cli_scale  # imports this module (prepare): not at the top

    return bench_cli_scale.main([
        "--sizes", ",".join(map(str, settings.cli_sizes)), "--modes", "memory,backed",
        "--data-dir", str(directory), "--output-dir", str(output_dir)])


def _data(n_cells: int, n_genes: int, directory: Path, keep: bool) -> tuple[Path, dict[str, Any]]:
    """The simulated file of ``n_cells`` × ``n_genes``: reused under --keep-data, else written."""
    path = directory / f"simulated_{n_cells}x{n_genes}.h5ad"
    if keep and path.exists() and path.with_suffix(".json").exists():
        return path, json.loads(path.with_suffix(".json").read_text())
    path, info = prepare(n_cells, n_genes, directory)
    print(f"data {n_cells:,} × {n_genes:,}: {info['file_mib']:,.0f} MiB, density "
          f"{info['density']:.2f}, {info['prepare_seconds']:.0f} s", flush=True)
    return path, info


def main(argv=None) -> Optional[dict[str, Any]]:
    settings, args = parse_args(argv)
    if settings is None:
        if args.prepare and args.tile_from:
            prepare_tiled(args.prepare, args.tile_from, args.data)
        elif args.prepare:
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
    if settings.de == "only" or settings.cli == "only":
        plan = []
    runs: list[dict[str, Any]] = []
    data_info = []
    de_report = cli_report = None
    try:
        for n_cells, n_genes, epochs in plan:
            path, info = _data(n_cells, n_genes, directory, args.keep_data is not None)
            data_info.append(info)
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
        if settings.de != "skip" and settings.cli != "only":
            paths, infos = {}, {}
            for n_cells in sorted({n for n, _ in settings.de_rows} | {DE_FIT_CELLS}):
                paths[n_cells], infos[n_cells] = _data(n_cells, GENES, directory,
                                                       args.keep_data is not None)
            de_report = run_de_rows(settings, paths, directory, infos,
                                    args.keep_data is not None)
        if settings.cli != "skip" and settings.de != "only":
            cli_report = run_cli_rows(settings, directory, args.output_dir)
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
    if de_report is not None:
        de_full = {"benchmark": "de_scale", "machine": report["machine"], "de": de_report,
                   "data_directory": str(directory),
                   "data": [infos[n] for n in sorted(infos)],
                   "wall_seconds": report["wall_seconds"]}
        write_text(args.output_dir / "de_scale.json", json.dumps(de_full, indent=2) + "\n")
        de_markdown = render_de_markdown(de_full)
        write_text(args.output_dir / "de_scale.md", de_markdown)
        print(de_markdown)
        print(f"wrote {args.output_dir}/de_scale.{{json,md}}")
        report["de"] = de_report
    if cli_report is not None:
        report["cli"] = cli_report
    if "only" in (settings.de, settings.cli):
        return report
    write_text(args.output_dir / "scale.json", json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    write_text(args.output_dir / "scale.md", markdown)
    render_figure(report, args.output_dir / "scale.png")
    print(markdown)
    print(f"wrote {args.output_dir}/scale.{{json,md,png}}")
    return report


if __name__ == "__main__":
    main()
