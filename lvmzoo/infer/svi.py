"""The one SVI driver every zoo model trains through.

One epoch is one compiled program: ``lax.scan`` over a ``(n_steps, batch_size)``
matrix of shuffled cell indices, each step gathering its minibatch from arrays
already on the device and taking a NumPyro ``SVI.update``.  The program is
compiled once ahead of time, so epochs never retrace.

Divergence costs nothing while a fit is healthy: the epoch program carries no
per-step guard (selecting between two copies of every parameter and optimiser
moment at every step costs ~10% of an scVI step).  When an epoch returns a
non-finite loss, the driver replays that epoch (or the one before, if the
very first step failed) from its saved start state with a guarded program,
compiled only then, which freezes the parameters at the first non-finite
loss; replay is exact because an epoch is a pure function of its start state,
cell order and epoch number.  The last parameters whose loss was finite are
returned inside :class:`FitDivergedError`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI
from tqdm import tqdm  # plain bars: tqdm.auto warns in Jupyter without ipywidgets

from lvmzoo.data.placement import Devices, Placement
from lvmzoo.data.registry import CellData
from lvmzoo.data.streaming import BlockShuffle, EvaluationBatches, make_source
from lvmzoo.infer.guides import NamedGuide, default_learning_rate, make_guide
from lvmzoo.infer.results import FittedModel
from lvmzoo.models.base import LatentModel


class FitDivergedError(RuntimeError):
    """The loss became NaN/inf; ``.result`` holds the last finite parameters."""

    def __init__(self, message: str, result: FittedModel):
        super().__init__(message)
        self.result = result


class _Carry(NamedTuple):
    previous: Any  # SVIState one step back: restored if the current one diverges
    state: Any  # SVIState
    failed_step: jax.Array  # () int32, -1 while every loss has been finite


def fit(
    model: LatentModel,
    data: CellData,
    *,
    guide: Optional[Callable] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: Optional[float] = None,
    epochs: int = 100,
    batch_size: int = 128,
    seed: int = 0,
    validation_fraction: float = 0.0,
    early_stopping_patience: Optional[int] = None,
    progress: bool = True,
    devices: Devices = None,
    shuffle: Optional[BlockShuffle] = None,
) -> FittedModel:
    """Fit ``model`` to ``data`` by stochastic variational inference.

    Args:
      model: a zoo model (any :class:`~lvmzoo.models.base.LatentModel`).
      data: validated cells from :func:`lvmzoo.data.setup_anndata`.
      guide: variational family; ``None`` uses ``model.guide``; a name from
        :data:`lvmzoo.infer.guides.GUIDES` (e.g. ``"mean_field"``) is built by
        :func:`~lvmzoo.infer.guides.make_guide`.  Joint families need
        ``batch_size >=`` the number of training cells.
      optimizer: an optax transformation; default ``optax.adam(learning_rate)``.
      learning_rate: default ``model.default_learning_rate`` (capped for
        guide families that need smaller steps, see
        :func:`lvmzoo.infer.guides.default_learning_rate`).
      epochs: passes over the training cells; each is one compiled call.
      batch_size: cells per step (capped at the number of training cells); the
        last incomplete minibatch of each shuffled epoch is dropped.
      seed: the fit is bit-for-bit reproducible on CPU for a given seed.
      validation_fraction: share of cells held out; their ELBO is reported
        per epoch (``history["validation_loss"]``).
      early_stopping_patience: stop after this many epochs without a better
        validation loss and keep the best parameters.
      progress: show a progress bar (loss, cells/s) per epoch.
      devices: ``None`` (one device; every device of every process once
        ``jax.distributed`` is initialised), a number of devices, ``"all"``
        or a 1-D :class:`jax.sharding.Mesh` with axis ``"cells"``.  Each
        minibatch of ``batch_size`` cells is split over the devices and
        parameters are replicated (see :mod:`lvmzoo.data.placement`); a
        ``batch_size`` that does not divide by the number of devices is
        rounded down to a multiple of it, with a warning.  The cell order does
        not depend on the devices, so the fit is the one-device fit up to
        floating-point reduction order.
      shuffle: the cell order of each epoch: ``None`` shuffles all cells in
        memory and uses :class:`~lvmzoo.data.streaming.BlockShuffle` for
        cells on disk (``data.is_backed``), which are then streamed from the
        file chunk by chunk; a ``BlockShuffle`` gives in-memory data the same
        order as on disk.

    Returns:
      A :class:`FittedModel` with constrained parameters and the loss history
      (losses are negative ELBOs in nats per cell).

    Raises:
      FitDivergedError: the loss became NaN/inf; ``err.result`` holds the last
        finite parameters.
    """
    check_data_kind(model, data)
    guide = model.guide if guide is None else guide
    if isinstance(guide, str):
        guide = make_guide(guide, model)
    if isinstance(guide, NamedGuide):
        # A new one, owned by this fit: autoguides take their shapes from it.
        guide = make_guide(guide.name, model, **guide.options)
    if learning_rate is None:
        learning_rate = default_learning_rate(guide, model)
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    train_idx, val_idx = _split(data.n_cells, validation_fraction, seed)
    if isinstance(guide, NamedGuide):
        guide.training_cells = np.asarray(data.obs_names)[train_idx]  # rows of per-cell params
    placement = Placement.create(devices)
    if shuffle is None and data.is_backed:
        shuffle = BlockShuffle()
    # Without a validation split the training cells are all cells: no copy of them.
    train = make_source(data.subset(train_idx) if len(val_idx) else data, placement, shuffle)
    batch_size = placement.global_batch_size(min(batch_size, train.n_cells))
    steps_per_epoch = train.n_cells // batch_size

    svi = SVI(model.model, guide, optimizer, loss=model.elbo())
    key_init, key_shuffle, key_validation = jax.random.split(jax.random.PRNGKey(seed), 3)
    state = placement.replicate(initial_state(svi, model, train, batch_size, key_init))
    run_epoch = epoch_function(svi, train, guard=False)

    started = time.perf_counter()
    epoch_programs = {
        n_steps: placement.jit(run_epoch).lower(
            state, spec, train.arrays, jax.ShapeDtypeStruct((), jnp.float32)).compile()
        for n_steps, spec in train.chunk_specs(steps_per_epoch, batch_size).items()}
    # Held-out cells have no per-cell guide params (lvmzoo.infer.guides.refit_local
    # fits them after training), so such guides report no validation loss.
    per_cell = getattr(guide, "per_cell", False)
    validate = None if per_cell else _validation_program(svi, model, data, val_idx, key_validation)
    if validate:
        validate(placement.local(state))  # compile it now, so epoch times exclude compilation
    compile_seconds = time.perf_counter() - started

    def cell_order(epoch):
        if shuffle is None:
            return epoch_order(key_shuffle, epoch, train.n_cells, steps_per_epoch, batch_size)
        return shuffle.order(key_shuffle, epoch, train.n_cells, steps_per_epoch, batch_size)

    history = {"epoch": [], "loss": [], "validation_loss": [], "seconds": []}
    best = (math.inf, state, 0)
    last_epoch = None  # (start state, order, epoch) of the previous epoch, for replay
    result = lambda st, **kw: FittedModel(
        model=model, guide=guide, params=_all_params(svi, placement.local(st)),
        registry=data.registry,
        history={**history, "compile_seconds": compile_seconds, "steps_per_epoch":
                 steps_per_epoch, "batch_size": batch_size, "n_train": train.n_cells,
                 **placement.describe()},
        train_index=train_idx, validation_index=val_idx, seed=seed, **kw)
    bar = tqdm(range(epochs), desc=f"fit {model.name}", unit="epoch",
               disable=not progress or not placement.is_lead_process)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            order = cell_order(epoch)
            new_state, losses = run_chunks(epoch_programs, state, train.epoch_inputs(order),
                                           train.arrays, epoch)
            finite = np.isfinite(np.asarray(losses))
            if not finite.all():
                failed_step = int(np.argmin(finite))
                good = _last_finite_state(svi, train, (state, order, epoch), last_epoch,
                                          failed_step, placement)
                message = _divergence_message(model, epoch, failed_step, learning_rate)
                raise FitDivergedError(message, result(good, diverged=message))
            last_epoch = (state, order, epoch)
            state = new_state
            val_loss = validate(placement.local(state)) if validate else float("nan")
            seconds = time.perf_counter() - t0
            history["epoch"].append(epoch)
            history["loss"].append(float(jnp.mean(losses)) / train.n_cells)
            history["validation_loss"].append(val_loss)
            history["seconds"].append(seconds)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}",
                            val=f"{val_loss:.4g}",
                            cells_per_s=f"{steps_per_epoch * batch_size / seconds:.3g}")
            if early_stopping_patience is not None and validate:
                if val_loss < best[0]:
                    best = (val_loss, state, epoch)
                elif epoch - best[2] >= early_stopping_patience:
                    state = best[1]
                    break
    except KeyboardInterrupt:
        warnings.warn(f"fit interrupted; keeping the parameters of epoch {len(history['epoch'])}")
        return result(state, interrupted=True)
    finally:
        bar.close()
    return result(state)


def initial_state(svi, model, source, batch_size, key):
    """``svi.init`` on a first minibatch, with the model's data-dependent start values."""
    first = source.head(min(source.n_cells, 2048))
    return svi.init(
        key,
        source.head(batch_size),
        init_params=model.init_params(first.replace(n_cells=first.size), key),
    )


