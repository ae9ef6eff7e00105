"""Model functions: sufficient statistics, jitted log density without retracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import pcbtl
from pcbtl.models import (
    gaussian_loglik_rows,
    gaussian_loglik_suffstats,
    last_layer_sufficient_stats,
)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sufficient_statistics_equal_row_by_row(offset, seed):
    # offset = 1000: labels far from zero, where yᵀy − 2βᵀΦᵀy + βᵀΦᵀΦβ cancels in float32
    rng = np.random.default_rng(seed)
    n, p = 500, 6
    Phi = np.concatenate([rng.standard_normal((n, p - 1)), np.ones((n, 1))], axis=1)
    beta_ref = rng.standard_normal(p) + np.r_[np.zeros(p - 1), offset]  # e.g. the source head
    y = Phi @ (beta_ref + 0.2 * rng.standard_normal(p)) + 0.1 * rng.standard_normal(n)
    stats = last_layer_sufficient_stats(Phi, y, beta_ref)
    for _ in range(4):
        delta = 0.2 * rng.standard_normal(p)
        sigma = float(rng.uniform(0.05, 0.3))
        resid = y - Phi @ (beta_ref + delta)
        # float64 reference, row by row; the total is a difference of terms of size ~n, so
        # the tolerance is relative to n (float32 carries ~7 digits)
        ref = float(np.sum(-np.log(sigma) - 0.5 * np.log(2 * np.pi) - 0.5 * (resid / sigma) ** 2))
        scale = n * (1 + np.mean((resid / sigma) ** 2))
        got = float(gaussian_loglik_suffstats(jnp.asarray(delta, jnp.float32), sigma, stats))
        assert abs(got - ref) < 1e-5 * scale
        rows = gaussian_loglik_rows(
            jnp.asarray(Phi @ (beta_ref + delta))[None], jnp.array([sigma]), jnp.asarray(y)
        )
        assert abs(float(rows.sum()) - ref) < 1e-4 * scale


def test_jitted_log_density_is_traced_once():
    traces = {"n": 0}

    def model(X, y=None):
        traces["n"] += 1  # runs only while JAX traces the model
        w = numpyro.sample("w", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Normal(X @ w, s), obs=y)

    X = jnp.asarray(np.random.default_rng(0).standard_normal((40, 3)), jnp.float32)
    y = X @ jnp.array([1.0, -2.0, 0.5])
    log_density, x0 = pcbtl.make_log_density(model, {"X": X, "y": y})
    assert x0.dtype == jnp.float32 and x0.shape == (4,)
    before = traces["n"]
    values = [float(log_density(x0 + 0.1 * i)) for i in range(10)]
    assert traces["n"] == before + 1
    assert len(set(values)) == 10 and all(np.isfinite(values))
    # the gradient used by NUTS is traced once as well
    grad = jax.jit(jax.grad(log_density))
    grad(x0).block_until_ready()
    after_first = traces["n"]
    for i in range(1, 6):
        grad(x0 + 0.2 * i).block_until_ready()
    assert traces["n"] == after_first <= before + 2
