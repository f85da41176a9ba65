"""Count matrices in 4 bytes per stored count (lvmzoo.data.compact, issue 24): what they read
as, what a fit computes from them, and how ``lvmzoo fit`` reads an .h5ad file into one."""

import argparse

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

import lvmzoo
from lvmzoo.cli.fit_inputs import _read_compactly
from lvmzoo.data.backed import read_backed
from lvmzoo.data.compact import CompactCSR
from lvmzoo.data.source import DeviceSource
from lvmzoo.io import write_h5ad


def _counts(n_cells=300, n_genes=40, seed=0):
    x = sp.random(n_cells, n_genes, density=0.2, format="csr", dtype=np.float32,
                  random_state=seed)
    x.data = np.ceil(x.data * 50)
    return x


def _compact(tmp_path, x, **setup):
    path = tmp_path / "cells.h5ad"
    adata = ad.AnnData(X=x)
    adata.obs["batch"] = (["a", "b"] * x.shape[0])[:x.shape[0]]
    adata.write_h5ad(path)
    backed = lvmzoo.setup_anndata(read_backed(path), batch_key="batch", **setup)
    return backed.to_memory(compact=True), backed.to_memory()


def test_counts_are_held_in_two_bytes_each_and_read_as_the_float32_matrix(tmp_path):
    compact, wide = _compact(tmp_path, _counts())
    x = compact.x
    assert isinstance(x, CompactCSR) and compact.is_sparse and not compact.is_backed
    assert x.values.dtype == np.uint16 and x.columns.dtype == np.uint16
    assert 2 * (x.values.nbytes + x.columns.nbytes) == wide.x.data.nbytes + wide.x.indices.nbytes
    rows = np.array([7, 0, 299, 7, 150])
    for index in (slice(10, 90), slice(None), rows, np.arange(300) % 3 == 0, slice(5, 5)):
        got, want = x[index], wide.x[index]
        assert got.dtype == np.float32 and got.shape == want.shape and (got != want).nnz == 0
    np.testing.assert_array_equal(x.toarray(), wide.x.toarray())
    assert (compact.subset(rows).x != wide.subset(rows).x).nnz == 0


def test_values_that_do_not_fit_sixteen_bits_stay_float32_and_exact(tmp_path):
    x = _counts()
    x.data[-1] = 70000.0  # above 65,535: the values widen from there on
    compact, _ = _compact(tmp_path, x)
    assert compact.x.values.dtype == np.float32
    np.testing.assert_array_equal(compact.x.toarray(), x.toarray())
    x = _counts()
    x.data[3] = 2.5  # not a count
    compact, _ = _compact(tmp_path, x, kind="continuous")
    assert compact.x.values.dtype == np.float32
    np.testing.assert_array_equal(compact.x.toarray(), x.toarray())


def test_more_genes_than_sixteen_bit_columns_keep_int32_columns(tmp_path):
    x = sp.csr_matrix((np.array([1.0, 2.0, 3.0], np.float32), np.array([0, 65536, 70000]),
                       np.array([0, 1, 3, 3])), shape=(3, 70001))
    compact, _ = _compact(tmp_path, x, kind="continuous")
    assert compact.x.columns.dtype == np.int32 and compact.x.values.dtype == np.uint16
    assert (compact.x[np.arange(3)] != x).nnz == 0


