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

import contextlib
import contextvars
import dataclasses
import functools
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

from lvmzoo.cache import UNOPTIMISED_COMPILER_OPTIONS
from lvmzoo.data.placement import Devices, Placement
from lvmzoo.data.registry import CellData
from lvmzoo.data.source import DeviceSource, epoch_steps, n_steps_per_epoch
from lvmzoo.data.streaming import BlockShuffle, EvaluationBatches, make_source
from lvmzoo.infer.guides import (NamedGuide, default_learning_rate, make_guide, set_up_guide,
                                 shape_trace)
from lvmzoo.infer.results import FittedModel
from lvmzoo.models.base import LatentModel


# Relative improvement of the validation loss that counts (see ``fit``).
EARLY_STOPPING_TOLERANCE = 1e-4

_EPOCHS_IN_ONE_PROGRAM = contextvars.ContextVar("lvmzoo_epochs_in_one_program", default=False)


@contextlib.contextmanager
def epochs_in_one_program():
    """Inside it, a fit with nothing to look at between epochs runs them all in one program.

    That is a fit without a validation split or progress bar, cells in memory on one
    device: one call instead of one per epoch, each with its host-side work (cell
    order, loss, history), which for short epochs costs more than the epoch itself
    (:func:`lvmzoo.infer.guides.refit_local` of a joint guide: 2,000 one-step epochs).
    The cell orders are the same; the parameters agree up to float rounding
    (bit for bit for most guides).  Not for fits in general: Ctrl-C then keeps
    nothing of the fit, and a non-finite loss costs the fit again, epoch by epoch,
    to find the last finite parameters.
    """
    token = _EPOCHS_IN_ONE_PROGRAM.set(True)
    try:
        yield
    finally:
        _EPOCHS_IN_ONE_PROGRAM.reset(token)


_FIT_COMPILER_OPTIONS = contextvars.ContextVar("lvmzoo_fit_compiler_options", default=None)


