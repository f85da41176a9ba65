"""``lvmzoo fit MODEL [DATA]``: setup_anndata -> fit -> save the run and its outputs."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings
from pathlib import Path

from lvmzoo.cli._common import (EXIT_DIVERGED, EXIT_INTERRUPTED, PROG, UsageError, _first_line,
                                _input_data, _output_dir, _read_backed, _read_h5ad, _write_h5ad,
                                _write_json, release_freed_memory)
from lvmzoo.cli.fit_outputs import (PER_GENE_VALUES, PLOT_CELLS, SCORE_CELLS, PostFitSteps,
                                    _annotate_backed, _fit_metrics, _save_latent_plot, _summary,
                                    per_gene_outputs)
from lvmzoo.cli._distributed import add_distributed_options, start_distributed
from lvmzoo.cli.fit_inputs import (BACKED_RAM_SHARE, _check_fit_ranges, _check_model_accepts,
                                   _check_same_cells_layout, _devices, _excluded,
                                   _read_compactly, _root_fields, _score_cells, _train_from_disk,
                                   _use_warm_start_registry, _warm_start)
from lvmzoo.models.base import LatentModel
from lvmzoo.cli.options import (add_model_options, hyperparameters, model_class)

# Models whose default DATA is a bundled labelled data set: (data set, labels key, batch key).
LABELLED_DEFAULTS = {"scanvi": ("wu2020", "cluster_orig", "patient")}


def add_parser(commands, models) -> None:
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
    fit.add_argument("--root", metavar="KEY=VALUE", default=None,
                     help="pseudotime models: the cells known to be early, those whose "
                          "obs[KEY] is VALUE (e.g. stage=B, or 'time_point=0 h'); the same as "
                          "--root-key KEY --root-value VALUE (default: no root)")
    fit.add_argument("--out", required=True, metavar="DIR",
                     help="output directory (created if needed; earlier outputs are replaced)")
    fit.add_argument("--layer", metavar="L", default=None,
                     help="AnnData layer with the observations (default: .X)")
    fit.add_argument("--batch-key", metavar="K", default=None,
                     help="categorical obs column of batches (default: one batch)")
    fit.add_argument("--labels-key", metavar="K", default=None,
                     help="categorical obs column of cell labels; scanvi needs one (default: "
                          "none)")
    fit.add_argument("--gene-symbols", metavar="COLUMN", default=None,
                     help="var column of gene symbols when var_names are IDs (scanpy's "
                          "gene_symbols, e.g. gene_short_name): --markers may then name "
                          "symbols, and pseudotime.png, changing_genes.csv, "
                          "pseudotime_trends.csv and 'lvmzoo de' tables show them (saved "
                          "with the run; default: var_names only)")
    fit.add_argument("--unlabeled-category", metavar="U", default=UNLABELED_CATEGORY,
                     help="value of --labels-key that marks a cell as unlabelled; cells with a "
                          "missing label are unlabelled too (default: %(default)s)")
    fit.add_argument("--from-run", metavar="DIR", default=None,
                     help="scanvi: warm start from the scvi model saved in DIR (the --out of "
                          "'lvmzoo fit scvi'); DATA must have its genes and batches, and the "
                          "architecture, --layer and --batch-key are the scvi model's")
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
    fit.add_argument("--batch-size", type=int, metavar="N", default=128,
                     help="cells per optimisation step (default: %(default)s)")
    fit.add_argument("--lr", type=float, metavar="X", default=None,
                     help="Adam learning rate (default: the model's default_learning_rate)")
    fit.add_argument("--seed", type=int, metavar="S", default=0,
                     help="random seed; a fit is reproducible for a given seed "
                          "(default: %(default)s)")
    fit.add_argument("--replicates", type=int, metavar="R", default=None,
                     help="fit a seed ensemble: R replicates with seeds S..S+R-1 in one "
                          "compiled program, saved as one run whose latent, labels, "
                          "evaluate and 'lvmzoo de' use all R (cells in memory; default: "
                          "one fit)")
    fit.add_argument("--plot-method", choices=("auto", "umap", "pca"), default="auto",
                     help="2-D view of the latent in latent.png, drawn from at most "
                          f"{PLOT_CELLS:,} random cells: pca, umap (needs umap-learn; about "
                          "20 s more in a new process), or auto = pca (default: %(default)s)")
    fit.add_argument("--score-cells", metavar="N|all", type=_score_cells, default=SCORE_CELLS,
                     help="random cells per split (train, validation) whose log-likelihood "
                          "metrics.json reports, with its standard error (in memory: the "
                          "regression estimate on each cell's total, log total and nonzero "
                          "count); 'all' scores every "
                          "cell, which costs about an epoch per 100k cells for the deep models "
                          "(default: %(default)s)")
    fit.add_argument("--per-gene-outputs", choices=("auto", "all", "none"), default="auto",
                     help="write the model's cells × genes outputs into result.h5ad (scVI's "
                          "layers['scvi_normalized']): all, none, or auto = when they hold at "
                          f"most {PER_GENE_VALUES:,} values (e.g. 25,000 cells × 2,000 genes) "
                          "and DATA is in memory; above that, lvmzoo.analysis."
                          "normalized_expression computes them in chunks (default: %(default)s)")
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
                          "then holds obs, var and the latent but not the matrix "
                          "(default: on when DATA is larger than "
                          f"{100 * BACKED_RAM_SHARE:.0f}%% of this machine's RAM)")
    fit.add_argument("--devices", metavar="N", default=None,
                     help="devices to train on: a number or 'all'; each minibatch is split "
                          "over them, parameters are replicated; --batch-size is the total "
                          "over all devices (default: one device)")
    add_distributed_options(fit)
    add_model_options(fit, models)
    fit.set_defaults(run=run, command_parser=fit)


def run(args) -> int:
    from lvmzoo import datasets
    from lvmzoo.data.registry import setup_anndata
    from lvmzoo.infer.svi import FitDivergedError, fit

    writes_out = start_distributed(args)  # first: before anything touches a device
    cls = model_class(args.model)
    warm_start = _warm_start(args, cls) if args.from_run else None
    _root_fields(args, cls)
    try:
        chosen = hyperparameters(cls, args)
        model = cls.from_scvi(warm_start, **chosen) if warm_start else cls(**chosen)
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
        # the data set's own registration (e.g. hsmm: continuous, symbols) unless flags say
        defaults = datasets.REGISTRATION.get(name, {})
        if args.kind is None and "kind" in defaults:
            kind = defaults["kind"]
            transform = args.transform or defaults.get("transform", transform)
        args.gene_symbols = args.gene_symbols or defaults.get("gene_symbols_key")
        args.labels_key = args.labels_key or labels_key
        args.batch_key = args.batch_key or (None if warm_start else batch_key)
        backed = False
        compact = False
    else:
        source = args.data
        backed = _train_from_disk(args)
        compact = not backed and _read_compactly(args, transform)
        # Compactly: X stays in the file until setup_anndata has checked it (in blocks).
        adata = _read_backed(args.data) if backed or compact else _read_h5ad(args.data)
    if args.replicates is not None and (backed or args.devices):
        raise UsageError("--replicates trains its fits with the cells in memory on one "
                         "device; leave out --backed and --devices (or fit one model)")
    if backed and args.exclude:
        raise UsageError("--exclude needs the cells in memory; leave out --backed, or write "
                         "the cells to keep to a file of their own")
    adata, excluded = _excluded(adata, args.exclude)
    if warm_start:
        _use_warm_start_registry(args, warm_start.registry)
    data = setup_anndata(adata, layer=args.layer, batch_key=args.batch_key,
                         labels_key=args.labels_key, kind=kind, transform=transform,
                         unlabeled_category=args.unlabeled_category,
                         gene_symbols_key=args.gene_symbols, **model.registration())
    if compact:
        data = data.to_memory(compact=True)
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

    release_freed_memory()  # what reading and checking DATA freed: under the fit's peak
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
                         initial_params=warm_start, replicates=args.replicates)
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
    if not writes_out:  # --distributed: process 0 writes the outputs
        return 0
    release_freed_memory(drop_compiled=True)  # the fit's programs and temporaries

    steps = PostFitSteps()
    with steps("save_model", "saving the model"):
        _save_fit(out, fitted, settings)
    per_gene = per_gene_outputs(args.per_gene_outputs, data)
    with steps("annotate", f"computing the latent{' and per-gene outputs' if per_gene else ''} "
                           f"of {data.n_cells:,} cells"):
        if data.is_backed:
            annotated, added = _annotate_backed(fitted, adata, data)
        else:
            # The CLI owns adata (it read it): annotate in place rather than copy the matrix.
            annotated, added = fitted.annotate(adata, data, per_gene=per_gene,
                                               copy=adata.is_view)
    with steps("write_result", "writing result.h5ad"):
        _write_h5ad(out / "result.h5ad", annotated)
    with steps("plot", "drawing latent.png"):
        view = _save_latent_plot(out / "latent.png", annotated, fitted.model.name, data, args)
    model_files = []
    if hasattr(fitted.model, "write_files"):  # a model's own files (e.g. pseudotime.png)
        with steps("model_files", f"writing {fitted.model.name}'s own files"):
            model_files = fitted.model.write_files(out, annotated, fitted, data)
    with steps("score", "scoring the likelihood"):
        metrics = _fit_metrics(fitted, data, args.score_cells)
    metrics["fit_seconds_in_all"] = round(fit_seconds, 3)  # the summary's "s in all"
    metrics["post_fit_seconds"] = steps.seconds
    metrics["matrix_in_memory"] = _matrix_in_memory(data)
    _write_json(out / "metrics.json", metrics)
    print(_summary(fitted, data, source, metrics, added, out, fit_seconds, view))
    if model_files:
        print(f"also wrote {', '.join(str(out / f) for f in model_files)}")
    if not per_gene and fitted.model.annotate_per_gene.__func__ is not LatentModel.annotate_per_gene:
        print(f"left the cells × genes outputs out of result.h5ad ({data.n_cells:,} × "
              f"{data.n_genes:,}; --per-gene-outputs {args.per_gene_outputs}): "
              "--per-gene-outputs all writes them, or lvmzoo.analysis.normalized_expression "
              "computes them for the cells you need")
    for group in excluded:
        spelled = ",".join(f"{k}={v}" for k, v in group["cells"].items())
        print(f"left out {group['n_cells']:,} cells with {spelled} (--exclude)")
    return 0


def _matrix_in_memory(data):
    """How the fit held the cells × genes matrix (``None`` when it stayed on disk)."""
    import numpy as np

    from lvmzoo.data.compact import CompactCSR

    x = data.x
    if data.is_backed:
        return None
    if isinstance(x, CompactCSR):
        return {"format": f"CompactCSR ({x.values.dtype} values, {x.columns.dtype} columns)",
                "mib": x.nbytes / 2**20}
    if data.is_sparse:
        return {"format": f"CSR ({x.data.dtype} values, {x.indices.dtype} columns)",
                "mib": (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**20}
    return {"format": f"dense ({np.asarray(x).dtype})", "mib": np.asarray(x).nbytes / 2**20}


def _save_fit(out: Path, fitted, settings) -> None:
    from lvmzoo.infer.saving import save_model
    from lvmzoo.plotting import save_loss_plot

    save_model(fitted, out / "model", fit_settings=settings)
    _write_json(out / "history.json", fitted.history)
    save_loss_plot(fitted.history, out / "loss.png", title=fitted.model.name)
