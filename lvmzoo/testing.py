"""Conformance checks for model authors: :func:`check_model` (cf. scikit-learn's ``check_estimator``).

A zoo model (:class:`~lvmzoo.models.base.LatentModel`) must follow a few rules
that nothing enforces while it is written: every per-cell site inside
``with cell_plate(batch):``, a guide covering every latent, a ``(B, K)``
latent, a closed-form ``log_likelihood`` that is right, no Python-side state
that changes the compiled programs.  :func:`check_model` runs a short battery
on at most ``n_cells`` (default 64) cells of the data and reports *every*
failure in words, each naming the mistake and the fix::

    from lvmzoo.testing import check_model
    report = check_model(MyModel(), data, raise_on_failure=False)
    print(report)            # one row per check: passed / failed / skipped

In a test suite, :func:`assert_model_conforms` raises :class:`ModelCheckError`
(an ``AssertionError``) listing all failures.

The checks (``CheckReport`` row names) and their tolerances:

``guide_covers_latents``
    Traces of ``model`` and ``guide`` on a minibatch: the guide samples every
    latent (non-observed, non-enumerated) site of the model, with the same
    shape and number of event dimensions and a support of the same kind
    (real / positive / simplex / ...), and no site the model lacks.
``cells_plate``
    The model and guide are traced on minibatches of 12 and 20 cells (of the
    same ``n_cells``); a sample site whose shape changes with the minibatch
    size is per cell and must be inside the plate named ``"cells"``, and that
    plate must have size ``batch.n_cells`` (:func:`~lvmzoo.models.base.cell_plate`).
``minibatch_scaling``
    With every latent held at one draw for all cells, the average over a
    partition of the cells into minibatches of 16 of the plate-scaled
    log-joint must equal the full-data log-joint (exactly so for an unbiased
    estimator; tolerance ``1e-4`` relative to the summed magnitude of the
    site's terms plus ``1e-2`` nats, float32 round-off), site by site.
    Networks run in evaluation mode (``training=False``) so that dropout and
    batch statistics do not differ between the two.
``init_params_keys``
    Every key of ``init_params`` (with the model's guide) and of
    ``init_params_per_cell`` where the model overrides it (with
    ``guide="mean_field"``) passes the check :func:`lvmzoo.fit` makes before
    its first step (:func:`lvmzoo.infer.svi.start_params`): it names a
    ``numpyro.param`` (or Flax) site of the model or a guide, or a global
    latent sample site, with that site's shape.  When it fails, the fits the
    driver then refuses (``fit``, ``guide:<name>``) are skipped, not failed
    again.
``fit``
    A 3-epoch fit (minibatches of 16) runs and its losses are finite.
``latent_shape``
    ``model.latent(params, batch, key)`` is ``(B, n_latent)`` (2-D, first
    dimension ``B``; ``n_latent`` where the model has that field) and finite,
    and ``FittedModel.latent`` gives ``(n_cells, n_latent)``.
``log_likelihood``
    Where ``log_likelihood`` is not ``None``: compared with 256 importance
    samples from the guide of a 40-epoch fit (the weights of
    :func:`lvmzoo.infer.evaluate.log_weights`, in which a latent the guide
    leaves to its prior has the prior as its proposal), per-cell averages.  The IWAE estimate is a lower bound in expectation, so it may
    not exceed ``log_likelihood`` by more than ``3`` Monte Carlo standard
    errors + ``0.05`` nats/cell; ``log_likelihood`` may not exceed it by more
    than :data:`LOG_LIKELIHOOD_TOLERANCE` (0.5 nats/cell) + 3 standard errors
    (the proposal is the model's own guide after a short fit: a loose bound); and the
    ELBO may not exceed ``log_likelihood`` by more than 3 standard errors +
    ``0.05`` nats/cell.
``save_load``
    ``fitted.save(path)`` / :func:`lvmzoo.load_model` round trip: latent
    bit-for-bit identical after loading.  Skipped (with the reason) for a
    model class that loading cannot rebuild because it is not registered.
``reproducible``
    Two 2-epoch fits with the same seed: bit-identical parameters.
``no_retracing``
    The model's ``model`` function is traced as often in a 2-epoch fit as in
    a 3-epoch fit (the driver compiles each epoch program once, ahead of
    time); a jitted ELBO that takes the model as a static argument (as
    :mod:`lvmzoo.infer.results` does), called with three equal copies of the
    model and minibatches of one shape, traces only on the first call;
    ``FittedModel.latent`` traces at most once in three calls; the model's
    fields (and hash) do not change while it runs.
``guide:<name>``
    A 1-epoch fit with each named guide the model claims (``guides=``, else
    the class attribute ``supported_guides``, else ``("mean_field", "map")``)
    runs with finite losses.
``nuts``
    Only with ``nuts=True`` or a class attribute ``supports_nuts = True``: a
    tiny NUTS run (1 chain, 20 warm-up, 20 draws, 16 cells, point-estimated
    params held at the fitted values) gives finite draws of every latent site.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from lvmzoo.cache import UNOPTIMISED_COMPILER_OPTIONS
from lvmzoo.infer.evaluate import log_weights

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
DEFAULT_GUIDES = ("mean_field", "map")
N_CELLS = 64  # cells the checks run on
BATCH_SIZE = 16  # minibatch of the fits and of the scaling check
PLATE_SIZES = (12, 20)  # two minibatch sizes: a site whose shape follows them is per cell
IS_SAMPLES = 256
LOG_LIKELIHOOD_EPOCHS = 40  # fit whose guide is the importance-sampling proposal
LOG_LIKELIHOOD_TOLERANCE = 0.5  # nats per cell, exact above the importance-sampled estimate
SCALING_RTOL, SCALING_ATOL = 1e-4, 1e-2
# The checks' fits and programs run on a few dozen cells, where compiling is nearly all the
# time: they compile without LLVM's optimisations (empty cache, one core: the batteries of
# scVI, SCANVI, totalVI, CPA and a small user model 195 -> 120 s; FittedModel's own
# programs, latent and evaluate, compile as usual).
COMPILER_OPTIONS = UNOPTIMISED_COMPILER_OPTIONS


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str  # "passed" / "failed" / "skipped"
    message: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_model` found: one :class:`CheckResult` per check, in order."""

    model: str
    results: list[CheckResult] = dataclasses.field(default_factory=list)

    def add(self, name: str, status: str, message: str = "", seconds: float = 0.0) -> None:
        self.results.append(CheckResult(name, status, message, seconds))

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.results] + [5])
        lines = [f"check_model({self.model}): {len(self.failures)} failed, "
                 f"{sum(r.status == PASSED for r in self.results)} passed, "
                 f"{sum(r.status == SKIPPED for r in self.results)} skipped",
                 f"{'check':<{width}}  {'status':<7}  {'s':>5}  message", "-" * (width + 110)]
        for r in self.results:
            text = textwrap.wrap(r.message, 96) or [""]
            lines.append(f"{r.name:<{width}}  {r.status:<7}  {r.seconds:5.1f}  {text[0]}")
            lines += [f"{'':<{width}}  {'':<7}  {'':>5}  {t}" for t in text[1:]]
        return "\n".join(lines)


