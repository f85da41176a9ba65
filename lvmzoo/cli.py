"""The ``lvmzoo`` command: fit a zoo model, evaluate a saved one, list data sets.

A thin layer over the Python API; every step is a call a notebook could make::

    lvmzoo fit ppca data.h5ad --out runs/ppca     # setup_anndata → fit → save_model
    lvmzoo evaluate runs/ppca new.h5ad            # load_model → query_anndata → evaluate
    lvmzoo de runs/scvi --groupby cell_type --group1 B --out de.csv
                                                  # load_model → differential_expression
    lvmzoo perturb runs/cpa --predict B --out p   # load_model → predict/evaluate_perturbation
    lvmzoo datasets                               # datasets.list_datasets()

``lvmzoo fit`` writes into ``--out``:

* ``model/`` – the saved model (:func:`lvmzoo.io.save_model`);
* ``history.json`` – per-epoch ``loss``, ``validation_loss`` (``null`` without
  a validation set) and wall ``seconds``, plus ``compile_seconds``;
* ``loss.png`` – the loss curves;
* ``result.h5ad`` – a copy of the input with only the additions of
  :meth:`FittedModel.annotate`: ``obsm["X_<model>"]`` and the model's
  documented extras;
* ``metrics.json`` – ``{"train": ..., "validation": ... or null}``, each the
  dict of :meth:`FittedModel.evaluate` on those cells.

Exit status: 0 on success; 2 for a usage or data error (one line
``lvmzoo: error: ...`` on stderr); 1 when the fit diverged (the last finite
parameters are saved); 130 when interrupted with Ctrl-C (the model so far is
saved).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

PROG = "lvmzoo"
EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130
# Hyperparameters the CLI exposes, passed only to models whose dataclass has them.
MODEL_OPTIONS = ("n_latent", "n_components", "n_hidden", "n_layers", "likelihood", "dispersion",
                 "latent_library", "perturbation_key", "covariate_keys", "dose_key")
# Smallest accepted value of the integer options (1 for those not listed).
_MINIMUM = {"n_layers": 0}


class UsageError(Exception):
    """A mistake in the command line or the input files; reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are exceptions (one line, no usage dump)."""

    def error(self, message):  # noqa: D102 - argparse hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``lvmzoo`` command line; returns the exit status.

    Args:
      argv: arguments without the program name; ``None`` reads ``sys.argv``.
    """
    parser = build_parser()
    try:
        args = parse_args(parser, sys.argv[1:] if argv is None else list(argv))
        with warnings.catch_warnings():
            _one_line_data_warnings()
            return args.run(args)
    except SystemExit as exit_:  # --help and --version exit through argparse
        return int(exit_.code or 0)
    except UsageError as err:
        return _usage_error(err)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from lvmzoo.data.registry import DataError

        if isinstance(err, DataError):
            return _usage_error(err)
        raise  # a genuine bug: keep the traceback


