"""Scale: the one driver on several devices and processes, and on data that stays on disk.

Fits on forced host devices and under ``jax.distributed`` run in fresh
processes (``tests/_fit_worker.py``), since both must be configured before
jax is imported; the one-device reference runs here with the same settings.
"""

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import optax
import pytest
import scipy.sparse as sp
import zarr

import _fit_worker as worker
import lvmzoo
from lvmzoo import cli, datasets
from lvmzoo.data import backed as backed_module
from lvmzoo.data import streaming
from lvmzoo.data.placement import Placement
from lvmzoo.data.streaming import BlockShuffle
from lvmzoo.models import PPCA

WORKER = Path(worker.__file__)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    """600 simulated cells × 200 genes in two batches, sparse enough for padded rows."""
    adata = datasets.simulate_counts(n_cells=600, n_genes=200, n_batches=2, mean_library=100,
                                     seed=0)
    adata.obs = adata.obs[["batch"]].copy()
    adata.obsm.clear()
    adata.uns.clear()
    path = tmp_path_factory.mktemp("scale") / "counts.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def reference(counts_file):
    """One-device fits of ``counts_file``, in memory and streamed from disk, same block order."""
    return worker.fit_both(str(counts_file))


def _assert_same_fit(expected, actual, rtol, atol):
    assert set(expected) == set(actual)
    for key in expected:
        if key in ("n_devices", "n_processes"):
            continue
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


def _run_worker(args, env):
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _load(path, name):
    stored = np.load(path)
    return {key.split("/", 1)[1]: stored[key] for key in stored.files
            if key.startswith(name + "/")}


# --------------------------------------------------------------------------
# Out-of-core: a backed .h5ad and a Zarr store train like the same cells in memory
# --------------------------------------------------------------------------


def test_backed_h5ad_trains_like_in_memory_for_the_same_block_order(reference):
    memory, backed = (worker.flatten(reference[k]) for k in ("memory", "backed"))
    _assert_same_fit(memory, backed, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(backed["validation_loss"]))
    assert backed["loss"][-1] < backed["loss"][0]


def test_outputs_of_a_backed_fit_stream_the_cells(reference, counts_file):
    in_memory = lvmzoo.setup_anndata(ad.read_h5ad(counts_file), batch_key="batch")
    on_disk = lvmzoo.setup_anndata(ad.read_h5ad(counts_file, backed="r"), batch_key="batch")
    fitted = reference["backed"]
    np.testing.assert_allclose(fitted.latent(on_disk), fitted.latent(in_memory), rtol=1e-6)
    held_out = fitted.validation_index
    scores = [fitted.evaluate(d.subset(held_out), n_samples=2) for d in (in_memory, on_disk)]
    assert scores[0]["n_cells"] == scores[1]["n_cells"] == len(held_out)
    assert scores[0]["avg_log_likelihood"] == pytest.approx(scores[1]["avg_log_likelihood"],
                                                             rel=1e-6)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data")
def test_zarr_store_trains_like_the_h5ad(reference, counts_file, tmp_path, monkeypatch):
    # Dense X in the store: the loader reads dense rows and sends dense minibatches.
    adata = ad.read_h5ad(counts_file)
    adata.X = adata.X.toarray()
    adata.write_zarr(tmp_path / "counts.zarr")
    opened = lvmzoo.data.read_backed(tmp_path / "counts.zarr")
    assert isinstance(opened.X, zarr.Array)
    data = lvmzoo.setup_anndata(opened, batch_key="batch")
    assert data.is_backed
    n_train = data.n_cells - round(worker.SETTINGS["validation_fraction"] * data.n_cells)
    monkeypatch.setattr(streaming, "CHUNK_BYTES",
                        worker.STEPS_PER_CHUNK * worker.SETTINGS["batch_size"] * 4 * data.n_genes)
    fitted = lvmzoo.fit(worker.model(), data, optimizer=worker.optimizer(n_train),
                        shuffle=BlockShuffle(**worker.BLOCKS), **worker.SETTINGS)
    _assert_same_fit(worker.flatten(reference["backed"]), worker.flatten(fitted),
                     rtol=1e-6, atol=1e-7)


