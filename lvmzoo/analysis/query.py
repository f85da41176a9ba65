"""Reference mapping (scArches): put new cells into a fitted model's latent space.

:func:`map_query` fine-tunes a fitted scVI-family model (scVI, LinearSCVI,
SCANVI) on query cells from batches (experiments, donors) it has never
seen, without retraining the reference (Lotfollahi et al., 2022):

1. **Genes** are aligned by name (:func:`lvmzoo.data.query_anndata` with
   ``missing_genes="zero"``): extra genes are dropped; reference genes the
   query lacks are zero-filled with a warning naming how many; below
   ``min_shared_genes`` (default 50 %) of the reference's genes the query is
   refused.
2. **Batches**: the query's new batch categories are appended to the
   registry's, so their one-hot codes extend the batch encoding.  Every
   first layer that reads the batch code (the decoder's; the encoders' with
   ``encode_batch``) gets one new input row per new batch, starting at zero
   (a new batch starts out decoded like no batch in particular); per-batch
   parameters get new rows too (a ``gene-batch`` dispersion starts at the
   mean of the reference's rows; a latent library's prior takes the query
   batches' own log-library mean and sd, as a fit would).
3. **What trains**: only those new rows — the new batches' columns of the
   first layers and the new batches' dispersion rows.  Every other
   parameter (encoders, decoder, heads, dispersions of reference batches,
   SCANVI's classifier, ``u_encoder`` and ``latent_prior``) is frozen through
   the optimiser: gradients outside the new rows are zeroed and wholly
   frozen parameters get ``optax.set_to_zero()`` (``optax.multi_transform``),
   so they come out bit-identical.  (NumPyro keeps a positive parameter such
   as a dispersion on the log scale and ``exp(log(x))`` can miss ``x`` by an
   ulp, so frozen entries of those get the reference's exact values back.)
4. **Batch norm** is frozen, as scvi-tools' encoder default: every batch-norm
   layer normalises with the reference's running statistics during the
   fine-tune too (the model is refitted with ``freeze_batch_norm=True``), so
   the statistics are unchanged and reference cells keep exactly their
   reference representation.  (scvi-tools also lets the decoder's batch-norm
   statistics and affine parameters and the library encoder adapt; here they
   stay frozen, so the reference is not moved at all.)
5. A short fine-tune through :func:`lvmzoo.fit` on the query cells (KL
   warm-up and other settings from the reference model).

Fit the reference with ``encode_batch=True`` (scvi-tools' ``encode_covariates=True``,
as its scArches tutorial does): otherwise its encoder never reads the batch,
so the fine-tune can only fit the decoder's new batch row and the query's
latent (and SCANVI's predictions from it) is the frozen reference encoder's
output whatever the fine-tune does; :func:`map_query` warns about that.

Labelled query cells (a known category of the reference's ``labels_key``)
count as labelled in a SCANVI fine-tune; set them to the unlabelled category
(or drop the column) to map them blind.  A label the reference never saw is
an error, as is a batch key the query lacks.

References:
  Lotfollahi, M., Naghipourfar, M., Luecken, M. D. et al. (2022). Mapping
  single-cell data to reference atlases by transfer learning. Nature
  Biotechnology 40, 121–130. https://doi.org/10.1038/s41587-021-01001-7
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from lvmzoo.data.registry import MIN_SHARED_GENES, CellData, DataError, query_anndata
from lvmzoo.infer.results import FittedModel

FLAX_PARAMS = "$params"
FLAX_SUFFIX = "$"  # Flax modules' sites: "<name>$params", "<name>$state"
# Per-batch params a model's init_params sets from the data (name prefix -> whether the
# new rows train): the query batches' rows start from the query's own values, as a fit
# of them would.  scVI's latent-library prior (data statistics, fixed); totalVI's
# protein mask (which proteins the batch measured, fixed) and background prior (trained).
DATA_ROWS = {"library_log_": False, "protein_measured": False, "background_prior_": True}


def map_query(
    reference: FittedModel,
    query: ad.AnnData,
    *,
    epochs: int = 100,
    batch_size: int = 128,
    learning_rate: Optional[float] = None,
    seed: int = 0,
    min_shared_genes: float = MIN_SHARED_GENES,
    progress: bool = False,
) -> tuple[FittedModel, CellData]:
    """Map ``query`` cells into the latent space of a fitted scVI-family ``reference``.

    Args:
      reference: a fitted scVI, LinearSCVI or SCANVI (with its own guide).
      query: the new cells (raw counts in the reference's layer, its batch key
        in ``obs``).  Not modified.
      epochs: fine-tuning epochs over the query cells.
      batch_size: cells per step.
      learning_rate: Adam step size of the trained rows (default the model's).
      seed: seed of the fine-tune.
      min_shared_genes: smallest share of the reference's genes the query must
        have.
      progress: show the fine-tune's progress bar.

    Returns:
      ``(mapped, query_data)``: the mapped model, whose registry has the
      reference's batches plus the query's new ones (it encodes reference and
      query cells alike: ``mapped.latent(data)``, ``mapped.predict(data)`` for
      SCANVI), and the query registered against it.  Without new batches
      there is nothing to train and ``mapped`` is ``reference`` itself.

    Raises:
      DataError: the query lacks the batch key or most genes, or has a label
        category the reference never saw.
    """
    from lvmzoo.infer.svi import fit, initial_params_of
    from lvmzoo.models.scvi import SCVI

    model = reference.model
    if not isinstance(model, SCVI) or reference.guide != model.guide:
        raise ValueError(f"map_query needs a fitted scvi, linear_scvi or scanvi model with its "
                         f"own guide, got {model.name!r}")
    registry = extended_registry(reference.registry, query)
    data = query_anndata(query, registry, missing_genes="zero", min_shared_genes=min_shared_genes)
    if registry.n_batches == reference.registry.n_batches:
        return reference, data  # every query batch is a reference batch: nothing to train
    if not model.encode_batch:
        warnings.warn(
            f"the {model.name} reference's encoder does not read the batch (encode_batch=False): "
            "the query's latent is the reference encoder's output whatever the fine-tune, "
            "which only fits the decoder's rows of the new batches; fit the reference with "
            "encode_batch=True for a query-specific correction of the latent", UserWarning,
            stacklevel=2)
    query_model = dataclasses.replace(model, freeze_batch_norm=True)
    fresh = initial_params_of(query_model, data, batch_size=batch_size, seed=seed)
    start, trainable = batch_surgery(reference.params, fresh)
    learning_rate = model.default_learning_rate if learning_rate is None else learning_rate
    mapped = fit(query_model, data, optimizer=train_only(trainable, optax.adam(learning_rate)),
                 initial_params=start, epochs=epochs, batch_size=batch_size, seed=seed,
                 validation_fraction=0.0, progress=progress)
    # NumPyro optimises constrained params (a positive dispersion) on the log scale, and
    # exp(log(x)) can miss x by an ulp: frozen entries get the reference's exact values back.
    for name, mask in trainable.items():
        if FLAX_SUFFIX not in name:
            mapped.params[name] = jnp.where(mask, mapped.params[name], start[name])
    return mapped, data


def extended_registry(registry, query: ad.AnnData):
    """``registry`` with the query's new batch categories appended (in the query's order)."""
    if registry.batch_key is None:
        return registry  # one batch: the query cells are encoded as the reference's
    if registry.batch_key not in query.obs.columns:
        raise DataError(f"the query has no obs[{registry.batch_key!r}], the reference's batch "
                        "key; add the column naming each query cell's batch")
    column = query.obs[registry.batch_key]
    if column.isna().any():
        raise DataError(f"obs[{registry.batch_key!r}] has {int(column.isna().sum())} missing "
                        "values; give every query cell a batch")
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.astype(str))
        order = [str(c) for c in column.cat.categories if str(c) in present]
    else:
        order = sorted(set(column.astype(str)))
    new = [c for c in order if c not in registry.batch_categories]
    return dataclasses.replace(registry, batch_categories=(*registry.batch_categories, *new))


def batch_surgery(reference: dict[str, Any], fresh: dict[str, Any]):
    """Reference params grown to the query model's shapes, and which entries may train.

    A leaf whose shape grew along its first axis (batch rows of a first-layer
    kernel or of a per-batch parameter) keeps its reference rows and gets
    new ones: zeros in Flax kernels, the fresh (data) values of the library
    prior, the reference rows' mean elsewhere (a dispersion).  Only those new
    rows train, except in the library prior, which is data statistics.

    Args:
      reference: the reference's params and Flax state.
      fresh: the query model's initial params (:func:`lvmzoo.infer.svi.initial_params_of`).

    Returns:
      ``(start, trainable)``: ``start`` like ``fresh``; ``trainable`` the
      boolean masks of the *optimised* params (no Flax ``$state``).
    """
    start, trainable = {}, {}
    for name, fresh_site in fresh.items():
        if name not in reference:
            raise ValueError(f"the reference has no {name!r}; map a query with the same model")
        grown = jax.tree.map(lambda old, new: _grow(name, old, new), reference[name], fresh_site)
        start[name] = jax.tree.map(lambda g: g[0], grown, is_leaf=_is_pair)
        if not name.endswith("$state"):
            trainable[name] = jax.tree.map(lambda g: g[1], grown, is_leaf=_is_pair)
    return start, trainable


def _is_pair(x) -> bool:
    return isinstance(x, tuple)


def _grow(name: str, old, new) -> tuple[jax.Array, np.ndarray]:
    """``(value, trainable mask)`` of one leaf: ``old`` grown to ``new``'s shape."""
    old, new = jnp.asarray(old), jnp.asarray(new)
    if old.shape == new.shape:
        return old, np.zeros(old.shape, bool)
    if old.ndim != new.ndim or old.shape[1:] != new.shape[1:] or old.shape[0] > new.shape[0]:
        raise ValueError(f"{name}: cannot grow the reference's shape {old.shape} to {new.shape}; "
                         "only batch rows can be added")
    data_rows = next((train for prefix, train in DATA_ROWS.items() if name.startswith(prefix)),
                     None)
    if FLAX_PARAMS in name:
        rows = jnp.zeros((new.shape[0] - old.shape[0],) + old.shape[1:], old.dtype)
    elif data_rows is not None:
        rows = new[old.shape[0]:]  # from the query's batches (see DATA_ROWS)
    else:
        rows = jnp.broadcast_to(old.mean(0), (new.shape[0] - old.shape[0],) + old.shape[1:])
    mask = np.zeros(new.shape, bool)
    if data_rows is not False:
        mask[old.shape[0]:] = True
    return jnp.concatenate([old, rows]), mask


def train_only(trainable: dict[str, Any], optimizer: optax.GradientTransformation):
    """``optimizer`` for the ``True`` entries of ``trainable``; every other parameter frozen.

    Gradients outside the masks are zeroed (so Adam's moments and updates
    there stay exactly 0) and wholly frozen parameters get
    ``optax.set_to_zero()``.
    """
    masks = jax.tree.map(jnp.asarray, trainable)
    labels = jax.tree.map(lambda m: "train" if bool(np.any(m)) else "frozen", trainable)
    keep_masked = optax.stateless(
        lambda updates, params=None: jax.tree.map(lambda u, m: jnp.where(m, u, 0.0), updates,
                                                  masks))
    return optax.chain(keep_masked, optax.multi_transform(
        {"train": optimizer, "frozen": optax.set_to_zero()}, labels))
