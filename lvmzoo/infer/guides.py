"""Variational families by name: ``make_guide(name, model)`` and what they need.

:func:`lvmzoo.fit` accepts ``guide="mean_field"`` (or any name in
:data:`GUIDES`, or a guide function of your own).  The families differ in how
they treat the *per-cell* latents (sites inside the ``"cells"`` plate, such as
PPCA's ``z``) and so in how they train and are evaluated:

``amortized``
    The model's own guide (an encoder: ``q(z_i | x_i)`` is a function of the
    cell's data), so new cells need nothing fitted.  Global latents the model
    guide does not cover (e.g. ``PPCA(global_prior_scale=...)``'s ``W``) get a
    mean-field Normal.

``mean_field`` / ``map`` (per-cell parameters)
    :class:`~numpyro.infer.autoguide.AutoNormal` / ``AutoDelta``: each cell has
    its own variational parameters (``z_auto_loc`` is ``(n_cells, K)``).  They
    train with minibatches: the guide's ``"cells"`` plate is
    :func:`~lvmzoo.models.base.cell_plate`, whose indices are the minibatch's
    ``batch.index``, so each step reads and updates exactly the rows of the
    cells in the minibatch.  (NumPyro's default autoguide plate draws its *own*
    random indices, and the model, replaying them, would pair cells with the
    wrong rows.)  With momentum optimisers (Adam) rows of cells seen earlier
    keep moving on their momentum between visits; rows never visited stay at
    their initial value.  Held-out cells have no rows: :func:`refit_local` fits
    theirs with the global parameters frozen.

``low_rank`` / ``full_rank`` / ``flow`` / ``laplace`` (joint)
    One distribution over the flattened vector of *all* continuous latents, per-
    cell ones included, so correlations between any two entries are modelled.
    NumPyro's joint autoguides cannot subsample a plate (the flat vector has one
    fixed length), so they train on the full batch only
    (``batch_size >= n_cells``) and raise otherwise.  ``full_rank`` has
    ``O(D^2)`` parameters for ``D`` latent entries: small problems only.
    ``laplace`` trains as MAP and is evaluated as the Gaussian with the inverse
    Hessian of ``-log p`` at the MAP point as covariance.  With
    ``make_guide(name, model, local="mean_field")`` the joint family covers the
    *global* latents only and an AutoNormal the per-cell ones, which then train
    with minibatches again.

Enumerated discrete sites (the GMM's ``component``) are never in a guide: the
model's ``TraceEnum_ELBO`` sums them out.

Point-mass guides (``map``, and ``laplace`` during training) are not proposals
for importance sampling: for a model without a closed-form marginal,
``FittedModel.evaluate`` then reports ``log p(x, z_MAP)``, which is not a
bound on ``log p(x)``.

Evaluation (``FittedModel.latent/log_likelihood/evaluate``) of a guide from
:func:`make_guide` goes through :func:`evaluation_chunks`: global latents are
held at their posterior mean (plug-in, as :mod:`lvmzoo.infer.evaluate` assumes),
per-cell parameters are looked up by cell name for training cells and refitted
(:func:`refit_local`) for the others.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pandas as pd
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer import autoguide

from lvmzoo.cache import UNOPTIMISED_COMPILER_OPTIONS
from lvmzoo.data.registry import CellData
from lvmzoo.data.source import Batch, DeviceSource, n_steps_per_epoch
from lvmzoo.infer.elbo import Trace_ELBO
from lvmzoo.models.base import LatentModel, cell_plate

GUIDES: dict[str, str] = {
    "amortized": "the model's own guide (encoder q(z | x)); held-out cells need no fitting",
    "mean_field": "AutoNormal: independent Normal per latent entry; per-cell parameters, minibatches",
    "low_rank": "AutoLowRankMultivariateNormal over all latents jointly; full batch only",
    "full_rank": "AutoMultivariateNormal over all latents jointly, O(D^2) parameters; full batch, small problems",
    "flow": "AutoIAFNormal (inverse autoregressive flow) over all latents jointly; full batch only",
    "map": "AutoDelta: MAP point estimates of all latents; per-cell parameters, minibatches",
    "laplace": "AutoLaplaceApproximation: MAP, then Gaussian with the inverse Hessian; full batch only",
}
JOINT = ("low_rank", "full_rank", "flow", "laplace")
# Largest default step size per family.  An inverse autoregressive flow over a
# few hundred latent dimensions diverged (loss 1e8 and beyond) at Adam step
# sizes of 3e-3 and 1e-2 that the Gaussian families take in their stride, and
# trained smoothly at 1e-3 (PPCA, 2 x 240 latent entries; 2026-11-24).
MAX_DEFAULT_LEARNING_RATE: dict[str, float] = {"flow": 1e-3}


def default_learning_rate(guide: Union[str, Callable], model: LatentModel) -> float:
    """The step size :func:`lvmzoo.fit` uses when given none: the model's, capped per family.

    ``guide``: a guide name, a guide from :func:`make_guide`, or any guide function.
    """
    name = guide_name(guide) if isinstance(guide, str) else getattr(guide, "name", None)
    cap = MAX_DEFAULT_LEARNING_RATE.get(name, float("inf"))
    return min(model.default_learning_rate, cap)
LATENT_SITE = "z"  # the zoo's per-cell representation, reported when model.latent cannot be


def parse_guide_spec(spec: str) -> tuple[str, dict]:
    """``"low_rank:local=mean_field,rank=3"`` -> ``("low_rank", {"local": "mean_field", "rank": 3})``.

    The text form of a guide with options, for places that take a guide as a string
    (``lvmzoo compare --methods``, ``fit(guide=...)``); numbers become ints/floats.
    """
    name, _, text = spec.partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"guide {spec!r}: write NAME:KEY=VALUE[,KEY=VALUE], e.g. "
                             "low_rank:local=mean_field")
        options[key.strip()] = _option_value(value.strip())
    return name.strip(), options


def _option_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def guide_name(guide: Union[str, Callable]) -> Optional[str]:
    """The family name of a guide spec (``"low_rank:local=mean_field"`` -> ``"low_rank"``)."""
    if isinstance(guide, str):
        return guide.partition(":")[0].strip()
    return getattr(guide, "name", None)


def make_guide(name: Union[str, Callable], model: LatentModel, **options) -> Callable:
    """The variational family ``name`` for ``model``.

    Args:
      name: a key of :data:`GUIDES`, optionally with options as text
        (``"low_rank:local=mean_field"``, see :func:`parse_guide_spec`), or a
        guide function ``guide(batch)`` of your own (returned unchanged).
      model: the zoo model the guide approximates the posterior of.
      **options: ``local="joint"`` (default) or ``"mean_field"`` for the joint
        families (see the module docstring); other keyword arguments go to the
        NumPyro autoguide (``init_scale``, ``rank``, ``num_flows``, ...).  They
        must be JSON-serialisable, as saved runs record them.

    Returns:
      A callable ``guide(batch)``; for names a :class:`NamedGuide`.

    Raises:
      ValueError: unknown name, or ``"amortized"`` for a model without a guide.
    """
    if callable(name):
        return name
    if ":" in name:
        name, spelled = parse_guide_spec(name)
        options = {**spelled, **options}
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {', '.join(GUIDES)} "
                         "or pass a guide function")
    if name == "amortized" and not callable(getattr(model, "guide", None)):
        others = ", ".join(g for g in GUIDES if g != "amortized")
        raise ValueError(f"{getattr(model, 'name', type(model).__name__)} has no guide of its "
                         f"own to amortise inference; use one of {others}")
    local = options.get("local", "joint")
    if local not in ("joint", "mean_field"):
        raise ValueError(f"local must be 'joint' or 'mean_field', got {local!r}")
    if local == "mean_field" and name not in JOINT:
        raise ValueError(f"local='mean_field' applies to the joint guides {', '.join(JOINT)}")
    if local == "mean_field" and name == "laplace":
        raise ValueError("laplace cannot be split: its Hessian needs the per-cell latents; "
                         "use local='joint' (full batch) or another family")
    return NamedGuide(name, model, options)


class NamedGuide:
    """A guide from :func:`make_guide`, built on its first call.

    The first call traces the model once to sort its latent sites into
    per-cell, global and enumerated ones, then builds the autoguide(s) on the
    model with the sites they do not cover hidden.

    Attributes:
      name, options: how it was made (saved with a run).
      training_cells: ``obs_names`` of the cells whose per-cell parameters it
        holds, in row order (set by :func:`lvmzoo.fit`).
      local_sites / global_sites: latent site names, once built.
    """

    def __init__(self, name: str, model: LatentModel, options: dict[str, Any]):
        self.name = name
        self.model = model
        self.options = dict(options)
        self.training_cells: Optional[np.ndarray] = None
        self.local_sites: Optional[tuple[str, ...]] = None
        self.global_sites: Optional[tuple[str, ...]] = None
        self._parts: Optional[list[Callable]] = None
        self._evaluation_guide: Optional[Callable] = None
        self._refits: dict = {}  # (cell names, seed) -> refit_local result, for evaluation

    def __repr__(self):
        return f"NamedGuide({self.name!r}, {type(self.model).__name__}, {self.options})"

    @property
    def joint_over_cells(self) -> bool:
        """One distribution over every cell's latents: full batch only."""
        return (self.name in JOINT and self.options.get("local", "joint") == "joint"
                and bool(self.local_sites))

    @property
    def per_cell(self) -> bool:
        """Holds parameters per training cell (so cells outside training need a refit)."""
        return self.name != "amortized" and bool(self.local_sites)

    def __call__(self, batch: Batch):
        if self._parts is None:
            self._build(batch)
        self._refuse_minibatch(batch)
        result = {}
        for part in self._parts:
            result.update(part(batch) or {})
        return result

    def _refuse_minibatch(self, batch: Batch) -> None:
        if self.joint_over_cells and batch.size < batch.n_cells:
            raise ValueError(
                f"guide {self.name!r} is one joint distribution over every cell's latents and "
                f"NumPyro's joint autoguides cannot subsample the cells plate (minibatch of "
                f"{batch.size} of {batch.n_cells} cells): fit with batch_size >= the number of "
                f"training cells, or make_guide({self.name!r}, model, local='mean_field') to "
                "keep it for the global latents and use AutoNormal for the per-cell ones")

    def holds_per_cell_params(self, batch: Batch) -> bool:
        """:attr:`per_cell`, building the guide on ``batch`` first if needed."""
        if self._parts is None:
            self._build(batch)
        return self.per_cell

    def start_params(self, values: dict[str, Any], batch: Batch) -> dict[str, Any]:
        """Params that start the guide's locations at ``values``.

        ``values``: constrained values of global latent sample sites of the
        model, keyed by site name (what ``init_params`` may return for them).
        Each family keeps its locations differently:

        * ``mean_field`` (and the per-site part of ``amortized`` and of
          ``local="mean_field"``): ``<site>_auto_loc`` on the unconstrained
          scale, ``biject_to(support).inv(value)``;
        * ``map``: ``<site>_auto_loc`` is the constrained value itself;
        * ``low_rank`` / ``full_rank`` / ``laplace``: the site's entries of
          the one flattened, unconstrained ``auto_loc``; the other entries keep
          their default start.

        Left out (the guide's own start stands): every site of ``flow``,
        whose location is the output of an autoregressive network, not a
        parameter, and sites the model's own guide covers under
        ``amortized``, whose parameters the model names itself.
        """
        if self._parts is None or any(getattr(part, "prototype_trace", False) is None
                                      for part in self._parts):
            ensure_built(self, batch)  # autoguides set up their sites on their first call
        params = {}
        for part in self._parts:
            if not isinstance(part, autoguide.AutoGuide):
                continue  # the model's own guide
            covered = sorted(set(values) & set(part._init_locs))
            if isinstance(part, autoguide.AutoDelta):
                params.update({f"{name}_{part.prefix}_loc": jnp.asarray(values[name])
                               for name in covered})
            elif isinstance(part, autoguide.AutoNormal):
                params.update({f"{name}_{part.prefix}_loc": _unconstrained(part, name, values[name])
                               for name in covered})
            elif isinstance(part, _JOINT_WITH_LOC) and covered:
                loc = part._init_latent
                # Positions of each site's entries in the flattened vector, by unpacking 0..D-1.
                positions = part._unpack_latent(jnp.arange(part.latent_dim))
                for name in covered:
                    loc = loc.at[positions[name].reshape(-1)].set(
                        _unconstrained(part, name, values[name]).reshape(-1))
                params[f"{part.prefix}_loc"] = loc
        return params

    # -- construction ---------------------------------------------------------

    def _build(self, batch: Batch) -> None:
        local, global_, enumerated = classify_sites(self.model, batch)
        self.local_sites, self.global_sites = tuple(local), tuple(global_)
        kwargs = {k: v for k, v in self.options.items() if k != "local"}
        every = set(local) | set(global_) | set(enumerated)

        def only(names):  # the model with every other latent hidden from the autoguide
            hidden = every - set(names)
            return handlers.block(self.model.model, hide_fn=lambda msg: msg["type"] == "sample"
                                  and msg["name"] in hidden)

        if self.name == "amortized":
            covered = guide_sites(self.model.guide, batch)
            missing_local = [s for s in local if s not in covered]
            if missing_local:
                raise ValueError(f"the model's guide does not cover the per-cell site(s) "
                                 f"{missing_local}; use another guide name")
            missing = [s for s in global_ if s not in covered]
            self._parts = [self.model.guide]
            if missing:  # e.g. priors on the globals: mean-field Normal for them
                self._parts.insert(0, _AutoNormal(only(missing)))
        elif self.name in ("mean_field", "map"):
            cls = _AutoNormal if self.name == "mean_field" else _AutoDelta
            self._parts = [cls(only(local + global_), **kwargs)]
        else:
            joint_sites = global_ if self.options.get("local", "joint") == "mean_field" else (
                local + global_)
            self._parts = []
            if joint_sites:
                self._parts.append(_JOINT_CLASSES[self.name](only(joint_sites), **kwargs))
            if self.options.get("local") == "mean_field" and local:
                self._parts.append(_AutoNormal(only(local)))
            if not self._parts:
                raise ValueError(f"guide {self.name!r} found no continuous latent sites in "
                                 f"{self.model.name} (point-estimated globals are params, "
                                 "enumerated sites are summed out); use 'mean_field' or the "
                                 "model's own guide")

    # -- evaluation -----------------------------------------------------------

    def evaluation_guide(self, params: dict, batch: Batch) -> tuple[Callable, dict]:
        """``(guide, params)`` to draw posterior samples from on ``batch``.

        The same guide, except for ``laplace``: training fits its MAP point (a
        Delta); here the Gaussian ``N(MAP, H^{-1})``, ``H`` the Hessian of the
        negative log joint (in unconstrained space) at the MAP point on
        ``batch`` (all training cells), expressed as an
        ``AutoMultivariateNormal`` over the same flattened latent vector.
        ``params`` must not hold plug-in values of latent sites.
        """
        if self.name != "laplace":
            return self, params
        laplace = self._parts[0]
        if self._evaluation_guide is None:
            self._evaluation_guide = _AutoMultivariateNormal(laplace.model, prefix=laplace.prefix)
            ensure_built(self._evaluation_guide, batch)
        scale_tril = _laplace_scale_tril(laplace, params, batch)
        return self._evaluation_guide, {**params, f"{laplace.prefix}_scale_tril": scale_tril}


