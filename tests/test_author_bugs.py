"""Bugs a model author met (issue 20), each with the test that failed before its fix."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import lvmzoo
from lvmzoo import datasets
from lvmzoo.infer.mcmc import run_nuts
from lvmzoo.models import LatentModel, cell_plate


@pytest.fixture(scope="module")
def counts():
    adata = datasets.simulate_counts(n_cells=60, n_genes=12, n_batches=1, n_de_genes_per_type=2,
                                     seed=7)
    return adata


def test_nuts_holds_flax_parameters_fixed(counts):
    """``run_nuts(params=fitted.params)`` failed with 'entry not a 2- or 3- tuple' on nested
    Flax parameters (``decoder$params``), for the zoo's VAE too."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    model = lvmzoo.models.VAE(n_latent=2, n_hidden=8, n_layers=1)
    fitted = lvmzoo.fit(model, data, epochs=3, batch_size=30, progress=False)
    assert any(isinstance(v, dict) for v in fitted.params.values())  # nested Flax params
    result = run_nuts(model, data, num_warmup=20, num_samples=20, num_chains=1,
                      params=fitted.params)
    assert result.samples["z"].shape == (1, 20, 60, 2)
    assert np.all(np.isfinite(result.samples["z"]))


@dataclasses.dataclass(frozen=True)
class Factors(LatentModel):
    """A model whose per-cell latent is not called ``z`` and whose latent needs the guide."""

    n_latent: int = 2
    name: ClassVar[str] = "factors_test"

    def model(self, batch):
        W = numpyro.param("W", 0.1 * jnp.ones((batch.x.shape[-1], self.n_latent)))
        with cell_plate(batch):
            f = numpyro.sample("factors", dist.Normal(0.0, 1.0).expand([self.n_latent]).to_event(1))
            numpyro.sample("x", dist.Normal(f @ W.T, 1.0).to_event(1), obs=batch.x)

    def guide(self, batch):  # the named guides replace it in these tests
        raise NotImplementedError

    def latent(self, params, batch, key):
        # Its own guide's encoder: a named guide has no such param, so the guide's mean is used.
        encoder = numpyro.param("encoder", jnp.zeros((batch.x.shape[-1], self.n_latent)))
        return batch.x @ encoder


@dataclasses.dataclass(frozen=True)
class Scalar(Factors):
    """One latent value per cell (event shape ``()``)."""

    name: ClassVar[str] = "scalar_test"

    def model(self, batch):
        w = numpyro.param("w", 0.1 * jnp.ones(batch.x.shape[-1]))
        with cell_plate(batch):
            t = numpyro.sample("t", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(t[:, None] * w, 1.0).to_event(1), obs=batch.x)


@pytest.mark.parametrize("model, shape", [(Factors(), (60, 2)), (Scalar(), (60, 1))])
def test_named_guides_report_a_latent_not_called_z_with_shape_cells_by_k(counts, model, shape):
    """Named guides reported only a site called "z" ('the guide has no per-cell site 'z' to
    report'), and a scalar-per-cell site came back as (n,), not (n, 1)."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    fitted = lvmzoo.fit(model, data, guide="mean_field", epochs=3, batch_size=30,
                        validation_fraction=0.0, progress=False)
    latent = fitted.latent(data.subset(fitted.train_index))
    assert latent.shape == shape and np.all(np.isfinite(latent))


def test_gmm_importance_sampling_meets_the_exact_likelihood():
    """The GMM's guide leaves the component to its prior; the importance weights counted that
    prior once more, so the estimate sat ~E[-log w_c] nats/cell below the exact value."""
    adata = datasets.simulate_counts(n_cells=200, n_genes=20, n_batches=1, n_de_genes_per_type=3,
                                     seed=2)
    data = lvmzoo.setup_anndata(adata, transform="log1p_cp10k")
    fitted = lvmzoo.fit(lvmzoo.models.GaussianMixture(n_components=3), data, epochs=5,
                        batch_size=50, progress=False)
    exact = fitted.evaluate(data)["avg_log_likelihood"]
    sampled = fitted.evaluate(data, n_samples=64, method="importance_sampling")
    print(f"GMM exact {exact:.4f}, importance-sampled {sampled['avg_log_likelihood']:.4f}")
    assert sampled["avg_log_likelihood"] == pytest.approx(exact, abs=0.05)
    assert sampled["elbo"] <= exact + 1e-4


def test_a_per_cell_guide_with_a_validation_split_says_early_stopping_is_off(counts):
    """Per-cell named guides recorded a NaN validation loss every epoch without a word."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    with pytest.warns(UserWarning, match="'mean_field' guide holds parameters for the training "
                                         "cells only.*early stopping is off"):
        fitted = lvmzoo.fit(lvmzoo.models.PPCA(n_latent=2), data, guide="mean_field", epochs=4,
                            batch_size=30, validation_fraction=0.2, progress=False)
    assert len(fitted.history["epoch"]) == 4  # every epoch ran
    scores = fitted.evaluate(data.subset(fitted.validation_index))
    assert np.isfinite(scores["avg_log_likelihood"])


