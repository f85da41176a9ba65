"""Seed ensembles: do two ensembles agree better than two single fits, and at what cost?

Run (in an environment with the ``bench`` extra: scvi-tools, torch 2.13.0 CPU)::

    python benchmarks/bench_ensembles.py            # writes results/ensembles.{json,md}
    python benchmarks/bench_ensembles.py --quick    # tiny settings; prints, writes nothing

On the bundled Kang PBMCs (``lvmzoo.datasets.load("kang_ifnb")``: 6,000 cells ×
2,039 genes, interferon-stimulated and control; batch = condition is *not*
used so that the stimulation stays in the expression), in one run:

* **DE agreement**: the top-100 genes (by ``proba_de``, "change" mode, the
  same settings for every fit) of two comparisons — stimulated vs control
  within CD14 monocytes, and CD14 monocytes vs the rest — from two fits with
  different seeds.  Jaccard index of the two top-100 sets for: two lvmzoo
  single fits (seeds 0, 1); two lvmzoo ensembles of R replicates with
  disjoint seeds (0..R-1 and R..2R-1); two scvi-tools ``SCVI`` fits (seeds 0, 1)
  with ``differential_expression(mode="change")``.
* **Latent neighbourhoods**: mean overlap of each cell's 15 nearest neighbours
  in the two fits' latents, for the same three pairs.
* **Labels** (SCANVI, 20 % of the cells labelled at random, the rest scored):
  agreement of the predicted labels between the two fits of each pair,
  accuracy and expected calibration error (15 bins) of each fit.
* **Cost**: wall time and peak RSS growth of one fit, of an ensemble of R (one
  vmapped program) and of R sequential single fits.

Every fit runs the same epochs (``--epochs``) with scVI's architecture
(``n_latent=10, n_hidden=128``) and no early stopping (fixed budget, same for
both tools).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import hardware, write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOP = 100
K_NEIGHBOURS = 15
LABELLED_SHARE = 0.2
COMPARISONS = (("stim vs ctrl in CD14_Mono", "condition", "stim", "ctrl", "CD14_Mono"),
               ("CD14_Mono vs rest", "cell_type", "CD14_Mono", None, None))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = K_NEIGHBOURS) -> float:
    from sklearn.neighbors import NearestNeighbors

    def neighbours(z):
        return NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb)]))


def load(quick: bool):
    from lvmzoo import datasets

    adata = datasets.load("kang_ifnb")
    adata = adata[adata.obs["cell_type"] != "unassigned"].copy()
    if quick:
        adata = adata[np.random.default_rng(0).choice(adata.n_obs, 800, replace=False)].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    adata.obs["condition"] = adata.obs["condition"].astype(str).astype("category")
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    hidden = np.random.default_rng(1).random(adata.n_obs) >= LABELLED_SHARE
    labels[hidden] = "Unknown"
    adata.obs["label"] = labels
    return adata, hidden


def groups(adata, column, group1, group2, within):
    """Boolean masks of the two groups of a comparison."""
    cells = np.ones(adata.n_obs, bool) if within is None else (
        adata.obs["cell_type"].astype(str).to_numpy() == within)
    values = adata.obs[column].astype(str).to_numpy()
    first = cells & (values == group1)
    second = cells & ((values == group2) if group2 is not None else (values != group1))
    return first, second


# --------------------------------------------------------------------------
# lvmzoo
# --------------------------------------------------------------------------


def lvmzoo_fits(adata, args) -> dict[str, Any]:
    import lvmzoo
    from lvmzoo.analysis import differential_expression
    from lvmzoo.models import SCVI

    data = lvmzoo.setup_anndata(adata)
    options = dict(epochs=args.epochs, validation_fraction=0.0, progress=False)
    out: dict[str, Any] = {"fits": {}}

    def timed(fn):
        before = _peak_rss_mib()
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0, _peak_rss_mib() - before

    R = args.replicates
    single0, t_single, m_single = timed(lambda: lvmzoo.fit(SCVI(), data, seed=0, **options))
    single1, _, _ = timed(lambda: lvmzoo.fit(SCVI(), data, seed=1, **options))
    ens_a, t_ens, m_ens = timed(lambda: lvmzoo.fit(SCVI(), data, seed=0, replicates=R, **options))
    ens_b, _, _ = timed(lambda: lvmzoo.fit(SCVI(), data, seed=R, replicates=R, **options))
    # R sequential single fits: the single fits already run (2) plus the rest.
    _, t_rest, _ = timed(lambda: [lvmzoo.fit(SCVI(), data, seed=s, **options)
                                  for s in range(2, R)])
    out["cost"] = {"one_fit_seconds": t_single, "ensemble_seconds": t_ens,
                   "sequential_seconds": t_single * 2 + t_rest if R >= 2 else t_single,
                   "one_fit_rss_growth_mib": m_single, "ensemble_rss_growth_mib": m_ens}
    pairs = {"single fits": (single0, single1), f"ensembles of {R}": (ens_a, ens_b)}
    out["de"], out["knn_overlap"] = {}, {}
    for pair, (a, b) in pairs.items():
        out["knn_overlap"][pair] = knn_overlap(a.latent(data), b.latent(data))
        out["de"][pair] = {}
        for name, column, g1, g2, within in COMPARISONS:
            first, second = groups(adata, column, g1, g2, within)
            codes = np.where(first, "g1", np.where(second, "g2", None))
            tops = []
            for fitted in (a, b):
                table = differential_expression(fitted, data, codes, "g1", "g2", mode="change",
                                                n_samples=args.n_samples, seed=0)
                tops.append(list(table.index[:TOP]))
            out["de"][pair][name] = jaccard(*tops)
    out["labels"] = lvmzoo_labels(adata, args)
    return out


def lvmzoo_labels(adata, args) -> dict[str, Any]:
    import lvmzoo
    from lvmzoo.analysis import expected_calibration_error
    from lvmzoo.models import SCANVI

    hidden = adata.obs["label"].to_numpy() == "Unknown"
    data = lvmzoo.setup_anndata(adata, labels_key="label")
    categories = list(data.registry.label_categories)
    truth = truth_codes(adata, categories)
    R = args.replicates
    # A validation split, so that the ensemble fits its temperature on held-out labelled cells.
    options = dict(epochs=args.epochs, validation_fraction=0.1, early_stopping=False,
                   progress=False)
    fits = {"single fits": [lvmzoo.fit(SCANVI(), data, seed=s, **options) for s in (0, 1)],
            f"ensembles of {R}": [lvmzoo.fit(SCANVI(), data, seed=s, replicates=R, **options)
                                  for s in (0, R)]}
    scored = hidden & (truth >= 0)  # a type with no labelled cell cannot be predicted
    scored[fits["single fits"][0].validation_index] = False
    result = {}
    for pair, (a, b) in fits.items():
        pa = a.predict(data, soft=True)[1].to_numpy()[scored]
        pb = b.predict(data, soft=True)[1].to_numpy()[scored]
        result[pair] = _label_scores(pa, pb, truth[scored], expected_calibration_error)
    return result


def truth_codes(adata, categories) -> np.ndarray:
    """Each cell's true type as a code of ``categories``; -1 for a type not among them."""
    lookup = {c: i for i, c in enumerate(categories)}
    return np.array([lookup.get(c, -1) for c in adata.obs["cell_type"].astype(str)])


