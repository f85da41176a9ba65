"""Which scalable GP form for Pseudotime's trends: Hilbert-space basis or inducing points.

Issue 18 asked for per-gene GP curves "in a form that scales linearly in cells
(Hilbert-space / basis-function GP, or sparse inducing points) — measure and
choose".  Both forms write each gene's curve as ``f_g(t) = beta_g + alpha_g
sum_m psi_m(t; ell) w_gm`` with ``w ~ N(0, I)`` (mean-field Normal guide), linear
in cells and ``O(G M)`` per cell; they differ in the features ``psi``:

* ``hsgp`` (what :class:`lvmzoo.models.Pseudotime` uses): ``M`` Laplacian
  eigenfunctions on ``[-L, L]`` scaled by the square root of the squared-exponential
  kernel's spectral density (Solin & Särkkä 2020);
* ``inducing``: ``M`` inducing inputs ``Z`` evenly spaced on ``[0, 1]`` in the
  whitened parametrisation, ``psi(t) = k(t, Z) chol(K_ZZ + jitter)^-T`` (so
  ``u = f(Z) = chol(K_ZZ) w``: the projected-process / DTC approximation, the
  curve's mean in SVGP; the model here is :class:`InducingPseudotime`, this
  file's subclass of Pseudotime that changes only the features, fitted by the
  same driver).

Three measurements, one process, sequentially:

1. *Kernel approximation*: for lengthscales 0.08-0.5 (0.08 is the model's lower
   bound) and ``M`` = 8, 16, 32, the largest error of each form's implied
   covariance ``psi(t) psi(t')^T`` against the unit SE kernel on a 101-point grid of
   ``[0, 1]``.
2. *Fits on a simulated trajectory* (``simulate_trajectory(2000, 60)``, raw counts,
   Gaussian on log1p CP10k, 200 epochs, ``M = 16``, seeds 0-2): Kendall tau of the
   posterior mean against the true time (``|tau|``), 95 % coverage, the training
   loss (last 20 epochs) and the held-out log-likelihood per cell of 1,000 new cells
   of the same trajectory (30 importance samples); seconds per epoch (steady epochs)
   and compile seconds.
3. *Real data*, unsupervised, 3 seeds, default settings (``M = 16``): amphioxus
   and HSMM as in bench_pseudotime.py (oriented by their early cells), tau and
   training loss; and 100,000 simulated cells (3 epochs) for the seconds per epoch.

Run: ``python benchmarks/bench_gp_form.py`` (about 10 minutes on 2 cores); writes
``results/pseudotime_gp_form.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import _machine  # noqa: E402

from lvmzoo.models import Pseudotime  # noqa: E402

LENGTHSCALES = (0.08, 0.1, 0.2, 0.3, 0.5)
N_FEATURES = (8, 16, 32)
# float32 Cholesky of the SE Gram matrix of evenly spaced inputs needs this much jitter
# (unit kernel variance) at M = 32, ell = 0.5 (1e-6 gave NaN there).
JITTER = 1e-4
FORMS = ("hsgp", "inducing")


@dataclasses.dataclass(frozen=True)
class InducingPseudotime(Pseudotime):
    """Pseudotime with whitened inducing-point features instead of the Hilbert-space basis."""

    name: ClassVar[str] = "pseudotime_inducing"

    def _basis(self, t, lengthscale):
        return inducing_features(t, lengthscale, self.n_basis)


def _se(a, b, lengthscale):
    return jnp.exp(-0.5 * ((a[..., :, None] - b[..., None, :]) / lengthscale) ** 2)


def inducing_features(t, lengthscale, n_inducing: int):
    """``k(t, Z) chol(K_ZZ + jitter I)^-T`` ``(..., M)`` for ``t`` ``(...)``."""
    z = jnp.linspace(0.0, 1.0, n_inducing)
    chol = jnp.linalg.cholesky(_se(z, z, lengthscale) + JITTER * jnp.eye(n_inducing))
    whiten = jax.scipy.linalg.solve_triangular(chol, jnp.eye(n_inducing), lower=True)
    return _se(jnp.asarray(t)[..., None], z, lengthscale)[..., 0, :] @ whiten.T


def kernel_errors() -> list[dict[str, Any]]:
    grid = jnp.linspace(0.0, 1.0, 101)
    rows = []
    for m in N_FEATURES:
        for ell in LENGTHSCALES:
            exact = _se(grid, grid, ell)
            row = {"n_features": m, "lengthscale": ell}
            for form, model in (("hsgp", Pseudotime(n_basis=m)),
                                ("inducing", InducingPseudotime(n_basis=m))):
                psi = model._basis(grid, jnp.asarray(ell))
                row[form] = float(jnp.max(jnp.abs(psi @ psi.T - exact)))
            rows.append(row)
    return rows


def _fit(model, data, seed, epochs):
    import lvmzoo

    started = time.perf_counter()
    fitted = lvmzoo.fit(model, data, epochs=epochs, seed=seed, progress=False)
    seconds = time.perf_counter() - started
    steady = fitted.history["seconds"][1:]
    return fitted, {"seconds": seconds, "compile_seconds": fitted.history["compile_seconds"],
                    "seconds_per_epoch": float(np.median(steady)) if steady else float("nan"),
                    "final_loss": float(np.mean(fitted.history["loss"][-20:]))}


def simulated_fits(seeds, epochs) -> list[dict[str, Any]]:
    import lvmzoo
    from scipy import stats

    from lvmzoo import datasets

    cells = datasets.simulate_trajectory(2000, 60, seed=0)
    new = datasets.simulate_trajectory(1000, 60, seed=9, gene_seed=0)
    data = lvmzoo.setup_anndata(cells, kind="counts", transform="log1p_cp10k")
    truth = cells.obs["true_t"].to_numpy()
    rows = []
    for form in FORMS:
        for seed in seeds:
            model = Pseudotime() if form == "hsgp" else InducingPseudotime()
            fitted, row = _fit(model, data, seed, epochs)
            annotated, _ = fitted.annotate(cells, data)
            mean = annotated.obs["pseudotime"].to_numpy()
            lower = annotated.obs["pseudotime_lower"].to_numpy()
            upper = annotated.obs["pseudotime_upper"].to_numpy()
            tau = float(stats.kendalltau(mean, truth)[0])
            if tau < 0:
                lower, upper = 1.0 - upper, 1.0 - lower
            held = lvmzoo.query_anndata(new, fitted.registry)
            score = fitted.evaluate(held, n_samples=30, seed=0)
            rows.append({"form": form, "seed": seed, "tau": abs(tau),
                         "coverage": float(np.mean((truth >= lower) & (truth <= upper))),
                         "held_out_log_likelihood": float(score["avg_log_likelihood"]),
                         "lengthscale": float(fitted.params["lengthscale"]), **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def real_fits(seeds) -> list[dict[str, Any]]:
    import bench_pseudotime as bp
    from scipy import stats

    from lvmzoo.analysis.trajectory import orient
    from lvmzoo.data.registry import setup_anndata

    rows = []
    for dataset in ("amphioxus", "hsmm"):
        adata, stage, early = bp._real_data(dataset)
        for form in FORMS:
            for seed in seeds:
                model = Pseudotime() if form == "hsgp" else InducingPseudotime()
                data = setup_anndata(adata, **bp.SETUP[dataset], **model.registration())
                fitted, row = _fit(model, data, seed, None)
                annotated, _ = fitted.annotate(adata, data)
                t, _ = orient(annotated.obs["pseudotime"].to_numpy(), early)
                rows.append({"dataset": dataset, "form": form, "seed": seed,
                             "tau": float(stats.kendalltau(t, stage)[0]), **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def scale_fits(n_cells: int, epochs: int) -> list[dict[str, Any]]:
    import lvmzoo
    from lvmzoo import datasets

    cells = datasets.simulate_trajectory(n_cells, 60, seed=0)
    data = lvmzoo.setup_anndata(cells, kind="counts", transform="log1p_cp10k")
    rows = []
    for form in FORMS:
        model = Pseudotime() if form == "hsgp" else InducingPseudotime()
        _, row = _fit(model, data, 0, epochs)
        rows.append({"form": form, "n_cells": n_cells, **row})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _median_range(values) -> str:
    values = np.asarray(values, float)
    return f"{np.median(values):.3f} ({values.min():.3f}–{values.max():.3f})"


def render_markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = ["# Pseudotime's GP form: Hilbert-space basis against inducing points", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB "
             f"RAM, {machine['os']}, Python {machine['python']}; {machine['date']}; load "
             f"average at start {machine['load_average_at_start']}, at end "
             f"{result['load_average_at_end']}. Produced by `python benchmarks/bench_gp_form.py` "
             f"({result['wall_seconds'] / 60:.0f} min); definitions in its docstring.", "",
             "## 1. Kernel approximation: largest |error| of the implied covariance "
             "against the unit SE kernel on [0, 1]", "",
             "| M | lengthscale | HSGP | inducing points |", "|---|---|---|---|"]
    for row in result["kernel"]:
        lines.append(f"| {row['n_features']} | {row['lengthscale']} | {row['hsgp']:.2e} | "
                     f"{row['inducing']:.2e} |")
    lines += ["", "## 2. Fits on simulate_trajectory(2000, 60), M = 16, 200 epochs, seeds "
              f"{', '.join(str(s) for s in result['seeds'])}: median (range)", "",
              "| form | Kendall tau | 95 % coverage | training loss | held-out log-lik / cell "
              "(1,000 new cells) | fitted lengthscale | s / epoch | compile s |",
              "|---|---|---|---|---|---|---|---|"]
    for form in FORMS:
        runs = [r for r in result["simulated"] if r["form"] == form]
        lines.append("| " + " | ".join([
            form, _median_range([r["tau"] for r in runs]),
            _median_range([r["coverage"] for r in runs]),
            _median_range([r["final_loss"] for r in runs]),
            _median_range([r["held_out_log_likelihood"] for r in runs]),
            _median_range([r["lengthscale"] for r in runs]),
            _median_range([r["seconds_per_epoch"] for r in runs]),
            _median_range([r["compile_seconds"] for r in runs])]) + " |")
    lines += ["", "## 3. Real data (unsupervised, default settings, oriented by the early "
              "cells) and 100,000 simulated cells", "",
              "| data | form | Kendall tau | training loss | s / epoch |", "|---|---|---|---|---|"]
    for dataset in ("amphioxus", "hsmm"):
        for form in FORMS:
            runs = [r for r in result["real"] if r["dataset"] == dataset and r["form"] == form]
            lines.append(f"| {dataset} | {form} | {_median_range([r['tau'] for r in runs])} | "
                         f"{_median_range([r['final_loss'] for r in runs])} | "
                         f"{_median_range([r['seconds_per_epoch'] for r in runs])} |")
    for row in result["scale"]:
        lines.append(f"| simulated, {row['n_cells']:,} cells (3 epochs) | {row['form']} | – | "
                     f"{row['final_loss']:.2f} | {row['seconds_per_epoch']:.2f} |")
    lines += ["", "## Reading", ""] + [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--scale-cells", type=int, default=100_000)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    result = {"benchmark": "pseudotime_gp_form", "machine": _machine.hardware(),
              "seeds": seeds, "epochs": args.epochs, "jitter": JITTER,
              "kernel": kernel_errors()}
    result["simulated"] = simulated_fits(seeds, args.epochs)
    result["real"] = real_fits(seeds)
    result["scale"] = scale_fits(args.scale_cells, 3)
    result["wall_seconds"] = time.perf_counter() - started
    result["load_average_at_end"] = _machine.load_average()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _machine.write_text(out / "pseudotime_gp_form.json", json.dumps(result, indent=1) + "\n")
    _machine.write_text(out / "pseudotime_gp_form.md", render_markdown(result))
    print(f"wrote {out / 'pseudotime_gp_form.json'} and {out / 'pseudotime_gp_form.md'}")


if __name__ == "__main__":
    main()
