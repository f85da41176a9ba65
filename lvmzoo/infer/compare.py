"""Compare inference methods on zoo models: one call, one table, one figure.

``compare(models, methods, data)`` fits every model with every method on the
same training cells and scores them on the same held-out cells:

* SVI methods are guide names (:data:`lvmzoo.infer.guides.GUIDES`); each fit
  goes through the one driver, :func:`lvmzoo.fit`.
* ``"nuts"`` samples the model with NUTS (:func:`lvmzoo.infer.mcmc.run_nuts`):
  with random globals where the model offers ``global_prior_scale`` (PPCA, FA,
  GMM; the GMM's component is enumerated out),
  otherwise over the per-cell latents with the globals fixed at the amortised
  SVI fit.

Columns (per-cell quantities in nats per cell):

``heldout_log_likelihood``
    ``log p(x)`` of held-out cells by importance sampling with the method's
    posterior as proposal (``n_samples`` draws; per-cell guides refit their
    local parameters with the globals frozen; joint guides refit their joint
    distribution over the held-out cells' latents and are scored with the
    weights of all held-out cells at once, divided by their number).  Models
    with enumerated discrete sites (the GMM) are scored exactly: no guide
    covers those sites.  For NUTS with random globals:
    ``log mean_s p(x | θ_s)`` over posterior draws with the exact marginal.
``heldout_log_likelihood_exact``
    the model's closed-form ``log p(x)`` at the method's fitted globals, where
    the model has one.
``elbo``
    ELBO per training cell.
``gap_to_exact``
    ``log p(x) − ELBO`` on training cells at the method's own globals, which is
    ``KL(q(z | x) ‖ p(z | x))`` to the exact posterior: the error of the
    variational family alone.
``pareto_k_max`` / ``pareto_k_share_ok``
    PSIS ``k̂`` of each held-out cell's importance weights (ok below 0.7); for
    joint guides the one ``k̂`` of the joint weights.
``r_hat_max`` / ``ess_bulk_min`` / ``divergences``
    MCMC convergence (NUTS rows).
``seconds`` / ``compile_seconds``
    wall time of the whole fit, and the part spent compiling.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence, Union

import jax
import numpy as np
import optax
import pandas as pd
from jax.scipy.special import logsumexp

from lvmzoo.data.registry import CellData
from lvmzoo.data.source import n_steps_per_epoch
from lvmzoo.infer.diagnostics import (
    mcmc_checks, pareto_k, pareto_k_summary, per_cell_pareto_k)
from lvmzoo.infer.mcmc import run_nuts
from lvmzoo.infer.svi import fit
from lvmzoo.models import get_model
from lvmzoo.models.base import LatentModel

MCMC_METHODS = ("nuts",)


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """How much work each method gets.

    Attributes:
      epochs: SVI epochs.
      batch_size: SVI minibatch size; joint guides (low_rank, full_rank,
        flow, laplace) always use the full batch.
      learning_rate: SVI's step size, decayed 20-fold over the second half of each fit
        (``None``: the model's default, capped per guide family by
        :func:`lvmzoo.infer.guides.default_learning_rate`).
      validation_fraction: share of cells held out for scoring.
      n_samples: importance samples per held-out cell.
      num_warmup / num_samples / num_chains: NUTS settings (chains vectorised).
      global_prior_scale: prior scale of the globals for NUTS (PPCA, FA, GMM).
      seed: one seed for the split and every method.
    """

    epochs: int = 200
    batch_size: int = 128
    learning_rate: Optional[float] = None
    validation_fraction: float = 0.2
    n_samples: int = 100
    num_warmup: int = 300
    num_samples: int = 300
    num_chains: int = 4
    global_prior_scale: float = 3.0
    seed: int = 0


def compare(
    models: Sequence[Union[str, LatentModel]],
    methods: Sequence[str],
    data: CellData,
    settings: CompareSettings = CompareSettings(),
    progress: bool = False,
) -> pd.DataFrame:
    """Fit every model with every method; one row per (model, method).

    Args:
      models: zoo models or their names (names use default hyperparameters).
      methods: guide names and/or ``"nuts"``.
      data: cells registered for these models (e.g. log1p_cp10k for Gaussian
        models); keep it small when ``"nuts"`` or ``"full_rank"`` is asked for.
      settings: epochs, samples, seeds.
      progress: print one line per finished fit.

    Returns:
      A DataFrame with the columns described in the module docstring; a
      method that fails on a model gets a row with its ``error``.
    """
    rows = []
    for model in models:
        model = get_model(model)() if isinstance(model, str) else model
        for method in methods:
            started = time.perf_counter()
            try:
                row = (_nuts_row if method in MCMC_METHODS else _svi_row)(model, method, data, settings)
            except (ValueError, RuntimeError) as err:  # an inapplicable pairing is a result too
                row = {"error": str(err).splitlines()[0]}
            row = {"model": model.name, "method": method, **row,
                   "seconds": time.perf_counter() - started}
            if progress:
                print(f"{model.name} × {method}: {row.get('heldout_log_likelihood', row.get('error'))}")
            rows.append(row)
    return pd.DataFrame(rows)


def _split(data: CellData, settings: CompareSettings):
    order = np.random.default_rng(settings.seed).permutation(data.n_cells)
    n_held = int(round(settings.validation_fraction * data.n_cells))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _svi_row(model, method, data, settings):
    from lvmzoo.data.source import DeviceSource
    from lvmzoo.infer.guides import JOINT, classify_sites, default_learning_rate, guide_name

    train_idx, held_idx = _split(data, settings)
    train, held = data.subset(train_idx), data.subset(held_idx)
    batch_size = min(settings.batch_size, train.n_cells)
    epochs = settings.epochs
    if guide_name(method) in JOINT:  # full batch: as many updates as the minibatch methods get
        epochs *= n_steps_per_epoch(train.n_cells, batch_size)
        batch_size = train.n_cells
    # Every method gets the same schedule: Adam at a constant step size for the
    # first half of the fit, then decayed 20-fold over the second half, so each
    # ends near its optimum instead of circling it at the noise level of
    # single-draw gradients (a full-rank guide's D^2 parameters need this most).
    learning_rate = settings.learning_rate
    if learning_rate is None:
        learning_rate = default_learning_rate(method, model)
    n_steps = epochs * n_steps_per_epoch(train.n_cells, batch_size)
    half = max(n_steps // 2, 1)
    schedule = optax.exponential_decay(learning_rate, transition_steps=half, decay_rate=0.05,
                                       transition_begin=half, end_value=0.05 * learning_rate)
    optimizer = optax.adam(schedule)
    fitted = fit(model, train, guide=method, epochs=epochs, batch_size=batch_size,
                 optimizer=optimizer, seed=settings.seed, progress=False)
    row = {"compile_seconds": fitted.history["compile_seconds"],
           "final_loss": fitted.history["loss"][-1] if fitted.history["loss"] else np.nan}
    on_train = fitted.evaluate(train, n_samples=settings.n_samples, seed=settings.seed)
    row["elbo"] = on_train["elbo"]
    exact_train = fitted.log_likelihood(train)
    if exact_train is not None:
        row["gap_to_exact"] = float(np.mean(exact_train)) - on_train["elbo"]
        row["heldout_log_likelihood_exact"] = float(np.mean(fitted.log_likelihood(held)))
    # A point-mass guide (map) is no proposal: importance sampling needs a density.
    # Enumerated discrete sites (the GMM's component) are not in any guide: IS
    # would draw them from the prior, so such models are scored exactly.
    enumerated = bool(classify_sites(model, DeviceSource(train).full_batch())[2])
    if enumerated and "heldout_log_likelihood_exact" in row:
        row["heldout_log_likelihood"] = row["heldout_log_likelihood_exact"]
    elif guide_name(method) != "map":
        on_held = fitted.evaluate(held, n_samples=settings.n_samples, seed=settings.seed,
                                  method="importance_sampling")
        row["heldout_log_likelihood"] = on_held["avg_log_likelihood"]
        if "log_weights" in on_held:  # a joint guide: one k̂ for the whole held-out set
            k = np.atleast_1d(pareto_k(on_held["log_weights"]))
        else:
            k = per_cell_pareto_k(fitted, held, n_samples=settings.n_samples)
        k_summary = pareto_k_summary(k)
        row["pareto_k_max"], row["pareto_k_share_ok"] = k_summary["max"], k_summary["share_ok"]
    return row


def _nuts_row(model, method, data, settings):
    train_idx, held_idx = _split(data, settings)
    train, held = data.subset(train_idx), data.subset(held_idx)
    random_globals = "global_prior_scale" in {f.name for f in dataclasses.fields(model)}
    params = None
    if random_globals:
        model = dataclasses.replace(model, global_prior_scale=settings.global_prior_scale)
    else:  # sample the per-cell latents given globals from the amortised fit
        anchor = fit(model, train, epochs=settings.epochs, batch_size=settings.batch_size,
                     seed=settings.seed, progress=False)
        params = anchor.params
    started = time.perf_counter()
    result = run_nuts(model, train, num_warmup=settings.num_warmup,
                      num_samples=settings.num_samples, num_chains=settings.num_chains,
                      seed=settings.seed, params=params)
    row = {"sampling_seconds": time.perf_counter() - started}
    row.update(_renamed_checks(mcmc_checks(_identifiable(result, random_globals))))
    if random_globals:
        row["heldout_log_likelihood"] = _posterior_predictive_log_likelihood(model, result, held)
    return row


def _identifiable(result, random_globals):
    """Draws of quantities the data identify, for R-hat/ESS.

    With random globals, ``W`` and the per-cell ``z`` are identified only up to a
    rotation (chains may settle in different rotations), so they are replaced by
    ``W W^T``; mixture components only up to relabelling, so their parameters
    are replaced by the sorted weights.  Every such model also gets the
    average per-cell log-likelihood of the training cells under each draw
    (``mean_log_likelihood``).
    """
    import arviz as az

    samples = dict(result.samples)
    if random_globals:
        if "W" in samples:
            W = samples.pop("W")  # (chains, draws, genes, K)
            samples.pop("z", None)
            samples["WWt"] = np.einsum("cdgk,cdhk->cdgh", W, W)
        if "weights" in samples:
            for name in ("means", "scales", "scales_above_floor"):
                samples.pop(name, None)
            samples["weights_sorted"] = np.sort(samples.pop("weights"), axis=-1)
        samples["mean_log_likelihood"] = _per_draw_log_likelihood(result, result.batch).mean(-1)
    diverging = result.mcmc.get_extra_fields(group_by_chain=True).get("diverging")
    stats = {"diverging": np.asarray(diverging)} if diverging is not None else None
    return az.from_dict(posterior=samples, sample_stats=stats)


def _per_draw_log_likelihood(result, batch) -> np.ndarray:
    """The model's exact ``log p(x_i | globals_s)``, ``(chains, draws, cells)``."""
    shape = next(iter(result.samples.values())).shape[:2]
    per_draw = _log_likelihood_of_draws(result.model, result.fixed, _draws(result), batch)
    return np.asarray(per_draw).reshape(shape + (-1,))


