"""Matrices read into aligned buffers, which a CPU fit uses without a second copy (issue 24)."""

import anndata as ad
import jax
import numpy as np
import pytest
import scipy.sparse as sp

import lvmzoo
from lvmzoo.data.aligned import aligned_empty, is_aligned, read_h5ad
from lvmzoo.data.source import DeviceSource


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    x = sp.random(60, 25, density=0.3, format="csr", dtype=np.float32, random_state=0)
    x.data = np.ceil(x.data * 10)
    adata = ad.AnnData(X=x, layers={"counts": x.copy(), "dense": x.toarray(),
                                    "csc": x.tocsc()},
                       obsm={"emb": rng.normal(size=(60, 2))}, uns={"note": {"k": np.arange(3)}})
    adata.obs["batch"] = ["a", "b"] * 30
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def test_read_h5ad_is_anndatas_with_aligned_matrices(written):
    mine, theirs = read_h5ad(written), ad.read_h5ad(written)
    assert type(mine.X) is type(theirs.X) and (mine.X != theirs.X).nnz == 0
    assert all(is_aligned(a) for a in (mine.X.data, mine.X.indices, mine.X.indptr))
    for key in ("counts", "dense", "csc"):
        layer = mine.layers[key]
        assert type(layer) is type(theirs.layers[key])
        parts = (layer.data, layer.indices, layer.indptr) if sp.issparse(layer) else (layer,)
        assert all(is_aligned(a) for a in parts)
        np.testing.assert_array_equal(np.asarray(sp.csr_matrix(layer).todense()),
                                      np.asarray(sp.csr_matrix(theirs.layers[key]).todense()))
    assert mine.obs.equals(theirs.obs) and mine.var.equals(theirs.var)
    np.testing.assert_array_equal(mine.obsm["emb"], theirs.obsm["emb"])
    np.testing.assert_array_equal(mine.uns["note"]["k"], theirs.uns["note"]["k"])


def test_aligned_empty():
    for shape, dtype in (((7,), np.float32), ((3, 5), np.int64), (0, np.int32)):
        a = aligned_empty(shape, dtype)
        assert a.dtype == dtype and a.size == int(np.prod(shape))
        assert is_aligned(a) or a.size == 0  # an empty array's address is numpy's to pick


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="zero-copy placement is the CPU's")
def test_a_cpu_device_source_uses_the_aligned_matrix_without_a_copy(written):
    data = lvmzoo.setup_anndata(read_h5ad(written), batch_key="batch")
    source = DeviceSource(data)
    assert source.arrays["values"].unsafe_buffer_pointer() == data.x.data.ctypes.data
    assert source.arrays["columns"].unsafe_buffer_pointer() == data.x.indices.ctypes.data
    # The cells gathered from it are the matrix's.
    np.testing.assert_array_equal(np.asarray(source.full_batch(np.arange(10)).x),
                                  data.x[:10].toarray())


@pytest.mark.parametrize("dense", [False, True])
def test_a_fits_training_cells_are_read_through_their_rows_not_copied(written, dense):
    """fit's validation split: the training source indexes the matrix placed whole."""
    adata = read_h5ad(written)
    if dense:  # in an aligned buffer, as read_h5ad reads a dense X
        x = aligned_empty(adata.shape, np.float32)
        x[:] = adata.X.toarray()
        adata.X = x
    data = lvmzoo.setup_anndata(adata, batch_key="batch")
    rows, held = np.array([3, 5, 8, 13, 21, 34, 55]), np.array([0, 1, 2, 40])
    source = DeviceSource(data, rows=rows)
    for view, cells in ((source, rows), (source.view(held), held)):
        assert view.n_rows == view.n_cells == len(cells)
        expected = DeviceSource(data.subset(cells)).full_batch()
        got = view.full_batch()
        for field in ("x", "batch", "labels", "index"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                          np.asarray(getattr(expected, field)))
        if jax.default_backend() == "cpu":  # the matrix itself, not a copy of its rows
            key = "x" if dense else "values"
            host = data.x if dense else data.x.data
            assert view.arrays[key].unsafe_buffer_pointer() == host.ctypes.data