def test_fit_replicates_takes_guide_names_and_stability_survives_a_collapsed_replicate(counts):
    """fit_replicates refused guide names fit() accepts; replicate_stability crashed (scipy's
    'Input matrices must contain >1 unique points') when a replicate's latent collapsed."""
    from lvmzoo.infer.replicates import fit_replicates, replicate_stability

    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    fits = fit_replicates(lvmzoo.models.PPCA(n_latent=2), data, seeds=[0, 1], guide="mean_field",
                          epochs=3, batch_size=30, progress=False)
    assert [f.guide.name for f in fits] == ["mean_field", "mean_field"]
    latents = [f.latent(data) for f in fits]
    assert all(z.shape == (60, 2) for z in latents)
    collapsed = np.zeros_like(latents[0])
    stability = replicate_stability([*latents, collapsed])
    assert stability["n_pairs"] == 3 and stability["min"] == 0.0
    diverged = np.full_like(latents[0], np.nan)
    assert replicate_stability([*latents, diverged])["n_pairs_skipped"] == 2


def test_a_divergence_with_the_callers_optimizer_names_no_learning_rate():
    """The FitDivergedError message named a learning rate the user had not passed."""
    from lvmzoo.infer.svi import _divergence_message

    model = lvmzoo.models.PPCA()
    assert "now 0.01" in _divergence_message(model, 3, 5, 0.01)
    assert "smaller step size in your optimizer" in _divergence_message(model, 3, 5, None)
    assert "learning rate" not in _divergence_message(model, 3, 5, None)


def test_a_map_fit_is_not_labelled_importance_sampling(counts):
    """evaluate() of a map fit labelled log p(x, z_MAP) as 'importance_sampling'."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    fitted = lvmzoo.fit(lvmzoo.models.PPCA(n_latent=2), data, guide="map", epochs=3,
                        batch_size=30, progress=False)
    scores = fitted.evaluate(data, method="importance_sampling", n_samples=4)
    assert scores["method"] == "log_joint_at_map"
    assert np.isfinite(scores["elbo"])


def test_run_nuts_refuses_params_that_name_sample_sites(counts):
    """params= naming a sample site was ignored: NUTS sampled it anyway, without a word."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    model = lvmzoo.models.PPCA(n_latent=2, global_prior_scale=1.0)
    with pytest.raises(ValueError, match="params= holds W, which ppca samples.*freeze_globals"):
        run_nuts(model, data, num_warmup=5, num_samples=5, num_chains=1,
                 params={"W": jnp.zeros((12, 2))})


@dataclasses.dataclass(frozen=True)
class IndexedLatent(Factors):
    """A latent that indexes its own guide's params directly (no numpyro.param)."""

    name: ClassVar[str] = "indexed_latent_test"

    def latent(self, params, batch, key):
        return batch.x @ params["encoder"]


