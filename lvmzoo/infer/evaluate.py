"""Per-cell scores of a fitted model: importance-sampled log-likelihood and ELBO.

For a cell ``x`` with local latents ``z`` and a guide ``q(z | x)``,

.. math::

   \\log p(x) \\approx \\log \\frac{1}{K} \\sum_{k=1}^K
       \\frac{p(x, z_k)}{q(z_k \\mid x)}, \\qquad z_k \\sim q(z \\mid x),

a lower bound that tightens as ``K`` grows (the IWAE bound); its ``K = 1``
expectation is the ELBO.  Only sites inside the ``"cells"`` plate enter the
per-cell weights; global parameters are held at their fitted values.

A guide that is one joint distribution over every cell's latents (a full-rank
Gaussian or a flow over all of ``Z``) has no per-cell factor, so its weights
are those of the whole batch of cells ``X``:
``log p(X, Z) - log q(Z)`` with ``Z ~ q`` (:func:`joint_log_weights`), and
``log p(X) = sum_i log p(x_i)`` is estimated the same way; divided by the
number of cells it is comparable with the per-cell averages.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from numpyro import handlers

from lvmzoo.data.source import Batch


def _per_cell_log_prob(trace, proposal=None) -> jax.Array:
    """Sum of the per-cell log-densities of ``trace``'s sample sites in the cells plate.

    With ``proposal`` (the guide's trace), a model trace leaves out the latent
    sites the guide does not sample: those were drawn from their prior inside the
    replayed model, so the prior is their proposal and its density cancels in
    ``p(x, z, c) / (q(z) p(c))`` (counting it would put ``log p(c)`` into every
    weight, e.g. the mixture weight of a GMM whose component is left to its prior).
    """
    total = 0.0
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        if proposal is not None and not site["is_observed"] and name not in proposal:
            continue
        if not any(frame.name == "cells" for frame in site["cond_indep_stack"]):
            continue
        log_prob = site["fn"].log_prob(site["value"])
        # The cells plate is the rightmost batch dimension; fold any others.
        total = total + log_prob.reshape(-1, log_prob.shape[-1]).sum(0)
    return total


def _traces(model, guide, params, batch, key):
    """``(model_trace, guide_trace)`` for one draw from ``guide``, the model replayed on it."""
    key_guide, key_model = jax.random.split(key)
    guide_trace = handlers.trace(
        handlers.seed(handlers.substitute(guide, data=params), key_guide)
    ).get_trace(batch)
    model_trace = handlers.trace(
        handlers.replay(
            handlers.seed(handlers.substitute(model, data=params), key_model), guide_trace
        )
    ).get_trace(batch)
    return model_trace, guide_trace


def log_weights(
    model: Callable, guide: Callable, params: dict, batch: Batch, key: jax.Array
) -> jax.Array:
    """``log p(x, z) - log q(z | x)`` per cell for one draw ``z ~ q``; shape ``(B,)``."""
    model_trace, guide_trace = _traces(model, guide, params, batch, key)
    return _per_cell_log_prob(model_trace, guide_trace) - _per_cell_log_prob(guide_trace)


def weights_average_to_the_elbo(
    model: Callable, guide: Callable, params: dict, batch: Batch
) -> bool:
    """Whether the average of :func:`log_weights` over draws estimates the ELBO itself.

    Decided from the structure of the traces, which are built (traced once under
    :func:`jax.eval_shape`) but not computed.

    :func:`log_weights` counts each cell's sites without their ``scale``, leaves
    out latent sites the guide does not sample, and leaves out sites outside the
    ``"cells"`` plate; ``Trace_ELBO`` counts all of them.  With none of those in
    the traces (every sample site inside the cells plate, unscaled, not
    enumerated, and every latent of the model drawn by the guide), the two are
    the same sum: ``sum_c E_q[log p(x_c, z_c) - log q(z_c | x_c)]``.
    """
    answer = []

    def inspect(params, batch):
        answer.append(_sites_are_per_cell(*_traces(model, guide, params, batch,
                                                   jax.random.PRNGKey(0))))
        return jnp.zeros(())

    jax.eval_shape(inspect, params, batch)
    return answer[0]


def _sites_are_per_cell(model_trace, guide_trace) -> bool:
    def plain_cell_site(site) -> bool:
        return (site.get("scale") is None
                and not site.get("infer", {}).get("enumerate")
                and any(frame.name == "cells" for frame in site["cond_indep_stack"]))

    for site in guide_trace.values():
        if site["type"] == "sample" and (site["is_observed"] or not plain_cell_site(site)):
            return False
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        if not plain_cell_site(site) or (not site["is_observed"] and name not in guide_trace):
            return False
    return True


def importance_sampled_scores(
    model: Callable,
    guide: Callable,
    params: dict,
    batch: Batch,
    key: jax.Array,
    n_samples: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-cell IWAE estimate of ``log p(x)`` and ELBO from ``n_samples`` draws.

    Returns:
      ``(log_likelihood, elbo)``, each ``(B,)``.
    """
    keys = jax.random.split(key, n_samples)
    weights = jax.lax.map(
        lambda k: log_weights(model, guide, params, batch, k),
        keys,
        batch_size=_draws_at_once(n_samples),
    )
    return logsumexp(weights, axis=0) - jnp.log(n_samples), weights.mean(axis=0)


def joint_log_weight(
    model: Callable, guide: Callable, params: dict, batch: Batch, key: jax.Array
) -> jax.Array:
    """``log p(X, Z) - log q(Z)`` for one draw ``Z ~ q`` of all cells' latents; shape ``()``.

    The model side counts the sites in the ``"cells"`` plate (globals are
    plugged in through ``params``); the guide side every sample site of the
    guide, i.e. the joint density of ``Z`` including the Jacobians of its
    constraining transforms.
    """
    model_trace, guide_trace = _traces(model, guide, params, batch, key)
    log_q = sum(jnp.sum(site["fn"].log_prob(site["value"])) for site in guide_trace.values()
                if site["type"] == "sample")
    return jnp.sum(_per_cell_log_prob(model_trace, guide_trace)) - log_q


def joint_log_weights(
    model: Callable, guide: Callable, params: dict, batch: Batch, key: jax.Array, n_samples: int
) -> jax.Array:
    """``(n_samples,)`` draws of :func:`joint_log_weight`."""
    keys = jax.random.split(key, n_samples)
    return jax.lax.map(lambda k: joint_log_weight(model, guide, params, batch, k), keys,
                       batch_size=_draws_at_once(n_samples))


def _draws_at_once(n_samples: int, most: int = 16) -> int:
    """Draws vectorised together in ``lax.map``: a divisor of ``n_samples`` from 8 to
    ``most`` when there is one (10 of 100), else ``most``.

    A batch size that leaves a remainder compiles the model a second time for the
    remaining draws (scVI, 100 = 6 x 16 + 4: 40 % longer to compile than 10 x 10); each
    draw's weights are the same either way.
    """
    for size in range(min(most, n_samples), 7, -1):
        if n_samples % size == 0:
            return size
    return min(most, n_samples)
