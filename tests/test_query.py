"""Query mapping (scArches): a held-out batch of a simulation mapped onto a
SCANVI reference lands next to the same labels, with only the new batch rows
trained; the CLI's map-query and predict, and their errors.

The reference and query of conftest's ``labelled_simulation`` (batch2, which
lacks 15 of the reference's genes and has 5 of its own) and its
``scanvi_reference`` fit; one mapping shared through a module fixture.
"""

import dataclasses
import warnings

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

import lvmzoo
from lvmzoo.analysis.query import batch_surgery, map_query
from lvmzoo.cli import main
from lvmzoo.data import DataWarning

QUERY_BATCH = "batch2"  # conftest's labelled_simulation


@pytest.fixture(scope="module")
def split(labelled_simulation):
    reference, query, _ = labelled_simulation
    return reference, query


@pytest.fixture(scope="module")
def reference_fit(scanvi_reference):
    return scanvi_reference


@pytest.fixture(scope="module")
def mapped(split, reference_fit):
    _, query = split
    fitted, _ = reference_fit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, data = map_query(fitted, query, epochs=30)
    return result, data, [w for w in caught if issubclass(w.category, DataWarning)]


@pytest.mark.slow  # the session's SCANVI fit and one mapping: ~170 s on the loaded 2-core machine
def test_query_genes_are_aligned_with_a_warning(split, mapped):
    _, query = split
    result, data, data_warnings = mapped
    assert any("lacks 15 of the model's 150 genes" in str(w.message) for w in data_warnings)
    assert data.registry.gene_names == result.registry.gene_names and data.n_genes == 150
    absent = [i for i, g in enumerate(data.registry.gene_names) if g not in query.var_names]
    assert len(absent) == 15 and data.x[:, absent].nnz == 0  # zero-filled


@pytest.mark.slow  # the session's SCANVI fit and one mapping: ~170 s on the loaded 2-core machine
def test_mapped_query_lands_next_to_the_same_labels(split, mapped, reference_fit):
    reference, query = split
    result, data, _ = mapped
    reference_data = lvmzoo.query_anndata(reference, result.registry)
    z_reference, z_query = result.latent(reference_data), result.latent(data)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    knn = KNeighborsClassifier(15).fit(z_reference, reference.obs["cell_type"].astype(str))
    transfer = np.mean(knn.predict(z_query) == truth)
    print(f"query kNN label transfer {transfer:.3f}")
    assert transfer > 0.85, transfer
    labels, probabilities = result.predict(data, soft=True)
    assert np.mean(labels.to_numpy().astype(str) == truth) > 0.85
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    # Reference cells keep exactly their reference representation.
    np.testing.assert_array_equal(z_reference, reference_fit[0].latent(reference_fit[1]))


@pytest.mark.slow  # the session's SCANVI fit and one mapping: ~170 s on the loaded 2-core machine
def test_only_the_new_batch_rows_train(mapped, reference_fit):
    result, _, _ = mapped
    reference = reference_fit[0]
    assert result.registry.batch_categories == ("batch0", "batch1", QUERY_BATCH)
    assert result.model == dataclasses.replace(reference.model, freeze_batch_norm=True)
    _, trainable = batch_surgery(reference.params, result.params)
    assert sum(int(m.sum()) for m in jax.tree.leaves(trainable)) == 2 * 32  # 2 rows × n_hidden
    # The first layers that read the batch: [z (8), batch0, batch1] and [log1p x (150), ...].
    first_layers = {("decoder$params", "MLP_0", "Dense_0", "kernel"): 8 + 2,
                    ("encoder$params", "MLP_0", "Dense_0", "kernel"): 150 + 2}
    old_leaves = dict(jax.tree_util.tree_flatten_with_path(reference.params)[0])
    for path, new in jax.tree_util.tree_flatten_with_path(result.params)[0]:
        old = old_leaves[path]
        n_old = first_layers.get(tuple(p.key for p in path))
        if n_old is not None:  # reference rows frozen; the query batch's row started at 0, trained
            np.testing.assert_array_equal(new[:n_old], old)
            assert new.shape[0] == n_old + 1 and np.abs(np.asarray(new[n_old:])).max() > 0
        else:  # every other parameter and all batch-norm statistics: bit-identical
            np.testing.assert_array_equal(new, old, err_msg=str(path))


@pytest.mark.slow  # the session's SCANVI fit and one mapping: ~170 s on the loaded 2-core machine
def test_query_errors_are_named(split, reference_fit):
    fitted, _ = reference_fit
    _, query = split
    unseen = query.copy()
    unseen.obs["label"] = "type9"
    with pytest.raises(lvmzoo.DataError, match="not seen: type9"):
        map_query(fitted, unseen, epochs=1)
    no_batch = query.copy()
    del no_batch.obs["batch"]
    with pytest.raises(lvmzoo.DataError, match="no obs\\['batch'\\]"):
        map_query(fitted, no_batch, epochs=1)
    few_genes = query[:, :60].copy()
    with pytest.raises(lvmzoo.DataError, match="at least 50%"):
        map_query(fitted, few_genes, epochs=1)
    known = query.copy()
    known.obs["batch"] = "batch0"  # nothing new: nothing to train
    same, data = map_query(fitted, known, epochs=1)
    assert same is fitted and data.n_cells == query.n_obs
    blind_model = dataclasses.replace(fitted.model, encode_batch=False)
    blind = dataclasses.replace(fitted, model=blind_model, guide=blind_model.guide)
    with pytest.warns(UserWarning, match="encoder does not read the batch"):
        with pytest.raises(ValueError):  # (its params are the encode_batch=True model's)
            map_query(blind, query, epochs=1)