def _one_line_data_warnings() -> None:
    """Show the data layer's warnings as ``lvmzoo: warning: ...`` (no file/line dump)."""
    from lvmzoo.data.registry import DataWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _usage_error(err: Exception) -> int:
    message = " ".join(str(err).split())  # always exactly one line
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, allowing options before optional positionals (``fit M --epochs 3 D``).

    Plain argparse binds ``fit``'s optional ``DATA`` as soon as it meets ``MODEL``
    and then rejects a ``DATA`` given after an option; the command's arguments
    are then parsed again with ``parse_intermixed_args``, which has no such limit.
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = args.command
        args = args.command_parser.parse_intermixed_args(argv[argv.index(command) + 1:])
        args.command = command
    return args


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lvmzoo`` and its subcommands."""
    from lvmzoo import __version__
    from lvmzoo.models import MODELS

    parser = _Parser(
        prog=PROG,
        description="Fit and evaluate latent-variable models of single-cell RNA-seq data "
        "(a JAX / NumPyro model zoo).",
        epilog="Run 'lvmzoo COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_fit(commands, MODELS)
    _add_evaluate(commands)
    _add_de(commands)
    _add_compare(commands)
    _add_perturb(commands)
    listing = commands.add_parser(
        "datasets", help="list the bundled data sets",
        description="List the data sets bundled with lvmzoo, with their shapes.",
    )
    listing.set_defaults(run=_datasets, command_parser=listing)
    return parser


def _add_fit(commands, models) -> None:
    from lvmzoo.data.registry import KINDS
    from lvmzoo.data.transforms import TRANSFORMS
    from lvmzoo.datasets import DEFAULT_DATASET

    model_lines = "\n".join(
        f"  {name:<8} {_first_line(cls.__doc__)}" for name, cls in sorted(models.items())
    )
    fit = commands.add_parser(
        "fit",
        help="fit a model to an .h5ad file and save model, latent, metrics and plots",
        description=textwrap.fill(
            "Fit MODEL to DATA by stochastic variational inference and write into --out: "
            "model/ (the saved model), history.json (losses and seconds per epoch), loss.png, "
            "result.h5ad (the input plus obsm['X_<MODEL>'] and the model's documented extras) "
            "and metrics.json (train and validation log-likelihood and ELBO)."
        ),
        epilog=f"models:\n{model_lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("model", metavar="MODEL",
                     help=f"model to fit, one of: {', '.join(sorted(models))}")
    fit.add_argument("data", metavar="DATA", nargs="?", default=None,
                     help="cells × genes .h5ad file (default: the bundled data set of "
                          f"--dataset, '{DEFAULT_DATASET}')")
    fit.add_argument("--dataset", metavar="NAME", default=None,
                     help="fit a bundled data set instead of DATA ('lvmzoo datasets' lists "
                          f"them; default: '{DEFAULT_DATASET}')")
    fit.add_argument("--exclude", metavar="KEY=VALUE[,KEY=VALUE...]", action="append",
                     default=[],
                     help="leave out the cells with all these obs values, e.g. "
                          "cell_type=B,condition=stim to fit without the stimulated B cells "
                          "and predict them later with 'lvmzoo perturb'; repeat for more "
                          "groups (recorded in model.json; result.h5ad holds the fitted cells)")
    fit.add_argument("--out", required=True, metavar="DIR",
                     help="output directory (created if needed; earlier outputs are replaced)")
    fit.add_argument("--layer", metavar="L", default=None,
                     help="AnnData layer with the observations (default: .X)")
    fit.add_argument("--batch-key", metavar="K", default=None,
                     help="categorical obs column of batches (default: one batch)")
    fit.add_argument("--labels-key", metavar="K", default=None,
                     help="categorical obs column of cell labels (default: none)")
    fit.add_argument("--n-latent", type=int, metavar="N", default=None,
                     help="latent dimensions, for models that have them (default: the model's)")
    fit.add_argument("--n-components", type=int, metavar="N", default=None,
                     help="mixture components, for mixture models (default: the model's)")
    fit.add_argument("--n-hidden", type=int, metavar="N", default=None,
                     help="width of the hidden layers, for neural models (default: the model's)")
    fit.add_argument("--n-layers", type=int, metavar="N", default=None,
                     help="hidden layers per network, for neural models; 0 = linear "
                          "(default: the model's)")
    fit.add_argument("--likelihood", metavar="NAME", default=None,
                     help="observation model, for models that offer several, e.g. "
                          "zinb, nb or poisson for scvi (default: the model's)")
    fit.add_argument("--dispersion", metavar="NAME", default=None,
                     help="what the NB dispersion depends on, for scvi: gene, gene-batch, "
                          "gene-label or gene-cell (default: the model's)")
    fit.add_argument("--latent-library", action=argparse.BooleanOptionalAction, default=None,
                     help="make the library size latent rather than observed, for scvi "
                          "(default: the model's)")
    fit.add_argument("--perturbation-key", metavar="K", default=None,
                     help="categorical obs column of the perturbation, for cpa "
                          "(default: the model's, 'condition')")
    fit.add_argument("--covariate-keys", metavar="K[,K...]", type=_names, default=None,
                     help="categorical obs columns whose effects add to the latent, for cpa "
                          "(default: the model's, 'cell_type')")
    fit.add_argument("--dose-key", metavar="K", default=None,
                     help="numeric obs column of the dose (0 for control cells), for cpa "
                          "(default: none)")
    fit.add_argument("--epochs", type=int, metavar="N", default=100,
                     help="passes over the training cells (default: %(default)s)")
    fit.add_argument("--batch-size", type=int, metavar="N", default=128,
                     help="cells per optimisation step (default: %(default)s)")
    fit.add_argument("--lr", type=float, metavar="X", default=None,
                     help="Adam learning rate (default: the model's default_learning_rate)")
    fit.add_argument("--seed", type=int, metavar="S", default=0,
                     help="random seed; a fit is reproducible for a given seed "
                          "(default: %(default)s)")
    fit.add_argument("--no-progress", action="store_true",
                     help="do not show the per-epoch progress bar")
    fit.add_argument("--validation-fraction", type=float, metavar="F", default=0.1,
                     help="share of cells held out for the validation loss and metrics, "
                          "in [0, 1); 0 holds none out (default: %(default)s)")
    fit.add_argument("--transform", choices=sorted(TRANSFORMS), default=None,
                     help="transform of the input before fitting: log1p_cp10k = "
                          "log(1 + 1e4 * x / cell total), none = as is (default: the model's "
                          "default_transform for count input — log1p_cp10k for Gaussian "
                          "models, none for count models — and none otherwise)")
    fit.add_argument("--kind", choices=KINDS, default=None,
                     help="what the input values are: raw counts, continuous values or 0/1 "
                          "(default: binary for binary models, counts otherwise)")
    fit.set_defaults(run=_fit, command_parser=fit)


def _names(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``: a comma-separated list of obs column names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one column name")
    return names


def _first_line(doc: Optional[str]) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].replace("``", "") if lines else ""


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="score a saved model on an .h5ad file (log-likelihood, ELBO)",
        description="Load the model saved in RUN_DIR, register DATA against its saved genes, "
        "categories and transform, and print its average per-cell log-likelihood (exact "
        "where the model has one, else importance-sampled) and ELBO as JSON.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR",
                          help="a saved model: the --out directory of 'lvmzoo fit' "
                               "or its model/ subdirectory")
    evaluate.add_argument("data", metavar="DATA",
                          help=".h5ad file with the model's genes (extra genes are ignored)")
    evaluate.add_argument("--out", metavar="FILE", default=None,
                          help="also write the metrics JSON to FILE")
    evaluate.add_argument("--n-samples", type=int, metavar="K", default=100,
                          help="importance samples per cell when there is no exact "
                               "log-likelihood (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, metavar="S", default=0,
                          help="random seed of the importance samples (default: %(default)s)")
    evaluate.set_defaults(run=_evaluate, command_parser=evaluate)


def _add_de(commands) -> None:
    de = commands.add_parser(
        "de",
        help="differential expression between groups of cells with a saved scvi model",
        description=textwrap.fill(
            "Load the model saved in RUN_DIR, register DATA against it, and compare the "
            "expression of every gene between two groups of cells (Bayesian differential "
            "expression as in scvi-tools: posterior draws of normalised expression, "
            "batch-corrected). Writes one CSV row per gene and comparison to --out, sorted by "
            "Bayes factor (vanilla mode) or probability of DE (change mode), and prints the "
            "top genes."
        ),
    )
    de.add_argument("run_dir", metavar="RUN_DIR",
                    help="the --out directory of 'lvmzoo fit' (or its model/ subdirectory)")
    de.add_argument("data", metavar="DATA", nargs="?", default=None,
                    help=".h5ad file with the cells and the --groupby column (default: "
                         "RUN_DIR/result.h5ad, written by 'lvmzoo fit')")
    de.add_argument("--groupby", required=True, metavar="KEY",
                    help="categorical obs column defining the groups")
    de.add_argument("--group1", metavar="G", default=None,
                    help="group to test (default: every group in turn)")
    de.add_argument("--group2", metavar="G", default=None,
                    help="reference group (default: all other cells, 'Rest')")
    de.add_argument("--mode", choices=("vanilla", "change"), default="vanilla",
                    help="vanilla: P(expression 1 > expression 2) and its Bayes factor; "
                         "change: probability that |log2 fold change| > --delta, LFC "
                         "summaries and FDR-controlled calls (default: %(default)s)")
    de.add_argument("--delta", type=float, metavar="D", default=0.25,
                    help="smallest |log2 fold change| that counts as DE, change mode "
                         "(default: %(default)s)")
    de.add_argument("--fdr-target", type=float, metavar="F", default=0.05,
                    help="posterior expected FDR of the is_de_fdr_F calls, change mode "
                         "(default: %(default)s)")
    de.add_argument("--n-samples", type=int, metavar="N", default=5000,
                    help="posterior draws of each group's expression (default: %(default)s)")
    de.add_argument("--no-batch-correction", action="store_true",
                    help="decode each cell in its own batch instead of averaging over the "
                         "batches of the two groups")
    de.add_argument("--seed", type=int, metavar="S", default=0,
                    help="random seed of the draws (default: %(default)s)")
    de.add_argument("--out", required=True, metavar="FILE",
                    help="CSV file to write (its directory is created if needed)")
    de.set_defaults(run=_de, command_parser=de)


def _add_compare(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="compare inference methods (SVI guides, NUTS) on zoo models",
        description=textwrap.fill(
            "Fit each MODEL with each method on the same training cells and score them on the "
            "same held-out cells: held-out log-likelihood (importance sampling with the method's "
            "posterior; exact where the model has a closed form), ELBO, the gap to the exact "
            "log-likelihood (= KL to the exact posterior), Pareto k-hat, R-hat/ESS for NUTS, "
            "wall and compile time. Writes compare.csv, compare.md and compare.png into --out. "
            "NUTS and full-rank guides scale badly: the data are cut to --n-cells cells and the "
            "--n-genes most detected genes."
        ),
    )
    compare.add_argument("models", metavar="MODEL[,MODEL...]",
                         help="comma-separated zoo model names, e.g. ppca,fa")
    compare.add_argument("data", metavar="DATA", nargs="?", default=None,
                         help=".h5ad file of raw counts (default: the bundled data set)")
    compare.add_argument("--methods", required=True, metavar="M[,M...]",
                         help="comma-separated methods: amortized, mean_field, low_rank, "
                              "full_rank, flow, map, laplace, nuts")
    compare.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    compare.add_argument("--layer", metavar="L", default=None,
                         help="AnnData layer with raw counts (default: .X)")
    compare.add_argument("--n-cells", type=int, metavar="N", default=300,
                         help="random cells used, split into training and held-out "
                              "(default: %(default)s)")
    compare.add_argument("--n-genes", type=int, metavar="N", default=20,
                         help="most frequently detected genes used (default: %(default)s)")
    compare.add_argument("--n-latent", type=int, metavar="K", default=2,
                         help="latent dimensions of models that have n_latent (PPCA, FA, VAE, "
                              "scVI); small, so NUTS and full-rank guides stay feasible "
                              "(default: %(default)s)")
    compare.add_argument("--n-components", type=int, metavar="K", default=3,
                         help="mixture components of the GMM (default: %(default)s)")
    compare.add_argument("--epochs", type=int, metavar="N", default=300,
                         help="SVI epochs per method (default: %(default)s)")
    compare.add_argument("--batch-size", type=int, metavar="N", default=64,
                         help="SVI minibatch size; joint guides use the full batch "
                              "(default: %(default)s)")
    compare.add_argument("--n-samples", type=int, metavar="K", default=100,
                         help="importance samples per held-out cell (default: %(default)s)")
    compare.add_argument("--num-warmup", type=int, metavar="N", default=300,
                         help="NUTS warm-up draws per chain (default: %(default)s)")
    compare.add_argument("--num-samples", type=int, metavar="N", default=300,
                         help="NUTS draws per chain (default: %(default)s)")
    compare.add_argument("--num-chains", type=int, metavar="N", default=4,
                         help="NUTS chains, run vectorised (default: %(default)s)")
    compare.add_argument("--seed", type=int, metavar="S", default=0,
                         help="seed of the cell subset, the split and every method "
                              "(default: %(default)s)")
    compare.set_defaults(run=_compare, command_parser=compare)


def _add_perturb(commands) -> None:
    perturb = commands.add_parser(
        "perturb",
        help="predict how a held-out cell type responds to a perturbation, and score it "
             "beside baselines",
        description=textwrap.fill(
            "Load the model saved in RUN_DIR (fitted without the held-out type's perturbed "
            "cells: 'lvmzoo fit ... --exclude CELL_TYPE_KEY=TYPE,CONDITION_KEY=PERTURBED'), "
            "predict the --predict type's control cells under the --perturbed condition "
            "(counterfactual decoding for models with the perturbation in their story, such "
            "as cpa; latent arithmetic as scGen for vae and scvi), and compare the prediction "
            "with the measured perturbed cells of that type beside the no-change and "
            "mean-shift baselines: R² of per-gene mean log-normalised expression (all genes, "
            "top differentially expressed genes), correlation of the predicted and measured "
            "change, energy distance. Writes predicted.h5ad (X: counts drawn from the model; "
            "layers['expected']), metrics.csv, metrics.md and perturbation.png into --out."
        ),
    )
    perturb.add_argument("run_dir", metavar="RUN_DIR",
                         help="the --out directory of 'lvmzoo fit' (or its model/ subdirectory)")
    perturb.add_argument("data", metavar="DATA", nargs="?", default=None,
                         help=".h5ad file of raw counts with the model's genes and obs columns, "
                              "including the held-out cells (default: the bundled "
                              "'kang_ifnb' data set)")
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
    perturb.set_defaults(run=_perturb, command_parser=perturb)


# --------------------------------------------------------------------------
# lvmzoo compare
# --------------------------------------------------------------------------


def _compare(args) -> int:
    import numpy as np
    import pandas as pd

    from lvmzoo import datasets
    from lvmzoo.data.registry import setup_anndata
    from lvmzoo.infer.compare import CompareSettings, compare, comparison_figure, markdown_table
    from lvmzoo.infer.guides import GUIDES
    from lvmzoo.io import atomic_write_file, atomic_write_text

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    classes = [_model_class(m) for m in models]
    unknown = [m for m in methods if m not in GUIDES and m != "nuts"]
    if not methods or unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose "
                         f"from {', '.join([*GUIDES, 'nuts'])}")
    for option in ("n_cells", "n_genes", "n_latent", "n_components", "epochs", "batch_size",
                   "n_samples", "num_warmup", "num_samples", "num_chains"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1")
    adata = datasets.load(datasets.DEFAULT_DATASET) if args.data is None else _read_h5ad(args.data)
    adata = _compare_subset(adata, args, np)
    out = _output_dir(args.out)
    settings = CompareSettings(
        epochs=args.epochs, batch_size=args.batch_size, n_samples=args.n_samples,
        num_warmup=args.num_warmup, num_samples=args.num_samples, num_chains=args.num_chains,
        seed=args.seed)
    tables = []
    for cls in classes:
        fields = {f.name for f in dataclasses.fields(cls)}
        sizes = {"n_latent": args.n_latent, "n_components": args.n_components}
        model = cls(**{k: v for k, v in sizes.items() if k in fields})
        kind = "binary" if model.data_kind == "binary" else "counts"
        data = setup_anndata(adata, layer=args.layer, kind=kind,
                             transform=model.default_transform if kind == "counts" else "none",
                             **model.registration())
        tables.append(compare([model], methods, data, settings, progress=True))
    table = pd.concat(tables, ignore_index=True)
    atomic_write_text(out / "compare.csv", table.to_csv(index=False))
    atomic_write_text(out / "compare.md", markdown_table(table))
    figure = comparison_figure(table)
    atomic_write_file(out / "compare.png", lambda f: figure.savefig(f, format="png", dpi=120))
    print(markdown_table(table))
    print(f"wrote {out}/: compare.csv, compare.md, compare.png")
    return 0


def _compare_subset(adata, args, np):
    """``--n-cells`` random cells and the ``--n-genes`` most detected genes, non-empty."""
    x = adata.layers[args.layer] if args.layer else adata.X
    detected = np.asarray((x > 0).mean(axis=0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[: args.n_genes])
    subset = adata[:, genes]
    x = subset.layers[args.layer] if args.layer else subset.X
    nonempty = np.flatnonzero(np.asarray(x.sum(axis=1)).ravel() > 0)
    rng = np.random.default_rng(args.seed)
    cells = np.sort(rng.choice(nonempty, size=min(args.n_cells, len(nonempty)), replace=False))
    return subset[cells].copy()


# --------------------------------------------------------------------------
# lvmzoo fit
# --------------------------------------------------------------------------


def _fit(args) -> int:
    from lvmzoo import datasets
    from lvmzoo.data.registry import setup_anndata
    from lvmzoo.infer.svi import FitDivergedError, fit

    cls = _model_class(args.model)
    try:
        model = cls(**_hyperparameters(cls, args))
    except ValueError as err:  # the model's own check of its hyperparameters
        raise UsageError(f"{args.model}: {err}") from None
    _check_fit_ranges(args)
    # data_kind / default_transform may depend on the instance (e.g. a VAE's likelihood).
    kind = args.kind or ("binary" if model.data_kind == "binary" else "counts")
    transform = args.transform or (model.default_transform if kind == "counts" else "none")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")

    adata, source = _input_data(args.data, args.dataset, datasets.DEFAULT_DATASET)
    adata, excluded = _excluded(adata, args.exclude)
    data = setup_anndata(adata, layer=args.layer, batch_key=args.batch_key,
                         labels_key=args.labels_key, kind=kind, transform=transform,
                         **model.registration())
    _check_model_accepts(model, data)
    out = _output_dir(args.out)
    settings = {
        "epochs": args.epochs, "requested_batch_size": args.batch_size,
        "learning_rate": model.default_learning_rate if args.lr is None else args.lr,
        "validation_fraction": args.validation_fraction, "data": source,
        "exclude": excluded, "n_excluded": sum(g["n_cells"] for g in excluded),
    }

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The CLI reports an interrupted fit itself (below); skip the driver's warning.
            warnings.filterwarnings("ignore", message="fit interrupted", category=UserWarning)
            fitted = fit(model, data, learning_rate=settings["learning_rate"],
                         epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         validation_fraction=args.validation_fraction,
                         progress=not args.no_progress)
    except FitDivergedError as err:
        _save_fit(out, err.result, settings)
        print(f"{PROG}: error: {' '.join(str(err).split())} "
              f"The model with those parameters is saved in {out / 'model'}.", file=sys.stderr)
        return EXIT_DIVERGED
    if fitted.interrupted:
        _save_fit(out, fitted, settings)
        print(f"{PROG}: interrupted after {len(fitted.history['epoch'])} epochs; the model so "
              f"far is saved in {out / 'model'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    fit_seconds = time.perf_counter() - started

    _save_fit(out, fitted, settings)
    annotated, added = fitted.annotate(adata, data)
    _write_h5ad(out / "result.h5ad", annotated)
    metrics = _fit_metrics(fitted, data)
    _write_json(out / "metrics.json", metrics)
    print(_summary(fitted, data, source, metrics, added, out, fit_seconds))
    for group in excluded:
        spelled = ",".join(f"{k}={v}" for k, v in group["cells"].items())
        print(f"left out {group['n_cells']:,} cells with {spelled} (--exclude)")
    return 0


def _input_data(path: Optional[str], dataset: Optional[str], default: str):
    """``(adata, description)`` of DATA, or of the bundled ``dataset`` (or ``default``)."""
    from lvmzoo import datasets

    if path is not None and dataset is not None:
        raise UsageError("give DATA or --dataset, not both")
    if path is not None:
        return _read_h5ad(path), path
    name = default if dataset is None else dataset
    if name not in datasets.DATASETS:
        raise UsageError(f"unknown --dataset {name!r}; bundled: {', '.join(datasets.DATASETS)}")
    return datasets.load(name), f"bundled data set '{name}'"


def _excluded(adata, specs: Sequence[str]):
    """``(adata without the --exclude groups, [{"cells": {key: value}, "n_cells": n}])``."""
    from lvmzoo.analysis.perturbation import exclude_cells

    groups = [_key_values(spec) for spec in specs]
    if not groups:
        return adata, []
    counts = []
    for group in groups:
        match = exclude_cells(adata, [group])  # checks the columns and that cells match
        counts.append(adata.n_obs - match.n_obs)
    return exclude_cells(adata, groups), [
        {"cells": group, "n_cells": n} for group, n in zip(groups, counts)]


def _key_values(spec: str) -> dict[str, str]:
    pairs = [p.strip() for p in spec.split(",") if p.strip()]
    group = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--exclude {spec!r}: write KEY=VALUE[,KEY=VALUE...], e.g. "
                             "cell_type=B,condition=stim")
        group[key.strip()] = value.strip()
    if not group:
        raise UsageError("--exclude needs KEY=VALUE pairs, e.g. cell_type=B,condition=stim")
    return group


def _model_class(name: str):
    from lvmzoo.models import MODELS

    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _hyperparameters(cls, args) -> dict[str, Any]:
    """The CLI's hyperparameter options that were given, checked against the model."""
    fields = [f.name for f in dataclasses.fields(cls)]
    chosen = {}
    for name in MODEL_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if name not in fields:
            raise UsageError(f"model {cls.name!r} has no {option} option "
                             f"(its hyperparameters: {', '.join(fields) or 'none'})")
        minimum = _MINIMUM.get(name, 1)
        if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
            raise UsageError(f"{option} must be at least {minimum}, got {value}")
        chosen[name] = value
    return chosen


