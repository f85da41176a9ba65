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


# ---------------------------------------------------------------------------
# The sparse log-pmf: the log binomial coefficient on the nonzero counts only
# ---------------------------------------------------------------------------


def _sparse_block(seed, n_cells=40, n_genes=600, zero_fraction=0.9):
    """A ``(cells, genes)`` block of NB counts with about ``zero_fraction`` zeros, an
    all-zero row and a row with no zero; per-gene ``theta`` and per-count ``log mu``."""
    rng = np.random.default_rng(seed)
    theta = np.exp(rng.uniform(np.log(1e-2), np.log(1e3), n_genes))
    mu = np.exp(rng.uniform(np.log(1e-2), np.log(50.0), (n_cells, n_genes)))
    x = rng.negative_binomial(theta, theta / (theta + mu)).astype(float)
    x[rng.random(x.shape) < zero_fraction] = 0.0
    x[0] = 0.0  # an all-zero row
    x[1] = rng.integers(1, 3000, n_genes)  # a dense row, large counts included
    logits = rng.normal(0.0, 2.0, (n_cells, n_genes))
    return _f32(x, np.log(mu), theta, logits)


def _assert_float32_equal(ours, reference, x, theta):
    """Equal up to float32 rounding of the largest term (the log binomial coefficient)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    term = np.broadcast_to(_nb_term(np.asarray(x, np.float64), np.asarray(theta, np.float64)),
                           reference.shape)
    tolerance = np.maximum(np.maximum(1e-6 * np.abs(reference), 1e-5),
                           4 * np.finfo(np.float32).eps * term)
    assert np.all(np.isfinite(ours))
    assert np.all(np.abs(ours - reference) <= tolerance), np.max(np.abs(ours - reference) / tolerance)


def _numpyro_reference(x, log_mu, theta, logits, zero_inflated):
    """NumPyro's own NB / ZINB log-pmf (float32, ``lgamma`` on every count)."""
    import numpyro.distributions as ndist

    nb = ndist.NegativeBinomial2(jnp.exp(log_mu), theta)
    if zero_inflated:
        return ndist.ZeroInflatedNegativeBinomial2(jnp.exp(log_mu), theta,
                                                   gate_logits=logits).log_prob(x)
    return nb.log_prob(x)


@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("zero_fraction", [0.9, 0.0])
def test_sparse_log_pmf_equals_dense_values_and_gradients(zero_inflated, zero_fraction):
    """``sparse=True`` against ``sparse=False`` (every count) and NumPyro's distributions.

    The block has 24,000 counts (above ``_SPARSE_MIN_ENTRIES``): with 90 % of
    the counts set to zero the compacted branch runs, with the NB draws alone
    (about 45 % nonzero: more than the capacity of a quarter of the counts)
    the dense fallback does; both must give the dense values and gradients.
    Against dense: the same expressions on the same numbers, so equal to
    float32 rounding (1e-6 relative, or 4 ulps of the log binomial coefficient
    where the value is a small difference of large terms).  Against NumPyro's
    ``NegativeBinomial2`` / ``ZeroInflatedNegativeBinomial2`` (``lgamma``
    differences in float32, which lose digits for large ``theta``): 1e-4.
    """
    from lvmzoo.models import likelihoods as lik

    x, log_mu, theta, logits = _sparse_block(0, zero_fraction=zero_fraction)
    assert x.size >= lik._SPARSE_MIN_ENTRIES
    nonzero_share = float(jnp.mean(x > 0))
    assert (nonzero_share <= lik._SPARSE_CAPACITY) == (zero_fraction == 0.9)

    def log_prob(log_mu, theta, logits, sparse):
        if zero_inflated:
            return lik.zero_inflated_negative_binomial_log_prob(x, log_mu, theta, logits,
                                                                sparse=sparse)
        return lik.negative_binomial_log_prob(x, log_mu, theta, sparse=sparse)

    results = {}
    for sparse in (False, True):
        value = jax.jit(lambda *a, s=sparse: log_prob(*a, s))(log_mu, theta, logits)
        # A weighted sum, so every count's gradient matters (rows summed as the model does).
        weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, x.shape), jnp.float32)
        grads = jax.jit(jax.grad(lambda *a, s=sparse: jnp.sum(weights * log_prob(*a, s)),
                                 argnums=(0, 1, 2)))(log_mu, theta, logits)
        results[sparse] = (np.asarray(value, np.float64), [np.asarray(g, np.float64) for g in grads])
    (dense_value, dense_grads), (sparse_value, sparse_grads) = results[False], results[True]
    assert np.all(np.isfinite(sparse_value))
    _assert_float32_equal(sparse_value, dense_value, x, theta)
    assert np.all(sparse_value[0] <= 0) and np.all(np.isfinite(sparse_value[1]))
    names = ["log mu", "theta", "logits"] if zero_inflated else ["log mu", "theta"]
    for name, ours, reference in zip(names, sparse_grads, dense_grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max(),
                                   err_msg=name)

    numpyro_value = _numpyro_reference(x, log_mu, theta, logits, zero_inflated)
    x64, theta64 = np.asarray(x, np.float64), np.asarray(theta, np.float64)
    # NumPyro adds three float32 lgammas: a few ulps of each.
    lgammas = np.abs(gammaln(x64 + theta64)) + np.abs(gammaln(theta64)) + gammaln(x64 + 1)
    tolerance = np.maximum(1e-4 * np.abs(sparse_value), 1e-4) + 8 * np.finfo(np.float32).eps * lgammas
    assert np.all(np.abs(sparse_value - np.asarray(numpyro_value, np.float64)) <= tolerance)
    numpyro_grads = jax.grad(
        lambda *a: jnp.sum(_numpyro_reference(x, *a, zero_inflated)), argnums=(0, 1, 2)
    )(log_mu, theta, logits)
    unweighted = jax.grad(lambda *a: jnp.sum(log_prob(*a, True)), argnums=(0, 1, 2))(
        log_mu, theta, logits)
    for name, ours, reference in zip(names, unweighted, numpyro_grads):
        reference = np.asarray(reference, np.float64)
        np.testing.assert_allclose(np.asarray(ours, np.float64), reference, rtol=1e-3,
                                   atol=1e-4 * np.abs(reference).max(), err_msg=name)


