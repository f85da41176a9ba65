"""``lvmzoo map-query RUN QUERY``: load_model -> analysis.query.map_query (scArches)."""

from __future__ import annotations

import sys
import textwrap
import time
import warnings
from pathlib import Path

from lvmzoo.cli._common import UsageError, PROG, _load_run, _output_dir, _scores_against_known_labels, _read_h5ad, _write_h5ad


def add_parser(commands) -> None:
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
    map_query.set_defaults(run=run, command_parser=map_query)


def run(args) -> int:
    from lvmzoo.analysis.query import map_query
    from lvmzoo.infer.saving import save_model

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
