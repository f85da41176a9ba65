"""Saving and loading fitted models; atomic writes."""

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import lvmzoo
from lvmzoo import datasets, io
from lvmzoo.infer import saving
from lvmzoo.models import PPCA


@pytest.fixture(scope="module")
def data():
    adata = datasets.simulate_counts(n_cells=240, n_genes=40, n_de_genes_per_type=5, seed=3)
    return lvmzoo.setup_anndata(adata, batch_key="batch", transform="log1p_cp10k")


@pytest.fixture(scope="module")
def fitted(data):
    return lvmzoo.fit(PPCA(n_latent=3), data, epochs=3, batch_size=64,
                      validation_fraction=0.25, seed=5, progress=False)


def test_round_trip_gives_the_same_latent_bit_for_bit(fitted, data, tmp_path):
    path = lvmzoo.save_model(fitted, tmp_path / "run")
    assert sorted(os.listdir(path)) == sorted(io.RUN_FILES)
    loaded = lvmzoo.load_model(path)

    np.testing.assert_array_equal(loaded.latent(data), fitted.latent(data))
    assert loaded.model == fitted.model
    assert loaded.registry == fitted.registry
    assert loaded.seed == 5
    np.testing.assert_array_equal(loaded.train_index, fitted.train_index)
    np.testing.assert_array_equal(loaded.validation_index, fitted.validation_index)
    assert set(loaded.params) == set(fitted.params)
    for name, value in fitted.params.items():
        assert loaded.params[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.params[name], value)
    assert loaded.history == fitted.history
    assert loaded.evaluate(data) == fitted.evaluate(data)


def test_model_json_records_model_guide_settings_and_split(fitted, tmp_path):
    lvmzoo.save_model(fitted, tmp_path / "run", fit_settings={"epochs": 3, "learning_rate": 0.01})
    description = json.loads((tmp_path / "run" / "model.json").read_text())
    assert description["model"] == "ppca"
    assert description["config"] == {"n_latent": 3}
    assert description["guide"] == "default"
    assert description["seed"] == 5
    assert description["fit"]["learning_rate"] == 0.01
    assert description["fit"]["epochs_run"] == 3
    assert description["n_train"] == 180 and description["n_validation"] == 60


def test_nested_flax_style_params_round_trip(fitted, data, tmp_path):
    rng = np.random.default_rng(0)
    nested = {
        "decoder$params": {"params": {
            "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.zeros(3, jnp.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
        }},
        "counts": jnp.arange(4, dtype=jnp.int32),
        "scalar": jnp.asarray(0.1234567, jnp.float32),
    }
    params = {**fitted.params, **nested}
    lvmzoo.save_model(dataclasses.replace(fitted, params=params), tmp_path / "run")
    loaded = lvmzoo.load_model(tmp_path / "run").params

    flat_saved = _flatten(params)
    flat_loaded = _flatten(loaded)
    assert flat_loaded.keys() == flat_saved.keys()
    for key, value in flat_saved.items():
        assert flat_loaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(flat_loaded[key], value)


def test_validation_free_history_round_trips_its_nans(fitted, tmp_path):
    # What fit(validation_fraction=0) returns: NaN validation losses, no held-out cells.
    history = {**fitted.history, "validation_loss": [math.nan] * 3}
    no_validation = dataclasses.replace(
        fitted, history=history, validation_index=np.zeros(0, np.int64),
        train_index=np.arange(240),
    )
    lvmzoo.save_model(no_validation, tmp_path / "run")
    # Strict JSON on disk: NaN is written as null ...
    on_disk = json.loads((tmp_path / "run" / "history.json").read_text())
    assert on_disk["validation_loss"] == [None, None, None]
    # ... and read back as NaN.
    loaded = lvmzoo.load_model(tmp_path / "run")
    assert all(math.isnan(v) for v in loaded.history["validation_loss"])
    assert loaded.history["loss"] == fitted.history["loss"]
    assert loaded.validation_index.size == 0
    np.testing.assert_array_equal(loaded.train_index, np.arange(240))


def test_custom_guide_must_be_passed_back_on_load(fitted, data, tmp_path):
    def my_guide(batch):
        return fitted.model.guide(batch)

    lvmzoo.save_model(dataclasses.replace(fitted, guide=my_guide), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "model.json").read_text())["guide"] == "custom"
    with pytest.raises(ValueError, match=r"custom guide.*my_guide.*guide="):
        lvmzoo.load_model(tmp_path / "run")
    loaded = lvmzoo.load_model(tmp_path / "run", guide=my_guide)
    assert loaded.guide is my_guide
    np.testing.assert_array_equal(loaded.latent(data), fitted.latent(data))