@functools.partial(jax.jit, static_argnames=("laplace",))
def _laplace_scale_tril(laplace, params: dict, batch: Batch) -> jax.Array:
    """Cholesky factor of the inverse Hessian of ``-log p`` at the MAP point of ``laplace``.

    One compiled program: run as it is, the Hessian executes (and on a cold cache
    compiles) each operation of the model's forward and backward passes one by one.
    """
    loc_name = f"{laplace.prefix}_loc"

    def negative_log_joint(loc):  # the Delta guide makes the ELBO exactly this
        return Trace_ELBO().loss(jax.random.PRNGKey(0), {**params, loc_name: loc},
                                 laplace.model, laplace, batch)

    precision = jax.hessian(negative_log_joint)(params[loc_name])
    covariance = jnp.linalg.inv(0.5 * (precision + precision.T))
    return jnp.linalg.cholesky(0.5 * (covariance + covariance.T))


# --------------------------------------------------------------------------
# Site bookkeeping
# --------------------------------------------------------------------------


class _CellPlates:
    """Autoguide mixin: its cells plate is the model's ``cell_plate(batch)``.

    So the per-cell parameters it declares inside the plate are indexed by
    ``batch.index`` (NumPyro's default plate would draw its own random
    indices).  Overrides ``_create_plates`` rather than passing
    ``create_plates=``, whose type check rejects the enumeration-aware plate
    that ``TraceEnum_ELBO`` substitutes (e.g. for the GMM).
    """

    def _create_plates(self, batch):
        plates = {"cells": cell_plate(batch)}
        for name, frame in self._prototype_frames.items():
            if name not in plates:
                plates[name] = numpyro.plate(name, self._prototype_frame_full_sizes[name],
                                             dim=frame.dim, subsample_size=frame.size)
        return plates


