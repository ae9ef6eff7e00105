r"""PC priors for classification targets: the KL distance from a source classifier, exactly.

Source and target predictives are ``Cat(softmax(g(x)))`` (``Bernoulli(σ(g(x)))`` for two
classes, written as the logits ``[0, g]``). The distance of a target from the source is

.. math::

    d = \sqrt{2\, E_{x\sim Q}\, \mathrm{KL}\big(p_T(\cdot\mid x)\,\|\,p_S(\cdot\mid x)\big)},
    \qquad d \sim \mathrm{Exp}(λ),\quad λ = -\log(α)/U,

with no noise scale. Two constructions make ``d`` follow the PC prior:

* the **head (last-layer) prior** — a direction ``u`` uniform on the Fisher sphere of the source
  head and a length ``t`` along the ray with density ``π(t | u) ∝ λ e^{−λ d(t,u)} ∂d/∂t``
  (:class:`RayLength`), or equivalently ``d`` drawn first and ``t`` solved from
  ``d(t, u) = d`` (:func:`ray_length`);
* the **scale prior** — ``θ = θ_S + τ s⊙ε`` on any transfer layers, with ``r(τ)`` the Monte
  Carlo distance curve (:func:`classifier_distance_curve`, :class:`ClassifierScalePC`).

**The distance is bounded.** Unlike the Gaussian case, ``KL(p_T ‖ p_S)`` cannot exceed
``max_k −log p_S(c_k | x)`` at any ``x`` (the KL from any distribution to ``p_S`` is at most the
surprise of its least likely class), so no target — however far its weights move — is further
than

.. math::

    d_{\max} = \sqrt{2\, E_{x\sim Q} \max_k\, (-\log p_S(c_k\mid x))}.

``d ~ Exp(λ)`` on ``[0, ∞)`` is therefore impossible for *any* prior on the weights. Both
constructions give the exponential **truncated** at the largest distance they can reach
(``d_max(u)`` along the ray ``u``, ``r(τ_end)`` for the scale curve): density
``λ e^{−λd}/(1 − e^{−λ d_max})`` on ``[0, d_max]``. When ``λ d_max`` is large (a confident
source, or a small ``U``) the truncated mass ``e^{−λ d_max}`` is negligible and ``d`` is
``Exp(λ)`` to within it; the estimators report the achieved ``P(d > U)`` (:func:`achieved_tail`)
and warn (:class:`BoundedDistanceWarning`) when it is below ``α/2``.

**Precision.** In float32 the textbook ``Σ p (log p − log q)`` cancels catastrophically for a
small change of the logits (each term is ``O(1)``, the KL ``O(Δ²)``): at a logit change of
``10⁻³`` the KL is ``~10⁻⁷``, the size of the rounding error. :func:`shift_kl` uses a form
whose terms are all ``O(Δ²)``.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from jax.typing import ArrayLike
from numpyro.distributions import constraints

from pcbtl.priors import (
    DistanceCurve,
    ReferenceGram,
    check_distance_curve,
    distance_curve_inverse,
    distance_curve_value,
)

__all__ = [
    "BoundedDistanceWarning",
    "ClassifierScalePC",
    "HeadPrior",
    "achieved_tail",
    "class_contrasts",
    "classifier_distance_curve",
    "classifier_kl",
    "fisher_metric",
    "fit_classifier_curve",
    "head_prior",
    "head_ray_log_density",
    "RayLength",
    "ray_direction",
    "ray_distance",
    "ray_length",
    "ray_limit",
    "ray_slope",
    "sample_head_prior",
    "shift_kl",
    "truncated_distance",
]

#: most safeguarded Newton steps of :func:`ray_length` (a refused Newton step bisects the
#: bracket: 40 e-folds of ``t`` down to ``4·10⁻⁸`` in the worst case, never reached in practice)
RAY_ITERATIONS = 40
#: :func:`ray_length` stops after a Newton step smaller than this in ``log t`` (quadratic
#: convergence leaves an error of its square, far below float32 resolution)
RAY_TOLERANCE = 1e-5
#: half-width, in e-folds of ``t``, of the bracket ``log t ∈ log d ± RAY_BRACKET`` searched by
#: :func:`ray_length` (``t ≈ d`` near the source head, because the direction has unit Fisher norm)
RAY_BRACKET = 20.0


class BoundedDistanceWarning(UserWarning):
    """The KL distance of a classifier is bounded and the PC statement ``P(d > U) = α`` cannot
    hold as stated: the largest reachable distance is too close to ``U``."""


# --------------------------------------------------------------------------------------------
# the per-x KL, stable for small logit changes
# --------------------------------------------------------------------------------------------


def _expm1_minus_x(x: jax.Array) -> jax.Array:
    r"""``h(x) = e^x − 1 − x`` without cancellation: its Taylor series (to ``x⁸``) for
    ``|x| < 1/2`` (truncation error below ``4·10⁻⁸`` relative), ``expm1(x) − x`` beyond."""
    small = jnp.abs(x) < 0.5
    xs = jnp.where(small, x, 0.0)
    c = [1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040, 1 / 40320]
    poly = c[-1]
    for coef in reversed(c[:-1]):
        poly = coef + xs * poly
    return jnp.where(small, xs * xs * poly, jnp.expm1(x) - x)


@partial(jax.jit, static_argnames="axis")
def shift_kl(log_q: ArrayLike, delta: ArrayLike, axis: int = -1) -> jax.Array:
    r"""``KL(Cat(softmax(log q + Δ)) ‖ Cat(q))`` over the class axis ``axis`` (default the
    last), accurate for small ``Δ``.

    With ``q`` = ``exp(log_q)`` the base probabilities, ``Δ`` = ``delta`` the change of the
    logits, ``w = Δ − Σ_k q_k Δ_k`` (the KL is unchanged by adding a constant to ``Δ``),
    ``h(w) = e^w − 1 − w ≥ 0`` and ``s = Σ_k q_k h(w_k) ≥ 0``:

    .. math::

        \mathrm{KL} = \frac{\sum_k q_k\, w_k\,(e^{w_k} - 1)}{1 + s} - \log(1 + s),

    since ``Σ_k q_k e^{w_k} = 1 + s`` and ``p_k = q_k e^{w_k}/(1 + s)``. Every sum has terms of
    one sign, of size ``O(w²)`` for small ``w``, and the difference is about ``s``: no
    catastrophic cancellation (the rounding of ``Σ_k q_k w_k`` to not quite 0 cancels to first
    order). Measured in float32 against a float64 cumulant series: relative error below
    ``10⁻⁴`` for logit changes from ``10⁻⁶`` to 60, where the textbook form is wrong by 100 %
    at ``10⁻⁴``. Rows with ``max|w| > 30`` use ``Σ p (log p − log q)`` (no overflow; the KL is
    then far from 0 and cancellation harmless). Both branches get finite gradients.
    """
    log_q = jnp.asarray(log_q)
    delta = jnp.asarray(delta)
    q = jnp.exp(log_q)
    w = delta - jnp.sum(q * delta, axis=axis, keepdims=True)
    big = jnp.max(jnp.abs(w), axis=axis, keepdims=True) > 30.0
    ws = jnp.where(big, 0.0, w)
    s = jnp.sum(q * _expm1_minus_x(ws), axis=axis)
    first = jnp.sum(q * ws * jnp.expm1(ws), axis=axis)
    stable = first / (1.0 + s) - jnp.log1p(s)
    log_p = jax.nn.log_softmax(log_q + jnp.where(big, delta, 0.0), axis=axis)
    direct = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis)
    return jnp.maximum(jnp.where(jnp.squeeze(big, axis), direct, stable), 0.0)


def _full(out: jax.Array) -> jax.Array:
    """Network outputs → logits of all classes: ``[0, g]`` for one output unit."""
    if out.shape[-1] == 1:
        return jnp.concatenate([jnp.zeros_like(out), out], axis=-1)
    return out


@jax.jit
def classifier_kl(logits_target: ArrayLike, logits_source: ArrayLike) -> jax.Array:
    r"""Per-row ``KL(p_T ‖ p_S)`` from network outputs (last axis: 1 unit or ``K`` units).

    .. math::

        \mathrm{KL}_x = \sum_k p_{T,k}(x) \log\frac{p_{T,k}(x)}{p_{S,k}(x)},\qquad
        p = \mathrm{softmax}([0, g]) \text{ or } \mathrm{softmax}(g),

    computed by :func:`shift_kl` with ``log q = log_softmax(g_S)`` and ``Δ = g_T − g_S``.
    """
    gt, gs = _full(jnp.asarray(logits_target)), _full(jnp.asarray(logits_source))
    return shift_kl(jax.nn.log_softmax(gs, axis=-1), gt - gs)


# --------------------------------------------------------------------------------------------
# the head (last-layer) prior: Fisher sphere × exact length along each ray
# --------------------------------------------------------------------------------------------


def class_contrasts(n_outputs: int) -> np.ndarray:
    r"""Orthonormal basis ``H`` (``n_outputs × J``) of the identifiable changes of the outputs.

    One output (two classes): ``H = [[1]]``, ``J = 1``. ``K ≥ 3`` outputs: the softmax does
    not change when the same number is added to every logit, so only changes with
    ``Σ_k a_k = 0`` are identified; ``H`` holds the ``J = K − 1`` normalised Helmert
    contrasts ``h_j = (1, …, 1, −j, 0, …, 0)/\sqrt{j(j+1)}`` (``j`` ones), so that
    ``HᵀH = I`` and ``Hᵀ1 = 0``.
    """
    if n_outputs == 1:
        return np.ones((1, 1))
    H = np.zeros((n_outputs, n_outputs - 1))
    for j in range(1, n_outputs):
        H[:j, j - 1] = 1.0
        H[j, j - 1] = -float(j)
        H[:, j - 1] /= math.sqrt(j * (j + 1))
    return H


def fisher_metric(
    Phi_ref: np.ndarray, logits_ref: np.ndarray, contrasts: np.ndarray, *, rel_ridge: float = 1e-4
) -> ReferenceGram:
    r"""Fisher information of the head at the source, averaged over the reference inputs.

    The head ``B = B_S + W Hᵀ`` (``W ∈ R^{p×J}``, ``H`` = ``contrasts``) changes the outputs at
    ``x`` by ``a(x) = H Wᵀ Φ̃_x``; with ``Σ_x`` the Fisher information of the outputs at the
    source (``q(1−q)`` for one output unit, ``diag(q) − qqᵀ`` for ``K``), ``S_x = HᵀΣ_xH``,

    .. math::

        2\,E_x \mathrm{KL} = \mathrm{vec}(W)^\top F\, \mathrm{vec}(W) + O(\|W\|^3),\qquad
        F = \frac1m \sum_{i=1}^m (\tilde Φ_i \tilde Φ_i^\top) \otimes S_{x_i},

    with ``Φ̃`` = ``Phi_ref`` (``m × p``, bias column included), the source outputs
    ``logits_ref`` (``m × n_outputs``) and ``vec`` the row-major ravel. As in
    :func:`pcbtl.priors.reference_gram`, a ridge ``ρ = rel_ridge·tr(F)/P`` is added when the
    smallest eigenvalue is below it (returned in ``ridge``); ``LLᵀ = F (+ρI)``. The ridge only
    shapes the distribution of directions: the distance itself stays the exact KL.
    """
    Phi = np.asarray(Phi_ref, np.float64)
    out = np.asarray(logits_ref, np.float64)
    H = np.asarray(contrasts, np.float64)
    m, p = Phi.shape
    if out.shape[1] == 1:
        q = 1.0 / (1.0 + np.exp(-out[:, 0]))
        Sigma = (q * (1 - q))[:, None, None]
    else:
        z = out - out.max(axis=1, keepdims=True)
        q = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        Sigma = np.einsum("xk,kl->xkl", q, np.eye(q.shape[1])) - q[:, :, None] * q[:, None, :]
    S = np.einsum("kj,xkl,lm->xjm", H, Sigma, H)
    J = H.shape[1]
    F = np.einsum("xi,xk,xjl->ijkl", Phi, Phi, S, optimize=True).reshape(p * J, p * J) / m
    F = 0.5 * (F + F.T)
    P = p * J
    scale = max(np.trace(F) / P, 1e-300)
    ridge = 0.0
    if float(np.linalg.eigvalsh(F)[0]) < rel_ridge * scale:
        ridge = rel_ridge * scale
        F = F + ridge * np.eye(P)
    return ReferenceGram(G=F, chol=np.linalg.cholesky(F), ridge=ridge)


class HeadPrior(NamedTuple):
    """Everything the head PC prior needs, as arrays (a pytree: it can be a model argument).

    ``beta_source`` ``(p, n_outputs)`` the source head (bias last row); ``chol`` the Cholesky
    factor ``L`` of the Fisher metric ``(pJ, pJ)``; ``contrasts`` ``H`` ``(n_outputs, J)``;
    ``Phi_ref`` the reference features with bias column ``(m, p)``; ``logits_ref`` the source
    outputs there ``(m, n_outputs)``.
    """

    beta_source: jax.Array
    chol: jax.Array
    contrasts: jax.Array
    Phi_ref: jax.Array
    logits_ref: jax.Array


def head_prior(
    source: Any, X_ref: ArrayLike, *, rel_ridge: float = 1e-4
) -> tuple[HeadPrior, float]:
    """Build the :class:`HeadPrior` of a :class:`pcbtl.classification.SourceClassifier` on the
    reference inputs ``X_ref``; returns it and the ridge of :func:`fisher_metric`."""
    feats = source.features(X_ref)
    Phi = np.concatenate([feats, np.ones((feats.shape[0], 1))], axis=1)
    logits = Phi @ source.head()
    H = class_contrasts(source.n_outputs)
    gram = fisher_metric(Phi, logits, H, rel_ridge=rel_ridge)
    prior = HeadPrior(
        beta_source=jnp.asarray(source.head(), jnp.float32),
        chol=jnp.asarray(gram.chol, jnp.float32),
        contrasts=jnp.asarray(H, jnp.float32),
        Phi_ref=jnp.asarray(Phi, jnp.float32),
        logits_ref=jnp.asarray(logits, jnp.float32),
    )
    return prior, gram.ridge


@jax.jit
def ray_direction(z: ArrayLike, chol: ArrayLike, contrasts: ArrayLike) -> jax.Array:
    r"""The head direction ``V`` ``(p, n_outputs)`` of the standard normal ``z`` ``(pJ,)``.

    .. math::

        u = z/\|z\|,\qquad \mathrm{vec}(W) = L^{-\top} u,\qquad V = W H^\top,

    so that ``vec(W)ᵀ F vec(W) = 1`` (``LLᵀ = F``, ``L`` = ``chol``, ``H`` = ``contrasts``):
    ``u`` is uniform on the unit sphere, hence ``V`` uniform on the unit sphere of the Fisher
    metric, and near the source head ``d(t, u) = t + O(t²)`` (with a ridge ``ρ`` in ``F``,
    ``d = c t + O(t²)`` with ``c = (1 − ρ‖vec W‖²)^{1/2} ≤ 1``).
    """
    z = jnp.asarray(z)
    H = jnp.asarray(contrasts)
    u = z / jnp.linalg.norm(z)
    w = solve_triangular(jnp.asarray(chol).T, u, lower=False)
    return w.reshape(-1, H.shape[1]) @ H.T


def _ray_parts(V, Phi_ref, logits_ref):
    """Change of all class logits per unit length ``a`` and ``log q``, both ``(K, m)``: classes
    first, so that the sums over the classes run across whole rows of ``m`` numbers (on a CPU,
    XLA sums over a trailing axis of 3 classes about 3× slower than this)."""
    return _full(Phi_ref @ V).T, jax.nn.log_softmax(_full(logits_ref), axis=-1).T


def _distance_along(t, a, log_q):
    kl = jnp.mean(shift_kl(log_q, t * a, axis=0))
    two_kl = 2.0 * kl
    safe = jnp.where(two_kl > 0, two_kl, 1.0)
    return jnp.where(two_kl > 0, jnp.sqrt(safe), 0.0)


@jax.jit
def ray_distance(
    t: ArrayLike, V: ArrayLike, Phi_ref: ArrayLike, logits_ref: ArrayLike
) -> jax.Array:
    r"""``d(t, V)``: the distance of the head ``B_S + tV`` from the source head.

    .. math::

        d(t, V) = \sqrt{\frac{2}{m} \sum_{i=1}^m
        \mathrm{KL}\big(\mathrm{Cat}(\mathrm{softmax}(η_i + t\, a_i))\,\|\,
        \mathrm{Cat}(\mathrm{softmax}(η_i))\big)},\qquad a_i = \tilde Φ_i V,

    with ``η_i`` = ``logits_ref`` (source outputs at the reference rows ``Φ̃`` = ``Phi_ref``),
    both lifted to all class logits (``[0, g]`` for one output). Exact; by :func:`shift_kl`.
    """
    a, log_q = _ray_parts(jnp.asarray(V), jnp.asarray(Phi_ref), jnp.asarray(logits_ref))
    return _distance_along(jnp.asarray(t), a, log_q)


@jax.jit
def ray_limit(V: ArrayLike, Phi_ref: ArrayLike, logits_ref: ArrayLike) -> jax.Array:
    r"""``d_max(V) = lim_{t→∞} d(t, V)``, the largest distance along the ray (no gradient).

    As ``t → ∞`` the target puts all its mass on ``k*_i = argmax_k a_{ik}``, so
    ``KL_i → −log q_{k*_i}(x_i)`` (0 where ``a_i`` is constant over classes):

    .. math::

        d_{\max}(V) = \sqrt{\frac{2}{m}\sum_i -\log q_{k^*_i}(x_i)}.

    ``d(t, V)`` increases strictly from 0 to ``d_max(V)``: along a ray from the source in the
    natural parameters, ``∂_t KL = t·aᵀ Cov_{p_t}(onehot) a ≥ 0`` (the KL of an exponential
    family, ``A(η_S) − A(η_T) − (η_S − η_T)ᵀ∇A(η_T)``, differentiated along ``η_T = η_S + ta``).
    """
    a, log_q = _ray_parts(jnp.asarray(V), jnp.asarray(Phi_ref), jnp.asarray(logits_ref))
    k = jnp.argmax(a, axis=0)
    moves = (jnp.max(a, axis=0) - jnp.min(a, axis=0)) > 0
    lim = jnp.where(moves, -jnp.take_along_axis(log_q, k[None, :], axis=0)[0], 0.0)
    return jax.lax.stop_gradient(jnp.sqrt(2.0 * jnp.mean(lim)))


def _solve_ray(d, V, Phi_ref, logits_ref):
    a, log_q = _ray_parts(V, Phi_ref, logits_ref)
    target = jnp.log(d)

    def f(log_t):
        return jnp.log(_distance_along(jnp.exp(log_t), a, log_q)) - target

    def cond(state):
        i, _, _, _, step = state
        return (i < RAY_ITERATIONS) & (jnp.abs(step) > RAY_TOLERANCE)

    def body(state):
        i, lo, hi, x, _ = state
        fx, gx = jax.jvp(f, (x,), (jnp.ones_like(x),))
        below = fx < 0
        lo = jnp.where(below, x, lo)
        hi = jnp.where(below, hi, x)
        newton = x - fx / jnp.where(gx > 0, gx, 1.0)
        ok = (gx > 0) & jnp.isfinite(newton) & (newton >= lo) & (newton <= hi)
        x_new = jnp.where(ok, newton, 0.5 * (lo + hi))
        # a bisection step never ends the loop: only a small Newton step does
        step = jnp.where(ok, x_new - x, jnp.inf)
        return i + 1, lo, hi, x_new, step

    dtype = jnp.result_type(target, float)
    init = (
        jnp.asarray(0),
        target - RAY_BRACKET,
        target + RAY_BRACKET,
        target,
        jnp.asarray(jnp.inf, dtype),
    )
    _, _, _, x, _ = jax.lax.while_loop(cond, body, init)
    return jnp.exp(x)


@jax.custom_jvp
def ray_length(d: ArrayLike, V: ArrayLike, Phi_ref: ArrayLike, logits_ref: ArrayLike) -> jax.Array:
    r"""The length ``t ≥ 0`` with ``d(t, V) = d`` (:func:`ray_distance`), differentiable.

    Solved by safeguarded Newton steps on ``log t`` inside the bracket
    ``log d ± RAY_BRACKET`` (a Newton step that leaves the bracket, or meets a flat spot, is
    replaced by bisection; the bracket shrinks at every step), started at ``t = d`` — the
    solution to first order, since ``V`` has unit Fisher norm — until a Newton step is below
    :data:`RAY_TOLERANCE` (at most :data:`RAY_ITERATIONS` steps; measured: 2 to 5 steps for
    99 % of 2,000 prior draws). A ``lax.while_loop``: jittable and vmappable (a vmapped solve
    runs until its slowest member has converged). ``d`` must lie below :func:`ray_limit`;
    beyond it (never drawn by the truncated prior) the solve returns the top of the bracket.

    Gradients: not through the iterations but by the implicit function theorem on
    ``d(t, V) = d`` (``custom_jvp``),

    .. math::

        \dot t = \frac{\dot d - \partial_V d(t, V)[\dot V] - \partial_{Φ̃,η}\,d(t, V)[\dot{Φ̃}, \dot η]}
        {\partial d(t, V)/\partial t},

    exact at the solution whatever path the iterations took, and as cheap as one extra
    evaluation of ``d``: a sampler gets the gradient of the non-centred head prior without
    differentiating a loop. ``∂d/∂t > 0`` along every ray (:func:`ray_limit`), so the quotient
    is defined.

    Used for exact prior draws (:func:`sample_head_prior`) and by the fully non-centred model
    (:func:`pcbtl.classification.models.head_pc_classifier_model`). The estimator's default
    samples ``log t`` from its closed-form density instead
    (:func:`pcbtl.classification.models.head_pc_classifier_model_length`). Why: as ``d``
    creeps up to ``d_max`` the solved ``t`` grows like ``exp(c·e)``, so the potential is a
    double exponential in the unconstrained ``log e`` (measured on the 40-row binary task of
    ``tests/test_classification.py``: 39.7 at a posterior draw, 687 at 2.5 e-folds of ``e``
    above it, 14,397 half an e-fold further), and leapfrog steps that reach there diverge: 8 of 300
    transitions at ``target_accept_prob = 0.8`` (1 at 0.95), where the ``(z, log t)`` form,
    whose potential grows only exponentially in ``log t``, had none, with the same posterior.
    """
    return _solve_ray(d, V, Phi_ref, logits_ref)


@ray_length.defjvp
def _ray_length_jvp(primals, tangents):
    d, V, Phi_ref, logits_ref = primals
    d_dot, V_dot, Phi_dot, logits_dot = tangents
    t = _solve_ray(d, V, Phi_ref, logits_ref)
    dd_dt = ray_slope(t, V, Phi_ref, logits_ref)
    _, dd_args = jax.jvp(
        lambda v, ph, lg: ray_distance(t, v, ph, lg),
        (V, Phi_ref, logits_ref),
        (V_dot, Phi_dot, logits_dot),
    )
    return t, (d_dot - dd_args) / dd_dt


@jax.jit
def truncated_distance(e: ArrayLike, rate: ArrayLike, d_max: ArrayLike) -> jax.Array:
    r"""Map ``e ~ Exp(1)`` to ``d ~ Exp(λ)`` truncated to ``[0, d_max]`` (monotone, exact).

    With ``v = 1 − e^{−e} ~ U(0, 1)`` and ``m = e^{−λ d_max}``, the inverse CDF of the
    truncated exponential gives

    .. math::

        d = -\frac{1}{λ}\log\big(e^{-e}(1 - m) + m\big),

    which is ``e/λ`` when ``m → 0``; ``λ`` = ``rate``. Evaluated as a ``logaddexp``.
    """
    e, rate, d_max = jnp.asarray(e), jnp.asarray(rate), jnp.asarray(d_max)
    log_m = -rate * d_max
    return -jnp.logaddexp(-e + jnp.log1p(-jnp.exp(log_m)), log_m) / rate


def _head_draw(z, e, prior: HeadPrior, rate):
    V = ray_direction(z, prior.chol, prior.contrasts)
    d_max = ray_limit(V, prior.Phi_ref, prior.logits_ref)
    d = truncated_distance(e, rate, d_max)
    t = ray_length(d, V, prior.Phi_ref, prior.logits_ref)
    return prior.beta_source + t * V, d, t, d_max


@partial(jax.jit, static_argnames="n")
def sample_head_prior(
    key: jax.Array, prior: HeadPrior, rate: ArrayLike, n: int
) -> dict[str, jax.Array]:
    r"""``n`` draws of the head PC prior, non-centred: ``z ~ N(0, I_{pJ})``, ``e ~ Exp(1)``,

    .. math::

        V = \text{ray\_direction}(z),\quad d = \text{truncated\_distance}(e, λ, d_{\max}(V)),
        \quad t = \text{ray\_length}(d, V),\quad B = B_S + tV,

    so ``d(t, V) = d`` and ``d | V ~ Exp(λ)`` truncated at ``d_max(V)``. Returns ``beta``
    ``(n, p, n_outputs)``, ``distance``, ``t`` and ``d_max`` ``(n,)``.
    """
    kz, ke = jax.random.split(key)
    P = prior.chol.shape[0]
    z = jax.random.normal(kz, (n, P))
    e = jax.random.exponential(ke, (n,))
    beta, d, t, d_max = jax.vmap(lambda zz, ee: _head_draw(zz, ee, prior, rate))(z, e)
    return {"beta": beta, "distance": d, "t": t, "d_max": d_max}


@jax.jit
def ray_slope(t: ArrayLike, V: ArrayLike, Phi_ref: ArrayLike, logits_ref: ArrayLike) -> jax.Array:
    r"""``∂d(t, V)/∂t`` in closed form (:func:`ray_distance`), for ``t`` of any shape.

    Along the ray the natural parameters are ``η_i + t a_i``, and the derivative of the KL of
    an exponential family in its first argument gives

    .. math::

        \frac{\partial\, \overline{\mathrm{KL}}}{\partial t}
        = \frac{t}{m}\sum_i \mathrm{Var}_{p_{t,i}}(a_i),\qquad
        \frac{\partial d}{\partial t} = \frac{1}{d}\,
        \frac{\partial\, \overline{\mathrm{KL}}}{\partial t},

    with ``Var_p(a) = Σ_k p_k (a_k − Σ_j p_j a_j)²`` under the target's class probabilities
    ``p_{t,i} = softmax(η_i + t a_i)`` (a sum of non-negative terms: no cancellation).
    Non-negative, and positive unless ``a_i`` is constant over the classes at every reference
    input: ``d`` increases along every ray.
    """
    a, log_q = _ray_parts(jnp.asarray(V), jnp.asarray(Phi_ref), jnp.asarray(logits_ref))

    def one(s):
        var = _mean_var(s, a, log_q)
        return var / _distance_per_length(s, a, log_q, var)

    return _over_t(one, t)


def _over_t(fn, t):
    """``fn`` (of a scalar length) over every element of ``t`` (vmapped; the ray's ``a`` and
    ``log q`` are computed once by the caller). A scalar ``t``, the sampler's case, is passed
    straight to ``fn``: a ``vmap`` over one element made the gradient of the head prior's log
    density 4× slower on a CPU (three classes, 2,000 reference rows: 0.99 against 0.26 ms)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return fn(t)
    return jax.vmap(fn)(t.reshape(-1)).reshape(t.shape)


