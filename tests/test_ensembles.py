"""Seed ensembles (``lvmzoo.fit(..., replicates=R)``): one vmapped program, one run, one object."""

import json

import numpy as np
import pytest

import lvmzoo
from lvmzoo.analysis import differential_expression, expected_calibration_error
from lvmzoo.datasets import simulate_counts
from lvmzoo.infer.ensemble import FittedEnsemble
from lvmzoo.models import PPCA, SCANVI, SCVI


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(400, 2))
    x = z @ rng.normal(size=(2, 12)) + 0.3 * rng.normal(size=(400, 12))
    return lvmzoo.CellData.from_arrays(x.astype(np.float32))


@pytest.fixture(scope="module")
def counts():
    adata = simulate_counts(n_cells=600, n_genes=120, n_batches=2, n_de_genes_per_type=10,
                            seed=4)
    return adata, lvmzoo.setup_anndata(adata, batch_key="batch")


@pytest.fixture(scope="module")
def scvi_ensemble(counts):
    _, data = counts
    return lvmzoo.fit(SCVI(n_latent=4, n_hidden=32), data, seed=0, replicates=3, epochs=10,
                      validation_fraction=0.1, progress=False)


def test_one_replicate_is_the_single_fit(gaussian):
    """R = 1 reproduces fit(seed=S) with the same validation split, early stopping and stop epoch
    (float32 rounding of the vmapped program aside)."""
    options = dict(epochs=60, batch_size=50, validation_fraction=0.2, early_stopping_patience=3,
                   progress=False)
    alone = lvmzoo.fit(PPCA(n_latent=2), gaussian, seed=7, **options)
    ensemble = lvmzoo.fit(PPCA(n_latent=2), gaussian, seed=7, replicates=1, **options)
    assert isinstance(ensemble, FittedEnsemble) and ensemble.seeds == [7]
    member = ensemble.members[0]
    np.testing.assert_array_equal(member.validation_index, alone.validation_index)
    assert member.history["stop_reason"] == alone.history["stop_reason"]
    assert member.history["best_epoch"] == alone.history["best_epoch"]
    assert len(member.history["epoch"]) == len(alone.history["epoch"]) < 60  # it stopped early
    np.testing.assert_allclose(member.history["validation_loss"],
                               alone.history["validation_loss"], rtol=1e-5)
    for name, value in alone.params.items():
        np.testing.assert_allclose(np.asarray(member.params[name]), np.asarray(value),
                                   rtol=2e-5, atol=2e-6, err_msg=name)
    np.testing.assert_allclose(ensemble.latent(gaussian), alone.latent(gaussian), atol=1e-4)
    assert ensemble.evaluate(gaussian)["avg_log_likelihood"] == pytest.approx(
        alone.evaluate(gaussian)["avg_log_likelihood"], abs=1e-3)


def test_replicates_share_the_split_and_align(scvi_ensemble, counts):
    _, data = counts
    ensemble = scvi_ensemble
    assert ensemble.seeds == [0, 1, 2]
    for m in ensemble.members:
        np.testing.assert_array_equal(m.validation_index, ensemble.validation_index)
    raw = [m.latent(data) for m in ensemble.members]
    aligned = ensemble.member_latents(data)
    # Aligned onto replicate 0: closer to it than the raw latents are (rotations differ).
    for r in (1, 2):
        assert np.linalg.norm(aligned[r] - raw[0]) < np.linalg.norm(raw[r] - raw[0])
    spread = ensemble.latent_spread(data)
    assert spread.shape == (data.n_cells,) and np.all(spread > 0)
    assert ensemble.latent(data).shape == (data.n_cells, 4)


def test_mixture_likelihood_is_at_least_the_replicates_average(scvi_ensemble, counts):
    _, data = counts
    held_out = data.subset(scvi_ensemble.validation_index)
    scores = scvi_ensemble.evaluate(held_out, n_samples=20)
    assert len(scores["replicate_avg_log_likelihood"]) == 3
    assert scores["single_fit_avg_log_likelihood"] == pytest.approx(
        np.mean(scores["replicate_avg_log_likelihood"]))
    assert scores["avg_log_likelihood"] >= scores["single_fit_avg_log_likelihood"]
    # Each replicate's score is the one its own evaluate gives.
    alone = scvi_ensemble.members[1].evaluate(held_out, n_samples=20)
    assert scores["replicate_avg_log_likelihood"][1] == pytest.approx(
        alone["avg_log_likelihood"], rel=1e-6)