def _draws(result) -> dict:
    """The posterior draws with chains and draws in one axis, ``(chains * draws, ...)``."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in result.samples.items()}


@functools.partial(jax.jit, static_argnames=("model",))
def _log_likelihood_of_draws(model, fixed, draws, batch):
    """``(n_draws, cells)`` exact log-likelihoods, one compiled program (run as it is, the
    map's operations outside its loop would each compile a program of their own)."""
    return jax.lax.map(lambda d: model.log_likelihood({**fixed, **d}, batch), draws,
                       batch_size=64)


@functools.partial(jax.jit, static_argnames=("model",))
def _log_predictive_of_draws(model, fixed, draws, batch):
    """``(cells,)`` ``log mean_s p(x_i | θ_s)`` over the draws, one compiled program."""
    per_draw = _log_likelihood_of_draws(model, fixed, draws, batch)
    return logsumexp(per_draw, axis=0) - np.log(per_draw.shape[0])


def _renamed_checks(checks):
    return {"r_hat_max": checks["max_r_hat"], "ess_bulk_min": checks["min_ess_bulk"],
            "ess_tail_min": checks["min_ess_tail"], "divergences": checks["divergences"]}


def _posterior_predictive_log_likelihood(model, result, held: CellData) -> float:
    """``mean_i log mean_s p(x_i | θ_s)`` over posterior draws, exact marginal over z."""
    from lvmzoo.data.source import DeviceSource

    per_cell = _log_predictive_of_draws(result.model, result.fixed, _draws(result),
                                        DeviceSource(held).full_batch())
    return float(np.mean(per_cell))


def comparison_figure(table: pd.DataFrame):
    """Held-out log-likelihood, gap to the exact posterior and wall time per method.

    One panel per quantity, one group of bars per model; a matplotlib Figure
    (Agg canvas, nothing shown).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter

    panels = [("heldout_log_likelihood", "held-out log p(x) (nats/cell)"),
              ("gap_to_exact", "log p(x) − ELBO = KL to exact posterior"),
              ("seconds", "wall time (s)")]
    panels = [(c, t) for c, t in panels if c in table and table[c].notna().any()]
    figure = Figure(figsize=(4.2 * len(panels), 3.8 + 0.15 * table["method"].nunique()),
                    layout="constrained")
    FigureCanvasAgg(figure)
    models = list(dict.fromkeys(table["model"]))
    methods = list(dict.fromkeys(table["method"]))
    offset = 0.6 / max(len(models), 1)
    for i, (column, title) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), i + 1)
        for j, model in enumerate(models):
            chosen = table[table.model == model].set_index("method")[column]
            values = np.asarray([chosen.get(m, np.nan) for m in methods], float)
            positions = np.arange(len(methods)) + (j - (len(models) - 1) / 2) * offset
            # Dots, not bars: log-likelihoods are large negative numbers.
            ax.plot(values, positions, "o", label=model)
        ax.set_yticks(np.arange(len(methods)), methods)
        ax.set_ylim(len(methods) - 0.5, -0.5)  # first method on top, same rows in every panel
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08)  # no dot on the frame
        if column == "gap_to_exact":
            # symlog: a diverged fit (a gap of 1e6) must not squash the others.
            ax.set_xscale("symlog", linthresh=0.1, linscale=1.0)
            gaps = table[column].to_numpy(float)
            gaps = gaps[np.isfinite(gaps)]
            top = max(np.max(np.abs(gaps)) if gaps.size else 1.0, 0.1)
            n_decades = int(np.ceil(np.log10(top))) + 2
            step = max(1, int(np.ceil(n_decades / 4)))  # at most ~4 labelled decades a side
            decades = [10.0**e for e in range(-1, n_decades - 1, step)]
            ticks = sorted({0.0, *decades, *(-d for d in decades)})
            low, high = (gaps.min(), gaps.max()) if gaps.size else (0.0, 1.0)
            ticks = [t for t in ticks if low - abs(low) - 0.1 <= t <= high + abs(high) + 0.1]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.axvline(0.0, color="0.6", lw=0.8)
            ax.tick_params(axis="x", labelsize=8)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=max(len(models), 1),
                  fontsize=9, frameon=False)
    return figure


def markdown_table(table: pd.DataFrame) -> str:
    """The comparison as a markdown table (4 significant digits)."""
    shown = table.copy()
    for column in shown.select_dtypes("number"):
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    shown = shown.fillna("")
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"