class ModelCheckError(AssertionError):
    """A model failed :func:`check_model`; the message lists every failure."""

    def __init__(self, report: CheckReport):
        self.report = report
        items = "\n".join(f"  - {r.name}: {r.message}" for r in report.failures)
        super().__init__(f"{report.model} fails {len(report.failures)} model check(s):\n{items}"
                         f"\n\n{report}")


class _Failed(Exception):
    """Raised inside a check: the check failed with this message."""


class _Skipped(Exception):
    """Raised inside a check: the check does not apply (the message says why)."""


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def check_model(model, data, *, guides: Optional[Sequence[str]] = None,
                nuts: Optional[bool] = None, seed: int = 0, raise_on_failure: bool = True,
                n_cells: int = N_CELLS) -> CheckReport:
    """Run the conformance battery (module docstring) on ``model`` and ``data``.

    Args:
      model: a zoo model instance (a :class:`~lvmzoo.models.base.LatentModel`).
      data: registered cells (:func:`lvmzoo.setup_anndata`) the model can be
        fitted to; at most ``n_cells`` random ones are used.
      guides: named guides to try (default: the class attribute
        ``supported_guides``, else ``("mean_field", "map")``); ``()`` for none.
      nuts: run the NUTS check; ``None``: iff the class says ``supports_nuts = True``.
      seed: seeds the cell sample, the fits and every draw.
      raise_on_failure: raise :class:`ModelCheckError` if any check failed.

    Returns:
      A :class:`CheckReport` (``print`` it for a table).
    """
    from lvmzoo.infer.svi import fits_compiled_with

    ctx = _Context(model, data, seed, n_cells)
    report = CheckReport(getattr(model, "name", type(model).__name__))
    run = functools.partial(_run, report)
    with fits_compiled_with(COMPILER_OPTIONS):
        _run_checks(ctx, report, run, guides, nuts)
    if raise_on_failure and not report.ok:
        raise ModelCheckError(report)
    return report


def _run_checks(ctx, report, run, guides, nuts) -> None:
    model = ctx.model
    run("guide_covers_latents", lambda: _check_guide_covers_latents(ctx))
    run("cells_plate", lambda: _check_cells_plate(ctx))
    run("init_params_keys", lambda: _check_init_params(ctx))
    run("fit", lambda: _check_fit(ctx))
    run("minibatch_scaling", lambda: _check_minibatch_scaling(ctx))
    run("latent_shape", lambda: _check_latent(ctx))
    run("log_likelihood", lambda: _check_log_likelihood(ctx))
    run("save_load", lambda: _check_save_load(ctx))
    run("reproducible", lambda: _check_reproducible(ctx))
    run("no_retracing", lambda: _check_retracing(ctx))
    if guides is None:
        guides = getattr(type(model), "supported_guides", DEFAULT_GUIDES)
    for name in guides:
        run(f"guide:{name}", lambda name=name: _check_named_guide(ctx, name))
    if nuts is None:
        nuts = bool(getattr(type(model), "supports_nuts", False))
    if nuts:
        run("nuts", lambda: _check_nuts(ctx))
    else:
        report.add("nuts", SKIPPED, "not requested (nuts=True, or a class attribute "
                                    "supports_nuts = True)")


def assert_model_conforms(model, data, **kwargs) -> CheckReport:
    """pytest helper: :func:`check_model`, raising :class:`ModelCheckError` on any failure."""
    __tracebackhide__ = True  # noqa: F841  (pytest shows the caller's line)
    kwargs["raise_on_failure"] = True
    return check_model(model, data, **kwargs)


def _run(report: CheckReport, name: str, check: Callable[[], Optional[str]]) -> None:
    started = time.perf_counter()
    add = lambda status, message: report.add(  # noqa: E731
        name, status, message, time.perf_counter() - started)
    try:
        message = check()
    except _Skipped as skip:
        add(SKIPPED, str(skip))
    except _Failed as failure:
        add(FAILED, str(failure))
    except Exception as error:  # a check crashing is a finding too: report, go on
        where = traceback.extract_tb(error.__traceback__)[-1]
        add(FAILED, f"raised {type(error).__name__}: {_short(error)} (at "
                    f"{Path(where.filename).name}:{where.lineno}); the model cannot run this "
                    "step; fix the error above")
    else:
        add(PASSED, message or "")