def _label_scores(pa, pb, truth, ece) -> dict[str, Any]:
    return {"agreement": float(np.mean(pa.argmax(1) == pb.argmax(1))),
            "accuracy": [float(np.mean(p.argmax(1) == truth)) for p in (pa, pb)],
            "ece": [float(ece(p, truth)) for p in (pa, pb)], "n_cells": int(len(truth))}


# --------------------------------------------------------------------------
# scvi-tools
# --------------------------------------------------------------------------


def scvi_tools_fits(adata, args) -> dict[str, Any]:
    import scvi
    import torch

    from lvmzoo.analysis import expected_calibration_error

    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = dict(max_epochs=args.epochs, early_stopping=False, train_size=1.0,
                   enable_progress_bar=False)
    fits, t0 = [], time.perf_counter()
    for seed in (0, 1):
        scvi.settings.seed = seed
        copy = adata.copy()
        scvi.model.SCVI.setup_anndata(copy)
        model = scvi.model.SCVI(copy)
        model.train(**trainer)
        fits.append((model, copy))
    seconds = (time.perf_counter() - t0) / 2
    out = {"cost": {"one_fit_seconds": seconds},
           "knn_overlap": {"single fits": knn_overlap(*(m.get_latent_representation()
                                                        for m, _ in fits))},
           "de": {"single fits": {}}}
    for name, column, g1, g2, within in COMPARISONS:
        first, second = groups(adata, column, g1, g2, within)
        tops = []
        for model, copy in fits:
            scvi.settings.seed = 0
            table = model.differential_expression(
                copy, idx1=first, idx2=second, mode="change", batch_correction=False,
                n_samples_overall=args.n_samples)
            table = table.sort_values("proba_de", ascending=False, kind="stable")
            tops.append(list(table.index[:TOP]))
        out["de"]["single fits"][name] = jaccard(*tops)
    hidden = adata.obs["label"].to_numpy() == "Unknown"
    categories = sorted(set(adata.obs["label"].astype(str)) - {"Unknown"})
    truth = truth_codes(adata, categories)
    hidden &= truth >= 0
    probs = []
    for seed in (0, 1):
        scvi.settings.seed = seed
        copy = adata.copy()
        scvi.model.SCANVI.setup_anndata(copy, labels_key="label", unlabeled_category="Unknown")
        model = scvi.model.SCANVI(copy)
        model.train(**trainer)
        p = model.predict(copy, soft=True)
        probs.append(p.reindex(columns=categories, fill_value=0.0).to_numpy()[hidden])
    out["labels"] = {"single fits": _label_scores(*probs, truth[hidden],
                                                  expected_calibration_error)}
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lz, st = report["lvmzoo"], report.get("scvi_tools")
    R = s["replicates"]
    rows = ["| pair of fits (different seeds) | " + " | ".join(
        f"DE top-{TOP} Jaccard: {c[0]}" for c in COMPARISONS)
        + f" | {K_NEIGHBOURS}-NN overlap | label agreement | accuracy | ECE |",
        "|---|" + "---|" * (len(COMPARISONS) + 4)]

    def row(tool, pair, result):
        de = " | ".join(f"{result['de'][pair][c[0]]:.3f}" for c in COMPARISONS)
        labels = result["labels"][pair]
        acc = " / ".join(f"{a:.3f}" for a in labels["accuracy"])
        ece = " / ".join(f"{e:.3f}" for e in labels["ece"])
        return (f"| {tool}: two {pair} | {de} | {result['knn_overlap'][pair]:.3f} | "
                f"{labels['agreement']:.3f} | {acc} | {ece} |")

    rows.append(row("lvmzoo", "single fits", lz))
    rows.append(row("lvmzoo", f"ensembles of {R}", lz))
    if st:
        rows.append(row("scvi-tools", "single fits", st))
    c = lz["cost"]
    cost = (f"Cost (lvmzoo scVI, {s['epochs']} epochs): one fit {c['one_fit_seconds']:.1f} s, "
            f"an ensemble of {R} in one vmapped program {c['ensemble_seconds']:.1f} s "
            f"({c['ensemble_seconds'] / c['one_fit_seconds']:.2f}× one fit), {R} sequential "
            f"fits {c['sequential_seconds']:.1f} s; peak RSS growth one fit "
            f"{c['one_fit_rss_growth_mib']:.0f} MiB, ensemble {c['ensemble_rss_growth_mib']:.0f} MiB "
            "(growth of the process's peak over what came before). The first single fit "
            "includes compiling; later fits reuse the compilation cache."
            + (f" scvi-tools: one fit {st['cost']['one_fit_seconds']:.1f} s." if st else ""))
    m = report["machine"]
    return "\n".join([
        "# Seed ensembles: agreement between independent fits",
        "",
        f"Kang PBMCs ({s['n_cells']:,} cells × {s['n_genes']:,} genes), {s['epochs']} epochs "
        f"per fit, scVI/SCANVI defaults, DE in change mode with {s['n_samples']} draws; labels: "
        f"{LABELLED_SHARE:.0%} of cells labelled, scored on the {lz['labels']['single fits']['n_cells']:,} "
        "unlabelled cells outside the validation split. Accuracy and ECE: each of the two fits.",
        "",
        *rows,
        "",
        cost,
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('ram_gib', '?')} GiB RAM, {m.get('date', '')}; load average at start "
        f"{m.get('load_average_at_start')}: other work shared the cores during the run, so "
        "seconds are upper bounds. "
        f"Command: `python benchmarks/bench_ensembles.py --epochs {s['epochs']}`.",
    ]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--replicates", type=int, default=5)
    parser.add_argument("--n-samples", type=int, default=5000)
    parser.add_argument("--skip-scvi-tools", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.replicates, args.n_samples = 3, 2, 200
    adata, _ = load(args.quick)
    report = {"settings": {"epochs": args.epochs, "replicates": args.replicates,
                           "n_samples": args.n_samples, "n_cells": int(adata.n_obs),
                           "n_genes": int(adata.n_vars), "top": TOP},
              "machine": hardware()}
    t0 = time.perf_counter()
    report["lvmzoo"] = lvmzoo_fits(adata, args)
    print(f"lvmzoo done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.skip_scvi_tools:
        report["scvi_tools"] = scvi_tools_fits(adata, args)
    text = render(report)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        write_text(RESULTS / "ensembles.json", json.dumps(report, indent=2))
        write_text(RESULTS / "ensembles.md", text)


if __name__ == "__main__":
    main()