def _check_fit_ranges(args) -> None:
    if args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise UsageError(
            f"--validation-fraction must be in [0, 1), got {args.validation_fraction}"
        )


def _check_model_accepts(model, data) -> None:
    # The driver's own check, run before anything is written; its ValueError
    # is a mismatch between --kind/--transform and the model: a usage error.
    from lvmzoo.infer.svi import check_data_kind as check

    try:
        check(model, data)
    except ValueError as err:
        raise UsageError(f"{err} (set --kind and --transform accordingly)") from None


def _output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out directory {path}: {err.strerror}") from None
    return out


def _save_fit(out: Path, fitted, settings) -> None:
    from lvmzoo.io import save_model
    from lvmzoo.plotting import save_loss_plot

    save_model(fitted, out / "model", fit_settings=settings)
    _write_json(out / "history.json", fitted.history)
    save_loss_plot(fitted.history, out / "loss.png", title=fitted.model.name)


def _fit_metrics(fitted, data) -> dict[str, Any]:
    validation = None
    if len(fitted.validation_index):
        validation = fitted.evaluate(data.subset(fitted.validation_index))
    return {"train": fitted.evaluate(data.subset(fitted.train_index)), "validation": validation}


def _summary(fitted, data, source, metrics, added, out, seconds) -> str:
    history = fitted.history
    registry = data.registry
    n_epochs = len(history["epoch"])
    val_loss = history["validation_loss"][-1] if n_epochs else math.nan
    lines = [
        f"{fitted.model.name} fitted to {source}: {data.n_cells:,} cells × {data.n_genes:,} "
        f"genes (kind {registry.kind}, transform {registry.transform})",
        f"{n_epochs} epochs in {sum(history['seconds']):.1f} s "
        f"(+ {history['compile_seconds']:.1f} s compiling; {seconds:.1f} s in all); "
        f"final loss {history['loss'][-1]:.4g}"
        + (f", validation loss {val_loss:.4g}" if math.isfinite(val_loss) else ""),
        f"log-likelihood per cell ({metrics['train']['method']}): "
        f"train {metrics['train']['avg_log_likelihood']:.4g}"
        + (f", validation {metrics['validation']['avg_log_likelihood']:.4g}"
           if metrics["validation"] else ""),
        f"wrote {out}/: model/, history.json, loss.png, metrics.json, "
        f"result.h5ad (added {', '.join(added)})",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# lvmzoo evaluate
# --------------------------------------------------------------------------


def _evaluate(args) -> int:
    from lvmzoo.data.registry import query_anndata
    from lvmzoo.io import MODEL_FILE, load_model

    if args.n_samples < 1:
        raise UsageError(f"--n-samples must be at least 1, got {args.n_samples}")
    run = Path(args.run_dir)
    if not run.is_dir():
        raise UsageError(f"RUN_DIR {args.run_dir} is not a directory; give the --out "
                         "directory of 'lvmzoo fit'")
    if not (run / MODEL_FILE).is_file() and (run / "model" / MODEL_FILE).is_file():
        run = run / "model"
    try:
        fitted = load_model(run)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"cannot load a model from {args.run_dir}: {err}") from None
    adata = _read_h5ad(args.data)
    metrics = fitted.evaluate(query_anndata(adata, fitted.registry),
                              n_samples=args.n_samples, seed=args.seed)
    if args.out:
        _write_json(Path(args.out), metrics)
    print(json.dumps(metrics, indent=2))
    return 0


