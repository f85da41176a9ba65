"""Perturbation prediction on the Kang et al. (2018) interferon-β PBMCs, leave one cell type out.

For every derived cell type with at least ``--min-cells`` cells in each
condition of the bundled ``kang_ifnb`` data (``unassigned`` excluded), the
type's stimulated cells are held out: every method is fitted to the other
cells and predicts them from the type's control cells.  Side by side, on the
same cells and genes (all 2,039):

=============================  ==============================================
``vae (latent arithmetic)``    lvmzoo ``VAE`` (Gaussian) on log1p CP10k, scGen's
                               latent arithmetic (:mod:`lvmzoo.analysis.perturbation`)
``scvi (latent arithmetic)``   lvmzoo ``SCVI`` (NB) on counts, the same arithmetic
``cpa (counterfactual)``       lvmzoo ``CPA`` (NB; perturbation and cell type
                               in the latent), counterfactual decoding
``pertpy scgen``               pertpy 1.0.3's ``Scgen`` (JAX scGen; its default
                               architecture 800 hidden × 2 layers, 100 latent)
                               on log1p CP10k, its own ``predict``
``mean shift``, ``no change``  the baselines (see the module above)
=============================  ==============================================

Metrics (:func:`lvmzoo.analysis.perturbation.compare_perturbation`): R² of
per-gene mean log-normalised expression on all genes and on the top 100 DE
genes of the held-out type (|Welch t| on the measured cells), the Pearson
correlation of predicted and measured change (all genes, top genes) and the
energy distance in 50 principal components of the held-out type's measured
cells.  lvmzoo's models use 10 latent dimensions, one hidden layer of 128, Adam
at 1e-3, batch size 128, KL warm-up over the first half of the epochs, no
validation split, seed 0; pertpy's Scgen trains for the same number of epochs
at batch size 128 with its default early stopping on a 10 % validation split.
One seed: differences of a few hundredths between methods are within the
noise of a refit.

pertpy 1.0.3 imports ``multipletests`` from ``statsmodels.sandbox``, which
statsmodels 0.15 removed; its worker puts the function back there before
importing pertpy (nothing in ``Scgen`` uses it).  Scgen needs scvi-tools and
torch (the ``bench`` extra).  If pertpy does not import or run, the run
records why and goes on without it.

Usage::

    python benchmarks/bench_perturbation.py           # ~30 min on 2 quiet cores; writes results/perturbation.{json,md}
    python benchmarks/bench_perturbation.py --quick   # 2 types, 3 epochs; prints, writes nothing
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import hardware, load_average, write_text  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DESIGN = dict(condition_key="condition", control="ctrl", perturbed="stim",
              cell_type_key="cell_type")
ARCHITECTURE = dict(n_latent=10, n_hidden=128, n_layers=1)
METRICS = ("r2", "r2_top", "delta_pearson", "delta_pearson_top", "energy_distance")
HIGHER_IS_BETTER = {"energy_distance": False}
LABELS = {"r2": "R² (all genes)", "r2_top": "R² (top 100 DE genes)",
          "delta_pearson": "Δ-Pearson (all genes)", "delta_pearson_top": "Δ-Pearson (top 100)",
          "energy_distance": "energy distance (50 PCs)"}
SCGEN = "pertpy scgen"
PACKAGES = ("lvmzoo", "jax", "numpyro", "flax", "optax", "anndata", "pertpy", "scvi-tools",
            "torch", "scanpy", "statsmodels")


# --------------------------------------------------------------------------
# lvmzoo methods (in this process)
# --------------------------------------------------------------------------


def held_out_types(adata, min_cells: int) -> list[str]:
    """Types (not ``unassigned``) with at least ``min_cells`` cells in each condition."""
    import pandas as pd

    counts = pd.crosstab(adata.obs["cell_type"], adata.obs["condition"])
    return [str(t) for t in counts.index
            if t != "unassigned" and counts.loc[t].min() >= min_cells]


def lvmzoo_predictions(adata, cell_type: str, epochs: int, seed: int) -> tuple[dict, dict]:
    """``({method: predicted AnnData}, {method: seconds})`` of the three lvmzoo methods."""
    import lvmzoo
    from lvmzoo.analysis.perturbation import exclude_cells, predict_perturbation
    from lvmzoo.models import CPA, SCVI, VAE

    train = exclude_cells(adata, [{"cell_type": cell_type, "condition": DESIGN["perturbed"]}])
    warmup = max(1, epochs // 2)
    methods = {
        "vae (latent arithmetic)": (VAE(**ARCHITECTURE), dict(transform="log1p_cp10k")),
        "scvi (latent arithmetic)": (
            SCVI(**ARCHITECTURE, likelihood="nb", n_epochs_kl_warmup=warmup), {}),
        "cpa (counterfactual)": (CPA(**ARCHITECTURE, n_epochs_kl_warmup=warmup), {}),
    }
    predictions, seconds = {}, {}
    for name, (model, options) in methods.items():
        started = time.perf_counter()
        data = lvmzoo.setup_anndata(train, **options, **model.registration())
        fitted = lvmzoo.fit(model, data, epochs=epochs, batch_size=128, seed=seed,
                            progress=False)
        predictions[name] = predict_perturbation(fitted, adata, **DESIGN, cell_type=cell_type,
                                                 seed=seed)
        seconds[name] = time.perf_counter() - started
        print(f"  {name}: {seconds[name]:.0f} s", flush=True)
    return predictions, seconds


# --------------------------------------------------------------------------
# pertpy's Scgen (a worker process: its imports stay out of the main one)
# --------------------------------------------------------------------------


def scgen_worker(types: list[str], epochs: int, seed: int, out: Path) -> None:
    """Fit pertpy's Scgen once per held-out type; write ``<type>.h5ad`` and a JSON line."""
    import statsmodels.sandbox.stats.multicomp as sandbox
    import statsmodels.stats.multitest as multitest

    # pertpy 1.0.3 imports multipletests from where statsmodels 0.15 removed it.
    if not hasattr(sandbox, "multipletests"):
        sandbox.multipletests = multitest.multipletests
    import anndata as ad
    import pertpy
    import scvi

    from lvmzoo import datasets
    from lvmzoo.analysis.perturbation import log_normalise

    scvi.settings.seed = seed
    adata = datasets.load_kang_ifnb()
    adata.X = log_normalise(adata.X.toarray()).astype(np.float32)  # scGen models log1p CP10k
    seconds = {}
    for cell_type in types:
        started = time.perf_counter()
        held_out = (adata.obs["cell_type"] == cell_type) & (adata.obs["condition"] == "stim")
        train = adata[~held_out.to_numpy()].copy()
        pertpy.tl.Scgen.setup_anndata(train, batch_key="condition", labels_key="cell_type")
        model = pertpy.tl.Scgen(train)
        model.train(max_epochs=epochs, batch_size=128, accelerator="cpu", early_stopping=True,
                    enable_progress_bar=False)
        predicted, _ = model.predict(ctrl_key="ctrl", stim_key="stim",
                                     celltype_to_predict=cell_type)
        result = ad.AnnData(X=np.asarray(predicted.X, np.float32),
                            obs=predicted.obs[["condition", "cell_type"]].copy(),
                            var=adata.var[[]].copy())
        result.uns["perturbation"] = {"scale": "log1p_cp10k", "method": "scgen",
                                      "model": "pertpy"}
        result.write_h5ad(out / f"{cell_type}.h5ad")
        seconds[cell_type] = time.perf_counter() - started
        print(f"  {SCGEN} {cell_type}: {seconds[cell_type]:.0f} s", file=sys.stderr, flush=True)
    print("SCGEN_RESULT " + json.dumps({"seconds": seconds, "pertpy": pertpy.__version__}))


