"""In-silico perturbation prediction, and honest scoring of it.

The task: cells of several types were measured in a control condition and
in a perturbed one, except that the perturbed cells of one type (the
*held-out* type) were never shown to the model; predict them.

:func:`predict_perturbation` predicts them with a fitted model, by one of

* **counterfactual** decoding, for a model with the perturbation in its
  generative story (:class:`~lvmzoo.models.cpa.CPA`): infer the held-out
  type's control cells' basal states, set the perturbation, decode
  (``model.counterfactual``);
* **latent arithmetic** (scGen; Lotfollahi et al., 2019), for any amortised
  zoo model with an encoder and a decoder (``model.latent`` and
  ``model.decode``; the VAE on log-normalised data as scGen does, scVI on
  counts): the shift ``delta`` between the mean latent of perturbed and
  control cells, averaged over the cell types measured in both conditions
  (each type weighs the same, which is what scGen's resampling to equal type
  sizes aims at), is added to the held-out type's control latents, which are
  decoded.

Either way the prediction is a new AnnData of the held-out type's control
cells as they would be when perturbed: ``X`` drawn from the model's
likelihood (counts for count models, so they compare with measured cells),
``layers["expected"]`` its mean.

:func:`evaluate_perturbation` scores predictions against the measured
perturbed cells of the held-out type, always beside two baselines:

* **no change**: the held-out type's control cells;
* **mean shift**: those cells plus the average (over the other types, each
  weighing the same) of the perturbed − control difference of mean
  log-normalised expression.

Metrics, on ``log1p(10^4 x / total)`` expression of the model's genes (the
totals over those genes, for measured and predicted cells alike):

* ``r2`` / ``r2_top``: the coefficient of determination (as
  ``sklearn.metrics.r2_score``, observed as the truth) of the per-gene mean
  of predicted vs measured perturbed cells, over all genes / over the top
  ``n_top_genes`` differentially expressed genes of the held-out type
  (perturbed vs control, ranked by the absolute Welch t statistic on the
  measured cells: the model never chooses them).  Note that scGen's papers
  report the squared Pearson correlation instead, which ignores scale and
  offset errors;
* ``delta_pearson`` / ``delta_pearson_top``: the Pearson correlation of the
  predicted and measured change of the per-gene means (each minus the
  control cells' mean); undefined (NaN) for *no change*, which predicts none;
* ``energy_distance``: between predicted and measured perturbed cells, in
  ``n_pcs`` principal components of the measured cells of the held-out type
  (both conditions), ``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` (as
  pertpy's ``Edistance``), so a method that only gets the means right does
  not look perfect.  Zero for identical distributions.

When no perturbed cells of the held-out type were measured (the purpose of a
prediction, not the benchmark), :func:`prediction_profiles` describes the
predictions without scoring them: the per-gene means of the predictions, of
the held-out type's control cells and of the mean-shift baseline, and the
genes the prediction changes most.

Every function here takes an AnnData in memory or with its matrix on disk
(``anndata.read_h5ad(path, backed="r")``, :func:`lvmzoo.data.read_backed`)
and reads the cells the same way, a block of contiguous rows at a time: the
prediction streams the cells through the model (the latent of each cell, the
decoded held-out cells), and the evaluation accumulates what its metrics need
in one pass (per cell type and condition, the mean of log-normalised
expression; of the held-out type's control and perturbed cells, the variance
for the Welch t and the genes × genes covariance whose leading eigenvectors
are the energy distance's principal components; the few cells drawn up front
for the energy distance).  Memory is a block of cells plus the outputs: the
predicted cells and at most ``max_cells`` cells per set.

References:
  Lotfollahi, M., Wolf, F. A. & Theis, F. J. (2019). scGen predicts
  single-cell perturbation responses. Nature Methods 16, 715–721.
  Ahlmann-Eltze, C., Huber, W. & Anders, S. (2025). Deep-learning-based
  gene perturbation effect prediction does not yet outperform simple linear
  baselines. Nature Methods.
  Székely, G. J. & Rizzo, M. L. (2013). Energy statistics. Journal of
  Statistical Planning and Inference 143, 1249–1272.
  Chan, T. F., Golub, G. H. & LeVeque, R. J. (1983). Algorithms for
  computing the sample variance: analysis and recommendations. The American
  Statistician 37, 242–247.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from lvmzoo.analysis.expression import map_cells
from lvmzoo.data.backed import SCAN_BLOCK, BackedMatrix
from lvmzoo.data.registry import DataError, _check_values, _observations, query_anndata
from lvmzoo.data.transforms import apply_transform

EXPECTED_LAYER = "expected"
BASELINES = ("mean shift", "no change")
METHODS = ("auto", "counterfactual", "latent_arithmetic")
# What X of a prediction holds, by the data the model was fitted to.
COUNTS, LOG_NORMALISED = "counts", "log1p_cp10k"
# Cells per block read (contiguous rows): at most _BLOCK_ELEMENTS float64 values, 32 MiB.
_BLOCK_ELEMENTS = 1 << 22
_MAX_BLOCK_CELLS = SCAN_BLOCK


class Design(NamedTuple):
    """Where the cells of a perturbation experiment are (boolean masks over ``adata``)."""

    condition_key: str
    control: str
    perturbed: str
    cell_type_key: str
    cell_type: str
    held_out_control: np.ndarray  # the held-out type's control cells: what is predicted from
    held_out_perturbed: np.ndarray  # its perturbed cells: what is predicted
    other_types: tuple[str, ...]  # types (not the held-out one) with cells in both conditions


def perturbation_design(adata, condition_key: str, control: str, perturbed: str,
                        cell_type_key: str, cell_type: str) -> Design:
    """Check the experiment's ``obs`` columns and values; find its cells.

    The held-out type need not have perturbed cells (``held_out_perturbed``
    is then all ``False``): predicting them is the point; only scoring a
    prediction (:func:`compare_perturbation`) needs them.

    Raises:
      DataError: a column is missing, a condition or the cell type has no
        cells, the held-out type has no control cells, or the two conditions
        are the same.
    """
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"expected an AnnData, got {type(adata).__name__}")
    for option, key in (("condition_key", condition_key), ("cell_type_key", cell_type_key)):
        if key not in adata.obs.columns:
            raise DataError(f"{option} {key!r} is not a column of adata.obs; available columns: "
                            f"{', '.join(map(str, adata.obs.columns)) or 'none'}")
    condition = adata.obs[condition_key].astype(str).to_numpy()
    types = adata.obs[cell_type_key].astype(str).to_numpy()
    if str(control) == str(perturbed):
        raise DataError(f"control and perturbed are the same condition {control!r}")
    for option, value in (("control", control), ("perturbed", perturbed)):
        if not np.any(condition == str(value)):
            raise DataError(f"no cells have obs[{condition_key!r}] == {value!r} ({option}); "
                            f"conditions: {', '.join(_values(condition))}")
    if not np.any(types == str(cell_type)):
        raise DataError(f"no cells have obs[{cell_type_key!r}] == {cell_type!r}; cell types: "
                        f"{', '.join(_values(types))}")
    held_out_control = (types == str(cell_type)) & (condition == str(control))
    if not held_out_control.any():
        raise DataError(f"cell type {cell_type!r} has no {control!r} cells to predict from; "
                        "choose a type measured in the control condition")
    others = tuple(t for t in _values(types) if t != str(cell_type)
                   and np.any((types == t) & (condition == str(control)))
                   and np.any((types == t) & (condition == str(perturbed))))
    return Design(condition_key, str(control), str(perturbed), cell_type_key, str(cell_type),
                  held_out_control, (types == str(cell_type)) & (condition == str(perturbed)),
                  others)


def _values(column: np.ndarray) -> list[str]:
    return sorted(set(column.tolist()))


def exclude_cells(adata, groups: Sequence[Mapping[str, str]]) -> ad.AnnData:
    """A copy of ``adata`` without the cells matching any of ``groups``.

    Args:
      adata: cells × genes; not modified.
      groups: each a ``{obs column: value}`` mapping; a cell matches a group
        when it has all of the group's values, e.g. ``[{"cell_type": "B",
        "condition": "stim"}]`` leaves out the stimulated B cells, so a model
        fitted to the rest can be asked to predict them.

    Raises:
      DataError: a column is missing, or a group matches no cell (a typo
        would otherwise exclude nothing).
    """
    drop = np.zeros(adata.n_obs, bool)
    for group in groups:
        match = np.ones(adata.n_obs, bool)
        for key, value in group.items():
            if key not in adata.obs.columns:
                raise DataError(f"cannot exclude cells by {key!r}: not a column of adata.obs; "
                                f"available columns: {', '.join(map(str, adata.obs.columns))}")
            match &= adata.obs[key].astype(str).to_numpy() == str(value)
        if not match.any():
            spelled = ", ".join(f"{k}={v}" for k, v in group.items())
            raise DataError(f"no cells match {spelled}; check the column values")
        drop |= match
    return adata[~drop].copy()


# --------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------


def predict_perturbation(
    result,
    adata,
    condition_key: str,
    control: str,
    perturbed: str,
    cell_type_key: str,
    cell_type: str,
    *,
    method: str = "auto",
    dose: Optional[float] = None,
    seed: int = 0,
) -> ad.AnnData:
    """Predict the held-out type's cells under the perturbation.

    Args:
      result: a :class:`~lvmzoo.infer.results.FittedModel`, fitted without
        the held-out type's perturbed cells (for an honest prediction).
      adata: the cells, with the model's genes and ``obs`` columns; its
        held-out perturbed cells, if present, are not used.  Not modified.
      condition_key / control / perturbed: the ``obs`` column of conditions
        and its control and perturbed values.
      cell_type_key / cell_type: the ``obs`` column of cell types and the
        held-out type.
      method: ``"counterfactual"`` (models with ``counterfactual``, e.g.
        CPA), ``"latent_arithmetic"`` (models with ``latent`` and
        ``decode``: VAE, scVI) or ``"auto"`` (the first the model offers).
      dose: the dose to predict at, for models with a dose key (default: the
        most common dose of the perturbed cells in ``adata``).
      seed: seed of the draws of ``X``.

    Returns:
      A new AnnData, one row per control cell of the held-out type (named
      ``<cell>-><perturbed>``, ``obs`` copied with ``condition_key`` set to
      ``perturbed`` and ``obs["predicted_from"]`` the cell's name), the
      model's genes as ``var_names``; ``X`` draws from the model's likelihood
      (CSR counts for count models, log-normalised values for a Gaussian model
      of ``log1p_cp10k`` data), ``layers["expected"]`` its mean (dense), and
      ``uns["perturbation"]`` the settings (``method``, ``scale`` of ``X``:
      ``"counts"`` or ``"log1p_cp10k"``, ...).

    Raises:
      DataError: bad design (see :func:`perturbation_design`), or cells that
        do not match the model's registry.
      ValueError: the model offers no such method.
    """
    design = perturbation_design(adata, condition_key, control, perturbed, cell_type_key,
                                 cell_type)
    model = result.model
    method = prediction_method(model, method)
    if result.guide != model.guide:
        # Both methods read the model's own encoder, which another guide does not train.
        raise ValueError(f"{model.name!r} was fitted with another guide than its own; "
                         "perturbation prediction needs the model's amortised encoder")
    scale = _prediction_scale(result.registry)
    if method == "counterfactual":
        sample, expected, detail = _counterfactual(result, adata, design, dose, seed)
    else:
        sample, expected, detail = _latent_arithmetic(result, adata, design, seed)
    cells = adata.obs_names[design.held_out_control]
    obs = adata.obs.loc[design.held_out_control].copy()
    obs["predicted_from"] = np.asarray(cells, dtype=str)
    obs[condition_key] = pd.Categorical([design.perturbed] * len(obs))
    if "dose" in detail:
        obs[model.dose_key] = detail["dose"]
    obs.index = pd.Index([f"{c}->{design.perturbed}" for c in cells])
    x = sp.csr_matrix(sample) if scale == COUNTS else sample
    predicted = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=list(result.registry.gene_names)))
    predicted.layers[EXPECTED_LAYER] = expected
    predicted.uns["perturbation"] = {
        "method": method, "model": model.name, "scale": scale,
        "condition_key": condition_key, "control": design.control,
        "perturbed": design.perturbed, "cell_type_key": cell_type_key,
        "cell_type": design.cell_type, "seed": int(seed), **detail,
    }
    return predicted


def prediction_method(model, method: str = "auto") -> str:
    """The method :func:`predict_perturbation` uses for ``model``.

    Raises:
      ValueError: an unknown method, or one the model does not offer.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    offers = [m for m, needs in (("counterfactual", ("counterfactual",)),
                                 ("latent_arithmetic", ("latent", "decode")))
              if all(hasattr(model, n) for n in needs)]
    if method == "auto" and offers:
        return offers[0]
    if method not in offers:
        raise ValueError(
            f"model {model.name!r} cannot predict perturbations by {method}: "
            + ("it offers " + ", ".join(offers) if offers else
               "it has neither counterfactual() nor an encoder and decode()"))
    return method


def _prediction_scale(registry) -> str:
    if registry.kind == "counts" and registry.transform == "none":
        return COUNTS
    if registry.transform == LOG_NORMALISED:
        return LOG_NORMALISED
    raise DataError(f"the model was fitted to {registry.kind} data with transform "
                    f"{registry.transform!r}; perturbation prediction needs raw counts or "
                    "log1p_cp10k-transformed counts")


def _latent_arithmetic(result, adata, design: Design, seed: int):
    """``(X, expected, details)``: decode the held-out control latents + the balanced shift."""
    if not design.other_types:
        raise DataError(
            f"no cell type other than {design.cell_type!r} has both {design.control!r} and "
            f"{design.perturbed!r} cells; latent arithmetic learns the shift from them")
    keep = ~design.held_out_perturbed  # never read the cells to predict
    data = query_anndata(adata, result.registry, cells=np.flatnonzero(keep))
    z = result.latent(data)
    condition = adata.obs[design.condition_key].astype(str).to_numpy()[keep]
    types = adata.obs[design.cell_type_key].astype(str).to_numpy()[keep]
    shifts = [z[(types == t) & (condition == design.perturbed)].mean(0)
              - z[(types == t) & (condition == design.control)].mean(0)
              for t in design.other_types]
    delta = np.mean(shifts, axis=0).astype(np.float32)
    source = data.subset(np.flatnonzero(design.held_out_control[keep]))
    n_genes = source.n_genes
    sample, expected = map_cells(_arithmetic_program, result, source, seed,
                                 extra=(jnp.asarray(delta),), per_cell=4 * n_genes)
    return sample, expected, {"delta": delta.tolist(), "shift_from": list(design.other_types)}


def _counterfactual(result, adata, design: Design, dose, seed: int):
    """``(X, expected, details)``: decode the held-out control cells with the perturbation set."""
    model, registry = result.model, result.registry
    key = getattr(model, "perturbation_key", design.condition_key)
    if key != design.condition_key:
        raise DataError(f"the model's perturbation is obs[{key!r}]; pass condition_key={key!r}")
    code = registry.categorical_codes(key, [design.perturbed])[0]
    dose_key = getattr(model, "dose_key", None)
    if dose_key is not None and dose_key not in adata.obs.columns:
        raise DataError(f"the model's dose is obs[{dose_key!r}], which the data lack")
    if dose_key is not None and dose is None:
        doses = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy()
        perturbed = doses[adata.obs[key].astype(str).to_numpy() == design.perturbed]
        values, counts = np.unique(perturbed[np.isfinite(perturbed)], return_counts=True)
        dose = float(values[np.argmax(counts)]) if values.size else 1.0
    data = query_anndata(adata, registry, cells=np.flatnonzero(design.held_out_control))
    sample, expected = map_cells(
        _counterfactual_program, result, data, seed,
        extra=(jnp.int32(code), None if dose_key is None else jnp.float32(dose)),
        per_cell=4 * data.n_genes)
    return sample, expected, {} if dose_key is None else {"dose": float(dose)}


@functools.partial(jax.jit, static_argnames=("model",))
def _arithmetic_program(model, params, batch, key, delta):
    z = model.latent(params, batch, key) + delta
    likelihood = model.decode(params, batch, z)
    return likelihood.sample(key), likelihood.mean


@functools.partial(jax.jit, static_argnames=("model",))
def _counterfactual_program(model, params, batch, key, code, dose):
    likelihood = model.counterfactual(params, batch, perturbation=code, dose=dose)
    return likelihood.sample(key), likelihood.mean


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


class PerturbationEvaluation(NamedTuple):
    """What :func:`compare_perturbation` measured.

    Attributes:
      metrics: one row per method (the predictions, then the baselines).
      gene_means: ``(n_genes, 2 + n_methods)`` mean log-normalised expression:
        ``"control"`` and ``"observed"`` (the held-out type's measured control
        and perturbed cells), then each method's prediction.
      top_genes: the ``n_top_genes`` most differentially expressed genes,
        most significant first.
      design: the cells compared.
    """

    metrics: pd.DataFrame
    gene_means: pd.DataFrame
    top_genes: list[str]
    design: Design


def evaluate_perturbation(
    adata,
    predictions: Union[ad.AnnData, Mapping[str, ad.AnnData]],
    condition_key: str,
    control: str,
    perturbed: str,
    cell_type_key: str,
    cell_type: str,
    **options,
) -> pd.DataFrame:
    """Score predictions of the held-out type's perturbed cells, beside the baselines.

    See :func:`compare_perturbation` for the arguments; this returns its
    ``metrics``: one row per prediction then ``"mean shift"`` and
    ``"no change"``, columns ``r2``, ``r2_top``, ``delta_pearson``,
    ``delta_pearson_top``, ``energy_distance`` and ``n_cells`` (of the
    prediction).
    """
    return compare_perturbation(adata, predictions, condition_key, control, perturbed,
                                cell_type_key, cell_type, **options).metrics


def compare_perturbation(
    adata,
    predictions: Union[ad.AnnData, Mapping[str, ad.AnnData]],
    condition_key: str,
    control: str,
    perturbed: str,
    cell_type_key: str,
    cell_type: str,
    *,
    layer: Optional[str] = None,
    n_top_genes: int = 100,
    n_pcs: int = 50,
    max_cells: int = 1000,
    seed: int = 0,
) -> PerturbationEvaluation:
    """Metrics, per-gene means and top genes of predictions and baselines (module docstring).

    Args:
      adata: the measured cells, raw counts in ``layer`` (or ``X``), with the
        held-out type's perturbed cells; not modified.
      predictions: an AnnData from :func:`predict_perturbation` (named by its
        method), or ``{name: AnnData}``; each has ``uns["perturbation"]
        ["scale"]`` (``"counts"`` or ``"log1p_cp10k"``) and the same genes.
      condition_key, control, perturbed, cell_type_key, cell_type: the design,
        as for :func:`predict_perturbation`.
      layer: layer of ``adata`` with the counts.
      n_top_genes: how many differentially expressed genes ``r2_top`` and
        ``delta_pearson_top`` use.
      n_pcs: principal components of the energy distance.
      max_cells: cells per set in the energy distance (a random subset).
      seed: seed of that subset.

    Raises:
      DataError: bad design, no measured perturbed cells of the held-out
        type, predictions without a scale or with other genes than each other.
    """
    if isinstance(predictions, ad.AnnData):
        predictions = {_name(predictions): predictions}
    if not predictions:
        raise DataError("no predictions to evaluate")
    design = perturbation_design(adata, condition_key, control, perturbed, cell_type_key,
                                 cell_type)
    if not design.held_out_perturbed.any():
        raise DataError(f"cell type {cell_type!r} has no measured {perturbed!r} cells to "
                        "compare the predictions with (prediction_profiles describes "
                        "predictions without them)")
    genes = _checked_genes(adata, predictions)
    scales = {name: _scale(p, name) for name, p in predictions.items()}
    for name, value in (("n_top_genes", n_top_genes), ("n_pcs", n_pcs), ("max_cells", max_cells)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    _check_other_types(design)
    names = list(dict.fromkeys([*predictions, *BASELINES]))  # a baseline's name is the baseline
    target_rows, picks = _energy_picks(design, predictions, names, max_cells, seed)
    control_rows = np.flatnonzero(design.held_out_control)
    baseline_rows = [control_rows[picks[name]] for name in BASELINES]
    held_out = [(design.cell_type, design.control), (design.cell_type, design.perturbed)]
    groups, spread, picked = _measured_moments(
        adata, genes, layer, design, held_out + _other_groups(design), spread=held_out,
        picks=np.unique(np.concatenate([target_rows, *baseline_rows])))
    control_moments, observed_moments = (groups[key] for key in held_out)
    control_mean, observed_mean = control_moments.mean, observed_moments.mean
    shift = _mean_shift(groups, design)
    top = _welch_top(control_moments, observed_moments, n_top_genes)
    projection = _pca(spread, n_pcs)
    target = projection(picked.take(target_rows))
    means = {"mean shift": control_mean + shift, "no change": control_mean}
    samples = {"mean shift": picked.take(baseline_rows[0]) + shift,
               "no change": picked.take(baseline_rows[1])}
    sizes = dict.fromkeys(BASELINES, len(control_rows))
    for name, prediction in predictions.items():
        if name not in BASELINES:
            moments, chosen = _prediction_moments(prediction, scales[name], picks[name])
            means[name], samples[name] = moments.mean, chosen.take(picks[name])
            sizes[name] = prediction.n_obs
    rows = {name: _scores(means[name], control_mean, observed_mean, top,
                          energy_distance(projection(samples[name]), target), sizes[name])
            for name in names}
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    metrics.index.name = "method"
    gene_means = pd.DataFrame({"control": control_mean, "observed": observed_mean,
                               **{name: means[name] for name in names}},
                              index=pd.Index(genes, name="gene"))
    return PerturbationEvaluation(metrics, gene_means, [genes[i] for i in top], design)


def _energy_picks(design: Design, predictions, names, max_cells: int, seed: int):
    """``(target rows, {name: positions})``: the cells of the energy distance, drawn up front.

    The measured perturbed cells' file rows, then per method (``names`` in
    order) positions among its cells (a prediction's, or the held-out control
    cells for a baseline): all of them, or a random ``max_cells``, drawn in
    that order from one generator.
    """
    rng = np.random.default_rng(seed)
    perturbed_rows = np.flatnonzero(design.held_out_perturbed)
    target_rows = perturbed_rows[_pick(len(perturbed_rows), max_cells, rng)]
    n_control = int(design.held_out_control.sum())
    picks = {name: _pick(n_control if name in BASELINES else predictions[name].n_obs,
                         max_cells, rng) for name in names}
    return target_rows, picks


def _scores(mean, control_mean, observed_mean, top, energy: float, n_cells: int) -> dict:
    """One row of the metrics: a method's per-gene ``mean`` against the measured means."""
    change, true_change = mean - control_mean, observed_mean - control_mean
    return {
        "r2": r2_score(observed_mean, mean),
        "r2_top": r2_score(observed_mean[top], mean[top]),
        "delta_pearson": pearson(true_change, change),
        "delta_pearson_top": pearson(true_change[top], change[top]),
        "energy_distance": energy,
        "n_cells": int(n_cells),
    }


class PerturbationPrediction(NamedTuple):
    """What :func:`prediction_profiles` found, with no measured perturbed cells to score against.

    Attributes:
      gene_means: ``(n_genes, 1 + n_methods)`` mean log-normalised expression:
        ``"control"`` (the held-out type's measured control cells), then each
        prediction, then ``"mean shift"`` (the baseline; absent when no other
        cell type was measured in both conditions).
      top_genes: the ``n_top_genes`` genes whose mean the first prediction
        changes most (largest ``|prediction - control|``), largest first.
      design: the cells predicted from.
    """

    gene_means: pd.DataFrame
    top_genes: list[str]
    design: Design


def prediction_profiles(
    adata,
    predictions: Union[ad.AnnData, Mapping[str, ad.AnnData]],
    condition_key: str,
    control: str,
    perturbed: str,
    cell_type_key: str,
    cell_type: str,
    *,
    layer: Optional[str] = None,
    n_top_genes: int = 100,
) -> PerturbationPrediction:
    """Per-gene mean profiles of predictions beside the control cells and the mean-shift baseline.

    Needs no measured perturbed cells of the held-out type (the case of a real
    prediction); when they are there, :func:`compare_perturbation` scores the
    predictions against them.  The same log-normalised scale as there.

    Args:
      adata: the measured cells, raw counts in ``layer`` (or ``X``); its
        held-out perturbed cells, if any, are not used.  Not modified.
      predictions, condition_key, control, perturbed, cell_type_key, cell_type, layer: as for
        :func:`compare_perturbation`.
      n_top_genes: how many of the most changed genes to name.

    Raises:
      DataError: bad design (see :func:`perturbation_design`), predictions
        without a scale or with other genes than each other or the data.
      ValueError: ``n_top_genes`` below 1.
    """
    if isinstance(predictions, ad.AnnData):
        predictions = {_name(predictions): predictions}
    if not predictions:
        raise DataError("no predictions to describe")
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n_top_genes}")
    design = perturbation_design(adata, condition_key, control, perturbed, cell_type_key,
                                 cell_type)
    genes = _checked_genes(adata, predictions)
    scales = {name: _scale(p, name) for name, p in predictions.items()}
    # Never read the cells that were to be predicted: the held-out type's perturbed cells.
    control_key = (design.cell_type, design.control)
    groups, _, _ = _measured_moments(adata, genes, layer, design,
                                     [control_key, *_other_groups(design)])
    control_mean = groups[control_key].mean
    means = {"control": control_mean}
    for name, prediction in predictions.items():
        means[name] = _prediction_moments(prediction, scales[name])[0].mean
    if design.other_types:
        means["mean shift"] = control_mean + _mean_shift(groups, design)
    first = means[next(iter(predictions))]
    change = np.abs(first - control_mean)
    top = np.argsort(-change, kind="stable")[: min(n_top_genes, len(genes))]
    gene_means = pd.DataFrame(means, index=pd.Index(genes, name="gene"))
    return PerturbationPrediction(gene_means, [genes[i] for i in top], design)


def _checked_genes(adata, predictions: Mapping[str, ad.AnnData]) -> list[str]:
    """The predictions' shared genes, all of them in ``adata``."""
    genes = _shared_genes(predictions)
    missing = [g for g in genes if g not in set(map(str, adata.var_names))]
    if missing:
        raise DataError(f"the data lack {len(missing)} of the predicted genes "
                        f"(e.g. {', '.join(missing[:5])})")
    return genes


def _name(prediction: ad.AnnData) -> str:
    info = prediction.uns.get("perturbation", {})
    return f"{info.get('model', 'model')} ({info.get('method', 'prediction')})"


def _shared_genes(predictions: Mapping[str, ad.AnnData]) -> list[str]:
    names = {name: list(map(str, p.var_names)) for name, p in predictions.items()}
    first = next(iter(names.values()))
    for name, genes in names.items():
        if genes != first:
            raise DataError(f"prediction {name!r} has other genes than the first prediction; "
                            "compare predictions of models fitted to the same genes")
    return first


def _scale(prediction: ad.AnnData, name: str) -> str:
    """What the prediction's ``X`` holds: :data:`COUNTS` or :data:`LOG_NORMALISED`."""
    scale = prediction.uns.get("perturbation", {}).get("scale")
    if scale in (COUNTS, LOG_NORMALISED):
        return scale
    raise DataError(f"prediction {name!r} has no uns['perturbation']['scale'] "
                    f"({COUNTS!r} or {LOG_NORMALISED!r}); set it to say what its X holds")


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """``log1p(10^4 x / total)`` per row, float64; an empty row stays 0."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts * np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0))


# --------------------------------------------------------------------------
# Streaming: one pass over blocks of contiguous rows, in memory or on disk
# --------------------------------------------------------------------------


class _Moments:
    """Count, mean and summed squared deviations of rows added a block at a time.

    Blocks merge by Chan, Golub & LeVeque's pairwise update (stable in
    float64, unlike sums of squares); ``cross=True`` keeps the summed outer
    products of the deviations, ``(n_genes, n_genes)``, instead of their
    diagonal.
    """

    def __init__(self, n_genes: int, cross: bool = False):
        self.n = 0
        self.mean = np.zeros(n_genes)
        self.m2 = np.zeros((n_genes, n_genes) if cross else n_genes)

    def add(self, rows: np.ndarray) -> None:
        b = len(rows)
        if not b:
            return
        mean = rows.mean(0)
        deviation = rows - mean
        delta, n = mean - self.mean, self.n + b
        if self.m2.ndim == 2:  # one genes × genes temporary at a time
            self.m2 += deviation.T @ deviation
            self.m2 += np.multiply.outer(delta * (self.n * b / n), delta)
        else:
            self.m2 += np.einsum("ij,ij->j", deviation, deviation) + delta**2 * (self.n * b / n)
        self.mean = self.mean + delta * (b / n)
        self.n = n

    @property
    def variance(self) -> np.ndarray:
        """Per-gene sample variance (``ddof=1``); 0 for fewer than two rows."""
        return self.m2 / (self.n - 1) if self.n > 1 else np.zeros_like(self.mean)


class _Picked:
    """The values of the cells at ``rows`` (sorted positions), kept as the blocks pass."""

    def __init__(self, rows: np.ndarray, n_genes: int):
        self.rows = np.asarray(rows, np.int64)
        self.values = np.zeros((len(self.rows), n_genes))

    def add(self, rows: np.ndarray, values: np.ndarray) -> None:
        hit = np.isin(rows, self.rows)
        self.values[np.searchsorted(self.rows, rows[hit])] = values[hit]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.rows, rows)]


def _pick(n: int, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most ``max_cells`` of ``n`` cells (all, or a random subset)."""
    return np.arange(n) if n <= max_cells else np.sort(rng.choice(n, max_cells, replace=False))


