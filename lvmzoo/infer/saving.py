"""Saving and loading fitted models: the run directory.

A saved model is a *run directory*::

    model.json       model name, import path and package version, config, guide,
                     fit settings, seed, train / validation cell indices
    registry.json    the DataRegistry of the training data (genes, categories,
                     layer, transform)
    params.msgpack   the constrained parameters (a pytree of arrays, nested
                     dicts from Flax modules included), Flax msgpack format
    history.json     the per-epoch loss history

A seed ensemble (:class:`~lvmzoo.infer.ensemble.FittedEnsemble`) is saved as
the run of its replicate 0 plus ``ensemble.json`` (seeds, the alignment of
the replicates' latents, replicates left out) and ``replicates/<r>/`` holding
the four files of replicate ``r``; :func:`load_model` returns the ensemble.

The directory is assembled under a temporary sibling name and renamed into
place, so a crash never leaves a half-written run behind.

Loading rebuilds the model from its registered name and config
(:func:`lvmzoo.models.get_model`); a model that is not registered in the
loading process (a user's model) is imported from the path the run recorded
(``model_class``: ``"package.module:Class"``, or the file it was defined in),
and when that fails the error names the module or package to install.  A
loaded model reports the same latent representation, bit for bit, as the one
that was saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lvmzoo.data.registry import DataRegistry
from lvmzoo.infer.results import FittedModel
from lvmzoo.models.registry import model_from_origin, model_origin
from lvmzoo.io import (ENSEMBLE_FILE, FORMAT_VERSION, HISTORY_FILE, MODEL_FILE, PARAMS_FILE,
                       REGISTRY_FILE, REPLICATES_DIR, RUN_FILES, PathLike, params_from_bytes,
                       params_to_bytes, to_json)

DEFAULT_GUIDE = "default"
CUSTOM_GUIDE = "custom"


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def save_model(
    fitted: FittedModel, path: PathLike, *, fit_settings: Optional[dict[str, Any]] = None
) -> Path:
    """Write ``fitted`` to the run directory ``path`` atomically.

    The directory is built under a temporary sibling name and renamed into
    place.  An existing run directory at ``path`` (one holding ``model.json``)
    is replaced; any other existing, non-empty path is refused so that user
    files are never deleted.

    Args:
      fitted: what :func:`lvmzoo.fit` returned.
      path: the run directory to create (its parent is created if needed).
      fit_settings: extra settings to record in ``model.json["fit"]`` (the
        CLI records epochs, learning rate, validation fraction, ...); must be
        JSON-serialisable.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.

    Raises:
      FileExistsError: ``path`` exists and is not an earlier run directory.
      TypeError: the model config or ``fit_settings`` is not JSON-serialisable.
    """
    path = Path(path)
    if path.exists() and not _is_replaceable(path):
        raise FileExistsError(
            f"{path} exists and is not a saved lvmzoo model; choose a new directory or remove it"
        )
    # Serialise everything before touching the disk, so a bad value fails early.
    members = getattr(fitted, "members", None)
    if members is None:
        files = _run_files(fitted, fit_settings)
    else:  # a seed ensemble: replicate 0's run, the ensemble file, the other replicates
        files = _run_files(members[0], fit_settings)
        files[ENSEMBLE_FILE] = to_json({
            "format_version": FORMAT_VERSION, "n_replicates": len(members),
            "seeds": [int(m.seed) for m in members],
            "alignment": fitted.alignment.to_dict(),
            "dropped": {str(seed): message for seed, message in fitted.dropped.items()},
            "temperature": float(fitted.temperature),
        })
        for r, member in enumerate(members[1:], start=1):
            files.update({f"{REPLICATES_DIR}/{r}/{name}": content
                          for name, content in _run_files(member, fit_settings).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_sibling(path, "tmp")
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the run
    try:
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        _replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _run_files(fitted: FittedModel, fit_settings) -> dict[str, Any]:
    return {
        MODEL_FILE: to_json(_model_description(fitted, fit_settings)),
        REGISTRY_FILE: to_json(fitted.registry.to_dict()),
        PARAMS_FILE: params_to_bytes(fitted.params),
        HISTORY_FILE: to_json(fitted.history),
    }


def _is_replaceable(path: Path) -> bool:
    if path.is_dir():
        return (path / MODEL_FILE).is_file() or not any(path.iterdir())
    return False


def _replace_directory(new: Path, path: Path) -> None:
    """Rename directory ``new`` to ``path``, replacing an earlier run there.

    ``os.replace`` cannot replace a non-empty directory, so the old one is
    first moved aside; if the final rename fails it is moved back.
    """
    if not path.exists():
        os.replace(new, path)
        return
    old = _fresh_sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fresh_sibling(path: Path, tag: str) -> Path:
    """An unused hidden name next to ``path``."""
    return path.parent / f".{path.name}.{tag}-{secrets.token_hex(8)}"


def _model_description(fitted: FittedModel, fit_settings) -> dict[str, Any]:
    model = fitted.model
    train_index = np.asarray(fitted.train_index, np.int64)
    validation_index = np.asarray(fitted.validation_index, np.int64)
    history = fitted.history
    return {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        **model_origin(type(model)),
        "config": model.config(),
        "guide": guide_name(fitted),
        "guide_qualname": getattr(fitted.guide, "__qualname__", type(fitted.guide).__name__),
        **_named_guide_description(fitted.guide),
        "seed": int(fitted.seed),
        "fit": {
            **(fit_settings or {}),
            # What the driver actually did (batch size capped at the training cells).
            "epochs_run": len(history.get("epoch", [])),
            "batch_size": history.get("batch_size"),
            "steps_per_epoch": history.get("steps_per_epoch"),
        },
        "diverged": fitted.diverged,
        "interrupted": bool(fitted.interrupted),
        "n_train": int(train_index.size),
        "n_validation": int(validation_index.size),
        "train_index": train_index,
        "validation_index": validation_index,
    }


def guide_name(fitted: FittedModel) -> str:
    """``"default"`` if ``fitted`` used its model's own guide, the name of a guide
    from :func:`lvmzoo.infer.guides.make_guide`, else ``"custom"``."""
    from lvmzoo.infer.guides import NamedGuide

    if isinstance(fitted.guide, NamedGuide):
        return fitted.guide.name
    own = fitted.model.guide
    # Bound methods compare equal when they wrap the same function of the same model.
    return DEFAULT_GUIDE if fitted.guide == own else CUSTOM_GUIDE


def _named_guide_description(guide) -> dict[str, Any]:
    """Options and training cells (rows of per-cell params) of a named guide."""
    from lvmzoo.infer.guides import NamedGuide

    if not isinstance(guide, NamedGuide):
        return {}
    cells = guide.training_cells
    return {"guide_options": guide.options,
            "guide_cells": None if cells is None else [str(c) for c in cells]}




# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_model(path: PathLike, *, guide: Optional[Callable] = None) -> FittedModel:
    """Load a run directory written by :func:`save_model`.

    Args:
      path: the run directory (or the ``--out`` directory of ``lvmzoo fit``, whose
        ``model/`` holds it).
      guide: the variational family, required when the model was fitted with
        a custom guide (guides are code and are not saved); ``None`` uses the
        model's own guide, or rebuilds the named guide (``make_guide``) the
        run recorded, with its training cells.

    Returns:
      A :class:`FittedModel` equal to the saved one: same model config,
      params, registry, history, seed and cell split (a
      :class:`~lvmzoo.infer.ensemble.FittedEnsemble` for a saved ensemble).

    Raises:
      FileNotFoundError: ``path`` is not a run directory or lacks a file.
      ValueError: the model name is not registered, or a custom guide was
        used and ``guide`` was not given.
    """
    path = Path(path)
    if not (path / MODEL_FILE).is_file() and (path / "model" / MODEL_FILE).is_file():
        path = path / "model"  # the --out directory of `lvmzoo fit`
    if (path / ENSEMBLE_FILE).is_file():
        return _load_ensemble(path, guide)
    return _load_one(path, guide)


def _load_ensemble(path: Path, guide):
    from lvmzoo.infer.ensemble import Alignment, FittedEnsemble

    description = json.loads((path / ENSEMBLE_FILE).read_text("utf-8"))
    members = [_load_one(path, guide)] + [
        _load_one(path / REPLICATES_DIR / str(r), guide)
        for r in range(1, description["n_replicates"])]
    return FittedEnsemble(members, Alignment.from_dict(description["alignment"]),
                          {int(k): v for k, v in description.get("dropped", {}).items()},
                          float(description.get("temperature", 1.0)))


def _load_one(path: Path, guide) -> FittedModel:
    if not path.is_dir():
        raise FileNotFoundError(f"no saved model at {path}: directory not found")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a complete saved model: missing {', '.join(missing)}"
        )
    description = json.loads((path / MODEL_FILE).read_text("utf-8"))
    model = _build_model(description["model"], description["config"], description)
    if guide is None and description["guide"] in _guide_names():
        guide = _named_guide(description, model)
    if guide is None:
        if description["guide"] != DEFAULT_GUIDE:
            raise ValueError(
                f"the model in {path} was fitted with a custom guide "
                f"({description.get('guide_qualname', 'unknown')}); guides are code and are "
                "not saved: pass the same guide, load_model(path, guide=my_guide)"
            )
        guide = model.guide
    registry = DataRegistry.from_dict(json.loads((path / REGISTRY_FILE).read_text("utf-8")))
    history = _restore_history(json.loads((path / HISTORY_FILE).read_text("utf-8")))
    return FittedModel(
        model=model,
        guide=guide,
        params=params_from_bytes((path / PARAMS_FILE).read_bytes()),
        registry=registry,
        history=history,
        train_index=np.asarray(description["train_index"], np.int64),
        validation_index=np.asarray(description["validation_index"], np.int64),
        seed=int(description["seed"]),
        diverged=description.get("diverged"),
        interrupted=bool(description.get("interrupted", False)),
    )


def _guide_names():
    from lvmzoo.infer.guides import GUIDES

    return GUIDES


def _named_guide(description: dict[str, Any], model):
    from lvmzoo.infer.guides import make_guide

    guide = make_guide(description["guide"], model, **description.get("guide_options", {}))
    cells = description.get("guide_cells")
    guide.training_cells = None if cells is None else np.asarray(cells, dtype=object)
    return guide


def _build_model(name: str, config: dict[str, Any], origin: dict[str, Any]):
    cls = model_from_origin(name, origin)
    # JSON turns tuples into lists; hyperparameters of a frozen dataclass are
    # immutable, so give tuple-valued fields their tuples back.
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"saved config of {name!r} has fields the installed model lacks: {', '.join(unknown)}"
        )
    # A field added to a model after a save was written: the save meant the behaviour
    # before it, which the class states (e.g. the pseudotime models' noise_floor = 0),
    # not the new default.
    config = {**getattr(cls, "older_saves_meant", {}), **config}
    return cls(**{k: _tuples(v) for k, v in config.items()})


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _restore_history(history: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch float lists: ``null`` (written for NaN) back to NaN."""
    out = dict(history)
    for key in ("loss", "validation_loss", "seconds"):
        if key in out and isinstance(out[key], list):
            out[key] = [math.nan if v is None else v for v in out[key]]
    return out