class _GivenKey(numpyro.primitives.Messenger):
    """Answers ``numpyro.prng_key()`` with ``key`` itself (a seed handler would split it)."""

    def __init__(self, key):
        self.key = key
        super().__init__()

    def process_message(self, msg):
        if msg["type"] == "prng_key" and msg["kwargs"]["rng_key"] is None:
            msg["kwargs"]["rng_key"] = self.key


class _SetUpInOneProgram:
    """Autoguide mixin: its first call sets it up with one compiled program.

    NumPyro sets an autoguide up on its first call: it runs the model (the
    prototype trace) and finds a valid start for each latent, operation by
    operation, and each distinct operation compiles a program of its own (a
    SCANVI mean-field guide: ~390 of them, half of a short fit on a cold cache).
    Here the same setup runs twice without executing an operation one by one:

    1. under :func:`jax.eval_shape`, with the batch as it is, for the guide's
       structure: the functions the guide keeps (which close over the batch)
       hold the batch itself, and every array the setup computed is a tracer;
    2. under :func:`jax.jit`, with the batch as an argument, for the values of
       exactly those arrays, which then replace the tracers.

    Both runs get the key NumPyro's own setup would draw, so the guide ends up
    as NumPyro would set it up, with the same start values.  One difference:
    NumPyro raises when no valid start (finite log density and gradient) was
    found, which it can only tell from concrete values; here the fit's first
    loss is non-finite instead.  Inside an enclosing trace the setup runs as
    NumPyro's.
    """

    def _setup_prototype(self, *args, **kwargs):
        key = numpyro.prng_key()
        set_up = functools.partial(super()._setup_prototype, *args, **kwargs)

        def set_up_with_key(key):
            with _GivenKey(key):
                set_up()

        inputs = jax.tree.leaves((key, args, kwargs))
        if key is None or any(isinstance(leaf, jax.core.Tracer) for leaf in inputs):
            set_up_with_key(key)
            return
        before = _attributes(self)
        jax.eval_shape(lambda: set_up_with_key(key))
        leaves, structure = jax.tree.flatten(_attributes(self))
        traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.core.Tracer)]

        def traced_values(key, args, kwargs):
            _restore(self, before)
            with _GivenKey(key):
                super(_SetUpInOneProgram, self)._setup_prototype(*args, **kwargs)
            again = jax.tree.leaves(_attributes(self))
            # Same leaves in the same places, compared by count, shape and dtype: tree
            # structures themselves differ between the runs wherever a pytree node keeps
            # an object made during setup (a joint guide's UnpackTransform keeps a new
            # functools.partial, which compares by identity).
            if len(again) != len(leaves) or any(
                    jnp.shape(again[i]) != leaves[i].shape or jnp.result_type(again[i])
                    != leaves[i].dtype for i in traced):
                raise RuntimeError("autoguide setup is not deterministic in its structure")
            return [again[i] for i in traced]

        # Run once: LLVM's optimisations would cost more than they save (SCANVI's setup
        # compiles in 3.3 s instead of 5.9; the values came out the same bit for bit).
        program = jax.jit(traced_values).lower(key, args, kwargs).compile(
            compiler_options=UNOPTIMISED_COMPILER_OPTIONS)
        values = program(key, args, kwargs)
        for i, value in zip(traced, values):
            leaves[i] = value
        _restore(self, jax.tree.unflatten(structure, leaves))