def test_sparse_log_pmf_through_the_distributions_and_broadcast_shapes():
    """The distributions' ``log_prob`` takes the sparse path by default (``SPARSE_LOG_PMF``)
    and gives the dense values, also with samples ``(S, B, G)`` of ``log mu`` against
    counts ``(B, G)``, with per-cell ``theta`` ``(B, G)`` and an all-zero block."""
    from lvmzoo.models import likelihoods as lik

    x, log_mu, theta, logits = _sparse_block(2)
    samples = log_mu[None] + jnp.asarray([[[-0.5]], [[0.0]], [[0.7]]], jnp.float32)
    per_cell_theta = theta * jnp.exp(log_mu * 0.1)
    cases = [(x, samples, theta), (x, log_mu, per_cell_theta), (jnp.zeros_like(x), log_mu, theta)]
    for counts, lm, th in cases:
        for build in (lambda lm, th, s: lik.negative_binomial_log_prob(counts, lm, th, sparse=s),
                      lambda lm, th, s: lik.zero_inflated_negative_binomial_log_prob(
                          counts, lm, th, logits, sparse=s)):
            dense = np.asarray(jax.jit(lambda lm, th: build(lm, th, False))(lm, th))
            sparse = np.asarray(jax.jit(lambda lm, th: build(lm, th, True))(lm, th))
            assert sparse.shape == jnp.broadcast_shapes(counts.shape, lm.shape, th.shape)
            _assert_float32_equal(sparse, dense, counts, th)
    previous = lik.SPARSE_LOG_PMF
    try:
        for flag in (False, True):
            lik.SPARSE_LOG_PMF = flag
            assert lik._use_sparse(None, x, log_mu, theta) == flag
            value = jax.jit(lambda lm, th: ZeroInflatedNegativeBinomial(
                inverse_dispersion=th, log_mean=lm, dropout_logits=logits).log_prob(x))(log_mu, theta)
            _assert_float32_equal(
                value, lik.zero_inflated_negative_binomial_log_prob(x, log_mu, theta, logits,
                                                                    sparse=False), x, theta)
        assert not lik._use_sparse(None, x[:2, :10], log_mu[:2, :10], theta[:10])  # too small
    finally:
        lik.SPARSE_LOG_PMF = previous


def test_nonzero_positions_in_order_with_padding():
    from lvmzoo.models.likelihoods import _nonzero_positions

    rng = np.random.default_rng(3)
    for n, share in [(1, 1.0), (31, 0.5), (1024, 0.1), (5000, 0.02), (70_001, 0.3)]:
        flat = np.where(rng.random(n) < share, rng.integers(1, 9, n), 0).astype(np.float32)
        expected = np.flatnonzero(flat)
        capacity = max(expected.size, 1) + 7
        ours = np.asarray(jax.jit(_nonzero_positions, static_argnums=1)(jnp.asarray(flat), capacity))
        np.testing.assert_array_equal(ours[: expected.size], expected)
        assert np.all(ours[expected.size:] == n)
