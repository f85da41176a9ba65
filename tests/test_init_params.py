"""A model's start values (``init_params``): checked at fit time and honoured by named guides.

* A key that names no site (a misspelling) stops ``lvmzoo.fit`` before its
  first step with the key, the closest name and the valid names, and
  ``check_model`` reports it in its ``init_params_keys`` row.
* Start values of global latent sample sites (PPCA with priors on ``W``,
  ``mu``, ``sigma``) start the named guide's locations: ``mean_field`` on the
  unconstrained scale, ``map`` at the value itself, the joint families in
  their flattened ``auto_loc``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lvmzoo
from lvmzoo.data.source import DeviceSource
from lvmzoo.infer.guides import ensure_built, make_guide
from lvmzoo.infer.svi import InitParamsError, initial_params_of
from lvmzoo.models import PPCA
from lvmzoo.testing import check_model

N_CELLS, N_GENES, N_LATENT = 40, 6, 2
W_START, SIGMA_START = 0.3, 0.7


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N_CELLS, N_LATENT))
    x = z @ rng.normal(size=(N_LATENT, N_GENES)) + 1.0 + 0.3 * rng.normal(size=(N_CELLS, N_GENES))
    return lvmzoo.CellData.from_arrays(x.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class KnownStart(PPCA):
    """PPCA with priors on its globals, starting them at values a test can name."""

    def init_params_per_cell(self, batch, key):
        n_genes = batch.x.shape[-1]
        return {"W": jnp.full((n_genes, self.n_latent), W_START),
                "mu": jnp.arange(n_genes, dtype=jnp.float32), "sigma": jnp.asarray(SIGMA_START)}


@dataclasses.dataclass(frozen=True)
class MisspeltParam(PPCA):
    def init_params(self, batch, key):
        start = dict(super().init_params(batch, key))
        start["sigm"] = start.pop("sigma")
        return start


@dataclasses.dataclass(frozen=True)
class MisspeltSite(PPCA):
    """The typo is in a sample-site key, used by the per-cell named guides."""

    def init_params_per_cell(self, batch, key):
        start = dict(super().init_params_per_cell(batch, key))
        start["sgima"] = start.pop("sigma")
        return start


@dataclasses.dataclass(frozen=True)
class StartsItsCells(KnownStart):
    """Mistake: a start value for the per-cell latent z, of the init sample's cells."""

    def init_params_per_cell(self, batch, key):
        return {**super().init_params_per_cell(batch, key),
                "z": jnp.zeros((batch.size, self.n_latent))}


@dataclasses.dataclass(frozen=True)
class TransposedLoadings(KnownStart):
    """Mistake: W returned as (K, G) for the site's (G, K)."""

    def init_params_per_cell(self, batch, key):
        start = super().init_params_per_cell(batch, key)
        return {**start, "W": start["W"].T}


def prior_model(cls=KnownStart):
    return cls(n_latent=N_LATENT, global_prior_scale=1.0)


# --------------------------------------------------------------------------
# Keys are checked
# --------------------------------------------------------------------------


@pytest.mark.parametrize("guide", [None, "amortized"])
def test_a_misspelt_param_key_stops_the_fit_naming_it(data, guide):
    with pytest.raises(ValueError, match="'sigm'") as error:
        lvmzoo.fit(MisspeltParam(n_latent=N_LATENT), data, guide=guide, epochs=1, progress=False)
    assert isinstance(error.value, InitParamsError)
    message = str(error.value)
    assert "did you mean 'sigma'?" in message
    assert "valid names: W, " in message and "sigma" in message


@pytest.mark.parametrize("guide", ["mean_field", "map", "low_rank"])
def test_a_misspelt_sample_site_key_stops_the_fit_under_named_guides(data, guide):
    with pytest.raises(InitParamsError, match="'sgima'.*did you mean 'sigma'"):
        lvmzoo.fit(prior_model(MisspeltSite), data, guide=guide, epochs=1,
                   batch_size=N_CELLS, progress=False)


