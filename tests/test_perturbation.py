"""Perturbation prediction: latent arithmetic, the CPA model, metrics, baselines, CLI.

The simulation plants a response whose fold change of the mean count is the
same in every cell type but whose responsive genes are expressed at
type-specific levels (``response_baseline_sd``), so the change of
log-normalised expression differs by type: the mean-shift baseline, which
transfers the other types' log-normalised change, is biased for the held-out
type, and a model of the counts need not be.  The truth is additive in log
expression, so the models use linear decoders (``n_layers=0``), the family
that contains it.  Fits share module fixtures: 600 cells × 150 genes, 600
short epochs each (most of the time is compilation).
"""

from __future__ import annotations

import functools
import types

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats
from sklearn.metrics import r2_score as sklearn_r2

import lvmzoo
from lvmzoo import datasets
from lvmzoo.analysis.expression import map_cells
from lvmzoo.analysis.perturbation import (
    compare_perturbation, energy_distance, evaluate_perturbation, exclude_cells, log_normalise,
    pearson, perturbation_design, predict_perturbation, prediction_profiles, r2_score, top_genes)
from lvmzoo.cli import main
from lvmzoo.data.registry import DataError
from lvmzoo.models import CPA, PPCA, SCVI

HELD_OUT = "type0"
DESIGN = dict(condition_key="condition", control="control", perturbed="perturbed",
              cell_type_key="cell_type", cell_type=HELD_OUT)
SIMULATION = dict(n_cells=600, n_genes=150, n_cell_types=3, n_de_genes_per_type=10,
                  perturbed_fraction=0.5, n_response_genes=30, response_log_fold_change=2.0,
                  response_baseline_sd=2.0, mean_library=1000.0, seed=0)
FIT = dict(epochs=600, batch_size=128, learning_rate=1e-2, progress=False)
DOSES = [0.1, 0.3, 1.0, 3.0, 10.0]


@pytest.fixture(scope="module")
def simulation():
    return datasets.simulate_counts(**SIMULATION)


@pytest.fixture(scope="module")
def training(simulation):
    """The simulation without the held-out type's perturbed cells."""
    return exclude_cells(simulation, [{"cell_type": HELD_OUT, "condition": "perturbed"}])


@pytest.fixture(scope="module")
def scvi_fit(training):
    model = SCVI(n_hidden=32, n_latent=10, n_layers=0, likelihood="nb", n_epochs_kl_warmup=300)
    return lvmzoo.fit(model, lvmzoo.setup_anndata(training, batch_key="batch"), **FIT)


@pytest.fixture(scope="module")
def cpa_fit(training):
    model = CPA(n_hidden=32, n_latent=10, n_layers=0, n_epochs_kl_warmup=300)
    data = lvmzoo.setup_anndata(training, batch_key="batch", **model.registration())
    return lvmzoo.fit(model, data, **FIT)


# --------------------------------------------------------------------------
# Acceptance: the held-out type's response, the dose-response
# --------------------------------------------------------------------------


@pytest.mark.slow  # two fits, ~40 s each on 2 busy cores (mostly compilation)
@pytest.mark.parametrize("fit", ["scvi_fit", "cpa_fit"])
def test_held_out_response_beats_both_baselines(fit, simulation, request):
    fitted = request.getfixturevalue(fit)
    predicted = predict_perturbation(fitted, simulation, **DESIGN)
    expected_method = "counterfactual" if fit == "cpa_fit" else "latent_arithmetic"
    assert predicted.uns["perturbation"]["method"] == expected_method
    metrics = evaluate_perturbation(simulation, predicted, **DESIGN)
    name = metrics.index[0]
    print(metrics.round(3).to_string())
    assert metrics.loc[name, "r2_top"] > 0.8
    for baseline in ("mean shift", "no change"):
        assert metrics.loc[name, "r2_top"] > metrics.loc[baseline, "r2_top"], baseline
        assert metrics.loc[name, "r2"] > metrics.loc[baseline, "r2"], baseline
        assert metrics.loc[name, "energy_distance"] < metrics.loc[baseline, "energy_distance"]
    assert metrics.loc[name, "delta_pearson_top"] > metrics.loc["mean shift", "delta_pearson_top"]