def test_a_fit_on_the_compact_matrix_is_the_fit_on_the_float32_one(tmp_path):
    compact, wide = _compact(tmp_path, _counts())
    sources = DeviceSource(compact), DeviceSource(wide)
    cells = jnp.array([3, 1, 299, 42])
    np.testing.assert_array_equal(*(np.asarray(s.gather(s.arrays, cells).x) for s in sources))
    fits = [lvmzoo.fit(lvmzoo.models.SCVI(n_latent=4, n_hidden=16), d, epochs=2, batch_size=64,
                       seed=3, progress=False) for d in (compact, wide)]
    assert fits[0].history["loss"] == fits[1].history["loss"]
    for a, b in zip(jax.tree.leaves(fits[0].params), jax.tree.leaves(fits[1].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="zero-copy placement is the CPU's")
def test_a_cpu_device_uses_the_compact_arrays_without_a_copy(tmp_path):
    compact, _ = _compact(tmp_path, _counts())
    source = DeviceSource(compact)
    assert source.arrays["values"].unsafe_buffer_pointer() == compact.x.values.ctypes.data
    assert source.arrays["columns"].unsafe_buffer_pointer() == compact.x.columns.ctypes.data


def _args(path, **given):
    return argparse.Namespace(**{"data": str(path), "layer": None, "exclude": [], **given})


def test_lvmzoo_fit_reads_csr_counts_compactly_and_everything_else_as_before(tmp_path):
    path = tmp_path / "cells.h5ad"
    adata = ad.AnnData(X=_counts(), layers={"counts": _counts()})
    adata.write_h5ad(path)
    assert _read_compactly(_args(path), "none")
    assert not _read_compactly(_args(path, layer="counts"), "none")  # a layer: as before
    assert not _read_compactly(_args(path, exclude=["batch=a"]), "none")
    assert not _read_compactly(_args(path), "log1p_cp10k")  # transformed values are floats
    ad.AnnData(X=_counts().toarray()).write_h5ad(tmp_path / "dense.h5ad")
    assert not _read_compactly(_args(tmp_path / "dense.h5ad"), "none")
    (tmp_path / "not.h5ad").write_text("not HDF5")
    assert not _read_compactly(_args(tmp_path / "not.h5ad"), "none")


def test_writing_an_anndata_whose_matrix_is_on_disk_copies_the_matrix_from_its_file(tmp_path):
    source = tmp_path / "cells.h5ad"
    adata = ad.AnnData(X=_counts(), layers={"counts": _counts(seed=1)})
    adata.obs["batch"] = ["a", "b"] * 150
    adata.write_h5ad(source)
    backed = ad.read_h5ad(source, backed="r")
    backed.obsm["X_model"] = np.arange(600, dtype=np.float32).reshape(300, 2)
    write_h5ad(tmp_path / "result.h5ad", backed)
    result = ad.read_h5ad(tmp_path / "result.h5ad")
    assert (result.X != adata.X).nnz == 0 and result.X.dtype == adata.X.dtype
    assert (result.layers["counts"] != adata.layers["counts"]).nnz == 0
    assert result.obs.equals(adata.obs) and result.var.equals(adata.var)
    np.testing.assert_array_equal(result.obsm["X_model"], backed.obsm["X_model"])
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def _unaligned(array):
    """A copy of ``array`` whose buffer is not 64-byte aligned (as anndata's reads often are)."""
    spare = np.empty(len(array) + 16, array.dtype)
    offset = next(i for i in range(1, 16) if (spare.ctypes.data + i * array.itemsize) % 64)
    out = spare[offset:offset + len(array)]
    out[:] = array
    return out


def test_a_csr_matrix_copied_onto_the_device_goes_there_in_narrow_types():
    """An in-memory float32 CSR whose buffers the device cannot use in place (not aligned, as
    anndata.read_h5ad's are) is copied anyway: as uint16 counts and columns, the same cells."""
    from lvmzoo.data.aligned import is_aligned

    x = _counts()
    x = sp.csr_matrix((_unaligned(x.data), _unaligned(x.indices), x.indptr), shape=x.shape)
    assert not is_aligned(x.data)
    data = lvmzoo.setup_anndata(ad.AnnData(X=x))
    source = DeviceSource(data)
    assert source.arrays["values"].dtype == jnp.uint16
    assert source.arrays["columns"].dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(source.full_batch().x), x.toarray())
    x.data[5] = 0.5  # not a count: the values stay float32, exact
    source = DeviceSource(lvmzoo.setup_anndata(ad.AnnData(X=x), kind="continuous"))
    assert source.arrays["values"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(source.full_batch().x), x.toarray())
