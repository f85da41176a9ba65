"""LinearSCVI: its loadings recover planted gene programs, with batch norm
folded in; it fits data with genes that are zero in every cell (a warning,
no error); result.h5ad gets varm["linear_scvi_loadings"].

One fit on a simulation built here: 300 cells × 125 genes whose log
expression is a baseline plus three gene programs (disjoint sets of 20 genes,
different strengths) times independent Gaussian factors, NB counts; five of
the genes are never observed.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import lvmzoo
from lvmzoo.data import DataWarning
from lvmzoo.models import MODELS, LinearSCVI

STRENGTHS = (1.6, 1.2, 0.8)
GENES_PER_PROGRAM = 20
N_ZERO_GENES = 5


def programs_simulation(n_cells=300, n_genes=120, seed=0):
    """Counts with log rho = base + W z (W: one block of genes per program), plus all-zero genes."""
    rng = np.random.default_rng(seed)
    programs = np.zeros((n_genes, len(STRENGTHS)))
    genes = rng.permutation(n_genes)
    for k, strength in enumerate(STRENGTHS):
        members = genes[k * GENES_PER_PROGRAM:(k + 1) * GENES_PER_PROGRAM]
        programs[members, k] = strength * rng.choice([-1.0, 1.0], size=len(members))
    logits = rng.normal(0.0, 1.0, n_genes) + rng.standard_normal((n_cells, len(STRENGTHS))) @ programs.T
    rho = np.exp(logits - logits.max(1, keepdims=True))
    mean = rng.lognormal(np.log(3000), 0.2, (n_cells, 1)) * rho / rho.sum(1, keepdims=True)
    counts = rng.poisson(rng.gamma(10.0, mean / 10.0))  # NB, inverse dispersion 10
    counts = np.hstack([counts, np.zeros((n_cells, N_ZERO_GENES))])
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes + N_ZERO_GENES)])
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), var=var)
    adata.varm["true_programs"] = np.vstack([programs, np.zeros((N_ZERO_GENES, len(STRENGTHS)))])
    return adata


@pytest.fixture(scope="module")
def fitted():
    adata = programs_simulation()
    with pytest.warns(DataWarning, match=f"{N_ZERO_GENES} of 125 genes are zero in every cell"):
        data = lvmzoo.setup_anndata(adata)
    # The ELBO is unchanged by a rotation of z (and W) except through the mean-field posterior,
    # whose pull towards the planted axes is weak: no dropout and no KL warm-up (their noise
    # and a KL weight near 0 early let a fit settle in a rotated basis), and enough steps.
    # Observed library sizes: a latent one (the default) needs ~3x the epochs to converge.
    model = LinearSCVI(n_latent=3, n_hidden=32, latent_library=False, dropout_rate=0.0,
                       n_epochs_kl_warmup=None)
    result = lvmzoo.fit(model, data, epochs=400, batch_size=100, learning_rate=2e-2,
                        progress=False)
    return adata, data, result


def test_registered_with_scvi_tools_defaults():
    model = MODELS["linear_scvi"]()
    assert isinstance(model, LinearSCVI)
    assert (model.likelihood, model.latent_library, model.use_batch_norm, model.dispersion) == (
        "nb", True, True, "gene")


@pytest.mark.slow  # the module's fit: ~70 s on the loaded 2-core machine (400 short epochs)
def test_fits_genes_never_observed(fitted):
    _, _, result = fitted
    loss = np.asarray(result.history["loss"])
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]


@pytest.mark.slow  # the module's fit: ~70 s on the loaded 2-core machine (400 short epochs)
def test_loadings_recover_planted_programs(fitted):
    adata, _, result = fitted
    loadings = result.loadings()
    assert list(loadings.columns) == ["Z_0", "Z_1", "Z_2"]
    assert list(loadings.index) == list(adata.var_names)
    observed = slice(0, adata.n_vars - N_ZERO_GENES)
    truth = adata.varm["true_programs"][observed]
    learned = loadings.to_numpy()[observed]
    correlation = np.abs(np.corrcoef(learned.T, truth.T)[:3, 3:])  # learned × planted
    best_match = correlation.max(0)
    print(f"LinearSCVI best-match |correlation| {best_match.mean():.3f}")
    assert best_match.mean() > 0.8, correlation.round(2)


@pytest.mark.slow  # the module's fit: ~70 s on the loaded 2-core machine (400 short epochs)
def test_loadings_fold_in_the_decoder_batch_norm(fitted):
    _, data, result = fitted
    params = result.params
    kernel = np.asarray(params["decoder$params"]["expression"]["kernel"])  # (K, G): no batch rows
    gamma = np.asarray(params["decoder$params"]["expression_norm"]["scale"])
    variance = np.asarray(params["decoder$state"]["batch_stats"]["expression_norm"]["var"])
    np.testing.assert_allclose(result.loadings().to_numpy(),
                               (kernel * gamma / np.sqrt(variance + 1e-3)).T, rtol=1e-5)
    # The loadings are the slope of the decoder's logits in z, at evaluation.
    model = result.model
    from lvmzoo.data.source import DeviceSource

    batch = DeviceSource(data).full_batch(np.arange(4))
    z = np.zeros((2, 4, 3), np.float32)
    z[1, :, 0] = 1.0
    out = model.generative(params, batch, z, np.zeros((2, 4), np.float32))
    step = np.log(np.asarray(out.rho[1])) - np.log(np.asarray(out.rho[0]))  # softmax: up to a constant
    slope = result.loadings()["Z_0"].to_numpy()
    np.testing.assert_allclose(step - step.mean(1, keepdims=True),
                               np.broadcast_to(slope - slope.mean(), step.shape), atol=1e-4)


@pytest.mark.slow  # the module's fit: ~70 s on the loaded 2-core machine (400 short epochs)
def test_result_h5ad_gets_the_loadings(fitted):
    adata, data, result = fitted
    annotated, keys = result.annotate(adata, data)
    assert keys == ['obsm["X_linear_scvi"]', 'varm["linear_scvi_loadings"]',
                    'layers["scvi_normalized"]']
    np.testing.assert_allclose(annotated.varm["linear_scvi_loadings"], result.loadings(),
                               rtol=1e-6)
    assert "linear_scvi_loadings" not in adata.varm