@pytest.mark.slow  # one fit, ~40 s
def test_cpa_recovers_the_planted_dose_response():
    adata = datasets.simulate_counts(**{**SIMULATION, "perturbed_fraction": 0.7,
                                        "response_baseline_sd": 0.0}, doses=DOSES)
    model = CPA(n_hidden=32, n_latent=10, n_layers=0, n_epochs_kl_warmup=300, dose_key="dose")
    data = lvmzoo.setup_anndata(adata, batch_key="batch", **model.registration())
    fitted = lvmzoo.fit(model, data, **FIT)

    grid = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0])
    control = data.subset(np.flatnonzero((adata.obs["condition"] == "control").to_numpy()))
    code = data.registry.categorical_codes("condition", ["perturbed"])[0]
    responsive = adata.var["responsive"].to_numpy()
    sign = np.sign(adata.var["true_response_type0"].to_numpy()[responsive])

    def log_mean(dose):
        mean = map_cells(_counterfactual_mean, fitted, control, 0,
                         extra=(jnp.int32(code), jnp.float32(dose)), per_cell=150)
        return np.log(mean)

    baseline = log_mean(0.0)
    # The predicted log fold change of the responsive genes, in the direction of the truth.
    magnitude = np.array([np.mean(sign * (log_mean(d) - baseline).mean(0)[responsive])
                          for d in grid])
    truth = 2.0 * datasets.dose_response(grid, hill=2.0, ec50=1.0)
    print(np.round(magnitude, 3), np.round(truth, 3))
    assert np.all(np.diff(magnitude) > -1e-6)
    assert np.corrcoef(magnitude, truth)[0, 1] > 0.9
    fitted_curve = np.asarray(model.dose_response(fitted.params, grid))[code]
    assert np.corrcoef(fitted_curve, truth)[0, 1] > 0.9
    assert fitted_curve[0] == 0.0

    # predict_perturbation at the perturbed cells' most common dose, recorded with the cells.
    predicted = predict_perturbation(fitted, adata, **DESIGN)
    dose = predicted.uns["perturbation"]["dose"]
    assert dose in DOSES and (predicted.obs["dose"] == dose).all()


@functools.partial(jax.jit, static_argnames=("model",))
def _counterfactual_mean(model, params, batch, key, code, dose):
    return model.counterfactual(params, batch, perturbation=code, dose=dose).mean


# --------------------------------------------------------------------------
# What a prediction holds
# --------------------------------------------------------------------------


@pytest.mark.slow  # reuses the scVI fit
def test_prediction_is_counts_of_the_held_out_control_cells(scvi_fit, simulation):
    before = simulation.copy()
    predicted = predict_perturbation(scvi_fit, simulation, **DESIGN, seed=3)
    control = simulation.obs_names[((simulation.obs["cell_type"] == HELD_OUT)
                                    & (simulation.obs["condition"] == "control")).to_numpy()]
    assert predicted.n_obs == len(control)
    assert list(predicted.obs["predicted_from"]) == list(control)
    assert (predicted.obs["condition"] == "perturbed").all()
    assert list(predicted.var_names) == list(scvi_fit.registry.gene_names)
    assert sp.issparse(predicted.X)
    values = predicted.X.data
    assert np.all(values >= 0) and np.array_equal(values, np.round(values))
    expected = predicted.layers["expected"]
    assert expected.shape == predicted.shape and np.all(expected > 0)
    # Counts drawn around their expectation: the cell totals agree on average.
    totals = np.asarray(predicted.X.sum(1)).ravel()
    assert abs(totals.mean() / expected.sum(1).mean() - 1) < 0.05
    info = predicted.uns["perturbation"]
    assert info["scale"] == "counts" and info["shift_from"] == ["type1", "type2"]
    assert len(info["delta"]) == 10
    # Reproducible for a seed, and the input is untouched.
    again = predict_perturbation(scvi_fit, simulation, **DESIGN, seed=3)
    assert (again.X != predicted.X).nnz == 0
    assert simulation.obs.equals(before.obs) and (simulation.X != before.X).nnz == 0


