"""Categorical covariates in the data layer: registration, queries, minibatches."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import lvmzoo
from lvmzoo import datasets
from lvmzoo.data.registry import DataError, DataRegistry
from lvmzoo.data.source import DeviceSource


@pytest.fixture(scope="module")
def cells():
    adata = datasets.simulate_counts(n_cells=60, n_genes=40, n_de_genes_per_type=2, seed=0)
    adata.obs["condition"] = pd.Categorical(["ctrl", "stim"] * 30, categories=["ctrl", "stim"])
    adata.obs["dose"] = np.where(adata.obs["condition"] == "stim", 2.5, 0.0)
    return adata


def test_registered_codes_follow_category_order(cells):
    data = lvmzoo.setup_anndata(cells, categorical_covariate_keys=["condition", "cell_type"],
                                covariate_keys=["dose"])
    registry = data.registry
    assert registry.categorical_covariate_keys == ("condition", "cell_type")
    assert registry.categorical_covariate_categories == (
        ("ctrl", "stim"), ("type0", "type1", "type2", "type3"))
    assert data.categorical_covariates.dtype == np.int32
    np.testing.assert_array_equal(data.categorical_covariates[:, 0], np.tile([0, 1], 30))
    np.testing.assert_array_equal(data.categorical_covariates[:, 1],
                                  cells.obs["cell_type"].cat.codes.to_numpy())
    np.testing.assert_array_equal(registry.categorical_codes("condition", ["stim", "ctrl"]),
                                  [1, 0])
    subset = data.subset(np.array([3, 0]))
    np.testing.assert_array_equal(subset.categorical_covariates,
                                  data.categorical_covariates[[3, 0]])


def test_minibatches_carry_codes_and_names(cells):
    data = lvmzoo.setup_anndata(cells, categorical_covariate_keys=["condition", "cell_type"],
                                covariate_keys=["dose"])
    batch = DeviceSource(data).full_batch(np.arange(6))
    codes, n_categories = batch.categorical("cell_type")
    np.testing.assert_array_equal(codes, data.categorical_covariates[:6, 1])
    assert n_categories == 4
    np.testing.assert_allclose(batch.covariate("dose"), [0.0, 2.5] * 3)
    with pytest.raises(KeyError, match="batch.*not a registered categorical covariate"):
        batch.categorical("batch")
    with pytest.raises(KeyError, match="not a registered covariate"):
        batch.covariate("condition")


def test_no_categorical_covariates_by_default(cells):
    data = lvmzoo.setup_anndata(cells)
    assert data.categorical_covariates.shape == (60, 0)
    batch = DeviceSource(data).full_batch()
    assert batch.categorical_covariates.shape == (60, 0)
    assert batch.categorical_covariate_keys == ()


def test_query_encodes_with_saved_categories(cells):
    data = lvmzoo.setup_anndata(cells, categorical_covariate_keys=["condition"])
    registry = DataRegistry.from_dict(json.loads(json.dumps(data.registry.to_dict())))
    assert registry == data.registry
    # Only stimulated cells: codes keep their meaning (stim stays 1).
    query = lvmzoo.query_anndata(cells[cells.obs["condition"] == "stim"], registry)
    np.testing.assert_array_equal(query.categorical_covariates[:, 0], 1)
    unknown = cells.copy()
    unknown.obs["condition"] = unknown.obs["condition"].cat.rename_categories(["ctrl", "drug"])
    with pytest.raises(DataError, match="condition.*drug"):
        lvmzoo.query_anndata(unknown, registry)


def test_registry_saved_before_categorical_covariates_loads(cells):
    saved = lvmzoo.setup_anndata(cells).registry.to_dict()
    del saved["categorical_covariate_keys"], saved["categorical_covariate_categories"]
    registry = DataRegistry.from_dict(saved)
    assert registry.categorical_covariate_keys == ()
    assert lvmzoo.query_anndata(cells, registry).categorical_covariates.shape == (60, 0)


@pytest.mark.parametrize("keys, match", [
    (["nope"], "categorical covariate 'nope' is not a column"),
    (["condition", "condition"], "repeats a column"),
    (["with_missing"], "missing values"),
])
def test_bad_categorical_covariates(cells, keys, match):
    adata = cells.copy()
    adata.obs["with_missing"] = pd.Categorical(["a", None] * 30)
    with pytest.raises(DataError, match=match):
        lvmzoo.setup_anndata(adata, categorical_covariate_keys=keys)


def test_unknown_key_in_registry_lookup(cells):
    registry = lvmzoo.setup_anndata(cells, categorical_covariate_keys=["condition"]).registry
    with pytest.raises(DataError, match="not a categorical covariate"):
        registry.categorical_codes("cell_type", ["type0"])
    with pytest.raises(DataError, match="no category 'drug'"):
        registry.categorical_codes("condition", ["drug"])
    assert isinstance(cells, ad.AnnData)  # the fixture is shared: never modified
    assert "with_missing" not in cells.obs