def test_saving_over_an_earlier_run_replaces_it(fitted, data, tmp_path):
    other = dataclasses.replace(fitted, model=PPCA(n_latent=3), seed=99)
    lvmzoo.save_model(other, tmp_path / "run")
    lvmzoo.save_model(fitted, tmp_path / "run")
    assert lvmzoo.load_model(tmp_path / "run").seed == 5
    assert os.listdir(tmp_path) == ["run"]  # no staging or backup directories left


def test_save_refuses_to_replace_a_directory_of_other_files(fitted, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved lvmzoo model"):
        lvmzoo.save_model(fitted, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_failed_save_leaves_the_earlier_run_and_no_partial_directory(
    fitted, tmp_path, monkeypatch
):
    lvmzoo.save_model(dataclasses.replace(fitted, seed=1), tmp_path / "run")
    before = {p: (tmp_path / "run" / p).read_bytes() for p in io.RUN_FILES}

    def disk_full(new, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "_replace_directory", disk_full)
    with pytest.raises(OSError, match="No space"):
        lvmzoo.save_model(fitted, tmp_path / "run")
    assert os.listdir(tmp_path) == ["run"]
    assert {p: (tmp_path / "run" / p).read_bytes() for p in io.RUN_FILES} == before


def test_atomic_write_leaves_no_partial_file_when_the_write_fails(tmp_path):
    target = tmp_path / "metrics.json"

    def half_then_crash(tmp):
        tmp.write_text('{"train": ')
        raise RuntimeError("crashed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        io.atomic_write_file(target, half_then_crash)
    assert os.listdir(tmp_path) == []

    io.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        io.atomic_write_file(target, half_then_crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_writes_replace_content_and_write_strict_json(tmp_path):
    target = tmp_path / "a.json"
    io.atomic_write_bytes(target, b"first")
    io.atomic_write_json(target, {"x": np.float32(1.5), "y": float("nan"), "z": np.arange(2)})
    assert json.loads(target.read_text()) == {"x": 1.5, "y": None, "z": [0, 1]}
    # Written like any other file, not with a temporary file's private mode.
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_load_errors_name_the_problem(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved model.*not found"):
        lvmzoo.load_model(tmp_path / "missing")
    lvmzoo.save_model(fitted, tmp_path / "run")
    (tmp_path / "run" / "params.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="missing params.msgpack"):
        lvmzoo.load_model(tmp_path / "run")


def test_load_rejects_an_unregistered_model_name(fitted, tmp_path):
    lvmzoo.save_model(fitted, tmp_path / "run")
    description = json.loads((tmp_path / "run" / "model.json").read_text())
    description["model"] = "no_such_model"
    del description["model_class"]  # a run that does not say where its class came from
    (tmp_path / "run" / "model.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="'no_such_model' is not registered.*register_model"):
        lvmzoo.load_model(tmp_path / "run")


def test_load_imports_the_class_a_run_recorded_and_names_what_to_install(fitted, tmp_path):
    lvmzoo.save_model(fitted, tmp_path / "run")
    description = json.loads((tmp_path / "run" / "model.json").read_text())
    assert description["model_class"] == "lvmzoo.models.ppca:PPCA"
    assert description["model_package"]["name"] == "lvmzoo"
    description["model"] = "renamed_ppca"  # not registered: found through model_class
    (tmp_path / "run" / "model.json").write_text(json.dumps(description))
    assert lvmzoo.load_model(tmp_path / "run").model == fitted.model
    description["model_class"] = "not_installed_pkg.models:Thing"
    description["model_package"] = {"name": "not-installed-pkg", "version": "1.2"}
    (tmp_path / "run" / "model.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="install not-installed-pkg==1.2"):
        lvmzoo.load_model(tmp_path / "run")


def test_fitted_model_save_method_uses_save_model(fitted, data, tmp_path):
    fitted.save(tmp_path / "run")
    np.testing.assert_array_equal(lvmzoo.load_model(tmp_path / "run").latent(data),
                                  fitted.latent(data))


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, prefix + (key,)))
        return out
    return {prefix: np.asarray(tree)}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
