"""The PC priors: rate, closed-form density, and d ~ Exp(λ) under the prior.

Kolmogorov–Smirnov tests use fixed seeds and reject at p < 0.01: a correct construction fails
one such test with probability 0.01 for a random seed, and with the seeds fixed the outcome is
reproducible. NUTS draws are thinned to near-independence before the test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import integrate, interpolate, special, stats

import pcbtl
from pcbtl import kl
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


def test_last_layer_prior_distance_samples_are_exponential(source):
    # d is recomputed from the predictions Φ̃β of the drawn heads, not from the d that was drawn
    model = pcbtl.PCTransferRegressor(source, prior="last_layer", U=0.5, alpha=0.1)
    d = model.prior_distance_samples(3000, seed=3)
    lam = pc_rate(0.5, 0.1)
    assert stats.kstest(d, "expon", args=(0, 1 / lam)).pvalue > KS_LEVEL


def _fresh_distances(tp, X_ref, tau, sigma, key, n_eps):
    r"""``d_i = sqrt(2 KL(τ_i, σ_i))`` by a fresh Monte Carlo at each draw, with its own ``ε``.

    ``KL = E_ε mean_x KL(N(g(x; θ_S + τ s⊙ε), σ²) || N(g_S(x), σ²))`` by
    :func:`pcbtl.kl.mc_network_kl` — the definition of DESIGN.md §2 (b), through neither the
    grid of ``r(τ)``, nor its interpolant, nor :func:`pcbtl.kl.distance_curve`.
    """
    X_ref = jnp.asarray(X_ref)

    def one(args):
        k, t, s = args
        per_x = lambda a, b: kl.gaussian_kl(a, s, b, s)  # noqa: E731
        est = kl.mc_network_kl(
            k, tp.predict_fn, tp.theta_source, tp.scales, X_ref, t, per_x, n_eps=n_eps
        )
        return jnp.sqrt(2.0 * est.mean)

    keys = jax.random.split(key, tau.shape[0])
    run = jax.jit(lambda ks, ts, ss: jax.lax.map(one, (ks, ts, ss), batch_size=250))
    return np.asarray(run(keys, tau, sigma), np.float64)


def test_scale_prior_distances_recomputed_by_fresh_monte_carlo_are_exponential(source):
    """Draw ``(σ, τ)`` from the scale prior the estimator builds, recompute ``d`` independently of
    its curve ``r̂`` and test ``d ~ Exp(λ)`` (KS, p > 0.01); the same test on a prior built from a
    curve scaled by 1.3 must fail decisively.

    Tolerance. Two Monte Carlo errors inflate the KS statistic beyond its nominal 1 % false-alarm
    rate. (i) The prior is exact for the curve ``r̂``, which carries the error of its ``n_eps``
    common draws: a near-constant relative error ``η`` of ``r``, i.e. ``d ~ Exp(λ)·(1 + η)``, with
    sd ``c/(2√n_eps)``, where ``c ≈ 0.65`` is the coefficient of variation over ``ε`` of the mean
    squared change of ``g`` for this network (measured with :func:`pcbtl.kl.distance_curve`'s
    standard error). (ii) Each recomputed ``d_i`` has an independent error of relative sd
    ``c/(2√16)`` ≈ 0.08, which only blurs the distribution (second order). Simulated with these
    sizes (exponential draws times both errors, 2,000 replicates of n = 2,000): the rejection
    rate at p < 0.01 is 0.9 % exact, 2.0 % with both errors at ``n_eps = 1024``, and about 25 %
    with the estimator's default ``n_eps = 32`` (η sd ≈ 6 %) — measured, that curve gives
    p ≈ 1e-6 here for three seeds, so the curve here uses 1024 draws (p = 0.62, 0.68, 0.71 for
    seeds 3, 4, 5). The same simulation rejects a curve off by 10 % in 63 % of replicates and by
    15 % in 97 % (here: ×1.1 gives p = 0.006); the corrupted curve (×1.3) gives p ≈ 1e-17.
    """
    U, alpha, n = 0.5, 0.1, 2000
    lam = pc_rate(U, alpha)
    reg = pcbtl.PCTransferRegressor(
        source,
        prior="scale",
        U=U,
        alpha=alpha,
        n_eps=1024,
        n_tau=32,
        reference_X=source.reference_X[:100],  # Q: these 100 rows, for the curve and the check
    )
    setup = reg._setup(None)
    curve, tp = setup["curve"], setup["tp"]
    k_sigma, k_tau, k_check = jax.random.split(jax.random.PRNGKey(3), 3)
    sigma = setup["sigma_scale"] * jnp.abs(jax.random.normal(k_sigma, (n,)))

    def pvalue(c):
        tau = ScalePC(c, sigma, lam).sample(k_tau)
        d = _fresh_distances(tp, setup["Xref"], tau, sigma, k_check, n_eps=16)
        return stats.kstest(d, "expon", args=(0, 1 / lam)).pvalue

    assert pvalue(curve) > KS_LEVEL
    assert pvalue(DistanceCurve(curve.tau, 1.3 * curve.r)) < 1e-8


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


@pytest.mark.parametrize(
    "tau,r",
    [
        (
            np.linspace(0, 3, 12) ** 2,
            np.sqrt(np.linspace(0, 3, 12) ** 2) + 0.2 * np.linspace(0, 3, 12) ** 4,
        ),
        (np.array([0.0, 0.1, 0.15, 1.0, 1.2, 3.0]), np.array([0.0, 0.5, 0.6, 0.61, 2.0, 2.2])),
        (np.array([0.0, 1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 1.0, 0.5, 2.0])),  # flat, dip
        (np.array([0.0, 2.0]), np.array([0.0, 3.0])),  # two knots: a straight line
    ],
)
def test_distance_curve_interpolant_is_scipy_pchip(tau, r):
    # value and derivative of the pure-jnp interpolant against SciPy's PchipInterpolator
    # (Fritsch & Butland slopes, Moler's end slopes), on the grid and between its knots
    curve = DistanceCurve(jnp.asarray(tau), jnp.asarray(r))
    ref = interpolate.PchipInterpolator(tau, r)
    q = np.linspace(0.0, tau[-1], 997)
    for nu in (0, 1):
        got = np.asarray(distance_curve_value(curve, jnp.asarray(q), nu=nu))
        np.testing.assert_allclose(got, ref(q, nu), rtol=2e-5, atol=2e-5 * np.abs(r).max())


def _synthetic_curve():
    """A clearly non-linear increasing ``r(τ)``: slope 2 at 0, ≈ 0.5 near τ = 1.5, 2.6 at τ = 4."""
    tau = 4.0 * np.linspace(0, 1, 40) ** 2
    r = 2.0 * np.tanh(tau) + 0.3 * tau**2
    return DistanceCurve(jnp.asarray(tau, jnp.float32), jnp.asarray(r, jnp.float32))


class _NoJacobianScalePC(ScalePC):
    """The bug to catch: π(τ | σ) ∝ λ e^{−λ r̂(τ)/σ}/σ without the Jacobian r̂′(τ)."""

    def log_prob(self, value):
        return super().log_prob(value) - jnp.log(distance_curve_value(self.curve, value, nu=1))


def test_scale_prior_density_integrates_to_its_push_forward_cdf():
    # d = r̂(τ)/σ ~ Exp(λ)  ⇔  P(τ ≤ t | σ) = 1 − exp(−λ r̂(t)/σ). The cumulative integral of
    # exp(log_prob) must reproduce it (checks the Jacobian r̂′ against r̂ itself); tolerance 1e-4
    # over a trapezoid error of ~h² max|π″|/12 ≈ 1e-7 (h = 1e-4 · t_end) and float32 rounding
    curve, sigma, lam = _synthetic_curve(), 0.7, 1.5
    t_end = float(distance_curve_inverse(curve, 30.0 * sigma / lam))  # P(τ > t_end) = e^{−30}
    t = np.linspace(0.0, t_end, 10001)
    good = np.exp(np.asarray(ScalePC(curve, sigma, lam).log_prob(jnp.asarray(t)), np.float64))
    cdf = 1.0 - np.exp(-lam * np.asarray(distance_curve_value(curve, jnp.asarray(t))) / sigma)
    np.testing.assert_allclose(integrate.cumulative_trapezoid(good, t, initial=0.0), cdf, atol=1e-4)
    bad = np.exp(np.asarray(_NoJacobianScalePC(curve, sigma, lam).log_prob(jnp.asarray(t))))
    assert abs(np.trapezoid(bad, t) - 1.0) > 0.1  # without r̂′ the density is not one
    # and the sampler (bisection inverse of r̂) draws from that distribution
    draws = np.asarray(ScalePC(curve, sigma, lam).sample(jax.random.PRNGKey(8), (4000,)))
    assert stats.kstest(draws, lambda x: np.interp(x, t, cdf)).pvalue > KS_LEVEL


_X64_SCRIPT = """
import json, sys, warnings
import jax, jax.numpy as jnp, numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density
import pcbtl
from pcbtl.kl import distance_curve
from pcbtl.models import scale_pc_model
from pcbtl.networks import transfer_parametrization
from pcbtl.priors import (
    DistanceCurve, ScalePC, check_distance_curve, distance_curve_inverse, distance_curve_value,
)
assert jnp.zeros(1).dtype == jnp.float64, "x64 is not on"
out = {}
tau = np.linspace(0, 2, 9) ** 2
r = np.sqrt(tau) + tau


