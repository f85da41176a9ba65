"""Classical models: lvmzoo PPCA / factor analysis / GMM against scikit-learn.

Each lvmzoo model is fitted by SVI (:func:`lvmzoo.fit`) and its scikit-learn
peer by its own closed-form or EM solver, on the same cells, the same genes
and the same held-out split:

==========================  =============================================
lvmzoo                      scikit-learn
==========================  =============================================
``PPCA(n_latent=10)``       ``PCA(n_components=10)``
``FactorAnalysis(10)``      ``FactorAnalysis(n_components=10)``
``GaussianMixture(10)``     ``GaussianMixture(10, covariance_type="diag",
                            n_init=1)``
==========================  =============================================

Two GMM rows: lvmzoo's default (a MAP fit with an inverse-gamma prior on the
variances whose strength and floor it chooses from the training cells,
``variance_prior="auto"``, and 3 k-means++ starts) and its maximum-likelihood
fit (``variance_prior=None``) whose scale floor ``min_scale = 1e-3`` is scikit-
learn's default ``reg_covar = 1e-6`` on the variances: the same objective, so
that row compares the optimisers.

A second part, ``gmm_real_data``, is the acceptance test of that default: on
every bundled real data set (:func:`lvmzoo.datasets.list_datasets`) and on
random 30 % cell and gene subsets of each and its genes detected in >= 5 % of
cells (genes with no count in the training cells kept; 10 components, 20 %
held out) it fits lvmzoo's default exactly as ``lvmzoo fit gmm`` does and
scikit-learn at every ``reg_covar`` in {1e-6, 1e-3, 1e-2} x ``n_init`` in
{1, 3}, and reports the held-out log-likelihood per cell and fit seconds of
lvmzoo and of scikit-learn's best configuration (best on the held-out cells).

Data: the bundled ``mouse_10k`` counts restricted to genes detected (count
> 0) in at least ``--min-detected`` of the cells, then
``log1p(1e4 * x / total)`` with totals over the retained genes
(``setup_anndata(..., kind="counts", transform="log1p_cp10k")``).  The driver
holds out ``validation_fraction`` of the cells (``result.validation_index``);
scikit-learn is fitted on exactly ``result.train_index``.

Measured per model and repeat, in one process:

* fit wall time: lvmzoo ``fit`` in total (compilation included) and without
  ``history["compile_seconds"]``; scikit-learn ``.fit``;
* held-out average log-likelihood per cell: lvmzoo
  ``result.evaluate(validation)["avg_log_likelihood"]`` (the exact marginal
  for all three models), scikit-learn ``.score`` (also exact).

Repeat ``r`` uses seed ``r`` for both tools (so each repeat is an independent
split and initialisation, paired between the tools).  Repeats stop early if
another one would not fit in ``--budget-seconds``.  Ratios are lvmzoo /
scikit-learn, measured in the same run on the same machine: those are the
numbers to compare across machines, not the seconds.

Usage::

    python benchmarks/bench_classical.py            # writes benchmarks/results/classical.{json,md}
    python benchmarks/bench_classical.py --quick    # 1 repeat, few epochs, prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

# Runnable as a script from anywhere in a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lvmzoo  # noqa: E402
from _machine import hardware, load_average, write_text  # noqa: E402
from lvmzoo import datasets  # noqa: E402
from lvmzoo.models import PPCA, FactorAnalysis, GaussianMixture  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """What one benchmark run fits; recorded verbatim in the JSON."""

    n_components: int = 10
    epochs: int = 20  # every loss curve has flattened by epoch ~15 (see notebook 01)
    batch_size: int = 256
    validation_fraction: float = 0.1
    min_detected: float = 0.05
    repeats: int = 3
    budget_seconds: float = 270.0
    gmm_n_init: int = 1


@dataclass(frozen=True)
class Pair:
    """An lvmzoo model and its scikit-learn peer (built per repeat).

    ``matched`` optionally builds a second peer whose settings follow the zoo
    model's (e.g. the same variance floor), to tell how much of a likelihood
    gap comes from a modelling choice rather than from the optimiser.
    """

    name: str
    lvmzoo: Callable[[int], Any]  # n_components -> zoo model
    sklearn: Callable[[Any, int, int], Any]  # (zoo model, seed, n_init) -> estimator
    sklearn_name: str
    matched: Optional[Callable[[Any, int, int], Any]] = None
    matched_name: str = ""


def _pairs() -> list[Pair]:
    # Imported here so `--help` stays fast.
    from sklearn.decomposition import PCA
    from sklearn.decomposition import FactorAnalysis as SkFactorAnalysis
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    def sk_gmm(model, seed, n_init, **kw):
        return SkGaussianMixture(n_components=model.n_components, covariance_type="diag",
                                 n_init=n_init, random_state=seed, **kw)

    return [
        Pair("ppca", lambda k: PPCA(n_latent=k),
             lambda m, seed, _: PCA(n_components=m.n_latent, random_state=seed), "PCA"),
        Pair("fa", lambda k: FactorAnalysis(n_latent=k),
             lambda m, seed, _: SkFactorAnalysis(n_components=m.n_latent, random_state=seed),
             "FactorAnalysis"),
        # The default: MAP with a variance prior, against sklearn's default.
        Pair("gmm", lambda k: GaussianMixture(n_components=k), sk_gmm,
             'GaussianMixture(covariance_type="diag")'),
        # Maximum likelihood: the scale floor 1e-3 squared is sklearn's default
        # reg_covar 1e-6, the same objective.
        Pair("gmm_ml", lambda k: GaussianMixture(n_components=k, variance_prior=None), sk_gmm,
             'GaussianMixture(covariance_type="diag")'),
    ]


# --------------------------------------------------------------------------
# GMM defaults against scikit-learn's best on every bundled real data set
# --------------------------------------------------------------------------

REG_COVARS = (1e-6, 1e-3, 1e-2)
N_INITS = (1, 3)
SUBSET_FRACTION = 0.3


def real_data_views(seed: int = 0) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """``"dataset/view" -> (train CellData, held-out CellData, description)``.

    For every bundled real data set (:func:`lvmzoo.datasets.list_datasets`):
    ``full`` (all cells and genes), ``cells30`` (a random 30 % of the cells),
    ``genes30`` (a random 30 % of the genes) and ``filtered`` (the genes
    detected in >= 5 % of all cells); cells with no count in the kept genes
    are dropped.  ``log1p_cp10k``, 20 % of the cells held out; genes with no
    count in the training cells are kept (their number is in the description).
    """
    views = {}
    for info in datasets.list_datasets():
        adata = datasets.load(info["name"])
        rng = np.random.default_rng(seed)
        cells = np.sort(rng.choice(adata.n_obs, int(SUBSET_FRACTION * adata.n_obs),
                                   replace=False))
        genes = np.sort(rng.choice(adata.n_vars, int(SUBSET_FRACTION * adata.n_vars),
                                   replace=False))
        detected = np.asarray((adata.X > 0).mean(axis=0)).ravel() >= Settings.min_detected
        for view_name, view, what in (
            ("full", adata, "all cells and genes"),
            ("cells30", adata[cells], "a random 30 % of the cells"),
            ("genes30", adata[:, genes], "a random 30 % of the genes"),
            ("filtered", adata[:, detected], "the genes detected in ≥ 5 % of cells"),
        ):
            view = view[np.asarray(view.X.sum(axis=1)).ravel() > 0].copy()
            order = np.random.default_rng(seed).permutation(view.n_obs)
            n_held = int(0.2 * view.n_obs)
            train, held = np.sort(order[n_held:]), np.sort(order[:n_held])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # genes with no counts in a subset: expected
                data = lvmzoo.setup_anndata(view[train].copy(), transform="log1p_cp10k")
            held_data = lvmzoo.query_anndata(view[held].copy(), data.registry)
            n_zero = int((np.asarray(view[train].X.sum(axis=0)).ravel() == 0).sum())
            views[f"{info['name']}/{view_name}"] = (data, held_data, {
                "what": what, "n_train": int(data.n_cells), "n_held_out": int(held_data.n_cells),
                "n_genes": int(data.n_genes), "n_genes_zero_in_training": n_zero})
    return views


def gmm_real_data(n_components: int, seed: int = 0) -> dict[str, Any]:
    """Per view: lvmzoo's default GMM (``lvmzoo.fit`` at its defaults, as ``lvmzoo fit
    gmm``) and scikit-learn at every ``reg_covar`` x ``n_init``; held-out
    log-likelihood per cell and fit seconds."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    out = {}
    for name, (train, held, info) in real_data_views(seed).items():
        model = GaussianMixture(n_components)
        started = time.perf_counter()
        fitted = lvmzoo.fit(model, train, seed=seed, progress=False)
        seconds = time.perf_counter() - started
        choice = model.prior_choice(fitted.params)
        lvmzoo_row = {
            "held_out": float(fitted.log_likelihood(held).mean()),
            "train": float(fitted.log_likelihood(train).mean()),
            "seconds": seconds, "compile_seconds": float(fitted.history["compile_seconds"]),
            "epochs_run": len(fitted.history["epoch"]),
            "variance_prior_strength": choice["strength"], "variance_prior_floor": choice["floor"],
            "selection_scores": choice["grid"],
        }
        x_train, x_held = train.dense_x(), held.dense_x()
        sk_rows = []
        for reg in REG_COVARS:
            for n_init in N_INITS:
                estimator = SkGaussianMixture(n_components, covariance_type="diag",
                                              reg_covar=reg, n_init=n_init, random_state=seed)
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # convergence warnings on tiny subsets
                    estimator.fit(x_train)
                sk_rows.append({"reg_covar": reg, "n_init": n_init,
                                "seconds": time.perf_counter() - started,
                                "train": float(estimator.score(x_train)),
                                "held_out": float(estimator.score(x_held))})
        best = max(sk_rows, key=lambda r: r["held_out"])
        gap = (lvmzoo_row["held_out"] - best["held_out"]) / abs(best["held_out"])
        out[name] = {**info, "lvmzoo": lvmzoo_row, "sklearn": sk_rows, "sklearn_best": best,
                     "relative_gap_to_best": gap}
        print(f"{name:20s} lvmzoo {lvmzoo_row['held_out']:12.1f} ({seconds:5.1f} s, "
              f"a={choice['strength']:g}, floor={choice['floor']:g}) | sklearn best "
              f"{best['held_out']:12.1f} (reg_covar={best['reg_covar']:g}, n_init={best['n_init']}, "
              f"{best['seconds']:.1f} s) gap {100 * gap:+.1f} %", flush=True)
    return out


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def load_data(min_detected: float) -> tuple[lvmzoo.CellData, dict[str, Any]]:
    """The bundled 10k cells, genes detected in >= ``min_detected`` of cells, log1p-cp10k.

    Returns:
      ``(data, description)``; ``data.x`` is ``(n_cells, n_genes)`` CSR float32.
    """
    adata = datasets.load_mouse_10k()
    detected = np.asarray((adata.X > 0).mean(axis=0)).ravel()  # (n_genes,) share of cells
    keep = detected >= min_detected
    adata = adata[:, keep].copy()
    data = lvmzoo.setup_anndata(adata, kind="counts", transform="log1p_cp10k")
    return data, {
        "name": "mouse_10k",
        "n_cells": int(data.n_cells),
        "n_genes": int(data.n_genes),
        "n_genes_bundled": int(keep.size),
        "gene_filter": f"detected (count > 0) in >= {min_detected:.0%} of cells",
        "transform": "log1p(1e4 * counts / cell total over the retained genes)",
    }