# --------------------------------------------------------------------------
# lvmzoo de
# --------------------------------------------------------------------------

# Columns printed for the top genes of each comparison, per mode.
_DE_SHOWN = {
    "vanilla": ["bayes_factor", "proba_m1", "scale1", "scale2"],
    "change": ["proba_de", "lfc_mean", "bayes_factor", "scale1", "scale2"],
}


def _de(args) -> int:
    from lvmzoo.analysis.de import differential_expression
    from lvmzoo.analysis.expression import has_count_decoder
    from lvmzoo.data.registry import query_anndata
    from lvmzoo.io import atomic_write_file

    if not args.delta > 0:
        raise UsageError(f"--delta must be positive, got {args.delta}")
    if not 0 < args.fdr_target < 1:
        raise UsageError(f"--fdr-target must be in (0, 1), got {args.fdr_target}")
    if args.n_samples < 2:
        raise UsageError(f"--n-samples must be at least 2, got {args.n_samples}")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out} is a directory; give a .csv file name")
    model_dir, fit_dir = _de_run_dirs(args.run_dir)
    fitted = _load_for_de(model_dir, args.run_dir)
    if not has_count_decoder(fitted.model):
        raise UsageError(f"model {fitted.model.name!r} in {args.run_dir} has no decoder of "
                         "counts; differential expression needs e.g. an scvi model")
    if args.data is None:
        default = fit_dir / "result.h5ad"
        if not default.is_file():
            raise UsageError(f"no DATA given and {default} does not exist; give the .h5ad "
                             "file with the cells and the --groupby column")
        args.data = str(default)
    adata = _read_h5ad(args.data)
    data = query_anndata(adata, fitted.registry)
    table = differential_expression(
        fitted, data, args.groupby, args.group1, args.group2, adata=adata, mode=args.mode,
        delta=args.delta, fdr_target=args.fdr_target, n_samples=args.n_samples,
        batch_correction=not args.no_batch_correction, seed=args.seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"cannot create the directory of --out {args.out}: {err.strerror}") from None
    atomic_write_file(out, lambda tmp: table.to_csv(tmp, index_label="gene"))
    print(_de_summary(table, args, data))
    return 0


