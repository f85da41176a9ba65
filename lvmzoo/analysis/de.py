"""Bayesian differential expression between groups of cells with a fitted scVI model.

The procedure of scvi-tools' ``SCVI.differential_expression`` (Lopez et al.
2018, "vanilla"; Boyeau et al. 2019, "change"), written for lvmzoo:

1. For each group ``A`` draw ``n_samples`` cells uniformly (with
   replacement), one ``z ~ q(z | x)`` per drawn cell, and decode the
   expression frequencies ``rho(z, s)`` (rows sum to 1).  With batch
   correction ``rho`` is averaged over decodings as if from every batch
   present in the two groups, so both groups are compared in the same
   (averaged) batch; without it each cell keeps its own batch.  This gives
   ``n_samples`` draws ``rho_A`` of the group's expression, ``(n_samples, G)``.
2. Pair the ``i``-th draws of the two groups.
3. ``mode="vanilla"``: ``p = P(rho_1 > rho_2)`` per gene (``proba_m1``) and the
   Bayes factor ``log p - log(1 - p)`` (``bayes_factor``; large and positive:
   higher in group 1, large and negative: lower).
   ``mode="change"``: the log2 fold change ``r = log2(rho_1 + c) - log2(rho_2 + c)``
   with a small pseudocount ``c``; ``proba_de = max(P(r >= delta),
   P(r < -delta))`` (scvi-tools' default "three-state" test), its Bayes factor,
   and summaries of the posterior of ``r`` (``lfc_mean``, ``lfc_median``,
   ``lfc_std``, ``lfc_min``, ``lfc_max`` and highest-posterior-density
   intervals ``lfc_confidence_interval_<level>_min/max``), computed with the
   pseudocount divided by 1000 as scvi-tools does.  Genes are then called DE
   by controlling the posterior expected FDR: the largest set of top genes
   (by ``proba_de``) whose mean ``1 - proba_de`` is at most ``fdr_target``
   (``is_de_fdr_<target>``).
4. Alongside: ``scale1`` / ``scale2``, the mean of the ``rho`` draws, and raw
   statistics of each group (``raw_mean``, ``non_zeros_proportion``,
   ``raw_normalized_mean`` per 10,000 counts).

When ``pseudocounts=None`` the pseudocount is estimated as scvi-tools does:
for each group, the 90% quantile, over the genes with mean raw count below
0.01 in that group, of the gene's largest ``rho`` draw; the larger of the
two, divided by the number of genes (at least 1e-10).  This shrinks the fold
changes of genes that are not expressed in either group towards 0.

**Seed ensembles** (``fitted`` a :class:`~lvmzoo.infer.ensemble.FittedEnsemble`
of ``R`` replicates): each group's ``n_samples`` draws are pooled from all
replicates (``n_samples / R`` from each, the posterior of the equal-weight
mixture of the replicates), draws are paired within a replicate, and every
statistic above comes from the pooled draws.  Per gene the table adds how
stable the result is across the replicates, each replicate's statistics
computed from its own share of the draws (with the pooled pseudocount):
``replicate_call_share``, the share of replicates that call the gene (its
``is_de_fdr_<target>`` call within that replicate in "change"; ``|bayes_factor|
>= 3`` in "vanilla", strong evidence on Kass and Raftery's scale),
``replicate_bayes_factor_sd``, the standard deviation of the replicates'
Bayes factors, ``replicate_lfc_mean_sd`` ("change"), that of their
``lfc_mean``, and ``n_replicates``.  With one fit (or ``R = 1``) the table is
unchanged.

Not implemented: scvi-tools' ``filter_outlier_cells``, importance weights,
``delta=None`` (a delta estimated from the data), custom change functions,
and its ``batchid1`` / ``batchid2`` options.

References:
  Lopez, R. et al. (2018). Deep generative modeling for single-cell
  transcriptomics. Nature Methods 15, 1053–1058.
  Boyeau, P. et al. (2019). Deep generative models for detecting
  differential expression in single cells. bioRxiv 794289.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lvmzoo.analysis.expression import checked_model, chunk_size
from lvmzoo.data.registry import CellData, DataError
from lvmzoo.data.source import DeviceSource

MODES = ("vanilla", "change")
_EPS = 1e-8  # keeps log p finite in the Bayes factors when p is 0 or 1
_UNEXPRESSED_MEAN_COUNT = 0.01  # raw mean count below which a gene counts as not expressed
_PSEUDOCOUNT_QUANTILE = 0.9
_PSEUDOCOUNT_FLOOR = 1e-10
_LFC_PSEUDOCOUNT_SHRINK = 1e-3  # summaries of the LFC use pseudocount / 1000 (scvi-tools)
_STRONG_BAYES_FACTOR = 3.0  # "vanilla" call of one replicate: |ln BF| >= 3 (strong evidence)

Groups = Union[None, str, Sequence[str]]


def differential_expression(
    fitted,
    data: CellData,
    groupby,
    group1: Groups = None,
    group2: Optional[str] = None,
    *,
    adata=None,
    mode: str = "vanilla",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    n_samples: int = 5000,
    batch_correction: bool = True,
    pseudocounts: Optional[float] = None,
    credible_intervals: Sequence[float] = (0.9,),
    seed: int = 0,
) -> pd.DataFrame:
    """Bayesian differential expression of every gene between two groups of cells.

    Args:
      fitted: a fitted scVI model, or a seed ensemble of one (``lvmzoo.fit(...,
        replicates=R)``; the draws are pooled over the replicates and the
        ``replicate_*`` stability columns added, see the module docstring).
      data: the cells, registered against ``fitted.registry`` (the training
        data, or ``lvmzoo.query_anndata(adata, fitted.registry)``).
      groupby: the cells' groups: the name of an ``obs`` column of ``adata``
        (or, without ``adata``, the model's ``labels_key`` or ``batch_key``,
        whose codes ``data`` carries), or an array of ``n_cells`` group labels.
      group1: a group, a list of groups, or ``None`` for every group; each is
        compared with ``group2`` in turn.
      group2: the reference group; ``None`` means the rest: every cell with a
        group other than the ``group1`` group (cells without a group are left out).
      adata: the AnnData ``data`` was registered from (same cells, same
        order), when ``groupby`` names one of its ``obs`` columns.
      mode: ``"vanilla"`` or ``"change"`` (see the module docstring).
      delta: the smallest absolute log2 fold change that counts as DE ("change").
      fdr_target: posterior expected FDR of the ``is_de_fdr_<target>`` calls ("change").
      n_samples: posterior draws of each group's expression.
      batch_correction: average ``rho`` over the batches present in the two
        groups (``True``) or decode each cell in its own batch.
      pseudocounts: the pseudocount ``c`` of the "change" LFC; ``None``
        estimates it from genes not expressed in a group.
      credible_intervals: levels of the HPD intervals of the LFC ("change").
      seed: seed of the cell and posterior draws.

    Returns:
      A DataFrame with one row per gene (index: gene names) and per
      comparison, sorted within each comparison by decreasing ``proba_de``
      ("change"; ties by decreasing ``|lfc_mean|``) or ``bayes_factor``
      ("vanilla"); the columns of the module docstring plus ``comparison``
      (``"A vs B"`` or ``"A vs Rest"``), ``group1`` and ``group2``; first a
      ``symbol`` column where the model's data registered gene symbols
      (``gene_symbols_key``, ``--gene-symbols``).

    Raises:
      DataError: unknown ``groupby`` column or group, an empty group, or
        cells not registered against the model.
    """
    members = list(getattr(fitted, "members", [fitted]))  # a seed ensemble's replicates
    checked_model(members[0], data)
    _check_options(mode, delta, fdr_target, n_samples, pseudocounts, credible_intervals)
    if n_samples < 2 * len(members):
        raise ValueError(f"n_samples must be at least 2 per replicate ({2 * len(members)} for "
                         f"{len(members)} replicates), got {n_samples}")
    codes, categories = group_codes(data, groupby, adata)
    column = groupby if isinstance(groupby, str) else "groupby"
    reference = None if group2 is None else _group_index(group2, categories, column)
    if group1 is None:
        targets = [c for c in range(len(categories)) if c != reference]
    else:
        names = [group1] if isinstance(group1, str) else list(group1)
        targets = [_group_index(g, categories, column) for g in names]
    if not targets:
        raise DataError(f"no group to compare with {group2!r}: {column} has no other group")

    samplers = [_ExpressionSampler(m.model, m.params, data, seed, member=r)
                for r, m in enumerate(members)]
    # Each replicate's share of the draws: n_samples split as evenly as it goes.
    shares = [n_samples // len(members) + (r < n_samples % len(members))
              for r in range(len(members))]

    def draw(cells, transform, stream):
        return [s.draw(np.flatnonzero(cells), k, transform, stream)
                for s, k in zip(samplers, shares)]

    tables = []
    for i, target in enumerate(targets):
        cells1 = codes == target
        cells2 = (codes == reference) if reference is not None else (codes >= 0) & ~cells1
        name1 = categories[target]
        name2 = "Rest" if reference is None else categories[reference]
        for cells, name in ((cells1, name1), (cells2, name2)):
            if not cells.any():
                raise DataError(f"group {name!r} of {column} has no cells in the data")
        transform = np.unique(data.batch[cells1 | cells2]) if batch_correction else None
        parts1 = draw(cells1, transform, stream=2 * i)
        parts2 = draw(cells2, transform, stream=2 * i + 1)
        table = _compare(np.concatenate(parts1), np.concatenate(parts2), mode, delta,
                         pseudocounts, credible_intervals, _raw_counts(data, cells1),
                         _raw_counts(data, cells2))
        if len(members) > 1:
            used = table["pseudocounts"].iloc[0] if mode == "change" else None
            table = pd.concat([table, replicate_stability(parts1, parts2, mode, delta, used,
                                                          fdr_target)], axis=1)
        table.index = pd.Index(members[0].registry.gene_names)
        if members[0].registry.gene_symbols:  # registered with gene_symbols_key
            table.insert(0, "symbol", list(members[0].registry.gene_symbols))
        table = _sort(table, mode)
        if mode == "change":
            table[f"is_de_fdr_{fdr_target}"] = posterior_fdr_calls(table["proba_de"], fdr_target)
        table["comparison"] = f"{name1} vs {name2}"
        table["group1"] = name1
        table["group2"] = name2
        tables.append(table)
    return pd.concat(tables)


def posterior_fdr_calls(proba_de: pd.Series, fdr_target: float) -> pd.Series:
    """DE calls controlling the posterior expected false discovery rate.

    Ranks genes by decreasing ``proba_de`` and calls the largest top set whose
    expected FDR, the mean of ``1 - proba_de`` over the set, is at most
    ``fdr_target``.

    Returns:
      Boolean Series with ``proba_de``'s index and order.
    """
    order = np.argsort(-proba_de.to_numpy(), kind="stable")
    expected_fdr = np.cumsum(1.0 - proba_de.to_numpy()[order]) / np.arange(1, len(order) + 1)
    n_called = int(np.sum(expected_fdr <= fdr_target))
    called = np.zeros(len(order), bool)
    called[order[:n_called]] = True
    return pd.Series(called, index=proba_de.index)


def group_codes(data: CellData, groupby, adata=None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-cell group codes ``(n_cells,)`` (``-1``: no group) and the group names.

    See :func:`differential_expression` for what ``groupby`` may be.
    """
    if not isinstance(groupby, str):
        values = pd.Series(np.asarray(groupby, dtype=object))
        if len(values) != data.n_cells:
            raise DataError(f"groupby has {len(values)} values for {data.n_cells} cells; "
                            "give one group label per cell")
        return _encode(values, "groupby")
    registry = data.registry
    if adata is not None:
        if adata.n_obs != data.n_cells or not np.array_equal(
                np.asarray(adata.obs_names), data.obs_names):
            raise DataError("adata is not the AnnData the cells were registered from "
                            f"({adata.n_obs} cells vs {data.n_cells}, or other cell names)")
        if groupby not in adata.obs.columns:
            raise DataError(f"groupby {groupby!r} is not a column of adata.obs; available "
                            f"columns: {', '.join(map(str, adata.obs.columns)) or 'none'}")
        return _encode(adata.obs[groupby], groupby)
    if groupby == registry.labels_key:
        return data.labels, tuple(registry.label_categories)
    if groupby == registry.batch_key:
        return data.batch, tuple(registry.batch_categories)
    raise DataError(
        f"groupby {groupby!r} is neither the model's labels_key ({registry.labels_key!r}) "
        f"nor its batch_key ({registry.batch_key!r}); pass adata= with that obs column, "
        "or an array of group labels"
    )


