"""HurdleRegressor: point mass at zero plus a truncated Bayesian regression."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm, truncnorm
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import pcbtl
from pcbtl.estimators.base import PosteriorRegressor
from pcbtl.estimators.hurdle import zero_classifier
from pcbtl.predictive import hurdle_quantiles, truncated_normal_log_sf, truncated_normal_moments


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


def testhurdle_quantiles_match_predictive_draws(hurdle):
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
    with pytest.raises(NotFittedError, match="not fitted"):
        model.predict(X)


# ---------------------------------------------------------------------------------------------
# Numerics of the truncated normal far in the tail (g ≪ −σ) and in ordinary cases
# ---------------------------------------------------------------------------------------------

#: Reference values for Z ~ N(0, 1) truncated to Z > α (Y = σ(Z − α) is N(−ασ, σ²) on (0, ∞)),
#: computed with mpmath at 50 significant digits (``test_references_agree_with_mpmath`` recomputes
#: them when mpmath is installed): E[Z − α | Z > α], Var[Z | Z > α], and the quantiles of Z − α.
_TAIL_REFERENCE = {
    30.0: dict(
        mean=0.033259667433677037,
        var=0.001103771511890091,
        q={0.025: 0.00084298052721295739, 0.5: 0.023070467827310753, 0.975: 0.12257661178731738},
    ),
    100.0: dict(
        mean=0.0099980009992607052,
        var=9.994004994826345e-5,
        q={0.025: 0.00025315244925970312, 0.5: 0.0069305387524294142, 0.975: 0.036878308078925496},
    ),
}


def _mpmath_reference(alpha: float, probs) -> dict:
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    a = mp.mpf(alpha)
    lam = mp.npdf(a) / mp.ncdf(-a)
    out = dict(mean=float(lam - a), var=float(1 - lam * (lam - a)), q={})
    log_q0 = mp.log(mp.ncdf(-a))
    for p in probs:
        target = mp.log(1 - mp.mpf(p))
        lo, hi = mp.mpf(0), mp.mpf(abs(alpha) + 20)
        for _ in range(200):  # bisection on log S(t) = log Q(α + t) − log Q(α)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mp.log(mp.ncdf(-(a + mid))) - log_q0 > target else (lo, mid)
        out["q"][p] = float(lo)
    return out


def test_references_agree_with_mpmath():
    for alpha, ref in _TAIL_REFERENCE.items():
        fresh = _mpmath_reference(alpha, ref["q"])
        np.testing.assert_allclose(fresh["mean"], ref["mean"], rtol=1e-15)
        np.testing.assert_allclose(fresh["var"], ref["var"], rtol=1e-15)
        for p, q in ref["q"].items():
            np.testing.assert_allclose(fresh["q"][p], q, rtol=1e-15)


@pytest.mark.parametrize("alpha", [30.0, 100.0])
@pytest.mark.parametrize("sd", [0.3, 1.7])
def test_truncated_mean_far_in_the_tail(alpha, sd):
    ref = _TAIL_REFERENCE[alpha]
    m, v = truncated_normal_moments(-alpha * sd, sd)
    assert m > 0 and v > 0
    # float64 throughout, every term positive (no cancellation): agree to rounding
    np.testing.assert_allclose(m, sd * ref["mean"], rtol=1e-13)
    np.testing.assert_allclose(v, sd**2 * ref["var"], rtol=1e-13)
    # and with the asymptotic expansion E = σ(1/α − 2/α³ + 10/α⁵ − 74/α⁷ + …) of the mean of
    # N(g, σ²) truncated to (0, ∞), g = −ασ: the remainder of this alternating series is below
    # the first omitted term, 74σ/α⁷ (1.0e−7 relative at α = 30); allow twice that
    series = sd * (1 / alpha - 2 / alpha**3 + 10 / alpha**5)
    assert abs(m - series) < 2 * 74 * sd / alpha**7
    # leading order: σ²/|g| = σ/α, the mean of the exponential limit (relative error 2/α²)
    np.testing.assert_allclose(m, sd / alpha, rtol=2.5 / alpha**2)


def test_truncated_moments_in_ordinary_cases():
    # g/σ from far above 0 through the switch to the continued fraction at α = 4, against SciPy
    # (accurate here: no underflow for α ≤ 8); both float64, so agree to ~1e−13
    alpha = np.array([-40.0, -8.0, -3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.99, 4.0, 4.01, 6.0, 8.0])
    sd = np.linspace(0.2, 2.0, alpha.size)
    m, v = truncated_normal_moments(-alpha * sd, sd)
    ref = truncnorm(alpha, np.inf, loc=-alpha * sd, scale=sd)
    np.testing.assert_allclose(m, ref.mean(), rtol=1e-11)
    np.testing.assert_allclose(v, ref.var(), rtol=1e-10)
    # very deep and very high: finite, positive, exponential limit σ/α and σ²/α²
    m, v = truncated_normal_moments([-1e4, -1e8, 1e8], 1.0)
    np.testing.assert_allclose(m, [1e-4, 1e-8, 1e8], rtol=1e-7)
    np.testing.assert_allclose(v, [1e-8, 1e-16, 1.0], rtol=1e-7)


def _quantiles(means, sds, pi, probs) -> np.ndarray:
    return np.asarray(
        hurdle_quantiles(
            jnp.asarray(means, jnp.float32),
            jnp.asarray(sds, jnp.float32),
            jnp.asarray(pi, jnp.float32),
            jnp.asarray(probs, jnp.float32),
        ),
        np.float64,
    )


@pytest.mark.parametrize("alpha", [30.0, 100.0])
def test_truncated_quantiles_far_in_the_tail(alpha):
    ref = _TAIL_REFERENCE[alpha]
    probs = np.array(list(ref["q"]))
    sd = 0.7
    q = _quantiles(np.full((1, 1), -alpha * sd), [sd], [0.0], probs)[:, 0]
    assert np.all(np.isfinite(q)) and np.all(q > 0)
    # float32 kernel: the log-space survival function is good to ~1e−6 relative (measured
    # ≤ 1e−5 on the lower quantile); allow 1e−4
    np.testing.assert_allclose(q, sd * np.array(list(ref["q"].values())), rtol=1e-4)


def test_truncated_quantiles_in_ordinary_cases():
    # one draw, one column per g/σ, against SciPy's truncnorm (float64); float32 kernel
    alpha = np.array([-6.0, -2.0, -0.5, 0.0, 1.0, 3.0, 6.0])
    sd = 1.3
    probs = np.array([0.025, 0.1, 0.5, 0.9, 0.975])
    q = _quantiles((-alpha * sd)[None, :], [sd], np.zeros(alpha.size), probs)
    ref = truncnorm.ppf(probs[:, None], alpha, np.inf, loc=-alpha * sd, scale=sd)
    np.testing.assert_allclose(q, ref, rtol=1e-4)


def testhurdle_quantiles_of_a_mixture():
    # draws from far below 0 to far above, several noise sds, and the point mass π at 0
    rng = np.random.default_rng(0)
    S, n = 40, 6
    sds = rng.uniform(0.2, 1.0, S)
    alpha = np.array([100.0, 30.0, 5.0, 0.0, -2.0, -30.0])  # per column, jittered per draw
    alpha = alpha + rng.normal(0.0, 0.3 + 0.05 * np.abs(alpha), (S, n))
    means = -alpha * sds[:, None]
    pi = np.array([0.0, 0.2, 0.01, 0.5, 0.3, 0.9])
    probs = np.array([0.025, 0.5, 0.975])
    q = _quantiles(means, sds, pi, probs)
    assert np.all(np.isfinite(q)) and np.all(q >= 0)
    np.testing.assert_array_equal(q[probs[:, None] <= pi[None, :]], 0.0)
    # where p > π: the mixture CDF (SciPy, float64) at the quantile is p' = (p − π)/(1 − π)
    for k, p in enumerate(probs):
        for j in np.flatnonzero(p > pi):
            target = (p - pi[j]) / (1 - pi[j])
            d = truncnorm(alpha[:, j], np.inf, loc=means[:, j], scale=sds)
            cdf = np.mean(d.cdf(q[k, j]))
            # float32 quantiles: relative error ~1e−6 in q, the CDF moves by ~q·pdf·1e−6
            assert abs(cdf - target) < 1e-4, (p, j, cdf, target)


class _FixedDraws(PosteriorRegressor):
    """Posterior draws set in advance: ``g_s(x) = −x₀ σ_s`` (column 0 of ``X`` is ``α = −g/σ``)."""

    def __init__(self, sigma):
        self.sigma = np.asarray(sigma, np.float64)

    def fit(self, X, y):
        self.posterior_ = None
        self.n_features_in_ = np.shape(X)[1]
        return self

    @property
    def sigma_draws_(self):
        return self.sigma

    def _means(self, X):
        return -np.asarray(X, np.float64)[:, 0][None, :] * self.sigma[:, None]


class _FixedPi(ClassifierMixin, BaseEstimator):
    """``π(x)`` = column 1 of ``X``."""

    def fit(self, X, y):
        self.classes_ = np.array([False, True])
        return self

    def predict_proba(self, X):
        return np.c_[1.0 - X[:, 1], X[:, 1]]


def _tail_hurdle(sigma):
    X = np.c_[[1.0, 2.0, 3.0, 4.0], [0.5] * 4]
    hurdle = pcbtl.HurdleRegressor(_FixedDraws(sigma), _FixedPi(), calibration=None)
    return hurdle.fit(X, np.array([0.0, 0.0, 1.0, 2.0]))


def test_hurdle_predictions_far_in_the_tail_are_non_negative_and_exact():
    # the band-gap headline fit put g at −24σ for metals; the old float32 formula gave
    # negative truncated means, negative hurdle means and bounds off by eV there
    sd = 0.6
    hurdle = _tail_hurdle([sd, sd])
    alpha = np.array([30.0, 100.0, 30.0, 100.0, -30.0])
    pi = np.array([0.0, 0.0, 0.3, 0.3, 0.01])
    X = np.c_[alpha, pi]
    hurdle.point = "mean"
    mean, std = hurdle.predict(X, return_std=True)
    ref_mean = np.array([sd * _TAIL_REFERENCE[a]["mean"] for a in alpha[:4]] + [30 * sd])
    np.testing.assert_allclose(mean, (1 - pi) * ref_mean, rtol=1e-12)
    assert np.all(np.isfinite(std)) and np.all(std > 0)
    ref_var = sd**2 * np.array([_TAIL_REFERENCE[a]["var"] for a in alpha[:2]])
    np.testing.assert_allclose(std[:2], np.sqrt(ref_var), rtol=1e-12)
    hurdle.point = "median"
    med = hurdle.predict(X)
    lo, hi = hurdle.predict_interval(X)
    for v in (med, lo, hi):
        assert np.all(np.isfinite(v)) and np.all(v >= 0)
    # at π = 0 the hurdle quantiles are the truncated normal's; at π = 0.3, p = 0.975 is
    # p' = (0.975 − 0.3)/0.7 of the positive part and the median is p' = 2/7
    for j, a in enumerate(alpha[:2]):
        ref = _TAIL_REFERENCE[a]["q"]
        np.testing.assert_allclose([lo[j], med[j], hi[j]], sd * np.array([*ref.values()]), 1e-4)
        ref_hi = _mpmath_free_tail_quantile(a, (0.975 - 0.3) / 0.7)
        np.testing.assert_allclose(hi[j + 2], sd * ref_hi, rtol=1e-4)
    np.testing.assert_array_equal(lo[2:4], 0.0)
    # far above 0 (g = 30σ) the truncation is immaterial: the normal's quantiles at p'
    z = norm.ppf((np.array([0.025, 0.975]) - pi[4]) / (1 - pi[4]))
    np.testing.assert_allclose([lo[4], hi[4]], sd * (30 + z), rtol=1e-5)


def _mpmath_free_tail_quantile(alpha: float, p: float) -> float:
    """Quantile of Z − α, Z ~ N(0, 1) | Z > α, in float64 via SciPy (accurate for α ≤ 100)."""
    return float(truncnorm.ppf(p, alpha, np.inf) - alpha)


def test_hurdle_draws_far_in_the_tail_are_positive_and_match_the_mean():
    sd = 0.6
    hurdle = _tail_hurdle(np.full(4000, sd))
    X = np.c_[[30.0, 100.0, -5.0], [0.0, 0.0, 0.0]]
    draws = np.concatenate([hurdle.sample_posterior_predictive(X, seed=s) for s in range(5)])
    assert np.all(np.isfinite(draws)) and np.all(draws > 0)
    hurdle.point = "mean"
    # 20,000 draws; the sd of each positive part is at most its mean (exponential limit), so
    # the sample mean's relative sd is ≤ 0.7 %: allow 4 %
    np.testing.assert_allclose(draws.mean(axis=0), hurdle.predict(X), rtol=0.04)


def test_zero_classifier_calibration_option():
    # default: boosted trees, cross-fitted isotonic recalibration (benchmarks/hurdle_calibration.py)
    default = zero_classifier()
    assert isinstance(default, CalibratedClassifierCV) and default.method == "isotonic"
    assert isinstance(default.estimator, HistGradientBoostingClassifier)
    assert isinstance(zero_classifier(calibration=None), HistGradientBoostingClassifier)
    wrapped = zero_classifier(LogisticRegression(), "isotonic", 3)
    assert isinstance(wrapped, CalibratedClassifierCV) and wrapped.cv.n_splits == 3
    with pytest.raises(ValueError, match="calibration"):
        zero_classifier(calibration="platt")
    with pytest.raises(ValueError, match="calibration_cv"):
        zero_classifier(calibration="sigmoid", calibration_cv=1)
    X, y, pi = _zero_inflated(400, 4)
    hurdle = pcbtl.HurdleRegressor(
        _FixedDraws([1.0, 1.2]), LogisticRegression(), calibration="sigmoid"
    ).fit(X, y)
    assert isinstance(hurdle.classifier_, CalibratedClassifierCV)
    p0 = hurdle.predict_proba_zero(X)
    assert np.all((p0 > 0) & (p0 < 1)) and np.corrcoef(p0, pi)[0, 1] > 0.9
    # isotonic steps reach 0 and 1 exactly; π stays half an example per calibration fold
    # (400/5 = 80 rows: ε = 1/160) away from them
    hurdle = pcbtl.HurdleRegressor(_FixedDraws([1.0]), LogisticRegression()).fit(X, y)
    p0 = hurdle.predict_proba_zero(np.r_[X, [[-50.0, 0, 0], [50.0, 0, 0]]])
    assert hurdle.classifier_.floor_ == 1 / 160
    np.testing.assert_allclose(p0[-2:], [1 / 160, 1 - 1 / 160])
    assert np.all((p0 >= 1 / 160) & (p0 <= 1 - 1 / 160))


def test_log_survival_function_at_reference_quantiles():
    # S(q_p) = 1 − p at the mpmath quantiles, far in the tail (float32: |Δ log S| ≲ 1e−6)
    for alpha, ref in _TAIL_REFERENCE.items():
        p = np.array(list(ref["q"]))
        q = np.array(list(ref["q"].values()))
        log_sf = truncated_normal_log_sf(jnp.asarray(q, jnp.float32), -alpha, 1.0)
        np.testing.assert_allclose(np.asarray(log_sf), np.log1p(-p), atol=2e-5, rtol=1e-4)
    # ordinary cases against SciPy
    alpha = np.array([-8.0, -1.0, 0.0, 2.0, 5.0])[:, None]
    q = np.array([0.0, 0.01, 0.3, 1.0, 4.0])[None, :]
    got = truncated_normal_log_sf(jnp.asarray(q, jnp.float32), -alpha * 0.5, 0.5)
    want = truncnorm.logsf(q, alpha, np.inf, loc=-alpha * 0.5, scale=0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_hurdle_takes_the_pc_transfer_classifier_for_p_zero():
    """P(y = 0) from a PC transfer classifier on a source classifier of related labels.

    Source labels: ``logistic(3 x₀ + 0.5)`` (a shifted version of the target's ``π``). The
    hurdle's ``π`` must be the fitted classifier's posterior-mean probability, and it must rank
    held-out zeros nearly as well as the true ``π`` does: ROC-AUC within 0.05 of the oracle's
    (the oracle's AUC on 1,000 rows has a standard error of about 0.012; a classifier that
    ignored ``x₀`` would sit near 0.5)."""
    rng = np.random.default_rng(3)
    Xs = rng.standard_normal((2000, 3))
    ys = rng.uniform(size=2000) < 1 / (1 + np.exp(-(3 * Xs[:, 0] + 0.5)))
    src = pcbtl.train_source_classifier(Xs, ys, hidden=(8,), max_epochs=40, progress_bar=False)
    X, y, _ = _zero_inflated(400, 1)
    Xt, yt, pi_true = _zero_inflated(1000, 2)
    clf = pcbtl.PCTransferClassifier(
        src, prior="last_layer", num_warmup=100, num_samples=100, num_chains=2, progress_bar=False
    )
    hurdle = pcbtl.HurdleRegressor(_FixedDraws([0.3, 0.4]), clf, calibration=None).fit(X, y)
    assert isinstance(hurdle.classifier_, pcbtl.PCTransferClassifier)
    assert not hasattr(clf, "classes_")  # the parameter is cloned, not fitted
    pi = hurdle.predict_proba_zero(Xt)
    np.testing.assert_allclose(pi, hurdle.classifier_.predict_proba(Xt)[:, 1])
    assert list(hurdle.classifier_.classes_) == [False, True]
    auc, oracle = roc_auc_score(yt == 0, pi), roc_auc_score(yt == 0, pi_true)
    assert auc > oracle - 0.05, (auc, oracle)
