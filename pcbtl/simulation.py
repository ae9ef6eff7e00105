r"""Synthetic source/target tasks with a known discrepancy.

Data-generating process of :func:`make_synthetic_task` (every draw seeded):

* inputs ``x ∈ R^D``: source and test-free source rows ``x ~ N(0, I_D)``; target and test rows
  ``x ~ N(c·1/√D, I_D)`` with covariate shift ``c`` (``c = 0``: no shift);
* source function ``f_S``: a random *teacher* network ``x ↦ a·tanh(W x + b)`` with 32 hidden units
  (``W ~ N(0, 1/D)``, ``b ~ N(0, 0.1²)``, ``a ~ N(0, 1/32)``) rescaled to unit sd under ``N(0, I)``;
* target function ``f_T = f_S + δ σ h``: ``h`` an independent teacher with 8 hidden units, rescaled
  to unit RMS, so the discrepancy is ``δ`` noise sds in RMS; ``unrelated=True`` replaces ``f_T`` by
  an independent 32-unit teacher (no transferable structure);
* labels ``y = f(x) + σ e``, ``e ~ N(0, 1)``, with noise sd ``σ = noise_sd`` for both tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["SyntheticTask", "make_synthetic_task", "teacher_network"]


class SyntheticTask(NamedTuple):
    """Source rows, target rows, held-out target test rows and the true target mean there."""

    X_source: np.ndarray
    y_source: np.ndarray
    X_target: np.ndarray
    y_target: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    f_test: np.ndarray
    noise_sd: float


def teacher_network(
    rng: np.random.Generator, n_features: int, n_hidden: int
) -> Callable[[np.ndarray], np.ndarray]:
    """A random one-hidden-layer tanh network, rescaled to unit sd under ``x ~ N(0, I)``."""
    W = rng.normal(0.0, 1.0 / np.sqrt(n_features), (n_features, n_hidden))
    b = rng.normal(0.0, 0.1, n_hidden)
    a = rng.normal(0.0, 1.0 / np.sqrt(n_hidden), n_hidden)
    probe = np.random.default_rng(rng.integers(2**32)).standard_normal((20000, n_features))
    raw = np.tanh(probe @ W + b) @ a
    mean, sd = raw.mean(), raw.std()

    def f(X: np.ndarray) -> np.ndarray:
        return (np.tanh(np.asarray(X) @ W + b) @ a - mean) / sd

    return f


def make_synthetic_task(
    *,
    n_source: int = 3000,
    n_target: int = 100,
    n_test: int = 1000,
    n_features: int = 5,
    shift: float = 2.0,
    noise_sd: float = 0.2,
    covariate_shift: float = 0.0,
    unrelated: bool = False,
    seed: int = 0,
) -> SyntheticTask:
    """Draw one source/target task (see the module docstring for the process).

    ``shift`` is the RMS discrepancy ``δ`` in noise sds; the returned ``f_test`` is the true
    target mean at ``X_test`` (for oracle metrics).
    """
    if min(n_source, n_target, n_test, n_features) < 1:
        raise ValueError("n_source, n_target, n_test and n_features must be positive")
    if noise_sd <= 0 or shift < 0:
        raise ValueError("noise_sd must be positive and shift non-negative")
    rng = np.random.default_rng(seed)
    f_source = teacher_network(rng, n_features, 32)
    h = teacher_network(rng, n_features, 8)
    f_other = teacher_network(rng, n_features, 32)

    def f_target(X):
        return f_other(X) if unrelated else f_source(X) + shift * noise_sd * h(X)

    offset = covariate_shift / np.sqrt(n_features)
    Xs = rng.standard_normal((n_source, n_features))
    Xt = rng.standard_normal((n_target, n_features)) + offset
    Xe = rng.standard_normal((n_test, n_features)) + offset
    ys = f_source(Xs) + noise_sd * rng.standard_normal(n_source)
    yt = f_target(Xt) + noise_sd * rng.standard_normal(n_target)
    fe = f_target(Xe)
    ye = fe + noise_sd * rng.standard_normal(n_test)
    return SyntheticTask(Xs, ys, Xt, yt, Xe, ye, fe, float(noise_sd))