def _mean_var(t, a, log_q):
    p = jax.nn.softmax(log_q + t * a, axis=0)
    mean = jnp.sum(p * a, axis=0, keepdims=True)
    return jnp.mean(jnp.sum(p * (a - mean) ** 2, axis=0))


#: below this length ``d(t)/t`` is replaced by its limit ``sqrt(mean Var_{p_S}(a))`` (the KL,
#: of order ``t²``, would underflow in float32 for ``t`` below about ``10⁻¹⁹``; the relative
#: difference is ``O(t)``)
_SMALL_T = 1e-10


def _distance_per_length(t, a, log_q, var):
    """``d(t)/t``, continued by its limit as ``t → 0`` (see ``_SMALL_T``)."""
    small = t < _SMALL_T
    t_safe = jnp.where(small, 1.0, t)
    ratio = _distance_along(t_safe, a, log_q) / t_safe
    return jnp.where(small, jnp.sqrt(var), ratio)


@jax.jit
def head_ray_log_density(
    t: ArrayLike, V: ArrayLike, prior: HeadPrior, rate: ArrayLike
) -> jax.Array:
    r"""``log π(t | V)``, the density of the length along the ray ``V`` (closed form).

    .. math::

        π(t \mid V) = \frac{λ\, e^{-λ d(t, V)}}{1 - e^{-λ d_{\max}(V)}}\,
        \frac{\partial d(t, V)}{\partial t},\qquad t \ge 0,

    the push-forward of the truncated ``Exp(λ)`` through the increasing ``t ↦ d(t, V)``
    (:func:`ray_distance`, :func:`ray_slope`, :func:`ray_limit`); ``λ`` = ``rate``, ``t`` of
    any shape (the ray is set up once). In logs,
    ``log ∂d/∂t = log mean_i Var_{p_t}(a_i) − log(d/t)``, with ``d/t`` continued by its limit
    below ``t = 10⁻¹⁰`` (where the KL underflows) and the variance floored at ``10⁻³⁰`` (it
    underflows only far out on the plateau, where the density is below
    ``e^{−λ d_max}·10⁻³⁰``). Dropping ``∂d/∂t`` leaves a density that does not even integrate
    over ``t ∈ [0, ∞)``: ``d`` levels off at ``d_max``.
    """
    a, log_q = _ray_parts(jnp.asarray(V), prior.Phi_ref, prior.logits_ref)
    d_max = ray_limit(V, prior.Phi_ref, prior.logits_ref)
    log_norm = jnp.log(rate) - jnp.log(-jnp.expm1(-rate * d_max))

    def one(s):
        var = jnp.maximum(_mean_var(s, a, log_q), 1e-30)
        ratio = _distance_per_length(s, a, log_q, var)
        return log_norm - rate * s * ratio + jnp.log(var) - jnp.log(ratio)

    return _over_t(one, t)


