"""The interweaved slice updates of the scale: invariance of each step and the whole sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats

from pcbtl.inference import run_nuts_batched
from pcbtl.interweave import Interweave, conditional_potentials, interweave_scale, slice_step

# KS tests at level 1e-3: a correct sampler fails one of them once in a thousand runs, while a
# missing Jacobian or a biased update moves the distribution by far more than the KS distance
# detectable with these sample sizes (≈ 1.95/√n: 0.06 for n = 1000)
ALPHA = 1e-3


def test_slice_step_samples_a_skewed_density():
    # Gamma(3, 1) on log scale: p(u) ∝ exp(3u − e^u); start every chain at the same point and
    # take 15 steps; the end points must follow the density (starting far off in the tail)
    def logp(u):
        return 3.0 * u - jnp.exp(u)

    def chain(key):
        def body(u, k):
            return slice_step(k, logp, u, width=0.5), None

        u, _ = jax.lax.scan(body, jnp.asarray(-3.0), jax.random.split(key, 15))
        return u

    u = np.asarray(jax.jit(jax.vmap(chain))(jax.random.split(jax.random.PRNGKey(0), 1000)))
    assert stats.kstest(np.exp(u), stats.gamma(3.0).cdf).pvalue > ALPHA


def test_slice_step_keeps_the_point_when_nothing_is_inside():
    # a level above every point but x0 itself (a spike): the update returns x0, never NaN
    def logp(u):
        return jnp.where(u == 0.25, 0.0, -jnp.inf)

    out = slice_step(jax.random.PRNGKey(1), logp, jnp.asarray(0.25), max_shrink=10)
    assert float(out) == 0.25


def _toy(loc, scales, X=None, y=None):
    tau = numpyro.sample("tau", dist.Gamma(2.0, 4.0))
    theta = numpyro.sample("theta", dist.Normal(loc, tau * scales).to_event(1))
    if X is not None and y is not None:
        numpyro.sample("y", dist.Normal(X @ theta, 0.5), obs=y)


SPEC = Interweave(loc_arg="loc", scale_arg="scales")


def test_interweave_moves_keep_the_prior():
    # without data both updates target the prior; start from exact prior draws of (τ, θ) and
    # apply three moves: τ must stay Gamma(2, 4). Dropping the D·u Jacobian of the non-centred
    # update (D = 6 weights) would push τ up by a factor of ~e^{6/2} per move
    D = 6
    loc, scales = jnp.linspace(-1.0, 1.0, D), jnp.linspace(0.5, 1.5, D)
    kw = dict(loc=loc, scales=scales)
    pe, prior_pe = conditional_potentials(_toy, kw, SPEC)
    key_tau, key_eps, key_moves = jax.random.split(jax.random.PRNGKey(2), 3)
    n = 1000
    tau = jax.random.gamma(key_tau, 2.0, (n,)) / 4.0
    theta = loc + tau[:, None] * scales * jax.random.normal(key_eps, (n, D))

    def moves(key, u, th):
        for k in jax.random.split(key, 3):
            u, z = interweave_scale(k, u, {"theta": th}, pe, prior_pe, loc, scales, SPEC)
            th = z["theta"]
        return u, th

    u, th = jax.jit(jax.vmap(moves))(jax.random.split(key_moves, n), jnp.log(tau), theta)
    assert stats.kstest(np.exp(np.asarray(u)), stats.gamma(2.0, scale=0.25).cdf).pvalue > ALPHA
    # the weights moved with τ at fixed ε, so θ given τ is still N(loc, τ² s²)
    eps = (np.asarray(th) - np.asarray(loc)) / (np.exp(np.asarray(u))[:, None] * np.asarray(scales))
    assert stats.kstest(eps.ravel()[:n], stats.norm.cdf).pvalue > ALPHA


def _tau_posterior_quadrature(X, y, loc, scales, grid):
    # marginally y ~ N(X loc, τ² X S² Xᵀ + 0.25 I): the exact posterior of τ on a fine grid
    m = X @ loc
    K = (X * scales**2) @ X.T
    logp = []
    for t in grid:
        C = t**2 * K + 0.25 * np.eye(len(y))
        logp.append(
            stats.multivariate_normal(m, C).logpdf(y) + stats.gamma(2.0, scale=0.25).logpdf(t)
        )
    logp = np.asarray(logp)
    w = np.exp(logp - logp.max())
    return w / w.sum()


def test_nuts_within_gibbs_recovers_the_scale_posterior():
    # linear-Gaussian model, where the posterior of τ is known by quadrature. Eight chains of
    # 400 draws: the Monte Carlo sd of the posterior mean of τ is ≲ 0.01 (posterior sd ≈ 0.1,
    # ESS ≳ 300); tolerance 0.03 on the mean and on the 10% and 90% quantiles
    rng = np.random.default_rng(3)
    n, D = 30, 8
    X = rng.normal(size=(n, D))
    loc = rng.normal(size=D) * 0.3
    scales = np.full(D, 1.0)
    theta_true = loc + 0.4 * rng.normal(size=D)
    y = X @ theta_true + 0.5 * rng.normal(size=n)
    kw = dict(
        loc=jnp.asarray(loc, jnp.float32),
        scales=jnp.asarray(scales, jnp.float32),
        X=jnp.asarray(X, jnp.float32),
        y=jnp.asarray(y, jnp.float32),
    )
    posts = run_nuts_batched(
        _toy, [kw] * 8, num_warmup=300, num_samples=400, seeds=list(range(0, 80, 10)),
        interweave=SPEC, devices=jax.local_devices()[:1],
    )  # fmt: skip
    tau = np.concatenate([p.flat("tau") for p in posts])
    grid = np.linspace(1e-3, 2.0, 4000)
    w = _tau_posterior_quadrature(X, y, loc, scales, grid)
    cdf = np.cumsum(w)
    assert tau.mean() == pytest.approx(float(np.sum(w * grid)), abs=0.03)
    for q in (0.1, 0.9):
        assert np.quantile(tau, q) == pytest.approx(float(grid[np.searchsorted(cdf, q)]), abs=0.03)
    assert sum(p.num_divergences for p in posts) == 0