# --------------------------------------------------------------------------
# Metrics against peers, baselines by hand
# --------------------------------------------------------------------------


def test_metrics_match_scipy_and_sklearn():
    rng = np.random.default_rng(0)
    truth, guess = rng.normal(size=50), rng.normal(size=50)
    assert r2_score(truth, guess) == pytest.approx(sklearn_r2(truth, guess), rel=1e-12)
    assert r2_score(truth, 0.9 * truth + 0.1) == pytest.approx(
        sklearn_r2(truth, 0.9 * truth + 0.1), rel=1e-12)
    assert pearson(truth, guess) == pytest.approx(scipy.stats.pearsonr(truth, guess)[0],
                                                  rel=1e-10)
    assert np.isnan(pearson(truth, np.zeros(50)))
    x, y = rng.normal(size=80), rng.normal(0.5, 2.0, size=60)
    # pertpy's E-distance is the square of scipy's energy distance (in one dimension).
    assert energy_distance(x[:, None], y[:, None]) == pytest.approx(
        scipy.stats.energy_distance(x, y) ** 2, rel=1e-9)
    cloud = rng.normal(size=(40, 5))
    assert energy_distance(cloud, cloud) == pytest.approx(0.0, abs=1e-9)
    control, perturbed = rng.normal(size=(30, 20)), rng.normal(size=(25, 20))
    perturbed[:, 7] += 3.0
    t = scipy.stats.ttest_ind(perturbed, control, equal_var=False).statistic
    np.testing.assert_array_equal(top_genes(control, perturbed, 5),
                                  np.argsort(-np.abs(t), kind="stable")[:5])
    assert top_genes(control, perturbed, 1)[0] == 7


def test_baselines_and_a_perfect_prediction(simulation):
    # The held-out type's measured perturbed cells, passed as a prediction, score perfectly.
    measured = simulation[((simulation.obs["cell_type"] == HELD_OUT)
                           & (simulation.obs["condition"] == "perturbed")).to_numpy()].copy()
    measured.uns["perturbation"] = {"scale": "counts"}
    evaluation = compare_perturbation(simulation, {"oracle": measured}, **DESIGN, n_top_genes=20)
    metrics = evaluation.metrics
    assert list(metrics.index) == ["oracle", "mean shift", "no change"]
    assert metrics.loc["oracle", "r2"] == pytest.approx(1.0)
    assert metrics.loc["oracle", "delta_pearson_top"] == pytest.approx(1.0)
    assert metrics.loc["oracle", "energy_distance"] == pytest.approx(0.0, abs=1e-5)  # float32 vs 64
    assert np.isnan(metrics.loc["no change", "delta_pearson"])

    # The baselines, by hand.
    x = log_normalise(simulation.X.toarray())
    types = simulation.obs["cell_type"].astype(str).to_numpy()
    condition = simulation.obs["condition"].astype(str).to_numpy()
    mean = lambda t, c: x[(types == t) & (condition == c)].mean(0)
    shift = np.mean([mean(t, "perturbed") - mean(t, "control") for t in ("type1", "type2")], 0)
    means = evaluation.gene_means
    np.testing.assert_allclose(means["no change"], mean(HELD_OUT, "control"))
    np.testing.assert_allclose(means["mean shift"], mean(HELD_OUT, "control") + shift)
    np.testing.assert_allclose(means["observed"], mean(HELD_OUT, "perturbed"))
    top = [list(simulation.var_names).index(g) for g in evaluation.top_genes]
    assert metrics.loc["mean shift", "r2_top"] == pytest.approx(
        sklearn_r2(mean(HELD_OUT, "perturbed")[top], (mean(HELD_OUT, "control") + shift)[top]))


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(condition_key="treatment"), "condition_key 'treatment' is not a column"),
    (dict(perturbed="drug"), "no cells have obs\\['condition'\\] == 'drug'"),
    (dict(cell_type="type9"), "no cells have obs\\['cell_type'\\] == 'type9'"),
    (dict(perturbed="control"), "control and perturbed are the same"),
])
def test_bad_design_is_a_data_error(simulation, change, match):
    measured = simulation[:5].copy()
    measured.uns["perturbation"] = {"scale": "counts"}
    with pytest.raises(DataError, match=match):
        evaluate_perturbation(simulation, measured, **{**DESIGN, **change})