def _blocks(x, use: np.ndarray, columns: Optional[np.ndarray]):
    """``(rows, block)`` per range of contiguous rows of ``x`` with a cell in ``use``: the
    positions of those cells and their values (CSR or dense; ``columns`` only, or all).

    ``x``: what ``_observations`` gives, in memory or a :class:`BackedMatrix`,
    which reads a range as one slice of each CSR array (never row by row).
    """
    size = int(max(1, min(_MAX_BLOCK_CELLS, _BLOCK_ELEMENTS // max(x.shape[1], 1))))
    for start in range(0, x.shape[0], size):
        stop = min(start + size, x.shape[0])
        local = np.flatnonzero(use[start:stop])
        if not local.size:
            continue
        block = x.read_raw(start, stop) if isinstance(x, BackedMatrix) else x[start:stop]
        block = block[local] if local.size < stop - start else block
        yield start + local, block if columns is None else block[:, columns]


def _measured_moments(adata, genes, layer, design: Design, keys, spread=(),
                      picks=np.zeros(0, np.int64)):
    """One pass over the measured cells of the groups ``keys`` ``(cell type, condition)``.

    Returns ``({key: _Moments}, spread, picked)``: the moments of each group's
    ``log1p_cp10k`` expression over ``genes`` (counts validated as they are
    read), the cross moments of the groups ``spread`` together (``None``
    without), and the values of the cells at positions ``picks``.
    """
    condition = adata.obs[design.condition_key].astype(str).to_numpy()
    types = adata.obs[design.cell_type_key].astype(str).to_numpy()
    codes = np.full(adata.n_obs, -1)
    for code, (cell_type, value) in enumerate(keys):
        codes[(types == cell_type) & (condition == value)] = code
    in_spread = np.isin(codes, [keys.index(key) for key in spread])
    moments = [_Moments(len(genes)) for _ in keys]
    spread_moments = _Moments(len(genes), cross=True) if spread else None
    picked = _Picked(picks, len(genes))
    x = _observations(adata, layer)
    for rows, block in _blocks(x, codes >= 0, _gene_columns(adata, genes)):
        # As setup_anndata checks counts: finite, non-negative integers, no empty cell.
        _check_values(block, "counts", warn_unobserved_genes=False)
        values = apply_transform(LOG_NORMALISED, block)
        # float32 as registered data hold it (setup_anndata), then float64 for the sums.
        values = (values.toarray() if sp.issparse(values) else values).astype(np.float32,
                                                                               copy=False)
        values = values.astype(np.float64)
        for code in np.unique(codes[rows]):
            moments[code].add(values[codes[rows] == code])
        if spread_moments is not None:
            spread_moments.add(values[in_spread[rows]])
        picked.add(rows, values)
    return dict(zip(keys, moments)), spread_moments, picked


def _prediction_moments(prediction: ad.AnnData, scale: str, picks=np.zeros(0, np.int64)):
    """``(_Moments, _Picked)`` of a prediction's log-normalised expression, in one pass."""
    x = _observations(prediction, None)
    moments, picked = _Moments(x.shape[1]), _Picked(picks, x.shape[1])
    for rows, block in _blocks(x, np.ones(x.shape[0], bool), None):
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        values = log_normalise(block) if scale == COUNTS else block.astype(np.float64)
        moments.add(values)
        picked.add(rows, values)
    return moments, picked


def _gene_columns(adata, genes) -> Optional[np.ndarray]:
    """Positions of ``genes`` in ``adata.var_names``; ``None``: all of them, in order."""
    names = pd.Index(map(str, adata.var_names))
    if not names.is_unique:
        raise DataError("var_names are not unique; call adata.var_names_make_unique() first")
    columns = names.get_indexer(genes)
    return None if np.array_equal(columns, np.arange(len(names))) else columns


def _other_groups(design: Design) -> list[tuple[str, str]]:
    return [(t, c) for t in design.other_types for c in (design.control, design.perturbed)]


def _check_other_types(design: Design) -> None:
    if not design.other_types:
        raise DataError(f"no cell type other than {design.cell_type!r} has both conditions; "
                        "the mean-shift baseline needs at least one")


def _mean_shift(groups: Mapping[tuple[str, str], _Moments], design: Design) -> np.ndarray:
    """Average over the other types of (perturbed − control) mean expression, ``(n_genes,)``."""
    _check_other_types(design)
    shifts = [groups[(t, design.perturbed)].mean - groups[(t, design.control)].mean
              for t in design.other_types]
    return np.mean(shifts, axis=0)


def _pca(spread: _Moments, n_pcs: int):
    """``cells -> (cells, k)``: the projection on the first ``k <= n_pcs`` principal components.

    The leading eigenvectors of the cells' covariance (``spread``), which are
    the right singular vectors of the centred cells (up to sign, which no
    distance sees).
    """
    n_genes = len(spread.mean)
    k = min(n_pcs, spread.n, n_genes)
    _, vectors = scipy.linalg.eigh(spread.m2, subset_by_index=[n_genes - k, n_genes - 1],
                                   overwrite_a=True)  # the covariance serves nothing else
    components, center = vectors[:, ::-1].T, spread.mean
    return lambda x: (x - center) @ components.T


def top_genes(control: np.ndarray, perturbed: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` genes with the largest ``|Welch t|``, perturbed vs control.

    Args:
      control, perturbed: ``(cells, genes)`` log-normalised expression.

    Returns:
      ``(min(n, n_genes),)`` int, most significant first (ties by gene order).
    """
    moments = []
    for cells in (control, perturbed):
        moments.append(_Moments(cells.shape[1]))
        moments[-1].add(np.asarray(cells, np.float64))
    return _welch_top(*moments, n)


def _welch_top(control: _Moments, perturbed: _Moments, n: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n}")
    difference = perturbed.mean - control.mean
    se2 = perturbed.variance / perturbed.n + control.variance / control.n
    t = np.divide(difference, np.sqrt(se2), out=np.zeros_like(difference), where=se2 > 0)
    # A gene constant within both groups but different between them is the most DE of all.
    t = np.where((se2 == 0) & (difference != 0), np.inf, np.abs(t))
    return np.argsort(-t, kind="stable")[: min(n, len(t))]


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (``sklearn.metrics.r2_score``)."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    total = np.sum((y_true - y_true.mean()) ** 2)
    residual = np.sum((y_true - y_pred) ** 2)
    if total == 0:
        return 1.0 if residual == 0 else 0.0  # sklearn's convention for constant truth
    return float(1.0 - residual / total)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either vector is constant (no direction to compare)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / norm) if norm > 0 else float("nan")


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` between the rows of ``x`` and ``y``.

    The V-statistic (all pairs, the zero self-distances included), as
    pertpy's ``Edistance``; in one dimension it is the square of
    ``scipy.stats.energy_distance``.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean_distance = lambda a, b: float(cdist(a, b).mean())
    return 2.0 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def markdown_table(metrics: pd.DataFrame, digits: int = 3) -> str:
    """``metrics`` as a GitHub markdown table (NaN shown as ``–``)."""
    columns = list(metrics.columns)
    lines = ["| method | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in metrics.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if isinstance(value, (int, np.integer)) or column == "n_cells":
                cells.append(str(int(value)))
            else:
                cells.append("–" if not np.isfinite(value) else f"{value:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "BASELINES", "EXPECTED_LAYER", "Design", "PerturbationEvaluation", "PerturbationPrediction",
    "compare_perturbation", "energy_distance", "evaluate_perturbation", "exclude_cells",
    "log_normalise", "markdown_table", "pearson", "perturbation_design", "predict_perturbation",
    "prediction_method", "prediction_profiles", "r2_score",
    "top_genes",
]
