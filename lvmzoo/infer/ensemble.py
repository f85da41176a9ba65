"""Seed ensembles: R replicate fits of one model, used as one fitted model.

A deep model's latent space, labels and differential-expression calls change
with its random seed.  ``lvmzoo.fit(model, data, replicates=R)`` trains the
seeds ``seed, ..., seed + R - 1`` in one vmapped program
(:func:`lvmzoo.infer.replicates.fit_replicated`: the same defaults as one fit,
every replicate holding out the same validation cells and stopping early on
its own validation loss) and returns a :class:`FittedEnsemble`, which has the
methods of a :class:`~lvmzoo.infer.results.FittedModel`:

* ``latent``: the replicates' latents rotated onto replicate 0's (orthogonal
  Procrustes on the training cells, fixed at fit time so that new cells land
  in the same space) and averaged; ``latent_spread`` is each cell's RMS
  distance of the aligned replicates from that mean, a per-cell uncertainty.
* ``evaluate``: the log-likelihood of the ensemble as one model, the
  equal-weight mixture ``log (1/R) Σ_r p_r(x)`` of the replicates' marginal
  likelihoods (each estimated as for one fit); by Jensen's inequality it is at
  least the replicates' average ``log p_r(x)``, reported beside it.
* ``predict`` (models with a classifier): the replicates' log-probabilities
  averaged (a geometric mean, renormalised) and tempered by one temperature
  fitted after training on the labelled validation cells, which no replicate
  trained on (temperature scaling, Guo et al. 2017).  Averaging alone makes
  the ensemble more accurate but less confident than it is right: on a
  simulation the replicates were already underconfident and the plain average
  of their probabilities doubled the calibration error.  Without labelled
  validation cells the temperature is 1.
* :func:`lvmzoo.analysis.differential_expression` pools the posterior draws of
  all replicates and reports per gene how stable the call is across them;
  :func:`lvmzoo.analysis.normalized_expression` averages the replicates.

Analyses that need one set of parameters (query mapping, perturbation,
integration) take one replicate: ``ensemble.members[r]``.

A diverged replicate is left out of the ensemble with a warning (its message
is in ``ensemble.dropped``); if every replicate diverged the fit raises
:class:`~lvmzoo.infer.svi.FitDivergedError`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import anndata as ad
import numpy as np
import pandas as pd
from scipy.linalg import orthogonal_procrustes
from scipy.special import logsumexp

from lvmzoo.data.registry import CellData
from lvmzoo.infer.results import FittedModel, label_predictions

class NeedsOneModel(TypeError):
    """An analysis that needs one set of parameters was given a seed ensemble."""


# Training cells the alignment of the replicates' latents is computed on.
ALIGNMENT_CELLS = 5_000


@dataclasses.dataclass
class Alignment:
    """Maps replicate ``r``'s latent onto replicate 0's: ``(z - center[r]) @ rotation[r] + target``."""

    rotation: np.ndarray  # (R, K, K), orthogonal; identity for replicate 0
    center: np.ndarray  # (R, K): each replicate's mean latent over the alignment cells
    target: np.ndarray  # (K,): replicate 0's

    def apply(self, r: int, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float64) - self.center[r]) @ self.rotation[r] + self.target

    @classmethod
    def fit(cls, latents: list[np.ndarray]) -> "Alignment":
        """Orthogonal Procrustes of each centred latent onto replicate 0's centred latent."""
        latents = [np.asarray(z, np.float64) for z in latents]
        centers = np.stack([z.mean(0) for z in latents])
        reference = latents[0] - centers[0]
        rotations = []
        for z, center in zip(latents, centers):
            rotation, _ = orthogonal_procrustes(z - center, reference)
            rotations.append(rotation)
        rotations[0] = np.eye(reference.shape[1])
        return cls(np.stack(rotations), centers, centers[0].copy())

    def to_dict(self) -> dict[str, Any]:
        return {"rotation": self.rotation.tolist(), "center": self.center.tolist(),
                "target": self.target.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Alignment":
        return cls(*(np.asarray(d[k], np.float64) for k in ("rotation", "center", "target")))


@dataclasses.dataclass
class FittedEnsemble:
    """R fits of one model to the same cells with seeds ``seeds`` (see the module docstring).

    Attributes:
      members: the replicates' :class:`FittedModel` s (diverged ones left out).
      alignment: the maps of each member's latent onto member 0's.
      dropped: ``{seed: divergence message}`` of replicates left out.
    """

    members: list[FittedModel]
    alignment: Alignment
    dropped: dict[int, str] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0

    # -- what a FittedModel has ---------------------------------------------

    @property
    def n_replicates(self) -> int:
        return len(self.members)

    @property
    def seeds(self) -> list[int]:
        return [m.seed for m in self.members]

    @property
    def model(self):
        return self.members[0].model

    @property
    def guide(self):
        return self.members[0].guide

    @property
    def registry(self):
        return self.members[0].registry

    @property
    def seed(self) -> int:
        return self.members[0].seed

    @property
    def train_index(self) -> np.ndarray:
        return self.members[0].train_index

    @property
    def validation_index(self) -> np.ndarray:
        return self.members[0].validation_index

    @property
    def diverged(self) -> Optional[str]:
        return None  # diverged replicates are not members (see ``dropped``)

    @property
    def interrupted(self) -> bool:
        return any(m.interrupted for m in self.members)

    @property
    def params(self):
        raise NeedsOneModel(
            f"a seed ensemble of {self.n_replicates} fits has no single set of parameters; "
            "analyses that need one take a replicate, ensemble.members[r] (on the command "
            "line: the run directory RUN/model/replicates/<r>, r >= 1)")

    @property
    def history(self) -> dict[str, Any]:
        """One history for the ensemble: per epoch the replicates' average loss (over
        those still training) and, under ``"replicates"``, each replicate's own."""
        histories = [m.history for m in self.members]
        n_epochs = max(len(h["epoch"]) for h in histories)

        def average(key):
            rows = np.full((len(histories), n_epochs), np.nan)
            for i, h in enumerate(histories):
                rows[i, :len(h[key])] = h[key]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no validation
                return np.nanmean(rows, axis=0).tolist()

        longest = max(histories, key=lambda h: len(h["epoch"]))
        reasons = [h.get("stop_reason", "epoch_limit") for h in histories]
        shared = {k: v for k, v in longest.items()
                  if k not in ("epoch", "loss", "validation_loss", "stop_reason", "best_epoch")}
        return {
            **shared,
            "epoch": list(range(n_epochs)), "loss": average("loss"),
            "validation_loss": average("validation_loss"), "seconds": longest["seconds"],
            # The whole run stops with the last replicate; its reason stands for the run.
            "stop_reason": reasons[histories.index(longest)],
            "best_epoch": longest.get("best_epoch"),
            "replicates": [{"seed": m.seed, "stop_reason": h.get("stop_reason"),
                            "best_epoch": h.get("best_epoch"), "loss": h["loss"],
                            "validation_loss": h["validation_loss"]}
                           for m, h in zip(self.members, histories)],
        }

    # -- per-cell outputs ------------------------------------------------------

    def member_latents(self, data: CellData, seed: int = 0) -> list[np.ndarray]:
        """Each member's latent of ``data``, aligned onto member 0's space."""
        return [self.alignment.apply(r, m.latent(data, seed))
                for r, m in enumerate(self.members)]

    def latent(self, data: CellData, seed: int = 0) -> np.ndarray:
        """The members' aligned latents averaged, ``(n_cells, n_latent)`` float32."""
        return np.mean(self.member_latents(data, seed), axis=0).astype(np.float32)

    def latent_spread(self, data: CellData, seed: int = 0) -> np.ndarray:
        """Per cell, the RMS distance of the members' aligned latents from their mean."""
        latents = np.stack(self.member_latents(data, seed))
        return np.sqrt(np.mean(np.sum((latents - latents.mean(0)) ** 2, axis=-1), axis=0))

    def evaluate(self, data: CellData, n_samples: int = 100, seed: int = 0,
                 method: str = "auto", *, standard_error: bool = False) -> dict[str, Any]:
        """The ensemble's average per-cell log-likelihood (the mixture of the members).

        Returns :meth:`FittedModel.evaluate`'s keys, with ``avg_log_likelihood``
        the mixture's and ``elbo`` the members' average, plus
        ``replicate_avg_log_likelihood`` (each member's) and
        ``single_fit_avg_log_likelihood`` (their average: what one seed scores
        on average).
        """
        per_member, elbos, how = [], [], None
        for m in self.members:
            cells, elbo, how = m.cell_log_likelihoods(data, n_samples, seed, method)
            per_member.append(cells)
            elbos.append(elbo)
        per_member = np.stack(per_member).astype(np.float64)
        mixture = logsumexp(per_member, axis=0) - np.log(len(self.members))
        scores = {
            "n_cells": int(data.n_cells),
            "avg_log_likelihood": float(mixture.mean()),
            "method": how,
            "n_samples": 0 if how == "exact" else int(n_samples),
            "elbo": float(np.mean(elbos)),
            "ensemble": f"mixture of {len(self.members)} replicates",
            "replicate_avg_log_likelihood": per_member.mean(1).tolist(),
            "single_fit_avg_log_likelihood": float(per_member.mean()),
        }
        if standard_error:
            scores["log_likelihood_sd"] = (float(np.std(mixture, ddof=1))
                                           if data.n_cells > 1 else 0.0)
            scores["cell_log_likelihoods"] = mixture
        return scores

    def member_probabilities(self, data: CellData) -> np.ndarray:
        """``(R, n_cells, C)``: each member's own label probabilities."""
        from lvmzoo.models.scanvi import label_probabilities

        if not hasattr(self.model, "predict_proba"):
            raise TypeError(f"model {self.model.name!r} does not predict labels; fit a model "
                            "with a classifier, e.g. scanvi")
        return np.stack([label_probabilities(m.model, m.params, data) for m in self.members])

    def predict_proba(self, data: CellData) -> np.ndarray:
        """``(n_cells, C)``: the members' combined, tempered label probabilities."""
        return combine_probabilities(self.member_probabilities(data), self.temperature)

    def predict(self, data: CellData, soft: bool = False):
        """As :meth:`FittedModel.predict`, from the members' averaged probabilities."""
        return label_predictions(self.predict_proba(data), data, self.registry, soft)

    def annotate(self, adata: ad.AnnData, data: CellData, *, per_gene: bool = True,
                 copy: bool = True) -> tuple[ad.AnnData, list[str]]:
        """As :meth:`FittedModel.annotate`, for the ensemble.

        Adds ``obsm["X_<model>"]`` (the aligned average latent) and
        ``obs["<model>_latent_spread"]``.  Each member's own extras are
        computed and combined: numeric per-cell outputs (``obs`` columns,
        ``obsm``) and cells × genes layers are averaged over the members, a classifier's predictions
        come from the averaged probabilities (with ``obs["<model>_agreement"]``,
        the share of members whose own prediction is the ensemble's), and
        everything else (categorical ``obs``, ``var``, ``varm``, ``uns``) is
        member 0's.
        """
        out = adata.copy() if copy else adata
        name = self.model.name
        latents = np.stack(self.member_latents(data))
        mean = latents.mean(0)
        out.obsm[f"X_{name}"] = mean.astype(np.float32)
        out.obs[f"{name}_latent_spread"] = np.sqrt(
            np.mean(np.sum((latents - mean) ** 2, axis=-1), axis=0))
        keys = [f'obsm["X_{name}"]', f'obs["{name}_latent_spread"]']
        extras = []
        for r, m in enumerate(self.members):
            scratch = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()),
                                 var=pd.DataFrame(index=adata.var_names.copy()))
            added = m.model.annotate(scratch, m.params, latents[r], data)
            # A model whose outputs depend on the latent's orientation (a pseudotime's
            # direction) reads them the way the alignment onto member 0 turned its latent.
            align = getattr(m.model, "align_member_outputs", None)
            if align is not None:
                align(scratch, self.alignment.rotation[r])
            if per_gene:
                added += m.model.annotate_per_gene(scratch, m.params, data)
            extras.append(scratch)
            if r == 0:
                keys += added
        first = extras[0]
        for column in first.obs.columns:
            values = first.obs[column]
            if pd.api.types.is_numeric_dtype(values) and not isinstance(values.dtype,
                                                                      pd.CategoricalDtype):
                out.obs[column] = np.mean([e.obs[column].to_numpy() for e in extras], axis=0)
            else:
                out.obs[column] = values.to_numpy() if not isinstance(
                    values.dtype, pd.CategoricalDtype) else values.values
        for key in first.obsm:
            out.obsm[key] = np.mean([e.obsm[key] for e in extras], axis=0).astype(
                np.asarray(first.obsm[key]).dtype)
        for layer in first.layers:
            out.layers[layer] = np.mean([e.layers[layer] for e in extras], axis=0).astype(
                first.layers[layer].dtype)
        for column in first.var.columns:
            out.var[column] = first.var[column].to_numpy()
        for key in first.varm:
            out.varm[key] = first.varm[key]
        for key in first.uns:
            out.uns[key] = first.uns[key]
        if hasattr(self.model, "predict_proba"):
            keys += self._annotate_predictions(out, data)
        return out, list(dict.fromkeys(keys))

    def _annotate_predictions(self, out, data) -> list[str]:
        from lvmzoo.models.scanvi import PREDICTION_OBS, PROBABILITY_OBS

        member_probs = self.member_probabilities(data)
        probs = combine_probabilities(member_probs, self.temperature)
        choice = probs.argmax(1)
        categories = list(self.registry.label_categories)
        out.obs[PREDICTION_OBS] = pd.Categorical.from_codes(choice, categories)
        out.obs[PROBABILITY_OBS] = probs.max(1).astype(np.float32)
        agreement = f"{self.model.name}_agreement"
        out.obs[agreement] = np.mean([p.argmax(1) == choice for p in member_probs], axis=0)
        return [f'obs["{PREDICTION_OBS}"]', f'obs["{PROBABILITY_OBS}"]', f'obs["{agreement}"]']

    def loadings(self):
        raise TypeError("an ensemble's loadings differ by a rotation per replicate; take one "
                        "replicate's: ensemble.members[r].loadings()")

    def save(self, path) -> None:
        """Write the ensemble to run directory ``path`` atomically (:mod:`lvmzoo.infer.saving`)."""
        from lvmzoo.infer.saving import save_model

        save_model(self, path)


