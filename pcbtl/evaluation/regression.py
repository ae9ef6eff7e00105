r"""Metrics and scoring, in one place: every job (the simulation study, the batch runner, the
band-gap application, the demo) scores predictions through these functions.

For test labels ``y_i`` (``i = 1..n``), a point prediction ``μ_i``, a central interval
``[l_i, u_i]`` at level ``1 − a`` and the predictive density ``p_i``:

.. math::

    \mathrm{RMSE} = \Big(\frac1n \sum_i (μ_i − y_i)^2\Big)^{1/2}, \qquad
    \mathrm{MAE} = \frac1n \sum_i |μ_i − y_i|, \qquad
    \mathrm{coverage} = \frac1n \sum_i 1\{l_i ≤ y_i ≤ u_i\},

    \mathrm{width} = \frac1n \sum_i (u_i − l_i), \qquad
    \mathrm{MLPD} = \frac1n \sum_i \log p_i(y_i), \qquad
    \mathrm{CRPS} = \frac1n \sum_i \int (F_i(z) − 1\{z ≥ y_i\})^2 \, dz.

For an estimator with posterior draws the predictive is the mixture
``p_i = (1/S) Σ_s N(y_i; g_s(x_i), σ_s²)``, whose log density is taken with ``logsumexp`` and
whose CRPS is exact (:func:`pcbtl.predictive.mixture_crps`); for a Gaussian-predictive method
it is the single ``N(μ_i, s_i²)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

from pcbtl.estimators.base import PosteriorRegressor
from pcbtl.predictive import mixture_crps

METRICS = ("rmse", "mae", "coverage95", "width95", "mlpd", "crps")


def _predictive_mixture(est: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component means (S, n) and sds (S, n) of the predictive of a fitted estimator."""
    if isinstance(est, PosteriorRegressor) and hasattr(est, "posterior_"):
        means = np.asarray(est._means(X), np.float64)
        sig = np.asarray(est.sigma_draws_, np.float64)
        return means, np.broadcast_to(sig[:, None], means.shape)
    mu, sd = est.predict(X, return_std=True)
    return np.asarray(mu, np.float64)[None], np.asarray(sd, np.float64)[None]


def interval_scores(
    y: np.ndarray, mean: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> dict[str, float]:
    """RMSE, MAE, coverage and mean width of the interval ``[lower, upper]`` (module docs).

    Parameters
    ----------
    y, mean, lower, upper
        Labels, point predictions and interval bounds, one entry per test row.

    Returns
    -------
    dict
        ``rmse``, ``mae``, ``coverage95`` and ``width95`` (the names say 95: the jobs score
        their 95 % intervals).
    """
    y, mean = np.asarray(y, np.float64), np.asarray(mean, np.float64)
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    return {
        "rmse": float(np.sqrt(np.mean((mean - y) ** 2))),
        "mae": float(np.mean(np.abs(mean - y))),
        "coverage95": float(np.mean((y >= lower) & (y <= upper))),
        "width95": float(np.mean(upper - lower)),
    }


def score(est: Any, X: np.ndarray, y: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Every metric of :data:`METRICS` for a fitted estimator on test rows ``(X, y)``.

    Example
    -------
    >>> from pcbtl.evaluation import score
    >>> score(model, X_test, y_test)["coverage95"]  # doctest: +SKIP
    """
    mu = np.asarray(est.predict(X), np.float64)
    lo, hi = est.predict_interval(X, level=level)
    means, sds = _predictive_mixture(est, X)
    S = means.shape[0]
    logp = norm.logpdf(y[None], means, sds)
    return {
        **interval_scores(y, mu, lo, hi),
        "mlpd": float(np.mean(logsumexp(logp, axis=0) - math.log(S))),
        "crps": float(np.mean(mixture_crps(means, sds, y))),
    }
