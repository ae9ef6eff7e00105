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

:func:`make_synthetic_classification_task` is the classification counterpart: the same inputs,
teacher networks as logits (scaled by :data:`CLASSIFICATION_LOGIT_SCALE`), a shift of ``δ``
logit units, and labels drawn from the Bernoulli or categorical distribution of the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = [
    "CLASSIFICATION_LOGIT_SCALE",
    "SyntheticClassificationTask",
    "SyntheticTask",
    "make_synthetic_classification_task",
    "make_synthetic_task",
    "teacher_network",
]


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


#: The sd ``s`` of every source logit of :func:`make_synthetic_classification_task`.
CLASSIFICATION_LOGIT_SCALE = 3.0


class SyntheticClassificationTask(NamedTuple):
    """Source rows, target rows and held-out target test rows of a classification task, with
    labels ``0 … K−1``; the true target class probabilities ``p_test`` ``(n_test, K)`` at
    ``X_test`` (for oracle scores) and the source model's, ``p_source_test``, at the same
    inputs (how far the target moved)."""

    X_source: np.ndarray
    y_source: np.ndarray
    X_target: np.ndarray
    y_target: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    p_test: np.ndarray
    p_source_test: np.ndarray
    n_classes: int


def _logit_teachers(rng: np.random.Generator, n_features: int, n_logits: int, n_hidden: int):
    """``x ↦ (n, n_logits)``: ``n_logits`` independent unit-sd teachers side by side."""
    fs = [teacher_network(rng, n_features, n_hidden) for _ in range(n_logits)]

    def f(X: np.ndarray) -> np.ndarray:
        return np.stack([fk(X) for fk in fs], axis=1)

    return f


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Class probabilities ``(n, K)`` of ``(n, 1)`` binary logits (``σ``) or ``(n, K)`` logits."""
    if logits.shape[1] == 1:
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _draw_labels(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One label per row of ``p`` (inverse CDF of one uniform per row)."""
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def make_synthetic_classification_task(
    *,
    n_classes: int = 2,
    delta: float = 1.0,
    unrelated: bool = False,
    n_source: int = 5000,
    n_target: int = 100,
    n_test: int = 2000,
    n_features: int = 10,
    seed: int = 0,
    covariate_shift: float = 0.0,
    logit_scale: float = CLASSIFICATION_LOGIT_SCALE,
    min_class_count: int = 2,
) -> SyntheticClassificationTask:
    r"""Draw one source/target classification task with a known discrepancy of the logits.

    Inputs as in :func:`make_synthetic_task`: source ``x ~ N(0, I_D)``, target and test
    ``x ~ N(c·1/√D, I_D)`` (``D = n_features``, ``c = covariate_shift``). With
    ``L = 1`` logit for ``K = n_classes = 2`` and ``L = K`` logits for ``K = 3``, the source
    logits are ``L`` independent 32-unit teachers :math:`f_1, …, f_L` (:func:`teacher_network`,
    each of unit sd under ``N(0, I)``) scaled by ``s = logit_scale``; the target logits add
    ``δ = delta`` times ``L`` independent 8-unit teachers :math:`h_l` of unit RMS:

    .. math::

        g_{S,l}(x) = s\, f_l(x), \qquad g_{T,l}(x) = g_{S,l}(x) + δ\, h_l(x),
        \qquad l = 1, …, L,

        p(y = 1 \mid x) = σ(g_1(x)) \ (K = 2), \qquad
        p(y = k \mid x) = \mathrm{softmax}(g(x))_k \ (K = 3),

    so ``δ`` is the RMS shift of each logit, in logit units (for ``K = 3`` the softmax sees
    differences of logits, whose shift has RMS ``δ√2``). ``unrelated=True`` replaces
    :math:`g_T` by ``s`` times ``L`` fresh independent 32-unit teachers (nothing to transfer;
    ``delta`` is then ignored). Labels are drawn from those probabilities,
    ``y ~ Bernoulli`` / ``Categorical``, independently per row.

    The scale ``s = 3`` (:data:`CLASSIFICATION_LOGIT_SCALE`): the logit of a 32-unit teacher
    is close to Gaussian, so ``s = 3`` puts most rows at probabilities between 0.05 and 0.95.
    Measured on 20,000 inputs (``D = 10``): the Bayes classifier's accuracy is about 0.84
    (binary) and 0.80 (three classes) and the true probabilities' log loss about 0.36 and
    0.47 nats, against 0.69 and 1.10 for a constant guess; ``s = 1`` left the Bayes accuracy
    at 0.68 (little to learn from 25 rows), ``s = 5`` at 0.90 with most probabilities near 0
    or 1 (near-separable classes, where calibration says little). The classes are balanced on
    average.

    Every method matches target classes to source classes by position and the calibrated
    forests need two target rows per class, so the target sample (inputs and labels) is drawn
    again until every class has at least ``min_class_count`` rows: the target sample is
    conditioned on that event (rare: measured about 1 draw in 200 at ``n_T = 25``,
    ``K = 3``). Source and test rows are drawn once.

    Parameters
    ----------
    n_classes:
        ``K``, 2 or 3.
    delta:
        ``δ ≥ 0``, the RMS shift of each target logit (logit units).
    unrelated:
        Independent target logits instead of the shifted source logits.
    n_source, n_target, n_test, n_features:
        Rows of each sample and the input dimension ``D``.
    seed:
        Seed of every draw (teachers included).
    covariate_shift:
        ``c``, the shift of the target and test inputs (length ``c`` along ``1/√D``).
    logit_scale:
        ``s``, the sd of each source logit.
    min_class_count:
        Fewest target rows of each class (``0``: no condition).

    Returns
    -------
    SyntheticClassificationTask
        Labels ``0 … K−1``; ``p_test`` the true target probabilities ``(n_test, K)`` and
        ``p_source_test`` the source model's at ``X_test``.

    Example
    -------
    >>> t = make_synthetic_classification_task(n_classes=3, delta=1.0, n_target=50, seed=0)
    >>> t.X_target.shape, t.p_test.shape, sorted(set(t.y_target.tolist()))
    ((50, 10), (2000, 3), [0, 1, 2])
    """
    if n_classes not in (2, 3):
        raise ValueError(f"n_classes must be 2 or 3, got {n_classes!r}")
    if min(n_source, n_target, n_test, n_features) < 1:
        raise ValueError("n_source, n_target, n_test and n_features must be positive")
    if not (delta >= 0 and np.isfinite(delta)):
        raise ValueError(f"delta must be a finite non-negative number, got {delta!r}")
    if not (logit_scale > 0 and np.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be positive, got {logit_scale!r}")
    if min_class_count < 0 or min_class_count * n_classes > n_target:
        raise ValueError(
            f"min_class_count must lie in [0, n_target / n_classes], got {min_class_count}"
        )
    rng = np.random.default_rng(seed)
    n_logits = 1 if n_classes == 2 else n_classes
    f = _logit_teachers(rng, n_features, n_logits, 32)
    h = _logit_teachers(rng, n_features, n_logits, 8)
    other = _logit_teachers(rng, n_features, n_logits, 32)

    def source_logits(X):
        return logit_scale * f(X)

    def target_logits(X):
        return logit_scale * other(X) if unrelated else source_logits(X) + delta * h(X)

    offset = covariate_shift / np.sqrt(n_features)
    Xs = rng.standard_normal((n_source, n_features))
    ys = _draw_labels(rng, _probabilities(source_logits(Xs)))
    Xe = rng.standard_normal((n_test, n_features)) + offset
    pe = _probabilities(target_logits(Xe))
    ye = _draw_labels(rng, pe)
    while True:
        Xt = rng.standard_normal((n_target, n_features)) + offset
        yt = _draw_labels(rng, _probabilities(target_logits(Xt)))
        if np.bincount(yt, minlength=n_classes).min() >= min_class_count:
            break
    pse = _probabilities(source_logits(Xe))
    return SyntheticClassificationTask(Xs, ys, Xt, yt, Xe, ye, pe, pse, int(n_classes))