def _attributes(guide) -> dict:
    """The guide's attributes, their dicts copied (setup fills some in place)."""
    return _copied(vars(guide))


def _copied(attributes: dict) -> dict:
    return {name: dict(value) if isinstance(value, dict) else value
            for name, value in attributes.items()}


def _restore(guide, attributes: dict) -> None:
    vars(guide).clear()
    vars(guide).update(_copied(attributes))


class _AutoNormal(_SetUpInOneProgram, _CellPlates, autoguide.AutoNormal):
    pass


class _AutoDelta(_SetUpInOneProgram, _CellPlates, autoguide.AutoDelta):
    pass


# The joint families set themselves up in one program too (they never subsample the
# cells plate, so they keep NumPyro's plates).
class _AutoLowRankMultivariateNormal(_SetUpInOneProgram,
                                     autoguide.AutoLowRankMultivariateNormal):
    pass


class _AutoMultivariateNormal(_SetUpInOneProgram, autoguide.AutoMultivariateNormal):
    pass


class _AutoIAFNormal(_SetUpInOneProgram, autoguide.AutoIAFNormal):
    pass


class _AutoLaplaceApproximation(_SetUpInOneProgram, autoguide.AutoLaplaceApproximation):
    pass


_JOINT_CLASSES = {
    "low_rank": _AutoLowRankMultivariateNormal,
    "full_rank": _AutoMultivariateNormal,
    "flow": _AutoIAFNormal,
    "laplace": _AutoLaplaceApproximation,
}


