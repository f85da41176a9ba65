"""``lvmzoo de RUN [DATA]``: load_model -> analysis.de.differential_expression."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from lvmzoo.cli._common import UsageError, _de_run_dirs, _load_for_de, _read_backed, _read_h5ad


_DE_SHOWN = {
    "vanilla": ["bayes_factor", "proba_m1", "scale1", "scale2"],
    "change": ["proba_de", "lfc_mean", "bayes_factor", "scale1", "scale2"],
}


def add_parser(commands) -> None:
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
        ) + "\n\n" + textwrap.fill(
            "A run of 'lvmzoo fit --replicates R' (a seed ensemble) pools the posterior draws "
            "of its R replicates (the mixture posterior) for every statistic, and adds per "
            "gene how stable the result is across the replicates: replicate_call_share (the "
            "share of replicates calling the gene: its FDR call in change mode, |Bayes factor| "
            ">= 3 in vanilla mode), replicate_bayes_factor_sd and, in change mode, "
            "replicate_lfc_mean_sd (standard deviations over the replicates), n_replicates."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    de.add_argument("--proteins", action="store_true",
                    help="a totalvi run: compare its proteins (denoised foreground expression, "
                         "ambient background removed) instead of its genes; one row per protein")
    de.add_argument("--seed", type=int, metavar="S", default=0,
                    help="random seed of the draws (default: %(default)s)")
    de.add_argument("--out", required=True, metavar="FILE",
                    help="CSV file to write (its directory is created if needed)")
    de.add_argument("--backed", action=argparse.BooleanOptionalAction, default=None,
                    help="read DATA's cells from disk (a backed .h5ad or a .zarr store) instead "
                         "of loading them: only the cells drawn for the posterior samples are "
                         "read, and the raw means are accumulated block by block (default: on "
                         "when DATA is larger than a quarter of this machine's RAM, as for fit)")
    de.set_defaults(run=run, command_parser=de)


def run(args) -> int:
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
    from lvmzoo.cli.fit import _train_from_disk

    adata = _read_backed(args.data) if _train_from_disk(args) else _read_h5ad(args.data)
    data = query_anndata(adata, fitted.registry)
    if getattr(args, "proteins", False):  # the same DE on the protein view of a totalvi model
        from lvmzoo.analysis.proteins import protein_view

        if getattr(fitted, "members", [fitted])[0].model.name != "totalvi":
            raise UsageError(f"--proteins needs a totalvi run; {args.run_dir} holds a "
                             f"{getattr(fitted, 'members', [fitted])[0].model.name!r} model")
        fitted, data = protein_view(fitted, data)
    table = differential_expression(
        fitted, data, args.groupby, args.group1, args.group2, adata=adata, mode=args.mode,
        delta=args.delta, fdr_target=args.fdr_target, n_samples=args.n_samples,
        batch_correction=not args.no_batch_correction, seed=args.seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"cannot create the directory of --out {args.out}: {err.strerror}") from None
    atomic_write_file(out, lambda tmp: table.to_csv(
        tmp, index_label="protein" if getattr(args, "proteins", False) else "gene"))
    print(_de_summary(table, args, data))
    return 0


def _de_summary(table, args, data, top: int = 10) -> str:
    features = "proteins" if getattr(args, "proteins", False) else "genes"
    lines = [f"differential expression ({args.mode} mode) of {data.n_genes:,} {features} over "
             f"{data.n_cells:,} cells by {args.groupby!r}; wrote {args.out}"]
    calls = f"is_de_fdr_{args.fdr_target}"
    for comparison, rows in table.groupby("comparison", sort=False):
        called = ""
        if calls in rows:
            called = f"; {int(rows[calls].sum())} genes DE at FDR {args.fdr_target}"
        lines.append(f"\n{comparison}{called}; top {min(top, len(rows))}:")
        columns = _DE_SHOWN[args.mode] + (["replicate_call_share"]
                                          if "replicate_call_share" in rows else [])
        shown = rows[columns].head(top)
        lines.append(shown.to_string(float_format="{:.4g}".format))
    return "\n".join(lines)