# --------------------------------------------------------------------------
# Posterior draws of each group's expression
# --------------------------------------------------------------------------


class _ExpressionSampler:
    """Draws ``rho`` for cells sampled from a group, in fixed-size compiled chunks.

    ``member``: the replicate of a seed ensemble; replicate 0 draws what a
    single fit draws, the others their own cells and ``z``.
    """

    def __init__(self, model, params, data: CellData, seed: int, member: int = 0):
        self.model, self.params, self.data = model, params, data
        # Cells on disk: only the drawn cells are read (see draw), never all of them.
        self.source = None if data.is_backed else DeviceSource(data)
        self.seed, self.member = seed, member

    def draw(self, cells: np.ndarray, n_samples: int, transform, stream: int) -> np.ndarray:
        """``(n_samples, G)`` draws: a uniform cell of ``cells``, one ``z`` each, decoded.

        ``transform``: ``(n,)`` batch codes to average the decodings over, or
        ``None`` for each cell's own batch.
        """
        rng = np.random.default_rng([self.seed, stream] + ([self.member] if self.member else []))
        drawn = rng.choice(cells, size=n_samples, replace=True)
        codes = None if transform is None else jnp.asarray(transform, jnp.int32)
        n_codes = 1 if transform is None else len(transform)
        size = min(chunk_size(n_codes * self.data.n_genes), n_samples)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), stream)
        if self.member:
            key = jax.random.fold_in(key, self.member)
        out = np.empty((n_samples, self.data.n_genes), np.float32)
        source, positions = self.source, drawn
        if source is None:
            # The drawn cells (at most n_samples) read from disk in file order, in one pass;
            # positions index them.  Same cells, same rows, same draws as in memory.
            unique = np.unique(drawn)
            source = DeviceSource(self.data.subset(unique).to_memory())
            positions = np.searchsorted(unique, drawn)
        for start in range(0, n_samples, size):
            stop = min(start + size, n_samples)
            index = np.full(size, positions[stop - 1])  # pad to one compiled shape
            index[: stop - start] = positions[start:stop]
            batch = source.full_batch(index)
            rho = _rho_program(self.model, self.params, batch, jax.random.fold_in(key, start),
                               codes)
            out[start:stop] = np.asarray(rho[: stop - start])
        return out


