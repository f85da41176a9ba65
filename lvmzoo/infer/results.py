"""What :func:`lvmzoo.fit` returns: a model, its parameters and how it got there."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import anndata as ad
import jax
import numpy as np

from lvmzoo.data.registry import CellData, DataRegistry
from lvmzoo.data.streaming import EvaluationBatches
from lvmzoo.infer.evaluate import (importance_sampled_scores, joint_log_weights,
                                   weights_average_to_the_elbo)
from lvmzoo.models.base import LatentModel

EVAL_CHUNK = 1024
# Importance sampling holds draws × cells × genes likelihood terms at once: its chunks
# of cells are cut so that this product stays at 2^25 float32 (128 MiB), whatever the
# number of genes or draws (100 draws × 1,024 cells × 2,000 genes would be 800 MiB).
SAMPLED_CHUNK_ELEMENTS = 1 << 25

# Models and guides are static (hashable) arguments and params are traced, so
# each program compiles once per model and chunk shape, not once per call.
@functools.partial(jax.jit, static_argnames=("model",))
def _latent(model, params, batch, key):
    return model.latent(params, batch, key)


@functools.partial(jax.jit, static_argnames=("model",))
def _exact_log_likelihood(model, params, batch):
    return model.log_likelihood(params, batch)


@functools.partial(jax.jit, static_argnames=("model", "guide", "n_samples"))
def _sampled_scores(model, guide, params, batch, key, n_samples):
    """Per-cell IWAE log-likelihoods and the ELBO the same draws estimate (its sum over cells)."""
    log_likelihood, elbo = importance_sampled_scores(model.model, guide, params, batch, key,
                                                     n_samples)
    return log_likelihood, elbo.sum()


def _elbo_from_the_draws(model, guide, params, batch) -> bool:
    """Whether the importance-sampling draws give ``model``'s ELBO as well (then its own
    program is not compiled and run): the model optimises a plain ``Trace_ELBO`` and the
    traces are per-cell sites only (:func:`~lvmzoo.infer.evaluate.weights_average_to_the_elbo`)."""
    import numpyro.infer

    from lvmzoo.infer.elbo import Trace_ELBO

    if type(model.elbo()) not in (Trace_ELBO, numpyro.infer.Trace_ELBO):
        return False
    return weights_average_to_the_elbo(model.model, guide, params, batch)


@functools.partial(jax.jit, static_argnames=("model", "guide", "n_samples"))
def _joint_log_weights(model, guide, params, batch, key, n_samples):
    return joint_log_weights(model.model, guide, params, batch, key, n_samples)


@functools.partial(jax.jit, static_argnames=("model", "guide"))
def _elbo(model, guide, params, batch, key):
    return -model.elbo().loss(key, params, model.model, guide, batch)


def _even_chunk(n_cells: int, limit: int) -> int:
    """A chunk size of at most ``limit`` that divides ``n_cells`` into equal chunks, if one
    of at least ``limit / 2`` does: a last, shorter chunk is a second program to compile
    (2,000 cells at 2,000 genes: 16 x 125 rather than 11 x 167 + 163)."""
    if n_cells <= limit:
        return limit
    for size in range(limit, (limit + 1) // 2 - 1, -1):
        if n_cells % size == 0:
            return size
    return limit


@dataclasses.dataclass
class FittedModel:
    """A fitted zoo model.

    Attributes:
      model: the model's hyperparameters (a zoo model instance).
      guide: the variational family that was fitted.
      params: constrained parameter values keyed by site name.
      registry: description of the training data; new data is checked against it.
      history: per-epoch ``loss`` / ``validation_loss`` (nats per cell) and
        ``seconds``, plus ``compile_seconds``.
      train_index / validation_index: positions of the training / held-out cells.
      diverged: the divergence message, if the fit stopped on a NaN loss.
      interrupted: ``True`` if the fit was stopped by Ctrl-C.
    """

    model: LatentModel
    guide: Callable
    params: dict[str, Any]
    registry: DataRegistry
    history: dict[str, Any]
    train_index: np.ndarray
    validation_index: np.ndarray
    seed: int = 0
    diverged: Optional[str] = None
    interrupted: bool = False

    def _chunks(self, data: CellData, size: int = EVAL_CHUNK):
        # Cells on disk (data.is_backed) are read chunk by chunk, never loaded whole.
        return iter(EvaluationBatches(data, size))

    def _evaluation(self, data: CellData, cells: bool = True, size: int = EVAL_CHUNK):
        """``(batch, params, guide)`` per chunk of ``size`` cells; guides from ``make_guide``
        get the per-cell params of exactly these cells (see :mod:`lvmzoo.infer.guides`),
        in chunks of :data:`EVAL_CHUNK` (their local refits depend on the chunks)."""
        from lvmzoo.infer.guides import NamedGuide, evaluation_chunks

        if isinstance(self.guide, NamedGuide):
            return evaluation_chunks(self, data, EVAL_CHUNK, cells=cells)
        return ((b, self.params, self.guide) for b in self._chunks(data, size))

    def latent(self, data: CellData, seed: int = 0) -> np.ndarray:
        """Per-cell representation ``(n_cells, n_latent)`` (posterior mean, or responsibilities)."""
        from lvmzoo.infer.guides import NamedGuide, guide_mean, latent_needs_guide

        key = jax.random.PRNGKey(seed)
        chunks = []
        # Equal chunks where they exist (200,000 cells: 200 x 1,000, not 195 x 1,024 + 320):
        # one program to compile.
        for b, params, guide in self._evaluation(data, size=_even_chunk(data.n_cells,
                                                                        EVAL_CHUNK)):
            # An encoder-based latent (VAE) with a non-amortised guide: the guide's mean of z.
            if isinstance(self.guide, NamedGuide) and latent_needs_guide(self.model, params, b):
                chunks.append(np.asarray(guide_mean(guide, params, b, key)))
            else:
                chunks.append(np.asarray(_latent(self.model, params, b, key)))
        return np.concatenate(chunks)

    def log_likelihood(self, data: CellData) -> Optional[np.ndarray]:
        """Exact per-cell ``log p(x)`` ``(n_cells,)``, or ``None`` without a closed form."""
        if type(self.model).log_likelihood is LatentModel.log_likelihood:
            return None  # not overridden: no closed form, known without reading a cell
        chunks = []
        for b, p, _ in self._evaluation(data, cells=False):
            chunk = _exact_log_likelihood(self.model, p, b)
            if chunk is None:  # no closed form: known from the first chunk, read no more
                return None
            chunks.append(np.asarray(chunk))
        return np.concatenate(chunks)

    def evaluate(self, data: CellData, n_samples: int = 100, seed: int = 0,
                 method: str = "auto", *, standard_error: bool = False) -> dict[str, Any]:
        """Average per-cell log-likelihood and ELBO on ``data``.

        Args:
          method: ``"auto"``: exact where the model has a closed-form marginal,
            otherwise the importance-sampled (IWAE) estimate with ``n_samples``
            draws from the guide; ``"importance_sampling"``: always the estimate
            (to score the guide as a proposal).

        A guide joint over all cells (``low_rank``, ``full_rank``, ``flow``,
        ``laplace``; refitted to ``data``'s cells if they are not its training
        cells) is scored with weights of all cells at once (see
        :mod:`lvmzoo.infer.evaluate`): ``method`` is then
        ``"importance_sampling_joint"`` and ``log_weights`` holds the
        ``(n_samples,)`` weights (e.g. for a Pareto ``k̂``).  A ``map`` guide
        (point estimates) has no proposal density: its score is labelled
        ``"log_joint_at_map"``, ``log p(x, z_MAP)``, which is not a bound on
        ``log p(x)``.

        ``elbo`` is the model's own ELBO estimator (:meth:`LatentModel.elbo`) on
        one draw, averaged over cells; for a plain ``Trace_ELBO`` whose sites are
        all per cell (scVI and most deep models) it is read off the importance
        sampling's draws instead, the same quantity averaged over ``n_samples``
        draws, without a program of its own (half the compilation of scoring).

        ``standard_error=True`` adds ``"log_likelihood_sd"``, the standard
        deviation of the per-cell log-likelihoods (``None`` for a joint guide),
        from which a caller that scored a sample of cells gets the standard
        error of its average, and ``"cell_log_likelihoods"``, the per-cell
        values themselves (not for a joint guide).
        """
        if method not in ("auto", "importance_sampling"):
            raise ValueError(f"method must be 'auto' or 'importance_sampling', got {method!r}")
        key = jax.random.PRNGKey(seed)
        exact = self.log_likelihood(data) if method == "auto" else None
        if exact is None and getattr(self.guide, "joint_over_cells", False):
            joint = self._evaluate_joint(data, n_samples, key)
            return {**joint, "log_likelihood_sd": None} if standard_error else joint
        log_likelihood, elbo, how = self._cell_scores(data, n_samples, key, exact)
        scores = {
            "n_cells": int(data.n_cells),
            "avg_log_likelihood": float(np.mean(log_likelihood)),
            "method": how,
            "n_samples": 0 if exact is not None else int(n_samples),
            "elbo": elbo,
        }
        if standard_error:
            scores["log_likelihood_sd"] = (float(np.std(log_likelihood, ddof=1))
                                           if data.n_cells > 1 else 0.0)
            scores["cell_log_likelihoods"] = np.asarray(log_likelihood)
        return scores

    def cell_log_likelihoods(self, data: CellData, n_samples: int = 100, seed: int = 0,
                             method: str = "auto") -> tuple[np.ndarray, float, str]:
        """Per-cell log-likelihoods ``(n_cells,)``, the average ELBO and the method.

        What :meth:`evaluate` averages (same ``method``, same draws for a
        ``seed``), for callers that combine cells' scores themselves (an
        ensemble's mixture).  Not for guides joint over all cells, whose
        weights do not factor over cells.
        """
        if method not in ("auto", "importance_sampling"):
            raise ValueError(f"method must be 'auto' or 'importance_sampling', got {method!r}")
        exact = self.log_likelihood(data) if method == "auto" else None
        if exact is None and getattr(self.guide, "joint_over_cells", False):
            raise ValueError(f"guide {self.guide.name!r} is joint over all cells: its "
                             "log-likelihood is one number for the cells together "
                             "(FittedModel.evaluate), not one per cell")
        return self._cell_scores(data, n_samples, jax.random.PRNGKey(seed), exact)

    def _cell_scores(self, data, n_samples, key, exact):
        sampled, elbo, from_draws = [], 0.0, None
        size = EVAL_CHUNK if exact is not None else _even_chunk(data.n_cells, max(1, min(
            EVAL_CHUNK, SAMPLED_CHUNK_ELEMENTS // max(1, n_samples * data.n_genes))))
        for i, (batch, params, guide) in enumerate(self._evaluation(data, size=size)):
            k = jax.random.fold_in(key, i)
            if exact is None:
                log_likelihood, draws_elbo = _sampled_scores(self.model, guide, params, batch,
                                                             k, n_samples)
                sampled.append(np.asarray(log_likelihood))
                if from_draws is None:
                    from_draws = _elbo_from_the_draws(self.model, guide, params, batch)
                if from_draws:  # the ELBO averaged over n_samples draws, not one
                    elbo += float(draws_elbo)
                    continue
            elbo += float(_elbo(self.model, guide, params, batch, k))
        log_likelihood = exact if exact is not None else np.concatenate(sampled)
        how = "exact" if exact is not None else self._sampled_method()
        return log_likelihood, elbo / data.n_cells, how

    def _sampled_method(self) -> str:
        """What a sampled score is: a point-mass guide (``map``) is no proposal density, so
        its "importance sampling" is ``log p(x, z_MAP)``, not an estimate of ``log p(x)``."""
        from lvmzoo.infer.guides import NamedGuide

        if isinstance(self.guide, NamedGuide) and self.guide.name == "map":
            return "log_joint_at_map"
        return "importance_sampling"

    def _evaluate_joint(self, data: CellData, n_samples: int, key) -> dict[str, Any]:
        if self.guide.global_sites:
            raise ValueError(
                f"guide {self.guide.name!r} is joint over the global latents "
                f"{', '.join(self.guide.global_sites)} and every cell's latents, so the "
                "globals cannot be held at plug-in values when scoring it; use "
                f"make_guide({self.guide.name!r}, model, local='mean_field'), or a model "
                "whose globals are point-estimated")
        (batch, params, guide), = list(self._evaluation(data))  # joint: one chunk
        weights = np.asarray(_joint_log_weights(self.model, guide, params, batch, key, n_samples),
                             np.float64)
        total = float(np.logaddexp.reduce(weights) - np.log(n_samples))
        return {
            "n_cells": int(data.n_cells),
            "avg_log_likelihood": total / data.n_cells,
            "method": "importance_sampling_joint",
            "n_samples": int(n_samples),
            "elbo": float(np.mean(weights)) / data.n_cells,
            "log_weights": weights,
        }

    def predict(self, data: CellData, soft: bool = False):
        """Predicted labels of the cells, for models with a classifier (SCANVI).

        Args:
          data: cells registered against this model's registry.
          soft: also return the probabilities.

        Returns:
          A ``pandas.Series`` of label names indexed by cell name; with
          ``soft=True``, ``(labels, probabilities)`` where ``probabilities`` is
          a cells × labels DataFrame (columns in the registry's label order,
          rows summing to 1).
        """
        if not hasattr(self.model, "predict_proba"):
            raise TypeError(f"model {self.model.name!r} does not predict labels; fit a model "
                            "with a classifier, e.g. scanvi")
        from lvmzoo.models.scanvi import label_probabilities

        probs = label_probabilities(self.model, self.params, data)
        return label_predictions(probs, data, self.registry, soft)

    def loadings(self):
        """Gene loadings of a linearly decoded model (LinearSCVI): genes × ``n_latent`` DataFrame."""
        if not hasattr(self.model, "loadings"):
            raise TypeError(f"model {self.model.name!r} has no linear decoder; fit e.g. "
                            "linear_scvi")
        return self.model.loadings(self.params, self.registry.gene_names)

    def annotate(self, adata: ad.AnnData, data: CellData, *, per_gene: bool = True,
                 copy: bool = True) -> tuple[ad.AnnData, list[str]]:
        """A copy of ``adata`` with ``obsm["X_<model>"]`` and the model's documented extras.

        Args:
          per_gene: also add the model's cells × genes outputs
            (:meth:`LatentModel.annotate_per_gene`, e.g. scVI's normalised
            expression layer); ``False`` skips them where they would not fit.
          copy: ``False`` writes into ``adata`` itself instead of a copy (for a
            caller that owns it, e.g. the CLI, to avoid a second matrix in memory).

        Returns:
          ``(annotated, keys_added)``; with ``copy=True`` ``adata`` is not modified.
        """
        out = adata.copy() if copy else adata
        z = self.latent(data)
        out.obsm[f"X_{self.model.name}"] = z
        extras = self.model.annotate(out, self.params, z, data)
        if per_gene:
            extras += self.model.annotate_per_gene(out, self.params, data)
        return out, [f'obsm["X_{self.model.name}"]', *extras]

    def save(self, path) -> None:
        """Write the model to directory ``path`` atomically (see :mod:`lvmzoo.infer.saving`)."""
        from lvmzoo.infer.saving import save_model  # saving imports this module

        save_model(self, path)


def label_predictions(probs: np.ndarray, data: CellData, registry: DataRegistry,
                      soft: bool = False):
    """The most probable label of each cell (a Series named ``"prediction"``, indexed by cell),
    and with ``soft=True`` also ``probs`` as a cells × labels DataFrame, columns in the
    registry's label order: what ``predict`` returns, for one model or an ensemble."""
    import pandas as pd

    index = pd.Index(np.asarray(data.obs_names).astype(str))
    categories = list(registry.label_categories)
    labels = pd.Series(pd.Categorical.from_codes(np.asarray(probs).argmax(1), categories),
                       index=index, name="prediction")
    if not soft:
        return labels
    return labels, pd.DataFrame(probs, index=index, columns=categories)