def test_a_latent_indexing_its_guides_params_falls_back_to_the_guide_mean(counts):
    """FittedModel.latent raised KeyError('encoder') after a named per-cell guide."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    fitted = lvmzoo.fit(IndexedLatent(), data, guide="mean_field", epochs=2, batch_size=30,
                        validation_fraction=0.0, progress=False)
    assert fitted.latent(data).shape == (60, 2)


CLASHING_MODEL = '''
import dataclasses
from typing import ClassVar
import jax.numpy as jnp
import numpyro, numpyro.distributions as dist
from lvmzoo.models import LatentModel, cell_plate


@dataclasses.dataclass(frozen=True)
class Clash(LatentModel):
    """A field named like a fit option.

    Attributes:
      seed: the model's own seed-like setting (not the fit's --seed).
      width: prior scale.
    """
    seed: int = 7
    width: float = 1.0
    name: ClassVar[str] = "clash_test"

    def model(self, batch):
        mu = numpyro.param("mu", jnp.zeros(batch.x.shape[-1]))
        with cell_plate(batch):
            numpyro.sample("x", dist.Normal(mu, self.width).to_event(1), obs=batch.x)

    def guide(self, batch):
        pass

    def latent(self, params, batch, key):
        return jnp.zeros((batch.x.shape[0], 1))
'''


def test_a_model_field_named_like_a_fit_option_keeps_its_default(counts, tmp_path):
    """A field 'seed' took the fit's --seed (0) and failed 'must be at least 1'."""
    import json

    from lvmzoo import cli

    (tmp_path / "clash.py").write_text(CLASHING_MODEL)
    counts.write_h5ad(tmp_path / "cells.h5ad")
    rc = cli.main(["fit", f"{tmp_path / 'clash.py'}:Clash", str(tmp_path / "cells.h5ad"),
                   "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress",
                   "--kind", "counts", "--transform", "log1p_cp10k", "--width", "2.0"])
    assert rc == 0
    config = json.loads((tmp_path / "run" / "model" / "model.json").read_text())["config"]
    assert config == {"seed": 7, "width": 2.0}


@dataclasses.dataclass(frozen=True)
class PerCellGuide(Factors):
    """Its own guide keeps per-cell locations inside the cells plate."""

    name: ClassVar[str] = "per_cell_guide_test"

    def guide(self, batch):
        with cell_plate(batch):
            loc = numpyro.param("factors_loc", jnp.zeros((batch.n_cells, self.n_latent)))
            numpyro.sample("factors", dist.Normal(loc[batch.index], 0.1).to_event(1))

    def latent(self, params, batch, key):
        return params["factors_loc"][batch.index]


def test_a_guide_with_per_cell_params_in_the_plate_is_refused_with_the_fix(counts):
    """latent(data.subset(...)) silently returned the first training cells' rows, and a
    validation split failed with a shape error; now the fit says what to do instead."""
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    with pytest.raises(ValueError, match=r"per-cell parameters inside the cells plate "
                                         r"\(factors_loc\).*guide='mean_field'"):
        lvmzoo.fit(PerCellGuide(), data, epochs=1, batch_size=30, progress=False)
    # The named per-cell family fits the same model and reports the right cells.
    fitted = lvmzoo.fit(PerCellGuide(), data, guide="mean_field", epochs=2, batch_size=30,
                        validation_fraction=0.0, progress=False)
    assert fitted.latent(data.subset(np.arange(10, 20))).shape == (10, 2)


