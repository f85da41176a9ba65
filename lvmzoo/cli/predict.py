"""``lvmzoo predict RUN [DATA]``: load_model -> FittedModel.predict (labels and probabilities),
or, for a model without a classifier that writes per-cell outputs in chunks (the pseudotime
models: ``annotates_on_disk``), those outputs for the new cells."""

from __future__ import annotations

import argparse
import textwrap

from lvmzoo.cli._common import (UsageError, _fit_dir, _load_run, _output_file, _read_backed,
                                _read_h5ad, _scores_against_known_labels)


def add_parser(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="predict cell labels with a saved scanvi model (labels and probabilities, CSV), "
             "or place new cells on a saved pseudotime model (their pseudotime, CSV)",
        description=textwrap.fill(
            "Load the model saved in RUN_DIR, register DATA against its genes and batches, and "
            "write one CSV row per cell. A model with a classifier (scanvi): the cell's name, "
            "the predicted label ('prediction') and the probability of every label; if DATA "
            "has the model's labels column, prints accuracy, macro F1 and expected "
            "calibration error against it. A pseudotime model (pseudotime, switch_pseudotime, "
            "branching_pseudotime): the per-cell outputs 'lvmzoo fit' writes into result.h5ad "
            "(pseudotime with its 95 % interval, arc length, lineage), for new cells, by the "
            "saved encoder (no refitting)."),
    )
    predict.add_argument("run_dir", metavar="RUN_DIR",
                         help="the --out directory of 'lvmzoo fit scanvi', 'lvmzoo map-query' or "
                              "'lvmzoo fit pseudotime' (or its model/ subdirectory)")
    predict.add_argument("data", metavar="DATA", nargs="?", default=None,
                         help=".h5ad file with the model's batches and genes (missing genes "
                              "are zero-filled with a warning, refused below half of them; "
                              "default: RUN_DIR/result.h5ad, written by 'lvmzoo fit')")
    predict.add_argument("--out", required=True, metavar="FILE",
                         help="CSV file to write (its directory is created if needed)")
    predict.add_argument("--backed", action=argparse.BooleanOptionalAction, default=None,
                         help="read DATA's cells from disk (a backed .h5ad or a .zarr store) "
                              "a chunk at a time instead of loading them; the probabilities "
                              "are the same (default: on when DATA is larger than a quarter "
                              "of this machine's RAM, as for fit; a .zarr store is always "
                              "read from disk)")
    predict.set_defaults(run=run, command_parser=predict)


def run(args) -> int:
    import dataclasses as dc

    import pandas as pd

    from lvmzoo.data.registry import query_anndata
    from lvmzoo.io import atomic_write_file

    out = _output_file(args.out)
    fitted = _load_run(args.run_dir)
    per_cell = not hasattr(fitted.model, "predict_proba")
    if per_cell and not getattr(fitted.model, "annotates_on_disk", False):
        raise UsageError(f"the {fitted.model.name} model in {args.run_dir} neither predicts "
                         "labels nor writes per-cell outputs; fit one with a classifier (e.g. "
                         "'lvmzoo fit scanvi') or a pseudotime model; new cells' latent: "
                         "'lvmzoo map-query' (scvi family) or lvmzoo.load_model(RUN).latent")
    from lvmzoo.cli.fit import _train_from_disk

    args.data = args.data or str(_fit_dir(args.run_dir) / "result.h5ad")
    adata = _read_backed(args.data) if _train_from_disk(args) else _read_h5ad(args.data)
    if per_cell:
        return _per_cell_outputs(fitted, adata, args, out)
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


def _per_cell_outputs(fitted, adata, args, out) -> int:
    """The model's per-cell ``annotate`` outputs (obs columns) of the cells of ``adata``."""
    import anndata as ad

    from lvmzoo.data.registry import query_anndata
    from lvmzoo.io import atomic_write_file

    data = query_anndata(adata, fitted.registry, missing_genes="zero")
    result = ad.AnnData(obs=adata.obs[[]].copy(), var=adata.var[[]].copy())
    # One model, or a seed ensemble (its members' outputs averaged per cell, as fit writes).
    fitted.annotate(result, data, per_gene=False, copy=False)
    table = result.obs
    atomic_write_file(out, lambda tmp: table.to_csv(tmp, index_label="cell"))
    print(f"placed {data.n_cells:,} cells with the {fitted.model.name} model in "
          f"{args.run_dir}; wrote {args.out} ({', '.join(table.columns)})")
    return 0