# Joint families whose location is one parameter, ``<prefix>_loc``, over the flattened
# unconstrained latents (AutoIAFNormal, ``flow``, has none).
_JOINT_WITH_LOC = (autoguide.AutoLowRankMultivariateNormal, autoguide.AutoMultivariateNormal,
                   autoguide.AutoLaplaceApproximation)


def _unconstrained(part, name: str, value) -> jax.Array:
    """``value`` of the site ``name`` on the unconstrained scale the autoguide ``part`` keeps."""
    support = part.prototype_trace[name]["fn"].support
    return biject_to(support).inv(jnp.asarray(value))


def _trace(fn, batch, seed=0):
    with handlers.block():  # nothing escapes to handlers of an enclosing SVI step
        return handlers.trace(handlers.seed(fn, jax.random.PRNGKey(seed))).get_trace(batch)


def shape_trace(fn, batch, key=None) -> dict:
    """The NumPyro trace of ``fn(batch)`` by shape only (:func:`jax.eval_shape`).

    For the sites' names, kinds, plates and shapes: run as it is, a trace executes
    (and on first use compiles) each operation of ``fn`` one by one.  Its values are
    tracers of a finished trace: read their shapes, never compute with them.  ``fn``
    must not be an autoguide that has yet to set itself up (it would keep tracers).
    """
    box = {}

    def run(key):
        with handlers.block():  # nothing escapes to handlers of an enclosing SVI step
            box["trace"] = handlers.trace(handlers.seed(fn, key)).get_trace(batch)
        return 0

    jax.eval_shape(run, jax.random.PRNGKey(0) if key is None else key)
    return box["trace"]


def _structure_trace(fn, batch) -> dict:
    """:func:`shape_trace`, except for an autoguide yet to set itself up (run as it is)."""
    if isinstance(fn, autoguide.AutoGuide) and fn.prototype_trace is None:
        return _trace(fn, batch)
    return shape_trace(fn, batch)


def _in_cells(site) -> bool:
    return any(frame.name == "cells" for frame in site["cond_indep_stack"])


def classify_sites(model: LatentModel, batch: Batch) -> tuple[list, list, list]:
    """Latent sample sites of ``model`` as ``(per_cell, global, enumerated)`` name lists."""
    local, global_, enumerated = [], [], []
    for name, site in shape_trace(model.model, batch).items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        if site["infer"].get("enumerate") == "parallel":
            enumerated.append(name)
        elif _in_cells(site):
            local.append(name)
        else:
            global_.append(name)
    return local, global_, enumerated


def guide_sites(guide: Callable, batch: Batch) -> set[str]:
    """Names of the sample sites ``guide`` draws."""
    return {n for n, s in _structure_trace(guide, batch).items() if s["type"] == "sample"}


def ensure_built(guide: Callable, batch: Batch) -> None:
    """Set ``guide`` up outside any jit, so lazily built autoguides hold no tracers
    (:func:`set_up_guide` with the key of a first call seeded with ``PRNGKey(0)``)."""
    set_up_guide(guide, batch, jax.random.PRNGKey(0))


def set_up_guide(guide: Callable, batch: Batch, key: jax.Array) -> None:
    """Set ``guide`` up as its first call under ``handlers.seed(guide, key)`` would.

    Outside any jit, so lazily built autoguides hold no tracers.  Where the one
    autoguide to set up is the guide's first part (or the guide itself) and one of
    the zoo's own (:class:`_SetUpInOneProgram`), only its setup runs, with the key
    the call would have given it first: the whole call would also execute the
    guide's body operation by operation (compiling each on first use) for nothing.
    Otherwise (e.g. an autoguide after a part that draws keys) the whole call runs.
    A guide known to be set up is left as it is.
    """
    if isinstance(guide, NamedGuide):
        if guide._parts is None:
            guide._build(batch)
        guide._refuse_minibatch(batch)  # as its call would, before NumPyro's setup fails
    if _is_built(guide):
        return
    parts = guide._parts if isinstance(guide, NamedGuide) else [guide]
    first, rest = parts[0], parts[1:]
    # Only the zoo's own autoguides: others may set up more in their body (AutoGuideList's parts).
    if isinstance(first, _SetUpInOneProgram) and all(
            _is_built(part) or not isinstance(part, autoguide.AutoGuide) for part in rest):
        with handlers.block():  # nothing escapes to handlers of an enclosing SVI step
            handlers.seed(first._setup_prototype, key)(batch)
        return
    with handlers.block():
        handlers.trace(handlers.seed(guide, key)).get_trace(batch)