def run_chunks(programs, state, chunks, arrays, epoch):
    """One epoch fed as chunks of step inputs: ``(state after it, (n_steps,) losses)``.

    ``programs`` maps a chunk's number of steps to its compiled epoch program;
    in-memory data is one chunk (the epoch's cell order), streamed data one
    chunk per few steps, read while the previous one trains.
    """
    losses = []
    for inputs in chunks:
        n_steps = jax.tree.leaves(inputs)[0].shape[0]
        state, chunk_losses = programs[n_steps](state, inputs, arrays, jnp.float32(epoch))
        if losses:
            # Dispatch is asynchronous: without this wait the host would queue
            # (and hold in memory) every chunk of the epoch ahead of the device.
            losses[-1].block_until_ready()
        losses.append(chunk_losses)
    return state, jnp.concatenate(losses) if len(losses) > 1 else losses[0]


def epoch_function(svi, source, guard: bool = True):
    """The program of one epoch: one ``svi.update`` per row of ``order``, inside ``lax.scan``.

    ``order`` is ``(n_steps, batch_size)`` cell indices.

    * ``guard=False``: ``run_epoch(state, order, arrays, epoch) -> (state, losses)``.
    * ``guard=True``: ``run_epoch(previous, state, order, arrays, epoch) ->
      (_Carry, losses)``; after the first non-finite loss the parameters stop
      changing and ``previous`` keeps the last state whose loss was finite.
    """

    def update(state, arrays, index, epoch):
        return svi.update(state, source.gather(arrays, index).replace(epoch=epoch))

    def run_epoch(state, order, arrays, epoch):
        return jax.lax.scan(lambda st, index: update(st, arrays, index, epoch), state, order)

    def run_guarded_epoch(previous, state, order, arrays, epoch):
        def step(carry, xs):
            i, index = xs
            new_state, loss = update(carry.state, arrays, index, epoch)
            ok = jnp.isfinite(loss) & (carry.failed_step < 0)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            failed = jnp.where(ok | (carry.failed_step >= 0), carry.failed_step, i)
            return _Carry(keep(carry.state, carry.previous), keep(new_state, carry.state),
                          failed), loss

        init = _Carry(previous, state, jnp.array(-1, jnp.int32))
        steps = jnp.arange(jax.tree.leaves(order)[0].shape[0], dtype=jnp.int32)
        return jax.lax.scan(step, init, (steps, order))

    return run_guarded_epoch if guard else run_epoch