@contextlib.contextmanager
def fits_compiled_with(options: Optional[dict]):
    """Inside it, :func:`fit` compiles its programs (the epochs, validation) with XLA
    compiler ``options`` (e.g. ``{"xla_backend_optimization_level": 0}``).

    For fits where compiling is nearly all the time (a few epochs on a few dozen
    cells, as :func:`lvmzoo.testing.check_model` runs): LLVM without its
    optimisations compiles in about half the time and runs a little slower.
    """
    token = _FIT_COMPILER_OPTIONS.set(options)
    try:
        yield
    finally:
        _FIT_COMPILER_OPTIONS.reset(token)


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
    epochs: Optional[int] = None,
    batch_size: int = 128,
    seed: int = 0,
    validation_fraction: float = 0.0,
    early_stopping: Optional[bool] = None,
    early_stopping_patience: Optional[int] = None,
    early_stopping_tolerance: float = EARLY_STOPPING_TOLERANCE,
    progress: bool = True,
    devices: Devices = None,
    shuffle: Optional[BlockShuffle] = None,
    initial_params: Optional[Any] = None,
    replicates: Optional[int] = None,
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
      epochs: the most passes over the training cells; each is one compiled
        call.  ``None``: ``model.default_epochs(n_training_cells)`` (for the
        deep models scvi-tools' rule ``min(round(20000 / n * 400), 400)``; a
        few dozen for the classical models, which start from a data-driven
        solution).
      batch_size: cells per step (capped at the number of training cells).  An
        epoch trains every cell: ``ceil(n / batch_size)`` steps, the last
        minibatch topped up with the epoch's first cells
        (:func:`lvmzoo.data.source.n_steps_per_epoch`).
      seed: the fit is bit-for-bit reproducible on CPU for a given seed.
      validation_fraction: share of cells held out; their ELBO is reported
        per epoch (``history["validation_loss"]``).
      early_stopping: stop once the validation loss has not improved for
        ``early_stopping_patience`` epochs and keep the parameters of the best
        epoch.  ``None`` (default): on whenever there is a validation split.
      early_stopping_patience: epochs without improvement before stopping;
        ``None``: ``max(3, round(0.1 * epochs))`` (40 of scvi-tools' 400).
        Giving it turns early stopping on, as before.
      early_stopping_tolerance: an epoch improves on the best one when its
        validation loss is lower by more than this fraction of the best
        loss's magnitude (default 1e-4: 0.1 nats per cell at a loss of 1,000).
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
      initial_params: a warm start: constrained params and Flax state keyed
        by site name (e.g. ``"encoder$params"``, ``"encoder$state"``), or a
        :class:`FittedModel` (its ``params``; its genes and batches must be
        ``data``'s).  Each must be a site of ``model`` with the shape it would
        initialise; sites not given start as usual.
      replicates: ``R`` fits with seeds ``seed, ..., seed + R - 1`` in one
        vmapped program, returned as a
        :class:`~lvmzoo.infer.ensemble.FittedEnsemble` (every replicate holds
        out the same validation cells and stops early on its own; cells in
        memory, one device).  ``None`` (default): one fit.

    Returns:
      A :class:`FittedModel` with constrained parameters and the loss history
      (losses are negative ELBOs in nats per cell); ``history["stop_reason"]``
      says why the fit ended: ``"epoch_limit"`` (ran every epoch),
      ``"converged"`` (the validation loss stopped changing),
      ``"early_stopping"`` (it rose: the model began to overfit; in both
      cases the best epoch's parameters are kept, ``history["best_epoch"]``),
      ``"interrupted"`` or ``"diverged"``.

    Raises:
      FitDivergedError: the loss became NaN/inf; ``err.result`` holds the last
        finite parameters.
    """
    if replicates is not None:
        if devices is not None or shuffle is not None:
            raise ValueError("replicates train on one device with the cells in memory; leave "
                             "out devices and shuffle")
        from lvmzoo.infer.ensemble import fit_ensemble

        return fit_ensemble(
            model, data, replicates=replicates, seed=seed, guide=guide, optimizer=optimizer,
            learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
            validation_fraction=validation_fraction, early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            early_stopping_tolerance=early_stopping_tolerance, progress=progress,
            initial_params=initial_params)
    check_data_kind(model, data)
    model = model.for_data(data)  # data-dependent settings (e.g. a category's code) resolved
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
    # The learning rate a divergence message may name: None when the caller's optimizer set it.
    stated_rate = learning_rate if optimizer is None else None
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    train_idx, val_idx = _split(data.n_cells, validation_fraction, seed)
    if isinstance(guide, NamedGuide):
        guide.training_cells = np.asarray(data.obs_names)[train_idx]  # rows of per-cell params
    placement = Placement.create(devices)
    if shuffle is None and data.is_backed:
        shuffle = BlockShuffle()
    # The training cells are read through their rows: the cells are not copied.
    train = make_source(data, placement, shuffle, rows=train_idx if len(val_idx) else None)
    batch_size = placement.global_batch_size(min(batch_size, train.n_cells))
    steps_per_epoch = n_steps_per_epoch(train.n_cells, batch_size)
    if epochs is None:
        epochs = model.default_epochs(train.n_cells)
    stopping = _EarlyStopping.from_options(
        early_stopping, early_stopping_patience, early_stopping_tolerance, epochs,
        has_validation=len(val_idx) > 0)

    svi = SVI(model.model, guide, optimizer, loss=model.elbo())
    if not isinstance(guide, NamedGuide):
        _refuse_per_cell_guide_params(guide, train.head(batch_size))
    key_init, key_shuffle, key_validation = jax.random.split(jax.random.PRNGKey(seed), 3)
    state = placement.replicate(
        initial_state(svi, model, train, batch_size, key_init, initial_params))
    run_epoch = epoch_function(svi, train, guard=False)

    started = time.perf_counter()
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    given = _FIT_COMPILER_OPTIONS.get()
    options = {"compiler_options": given} if given else {}  # see fits_compiled_with

    def compile_epoch_programs():
        return {n_steps: placement.jit(run_epoch).lower(
                    state, spec, train.arrays, scalar, scalar).compile(**options)
                for n_steps, spec in train.chunk_specs(steps_per_epoch, batch_size).items()}

    # Held-out cells have no per-cell guide params (lvmzoo.infer.guides.refit_local
    # fits them after training), so such guides report no validation loss.
    per_cell = getattr(guide, "per_cell", False)
    validate = None if per_cell else _validation_program(svi, model, data, val_idx,
                                                         key_validation, train, placement)
    if per_cell and len(val_idx):
        if stopping is not None:
            warnings.warn(
                f"the {guide.name!r} guide holds parameters for the training cells only, so the "
                f"{len(val_idx)} validation cells have no validation loss and early stopping is "
                "off (every epoch runs); their scores come from FittedModel.evaluate, which "
                "fits their local parameters after training", UserWarning, stacklevel=2)
        stopping = None
    whole_fit = None
    if (_EPOCHS_IN_ONE_PROGRAM.get() and epochs > 1 and validate is None and not progress
            and shuffle is None and isinstance(train, DeviceSource) and placement.mesh is None):
        whole_fit = jax.jit(whole_fit_function(svi, train, steps_per_epoch, batch_size)).lower(
            state, train.arrays, key_shuffle, jax.ShapeDtypeStruct((epochs,), jnp.int32),
            scalar).compile(**options)
    else:
        epoch_programs = compile_epoch_programs()
    if validate:
        validate(placement.local(state))  # compile it now, so epoch times exclude compilation
    compile_seconds = time.perf_counter() - started

    def cell_order(epoch):
        if shuffle is None:
            return epoch_order(key_shuffle, epoch, train.n_cells, steps_per_epoch, batch_size)
        return shuffle.order(key_shuffle, epoch, train.n_cells, steps_per_epoch, batch_size)

    history = {"epoch": [], "loss": [], "validation_loss": [], "seconds": []}
    last_epoch = None  # (start state, order, epoch) of the previous epoch, for replay
    result = lambda st, reason, **kw: FittedModel(
        model=model, guide=guide, params=_all_params(svi, placement.local(st)),
        registry=data.registry,
        history={**history, "compile_seconds": compile_seconds, "steps_per_epoch":
                 steps_per_epoch, "batch_size": batch_size, "n_train": train.n_cells,
                 "max_epochs": epochs, "stop_reason": reason,
                 "best_epoch": stopping.best_epoch if stopping else None,
                 **placement.describe()},
        train_index=train_idx, validation_index=val_idx, seed=seed, **kw)
    if whole_fit is not None:
        t0 = time.perf_counter()
        try:
            end_state, losses = whole_fit(state, train.arrays, key_shuffle,
                                          jnp.arange(epochs, dtype=jnp.int32), jnp.float32(epochs))
            losses = np.asarray(losses)  # (epochs, steps_per_epoch)
        except KeyboardInterrupt:
            warnings.warn("fit interrupted; keeping the initial parameters")
            return result(state, "interrupted", interrupted=True)
        if np.isfinite(losses).all():
            seconds = (time.perf_counter() - t0) / epochs
            for epoch, epoch_losses in enumerate(losses):
                # As the epoch-by-epoch loop averages them (the same reduction, bit for bit).
                mean = epoch_losses[0] if steps_per_epoch == 1 else jnp.mean(epoch_losses)
                history["epoch"].append(epoch)
                history["loss"].append(float(mean) / train.n_cells)
                history["validation_loss"].append(float("nan"))
                history["seconds"].append(seconds)
            return result(end_state, "epoch_limit")
        # A non-finite loss: the fit again, epoch by epoch, finds the last finite state.
        epoch_programs = compile_epoch_programs()
    bar = tqdm(range(epochs), desc=f"fit {model.name}", unit="epoch",
               disable=not progress or not placement.is_lead_process)
    reason = "epoch_limit"
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            order = cell_order(epoch)
            new_state, losses = run_chunks(epoch_programs, state, train.epoch_inputs(order),
                                           train.arrays, epoch, epochs)
            finite = np.isfinite(np.asarray(losses))
            if not finite.all():
                failed_step = int(np.argmin(finite))
                good = _last_finite_state(svi, train, (state, order, epoch, epochs), last_epoch,
                                          failed_step, placement)
                message = _divergence_message(model, epoch, failed_step, stated_rate)
                raise FitDivergedError(message, result(good, "diverged", diverged=message))
            last_epoch = (state, order, epoch, epochs)
            state = new_state
            val_loss = validate(placement.local(state)) if validate else float("nan")
            seconds = time.perf_counter() - t0
            history["epoch"].append(epoch)
            history["loss"].append(float(jnp.mean(losses)) / train.n_cells)
            history["validation_loss"].append(val_loss)
            history["seconds"].append(seconds)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}",
                            **({"val": f"{val_loss:.4g}"} if validate else {}),
                            cells_per_s=f"{steps_per_epoch * batch_size / seconds:.3g}")
            if stopping and validate and stopping.update(epoch, val_loss, state):
                state, reason = stopping.best_state, stopping.reason(val_loss)
                break
    except KeyboardInterrupt:
        warnings.warn(f"fit interrupted; keeping the parameters of epoch {len(history['epoch'])}")
        return result(state, "interrupted", interrupted=True)
    finally:
        bar.close()
    return result(state, reason)


@dataclasses.dataclass
class _EarlyStopping:
    """Tracks the best validation loss; says when ``patience`` epochs brought nothing."""

    patience: int
    tolerance: float
    best_loss: float = math.inf
    best_epoch: Optional[int] = None
    best_state: Any = None

    @classmethod
    def from_options(cls, enabled, patience, tolerance, epochs, has_validation):
        if patience is not None and patience < 1:
            raise ValueError(f"early_stopping_patience must be at least 1, got {patience}")
        if not tolerance >= 0:
            raise ValueError(f"early_stopping_tolerance must be >= 0, got {tolerance}")
        if enabled is None:  # default: on with a validation split (an explicit patience too)
            enabled = has_validation
        if not enabled or not has_validation:
            return None  # no validation cells: nothing to stop on
        patience = max(3, round(0.1 * epochs)) if patience is None else patience
        return cls(patience, tolerance)

    def update(self, epoch: int, loss: float, state) -> bool:
        """Record an epoch's validation loss; ``True`` when the fit should stop."""
        if loss < self.best_loss - self.tolerance * abs(self.best_loss) or self.best_epoch is None:
            self.best_loss, self.best_epoch, self.best_state = loss, epoch, state
        return epoch - self.best_epoch >= self.patience

    def reason(self, loss: float) -> str:
        """``"early_stopping"`` if the loss has risen above the best, else ``"converged"``."""
        worse = loss > self.best_loss + self.tolerance * abs(self.best_loss)
        return "early_stopping" if worse else "converged"


def stop_message(history: dict) -> str:
    """Why a fit ended, in words, e.g. ``"converged at epoch 12 (best epoch 7)"``."""
    n_epochs = len(history.get("epoch", []))
    reason = history.get("stop_reason", "epoch_limit")
    best = history.get("best_epoch")
    if reason == "converged":
        return f"converged at epoch {n_epochs} (validation loss flat; kept epoch {best + 1})"
    if reason == "early_stopping":
        return (f"early stopping at epoch {n_epochs} (validation loss rising; "
                f"kept epoch {best + 1})")
    if reason == "interrupted":
        return f"interrupted after {n_epochs} epochs"
    if reason == "diverged":
        return f"diverged in epoch {n_epochs + 1}"
    return f"reached the epoch limit ({n_epochs} epochs)"


# Programs run once on a minibatch (svi.init): compiled at LLVM's level 0 they take about
# two thirds of the time (SCANVI's init 4.3 -> 2.8 s on one core; 9 models x 2 guides
# 61 -> 53 s CPU).  The params come out the same bit for bit; batch-norm running
# statistics of the init's forward pass may differ in their last bit (reductions).
ONE_SHOT_COMPILER_OPTIONS = UNOPTIMISED_COMPILER_OPTIONS

# Cells × genes of the sample a model's data-dependent start values see (64 MiB float32).
INIT_SAMPLE_ELEMENTS = 1 << 24


def initial_params_of(model: LatentModel, data: CellData, *, batch_size: int = 128,
                      seed: int = 0, initial_params: Optional[Any] = None,
                      guide: Optional[Callable] = None) -> dict[str, Any]:
    """The constrained params and Flax state a fit of ``model`` to ``data`` starts from.

    What :func:`fit` with ``guide`` (default the model's own), ``seed`` and
    ``initial_params`` initialises before its first step (nothing is
    compiled), e.g. to build ``initial_params`` for a changed model, to check
    a warm start, or to see where a named guide's locations start.
    """
    check_data_kind(model, data)
    model = model.for_data(data)  # data-dependent settings (e.g. a category's code) resolved
    if isinstance(initial_params, FittedModel):
        initial_params = _params_for(initial_params, data)
    if guide is None:
        guide = model.guide
    elif isinstance(guide, (str, NamedGuide)):  # a new one, as fit builds: it takes data shapes
        guide = make_guide(guide if isinstance(guide, str) else guide.name, model,
                           **({} if isinstance(guide, str) else guide.options))
    svi = SVI(model.model, guide, optax.identity(), loss=model.elbo())
    key_init = jax.random.split(jax.random.PRNGKey(seed), 3)[0]
    source = DeviceSource(data)
    state = initial_state(svi, model, source, min(batch_size, source.n_cells), key_init,
                          initial_params)
    return _all_params(svi, state)


def initial_state(svi, model, source, batch_size, key, initial_params=None):
    """``svi.init`` on a first minibatch, with the model's data-dependent start values
    and then ``initial_params`` (checked against the sites the model initialises).

    The start values come from ``model.init_params`` (``init_params_per_cell``
    for a named guide with per-cell parameters, :func:`start_method`); their
    keys are checked and values of latent sample sites moved onto the guide's
    locations by :func:`start_params`.

    ``model.init_params`` sees a random sample of the training cells (all of
    them when ``n_cells * n_genes`` fits :data:`INIT_SAMPLE_ELEMENTS`, and at
    least 2,048; see the source's ``sample``), so data stored in some order
    (by sample, by cell type) still gives a representative start.
    """
    n_sample = min(source.n_cells, max(2048, INIT_SAMPLE_ELEMENTS // max(source.n_genes, 1)))
    key_sample, key_start = jax.random.split(key)
    sample = source.sample(n_sample, key_sample)
    batch = source.head(batch_size)
    method = start_method(svi, batch)
    start = getattr(model, method)(sample.replace(n_cells=sample.size), key_start)
    needs_shapes = bool(initial_params) or (isinstance(start, dict) and bool(start))
    fresh = initial_shapes(svi, batch, key) if needs_shapes else None
    start = start_params(svi, model, batch, start, method, fresh, key)
    if initial_params:
        _check_initial_params(initial_params, fresh, model)
        # New containers: Flax updates its state dicts in place, never the caller's.
        initial_params = jax.tree.map(jnp.asarray, initial_params)
        start = {**(start or {}), **initial_params}
    state = _svi_init(svi, key, batch, start)
    if initial_params and state.mutable_state:
        # svi.init ran the networks once in training mode, which moved batch-norm statistics.
        given = {k: v for k, v in initial_params.items() if k in state.mutable_state}
        state = state._replace(mutable_state={**state.mutable_state, **given})
    return state


def _svi_init(svi, key, batch, start):
    """``svi.init(key, batch, init_params=start)``, compiled as one program.

    Run as it is, ``svi.init`` executes the model and the guide operation by operation,
    compiling each operation on first use (scVI: ~40 small programs, several seconds
    before the first epoch).  Guides that set themselves up on their first call
    (autoguides, the named families) keep state from it, so they are set up first,
    outside the program (:func:`_set_up_guide`).
    """
    _set_up_guide(svi, batch, key)
    # Run once, on one minibatch: compiled without LLVM's optimisations (as the autoguide
    # setup, lvmzoo.infer.guides), which cost more than they save here.
    init = jax.jit(lambda k, b, p: svi.init(k, b, init_params=p))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((key, batch, start))):
        # Under a transformation (e.g. jax.eval_shape of initial_params_of): a program
        # compiled ahead of time cannot take tracers, so trace through the jitted function.
        return init(key, batch, start)
    program = init.lower(key, batch, start).compile(compiler_options=ONE_SHOT_COMPILER_OPTIONS)
    return program(key, batch, start)


def _set_up_guide(svi, batch, key) -> None:
    """Make a guide that sets itself up on its first call (an autoguide, a named family) do
    so now, outside any trace, with the key ``svi.init(key, ...)`` gives the guide: its
    start is then the one ``svi.init`` alone would draw."""
    from numpyro.infer.autoguide import AutoGuide

    if isinstance(svi.guide, (NamedGuide, AutoGuide)):
        set_up_guide(svi.guide, batch, jax.random.split(key, 3)[2])


class InitParamsError(ValueError):
    """A model's ``init_params`` (or ``init_params_per_cell``) names no site of the fit,
    or gives a value whose shape is not the site's."""


def start_method(svi, batch) -> str:
    """The model method whose start values a fit with ``svi``'s guide takes:
    ``"init_params_per_cell"`` for a named guide with per-cell parameters, else ``"init_params"``."""
    per_cell = isinstance(svi.guide, NamedGuide) and svi.guide.holds_per_cell_params(batch)
    return "init_params_per_cell" if per_cell else "init_params"


def initial_shapes(svi, batch, key) -> dict[str, Any]:
    """The params and Flax state ``svi.init(key, batch)`` gives, by shape (nothing is computed)."""
    # Not inside eval_shape, which would leave tracers in a guide set up there.
    _set_up_guide(svi, batch, key)
    return jax.eval_shape(lambda k: _all_params(svi, svi.init(k, batch)), key)


def start_params(svi, model, batch, start, method, fresh, key) -> Optional[dict]:
    """``start`` (what ``model.<method>`` returned) as ``svi.init``'s ``init_params``.

    Every key must name a site of the model or of a guide of it:

    * a ``numpyro.param`` site or Flax ``<name>$params`` / ``<name>$state``
      entry of the model or of ``svi``'s guide (in ``fresh``, the
      :func:`jax.eval_shape` of the initial params): kept;
    * a continuous global latent sample site of the model: under a named
      guide, converted to the guide's location params
      (:meth:`~lvmzoo.infer.guides.NamedGuide.start_params`); left to the
      guide's own start under a guide function, which has no location to set;
    * a param of the model's own guide while another guide replaces it:
      dropped (the default ``init_params_per_cell`` returns ``init_params``,
      which may start the model's encoder).

    Raises:
      InitParamsError: a key that names none of these (a misspelling), a
        per-cell latent site (the values are for the sample of cells the
        method saw, not the training cells), or a value of another shape.
    """
    if start is None:
        return None
    if not isinstance(start, dict):
        raise InitParamsError(f"{model.name}.{method} returned a {type(start).__name__}; it "
                              "must return a dict of start values keyed by site name, or None")
    problems = [_shape_problem(method, name, value, fresh[name])
                for name, value in start.items() if name in fresh]
    rest = {name: value for name, value in start.items() if name not in fresh}
    latents = _latent_site_shapes(model, batch, key) if rest else {}
    values = {}
    for name in sorted(set(rest) & set(latents)):
        shape, per_cell = latents[name]
        if per_cell:
            problems.append(f"{method} returns {name!r}, a per-cell latent site; its guide "
                            "starts it (init_params sees a sample of cells, not the training "
                            "cells); leave it out")
        elif tuple(np.shape(rest[name])) != shape:
            problems.append(f"{method}[{name!r}] has shape {tuple(np.shape(rest[name]))}, the "
                            f"sample site {shape}; return a value of the site's shape")
        else:
            values[name] = rest[name]
    unknown = sorted(set(rest) - set(latents))
    own_guide = {}
    if unknown and svi.guide != model.guide:
        own_guide = _param_shapes(model.guide, batch, key)
        problems += [_shape_problem(method, name, rest[name], own_guide[name])
                     for name in unknown if name in own_guide]
        unknown = [name for name in unknown if name not in own_guide]
    if unknown:
        valid = sorted(set(fresh) | set(own_guide)
                       | {name for name, (_, per_cell) in latents.items() if not per_cell})
        problems += [f"{method} returns {name!r}, which names no param or latent sample site "
                     f"of {model.name} or its guide{_closest_name(name, valid)}; name the "
                     f"numpyro.param or sample site it starts (valid names: {', '.join(valid)})"
                     for name in unknown]
    problems = [problem for problem in problems if problem]
    if problems:
        raise InitParamsError(f"{model.name}: " + "; ".join(problems))
    params = {name: value for name, value in start.items() if name in fresh}
    if values and isinstance(svi.guide, NamedGuide):
        # A key naming the guide's param itself (e.g. "<site>_auto_loc") wins over the site's.
        params = {**svi.guide.start_params(values, batch), **params}
    return params


def _shape_problem(method, name, value, expected) -> Optional[str]:
    """A sentence when ``value`` (a pytree for Flax entries) is not shaped like ``expected``."""
    given = [tuple(np.shape(leaf)) for leaf in jax.tree.leaves(value)]
    wanted = [tuple(leaf.shape) for leaf in jax.tree.leaves(expected)]
    if given == wanted:
        return None
    show = lambda shapes: shapes[0] if len(shapes) == 1 else shapes  # noqa: E731
    return (f"{method}[{name!r}] has shape {show(given)}, the site {show(wanted)}; return a "
            "value of the site's shape")


def _closest_name(name, names) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _abstract_trace(fn, batch, key):
    """The NumPyro trace of ``fn(batch)`` by shape only (:func:`jax.eval_shape`)."""
    return shape_trace(fn, batch, key)


def _latent_site_shapes(model, batch, key) -> dict[str, tuple[tuple, bool]]:
    """Continuous latent sample sites of ``model``: name -> (shape, whether per cell)."""
    sites = {}
    for name, site in _abstract_trace(model.model, batch, key).items():
        if (site["type"] == "sample" and not site["is_observed"]
                and not site["infer"].get("is_auxiliary")
                and site["infer"].get("enumerate") != "parallel"):
            per_cell = any(frame.name == "cells" for frame in site["cond_indep_stack"])
            sites[name] = (tuple(site["value"].shape), per_cell)
    return sites


def _param_shapes(fn, batch, key) -> dict[str, Any]:
    """Param and mutable (Flax state) sites of ``fn``, by shape."""
    return {name: site["value"] for name, site in _abstract_trace(fn, batch, key).items()
            if site["type"] in ("param", "mutable")}


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


def run_chunks(programs, state, chunks, arrays, epoch, n_epochs):
    """One epoch fed as chunks of step inputs: ``(state after it, (n_steps,) losses)``.

    ``programs`` maps a chunk's number of steps to its compiled epoch program;
    in-memory data is one chunk (the epoch's cell order), streamed data one
    chunk per few steps, read while the previous one trains.
    """
    losses = []
    for inputs in chunks:
        n_steps = jax.tree.leaves(inputs)[0].shape[0]
        state, chunk_losses = programs[n_steps](state, inputs, arrays, jnp.float32(epoch),
                                                jnp.float32(n_epochs))
        if losses:
            # Dispatch is asynchronous: without this wait the host would queue
            # (and hold in memory) every chunk of the epoch ahead of the device.
            losses[-1].block_until_ready()
        losses.append(chunk_losses)
    return state, jnp.concatenate(losses) if len(losses) > 1 else losses[0]


def epoch_function(svi, source, guard: bool = True):
    """The program of one epoch: one ``svi.update`` per row of ``order``, inside ``lax.scan``.

    ``order`` is ``(n_steps, batch_size)`` cell indices; ``epoch`` (0-based) and
    ``n_epochs`` (the fit's epochs) are ``()`` float32, passed on as
    ``Batch.epoch`` / ``Batch.n_epochs`` for schedules such as KL warm-up.

    * ``guard=False``: ``run_epoch(state, order, arrays, epoch, n_epochs) ->
      (state, losses)``.
    * ``guard=True``: ``run_epoch(previous, state, order, arrays, epoch, n_epochs) ->
      (_Carry, losses)``; after the first non-finite loss the parameters stop
      changing and ``previous`` keeps the last state whose loss was finite.
    """

    def update(state, arrays, index, epoch, n_epochs):
        batch = source.gather(arrays, index).replace(epoch=epoch, n_epochs=n_epochs)
        return svi.update(state, batch)

    def run_epoch(state, order, arrays, epoch, n_epochs):
        return jax.lax.scan(lambda st, index: update(st, arrays, index, epoch, n_epochs),
                            state, order)

    def run_guarded_epoch(previous, state, order, arrays, epoch, n_epochs):
        def step(carry, xs):
            i, index = xs
            new_state, loss = update(carry.state, arrays, index, epoch, n_epochs)
            ok = jnp.isfinite(loss) & (carry.failed_step < 0)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            failed = jnp.where(ok | (carry.failed_step >= 0), carry.failed_step, i)
            return _Carry(keep(carry.state, carry.previous), keep(new_state, carry.state),
                          failed), loss

        init = _Carry(previous, state, jnp.array(-1, jnp.int32))
        steps = jnp.arange(jax.tree.leaves(order)[0].shape[0], dtype=jnp.int32)
        return jax.lax.scan(step, init, (steps, order))

    return run_guarded_epoch if guard else run_epoch


def whole_fit_function(svi, source, steps_per_epoch: int, batch_size: int):
    """Every epoch of a fit in one program, cells in memory on one device:
    ``run(state, arrays, key_shuffle, epochs, n_epochs) -> (state, (n_epochs, n_steps) losses)``.

    ``epochs`` is ``arange(n_epochs)`` (int32) and ``n_epochs`` the same number as a
    ``()`` float32: both are inputs, as in the epoch-by-epoch loop, so nothing that
    depends on them is folded into constants at compile time.  Each epoch draws its
    cell order with :func:`epoch_order` (integer operations, the same order as the
    loop's) and runs :func:`epoch_function`'s epoch on it.
    """
    run_epoch = epoch_function(svi, source, guard=False)

    def run(state, arrays, key_shuffle, epochs, n_epochs):
        def one_epoch(state, epoch):
            order = epoch_order(key_shuffle, epoch, source.n_cells, steps_per_epoch, batch_size)
            return run_epoch(state, order, arrays, epoch.astype(jnp.float32), n_epochs)

        return jax.lax.scan(one_epoch, state, epochs)

    return run


def _last_finite_state(svi, source, this_epoch, last_epoch, failed_step, placement=None):
    """The last state whose loss was finite, by replaying an epoch with the guard on.

    ``this_epoch`` / ``last_epoch``: ``(start state, order, epoch, n_epochs)`` of the
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
    state, order, epoch, n_epochs = this_epoch
    guarded = (placement or Placement()).jit(epoch_function(svi, source, guard=True))
    previous = state
    for inputs in source.epoch_inputs(order):
        carry, _ = guarded(previous, state, inputs, source.arrays, jnp.float32(epoch),
                           jnp.float32(n_epochs))
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
    return epoch_steps(order, steps_per_epoch, batch_size).astype(jnp.int32)


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


def _validation_program(svi, model, data, val_idx, key, train, placement, chunk=4096):
    """Per-cell validation loss (-ELBO), compiled once per chunk shape.

    Cells in memory on one device are gathered, a chunk at a time, from the
    matrix the training cells are read from (no copy of them is kept); cells
    on disk are read again each time.
    """
    if len(val_idx) == 0:
        return None
    elbo = model.elbo()
    params = lambda state: _all_params(svi, state)
    if isinstance(train, DeviceSource) and placement.mesh is None:
        cells = train.view(val_idx)

        @functools.partial(jax.jit, compiler_options=_FIT_COMPILER_OPTIONS.get())
        def chunk_loss(state, arrays, positions):
            batch = cells.gather(arrays, positions).replace(n_cells=positions.shape[0],
                                                            training=False)
            return elbo.loss(key, params(state), svi.model, svi.guide, batch)

        starts = range(0, len(val_idx), chunk)
        chunks = [jnp.arange(s, min(s + chunk, len(val_idx)), dtype=jnp.int32) for s in starts]
        losses = lambda state: (chunk_loss(state, cells.arrays, c) for c in chunks)
    else:
        batches = EvaluationBatches(data.subset(val_idx), chunk)
        if not data.is_backed:
            batches = list(batches)  # kept on the device(s)
        loss = jax.jit(lambda state, batch: elbo.loss(key, params(state), svi.model, svi.guide,
                                                      batch),
                       compiler_options=_FIT_COMPILER_OPTIONS.get())
        losses = lambda state: (loss(state, b) for b in batches)

    def validate(state):
        return sum(float(value) for value in losses(state)) / len(val_idx)

    return validate


def _all_params(svi, state):
    """Constrained params plus mutable state (e.g. Flax batch-norm statistics)."""
    return {**svi.get_params(state), **(state.mutable_state or {})}


def _refuse_per_cell_guide_params(guide, batch) -> None:
    """A guide of the caller's that declares ``numpyro.param`` sites inside the cells plate.

    Such rows are indexed by a minibatch's positions, so for any cells but the training
    minibatches (validation cells, ``latent`` / ``evaluate`` of other data) they would be
    the first training cells' rows, silently.  The named per-cell guides map rows to cells
    by name and fit new cells' rows; an encoder needs no rows at all.
    """
    from numpyro import handlers
    from numpyro.infer.autoguide import AutoGuide

    def per_cell_sites(batch):
        with handlers.block():
            trace = handlers.trace(handlers.seed(guide, jax.random.PRNGKey(0))).get_trace(batch)
        # Rows for every cell: a param array inside the plate whose first axis is the plate's
        # size (network weights declared inside the plate, e.g. by flax_module, are not).
        return sorted(name for name, site in trace.items() if site["type"] == "param"
                      and any(f.name == "cells" for f in site["cond_indep_stack"])
                      and getattr(site["value"], "ndim", 0) >= 1
                      and site["value"].shape[0] == batch.n_cells)

    if isinstance(guide, AutoGuide):  # sets itself up on its first call: not under a trace
        per_cell = per_cell_sites(batch)
    else:
        # Shapes are all the check needs: trace the guide rather than run it, which would
        # dispatch (and first compile) each of its operations one by one.
        per_cell = []
        jax.eval_shape(lambda b: per_cell.extend(per_cell_sites(b)), batch)
    if per_cell:
        raise ValueError(
            f"the guide declares per-cell parameters inside the cells plate ({', '.join(per_cell)}): "
            "lvmzoo cannot tell which rows belong to which cells when it scores validation or new "
            "cells, so latent/evaluate would silently use the first training cells' rows; use "
            "guide='mean_field' or guide='map' (per-cell families that lvmzoo maps by cell name "
            "and fits for new cells), or compute the latent with an encoder (amortised guide)")


def _divergence_message(model, epoch, step, learning_rate):
    """``learning_rate`` is ``None`` when the caller passed an optimizer of their own."""
    rate = ("a smaller step size in your optimizer" if learning_rate is None
            else f"a lower learning rate (now {learning_rate:g})")
    return (
        f"{model.name}: the loss became NaN/inf at epoch {epoch}, step {step}; "
        "the parameters from the last step with a finite loss were kept. "
        f"Try {rate}, a larger batch size, or check the data for extreme values."
    )