@dataclasses.dataclass(frozen=True)
class RandomGlobal(LatentModel):
    """A global *sample* site w and a per-cell site t (helper-2's repro of the map ELBO)."""

    name: ClassVar[str] = "random_global_test"
    data_kind: ClassVar[str] = "counts"

    def model(self, batch):
        w = numpyro.sample("w", dist.Gamma(1.0, 1.0).expand([batch.x.shape[-1], 6]).to_event(2))
        with cell_plate(batch):
            t = numpyro.sample("t", dist.Gamma(1.0, 1.0).expand([6]).to_event(1))
            numpyro.sample("x", dist.Poisson(t @ w.T / 100).to_event(1), obs=batch.x)

    def guide(self, batch):
        raise NotImplementedError

    def latent(self, params, batch, key):
        return jnp.zeros((batch.size, 1))


def test_map_with_a_global_sample_site_has_a_finite_elbo():
    """The plug-in global of a map fit was the float32 mean of 64 identical draws, off by an
    ulp in places; substituted into the Delta site it gave log q = -inf and 'elbo': inf."""
    from lvmzoo.infer.guides import evaluation_chunks

    adata = datasets.simulate_counts(n_cells=300, n_genes=200, n_batches=1, seed=0)
    data = lvmzoo.setup_anndata(adata)
    fitted = lvmzoo.fit(RandomGlobal(), data, guide="map", epochs=30, progress=False)
    _, plug_in, _ = next(evaluation_chunks(fitted, data, 4096))
    np.testing.assert_array_equal(np.asarray(plug_in["w"]), np.asarray(fitted.params["w_auto_loc"]))
    assert np.isfinite(fitted.evaluate(data, n_samples=4)["elbo"])


def test_compare_and_fit_take_a_joint_guide_with_its_local_part(counts, tmp_path):
    """compare and the CLI could not pass a joint guide's local part (low_rank, local=mean_field)."""
    from lvmzoo.cli.compare import _methods
    from lvmzoo.infer.compare import CompareSettings, compare
    from lvmzoo.infer.guides import parse_guide_spec

    assert parse_guide_spec("low_rank:local=mean_field,rank=2") == (
        "low_rank", {"local": "mean_field", "rank": 2})
    assert _methods("mean_field,low_rank:local=mean_field,rank=2,map") == [
        "mean_field", "low_rank:local=mean_field,rank=2", "map"]
    data = lvmzoo.setup_anndata(counts, transform="log1p_cp10k")
    fitted = lvmzoo.fit(lvmzoo.models.PPCA(n_latent=2), data, guide="low_rank:local=mean_field",
                        epochs=2, batch_size=30, progress=False)
    assert fitted.guide.name == "low_rank" and fitted.guide.options == {"local": "mean_field"}
    table = compare([lvmzoo.models.PPCA(n_latent=2)], ["low_rank:local=mean_field"], data,
                    CompareSettings(epochs=3, batch_size=30, n_samples=4), progress=False)
    assert list(table["method"]) == ["low_rank:local=mean_field"]
    assert np.isfinite(table["heldout_log_likelihood"].iloc[0])


@pytest.mark.parametrize("guide", ["mean_field", "low_rank:local=mean_field", "map"])
def test_scvi_with_batch_norm_under_per_cell_guides_scores_new_cells(guide):
    """latent/evaluate of cells outside the fit raised a bare AssertionError inside flax_module:
    the refit froze the decoder's $params but not its batch-norm $state."""
    adata = datasets.simulate_counts(n_cells=120, n_genes=30, n_batches=2, n_de_genes_per_type=3,
                                     seed=1)
    data = lvmzoo.setup_anndata(adata, batch_key="batch")
    model = lvmzoo.models.SCVI(n_hidden=16, n_latent=3, n_layers=1, use_batch_norm=True)
    fitted = lvmzoo.fit(model, data, guide=guide, epochs=2, batch_size=60, progress=False,
                        validation_fraction=0.2)
    assert fitted.latent(data).shape == (120, 3)
    scores = fitted.evaluate(data.subset(fitted.validation_index), n_samples=4)
    assert np.isfinite(scores["avg_log_likelihood"]) and np.isfinite(scores["elbo"])
