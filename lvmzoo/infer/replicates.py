"""Many fits in one compiled program: replicate fits over seeds with ``jax.vmap``.

:func:`fit_replicated` runs the driver's own epoch program
(:func:`lvmzoo.infer.svi.epoch_function`) vmapped over a leading replicate
axis of the SVI state and of the shuffling order, so ``R`` replicates share one
compilation and one pass over the data per step.  Replicate ``r`` follows the
random stream of ``fit(model, data, seed=seeds[r])`` — the same start,
minibatches, draws and validation draws — except that every replicate holds
out the cells that ``seeds[0]`` holds out, so that all replicates are scored on
cells none of them trained on.  Each replicate stops early on its own
validation loss and keeps its own best epoch; the program runs until the last
one stops.  The fits are the separate fits up to float32 rounding (parameters
agree to about 1e-5: the vmapped program orders its reductions differently,
not bit for bit).

:func:`lvmzoo.fit` with ``replicates=R`` wraps the replicates in a
:class:`~lvmzoo.infer.ensemble.FittedEnsemble`; :func:`fit_replicates` returns
them as a list.
"""

from __future__ import annotations

import itertools
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI
from scipy.spatial import procrustes
from tqdm import tqdm

from lvmzoo.data.registry import CellData
from lvmzoo.data.source import DeviceSource, n_steps_per_epoch
from lvmzoo.data.streaming import EvaluationBatches
from lvmzoo.infer.guides import NamedGuide, default_learning_rate, make_guide
from lvmzoo.infer.results import FittedModel
from lvmzoo.infer.svi import (
    EARLY_STOPPING_TOLERANCE,
    _all_params,
    _divergence_message,
    _EarlyStopping,
    _params_for,
    _refuse_per_cell_guide_params,
    _split,
    check_data_kind,
    epoch_function,
    epoch_order,
    initial_state,
)
from lvmzoo.models.base import LatentModel


def fit_replicates(
    model: LatentModel,
    data: CellData,
    seeds: Sequence[int],
    *,
    guide: Optional[Callable] = None,
    learning_rate: Optional[float] = None,
    epochs: int = 100,
    batch_size: int = 128,
    progress: bool = True,
) -> list[FittedModel]:
    """Fit ``len(seeds)`` replicates of ``model`` at once, without a validation split.

    Args:
      model, data, guide, learning_rate, epochs, batch_size, progress: as in
        :func:`lvmzoo.fit`.
      seeds: one seed per replicate.

    Returns:
      One :class:`FittedModel` per seed.  A replicate whose loss became
      non-finite keeps its last finite parameters and has ``diverged`` set;
      the others carry on.
    """
    return fit_replicated(model, data, seeds, guide=guide, learning_rate=learning_rate,
                          epochs=epochs, batch_size=batch_size, progress=progress)


