"""Per-cell outputs of a fitted count model with a decoder (scVI), as numpy arrays.

Every function takes a :class:`~lvmzoo.infer.results.FittedModel` and the
:class:`~lvmzoo.data.registry.CellData` of the cells to describe — the
training data, or new cells registered against the model with
``lvmzoo.query_anndata(adata, fitted.registry)`` — and returns host arrays in
the cells' order.  Nothing here writes to an AnnData; store results under keys
of your choice, or use :meth:`FittedModel.annotate`, which writes only the
documented ``obsm["X_scvi"]`` and ``layers["scvi_normalized"]``.

Posterior quantities are Monte Carlo averages over draws ``z ~ q(z | x)``
(and ``log l ~ q(log l | x)`` with a latent library) with the networks in
evaluation mode (no dropout; batch norm with its running statistics), so a
given ``seed`` gives the same numbers every time.

Batches are named by their categories in the model's registry
(``fitted.registry.batch_categories``); ``transform_batch`` decodes cells *as
if* they had been measured in that batch (a counterfactual that removes the
batch effect), or averages over several.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from lvmzoo.data.registry import CellData, DataError
from lvmzoo.data.source import DeviceSource
from lvmzoo.infer.evaluate import importance_sampled_scores

BatchNames = Union[None, str, Sequence[str]]
# Elements of the largest per-chunk temporary (draws × cells × genes), float32:
# 2^25 is 128 MiB, which bounds memory whatever the number of genes or draws.
_CHUNK_ELEMENTS = 1 << 25
_MAX_CHUNK_CELLS = 1024


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def latent_representation(
    fitted, data: CellData, *, n_samples: Optional[int] = None, seed: int = 0
) -> np.ndarray:
    """The cells' latent ``z``: posterior mean, or draws from ``q(z | x)``.

    Args:
      fitted: a fitted scVI model.
      data: cells registered against ``fitted.registry``.
      n_samples: ``None`` for the posterior mean ``E_q[z | x]`` (what
        ``fitted.latent`` and ``obsm["X_scvi"]`` hold); an int for that many
        draws per cell.
      seed: seed of the draws.

    Returns:
      ``(n_cells, K)``, or ``(n_samples, n_cells, K)`` with ``n_samples``.
    """
    model = checked_model(fitted, data)
    if n_samples is None:
        return map_cells(_latent_mean_program, fitted, data, seed, extra=(), per_cell=1)
    _check_positive(n_samples, "n_samples")
    z = map_cells(_latent_draws_program, fitted, data, seed, extra=(n_samples,),
                   per_cell=n_samples * model.n_latent)
    return np.moveaxis(z, 0, 1)


def normalized_expression(
    fitted,
    data: CellData,
    *,
    transform_batch: BatchNames = None,
    library_size: Union[float, str] = 1.0,
    n_samples: int = 25,
    seed: int = 0,
) -> np.ndarray:
    """Denoised expression per cell and gene, averaged over posterior draws.

    ``E_q[rho_g(z, s)] * library_size``: the decoder's expression frequencies
    ``rho`` (each cell's row sums to 1) scaled to a common library size, or
    with ``library_size="latent"`` the expected counts ``mu = l * rho`` at the
    cell's own library ``l``.

    Args:
      fitted: a fitted scVI model, or a seed ensemble of one (the replicates'
        expression averaged).
      data: cells registered against ``fitted.registry``.
      transform_batch: ``None`` decodes each cell in its own batch; a batch
        name decodes every cell as if from that batch; a list of names
        averages ``rho`` over decodings in each of them (batch-corrected
        expression).
      library_size: a positive number (``1``: ``rho``; ``1e4``: per 10,000
        counts) or ``"latent"``: ``mu`` at each cell's library (its observed
        total count, or draws from ``q(log l | x)`` when the library is latent).
      n_samples: posterior draws per cell.
      seed: seed of the draws.

    Returns:
      ``(n_cells, n_genes)`` float32.
    """
    if hasattr(fitted, "members"):  # a seed ensemble: the replicates' expression averaged
        return np.mean([normalized_expression(
            m, data, transform_batch=transform_batch, library_size=library_size,
            n_samples=n_samples, seed=seed) for m in fitted.members], axis=0)
    checked_model(fitted, data)
    _check_positive(n_samples, "n_samples")
    codes = batch_codes(fitted.registry, transform_batch)
    own_library = isinstance(library_size, str) and library_size == "latent"
    if not own_library and (isinstance(library_size, str) or not library_size > 0):
        raise ValueError(f"library_size must be a positive number or 'latent', "
                         f"got {library_size!r}")
    n_codes = 1 if codes is None else len(codes)
    return map_cells(
        _expression_program, fitted, data, seed,
        extra=(None if codes is None else jnp.asarray(codes), n_samples, own_library),
        per_cell=n_samples * n_codes * data.n_genes,
    ) * (1.0 if own_library else float(library_size))


def posterior_predictive_sample(
    fitted, data: CellData, *, n_samples: int = 1, transform_batch: Optional[str] = None,
    seed: int = 0,
) -> np.ndarray:
    """Counts drawn from the posterior predictive ``p(x' | x)``.

    Each draw takes ``z ~ q(z | x)`` (and a library) and then
    ``x' ~ p(x | z, l)`` (NB / ZINB / Poisson), optionally as if from batch
    ``transform_batch``.

    Returns:
      ``(n_samples, n_cells, n_genes)`` float32 of integer values.
    """
    checked_model(fitted, data)
    _check_positive(n_samples, "n_samples")
    if transform_batch is not None and not isinstance(transform_batch, str):
        raise ValueError("posterior_predictive_sample takes one transform_batch name")
    codes = batch_codes(fitted.registry, transform_batch)
    x = map_cells(_predictive_program, fitted, data, seed,
                   extra=(None if codes is None else jnp.asarray(codes[0]), n_samples),
                   per_cell=2 * n_samples * data.n_genes)
    return np.moveaxis(x, 0, 1)


def likelihood_parameters(
    fitted, data: CellData, *, n_samples: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Parameters of ``p(x | z, l)`` per cell and gene, averaged over ``n_samples`` draws.

    Returns:
      ``{"mean": mu}``, plus ``"inverse_dispersion"`` (``theta``; NB and
      ZINB) and ``"dropout_probability"`` (``pi``; ZINB), each
      ``(n_cells, n_genes)`` float32.
    """
    checked_model(fitted, data)
    _check_positive(n_samples, "n_samples")
    out = map_cells(_parameters_program, fitted, data, seed, extra=(n_samples,),
                     per_cell=4 * n_samples * data.n_genes)
    return {name: value for name, value in out.items() if value is not None}


def reconstruction_error(
    fitted, data: CellData, *, n_samples: int = 1, seed: int = 0
) -> np.ndarray:
    """``-E_q[log p(x | z, l)]`` per cell (nats), a Monte Carlo average over ``n_samples`` draws.

    The ELBO is this minus the KL terms: ``ELBO = -reconstruction - KL(q || p)``.

    Returns:
      ``(n_cells,)`` float32.
    """
    checked_model(fitted, data)
    _check_positive(n_samples, "n_samples")
    return map_cells(_reconstruction_program, fitted, data, seed, extra=(n_samples,),
                      per_cell=4 * n_samples * data.n_genes)


def cell_scores(fitted, data: CellData, *, n_samples: int = 100, seed: int = 0) -> pd.DataFrame:
    """Per-cell fit scores of a latent-variable model, indexed by cell name.

    Columns:
      ``log_likelihood``: the importance-sampled (IWAE) estimate of
      ``log p(x)`` with ``n_samples`` draws from the guide; ``elbo``: the
      average of the same draws' ``log p(x, z) - log q(z | x)``;
      ``reconstruction_error``: ``-E_q[log p(x | z, l)]`` from ``n_samples``
      further draws (see :func:`reconstruction_error`), for models with a
      decoder of counts.  ``FittedModel.evaluate`` reports the means of the
      first two; the gap ``reconstruction_error + elbo`` is minus the KL terms.
    """
    model = checked_model(fitted, data, need_decoder=False)
    _check_positive(n_samples, "n_samples")
    columns = {}
    program = functools.partial(_scores_program, guide=model.guide)
    scores = map_cells(program, fitted, data, seed, extra=(n_samples,),
                        per_cell=4 * n_samples * data.n_genes)
    columns["log_likelihood"], columns["elbo"] = scores
    if has_count_decoder(model):
        columns["reconstruction_error"] = reconstruction_error(
            fitted, data, n_samples=n_samples, seed=seed)
    return pd.DataFrame(columns, index=pd.Index(data.obs_names, name="cell"))


def batch_codes(registry, names: BatchNames) -> Optional[np.ndarray]:
    """Codes ``(n,)`` int32 of batch ``names`` in ``registry``; ``None`` for ``None``.

    Raises:
      DataError: naming the unknown batches and the known ones.
    """
    if names is None:
        return None
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    if not names:
        raise DataError("transform_batch is an empty list; give batch names or None")
    known = list(registry.batch_categories)
    unknown = [n for n in names if n not in known]
    if unknown:
        key = f"batch_key {registry.batch_key!r}" if registry.batch_key else "no batch key"
        raise DataError(
            f"unknown batch {', '.join(map(repr, unknown))} (model registered with {key}); "
            f"known batches: {', '.join(known[:20])}{' …' if len(known) > 20 else ''}"
        )
    return np.array([known.index(n) for n in names], np.int32)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def has_count_decoder(model) -> bool:
    """Whether ``model`` offers the decoder methods these outputs need (as scVI does)."""
    return all(hasattr(model, m) for m in ("sample_posterior", "generative", "observation"))


def checked_model(fitted, data: CellData, need_decoder: bool = True):
    """The fitted model, after checking it decodes counts and ``data`` matches its registry."""
    if hasattr(fitted, "members"):
        from lvmzoo.infer.ensemble import NeedsOneModel

        raise NeedsOneModel(
            f"this analysis takes one fitted model, not a seed ensemble of "
            f"{len(fitted.members)}; pass one replicate, ensemble.members[r] (on the command "
            "line: the run directory RUN/model/replicates/<r>, r >= 1); ensembles take "
            "differential_expression and normalized_expression as they are")
    model = fitted.model
    if need_decoder and not has_count_decoder(model):
        raise TypeError(
            f"model {model.name!r} has no decoder of counts; these outputs need a model "
            "such as scvi (with sample_posterior, generative and observation)"
        )
    if fitted.guide != model.guide:
        # These outputs read the model's own amortised encoder (and cell_scores evaluates
        # its guide chunk by chunk), which a custom guide may not have.
        raise ValueError(f"{model.name!r} was fitted with a custom guide; these outputs need "
                         "the model's own (amortised) guide")
    registry = fitted.registry
    if tuple(data.registry.gene_names) != tuple(registry.gene_names):
        raise DataError(
            "the cells were registered with other genes than the model's "
            f"({data.n_genes} vs {registry.n_genes}); register them with "
            "lvmzoo.query_anndata(adata, fitted.registry)"
        )
    if tuple(data.registry.batch_categories) != tuple(registry.batch_categories):
        raise DataError(
            "the cells' batch categories differ from the model's; register them with "
            "lvmzoo.query_anndata(adata, fitted.registry)"
        )
    return model


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------
# Chunked evaluation
# --------------------------------------------------------------------------


def chunk_size(per_cell: int) -> int:
    """Cells per compiled chunk so that ``per_cell`` floats per cell stay within budget."""
    return int(max(1, min(_MAX_CHUNK_CELLS, _CHUNK_ELEMENTS // max(per_cell, 1))))


def map_cells(program, fitted, data: CellData, seed: int, extra: tuple, per_cell: int):
    """Run ``program(model, params, batch, key, *extra)`` over chunks of cells and concatenate.

    Every chunk has the same size (the last is padded with copies of the last
    cell and trimmed), so the program compiles once; cells are independent in
    evaluation mode, so padding changes nothing.  Outputs are pytrees of
    arrays whose first axis is the chunk's cells.  Cells on disk are read a chunk at a
    time (the same batches as in memory), so the input never has to fit in memory.
    """
    source = None if data.is_backed else DeviceSource(data)
    size = min(chunk_size(per_cell), data.n_cells)
    key = jax.random.PRNGKey(seed)
    outputs = []
    for start in range(0, data.n_cells, size):
        index = np.minimum(np.arange(start, start + size), data.n_cells - 1)
        batch = source.full_batch(index) if source else _read_chunk(data, index, start)
        out = program(fitted.model, fitted.params, batch, jax.random.fold_in(key, start), *extra)
        n_valid = min(size, data.n_cells - start)
        outputs.append(jax.tree.map(lambda a: np.asarray(a[:n_valid]), out))
    return jax.tree.map(lambda *chunks: np.concatenate(chunks), *outputs)


def _read_chunk(data: CellData, index: np.ndarray, start: int):
    """The evaluation Batch of cells ``index`` (``start`` on, the last one repeated as padding)
    read from disk: what ``DeviceSource(data).full_batch(index)`` gives in memory."""
    from lvmzoo.data.source import PER_CELL_FIELDS, assemble_batch

    stop = int(index[-1]) + 1
    rows = data.x.read(start, stop).toarray()
    x = jnp.asarray(rows[index - start], jnp.float32)
    fields = {name: getattr(data, name)[index] for name in PER_CELL_FIELDS}
    return assemble_batch(x, jnp.asarray(index, jnp.int32), fields, data.registry, len(index),
                          training=False)


# Module-level programs: the model (hashable hyperparameters) and sizes are
# static, params traced, so each compiles once per model and chunk shape.


@functools.partial(jax.jit, static_argnames=("model",))
def _latent_mean_program(model, params, batch, key):
    return model.posterior(params, batch).z_loc


@functools.partial(jax.jit, static_argnames=("model", "n_samples"))
def _latent_draws_program(model, params, batch, key, n_samples):
    z, _ = model.sample_posterior(params, batch, key, n_samples)
    return jnp.moveaxis(z, 1, 0)  # cells first


@functools.partial(jax.jit, static_argnames=("model", "n_samples", "own_library"))
def _expression_program(model, params, batch, key, codes, n_samples, own_library):
    return model.expression(params, batch, key, n_samples=n_samples, transform_batch=codes,
                            library_size=None if own_library else 1.0)


@functools.partial(jax.jit, static_argnames=("model", "n_samples"))
def _predictive_program(model, params, batch, key, code, n_samples):
    key_latent, key_counts = jax.random.split(key)
    z, log_library = model.sample_posterior(params, batch, key_latent, n_samples)
    codes = None if code is None else jnp.full_like(batch.batch, code)
    x = model.observation(model.generative(params, batch, z, log_library, codes)).sample(key_counts)
    return jnp.moveaxis(x, 1, 0)


@functools.partial(jax.jit, static_argnames=("model", "n_samples"))
def _parameters_program(model, params, batch, key, n_samples):
    z, log_library = model.sample_posterior(params, batch, key, n_samples)
    out = model.generative(params, batch, z, log_library)
    shape = (n_samples, batch.size, batch.x.shape[-1])
    mean_over_draws = lambda a: None if a is None else jnp.broadcast_to(a, shape).mean(0)
    dropout = None if out.dropout_logits is None else jax.nn.sigmoid(out.dropout_logits)
    return {
        "mean": mean_over_draws(out.mean),
        "inverse_dispersion": mean_over_draws(out.inverse_dispersion),
        "dropout_probability": mean_over_draws(dropout),
    }


@functools.partial(jax.jit, static_argnames=("model", "n_samples"))
def _reconstruction_program(model, params, batch, key, n_samples):
    z, log_library = model.sample_posterior(params, batch, key, n_samples)
    out = model.generative(params, batch, z, log_library)
    log_prob = model.observation(out).log_prob(batch.x).sum(-1)  # (n_samples, B)
    return -log_prob.mean(0)


@functools.partial(jax.jit, static_argnames=("model", "n_samples", "guide"))
def _scores_program(model, params, batch, key, n_samples, guide):
    return importance_sampled_scores(model.model, guide, params, batch, key, n_samples)


__all__ = [
    "batch_codes", "cell_scores", "latent_representation", "likelihood_parameters",
    "normalized_expression", "posterior_predictive_sample", "reconstruction_error",
]