class RayLength(dist.Distribution):
    r"""The length ``t ≥ 0`` along the head direction ``V``, density :func:`head_ray_log_density`.

    .. math::

        π(t \mid V) = \frac{λ\, e^{-λ d(t, V)}}{1 - e^{-λ d_{\max}(V)}}\,
        \frac{\partial d(t, V)}{\partial t}

    (``λ`` = ``rate``; ``d`` and ``d_max`` on the reference inputs of ``prior``, a
    :class:`HeadPrior`). ``sample`` draws ``d`` from the truncated exponential and solves
    :func:`ray_length`.
    """

    arg_constraints = {"rate": constraints.positive}
    support = constraints.positive
    reparametrized_params: list[str] = []

    def __init__(
        self, V: ArrayLike, prior: HeadPrior, rate: ArrayLike, *, validate_args: bool | None = None
    ) -> None:
        self.V = jnp.asarray(V)
        self.prior = prior
        self.rate = jnp.asarray(rate)
        super().__init__(batch_shape=(), validate_args=validate_args)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        e = jax.random.exponential(key, sample_shape)
        d_max = ray_limit(self.V, self.prior.Phi_ref, self.prior.logits_ref)
        d = truncated_distance(e, self.rate, d_max)
        solve = jnp.vectorize(
            lambda dd: ray_length(dd, self.V, self.prior.Phi_ref, self.prior.logits_ref)
        )
        return solve(d)

    def log_prob(self, value: ArrayLike) -> jax.Array:
        return head_ray_log_density(value, self.V, self.prior, self.rate)