# --------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------


def run_pair(pair: Pair, data: lvmzoo.CellData, seed: int, settings: Settings) -> dict[str, Any]:
    """Fit both tools once with ``seed`` on the driver's split; time them and score held-out cells."""
    model = pair.lvmzoo(settings.n_components)
    started = time.perf_counter()
    result = lvmzoo.fit(
        model, data, epochs=settings.epochs, batch_size=settings.batch_size, seed=seed,
        validation_fraction=settings.validation_fraction, progress=False,
    )
    lvmzoo_total = time.perf_counter() - started
    compile_seconds = float(result.history["compile_seconds"])
    validation = data.subset(result.validation_index)
    evaluation = result.evaluate(validation)

    # Densify outside the timed region: scikit-learn needs dense input for all three.
    x_train = data.subset(result.train_index).dense_x()
    x_validation = validation.dense_x()
    lvmzoo_ll = float(evaluation["avg_log_likelihood"])
    run = {
        "seed": seed,
        "lvmzoo_seconds": lvmzoo_total,
        "lvmzoo_compile_seconds": compile_seconds,
        "lvmzoo_seconds_excluding_compile": lvmzoo_total - compile_seconds,
        "lvmzoo_heldout_ll": lvmzoo_ll,
        "lvmzoo_ll_method": evaluation["method"],
        "lvmzoo_final_train_loss": float(result.history["loss"][-1]),
        "lvmzoo_epochs_run": len(result.history["epoch"]),
        "n_train": int(result.train_index.size),
        "n_validation": int(result.validation_index.size),
    }
    peers = {"": pair.sklearn, "matched_": pair.matched}
    for prefix, build in peers.items():
        if build is None:
            continue
        estimator = build(model, seed, settings.gmm_n_init)
        started = time.perf_counter()
        estimator.fit(x_train)
        seconds = time.perf_counter() - started
        ll = float(estimator.score(x_validation))
        run.update({
            f"{prefix}sklearn_seconds": seconds,
            f"{prefix}ratio": lvmzoo_total / seconds,
            f"{prefix}ratio_excluding_compile": (lvmzoo_total - compile_seconds) / seconds,
            f"{prefix}sklearn_heldout_ll": ll,
            # Positive: lvmzoo explains held-out cells better; relative to |sklearn|.
            f"{prefix}relative_ll_gap": (lvmzoo_ll - ll) / abs(ll),
            f"{prefix}sklearn_n_iter": int(getattr(estimator, "n_iter_", 0) or 0),
        })
    return run


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over repeats of every numeric measurement."""
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    out = {}
    for key in keys:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


# --------------------------------------------------------------------------
# Machine and output
# --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The machine (see ``_machine.hardware``) plus library versions."""
    import jax
    import numpyro
    import sklearn

    return {
        **hardware(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "numpyro": numpyro.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "lvmzoo": lvmzoo.__version__,
    }


def _range(stat: dict[str, float], fmt: str) -> str:
    show = _ratio if fmt == "ratio" else lambda v: format(v, fmt)
    if stat["min"] == stat["max"]:
        return show(stat["median"])
    return f"{show(stat['median'])} ({show(stat['min'])} to {show(stat['max'])})"


def _ratio(value: float) -> str:
    """Two significant figures without scientific notation: 0.78, 3.4, 12, 215."""
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A short table (medians, ranges in brackets) and the machine line."""
    s, m, d = report["settings"], report["machine"], report["data"]
    lines = [
        "# Classical models: lvmzoo vs scikit-learn",
        "",
        f"Data: {d['name']}, {d['n_cells']:,} cells × {d['n_genes']} genes "
        f"({d['gene_filter']}; {d['transform']}); "
        f"held-out {s['validation_fraction']:.0%} of cells (the driver's split, the same for both).",
        f"lvmzoo: SVI, {s['epochs']} epochs, batch {s['batch_size']}, default learning rates; "
        f"{s['n_components']} components; GMM initialisations: lvmzoo the best of its default 3 "
        "(k-means++ and 10 Lloyd steps on a random sample of training cells), sklearn "
        f"n_init={s['gmm_n_init']} (k-means); PPCA and FA start from their closed-form / EM solution on that "
        "sample; early stopping on the validation loss (the default).",
        f"Median over {report['n_repeats']} repeat(s) (range in brackets); repeat r uses seed r "
        "for both tools. Ratios are lvmzoo / scikit-learn from the same run. "
        "LL: held-out average log-likelihood per cell (nats, exact for both); "
        "gap = (lvmzoo − sklearn) / |sklearn|, negative: sklearn fits held-out cells better. "
        "GMM: lvmzoo's default has a prior on the variances whose strength it chooses from "
        "the training cells (variance_prior='auto'; 3 k-means++ starts); gmm_ml is its "
        "maximum-likelihood fit, whose scale floor 1e-3 is sklearn's default reg_covar 1e-6 on "
        "the variances (the same objective).",
        "",
        "| model | sklearn peer | lvmzoo fit s (total) | lvmzoo s excl. compile | sklearn fit s "
        "| ratio total | ratio excl. compile | LL lvmzoo | LL sklearn | LL gap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["models"].items():
        st = entry["summary"]
        lines.append(_row(name, entry["sklearn"], st, ""))
        if entry.get("sklearn_matched"):
            lines.append(_row(name, entry["sklearn_matched"], st, "matched_"))
    if report.get("gmm_real_data"):
        lines += _real_data_markdown(report["gmm_real_data"])
    load = m.get("load_average_at_start")
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, jax {m['jax']} ({m['jax_backend']}), numpyro {m['numpyro']}, "
        f"scikit-learn {m['sklearn']}; {m['date']}"
        + (f"; load average at start {load[0]}" if load else "")
        + f". Benchmark wall time {report['wall_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _real_data_markdown(views: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## GMM default vs scikit-learn's best, every bundled real data set",
        "",
        "10 components, log1p_cp10k over the view's genes, 20 % of the cells held out (seed 0); "
        "held-out average log-likelihood per cell (nats, exact). lvmzoo: `lvmzoo.fit("
        "GaussianMixture(10), train)` at its defaults, i.e. `lvmzoo fit gmm` (variance prior "
        "chosen from the training cells, 3 k-means++ starts, 30 epochs, early stopping on its "
        "own 10 % validation split of the training cells, so it trains on 90 % of them); "
        "its time is the whole `fit` call, compilation included. scikit-learn: "
        "`GaussianMixture(10, covariance_type='diag', reg_covar=r, n_init=n)` fitted on all "
        "training cells, for r in {1e-6, 1e-3, 1e-2} and n in {1, 3}; 'best' is the best "
        "held-out score of the six (chosen with the held-out cells: an upper bound on what "
        "any choice from the training cells gets), its time that configuration's `.fit`. "
        "Gap = (lvmzoo − best) / |best|. 'zero genes': genes with no count in the training "
        "cells.",
        "",
        "| data set / view | cells train / held-out | genes (zero genes) | lvmzoo LL | lvmzoo s "
        "| chosen a, floor | sklearn best LL | best config | sklearn s | gap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in views.items():
        z, b = v["lvmzoo"], v["sklearn_best"]
        lines.append(
            f"| {name} | {v['n_train']:,} / {v['n_held_out']:,} | {v['n_genes']:,} "
            f"({v['n_genes_zero_in_training']}) | {z['held_out']:,.1f} | {z['seconds']:.1f} "
            f"| {z['variance_prior_strength']:g}, {z['variance_prior_floor']:g} "
            f"| {b['held_out']:,.1f} | reg_covar={b['reg_covar']:g}, n_init={b['n_init']} "
            f"| {b['seconds']:.2f} | {100 * v['relative_gap_to_best']:+.1f} % |")
    lines += ["", "scikit-learn, every configuration (held-out LL per cell; fit s):", "",
              "| data set / view | " + " | ".join(
                  f"{r:g}, n_init={n}" for r in REG_COVARS for n in N_INITS) + " |",
              "|---|" + "---|" * (len(REG_COVARS) * len(N_INITS))]
    for name, v in views.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{r['held_out']:,.1f}; {r['seconds']:.2f}" for r in v["sklearn"]) + " |")
    return lines


def _row(name: str, peer: str, st: dict[str, Any], prefix: str) -> str:
    gap = {k: 100 * v for k, v in st[f"{prefix}relative_ll_gap"].items()}
    return (
        f"| {name} | {peer} "
        f"| {_range(st['lvmzoo_seconds'], '.1f')} "
        f"| {_range(st['lvmzoo_seconds_excluding_compile'], '.1f')} "
        f"| {_range(st[f'{prefix}sklearn_seconds'], '.2f')} "
        f"| {_range(st[f'{prefix}ratio'], 'ratio')} "
        f"| {_range(st[f'{prefix}ratio_excluding_compile'], 'ratio')} "
        f"| {_range(st['lvmzoo_heldout_ll'], '.1f')} "
        f"| {_range(st[f'{prefix}sklearn_heldout_ll'], '.1f')} "
        f"| {_range(gap, '+.2f')} % |"
    )


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv=None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 3 epochs, print only (unless --output-dir is given)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="SVI epochs (default 20)")
    parser.add_argument("--min-detected", type=float, default=Settings.min_detected,
                        help="keep genes detected in at least this share of cells")
    parser.add_argument("--budget-seconds", type=float, default=Settings.budget_seconds,
                        help="start no repeat that would end after this many seconds")
    parser.add_argument("--skip-real-data", "--skip-regularisation", action="store_true",
                        dest="skip_real_data",
                        help="skip the GMM comparison on every bundled real data set (~8 min)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"where to write classical.json/.md (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    settings = Settings(
        epochs=args.epochs or (3 if args.quick else Settings.epochs),
        repeats=args.repeats or (1 if args.quick else Settings.repeats),
        min_detected=args.min_detected,
        budget_seconds=args.budget_seconds,
    )
    output = args.output_dir or (None if args.quick else RESULTS_DIR)
    return settings, output, not (args.skip_real_data or args.quick)


def main(argv=None) -> dict[str, Any]:
    settings, output, real_data = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    data, data_info = load_data(settings.min_detected)
    pairs = _pairs()
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in pairs}
    repeat_seconds = []
    for seed in range(settings.repeats):
        elapsed = time.perf_counter() - started
        # The first repeat pays JAX's one-off start-up, so later ones are no slower.
        if repeat_seconds and elapsed + max(repeat_seconds) > settings.budget_seconds:
            print(f"stopping after {seed} repeat(s): another would exceed "
                  f"{settings.budget_seconds:.0f} s", flush=True)
            break
        t0 = time.perf_counter()
        for pair in pairs:
            run = run_pair(pair, data, seed, settings)
            runs[pair.name].append(run)
            print(f"repeat {seed} {pair.name:5s} lvmzoo {run['lvmzoo_seconds']:6.1f} s "
                  f"(compile {run['lvmzoo_compile_seconds']:.1f}) LL {run['lvmzoo_heldout_ll']:.2f} | "
                  f"sklearn {run['sklearn_seconds']:6.2f} s LL {run['sklearn_heldout_ll']:.2f}",
                  flush=True)
        repeat_seconds.append(time.perf_counter() - t0)

    if real_data:
        real_data = gmm_real_data(settings.n_components)
    report = {
        "benchmark": "classical",
        "settings": dataclasses.asdict(settings),
        "data": data_info,
        "machine": {**machine, "load_average_at_end": load_average()},
        "n_repeats": len(repeat_seconds),
        "repeat_seconds": repeat_seconds,
        "models": {
            p.name: {"sklearn": p.sklearn_name, "sklearn_matched": p.matched_name or None,
                     "summary": summarise(runs[p.name]),
                     "runs": runs[p.name]}
            for p in pairs
        },
        "gmm_real_data": real_data or None,
        "wall_seconds": time.perf_counter() - started,
    }
    markdown = render_markdown(report)
    print(markdown)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "classical.json", json.dumps(report, indent=2) + "\n")
        write_text(output / "classical.md", markdown)
        print(f"wrote {output / 'classical.json'} and {output / 'classical.md'}")
    return report


if __name__ == "__main__":
    main()
