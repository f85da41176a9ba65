"""The ``lvmzoo`` command: fit a zoo model, evaluate a saved one, list data sets.

A thin layer over the Python API; every step is a call a notebook could make::

    lvmzoo fit ppca data.h5ad --out runs/ppca     # setup_anndata → fit → save_model
    lvmzoo evaluate runs/ppca new.h5ad            # load_model → query_anndata → evaluate
    lvmzoo de runs/scvi --groupby cell_type --group1 B --out de.csv
                                                  # load_model → differential_expression
    lvmzoo predict runs/scanvi new.h5ad --out p.csv  # load_model → FittedModel.predict
    lvmzoo map-query runs/scanvi query.h5ad --out runs/query
                                                  # load_model → analysis.query.map_query
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

With ``--backed`` (automatic for a file larger than a quarter of the RAM, or
a ``.zarr`` store) the cells are streamed from DATA instead of loaded (see
``docs/scaling.md``); ``result.h5ad`` then holds ``obs``, ``var`` and the
latent but not the matrix, and ``metrics.json`` scores at most 10,000 random
cells per split.  ``--devices N|all`` splits every minibatch over devices.

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
                 "latent_library", "n_epochs_kl_warmup", "min_scale", "variance_prior",
                 "encode_batch", "classification_ratio", "perturbation_key", "covariate_keys",
                 "dose_key")
# Options whose flag is not the field name with dashes.
_FLAGS = {"n_epochs_kl_warmup": "--kl-warmup"}
# Models whose default DATA is a bundled labelled data set: (data set, labels key, batch key).
LABELLED_DEFAULTS = {"scanvi": ("wu2020", "cluster_orig", "patient")}
# Smallest accepted value of the integer options (1 for those not listed).
_MINIMUM = {"n_layers": 0, "n_epochs_kl_warmup": 0}
# `lvmzoo fit` trains from disk when DATA is larger than this share of RAM: an
# in-memory fit holds the matrix about four times at its peak (the AnnData,
# the registered float32 copy, the training cells and the device copy).
BACKED_RAM_SHARE = 0.25
# On-disk fits score at most this many random cells per split in metrics.json.
BACKED_METRIC_CELLS = 10_000


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
    _add_predict(commands)
    _add_map_query(commands)
    _add_integration_metrics(commands)
    _add_perturb(commands)
    listing = commands.add_parser(
        "datasets", help="list the bundled data sets",
        description="List the data sets bundled with lvmzoo, with their shapes.",
    )
    listing.set_defaults(run=_datasets, command_parser=listing)
    return parser


def _add_fit(commands, models) -> None:
    from lvmzoo.data.registry import KINDS, UNLABELED_CATEGORY
    from lvmzoo.data.transforms import TRANSFORMS
    from lvmzoo.datasets import DEFAULT_DATASET

    model_lines = "\n".join(
        f"  {name:<11} {_first_line(cls.__doc__)}" for name, cls in sorted(models.items())
    )
    fit = commands.add_parser(
        "fit",
        help="fit a model to an .h5ad file and save model, latent, metrics and plots",
        description=textwrap.fill(
            "Fit MODEL to DATA by stochastic variational inference and write into --out: "
            "model/ (the saved model), history.json (losses and seconds per epoch, why the fit "
            "stopped), loss.png, latent.png (the cells in a 2-D view of the latent, coloured by "
            "batch and labels), result.h5ad (the input plus obsm['X_<MODEL>'] and the model's "
            "documented extras) and metrics.json (train and validation log-likelihood and ELBO). "
            "By default the fit stops early once the validation loss stops improving."
        ),
        epilog=f"models:\n{model_lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("model", metavar="MODEL",
                     help=f"model to fit, one of: {', '.join(sorted(models))}")
    fit.add_argument("data", metavar="DATA", nargs="?", default=None,
                     help="cells × genes .h5ad file (default: the bundled data set of "
                          f"--dataset, '{DEFAULT_DATASET}'; for scanvi the labelled 'wu2020' "
                          "with --labels-key cluster_orig --batch-key patient)")
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
                     help="categorical obs column of cell labels; scanvi needs one (default: "
                          "none)")
    fit.add_argument("--unlabeled-category", metavar="U", default=UNLABELED_CATEGORY,
                     help="value of --labels-key that marks a cell as unlabelled; cells with a "
                          "missing label are unlabelled too (default: %(default)s)")
    fit.add_argument("--from-run", metavar="DIR", default=None,
                     help="scanvi: warm start from the scvi model saved in DIR (the --out of "
                          "'lvmzoo fit scvi'); DATA must have its genes and batches, and the "
                          "architecture, --layer and --batch-key are the scvi model's")
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
                     help="make the library size latent rather than observed, for scvi, "
                          "linear_scvi and scanvi (default: the model's)")
    fit.add_argument("--encode-batch", action=argparse.BooleanOptionalAction, default=None,
                     help="give the encoder the batch too, for scvi, linear_scvi and scanvi; "
                          "needed for 'lvmzoo map-query' to correct a query's latent "
                          "(default: the model's, no)")
    fit.add_argument("--classification-ratio", type=float, metavar="X", default=None,
                     help="scanvi: weight of the labelled cells' cross-entropy in the loss "
                          "(default: the model's, 50 as scvi-tools)")
    fit.add_argument("--kl-warmup", dest="n_epochs_kl_warmup", type=_warmup, metavar="N|auto",
                     default=None,
                     help="epochs over which the KL term's weight rises from 0 to 1, for models "
                          "with a warm-up (scvi, linear_scvi, scanvi): 'auto' = a quarter of the "
                          "fit's epochs, 0 = none (default: the model's, auto)")
    fit.add_argument("--min-scale", type=float, metavar="S", default=None,
                     help="floor of every per-gene standard deviation, for gmm "
                          "(default: the model's)")
    fit.add_argument("--variance-prior", type=float, metavar="A", default=None,
                     help="strength, in pseudo-cells, of the gmm's prior pulling each "
                          "component's per-gene variances towards the gene's overall variance "
                          "(default: the model's; see 'lvmzoo fit gmm --help')")
    fit.add_argument("--epochs", type=int, metavar="N", default=None,
                     help="the most passes over the training cells (default: the model's: "
                          "min(round(20000 / n_cells * 400), 400) for the deep models, as "
                          "scvi-tools; a few dozen for ppca, fa and gmm, which start from a "
                          "data-driven solution)")
    fit.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=True,
                     help="stop once the validation loss has not improved by 1e-4 of itself "
                          "for --patience epochs, keeping the best epoch's parameters; needs "
                          "a validation split (default: on)")
    fit.add_argument("--patience", type=int, metavar="N", default=None,
                     help="epochs without improvement before early stopping "
                          "(default: max(3, 10%% of the epochs))")
    fit.add_argument("--perturbation-key", metavar="K", default=None,
                     help="categorical obs column of the perturbation, for cpa "
                          "(default: the model's, 'condition')")
    fit.add_argument("--covariate-keys", metavar="K[,K...]", type=_names, default=None,
                     help="categorical obs columns whose effects add to the latent, for cpa "
                          "(default: the model's, 'cell_type')")
    fit.add_argument("--dose-key", metavar="K", default=None,
                     help="numeric obs column of the dose (0 for control cells), for cpa "
                          "(default: none)")
    fit.add_argument("--batch-size", type=int, metavar="N", default=128,
                     help="cells per optimisation step (default: %(default)s)")
    fit.add_argument("--lr", type=float, metavar="X", default=None,
                     help="Adam learning rate (default: the model's default_learning_rate)")
    fit.add_argument("--seed", type=int, metavar="S", default=0,
                     help="random seed; a fit is reproducible for a given seed "
                          "(default: %(default)s)")
    fit.add_argument("--plot-method", choices=("auto", "umap", "pca"), default="auto",
                     help="2-D view of the latent in latent.png: umap (needs umap-learn), pca, "
                          "or auto = umap when installed, else pca (default: %(default)s)")
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
    fit.add_argument("--backed", action=argparse.BooleanOptionalAction, default=None,
                     help="train from DATA on disk (a backed .h5ad or a .zarr store), reading "
                          "blocks of cells while training, instead of loading it; result.h5ad "
                          "then holds obs, var and the latent but not the matrix, and metrics "
                          f"use at most {BACKED_METRIC_CELLS:,} random cells per split "
                          "(default: on when DATA is larger than "
                          f"{100 * BACKED_RAM_SHARE:.0f}%% of this machine's RAM)")
    fit.add_argument("--devices", metavar="N", default=None,
                     help="devices to train on: a number or 'all'; each minibatch is split "
                          "over them, parameters are replicated; --batch-size is the total "
                          "over all devices (default: one device)")
    fit.set_defaults(run=_fit, command_parser=fit)


def _warmup(value: str):
    """``--kl-warmup``: ``auto`` or a whole number of epochs (0: no warm-up)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {value!r}")
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