def achieved_tail(rate: float, U: float, d_max: ArrayLike) -> float:
    r"""``P(d > U)`` under the truncated prior, averaged over the ``d_max`` values given.

    .. math::

        P(d > U) = E\Big[\frac{(e^{-λU} - e^{-λ d_{\max}})^+}{1 - e^{-λ d_{\max}}}\Big],

    ``α`` exactly when ``d_max = ∞``; ``λ`` = ``rate``.
    """
    dm = np.asarray(d_max, np.float64).reshape(-1)
    m = np.exp(-rate * dm)
    return float(np.mean(np.maximum(math.exp(-rate * U) - m, 0.0) / (1.0 - m)))


def warn_if_bounded(
    rate: float, U: float, alpha: float, d_max: ArrayLike, stacklevel: int = 3
) -> float:
    """:func:`achieved_tail`, with a :class:`BoundedDistanceWarning` when it is below
    ``alpha / 2``: the truncation has then more than halved the stated tail probability (it
    can only lower it), and ``U`` is near or beyond the largest reachable distance."""
    tail = achieved_tail(rate, U, d_max)
    if tail < 0.5 * alpha:
        dm = float(np.median(np.asarray(d_max)))
        warnings.warn(
            f"the KL distance of a classifier from its source is bounded (here by about "
            f"{dm:.3g}: the KL cannot exceed the surprise -log p_S of the least likely class), "
            f"so the PC prior is an exponential truncated there and gives P(d > U={U:g}) = "
            f"{tail:.3g} instead of alpha = {alpha:g}. State a smaller U (the distance can "
            "never exceed the bound).",
            BoundedDistanceWarning,
            stacklevel=stacklevel,
        )
    return tail


