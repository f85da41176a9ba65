"""``lvmzoo fit --distributed``: one command, several processes, the one-process fit.

The two-process run starts two real ``lvmzoo fit`` processes on this machine
(CPU, one device each, talking through jax's gloo collectives), as
``tests/test_scale.py`` does for the Python API.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lvmzoo
from lvmzoo import cli, datasets
from lvmzoo.cli import _distributed
from lvmzoo.cli._common import UsageError

REPO = Path(__file__).resolve().parents[1]
# scVI without batch norm: with batch norm, Adam turns the rounding noise of a
# bias right before it (no gradient in exact arithmetic) into full steps, which
# differ between one and two devices while the model's outputs do not
# (docs/scaling.md); every other parameter would agree.
FIT = ["scvi", "--batch-key", "batch", "--epochs", "3", "--batch-size", "64", "--seed", "1",
       "--n-hidden", "16", "--n-latent", "4", "--no-use-batch-norm", "--no-progress",
       "--score-cells", "50", "--per-gene-outputs", "none"]
OUTPUTS = {"model", "history.json", "loss.png", "latent.png", "result.h5ad", "metrics.json"}


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    adata = datasets.simulate_counts(n_cells=600, n_genes=200, n_batches=2, mean_library=100,
                                     seed=0)
    adata.obs = adata.obs[["batch"]].copy()
    adata.obsm.clear()
    adata.uns.clear()
    path = tmp_path_factory.mktemp("distributed") / "counts.h5ad"
    adata.write_h5ad(path)
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES") and not k.startswith(("SLURM_",
                                                                                  "OMPI_"))}
    # XLA flags other than a forced device count kept (conftest's optimisation level: the
    # one-process fit compared with runs in this test process).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return {**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _params(run):
    import jax

    fitted = lvmzoo.load_model(run / "model")
    leaves = {jax.tree_util.keystr(path): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(fitted.params)}
    return fitted, leaves


@pytest.mark.slow
def test_two_process_cli_fit_equals_one_process_fit(counts_file, tmp_path):
    port = _free_port()
    out = tmp_path / "two"
    scratch = [tmp_path / f"tmp{i}" for i in range(2)]
    processes = []
    for i in range(2):
        scratch[i].mkdir()
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "lvmzoo.cli", "fit", *FIT, str(counts_file),
             "--out", str(out), "--distributed", "--coordinator", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            env=_env(TMPDIR=str(scratch[i])), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    # The reference, meanwhile, in this process: the same command without --distributed.
    assert cli.main(["fit", *FIT, str(counts_file), "--out", str(tmp_path / "one")]) == 0
    results = [p.communicate(timeout=900) for p in processes]
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
    (out0, err0), (out1, err1) = results
    assert "process 0 of 2 under jax.distributed: training on 2 devices" in err0
    assert "scvi fitted to" in out0
    assert out1 == "" and "[Gloo]" not in out0  # the other process prints nothing
    assert "lvmzoo:" not in err1
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert not any(scratch[1].glob("lvmzoo-process1-*"))  # its scratch --out is gone too

    one, expected = _params(tmp_path / "one")
    two, actual = _params(out)
    assert two.history["n_processes"] == 2 and two.history["n_devices"] == 2
    assert one.history["n_processes"] == 1
    assert set(actual) == set(expected)
    # Two devices sum the gradients in another order than one: equal up to rounding.
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(two.history["loss"], one.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(two.history["validation_loss"], one.history["validation_loss"],
                               rtol=1e-5)
    settings = json.loads((out / "metrics.json").read_text())
    assert settings["train"]["n_cells"] == 50


def test_importing_the_cli_leaves_jax_unstarted():
    # jax.distributed.initialize must run before jax's backend starts; nothing
    # lvmzoo does at import may start it (e.g. a module-level jnp computation).
    code = ("import lvmzoo.cli, lvmzoo.models\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized(), 'backend started at import'\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"},
     ("SLURM_STEP_NUM_TASKS", 4)),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, None),
    # sbatch --ntasks=4 running lvmzoo itself (no srun): one process, not distributed.
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, ("OMPI_COMM_WORLD_SIZE", 2)),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"JAX_NUM_PROCESSES": "2"}, None),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, ("JAX_NUM_PROCESSES", 2)),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None),
])
def test_launchers_that_make_a_fit_distributed(environ, expected):
    assert _distributed.launched_processes(environ) == expected


def test_distributed_flags_are_checked(monkeypatch):
    for name, _ in _distributed.LAUNCHER_COUNTS:
        monkeypatch.delenv(name, raising=False)
    parser = cli.build_parser(["fit", "ppca"])

    def start(*flags):
        args = cli.parse_args(parser, ["fit", "ppca", "--out", "x", *flags])
        return _distributed.start_distributed(args)

    assert start() is True and start("--no-distributed") is True  # nothing to connect
    with pytest.raises(UsageError, match="need --distributed"):
        start("--no-distributed", "--num-processes", "2")
    with pytest.raises(UsageError, match="--num-processes must be at least 1"):
        start("--num-processes", "0")
    with pytest.raises(UsageError, match=r"--process-id must be in 0\.\.1"):
        start("--num-processes", "2", "--process-id", "2")
