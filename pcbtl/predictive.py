r"""Predictive distributions of posterior draws: quantiles, CRPS, the truncated normal.

A fitted Bayesian estimator holds draws ``(g_s, σ_s)``, ``s = 1..S``; its predictive at ``x`` is
the mixture

.. math::

    p(y \mid x) = \frac1S \sum_{s=1}^S N\big(y;\ g_s(x),\ σ_s^2\big),

whose quantiles (:func:`mixture_quantiles`) and continuous ranked probability score
(:func:`mixture_crps`) are computed exactly here; the hurdle model's predictive
``π δ_0 + (1 − π) (1/S) Σ_s TruncNormal₊(g_s, σ_s²)`` has its quantiles in
:func:`hurdle_quantiles`, on the truncated normal's survival function and moments in log space
(:func:`truncated_normal_log_sf`, :func:`truncated_normal_moments`). Quantiles of a mixture
have no closed form: both quantile functions bisect the mixture's distribution function
(:func:`_bisect`, 60 halvings of a bracket that holds the quantile, i.e. to ``2^{-60}`` of its
width, below float64 resolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfcx, log_ndtr, ndtr
from scipy.special import erfcx as np_erfcx


def _bisect(lo: jax.Array, hi: jax.Array, below: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The point where ``below`` turns from true to false in ``[lo, hi]``, by 60 halvings.

    ``below(q)`` is true where the quantile sought lies above ``q`` (elementwise); the
    bracket's midpoint after the last halving is returned."""

    def body(_, b):
        lo, hi = b
        mid = 0.5 * (lo + hi)
        go_up = below(mid)
        return jnp.where(go_up, mid, lo), jnp.where(go_up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 60, body, (lo, hi))
    return 0.5 * (lo + hi)


@jax.jit
def mixture_quantiles(means: jax.Array, sds: jax.Array, probs: jax.Array) -> jax.Array:
    r"""Quantiles of the mixture ``(1/S) Σ_s N(μ_s, σ_s²)`` at each of ``probs``.

    The quantile ``q`` at probability ``p`` solves

    .. math::

        \frac1S \sum_s \Phi\Big(\frac{q - μ_s}{σ_s}\Big) = p,

    bracketed by ``[min_s μ_s − 10σ_s, max_s μ_s + 10σ_s]`` and found by :func:`_bisect`.

    Parameters
    ----------
    means
        ``(S, n)``: the draws' means at ``n`` inputs.
    sds
        ``(S,)``: the draws' noise sds.
    probs
        ``(k,)`` probabilities in ``(0, 1)``.

    Returns
    -------
    jax.Array
        ``(k, n)`` quantiles.
    """
    sd = sds[:, None]
    lo = jnp.min(means - 10.0 * sd, axis=0)
    hi = jnp.max(means + 10.0 * sd, axis=0)

    def one(prob):
        return _bisect(lo, hi, lambda q: jnp.mean(ndtr((q - means) / sd), axis=0) < prob)

    return jax.vmap(one)(probs)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _abs_normal_mean(m, s):
    """``E|Z|`` for ``Z ~ N(m, s²)``: ``m(2Φ(m/s) − 1) + 2s φ(m/s)``."""
    u = m / s
    return m * (2 * jax.scipy.special.ndtr(u) - 1) + _SQRT_2_OVER_PI * s * jnp.exp(-0.5 * u * u)


