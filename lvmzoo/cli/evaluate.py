"""``lvmzoo evaluate RUN DATA``: load_model -> query_anndata -> FittedModel.evaluate."""

from __future__ import annotations

import json
from pathlib import Path

from lvmzoo.cli._common import UsageError, _load_run, _read_h5ad, _write_json


def add_parser(commands) -> None:
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
    evaluate.set_defaults(run=run, command_parser=evaluate)


def run(args) -> int:
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