# --------------------------------------------------------------------------
# CLI: lvmzoo map-query, lvmzoo predict
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory, split, reference_fit):
    root = tmp_path_factory.mktemp("mapquery")
    lvmzoo.save_model(reference_fit[0], root / "reference" / "model")
    query_path = root / "query.h5ad"
    split[1].write_h5ad(query_path)
    return root, query_path


@pytest.mark.slow  # + ~30 s on the loaded 2-core machine: one compiled fine-tune
def test_cli_map_query_and_predict(saved_reference, split, capsys):
    root, query_path = saved_reference
    out = root / "mapped"
    status = main(["map-query", str(root / "reference"), str(query_path), "--out", str(out),
                   "--epochs", "2", "--no-progress"])
    stdout = capsys.readouterr().out
    assert status == 0
    assert f"mapped {split[1].n_obs} query cells (1 new batches: batch2; 2 fine-tuning" in stdout
    assert "against obs" not in stdout  # the query has no obs["label"]: nothing to score
    mapped = ad.read_h5ad(out / "query.h5ad")
    assert mapped.obsm["X_scanvi"].shape == (split[1].n_obs, 8)
    assert set(mapped.obs["scanvi_prediction"].cat.categories) <= {f"type{i}" for i in range(4)}
    assert mapped.var_names.equals(split[1].var_names)  # the query's own genes, untouched
    assert lvmzoo.load_model(out / "model").registry.batch_categories[-1] == "batch2"
    status = main(["predict", str(out), str(query_path), "--out", str(root / "p.csv")])
    assert status == 0
    table = pd.read_csv(root / "p.csv", index_col="cell")
    assert list(table.columns) == ["prediction", "type0", "type1", "type2", "type3"]
    assert list(table.index) == list(split[1].obs_names)
    np.testing.assert_allclose(table.iloc[:, 1:].sum(1), 1.0, rtol=1e-5)
    assert (table["prediction"].to_numpy() == mapped.obs["scanvi_prediction"].astype(str)).all()


@pytest.mark.slow  # the session's SCANVI fit and one mapping: ~170 s on the loaded 2-core machine
def test_cli_errors_are_one_line(saved_reference, split, tmp_path, capsys):
    root, query_path = saved_reference
    unseen = split[1].copy()
    unseen.obs["label"] = "type9"
    unseen.write_h5ad(tmp_path / "unseen.h5ad")
    disjoint = ad.AnnData(split[1].X, obs=split[1].obs,
                          var=pd.DataFrame(index=[f"x{i}" for i in range(split[1].n_vars)]))
    disjoint.write_h5ad(tmp_path / "disjoint.h5ad")
    cases = [
        (["map-query", str(root / "reference"), str(tmp_path / "unseen.h5ad"), "--out",
          str(tmp_path / "o")], "not seen: type9"),
        (["map-query", str(root / "reference"), str(tmp_path / "disjoint.h5ad"), "--out",
          str(tmp_path / "o")], "only 0 of the model's 150 genes"),
        (["predict", str(root / "reference"), str(tmp_path / "disjoint.h5ad"), "--out",
          str(tmp_path / "p.csv")], "only 0 of the model's 150 genes"),
        (["fit", "scanvi", str(query_path), "--labels-key", "nope", "--out",
          str(tmp_path / "o")], "labels_key 'nope' is not a column"),
        (["fit", "scanvi", str(query_path), "--out", str(tmp_path / "o")],
         "learns from cell labels: give --labels-key"),
        (["fit", "scanvi", str(query_path), "--from-run", str(root / "reference"), "--out",
          str(tmp_path / "o")], "holds a scanvi model"),
        (["fit", "scanvi", "--from-run", str(root / "reference"), "--n-latent", "3", "--out",
          str(tmp_path / "o")], "--n-latent cannot be combined with --from-run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if not line.startswith("lvmzoo: warning: ")]
        assert len(errors) == 1 and errors[0].startswith("lvmzoo: error: "), err
        assert message in errors[0], err
    assert not (tmp_path / "o").exists()


def test_label_scores_line_needs_the_models_labels_column():
    from lvmzoo.cli._common import _scores_against_known_labels

    adata = ad.AnnData(np.zeros((4, 1), np.float32),
                       obs=pd.DataFrame({"label": ["a", "b", "Unknown", "b"]},
                                        index=[f"c{i}" for i in range(4)]))
    probabilities = pd.DataFrame([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.6, 0.4]],
                                 index=adata.obs_names, columns=["a", "b"])
    line = _scores_against_known_labels(adata, "label", probabilities, ", which the fine-tune used")
    assert line.startswith("; against obs['label'] (3 cells with a known label, which the "
                           "fine-tune used): accuracy 0.667"), line
    assert _scores_against_known_labels(adata, "other", probabilities) == ""
    assert _scores_against_known_labels(adata, None, probabilities) == ""