def _is_built(guide: Callable) -> bool:
    """Whether ``guide`` is known to have nothing left to set up: an autoguide that set
    itself up, or a :class:`NamedGuide` whose autoguide parts all did (other parts are
    the model's own guide functions, which build nothing)."""
    if isinstance(guide, NamedGuide):
        return guide._parts is not None and all(
            _is_built(part) for part in guide._parts if isinstance(part, autoguide.AutoGuide))
    return isinstance(guide, autoguide.AutoGuide) and guide.prototype_trace is not None


def per_cell_params(guide: Callable, batch: Batch) -> dict[str, int]:
    """Params declared inside the cells plate, mapped to their cells axis.

    ``batch`` must be shaped like a training minibatch (``n_cells`` = number of
    training cells), so that full-size parameters pass the plate's checks.
    """
    axes = {}
    for name, site in _structure_trace(guide, batch).items():
        if site["type"] == "param":
            for frame in site["cond_indep_stack"]:
                if frame.name == "cells":
                    event_dim = site["kwargs"].get("event_dim") or 0
                    axes[name] = frame.dim - event_dim
    return axes


# --------------------------------------------------------------------------
# Frozen globals and refitting the per-cell posterior
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenGlobals(LatentModel):
    """``inner`` with some sites held at fixed values (params and global latents).

    The fixed sites are hidden from inference (not optimised, not sampled);
    ``latent`` and ``log_likelihood`` see them merged into ``params``.  Made by
    :func:`freeze_globals`; compared by identity.
    """

    inner: LatentModel
    values: dict
    estimator: Any = None  # an ELBO; None: the inner model's

    @property
    def name(self):
        return self.inner.name

    @property
    def data_kind(self):
        return self.inner.data_kind

    @property
    def default_learning_rate(self):
        return self.inner.default_learning_rate

    def model(self, batch: Batch) -> None:
        fixed = handlers.condition(handlers.substitute(self.inner.model, data=self.values),
                                   data=self.values)
        handlers.block(fixed, hide=list(self.values))(batch)

    def guide(self, batch: Batch) -> None:
        self.inner.guide(batch)

    def elbo(self):
        return self.inner.elbo() if self.estimator is None else self.estimator

    def latent(self, params, batch, key):
        return self.inner.latent({**params, **self.values}, batch, key)

    def log_likelihood(self, params, batch):
        return self.inner.log_likelihood({**params, **self.values}, batch)

    def config(self):
        return {"inner": self.inner.config(), "frozen": sorted(self.values)}


def freeze_globals(model: LatentModel, values: dict, elbo=None) -> FrozenGlobals:
    """``model`` with the sites in ``values`` (e.g. ``{"W": ..., "mu": ..., "sigma": ...}``) fixed.

    ``elbo`` replaces the model's ELBO estimator, e.g. ``Trace_ELBO(num_particles=8)``
    for less noisy gradients of a joint guide.
    """
    return FrozenGlobals(model, {k: jax.tree.map(jnp.asarray, v) for k, v in values.items()}, elbo)


def model_param_values(model: LatentModel, params: dict, batch: Batch) -> dict:
    """Values in ``params`` of the model's own ``numpyro.param`` sites and mutable state
    (Flax batch-norm statistics: ``flax_module`` needs its ``$state`` with its ``$params``)."""
    names = [n for n, s in shape_trace(model.model, batch).items()
             if s["type"] in ("param", "mutable")]
    return {n: params[n] for n in names if n in params}


def global_point_estimates(guide: Callable, params: dict, batch: Batch, names, *,
                           n_samples: int = 64, seed: int = 0) -> dict:
    """Posterior means of the global latent sites ``names`` under ``guide``.

    Monte Carlo over ``n_samples`` guide draws (exact for point-mass guides);
    ``batch`` is any batch the guide accepts.
    """
    names = list(names or ())
    if not names:
        return {}
    # The training-time guide: for laplace its MAP point, the Laplace mean.
    # Drop any plug-in values of these sites, so the guide draws them.
    params = {k: v for k, v in params.items() if k not in names}

    def draw(key):
        tr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), key)).get_trace(batch)
        return {n: tr[n]["value"] for n in names}

    keys = jax.random.split(jax.random.PRNGKey(seed), n_samples)
    draws = jax.lax.map(draw, keys)
    # A point mass (map) draws one value n_samples times; their float32 mean can differ from
    # it in the last place, and the Delta site the value is later substituted into then has
    # log-density -inf (an ELBO of +inf).  Return the value itself.
    return {n: jnp.where(jnp.all(v == v[0], axis=0), v[0], jnp.mean(v, axis=0))
            for n, v in draws.items()}


