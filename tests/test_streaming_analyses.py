"""Analyses on cells that stay on disk equal the in-memory results for the same seed (issue 21)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import lvmzoo
from lvmzoo import cli, datasets
from lvmzoo.analysis import differential_expression
from lvmzoo.data import read_backed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    adata = datasets.simulate_counts(n_cells=400, n_genes=50, n_batches=2, n_de_genes_per_type=5,
                                     seed=3)
    adata.write_h5ad(root / "cells.h5ad")
    data = lvmzoo.setup_anndata(adata, batch_key="batch")
    fitted = lvmzoo.fit(lvmzoo.models.SCVI(n_hidden=16, n_latent=4, n_epochs_kl_warmup=None),
                        data, epochs=3, batch_size=100, learning_rate=1e-2, progress=False)
    fitted.save(root / "run" / "model")
    return root, fitted


def test_de_on_a_backed_file_equals_in_memory(saved):
    root, fitted = saved
    in_memory = ad.read_h5ad(root / "cells.h5ad")
    on_disk = read_backed(root / "cells.h5ad")
    tables = []
    for adata in (in_memory, on_disk):
        data = lvmzoo.query_anndata(adata, fitted.registry)
        tables.append(differential_expression(fitted, data, "cell_type", "type0", adata=adata,
                                              n_samples=300, seed=4))
    assert lvmzoo.query_anndata(on_disk, fitted.registry).is_backed
    memory, disk = tables
    pd.testing.assert_index_equal(memory.index, disk.index)
    raw = [f"{stat}{g}" for stat in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean")
           for g in (1, 2)]
    # The raw means are accumulated block by block in float64 on disk: equal to float32 rounding.
    np.testing.assert_allclose(disk[raw].to_numpy(float), memory[raw].to_numpy(float), rtol=1e-5)
    numeric = [c for c in memory.select_dtypes("number").columns if c not in raw]
    assert "proba_de" in numeric or "bayes_factor" in numeric
    np.testing.assert_allclose(disk[numeric].to_numpy(float), memory[numeric].to_numpy(float),
                               rtol=1e-5, atol=1e-6)


def test_cli_de_backed_equals_in_memory(saved, tmp_path, capsys):
    root, _ = saved
    for mode in ("--no-backed", "--backed"):
        rc = cli.main(["de", str(root / "run"), str(root / "cells.h5ad"), "--groupby",
                       "cell_type", "--group1", "type1", "--n-samples", "200", mode,
                       "--out", str(tmp_path / f"de{mode}.csv")])
        assert rc == 0, capsys.readouterr().err
    memory = pd.read_csv(tmp_path / "de--no-backed.csv", index_col=0)
    disk = pd.read_csv(tmp_path / "de--backed.csv", index_col=0)
    numeric = memory.select_dtypes("number").columns
    np.testing.assert_allclose(disk[numeric].to_numpy(float), memory[numeric].to_numpy(float),
                               rtol=1e-5, atol=1e-6)


def test_expression_analyses_on_a_backed_file_equal_in_memory(saved):
    """normalized_expression, the latent and per-cell scores read a chunk of cells at a time."""
    from lvmzoo.analysis import cell_scores, latent_representation, normalized_expression

    root, fitted = saved
    memory = lvmzoo.query_anndata(ad.read_h5ad(root / "cells.h5ad"), fitted.registry)
    disk = lvmzoo.query_anndata(read_backed(root / "cells.h5ad"), fitted.registry)
    assert disk.is_backed and not memory.is_backed
    np.testing.assert_allclose(normalized_expression(fitted, disk, n_samples=3, seed=2),
                               normalized_expression(fitted, memory, n_samples=3, seed=2),
                               rtol=1e-6)
    np.testing.assert_allclose(latent_representation(fitted, disk),
                               latent_representation(fitted, memory), rtol=1e-6)
    pd.testing.assert_frame_equal(cell_scores(fitted, disk, n_samples=5),
                                  cell_scores(fitted, memory, n_samples=5))


# --------------------------------------------------------------------------
# predict (scANVI's labels) and integration-metrics on backed files (perturb: its own file)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_scanvi(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed_scanvi")
    adata = datasets.simulate_counts(n_cells=300, n_genes=50, n_batches=2, n_de_genes_per_type=5,
                                     seed=5)
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::2], "label"] = "Unknown"
    adata.write_h5ad(root / "cells.h5ad")
    data = lvmzoo.setup_anndata(adata, batch_key="batch", labels_key="label")
    fitted = lvmzoo.fit(lvmzoo.models.SCANVI(n_hidden=16, n_latent=4), data, epochs=3,
                        batch_size=100, progress=False)
    fitted.save(root / "run" / "model")
    return root, fitted


def test_predict_on_a_backed_file_equals_in_memory_a_chunk_at_a_time(saved_scanvi, monkeypatch):
    import dataclasses

    from lvmzoo.data.backed import BackedMatrix
    from lvmzoo.models.scanvi import label_probabilities

    root, fitted = saved_scanvi
    registry = dataclasses.replace(fitted.registry, labels_key=None)  # as 'lvmzoo predict'
    memory = lvmzoo.query_anndata(ad.read_h5ad(root / "cells.h5ad"), registry)
    disk = lvmzoo.query_anndata(read_backed(root / "cells.h5ad"), registry)
    assert disk.is_backed and not memory.is_backed
    labels, probabilities = fitted.predict(memory, soft=True)
    streamed_labels, streamed = fitted.predict(disk, soft=True)
    pd.testing.assert_series_equal(streamed_labels, labels)
    pd.testing.assert_frame_equal(streamed, probabilities, check_exact=False, rtol=1e-6)
    # Bounded memory: the cells are read 64 at a time (5 chunks, the last one short).
    reads = []
    original = BackedMatrix.read
    monkeypatch.setattr(BackedMatrix, "read",
                        lambda self, start, stop: reads.append(stop - start)
                        or original(self, start, stop))
    chunked = label_probabilities(fitted.model, fitted.params, disk, chunk=64)
    assert reads == [64, 64, 64, 64, 44]
    np.testing.assert_allclose(chunked, probabilities.to_numpy(), rtol=1e-6)


def test_cli_predict_backed_equals_in_memory(saved_scanvi, tmp_path, capsys):
    root, _ = saved_scanvi
    for mode in ("--no-backed", "--backed"):
        rc = cli.main(["predict", str(root / "run"), str(root / "cells.h5ad"), mode,
                       "--out", str(tmp_path / f"p{mode}.csv")])
        assert rc == 0, capsys.readouterr().err
    memory = pd.read_csv(tmp_path / "p--no-backed.csv", index_col=0)
    disk = pd.read_csv(tmp_path / "p--backed.csv", index_col=0)
    pd.testing.assert_frame_equal(disk, memory, check_exact=False, rtol=1e-6)


def test_cli_integration_metrics_leave_a_backed_matrix_on_disk(tmp_path, capsys):
    """The metrics need obs and obsm only; a missing X_pca is refused in one line."""
    adata = datasets.simulate_counts(n_cells=200, n_genes=50, n_batches=2, n_de_genes_per_type=5,
                                     seed=6)
    rng = np.random.default_rng(0)
    adata.obsm["X_pca"] = rng.normal(size=(adata.n_obs, 5)).astype(np.float32)
    adata.obsm["X_emb"] = (adata.obsm["X_pca"][:, :3]
                           + adata.obs["cell_type"].cat.codes.to_numpy()[:, None])
    adata.write_h5ad(tmp_path / "cells.h5ad")
    command = ["integration-metrics", str(tmp_path / "cells.h5ad"), "--batch-key", "batch",
               "--labels-key", "cell_type", "--embeddings", "X_emb,X_pca", "--metrics",
               "silhouette_label,ilisi,graph_connectivity,pcr_comparison"]
    for mode in ("--no-backed", "--backed"):
        assert cli.main([*command, mode, "--out", str(tmp_path / mode)]) == 0, \
            capsys.readouterr().err
    tables = [pd.read_csv(tmp_path / mode / "integration_metrics.csv", index_col=0)
              for mode in ("--no-backed", "--backed")]
    pd.testing.assert_frame_equal(tables[1], tables[0])
    del adata.obsm["X_pca"]
    adata.write_h5ad(tmp_path / "no_pca.h5ad")
    capsys.readouterr()
    rc = cli.main(["integration-metrics", str(tmp_path / "no_pca.h5ad"), "--batch-key", "batch",
                   "--labels-key", "cell_type", "--embeddings", "X_emb", "--backed",
                   "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "has no obsm['X_pca'] and its matrix stays on disk" in err
    assert "leave X_pca out of --embeddings and pcr_comparison out of --metrics" in err
