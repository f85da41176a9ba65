"""Every fit as an ArviZ ``InferenceData``, and the checks that say whether to trust it.

* MCMC (:class:`~lvmzoo.infer.mcmc.NutsResult`): ``az.from_numpyro``;
  :func:`mcmc_checks` reports R-hat, bulk/tail ESS, MCSE and divergences.
* SVI (:class:`~lvmzoo.infer.results.FittedModel`): posterior draws from the
  fitted guide on the training cells (``numpyro.infer.Predictive``), put in an
  ``InferenceData`` by ``az.from_dict``; its ``"svi"`` group holds the loss
  history (negative ELBO per cell, by epoch) and the Pareto ``k̂`` of the
  importance weights ``log p(x_i, z) - log q(z | x_i)``: per cell (PSIS,
  ``az.psislw``) for guides that factorise over cells, and for the joint
  weight of all latents (``numpyro.infer.psis_diagnostic``; few draws or a
  guide equal to the posterior can give ``inf``), not for models with
  enumerated discrete sites.  ``k̂ < 0.7``:
  the guide is a usable importance proposal; above, its IS estimates (and the
  ELBO's view of the posterior) are unreliable (Yao et al., 2018).

Dimensions are named from the model's plates and shapes: ``"cells"`` for the
cells plate, ``"genes"`` for axes of length ``n_genes``, ``"latent"`` /
``"components"`` for the model's ``n_latent`` / ``n_components``.

A ``log_likelihood`` group (for :func:`loo`) holds each cell's exact marginal
``log p(x_i | globals)`` at every posterior draw, where the model has that
closed form and its globals are random (priors); PSIS-LOO over cells is then
the usual leave-one-cell-out estimate.  With point-estimated globals every
draw gives the same marginal and LOO does not apply; conditional on per-cell
latents it would not leave the cell out, so it is not stored.

References:
  Vehtari, A., Gelman, A., Simpson, D., Carpenter, B., Bürkner, P.-C. (2021).
  Rank-normalization, folding, and localization: an improved R-hat. Bayesian
  Analysis 16(2).
  Yao, Y., Vehtari, A., Simpson, D., Gelman, A. (2018). Yes, but did it work?
  Evaluating variational inference. ICML.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Union

import arviz as az
import jax
import numpy as np
import xarray as xr
from numpyro.infer import Predictive, psis_diagnostic

from lvmzoo.data.registry import CellData
from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.infer.evaluate import log_weights
from lvmzoo.infer.guides import NamedGuide, classify_sites, ensure_built, shape_trace
from lvmzoo.infer.mcmc import NutsResult
from lvmzoo.infer.results import FittedModel

# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------


def to_inference_data(result: Union[NutsResult, FittedModel], data: Optional[CellData] = None,
                      *, n_samples: int = 200, importance_samples: int = 100,
                      seed: int = 0) -> az.InferenceData:
    """An ``InferenceData`` with named dims for an MCMC or SVI fit.

    Args:
      result: from :func:`~lvmzoo.infer.mcmc.run_nuts` or :func:`lvmzoo.fit`.
      data: SVI only: the data passed to ``fit`` (its training cells are used)
        or the training cells themselves.
      n_samples: SVI only: posterior draws from the guide.
      importance_samples: SVI only: draws per cell for the Pareto ``k̂``.
      seed: SVI only: PRNG seed of the draws.
    """
    if isinstance(result, NutsResult):
        return _from_nuts(result)
    if data is None:
        raise ValueError("an SVI fit needs its data: to_inference_data(fitted, data)")
    return _from_svi(result, data, n_samples, importance_samples, seed)


def _from_nuts(result: NutsResult) -> az.InferenceData:
    model, batch = result.model, result.batch
    coords, dims = _coords_and_dims(model, batch, result.obs_names, result.gene_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata = az.from_numpyro(result.mcmc, coords=coords, dims=dims, log_likelihood=False)
    marginal = _marginal_log_likelihood(model, result.samples, result.fixed, batch)
    if marginal is not None:
        idata.add_groups(log_likelihood={"x": marginal}, coords=coords, dims={"x": ["cells"]})
    idata.attrs["inference"] = "nuts"
    return idata


def _from_svi(fitted: FittedModel, data: CellData, n_samples: int, importance_samples: int,
              seed: int) -> az.InferenceData:
    train = _training_cells(fitted, data)
    model, guide = fitted.model, fitted.guide
    batch = DeviceSource(train).full_batch()  # n_cells = B: per-cell params in full
    local, global_, _ = classify_sites(model, batch)
    draw_guide, params = guide, fitted.params
    if isinstance(guide, NamedGuide):
        ensure_built(guide, batch)
        draw_guide, params = guide.evaluation_guide(params, batch.replace(training=True))
    key_draws, key_k, key_joint = jax.random.split(jax.random.PRNGKey(seed), 3)
    draws = Predictive(draw_guide, params=params, num_samples=n_samples)(key_draws, batch)
    posterior = {k: np.asarray(v)[None] for k, v in draws.items() if k in local + global_}
    coords, dims = _coords_and_dims(model, batch, np.asarray(train.obs_names),
                                    np.asarray(train.registry.gene_names))
    idata = az.from_dict(posterior=posterior or None, coords=coords,  # None: nothing latent (GMM)
                         dims={k: v for k, v in dims.items() if k in posterior})
    if global_:
        globals_ = {k: v for k, v in posterior.items() if k in global_}
        fixed = {k: v for k, v in params.items() if k not in posterior}
        marginal = _marginal_log_likelihood(model, globals_, fixed, batch)
        if marginal is not None:
            idata.add_groups(log_likelihood={"x": marginal}, coords=coords,
                             dims={"x": ["cells"]})
    idata.add_groups({"svi": _svi_group(fitted, train, importance_samples, key_k, key_joint,
                                        draw_guide, params, batch)},
                     warn_on_custom_groups=False)
    idata.attrs["inference"] = "svi"
    idata.attrs["guide"] = getattr(guide, "name", getattr(guide, "__qualname__", "custom"))
    return idata


def _training_cells(fitted: FittedModel, data: CellData) -> CellData:
    names = getattr(fitted.guide, "training_cells", None)
    if names is not None and np.array_equal(np.asarray(names), np.asarray(data.obs_names)):
        return data
    if data.n_cells <= int(np.max(fitted.train_index, initial=-1)):
        raise ValueError("data has fewer cells than the fit's training indices; pass the data "
                         "given to lvmzoo.fit")
    return data.subset(fitted.train_index)


def _svi_group(fitted, train, importance_samples, key_k, key_joint, guide, params, batch):
    history = fitted.history
    epochs = np.asarray(history.get("epoch", []), dtype=np.int64)
    group = {
        "loss": xr.DataArray(np.asarray(history.get("loss", []), float), dims=["epoch"],
                             coords={"epoch": epochs}),
        "validation_loss": xr.DataArray(np.asarray(history.get("validation_loss", []), float),
                                        dims=["epoch"], coords={"epoch": epochs}),
    }
    if classify_sites(fitted.model, batch)[2]:
        # The ELBO sums enumerated sites out exactly; IS would draw them from the prior.
        dataset = xr.Dataset(group)
        dataset.attrs["pareto_k"] = "not applicable: the model's discrete sites are enumerated"
        return dataset
    k_cells = per_cell_pareto_k(fitted, train, n_samples=importance_samples, key=key_k)
    if k_cells is not None:
        group["pareto_k"] = xr.DataArray(k_cells, dims=["cells"],
                                         coords={"cells": np.asarray(train.obs_names)})
    joint = float(psis_diagnostic(key_joint, params, fitted.model.model, guide, batch,
                                  num_particles=importance_samples))
    dataset = xr.Dataset(group)
    dataset.attrs["joint_pareto_k"] = joint
    return dataset


# --------------------------------------------------------------------------
# Dimension names
# --------------------------------------------------------------------------


def _coords_and_dims(model, batch: Batch, obs_names, gene_names):
    """``coords`` and per-site ``dims`` for the model's latent sites."""
    trace = _model_trace(model, batch)
    sizes = {"genes": len(gene_names)}
    for attr, dim in (("n_latent", "latent"), ("n_components", "components")):
        if isinstance(getattr(model, attr, None), int):
            sizes[dim] = getattr(model, attr)
    coords = {"cells": np.asarray(obs_names), "genes": np.asarray(gene_names)}
    for dim in ("latent", "components"):
        if dim in sizes:
            coords[dim] = np.arange(sizes[dim])
    dims = {}
    for name, site in trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        shape = np.shape(site["value"])
        names = []
        for axis, size in enumerate(shape):
            plate = [f.name for f in site["cond_indep_stack"] if f.dim == axis - len(shape)
                     + site["fn"].event_dim]
            candidates = plate + [d for d, n in sizes.items() if n == size]
            chosen = next((c for c in candidates if c not in names), f"{name}_dim_{axis}")
            names.append(chosen)
        dims[name] = names
    return coords, dims