def fit_replicated(
    model: LatentModel,
    data: CellData,
    seeds: Sequence[int],
    *,
    guide: Optional[Callable] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: Optional[float] = None,
    epochs: Optional[int] = None,
    batch_size: int = 128,
    validation_fraction: float = 0.0,
    early_stopping: Optional[bool] = None,
    early_stopping_patience: Optional[int] = None,
    early_stopping_tolerance: float = EARLY_STOPPING_TOLERANCE,
    progress: bool = True,
    initial_params: Optional[Any] = None,
) -> list[FittedModel]:
    """:func:`lvmzoo.fit` of every seed in ``seeds`` in one vmapped program.

    The options are :func:`lvmzoo.fit`'s; the validation cells are those of
    ``seeds[0]`` for every replicate.  Cells must be in memory (a file on disk
    trains one model at a time: ``fit(..., replicates=None)``).

    Returns:
      One :class:`FittedModel` per seed, each with the history and stop
      reason of its own fit; a replicate whose loss became non-finite keeps
      its last finite parameters and has ``diverged`` set.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must differ, got {seeds}")
    check_data_kind(model, data)
    if data.is_backed:
        raise ValueError(
            "replicates are trained with the cells in memory, and these cells are on disk: "
            "load them (data.to_memory()), or fit one model from disk without replicates")
    model = model.for_data(data)
    if isinstance(initial_params, FittedModel):
        initial_params = _params_for(initial_params, data)
    guide = model.guide if guide is None else guide
    if isinstance(guide, str):  # a name, as fit() takes it: "mean_field", "low_rank", ...
        guide = make_guide(guide, model)
    if isinstance(guide, NamedGuide):
        guide = make_guide(guide.name, model, **guide.options)  # owned by these fits
    if learning_rate is None:
        learning_rate = default_learning_rate(guide, model)
    stated_rate = learning_rate if optimizer is None else None
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    train_idx, val_idx = _split(data.n_cells, validation_fraction, seeds[0])
    if isinstance(guide, NamedGuide):
        guide.training_cells = np.asarray(data.obs_names)[train_idx]  # rows of per-cell params
    train = DeviceSource(data, rows=train_idx if len(val_idx) else None)  # cells not copied
    batch_size = min(batch_size, train.n_cells)
    steps_per_epoch = n_steps_per_epoch(train.n_cells, batch_size)
    if epochs is None:
        epochs = model.default_epochs(train.n_cells)
    svi = SVI(model.model, guide, optimizer, loss=model.elbo())
    if not isinstance(guide, NamedGuide):
        _refuse_per_cell_guide_params(guide, train.head(batch_size))

    n = len(seeds)
    keys = [jax.random.split(jax.random.PRNGKey(seed), 3) for seed in seeds]
    states = [initial_state(svi, model, train, batch_size, k[0], initial_params) for k in keys]
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    run_epochs = jax.vmap(epoch_function(svi, train), in_axes=(0, 0, 0, None, None, None))

    started = time.perf_counter()
    orders_shape = jax.ShapeDtypeStruct((n, steps_per_epoch, batch_size), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    program = jax.jit(run_epochs).lower(
        state, state, orders_shape, train.arrays, scalar, scalar).compile()
    per_cell = getattr(guide, "per_cell", False)
    stoppers = [_EarlyStopping.from_options(early_stopping, early_stopping_patience,
                                            early_stopping_tolerance, epochs,
                                            has_validation=len(val_idx) > 0) for _ in seeds]
    if per_cell and len(val_idx):
        if stoppers[0] is not None:
            warnings.warn(
                f"the {guide.name!r} guide holds parameters for the training cells only, so the "
                f"{len(val_idx)} validation cells have no validation loss and early stopping is "
                "off (every epoch runs)", UserWarning, stacklevel=2)
        stoppers = [None] * n
    validate = (None if per_cell or not len(val_idx) else
                _replicated_validation(svi, model, data, val_idx, [k[2] for k in keys]))
    if validate:
        validate(state)  # compiled now, so epoch times exclude compilation
    compile_seconds = time.perf_counter() - started

    histories = [{"epoch": [], "loss": [], "validation_loss": [], "seconds": []} for _ in seeds]
    final: list[Any] = [None] * n  # the state each replicate keeps, once it has stopped
    reasons = ["epoch_limit"] * n
    diverged: list[Optional[str]] = [None] * n
    previous = state
    one = lambda tree, r: jax.tree.map(lambda leaf: leaf[r], tree)  # noqa: E731
    bar = tqdm(range(epochs), desc=f"fit {n} × {model.name}", disable=not progress,
               unit="epoch")
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            orders = jnp.stack([epoch_order(k[1], epoch, train.n_cells, steps_per_epoch,
                                            batch_size) for k in keys])
            carry, losses = program(previous, state, orders, train.arrays, jnp.float32(epoch),
                                    jnp.float32(epochs))
            previous, state = carry.previous, carry.state
            failed = np.asarray(carry.failed_step)
            val_losses = validate(state) if validate else np.full(n, np.nan)
            losses = np.asarray(jnp.mean(losses, axis=1)) / train.n_cells
            seconds = time.perf_counter() - t0
            for r in range(n):
                if final[r] is not None:
                    continue  # stopped earlier: its kept state is fixed
                if failed[r] >= 0:  # frozen by the guard; ``previous`` is its last finite state
                    diverged[r] = _divergence_message(model, epoch, int(failed[r]), stated_rate)
                    final[r], reasons[r] = one(previous, r), "diverged"
                    continue
                history = histories[r]
                history["epoch"].append(epoch)
                history["loss"].append(float(losses[r]))
                history["validation_loss"].append(float(val_losses[r]))
                history["seconds"].append(seconds)
                stopping = stoppers[r]
                if stopping and stopping.update(epoch, float(val_losses[r]), one(state, r)):
                    final[r], reasons[r] = stopping.best_state, stopping.reason(val_losses[r])
            running = sum(f is None for f in final)
            bar.set_postfix(loss=f"{np.nanmean(losses):.4g}", running=running)
            if running == 0:
                break
    except KeyboardInterrupt:
        warnings.warn(f"fit interrupted; keeping the parameters of epoch "
                      f"{max(len(h['epoch']) for h in histories)}")
        reasons = [r if f is not None else "interrupted" for r, f in zip(reasons, final)]
    finally:
        bar.close()

    results = []
    for r, seed in enumerate(seeds):
        kept = final[r] if final[r] is not None else one(state, r)
        history = {
            **histories[r], "compile_seconds": compile_seconds,
            "steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
            "n_train": train.n_cells, "max_epochs": epochs, "stop_reason": reasons[r],
            "best_epoch": stoppers[r].best_epoch if stoppers[r] else None,
            "n_devices": 1, "n_processes": 1, "platform": jax.devices()[0].platform,
            "replicates": n,
        }
        results.append(FittedModel(
            model=model, guide=guide, params=_all_params(svi, kept), registry=data.registry,
            history=history, train_index=train_idx, validation_index=val_idx, seed=seed,
            diverged=diverged[r], interrupted=reasons[r] == "interrupted"))
    return results


def _replicated_validation(svi, model, data, val_idx, keys, chunk=4096):
    """Per-cell validation loss (-ELBO) of every replicate, ``(R,)``: the driver's
    validation (same chunks, same key per replicate) vmapped over the states."""
    batches = list(EvaluationBatches(data.subset(val_idx), chunk))
    elbo = model.elbo()
    loss = jax.jit(jax.vmap(
        lambda state, key, batch: elbo.loss(key, _all_params(svi, state), svi.model, svi.guide,
                                            batch),
        in_axes=(0, 0, None)))
    keys = jnp.stack(keys)

    def validate(state):
        # Summed in float64 on the host, as the single-fit validation sums its floats.
        total = np.zeros(len(keys))
        for batch in batches:
            total += np.asarray(loss(state, keys, batch), np.float64)
        return total / len(val_idx)

    return validate


def procrustes_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - disparity`` after the best rotation/scaling of ``b`` onto ``a``; 1 = same up to rotation.

    Latent spaces of separate fits are identified only up to rotation (and
    sign), so this is the natural seed-stability score for ``(n_cells, K)`` latents.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")  # a diverged replicate: no latent to compare
    if np.ptp(a, axis=0).max() == 0 or np.ptp(b, axis=0).max() == 0:
        return 0.0  # a collapsed replicate (every cell at one point) shares no structure
    _, _, disparity = procrustes(a, b)
    return float(1.0 - disparity)


def replicate_stability(latents: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean, min and max Procrustes similarity over all pairs of replicate latents.

    A collapsed replicate scores 0 with every other; pairs with a diverged
    (non-finite) replicate are left out and counted in ``n_pairs_skipped``.
    """
    scores = np.array([procrustes_similarity(a, b)
                       for a, b in itertools.combinations(latents, 2)])
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        nan = float("nan")
        return {"mean": nan, "min": nan, "max": nan, "n_pairs": 0,
                "n_pairs_skipped": int(scores.size)}
    return {"mean": float(finite.mean()), "min": float(finite.min()),
            "max": float(finite.max()), "n_pairs": int(finite.size),
            "n_pairs_skipped": int(scores.size - finite.size)}