def _add_predict(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="predict cell labels with a saved scanvi model (labels and probabilities, CSV)",
        description=textwrap.fill(
            "Load the model saved in RUN_DIR (a model with a classifier: scanvi), register DATA "
            "against its genes and batches, and write one CSV row per cell: its name, the "
            "predicted label ('prediction') and the probability of every label. If DATA has "
            "the model's labels column, prints accuracy, macro F1 and expected calibration "
            "error against it."),
    )
    predict.add_argument("run_dir", metavar="RUN_DIR",
                         help="the --out directory of 'lvmzoo fit scanvi' or 'lvmzoo map-query' "
                              "(or its model/ subdirectory)")
    predict.add_argument("data", metavar="DATA", nargs="?", default=None,
                         help=".h5ad file with the model's batches and genes (missing genes "
                              "are zero-filled with a warning, refused below half of them; "
                              "default: RUN_DIR/result.h5ad, written by 'lvmzoo fit')")
    predict.add_argument("--out", required=True, metavar="FILE",
                         help="CSV file to write (its directory is created if needed)")
    predict.set_defaults(run=_predict, command_parser=predict)


def _add_map_query(commands) -> None:
    from lvmzoo.data.registry import MIN_SHARED_GENES

    map_query = commands.add_parser(
        "map-query",
        help="map new cells onto a saved scvi/linear_scvi/scanvi reference (scArches)",
        description=textwrap.fill(
            "Map the cells of QUERY into the latent space of the reference model saved in "
            "RUN_DIR without retraining it (scArches): genes are aligned by name (missing "
            "ones zero-filled, extra ones dropped), the query's new batches get new batch "
            "columns in the first layers, and only those are fine-tuned on the query; every "
            "other parameter and the batch-norm statistics stay the reference's. Writes into "
            "--out: model/ (the mapped model, which encodes reference and query cells alike) "
            "and query.h5ad (QUERY plus obsm['X_<model>'], and for scanvi "
            "obs['scanvi_prediction'] and obs['scanvi_probability'])."),
    )
    map_query.add_argument("run_dir", metavar="RUN_DIR",
                           help="the --out directory of 'lvmzoo fit' for scvi, linear_scvi or "
                                "scanvi (or its model/ subdirectory), best fitted with "
                                "--encode-batch (otherwise the query's latent is the frozen "
                                "encoder's output)")
    map_query.add_argument("query", metavar="QUERY",
                           help=".h5ad file of raw counts with the reference's batch key in obs "
                                "(labels of the reference's labels key, if any, must be "
                                "categories the reference knows)")
    map_query.add_argument("--out", required=True, metavar="DIR",
                           help="output directory (created if needed; earlier outputs are "
                                "replaced)")
    map_query.add_argument("--epochs", type=int, metavar="N", default=100,
                           help="fine-tuning passes over the query cells (default: %(default)s)")
    map_query.add_argument("--batch-size", type=int, metavar="N", default=128,
                           help="cells per optimisation step (default: %(default)s)")
    map_query.add_argument("--lr", type=float, metavar="X", default=None,
                           help="Adam learning rate of the new batch columns (default: the "
                                "model's default_learning_rate)")
    map_query.add_argument("--min-shared-genes", type=float, metavar="F",
                           default=MIN_SHARED_GENES,
                           help="smallest share of the reference's genes QUERY must have; "
                                "missing ones are zero-filled (default: %(default)s)")
    map_query.add_argument("--seed", type=int, metavar="S", default=0,
                           help="random seed of the fine-tune (default: %(default)s)")
    map_query.add_argument("--no-progress", action="store_true",
                           help="do not show the per-epoch progress bar")
    map_query.set_defaults(run=_map_query, command_parser=map_query)
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
    warm_start = _warm_start(args, cls) if args.from_run else None
    try:
        hyperparameters = _hyperparameters(cls, args)
        model = (cls.from_scvi(warm_start, **hyperparameters) if warm_start
                 else cls(**hyperparameters))
    except ValueError as err:  # the model's own check of its hyperparameters
        raise UsageError(f"{args.model}: {err}") from None
    _check_fit_ranges(args)
    # data_kind / default_transform may depend on the instance (e.g. a VAE's likelihood).
    kind = args.kind or ("binary" if model.data_kind == "binary" else "counts")
    transform = args.transform or (model.default_transform if kind == "counts" else "none")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")

    devices = _devices(args.devices)
    if args.data is not None and args.dataset is not None:
        raise UsageError("give DATA or --dataset, not both")
    if args.data is None:
        name, labels_key, batch_key = LABELLED_DEFAULTS.get(
            args.model, (datasets.DEFAULT_DATASET, None, None))
        if args.dataset is not None:
            name, labels_key, batch_key = args.dataset, None, None
        adata, source = _input_data(None, name, name)
        args.labels_key = args.labels_key or labels_key
        args.batch_key = args.batch_key or (None if warm_start else batch_key)
        backed = False
    else:
        source = args.data
        backed = _train_from_disk(args)
        adata = _read_backed(args.data) if backed else _read_h5ad(args.data)
    if backed and args.exclude:
        raise UsageError("--exclude needs the cells in memory; leave out --backed, or write "
                         "the cells to keep to a file of their own")
    adata, excluded = _excluded(adata, args.exclude)
    if warm_start:
        _use_warm_start_registry(args, warm_start.registry)
    data = setup_anndata(adata, layer=args.layer, batch_key=args.batch_key,
                         labels_key=args.labels_key, kind=kind, transform=transform,
                         unlabeled_category=args.unlabeled_category, **model.registration())
    _check_model_accepts(model, data)
    if warm_start:
        _check_same_cells_layout(data.registry, warm_start.registry, args.from_run)
    out = _output_dir(args.out)
    settings = {
        "epochs": args.epochs, "early_stopping": args.early_stopping,
        "patience": args.patience, "requested_batch_size": args.batch_size,
        "learning_rate": model.default_learning_rate if args.lr is None else args.lr,
        "validation_fraction": args.validation_fraction, "data": source,
        "backed": data.is_backed, "devices": args.devices, "warm_start": args.from_run,
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
                         early_stopping=args.early_stopping,
                         early_stopping_patience=args.patience,
                         progress=not args.no_progress, devices=devices,
                         initial_params=warm_start)
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
    if data.is_backed:
        annotated, added = _annotate_backed(fitted, adata, data)
    else:
        annotated, added = fitted.annotate(adata, data)
    _write_h5ad(out / "result.h5ad", annotated)
    view = _save_latent_plot(out / "latent.png", annotated, fitted.model.name, data, args)
    metrics = _fit_metrics(fitted, data)
    _write_json(out / "metrics.json", metrics)
    print(_summary(fitted, data, source, metrics, added, out, fit_seconds, view))
    for group in excluded:
        spelled = ",".join(f"{k}={v}" for k, v in group["cells"].items())
        print(f"left out {group['n_cells']:,} cells with {spelled} (--exclude)")
    return 0


