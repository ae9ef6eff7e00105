"""The tangent (linearised scale) PC model: collapsed likelihood, exact ε draws, exact prior,
agreement with the explicit model, and the estimator."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, Predictive
from scipy import stats as sps

import pcbtl
from pcbtl.inference import idata_group
from pcbtl.kl import distance_curve
from pcbtl.models import tangent_pc_model
from pcbtl.networks import transfer_parametrization
from pcbtl.tangent import (
    ensemble_parametrization,
    tangent_conditional_eps,
    tangent_jacobian,
    tangent_kappa,
    tangent_loglik,
    tangent_means,
    tangent_stats,
)

FAST = dict(num_warmup=300, num_samples=300, num_chains=2, progress_bar=False)


def _direct_loglik(J, u, tau, sigma):
    cov = sigma**2 * np.eye(len(u)) + tau**2 * J @ J.T
    return sps.multivariate_normal(np.zeros(len(u)), cov).logpdf(u)


@pytest.mark.parametrize("n,D", [(12, 30), (40, 7)])  # both routes: J Jᵀ and JᵀJ
def test_collapsed_loglik_is_the_gaussian_marginal(n, D):
    rng = np.random.default_rng(0)
    J = rng.standard_normal((n, D)) * np.geomspace(1, 0.05, D)
    u = rng.standard_normal(n)
    stats = tangent_stats(J, u)
    assert stats.ell.shape == (min(n, D),)
    for tau, sigma in [(0.0, 1.0), (0.3, 0.5), (2.0, 0.1), (5.0, 3.0)]:
        got = float(tangent_loglik(jnp.float32(tau), jnp.float32(sigma), stats))
        want = _direct_loglik(J, u, tau, sigma)
        # float32 statistics: 1e-4 relative on a log density of size ~n
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_conditional_eps_draws_have_the_exact_posterior_moments():
    # p(ε | u, τ, σ) for u = τ J ε + e: precision I + τ²JᵀJ/σ², mean τ Jᵀ(σ²I + τ²JJᵀ)⁻¹u
    rng = np.random.default_rng(1)
    n, D, tau, sigma = 8, 5, 0.7, 0.3
    J = rng.standard_normal((n, D))
    u = rng.standard_normal(n)
    stats = tangent_stats(J, u)
    S = 40000
    eps = tangent_conditional_eps(np.full(S, tau), np.full(S, sigma), stats, seed=3)
    prec = np.eye(D) + tau**2 * J.T @ J / sigma**2
    cov = np.linalg.inv(prec)
    mean = cov @ (tau * J.T @ u / sigma**2)
    se = np.sqrt(np.diag(cov) / S)
    # 5 standard errors per coordinate; covariance entries within 0.03 (their Monte Carlo sd
    # at S = 40,000 is below 0.01 for entries of size ≤ 1)
    assert np.all(np.abs(eps.mean(0) - mean) < 5 * se)
    assert np.max(np.abs(np.cov(eps.T) - cov)) < 0.03
    # the test has teeth: the prior (no shrinkage) is far off
    assert np.max(np.abs(np.eye(D) - cov)) > 0.3


def test_kappa_is_the_slope_of_the_monte_carlo_distance_curve_at_zero(source):
    # r(τ)/τ → κ as τ → 0 for the nonlinear network: the Monte Carlo curve of the scale prior
    # (an independent code path) at τ = 1e-3 agrees with κ to within its Monte Carlo error
    # (n_eps = 512 draws of ε over 300 inputs: relative se of r ≈ 2 %; 6 % is 3 se)
    tp = transfer_parametrization(source, "all")
    Xref = source.reference_X[:300]
    kappa = tangent_kappa(tp.predict_fn, tp.theta_source, tp.scales, Xref)
    r, _ = distance_curve(
        tp.predict_fn,
        tp.theta_source,
        tp.scales,
        jnp.asarray(Xref),
        jnp.asarray([1e-3]),
        key=jax.random.PRNGKey(0),
        n_eps=512,
    )
    assert float(r[0]) / 1e-3 == pytest.approx(kappa, rel=0.06)


def _independent_kappa(source, X):
    """κ from the full Jacobian of the Flax network w.r.t. its parameter tree (not the flat
    transfer vector), scaled by 1/sqrt(fan_in) per layer."""
    module = source.module
    Xs = (jnp.asarray(X) - source.x_mean) / source.x_scale
    params = jax.tree_util.tree_map(jnp.asarray, source.params)
    jac = jax.jacrev(lambda p: source.y_scale * module.apply({"params": p}, Xs)[:, 0])(params)
    total = 0.0
    for name, layer in jac.items():
        fan = source.params[name]["kernel"].shape[0]
        for a in layer.values():
            total += float(np.sum(np.asarray(a, np.float64) ** 2)) / fan
    return np.sqrt(total / X.shape[0])


@pytest.mark.parametrize("drop", [None, "sigma"])
def test_prior_draws_put_d_exponential(source, drop):
    """σ ~ HalfNormal, τ | σ ~ Exp(λκ/σ) from the NumPyro model; d recomputed with κ from an
    independent Jacobian (Flax parameter tree). KS at n = 4000 detects a 3 % change of scale;
    the test requires p > 0.01. Dropping σ from the rate (τ ~ Exp(λκ)) must fail (p < 1e-6)."""
    Xref = source.reference_X[:200]
    tp = transfer_parametrization(source, "all")
    kappa = tangent_kappa(tp.predict_fn, tp.theta_source, tp.scales, Xref)
    kappa_indep = _independent_kappa(source, Xref)
    assert kappa == pytest.approx(kappa_indep, rel=1e-4)
    rate, sigma_scale = pcbtl.pc_rate(1.0, 0.05), 0.7
    if drop is None:
        model = tangent_pc_model
    else:

        def model(kappa, rate, sigma_scale, stats=None, rate_log_sd=None):
            sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
            numpyro.sample("tau", dist.Exponential(rate * kappa))
            del sigma

    draws = Predictive(model, num_samples=4000)(
        jax.random.PRNGKey(0), kappa=kappa, rate=rate, sigma_scale=sigma_scale
    )
    d = kappa_indep * np.asarray(draws["tau"], np.float64) / np.asarray(draws["sigma"])
    p = sps.kstest(d, "expon", args=(0, 1 / rate)).pvalue
    if drop is None:
        assert p > 0.01
    else:
        assert p < 1e-6


def test_collapsed_sampler_agrees_with_the_explicit_tangent_model(source, task):
    """NUTS over (σ, τ, ε) of the explicit linear model against the collapsed (σ, τ) NUTS plus
    exact ε draws, on the last layer (17 weights): predictive means at 50 test inputs agree to
    within 0.1 posterior sd (Monte Carlo error of 2 × 400 draws with ESS ≥ 200 is ≈ 0.07 sd
    per point; the max over 50 points is compared at 0.25), and posterior sds within 20 %."""
    X, y = task.X_target, task.y_target
    est = pcbtl.PCTransferRegressor(
        source,
        prior="tangent",
        transfer_layers="last",
        num_warmup=400,
        num_samples=400,
        num_chains=2,
        progress_bar=False,
        seed=0,
    ).fit(X, y)
    g_collapsed = est._means(task.X_test[:50])

    setup = est._state
    tp, loc, scale = setup["tp"], *setup["affine"]
    J = jnp.asarray(tangent_jacobian(tp.predict_fn, tp.theta_source, tp.scales, X), jnp.float32)
    g0 = tp.predict_fn(tp.theta_source, jnp.asarray(X, jnp.float32))
    ys = jnp.asarray((y - loc) / scale, jnp.float32)

    def explicit():
        sigma = numpyro.sample("sigma", dist.HalfNormal(setup["sigma_scale"]))
        tau = numpyro.sample("tau", dist.Exponential(setup["rate"] * setup["kappa"] / sigma))
        eps = numpyro.sample("eps", dist.Normal(jnp.zeros(J.shape[1]), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(g0 + tau * J @ eps, sigma), obs=ys)

    mcmc = MCMC(
        NUTS(explicit),
        num_warmup=400,
        num_samples=400,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(1))
    s = mcmc.get_samples()
    g_explicit = loc + scale * tangent_means(
        tp.predict_fn, tp.theta_source, tp.scales, s["tau"], s["eps"], task.X_test[:50]
    )
    sd = g_collapsed.std(0)
    assert np.max(np.abs(g_collapsed.mean(0) - g_explicit.mean(0)) / sd) < 0.25
    assert np.all(np.abs(g_explicit.std(0) / sd - 1) < 0.2)


def test_estimator_recovers_a_tangent_target_and_mixes(source):
    # target = the source moved along its tangent space by one noise sd, plus noise
    rng = np.random.default_rng(5)
    tp = transfer_parametrization(source, "all")
    X = rng.standard_normal((400, source.n_features))
    eps = rng.standard_normal(tp.theta_source.shape[0])
    f = tangent_means(tp.predict_fn, tp.theta_source, tp.scales, [0.05], eps[None], X)[0]
    f = source.predict(X) + (f - source.predict(X)) * 0.2 / np.std(f - source.predict(X))
    y = f + 0.2 * rng.standard_normal(len(f))
    est = pcbtl.PCTransferRegressor(source, prior="tangent", **FAST).fit(X[:150], y[:150])
    lo, hi = est.predict_interval(X[150:])
    cover = np.mean((y[150:] >= lo) & (y[150:] <= hi))
    # 250 points: binomial sd 0.014; [0.88, 0.99] leaves 5 sds below
    assert 0.88 <= cover <= 0.99
    rmse = np.sqrt(np.mean((est.predict(X[150:]) - f[150:]) ** 2))
    assert rmse < 0.5 * np.sqrt(np.mean((source.predict(X[150:]) - f[150:]) ** 2))
    diag = est.sampler_diagnostics_
    # a two-dimensional posterior: R-hat far from any threshold, no divergence
    assert diag["max_rhat"] < 1.03 and diag["prediction_max_rhat"] < 1.03
    assert diag["divergences"] == 0
    posterior = idata_group(est.idata_, "posterior")
    assert "eps" not in posterior and posterior["tau"].shape == (2, 300)
    assert est.kappa_ > 0 and est._state["stats"] is None  # the D × k basis is not kept
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.predict(X[150:]), est.predict(X[150:]), rtol=1e-6)


def test_tangent_prior_distance_samples_and_arguments(task, source):
    est = pcbtl.PCTransferRegressor(source, prior="tangent", U=2.0, alpha=0.1)
    d = est.prior_distance_samples(4000, seed=1)
    assert sps.kstest(d, "expon", args=(0, 1 / pcbtl.pc_rate(2.0, 0.1))).pvalue > 0.01
    with pytest.raises(ValueError, match="transfer_layers"):
        pcbtl.PCTransferRegressor(source, prior="tangent", transfer_layers="nope").fit(
            task.X_target, task.y_target
        )


@pytest.fixture(scope="module")
def second_source(task):
    """The source's architecture from another seed, on labels shifted by 0.3 (so that the
    members' average differs clearly from either)."""
    return pcbtl.train_source(
        task.X_source,
        task.y_source + 0.3,
        hidden=(16, 16),
        seed=1,
        max_epochs=60,
        progress_bar=False,
    )