# --------------------------------------------------------------------------------------------
# the scale prior: r(τ) from the Monte Carlo KL
# --------------------------------------------------------------------------------------------


def _curve_impl(predict_fn, theta_source, scales, X_ref, tau_grid, eps, batch_size):
    base = predict_fn(theta_source, X_ref)

    def per_tau(tau):
        def per_eps(e):
            return 2.0 * jnp.mean(
                classifier_kl(predict_fn(theta_source + tau * scales * e, X_ref), base)
            )

        sq = jax.vmap(per_eps)(eps)
        return jnp.sqrt(jnp.mean(sq)), jnp.std(sq, ddof=1) / jnp.sqrt(sq.shape[0])

    return jax.lax.map(per_tau, jnp.asarray(tau_grid, theta_source.dtype), batch_size=batch_size)


_curve_jit = jax.jit(_curve_impl, static_argnums=(6,))


def classifier_distance_curve(
    predict_fn: Any,
    theta_source: jax.Array,
    scales: jax.Array,
    X_ref: jax.Array,
    tau_grid: ArrayLike,
    *,
    key: jax.Array,
    n_eps: int = 128,
    batch_size: int = 8,
) -> tuple[jax.Array, jax.Array]:
    r"""Monte Carlo ``r(τ)`` of the scale construction for a classifier, on ``tau_grid``.

    .. math::

        r(τ)^2 = 2\, E_ε E_{x\sim Q}\,
        \mathrm{KL}\big(p(\cdot\mid x; θ_S + τ\, s⊙ε)\,\|\,p(\cdot\mid x; θ_S)\big),
        \qquad ε \sim N(0, I),

    with the per-``x`` KL of :func:`classifier_kl`; ``predict_fn(θ, X)`` gives the outputs
    (a :class:`pcbtl.networks.NetworkFn`: compiled once per architecture), ``θ_S`` =
    ``theta_source``, ``s`` = ``scales``, ``Q`` the rows of ``X_ref``. One set of ``n_eps``
    draws of ``ε`` from ``key`` serves every ``τ`` (common random numbers: a smooth curve).
    Returns ``(r, se_r2)``, with the standard error of ``r²`` over ``ε``.
    """
    eps = jax.random.normal(key, (int(n_eps), theta_source.shape[0]), dtype=theta_source.dtype)
    return _curve_jit(predict_fn, theta_source, scales, X_ref, tau_grid, eps, int(batch_size))