def _short(error, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


# --------------------------------------------------------------------------
# Shared state: the cells, batches, traces and fits the checks reuse
# --------------------------------------------------------------------------


class _Counter:
    """Counts Python calls (traces, under jit) of a model's methods."""

    def __init__(self):
        self.counts = {"model": 0, "guide": 0, "latent": 0}

    def wrap(self, name, method):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return method(*args, **kwargs)

        counted.__name__ = getattr(method, "__name__", name)
        counted.__wrapped__ = method
        return counted


def _counting_copy(model):
    """A shallow copy of ``model`` (same fields, same hash) whose methods count their calls."""
    counter = _Counter()
    twin = copy.copy(model)
    for name in counter.counts:
        object.__setattr__(twin, name, counter.wrap(name, getattr(twin, name)))
    return twin, counter


class _Context:
    def __init__(self, model, data, seed: int, n_cells: int):
        from lvmzoo.data.source import DeviceSource

        self.model, self.seed = model, seed
        if data.n_cells > n_cells:
            rng = np.random.default_rng(seed)
            data = data.subset(np.sort(rng.choice(data.n_cells, n_cells, replace=False)))
        self.data = data.to_memory() if data.is_backed else data
        # As lvmzoo.fit does: settings that name data (a root category, marker genes) are
        # resolved against it first, else every check that runs the model directly fails.
        for_data = getattr(model, "for_data", None)
        self.model = for_data(self.data) if callable(for_data) else model
        self.n = self.data.n_cells
        self.source = DeviceSource(self.data)
        self._gather = jax.jit(self.source.gather, compiler_options=COMPILER_OPTIONS)
        self.key = jax.random.PRNGKey(seed)
        self._fit = None
        self._fit_error = None
        self._initial = None
        self.init_params_failed = False  # set by init_params_keys: fits then refuse to start

    def batch(self, index, training: bool = True):
        """Cells ``index`` as a minibatch of the ``n`` cells (plate subsampled when smaller)."""
        index = jnp.asarray(np.asarray(index), jnp.int32)
        return self._gather(self.source.arrays, index).replace(training=training)

    def full_batch(self):
        """All cells, evaluation mode, plate not rescaled."""
        return self.source.full_batch()

    def minibatch_size(self, size):
        return min(size, self.n)

    def params(self):
        """The base fit's params, or (if it failed) those a fit starts from."""
        try:
            return self.base_fit().params
        except _Skipped:
            return self.initial_params()

    def initial_params(self):
        if self._initial is None:
            from lvmzoo.infer.svi import InitParamsError, _all_params, initial_params_of

            try:
                self._initial = initial_params_of(self.model, self.data, batch_size=BATCH_SIZE,
                                                  seed=self.seed)
            except InitParamsError:  # reported by init_params_keys; the sites' defaults do here
                import optax
                from numpyro.infer import SVI

                svi = SVI(self.model.model, self.model.guide, optax.identity(),
                          loss=self.model.elbo())
                batch = self.batch(np.arange(self.minibatch_size(BATCH_SIZE)))
                self._initial = _all_params(svi, svi.init(self.key, batch))
        return self._initial

    def fit(self, **kwargs):
        import lvmzoo

        options = dict(epochs=3, batch_size=BATCH_SIZE, seed=self.seed, progress=False)
        options.update(kwargs)
        model = options.pop("model", self.model)
        return lvmzoo.fit(model, self.data, **options)

    def base_fit(self):
        """The 3-epoch fit (counted model) the later checks use; raises _Skipped if it failed."""
        if self._fit is None and self._fit_error is None:
            twin, counter = _counting_copy(self.model)
            try:
                self._fit = self.fit(model=twin)
                self.counter = counter
            except Exception as error:  # reported by the "fit" check
                self._fit_error = error
        if self._fit_error is not None:
            raise _Skipped(f"needs a fit, and the fit failed (see 'fit'): "
                           f"{type(self._fit_error).__name__}")
        return self._fit


def _trace(fn, batch, seed=0, params=None):
    """The NumPyro trace of ``fn(batch)``, run abstractly (shapes, not values: nothing compiles)."""
    box = {}

    def run(key):
        with handlers.block():
            program = handlers.seed(fn, key)
            if params is not None:
                program = handlers.substitute(program, data=params)
            box["trace"] = handlers.trace(program).get_trace(batch)
        return 0

    jax.eval_shape(run, jax.random.PRNGKey(seed))
    return box["trace"]


def _is_latent(site) -> bool:
    return (site["type"] == "sample" and not site["is_observed"]
            and not site["infer"].get("is_auxiliary")
            and site["infer"].get("enumerate") != "parallel")


def _in_cells(site) -> bool:
    return any(frame.name == "cells" for frame in site["cond_indep_stack"])


def _support_kind(constraint) -> str:
    """A rough name of a support: ``real``, ``positive``, ``simplex``, ``discrete``, ..."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    if isinstance(constraint, type(constraints.real)):
        return "real"
    if isinstance(constraint, constraints.greater_than):
        bound = np.asarray(constraint.lower_bound)
        return "positive" if bound.size == 1 and float(bound) == 0.0 else "greater_than"
    if isinstance(constraint, constraints.interval):
        return "interval"
    if constraint is constraints.simplex or type(constraint) is type(constraints.simplex):
        return "simplex"
    if getattr(constraint, "is_discrete", False):
        return "discrete"
    return type(constraint).__name__.strip("_")


def _closest(name, names) -> str:
    match = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _shape(value):
    return tuple(np.shape(value))


def _refuses_start(error) -> bool:
    """Whether a fit failed on the model's start values (names or shapes of init_params)."""
    from lvmzoo.infer.svi import InitParamsError

    return isinstance(error, InitParamsError)


# --------------------------------------------------------------------------
# 1. The guide covers every latent site
# --------------------------------------------------------------------------


def _check_guide_covers_latents(ctx: _Context) -> str:
    model = ctx.model
    batch = ctx.batch(np.arange(ctx.minibatch_size(PLATE_SIZES[0])))
    model_trace = _trace(model.model, batch, ctx.seed)
    guide_trace = _trace(model.guide, batch, ctx.seed)
    latents = {n: s for n, s in model_trace.items() if _is_latent(s)}
    drawn = {n: s for n, s in guide_trace.items()
             if s["type"] == "sample" and not s["is_observed"]
             and not s["infer"].get("is_auxiliary")}
    problems = []
    for name, site in latents.items():
        if name not in drawn:
            where = "inside `with cell_plate(batch):` " if _in_cells(site) else ""
            problems.append(
                f"the guide has no sample site for the model's latent {name!r} (shape "
                f"{_shape(site['value'])}, support {_support_kind(site['fn'].support)}): the "
                f"ELBO then has no variational posterior for it; add numpyro.sample({name!r}, "
                f"...) to guide() {where}or fit with a named guide (guide='mean_field')")
            continue
        g = drawn[name]
        model_event, guide_event = len(site["fn"].event_shape), len(g["fn"].event_shape)
        if model_event != guide_event:
            problems.append(f"site {name!r}: the guide's distribution has {guide_event} event "
                            f"dimension(s), the model's {model_event} (NumPyro refuses to fit "
                            "it): declare the site with the same .to_event(...) in both, per-cell "
                            "dimensions as batch dimensions inside the cells plate")
        if _shape(g["value"]) != _shape(site["value"]):
            problems.append(f"site {name!r}: the guide draws shape {_shape(g['value'])} but the "
                            f"model's has shape {_shape(site['value'])}; give the guide's "
                            "distribution the model's batch and event shape (.to_event(...))")
        model_kind, guide_kind = _support_kind(site["fn"].support), _support_kind(g["fn"].support)
        if model_kind != guide_kind:
            problems.append(
                f"site {name!r}: the guide's support is {guide_kind} but the model's is "
                f"{model_kind}; guide draws outside the model's support have log p = -inf (NaN "
                f"losses): use a guide distribution on the {model_kind} support (e.g. LogNormal "
                "for positive values)")
    for name in drawn:
        if name not in model_trace:
            problems.append(f"the guide samples {name!r}, which the model has no site for"
                            f"{_closest(name, latents)}; guide and model sites pair by name")
    if problems:
        raise _Failed("; ".join(problems))
    return f"{len(latents)} latent site(s) covered: {', '.join(latents) or 'none'}"


# --------------------------------------------------------------------------
# 2. Per-cell sites are inside the "cells" plate
# --------------------------------------------------------------------------


def _check_cells_plate(ctx: _Context) -> str:
    sizes = [ctx.minibatch_size(s) for s in PLATE_SIZES]
    if sizes[0] == sizes[1]:
        raise _Skipped(f"needs more than {sizes[0]} cells")
    problems, per_cell = [], set()
    for program in ("model", "guide"):
        fn = getattr(ctx.model, program)
        traces = [_trace(fn, ctx.batch(np.arange(s)), ctx.seed) for s in sizes]
        for name, site in traces[0].items():
            if site["type"] == "plate" and name == "cells" and site["args"][0] != ctx.n:
                problems.append(
                    f"the {program}'s 'cells' plate has size {site['args'][0]}, not "
                    f"batch.n_cells = {ctx.n}: minibatch log-densities are then not scaled by "
                    "n_cells / B; use `with cell_plate(batch):` (lvmzoo.models.cell_plate)")
            if site["type"] != "sample" or name not in traces[1]:
                continue
            other = traces[1][name]
            follows = (_shape(site["value"]) != _shape(other["value"])
                       or tuple(site["fn"].batch_shape) != tuple(other["fn"].batch_shape))
            if not follows:
                continue
            per_cell.add(name)
            if not _in_cells(site):
                kind = ("factor" if site["is_observed"] and site["fn"].__class__.__name__ == "Unit"
                        else "observed site" if site["is_observed"] else "latent site")
                problems.append(
                    f"the {program}'s {kind} {name!r} has one entry per cell (shape "
                    f"{_shape(site['value'])} with {sizes[0]} cells, "
                    f"{_shape(other['value'])} with {sizes[1]}) but is outside the 'cells' "
                    f"plate, so it is not rescaled by n_cells / B; put it inside `with "
                    "cell_plate(batch):`")
    if problems:
        raise _Failed("; ".join(problems))
    return f"per-cell sites all inside the plate: {', '.join(sorted(per_cell)) or 'none'}"


# --------------------------------------------------------------------------
# 3. Minibatch log-joint is an unbiased estimate of the full-data one
# --------------------------------------------------------------------------


def _site_terms(trace) -> dict[str, jax.Array]:
    """Scaled log-density of every sample site: ``scale * sum(log_prob)``."""
    terms = {}
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        log_prob = site["fn"].log_prob(site["value"])
        scale = 1.0 if site["scale"] is None else site["scale"]
        terms[name] = jnp.sum(log_prob * scale)
    return terms


def _latent_draw(model):
    """Jitted ``(params, batch, key) -> ({site: value}, {site: scaled log-density})``: one
    draw of every latent, from the guide where it has the site and from the model (prior)
    elsewhere, and the log-joint terms at it."""

    def draw(params, batch, key, use_guide):
        key_guide, key_model = jax.random.split(key)
        program = handlers.substitute(model.model, data=params)
        if use_guide:
            guide = handlers.seed(handlers.substitute(model.guide, data=params), key_guide)
            program = handlers.replay(program, handlers.trace(guide).get_trace(batch))
        trace = handlers.trace(handlers.seed(program, key_model)).get_trace(batch)
        values = {n: s["value"] for n, s in trace.items()
                  if s["type"] == "sample" and not s["is_observed"]}
        return values, _site_terms(trace)

    return jax.jit(draw, static_argnums=3, compiler_options=COMPILER_OPTIONS)


def _log_joint_terms(model):
    """Jitted ``(params, batch) -> {site: scaled log-density}`` with latents in ``params``."""

    def terms(params, batch):
        with handlers.block():
            program = handlers.seed(handlers.substitute(model.model, data=params), 0)
            return _site_terms(handlers.trace(program).get_trace(batch))

    return jax.jit(terms, compiler_options=COMPILER_OPTIONS)


def _check_minibatch_scaling(ctx: _Context) -> str:
    b = ctx.minibatch_size(BATCH_SIZE)
    if b >= ctx.n or ctx.n % b:
        raise _Skipped(f"needs a number of cells that {BATCH_SIZE} divides, above it (have {ctx.n})")
    model = ctx.model
    params = ctx.params()
    full = ctx.batch(np.arange(ctx.n), training=False)
    draw = _latent_draw(model)
    try:
        values, full_terms = draw(params, full, ctx.key, True)
    except Exception:  # a guide that cannot run on all cells: prior draws (see the guide check)
        values, full_terms = draw(params, full, ctx.key, False)
    # Which axis of each latent runs over the cells: the one whose size follows B.
    mini = _trace(model.model, ctx.batch(np.arange(b), training=False), ctx.seed, params=params)
    axes = {}
    for name, value in values.items():
        small = _shape(mini[name]["value"]) if name in mini else _shape(value)
        differ = [i for i, (p, q) in enumerate(zip(_shape(value), small)) if p != q]
        if len(small) != len(_shape(value)) or len(differ) > 1:
            raise _Failed(f"latent {name!r} has shape {_shape(value)} for {ctx.n} cells and "
                          f"{small} for {b}: only one axis may follow the number of cells")
        axes[name] = differ[0] if differ else None
    log_joint = _log_joint_terms(model)
    to_float = lambda terms: {k: float(v) for k, v in terms.items()}  # noqa: E731
    full_terms = to_float(full_terms)
    order = np.random.default_rng(ctx.seed).permutation(ctx.n)
    parts = order.reshape(-1, b)
    sums: dict[str, float] = {}
    magnitude: dict[str, float] = {}
    for part in parts:
        part = np.sort(part)
        sliced = {n: v if axes[n] is None else jnp.take(v, jnp.asarray(part), axis=axes[n])
                  for n, v in values.items()}
        terms = to_float(log_joint({**params, **sliced}, ctx.batch(part, training=False)))
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
            magnitude[name] = magnitude.get(name, 0.0) + abs(value)
    m = len(parts)
    problems = []
    for name, total in full_terms.items():
        if name not in sums:
            problems.append(f"site {name!r} is in the full-data trace but not in a minibatch's")
            continue
        average = sums[name] / m
        tolerance = SCALING_RTOL * (magnitude[name] / m + abs(total)) + SCALING_ATOL
        if abs(average - total) <= tolerance:
            continue
        ratio = ctx.n / b
        if abs(average - total / m) <= tolerance + SCALING_RTOL * abs(total):
            hint = (f"its minibatch terms are not multiplied by n_cells / B = {ratio:g}: a "
                    "per-cell site outside the 'cells' plate; put it inside `with "
                    "cell_plate(batch):`")
        elif abs(average - ratio * total) <= tolerance + SCALING_RTOL * abs(ratio * total):
            hint = (f"it is multiplied by n_cells / B = {ratio:g} although it does not depend "
                    "on the cells: a global site (or factor) inside the 'cells' plate; move it "
                    "out")
        else:
            hint = ("the minibatch estimate is biased (a term that depends on the minibatch "
                    "size, or per-cell values computed from other cells?)")
        problems.append(f"site {name!r}: full-data log-density {total:.6g}, average over {m} "
                        f"minibatches of {b} cells {average:.6g}; {hint}")
    if problems:
        raise _Failed("; ".join(problems))
    return (f"average of {m} scaled minibatch log-joints equals the full-data log-joint "
            f"({sum(full_terms.values()):.6g}) site by site (rtol {SCALING_RTOL:g}, atol "
            f"{SCALING_ATOL:g})")


# --------------------------------------------------------------------------
# 11. init_params names real parameters
# --------------------------------------------------------------------------


def _check_init_params(ctx: _Context) -> str:
    import optax
    from numpyro.infer import SVI

    from lvmzoo.infer.guides import make_guide
    from lvmzoo.infer.svi import InitParamsError, initial_shapes, start_method, start_params
    from lvmzoo.models.base import LatentModel

    model = ctx.model
    sample = ctx.batch(np.arange(ctx.n))
    sample = sample.replace(n_cells=sample.size)  # as the driver's init sample
    mini = ctx.batch(np.arange(ctx.minibatch_size(BATCH_SIZE)))
    # The same check lvmzoo.fit runs before its first step: init_params with the model's
    # guide, and an overridden init_params_per_cell with a per-cell named guide.
    guides = [("the model's guide", model.guide)]
    if type(model).init_params_per_cell is not LatentModel.init_params_per_cell:
        guides.append(("guide='mean_field'", make_guide("mean_field", model)))
    problems, found = [], set()
    for label, guide in guides:
        svi = SVI(model.model, guide, optax.identity(), loss=model.elbo())
        method = start_method(svi, mini)
        start = getattr(model, method)(sample, ctx.key)
        try:
            fresh = initial_shapes(svi, mini, ctx.key) if start else None
            start_params(svi, model, mini, start, method, fresh, ctx.key)
        except InitParamsError as error:
            problems.append(f"with {label}, {error}")
            continue
        found.update(start or {})
    if problems:
        ctx.init_params_failed = True
        raise _Failed("; ".join(problems) + "; lvmzoo.fit refuses to start until it is fixed")
    if not found:
        return "init_params returns None (the model's defaults)"
    return f"keys name sites of the model or its guides: {', '.join(sorted(found))}"


# --------------------------------------------------------------------------
# The fit, the latent, the log-likelihood
# --------------------------------------------------------------------------


def _check_fit(ctx: _Context) -> str:
    try:
        fitted = ctx.base_fit()
    except _Skipped:
        error = ctx._fit_error
        if ctx.init_params_failed and _refuses_start(error):
            raise _Skipped("lvmzoo.fit refuses the start values init_params_keys reports") from None
        raise _Failed(f"lvmzoo.fit(epochs=3, batch_size={BATCH_SIZE}) raised "
                      f"{type(error).__name__}: {_short(error)}") from None
    loss = np.asarray(fitted.history["loss"])
    if not np.all(np.isfinite(loss)):
        raise _Failed(f"non-finite loss in a 3-epoch fit: {loss.tolist()}")
    return f"3 epochs, losses {', '.join(f'{v:.4g}' for v in loss)} nats/cell"


def _check_latent(ctx: _Context) -> str:
    fitted = ctx.base_fit()
    model = ctx.model
    b = ctx.minibatch_size(PLATE_SIZES[0])
    batch = ctx.batch(np.arange(b), training=False)
    z = model.latent(fitted.params, batch, ctx.key)
    shape = _shape(z)
    n_latent = getattr(model, "n_latent", None)
    problems = []
    if len(shape) != 2 or shape[0] != b:
        fix = ("return z[:, None] for one dimension" if shape == (b,) else
               "put the cells on axis 0 and the latent dimensions on axis 1")
        problems.append(f"model.latent returned shape {shape} for B = {b} cells; it must be "
                        f"(B, n_latent), 2-D with the cells first: {fix}")
    elif isinstance(n_latent, int) and shape[1] != n_latent:
        problems.append(f"model.latent returned {shape[1]} dimensions but the model's n_latent "
                        f"is {n_latent}")
    elif not np.all(np.isfinite(np.asarray(z))):
        problems.append("model.latent returned non-finite values")
    if not problems:
        full = fitted.latent(ctx.data)
        if _shape(full) != (ctx.n, shape[1]):
            problems.append(f"FittedModel.latent gave {_shape(full)}, not ({ctx.n}, {shape[1]})")
    if problems:
        raise _Failed("; ".join(problems))
    return f"(B, K) = {shape}"


def _importance_program(model, guide, n_samples):
    def run(params, batch, key):
        keys = jax.random.split(key, n_samples)
        return jax.lax.map(lambda k: log_weights(model.model, guide, params, batch, k), keys,
                           batch_size=16)

    return jax.jit(run, compiler_options=COMPILER_OPTIONS)


def _check_log_likelihood(ctx: _Context) -> str:
    model = ctx.model
    batch = ctx.full_batch()
    # Compiled, as FittedModel.log_likelihood runs it (run as it is, each operation compiled
    # a program of its own: ~70 for a small Gaussian model, 2 s of a 4 s check).
    log_likelihood = jax.jit(model.log_likelihood, compiler_options=COMPILER_OPTIONS)
    if log_likelihood(ctx.base_fit().params, batch) is None:
        raise _Skipped("log_likelihood returns None (no closed form)")
    # A longer fit than the others: the guide is the importance sampler's proposal.
    fitted = ctx.fit(epochs=LOG_LIKELIHOOD_EPOCHS)
    exact = log_likelihood(fitted.params, batch)
    if _shape(exact) != (ctx.n,):
        raise _Failed(f"log_likelihood returned shape {_shape(exact)} for {ctx.n} cells; it must "
                      "be per cell, (B,)")
    exact = np.asarray(exact, np.float64)
    if not np.all(np.isfinite(exact)):
        raise _Failed("log_likelihood returned non-finite values")
    weights = np.asarray(_importance_program(model, fitted.guide, IS_SAMPLES)(
        fitted.params, batch, jax.random.fold_in(ctx.key, 5)), np.float64)  # (S, B)
    if not np.all(np.isfinite(weights)):
        raise _Failed("the importance weights log p(x, z) - log q(z | x) are not finite")
    s = weights.shape[0]
    sampled = np.logaddexp.reduce(weights, axis=0) - np.log(s)
    groups = [np.mean(np.logaddexp.reduce(g, axis=0) - np.log(len(g)))
              for g in np.split(weights, 4)]
    se_sampled = float(np.std(groups, ddof=1) / 2.0)  # of a quarter's estimate, /sqrt(4)
    elbo = weights.mean()
    se_elbo = float(np.std(weights.mean(axis=1), ddof=1) / np.sqrt(s))
    mean_exact, mean_sampled = float(exact.mean()), float(sampled.mean())
    summary = (f"exact {mean_exact:.4f}, importance-sampled ({s} draws) {mean_sampled:.4f}, "
               f"ELBO {elbo:.4f} nats/cell")
    problems = []
    if mean_sampled > mean_exact + 3 * se_sampled + 0.05:
        problems.append(f"the importance-sampled estimate, a lower bound on log p(x) in "
                        f"expectation, exceeds log_likelihood by {mean_sampled - mean_exact:.3g} "
                        "nats/cell: log_likelihood is too low (a missing term or constant?)")
    if mean_exact > mean_sampled + LOG_LIKELIHOOD_TOLERANCE + 3 * se_sampled:
        problems.append(f"log_likelihood exceeds the importance-sampled estimate by "
                        f"{mean_exact - mean_sampled:.3g} nats/cell (tolerance "
                        f"{LOG_LIKELIHOOD_TOLERANCE}): it is too high (an extra constant, a "
                        "wrong normaliser?), or the model's own guide is a very poor proposal")
    if elbo > mean_exact + 3 * se_elbo + 0.05:
        problems.append(f"the ELBO ({elbo:.4f}) exceeds log_likelihood by "
                        f"{elbo - mean_exact:.3g} nats/cell, but it is a lower bound of it")
    if problems:
        raise _Failed(summary + ": " + "; ".join(problems))
    return summary


# --------------------------------------------------------------------------
# 6. Save and load
# --------------------------------------------------------------------------


def _one_class(a: type, b: type) -> bool:
    # The same source imported twice (by name and, for a saved run, by path) is one class.
    try:
        from lvmzoo.models.registry import same_model_class
    except ImportError:
        return a is b
    return same_model_class(a, b)


@contextlib.contextmanager
def _registered(cls):
    """Register ``cls`` for loading by name while the block runs (where the zoo allows)."""
    import lvmzoo.models as zoo

    registry = getattr(zoo, "MODELS", None)
    before = dict(registry) if isinstance(registry, dict) else None
    register = getattr(zoo, "register_model", None) or getattr(
        __import__("lvmzoo"), "register_model", None)
    try:
        if register is not None and registry is not None and registry.get(cls.name) is not cls:
            register(cls)
        yield
    finally:
        if before is not None:
            registry.clear()
            registry.update(before)


def _check_save_load(ctx: _Context) -> str:
    import lvmzoo
    import lvmzoo.models as zoo

    fitted = ctx.base_fit()
    cls = type(ctx.model)
    taken = getattr(zoo, "MODELS", {}).get(cls.name)
    if taken is not None and not _one_class(taken, cls):
        raise _Failed(f"model.name {cls.name!r} is already registered to "
                      f"{taken.__module__}.{taken.__qualname__}: a saved run would load as that "
                      "class; give the model a name of its own")
    registered = taken is not None
    with _registered(cls), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        fitted.save(path)
        try:
            loaded = lvmzoo.load_model(path)
        except Exception as error:
            if not registered and cls.name not in getattr(zoo, "MODELS", {}):
                raise _Skipped(f"{cls.__qualname__} is not registered in lvmzoo.models.MODELS, "
                               f"so load_model cannot rebuild it by name ({type(error).__name__}: "
                               f"{_short(error, 160)}); register the class to check the round "
                               "trip") from None
            raise
    # fitted.model: the model as fitted (for_data may have resolved data-dependent settings).
    if type(loaded.model) is not cls or loaded.model != fitted.model:
        raise _Failed(f"load_model rebuilt {loaded.model!r}, not {fitted.model!r}: config() must "
                      "give back the constructor's arguments")
    before, after = fitted.latent(ctx.data), loaded.latent(ctx.data)
    if not np.array_equal(before, after):
        raise _Failed(f"the latent differs after loading (max |diff| "
                      f"{np.max(np.abs(before - after)):.3g}); every parameter the latent reads "
                      "must be a param / Flax site saved in fitted.params")
    return "latent bit-for-bit identical after fitted.save / lvmzoo.load_model"


# --------------------------------------------------------------------------
# 7. Reproducible; 8. no retracing
# --------------------------------------------------------------------------


def _two_epoch_fits(ctx: _Context):
    ctx.base_fit()  # skips when the model cannot be fitted at all
    if not hasattr(ctx, "_two"):
        twin, counter = _counting_copy(ctx.model)
        first = ctx.fit(model=twin, epochs=2)
        second = ctx.fit(epochs=2)
        ctx._two = (first, second, counter)
    return ctx._two


def _check_reproducible(ctx: _Context) -> str:
    first, second, _ = _two_epoch_fits(ctx)
    a, b = first.params, second.params
    if set(a) != set(b):
        raise _Failed(f"two fits with seed {ctx.seed} have different param sites: "
                      f"{sorted(set(a) ^ set(b))}")
    differ = []
    for name in sorted(a):
        leaves_a, leaves_b = jax.tree.leaves(a[name]), jax.tree.leaves(b[name])
        if len(leaves_a) != len(leaves_b) or not all(
                np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)):
            differ.append(name)
    if differ:
        raise _Failed(f"two 2-epoch fits with seed {ctx.seed} end with different values of "
                      f"{', '.join(differ)}: the model depends on something besides its "
                      "hyperparameters, the data and the PRNG keys numpyro hands it (Python-side "
                      "state, numpy's global random state, time)")
    return f"two 2-epoch fits, seed {ctx.seed}: params bit-for-bit identical"