@jax.jit
def check(curve, key):
    prior = ScalePC(curve, 0.5, 2.0)
    draws = prior.sample(key, (2000,))
    lp, grad = jax.vmap(jax.value_and_grad(prior.log_prob))(draws)
    x = jnp.linspace(0.0, 8.0, 101)
    back = distance_curve_value(curve, distance_curve_inverse(curve, x))
    finite = jnp.all(jnp.isfinite(lp)) & jnp.all(jnp.isfinite(grad))
    rate_d = 2.0 * distance_curve_value(curve, draws) / 0.5
    return draws.dtype == jnp.float64, finite, jnp.mean(rate_d), jnp.max(jnp.abs(back - x))


for dt in ("float32", "float64"):  # a curve built without x64, and one built with it
    curve = DistanceCurve(jnp.asarray(tau, dt), jnp.asarray(r, dt))
    is64, finite, mean_rate_d, roundtrip = check(curve, jax.random.PRNGKey(0))
    out[dt] = dict(
        float64=bool(is64), finite=bool(finite), mean_rate_d=float(mean_rate_d),
        roundtrip=float(roundtrip),
    )
source = pcbtl.SourceModel.load(sys.argv[1])
task = pcbtl.make_synthetic_task(n_source=10, n_target=40, n_test=20, n_features=3, seed=1)
# the NumPyro model as NUTS sees it: log density and its gradient at a prior draw
tp = transfer_parametrization(source, "all")
grid = 4.0 * np.linspace(0, 1, 16) ** 2
r_grid, _ = distance_curve(
    tp.predict_fn, tp.theta_source, tp.scales, jnp.asarray(source.reference_X[:200]),
    jnp.asarray(grid), key=jax.random.PRNGKey(1), n_eps=4,
)
kwargs = dict(
    predict_fn=tp.predict_fn, theta_source=tp.theta_source, scales=tp.scales,
    curve=check_distance_curve(grid, np.asarray(r_grid)), rate=3.0, sigma_scale=1.0,
    X=jnp.asarray(task.X_target), y=jnp.asarray(task.y_target),
)
trace = handlers.trace(handlers.seed(scale_pc_model, 2)).get_trace(**kwargs)
params = {k: v["value"] for k, v in trace.items() if v["type"] == "sample" and not v["is_observed"]}
logp, grad = jax.jit(jax.value_and_grad(lambda p: log_density(scale_pc_model, (), kwargs, p)[0]))(
    params
)
out["model"] = dict(
    dtype=str(logp.dtype),
    finite=bool(jnp.isfinite(logp))
    and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad)),
)
if "fit" in sys.argv[2:]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = pcbtl.PCTransferRegressor(
            source, prior="scale", n_eps=4, n_tau=16, max_reference=200, max_tree_depth=6,
            num_warmup=40, num_samples=20, num_chains=1, progress_bar=False,
        ).fit(task.X_target, task.y_target)
    out["fit"] = dict(
        tau_dtype=str(np.asarray(reg.posterior_.samples["tau"]).dtype),
        finite=bool(np.all(np.isfinite(reg.predict(task.X_test))))
        and bool(np.all(np.isfinite(reg.distance_))),
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
    )