def fit_classifier_curve(
    predict_fn: Any,
    theta_source: jax.Array,
    scales: jax.Array,
    X_ref: jax.Array,
    rate: float,
    *,
    n_tau: int = 64,
    n_eps: int = 128,
    seed: int = 0,
) -> tuple[DistanceCurve, float]:
    r"""The grid and Monte Carlo curve ``r(τ)`` behind :class:`ClassifierScalePC`.

    A probe on ``{0} ∪ geomspace(2^{−12}, 2^{12})`` (``n_tau`` points) finds ``τ_end``, the
    first probe where ``r`` reaches ``min(q, 0.99·max r)`` with ``q = −log(10^{−4})/λ`` the
    prior's ``1 − 10^{−4}`` quantile (``r`` is bounded and levels off: the grid stops on the
    plateau or where the prior has no mass left), and ``τ_lo``, the last probe with
    ``r ≤ 10^{−3}/λ``. The curve is then ``{0} ∪ geomspace(τ_lo, τ_end, n_tau − 1)`` (resolution
    even in ``log τ``, where ``r ∝ τ`` near the source), with the same ``ε`` draws.
    Returns the checked curve (:func:`pcbtl.priors.check_distance_curve`, which warns when
    ``r`` is not increasing) and the largest relative Monte Carlo error ``se(r)/r`` on it.
    """
    key = jax.random.PRNGKey(int(seed) + 7919)
    probe = np.concatenate([[0.0], np.geomspace(2.0**-12, 2.0**12, n_tau - 1)])
    r_probe, _ = classifier_distance_curve(
        predict_fn, theta_source, scales, X_ref, jnp.asarray(probe), key=key, n_eps=n_eps
    )
    r_probe = np.asarray(r_probe, np.float64)
    if not np.all(np.isfinite(r_probe)) or np.max(r_probe) <= 0:
        raise ValueError(
            "the distance curve r(tau) is not positive and finite on the probe grid: perturbing "
            "the transfer layers does not change the classifier's predictions"
        )
    q = -math.log(1e-4) / rate
    end_target = min(q, 0.99 * float(np.max(r_probe)))
    tau_end = float(probe[np.nonzero(r_probe >= end_target)[0][0]])
    low = np.nonzero((r_probe <= 1e-3 / rate) & (probe > 0) & (probe < tau_end))[0]
    tau_lo = float(probe[low[-1]]) if low.size else min(float(probe[1]), tau_end / 2)
    grid = np.concatenate([[0.0], np.geomspace(tau_lo, tau_end, n_tau - 1)])
    r, se_r2 = classifier_distance_curve(
        predict_fn, theta_source, scales, X_ref, jnp.asarray(grid), key=key, n_eps=n_eps
    )
    r, se_r2 = np.asarray(r, np.float64), np.asarray(se_r2, np.float64)
    pos = r > 0
    rel_se = float(np.max(se_r2[pos] / (2 * r[pos] ** 2))) if pos.any() else 0.0
    return check_distance_curve(grid, r), rel_se