def _last_finite_state(svi, source, this_epoch, last_epoch, failed_step, placement=None):
    """The last state whose loss was finite, by replaying an epoch with the guard on.

    ``this_epoch`` / ``last_epoch``: ``(start state, order, epoch)`` of the
    failed epoch and of the one before (``None`` if there was none).  The loss
    at step ``i`` is that of the state before step ``i``; so a failure at step
    ``i > 0`` is resolved within this epoch, and one at step 0 by the last
    step of the previous epoch.  A streamed epoch is replayed chunk by chunk
    (read again from disk) until the chunk where the loss failed.
    """
    if failed_step == 0:
        if last_epoch is None:
            return this_epoch[0]  # the initial state already had a non-finite loss
        this_epoch = last_epoch
    state, order, epoch = this_epoch
    guarded = (placement or Placement()).jit(epoch_function(svi, source, guard=True))
    previous = state
    for inputs in source.epoch_inputs(order):
        carry, _ = guarded(previous, state, inputs, source.arrays, jnp.float32(epoch))
        if int(carry.failed_step) >= 0:
            break
        previous, state = carry.previous, carry.state
    return carry.previous


def epoch_order(key, epoch, n_cells, steps_per_epoch, batch_size):
    """This epoch's shuffled cell indices, ``(steps_per_epoch, batch_size)`` int32."""
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n_cells)
    if batch_size == n_cells:
        # A full batch: a plate that does not subsample does not index per-cell
        # params by batch.index either, so the cells must stay in order.
        order = jnp.arange(n_cells)
    return order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(jnp.int32)