# --------------------------------------------------------------------------
# Per-cell marginal likelihood at posterior draws (for PSIS-LOO)
# --------------------------------------------------------------------------


def _marginal_log_likelihood(model, samples: dict, fixed: dict, batch: Batch):
    """``(chain, draw, cells)`` exact ``log p(x_i | globals)``, or ``None``."""
    globals_ = {k: np.asarray(v) for k, v in samples.items()
                if np.ndim(v) >= 2 and "cells" not in _plates_of(model, batch, k)}
    if not globals_:
        return None
    first = {k: v[0, 0] for k, v in globals_.items()}
    try:
        probe = model.log_likelihood({**fixed, **first}, batch)
    except KeyError:
        return None
    if probe is None:
        return None
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in globals_.items()}
    values = jax.lax.map(lambda g: model.log_likelihood({**fixed, **g}, batch), flat)
    chains, draws = next(iter(globals_.values())).shape[:2]
    return np.asarray(values).reshape(chains, draws, -1)


def _model_trace(model, batch: Batch):
    return shape_trace(model.model, batch)  # sites' plates and shapes: no values needed


def _plates_of(model, batch, site_name):
    site = _model_trace(model, batch).get(site_name)
    return {f.name for f in site["cond_indep_stack"]} if site else set()


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def summary(idata: az.InferenceData, var_names=None, **kwargs):
    """``az.summary``: mean, sd, HDI, MCSE of mean and sd, bulk/tail ESS, R-hat per entry."""
    return az.summary(idata, var_names=var_names, kind="all", round_to="none", **kwargs)