@functools.partial(jax.jit, static_argnames=("model",))
def _rho_program(model, params, batch, key, codes):
    # One z per row: rows are the drawn cells, repeats included, each its own draw.
    return model.expression(params, batch, key, n_samples=1, transform_batch=codes)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def _compare(rho1, rho2, mode, delta, pseudocounts, levels, raw1, raw2) -> pd.DataFrame:
    """Per-gene statistics of paired draws ``rho1``, ``rho2`` ``(n_samples, G)``."""
    columns = {}
    if mode == "vanilla":
        p = np.mean(rho1 > rho2, axis=0)
        columns.update(proba_m1=p, proba_m2=1.0 - p,
                       bayes_factor=np.log(p + _EPS) - np.log(1.0 - p + _EPS),
                       scale1=rho1.mean(0), scale2=rho2.mean(0))
    else:
        if pseudocounts is None:
            pseudocounts = estimate_pseudocount(rho1, rho2, raw1["raw_mean"], raw2["raw_mean"])
        lfc = log2_fold_change(rho1, rho2, pseudocounts)
        p = np.maximum(np.mean(lfc >= delta, axis=0), np.mean(lfc < -delta, axis=0))
        columns.update(proba_de=p, proba_not_de=1.0 - p,
                       bayes_factor=np.log(p + _EPS) - np.log(1.0 - p + _EPS),
                       scale1=rho1.mean(0), scale2=rho2.mean(0),
                       pseudocounts=pseudocounts, delta=delta)
        lfc = log2_fold_change(rho1, rho2, _LFC_PSEUDOCOUNT_SHRINK * pseudocounts)
        columns.update(lfc_mean=lfc.mean(0), lfc_median=np.median(lfc, axis=0),
                       lfc_std=lfc.std(0), lfc_min=lfc.min(0), lfc_max=lfc.max(0))
        for level in levels:
            low, high = hpd_interval(lfc, level)
            label = str(level)[:5]
            columns[f"lfc_confidence_interval_{label}_min"] = low
            columns[f"lfc_confidence_interval_{label}_max"] = high
    for stat in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean"):
        columns[f"{stat}1"], columns[f"{stat}2"] = raw1[stat], raw2[stat]
    return pd.DataFrame(columns)


