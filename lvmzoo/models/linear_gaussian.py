"""Pieces shared by the linear-Gaussian models (probabilistic PCA, factor analysis).

Both say ``z ~ N(0, I_K)`` and ``x | z ~ N(W z + mu, diag(psi))``; PPCA ties
``psi = sigma^2`` across genes.  Marginally ``x ~ N(mu, W W^T + diag(psi))``,
and the posterior over ``z`` is Gaussian with a covariance shared by all cells:

.. math::

   \\Sigma_z = (I + W^T \\Psi^{-1} W)^{-1}, \\qquad
   E[z \\mid x] = \\Sigma_z W^T \\Psi^{-1} (x - \\mu).

The default guide is the amortised family that contains this posterior: an
affine encoder for the mean and one shared Cholesky factor, so the ELBO is
tight at the optimum and SVI recovers maximum likelihood.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from lvmzoo.data.source import Batch
from lvmzoo.models.base import cell_plate


def generative_story(batch: Batch, n_latent: int, noise_scale: jax.Array, W, mu) -> None:
    """Per-cell part of the model: ``z ~ N(0, I)``, ``x ~ N(W z + mu, noise_scale^2)``."""
    with cell_plate(batch):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([n_latent]).to_event(1))
        numpyro.sample("x", dist.Normal(z @ W.T + mu, noise_scale).to_event(1), obs=batch.x)


def linear_encoder_guide(batch: Batch, n_latent: int) -> None:
    """``q(z | x) = N(A x + b, L L^T)`` with one ``L`` for all cells."""
    n_genes = batch.x.shape[-1]
    weight = numpyro.param("encoder_weight", jnp.zeros((n_latent, n_genes)))
    bias = numpyro.param("encoder_bias", jnp.zeros(n_latent))
    scale_tril = numpyro.param(
        "posterior_scale_tril", 0.1 * jnp.eye(n_latent), constraint=constraints.lower_cholesky
    )
    with cell_plate(batch):
        numpyro.sample("z", dist.MultivariateNormal(batch.x @ weight.T + bias, scale_tril=scale_tril))


def marginal_log_likelihood(x, W, mu, noise_variance) -> jax.Array:
    """``log N(x | mu, W W^T + diag(noise_variance))`` per row; ``x`` is ``(B, G)``."""
    noise_variance = jnp.broadcast_to(noise_variance, mu.shape)
    return dist.LowRankMultivariateNormal(mu, W, noise_variance).log_prob(x)


def posterior(x, W, mu, noise_variance) -> tuple[jax.Array, jax.Array]:
    """Exact ``E[z | x]`` ``(B, K)`` and the shared ``Cov[z | x]`` ``(K, K)``."""
    scaled = W / jnp.broadcast_to(noise_variance, mu.shape)[:, None]  # Psi^{-1} W
    precision = jnp.eye(W.shape[1]) + W.T @ scaled
    covariance = jnp.linalg.inv(precision)
    return (x - mu) @ scaled @ covariance, covariance


def principal_subspace(x, n_latent: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Maximum-likelihood PPCA of the rows of ``x`` (Tipping & Bishop, eq. 7–8).

    From the thin SVD of the centred ``(N, G)`` data (never the ``G × G``
    covariance): with eigenvalues ``l_1 >= ... >= l_G`` of the covariance,
    ``sigma^2`` is the mean of the ``G - K`` discarded ones and
    ``W = U_K (L_K - sigma^2 I)^{1/2}``.

    Returns:
      ``(mu (G,), W (G, K), sigma2 ())``.
    """
    mu = x.mean(0)
    centred = x - mu
    n, g = x.shape
    _, singular, vt = jnp.linalg.svd(centred, full_matrices=False)
    eigenvalues = singular**2 / n  # the non-zero ones; the others are 0
    total = jnp.sum(centred**2) / n
    sigma2 = (total - jnp.sum(eigenvalues[:n_latent])) / max(g - n_latent, 1)
    sigma2 = jnp.maximum(sigma2, 1e-6 * total / g)  # K >= rank: keep the noise positive
    scale = jnp.sqrt(jnp.maximum(eigenvalues[:n_latent] - sigma2, 0.0))
    return mu, vt[:n_latent].T * scale, sigma2


def factor_analysis_em(x, W, psi, psi_floor, n_iterations: int = 50) -> tuple[jax.Array, jax.Array]:
    """EM for factor analysis (Bishop §12.2.4) from ``(W, psi)`` on rows of ``x``.

    ``psi`` never goes below ``psi_floor``.  Costs ``O(N G K)`` per iteration;
    no ``G × G`` matrix is formed.

    Returns:
      ``(W (G, K), psi (G,))``.
    """
    centred = x - x.mean(0)
    n = x.shape[0]
    second_moment = jnp.mean(centred**2, axis=0)

    def step(_, carry):
        W, psi = carry
        scaled = W / psi[:, None]
        covariance = jnp.linalg.inv(jnp.eye(W.shape[1]) + W.T @ scaled)  # Cov[z | x]
        z = centred @ scaled @ covariance  # E[z | x], (N, K)
        cross = centred.T @ z / n  # (G, K)
        W = cross @ jnp.linalg.inv(covariance + z.T @ z / n)
        psi = jnp.maximum(second_moment - jnp.sum(W * cross, axis=1), psi_floor)
        return W, psi

    return jax.lax.fori_loop(0, n_iterations, step, (W, psi))


def exact_encoder(W, mu, noise_variance) -> dict:
    """Guide params (:func:`linear_encoder_guide`) equal to the exact posterior of ``z``."""
    scaled = W / jnp.broadcast_to(noise_variance, mu.shape)[:, None]
    covariance = jnp.linalg.inv(jnp.eye(W.shape[1]) + W.T @ scaled)
    weight = (scaled @ covariance).T  # (K, G)
    return {"encoder_weight": weight, "encoder_bias": -weight @ mu,
            "posterior_scale_tril": jnp.linalg.cholesky(covariance)}


def init_from_data(batch: Batch, n_latent: int, key: jax.Array) -> dict:
    """Start at the data mean and per-gene variance with small random loadings."""
    mu = batch.x.mean(0)
    variance = batch.x.var(0) + 1e-3
    W = 0.1 * jnp.sqrt(variance)[:, None] * jax.random.normal(key, (batch.x.shape[1], n_latent))
    return {"mu": mu, "W": W, "variance": variance}