def fit_ensemble(model, data: CellData, *, replicates: int, seed: int = 0,
                 **options) -> FittedEnsemble:
    """``replicates`` fits of ``model`` with seeds ``seed, ..., seed + replicates - 1``.

    ``options`` are :func:`lvmzoo.fit`'s (see
    :func:`lvmzoo.infer.replicates.fit_replicated` for which it takes).
    """
    from lvmzoo.infer.replicates import fit_replicated
    from lvmzoo.infer.svi import FitDivergedError

    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) \
            or replicates < 1:
        raise ValueError(f"replicates must be a positive number of fits, got {replicates!r}")
    fits = fit_replicated(model, data, range(seed, seed + int(replicates)), **options)
    dropped = {f.seed: f.diverged for f in fits if f.diverged}
    members = [f for f in fits if not f.diverged]
    if not members:
        raise FitDivergedError(f"every replicate diverged; replicate {fits[0].seed}: "
                               f"{fits[0].diverged}", fits[0])
    if dropped:
        warnings.warn(f"{len(dropped)} of {len(fits)} replicates diverged and are left out of "
                      f"the ensemble (seeds {', '.join(map(str, dropped))}): "
                      f"{next(iter(dropped.values()))}", UserWarning, stacklevel=2)
    ensemble = FittedEnsemble(members, alignment_of(members, data), dropped)
    if hasattr(ensemble.model, "predict_proba"):
        ensemble.temperature = held_out_temperature(ensemble, data)
    return ensemble


