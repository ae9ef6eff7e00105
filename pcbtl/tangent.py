r"""The scale PC prior on the network linearised at the source (the *tangent* model).

The scale construction (:class:`pcbtl.priors.ScalePC`) perturbs the transfer set, ``θ = θ_S + τ s⊙ε``. Its
first-order Taylor expansion at the source weights is the tangent model

.. math::

    g_τ(x) = g_S(x) + τ\, J_s(x)\, ε, \qquad J_s(x) = \nabla_θ g(x; θ_S) ⊙ s, \qquad
    ε \sim N(0, I_D),

a Gaussian process with mean ``g_S`` and kernel ``τ² J_s(x) J_s(x')ᵀ`` (the empirical neural
tangent kernel of the transfer layers at the source; Jacot et al. 2018, and for the posterior of
a network linearised at its weights, Immer et al. 2021). Two things follow exactly.

**The PC prior is exponential in τ.** The divergence averaged over ``ε`` is

.. math::

    r(τ)^2 = E_ε E_{x∼Q} (g_τ(x) − g_S(x))^2 = τ^2 κ^2, \qquad
    κ^2 = \frac{1}{m} \sum_{j=1}^{m} \lVert J_s(\tilde x_j) \rVert^2,

so ``r`` is linear, ``d = r(τ)/σ = κτ/σ ∼ Exp(λ)`` is ``τ | σ ∼ Exp(λκ/σ)``: no Monte Carlo
curve and no interpolation.

**ε integrates out.** With the target rows ``X`` (``n`` rows), the residuals
``u = y − g_S(X)`` and ``J = J_s(X)`` (``n × D``),

.. math::

    u \mid τ, σ \sim N(0,\; σ^2 I_n + τ^2 J Jᵀ).

Writing ``J Jᵀ = W Λ Wᵀ`` over the ``k`` retained eigen-directions (eigenvalues ``ℓ_i``),
``c = Wᵀ u`` and ``ρ = ‖u‖² − ‖c‖²`` (what lies outside them),

.. math::

    \log p(u \mid τ, σ) = −\tfrac12 \Big[ \sum_{i=1}^{k} \Big(\log(σ^2 + τ^2 ℓ_i)
        + \frac{c_i^2}{σ^2 + τ^2 ℓ_i}\Big) + (n − k)\log σ^2 + \frac{ρ}{σ^2} + n \log 2π \Big],

O(k) per evaluation once the eigen-decomposition is done. A sampler then explores the
two-dimensional posterior of ``(τ, σ)`` (it mixes: there are no weights to get stuck in), and
``ε`` is drawn exactly from its Gaussian conditional, per draw of ``(τ, σ)``: with
``V = Jᵀ W Λ^{−1/2}`` (orthonormal columns, ``D × k``) and ``z ∼ N(0, I_D)``,

.. math::

    ε = V \,\mathrm{diag}\Big(\frac{τ \sqrt{ℓ_i}}{σ^2 + τ^2 ℓ_i}\Big) c
        + z − V \,\mathrm{diag}\Big(1 − \frac{σ}{\sqrt{σ^2 + τ^2 ℓ_i}}\Big) Vᵀ z,

whose mean and covariance are those of ``p(ε | u, τ, σ)``. The pairs ``(τ, σ, ε)`` are then
draws of the joint posterior, and the mean function of each is ``g_S(x) + τ J_s(x) ε``.

Eigen-directions with ``ℓ_i < 10⁻⁶ ℓ_max`` are dropped: the Jacobian is computed in float32, so
below that its Gram matrix is rounding noise; along them the data say nothing and ``ε`` keeps its
prior (the ``(n − k)`` term and ``ρ`` carry the residual there).

**An ensemble of sources** (:func:`ensemble_parametrization`). With ``M`` source networks of one
architecture (trained from different seeds) the base model is their average
``ḡ_S(x) = (1/M) Σ_m g_{S_m}(x)``, itself a network: the ``M`` networks side by side, their outputs
averaged. Its transfer set is the ``M`` copies of the transfer layers, ``θ = (θ_1, …, θ_M)``
(``D = Σ_m D_m``), and everything above holds for it unchanged:

.. math::

    g_τ(x) = ḡ_S(x) + τ\, \bar J_s(x)\, ε, \qquad
    \bar J_s(x) = \tfrac{1}{M} \big(J_{s,1}(x), …, J_{s,M}(x)\big), \qquad
    \bar J_s \bar J_sᵀ = \tfrac{1}{M^2} \sum_{m=1}^{M} J_{s,m} J_{s,m}ᵀ,

one ``τ``, one ``σ``, ``r(τ) = \bar κ τ`` exactly with ``\bar κ^2 = mean_j ‖\bar J_s(x̃_j)‖²``,
``d = \bar κ τ/σ`` the ``ε``-averaged RMS shift from the *averaged* source. It is one Gaussian
model (not a mixture of ``M`` posteriors), so its intervals are those of one posterior; the
kernel is the average of the members' tangent kernels. Measured on the band gaps
(``benchmarks/README.md``), four sources lower the hurdle MAE where a single source's tangent
space cannot follow the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pcbtl.networks import NetworkFn, TransferParametrization

__all__ = [
    "TangentStats",
    "ensemble_apply",
    "ensemble_parametrization",
    "tangent_jacobian",
    "tangent_kappa",
    "tangent_stats",
    "tangent_loglik",
    "tangent_conditional_eps",
    "tangent_means",
]

#: eigen-directions of ``J Jᵀ`` below this share of the largest eigenvalue are dropped
EIGEN_FLOOR = 1e-6
#: rows of the Jacobian computed per compiled call
ROW_CHUNK = 256


class TangentStats(NamedTuple):
    """What the collapsed likelihood of the tangent model needs (see the module docstring).

    ``ell`` the eigenvalues of ``J Jᵀ`` in decreasing order, the ``k`` retained ones first and
    zeros after them up to ``min(n, D)`` entries; ``c = Wᵀu`` the residuals projected on their
    eigenvectors (zeros likewise); ``rho = ‖u‖² − ‖c‖²`` (computed as the residual of the
    projection); ``n`` the number of rows. ``basis`` is ``V = JᵀWΛ^{−1/2}`` (``D × k``), the
    orthonormal directions of weight space the data inform, used to draw ``ε`` after sampling.
    """

    ell: jax.Array
    c: jax.Array
    rho: jax.Array
    n: jax.Array
    basis: np.ndarray


@lru_cache(maxsize=64)
def ensemble_apply(base: Any, members: int) -> Any:
    r"""``apply(θ, aux, X) = (1/M) Σ_m base(θ_m, aux_m, X)`` for ``θ = (θ_1, …, θ_M)`` and ``aux``
    the members' ``aux`` stacked on a leading axis of length ``M = members``: the averaged
    network of :func:`ensemble_parametrization` (one function object per ``(base, M)``, so jitted
    callers compile once per architecture and ensemble size)."""

    def apply(theta: jax.Array, aux: Any, X: jax.Array) -> jax.Array:
        th = theta.reshape(members, -1)
        return jnp.mean(jax.vmap(lambda t, a: base(t, a, X))(th, aux), axis=0)

    return apply


def ensemble_parametrization(tps: Sequence[TransferParametrization]) -> TransferParametrization:
    r"""The averaged network ``ḡ(x; θ) = (1/M) Σ_m g_m(x; θ_m)`` of ``M`` transfer
    parametrizations of one architecture and transfer set, as one parametrization:
    ``θ_S = (θ_{S,1}, …, θ_{S,M})``, scales concatenated likewise (module docstring). One member
    is returned as it is."""
    tps = list(tps)
    if not tps:
        raise ValueError("an ensemble needs at least one source network")
    if len(tps) == 1:
        return tps[0]
    first = tps[0]
    for tp in tps[1:]:
        if tp.layers != first.layers or tp.predict_fn.apply is not first.predict_fn.apply:
            raise ValueError(
                "the source networks of an ensemble must share one architecture and transfer set"
            )
    aux = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[tp.predict_fn.aux for tp in tps])
    return TransferParametrization(
        first.layers,
        jnp.concatenate([tp.theta_source for tp in tps]),
        jnp.concatenate([tp.scales for tp in tps]),
        NetworkFn(ensemble_apply(first.predict_fn.apply, len(tps)), aux),
    )


def _row_grad(predict_fn: NetworkFn, theta: jax.Array, X: jax.Array) -> jax.Array:
    def one(x):
        return jax.grad(lambda t: predict_fn(t, x[None])[0])(theta)

    return jax.vmap(one)(X)


_row_grad_jit = jax.jit(_row_grad)


@jax.jit
def _row_sq_norms(predict_fn: NetworkFn, theta: jax.Array, scales: jax.Array, X: jax.Array):
    return jnp.sum((_row_grad(predict_fn, theta, X) * scales) ** 2, axis=1)


def _padded_chunks(X: jax.Array):
    """``(start, m, rows)`` over ``X`` in chunks of ``ROW_CHUNK`` rows: ``rows`` holds rows
    ``start … start + m − 1``, the last chunk padded with copies of its first row, so every
    compiled call sees one shape (one compilation); keep the first ``m`` results."""
    for start in range(0, X.shape[0], ROW_CHUNK):
        rows = X[start : start + ROW_CHUNK]
        m = rows.shape[0]
        if m < ROW_CHUNK:
            rows = jnp.concatenate([rows, jnp.repeat(rows[:1], ROW_CHUNK - m, axis=0)])
        yield start, m, rows


def tangent_jacobian(
    predict_fn: NetworkFn, theta: jax.Array, scales: jax.Array, X: Any
) -> np.ndarray:
    r"""``J_s(X) = ∇_θ g(X; θ) ⊙ s``, ``n × D`` in float64 (computed in float32, ``ROW_CHUNK``
    rows per compiled call; the last chunk is padded so every call has one shape)."""
    X = jnp.asarray(X, jnp.float32)
    out = np.empty((X.shape[0], theta.shape[0]), np.float64)
    for start, m, rows in _padded_chunks(X):
        out[start : start + m] = np.asarray(_row_grad_jit(predict_fn, theta, rows) * scales)[:m]
    return out


def tangent_kappa(predict_fn: NetworkFn, theta: jax.Array, scales: jax.Array, Xref: Any) -> float:
    r"""``κ = sqrt(mean_j ‖J_s(x̃_j)‖²)`` over the reference inputs: ``r(τ) = κτ`` exactly."""
    Xref = jnp.asarray(Xref, jnp.float32)
    if Xref.shape[0] == 0:
        raise ValueError("the tangent prior needs at least one reference input")
    total = 0.0
    for _, m, rows in _padded_chunks(Xref):
        sq = np.asarray(_row_sq_norms(predict_fn, theta, scales, rows), np.float64)[:m]
        total += float(np.sum(sq))
    return float(np.sqrt(total / Xref.shape[0]))


def tangent_stats(J: np.ndarray, resid: np.ndarray) -> TangentStats:
    r"""Eigen-decomposition of ``J Jᵀ`` (through the smaller of ``J Jᵀ`` and ``JᵀJ``), the
    projected residuals and the orthonormal basis ``V``, in float64."""
    J = np.asarray(J, np.float64)
    u = np.asarray(resid, np.float64)
    n, D = J.shape
    if not (np.all(np.isfinite(J)) and np.all(np.isfinite(u))):
        raise FloatingPointError("non-finite Jacobian or residuals in the tangent model")
    size = min(n, D)
    if n <= D:
        ell, W = np.linalg.eigh(J @ J.T)
        ell, W = ell[::-1], W[:, ::-1]
        keep = ell > EIGEN_FLOOR * max(float(ell[0]), 0.0)
        ell, W = ell[keep], W[:, keep]
        V = (J.T @ W) / np.sqrt(ell)
    else:
        ell, V = np.linalg.eigh(J.T @ J)
        ell, V = ell[::-1], V[:, ::-1]
        keep = ell > EIGEN_FLOOR * max(float(ell[0]), 0.0)
        ell, V = ell[keep], V[:, keep]
        W = (J @ V) / np.sqrt(ell)
    c = W.T @ u
    rho = float(np.sum((u - W @ c) ** 2))
    pad = size - ell.size
    return TangentStats(
        ell=jnp.asarray(np.concatenate([ell, np.zeros(pad)]), jnp.float32),
        c=jnp.asarray(np.concatenate([c, np.zeros(pad)]), jnp.float32),
        rho=jnp.asarray(rho, jnp.float32),
        n=jnp.asarray(n, jnp.float32),
        basis=V.astype(np.float32),
    )


def tangent_loglik(tau: jax.Array, sigma: jax.Array, stats: TangentStats) -> jax.Array:
    r"""``log N(u | 0, σ² I + τ² J Jᵀ)`` from :class:`TangentStats` (module docstring), O(k)."""
    v = sigma**2 + tau**2 * stats.ell
    k = stats.ell.shape[0]
    return -0.5 * (
        jnp.sum(jnp.log(v) + stats.c**2 / v)
        + (stats.n - k) * jnp.log(sigma**2)
        + stats.rho / sigma**2
        + stats.n * jnp.log(2 * jnp.pi)
    )


def tangent_conditional_eps(
    tau: np.ndarray,
    sigma: np.ndarray,
    stats: TangentStats,
    seed: int = 0,
    chunk: int = 256,
) -> np.ndarray:
    r"""One exact draw of ``ε ∼ p(ε | u, τ_s, σ_s)`` per draw ``s`` (module docstring), float32
    array ``(S, D)``; ``seed`` fixes the normal draws ``z``."""
    tau = np.asarray(tau, np.float64).reshape(-1)
    sigma = np.asarray(sigma, np.float64).reshape(-1)
    V = np.asarray(stats.basis, np.float32)
    k = V.shape[1]
    ell = np.asarray(stats.ell, np.float64)[:k]
    c = np.asarray(stats.c, np.float64)[:k]
    rng = np.random.default_rng(seed)
    out = np.empty((tau.size, V.shape[0]), np.float32)
    for start in range(0, tau.size, chunk):
        t = tau[start : start + chunk, None]
        s = sigma[start : start + chunk, None]
        v = s**2 + t**2 * ell[None, :]
        mean_coef = t * np.sqrt(ell)[None, :] / v * c[None, :]
        shrink = 1.0 - s / np.sqrt(v)
        z = rng.standard_normal((t.shape[0], V.shape[0])).astype(np.float32)
        coef = mean_coef - shrink * (z @ V).astype(np.float64)
        out[start : start + t.shape[0]] = z + (coef.astype(np.float32) @ V.T)
    return out


def tangent_means(
    predict_fn: NetworkFn,
    theta: jax.Array,
    scales: jax.Array,
    tau: np.ndarray,
    eps: np.ndarray,
    X: Any,
) -> np.ndarray:
    r"""Draws of the tangent model's mean ``g_S(x) + τ_s J_s(x) ε_s`` at ``X``: ``(S, n)``."""
    X = np.asarray(X, np.float32)
    g0 = np.asarray(predict_fn(theta, jnp.asarray(X)), np.float64)
    tau = np.asarray(tau, np.float64).reshape(-1)
    eps = np.asarray(eps, np.float32)
    out = np.empty((tau.size, X.shape[0]), np.float64)
    for start in range(0, X.shape[0], ROW_CHUNK):
        rows = slice(start, min(start + ROW_CHUNK, X.shape[0]))
        J = tangent_jacobian(predict_fn, theta, scales, X[rows]).astype(np.float32)
        out[:, rows] = g0[None, rows] + tau[:, None] * (eps @ J.T).astype(np.float64)
    return out