def _save_latent_plot(path: Path, annotated, name: str, data, args) -> str:
    """``latent.png``: one panel per batch key, labels key and model clusters; returns the view."""
    import numpy as np

    from lvmzoo.plotting import cells_figure, embed_2d, save_figure

    obs = annotated.obs.copy()
    color = [k for k in (args.batch_key, args.labels_key) if k]
    color += [k for k in obs.columns if k.startswith(f"{name}_") and k not in color]
    x = annotated.layers.get(args.layer) if args.layer else annotated.X  # None when on disk
    if not color and data.registry.kind == "counts" and x is not None:
        # Nothing categorical to show: the first thing that structures a latent of counts.
        obs["log10 total counts"] = np.log10(np.asarray(x.sum(axis=1)).ravel())
        color = ["log10 total counts"]
    coordinates, view = embed_2d(annotated.obsm[f"X_{name}"], args.plot_method, args.seed)
    save_figure(cells_figure(coordinates, view, obs, color, title=name), path)
    return {"UMAP": "UMAP", "PC": "PCA"}.get(view, "the latent itself")


def _warm_start(args, cls):
    """The fitted scvi model of ``--from-run`` (for scanvi)."""
    if not hasattr(cls, "from_scvi"):
        raise UsageError(f"--from-run warm starts scanvi from a fitted scvi; {cls.name} has no "
                         "warm start")
    architecture = [n for n in MODEL_OPTIONS if n != "classification_ratio"
                    and getattr(args, n) is not None]
    if architecture:
        raise UsageError(f"--{architecture[0].replace('_', '-')} cannot be combined with "
                         "--from-run: the architecture is the scvi model's")
    fitted = _load_run(args.from_run, "--from-run")
    if fitted.model.name != "scvi":
        raise UsageError(f"--from-run {args.from_run} holds a {fitted.model.name} model; "
                         "give the --out directory of 'lvmzoo fit scvi'")
    return fitted


