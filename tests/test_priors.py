"""The PC priors: rate, closed-form density, and d ~ Exp(λ) under the prior.

Kolmogorov–Smirnov tests use fixed seeds and reject at p < 0.01: a correct construction fails
one such test with probability 0.01 for a random seed, and with the seeds fixed the outcome is
reproducible. NUTS draws are thinned to near-independence before the test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import special, stats

import pcbtl
from pcbtl.kl import distance_curve
from pcbtl.networks import transfer_parametrization
from pcbtl.priors import (
    DistanceCurve,
    LastLayerPC,
    ScalePC,
    check_distance_curve,
    distance_curve_inverse,
    distance_curve_value,
    last_layer_pc_log_density,
    pc_rate,
)

KS_LEVEL = 0.01


def test_pc_rate_value_and_bad_arguments():
    assert pc_rate(1.0, 0.05) == pytest.approx(-math.log(0.05))
    lam = pc_rate(2.5, 0.1)
    assert math.exp(-lam * 2.5) == pytest.approx(0.1)  # P(d > U) = alpha
    for U in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="U"):
            pc_rate(U, 0.05)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            pc_rate(1.0, alpha)


def _random_spd(rng, p):
    A = rng.standard_normal((p, p))
    return A @ A.T / p + 0.1 * np.eye(p)


@pytest.mark.parametrize("p", [1, 3, 8])
def test_last_layer_log_density_matches_closed_form(p, rng):
    G = _random_spd(rng, p)
    L = np.linalg.cholesky(G)
    beta_s = rng.standard_normal(p)
    lam, sigma = 2.3, 0.7
    for _ in range(5):
        beta = beta_s + rng.standard_normal(p)
        delta = beta - beta_s
        d = math.sqrt(delta @ G @ delta) / sigma
        # closed form of DESIGN.md §2 (a), written independently of the implementation
        expected = (
            math.log(lam)
            - lam * d
            + special.gammaln(p / 2)
            - math.log(2 * math.pi ** (p / 2) * d ** (p - 1))
            + 0.5 * np.linalg.slogdet(G)[1]
            - p * math.log(sigma)
        )
        got = float(last_layer_pc_log_density(jnp.asarray(beta), beta_s, L, sigma, lam))
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_last_layer_density_integrates_to_one_in_one_dimension():
    # p = 1: π(β) = λ e^{-λ|β-β_S|√G/σ} √G/(2σ), a Laplace density
    G, lam, sigma = 2.0, 1.5, 0.5
    L = np.array([[math.sqrt(G)]])
    grid = np.linspace(-8, 8, 40001)
    dens = np.exp(
        np.asarray(
            last_layer_pc_log_density(jnp.asarray(grid[:, None]), np.zeros(1), L, sigma, lam)
        )
    )
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("prior", ["last_layer", "scale"])
def test_prior_distance_samples_are_exponential(source, prior):
    model = pcbtl.PCTransferRegressor(source, prior=prior, U=0.5, alpha=0.1, n_eps=16)
    d = model.prior_distance_samples(3000, seed=3)
    lam = pc_rate(0.5, 0.1)
    assert stats.kstest(d, "expon", args=(0, 1 / lam)).pvalue > KS_LEVEL


def _nuts_prior(model, num_samples=4000, thin=4, seed=0, **kwargs):
    mcmc = numpyro.infer.MCMC(
        numpyro.infer.NUTS(model),
        num_warmup=1000,
        num_samples=num_samples,
        thinning=thin,
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), **kwargs)
    return mcmc.get_samples()


class _NoJacobianLastLayerPC(LastLayerPC):
    """The classic bug: π ∝ e^{-λd} without d^{-(p-1)} (so d ~ Gamma(p, λ))."""

    def log_prob(self, value):
        p = self.event_shape[0]
        return super().log_prob(value) + (p - 1) * jnp.log(self.distance(value))


def _centred_last_layer(prior_cls, beta_s, L, lam):
    """β's density is the closed form ``prior_cls.log_prob``, sampled by NUTS in coordinates
    ``v`` with ``β = β_S + σ L^{-T} v ‖v‖^{p-1}`` (a radial stretch that removes the integrable
    spike of π(β) at β_S, which NUTS cannot enter). The stretch's own log-Jacobian
    ``p log σ − log|L| + log p + p(p−1) log‖v‖`` is added explicitly, so the draws follow
    ``prior_cls.log_prob`` exactly: a wrong density gives a wrong distribution of ``d``."""
    p = beta_s.shape[0]
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    v = numpyro.sample("v", dist.ImproperUniform(dist.constraints.real_vector, (), (p,)))
    r = jnp.linalg.norm(v)
    w = v * r ** (p - 1)
    beta = beta_s + sigma * jax.scipy.linalg.solve_triangular(L.T, w, lower=False)
    log_jac = p * jnp.log(sigma) - jnp.sum(jnp.log(jnp.diag(L))) + math.log(p)
    log_jac = log_jac + p * (p - 1) * jnp.log(r)
    prior = prior_cls(beta_s, L, sigma, lam)
    numpyro.factor("beta_density", prior.log_prob(beta) + log_jac)
    numpyro.deterministic("distance", prior.distance(beta))


def test_nuts_on_the_last_layer_prior_gives_exponential_distance(rng):
    p, lam = 3, 2.0
    G = _random_spd(rng, p)
    L, beta_s = jnp.asarray(np.linalg.cholesky(G)), jnp.asarray(rng.standard_normal(p))
    good = _nuts_prior(_centred_last_layer, prior_cls=LastLayerPC, beta_s=beta_s, L=L, lam=lam)
    assert stats.kstest(good["distance"], "expon", args=(0, 1 / lam)).pvalue > KS_LEVEL
    # the wrong density (Jacobian term dropped) must fail the same test, decisively
    bad = _nuts_prior(
        _centred_last_layer, prior_cls=_NoJacobianLastLayerPC, beta_s=beta_s, L=L, lam=lam
    )
    assert stats.kstest(bad["distance"], "expon", args=(0, 1 / lam)).pvalue < 1e-6
    assert stats.kstest(bad["distance"], "gamma", args=(p, 0, 1 / lam)).pvalue > KS_LEVEL


def test_nuts_on_the_noncentred_models_without_data_returns_the_prior(source):
    reg = pcbtl.PCTransferRegressor(source, prior="last_layer")
    setup = reg._setup(None)
    kwargs = reg._model_kwargs(setup)  # no X, y: prior only
    draws = _nuts_prior(pcbtl.models.last_layer_pc_model, num_samples=2000, thin=2, **kwargs)
    lam, s = setup["rate"], setup["sigma_scale"]
    assert stats.kstest(draws["distance"], "expon", args=(0, 1 / lam)).pvalue > KS_LEVEL
    assert stats.kstest(draws["sigma"], "halfnorm", args=(0, s)).pvalue > KS_LEVEL


def _scale_prior_model(curve, lam, wrong=False):
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    tau = numpyro.sample("tau", ScalePC(curve, sigma, lam))
    if wrong:  # drop the Jacobian r'(τ)/σ
        numpyro.factor("undo", -jnp.log(distance_curve_value(curve, tau, nu=1)))
    numpyro.deterministic("distance", distance_curve_value(curve, tau) / sigma)


def test_nuts_on_the_scale_prior_gives_exponential_distance(source):
    # hidden layers only: tanh saturates, r(τ) is clearly non-linear, so r'(τ) matters
    tp = transfer_parametrization(source, ["hidden_0", "hidden_1"])
    grid = np.linspace(0, 3.0, 48) ** 2
    r, _ = distance_curve(
        tp.predict_fn,
        tp.theta_source,
        tp.scales,
        jnp.asarray(source.reference_X[:300]),
        jnp.asarray(grid),
        key=jax.random.PRNGKey(0),
        n_eps=16,
    )
    curve = check_distance_curve(grid, np.asarray(r))
    slopes = np.diff(np.asarray(curve.r)) / np.diff(grid)
    assert slopes.max() / slopes.min() > 1.5, "test needs a visibly non-linear r(tau)"
    lam = 1.5
    good = _nuts_prior(_scale_prior_model, curve=curve, lam=lam)
    assert stats.kstest(good["distance"], "expon", args=(0, 1 / lam)).pvalue > KS_LEVEL
    bad = _nuts_prior(_scale_prior_model, curve=curve, lam=lam, wrong=True)
    assert stats.kstest(bad["distance"], "expon", args=(0, 1 / lam)).pvalue < KS_LEVEL


def test_distance_curve_interpolant_is_monotone_and_invertible():
    tau = np.linspace(0, 2, 9) ** 2
    r = np.sqrt(tau) + tau  # increasing, concave then linear
    curve = DistanceCurve(jnp.asarray(tau, jnp.float32), jnp.asarray(r, jnp.float32))
    fine = jnp.linspace(0, 6, 2001)  # beyond the grid end too
    vals = np.asarray(distance_curve_value(curve, fine))
    assert np.all(np.diff(vals) > 0)
    assert np.all(np.asarray(distance_curve_value(curve, fine, nu=1)) > 0)
    np.testing.assert_allclose(
        np.asarray(distance_curve_inverse(curve, jnp.asarray(vals))), np.asarray(fine), atol=2e-4
    )
    np.testing.assert_allclose(np.asarray(distance_curve_value(curve, tau)), r, rtol=1e-5)


def test_non_monotone_curve_warns_and_is_repaired():
    tau = np.array([0.0, 1.0, 2.0, 3.0])
    with pytest.warns(RuntimeWarning, match="not strictly increasing"):
        curve = check_distance_curve(tau, np.array([0.0, 1.0, 0.9, 2.0]))
    assert np.all(np.diff(np.asarray(curve.r)) > 0)
    with pytest.raises(ValueError, match="tau grid"):
        check_distance_curve(np.array([0.1, 1.0]), np.array([0.0, 1.0]))


@pytest.mark.parametrize("prior", ["last_layer", "scale"])
def test_hyperprior_on_U_gives_the_lognormal_mixture_of_exponentials(source, prior):
    # U ~ LogNormal(log U0, s²)  ⇒  λ = λ0 e^{-s z}, and P(d ≤ x) = E_z[1 − exp(−λ0 e^{−s z} x)]
    s, lam0 = 0.7, pc_rate(1.0, 0.05)
    model = pcbtl.PCTransferRegressor(source, prior=prior, U_log_sd=s, n_eps=8)
    d = model.prior_distance_samples(3000, seed=5)
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()

    def cdf(x):
        x = np.atleast_1d(x)[:, None]
        return np.sum(w * (1 - np.exp(-lam0 * np.exp(-s * z) * x)), axis=1)

    assert stats.kstest(d, cdf).pvalue > KS_LEVEL
    # ...and not the fixed-U exponential (the hyperprior changes the tail)
    assert stats.kstest(d, "expon", args=(0, 1 / lam0)).pvalue < KS_LEVEL


def test_nuts_with_the_U_hyperprior_keeps_rate_times_distance_exponential(source):
    reg = pcbtl.PCTransferRegressor(source, prior="last_layer", U_log_sd=0.7)
    kwargs = reg._model_kwargs(reg._setup(None))
    draws = _nuts_prior(pcbtl.models.last_layer_pc_model, num_samples=2000, thin=2, **kwargs)
    assert stats.kstest(draws["distance"] * draws["rate"], "expon").pvalue > KS_LEVEL
    with pytest.raises(ValueError, match="U_log_sd"):
        pcbtl.PCTransferRegressor(source, U_log_sd=-1.0)
