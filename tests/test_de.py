"""Bayesian differential expression (lvmzoo.analysis.de) with a small scVI fit.

One scVI fit (shared by the module) on simulated counts with planted DE genes:
400 cells × 100 genes, 4 cell types with 10 DE genes each (|natural-log fold
change| 2), 2 batches.  Between two types, the true DE genes are the 20 planted
for either of them.
"""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import lvmzoo
from lvmzoo import analysis, datasets
from lvmzoo.analysis.de import hpd_interval, posterior_fdr_calls
from lvmzoo.models import SCVI

N_SAMPLES = 1000


@pytest.fixture(scope="module")
def simulation():
    adata = datasets.simulate_counts(n_cells=400, n_genes=100, n_de_genes_per_type=10, seed=0)
    data = lvmzoo.setup_anndata(adata, batch_key="batch", labels_key="cell_type", kind="counts")
    # A short warm-up to go with the short fit; narrow networks (the property tested
    # does not depend on the defaults).
    model = SCVI(n_hidden=32, n_latent=5, likelihood="nb", n_epochs_kl_warmup=15)
    fitted = lvmzoo.fit(model, data, epochs=30, batch_size=128, learning_rate=1e-2,
                        progress=False)
    return adata, data, fitted


@pytest.fixture(scope="module")
def change(simulation):
    adata, data, fitted = simulation
    return analysis.differential_expression(fitted, data, "cell_type", "type0", "type1",
                                            mode="change", n_samples=N_SAMPLES)


def _truth(adata, a="type0", b="type1"):
    return (adata.var[f"true_lfc_{a}"] - adata.var[f"true_lfc_{b}"]).abs() > 0


def test_change_mode_ranks_the_planted_genes_first(simulation, change):
    adata = simulation[0]
    table = change.loc[adata.var_names]
    truth = _truth(adata)
    # Measured: 1.0 and 1.0 (20 true DE genes of 100).
    assert roc_auc_score(truth, table["proba_de"]) > 0.9
    assert roc_auc_score(truth, table["lfc_mean"].abs()) > 0.9
    # The posterior LFC (log2) follows the planted one (natural log) on the DE genes.
    true_lfc = (adata.var["true_lfc_type0"] - adata.var["true_lfc_type1"]) / np.log(2)
    assert np.corrcoef(table["lfc_mean"][truth], true_lfc[truth])[0, 1] > 0.8  # measured 0.99
    assert truth[table["is_de_fdr_0.05"]].mean() > 0.5  # measured: 20 of 33 calls


def test_vanilla_mode_ranks_the_planted_genes_first(simulation):
    adata, data, fitted = simulation
    table = analysis.differential_expression(fitted, data, "cell_type", "type0", "type1",
                                             n_samples=N_SAMPLES)  # mode="vanilla"
    assert list(table.columns[:5]) == ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
    assert table["bayes_factor"].is_monotonic_decreasing
    table = table.loc[adata.var_names]
    # Measured: 1.0.  Large |Bayes factor|: confidently up or down.
    assert roc_auc_score(_truth(adata), table["bayes_factor"].abs()) > 0.9
    up = adata.var["true_lfc_type0"] - adata.var["true_lfc_type1"] > 0
    assert (table["proba_m1"][up] > 0.5).all()


def test_change_mode_columns_sorting_and_fdr_calls(simulation, change):
    data = simulation[1]
    expected = ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts",
                "delta", "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max",
                "lfc_confidence_interval_0.9_min", "lfc_confidence_interval_0.9_max",
                "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
                "raw_normalized_mean1", "raw_normalized_mean2", "is_de_fdr_0.05",
                "comparison", "group1", "group2"]
    assert list(change.columns) == expected
    assert len(change) == 100 and change.index.is_unique
    assert change["proba_de"].is_monotonic_decreasing
    assert (change["comparison"] == "type0 vs type1").all()
    assert (change["lfc_min"] <= change["lfc_confidence_interval_0.9_min"]).all()
    assert (change["lfc_confidence_interval_0.9_max"] <= change["lfc_max"]).all()
    np.testing.assert_allclose(change["scale1"].sum(), 1.0, rtol=1e-4)  # mean of rho draws
    # Raw statistics of the cells of each group.
    cells = np.asarray(simulation[0].obs["cell_type"] == "type0")
    counts = data.dense_x()[cells]
    np.testing.assert_allclose(change.loc[simulation[0].var_names, "raw_mean1"],
                               counts.mean(0), rtol=1e-5)
    np.testing.assert_allclose(change.loc[simulation[0].var_names, "non_zeros_proportion1"],
                               (counts > 0).mean(0), rtol=1e-6)
    # The calls are the largest top set whose mean (1 - proba_de) is <= 0.05.
    n_called = int(change["is_de_fdr_0.05"].sum())
    assert change["is_de_fdr_0.05"].iloc[:n_called].all()
    assert (1 - change["proba_de"].iloc[:n_called]).mean() <= 0.05
    assert (1 - change["proba_de"].iloc[: n_called + 1]).mean() > 0.05


