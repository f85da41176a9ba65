"""Perturbation prediction and scoring on cells that stay on disk (issue 21).

The same simulation, design and quick scVI fit as tests/test_perturbation.py
(imported from it): each result from a backed ``.h5ad`` (or a Zarr store)
equals the in-memory one for the same seed, the cells are read in blocks of
contiguous rows never larger than the block size, and a pass over the cells
holds far less than the cells.
"""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata._core.sparse_dataset import BaseCompressedSparseDataset

import lvmzoo
import test_perturbation as base
from lvmzoo import cli, datasets
from lvmzoo.analysis import expression, perturbation
from lvmzoo.analysis.perturbation import (compare_perturbation, energy_distance,
                                          predict_perturbation, prediction_profiles)
from lvmzoo.data import backed, read_backed
from lvmzoo.data.backed import BackedMatrix
from lvmzoo.data.transforms import apply_transform
from lvmzoo.models import CPA

DESIGN, HELD_OUT = base.DESIGN, base.HELD_OUT
# The module fixtures of tests/test_perturbation.py, shared rather than copied.
simulation, training, quick_scvi_run = base.simulation, base.training, base.quick_scvi_run


@pytest.fixture(scope="module")
def files(simulation, training, tmp_path_factory):
    """The simulation (with the measured perturbed cells to score against) and the training
    cells (without), each written to an .h5ad file."""
    root = tmp_path_factory.mktemp("perturb_streaming")
    simulation.write_h5ad(root / "all.h5ad")
    training.write_h5ad(root / "training.h5ad")
    return root


@pytest.fixture(scope="module")
def scvi_fit(quick_scvi_run):
    return lvmzoo.load_model(quick_scvi_run)


@pytest.fixture(scope="module")
def quick_cpa_fit(training):
    model = CPA(n_hidden=16, n_latent=4, n_layers=0)
    data = lvmzoo.setup_anndata(training, batch_key="batch", **model.registration())
    return lvmzoo.fit(model, data, epochs=2, batch_size=128, progress=False)


def _assert_same_prediction(streamed, memory):
    assert (streamed.X != memory.X).nnz == 0
    np.testing.assert_array_equal(streamed.layers["expected"], memory.layers["expected"])
    pd.testing.assert_frame_equal(streamed.obs, memory.obs)
    assert list(streamed.var_names) == list(memory.var_names)
    np.testing.assert_equal(streamed.uns["perturbation"], memory.uns["perturbation"])


@pytest.mark.parametrize("fit", ["scvi_fit", "quick_cpa_fit"])  # latent arithmetic, counterfactual
def test_prediction_from_disk_equals_in_memory(fit, files, request):
    fitted = request.getfixturevalue(fit)
    memory = predict_perturbation(fitted, ad.read_h5ad(files / "all.h5ad"), **DESIGN, seed=2)
    on_disk = read_backed(files / "all.h5ad")
    assert on_disk.isbacked
    _assert_same_prediction(predict_perturbation(fitted, on_disk, **DESIGN, seed=2), memory)


def test_evaluation_and_profiles_from_disk_equal_in_memory(scvi_fit, files):
    memory, on_disk = ad.read_h5ad(files / "all.h5ad"), read_backed(files / "all.h5ad")
    predicted = predict_perturbation(scvi_fit, memory, **DESIGN, seed=1)
    options = dict(n_top_genes=20, n_pcs=10, max_cells=60, seed=3)  # subsets drawn for E-distance
    expected = compare_perturbation(memory, predicted, **DESIGN, **options)
    streamed = compare_perturbation(on_disk, predicted, **DESIGN, **options)
    pd.testing.assert_frame_equal(streamed.metrics, expected.metrics, check_exact=False,
                                  rtol=1e-12)
    pd.testing.assert_frame_equal(streamed.gene_means, expected.gene_means, check_exact=False,
                                  rtol=1e-12)
    assert streamed.top_genes == expected.top_genes
    assert list(expected.metrics.index) == ["scvi (latent_arithmetic)", "mean shift",
                                            "no change"]

    profiles = [prediction_profiles(adata, predicted, **DESIGN, n_top_genes=10)
                for adata in (ad.read_h5ad(files / "training.h5ad"),
                              read_backed(files / "training.h5ad"))]
    pd.testing.assert_frame_equal(profiles[1].gene_means, profiles[0].gene_means,
                                  check_exact=False, rtol=1e-12)
    assert profiles[1].top_genes == profiles[0].top_genes
    # The profiles never read the measured perturbed cells: the same means with or without them.
    pd.testing.assert_frame_equal(
        prediction_profiles(on_disk, predicted, **DESIGN).gene_means[["control", "mean shift"]],
        profiles[0].gene_means[["control", "mean shift"]], check_exact=False, rtol=1e-12)


def test_energy_distance_pca_from_the_covariance_is_the_svd_one(simulation):
    """The principal components from the streamed covariance equal the SVD of the cells'
    (up to sign): with every cell in the energy distance, the "no change" score is the
    one computed from the cells in memory."""
    measured = simulation[((simulation.obs["cell_type"] == HELD_OUT)
                           & (simulation.obs["condition"] == "perturbed")).to_numpy()].copy()
    measured.uns["perturbation"] = {"scale": "counts"}
    metrics = compare_perturbation(simulation, {"oracle": measured}, **DESIGN, n_pcs=5,
                                   max_cells=10_000).metrics
    # log1p_cp10k as registered data hold it (float32), as the evaluation reads the counts.
    x = apply_transform("log1p_cp10k", simulation.X).toarray().astype(np.float64)
    types = simulation.obs["cell_type"].astype(str).to_numpy()
    condition = simulation.obs["condition"].astype(str).to_numpy()
    control = x[(types == HELD_OUT) & (condition == "control")]
    perturbed = x[(types == HELD_OUT) & (condition == "perturbed")]
    both = np.vstack([control, perturbed])
    _, _, vt = np.linalg.svd(both - both.mean(0), full_matrices=False)
    project = lambda cells: (cells - both.mean(0)) @ vt[:5].T
    assert metrics.loc["no change", "energy_distance"] == pytest.approx(
        energy_distance(project(control), project(perturbed)), rel=1e-9)
    assert metrics.loc["oracle", "energy_distance"] == pytest.approx(0.0, abs=1e-5)