def _use_warm_start_registry(args, registry) -> None:
    """``--layer`` and ``--batch-key`` of the scvi run; a different explicit one is an error."""
    for option, name in (("--batch-key", "batch_key"), ("--layer", "layer")):
        given, theirs = getattr(args, name), getattr(registry, name)
        if given is not None and given != theirs:
            raise UsageError(f"{option} {given} differs from the --from-run model's ({theirs}); "
                             f"leave {option} out to use the scvi model's")
        setattr(args, name, theirs)


def _check_same_cells_layout(mine, theirs, run) -> None:
    for what in ("gene_names", "batch_categories"):
        if tuple(getattr(mine, what)) != tuple(getattr(theirs, what)):
            raise UsageError(f"DATA has other {what.replace('_', ' ')} than the scvi model in "
                             f"{run} was fitted to; give the data that model was fitted to")


def _load_run(run_dir: str, what: str = "RUN_DIR"):
    """A saved model from a run directory (the --out of 'lvmzoo fit', or its model/)."""
    from lvmzoo.io import MODEL_FILE, load_model

    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"{what} {run_dir} is not a directory; give the --out directory of "
                         "'lvmzoo fit'")
    if not (run / MODEL_FILE).is_file() and (run / "model" / MODEL_FILE).is_file():
        run = run / "model"
    try:
        return load_model(run)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"cannot load a model from {run_dir}: {err}") from None


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
        option = _FLAGS.get(name, "--" + name.replace("_", "-"))
        if name not in fields:
            raise UsageError(f"model {cls.name!r} has no {option} option "
                             f"(its hyperparameters: {', '.join(fields) or 'none'})")
        minimum = _MINIMUM.get(name, 1)
        if isinstance(value, float) and not value > 0:
            raise UsageError(f"{option} must be positive, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
            raise UsageError(f"{option} must be at least {minimum}, got {value}")
        chosen[name] = value
    return chosen


def _check_fit_ranges(args) -> None:
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience must be at least 1, got {args.patience}")
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
    if hasattr(model, "predict_proba") and data.registry.n_labels == 0:
        raise UsageError(f"{model.name} learns from cell labels: give --labels-key K (cells "
                         "whose label is missing or --unlabeled-category are unlabelled)")


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
    import numpy as np

    def score(index):
        if data.is_backed and len(index) > BACKED_METRIC_CELLS:
            # Scoring a whole atlas costs many epochs; a random sample estimates the average.
            rng = np.random.default_rng(fitted.seed)
            index = np.sort(rng.choice(index, BACKED_METRIC_CELLS, replace=False))
        return fitted.evaluate(data.subset(index))

    validation = score(fitted.validation_index) if len(fitted.validation_index) else None
    metrics = {"train": score(fitted.train_index), "validation": validation}
    if validation is not None and hasattr(fitted.model, "predict_proba"):
        held_out = data.subset(fitted.validation_index)
        if (held_out.labels >= 0).any():
            # Labelled validation cells were never seen by the classifier: an honest accuracy.
            metrics["validation_labels"] = _label_scores(fitted, held_out)
    return metrics


def _label_scores(fitted, data) -> dict[str, Any]:
    from lvmzoo.analysis.labels import label_scores

    _, probabilities = fitted.predict(data, soft=True)
    labelled = data.labels >= 0
    truth = [data.registry.label_categories[c] for c in data.labels[labelled]]
    return label_scores(truth, probabilities[labelled])


def _annotate_backed(fitted, adata, data):
    """result.h5ad of an on-disk fit: obs, var and the latent, without the matrix or model extras."""
    import anndata as ad

    key = f"X_{fitted.model.name}"
    result = ad.AnnData(obs=adata.obs.copy(), var=adata.var.copy())
    result.obsm[key] = fitted.latent(data)
    return result, [f'obsm["{key}"] (obs and var; the matrix stays in DATA)']


def _devices(text: Optional[str]):
    """``--devices``: ``None``, a positive number or ``"all"``."""
    if text is None or text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--devices must be a positive number or 'all', got {text!r}")
    import jax

    available = len(jax.devices())
    if n > available:
        raise UsageError(f"--devices {n} but this machine has {available} "
                         f"{jax.devices()[0].platform} device(s)")
    return n


def _train_from_disk(args) -> bool:
    """``--backed`` / ``--no-backed``, else whether DATA is too large to load (with a message)."""
    from lvmzoo.data.backed import file_size, total_memory

    path = Path(args.data)
    if path.is_dir():  # a .zarr store: always read from disk
        if args.backed is False:
            raise UsageError(f"DATA {args.data} is a directory (a .zarr store), which lvmzoo "
                             "reads from disk; drop --no-backed")
        return True
    if args.backed is not None or not path.exists():
        return bool(args.backed)  # a missing file is reported when it is read
    size, ram = file_size(path), total_memory()
    if ram and size > BACKED_RAM_SHARE * ram:
        print(f"{PROG}: DATA is {size / 2**30:.1f} GiB, more than {BACKED_RAM_SHARE:.0%} of "
              f"this machine's {ram / 2**30:.0f} GiB of RAM: training from disk (as --backed; "
              "--no-backed loads it into memory)", file=sys.stderr)
        return True
    return False


def _summary(fitted, data, source, metrics, added, out, seconds, view) -> str:
    from lvmzoo.infer.svi import stop_message

    history = fitted.history
    registry = data.registry
    n_epochs = len(history["epoch"])
    val_loss = history["validation_loss"][-1] if n_epochs else math.nan
    lines = [
        f"{fitted.model.name} fitted to {source}: {data.n_cells:,} cells × {data.n_genes:,} "
        f"genes (kind {registry.kind}, transform {registry.transform})",
        f"{stop_message(history)}: {sum(history['seconds']):.1f} s "
        f"(+ {history['compile_seconds']:.1f} s compiling; {seconds:.1f} s in all)"
        + (f"; final loss {history['loss'][-1]:.4g}" if n_epochs else "")
        + (f", validation loss {val_loss:.4g}" if math.isfinite(val_loss) else ""),
        f"log-likelihood per cell ({metrics['train']['method']}): "
        f"train {metrics['train']['avg_log_likelihood']:.4g}"
        + (f", validation {metrics['validation']['avg_log_likelihood']:.4g}"
           if metrics["validation"] else ""),
        f"wrote {out}/: latent.png (the cells, {view}), loss.png, metrics.json, history.json, "
        f"model/, result.h5ad (added {', '.join(added)})",
        f"look at {out / 'latent.png'} first; 'lvmzoo evaluate {out} NEW.h5ad' scores new cells",
    ]
    if registry.labels_key is not None and hasattr(fitted.model, "predict_proba"):
        scores = metrics.get("validation_labels")
        lines.insert(-1, f"labels: {int((data.labels >= 0).sum()):,} of {data.n_cells:,} cells "
                         f"labelled ({registry.n_labels} categories of obs[{registry.labels_key!r}])"
                         + (f"; held-out labelled cells: accuracy {scores['accuracy']:.3f}, macro "
                            f"F1 {scores['macro_f1']:.3f}, ECE {scores['ece']:.3f} "
                            f"({scores['n_cells']} cells)" if scores else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# lvmzoo evaluate
# --------------------------------------------------------------------------


def _evaluate(args) -> int:
    from lvmzoo.data.registry import query_anndata

    if args.n_samples < 1:
        raise UsageError(f"--n-samples must be at least 1, got {args.n_samples}")
    fitted = _load_run(args.run_dir)
    adata = _read_h5ad(args.data)
    metrics = fitted.evaluate(query_anndata(adata, fitted.registry),
                              n_samples=args.n_samples, seed=args.seed)
    if args.out:
        _write_json(Path(args.out), metrics)
    print(json.dumps(metrics, indent=2))
    return 0


# --------------------------------------------------------------------------
# lvmzoo predict
# --------------------------------------------------------------------------


def _predict(args) -> int:
    import dataclasses as dc

    import pandas as pd

    from lvmzoo.data.registry import query_anndata
    from lvmzoo.io import atomic_write_file

    out = _output_file(args.out)
    fitted = _load_run(args.run_dir)
    if not hasattr(fitted.model, "predict_proba"):
        raise UsageError(f"the {fitted.model.name} model in {args.run_dir} does not predict "
                         "labels; fit one with a classifier, e.g. 'lvmzoo fit scanvi'")
    adata = _read_h5ad(args.data or str(_fit_dir(args.run_dir) / "result.h5ad"))
    # The cells' own labels play no part in a prediction: register without them. Genes the
    # data lack are zero-filled (with a warning), as map-query does.
    registry = dc.replace(fitted.registry, labels_key=None)
    data = query_anndata(adata, registry, missing_genes="zero")
    labels, probabilities = fitted.predict(data, soft=True)
    table = pd.concat([labels.astype(str), probabilities], axis=1)
    atomic_write_file(out, lambda tmp: table.to_csv(tmp, index_label="cell"))
    counts = labels.value_counts()
    line = (f"predicted the labels of {data.n_cells:,} cells with the {fitted.model.name} model "
            f"in {args.run_dir}; wrote {args.out}; most predicted: "
            + ", ".join(f"{label} {n}" for label, n in counts.head(5).items()))
    print(line + _scores_against_known_labels(adata, fitted.registry.labels_key, probabilities))
    return 0


def _scores_against_known_labels(adata, key, probabilities, qualifier: str = "") -> str:
    """``"; against obs[key] (...): accuracy ..."`` when the cells carry the model's labels, else ``""``."""
    import pandas as pd

    if probabilities is None or key is None or key not in adata.obs.columns:
        return ""
    from lvmzoo.analysis.labels import label_scores

    truth = adata.obs[key].astype(str).to_numpy()
    if not pd.Series(truth).isin(probabilities.columns).any():
        return ""
    scores = label_scores(truth, probabilities)
    return (f"; against obs[{key!r}] ({scores['n_cells']:,} cells with a known label{qualifier}): "
            f"accuracy {scores['accuracy']:.3f}, macro F1 {scores['macro_f1']:.3f}, "
            f"ECE {scores['ece']:.3f}")


def _fit_dir(run_dir: str) -> Path:
    """The --out directory of 'lvmzoo fit' given it or its model/ subdirectory."""
    from lvmzoo.io import MODEL_FILE

    run = Path(run_dir)
    return run.parent if (run / MODEL_FILE).is_file() else run


def _output_file(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the directory of --out {path}: {err.strerror}") from None
    return out


# --------------------------------------------------------------------------
# lvmzoo map-query
# --------------------------------------------------------------------------


def _map_query(args) -> int:
    from lvmzoo.analysis.query import map_query
    from lvmzoo.io import save_model

    for option in ("epochs", "batch_size"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not 0 < args.min_shared_genes <= 1:
        raise UsageError(f"--min-shared-genes must be in (0, 1], got {args.min_shared_genes}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    reference = _load_run(args.run_dir)
    query = _read_h5ad(args.query)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            mapped, data = map_query(reference, query, epochs=args.epochs,
                                     batch_size=args.batch_size, learning_rate=args.lr,
                                     seed=args.seed, min_shared_genes=args.min_shared_genes,
                                     progress=not args.no_progress)
        for warning in caught:  # the data's and the mapping's, one line each
            print(f"{PROG}: warning: {' '.join(str(warning.message).split())}", file=sys.stderr)
    except ValueError as err:
        from lvmzoo.data.registry import DataError

        if isinstance(err, DataError):
            raise
        raise UsageError(f"cannot map onto {args.run_dir}: {err}") from None
    seconds = time.perf_counter() - started
    out = _output_dir(args.out)
    save_model(mapped, out / "model", fit_settings={
        "mapped_from": args.run_dir, "query": args.query, "epochs": args.epochs,
        "requested_batch_size": args.batch_size, "learning_rate": args.lr})
    annotated, added, probabilities = _mapped_query(mapped, query, data)
    _write_h5ad(out / "query.h5ad", annotated)
    new = mapped.registry.batch_categories[reference.registry.n_batches:]
    how = (f"{len(new)} new batches: {', '.join(new[:5])}{' …' if len(new) > 5 else ''}; "
           f"{len(mapped.history.get('epoch', []))} fine-tuning epochs, {seconds:.1f} s" if new
           else "no new batches: encoded by the reference as it is, nothing fine-tuned")
    print(f"mapped {data.n_cells:,} query cells ({how}) onto the {mapped.model.name} reference "
          f"in {args.run_dir}; wrote {out}/: model/, query.h5ad (added {', '.join(added)})"
          + _scores_against_known_labels(query, mapped.registry.labels_key, probabilities,
                                         ", which the fine-tune used"))
    return 0


def _mapped_query(mapped, query, data):
    """A copy of the query with its latent (and predicted labels), the keys added, the label
    probabilities (``None`` for a model without a classifier); the query's genes unchanged."""
    import numpy as np
    import pandas as pd

    annotated = query.copy()
    key = f"X_{mapped.model.name}"
    annotated.obsm[key] = mapped.latent(data)
    added = [f'obsm["{key}"]']
    probabilities = None
    if hasattr(mapped.model, "predict_proba"):
        from lvmzoo.models.scanvi import PREDICTION_OBS, PROBABILITY_OBS

        labels, probabilities = mapped.predict(data, soft=True)
        annotated.obs[PREDICTION_OBS] = pd.Categorical(
            labels.to_numpy(), categories=list(mapped.registry.label_categories))
        annotated.obs[PROBABILITY_OBS] = probabilities.max(axis=1).to_numpy(np.float32)
        added += [f'obs["{PREDICTION_OBS}"]', f'obs["{PROBABILITY_OBS}"]']
    return annotated, added, probabilities


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
# lvmzoo integration-metrics
# --------------------------------------------------------------------------

# Keys of the bundled labelled fixture, used when no DATA is given.
_INTEGRATION_DEFAULT = ("wu2020", "patient", "cluster_orig")


def _add_integration_metrics(commands) -> None:
    from lvmzoo.analysis.integration import CLUSTERINGS, DEFAULT_METRICS, METRICS

    dataset, batch_key, labels_key = _INTEGRATION_DEFAULT
    command = commands.add_parser(
        "integration-metrics",
        help="batch-correction and bio-conservation metrics of embeddings (scIB)",
        description=textwrap.fill(
            "Score cell embeddings (obsm keys such as X_pca, X_scvi) of DATA with the scIB "
            "integration metrics (scib-metrics, exact neighbours): bio conservation (isolated "
            "labels, NMI/ARI of a clustering vs the labels, silhouette label, cLISI) and batch "
            "correction (BRAS, iLISI, kBET, graph connectivity, PCR comparison), each in [0, 1], "
            "higher is better, with their means and total = 0.6 bio + 0.4 batch. Writes "
            "integration_metrics.csv, integration_metrics.md and integration_metrics.png into "
            "--out. Needs the integration extra: pip install 'lvmzoo[integration]'."
        ),
        epilog=f"metrics: {', '.join(METRICS)}",
    )
    command.add_argument("data", metavar="DATA", nargs="?", default=None,
                         help=".h5ad file with the embeddings in obsm and the batch and label "
                              f"columns in obs (default: the bundled '{dataset}' data set, "
                              f"--batch-key {batch_key} --labels-key {labels_key})")
    command.add_argument("--batch-key", metavar="K", default=None,
                         help="categorical obs column of batches (required with DATA)")
    command.add_argument("--labels-key", metavar="K", default=None,
                         help="categorical obs column of cell labels (required with DATA)")
    command.add_argument("--embeddings", metavar="KEY[,KEY...]", default="X_pca",
                         help="comma-separated obsm keys to score; X_pca is computed when "
                              "absent: PCA of log1p(1e4 x / cell total) of the counts "
                              "(default: %(default)s)")
    command.add_argument("--out", required=True, metavar="DIR",
                         help="output directory (created if needed)")
    command.add_argument("--metrics", metavar="M[,M...]", default=",".join(DEFAULT_METRICS),
                         help="comma-separated metrics (default: all but silhouette_batch, "
                              "as scib-metrics' Benchmarker)")
    command.add_argument("--clustering", choices=CLUSTERINGS, default="kmeans",
                         help="clustering compared with the labels by NMI/ARI: kmeans (k = "
                              "number of labels) or leiden (best NMI over resolutions "
                              "0.2-2.0) (default: %(default)s)")
    command.add_argument("--pre-integrated", metavar="KEY", default="X_pca",
                         help="obsm key of the unintegrated embedding that pcr_comparison "
                              "compares against (default: %(default)s)")
    command.add_argument("--layer", metavar="L", default=None,
                         help="layer with the counts a missing X_pca is computed from "
                              "(default: .X)")
    command.add_argument("--n-pcs", type=int, metavar="N", default=50,
                         help="components of a computed X_pca (default: %(default)s)")
    command.add_argument("--seed", type=int, metavar="S", default=0,
                         help="seed of k-means, Leiden and the PCA (default: %(default)s)")
    command.set_defaults(run=_integration_metrics, command_parser=command)


def _integration_metrics(args) -> int:
    from lvmzoo import datasets
    from lvmzoo.analysis import integration
    from lvmzoo.io import atomic_write_file, atomic_write_text

    try:
        integration.require_scib_metrics()
    except ImportError as err:
        raise UsageError(str(err)) from None
    if args.n_pcs < 1:
        raise UsageError(f"--n-pcs must be at least 1, got {args.n_pcs}")
    if args.data is None:
        dataset, batch_key, labels_key = _INTEGRATION_DEFAULT
        adata, source, name = datasets.load(dataset), f"the bundled {dataset!r} data set", dataset
        args.batch_key = args.batch_key or batch_key
        args.labels_key = args.labels_key or labels_key
    else:
        for option in ("batch_key", "labels_key"):
            if getattr(args, option) is None:
                raise UsageError(f"--{option.replace('_', '-')} is required with DATA; name "
                                 f"a categorical obs column")
        adata, source, name = _read_h5ad(args.data), args.data, Path(args.data).name
    out = _output_dir(args.out)
    table = integration.benchmark(
        adata, args.batch_key, args.labels_key, _comma_list(args.embeddings),
        metrics=_comma_list(args.metrics), clustering=args.clustering,
        pre_integrated=args.pre_integrated, layer=args.layer, n_pcs=args.n_pcs,
        seed=args.seed)
    markdown = integration.markdown_table(table)
    atomic_write_file(out / "integration_metrics.csv", table.to_csv)
    atomic_write_text(out / "integration_metrics.md", markdown)
    integration.save_integration_figure(table, out / "integration_metrics.png",
                                        title=f"{name}: batch {args.batch_key!r}, "
                                              f"labels {args.labels_key!r}")
    attrs = table.attrs
    print(markdown, end="")
    print(f"integration metrics of {len(table)} embedding(s) on {source}: {attrs['n_cells']:,} "
          f"cells, {attrs['n_batches']} batches ({args.batch_key}), {attrs['n_labels']} labels "
          f"({args.labels_key}); X_pca {attrs['x_pca']}; wrote {out}/: integration_metrics.csv, "
          "integration_metrics.md, integration_metrics.png")
    return 0


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
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


def _read_backed(path: str):
    """DATA opened without loading its matrix: a backed .h5ad or a .zarr AnnData store."""
    from lvmzoo.data.backed import read_backed

    file = Path(path)
    if not file.exists():
        raise UsageError(f"DATA file {path} does not exist")
    if not (file.is_dir() or file.suffix.lower() == ".h5ad"):
        raise UsageError(f"DATA {path} is neither an .h5ad file nor a .zarr AnnData store")
    try:
        return read_backed(file)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot open {path} on disk: {err}") from None


def _write_json(path: Path, obj) -> None:
    from lvmzoo.io import atomic_write_json

    atomic_write_json(path, obj)


def _write_h5ad(path: Path, adata) -> None:
    from lvmzoo.io import atomic_write_file

    atomic_write_file(path, adata.write_h5ad)


if __name__ == "__main__":
    sys.exit(main())