def run_scgen(types: list[str], epochs: int, seed: int, out: Path) -> dict[str, Any]:
    """Run :func:`scgen_worker` in a fresh process; ``{"status", ...}``."""
    command = [sys.executable, __file__, "--worker-scgen", "--types", ",".join(types),
               "--epochs", str(epochs), "--seed", str(seed), "--scratch", str(out)]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [l for l in completed.stdout.splitlines() if l.startswith("SCGEN_RESULT ")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
        return {"status": "failed", "returncode": completed.returncode, "error": tail,
                "seconds": time.perf_counter() - started}
    return {"status": "ok", **json.loads(lines[-1][len("SCGEN_RESULT "):])}


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
    from lvmzoo import datasets

    at_start = machine()  # the load average before this run adds its own
    adata = datasets.load_kang_ifnb()
    types = args.types or held_out_types(adata, args.min_cells)
    if args.quick:
        types = types[:2]
    print(f"held-out types: {', '.join(types)}; {args.epochs} epochs", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_perturbation_"))
    try:
        result = _run(args, adata, types, scratch)
        result["machine"] = {**at_start, "load_average_at_end": load_average()}
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args, adata, types: list[str], scratch: Path) -> dict[str, Any]:
    import anndata as ad

    from lvmzoo.analysis.perturbation import compare_perturbation

    scgen = {"status": "skipped (--no-pertpy)"}
    if not args.no_pertpy:
        print(f"{SCGEN}: fitting in a worker process", flush=True)
        scgen = run_scgen(types, args.epochs, args.seed, scratch)
        print(f"{SCGEN}: {scgen['status']}", flush=True)
    per_type, seconds = {}, {}
    for cell_type in types:
        print(f"{cell_type}:", flush=True)
        predictions, seconds[cell_type] = lvmzoo_predictions(adata, cell_type, args.epochs,
                                                             args.seed)
        scgen_file = scratch / f"{cell_type}.h5ad"
        if scgen["status"] == "ok" and scgen_file.is_file():
            predictions[SCGEN] = ad.read_h5ad(scgen_file)
            seconds[cell_type][SCGEN] = scgen["seconds"][cell_type]
        metrics = compare_perturbation(adata, predictions, **DESIGN, cell_type=cell_type,
                                       seed=args.seed).metrics
        print(metrics.round(3).to_string(), flush=True)
        per_type[cell_type] = {
            "n_control": int(((adata.obs["cell_type"] == cell_type)
                              & (adata.obs["condition"] == "ctrl")).sum()),
            "n_stim": int(((adata.obs["cell_type"] == cell_type)
                           & (adata.obs["condition"] == "stim")).sum()),
            "metrics": {name: {k: _number(v) for k, v in row.items()}
                        for name, row in metrics.to_dict(orient="index").items()},
        }
    return {
        "benchmark": "perturbation",
        "settings": {"epochs": args.epochs, "seed": args.seed, "min_cells": args.min_cells,
                     "lvmzoo_architecture": ARCHITECTURE, "batch_size": 128,
                     "learning_rate": "each model's default (1e-3)",
                     "kl_warmup_epochs": max(1, args.epochs // 2),
                     "scgen": "pertpy Scgen defaults (n_hidden 800, n_latent 100, n_layers 2, "
                              "dropout 0.2), batch size 128, early stopping (scvi-tools "
                              "defaults), max_epochs = epochs",
                     "n_top_genes": 100, "n_pcs": 50, "max_cells": 1000},
        "data": {"name": "kang_ifnb", "n_cells": adata.n_obs, "n_genes": adata.n_vars},
        "held_out_types": types,
        "per_type": per_type,
        "fit_seconds": seconds,
        "scgen": scgen,
        "summary": summary(per_type),
    }


def _number(value):
    value = float(value)
    return None if not np.isfinite(value) else value


def summary(per_type: dict) -> dict[str, Any]:
    """Per method: the mean of each metric over types, and the types where it beats mean shift."""
    methods = list(next(iter(per_type.values()))["metrics"])
    out = {}
    for method in methods:
        means, beats = {}, {}
        for metric in METRICS:
            values = [per_type[t]["metrics"].get(method, {}).get(metric) for t in per_type]
            finite = [v for v in values if v is not None]
            means[metric] = float(np.mean(finite)) if finite else None
            if method in ("mean shift", "no change"):
                continue
            higher = HIGHER_IS_BETTER.get(metric, True)
            beats[metric] = [
                t for t in per_type
                if _better(per_type[t]["metrics"].get(method, {}).get(metric),
                           per_type[t]["metrics"]["mean shift"][metric], higher)]
        out[method] = {"mean": means, "beats_mean_shift": beats,
                       "n_types": sum(method in per_type[t]["metrics"] for t in per_type)}
    return out


def _better(value, baseline, higher: bool) -> bool:
    if value is None or baseline is None:
        return False
    return value > baseline if higher else value < baseline


def machine() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {**hardware(), "versions": versions}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    per_type, summary_ = result["per_type"], result["summary"]
    types = list(per_type)
    methods = list(summary_)
    m = result["machine"]
    lines = [
        "# Perturbation prediction: Kang et al. 2018 PBMCs, interferon-β, leave one cell type out",
        "",
        f"Generated by `benchmarks/bench_perturbation.py` on {m['date']}: {m['cpu']}, "
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}; "
        f"load average at start {m['load_average_at_start']}, at end "
        f"{m.get('load_average_at_end')} (other jobs shared the cores). Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
        "",
        f"Data: the bundled `kang_ifnb` subset ({result['data']['n_cells']:,} cells × "
        f"{result['data']['n_genes']:,} genes; cell types derived from marker genes). Held out "
        f"in turn: the stimulated cells of each type with at least "
        f"{result['settings']['min_cells']} cells per condition ({', '.join(types)}). "
        f"{result['settings']['epochs']} epochs for every model, one seed "
        f"({result['settings']['seed']}): differences of a few hundredths are within the "
        "noise of a refit.",
        "",
        "## Which methods beat the mean-shift baseline, and where",
        "",
    ]
    lines += verdicts(result)
    means = {k: {m: summary_[m]["mean"][k] for m in methods if summary_[m]["mean"][k] is not None}
             for k in METRICS}
    best = {k: (min if not HIGHER_IS_BETTER.get(k, True) else max)(v, key=v.get)
            for k, v in means.items()}
    lines += ["", "Best mean over the types: " + "; ".join(
        f"{LABELS[k]} {best[k]} ({means[k][best[k]]:.3f})" for k in METRICS) + ". The mean "
        "shift's predicted cells are the control cells translated, so they keep the measured "
        "cell-to-cell spread, which the energy distance rewards; R² and Δ-Pearson look at the "
        "means only."
        + (" pertpy's Scgen predicts each cell as its decoder's output (no draw from a "
           "likelihood), which narrows the spread and costs it on the energy distance."
           if SCGEN in methods else "")]
    lines += ["", "## Means over the held-out types", "",
              "| method | " + " | ".join(LABELS[k] for k in METRICS) + " |",
              "|---|" + "---:|" * len(METRICS)]
    for method in methods:
        means = summary_[method]["mean"]
        lines.append(f"| {method} | " + " | ".join(_cell(means[k]) for k in METRICS) + " |")
    for metric in METRICS:
        better = "lower" if not HIGHER_IS_BETTER.get(metric, True) else "higher"
        lines += ["", f"## {LABELS[metric]} per held-out type ({better} is better)", "",
                  "| method | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
        for method in methods:
            values = [per_type[t]["metrics"].get(method, {}).get(metric) for t in types]
            lines.append(f"| {method} | " + " | ".join(_cell(v) for v in values) + " |")
    lines += ["", "Cells (control / stimulated): "
              + ", ".join(f"{t} {per_type[t]['n_control']}/{per_type[t]['n_stim']}"
                          for t in types) + "."]
    scgen = result["scgen"]
    if scgen["status"] != "ok":
        lines += ["", f"pertpy's Scgen did not run: {scgen['status']}"
                  + (": " + " ".join(scgen.get("error", [])[-3:]) if "error" in scgen else "")]
    if "total_seconds" in result:
        lines += ["", f"The whole run took {result['total_seconds'] / 60:.0f} min."]
    lines += ["", "Fit + prediction seconds per type: "
              + "; ".join(f"{t}: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items())
                          for t, s in result["fit_seconds"].items())
              + ". These are not a speed comparison: Scgen's larger network ran first, while "
                "the shared machine was busier."]
    return "\n".join(lines) + "\n"


def verdicts(result: dict[str, Any]) -> list[str]:
    """One plain sentence per method: where it beats mean shift, where it does not."""
    types = list(result["per_type"])
    lines = []
    for method, info in result["summary"].items():
        if method in ("mean shift", "no change"):
            continue
        parts = []
        for metric in ("r2_top", "delta_pearson_top", "energy_distance"):
            wins = info["beats_mean_shift"][metric]
            losses = [t for t in types if t not in wins]
            part = f"{LABELS[metric]}: {len(wins)} of {len(types)} types"
            if wins and losses:
                part += f" (beats it on {', '.join(wins)}; not on {', '.join(losses)})"
            elif not wins:
                part += " (none)"
            parts.append(part)
        lines.append(f"- **{method}** beats mean shift on " + "; ".join(parts) + ".")
    no_change = [t for t in types if _better(
        result["per_type"][t]["metrics"]["mean shift"]["r2_top"],
        result["per_type"][t]["metrics"]["no change"]["r2_top"], True)]
    lines.append(f"- **mean shift** beats no change on {LABELS['r2_top']} for "
                 f"{len(no_change)} of {len(types)} types.")
    return lines


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-cells", type=int, default=60,
                        help="smallest number of cells per condition of a held-out type")
    parser.add_argument("--types", type=lambda s: [t for t in s.split(",") if t], default=None,
                        help="comma-separated held-out types (default: all with enough cells)")
    parser.add_argument("--no-pertpy", action="store_true", help="skip pertpy's Scgen")
    parser.add_argument("--quick", action="store_true",
                        help="2 types, 3 epochs; print, write nothing")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="only rewrite the markdown next to a results JSON")
    parser.add_argument("--worker-scgen", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_scgen:
        try:
            scgen_worker(args.types, args.epochs, args.seed, args.scratch)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    if args.report is not None:
        result = json.loads(args.report.read_text())
        write_text(args.report.with_suffix(".md"), markdown(result))
        print(f"wrote {args.report.with_suffix('.md')}")
        return
    if args.quick:
        args.epochs = 3
    started = time.perf_counter()
    result = run(args)
    result["total_seconds"] = time.perf_counter() - started
    report = markdown(result)
    print(report)
    if not args.quick:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_text(args.output_dir / "perturbation.json", json.dumps(result, indent=2) + "\n")
        write_text(args.output_dir / "perturbation.md", report)
        print(f"wrote {args.output_dir}/perturbation.json and perturbation.md")


if __name__ == "__main__":
    main()
