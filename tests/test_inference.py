"""Sampler diagnostics: ESS, split R-hat, depth-limit share and the SamplerWarning."""

from __future__ import annotations

import numpy as np
import pytest

from pcbtl.inference import Posterior, SamplerWarning, check_sampler, sampler_diagnostics


def _posterior(sigma, n_steps=None, method="nuts"):
    stats = {} if n_steps is None else {"n_steps": n_steps}
    return Posterior(samples={"sigma": sigma}, sample_stats=stats, method=method)


def test_independent_draws_pass_and_give_their_ess():
    # 2 × 400 iid draws: bulk ESS is ~800 (its sd is a few percent); R-hat ≈ 1 ± 0.01
    rng = np.random.default_rng(0)
    post = _posterior(1.0 + 0.1 * rng.standard_normal((2, 400)))
    diag = check_sampler(post)  # no warning: warnings are errors in this suite
    assert diag["draws"] == 800 and diag["worst"] == "sigma"
    assert 600 < diag["min_bulk_ess"] < 1000 and diag["min_tail_ess"] > 400
    assert abs(diag["max_rhat"] - 1.0) < 0.02
    assert np.isnan(diag["depth_limit_share"])


def test_a_random_walk_warns_and_names_the_parameter():
    # a random walk has ESS of a few draws whatever its length: far below 5 % of 400
    rng = np.random.default_rng(1)
    walk = 1.0 + 0.01 * np.cumsum(rng.standard_normal((1, 400)), axis=1)
    steps = np.where(np.arange(400) % 2 == 0, 255, 31)[None]
    with pytest.warns(SamplerWarning, match=r"'sigma'.*50% of the trees hit the depth limit"):
        diag = check_sampler(_posterior(walk, steps), max_tree_depth=8)
    assert diag["min_bulk_ess"] < 20 and diag["depth_limit_share"] == 0.5


def test_a_drifting_single_chain_is_caught_by_split_rhat():
    # iid draws plus a trend of 1 sd per 100 draws: plenty of ESS by lag, but the two halves
    # of the chain disagree (split R-hat ≫ 1.1)
    rng = np.random.default_rng(2)
    drift = rng.standard_normal((1, 400)) + np.linspace(0.0, 4.0, 400)
    with pytest.warns(SamplerWarning, match="split R-hat"):
        diag = check_sampler(_posterior(drift))
    assert diag["max_rhat"] > 1.1


def test_too_few_draws_are_reported_but_not_judged():
    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.standard_normal((1, 60)), axis=1) + np.linspace(0.0, 20.0, 60)
    diag = check_sampler(_posterior(walk))  # 60 < min_draws: no warning (errors here)
    assert diag["draws"] == 60 and diag["max_rhat"] > 1.1


def test_svi_draws_are_not_checked():
    post = _posterior(np.ones((1, 50)), method="svi")
    assert check_sampler(post) == {}
    with pytest.raises(ValueError, match="NUTS"):
        sampler_diagnostics(post)