def _de_run_dirs(run_dir: str) -> tuple[Path, Path]:
    """``(model directory, fit output directory)`` of RUN_DIR."""
    from lvmzoo.io import MODEL_FILE

    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"RUN_DIR {run_dir} is not a directory; give the --out "
                         "directory of 'lvmzoo fit'")
    if not (run / MODEL_FILE).is_file() and (run / "model" / MODEL_FILE).is_file():
        return run / "model", run
    return run, run.parent


def _load_for_de(model_dir: Path, run_dir: str):
    from lvmzoo.io import load_model

    try:
        return load_model(model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"cannot load a model from {run_dir}: {err}") from None


def _de_summary(table, args, data, top: int = 10) -> str:
    lines = [f"differential expression ({args.mode} mode) of {data.n_genes:,} genes over "
             f"{data.n_cells:,} cells by {args.groupby!r}; wrote {args.out}"]
    calls = f"is_de_fdr_{args.fdr_target}"
    for comparison, rows in table.groupby("comparison", sort=False):
        called = ""
        if calls in rows:
            called = f"; {int(rows[calls].sum())} genes DE at FDR {args.fdr_target}"
        lines.append(f"\n{comparison}{called}; top {min(top, len(rows))}:")
        shown = rows[_DE_SHOWN[args.mode]].head(top)
        lines.append(shown.to_string(float_format="{:.4g}".format))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# lvmzoo perturb
