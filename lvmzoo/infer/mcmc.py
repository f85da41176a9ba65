"""NUTS on the zoo's own model programs: the reference posterior for SVI.

:func:`run_nuts` runs NumPyro's No-U-Turn sampler on ``model.model`` with all
cells in one batch (the ``"cells"`` plate does not subsample: ``n_cells = B``).
Sites marked ``infer={"enumerate": "parallel"}`` are summed out by NumPyro's
enumeration, as ``TraceEnum_ELBO`` does in SVI.  NUTS samples *sample* sites
only: a model's point-estimated ``numpyro.param`` globals must either become
random (``PPCA(global_prior_scale=...)``) or be held at given values
(``params=``, e.g. a fitted model's maximum-likelihood values).  Chains run
vectorised (``chain_method="vectorized"``), one compiled program for all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

from lvmzoo.data.registry import CellData
from lvmzoo.data.source import Batch, DeviceSource
from lvmzoo.infer.guides import classify_sites, shape_trace
from lvmzoo.models.base import LatentModel


@dataclasses.dataclass
class NutsResult:
    """What :func:`run_nuts` returns.

    Attributes:
      model: the zoo model.
      mcmc: the NumPyro ``MCMC`` object (``mcmc.print_summary()`` etc.).
      samples: posterior draws per latent site, ``(n_chains, n_samples, *shape)``.
      fixed: the ``numpyro.param`` values held fixed during sampling.
      batch: the full batch the sampler conditioned on (all cells).
      obs_names / gene_names: coordinates of the ``cells`` and ``genes`` dims.
    """

    model: LatentModel
    mcmc: MCMC
    samples: dict[str, np.ndarray]
    fixed: dict[str, Any]
    batch: Batch
    obs_names: np.ndarray
    gene_names: np.ndarray

    def posterior_mean(self) -> dict[str, np.ndarray]:
        """Posterior mean of every sampled site, plus the fixed params."""
        return {**self.fixed, **{k: v.mean(axis=(0, 1)) for k, v in self.samples.items()}}

    def model_fn(self):
        """The program NUTS sampled: ``model.model`` with ``fixed`` substituted."""
        return handlers.substitute(self.model.model, data=self.fixed)


def run_nuts(
    model: LatentModel,
    data: CellData,
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 4,
    seed: int = 0,
    chain_method: str = "vectorized",
    params: Optional[dict] = None,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    progress: bool = False,
) -> NutsResult:
    """Sample the posterior of ``model`` given all cells of ``data`` with NUTS.

    Args:
      model: a zoo model whose unknowns are sample sites (see module docstring).
      data: the cells; all of them form one batch.
      num_warmup, num_samples, num_chains: per chain.
      seed: PRNG seed (chains get split keys).
      chain_method: ``"vectorized"`` (default), ``"parallel"`` or ``"sequential"``.
      params: values for the model's ``numpyro.param`` sites, held fixed.
      target_accept_prob, max_tree_depth: NUTS settings.
      progress: show NumPyro's progress bar.

    Returns:
      A :class:`NutsResult`.

    Raises:
      ValueError: the model has ``numpyro.param`` sites not in ``params``, or
        no continuous latent sample site.
    """
    batch = DeviceSource(data).full_batch()
    # Flax parameters are nested dicts ("decoder$params": {...}): convert leaf by leaf.
    fixed = jax.tree.map(jnp.asarray, dict(params or {}))
    _check_sampleable(model, batch, fixed)
    program = handlers.substitute(model.model, data=fixed) if fixed else model.model
    kernel = NUTS(program, target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth)
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                chain_method=chain_method, progress_bar=progress)
    mcmc.run(jax.random.PRNGKey(seed), batch, extra_fields=("diverging",))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    return NutsResult(model=model, mcmc=mcmc, samples=samples, fixed=fixed, batch=batch,
                      obs_names=np.asarray(data.obs_names),
                      gene_names=np.asarray(data.registry.gene_names))


def _check_sampleable(model: LatentModel, batch: Batch, fixed: dict) -> None:
    trace = shape_trace(model.model, batch)  # names and kinds of sites: no values needed
    sampled = sorted(n for n, s in trace.items() if s["type"] == "sample"
                     and not s["is_observed"] and n in fixed)
    if sampled:
        raise ValueError(
            f"params= holds {', '.join(sampled)}, which {model.name} samples (numpyro.sample): "
            "NUTS would sample them anyway; to hold sample sites fixed, use "
            "lvmzoo.infer.guides.freeze_globals(model, {...}) and run NUTS on that model")
    free = [n for n, s in trace.items() if s["type"] == "param" and n not in fixed]
    if free:
        raise ValueError(
            f"NUTS samples sample sites only, and {model.name} point-estimates "
            f"{', '.join(free)} with numpyro.param: give them priors (e.g. "
            f"{type(model).__name__}(..., global_prior_scale=1.0) where the model has the "
            "option) or hold them fixed with params= (e.g. a fitted model's params)")
    local, global_, _ = classify_sites(model, batch)
    if not local and not global_:
        raise ValueError(f"{model.name} has no continuous latent sample site for NUTS to sample "
                         "(enumerated discrete sites are summed out)")
