"""``lvmzoo integration-metrics [DATA]``: scIB metrics of embeddings (analysis.integration)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from lvmzoo.cli._common import UsageError, _comma_list, _output_dir, _read_backed, _read_h5ad


_INTEGRATION_DEFAULT = ("wu2020", "patient", "cluster_orig")


def add_parser(commands) -> None:
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
    command.add_argument("--backed", action=argparse.BooleanOptionalAction, default=None,
                         help="leave DATA's matrix on disk (a backed .h5ad or a .zarr store): "
                              "the metrics need only obs and the obsm embeddings, so X is never "
                              "read, and a missing X_pca is refused rather than computed "
                              "(default: on when DATA is larger than a quarter of this "
                              "machine's RAM, as for fit)")
    command.set_defaults(run=run, command_parser=command)


def run(args) -> int:
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
        adata, source, name = _read_input(args), args.data, Path(args.data).name
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


def _read_input(args):
    """DATA in memory, or with its matrix left on disk (``--backed``, or DATA too large to load).

    On disk, only obs and obsm are in memory: every metric reads the embeddings
    and the batch and label columns, never X.  The one thing that would need X
    is a missing ``X_pca``; that is refused with the ways around it.
    """
    from lvmzoo.cli.fit import _train_from_disk

    if not _train_from_disk(args):
        return _read_h5ad(args.data)
    adata = _read_backed(args.data)
    pcr = "pcr_comparison" in _comma_list(args.metrics)
    wants_pca = "X_pca" in _comma_list(args.embeddings) or (pcr and args.pre_integrated == "X_pca")
    if wants_pca and "X_pca" not in adata.obsm:
        raise UsageError(
            f"DATA {args.data} has no obsm['X_pca'] and its matrix stays on disk (--backed), "
            "where a PCA of every cell cannot be computed; add obsm['X_pca'] to DATA, or leave "
            "X_pca out of --embeddings and pcr_comparison out of --metrics (or name another "
            "unintegrated embedding with --pre-integrated KEY)")
    return adata