@jax.jit
def _mixture_crps_jit(means, sds, y):
    t1 = _abs_normal_mean(y[None] - means, sds).mean(0)
    n_comp = means.shape[0]
    iu, ju = np.triu_indices(n_comp, k=1)

    n_pairs = iu.shape[0]
    chunk = max(1, min(n_pairs, 256))
    n_chunks = -(-n_pairs // chunk)
    flat = np.arange(n_chunks * chunk)
    I = jnp.asarray(iu[flat % max(n_pairs, 1)].reshape(n_chunks, chunk))  # noqa: E741
    J = jnp.asarray(ju[flat % max(n_pairs, 1)].reshape(n_chunks, chunk))
    W = jnp.asarray((flat < n_pairs).reshape(n_chunks, chunk), means.dtype)

    def body(acc, ijw):  # one chunk of the s < t pairs (the pair term costs S²)
        i, j, w = ijw
        term = _abs_normal_mean(means[i] - means[j], jnp.sqrt(sds[i] ** 2 + sds[j] ** 2))
        return acc + jnp.sum(term * w[:, None], axis=0), None

    pair, _ = jax.lax.scan(body, jnp.zeros_like(y), (I, J, W))
    # pairs s < t counted twice; the s = t terms are E|N(0, 2σ_s²)| = 2σ_s/√π
    diag = (2.0 / math.sqrt(math.pi)) * sds.sum(0)
    return t1 - 0.5 * (2.0 * pair + diag) / n_comp**2


def mixture_crps(means: np.ndarray, sds: np.ndarray, y: np.ndarray, max_components: int = 100):
    r"""CRPS of the Gaussian mixture ``(1/S) Σ_s N(μ_s, σ_s²)`` at ``y``, per point, in closed form:

        CRPS = (1/S) Σ_s E|X_s − y| − (1/(2S²)) Σ_{s,t} E|X_s − X_t|

    with ``E|N(m, v)| = m(2Φ(m/√v) − 1) + 2√v φ(m/√v)`` (Grimit et al. 2006). At most
    ``max_components`` evenly spaced draws are used (the pair term costs ``S²``); jitted,
    computed relative to ``y`` (so float32 loses nothing at the scale of the errors).
    """
    S = means.shape[0]
    if S > max_components:
        idx = np.linspace(0, S - 1, max_components).round().astype(int)
        means, sds = means[idx], sds[idx]
    y = np.asarray(y, np.float64)
    # centre on y: the CRPS is translation invariant, and the errors are what float32 keeps
    centred = np.asarray(means, np.float64) - y[None]
    out = _mixture_crps_jit(
        jnp.asarray(centred, jnp.float32),
        jnp.asarray(sds, jnp.float32),
        jnp.zeros(y.shape[0], jnp.float32),
    )
    return np.asarray(out, np.float64)


_SQRT2 = math.sqrt(2.0)


#: at and above this standardised truncation point α the moments come from the continued fraction
_CF_FROM = 4.0


#: depth of the continued fraction: exact to float64 rounding for α ≥ 4 (checked with mpmath)
_CF_DEPTH = 40


def truncated_normal_log_sf(q: jax.Array, mean: jax.Array, sd: jax.Array) -> jax.Array:
    r"""``log P(Y > q | Y > 0)`` for ``Y ~ N(mean, sd²)`` and ``q ≥ 0``, stable at any ``mean/sd``.

    With the standardised truncation point ``α = −mean/sd``, ``t = q/sd`` and the normal upper
    tail ``Q(x) = 1 − Φ(x)``, the survival function of the normal truncated to ``(0, ∞)`` is

    .. math::

        \log S(q) = \log Q(\alpha + t) - \log Q(\alpha).

    For ``α < 0`` (the mean above 0) both terms are ``log_ndtr`` of moderate or positive
    arguments and there is no cancellation. For ``α ≥ 0`` both are near ``−α²/2`` (−450 at
    ``α = 30``) and their difference would lose ``α²/2`` ulps; with
    ``Q(x) = \tfrac12 e^{-x^2/2} \operatorname{erfcx}(x/\sqrt2)`` the quadratic terms cancel
    exactly on paper instead:

    .. math::

        \log S(q) = -t\,(\alpha + t/2)
            + \log \operatorname{erfcx}\!\big((\alpha + t)/\sqrt2\big)
            - \log \operatorname{erfcx}\!\big(\alpha/\sqrt2\big),

    every term of which is well conditioned (``erfcx`` is smooth, positive and
    ``≈ 1/(z\sqrt\pi)`` for large ``z``): the absolute error of ``log S`` is a few ulps of
    ``1 + |log S|`` whatever ``α`` (the truncated normal tends to an exponential with rate
    ``α/sd`` as ``α → ∞``). The old ``(Φ((q − mean)/sd) − Φ(α)) / (1 − Φ(α))`` is ``0/0`` in
    float32 once ``α > 5.4``.

    Parameters
    ----------
    q:
        Points ``≥ 0``.
    mean, sd:
        Mean and sd (``> 0``) of the untruncated normal; broadcast against ``q``.

    Returns
    -------
    jax.Array
        ``log S(q) ≤ 0``, in the dtype of the arguments (pure ``jax.numpy``; jittable).
    """
    alpha = -mean / sd
    t = q / sd
    x1 = alpha + t
    deep = alpha >= 0
    alpha_p = jnp.maximum(alpha, 0.0)  # the erfcx branch only ever sees arguments ≥ 0
    deep_value = (
        -t * (alpha_p + 0.5 * t)
        + jnp.log(erfcx(jnp.maximum(x1, 0.0) / _SQRT2))
        - jnp.log(erfcx(alpha_p / _SQRT2))
    )
    shallow_value = log_ndtr(-x1) - log_ndtr(-alpha)
    return jnp.minimum(jnp.where(deep, deep_value, shallow_value), 0.0)


def truncated_normal_moments(mean: Any, sd: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and variance of ``N(mean, sd²)`` truncated to ``(0, ∞)``, in float64, at any ``mean/sd``.

    With ``α = −mean/sd`` and the inverse Mills ratio (the standard normal hazard at ``α``)
    ``λ(α) = φ(α)/(1 − Φ(α))``, the truncated normal ``Y = mean + sd Z``, ``Z | Z > α``, has

    .. math::

        E[Y] = sd\,(\lambda - \alpha), \qquad \operatorname{Var}[Y] = sd^2\,\big(1 - \lambda(\lambda - \alpha)\big).

    For ``α < 4`` these are computed from
    ``λ = \sqrt{2/\pi} / \operatorname{erfcx}(\alpha/\sqrt2)`` (no ``1 − Φ``, which underflows:
    the old ``φ(α)/max(1 − Φ(α), 10^{-12})`` gave ``λ ≈ 0`` and a *negative* mean
    ``E[Y] ≈ mean`` once ``α > 8.3``). For ``α ≥ 4``, ``λ − α`` and ``1 − λ(λ − α)`` lose
    digits to cancellation (``λ − α ≈ 1/α``); there both come from Laplace's continued fraction
    of the Mills ratio, ``1/λ = 1/(α + 1/(α + 2/(α + 3/(α + …))))``, i.e.

    .. math::

        D = \cfrac{2}{\alpha + \cfrac{3}{\alpha + \cfrac{4}{\alpha + \cdots}}}, \qquad
        \lambda - \alpha = \frac{1}{\alpha + D}, \qquad
        1 - \lambda(\lambda - \alpha) = (\lambda - \alpha)\,\big(D - (\lambda - \alpha)\big),

    evaluated backwards from depth 40, where it agrees with 50-digit ``mpmath`` to float64
    rounding for every ``α ≥ 4``. All terms are positive, so ``E[Y] > 0`` and
    ``Var[Y] ≥ 0`` for any finite input; as ``α → ∞``,
    ``E[Y] = sd (1/α − 2/α³ + 10/α⁵ − …)`` and ``Var[Y] ≈ sd²/α²`` (the exponential limit).

    Parameters
    ----------
    mean, sd:
        Mean and sd (``> 0``) of the untruncated normal (broadcast).

    Returns
    -------
    (mean, variance)
        Float64 arrays of the broadcast shape of ``mean`` and ``sd``.
    """
    mean, sd = np.broadcast_arrays(np.asarray(mean, np.float64), np.asarray(sd, np.float64))
    alpha = -mean / sd
    deep = alpha >= _CF_FROM
    delta = np.empty_like(alpha)
    var = np.empty_like(alpha)
    # α < 4: the hazard from erfcx; erfcx(−z) overflows for z > 26, where λ is < 1e−300 anyway
    a = alpha[~deep]
    lam = _SQRT_2_OVER_PI / np_erfcx(np.maximum(a, -35.0) / _SQRT2)
    delta[~deep] = lam - a
    var[~deep] = 1.0 - lam * (lam - a)
    # α ≥ 4: Laplace's continued fraction, evaluated backwards
    a = alpha[deep]
    d = np.zeros_like(a)
    for k in range(_CF_DEPTH, 1, -1):
        d = k / (a + d)
    dd = 1.0 / (a + d)
    delta[deep] = dd
    var[deep] = dd * (d - dd)
    return sd * delta, sd**2 * np.maximum(var, 0.0)


@jax.jit
def hurdle_quantiles(
    means: jax.Array, sds: jax.Array, pi: jax.Array, probs: jax.Array
) -> jax.Array:
    r"""Quantiles of ``π δ_0 + (1 − π) (1/S) Σ_s TruncNormal₊(μ_s, σ_s²)``.

    ``means``: ``(S, n)``; ``sds``: ``(S,)``; ``pi``: ``(n,)``; ``probs``: ``(k,)``; returns
    ``(k, n)``. The quantile at ``p ≤ π`` is 0. Otherwise it is the quantile at
    ``p' = (p − π)/(1 − π)`` of the positive part, found by :func:`_bisect` on the mixture of
    the draws' survival functions ``S_s`` (:func:`truncated_normal_log_sf`, log space), compared
    in the smaller tail: ``(1/S) Σ_s (1 − S_s(q)) < p'`` when ``p' ≤ 1/2``, else
    ``(1/S) Σ_s S_s(q) > 1 − p' = (1 − p)/(1 − π)``. The bracket is ``[0, max_s σ_s t_s]``:
    the normal hazard exceeds its argument, ``φ(x)/Q(x) > x``, so
    ``−\log S_s(σ_s t) > t(α_s + t/2)`` and

    .. math::

        t_s = \frac{2L}{\alpha_s + \sqrt{\alpha_s^2 + 2L}}\ (\alpha_s \ge 0), \qquad
        t_s = \sqrt{\alpha_s^2 + 2L} - \alpha_s\ (\alpha_s < 0), \qquad L = -\log(1 - p'),

    is above draw ``s``'s quantile, so ``max_s σ_s t_s`` is above the mixture's.
    """
    sd = sds[:, None]
    alpha = -means / sd
    tiny = jnp.finfo(means.dtype).tiny

    def one(prob):
        keep = jnp.maximum(1.0 - pi, tiny)
        target = (prob - pi) / keep  # p'
        upper = jnp.clip((1.0 - prob) / keep, tiny, 1.0)  # 1 − p'
        big = 2.0 * -jnp.log(upper)
        root = jnp.sqrt(alpha**2 + big)
        t = jnp.where(alpha >= 0, big / (alpha + root), root - alpha)
        hi = jnp.max(sd * t, axis=0)
        lower_tail = target <= 0.5

        def below(q):
            log_sf = truncated_normal_log_sf(q, means, sd)
            cdf = jnp.mean(-jnp.expm1(log_sf), axis=0)
            sf = jnp.mean(jnp.exp(log_sf), axis=0)
            return jnp.where(lower_tail, cdf < target, sf > upper)

        return jnp.where(prob <= pi, 0.0, _bisect(jnp.zeros_like(hi), hi, below))

    return jax.vmap(one)(probs)
