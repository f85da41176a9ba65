"""Eight separate fits versus one vmapped fit of eight seeds (``fit_replicates``).

Run: ``python benchmarks/bench_vmap_seeds.py [--quick]``.  On the bundled 10k
data set (log1p_cp10k, genes detected in ≥ 5% of cells) it fits PPCA and
factor analysis with seeds 0..7 twice — eight calls of ``lvmzoo.fit`` and one
``fit_replicates`` call — and reports the wall-time ratio
``separate / vmapped`` with and without compilation, the largest parameter
difference between the two routes, and the seed stability of the latent
(Procrustes similarity between replicates).  Results go to
``benchmarks/results/vmap_seeds.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lvmzoo  # noqa: E402
from _machine import write_text  # noqa: E402
from bench_classical import load_data, machine_info  # noqa: E402
from lvmzoo.infer.replicates import fit_replicates, replicate_stability  # noqa: E402
from lvmzoo.models import PPCA, FactorAnalysis  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(model, data, seeds, epochs, batch_size):
    t0 = time.perf_counter()
    separate = [lvmzoo.fit(model, data, seed=s, epochs=epochs, batch_size=batch_size,
                           progress=False) for s in seeds]
    separate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = fit_replicates(model, data, seeds, epochs=epochs, batch_size=batch_size,
                              progress=False)
    vmapped_s = time.perf_counter() - t0
    separate_compile = sum(f.history["compile_seconds"] for f in separate)
    vmapped_compile = together[0].history["compile_seconds"]
    max_diff = max(
        float(np.max(np.abs(np.asarray(a.params[k]) - np.asarray(b.params[k]))))
        for a, b in zip(separate, together) for k in a.params
    )
    stability = replicate_stability([f.latent(data) for f in together])
    return {
        "model": model.name,
        "separate_seconds": separate_s,
        "vmapped_seconds": vmapped_s,
        "ratio": separate_s / vmapped_s,
        "separate_compile_seconds": separate_compile,
        "vmapped_compile_seconds": vmapped_compile,
        "ratio_excluding_compile": (separate_s - separate_compile) / (vmapped_s - vmapped_compile),
        "max_abs_param_difference": max_diff,
        "latent_procrustes_similarity": stability,
    }


def render(report):
    s, m = report["settings"], report["machine"]
    lines = [
        "# Replicate fits: 8 separate `fit` calls vs one vmapped `fit_replicates`",
        "",
        f"Data: {report['data']['name']}, {report['data']['n_cells']:,} cells × "
        f"{report['data']['n_genes']} genes (log1p_cp10k). {len(s['seeds'])} seeds, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, n_latent {s['n_latent']}. "
        "Times include compilation unless stated; ratio = separate / vmapped (higher: vmap wins).",
        "",
        "| model | 8 separate fits s | 1 vmapped fit s | ratio | ratio excl. compile | max abs param diff | latent Procrustes similarity (mean, min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        st = r["latent_procrustes_similarity"]
        lines.append(
            f"| {r['model']} | {r['separate_seconds']:.1f} | {r['vmapped_seconds']:.1f} | "
            f"{r['ratio']:.1f} | {r['ratio_excluding_compile']:.1f} | "
            f"{r['max_abs_param_difference']:.1e} | {st['mean']:.4f}, {st['min']:.4f} |"
        )
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
              f"Python {m['python']}, jax {m['jax']} ({m['jax_backend']}), numpyro {m['numpyro']}; "
              f"{m['date']}; load average at start {m['load_average_at_start']}.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2,000 cells")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data, info = load_data(0.05)
    epochs = 2 if args.quick else args.epochs
    if args.quick:
        data = data.subset(np.arange(2000))
    seeds, batch_size, n_latent = list(range(8)), 256, 10
    machine = machine_info()
    runs = [run(cls(n_latent=n_latent), data, seeds, epochs, batch_size)
            for cls in (PPCA, FactorAnalysis)]
    report = {
        "settings": {"seeds": seeds, "epochs": epochs, "batch_size": batch_size,
                     "n_latent": n_latent, "quick": args.quick},
        "data": {"name": "mouse_10k", "n_cells": data.n_cells, "n_genes": data.n_genes},
        "machine": machine,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "vmap_seeds.json", json.dumps(report, indent=2))
    write_text(args.out / "vmap_seeds.md", render(report))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