# Fewest labelled validation cells a temperature is fitted on; below, it stays 1.
MIN_TEMPERATURE_CELLS = 10


def combine_probabilities(member_probs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(mean_r log p_r / temperature)`` over the members' ``(R, n, C)`` probabilities."""
    logits = np.log(np.clip(np.asarray(member_probs, np.float64), 1e-12, None)).mean(0)
    logits = logits / temperature
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True)


def held_out_temperature(ensemble: FittedEnsemble, data: CellData) -> float:
    """The temperature minimising the labelled validation cells' negative log-likelihood.

    1 when fewer than :data:`MIN_TEMPERATURE_CELLS` validation cells carry a label.
    """
    from scipy.optimize import minimize_scalar

    cells = np.asarray(ensemble.validation_index)
    labelled = cells[data.labels[cells] >= 0] if len(cells) else cells
    if len(labelled) < MIN_TEMPERATURE_CELLS:
        return 1.0
    held_out = data.subset(labelled)
    member_probs = ensemble.member_probabilities(held_out)
    truth = np.asarray(held_out.labels)

    def loss(log_t):
        p = combine_probabilities(member_probs, float(np.exp(log_t)))
        return -np.mean(np.log(p[np.arange(len(truth)), truth] + 1e-12))

    best = minimize_scalar(loss, bounds=(np.log(0.1), np.log(10.0)), method="bounded")
    return float(np.exp(best.x))


def alignment_of(members: list[FittedModel], data: CellData) -> Alignment:
    """The members' latent maps, fitted on at most :data:`ALIGNMENT_CELLS` training cells."""
    cells = np.asarray(members[0].train_index)
    if len(cells) > ALIGNMENT_CELLS:
        rng = np.random.default_rng(members[0].seed)
        cells = np.sort(rng.choice(cells, ALIGNMENT_CELLS, replace=False))
    sample = data.subset(cells)
    return Alignment.fit([m.latent(sample) for m in members])