def refit_local(fitted, data: CellData, *, epochs: Optional[int] = None,
                batch_size: Optional[int] = None,
                learning_rate: Optional[float] = None, seed: int = 0, progress: bool = False):
    """Fit the per-cell variational parameters of ``data``'s cells, globals frozen.

    The model's parameters and the posterior means of its global latents are
    taken from ``fitted`` and held fixed (:func:`freeze_globals`); a fresh guide
    of the same family (its per-cell part: ``mean_field`` for a split joint
    guide) is fitted to ``data`` by :func:`lvmzoo.fit`.

    Args:
      fitted: a :class:`~lvmzoo.infer.results.FittedModel` fitted with a
        per-cell guide from :func:`make_guide`.
      data: the cells to fit (typically held out).
      epochs: as in :func:`lvmzoo.fit`; default 300, and 2,000 for a guide
        joint over all cells (one full-batch step per epoch, and its
        correlated parameters need more of them than independent per-cell ones).
      seed, progress: as in :func:`lvmzoo.fit`.
      learning_rate: Adam's initial step size (default 0.1; 1e-3 for flows),
        decayed exponentially to 1/20 of it over the refit.
      batch_size: default all cells (up to 4096, else the fit's own); joint
        guides always use all cells.

    Returns:
      The refitted :class:`~lvmzoo.infer.results.FittedModel` (of the frozen
      model); its params hold the new per-cell parameters, rows in ``data`` order.
    """
    # svi imports results, which imports this module lazily
    from lvmzoo.infer.svi import epochs_in_one_program, fit

    guide = fitted.guide
    if not isinstance(guide, NamedGuide):
        raise TypeError("refit_local needs a guide made by lvmzoo.infer.guides.make_guide")
    template = _training_batch(fitted, data)
    ensure_built(guide, template)
    frozen = freeze_globals(fitted.model, _frozen_values(fitted, template))
    if guide.name in JOINT and guide.options.get("local", "joint") == "mean_field":
        name, options = "mean_field", {}
    else:
        name, options = guide.name, guide.options
    if epochs is None:
        epochs = 2000 if guide.joint_over_cells else 300
    if guide.joint_over_cells:
        batch_size = data.n_cells
    elif batch_size is None:  # the per-cell problems are small: full batches up to 4096 cells
        batch_size = max(min(data.n_cells, 4096), fitted.history.get("batch_size") or 1)
    batch_size = min(batch_size, data.n_cells)
    if learning_rate is None:  # flows are unstable at the step size the others like
        learning_rate = min(0.1, MAX_DEFAULT_LEARNING_RATE.get(name, 0.1))
    # Decay the step size 20-fold: the per-cell optimum is then reached rather
    # than circled at the noise level of single-draw gradients.
    n_steps = epochs * n_steps_per_epoch(data.n_cells, batch_size)
    optimizer = optax.adam(optax.exponential_decay(learning_rate, max(n_steps, 1), 0.05))
    with epochs_in_one_program():  # a joint refit's 2,000 one-step epochs: one call, not 2,000
        return fit(frozen, data, guide=make_guide(name, frozen, **options), epochs=epochs,
                   batch_size=batch_size, optimizer=optimizer, seed=seed, progress=progress)


def _frozen_values(fitted, batch: Batch) -> dict:
    guide = fitted.guide
    values = model_param_values(fitted.model, fitted.params, batch)
    values.update(global_point_estimates(guide, fitted.params, batch, guide.global_sites,
                                         seed=fitted.seed))
    return values


def _training_batch(fitted, data: CellData) -> Batch:
    """A batch of ``data``'s cells shaped like a training minibatch of ``fitted``.

    ``n_cells`` is the number of training cells, so per-cell parameters of the
    fitted size pass the cells plate's shape checks; its ``index`` are rows
    ``0..B-1``.  Only shapes matter (it builds autoguides and reads their
    sites): ``B`` is the full training set for joint guides (which cannot
    subsample; ``data``'s rows repeat if it has fewer cells) and at most 64
    cells otherwise.
    """
    guide, n_train = fitted.guide, len(fitted.train_index)
    joint = guide.name in JOINT and guide.options.get("local", "joint") == "joint"
    size = n_train if joint else min(64, n_train, data.n_cells)
    source = DeviceSource(data, n_cells=n_train)
    batch = source.gather(source.arrays, jnp.arange(size) % data.n_cells)
    return batch.replace(index=jnp.arange(size), training=False)


# --------------------------------------------------------------------------
# Evaluation of a FittedModel whose guide came from make_guide
# --------------------------------------------------------------------------