def test_held_out_type_without_control_cells(simulation):
    no_control = exclude_cells(simulation, [{"cell_type": HELD_OUT, "condition": "control"}])
    with pytest.raises(DataError, match="has no 'control' cells to predict from"):
        predict_perturbation(None, no_control, **DESIGN)


def test_design_accepts_a_held_out_type_without_perturbed_cells(simulation, training):
    # Predicting what was never measured is the point: no perturbed cells of the type is fine.
    design = perturbation_design(training, **DESIGN)
    assert not design.held_out_perturbed.any()
    assert design.held_out_control.sum() == int(
        ((training.obs["cell_type"] == HELD_OUT) & (training.obs["condition"] == "control")).sum())
    assert design.other_types == ("type1", "type2")
    # ... but a type without control cells has nothing to predict from,
    only_perturbed = exclude_cells(simulation, [{"cell_type": HELD_OUT, "condition": "control"}])
    with pytest.raises(DataError, match="has no 'control' cells to predict from"):
        perturbation_design(only_perturbed, **DESIGN)
    # and a type with no cells at all is unknown.
    neither = exclude_cells(training, [{"cell_type": HELD_OUT, "condition": "control"}])
    with pytest.raises(DataError, match="no cells have obs\\['cell_type'\\] == 'type0'"):
        perturbation_design(neither, **DESIGN)
    # Only scoring needs the measured cells, and says where to turn without them.
    measured = simulation[:5].copy()
    measured.uns["perturbation"] = {"scale": "counts"}
    with pytest.raises(DataError, match="no measured 'perturbed' cells .*prediction_profiles"):
        compare_perturbation(training, measured, **DESIGN)


def test_prediction_profiles_without_measured_perturbed_cells(simulation, training):
    # A stand-in prediction: the held-out type's measured perturbed cells, which the profiles
    # describe without reading them from the data.
    measured = simulation[((simulation.obs["cell_type"] == HELD_OUT)
                           & (simulation.obs["condition"] == "perturbed")).to_numpy()].copy()
    measured.uns["perturbation"] = {"scale": "counts"}
    profiles = prediction_profiles(training, {"oracle": measured}, **DESIGN, n_top_genes=5)
    means = profiles.gene_means
    assert list(means.columns) == ["control", "oracle", "mean shift"]
    # The same means as the evaluation computes when the measured cells are there.
    evaluation = compare_perturbation(simulation, {"oracle": measured}, **DESIGN)
    for column in means.columns:
        np.testing.assert_allclose(means[column], evaluation.gene_means[column])
    change = (means["oracle"] - means["control"]).abs()
    assert profiles.top_genes == list(change.sort_values(ascending=False, kind="stable")
                                      .index[:5])
    # No other type measured in both conditions: no mean-shift baseline, still a profile.
    alone = training[(training.obs["cell_type"] == HELD_OUT).to_numpy()
                     | (training.obs["condition"] == "perturbed").to_numpy()
                     & (training.obs["cell_type"] == "type1").to_numpy()].copy()
    assert list(prediction_profiles(alone, measured, **DESIGN).gene_means.columns) == [
        "control", "model (prediction)"]


