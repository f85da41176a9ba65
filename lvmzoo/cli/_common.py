"""What every command shares: the one-line usage error, reading DATA and RUN_DIR, writing outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

PROG = "lvmzoo"
EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line or the input files; reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are exceptions (one line, no usage dump)."""

    def error(self, message):  # noqa: D102 - argparse hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _usage_error(err: Exception) -> int:
    message = " ".join(str(err).split())  # always exactly one line
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _first_line(doc: Optional[str]) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].replace("``", "") if lines else ""


def _names(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``: a comma-separated list of obs column names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one column name")
    return names


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _load_run(run_dir: str, what: str = "RUN_DIR"):
    """A saved model from a run directory (the --out of 'lvmzoo fit', or its model/)."""
    from lvmzoo.infer.saving import load_model

    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"{what} {run_dir} is not a directory; give the --out directory of "
                         "'lvmzoo fit'")
    try:
        return load_model(run)  # it finds the model/ of a fit's --out itself
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


def _fit_dir(run_dir: str) -> Path:
    """The --out directory of 'lvmzoo fit' given it or its model/ subdirectory."""
    from lvmzoo.io import MODEL_FILE

    run = Path(run_dir)
    return run.parent if (run / MODEL_FILE).is_file() else run


def _output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out directory {path}: {err.strerror}") from None
    return out


def _output_file(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--out {path} is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the directory of --out {path}: {err.strerror}") from None
    return out


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
    from lvmzoo.infer.saving import load_model

    try:
        return load_model(model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"cannot load a model from {run_dir}: {err}") from None


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


def _read_h5ad(path: str):
    from lvmzoo.data.aligned import read_h5ad  # matrices a CPU fit uses without a copy

    file = Path(path)
    if not file.exists():
        raise UsageError(f"DATA file {path} does not exist")
    if file.suffix.lower() == ".h5mu":  # MuData: the "rna" modality, "prot" as obsm
        from lvmzoo.data.multimodal import read_h5mu

        return read_h5mu(file)
    if file.is_dir() or file.suffix.lower() != ".h5ad":
        raise UsageError(
            f"DATA {path} is not an .h5ad file (nor an .h5mu MuData); convert it first, e.g. "
            "anndata.read_csv(...).write_h5ad('data.h5ad')"
        )
    try:
        return read_h5ad(file)
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
    from lvmzoo.io import write_h5ad  # atomic; a matrix on disk is copied, not loaded

    write_h5ad(path, adata)


def release_freed_memory(drop_compiled: bool = False) -> None:
    """Hand memory that Python, NumPy and XLA have freed back to the system (glibc only).

    glibc keeps freed heap memory for reuse, so a process's RSS stays at its
    highest point: without this, the blocks read while checking DATA, XLA's
    compilation of the fit and the fit's own temporaries (about 350 MiB at
    200,000 cells) stayed under every later step's peak.  ``drop_compiled``
    also drops jax's in-memory compiled programs (the fit's, once it is over:
    about 65 MiB more; the persistent cache keeps them on disk).
    """
    if drop_compiled:
        import jax

        jax.clear_caches()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass
