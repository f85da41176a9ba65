"""The one SVI driver: compiled epochs, reproducibility, divergence, extensibility."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
import scipy.sparse as sp
from numpyro.distributions import constraints

import lvmzoo
from lvmzoo.data.source import n_steps_per_epoch
from lvmzoo.models import PPCA, LatentModel, cell_plate

TRACES = {"model": 0}


@dataclasses.dataclass(frozen=True)
class GammaPoissonRates(LatentModel):
    """A model written only in this test file: per-cell Gamma rates, Poisson counts.

    rate_c ~ Gamma(alpha, alpha / m),  x_cg ~ Poisson(rate_c * p_g).
    """

    name: ClassVar[str] = "gamma_poisson"
    data_kind: ClassVar[str] = "counts"
    default_learning_rate: ClassVar[float] = 0.05

    def model(self, batch):
        TRACES["model"] += 1  # counts Python traces of the program
        n_genes = batch.x.shape[-1]
        alpha = numpyro.param("alpha", 2.0, constraint=constraints.positive)
        profile = numpyro.param("profile", jnp.ones(n_genes) / n_genes, constraint=constraints.simplex)
        mean_total = numpyro.param("mean_total", 100.0, constraint=constraints.positive)
        with cell_plate(batch):
            rate = numpyro.sample("rate", dist.Gamma(alpha, alpha / mean_total))
            numpyro.sample("x", dist.Poisson(rate[:, None] * profile).to_event(1), obs=batch.x)

    def guide(self, batch):
        # Conjugate form of the exact posterior, amortised through the cell total.
        shape_offset = numpyro.param("q_shape", 2.0, constraint=constraints.positive)
        rate_offset = numpyro.param("q_rate", 0.02, constraint=constraints.positive)
        with cell_plate(batch):
            numpyro.sample("rate", dist.Gamma(shape_offset + batch.x.sum(-1), rate_offset + 1.0))

    def latent(self, params, batch, key):
        return ((params["q_shape"] + batch.x.sum(-1)) / (params["q_rate"] + 1.0))[:, None]


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    totals = rng.gamma(5.0, 40.0, size=600)
    profile = rng.dirichlet(np.ones(30))
    x = rng.poisson(totals[:, None] * profile).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    return lvmzoo.CellData.from_arrays(x, kind="counts")


@pytest.fixture(scope="module")
def continuous():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 3))
    x = z @ rng.normal(size=(3, 20)) + 0.5 * rng.normal(size=(500, 20))
    return lvmzoo.CellData.from_arrays(x.astype(np.float32))


def test_model_defined_outside_the_package_trains_through_fit(counts):
    result = lvmzoo.fit(GammaPoissonRates(), counts, epochs=30, batch_size=100, progress=False)
    loss = result.history["loss"]
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0] - 1.0
    # The fitted mean total approaches the data's average library size.
    observed = float(counts.x.sum(1).mean())
    assert abs(float(result.params["mean_total"]) - observed) / observed < 0.1
    assert result.latent(counts).shape == (counts.n_cells, 1)


def test_epochs_never_retrace(counts):
    TRACES["model"] = 0
    lvmzoo.fit(GammaPoissonRates(), counts, epochs=1, batch_size=100, progress=False)
    traces_one_epoch = TRACES["model"]
    TRACES["model"] = 0
    lvmzoo.fit(GammaPoissonRates(), counts, epochs=6, batch_size=100, progress=False)
    assert TRACES["model"] == traces_one_epoch > 0


def test_one_epoch_is_one_compiled_call(continuous, monkeypatch):
    """The epoch program is compiled once, then called once per epoch."""
    compiled_calls = []
    real_jit = jax.jit

    def spying_jit(fun, *args, **kwargs):
        jitted = real_jit(fun, *args, **kwargs)
        if getattr(fun, "__name__", "") != "run_epoch":
            return jitted

        class Spy:
            def lower(self, *a, **k):
                lowered = jitted.lower(*a, **k)

                class Lowered:
                    def compile(self):
                        program = lowered.compile()

                        def call(*args):
                            compiled_calls.append(1)
                            return program(*args)

                        return call

                return Lowered()

        return Spy()

    monkeypatch.setattr(jax, "jit", spying_jit)
    result = lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=5, batch_size=50, progress=False)
    assert len(compiled_calls) == 5
    assert result.history["steps_per_epoch"] == 10


def test_an_epoch_trains_every_cell_and_fills_its_last_minibatch(continuous):
    """ceil(n / B) steps; the last minibatch is topped up with the epoch's first cells."""
    from lvmzoo.data.streaming import BlockShuffle
    from lvmzoo.infer.svi import epoch_order

    key = jax.random.PRNGKey(0)
    for n_cells, batch_size in [(200, 128), (500, 64), (95, 10), (40, 40)]:
        steps = n_steps_per_epoch(n_cells, batch_size)
        assert steps == -(-n_cells // batch_size)
        for order in (np.asarray(epoch_order(key, 3, n_cells, steps, batch_size)),
                      BlockShuffle(block_size=7, window_blocks=2).order(key, 3, n_cells, steps,
                                                                       batch_size)):
            assert order.shape == (steps, batch_size)
            flat = order.ravel()
            assert set(flat.tolist()) == set(range(n_cells))  # every cell, every epoch
            np.testing.assert_array_equal(flat[n_cells:], flat[: steps * batch_size - n_cells])
            assert len(set(order[-1].tolist())) == batch_size  # no cell twice in one minibatch
    result = lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=1, batch_size=64, progress=False)
    assert result.history["steps_per_epoch"] == 8  # 500 cells: 7 full minibatches and one topped up


def test_same_seed_same_parameters_bit_for_bit(continuous):
    fit = lambda seed: lvmzoo.fit(PPCA(n_latent=3), continuous, epochs=4, batch_size=64,
                                  seed=seed, validation_fraction=0.2, progress=False)
    a, b, c = fit(7), fit(7), fit(8)
    for name in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[name]), np.asarray(b.params[name]))
    assert a.history["loss"] == b.history["loss"]
    assert not np.array_equal(np.asarray(a.params["W"]), np.asarray(c.params["W"]))


def _poison_after(n_steps):
    """An optax transform that turns updates into NaN from step ``n_steps`` on."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        poison = jnp.where(count >= n_steps, jnp.nan, 1.0)
        return jax.tree.map(lambda u: u * poison, updates), count + 1

    return optax.chain(optax.adam(1e-2), optax.GradientTransformation(init, update))


def test_nan_loss_stops_with_message_and_last_finite_parameters(continuous):
    with pytest.raises(lvmzoo.FitDivergedError) as info:
        lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=_poison_after(13),
                   epochs=5, batch_size=50, progress=False)
    message = str(info.value)
    assert "ppca" in message and "NaN" in message and "epoch 1" in message
    # The caller's optimizer set the step size: the message names no learning rate of ours.
    assert "smaller step size in your optimizer" in message and "(now" not in message
    kept = info.value.result
    assert kept.diverged == message
    assert all(np.all(np.isfinite(np.asarray(v))) for v in kept.params.values())
    with pytest.raises(lvmzoo.FitDivergedError):
        lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=_poison_after(0),
                   epochs=1, batch_size=50, progress=False)


def test_kept_parameters_equal_those_of_a_shorter_clean_fit(continuous):
    with pytest.raises(lvmzoo.FitDivergedError) as info:
        lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=_poison_after(10),
                   epochs=3, batch_size=50, progress=False)
    clean = lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=_poison_after(10),
                       epochs=1, batch_size=50, progress=False)  # exactly 10 clean steps
    for name, value in clean.params.items():
        np.testing.assert_array_equal(np.asarray(info.value.result.params[name]), np.asarray(value))


def test_epochs_in_one_program_fit_as_the_epoch_by_epoch_loop(continuous):
    from lvmzoo.infer.svi import epochs_in_one_program

    # The shapes of the fits above (batch_size=50): their programs are compiled already.
    fit = lambda: lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=3, batch_size=50,
                             progress=False)
    loop = fit()
    with epochs_in_one_program():
        fused = fit()
    assert fused.history["epoch"] == loop.history["epoch"]
    np.testing.assert_allclose(fused.history["loss"], loop.history["loss"], rtol=1e-6)
    for name, value in loop.params.items():
        np.testing.assert_allclose(np.asarray(fused.params[name]), np.asarray(value),
                                   rtol=1e-5, atol=1e-6)
    # A non-finite loss: the fit runs again epoch by epoch and keeps the same parameters.
    with pytest.raises(lvmzoo.FitDivergedError) as in_loop:
        lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=_poison_after(10), epochs=3,
                   batch_size=50, progress=False)
    with epochs_in_one_program(), pytest.raises(lvmzoo.FitDivergedError) as in_one:
        lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=_poison_after(10), epochs=3,
                   batch_size=50, progress=False)
    assert str(in_one.value) == str(in_loop.value)
    for name, value in in_loop.value.result.params.items():
        np.testing.assert_array_equal(np.asarray(in_one.value.result.params[name]),
                                      np.asarray(value))


def test_validation_split_and_early_stopping(continuous):
    result = lvmzoo.fit(PPCA(n_latent=2), continuous, optimizer=optax.sgd(0.0), epochs=20,
                        batch_size=50, validation_fraction=0.2, early_stopping_patience=2,
                        progress=False)
    # Nothing changes with a zero step size, so patience runs out after 2 epochs.
    assert len(result.history["epoch"]) == 3
    assert np.all(np.isfinite(result.history["validation_loss"]))
    assert len(result.validation_index) == 100 and len(result.train_index) == 400
    assert set(result.validation_index).isdisjoint(result.train_index)


def test_sparse_and_dense_inputs_fit_identically(counts):
    sparse = lvmzoo.CellData.from_arrays(sp.csr_matrix(counts.x), kind="counts")
    fits = [lvmzoo.fit(GammaPoissonRates(), d, epochs=2, batch_size=100, progress=False)
            for d in (counts, sparse)]
    for name in fits[0].params:
        np.testing.assert_allclose(np.asarray(fits[0].params[name]),
                                   np.asarray(fits[1].params[name]), rtol=1e-6)


def test_ctrl_c_keeps_last_completed_epoch(continuous, monkeypatch):
    from lvmzoo.infer import svi

    real_order = svi.epoch_order

    def interrupt_on_third_epoch(key, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_order(key, epoch, *args)

    monkeypatch.setattr(svi, "epoch_order", interrupt_on_third_epoch)
    with pytest.warns(UserWarning, match="interrupted"):
        result = lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=10, batch_size=50, progress=False)
    assert result.interrupted and len(result.history["epoch"]) == 2
    assert all(np.all(np.isfinite(np.asarray(v))) for v in result.params.values())


def test_progress_bar_reports_loss_and_speed(continuous, capsys):
    lvmzoo.fit(PPCA(n_latent=2), continuous, epochs=2, batch_size=50, progress=True)
    err = capsys.readouterr().err
    assert "fit ppca" in err and "loss=" in err and "cells_per_s=" in err


def test_count_model_rejects_transformed_data(continuous):
    with pytest.raises(ValueError, match="raw counts"):
        lvmzoo.fit(GammaPoissonRates(), continuous, epochs=1, progress=False)
