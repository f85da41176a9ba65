"""Count likelihoods against scipy's reference densities.

Inputs: a seeded grid over counts 0 .. 50,000, means 1e-3 .. 1e5 and inverse
dispersions 1e-3 .. 1e4 (small theta and large counts included) plus 500
random NB draws, evaluated in float32 and compared with scipy in float64.

Tolerance: rtol 1e-5 (absolute floor 1e-5 nats for log-densities near 0).
Where both the count and theta are large (``min(x, theta) >= 100``) the
log-pmf is a small difference of terms of size ``~x log(1 + theta / x)``
(thousands of nats), which float32 cannot resolve to 1e-5 relative; there the
bound is 8 float32 ulps of the largest term (measured: at most 7.1e-5 relative).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import digamma, expit, gammaln

from lvmzoo.models.likelihoods import (
    COUNT_LIKELIHOODS,
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    digamma_remainder,
    stirling_remainder,
    zero_inflated_negative_binomial_log_prob,
)

RTOL, ATOL = 1e-5, 1e-5


def _grid(seed=0):
    """Every combination of a few counts, means and thetas, plus random draws; float64."""
    counts = [0, 1, 2, 7, 30, 250, 1000, 50_000]
    means = [1e-3, 0.1, 1.0, 13.0, 900.0, 1e5]
    thetas = [1e-3, 0.05, 1.0, 20.0, 1e4]
    x, mu, theta = map(np.array, zip(*itertools.product(counts, means, thetas)))
    rng = np.random.default_rng(seed)
    n = 500
    mu_r = np.exp(rng.uniform(np.log(1e-3), np.log(1e4), n))
    theta_r = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), n))
    x_r = rng.negative_binomial(theta_r, theta_r / (theta_r + mu_r)).astype(float)
    return (np.concatenate([x, x_r]).astype(float), np.concatenate([mu, mu_r]),
            np.concatenate([theta, theta_r]))


def _scipy_nb(x, mu, theta):
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def _nb_term(x, theta):
    """Size of the largest summand of the NB log-pmf, ``~ x log(1 + theta / x)``."""
    return np.abs(gammaln(x + theta) - gammaln(theta) - gammaln(x + 1))


def _check(ours, reference, x, term, both_large):
    """``both_large``: points whose log-pmf is a small difference of large terms ``term``."""
    ours = np.asarray(ours, np.float64)
    assert np.all(np.isfinite(ours))
    tolerance = np.where(both_large, 8 * np.finfo(np.float32).eps * term, 0.0)
    tolerance = np.maximum(tolerance, np.maximum(RTOL * np.abs(reference), ATOL))
    error = np.abs(ours - reference)
    assert np.all(error <= tolerance), (
        f"{np.sum(error > tolerance)} points off; worst at x={x[np.argmax(error / tolerance)]}"
    )
    assert np.max(error[~both_large] / np.maximum(np.abs(reference[~both_large]), 1.0)) <= RTOL


def test_negative_binomial_matches_scipy():
    x, mu, theta = _grid()
    ours = jax.jit(lambda *a: NegativeBinomial(a[1], a[2]).log_prob(a[0]))(*_f32(x, mu, theta))
    _check(ours, _scipy_nb(x, mu, theta), x, _nb_term(x, theta), np.minimum(x, theta) >= 100)


@pytest.mark.parametrize("logit", [-6.0, -0.5, 0.0, 2.0, 8.0])
def test_zero_inflated_negative_binomial_matches_hand_mixture(logit):
    x, mu, theta = _grid(seed=1)
    pi = expit(logit)
    nb = np.exp(_scipy_nb(x, mu, theta))
    # A point mass at 0 with weight pi, NB with weight 1 - pi.
    with np.errstate(divide="ignore"):  # log 0 at x > 0, replaced on the next line
        reference = np.log(np.where(x == 0, pi, 0.0) + (1 - pi) * nb)
    reference = np.where(x > 0, np.log1p(-pi) + _scipy_nb(x, mu, theta), reference)
    ours = jax.jit(
        lambda x, mu, theta: ZeroInflatedNegativeBinomial(mu, theta, logit).log_prob(x)
    )(*_f32(x, mu, theta))
    _check(ours, reference, x, _nb_term(x, theta), np.minimum(x, theta) >= 100)


def test_poisson_matches_scipy():
    x, mu, _ = _grid(seed=2)
    build = COUNT_LIKELIHOODS["poisson"].build
    ours = jax.jit(lambda x, mu: build(jnp.log(mu), None, None).log_prob(x))(*_f32(x, mu))
    # NumPyro's Poisson: x log mu - mu - log x! cancels the same way for large x and mu.
    term = np.abs(x * np.log(mu)) + mu
    _check(ours, stats.poisson.logpmf(x, mu), x, term, np.minimum(x, mu) >= 100)


def test_registry_builds_each_likelihood_with_the_right_inputs():
    mu, theta, logits = jnp.full((3, 4), 2.0), jnp.full(4, 0.5), jnp.zeros((3, 4))
    x = jnp.ones((3, 4))
    for name, entry in COUNT_LIKELIHOODS.items():
        d = entry.build(jnp.log(mu), theta if entry.needs_dispersion else None,
                        logits if entry.needs_dropout else None)
        assert d.batch_shape == (3, 4), name
        assert np.all(np.isfinite(d.log_prob(x)))
    assert [n for n, e in COUNT_LIKELIHOODS.items() if e.needs_dropout] == ["zinb"]
    assert [n for n, e in COUNT_LIKELIHOODS.items() if not e.needs_dispersion] == ["poisson"]


def test_stirling_remainder_matches_log_gamma():
    z = np.concatenate([np.geomspace(1e-4, 6.0, 200), np.geomspace(6.0, 1e7, 200)])
    ours = np.asarray(stirling_remainder(jnp.asarray(z, jnp.float32)), np.float64)
    # float32 inputs: compare with the remainder at the rounded arguments.
    z32 = np.asarray(jnp.asarray(z, jnp.float32), np.float64)
    reference = gammaln(z32) - ((z32 - 0.5) * np.log(z32) - z32 + 0.5 * np.log(2 * np.pi))
    # Below z = 6 the remainder is a difference of terms of size ~10 (the shift):
    # a few float32 ulps of 10 in absolute terms.
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=8 * 10 * np.finfo(np.float32).eps)


def test_digamma_remainder_matches_digamma():
    z = np.concatenate([np.geomspace(1e-4, 6.0, 200), np.geomspace(6.0, 1e7, 200)])
    ours = np.asarray(digamma_remainder(jnp.asarray(z, jnp.float32)), np.float64)
    z32 = np.asarray(jnp.asarray(z, jnp.float32), np.float64)
    reference = digamma(z32) - (np.log(z32) - 0.5 / z32)
    # Below z = 6 the shift's terms reach 1/z: a few float32 ulps of them.
    tolerance = np.maximum(1e-5 * np.abs(reference),
                           8 * np.finfo(np.float32).eps * np.maximum(10.0, 1.0 / z32))
    assert np.all(np.abs(ours - reference) <= tolerance)


def _zinb_reference(x, mu, theta, logit, gamma_terms=True):
    """ZINB log-pmf in float64 (the NB written with log1p: scipy's loses digits at theta >> mu).

    ``gamma_terms=False`` leaves out the log binomial coefficient (0 at x = 0).
    """
    pi = expit(logit)
    nb = -x * np.log1p(theta / mu) - theta * np.log1p(mu / theta)
    if gamma_terms:
        nb = nb + gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
    return np.where(x == 0, np.logaddexp(np.log(pi), np.log1p(-pi) + nb), np.log1p(-pi) + nb)


@pytest.mark.parametrize("logit", [-6.0, 0.0, 3.0])
def test_analytic_gradients_match_finite_differences_of_scipy(logit):
    """The custom derivatives against central differences of a float64 log-pmf.

    Tolerance: 1e-5 of the largest term each derivative is a difference of
    (``x`` and ``(x + theta) mu / (theta + mu)`` for ``log mu``;
    ``psi(x + theta) - psi(theta)``, ``log(1 + mu / theta)`` and
    ``x / (theta + mu)`` for ``theta``), at least 1e-5; float32 inputs cannot do better where those
    terms cancel (measured: at most 2.0e-6 of the terms, 7.4e-5 of the result).
    """
    x, mu, theta = _grid()
    logits = np.full_like(x, logit)
    grads = jax.vmap(jax.grad(zero_inflated_negative_binomial_log_prob, argnums=(1, 2, 3)))(
        *_f32(x, np.log(mu), theta, logits))
    h = 1e-5
    reference = [  # d/d log mu, d/d theta, d/d logit
        (_zinb_reference(x, mu * np.exp(h), theta, logits)
         - _zinb_reference(x, mu * np.exp(-h), theta, logits)) / (2 * h),
        # The log binomial coefficient's part is psi(x + theta) - psi(theta) (differences of
        # log Gamma at theta = 1e-3 lose too many digits): it is 0 at x = 0, where the
        # mixture weights the NB terms, and unweighted at x > 0.
        (_zinb_reference(x, mu, theta * np.exp(h), logits, gamma_terms=False)
         - _zinb_reference(x, mu, theta * np.exp(-h), logits, gamma_terms=False)) / (2 * h * theta)
        + digamma(x + theta) - digamma(theta),
        (_zinb_reference(x, mu, theta, logits + h)
         - _zinb_reference(x, mu, theta, logits - h)) / (2 * h),
    ]
    terms = [
        np.maximum(x, (x + theta) * mu / (theta + mu)),
        np.maximum.reduce([np.abs(digamma(x + theta) - digamma(theta)), np.log1p(mu / theta),
                           x / (theta + mu)]),
        np.ones_like(x),
    ]
    for name, ours, ref, term in zip(["log mu", "theta", "logit"], grads, reference, terms):
        ours = np.asarray(ours, np.float64)
        assert np.all(np.isfinite(ours)), name
        error = np.abs(ours - ref) / np.maximum(term, 1.0)
        assert error.max() <= 1e-5, (name, error.max(), x[np.argmax(error)])


def test_second_derivatives_exist_and_match_finite_differences():
    """Forward mode works through the custom rule (Laplace guides take Hessians)."""
    x, mu, theta = _f32([0.0, 3.0, 40.0], [2.0, 2.0, 30.0], [0.7, 0.7, 5.0])
    log_prob = lambda lm, th: ZeroInflatedNegativeBinomial(  # noqa: E731
        inverse_dispersion=th, log_mean=lm, dropout_logits=-1.0).log_prob(x).sum()
    hessian = jax.hessian(log_prob, argnums=0)(jnp.log(mu), theta)
    h = 1e-2
    gradient = jax.grad(log_prob)
    columns = [(gradient(jnp.log(mu).at[i].add(h), theta) - gradient(jnp.log(mu).at[i].add(-h), theta))
               / (2 * h) for i in range(3)]
    np.testing.assert_allclose(np.asarray(hessian), np.stack(columns, 1), rtol=2e-3, atol=1e-3)


def test_mean_and_log_mean_give_the_same_distribution():
    x, mu, theta = _f32(*_grid()[:3])
    by_mean = NegativeBinomial(mu, theta).log_prob(x)
    by_log = NegativeBinomial(inverse_dispersion=theta, log_mean=jnp.log(mu)).log_prob(x)
    np.testing.assert_array_equal(np.asarray(by_mean), np.asarray(by_log))
    with pytest.raises(ValueError, match="exactly one of mean and log_mean"):
        NegativeBinomial(mu, theta, log_mean=jnp.log(mu))


def test_gradients_are_finite_for_small_theta_and_large_counts():
    x, mu, theta = _f32([0.0, 50_000.0, 3.0], [1e-3, 1e5, 0.5], [1e-3, 1e-3, 1e4])
    grads = jax.grad(
        lambda mu, theta: ZeroInflatedNegativeBinomial(mu, theta, -1.0).log_prob(x).sum(),
        argnums=(0, 1),
    )(mu, theta)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_samples_have_the_distribution_mean_and_variance():
    mu, theta = 4.0, 0.7
    draws = np.asarray(NegativeBinomial(jnp.full(50_000, mu), theta).sample(jax.random.PRNGKey(0)))
    assert abs(draws.mean() - mu) < 0.05
    assert abs(draws.var() / (mu + mu**2 / theta) - 1) < 0.05
    zinb = ZeroInflatedNegativeBinomial(jnp.full(50_000, mu), theta, 0.0)
    zero = np.mean(np.asarray(zinb.sample(jax.random.PRNGKey(1))) == 0)
    expected_zero = 0.5 + 0.5 * stats.nbinom.pmf(0, theta, theta / (theta + mu))
    assert abs(zero - expected_zero) < 0.01