def test_posterior_fdr_calls_and_hpd_interval():
    proba = pd.Series([0.5, 1.0, 0.97, 0.9, 0.99], index=list("abcde"))
    # Ranked b, e, c, d, a: mean of (1 - p) over the top k = 0, .005, .0133, .0325, .126.
    calls = posterior_fdr_calls(proba, 0.05)
    assert calls.to_dict() == {"a": False, "b": True, "c": True, "d": True, "e": True}
    assert posterior_fdr_calls(proba, 0.01).sum() == 2
    samples = np.array([[0.0, 5.0], [1.0, 5.1], [1.1, 5.2], [1.2, 5.3], [9.0, 20.0]])
    low, high = hpd_interval(samples, 0.5)  # the shortest interval spanning 2 steps
    np.testing.assert_array_equal(low, [1.0, 5.0])
    np.testing.assert_array_equal(high, [1.2, 5.2])
    draws = np.random.default_rng(0).normal(size=(20000, 1))
    low, high = hpd_interval(draws, 0.9)  # symmetric: the central 90% interval
    assert low[0] == pytest.approx(-1.645, abs=0.05) and high[0] == pytest.approx(1.645, abs=0.05)


def test_groups_from_labels_key_adata_column_or_array_agree(simulation):
    adata, data, fitted = simulation
    options = dict(mode="change", n_samples=200, seed=3)
    by_labels_key = analysis.differential_expression(fitted, data, "cell_type", "type2", **options)
    by_column = analysis.differential_expression(fitted, data, "cell_type", "type2",
                                                 adata=adata, **options)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    by_array = analysis.differential_expression(fitted, data, labels, "type2", **options)
    pd.testing.assert_frame_equal(by_labels_key, by_column)
    pd.testing.assert_frame_equal(by_labels_key, by_array)
    assert (by_labels_key["comparison"] == "type2 vs Rest").all()
    assert (by_labels_key["group2"] == "Rest").all()


def test_one_vs_rest_for_every_group_and_without_batch_correction(simulation):
    adata, data, fitted = simulation
    table = analysis.differential_expression(fitted, data, "cell_type", mode="change",
                                             n_samples=200, batch_correction=False)
    assert list(table["comparison"].unique()) == [f"type{k} vs Rest" for k in range(4)]
    assert len(table) == 4 * 100
    for k in range(4):  # each type's own planted genes come out on top of its comparison
        rows = table[table["group1"] == f"type{k}"].loc[adata.var_names]
        assert roc_auc_score(adata.var["de_type"] == f"type{k}", rows["proba_de"]) > 0.9


def test_bad_groups_and_options_fail_with_a_message(simulation):
    adata, data, fitted = simulation
    de = analysis.differential_expression
    with pytest.raises(lvmzoo.DataError, match="group 'type7' is not in cell_type; its groups: "
                                               "type0, type1, type2, type3"):
        de(fitted, data, "cell_type", "type7")
    with pytest.raises(lvmzoo.DataError, match="group 'nope' is not in cell_type"):
        de(fitted, data, "cell_type", "type0", "nope")
    with pytest.raises(lvmzoo.DataError, match="'donor' is not a column of adata.obs; "
                                               "available columns: cell_type, batch, "):
        de(fitted, data, "donor", "a", adata=adata)
    with pytest.raises(lvmzoo.DataError, match="neither the model's labels_key"):
        de(fitted, data, "donor", "a")
    with pytest.raises(lvmzoo.DataError, match="3 values for 400 cells"):
        de(fitted, data, ["a", "b", "c"], "a")
    with pytest.raises(ValueError, match="unknown mode 'bayes'"):
        de(fitted, data, "cell_type", "type0", mode="bayes")
    with pytest.raises(ValueError, match="delta must be positive"):
        de(fitted, data, "cell_type", "type0", delta=0)
    # A registered group without cells among these cells.
    without_type1 = data.subset(np.flatnonzero(data.labels != 1))
    with pytest.raises(lvmzoo.DataError, match="group 'type1' of cell_type has no cells"):
        de(fitted, without_type1, "cell_type", "type0", "type1")


def test_tables_show_the_registered_gene_symbols(simulation):
    """With gene symbols registered (``gene_symbols_key``), the table's first column gives
    each gene's symbol beside its var_name index."""
    import dataclasses

    adata, data, fitted = simulation
    symbols = tuple(f"SYM{i}" for i in range(adata.n_vars))
    registry = dataclasses.replace(fitted.registry, gene_symbols_key="sym", gene_symbols=symbols)
    fitted = dataclasses.replace(fitted, registry=registry)
    data = dataclasses.replace(data, registry=registry)
    table = analysis.differential_expression(fitted, data, "cell_type", "type0", "type1",
                                             n_samples=20)
    assert table.columns[0] == "symbol"
    expected = dict(zip(adata.var_names, symbols))
    assert list(table["symbol"]) == [expected[g] for g in table.index]
