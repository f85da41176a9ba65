"""Every notebook in ``notebooks/`` runs top to bottom with small settings.

Convention for notebooks (follow it when adding ``notebooks/NN_*.ipynb``):

* Every setting a notebook uses (epochs, number of cells, ...) is assigned in
  ONE code cell tagged ``parameters`` (cell metadata ``{"tags": ["parameters"]}``),
  one ``NAME = value`` per line, with the defaults a reader should see.
* :data:`SMALL_SETTINGS` below maps the notebook's file name to the values that
  make it run in seconds.  The test inserts, right after the ``parameters``
  cell, a cell assigning those values (tagged ``injected-parameters``, as
  papermill does) and executes the notebook with nbclient.  Every overridden
  name must be assigned in the ``parameters`` cell, so a renamed setting
  cannot silently stop being overridden.
* A notebook shows at least one figure, and executes without error.
* The kernel compiles with ``XLA_FLAGS=--xla_backend_optimization_level=0``
  (:data:`XLA_FAST_COMPILE`): at small settings compiling is nearly all the time.

The notebook runs on a temporary kernelspec that points at this interpreter
(``sys.executable``), with the repository on ``PYTHONPATH`` and a temporary
directory as working directory, so it works in a fresh virtual environment
(``pip install -e .[test]`` brings ``nbclient`` and ``ipykernel``) whatever
other Jupyter kernels are installed.  The committed notebook (executed with
its default settings, so readers see its figures) is read, never written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "lvmzoo-test-python"
CELL_TIMEOUT_S = 600
XLA_FAST_COMPILE = "--xla_backend_optimization_level=0"  # see the kernel fixture

# notebook file name -> {setting: value}; values are written with repr().
SMALL_SETTINGS: dict[str, dict[str, object]] = {
    "00_write_your_own_model.ipynb": {"N_CELLS": 300, "N_GENES": 40, "N_FACTORS": 3, "EPOCHS": 5,
                                      "COMPARE_CELLS": 80, "COMPARE_EPOCHS": 3, "IS_SAMPLES": 10,
                                      "NUTS_CELLS": 8, "NUTS_DRAWS": 20, "NUTS_CHAINS": 1,
                                      "REFIT_EPOCHS": 10, "CLI_EPOCHS": 2, "SCVI_EPOCHS": 3,
                                      "SCVI_HIDDEN": 16, "N_PRIOR_COMPONENTS": 3},
    "01_classical_models.ipynb": {"EPOCHS": 2, "N_CELLS": 1000, "BATCH_SIZE": 128},
    "02_scvi.ipynb": {"EPOCHS": 3, "KL_WARMUP_EPOCHS": 2, "N_CELLS": 300, "N_GENES": 100,
                      "N_HIDDEN": 16, "DE_SAMPLES": 200},
    "03_compare_inference.ipynb": {"N_CELLS": 80, "N_GENES": 5, "EPOCHS": 5, "NUTS_DRAWS": 30,
                                   "METHODS": ["amortized", "mean_field", "map", "nuts"]},
    "04_labels_and_integration.ipynb": {"N_CELLS": 400, "N_GENES": 80, "SCVI_EPOCHS": 3,
                                        "SCANVI_EPOCHS": 3, "QUERY_EPOCHS": 2, "N_HIDDEN": 16},
    "05_perturbation.ipynb": {"EPOCHS": 2, "N_CELLS": 600, "N_HIDDEN": 16},
    "08_seed_ensembles.ipynb": {"N_CELLS": 300, "N_GENES": 100, "EPOCHS": 3, "REPLICATES": 2,
                                "N_SAMPLES": 200},
    "07_citeseq.ipynb": {"EPOCHS": 3, "N_LATENT": 4, "N_HIDDEN": 16, "N_CLUSTERS": 3,
                         "DE_SAMPLES": 200},
    "06_trajectories.ipynb": {"N_CELLS": 150, "N_GENES": 30, "EPOCHS": 5, "PAUL15_CELLS": 300,
                              "PAUL15_EPOCHS": 3, "N_LINEAGES": 2, "HSMM_EPOCHS": 3},
}

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=", re.MULTILINE)


def parameters_cell(nb) -> int:
    """Index of the one code cell tagged ``parameters``."""
    tagged = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])
    ]
    if len(tagged) != 1:
        raise AssertionError(f"expected exactly one code cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def inject_settings(nb, settings: dict[str, object]):
    """A copy of ``nb`` with a cell assigning ``settings`` right after its parameters cell."""
    nb = copy.deepcopy(nb)
    index = parameters_cell(nb)
    defined = set(_ASSIGNMENT.findall(nb.cells[index].source))
    unknown = sorted(set(settings) - defined)
    assert not unknown, f"settings not assigned in the parameters cell: {unknown}"
    source = "\n".join(f"{name} = {value!r}" for name, value in settings.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


@pytest.fixture
def kernel(tmp_path_factory, monkeypatch) -> str:
    """Name of a kernelspec running ``sys.executable`` that can import this checkout."""
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lvmzoo test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    # JUPYTER_PATH is searched before user and system kernel directories.
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(jupyter_dir), os.environ.get("JUPYTER_PATH", "")]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # At small settings a notebook's time is almost all XLA compilation (cold cache, one core:
    # ~880 s for all notebooks against ~190 s warm).  LLVM without its optimisation passes
    # compiles about twice as fast; the programs run a little slower, which tiny data does not
    # notice.  Only the kernel and what it starts (the `lvmzoo` command lines) see the flag.
    # lvmzoo's own default (level 2, added when this process imported it) gives way to it.
    from lvmzoo.cache import FAST_CPU_COMPILATION_FLAG

    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if f != FAST_CPU_COMPILATION_FLAG)
    if "xla_backend_optimization_level" not in flags:
        monkeypatch.setenv("XLA_FLAGS", f"{flags} {XLA_FAST_COMPILE}".strip())
    return KERNEL_NAME


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    missing = sorted({p.name for p in NOTEBOOKS} - set(SMALL_SETTINGS))
    assert not missing, f"add small settings for these notebooks to SMALL_SETTINGS: {missing}"


def test_inject_settings_rejects_unknown_names():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("EPOCHS = 30\nN_CELLS = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(EPOCHS)"),
    ])
    injected = inject_settings(nb, {"EPOCHS": 2})
    assert [c.source for c in injected.cells] == ["EPOCHS = 30\nN_CELLS = None", "EPOCHS = 2", "print(EPOCHS)"]
    assert len(nb.cells) == 2  # the original is untouched
    with pytest.raises(AssertionError, match="EPOCH"):
        inject_settings(nb, {"EPOCH": 2})


@pytest.mark.slow  # three compiled fits: ~40-70 s on 2 busy cores, mostly XLA compilation
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, kernel: str, tmp_path: Path):
    committed = hashlib.sha256(path.read_bytes()).hexdigest()
    nb = inject_settings(nbformat.read(path, as_version=4), SMALL_SETTINGS[path.name])

    NotebookClient(
        nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    ).execute()  # raises CellExecutionError, naming the cell, if any cell fails

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells), "some cells did not run"
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no figure"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == committed, "the committed notebook changed"