@pytest.fixture
def block_reads(monkeypatch):
    """Blocks of 50 cells everywhere, the number of file rows of every read from disk
    recorded, and any read through anndata's own indexing (row by row for a list of rows) or
    of the whole matrix an error."""
    block = 50
    monkeypatch.setattr(perturbation, "_MAX_BLOCK_CELLS", block)
    monkeypatch.setattr(expression, "_MAX_CHUNK_CELLS", block)
    monkeypatch.setattr(backed, "SCAN_BLOCK", block)
    monkeypatch.setattr(BackedMatrix.__init__, "__defaults__", (None, "none", block))
    reads = []
    original = BackedMatrix._read_file_range
    monkeypatch.setattr(BackedMatrix, "_read_file_range",
                        lambda self, start, stop: reads.append(stop - start)
                        or original(self, start, stop))

    def refuse(*args, **kwargs):
        raise AssertionError("read the matrix through anndata, not in blocks of rows")

    monkeypatch.setattr(BaseCompressedSparseDataset, "__getitem__", refuse)
    monkeypatch.setattr(BaseCompressedSparseDataset, "to_memory", refuse)
    monkeypatch.setattr(BackedMatrix, "to_memory", refuse)
    return block, reads


def test_cells_on_disk_are_read_in_bounded_blocks(scvi_fit, files, simulation, block_reads):
    block, reads = block_reads
    on_disk = read_backed(files / "all.h5ad")
    predicted = predict_perturbation(scvi_fit, on_disk, **DESIGN, seed=1)
    n_prediction_reads = len(reads)
    compare_perturbation(on_disk, predicted, **DESIGN, n_top_genes=20, max_cells=60)
    assert n_prediction_reads > 0 and len(reads) > n_prediction_reads
    assert max(reads) <= block < simulation.n_obs
    # Each pass reads each file row about once: a few passes over the file, not one per cell.
    assert sum(reads) <= 6 * simulation.n_obs


def test_a_pass_over_cells_on_disk_holds_far_less_than_the_cells(tmp_path, monkeypatch):
    """tracemalloc's peak (numpy reports its buffers to it) while scoring from disk, against
    the cells as the dense float64 matrix the evaluation held before: 8,000 cells × 300 genes,
    19 MB; a block of 64 cells is 150 kB, the genes × genes covariance 0.7 MB."""
    simulation = datasets.simulate_counts(**{**base.SIMULATION, "n_cells": 8000,
                                             "n_genes": 300})
    simulation.write_h5ad(tmp_path / "cells.h5ad")
    measured = simulation[((simulation.obs["cell_type"] == HELD_OUT)
                           & (simulation.obs["condition"] == "perturbed")).to_numpy()].copy()
    measured.uns["perturbation"] = {"scale": "counts"}  # a prediction, read in blocks too
    cells_bytes = simulation.n_obs * simulation.n_vars * 8
    del simulation
    monkeypatch.setattr(perturbation, "_MAX_BLOCK_CELLS", 64)
    on_disk = read_backed(tmp_path / "cells.h5ad")
    tracemalloc.start()
    try:
        compare_perturbation(on_disk, measured, **DESIGN, n_top_genes=20, n_pcs=5, max_cells=30)
        prediction_profiles(on_disk, measured, **DESIGN)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < cells_bytes / 4, (peak, cells_bytes)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data")
def test_cli_perturb_backed_equals_in_memory(quick_scvi_run, files, simulation, tmp_path,
                                             capsys, monkeypatch):
    simulation.write_zarr(tmp_path / "all.zarr")
    command = ["perturb", str(quick_scvi_run), "--control", "control", "--perturbed",
               "perturbed", "--predict", HELD_OUT, "--n-top-genes", "20"]
    runs = {"memory": [str(files / "all.h5ad"), "--no-backed"],
            "backed": [str(files / "all.h5ad"), "--backed"],
            "zarr": [str(tmp_path / "all.zarr")]}  # a store is always read from disk
    for name, arguments in runs.items():
        assert cli.main([*command[:2], *arguments, *command[2:], "--out",
                         str(tmp_path / name)]) == 0, capsys.readouterr().err
    # Without --backed, a file larger than a quarter of RAM is read from disk too.
    monkeypatch.setattr(backed, "total_memory", lambda: 1000)
    assert cli.main([*command[:2], str(files / "all.h5ad"), *command[2:], "--out",
                     str(tmp_path / "auto")]) == 0
    assert "more than 25% of this machine's" in capsys.readouterr().err
    memory = pd.read_csv(tmp_path / "memory" / "metrics.csv", index_col=0)
    memory_prediction = ad.read_h5ad(tmp_path / "memory" / "predicted.h5ad")
    for name in ("backed", "zarr", "auto"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / name / "metrics.csv", index_col=0),
                                      memory, check_exact=False, rtol=1e-12)
        _assert_same_prediction(ad.read_h5ad(tmp_path / name / "predicted.h5ad"),
                                memory_prediction)

    # --backed needs a file to read from disk: one line, exit 2.
    code = cli.main([*command[:2], "--backed", *command[2:], "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lvmzoo: error: ") and err.count("\n") == 1
    assert "--backed reads DATA from disk, and no DATA was given" in err
