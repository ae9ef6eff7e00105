"""HurdleRegressor: point mass at zero plus a truncated Bayesian regression."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import pcbtl


def _zero_inflated(n, seed):
    """π(x) = logistic(3x₀); positive part y = 2 + x₁ + 0.3 e, truncated at 0 (rarely active)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    pi = 1 / (1 + np.exp(-3 * X[:, 0]))
    y = np.maximum(2 + X[:, 1] + 0.3 * rng.standard_normal(n), 0.01)
    y[rng.uniform(size=n) < pi] = 0.0
    return X, y, pi


@pytest.fixture(scope="module")
def hurdle(source):
    X, y, _ = _zero_inflated(600, 0)
    reg = pcbtl.BayesianNetworkRegressor(
        hidden=(8,), num_warmup=200, num_samples=200, progress_bar=False
    )
    return pcbtl.HurdleRegressor(reg, LogisticRegression()).fit(X, y)


def test_hurdle_predictions_are_calibrated(hurdle):
    X, y, pi = _zero_inflated(2000, 1)
    lo, hi = hurdle.predict_interval(X)
    # 2,000 test points: binomial sd of a calibrated 95% coverage is 0.005; allow 0.92-0.98
    cover = np.mean((y >= lo) & (y <= hi))
    assert 0.92 <= cover <= 0.98
    assert np.all(lo >= 0) and np.all(lo <= hi)
    p0 = hurdle.predict_proba_zero(X)
    assert np.corrcoef(p0, pi)[0, 1] > 0.9
    # the lower end is exactly 0 where the zero mass exceeds 2.5 %
    np.testing.assert_array_equal(lo[p0 >= 0.03], 0.0)
    med = hurdle.predict(X)
    np.testing.assert_array_equal(med[p0 > 0.5], 0.0)
    assert np.all(med[p0 < 0.45] > 0)
    # the median beats the mean for absolute error on zero-inflated data
    hurdle.point = "mean"
    mean, sd = hurdle.predict(X, return_std=True)
    hurdle.point = "median"
    assert np.mean(np.abs(med - y)) < np.mean(np.abs(mean - y))
    assert np.all(sd > 0)


def test_hurdle_quantiles_match_predictive_draws(hurdle):
    X, _, _ = _zero_inflated(5, 2)
    lo, hi = hurdle.predict_interval(X, level=0.8)
    draws = np.concatenate([hurdle.sample_posterior_predictive(X, seed=s) for s in range(50)])
    # 10,000 draws per point: the empirical quantile's sd is below 0.01 in these units
    emp_hi = np.quantile(draws, 0.9, axis=0)
    np.testing.assert_allclose(hi, emp_hi, atol=0.06)
    emp_zero = np.mean(draws == 0, axis=0)
    np.testing.assert_allclose(emp_zero, hurdle.predict_proba_zero(X), atol=0.03)


def test_hurdle_rejects_bad_targets(source):
    X, y, _ = _zero_inflated(50, 3)
    reg = pcbtl.BayesianNetworkRegressor(
        hidden=(4,), num_warmup=10, num_samples=10, progress_bar=False
    )
    model = pcbtl.HurdleRegressor(reg)
    with pytest.raises(ValueError, match="non-negative"):
        model.fit(X, y - 1.0)
    with pytest.raises(ValueError, match="zero and 2 positive"):
        model.fit(X, np.zeros(50))
    with pytest.raises(ValueError, match="point"):
        pcbtl.HurdleRegressor(reg, point="mode").fit(X, y)
    assert not hasattr(model, "regressor_")
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(X)
