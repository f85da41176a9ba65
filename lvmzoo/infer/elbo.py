"""The ELBO estimator every model uses by default: NumPyro's, traced in a fixed order.

NumPyro's ``Trace_ELBO`` combines the per-site terms ``log p - log q`` by
iterating a Python ``set`` of site names.  A set of strings iterates in an
order that depends on the process's string-hash seed (``PYTHONHASHSEED``), so
each new Python process traced the same ELBO into a differently ordered XLA
program, got a different key in the persistent compilation cache
(:mod:`lvmzoo.cache`) and compiled everything again.  :class:`Trace_ELBO` here
is the same estimator (same draws, same value; checked against NumPyro's in
``tests/test_defaults.py``) with the sites taken in trace order, guide sites
first.  Options NumPyro's class has and this one does not: a guide that draws
several samples at once (``multi_sample_guide``) and per-site losses
(``sum_sites=False``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.infer
from numpyro.handlers import replay, seed
from numpyro.infer.util import compute_log_probs
from numpyro.util import check_model_guide_match


class Trace_ELBO(numpyro.infer.Trace_ELBO):
    """``numpyro.infer.Trace_ELBO`` whose traced program does not depend on the hash seed."""

    def __init__(self, num_particles: int = 1, vectorize_particles: bool = True):
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def one_particle(key):
            params = dict(param_map)
            key_model, key_guide = jax.random.split(key)
            guide_log_probs, guide_trace = compute_log_probs(
                seed(guide, key_guide), args, kwargs, param_map)
            mutable = {name: site["value"] for name, site in guide_trace.items()
                       if site["type"] == "mutable"}
            params.update(mutable)
            model_log_probs, model_trace = compute_log_probs(
                replay(seed(model, key_model), guide_trace), args, kwargs, params)
            check_model_guide_match(model_trace, guide_trace)
            mutable.update({name: site["value"] for name, site in model_trace.items()
                            if site["type"] == "mutable"})
            # Guide sites, then the model's own (observed) ones: an order fixed by the trace.
            names = list(guide_log_probs) + [n for n in model_log_probs if n not in guide_log_probs]
            elbo = jnp.array(0.0)
            for name in names:
                elbo = elbo + (model_log_probs.get(name, jnp.array(0.0))
                               - guide_log_probs.get(name, jnp.array(0.0)))
            return elbo, (mutable or None)

        if self.num_particles == 1:
            elbo, mutable = one_particle(rng_key)
            return {"loss": -elbo, "mutable_state": mutable}
        # As NumPyro: mutable state (batch-norm statistics) is dropped over several particles.
        elbos, _ = self.vectorize_particles_fn(
            one_particle, jax.random.split(rng_key, self.num_particles))
        return {"loss": -jnp.mean(elbos), "mutable_state": None}
