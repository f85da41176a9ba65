"""Checks and parsing of ``lvmzoo fit``'s own inputs, done before anything is fitted or written:
option ranges, ``--devices``, ``--exclude`` groups, ``--score-cells``, the ``--from-run`` warm
start, whether DATA trains from disk, and whether the model accepts the data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from lvmzoo.cli._common import PROG, UsageError, _load_run
from lvmzoo.cli.options import given_options, option_flag

# `lvmzoo fit` trains from disk when DATA is larger than this share of RAM: an
# in-memory fit of an .h5ad file of counts holds the matrix in 4 bytes per count
# (about half its size as a float32 CSR; _read_compactly), others hold it once as
# anndata reads it (lvmzoo.data.aligned; benchmarks/results/cli_scale.md); the
# share leaves room for the per-gene outputs and for what else runs.
BACKED_RAM_SHARE = 0.25


def _score_cells(text: str):
    """``--score-cells``: a positive number, or ``all`` (``None``)."""
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return n


def _warm_start(args, cls):
    """The fitted scvi model of ``--from-run`` (for scanvi)."""
    if not hasattr(cls, "from_scvi"):
        raise UsageError(f"--from-run warm starts scanvi from a fitted scvi; {cls.name} has no "
                         "warm start")
    architecture = [n for n in given_options(args) if n != "classification_ratio"]
    if architecture:
        raise UsageError(f"{option_flag(args, architecture[0])} cannot be combined with "
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


def _root_fields(args, cls) -> None:
    """``--root KEY=VALUE``: set the model's ``root_key`` / ``root_value`` flags from it."""
    from lvmzoo.cli.options import cli_fields

    if args.root is None:
        return
    key, sep, value = args.root.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise UsageError(f"--root {args.root!r}: write KEY=VALUE, the obs column and the value "
                         "of the early cells, e.g. stage=B")
    if not {"root_key", "root_value"} <= {f.name for f in cli_fields(cls)}:
        raise UsageError(f"model {cls.name!r} has no root (--root is for the pseudotime "
                         "models)")
    if getattr(args, "root_key", None) is not None or getattr(args, "root_value", None) is not None:
        raise UsageError("give --root KEY=VALUE or --root-key/--root-value, not both")
    args.root_key, args.root_value = key.strip(), value.strip()


def _check_fit_ranges(args) -> None:
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience must be at least 1, got {args.patience}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.replicates is not None and args.replicates < 1:
        raise UsageError(f"--replicates must be at least 1, got {args.replicates}")
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


def _read_compactly(args, transform: str) -> bool:
    """Whether DATA's matrix goes into memory as a CompactCSR read from the file.

    For an ``.h5ad`` file whose ``X`` is CSR, registered as it is (no ``--layer``,
    transform ``none``, no ``--exclude``): the counts are read block by block
    into 4 bytes per stored count (:mod:`lvmzoo.data.compact`) instead of the 8
    of the float32 matrix, which is left in the file (result.h5ad copies it from
    there).  Anything else is read by anndata as before.
    """
    import h5py

    path = Path(args.data)
    if (args.layer is not None or args.exclude or transform != "none" or not path.is_file()
            or path.suffix.lower() != ".h5ad"):
        return False
    try:
        with h5py.File(path, "r") as f:
            x = f.get("X")
            return (f.attrs.get("encoding-type") == "anndata" and "raw" not in f
                    and isinstance(x, h5py.Group) and isinstance(f.get("obs"), h5py.Group)
                    and x.attrs.get("encoding-type") == "csr_matrix")
    except OSError:  # not HDF5: anndata's reader reports it
        return False


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