def test_saved_and_loaded_ensemble_gives_identical_outputs(scvi_ensemble, counts, tmp_path):
    adata, data = counts
    scvi_ensemble.save(tmp_path / "run")
    loaded = lvmzoo.load_model(tmp_path / "run")
    assert isinstance(loaded, FittedEnsemble) and loaded.seeds == scvi_ensemble.seeds
    np.testing.assert_array_equal(loaded.latent(data), scvi_ensemble.latent(data))
    np.testing.assert_array_equal(loaded.latent_spread(data), scvi_ensemble.latent_spread(data))
    small = data.subset(np.arange(50))
    assert loaded.evaluate(small, n_samples=5) == scvi_ensemble.evaluate(small, n_samples=5)
    before = differential_expression(scvi_ensemble, data, "cell_type", "type0", "type1",
                                     adata=adata, mode="change", n_samples=300)
    after = differential_expression(loaded, data, "cell_type", "type0", "type1", adata=adata,
                                    mode="change", n_samples=300)
    assert before.equals(after)
    # The run reads as replicate 0's run for tools that know only single fits.
    assert json.loads((tmp_path / "run" / "model.json").read_text())["seed"] == 0


def test_ensemble_de_has_stability_columns_and_one_fit_is_unchanged(scvi_ensemble, counts):
    adata, data = counts
    table = differential_expression(scvi_ensemble, data, "cell_type", "type0", "type1",
                                    adata=adata, mode="change", n_samples=300)
    for column in ("replicate_call_share", "replicate_bayes_factor_sd", "replicate_lfc_mean_sd",
                   "n_replicates"):
        assert column in table
    share = table["replicate_call_share"].to_numpy()
    assert np.all((share >= 0) & (share <= 1)) and set(np.round(share * 3)) <= {0, 1, 2, 3}
    assert (table["n_replicates"] == 3).all()
    vanilla = differential_expression(scvi_ensemble, data, "cell_type", "type0", "type1",
                                      adata=adata, n_samples=300)
    assert "replicate_lfc_mean_sd" not in vanilla and "replicate_call_share" in vanilla
    # One fit: no stability columns, and an ensemble of one draws exactly what it draws.
    single = differential_expression(scvi_ensemble.members[0], data, "cell_type", "type0",
                                     "type1", adata=adata, mode="change", n_samples=300)
    assert not any(c.startswith("replicate_") for c in single.columns)
    one = FittedEnsemble(scvi_ensemble.members[:1], scvi_ensemble.alignment)
    assert differential_expression(one, data, "cell_type", "type0", "type1", adata=adata,
                                   mode="change", n_samples=300).equals(single)


def test_analyses_of_one_model_refuse_an_ensemble_clearly(scvi_ensemble, counts):
    from lvmzoo.analysis import latent_representation, normalized_expression

    _, data = counts
    with pytest.raises(TypeError, match="ensemble.members"):
        latent_representation(scvi_ensemble, data)
    with pytest.raises(TypeError, match="no single set of parameters"):
        scvi_ensemble.params
    small = data.subset(np.arange(20))
    expression = normalized_expression(scvi_ensemble, small, n_samples=2)
    members = [normalized_expression(m, small, n_samples=2) for m in scvi_ensemble.members]
    np.testing.assert_allclose(expression, np.mean(members, axis=0), rtol=1e-6)