def replicate_stability(parts1, parts2, mode, delta, pseudocount, fdr_target) -> pd.DataFrame:
    """Per gene, how the replicates of an ensemble agree (see the module docstring).

    ``parts1`` / ``parts2``: each replicate's paired draws ``(n_r, G)`` of the
    two groups; ``pseudocount``: the pooled one ("change").
    """
    bayes, called, lfc_means = [], [], []
    for rho1, rho2 in zip(parts1, parts2):
        if mode == "vanilla":
            p = np.mean(rho1 > rho2, axis=0)
        else:
            lfc = log2_fold_change(rho1, rho2, pseudocount)
            p = np.maximum(np.mean(lfc >= delta, axis=0), np.mean(lfc < -delta, axis=0))
            lfc_means.append(log2_fold_change(
                rho1, rho2, _LFC_PSEUDOCOUNT_SHRINK * pseudocount).mean(0))
        bf = np.log(p + _EPS) - np.log(1.0 - p + _EPS)
        bayes.append(bf)
        if mode == "vanilla":
            called.append(np.abs(bf) >= _STRONG_BAYES_FACTOR)
        else:
            called.append(posterior_fdr_calls(pd.Series(p), fdr_target).to_numpy())
    columns = {"replicate_call_share": np.mean(called, axis=0),
               "replicate_bayes_factor_sd": np.std(bayes, axis=0, ddof=1)}
    if mode == "change":
        columns["replicate_lfc_mean_sd"] = np.std(lfc_means, axis=0, ddof=1)
    columns["n_replicates"] = len(parts1)
    return pd.DataFrame(columns)


