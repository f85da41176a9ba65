"""``lvmzoo perturb`` at scale: the whole command in memory and from disk (issue 21).

Simulated perturbation experiments (``lvmzoo.datasets.simulate_counts`` with
``perturbed_fraction=0.5``: 20 cell types, control and perturbed cells, 2,000
genes; default 50,000 and 200,000 cells), each written once to an ``.h5ad``.  The model is one
epoch of scVI on a 20,000-cell simulation of the same genes, fitted once, not
timed, without the held-out type's perturbed cells::

    lvmzoo fit scvi fit.h5ad --exclude cell_type=type0,condition=perturbed --epochs 1 ...

then, each in a fresh process timed start to exit with its peak resident
memory (``ru_maxrss`` of the only child of a small wrapper, as
``bench_scale.py``'s ``lvmzoo de`` rows)::

    lvmzoo perturb RUN perturbation.h5ad --condition-key condition --control control \\
        --perturbed perturbed --cell-type-key cell_type --predict type0 --out OUT --no-backed
    ... --backed

Both predict the held-out type's control cells (a 40th of the cells) under
the perturbation and score them against its measured perturbed cells; the two
``metrics.csv`` must agree (their largest difference is recorded).  In memory
the command loads the matrix; from disk it reads blocks of contiguous rows.
``--before DIR`` adds, per size, the in-memory command of an earlier lvmzoo
(``git archive COMMIT lvmzoo | tar -x -C DIR``, put first on ``PYTHONPATH``;
``--before-label`` names it in the report).
Outputs ``results/perturb_scale.{json,md}``.

Usage::

    python benchmarks/bench_perturb_scale.py                        # ~20 min on 2 cores
    python benchmarks/bench_perturb_scale.py --cells 20000 --output-dir /tmp/p   # a quick check
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import write_text  # noqa: E402
from bench_scale import RESULT_PREFIX, _lvmzoo, timed_command  # noqa: E402
from bench_scvi import machine_info  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# 20 cell types: the held-out type's control cells, which are decoded with negative binomial
# draws (about 30 ms per cell × 2,000 genes on 2 CPU cores), are 1/40 of the cells.
SIMULATION = dict(n_genes=2000, n_cell_types=20, n_batches=2, perturbed_fraction=0.5,
                  n_response_genes=50, seed=0)
FIT_CELLS = 20_000
DESIGN = ("--condition-key", "condition", "--control", "control", "--perturbed", "perturbed",
          "--cell-type-key", "cell_type", "--predict", "type0")
EXCLUDE = "cell_type=type0,condition=perturbed"


def prepare_main(n_cells: int, path: Path) -> None:
    """Simulate and write ``n_cells`` (run in a process of its own, so its memory goes)."""
    from lvmzoo import datasets

    adata = datasets.simulate_counts(n_cells=n_cells, **SIMULATION)
    adata.obs = adata.obs[["cell_type", "condition", "batch"]].copy()
    adata.obsm.clear()
    adata.varm.clear()
    adata.uns.clear()
    adata.var = adata.var.iloc[:, :0].copy()
    adata.write_h5ad(path)
    held_out = (adata.obs["cell_type"] == "type0").to_numpy()
    control = (adata.obs["condition"] == "control").to_numpy()
    info = {"n_cells": n_cells, "n_genes": adata.n_vars, "nnz": int(adata.X.nnz),
            "density": adata.X.nnz / (adata.n_obs * adata.n_vars),
            "file_mib": path.stat().st_size / 2**20,
            "held_out_control": int((held_out & control).sum()),
            "held_out_perturbed": int((held_out & ~control).sum()),
            "source": "lvmzoo.datasets.simulate_counts(n_cells={}, {})".format(
                n_cells, ", ".join(f"{k}={v}" for k, v in SIMULATION.items()))}
    print(RESULT_PREFIX + json.dumps(info), flush=True)


def prepare(n_cells: int, path: Path) -> dict[str, Any]:
    if path.exists() and path.with_suffix(".json").exists():
        return json.loads(path.with_suffix(".json").read_text())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--prepare", str(n_cells), "--data",
                           str(path)], capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"simulating {n_cells} cells failed:\n{done.stderr[-3000:]}")
    info = {**json.loads(lines[-1][len(RESULT_PREFIX):]),
            "prepare_seconds": time.perf_counter() - started}
    path.with_suffix(".json").write_text(json.dumps(info))
    return info


def run_perturb(run_dir: Path, path: Path, mode: str, out: Path,
                before: Path | None = None) -> dict[str, Any]:
    """One ``lvmzoo perturb`` (``mode``: ``"in memory"``, ``"backed"``, or ``"before"``: in
    memory with the lvmzoo of ``before``, which takes no --backed)."""
    import pandas as pd

    command = [_lvmzoo(), "perturb", str(run_dir), str(path), *DESIGN, "--out", str(out)]
    command += {"in memory": ["--no-backed"], "backed": ["--backed"], "before": []}[mode]
    saved = dict(os.environ)
    if mode == "before":
        os.environ["PYTHONPATH"] = str(before)
    try:
        result = timed_command(command, timeout=3 * 3600)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"mode": mode, "wall_seconds": result["seconds"],
            "peak_rss_mib": result["peak_rss_mib"],
            "command": " ".join(["lvmzoo", *command[1:]]),
            "metrics": pd.read_csv(out / "metrics.csv", index_col=0)}


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# `lvmzoo perturb` at scale: in memory and from disk",
        "",
        "Written by `benchmarks/bench_perturb_scale.py`. The whole command in a fresh process, "
        "start to exit; peak RSS is `ru_maxrss` of that process (the only child of a small "
        "wrapper). The model:",
        "",
        "```bash",
        report["fit"]["command"],
        "lvmzoo perturb RUN perturbation.h5ad " + " ".join(DESIGN) + " --out OUT --backed"
        "   # or --no-backed",
        "```",
        "",
        "| cells × genes | file MiB | mode | wall s | peak RSS MiB | metrics.csv vs in memory |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in report["rows"]:
        same = ("–" if r["mode"] == "in memory" else
                f"max abs diff {r['metrics_max_abs_diff']:.1e}")
        lines.append(f"| {r['n_cells']:,} × {r['n_genes']:,} | {r['file_mib']:,.0f} | "
                     f"{r['mode']} | {r['wall_seconds']:.1f} | {r['peak_rss_mib']:,.0f} | "
                     f"{same} |")
    if report.get("before"):
        lines += ["", f"*before*: the in-memory command with an earlier lvmzoo "
                      f"({report['before']}, first on PYTHONPATH), which reads DATA whole and "
                      "has no --backed."]
    lines += ["", "Data (each held-out type0: its control cells predicted, its measured "
                  "perturbed cells scored against):", ""]
    lines += [f"* {d['n_cells']:,} × {d['n_genes']:,} ({d['file_mib']:,.0f} MiB, "
              f"{d['density']:.0%} non-zero): {d['source']}; {d['held_out_control']:,} "
              f"predicted, {d['held_out_perturbed']:,} measured" for d in report["data"]]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; Python "
        f"{m['python']}, jax {m['versions']['jax']}, anndata {m['versions']['anndata']}; "
        f"{m['date']}; 1-min load average {m['load_average_at_start'][0]} at the start (other "
        "processes shared the cores: wall times are upper bounds; peak RSS does not depend on "
        "the load).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="50000,200000",
                        help="comma-separated numbers of cells (default %(default)s)")
    parser.add_argument("--before", type=Path, default=None,
                        help="a directory holding an earlier lvmzoo package: adds its in-memory "
                             "command per size")
    parser.add_argument("--before-label", default=None,
                        help="what --before holds, for the report (default: its path)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-data", type=Path, default=None,
                        help="write (or reuse) the files and the model in this directory")
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare_main(args.prepare, args.data)
        return
    machine = machine_info()
    directory = args.keep_data or Path(tempfile.mkdtemp(prefix="bench_perturb_"))
    directory.mkdir(parents=True, exist_ok=True)
    fit_path = directory / "fit.h5ad"
    prepare(FIT_CELLS, fit_path)
    run_dir = directory / "run"
    fit_command = [_lvmzoo(), "fit", "scvi", str(fit_path), "--exclude", EXCLUDE, "--epochs",
                   "1", "--validation-fraction", "0", "--no-progress", "--per-gene-outputs",
                   "none", "--score-cells", "100", "--out", str(run_dir)]
    if not (run_dir / "model").is_dir():
        timed_command(fit_command, timeout=3600)
    modes = ["in memory", "backed"] + (["before"] if args.before else [])
    data, rows = [], []
    for n_cells in (int(n) for n in args.cells.split(",")):
        path = directory / f"perturbation_{n_cells}.h5ad"
        data.append(prepare(n_cells, path))
        for mode in modes:
            out = directory / f"{n_cells}_{mode.replace(' ', '_')}"
            row = run_perturb(run_dir, path, mode, out, args.before)
            row.update(n_cells=n_cells, n_genes=data[-1]["n_genes"],
                       file_mib=data[-1]["file_mib"],
                       command=row["command"].replace(str(directory) + "/", ""))
            rows.append(row)
            print(f"{n_cells:>9,} {mode:9s} wall {row['wall_seconds']:7.1f} s peak "
                  f"{row['peak_rss_mib']:7,.0f} MiB", flush=True)
        first = rows[-len(modes)]["metrics"]
        for row in rows[-len(modes):]:
            row["metrics_max_abs_diff"] = float((row["metrics"] - first).abs().max().max())
    for row in rows:
        del row["metrics"]
    report = {"machine": machine, "data": data, "rows": rows,
              "fit": {"command": " ".join(["lvmzoo", *fit_command[1:]]).replace(
                  str(directory) + "/", "")},
              "before": (args.before_label or str(args.before)) if args.before else None}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.output_dir / "perturb_scale.json", json.dumps(report, indent=2) + "\n")
    write_text(args.output_dir / "perturb_scale.md", render_markdown(report))
    print(f"wrote {args.output_dir}/perturb_scale.{{json,md}}")


if __name__ == "__main__":
    main()
