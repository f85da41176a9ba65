"""totalVI (lvmzoo.models.TotalVI): CITE-seq RNA + proteins, and the obsm data path it reads."""

from __future__ import annotations

import time

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import Adam
from sklearn.metrics import roc_auc_score

import lvmzoo
from lvmzoo import cli
from lvmzoo.data import DataError, query_anndata, setup_anndata
from lvmzoo.data.source import DeviceSource
from lvmzoo.datasets import DATASETS, load_pbmc_citeseq
from lvmzoo.infer.evaluate import log_weights
from lvmzoo.models import MODELS, TotalVI

SMALL = dict(n_latent=4, n_hidden=32)


def simulate_citeseq(n_cells=300, n_genes=60, n_proteins=6, n_batches=1, seed=0):
    """Two cell types; each protein is foreground (8× its background) in one type.

    Returns the AnnData and the ``(n_cells, n_proteins)`` bool truth of foreground counts.
    """
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, 2, n_cells)
    rate = rng.gamma(2.0, 1.0, (2, n_genes))
    rate[0, : n_genes // 4] *= 6
    rate[1, n_genes // 4: n_genes // 2] *= 6
    rho = rate / rate.sum(1, keepdims=True)
    library = rng.lognormal(np.log(1500), 0.3, n_cells)
    x = rng.poisson(rho[cell_type] * library[:, None]).astype(np.float32)
    positive_in = np.arange(n_proteins) % 2  # protein p is foreground in type p % 2
    foreground = cell_type[:, None] == positive_in[None, :]
    background = rng.lognormal(np.log(12.0), 0.25, (n_cells, n_proteins))
    mean = background * np.where(foreground, 8.0, 1.0)
    y = rng.poisson(rng.gamma(20.0, mean / 20.0)).astype(np.float32)  # NB, phi = 20
    names = [f"P{p}" for p in range(n_proteins)]
    obs = pd.DataFrame({"batch": pd.Categorical([f"b{i % n_batches}" for i in range(n_cells)]),
                        "cell_type": pd.Categorical(cell_type.astype(str))},
                       index=[f"c{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
                       obsm={"protein_expression": pd.DataFrame(y, index=obs.index,
                                                                columns=names)})
    return adata, foreground


def register(adata, model=None, **kwargs):
    return setup_anndata(adata, batch_key="batch", **(model or TotalVI()).registration(), **kwargs)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def test_registered_and_described():
    assert MODELS["totalvi"] is TotalVI
    model = TotalVI()
    assert (model.name, model.data_kind, model.default_transform) == ("totalvi", "counts", "none")
    assert model.likelihood == "nb"
    assert model.registration() == {"obsm_keys": ("protein_expression",),
                                    "obsm_kinds": ("counts",)}
    with pytest.raises(ValueError, match="protein_dispersion"):
        TotalVI(protein_dispersion="cell")


def test_foreground_probability_separates_planted_proteins():
    adata, foreground = simulate_citeseq()
    data = register(adata)
    started = time.perf_counter()
    result = lvmzoo.fit(TotalVI(**SMALL), data, epochs=40, progress=False, seed=0)
    out, added = result.annotate(adata, data)
    probability = out.obsm["totalvi_protein_foreground_probability"]
    assert list(probability.columns) == [f"P{p}" for p in range(6)]
    auc = roc_auc_score(foreground.ravel(), probability.to_numpy().ravel())
    print(f"foreground-probability AUC on planted proteins: {auc:.4f} "
          f"(fit + annotate {time.perf_counter() - started:.1f} s)")
    assert auc > 0.9
    denoised = out.obsm["totalvi_denoised_protein"].to_numpy()
    assert denoised.shape == (300, 6) and np.all(denoised > 0)
    # Foreground-only expression is higher where the protein is on.
    assert denoised[foreground].mean() > 3 * denoised[~foreground].mean()
    assert out.layers["totalvi_normalized"].shape == (300, 60)
    np.testing.assert_allclose(out.layers["totalvi_normalized"].sum(1), 1e4, rtol=1e-3)
    assert out.obsm["X_totalvi"].shape == (300, 4)


def _start(model, data, seed=0):
    """Params after SVI.init from the model's data-dependent start, and an evaluation batch."""
    source = DeviceSource(data)
    batch = source.full_batch()
    key = jax.random.PRNGKey(seed)
    start = model.init_params(batch, key)
    svi = SVI(model.model, model.guide, Adam(1e-3), Trace_ELBO())
    state = svi.init(key, batch.replace(training=True), init_params=start)
    params = {**svi.get_params(state), **(state.mutable_state or {})}  # with batch-norm state
    return params, batch


def test_unmeasured_protein_does_not_enter_its_batch_likelihood():
    adata, _ = simulate_citeseq(n_batches=2, seed=1)
    proteins = adata.obsm["protein_expression"]
    in_b1 = (adata.obs["batch"] == "b1").to_numpy()
    proteins.loc[in_b1, "P0"] = 0.0  # P0 was not measured in batch b1
    model = TotalVI(**SMALL)
    params, batch = _start(model, register(adata, model))
    measured = np.asarray(params["protein_measured"])
    np.testing.assert_array_equal(measured, [[1] * 6, [0] + [1] * 5])

    # One draw of the latents from the guide, then the model's joint log density.
    guide = handlers.substitute(handlers.seed(model.guide, 0), data=params)
    latents = {name: site["value"] for name, site in handlers.trace(guide).get_trace(batch).items()
               if site["type"] == "sample"}

    def joint(y):
        """The model's log density at those latents, and a one-draw ELBO (same draw)."""
        b = batch.replace(obsm=jnp.asarray(y))
        replayed = handlers.substitute(handlers.substitute(model.model, data=params), data=latents)
        trace = handlers.trace(handlers.seed(replayed, 0)).get_trace(b)
        value = sum(jnp.sum(site["fn"].log_prob(site["value"])) for site in trace.values()
                    if site["type"] == "sample")
        elbo = log_weights(model.model, model.guide, params, b, jax.random.PRNGKey(1))
        return float(value), float(jnp.sum(elbo))

    y = np.asarray(batch.obsm).copy()
    base = joint(y)
    changed = y.copy()
    changed[in_b1, 0] = np.random.default_rng(0).integers(0, 500, in_b1.sum())
    assert joint(changed) == base  # neither the model's log density nor the ELBO moves
    control = y.copy()
    control[~in_b1, 0] += 50  # the same protein where it was measured does count
    assert joint(control)[0] != base[0]
    control = y.copy()
    control[in_b1, 1] += 50  # and so does a measured protein of batch b1
    assert joint(control)[0] != base[0]


def test_protein_dispersion_per_batch():
    adata, _ = simulate_citeseq(n_cells=64, n_genes=20, n_batches=2)
    model = TotalVI(protein_dispersion="protein-batch", **SMALL)
    params, _ = _start(model, register(adata, model))
    assert params["protein_inverse_dispersion"].shape == (2, 6)
    assert params["background_prior_loc"].shape == (2, 6)
    # The background prior starts below the data's median log counts (the lower component).
    y = adata.obsm["protein_expression"].to_numpy()
    assert np.all(np.asarray(params["background_prior_loc"]) < np.log1p(np.median(y, 0)) + 0.5)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_missing_protein_matrix_is_a_clear_error():
    adata, _ = simulate_citeseq(n_cells=20, n_genes=10)
    del adata.obsm["protein_expression"]
    with pytest.raises(DataError, match=r"obsm\['protein_expression'\] not found"):
        register(adata)


@pytest.mark.parametrize("bad, message", [
    (lambda y: y.__setitem__((0, 0), np.nan), "1 NaN or infinite"),
    (lambda y: y.__setitem__((slice(0, 3), 1), -2.0), "3 negative values"),
    (lambda y: y.__setitem__((0, 2), 0.5), "1 non-integer"),
])
def test_bad_protein_counts_are_clear_errors(bad, message):
    adata, _ = simulate_citeseq(n_cells=20, n_genes=10)
    y = adata.obsm["protein_expression"].to_numpy().copy()
    bad(y)
    adata.obsm["protein_expression"] = y  # an array this time: names from uns or numbered
    with pytest.raises(DataError, match=rf"obsm\['protein_expression'\] .*{message}"):
        register(adata)


def test_protein_matrix_with_wrong_number_of_cells():
    adata, _ = simulate_citeseq(n_cells=20, n_genes=10)
    # AnnData itself refuses such a matrix, with a ValueError naming it...
    with pytest.raises(ValueError, match="protein_expression"):
        adata.obsm["protein_expression"] = np.zeros((19, 6))
    # ...and one that got in anyway (e.g. from a hand-edited file) is refused at registration.
    adata.obsm._data["protein_expression"] = np.zeros((19, 6), np.float32)
    with pytest.raises(DataError, match=r"(?s)obsm has a matrix without one row per cell of "
                                        r"the data \(20 cells\).*'protein_expression'"):
        register(adata)


def test_protein_names_and_query_alignment():
    adata, _ = simulate_citeseq(n_cells=20, n_genes=10)
    y = adata.obsm["protein_expression"]
    adata.obsm["protein_expression"] = y.to_numpy()
    adata.uns["protein_names"] = np.array(["A", "B"])
    with pytest.raises(DataError, match=r"uns\['protein_names'\] has 2 names for the 6"):
        register(adata)
    adata.uns["protein_names"] = np.array(list("ABCDEF"))
    data = register(adata)
    assert data.registry.obsm_columns == (tuple("ABCDEF"),)
    # New cells: a DataFrame's columns are put in the model's order; missing ones refused.
    query = adata.copy()
    query.obsm["protein_expression"] = pd.DataFrame(y.to_numpy()[:, ::-1], index=y.index,
                                                    columns=list("FEDCBA"))
    np.testing.assert_array_equal(query_anndata(query, data.registry).obsm, data.obsm)
    query.obsm["protein_expression"] = query.obsm["protein_expression"].drop(columns=["C"])
    with pytest.raises(DataError, match=r"lacks 1 of the model's columns \(e.g. C\)"):
        query_anndata(query, data.registry)


def test_unregistered_proteins_name_the_fix():
    adata, _ = simulate_citeseq(n_cells=20, n_genes=10)
    data = setup_anndata(adata, batch_key="batch")  # proteins not registered
    with pytest.raises(DataError, match="registration"):
        lvmzoo.fit(TotalVI(**SMALL), data, epochs=1, progress=False)


# --------------------------------------------------------------------------
# Bundled CITE-seq data and the CLI
# --------------------------------------------------------------------------


def test_bundled_citeseq_data():
    assert "pbmc_citeseq" in DATASETS
    adata = load_pbmc_citeseq()
    assert adata.shape == (400, 2000)
    assert list(adata.obs["batch"].cat.categories) == ["10k", "5k"]
    proteins = adata.obsm["protein_expression"]
    assert proteins.shape == (400, 29) and list(proteins.columns) == list(adata.uns["protein_names"])
    measured = [(proteins[adata.obs["batch"] == b].sum(0) > 0).sum() for b in ("10k", "5k")]
    assert measured == [14, 29]
    data = register(adata)
    assert data.obsm.shape == (400, 29)
    x = adata.X.toarray()
    assert np.all(x == np.round(x)) and np.all(x.sum(1) > 0)


@pytest.mark.slow
def test_cli_fit_and_de_on_bundled_data(tmp_path, capsys):
    path = tmp_path / "citeseq.h5ad"
    load_pbmc_citeseq().write_h5ad(path)
    run = tmp_path / "run"
    # --score-cells 40: train and validation (40 cells) are scored on one compiled shape;
    # the scoring path itself is tests/test_fit_outputs.py's.
    assert cli.main(["fit", "totalvi", str(path), "--batch-key", "batch", "--out", str(run),
                     "--epochs", "5", "--no-progress", "--seed", "0", "--score-cells", "40"]) == 0
    result = ad.read_h5ad(run / "result.h5ad")
    assert result.obsm["X_totalvi"].shape == (400, 10)
    foreground = result.obsm["totalvi_protein_foreground_probability"]
    assert foreground.shape == (400, 29) and np.all((foreground >= 0) & (foreground <= 1))
    assert result.obsm["totalvi_denoised_protein"].shape == (400, 29)
    assert result.layers["totalvi_normalized"].shape == (400, 2000)
    # The saved model reloads with its obsm registry, and DE runs on the RNA part.
    table = tmp_path / "de.csv"
    assert cli.main(["de", str(run), "--groupby", "batch", "--group1", "10k",
                     "--n-samples", "200", "--out", str(table)]) == 0
    de = pd.read_csv(table, index_col=0)
    assert len(de) == 2000 and {"bayes_factor", "proba_m1"} <= set(de.columns)
    # ...and on the proteins (denoised foreground expression), one row per protein.
    proteins = tmp_path / "de_proteins.csv"
    assert cli.main(["de", str(run), "--proteins", "--groupby", "batch", "--group1", "5k",
                     "--n-samples", "200", "--out", str(proteins)]) == 0
    de = pd.read_csv(proteins, index_col=0)
    assert de.index.name == "protein" and len(de) == 29
    assert list(de.index.sort_values()) == sorted(foreground.columns)
    print(capsys.readouterr().out[-600:])


def test_cli_fit_without_proteins_is_a_clear_error(tmp_path, capsys):
    adata, _ = simulate_citeseq(n_cells=20, n_genes=10)
    del adata.obsm["protein_expression"]
    path = tmp_path / "no_proteins.h5ad"
    adata.write_h5ad(path)
    rc = cli.main(["fit", "totalvi", str(path), "--batch-key", "batch",
                   "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    assert rc != 0
    assert "obsm['protein_expression'] not found" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Protein outputs, protein DE (through lvmzoo.analysis.de, unchanged), query mapping
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_protein_de_finds_the_planted_proteins():
    from lvmzoo.analysis.proteins import (protein_differential_expression, protein_outputs,
                                          protein_view)

    # Two cell types in two batches; P0, P2, P4 are foreground in type 0, P1, P3, P5 in type 1.
    adata, foreground = simulate_citeseq(n_batches=2, seed=2)
    data = register(adata)
    result = lvmzoo.fit(TotalVI(**SMALL), data, epochs=30, progress=False, seed=0)
    table = protein_differential_expression(result, data, "cell_type", "0", "1", adata=adata,
                                            n_samples=400)
    assert sorted(table.index) == [f"P{p}" for p in range(6)]
    up = {"P0", "P2", "P4"}
    for name, row in table.iterrows():
        assert (row["bayes_factor"] > 0) == (name in up), table
    # Raw statistics are those of the protein counts.
    y = adata.obsm["protein_expression"]
    in0 = (adata.obs["cell_type"] == "0").to_numpy()
    np.testing.assert_allclose(table.loc[list(y.columns), "raw_mean1"], y[in0].mean(0),
                               rtol=1e-5)
    change = protein_differential_expression(result, data, "cell_type", "0", "1", adata=adata,
                                             n_samples=400, mode="change")
    assert set(change.index[:3]) <= set(y.columns) and len(change) == 6
    assert np.all(np.sign(change.loc[["P0", "P2", "P4"], "lfc_mean"]) > 0)
    assert np.all(np.sign(change.loc[["P1", "P3", "P5"], "lfc_mean"]) < 0)

    # The view decodes the model's denoised proteins: in a cell's own batch, transform_batch
    # = that batch is the same as no transform, and the per-cell outputs agree in scale.
    view, view_data = protein_view(result, data)
    assert view_data.n_genes == 6 and tuple(view.registry.gene_names) == tuple(y.columns)
    source = DeviceSource(view_data)
    cells = np.flatnonzero(data.batch == 1)[:16]
    batch = source.full_batch(cells)
    key = jax.random.PRNGKey(3)
    own = view.model.expression(result.params, batch, key, n_samples=4)
    as_b1 = view.model.expression(result.params, batch, key, n_samples=4,
                                  transform_batch=jnp.array([1]))
    np.testing.assert_allclose(own, as_b1, rtol=1e-5)
    outputs = protein_outputs(result, data, n_samples=10)
    assert set(outputs) == {"foreground_probability", "denoised", "background"}
    denoised = outputs["denoised"].to_numpy()
    assert denoised[foreground].mean() > 1.5 * denoised[~foreground].mean()


@pytest.mark.slow
def test_map_query_of_a_citeseq_batch_onto_a_totalvi_reference():
    from lvmzoo.analysis import map_query
    from lvmzoo.analysis.proteins import protein_outputs

    adata = load_pbmc_citeseq()
    reference = adata[adata.obs["batch"] == "5k"].copy()  # measured all 29 proteins
    query = adata[adata.obs["batch"] == "10k"].copy()  # measured 14 of them
    model = TotalVI(n_latent=6, n_hidden=32, encode_batch=True)
    data = setup_anndata(reference, batch_key="batch", **model.registration())
    fitted = lvmzoo.fit(model, data, epochs=6, progress=False, seed=0)
    before = jax.tree.map(np.array, fitted.params)
    latent_before = fitted.latent(data)
    proteins_before = protein_outputs(fitted, data, n_samples=5)["denoised"]

    mapped, query_data = map_query(fitted, query, epochs=4)
    assert mapped.registry.batch_categories == ("5k", "10k")
    # The reference is untouched: its params, and its cells' latent and proteins.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, fitted.params), before)
    reference_data = lvmzoo.query_anndata(reference, mapped.registry)
    np.testing.assert_allclose(mapped.latent(reference_data), latent_before, atol=1e-5)
    proteins_after = protein_outputs(mapped, reference_data, n_samples=5)["denoised"]
    np.testing.assert_allclose(proteins_after, proteins_before, rtol=1e-4)
    # The query batch: its own protein mask (from its counts) and background prior.
    y = query.obsm["protein_expression"].to_numpy()
    measured = np.asarray(mapped.params["protein_measured"])
    np.testing.assert_array_equal(measured[0], 1.0)
    np.testing.assert_array_equal(measured[1], (y.sum(0) > 0).astype(np.float32))
    assert measured[1].sum() == 14
    # Its latent and denoised proteins come out, finite; imputed proteins on the measured scale.
    latent = mapped.latent(query_data)
    assert latent.shape == (200, 6) and np.all(np.isfinite(latent))
    outputs = protein_outputs(mapped, query_data, n_samples=5)
    denoised = outputs["denoised"].to_numpy()
    assert denoised.shape == (200, 29) and np.all(np.isfinite(denoised)) and np.all(denoised > 0)
    unmeasured = measured[1] == 0
    ratio = denoised[:, unmeasured].mean() / proteins_before.to_numpy()[:, unmeasured].mean()
    assert 0.1 < ratio < 10, ratio
    probability = outputs["foreground_probability"].to_numpy()
    assert np.all((probability >= 0) & (probability <= 1))


def _write_h5mu(path, adata):
    """A MuData file as mudata writes it: /mod/rna, /mod/prot and the cells' obs at the top."""
    import h5py
    from anndata.io import write_elem

    proteins = adata.obsm["protein_expression"]
    rna = ad.AnnData(adata.X, obs=pd.DataFrame(index=adata.obs_names), var=adata.var)
    order = np.arange(adata.n_obs)[::-1]  # the protein modality lists the cells in another order
    prot = ad.AnnData(np.asarray(proteins, np.float32)[order],
                      obs=pd.DataFrame(index=adata.obs_names[order]),
                      var=pd.DataFrame(index=list(proteins.columns)))
    with h5py.File(path, "w") as file:
        file.attrs["encoding-type"] = "MuData"
        write_elem(file, "obs", adata.obs)
        write_elem(file, "mod/rna", rna)
        write_elem(file, "mod/prot", prot)


def test_mudata_file_gives_the_obsm_convention_and_fits_from_the_cli(tmp_path, capsys):
    """A .h5mu with 'rna' and 'prot' modalities (cells in another order in 'prot') reads as the
    RNA with obsm['protein_expression'] of the same cells; lvmzoo fit totalvi takes it."""
    from lvmzoo.data import read_h5mu
    from lvmzoo.data.registry import DataError

    adata = load_pbmc_citeseq()
    path = tmp_path / "citeseq.h5mu"
    _write_h5mu(path, adata)
    combined = read_h5mu(path)
    expected = adata.obsm["protein_expression"]
    np.testing.assert_array_equal(combined.obsm["protein_expression"].to_numpy(),
                                  expected.to_numpy())
    assert list(combined.obsm["protein_expression"].columns) == list(expected.columns)
    assert list(combined.obs["batch"]) == list(adata.obs["batch"])
    with pytest.raises(DataError, match="no 'protein' modality"):
        read_h5mu(path, protein="protein")
    run = tmp_path / "run"
    # --score-cells 40, as in test_cli_fit_and_de_on_bundled_data (the same cells): the scoring
    # programs are that test's, from the compilation cache (cold cache, one core: 24 -> 16 s).
    assert cli.main(["fit", "totalvi", str(path), "--batch-key", "batch", "--out", str(run),
                     "--epochs", "2", "--no-progress", "--score-cells", "40"]) == 0
    assert ad.read_h5ad(run / "result.h5ad").obsm["totalvi_denoised_protein"].shape == (400, 29)