def test_block_shuffle_order(monkeypatch):
    shuffle = BlockShuffle(block_size=10, window_blocks=2)
    key = jax.random.PRNGKey(3)
    order = shuffle.order(key, 0, 95, 9, 10)
    assert order.shape == (9, 10) and order.dtype == np.int32
    flat = order.ravel()
    assert len(set(flat)) == 90  # each cell at most once per epoch
    # Each window of 2 blocks (20 cells; the last window is shorter) holds cells
    # of exactly two contiguous blocks.
    for window in (flat[:20], flat[20:40]):
        assert len(set(window // 10)) == 2
    np.testing.assert_array_equal(order, shuffle.order(key, 0, 95, 9, 10))
    assert not np.array_equal(order, shuffle.order(key, 1, 95, 9, 10))


def test_setup_anndata_validates_a_backed_file_block_by_block(tmp_path, monkeypatch):
    """The same errors and warning as in memory, found reading at most one block at a time."""
    monkeypatch.setattr(backed_module, "SCAN_BLOCK", 16)
    spans = []
    read = backed_module.BackedMatrix._read_file_range

    def spying(self, start, stop):
        spans.append(stop - start)
        return read(self, start, stop)

    monkeypatch.setattr(backed_module.BackedMatrix, "_read_file_range", spying)
    rng = np.random.default_rng(0)
    good = rng.poisson(2.0, size=(100, 6)).astype(np.float32)
    good[:, 0] += 1
    cases = {
        "NaN or infinite": (70, 2, np.nan),
        "negative values": (85, 3, -1.0),
        "non-integer values": (99, 1, 0.5),
        "zero total counts": (60, slice(None), 0.0),
    }
    for message, (row, column, value) in cases.items():
        x = good.copy()
        x[row, column] = value
        path = tmp_path / f"{len(spans)}.h5ad"
        ad.AnnData(X=sp.csr_matrix(x)).write_h5ad(path)
        with pytest.raises(lvmzoo.DataError, match=message) as on_disk:
            lvmzoo.setup_anndata(ad.read_h5ad(path, backed="r"))
        with pytest.raises(lvmzoo.DataError) as in_memory:
            lvmzoo.setup_anndata(ad.read_h5ad(path))
        assert str(on_disk.value) == str(in_memory.value)
    x = good.copy()
    x[:, 4] = 0
    ad.AnnData(X=sp.csr_matrix(x)).write_h5ad(tmp_path / "unobserved.h5ad")
    with pytest.warns(lvmzoo.DataWarning, match="1 of 6 genes are zero in every cell"):
        data = lvmzoo.setup_anndata(ad.read_h5ad(tmp_path / "unobserved.h5ad", backed="r"))
    assert data.is_backed and data.n_cells == 100
    assert spans and max(spans) <= 16


def test_streamed_divergence_keeps_the_same_parameters_as_in_memory(counts_file, monkeypatch):
    """Exact replay of a streamed epoch, across chunk boundaries, from a second read of the file."""

    def poisoned():  # finite for 13 steps, then NaN updates
        def update(updates, count, params=None):
            poison = jax.numpy.where(count >= 13, jax.numpy.nan, 1.0)
            return jax.tree.map(lambda u: u * poison, updates), count + 1

        return optax.chain(optax.adam(1e-2), optax.GradientTransformation(
            lambda params: jax.numpy.zeros((), jax.numpy.int32), update))

    monkeypatch.setattr(streaming, "CHUNK_BYTES", 3 * 50 * 4 * 200)  # 3 steps per chunk
    kept = []
    for backed in (False, True):
        data = lvmzoo.setup_anndata(ad.read_h5ad(counts_file, backed="r" if backed else None),
                                    transform="log1p_cp10k")
        with pytest.raises(lvmzoo.FitDivergedError) as info:
            lvmzoo.fit(PPCA(n_latent=2), data, optimizer=poisoned(), epochs=3, batch_size=50,
                       shuffle=BlockShuffle(block_size=64, window_blocks=2), progress=False)
        kept.append((str(info.value), info.value.result.params))
    assert kept[0][0] == kept[1][0] and "epoch 1" in kept[0][0]
    kept = [params for _, params in kept]
    for name in kept[0]:
        np.testing.assert_allclose(np.asarray(kept[1][name]), np.asarray(kept[0][name]),
                                   rtol=1e-6, err_msg=name)


# --------------------------------------------------------------------------
# Several devices, several processes
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_four_forced_host_devices_match_one_device(reference, counts_file, tmp_path):
    out = tmp_path / "four.npz"
    # The parent's flags kept (conftest's optimisation level): the reference was compiled so.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    info = _finish(_run_worker([counts_file, out, "--devices", "4"], env))
    assert info["devices"] == 4
    for name in ("memory", "backed"):
        four = _load(out, name)
        assert int(four["n_devices"]) == 4
        # Batch-norm statistics over the global batch, gradients summed by XLA:
        # equal up to the order of floating-point sums.
        _assert_same_fit(worker.flatten(reference[name]), four, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_under_jax_distributed_match_one_process(reference, counts_file, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {"JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    processes = [
        _run_worker([counts_file, tmp_path / f"process{i}.npz", "--devices", "all",
                     "--coordinator", f"localhost:{port}", "--num-processes", 2,
                     "--process-id", i, "--only", "backed"], env)
        for i in range(2)]
    infos = [_finish(p) for p in processes]
    assert [i["process"] for i in infos] == [0, 1]
    assert all(i["devices"] == 4 and i["local_devices"] == 2 for i in infos)
    # Each process reads its own share of the backed file; the in-memory multi-process
    # path is the CLI's (tests/test_distributed_cli.py).
    for name in ("backed",):
        results = [_load(tmp_path / f"process{i}.npz", name) for i in range(2)]
        assert int(results[0]["n_processes"]) == 2 and int(results[0]["n_devices"]) == 4
        _assert_same_fit(results[0], results[1], rtol=0, atol=0)  # replicated parameters
        _assert_same_fit(worker.flatten(reference[name]), results[0], rtol=1e-4, atol=1e-5)


def test_batch_size_is_rounded_down_to_a_multiple_of_the_devices():
    four = Placement(types.SimpleNamespace(size=4))
    assert four.global_batch_size(48) == 48
    with pytest.warns(UserWarning, match="batch_size 50 does not divide by the 4 devices; "
                                         "using 48"):
        assert four.global_batch_size(50) == 48
    with pytest.raises(ValueError, match="smaller than the 4 devices"):
        four.global_batch_size(3)


@pytest.mark.parametrize("devices, message", [
    (2, "but 1 device"), ("some", "'all'"), (True, "an int"),
    (jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",)), "axis named 'cells'"),
])
def test_bad_devices_are_refused(devices, message):
    data = lvmzoo.CellData.from_arrays(np.ones((20, 3), np.float32))
    with pytest.raises(ValueError, match=message):
        lvmzoo.fit(PPCA(n_latent=1), data, epochs=1, devices=devices, progress=False)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def test_cli_fits_from_disk_when_asked_or_when_the_file_is_large(counts_file, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setattr(backed_module, "total_memory", lambda: 1000)  # any file is "large"
    out = tmp_path / "run"
    rc = cli.main(["fit", "ppca", str(counts_file), "--out", str(out), "--epochs", "2",
                   "--n-latent", "2", "--devices", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "training from disk (as --backed" in captured.err
    result = ad.read_h5ad(out / "result.h5ad")
    assert result.X is None and result.obsm["X_ppca"].shape == (600, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["n_cells"] == 540 and metrics["validation"]["n_cells"] == 60
    fitted = lvmzoo.load_model(out / "model")
    in_memory = lvmzoo.setup_anndata(ad.read_h5ad(counts_file), transform="log1p_cp10k")
    np.testing.assert_allclose(result.obsm["X_ppca"], fitted.latent(in_memory), rtol=1e-5)
    assert cli.main(["fit", "ppca", str(counts_file), "--out", str(tmp_path / "x"),
                     "--devices", "0"]) == 2
    assert "--devices must be a positive number or 'all'" in capsys.readouterr().err