def test_exclude_cells_checks_its_groups(simulation):
    kept = exclude_cells(simulation, [{"cell_type": "type1", "condition": "perturbed"},
                                      {"batch": "batch0", "cell_type": "type2"}])
    assert not ((kept.obs["cell_type"] == "type1") & (kept.obs["condition"] == "perturbed")).any()
    assert not ((kept.obs["cell_type"] == "type2") & (kept.obs["batch"] == "batch0")).any()
    assert kept.n_obs < simulation.n_obs
    with pytest.raises(DataError, match="'donor': not a column"):
        exclude_cells(simulation, [{"donor": "d1"}])
    with pytest.raises(DataError, match="no cells match cell_type=typo"):
        exclude_cells(simulation, [{"cell_type": "typo"}])


def test_a_model_without_encoder_and_decoder_cannot_predict(simulation):
    model = PPCA(n_latent=2)
    fitted = types.SimpleNamespace(model=model, guide=model.guide)  # the checks need no fit
    with pytest.raises(ValueError, match="neither counterfactual\\(\\) nor an encoder"):
        predict_perturbation(fitted, simulation, **DESIGN)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        predict_perturbation(fitted, simulation, **DESIGN, method="magic")


def test_cpa_checks_its_keys():
    with pytest.raises(ValueError, match="also a covariate key"):
        CPA(perturbation_key="cell_type")
    with pytest.raises(ValueError, match="likelihood"):
        CPA(likelihood="gaussian")
    assert CPA(covariate_keys="cell_type").covariate_keys == ("cell_type",)
    assert CPA(dose_key="dose").registration() == {
        "categorical_covariate_keys": ("condition", "cell_type"), "covariate_keys": ("dose",)}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