def evaluation_chunks(fitted, data: CellData, chunk: int, cells: bool = True
                      ) -> Iterator[tuple[Batch, dict, Callable]]:
    """``(batch, params, guide)`` per evaluation chunk of ``data``, in cell order.

    * Global latents are held at their posterior means (plug-in) in ``params``.
    * Per-cell guides: training cells (matched by ``obs_names``) get their
      trained rows; other cells get rows from :func:`refit_local`.
    * Joint guides: one chunk of all cells; their trained parameters if
      ``data`` is the training cells in training order, else a joint refit.

    With ``cells=False`` only the globals are needed (e.g. for the exact
    marginal likelihood), so nothing is refitted.
    """
    guide = fitted.guide
    template = _training_batch(fitted, data)
    ensure_built(guide, template)
    plug_in = global_point_estimates(guide, fitted.params, template, guide.global_sites,
                                     seed=fitted.seed)
    source = DeviceSource(data)
    if not cells:
        for start in range(0, data.n_cells, chunk):
            index = np.arange(start, min(start + chunk, data.n_cells))
            yield source.full_batch(index), {**fitted.params, **plug_in}, guide
        return
    if guide.joint_over_cells:
        batch = source.full_batch()
        same = guide.training_cells is not None and np.array_equal(
            np.asarray(guide.training_cells), np.asarray(data.obs_names))
        if not same:  # no trained parameters for these cells: a joint refit
            refit = _cached_refit(fitted, data)
            guide, params, plug_in = refit.guide, {**refit.params, **refit.model.values}, {}
        else:
            params = fitted.params
        eval_guide, params = guide.evaluation_guide(params, batch.replace(training=True))
        yield batch, {**params, **plug_in}, eval_guide
        return
    params = {**fitted.params, **plug_in}
    local = per_cell_params(guide, template) if guide.per_cell else {}
    if local:
        rows = _rows_for(guide, data)
        cell_values = _cell_values(fitted, data, rows, local)
        params = {k: v for k, v in params.items() if k not in local}
    for start in range(0, data.n_cells, chunk):
        index = np.arange(start, min(start + chunk, data.n_cells))
        chunk_params = dict(params)
        for name, axis in local.items():
            chunk_params[name] = jnp.take(cell_values[name], jnp.asarray(index), axis=axis)
        yield source.full_batch(index), chunk_params, guide


def _rows_for(guide: NamedGuide, data: CellData) -> np.ndarray:
    """Row of each of ``data``'s cells among the training cells; ``-1`` if not trained."""
    if guide.training_cells is None:
        return np.full(data.n_cells, -1)
    names = pd.Index(np.asarray(guide.training_cells))
    if not names.is_unique:
        raise ValueError("per-cell guides find a cell's parameters by obs_name, and the "
                         "training cells' names are not unique; make them unique "
                         "(AnnData.obs_names_make_unique) and fit again")
    return names.get_indexer(np.asarray(data.obs_names))


def _cell_values(fitted, data: CellData, rows: np.ndarray, local: dict[str, int]) -> dict:
    """Per-cell params with one row per cell of ``data`` (trained or refitted)."""
    trained = rows >= 0
    values = {n: jnp.take(fitted.params[n], jnp.asarray(np.maximum(rows, 0)), axis=a)
              for n, a in local.items()}
    if trained.all():
        return values
    unseen = np.flatnonzero(~trained)
    refit = _cached_refit(fitted, data.subset(unseen))
    for name, axis in local.items():
        moved = jnp.moveaxis(values[name], axis, 0)
        fresh = jnp.moveaxis(refit.params[name], axis, 0)
        values[name] = jnp.moveaxis(moved.at[jnp.asarray(unseen)].set(fresh), 0, axis)
    return values


def _cached_refit(fitted, data: CellData):
    """:func:`refit_local` with its defaults, once per set of cells (evaluation reuses it)."""
    key = (tuple(str(n) for n in data.obs_names), fitted.seed, id(fitted.params))
    cache = fitted.guide._refits
    if key not in cache:
        cache.clear()  # keep one: the latest cells evaluated
        cache[key] = refit_local(fitted, data, seed=fitted.seed)
    return cache[key]


def latent_needs_guide(model: LatentModel, params: dict, batch: Batch) -> bool:
    """Whether ``model.latent`` reads params (its encoder's) that ``params`` lacks: through
    ``numpyro.param`` sites, or by indexing ``params`` directly (a ``KeyError``)."""
    try:
        with handlers.block():
            tr = handlers.trace(handlers.seed(
                lambda: model.latent(params, batch, jax.random.PRNGKey(0)), jax.random.PRNGKey(0)
            )).get_trace()
    except KeyError:
        return True
    return any(s["type"] == "param" and n not in params for n, s in tr.items())


@functools.partial(jax.jit, static_argnames=("guide", "n_samples"))
def guide_mean(guide: Callable, params: dict, batch: Batch, key: jax.Array,
               n_samples: int = 100) -> jax.Array:
    """Monte Carlo posterior mean of the guide's per-cell latent, ``(B, K)``.

    The latent is the site ``z`` when the guide samples one, otherwise the one
    continuous sample site in the cells plate; a site with one value per cell
    is reported as ``(B, 1)``.
    """
    def draw(k):
        tr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), k)).get_trace(batch)
        value = tr[_reported_site(tr)]["value"]
        return value.reshape(value.shape[0], -1) if value.ndim != 2 else value

    return jax.lax.map(draw, jax.random.split(key, n_samples)).mean(0)


def _reported_site(trace) -> str:
    """``z``, else the only per-cell continuous sample site of a guide trace; else say what to do."""
    if LATENT_SITE in trace:
        return LATENT_SITE
    per_cell = [name for name, site in trace.items()
                if site["type"] == "sample"
                and any(f.name == "cells" for f in site["cond_indep_stack"])
                and not site["fn"].support.is_discrete]
    if len(per_cell) == 1:
        return per_cell[0]
    found = ", ".join(repr(n) for n in per_cell) or "none"
    raise ValueError(
        f"cannot tell which per-cell site of the guide is the latent to report (per-cell "
        f"continuous sites: {found}): name it {LATENT_SITE!r} in the model, or make the "
        "model's latent(params, batch, key) compute it from the model's own params")
