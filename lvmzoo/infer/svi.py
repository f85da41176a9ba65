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

from lvmzoo.data.registry import CellData
from lvmzoo.data.source import DeviceSource
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
    initial_params: Optional[Any] = None,
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
      initial_params: a warm start: constrained params and Flax state keyed
        by site name (e.g. ``"encoder$params"``, ``"encoder$state"``), or a
        :class:`FittedModel` (its ``params``; its genes and batches must be
        ``data``'s).  Each must be a site of ``model`` with the shape it would
        initialise; sites not given start as usual.

    Returns:
      A :class:`FittedModel` with constrained parameters and the loss history
      (losses are negative ELBOs in nats per cell).

    Raises:
      FitDivergedError: the loss became NaN/inf; ``err.result`` holds the last
        finite parameters.
    """
    check_data_kind(model, data)
    if isinstance(initial_params, FittedModel):
        initial_params = _params_for(initial_params, data)
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
    train = DeviceSource(data.subset(train_idx))
    batch_size = min(batch_size, train.n_cells)
    steps_per_epoch = train.n_cells // batch_size

    svi = SVI(model.model, guide, optimizer, loss=model.elbo())
    key_init, key_shuffle, key_validation = jax.random.split(jax.random.PRNGKey(seed), 3)
    state = initial_state(svi, model, train, batch_size, key_init, initial_params)
    run_epoch = epoch_function(svi, train, guard=False)

    order_shape = jax.ShapeDtypeStruct((steps_per_epoch, batch_size), jnp.int32)
    started = time.perf_counter()
    epoch_program = jax.jit(run_epoch).lower(
        state, order_shape, train.arrays, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    # Held-out cells have no per-cell guide params (lvmzoo.infer.guides.refit_local
    # fits them after training), so such guides report no validation loss.
    per_cell = getattr(guide, "per_cell", False)
    validate = None if per_cell else _validation_program(svi, model, data, val_idx, key_validation)
    if validate:
        validate(state)  # compile it now, so epoch times exclude compilation
    compile_seconds = time.perf_counter() - started

    history = {"epoch": [], "loss": [], "validation_loss": [], "seconds": []}
    best = (math.inf, state, 0)
    last_epoch = None  # (start state, order, epoch) of the previous epoch, for replay
    result = lambda st, **kw: FittedModel(
        model=model, guide=guide, params=_all_params(svi, st), registry=data.registry,
        history={**history, "compile_seconds": compile_seconds, "steps_per_epoch":
                 steps_per_epoch, "batch_size": batch_size, "n_train": train.n_cells},
        train_index=train_idx, validation_index=val_idx, seed=seed, **kw)
    bar = tqdm(range(epochs), desc=f"fit {model.name}", disable=not progress, unit="epoch")
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            order = epoch_order(key_shuffle, epoch, train.n_cells, steps_per_epoch, batch_size)
            new_state, losses = epoch_program(state, order, train.arrays, jnp.float32(epoch))
            finite = np.isfinite(np.asarray(losses))
            if not finite.all():
                failed_step = int(np.argmin(finite))
                good = _last_finite_state(svi, train, (state, order, epoch), last_epoch,
                                          failed_step)
                message = _divergence_message(model, epoch, failed_step, learning_rate)
                raise FitDivergedError(message, result(good, diverged=message))
            last_epoch = (state, order, epoch)
            state = new_state
            val_loss = validate(state) if validate else float("nan")
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


def initial_params_of(model: LatentModel, data: CellData, *, batch_size: int = 128,
                      seed: int = 0, initial_params: Optional[Any] = None) -> dict[str, Any]:
    """The constrained params and Flax state a fit of ``model`` to ``data`` starts from.

    What :func:`fit` with the default guide, ``seed`` and ``initial_params``
    initialises before its first step (nothing is compiled), e.g. to build
    ``initial_params`` for a changed model or to check a warm start.
    """
    check_data_kind(model, data)
    if isinstance(initial_params, FittedModel):
        initial_params = _params_for(initial_params, data)
    svi = SVI(model.model, model.guide, optax.identity(), loss=model.elbo())
    key_init = jax.random.split(jax.random.PRNGKey(seed), 3)[0]
    source = DeviceSource(data)
    state = initial_state(svi, model, source, min(batch_size, source.n_cells), key_init,
                          initial_params)
    return _all_params(svi, state)


def initial_state(svi, model, source, batch_size, key, initial_params=None):
    """``svi.init`` on a first minibatch, with the model's data-dependent start values
    and then ``initial_params`` (checked against the sites the model initialises)."""
    first = source.gather(source.arrays, jnp.arange(min(source.n_cells, 2048)))
    batch = source.gather(source.arrays, jnp.arange(batch_size))
    start = model.init_params(first.replace(n_cells=first.size), key)
    if initial_params:
        fresh = jax.eval_shape(lambda k: _all_params(svi, svi.init(k, batch, init_params=start)),
                               key)
        _check_initial_params(initial_params, fresh, model)
        # New containers: Flax updates its state dicts in place, never the caller's.
        initial_params = jax.tree.map(jnp.asarray, initial_params)
        start = {**(start or {}), **initial_params}
    state = svi.init(key, batch, init_params=start)
    if initial_params and state.mutable_state:
        # svi.init ran the networks once in training mode, which moved batch-norm statistics.
        given = {k: v for k, v in initial_params.items() if k in state.mutable_state}
        state = state._replace(mutable_state={**state.mutable_state, **given})
    return state


def _check_initial_params(initial, fresh, model) -> None:
    """ValueError unless every entry of ``initial`` matches a site of ``fresh`` in structure and shape."""
    unknown = sorted(set(initial) - set(fresh))
    if unknown:
        raise ValueError(f"initial_params has entries {model.name} does not have: "
                         f"{', '.join(unknown)} (its sites: {', '.join(sorted(fresh))})")
    for name, value in initial.items():
        given = jax.tree.map(jnp.shape, value)
        expected = jax.tree.map(lambda leaf: leaf.shape, fresh[name])
        if given != expected:
            raise ValueError(
                f"initial_params[{name!r}] does not match {model.name}'s site: shapes "
                f"{given} vs {expected}; warm start from a model with the same architecture, "
                "genes and batches")


def _params_for(fitted: FittedModel, data: CellData) -> dict:
    """A fitted model's params, after checking it was fitted to ``data``'s genes and batches."""
    mine, theirs = data.registry, fitted.registry
    for what in ("gene_names", "batch_categories"):
        if tuple(getattr(mine, what)) != tuple(getattr(theirs, what)):
            raise ValueError(
                f"initial_params: the {fitted.model.name} model was fitted to other "
                f"{what.replace('_', ' ')} than the data's; warm start from a model fitted "
                "to these genes and batches (register the same AnnData)")
    return fitted.params


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
        steps = jnp.arange(order.shape[0], dtype=jnp.int32)
        return jax.lax.scan(step, init, (steps, order))

    return run_guarded_epoch if guard else run_epoch


def _last_finite_state(svi, source, this_epoch, last_epoch, failed_step):
    """The last state whose loss was finite, by replaying an epoch with the guard on.

    ``this_epoch`` / ``last_epoch``: ``(start state, order, epoch)`` of the
    failed epoch and of the one before (``None`` if there was none).  The loss
    at step ``i`` is that of the state before step ``i``; so a failure at step
    ``i > 0`` is resolved within this epoch, and one at step 0 by the last
    step of the previous epoch.
    """
    if failed_step == 0:
        if last_epoch is None:
            return this_epoch[0]  # the initial state already had a non-finite loss
        this_epoch = last_epoch
    state, order, epoch = this_epoch
    guarded = jax.jit(epoch_function(svi, source, guard=True))
    carry, _ = guarded(state, state, order, source.arrays, jnp.float32(epoch))
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
    source = DeviceSource(data.subset(val_idx))
    chunks = [np.arange(i, min(i + chunk, len(val_idx))) for i in range(0, len(val_idx), chunk)]
    batches = [source.full_batch(c) for c in chunks]
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
