r"""Hurdle (two-part) model for non-negative targets with exact zeros, such as band gaps.

About half of the experimental band gaps are metals with gap exactly 0. Clipping a Gaussian
regression at 0 gives a predictive with no mass at 0 and a biased mean. The hurdle model
(Cragg 1971; Mullahy 1986) writes the predictive as

    P(y = 0 | x) = π(x)
    p(y | x, y > 0) = (1/S) Σ_s N(y | g_s(x), σ_s²) 1{y > 0} / (1 − Φ(−g_s(x)/σ_s))

with ``π`` from a probabilistic classifier (metal or not) and the positive part from the
posterior draws ``(g_s, σ_s)`` of a Bayesian regressor (e.g. :class:`pcbtl.PCTransferRegressor`)
fitted on the rows with ``y > zero_tol``, each draw's normal truncated to ``y > 0``. The regressor's
likelihood is the untruncated Gaussian (so that the PC prior's sufficient statistics apply); this
approximation is good when few positive targets lie within a noise sd of 0. The classifier is a
point estimate (its probabilities are calibrated on held-out folds by scikit-learn, not sampled).

For the mean absolute error the optimal point prediction is the predictive median, which is 0
whenever ``π(x) ≥ 1/2``: ``point="median"`` (default) predicts it; ``point="mean"`` gives
``E[y | x] = (1 − π) (1/S) Σ_s (g_s + σ_s λ_s)``, ``λ_s = φ(α_s)/(1 − Φ(α_s))``, ``α_s = −g_s/σ_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from scipy.special import ndtr as np_ndtr
from scipy.special import ndtri
from scipy.stats import norm
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier

from pcbtl._validation import check_probability, check_X, check_Xy
from pcbtl.transfer import PosteriorRegressor

__all__ = ["HurdleRegressor"]


@jax.jit
def _hurdle_quantiles(means, sds, pi, probs):
    """Quantiles of ``π δ_0 + (1 − π) · mean_s TruncNormal₊(μ_s, σ_s)`` (means: (S, n); pi: (n,))."""
    sd = sds[:, None]
    tail0 = ndtr(-means / sd)  # P(y < 0) of each untruncated draw
    hi = jnp.max(means + 10.0 * sd, axis=0)

    def positive_cdf(q):
        return jnp.mean((ndtr((q - means) / sd) - tail0) / jnp.maximum(1.0 - tail0, 1e-12), axis=0)

    def one(prob):
        target = (prob - pi) / jnp.maximum(1.0 - pi, 1e-12)

        def body(_, b):
            lo, hi = b
            mid = 0.5 * (lo + hi)
            below = positive_cdf(mid) < target
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi_ = jax.lax.fori_loop(0, 60, body, (jnp.zeros_like(hi), hi))
        return jnp.where(prob <= pi, 0.0, 0.5 * (lo + hi_))

    return jax.vmap(one)(probs)


class HurdleRegressor:
    r"""Hurdle model: classifier for ``y = 0`` plus a Bayesian regressor for ``y > 0``.

    Parameters
    ----------
    regressor:
        A :class:`pcbtl.transfer.PosteriorRegressor` (``PCTransferRegressor``,
        ``BayesianNetworkRegressor``, ...), fitted on the rows with ``y > zero_tol``.
    classifier:
        A scikit-learn classifier with ``predict_proba``; default
        ``HistGradientBoostingClassifier`` (gradient-boosted trees; no scaling needed).
    classifier_features:
        Map ``X ↦`` classifier inputs; e.g. ``lambda X: np.c_[X, source.predict(X)]`` feeds the
        source model's prediction (a DFT gap near 0 says "metal") as an explicit latent variable.
        Default: ``X`` itself.
    zero_tol:
        Targets ``≤ zero_tol`` count as zeros.
    point:
        ``"median"`` (MAE-optimal, default) or ``"mean"``: what :meth:`predict` returns.

    Fitted attributes: ``regressor_``, ``classifier_``, ``zero_fraction_``, ``fit_seconds_``,
    ``classifier_seconds_``.
    """

    def __init__(
        self,
        regressor: PosteriorRegressor,
        classifier: Any = None,
        *,
        classifier_features: Callable[[np.ndarray], np.ndarray] | None = None,
        zero_tol: float = 0.0,
        point: str = "median",
    ) -> None:
        self.regressor = regressor
        self.classifier = classifier
        self.classifier_features = classifier_features
        self.zero_tol = zero_tol
        self.point = point

    def _features(self, X: np.ndarray) -> np.ndarray:
        return X if self.classifier_features is None else self.classifier_features(X)

    def fit(self, X: Any, y: Any) -> HurdleRegressor:
        """Fit ``π`` on all rows (zero or not) and the regressor on the positive rows."""
        if not isinstance(self.regressor, PosteriorRegressor):
            raise ValueError("regressor must be a pcbtl PosteriorRegressor (posterior draws)")
        if self.point not in ("median", "mean"):
            raise ValueError(f"point must be 'median' or 'mean', got {self.point!r}")
        X, y = check_Xy(X, y, min_rows=4)
        if np.any(y < 0):
            raise ValueError(f"y must be non-negative for a hurdle model; min is {y.min()}")
        zero = y <= self.zero_tol
        if zero.sum() < 2 or (~zero).sum() < 2:
            raise ValueError(
                f"y needs at least 2 zero and 2 positive rows, got {zero.sum()} and {(~zero).sum()}"
            )
        t0 = time.perf_counter()
        clf = clone(self.classifier) if self.classifier is not None else None
        if clf is None:
            clf = HistGradientBoostingClassifier(random_state=0)
        clf.fit(self._features(X), zero)
        t1 = time.perf_counter()
        reg = self.regressor.fit(X[~zero], y[~zero])
        self.classifier_ = clf
        self.regressor_ = reg
        self.zero_fraction_ = float(zero.mean())
        self.n_features_in_ = X.shape[1]
        self.classifier_seconds_ = t1 - t0
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "regressor_"):
            raise RuntimeError("this HurdleRegressor is not fitted yet; call fit(X, y)")

    def predict_proba_zero(self, X: Any) -> np.ndarray:
        """``π(x) = P(y = 0 | x)`` for each row of ``X``."""
        self._check_fitted()
        X = check_X(X, "X", n_features=self.n_features_in_)
        classes = list(self.classifier_.classes_)
        return self.classifier_.predict_proba(self._features(X))[:, classes.index(True)]

    def _parts(self, X: Any):
        pi = self.predict_proba_zero(X)
        means = self.regressor_._means(X)
        return pi, means, self.regressor_.sigma_draws_

    def predict(self, X: Any, return_std: bool = False):
        """Point prediction (median or mean, see ``point``); with ``return_std`` the predictive sd."""
        pi, means, sds = self._parts(X)
        sd = sds[:, None]
        alpha = -means / sd
        lam = norm.pdf(alpha) / np.maximum(1.0 - np_ndtr(alpha), 1e-12)
        m = means + sd * lam
        v = sd**2 * (1.0 + alpha * lam - lam**2)
        mean = (1.0 - pi) * m.mean(axis=0)
        if self.point == "median":
            q = _hurdle_quantiles(
                jnp.asarray(means, jnp.float32),
                jnp.asarray(sds, jnp.float32),
                jnp.asarray(pi, jnp.float32),
                jnp.array([0.5]),
            )
            point = np.asarray(q[0], np.float64)
        else:
            point = mean
        if not return_std:
            return point
        second = (1.0 - pi) * (v + m**2).mean(axis=0)
        return point, np.sqrt(np.maximum(second - mean**2, 0.0))

    def predict_interval(self, X: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Central ``level`` interval of the hurdle predictive; the lower end is 0 where
        ``π(x) ≥ (1 − level)/2``."""
        level = check_probability(level, "level")
        pi, means, sds = self._parts(X)
        a = (1.0 - level) / 2.0
        q = _hurdle_quantiles(
            jnp.asarray(means, jnp.float32),
            jnp.asarray(sds, jnp.float32),
            jnp.asarray(pi, jnp.float32),
            jnp.array([a, 1.0 - a]),
        )
        return np.asarray(q[0], np.float64), np.asarray(q[1], np.float64)

    def sample_posterior_predictive(self, X: Any, seed: int = 0) -> np.ndarray:
        """One draw per posterior draw: 0 with probability ``π``, else a truncated normal."""
        pi, means, sds = self._parts(X)
        rng = np.random.default_rng(seed)
        sd = sds[:, None]
        lo = np_ndtr(-means / sd)
        u = lo + (1.0 - lo) * rng.uniform(size=means.shape)
        positive = means + sd * ndtri(np.clip(u, 1e-12, 1 - 1e-12))
        return np.where(rng.uniform(size=means.shape) < pi, 0.0, np.maximum(positive, 0.0))