def test_check_model_reports_the_misspelt_key_once(data):
    report = check_model(prior_model(MisspeltSite), data, guides=("mean_field",), nuts=False,
                         raise_on_failure=False)
    print(report)
    row = report["init_params_keys"]
    assert row.status == "failed"
    assert "'sgima'" in row.message and "did you mean 'sigma'?" in row.message
    # The fits the driver refuses point at that row instead of failing again.
    assert report["guide:mean_field"].status == "skipped"
    assert report["fit"].status == "skipped"
    assert "init_params_keys" in report["fit"].message


def test_check_model_accepts_start_values_of_sample_sites(data):
    from lvmzoo.testing import _check_init_params, _Context

    message = _check_init_params(_Context(prior_model(PPCA), data, 0, N_CELLS))
    assert "W, mu, sigma" in message


@pytest.mark.parametrize("cls, words", [(StartsItsCells, "'z', a per-cell latent site"),
                                        (TransposedLoadings, "['W'] has shape (2, 6)")])
def test_start_values_a_guide_cannot_take_are_refused(data, cls, words):
    with pytest.raises(InitParamsError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        initial_params_of(prior_model(cls), data, guide="mean_field", batch_size=N_CELLS)


# --------------------------------------------------------------------------
# Named guides start where init_params says
# --------------------------------------------------------------------------


def test_mean_field_starts_its_locations_at_the_unconstrained_start_values(data):
    start = initial_params_of(prior_model(), data, guide="mean_field", batch_size=16)
    np.testing.assert_allclose(start["W_auto_loc"], np.full((N_GENES, N_LATENT), W_START))
    np.testing.assert_allclose(start["mu_auto_loc"], np.arange(N_GENES))
    # sigma ~ HalfNormal: positive support, so the location is log(sigma).
    np.testing.assert_allclose(start["sigma_auto_loc"], np.log(SIGMA_START), rtol=1e-6)


def test_map_starts_at_the_start_values_themselves(data):
    start = initial_params_of(prior_model(), data, guide="map", batch_size=16)
    np.testing.assert_allclose(start["W_auto_loc"], np.full((N_GENES, N_LATENT), W_START))
    np.testing.assert_allclose(start["mu_auto_loc"], np.arange(N_GENES))
    np.testing.assert_allclose(start["sigma_auto_loc"], SIGMA_START, rtol=1e-6)


def test_ppcas_own_start_reaches_the_map_guide(data):
    """PPCA's init_params_per_cell: the data's mean and pooled standard deviation (each
    gene's variance plus 1e-3, lvmzoo.models.linear_gaussian.init_from_data)."""
    start = initial_params_of(prior_model(PPCA), data, guide="map", batch_size=16)
    x = np.asarray(data.x)
    np.testing.assert_allclose(start["mu_auto_loc"], x.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(start["sigma_auto_loc"], np.sqrt((x.var(0) + 1e-3).mean()),
                               rtol=1e-4)


@pytest.mark.parametrize("name", ["low_rank", "laplace"])
def test_joint_guides_start_the_sites_entries_of_their_flat_location(data, name):
    model = prior_model()
    start = initial_params_of(model, data, guide=name, batch_size=N_CELLS)
    # The same model gives the same flattening: unpack the location with a guide built alike.
    twin = make_guide(name, model)
    ensure_built(twin, DeviceSource(data).head(N_CELLS))
    unpacked = twin._parts[0]._unpack_latent(start["auto_loc"])
    np.testing.assert_allclose(unpacked["W"], np.full((N_GENES, N_LATENT), W_START))
    np.testing.assert_allclose(unpacked["mu"], np.arange(N_GENES))
    np.testing.assert_allclose(unpacked["sigma"], np.log(SIGMA_START), rtol=1e-6)
    # The per-cell latents keep the family's own start (uniform in (-2, 2)).
    assert np.all(np.abs(np.asarray(unpacked["z"])) < 2)


def test_a_flow_and_the_amortized_guide_take_what_they_can(data):
    """flow has no location parameter: the start values are left out (documented);
    amortized starts the Normal it adds for the globals its model's guide leaves out."""
    flow = initial_params_of(prior_model(), data, guide="flow", batch_size=N_CELLS)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(flow))
    amortized = initial_params_of(prior_model(), data, guide="amortized", batch_size=16)
    np.testing.assert_allclose(amortized["sigma_auto_loc"], np.log(SIGMA_START), rtol=1e-6)
