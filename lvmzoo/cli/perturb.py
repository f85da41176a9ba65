"""``lvmzoo perturb RUN [DATA]``: predict a held-out cell type's response, beside baselines;
evaluate it when DATA holds that type's measured perturbed cells."""

from __future__ import annotations

import argparse
import json
import textwrap
import warnings
from pathlib import Path

from lvmzoo.cli._common import (UsageError, _de_run_dirs, _input_data, _load_for_de, _output_dir,
                                _read_backed, _write_h5ad)


def add_parser(commands) -> None:
    perturb = commands.add_parser(
        "perturb",
        help="predict how a held-out cell type responds to a perturbation, and score it "
             "beside baselines",
        description=textwrap.fill(
            "Load the model saved in RUN_DIR (fitted without the held-out type's perturbed "
            "cells: 'lvmzoo fit ... --exclude CELL_TYPE_KEY=TYPE,CONDITION_KEY=PERTURBED'), "
            "predict the --predict type's control cells under the --perturbed condition "
            "(counterfactual decoding for models with the perturbation in their story, such "
            "as cpa; latent arithmetic as scGen for vae and scvi). Writes predicted.h5ad (X: "
            "counts drawn from the model; layers['expected']) and perturbation.png into --out. "
            "When DATA holds measured perturbed cells of that type, the prediction is also "
            "compared with them beside the no-change and mean-shift baselines: R² of per-gene "
            "mean log-normalised expression (all genes, top differentially expressed genes), "
            "correlation of the predicted and measured change, energy distance, in metrics.csv "
            "and metrics.md; the figure shows predicted vs measured means. Without them the "
            "prediction is not evaluated: gene_means.csv holds the per-gene mean of the "
            "control cells, the prediction and the mean-shift baseline, and the figure shows "
            "predicted vs control means. DATA is read a block of cells at a time, from disk "
            "with --backed (automatic for a file larger than a quarter of RAM): memory then holds "
            "the predicted cells, not DATA."
        ),
    )
    perturb.add_argument("run_dir", metavar="RUN_DIR",
                         help="the --out directory of 'lvmzoo fit' (or its model/ subdirectory)")
    perturb.add_argument("data", metavar="DATA", nargs="?", default=None,
                         help=".h5ad file (or .zarr AnnData store) of raw counts with the "
                              "model's genes and obs columns, including the --predict type's "
                              "control cells and, to evaluate the prediction, its measured "
                              "perturbed cells (default: the bundled 'kang_ifnb' data set)")
    perturb.add_argument("--condition-key", metavar="K", default="condition",
                         help="obs column of conditions (default: %(default)s)")
    perturb.add_argument("--control", metavar="C", default="ctrl",
                         help="control condition (default: %(default)s)")
    perturb.add_argument("--perturbed", metavar="P", default="stim",
                         help="perturbed condition to predict (default: %(default)s)")
    perturb.add_argument("--cell-type-key", metavar="K", default="cell_type",
                         help="obs column of cell types (default: %(default)s)")
    perturb.add_argument("--predict", required=True, metavar="TYPE",
                         help="the held-out cell type whose perturbed cells are predicted")
    perturb.add_argument("--method", choices=("auto", "counterfactual", "latent_arithmetic"),
                         default="auto",
                         help="counterfactual (cpa), latent_arithmetic (vae, scvi), or auto: "
                              "the first the model offers (default: %(default)s)")
    perturb.add_argument("--dose", type=float, metavar="D", default=None,
                         help="dose to predict at, for models with a dose key (default: the "
                              "most common dose of the perturbed cells)")
    perturb.add_argument("--layer", metavar="L", default=None,
                         help="layer of DATA with the raw counts (default: .X)")
    perturb.add_argument("--n-top-genes", type=int, metavar="N", default=100,
                         help="differentially expressed genes of the 'top' metrics "
                              "(default: %(default)s)")
    perturb.add_argument("--seed", type=int, metavar="S", default=0,
                         help="seed of the predicted counts (default: %(default)s)")
    perturb.add_argument("--out", required=True, metavar="DIR",
                         help="output directory (created if needed; earlier outputs replaced)")
    perturb.add_argument("--backed", action=argparse.BooleanOptionalAction, default=None,
                         help="read DATA's cells from disk (a backed .h5ad or a .zarr store) a "
                              "block at a time instead of loading them; the predictions and "
                              "metrics are the same (default: on when DATA is larger than a "
                              "quarter of this machine's RAM, as for fit; a .zarr store is "
                              "always read from disk)")
    perturb.set_defaults(run=run, command_parser=perturb)


