"""Gather the GPU run's outputs into ``$OUT`` (at most 8 files come back from the device).

``python benchmarks/gpu/collect.py WORK OUT --steps "..." --dry-run 0|1`` writes

* ``gpu_scvi.json`` / ``gpu_scvi.md``: ``bench_scvi.py``'s report as written;
* ``gpu_scale.json``: every ``bench_scale.py`` part (``parts``), all their runs in
  one list (``runs``, each with its ``part``), the steps' exit statuses and the
  ratios scvi-tools / lvmzoo of the steady-state epoch time at each size;
* ``gpu_scale.md``: one table of every run and ratio, then each part's own markdown;
* ``gpu_raw.tar.gz``: everything under WORK except the data (figures included).

Missing parts (a step that failed or ran out of time) are named, not fatal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALE_PARTS = ("scale_small", "scale_large", "scale_large_scvi")


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """scvi-tools epoch s / each lvmzoo variant's epoch s, per size (> 1: lvmzoo faster)."""
    out = []
    by = {(r.get("n_cells"), r.get("variant")): r for r in runs if "steady_epoch_seconds" in r}
    for (n, variant), run in sorted(by.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        scvi = by.get((n, "scvi-tools"))
        if variant in ("lvmzoo", "lvmzoo-ooc") and scvi:
            out.append({"n_cells": n, "variant": variant,
                        "epoch_time_ratio_scvi_tools_over_lvmzoo":
                            scvi["steady_epoch_seconds"] / run["steady_epoch_seconds"]})
    return out


def scale_markdown(report: dict[str, Any], parts: dict[str, Any]) -> str:
    machine = next((p["machine"] for p in parts.values() if p), {})
    lines = [
        "# Scale on the GPU: lvmzoo in memory and streamed vs scvi-tools",
        "",
        f"GPU: {machine.get('gpu') or ('none (CPU dry run)' if report['dry_run'] else 'unknown')}; "
        f"{machine.get('cpu')}, "
        f"{machine.get('cores')} cores, {machine.get('ram_gib')} GiB RAM; "
        f"versions {json.dumps(machine.get('versions', {}))}; {machine.get('date')}.",
        f"Steps: {report['steps']}." + (" **Dry run on CPU: tiny sizes, not a result.**"
                                         if report["dry_run"] else ""),
        "",
        "lvmzoo: in memory = the CSR matrix put on the device once, each epoch one chunk "
        "(its cell order); streamed (`lvmzoo-ooc`) = blocks read from the backed .h5ad and "
        "put on the device chunk by chunk while the previous chunk trains; `loader` = one "
        "epoch of those chunks alone. scvi-tools: `SCVI.train(accelerator=...)` on the same "
        "GPU, its own AnnDataLoader. Epoch s: steady state (median of epochs 2..E).",
        "",
        "| part | cells | variant | epochs | epoch s | cells/s | first epoch s | compile s "
        "| peak RSS MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        note = run.get("failed") or run.get("skipped") or run.get("device", "")
        if "steady_epoch_seconds" in run:
            lines.append(
                f"| {run['part']} | {run.get('n_cells', 0):,} | {run['variant']} "
                f"| {run.get('epochs', '')} | {run['steady_epoch_seconds']:.2f} "
                f"| {run['cells_per_second']:,.0f} | {run.get('first_epoch_seconds', float('nan')):.2f} "
                f"| {run.get('compile_seconds') or float('nan'):.1f} "
                f"| {run.get('peak_rss_mib', float('nan')):,.0f} | {note} |")
        else:
            lines.append(f"| {run['part']} | {run.get('n_cells', 0):,} | {run['variant']} "
                         f"| | | | | | | {note} |")
    if report["ratios"]:
        lines += ["", "| cells | lvmzoo variant | **scvi-tools epoch s / lvmzoo epoch s** |",
                  "|---|---|---|"]
        lines += [f"| {r['n_cells']:,} | {r['variant']} "
                  f"| **{r['epoch_time_ratio_scvi_tools_over_lvmzoo']:.2f}** |"
                  for r in report["ratios"]]
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        lines += ["", f"No report from: {', '.join(missing)} (see log.txt)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", default="")
    parser.add_argument("--dry-run", default="0")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run == "1"
    written = []

    scvi = args.work / "scvi"
    for suffix in ("json", "md"):
        if (scvi / f"scvi.{suffix}").exists():
            shutil.copyfile(scvi / f"scvi.{suffix}", args.out / f"gpu_scvi.{suffix}")
            written.append(f"gpu_scvi.{suffix}")
    if not written:
        print("collect: no bench_scvi report")

    parts = {name: load(args.work / name / "scale.json") for name in SCALE_PARTS}
    runs = [{"part": name, **run} for name, part in parts.items() if part
            for run in part.get("runs", [])]
    report = {"benchmark": "scale_gpu", "dry_run": dry, "steps": args.steps,
              "parts": parts, "runs": runs, "ratios": ratios(runs)}
    (args.out / "gpu_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_scale.md").write_text(
        scale_markdown(report, parts) + "".join(
            f"\n---\n\n## {name}\n\n{(args.work / name / 'scale.md').read_text()}"
            for name in SCALE_PARTS if (args.work / name / "scale.md").exists()))
    written += ["gpu_scale.json", "gpu_scale.md"]

    with tarfile.open(args.out / "gpu_raw.tar.gz", "w:gz") as tar:
        for path in sorted(args.work.rglob("*")):
            if path.is_file() and "data" not in path.relative_to(args.work).parts[:1]:
                tar.add(path, arcname=str(path.relative_to(args.work)))
    written.append("gpu_raw.tar.gz")
    print(f"collect: wrote {', '.join(written)} to {args.out}")
    print((args.out / "gpu_scale.md").read_text().split("\n---\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
