"""Many fits in one compiled program: replicate fits over seeds with ``jax.vmap``.

``fit_replicates(model, data, seeds)`` runs the driver's own epoch program
(:func:`lvmzoo.infer.svi.epoch_function`) vmapped over a leading replicate
axis of the SVI state and of the shuffling order, so ``R`` replicates share one
compilation and one pass over the data per step.  Replicate ``r`` follows the
random stream of ``fit(model, data, seed=seeds[r], validation_fraction=0)``:
the same start, minibatches and draws, so the same fit up to float32 rounding
(parameters agree to about 1e-5: the vmapped program orders its reductions
differently, not bit for bit).
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI
from scipy.spatial import procrustes
from tqdm import tqdm

from lvmzoo.data.registry import CellData
from lvmzoo.data.source import DeviceSource, n_steps_per_epoch
from lvmzoo.infer.guides import NamedGuide, make_guide
from lvmzoo.infer.results import FittedModel
from lvmzoo.infer.svi import (
    _all_params,
    _divergence_message,
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
    """Fit ``len(seeds)`` replicates of ``model`` at once (no validation split).

    Args:
      model, data, guide, learning_rate, epochs, batch_size, progress: as in
        :func:`lvmzoo.fit`.
      seeds: one seed per replicate.

    Returns:
      One :class:`FittedModel` per seed.  A replicate whose loss became
      non-finite keeps its last finite parameters and has ``diverged`` set;
      the others carry on.
    """
    check_data_kind(model, data)
    learning_rate = model.default_learning_rate if learning_rate is None else learning_rate
    guide = model.guide if guide is None else guide
    if isinstance(guide, str):  # a name, as fit() takes it: "mean_field", "low_rank", ...
        guide = make_guide(guide, model)
    if isinstance(guide, NamedGuide):
        guide = make_guide(guide.name, model, **guide.options)  # owned by these fits
        guide.training_cells = np.asarray(data.obs_names)  # rows of per-cell params
    source = DeviceSource(data)
    batch_size = min(batch_size, source.n_cells)
    steps_per_epoch = n_steps_per_epoch(source.n_cells, batch_size)
    svi = SVI(model.model, guide, optax.adam(learning_rate), loss=model.elbo())

    keys = [jax.random.split(jax.random.PRNGKey(seed), 3) for seed in seeds]
    states = [initial_state(svi, model, source, batch_size, k[0]) for k in keys]
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    run_epochs = jax.vmap(epoch_function(svi, source), in_axes=(0, 0, 0, None, None, None))

    started = time.perf_counter()
    orders_shape = jax.ShapeDtypeStruct((len(seeds), steps_per_epoch, batch_size), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    program = jax.jit(run_epochs).lower(
        state, state, orders_shape, source.arrays, scalar, scalar).compile()
    compile_seconds = time.perf_counter() - started

    previous = state
    losses, seconds, diverged = [], [], [None] * len(seeds)
    for epoch in tqdm(range(epochs), desc=f"fit {len(seeds)} × {model.name}",
                      disable=not progress, unit="epoch"):
        t0 = time.perf_counter()
        orders = jnp.stack([
            epoch_order(k[1], epoch, source.n_cells, steps_per_epoch, batch_size) for k in keys
        ])
        carry, epoch_losses = program(previous, state, orders, source.arrays, jnp.float32(epoch),
                                      jnp.float32(epochs))
        previous, state = carry.previous, carry.state
        for r, step in enumerate(np.asarray(carry.failed_step)):
            if step >= 0 and diverged[r] is None:
                diverged[r] = _divergence_message(model, epoch, int(step), learning_rate)
        losses.append(np.asarray(jnp.mean(epoch_losses, axis=1)) / source.n_cells)
        seconds.append(time.perf_counter() - t0)

    losses = np.asarray(losses).reshape(-1, len(seeds))
    results = []
    for r, seed in enumerate(seeds):
        # A diverged replicate is frozen; its ``previous`` is the last finite state.
        chosen = previous if diverged[r] else state
        params = jax.tree.map(lambda leaf: leaf[r], _all_params(svi, chosen))
        history = {
            "epoch": list(range(epochs)), "loss": losses[:, r].tolist(),
            "validation_loss": [float("nan")] * epochs, "seconds": seconds,
            "compile_seconds": compile_seconds, "steps_per_epoch": steps_per_epoch,
            "batch_size": batch_size, "n_train": source.n_cells, "replicates": len(seeds),
        }
        results.append(FittedModel(
            model=model, guide=guide, params=params, registry=data.registry, history=history,
            train_index=np.arange(data.n_cells), validation_index=np.arange(0), seed=seed,
            diverged=diverged[r],
        ))
    return results


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