class ClassifierScalePC(dist.Distribution):
    r"""PC prior on the flexibility ``τ ∈ [0, τ_end]`` of the scale construction (no noise scale).

    .. math::

        π(τ) = \frac{λ\, e^{-λ \hat r(τ)}}{1 - e^{-λ \hat r(τ_{\mathrm{end}})}}\, \hat r'(τ),
        \qquad 0 \le τ \le τ_{\mathrm{end}},

    with ``r̂`` the monotone (PCHIP) interpolant of the :class:`pcbtl.priors.DistanceCurve`
    ``curve`` (:func:`pcbtl.priors.distance_curve_value`), ``τ_end`` its last grid point and
    ``λ`` = ``rate``: ``d = r̂(τ)`` follows ``Exp(λ)`` truncated at ``r̂(τ_end)``, the bound of
    the classifier's KL distance (see the module docstring). ``sample`` inverts ``r̂``
    exactly; ``log_prob`` carries the Jacobian ``r̂′(τ)``.
    """

    arg_constraints = {"rate": constraints.positive}
    reparametrized_params: list[str] = []

    def __init__(
        self, curve: DistanceCurve, rate: ArrayLike, *, validate_args: bool | None = None
    ) -> None:
        self.curve = DistanceCurve(jnp.asarray(curve.tau), jnp.asarray(curve.r))
        self.rate = jnp.asarray(rate)
        super().__init__(batch_shape=jnp.shape(self.rate), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.interval(0.0, self.curve.tau[-1])

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        shape = sample_shape + self.batch_shape
        v = jax.random.uniform(key, shape)
        d = -jnp.log1p(v * jnp.expm1(-self.rate * self.curve.r[-1])) / self.rate
        return jnp.minimum(distance_curve_inverse(self.curve, d), self.curve.tau[-1])

    def log_prob(self, value: ArrayLike) -> jax.Array:
        return _scale_log_prob(self.curve, self.rate, value)


@jax.jit
def _scale_log_prob(curve, rate, value):
    """``log π(τ)`` of :class:`ClassifierScalePC`, one compiled call."""
    r = distance_curve_value(curve, value)
    dr = distance_curve_value(curve, value, nu=1)
    return jnp.log(rate) - rate * r + jnp.log(dr) - jnp.log(-jnp.expm1(-rate * curve.r[-1]))