def _fields(model):
    try:
        return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    except TypeError:
        return {}


def _check_retracing(ctx: _Context) -> str:
    fitted = ctx.base_fit()
    three = ctx.counter.counts["model"]
    _, _, counter_two = _two_epoch_fits(ctx)
    two = counter_two.counts["model"]
    problems = []
    if three != two:
        problems.append(f"model() was traced {two} times in a 2-epoch fit and {three} times in a "
                        "3-epoch fit: the fit re-traces it as epochs go on; nothing a program "
                        "traces may change between epochs")
    twin = fitted.model  # the counting copy
    try:
        start_hash, start_fields = hash(twin), dict(_fields(twin))
    except TypeError as error:
        raise _Failed(f"the model is not hashable ({_short(error, 120)}); jitted entry points "
                      "(FittedModel.latent/evaluate, @compiled) take it as a static argument: "
                      "make every field hashable (tuples, not lists or arrays)") from None
    counter = ctx.counter
    # A jitted ELBO with the model as a static argument, as lvmzoo.infer.results jits latent
    # and evaluate, called on equal copies of the model (a loaded model, another FittedModel,
    # dataclasses.replace): equal models must share one trace.  Only lowered: tracing is
    # what is counted, nothing is compiled.
    loss = jax.jit(lambda m, params, batch, key: m.elbo().loss(key, params, m.model, m.guide,
                                                               batch), static_argnums=0)
    b = ctx.minibatch_size(BATCH_SIZE)
    traces = []
    for step in range(3):
        before = counter.counts["model"]
        cells = (np.arange(b) + step * b) % ctx.n
        loss.lower(copy.copy(twin), fitted.params, ctx.batch(cells),
                   jax.random.fold_in(ctx.key, step))
        # The first call traces (an enumerating ELBO traces model() more than once); later
        # calls with inputs of the same shapes must trace nothing.
        traces.append(counter.counts["model"] - before)
    if any(traces[1:]):
        problems.append(f"a jitted ELBO taking the model as a static argument traced model() "
                        f"again on every call ({traces} traces in 3 calls with equal copies of "
                        f"the model and minibatches of {b} cells, one shape): every program "
                        "keyed on the model (FittedModel.latent / evaluate, @compiled) is "
                        "traced and compiled anew for each model object")
    traces = []
    for _ in range(3):
        before = counter.counts["latent"]
        fitted.latent(ctx.data)
        traces.append(counter.counts["latent"] - before)
    if any(traces[1:]):
        problems.append(f"FittedModel.latent traced model.latent again on every call ({traces} "
                        "traces in 3 calls on the same cells)")
    end_fields = _fields(twin)
    changed = [f"{k}: {start_fields[k]!r} -> {end_fields.get(k)!r}" for k in start_fields
               if end_fields.get(k) is not start_fields[k]
               and not _same(end_fields.get(k), start_fields[k])]
    if hash(twin) != start_hash or changed:
        problems.append(f"the model changed while it ran (field {'; '.join(changed) or '?'}): "
                        "a compiled program keeps the value it saw when it was traced (the "
                        "fit's epochs never see the new one), and jit caches keyed on the "
                        "model's hash miss for every other copy of it, so they retrace; keep no "
                        "Python-side state (counters, caches) on the model: pass what varies "
                        "through the Batch (e.g. batch.epoch) or numpyro.mutable state")
    if problems:
        raise _Failed("; ".join(problems))
    return (f"model() traced {two} times in a 2-epoch fit, {three} in a 3-epoch fit; static-model "
            "ELBO and latent compile once")


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