def check_data_kind(model, data):
    """Raise ValueError if ``model`` cannot be fitted to data of this kind and transform."""
    if model.data_kind == "counts" and (data.registry.kind != "counts" or data.registry.transform != "none"):
        raise ValueError(
            f"{model.name} models raw counts but the data were registered as "
            f"kind={data.registry.kind!r}, transform={data.registry.transform!r}; "
            "register raw counts with transform='none'"
        )
    if model.data_kind == "binary" and data.registry.kind != "binary":
        raise ValueError(f"{model.name} models binary data; register it with kind='binary'")


def _split(n_cells, validation_fraction, seed):
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = np.random.default_rng(seed).permutation(n_cells)
    n_val = int(round(validation_fraction * n_cells))
    if n_cells - n_val < 1:
        raise ValueError("no training cells left; lower validation_fraction")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _validation_program(svi, model, data, val_idx, key, chunk=4096):
    """Per-cell validation loss (-ELBO), compiled once per chunk shape."""
    if len(val_idx) == 0:
        return None
    batches = EvaluationBatches(data.subset(val_idx), chunk)
    if not data.is_backed:
        batches = list(batches)  # kept on the device; cells on disk are read again each time
    elbo = model.elbo()
    loss = jax.jit(
        lambda state, batch: elbo.loss(key, _all_params(svi, state), svi.model, svi.guide, batch)
    )

    def validate(state):
        return sum(float(loss(state, b)) for b in batches) / len(val_idx)

    return validate


def _all_params(svi, state):
    """Constrained params plus mutable state (e.g. Flax batch-norm statistics)."""
    return {**svi.get_params(state), **(state.mutable_state or {})}


def _divergence_message(model, epoch, step, learning_rate):
    return (
        f"{model.name}: the loss became NaN/inf at epoch {epoch}, step {step}; "
        "the parameters from the last step with a finite loss were kept. "
        f"Try a lower learning rate (now {learning_rate:g}), a larger batch size, "
        "or check the data for extreme values."
    )
