"""``lvmzoo compare MODELS [DATA]``: infer.compare over guides and NUTS on the same cells."""

from __future__ import annotations

import dataclasses
import textwrap

from lvmzoo.cli.options import model_class
from lvmzoo.cli._common import UsageError, _output_dir, _read_h5ad


def add_parser(commands) -> None:
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
                              "full_rank, flow, map, laplace, nuts; a joint family takes options "
                              "after a colon, e.g. low_rank:local=mean_field,rank=2")
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
    compare.set_defaults(run=run, command_parser=compare)


def run(args) -> int:
    import numpy as np
    import pandas as pd

    from lvmzoo import datasets
    from lvmzoo.data.registry import setup_anndata
    from lvmzoo.infer.compare import CompareSettings, compare, comparison_figure, markdown_table
    from lvmzoo.infer.guides import GUIDES, guide_name
    from lvmzoo.io import atomic_write_file, atomic_write_text

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = _methods(args.methods)
    classes = [model_class(m) for m in models]
    unknown = [m for m in methods if guide_name(m) not in GUIDES and m != "nuts"]
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


def _methods(text: str) -> list[str]:
    """``"mean_field,low_rank:local=mean_field,rank=3"`` -> two methods: a part with ``=``
    and no ``:`` is one more option of the method before it."""
    methods: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and methods:
            methods[-1] += "," + part
        else:
            methods.append(part)
    return methods


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
