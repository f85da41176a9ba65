"""Defaults a newcomer can trust: early stopping, the epoch rule, the compilation cache, latent.png.

(The KL warm-up that ends within the fit is tested in tests/test_scvi.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lvmzoo
from lvmzoo import datasets
from lvmzoo.models import PPCA
from lvmzoo.models.base import LatentModel
from lvmzoo.plotting import embed_2d, latent_figure

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def continuous():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 2))
    x = z @ rng.normal(size=(2, 12)) + 0.3 * rng.normal(size=(600, 12))
    return lvmzoo.CellData.from_arrays(x.astype(np.float32))


def test_default_epochs_follow_scvi_tools_rule_for_deep_models():
    rule = LatentModel.default_epochs
    assert [rule(None, n) for n in (1_000, 20_000, 40_000, 1_000_000)] == [400, 400, 200, 8]
    assert PPCA().default_epochs(10**6) == 20


def test_early_stopping_is_on_with_a_validation_split_and_keeps_the_best_epoch(continuous):
    # PPCA starts at the maximum-likelihood solution of a sample: the validation
    # loss is flat from the first epochs, so the fit stops long before 200.
    fitted = lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=200, batch_size=50,
                        validation_fraction=0.2, progress=False)
    history = fitted.history
    assert history["stop_reason"] in ("converged", "early_stopping")
    n_run, best = len(history["epoch"]), history["best_epoch"]
    assert n_run < 200 and n_run - 1 - best == max(3, round(0.1 * 200))
    losses = np.asarray(history["validation_loss"])
    assert losses[best] == pytest.approx(losses.min(), rel=1e-4)
    # The parameters kept are those after the best epoch: a fit of exactly that
    # many epochs (same seed, no stopping) ends with the same ones.
    reference = lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=best + 1, batch_size=50,
                           validation_fraction=0.2, early_stopping=False, progress=False)
    for name, value in reference.params.items():
        np.testing.assert_array_equal(np.asarray(fitted.params[name]), np.asarray(value), name)
    assert reference.history["stop_reason"] == "epoch_limit"
    # Without a validation split there is nothing to stop on.
    plain = lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=4, batch_size=50, progress=False)
    assert plain.history["stop_reason"] == "epoch_limit" and len(plain.history["epoch"]) == 4


def _fit_in_subprocess(cache_dir: Path, out: Path) -> dict:
    """Fit PPCA in a fresh process; return its compile seconds and JAX's cache events."""
    script = textwrap.dedent("""
        import json, collections
        import jax
        events = collections.Counter()
        jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
        import lvmzoo
        from lvmzoo.models import PPCA
        import numpy as np
        rng = np.random.default_rng(0)
        x = rng.normal(size=(400, 12)).astype(np.float32)
        data = lvmzoo.CellData.from_arrays(x)
        fitted = lvmzoo.fit(PPCA(n_latent=2), data, epochs=2, batch_size=50,
                            validation_fraction=0.1, progress=False)
        fitted.evaluate(data)
        print(json.dumps({"compile_seconds": fitted.history["compile_seconds"],
                          "hits": events["/jax/compilation_cache/cache_hits"],
                          "misses": events["/jax/compilation_cache/cache_misses"],
                          "cache": str(lvmzoo.cache.compilation_cache_dir())}))
    """)
    env = {**os.environ, "LVMZOO_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_hits_the_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _fit_in_subprocess(cache, tmp_path)
    assert first["cache"] == str(cache) and first["misses"] > 0
    assert any(cache.iterdir())  # the programs were written
    # Cache entries are files named after the program and its key.
    programs = {"jit_run_epoch", "jit__lambda", "jit__exact_log_likelihood", "jit__elbo"}
    entries = lambda: {p.name for p in cache.iterdir() if p.name.split("-")[0] in programs}
    written = entries()
    assert {name.split("-")[0] for name in written} == programs  # epoch, validation, evaluation
    second = _fit_in_subprocess(cache, tmp_path)
    # The second process reads them back: no new entry (a miss would write one under a
    # new key), and at least as many hits. (Which tiny eager programs compile in over
    # 0.2 s and get cached at all varies with the machine's load.)
    assert entries() == written and second["hits"] >= len(programs), (first, second)


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LVMZOO_CACHE_DIR", "off")
    assert lvmzoo.cache.default_cache_dir() is None
    monkeypatch.setenv("LVMZOO_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert lvmzoo.cache.default_cache_dir() == tmp_path / "elsewhere"


def test_fast_cpu_compilation_flag_is_added_unless_the_user_chose(monkeypatch):
    flag = lvmzoo.cache.FAST_CPU_COMPILATION_FLAG
    monkeypatch.setattr(lvmzoo.cache.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    assert lvmzoo.cache.use_fast_cpu_compilation()
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_foo=1 {flag}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")  # the user's level
    assert not lvmzoo.cache.use_fast_cpu_compilation()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")  # measured on CPU only
    assert not lvmzoo.cache.use_fast_cpu_compilation() and "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert lvmzoo.cache.use_fast_cpu_compilation() and os.environ["XLA_FLAGS"] == flag
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(lvmzoo.cache.importlib.util, "find_spec",
                        lambda name: object() if name == "jax_plugins" else None)
    assert not lvmzoo.cache.use_fast_cpu_compilation()  # an accelerator plugin is installed


def test_latent_figure_has_one_panel_per_column_and_says_its_view():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(90, 5))
    import pandas as pd

    obs = pd.DataFrame({"batch": pd.Categorical(["a", "b", "c"] * 30),
                        "depth": rng.uniform(size=90)})
    fig = latent_figure(latent, obs, ["batch", "depth"], title="toy", method="pca")
    panels = [ax for ax in fig.axes if ax.get_title() in ("batch (3)", "depth")]
    assert len(panels) == 2 and "principal components" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="no column"):
        latent_figure(latent, obs, ["cell_type"])
    coordinates, view = embed_2d(latent[:, :2])
    assert view == "latent" and np.array_equal(coordinates, latent[:, :2])


def test_cli_fit_writes_latent_png_with_batch_and_label_panels(tmp_path):
    from lvmzoo.cli import main

    path = tmp_path / "wu.h5ad"
    datasets.load_wu2020().write_h5ad(path)
    out = tmp_path / "run"
    code = main(["fit", "ppca", str(path), "--out", str(out), "--batch-key", "patient",
                 "--labels-key", "cluster_orig", "--n-latent", "5", "--no-progress",
                 "--plot-method", "pca"])
    assert code == 0
    png = out / "latent.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width > 1.8 * height  # two panels side by side: batch and labels
    assert json.loads((out / "history.json").read_text())["stop_reason"] in (
        "converged", "early_stopping", "epoch_limit")


@pytest.mark.parametrize("particles", [1, 3])
def test_lvmzoo_elbo_equals_numpyros(particles):
    """lvmzoo's Trace_ELBO only fixes the order of the terms (so every process traces
    the same program): same draws, same value, same batch-norm state as NumPyro's."""
    import jax
    import optax
    from numpyro.infer import SVI
    from numpyro.infer import Trace_ELBO as NumPyroELBO

    from lvmzoo.data.source import DeviceSource
    from lvmzoo.infer.elbo import Trace_ELBO
    from lvmzoo.models import SCVI

    data = lvmzoo.setup_anndata(datasets.simulate_counts(n_cells=64, n_genes=100, seed=0),
                                batch_key="batch", kind="counts")
    model = SCVI(n_latent=3, n_hidden=16)
    batch = DeviceSource(data).head(32)
    svi = SVI(model.model, model.guide, optax.adam(1e-3), loss=NumPyroELBO())
    state = svi.init(jax.random.PRNGKey(0), batch)
    params = {**svi.get_params(state), **(state.mutable_state or {})}
    assert state.mutable_state  # batch-norm statistics: the mutable path is exercised
    for key in range(3):
        ours = Trace_ELBO(particles).loss_with_mutable_state(
            jax.random.PRNGKey(key), params, model.model, model.guide, batch)
        theirs = NumPyroELBO(particles).loss_with_mutable_state(
            jax.random.PRNGKey(key), params, model.model, model.guide, batch)
        np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                     ours["mutable_state"], theirs["mutable_state"])