# --------------------------------------------------------------------------


def _perturb(args) -> int:
    from lvmzoo.analysis.perturbation import (
        compare_perturbation, markdown_table, perturbation_design, predict_perturbation,
        prediction_method)
    from lvmzoo.data.registry import DataWarning
    from lvmzoo.io import atomic_write_text
    from lvmzoo.plotting import save_perturbation_plot

    if args.n_top_genes < 1:
        raise UsageError(f"--n-top-genes must be at least 1, got {args.n_top_genes}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    model_dir, _ = _de_run_dirs(args.run_dir)
    fitted = _load_for_de(model_dir, args.run_dir)
    adata, source = _input_data(args.data, None, "kang_ifnb")
    design = dict(condition_key=args.condition_key, control=args.control,
                  perturbed=args.perturbed, cell_type_key=args.cell_type_key,
                  cell_type=args.predict)
    perturbation_design(adata, **design)  # bad input fails here, before any warning
    try:
        prediction_method(fitted.model, args.method)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not _fit_excluded(model_dir, args.cell_type_key, args.predict, args.condition_key,
                         args.perturbed):
        warnings.warn(
            f"the model in {args.run_dir} was not fitted with --exclude "
            f"{args.cell_type_key}={args.predict},{args.condition_key}={args.perturbed}: it may "
            "have seen the cells it predicts, so the metrics are not those of a held-out "
            "prediction", DataWarning)
    predicted = predict_perturbation(fitted, adata, **design, method=args.method,
                                     dose=args.dose, seed=args.seed)
    name = f"{fitted.model.name} ({predicted.uns['perturbation']['method'].replace('_', ' ')})"
    evaluation = compare_perturbation(adata, {name: predicted}, **design, layer=args.layer,
                                      n_top_genes=args.n_top_genes, seed=args.seed)
    out = _output_dir(args.out)
    _write_h5ad(out / "predicted.h5ad", predicted)
    metrics = evaluation.metrics
    atomic_write_text(out / "metrics.csv", metrics.to_csv())
    atomic_write_text(out / "metrics.md", markdown_table(metrics))
    save_perturbation_plot(evaluation, out / "perturbation.png")
    print(_perturb_summary(evaluation, name, source, args, out))
    return 0


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


# --------------------------------------------------------------------------
# lvmzoo datasets
# --------------------------------------------------------------------------


def _datasets(args) -> int:
    from lvmzoo.datasets import list_datasets

    for row in list_datasets():
        default = " (default)" if row["default"] else ""
        print(f"{row['name']}{default}: {row['n_obs']} cells × {row['n_vars']} genes")
        print(f"    {row['description']}")
        if row["obs_columns"]:
            print(f"    obs columns: {', '.join(row['obs_columns'])}")
    return 0


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _read_h5ad(path: str):
    import anndata as ad

    file = Path(path)
    if not file.exists():
        raise UsageError(f"DATA file {path} does not exist")
    if file.is_dir() or file.suffix.lower() != ".h5ad":
        raise UsageError(
            f"DATA {path} is not an .h5ad file; convert it first, e.g. "
            "anndata.read_csv(...).write_h5ad('data.h5ad')"
        )
    try:
        return ad.read_h5ad(file)
    except OSError as err:  # h5py: not an HDF5 file, truncated, unreadable
        raise UsageError(f"cannot read {path} as .h5ad: {err}") from None


def _write_json(path: Path, obj) -> None:
    from lvmzoo.io import atomic_write_json

    atomic_write_json(path, obj)


def _write_h5ad(path: Path, adata) -> None:
    from lvmzoo.io import atomic_write_file

    atomic_write_file(path, adata.write_h5ad)


if __name__ == "__main__":
    sys.exit(main())