@pytest.mark.slow  # a CLI fit and a prediction, ~40 s
def test_cli_fit_excluding_cells_then_perturb(simulation, tmp_path, capsys):
    path = tmp_path / "sim.h5ad"
    simulation.write_h5ad(path)
    run = tmp_path / "run"
    n_held_out = int(((simulation.obs["cell_type"] == HELD_OUT)
                      & (simulation.obs["condition"] == "perturbed")).sum())
    assert main(["fit", "cpa", str(path), "--exclude", "cell_type=type0,condition=perturbed",
                 "--n-hidden", "16", "--n-layers", "0", "--epochs", "3", "--no-progress",
                 "--validation-fraction", "0", "--out", str(run)]) == 0
    assert (f"left out {n_held_out} cells with cell_type=type0,condition=perturbed"
            in capsys.readouterr().out)
    fitted = lvmzoo.load_model(run / "model")
    assert fitted.registry.n_obs == simulation.n_obs - n_held_out

    out = tmp_path / "perturb"
    assert main(["perturb", str(run), str(path), "--condition-key", "condition",
                 "--control", "control", "--perturbed", "perturbed", "--cell-type-key",
                 "cell_type", "--predict", HELD_OUT, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err  # the fit excluded the predicted cells
    assert "mean shift" in printed.out and "no change" in printed.out
    predicted = ad.read_h5ad(out / "predicted.h5ad")
    assert "expected" in predicted.layers
    assert list(predicted.var_names) == list(simulation.var_names)
    metrics = pd.read_csv(out / "metrics.csv", index_col=0)
    assert list(metrics.index) == ["cpa (counterfactual)", "mean shift", "no change"]
    assert (out / "metrics.md").read_text().startswith("| method |")
    assert (out / "perturbation.png").stat().st_size > 0



@pytest.mark.slow  # reuses the scVI fit
@pytest.mark.parametrize("arguments, match", [
    (["--predict", "type9"], "no cells have obs['cell_type'] == 'type9'"),
    (["--predict", HELD_OUT, "--perturbed", "drug"], "no cells have obs['condition'] == 'drug'"),
    (["--predict", "type1"], "has no 'control' cells to predict from"),
    (["--predict", HELD_OUT, "--condition-key", "nope"], "condition_key 'nope' is not a column"),
    (["--predict", HELD_OUT, "--method", "counterfactual"], "cannot predict perturbations by"),
])
def test_cli_perturb_errors_are_one_line(scvi_fit, simulation, tmp_path, capsys, arguments,
                                         match):
    data = exclude_cells(simulation, [{"cell_type": "type1", "condition": "control"}])
    path = tmp_path / "sim.h5ad"
    data.write_h5ad(path)
    run = tmp_path / "run"
    scvi_fit.save(run)
    code = main(["perturb", str(run), str(path), "--control", "control", "--perturbed",
                 "perturbed", *arguments, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lvmzoo: error: ") and err.count("\n") == 1
    assert match in err


@pytest.mark.slow  # reuses the scVI fit
def test_cli_perturb_warns_when_the_model_saw_the_predicted_cells(scvi_fit, simulation,
                                                                  tmp_path, capsys):
    path = tmp_path / "sim.h5ad"
    simulation.write_h5ad(path)
    run = tmp_path / "run"
    scvi_fit.save(run)  # saved by the API: no record of --exclude
    assert main(["perturb", str(run), str(path), "--control", "control", "--perturbed",
                 "perturbed", "--predict", HELD_OUT, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert printed.err.startswith("lvmzoo: warning: the model") and printed.err.count("\n") == 1
    assert "scvi (latent arithmetic)" in printed.out


def test_cli_fit_rejects_bad_exclude(tmp_path, capsys):
    for spec, match in [("cell_type", "write KEY=VALUE"), ("donor=d1", "'donor': not a column")]:
        code = main(["fit", "scvi", "--dataset", "kang_ifnb", "--exclude", spec, "--epochs", "1",
                     "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and match in err and err.count("\n") == 1
    code = main(["fit", "scvi", "--dataset", "nope", "--out", str(tmp_path / "o")])
    assert code == 2 and "unknown --dataset 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_scvi_run(training, tmp_path_factory):
    """A few epochs of scVI on the training cells, saved by the API: cheap, and honest enough."""
    model = SCVI(n_hidden=16, n_latent=4, n_layers=0, likelihood="nb")
    fitted = lvmzoo.fit(model, lvmzoo.setup_anndata(training, batch_key="batch"), epochs=2,
                        batch_size=128, progress=False)
    run = tmp_path_factory.mktemp("quick_scvi") / "run"
    fitted.save(run)
    return run


def test_cli_perturb_predicts_what_was_never_measured(quick_scvi_run, training, tmp_path,
                                                      capsys):
    path = tmp_path / "train.h5ad"
    training.write_h5ad(path)  # no perturbed cells of the predicted type at all
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("stale")  # from an earlier, evaluated run
    base = ["perturb", str(quick_scvi_run), str(path), "--control", "control", "--perturbed",
            "perturbed"]
    assert main([*base, "--predict", HELD_OUT, "--n-top-genes", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # no warning about seen cells: there are no metrics to doubt
    assert (f"no measured 'perturbed' '{HELD_OUT}' cells in {path}: predictions written, "
            "not evaluated") in printed.out
    assert "mean-shift baseline" in printed.out and "largest predicted changes" in printed.out
    n_control = int(((training.obs["cell_type"] == HELD_OUT)
                     & (training.obs["condition"] == "control")).sum())
    predicted = ad.read_h5ad(out / "predicted.h5ad")
    assert predicted.n_obs == n_control and "expected" in predicted.layers
    assert (predicted.obs["condition"] == "perturbed").all()
    assert (out / "perturbation.png").stat().st_size > 0
    assert not (out / "metrics.csv").exists() and not (out / "metrics.md").exists()
    means = pd.read_csv(out / "gene_means.csv", index_col=0)
    assert list(means.columns) == ["control", "scvi (latent arithmetic)", "mean shift"]
    assert list(means.index) == list(training.var_names)

    # Bad input still ends in one line, exit 2: a type with no control cells, an unknown one.
    no_control = exclude_cells(training, [{"cell_type": "type1", "condition": "control"}])
    no_control.write_h5ad(path)
    for predict, match in [("type1", "has no 'control' cells to predict from"),
                           ("type9", "no cells have obs['cell_type'] == 'type9'")]:
        code = main([*base, "--predict", predict, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("lvmzoo: error: ") and err.count("\n") == 1
        assert match in err
