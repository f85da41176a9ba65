"""Bad inputs to the data layer: one test per case, each checking the message names it."""

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lvmzoo.data import CellData, DataError, DataWarning, query_anndata, setup_anndata


def make_adata(n_cells=12, n_genes=6, seed=0):
    """Small raw-count AnnData: every cell and gene non-zero, batch and label columns."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    x[0] += 1  # no unobserved genes
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(["a", "b"] * (n_cells // 2)),
            "cell_type": pd.Categorical(["t", "u", "v"] * (n_cells // 3)),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.uns["note"] = {"kept": np.arange(3)}
    adata.obsm["X_pca"] = rng.normal(size=(n_cells, 2))
    return adata


def with_x(adata, x):
    adata = adata.copy()
    adata.X = x
    return adata


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def test_nan_is_rejected():
    adata = make_adata()
    x = adata.X.copy()
    x[3, 2] = np.nan
    with pytest.raises(DataError, match="1 NaN or infinite values"):
        setup_anndata(with_x(adata, x), kind="continuous")


def test_inf_is_rejected():
    adata = make_adata()
    x = adata.X.copy()
    x[1, 1] = np.inf
    x[2, 1] = -np.inf
    with pytest.raises(DataError, match="2 NaN or infinite values"):
        setup_anndata(with_x(adata, x), kind="continuous")


def test_nan_in_sparse_input_is_rejected():
    adata = make_adata()
    x = sp.csr_matrix(adata.X)
    x.data[0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        setup_anndata(with_x(adata, x), kind="counts")


def test_negative_counts_are_rejected():
    adata = make_adata()
    x = adata.X.copy()
    x[0, 0] = -1
    with pytest.raises(DataError, match="1 negative values.*raw UMI counts"):
        setup_anndata(with_x(adata, x), kind="counts")


def test_non_integer_counts_are_rejected_for_count_data():
    adata = make_adata()
    x = adata.X.copy()
    x[0, 0] = 2.5
    with pytest.raises(DataError, match="1 non-integer values.*raw counts"):
        setup_anndata(with_x(adata, x), kind="counts")
    # The same values are fine as continuous data.
    assert setup_anndata(with_x(adata, x), kind="continuous").x[0, 0] == 2.5


def test_cells_with_zero_total_counts_are_rejected():
    adata = make_adata()
    x = adata.X.copy()
    x[[4, 7]] = 0
    with pytest.raises(DataError, match="2 cells have zero total counts.*filter_cells"):
        setup_anndata(with_x(adata, x))


@pytest.mark.parametrize("kind", ["counts", "continuous"])
def test_genes_never_observed_are_kept_with_one_warning(kind):
    adata = make_adata()
    x = adata.X.copy()
    x[:, [1, 3]] = 0
    with pytest.warns(DataWarning, match="^2 of 6 genes are zero in every cell; they are kept") as seen:
        data = setup_anndata(with_x(adata, x), kind=kind)
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    assert data.n_genes == 6 and np.all(data.dense_x()[:, [1, 3]] == 0)


def test_all_zero_cells_are_fine_for_continuous_data():
    adata = make_adata()
    x = adata.X.copy()
    x[4] = 0
    assert setup_anndata(with_x(adata, x), kind="continuous").n_cells == 12


def test_structural_problems_are_reported_before_values_are_scanned():
    adata = make_adata()
    x = adata.X.copy()
    x[:, 3] = 0  # an unobserved gene (a warning) ...
    x[0, 0] = np.nan  # ... and a NaN (an error), but the key is what is wrong first
    with pytest.raises(DataError, match="batch_key 'donor' is not a column"):
        setup_anndata(with_x(adata, x), batch_key="donor")
    with pytest.raises(DataError, match="layer 'raw' not found"):
        setup_anndata(with_x(adata, x), layer="raw")
    with pytest.raises(DataError, match="covariate 'age' is not a column"):
        setup_anndata(with_x(adata, x), covariate_keys=["age"])


def test_a_numeric_column_with_gaps_names_how_many_cells_and_the_first():
    adata = make_adata()
    adata.obs["stage"] = ["early"] * 3 + ["late"] * (adata.n_obs - 3)
    with pytest.raises(DataError, match=r"obs\['stage'\] must hold a number for every cell, "
                                        rf"but {adata.n_obs} of {adata.n_obs} .*value 'early'"):
        setup_anndata(adata, covariate_keys=["stage"])
    adata.obs["rate"] = np.linspace(0.1, 0.9, adata.n_obs)
    adata.obs.loc[adata.obs_names[5], "rate"] = np.nan
    with pytest.raises(DataError, match=rf"but 1 of {adata.n_obs} .*cell "
                                        rf"'{adata.obs_names[5]}', value nan"):
        setup_anndata(adata, covariate_keys=["rate"])


def test_unknown_kind_and_incompatible_transform_are_rejected():
    with pytest.raises(DataError, match="unknown data kind 'integers'"):
        setup_anndata(make_adata(), kind="integers")
    with pytest.raises(DataError, match="'log1p_cp10k' needs raw counts"):
        setup_anndata(make_adata(), kind="continuous", transform="log1p_cp10k")


# --------------------------------------------------------------------------
# Shapes and keys
# --------------------------------------------------------------------------


def test_arrays_api_rejects_a_batch_of_the_wrong_length():
    x = make_adata().X
    with pytest.raises(DataError, match=r"batch has shape \(5,\) but x has 12 cells"):
        CellData.from_arrays(x, batch=["a"] * 5)


def test_arrays_api_rejects_labels_of_the_wrong_length():
    x = make_adata().X
    with pytest.raises(DataError, match=r"labels has shape \(13,\) but x has 12 cells"):
        CellData.from_arrays(x, labels=["t"] * 13)


def test_arrays_api_rejects_the_wrong_number_of_gene_names():
    x = make_adata().X
    with pytest.raises(DataError, match="5 gene names for 6 columns"):
        CellData.from_arrays(x, gene_names=[f"g{j}" for j in range(5)])


def test_arrays_api_rejects_a_non_matrix():
    with pytest.raises(DataError, match="must be 2-D"):
        CellData.from_arrays(np.ones(5))


def test_missing_batch_key_is_rejected():
    with pytest.raises(DataError, match="batch_key 'donor' is not a column.*batch, cell_type"):
        setup_anndata(make_adata(), batch_key="donor")


def test_missing_labels_key_is_rejected():
    with pytest.raises(DataError, match="labels_key 'celltype' is not a column.*cell_type"):
        setup_anndata(make_adata(), labels_key="celltype")


def test_anndata_with_zero_cells_is_rejected():
    adata = make_adata()[:0].copy()
    with pytest.raises(DataError, match=r"empty \(0 cells × 6 genes\)"):
        setup_anndata(adata)


def test_anndata_with_zero_genes_is_rejected():
    adata = make_adata()[:, :0].copy()
    with pytest.raises(DataError, match=r"empty \(12 cells × 0 genes\)"):
        setup_anndata(adata)


def test_missing_layer_is_rejected():
    with pytest.raises(DataError, match="layer 'raw' not found.*counts"):
        setup_anndata(make_adata(), layer="raw")


def test_not_an_anndata_is_rejected():
    with pytest.raises(DataError, match="expected an AnnData, got ndarray"):
        setup_anndata(np.ones((3, 3)))


# --------------------------------------------------------------------------
# Query data
# --------------------------------------------------------------------------


def test_query_with_missing_genes_is_rejected():
    reference = setup_anndata(make_adata(), batch_key="batch")
    query = make_adata(seed=1)[:, ["gene0", "gene1", "gene2", "gene3"]].copy()
    with pytest.raises(DataError, match="lacks 2 of the model's 6 genes.*gene4, gene5"):
        query_anndata(query, reference.registry)


def test_query_can_zero_fill_missing_genes_with_a_warning():
    reference = setup_anndata(make_adata(), batch_key="batch")
    query = make_adata(seed=1)
    kept = query[:, ["gene4", "gene0", "gene1", "gene3"]].copy()
    with pytest.warns(DataWarning, match="lacks 2 of the model's 6 genes.*filled with zeros"):
        data = query_anndata(kept, reference.registry, missing_genes="zero")
    x = data.dense_x()
    np.testing.assert_array_equal(x[:, [0, 1, 3, 4]], query.X[:, [0, 1, 3, 4]])
    np.testing.assert_array_equal(x[:, [2, 5]], 0)
    with pytest.raises(DataError, match="only 2 of the model's 6 genes.*at least 50%"):
        query_anndata(query[:, ["gene0", "gene1"]].copy(), reference.registry,
                      missing_genes="zero")
    renamed = query.copy()
    renamed.var_names = [f"ENSG{j}" for j in range(6)]
    with pytest.raises(DataError, match="only 0 of the model's 6 genes"):
        query_anndata(renamed, reference.registry, missing_genes="zero")


def test_query_with_unknown_batch_categories_is_rejected():
    reference = setup_anndata(make_adata(), batch_key="batch")
    query = make_adata(seed=1)
    query.obs["batch"] = pd.Categorical(["a", "c"] * 6)
    with pytest.raises(DataError, match="categories the model has not seen: c; known: a, b; "
                                        "to place cells of new batches .* map-query"):
        query_anndata(query, reference.registry)


def test_query_reorders_genes_and_accepts_genes_unseen_in_its_cells():
    reference = setup_anndata(make_adata(), batch_key="batch")
    query = make_adata(seed=1)
    query.X[:, 2] = 0  # fine for a handful of new cells; only training needs every gene
    shuffled = query[:, ["gene5", "gene2", "gene0", "gene1", "gene3", "gene4"]].copy()
    data = query_anndata(shuffled, reference.registry)
    np.testing.assert_array_equal(data.x, query.X)
    np.testing.assert_array_equal(data.batch, [0, 1] * 6)


# --------------------------------------------------------------------------
# The user's AnnData is never modified; sparse and dense agree
# --------------------------------------------------------------------------


def assert_same_anndata(a, b):
    assert a.shape == b.shape
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert type(a.X) is type(b.X)
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    assert a.X.dtype == b.X.dtype
    assert a.layers.keys() == b.layers.keys()
    for key in a.layers:
        np.testing.assert_array_equal(_dense(a.layers[key]), _dense(b.layers[key]))
    assert a.obsm.keys() == b.obsm.keys()
    for key in a.obsm:
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    assert a.uns.keys() == b.uns.keys()
    np.testing.assert_array_equal(a.uns["note"]["kept"], b.uns["note"]["kept"])


@pytest.mark.parametrize("sparse", [False, True])
def test_setup_and_query_never_modify_the_users_anndata(sparse):
    adata = make_adata()
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    # String obs columns: setup must not turn them into categoricals in place.
    adata.obs["donor"] = ["d1", "d2", "d3"] * 4
    before = copy.deepcopy(adata)

    data = setup_anndata(adata, batch_key="donor", labels_key="cell_type",
                         transform="log1p_cp10k")
    setup_anndata(adata, layer="counts", kind="counts")
    assert_same_anndata(adata, before)

    query = make_adata(seed=2)
    query.obs["donor"] = ["d3", "d1", "d2"] * 4
    query = query[:, ::-1].copy()  # genes in another order
    query_before = copy.deepcopy(query)
    query_anndata(query, data.registry)
    assert_same_anndata(query, query_before)


@pytest.mark.parametrize("transform", ["none", "log1p_cp10k"])
def test_sparse_and_dense_inputs_give_the_same_cell_data(transform):
    dense = make_adata()
    sparse = make_adata()
    sparse.X = sp.csr_matrix(sparse.X)
    kwargs = dict(batch_key="batch", labels_key="cell_type", transform=transform)
    a = setup_anndata(dense, **kwargs)
    b = setup_anndata(sparse, **kwargs)
    assert not a.is_sparse and b.is_sparse
    np.testing.assert_array_equal(a.x, b.x.toarray())
    assert a.x.dtype == b.x.dtype == np.float32
    np.testing.assert_array_equal(a.batch, b.batch)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.obs_names, b.obs_names)
    assert a.registry == b.registry


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)