# --------------------------------------------------------------------------
# 9. Named guides; 10. NUTS
# --------------------------------------------------------------------------


def _check_named_guide(ctx: _Context, name: str) -> str:
    from lvmzoo.infer.guides import GUIDES, JOINT

    if name not in GUIDES:
        raise _Failed(f"unknown guide name {name!r} (in supported_guides / guides=); names: "
                      f"{', '.join(GUIDES)}")
    batch_size = ctx.n if name in JOINT else BATCH_SIZE
    try:
        fitted = ctx.fit(guide=name, epochs=1, batch_size=batch_size)
    except Exception as error:
        if not _refuses_start(error):
            raise
        if ctx.init_params_failed:
            raise _Skipped("lvmzoo.fit refuses the start values init_params_keys reports") from None
        raise _Failed(f"lvmzoo.fit(guide={name!r}) refuses the model's start values: "
                      f"{_short(error)}") from None
    loss = np.asarray(fitted.history["loss"])
    if not np.all(np.isfinite(loss)):
        raise _Failed(f"a 1-epoch fit with guide={name!r} has a non-finite loss {loss.tolist()}")
    return f"1 epoch, loss {loss[-1]:.4g} nats/cell"


def _check_nuts(ctx: _Context) -> str:
    from lvmzoo.infer.mcmc import run_nuts

    data = ctx.data.subset(np.arange(min(16, ctx.n)))
    batch = ctx.batch(np.arange(min(16, ctx.n)))
    param_sites = [n for n, s in _trace(ctx.model.model, batch, ctx.seed).items()
                   if s["type"] in ("param", "mutable")]
    fixed = {}
    if param_sites:
        fitted = ctx.base_fit()
        fixed = {n: fitted.params[n] for n in param_sites if n in fitted.params}
    result = run_nuts(ctx.model, data, num_warmup=20, num_samples=20, num_chains=1,
                      seed=ctx.seed, params=fixed or None)
    bad = [n for n, v in result.samples.items() if not np.all(np.isfinite(v))]
    if bad:
        raise _Failed(f"NUTS draws of {', '.join(bad)} are not finite")
    if not result.samples:
        raise _Failed("NUTS returned no latent sites")
    return f"1 chain, 20 + 20 draws of {', '.join(result.samples)}"


__all__ = ["CheckReport", "CheckResult", "ModelCheckError", "assert_model_conforms",
           "check_model"]