print("RESULT" + json.dumps(out))
"""


def _run_with_x64(source, tmp_path, *args):
    """Run :data:`_X64_SCRIPT` with ``JAX_ENABLE_X64=1`` in its own process (the suite runs in
    float32, and JAX's precision is process-wide) on the session's source network."""
    path = source.save(tmp_path / "source.npz")
    env = dict(os.environ, JAX_ENABLE_X64="1")
    root = str(Path(pcbtl.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _X64_SCRIPT, str(path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.slow  # a float64 subprocess (25 s); opt-in
def test_scale_prior_and_model_work_with_float64(source, tmp_path):
    """With ``JAX_ENABLE_X64=1`` the scale prior's density, gradient, sampler and inverse work
    for float32 and float64 curves, and the NumPyro model's potential and gradient are finite
    float64; interpax's PCHIP raised "cond branches must have equal output types" here."""
    out = _run_with_x64(source, tmp_path)
    for dt in ("float32", "float64"):
        res = out[dt]
        assert res["float64"] and res["finite"], res
        assert res["roundtrip"] < 1e-9, res  # computed in float64 either way
        # λ d ~ Exp(1): mean 1, sd of the mean of 2,000 draws 0.022
        assert abs(res["mean_rate_d"] - 1.0) < 0.1, res
    assert out["model"] == {"dtype": "float64", "finite": True}


@pytest.mark.slow
def test_scale_prior_fit_runs_with_float64(source, tmp_path):
    # a whole (tiny) NUTS fit under x64: 40–80 s on a busy 2-core machine, mostly compilation
    fit = _run_with_x64(source, tmp_path, "fit")["fit"]
    assert fit["tau_dtype"] == "float64" and fit["finite"], fit


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
    with pytest.raises(ValueError, match="U_log_sd"):  # checked at use, as scikit-learn wants
        pcbtl.PCTransferRegressor(source, U_log_sd=-1.0).prior_distance_samples(10)