def run(args) -> int:
    from lvmzoo.analysis.perturbation import perturbation_design, prediction_method

    if args.n_top_genes < 1:
        raise UsageError(f"--n-top-genes must be at least 1, got {args.n_top_genes}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    model_dir, _ = _de_run_dirs(args.run_dir)
    fitted = _load_for_de(model_dir, args.run_dir)
    adata, source = _read_data(args)
    design = dict(condition_key=args.condition_key, control=args.control,
                  perturbed=args.perturbed, cell_type_key=args.cell_type_key,
                  cell_type=args.predict)
    cells = perturbation_design(adata, **design)  # bad input fails here, before any warning
    try:
        prediction_method(fitted.model, args.method)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cells.held_out_perturbed.any():
        return _predict_and_evaluate(fitted, adata, design, source, model_dir, args)
    return _predict_only(fitted, adata, design, source, args)


# Files written by one path and not the other: a rerun into the same --out removes the other's.
_EVALUATION_FILES = ("metrics.csv", "metrics.md")
_PREDICTION_ONLY_FILES = ("gene_means.csv",)


def _predict_and_evaluate(fitted, adata, design, source, model_dir, args) -> int:
    """The benchmark: measured perturbed cells of the predicted type are there to score against."""
    from lvmzoo.analysis.perturbation import compare_perturbation, markdown_table, predict_perturbation
    from lvmzoo.data.registry import DataWarning
    from lvmzoo.io import atomic_write_text
    from lvmzoo.plotting import save_perturbation_plot

    if not _fit_excluded(model_dir, args.cell_type_key, args.predict, args.condition_key,
                         args.perturbed):
        warnings.warn(
            f"the model in {args.run_dir} was not fitted with --exclude "
            f"{args.cell_type_key}={args.predict},{args.condition_key}={args.perturbed}: it may "
            "have seen the cells it predicts, so the metrics are not those of a held-out "
            "prediction", DataWarning)
    predicted = predict_perturbation(fitted, adata, **design, method=args.method,
                                     dose=args.dose, seed=args.seed)
    name = _method_name(fitted, predicted)
    evaluation = compare_perturbation(adata, {name: predicted}, **design, layer=args.layer,
                                      n_top_genes=args.n_top_genes, seed=args.seed)
    out = _output_dir(args.out)
    _remove_stale(out, _PREDICTION_ONLY_FILES)
    _write_h5ad(out / "predicted.h5ad", predicted)
    metrics = evaluation.metrics
    atomic_write_text(out / "metrics.csv", metrics.to_csv())
    atomic_write_text(out / "metrics.md", markdown_table(metrics))
    save_perturbation_plot(evaluation, out / "perturbation.png")
    print(_perturb_summary(evaluation, name, source, args, out))
    return 0


def _predict_only(fitted, adata, design, source, args) -> int:
    """No measured perturbed cells of the predicted type: predict, describe, do not score."""
    from lvmzoo.analysis.perturbation import predict_perturbation, prediction_profiles
    from lvmzoo.io import atomic_write_text
    from lvmzoo.plotting import save_prediction_plot

    predicted = predict_perturbation(fitted, adata, **design, method=args.method,
                                     dose=args.dose, seed=args.seed)
    name = _method_name(fitted, predicted)
    profiles = prediction_profiles(adata, {name: predicted}, **design, layer=args.layer,
                                   n_top_genes=args.n_top_genes)
    out = _output_dir(args.out)
    _remove_stale(out, _EVALUATION_FILES)
    _write_h5ad(out / "predicted.h5ad", predicted)
    atomic_write_text(out / "gene_means.csv", profiles.gene_means.to_csv())
    save_prediction_plot(profiles, out / "perturbation.png")
    print(_prediction_summary(profiles, name, source, args, out))
    return 0


def _read_data(args):
    """``(adata, description)``: DATA in memory, or with its matrix on disk (``--backed``, a
    .zarr store, or a file larger than a quarter of RAM); the bundled data set in memory."""
    from lvmzoo.cli.fit import _train_from_disk

    if args.data is None:
        if args.backed:
            raise UsageError("--backed reads DATA from disk, and no DATA was given (the bundled "
                             "'kang_ifnb' data set is in memory); give an .h5ad file or a "
                             ".zarr store, or leave out --backed")
        return _input_data(None, None, "kang_ifnb")
    if _train_from_disk(args):
        return _read_backed(args.data), args.data
    return _input_data(args.data, None, "kang_ifnb")


def _method_name(fitted, predicted) -> str:
    return f"{fitted.model.name} ({predicted.uns['perturbation']['method'].replace('_', ' ')})"


def _remove_stale(out: Path, names) -> None:
    for name in names:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise UsageError(f"cannot remove the earlier {out / name}: {err.strerror}") from None


def _fit_excluded(model_dir: Path, cell_type_key, cell_type, condition_key, perturbed) -> bool:
    """Whether the saved fit left out (at least) the held-out type's perturbed cells."""
    from lvmzoo.io import MODEL_FILE

    settings = json.loads((model_dir / MODEL_FILE).read_text("utf-8")).get("fit", {})
    wanted = {cell_type_key: str(cell_type), condition_key: str(perturbed)}
    for group in settings.get("exclude") or []:
        cells = group.get("cells", {})
        # A group with a subset of these conditions excludes even more cells.
        if cells and all(wanted.get(k) == str(v) for k, v in cells.items()):
            return True
    return False


def _perturb_summary(evaluation, name, source, args, out) -> str:
    from lvmzoo.analysis.perturbation import markdown_table

    metrics = evaluation.metrics
    design = evaluation.design
    row, shift = metrics.loc[name], metrics.loc["mean shift"]
    better = [m for m in ("r2", "r2_top", "delta_pearson", "delta_pearson_top")
              if row[m] > shift[m]]
    if row["energy_distance"] < shift["energy_distance"]:
        better.append("energy_distance")
    verdict = (f"beats the mean-shift baseline on {', '.join(better)}" if better
               else "does not beat the mean-shift baseline on any metric")
    return "\n".join([
        f"predicted {int(design.held_out_control.sum()):,} {design.cell_type!r} cells under "
        f"{design.perturbed!r} from their {design.control!r} cells ({source}); "
        f"compared with {int(design.held_out_perturbed.sum()):,} measured ones, top "
        f"{args.n_top_genes} genes by |Welch t|",
        markdown_table(metrics).rstrip(),
        f"{name} {verdict}",
        f"wrote {out}/: predicted.h5ad, metrics.csv, metrics.md, perturbation.png",
    ])


def _prediction_summary(profiles, name, source, args, out) -> str:
    from lvmzoo.analysis.perturbation import pearson

    design = profiles.design
    means = profiles.gene_means
    change = means[name] - means["control"]
    shown = ", ".join(f"{gene} {change[gene]:+.2f}" for gene in profiles.top_genes[:10])
    if "mean shift" in means.columns:
        r = pearson(change, means["mean shift"] - means["control"])
        baseline = (f"mean-shift baseline (the other types' average change, from "
                    f"{len(design.other_types)} types): its per-gene change correlates with "
                    f"{name}'s at Pearson r {r:.3f}")
    else:
        baseline = ("no mean-shift baseline: no other cell type was measured in both "
                    f"{design.control!r} and {design.perturbed!r}")
    return "\n".join([
        f"predicted {int(design.held_out_control.sum()):,} {design.cell_type!r} cells under "
        f"{design.perturbed!r} from their {design.control!r} cells ({source})",
        f"no measured {design.perturbed!r} {design.cell_type!r} cells in {source}: "
        "predictions written, not evaluated",
        f"largest predicted changes of mean log1p CP10k: {shown}",
        baseline,
        f"wrote {out}/: predicted.h5ad, gene_means.csv, perturbation.png",
    ])