@pytest.mark.slow
def test_pooled_de_controls_fdr_and_finds_the_planted_genes():
    """Planted DE between two cell types: the pooled calls keep the posterior FDR target and
    find at least as many planted genes as the replicates alone.  (Measured when written: the
    ensemble 15 planted, 0 false; its replicates alone 15/5, 14/5, 16/22, 16/8 — a realised
    FDR of 0.25 to 0.58 against the 0.05 target.)  DE compares expression frequencies: the
    planted genes shift every other gene's share between the two types by 0.16 (log2) in
    this simulation, below delta = 0.25, so the planted genes are exactly the truly DE ones."""
    adata = simulate_counts(n_cells=600, n_genes=120, n_batches=2, n_de_genes_per_type=10,
                            de_log_fold_change=2.0, seed=4)
    data = lvmzoo.setup_anndata(adata, batch_key="batch")
    ensemble = lvmzoo.fit(SCVI(n_latent=5, n_hidden=32), data, seed=0, replicates=4,
                          epochs=40, validation_fraction=0.1, progress=False)
    planted = adata.var["de_type"].isin(["type0", "type1"]).to_numpy()

    def calls(fitted):
        table = differential_expression(fitted, data, "cell_type", "type0", "type1",
                                        adata=adata, mode="change", n_samples=2000)
        called = table["is_de_fdr_0.05"].reindex(adata.var_names).to_numpy()
        return int((called & planted).sum()), int((called & ~planted).sum())

    found, false = calls(ensemble)
    singles = [calls(m)[0] for m in ensemble.members]
    assert found >= 10 and false / (found + false) <= 0.05
    assert found >= min(singles), (found, singles)


@pytest.mark.slow
def test_ensemble_labels_are_at_least_as_well_calibrated():
    """SCANVI on a simulation with 20 % labelled cells: the ensemble's probabilities on the
    unlabelled cells have an ECE no worse than the replicates' average, and its accuracy is
    no worse than the best replicate's."""
    adata = simulate_counts(n_cells=800, n_genes=120, n_batches=2, n_de_genes_per_type=10,
                            de_log_fold_change=1.0, seed=5)
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    unlabelled = np.random.default_rng(0).random(adata.n_obs) < 0.8
    adata.obs.loc[unlabelled, "label"] = "Unknown"
    data = lvmzoo.setup_anndata(adata, batch_key="batch", labels_key="label")
    ensemble = lvmzoo.fit(SCANVI(n_latent=5, n_hidden=32), data, seed=0, replicates=4,
                          epochs=60, validation_fraction=0.1, progress=False)
    categories = list(data.registry.label_categories)
    truth = np.array([categories.index(c) for c in adata.obs["cell_type"].astype(str)])
    test = unlabelled.copy()
    test[ensemble.validation_index] = False  # the temperature was fitted on validation cells
    members = ensemble.member_probabilities(data)[:, test]
    combined = ensemble.predict_proba(data)[test]
    member_ece = [expected_calibration_error(p, truth[test]) for p in members]
    assert expected_calibration_error(combined, truth[test]) <= np.mean(member_ece)
    accuracy = lambda p: float((p.argmax(1) == truth[test]).mean())  # noqa: E731
    assert accuracy(combined) >= max(accuracy(p) for p in members) - 0.01
    labels, probabilities = ensemble.predict(data, soft=True)
    np.testing.assert_allclose(probabilities.to_numpy().sum(1), 1.0, rtol=1e-6)


def test_cli_fit_replicates_then_de(counts, tmp_path, capsys):
    from lvmzoo import cli

    adata, _ = counts
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    run = tmp_path / "run"
    assert cli.main(["fit", "scvi", str(path), "--batch-key", "batch", "--replicates", "2",
                     "--epochs", "3", "--n-hidden", "16", "--n-latent", "3", "--score-cells",
                     "100", "--out", str(run), "--no-progress"]) == 0
    assert "seed ensemble of 2 replicates (seeds 0, 1)" in capsys.readouterr().out
    assert (run / "model" / "ensemble.json").is_file()
    assert (run / "model" / "replicates" / "1" / "params.msgpack").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["train"]["replicate_avg_log_likelihood"]) == 2
    assert cli.main(["de", str(run), "--groupby", "cell_type", "--group1", "type0", "--mode",
                     "change", "--n-samples", "200", "--out", str(tmp_path / "de.csv")]) == 0
    header = (tmp_path / "de.csv").read_text().splitlines()[0].split(",")
    assert {"replicate_call_share", "replicate_lfc_mean_sd", "n_replicates"} <= set(header)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), str(path), "--n-samples", "5"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["ensemble"] == "mixture of 2 replicates"
    assert scores["avg_log_likelihood"] >= scores["single_fit_avg_log_likelihood"]
    assert cli.main(["fit", "scvi", str(path), "--replicates", "2", "--backed", "--out",
                     str(tmp_path / "r2")]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--replicates" in error[0]