def log2_fold_change(rho1: np.ndarray, rho2: np.ndarray, pseudocount: float) -> np.ndarray:
    """``log2(rho1 + c) - log2(rho2 + c)``, elementwise."""
    return np.log2(rho1 + pseudocount) - np.log2(rho2 + pseudocount)


def estimate_pseudocount(rho1, rho2, raw_mean1, raw_mean2) -> float:
    """scvi-tools' pseudocount: the expression level of genes a group does not express.

    For each group, the 90% quantile over its unexpressed genes (mean raw count
    below 0.01) of each gene's largest ``rho`` draw; the larger of the two
    divided by the number of genes, at least 1e-10.
    """
    levels = []
    for rho, raw_mean in ((rho1, raw_mean1), (rho2, raw_mean2)):
        unexpressed = raw_mean < _UNEXPRESSED_MEAN_COUNT
        if unexpressed.any():
            levels.append(np.quantile(rho.max(0)[unexpressed], _PSEUDOCOUNT_QUANTILE))
        else:
            levels.append(_PSEUDOCOUNT_FLOOR)
    return float(max(_PSEUDOCOUNT_FLOOR, max(levels) / rho1.shape[1]))


def hpd_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-posterior-density interval of each column of ``samples`` ``(n, G)``.

    The shortest interval ``[s_i, s_{i+k}]`` of the sorted draws holding
    ``k = floor(level * n)`` steps (exact for unimodal posteriors).

    Returns:
      ``(low, high)``, each ``(G,)``.
    """
    ordered = np.sort(samples, axis=0)
    n = ordered.shape[0]
    k = int(np.floor(level * n))
    if k < 1 or k >= n:
        raise ValueError(f"{n} draws are too few for a {level} interval")
    start = np.argmin(ordered[k:] - ordered[: n - k], axis=0)
    genes = np.arange(ordered.shape[1])
    return ordered[start, genes], ordered[start + k, genes]


def _raw_counts(data: CellData, cells: np.ndarray) -> dict[str, np.ndarray]:
    """Mean count, share of non-zero cells and mean count per 10,000, per gene, ``(G,)`` each."""
    x = data.x[np.flatnonzero(cells)]
    if data.is_backed:  # accumulated block by block: memory of one block, not of the group
        return _raw_counts_streamed(x)
    totals = np.asarray(x.sum(axis=1)).ravel()
    if sp.issparse(x):
        nonzero = np.asarray((x != 0).mean(axis=0)).ravel()
        normalised = np.asarray((sp.diags(1e4 / totals) @ x).mean(axis=0)).ravel()
    else:
        nonzero = (x != 0).mean(axis=0)
        normalised = (x * (1e4 / totals)[:, None]).mean(axis=0)
    return {
        "raw_mean": np.asarray(x.mean(axis=0)).ravel(),
        "non_zeros_proportion": nonzero,
        "raw_normalized_mean": normalised,
    }


def _raw_counts_streamed(x) -> dict[str, np.ndarray]:
    """:func:`_raw_counts` of an on-disk selection, one block of cells at a time."""
    n_genes = x.shape[1]
    total, nonzero, normalised = (np.zeros(n_genes) for _ in range(3))
    for block in x.blocks():
        totals = np.asarray(block.sum(axis=1)).ravel()
        total += np.asarray(block.sum(axis=0)).ravel()
        nonzero += np.asarray((block != 0).sum(axis=0)).ravel()
        normalised += np.asarray((sp.diags(1e4 / totals) @ block).sum(axis=0)).ravel()
    n = max(x.shape[0], 1)
    return {"raw_mean": total / n, "non_zeros_proportion": nonzero / n,
            "raw_normalized_mean": normalised / n}


def _sort(table: pd.DataFrame, mode: str) -> pd.DataFrame:
    if mode == "vanilla":
        return table.sort_values("bayes_factor", ascending=False, kind="stable")
    order = np.lexsort((-table["lfc_mean"].abs().to_numpy(), -table["proba_de"].to_numpy()))
    return table.iloc[order]


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def _encode(values: pd.Series, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    missing = values.isna().to_numpy()
    labels = values.astype(str).to_numpy()
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(labels[~missing])
        categories = tuple(str(c) for c in values.cat.categories if str(c) in present)
    else:
        categories = tuple(sorted(set(labels[~missing])))
    lookup = {c: i for i, c in enumerate(categories)}
    codes = np.array([lookup.get(v, -1) for v in labels], np.int32)
    codes[missing] = -1
    if not categories:
        raise DataError(f"{name} has no groups (every value is missing)")
    return codes, categories


def _group_index(group, categories: tuple[str, ...], column: str) -> int:
    if str(group) not in categories:
        shown = ", ".join(categories[:20]) + (" …" if len(categories) > 20 else "")
        raise DataError(f"group {group!r} is not in {column}; its groups: {shown}")
    return categories.index(str(group))


def _check_options(mode, delta, fdr_target, n_samples, pseudocounts, levels) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must be in (0, 1), got {fdr_target}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    if pseudocounts is not None and not pseudocounts > 0:
        raise ValueError(f"pseudocounts must be positive, got {pseudocounts}")
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"credible interval levels must be in (0, 1), got {level}")