def mcmc_checks(idata: az.InferenceData, var_names=None) -> dict[str, Any]:
    """Worst-case convergence numbers over all entries of ``var_names``.

    Returns:
      ``max_r_hat`` (rank-normalised split R-hat; want < 1.01),
      ``min_ess_bulk`` / ``min_ess_tail`` (want > 100 per chain),
      ``max_mcse_mean`` and ``divergences`` (count over all chains; want 0).
    """
    table = summary(idata, var_names=var_names)
    divergences = 0
    if hasattr(idata, "sample_stats") and "diverging" in idata.sample_stats:
        divergences = int(idata.sample_stats["diverging"].values.sum())
    return {
        "max_r_hat": float(table["r_hat"].max()),
        "min_ess_bulk": float(table["ess_bulk"].min()),
        "min_ess_tail": float(table["ess_tail"].min()),
        "max_mcse_mean": float(table["mcse_mean"].max()),
        "divergences": divergences,
    }


def per_cell_pareto_k(fitted: FittedModel, data: CellData, *, n_samples: int = 100,
                      key: Optional[jax.Array] = None) -> Optional[np.ndarray]:
    """Pareto ``k̂`` of each cell's importance weights ``(n_cells,)``, or ``None``.

    ``n_samples`` draws of ``log p(x_i, z) - log q(z | x_i)`` per cell (globals
    at their fitted / posterior-mean values, as in ``FittedModel.evaluate``),
    smoothed by ``az.psislw``.  ``None`` for guides joint over all cells, whose
    ``q`` has no per-cell factor.
    """
    if getattr(fitted.guide, "joint_over_cells", False):
        return None
    key = jax.random.PRNGKey(0) if key is None else key
    out = []
    for i, (batch, params, guide) in enumerate(fitted._evaluation(data)):
        keys = jax.random.split(jax.random.fold_in(key, i), n_samples)
        weights = _chunk_log_weights(fitted.model, guide, params, batch, keys)
        _, k = az.psislw(np.asarray(weights).T.astype(np.float64))
        out.append(np.asarray(k))
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("model", "guide"))
def _chunk_log_weights(model, guide, params, batch, keys):
    """``(n_samples, B)`` log importance weights, one row per key."""
    return jax.lax.map(lambda k: log_weights(model.model, guide, params, batch, k), keys,
                       batch_size=16)


def pareto_k(log_weights: np.ndarray) -> float:
    """Pareto ``k̂`` (PSIS, ``az.psislw``) of one set of ``(n_samples,)`` log importance weights."""
    _, k = az.psislw(np.asarray(log_weights, np.float64))
    return float(k)


def pareto_k_summary(k: np.ndarray) -> dict[str, float]:
    """Share of cells with ``k̂`` in the PSIS bands (good < 0.5 ≤ ok < 0.7 ≤ bad) and the max."""
    k = np.asarray(k)
    return {"max": float(np.max(k)), "mean": float(np.mean(k)),
            "share_ok": float(np.mean(k < 0.7)), "share_good": float(np.mean(k < 0.5))}


def loo(idata: az.InferenceData, **kwargs):
    """PSIS-LOO over cells (``az.loo``); needs the ``log_likelihood`` group (see module doc)."""
    if not hasattr(idata, "log_likelihood"):
        raise ValueError("no log_likelihood group: PSIS-LOO applies where the globals are "
                         "random and the model has an exact per-cell marginal (see "
                         "lvmzoo.infer.diagnostics)")
    return az.loo(idata, pointwise=True, **kwargs)
