"""Figures people would rather look at than read: parity with intervals, distance, calibration.

All functions take plain arrays, draw on a Matplotlib ``Axes`` (a new figure when ``ax`` is
``None``) and return the ``Axes``; nothing is shown or saved implicitly.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

__all__ = ["parity_plot", "distance_plot", "calibration_plot"]


def _axes(ax: Any | None):
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    return ax


def parity_plot(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    *,
    title: str = "",
    ax: Any | None = None,
):
    """Predicted against observed, with vertical bars for the intervals ``[lower, upper]``.

    Points whose interval misses the observation are drawn in a second colour; the title
    carries RMSE and, with intervals, their empirical coverage.
    """
    ax = _axes(ax)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    label = f"RMSE {np.sqrt(np.mean((y_pred - y_true) ** 2)):.3f}"
    if lower is not None and upper is not None:
        inside = (y_true >= lower) & (y_true <= upper)
        for mask, colour in ((inside, "tab:blue"), (~inside, "tab:red")):
            ax.errorbar(
                y_true[mask],
                y_pred[mask],
                yerr=[y_pred[mask] - lower[mask], upper[mask] - y_pred[mask]],
                fmt="o",
                ms=2.5,
                lw=0.6,
                alpha=0.5,
                color=colour,
            )
        label += f", coverage {inside.mean():.2f}"
    else:
        ax.plot(y_true, y_pred, "o", ms=2.5, alpha=0.5)
    lims = [min(y_true.min(), y_pred.min()), max(y_true.max(), y_pred.max())]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel("observed")
    ax.set_ylabel("predicted")
    ax.set_title(f"{title}\n{label}" if title else label, fontsize=9)
    return ax


def distance_plot(
    posterior_d: np.ndarray, rate: float, *, ax: Any | None = None, units: str = "noise sds"
):
    """Histogram of posterior draws of ``d`` over the prior density ``λ e^{−λd}``.

    ``units`` names the unit of ``d`` on the axis: ``"noise sds"`` for a regressor (``d`` is
    measured in noise standard deviations), ``"sqrt(2 KL), nats"`` or ``None`` (no unit) for a
    classifier, whose ``d = sqrt(2 E KL)`` has no noise scale."""
    ax = _axes(ax)
    d = np.asarray(posterior_d)
    top = max(np.quantile(d, 0.995), 3.0 / rate)
    ax.hist(d, bins=40, range=(0, top), density=True, alpha=0.6, label="posterior")
    grid = np.linspace(0, top, 200)
    ax.plot(grid, rate * np.exp(-rate * grid), "k-", label=f"prior Exp({rate:.2f})")
    ax.set_xlabel("distance d from the source model" + (f" ({units})" if units else ""))
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return ax


def calibration_plot(
    y_true: np.ndarray, mean: np.ndarray, std: np.ndarray, *, ax: Any | None = None, label=None
):
    """Observed against nominal coverage of central Gaussian intervals ``mean ± z·std``."""
    ax = _axes(ax)
    levels = np.linspace(0.05, 0.95, 19)
    z = stats.norm.ppf(0.5 + levels / 2)
    err = np.abs(np.asarray(y_true) - np.asarray(mean)) / np.asarray(std)
    observed = [(err <= zi).mean() for zi in z]
    ax.plot(levels, observed, "o-", ms=3, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("observed coverage")
    return ax