def test_ensemble_parametrization_is_the_averaged_network(task, source, second_source):
    """The ensemble's network is the members' average, its tangent features are the members'
    side by side divided by M, so its κ² is the members' mean squared norms over M²."""
    X = task.X_test[:30]
    tps = [transfer_parametrization(s, 2) for s in (source, second_source)]
    ens = ensemble_parametrization(tps)
    assert ens.theta_source.shape == (2 * tps[0].theta_source.shape[0],)
    got = np.asarray(ens.predict_fn(ens.theta_source, jnp.asarray(X, jnp.float32)))
    want = 0.5 * (source.predict(X) + second_source.predict(X))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    J = tangent_jacobian(ens.predict_fn, ens.theta_source, ens.scales, X)
    blocks = [tangent_jacobian(tp.predict_fn, tp.theta_source, tp.scales, X) for tp in tps]
    np.testing.assert_allclose(J, 0.5 * np.hstack(blocks), rtol=1e-4, atol=1e-6)
    kappa = tangent_kappa(ens.predict_fn, ens.theta_source, ens.scales, X)
    k1, k2 = (tangent_kappa(tp.predict_fn, tp.theta_source, tp.scales, X) for tp in tps)
    assert kappa == pytest.approx(np.sqrt((k1**2 + k2**2) / 4), rel=1e-4)
    assert ensemble_parametrization(tps[:1]) is tps[0]
    with pytest.raises(ValueError, match="architecture"):
        ensemble_parametrization([tps[0], transfer_parametrization(source, 1)])


