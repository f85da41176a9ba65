"""What ``lvmzoo fit`` does after the fit is bounded: sampled scores, sampled plot, per-gene outputs by size."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

import lvmzoo
from lvmzoo import cli, datasets
from lvmzoo.cli import fit_outputs


@pytest.fixture(scope="module")
def ppca_fit():
    adata = datasets.load("mouse_10k")
    data = lvmzoo.setup_anndata(adata, transform="log1p_cp10k")
    fitted = lvmzoo.fit(lvmzoo.models.PPCA(n_latent=3), data, epochs=2, batch_size=512,
                        validation_fraction=0.1, progress=False, seed=0)
    return fitted, data


def test_a_sampled_score_is_within_its_standard_error_of_the_all_cells_score(ppca_fit):
    fitted, data = ppca_fit
    every = fit_outputs._fit_metrics(fitted, data, score_cells=None)
    sampled = fit_outputs._fit_metrics(fitted, data, score_cells=1000)
    for split in ("train", "validation"):
        full, part = every[split], sampled[split]
        assert full["n_cells"] == full["n_cells_in_split"] and full["standard_error"] == 0.0
        assert part["n_cells"] == 1000 and part["n_cells_in_split"] == full["n_cells"]
        gap = abs(part["avg_log_likelihood"] - full["avg_log_likelihood"])
        print(f"{split}: all {full['avg_log_likelihood']:.3f}, 1,000 random cells "
              f"{part['avg_log_likelihood']:.3f} ± {part['standard_error']:.3f} (gap {gap:.3f})")
        # The reported error is an honest one: the sample's average is within it (2 s.e.:
        # a 95 % interval; the validation split has 1,000 cells, so it is scored whole).
        assert part["standard_error"] > 0 or part["n_cells"] == full["n_cells"]
        assert gap <= 2 * part["standard_error"] + 1e-6


def test_regression_estimate_and_cell_sizes(monkeypatch):
    import scipy.sparse as sp

    from lvmzoo.data.compact import CompactCSR

    rng = np.random.default_rng(0)
    sizes = rng.gamma(2.0, 50.0, size=(5000, 3))
    values = 3.0 - 0.5 * sizes[:, 0] + 2.0 * sizes[:, 2]  # exactly linear in the sizes
    sample = rng.choice(5000, 200, replace=False)
    estimate, sd = fit_outputs.regression_estimate(values[sample], sizes[sample], sizes.mean(0))
    assert estimate == pytest.approx(values.mean(), abs=1e-8) and sd < 1e-8
    noisy = values + rng.normal(0.0, 4.0, 5000)
    estimate, sd = fit_outputs.regression_estimate(noisy[sample], sizes[sample], sizes.mean(0))
    assert sd == pytest.approx(4.0, rel=0.15) and abs(estimate - noisy.mean()) < 3 * sd / np.sqrt(200)
    # No size varies: the plain average and standard deviation.
    assert fit_outputs.regression_estimate(noisy[:50], np.ones((50, 3)), np.ones(3)) == (
        pytest.approx(noisy[:50].mean()), pytest.approx(noisy[:50].std(ddof=1)))

    dense = rng.poisson(0.7, size=(40, 9)).astype(np.float32)
    dense[[3, 39]] = 0  # empty rows, the last among them
    expected = np.column_stack([dense.sum(1), np.log1p(dense.sum(1)), (dense != 0).sum(1)])
    csr = sp.csr_matrix(dense)
    compact = CompactCSR(csr.data.astype(np.uint16), csr.indices.astype(np.uint16), csr.indptr,
                         csr.shape)
    monkeypatch.setattr(fit_outputs, "SIZES_BLOCK", 7)  # blocks of rows, empty ones at ends
    for x in (dense, csr, compact):
        data = type("Cells", (), {"x": x, "is_backed": False})()
        np.testing.assert_allclose(fit_outputs.cell_sizes(data), expected)


def test_the_sampled_standard_error_matches_the_spread_over_samples(ppca_fit):
    """Over 20 seeds, the spread of sampled averages is about the reported standard error."""
    fitted, data = ppca_fit
    scores = []
    for seed in range(20):
        fitted.seed = seed  # the sample is drawn with the fit's seed
        scores.append(fit_outputs._fit_metrics(fitted, data, score_cells=500)["train"])
    fitted.seed = 0
    spread = np.std([s["avg_log_likelihood"] for s in scores], ddof=1)
    reported = np.mean([s["standard_error"] for s in scores])
    print(f"spread of 20 sampled averages {spread:.3f}, reported standard error {reported:.3f}")
    assert 0.5 * reported < spread < 2.0 * reported


@pytest.fixture(scope="module")
def scvi_cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    adata = datasets.simulate_counts(n_cells=300, n_genes=40, n_batches=2,
                                     n_de_genes_per_type=3, seed=2)
    adata.write_h5ad(root / "cells.h5ad")
    return root


def _fit(root, name, *extra):
    out = root / name
    rc = cli.main(["fit", "scvi", str(root / "cells.h5ad"), "--out", str(out), "--epochs", "2",
                   "--no-progress", "--n-hidden", "16", "--batch-key", "batch", *extra])
    assert rc == 0
    return out


def test_requested_full_outputs_equal_the_python_api(scvi_cells, capsys):
    out = _fit(scvi_cells, "full", "--per-gene-outputs", "all", "--score-cells", "all")
    err = capsys.readouterr().err
    for step in ("saving the model", "computing the latent and per-gene outputs of 300 cells",
                 "writing result.h5ad", "drawing latent.png", "scoring the likelihood"):
        assert f"lvmzoo: {step} ..." in err, err
    fitted = lvmzoo.load_model(out / "model")
    adata = ad.read_h5ad(scvi_cells / "cells.h5ad")
    data = lvmzoo.query_anndata(adata, fitted.registry)
    expected, keys = fitted.annotate(adata, data)
    result = ad.read_h5ad(out / "result.h5ad")
    assert 'layers["scvi_normalized"]' in keys
    np.testing.assert_array_equal(result.layers["scvi_normalized"],
                                  expected.layers["scvi_normalized"])
    np.testing.assert_array_equal(result.obsm["X_scvi"], expected.obsm["X_scvi"])
    metrics = json.loads((out / "metrics.json").read_text())
    train = fitted.evaluate(data.subset(fitted.train_index))
    assert metrics["train"]["avg_log_likelihood"] == pytest.approx(train["avg_log_likelihood"])
    assert metrics["train"]["n_cells"] == len(fitted.train_index)
    assert set(metrics["post_fit_seconds"]) == {"save_model", "annotate", "write_result", "plot",
                                                "score"}


def test_large_per_gene_outputs_are_left_out_and_the_summary_says_how_to_get_them(
        scvi_cells, monkeypatch, capsys):
    monkeypatch.setattr(fit_outputs, "PER_GENE_VALUES", 1000)
    monkeypatch.setattr(fit_outputs, "PLOT_CELLS", 100)
    out = _fit(scvi_cells, "bounded", "--score-cells", "50")
    printed = capsys.readouterr().out
    result = ad.read_h5ad(out / "result.h5ad")
    assert "scvi_normalized" not in result.layers
    assert "X_scvi" in result.obsm
    assert "--per-gene-outputs all writes them" in printed
    assert "(50 random cells; --score-cells all for every cell)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["n_cells"] == 50 and metrics["train"]["standard_error"] > 0


def test_fit_leaves_the_input_file_unchanged(scvi_cells):
    before = (scvi_cells / "cells.h5ad").read_bytes()
    _fit(scvi_cells, "again")
    assert (scvi_cells / "cells.h5ad").read_bytes() == before


def test_score_cells_rejects_nonsense(tmp_path, capsys):
    assert cli.main(["fit", "ppca", "--out", str(tmp_path / "o"), "--score-cells", "0"]) == 2
    assert "expected a positive number or 'all'" in capsys.readouterr().err


def test_large_in_memory_data_is_evaluated_from_host_slices_with_the_same_results(
        ppca_fit, monkeypatch):
    """Above DEVICE_EVALUATION_VALUES, evaluation slices the host matrix chunk by chunk
    instead of copying every cell to the device: the numbers are the same."""
    from lvmzoo.data import streaming

    fitted, data = ppca_fit
    cells = data.subset(np.arange(3000))
    expected_latent, expected = fitted.latent(cells), fitted.evaluate(cells)
    monkeypatch.setattr(streaming, "DEVICE_EVALUATION_VALUES", 0)
    assert streaming.EvaluationBatches(cells, 1024)._source is None
    np.testing.assert_array_equal(fitted.latent(cells), expected_latent)
    assert fitted.evaluate(cells) == expected


def test_a_model_without_a_closed_form_is_known_without_reading_and_latents_use_equal_chunks(
        scvi_cells, monkeypatch):
    """``log_likelihood`` of scVI (no closed form) reads no cells (it read all of them, then
    one chunk: a model returning None from its own override still stops after one);
    ``latent`` cuts 3,000 cells into equal chunks (3 x 1,000: one program, not two)."""
    from lvmzoo.infer import results

    out = _fit(scvi_cells, "chunks")
    # The CLI held the file's counts compactly (lvmzoo.data.compact), 4 bytes per count.
    held = json.loads((out / "metrics.json").read_text())["matrix_in_memory"]
    assert held["format"] == "CompactCSR (uint16 values, uint16 columns)"
    fitted = lvmzoo.load_model(out / "model")
    cells = lvmzoo.query_anndata(ad.concat([ad.read_h5ad(scvi_cells / "cells.h5ad")] * 10,
                                           index_unique="-"), fitted.registry)
    expected = fitted.latent(cells.subset(np.arange(1500)))
    sizes = []
    evaluation = results.FittedModel._evaluation

    def counted(self, data, cells=True, size=results.EVAL_CHUNK):
        for chunk in evaluation(self, data, cells=cells, size=size):
            sizes.append(chunk[0].size)
            yield chunk

    monkeypatch.setattr(results.FittedModel, "_evaluation", counted)
    # scVI does not override LatentModel.log_likelihood: None without reading a cell.
    assert fitted.log_likelihood(cells) is None and sizes == []
    sizes.clear()
    latent = fitted.latent(cells)
    assert sizes == [1000, 1000, 1000] and latent.shape == (3000, fitted.model.n_latent)
    np.testing.assert_allclose(latent[:1500], expected, rtol=1e-5, atol=1e-6)
