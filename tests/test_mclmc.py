"""pcbtl.inference.run_mclmc: exactness on known targets, shapes, arguments, the estimator path."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import pcbtl
from pcbtl.inference import rhat_ess, run_mclmc


def _known_model(scales):
    # x_j ~ N(1, scales_j²) (badly scaled on purpose: the tuned preconditioner must cope) and a
    # positive site tau ~ Exponential(1), sampled as log tau: its Jacobian must be in the density
    numpyro.sample("x", dist.Normal(1.0, scales).to_event(1))
    numpyro.sample("tau", dist.Exponential(1.0))


SCALES = np.array([0.05, 0.3, 1.0, 3.0, 10.0], np.float32)


@pytest.fixture(scope="module")
def known():
    return run_mclmc(
        _known_model,
        {"scales": SCALES},
        num_warmup=2000,
        num_samples=400,
        thin=10,
        num_chains=4,
        seed=0,
        init_steps=0,
    )


def test_mclmc_recovers_a_known_target(known):
    x = known.flat("x")
    tau = known.flat("tau")
    assert x.shape == (1600, 5) and tau.shape == (1600,)
    _, ess_x, _ = rhat_ess(known.samples["x"])
    _, ess_tau, _ = rhat_ess(known.samples["tau"][..., None])
    # means within 5 Monte Carlo standard errors (se = sd/sqrt(bulk ESS), floored at 100 draws);
    # the unadjusted sampler's bias at the tuned energy error is far below that here
    se_x = SCALES / np.sqrt(np.maximum(ess_x, 100))
    assert np.all(np.abs(x.mean(0) - 1.0) < 5 * se_x)
    # sds within 15 %: a preconditioner stuck at one scale or a wrong step size shows up first
    # in the widest and narrowest coordinates
    assert np.all(np.abs(x.std(0) / SCALES - 1.0) < 0.15)
    # tau ~ Exp(1): mean 1 and P(tau < 1) = 0.632; dropping the Jacobian of tau = e^u gives a
    # density ∝ exp(-e^u) in u, whose tau piles up near 0 (mean of tau far below 1)
    se_tau = 1.0 / np.sqrt(max(float(ess_tau[0]), 100.0))
    assert abs(tau.mean() - 1.0) < 5 * se_tau
    assert abs(np.mean(tau < 1.0) - (1 - np.exp(-1.0))) < 5 * 0.49 * se_tau
    assert known.method == "mclmc"
    assert known.sample_stats["step_size"].shape == (4, 400)


def test_mclmc_chains_start_apart_and_agree(known):
    rhat, _, _ = rhat_ess(known.samples["x"])
    assert np.all(rhat < 1.05)  # well-mixed on this target: 1.05 against a typical 1.00-1.01
    # the chains are different chains (own starts, own keys)
    assert not np.allclose(known.samples["x"][0], known.samples["x"][1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(thin=0), "thin"),
        (dict(num_chains=1.5), "num_chains"),
        (dict(init_steps=-1), "init_steps"),
        (dict(desired_energy_var=0.0), "desired_energy_var"),
        (dict(init_jitter=float("nan")), "init_jitter"),
    ],
)
def test_mclmc_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_mclmc(_known_model, {"scales": SCALES}, **kwargs)


def test_mclmc_needs_two_parameters():
    def one(_=None):
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="two unconstrained"):
        run_mclmc(one, {}, num_warmup=10, num_samples=2, thin=1, num_chains=1)


@pytest.mark.slow  # a statistical agreement of two samplers (35 s)
def test_scale_prior_with_mclmc_agrees_with_nuts(task, source):
    # the same posterior sampled by NUTS (non-centred) and MCLMC (centred, from separate
    # starts): posterior means of the mean function agree to 0.05 RMS (Monte Carlo error of each
    # ≲ 0.01 here, posterior sds ≲ 0.1; labels spread ~1), and MCLMC's draws come with the
    # chain dimension, diagnostics and ArviZ groups of a NUTS fit
    opts = dict(prior="scale", transfer_layers="last", max_reference=400, n_tau=24, n_eps=8)
    fast = dict(num_warmup=200, num_samples=200, num_chains=2, progress_bar=False)
    nuts = pcbtl.PCTransferRegressor(source, inference="nuts", **opts, **fast)
    mclmc = pcbtl.PCTransferRegressor(source, inference="mclmc", thin=10, **opts, **fast)
    nuts.fit(task.X_target, task.y_target)
    mclmc.fit(task.X_target, task.y_target)
    gap = np.sqrt(np.mean((nuts.predict(task.X_test) - mclmc.predict(task.X_test)) ** 2))
    assert gap < 0.05
    assert mclmc.posterior_.method == "mclmc"
    assert "theta" in mclmc.posterior_.samples  # the centred parametrization under MCLMC
    assert mclmc.idata_.posterior["tau"].values.shape == (2, 200)
    diag = mclmc.sampler_diagnostics_
    assert diag["chains"] == 2 and np.isfinite(diag["prediction_max_rhat"])
    assert np.median(mclmc.sigma_draws_) == pytest.approx(np.median(nuts.sigma_draws_), rel=0.2)