def test_estimator_with_an_ensemble_moves_from_the_averaged_source(task, source, second_source):
    """With a prior that pins d near 0 (U = 0.01) the posterior mean is the base model: the
    average of the two sources, not the first one; the fit mixes and pickles."""
    X, y = task.X_target, task.y_target
    Xt = task.X_test[:100]
    est = pcbtl.PCTransferRegressor(
        source, prior="tangent", transfer_layers=2, ensemble=[second_source], U=0.01, **FAST
    ).fit(X, y)
    avg = 0.5 * (source.predict(Xt) + second_source.predict(Xt))
    gap = np.sqrt(np.mean((source.predict(Xt) - avg) ** 2))
    assert gap > 0.1  # the test has teeth: the members differ
    rms = np.sqrt(np.mean((est.predict(Xt) - avg) ** 2))
    assert rms < 0.2 * gap
    assert est.sampler_diagnostics_["prediction_max_rhat"] < 1.03
    # the collapsed likelihood's residuals are measured from the average: ‖u‖² = ‖c‖² + ρ
    loc, scale = est.y_affine_
    stats = est._setup(X, (y - loc) / scale, affine=(loc, scale))["stats"]
    total = float(np.sum(np.asarray(stats.c, np.float64) ** 2) + float(stats.rho))
    u_avg = (y - 0.5 * (source.predict(X) + second_source.predict(X))) / scale
    u_first = (y - source.predict(X)) / scale
    assert total == pytest.approx(float(np.sum(u_avg**2)), rel=1e-3)
    assert abs(total - float(np.sum(u_first**2))) > 0.05 * total
    one = transfer_parametrization(source, 2).theta_source.shape[0]
    assert est._state["tp"].theta_source.shape == (2 * one,)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.predict(Xt), est.predict(Xt), rtol=1e-6)
    with pytest.raises(ValueError, match="ensemble"):
        pcbtl.PCTransferRegressor(source, prior="scale", ensemble=[second_source]).fit(X, y)
    with pytest.raises(ValueError, match="ensemble"):
        pcbtl.PCTransferRegressor(source, prior="tangent", ensemble=[object()]).fit(X, y)
