"""Compare inference methods on zoo models: one call, one table, one figure.

``compare(models, methods, data)`` fits every model with every method on the
same training cells and scores them on the same held-out cells:

* SVI methods are guide names (:data:`lvmzoo.infer.guides.GUIDES`); each fit
  goes through the one driver, :func:`lvmzoo.fit`.
* ``"nuts"`` samples the model with NUTS (:func:`lvmzoo.infer.mcmc.run_nuts`):
  with random globals where the model offers ``global_prior_scale`` (PPCA, FA),
  otherwise over the per-cell latents with the globals fixed at the amortised
  SVI fit.

Columns (per-cell quantities in nats per cell):

``heldout_log_likelihood``
    ``log p(x)`` of held-out cells by importance sampling with the method's
    posterior as proposal (``n_samples`` draws; per-cell guides refit their
    local parameters with the globals frozen).  For NUTS with random globals:
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
    PSIS ``k̂`` of each cell's importance weights (ok below 0.7).
``r_hat_max`` / ``ess_bulk_min`` / ``divergences``
    MCMC convergence (NUTS rows).
``seconds`` / ``compile_seconds``
    wall time of the whole fit, and the part spent compiling.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.special import logsumexp

from lvmzoo.data.registry import CellData
from lvmzoo.infer.diagnostics import mcmc_checks, pareto_k_summary, per_cell_pareto_k
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
      learning_rate: SVI step size (``None``: the model's default).
      validation_fraction: share of cells held out for scoring.
      n_samples: importance samples per held-out cell.
      num_warmup / num_samples / num_chains: NUTS settings (chains vectorised).
      global_prior_scale: prior scale of the globals for NUTS (PPCA, FA).
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
    from lvmzoo.infer.guides import JOINT

    train_idx, held_idx = _split(data, settings)
    train, held = data.subset(train_idx), data.subset(held_idx)
    batch_size = min(settings.batch_size, train.n_cells)
    epochs = settings.epochs
    if method in JOINT:  # full batch: as many updates as the minibatch methods get
        epochs *= train.n_cells // batch_size
        batch_size = train.n_cells
    fitted = fit(model, train, guide=method, epochs=epochs, batch_size=batch_size,
                 learning_rate=settings.learning_rate, seed=settings.seed, progress=False)
    row = {"compile_seconds": fitted.history["compile_seconds"],
           "final_loss": fitted.history["loss"][-1] if fitted.history["loss"] else np.nan}
    on_train = fitted.evaluate(train, n_samples=settings.n_samples, seed=settings.seed)
    row["elbo"] = on_train["elbo"]
    exact_train = fitted.log_likelihood(train)
    if exact_train is not None:
        row["gap_to_exact"] = float(np.mean(exact_train)) - on_train["elbo"]
        row["heldout_log_likelihood_exact"] = float(np.mean(fitted.log_likelihood(held)))
    # A point-mass guide (map) is no proposal: importance sampling needs a density.
    if method != "map" and not getattr(fitted.guide, "joint_over_cells", False):
        on_held = fitted.evaluate(held, n_samples=settings.n_samples, seed=settings.seed,
                                  method="importance_sampling")
        row["heldout_log_likelihood"] = on_held["avg_log_likelihood"]
        k = per_cell_pareto_k(fitted, held, n_samples=settings.n_samples)
        if k is not None:
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
    ``W W^T``; other sites are kept.
    """
    import arviz as az

    samples = dict(result.samples)
    if random_globals and "W" in samples:
        W = samples.pop("W")  # (chains, draws, genes, K)
        samples.pop("z", None)
        samples["WWt"] = np.einsum("cdgk,cdhk->cdgh", W, W)
    diverging = result.mcmc.get_extra_fields(group_by_chain=True).get("diverging")
    stats = {"diverging": np.asarray(diverging)} if diverging is not None else None
    return az.from_dict(posterior=samples, sample_stats=stats)


def _renamed_checks(checks):
    return {"r_hat_max": checks["max_r_hat"], "ess_bulk_min": checks["min_ess_bulk"],
            "ess_tail_min": checks["min_ess_tail"], "divergences": checks["divergences"]}


def _posterior_predictive_log_likelihood(model, result, held: CellData) -> float:
    """``mean_i log mean_s p(x_i | θ_s)`` over posterior draws, exact marginal over z."""
    from lvmzoo.data.source import DeviceSource

    batch = DeviceSource(held).full_batch()
    draws = {k: v.reshape((-1,) + v.shape[2:]) for k, v in result.samples.items()}
    per_draw = jax.vmap(lambda d: model.log_likelihood({**result.fixed, **d}, batch))(
        {k: jnp.asarray(v) for k, v in draws.items()})  # (n_draws, n_cells)
    n_draws = per_draw.shape[0]
    return float(jnp.mean(logsumexp(per_draw, axis=0) - jnp.log(n_draws)))


def comparison_figure(table: pd.DataFrame):
    """Held-out log-likelihood, gap to the exact posterior and wall time per method.

    One panel per quantity, one group of bars per model; a matplotlib Figure
    (Agg canvas, nothing shown).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import SymmetricalLogLocator

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
        if column == "gap_to_exact":
            ax.set_xscale("symlog", linthresh=0.1)  # a diverged fit must not hide the others
            ax.xaxis.set_major_locator(SymmetricalLogLocator(base=1000, linthresh=0.1))
            ax.tick_params(axis="x", labelsize=8)
    figure.axes[0].legend(fontsize=8, loc="lower right")
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
