"""Several modalities of the same cells (MuData, ``.h5mu``) as the one AnnData the zoo registers.

A CITE-seq experiment often comes as a MuData: an ``"rna"`` modality (cells ×
genes) and a ``"prot"`` modality (cells × antibodies).  The zoo's models take one
AnnData with the other modalities as ``obsm`` matrices, scvi-tools' convention
(``obsm["protein_expression"]``), so :func:`from_mudata` builds that: the RNA
modality, the protein counts of the same cells (matched by name) as a DataFrame
whose columns are the protein names, and the MuData's own ``obs`` columns (e.g.
a batch key stored at the top level) added to the RNA's.

A ``.h5mu`` file is read without the ``mudata`` package: it is HDF5 with each
modality an AnnData under ``/mod/<name>`` (:func:`read_h5mu`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lvmzoo.data.registry import DataError

PROTEIN_KEY = "protein_expression"  # scvi-tools' obsm key, as TotalVI reads it


def from_mudata(mdata: Any, *, rna: str = "rna", protein: str = "prot",
                protein_key: str = PROTEIN_KEY) -> ad.AnnData:
    """One AnnData from a MuData: modality ``rna`` with ``obsm[protein_key]`` from ``protein``.

    Args:
      mdata: a ``mudata.MuData`` (anything with a ``.mod`` mapping of AnnDatas and
        an ``.obs``), or a path to an ``.h5mu`` file.
      rna, protein: the names of the two modalities.
      protein_key: the ``obsm`` key of the protein counts.

    Returns:
      A new AnnData; ``mdata`` is not modified.

    Raises:
      DataError: a modality is missing, or the protein modality lacks cells of
        the RNA modality.
    """
    if isinstance(mdata, (str, Path)):
        return read_h5mu(mdata, rna=rna, protein=protein, protein_key=protein_key)
    modalities = getattr(mdata, "mod", None)
    if modalities is None:
        raise DataError(f"expected a MuData (with .mod) or an .h5mu path, got {type(mdata).__name__}")
    return _combine(dict(modalities), getattr(mdata, "obs", None), rna, protein, protein_key)


def read_h5mu(path: Union[str, Path], *, rna: str = "rna", protein: str = "prot",
              protein_key: str = PROTEIN_KEY) -> ad.AnnData:
    """:func:`from_mudata` of an ``.h5mu`` file, read with h5py and anndata alone."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as file:
            if "mod" not in file:
                raise DataError(f"{path} is not a MuData file: it has no /mod group of modalities")
            names = list(file["mod"].keys())
            modalities = {name: read_elem(file["mod"][name]) for name in names
                          if name in (rna, protein)}
            modalities.update({name: None for name in names if name not in modalities})
            obs = read_elem(file["obs"]) if "obs" in file else None
    except OSError as err:
        raise DataError(f"cannot read {path} as .h5mu: {err}") from None
    return _combine(modalities, obs, rna, protein, protein_key)


def _combine(modalities: dict, obs, rna: str, protein: str, protein_key: str) -> ad.AnnData:
    for name in (rna, protein):
        if modalities.get(name) is None:
            raise DataError(f"the MuData has no {name!r} modality; its modalities: "
                            f"{', '.join(modalities) or 'none'} (pass rna=... / protein=...)")
    cells = modalities[rna].copy()
    proteins = modalities[protein]
    missing = pd.Index(cells.obs_names).difference(proteins.obs_names)
    if len(missing):
        raise DataError(f"{len(missing)} of the {cells.n_obs} cells of modality {rna!r} are not in "
                        f"modality {protein!r} (e.g. {missing[0]!r}); keep the cells both measured")
    rows = pd.Index(proteins.obs_names).get_indexer(cells.obs_names)
    x = proteins.X[rows]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    names = [str(n) for n in proteins.var_names]
    cells.obsm[protein_key] = pd.DataFrame(x, index=cells.obs_names, columns=names)
    cells.uns["protein_names"] = np.asarray(names, dtype=object)
    if obs is not None:
        shared = pd.DataFrame(obs).reindex(cells.obs_names)
        for column in shared.columns:
            # MuData prefixes modality columns ("rna:batch"); the top-level ones are the cells'.
            name = str(column).split(":", 1)[1] if str(column).startswith(f"{rna}:") else str(column)
            if ":" not in name and name not in cells.obs:
                cells.obs[name] = shared[column].to_numpy()
    return cells
