r"""Penalized complexity (PC) priors on the distance between target and source predictives.

A PC prior (Simpson et al. 2017) puts an exponential prior on the distance of a model from its
*base model*. Here the base model is the source network's predictive ``p_S(y | x)`` and the
distance is

.. math::

    d(ξ) = \sqrt{2\,\mathrm{KL}(ξ)},\qquad
    \mathrm{KL}(ξ) = E_{x\sim Q}\,\mathrm{KL}\big(p_T(\cdot\mid x, ξ)\,\|\,p_S(\cdot\mid x)\big),

with ``d ~ Exponential(λ)`` and ``λ = −log(α) / U`` so that ``P(d > U) = α`` (:func:`pc_rate`).
For a Gaussian likelihood with shared noise ``σ``, ``d = RMS_x(g_T − g_S) / σ``: the number of
noise standard deviations the target mean function moves away from the source one.

Two exact push-forward constructions live here (Abba, Williams & Reich 2023):

* :class:`LastLayerPC` — the multivariate "sphere" prior on the last-layer coefficients;
* :class:`ScalePC` — the prior on the flexibility ``τ`` of ``θ = θ_S + τ s⊙ε`` on any set of layers,
  through the distance curve ``r(τ)`` (:class:`DistanceCurve`).
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import gammaln
from jax.typing import ArrayLike
from numpyro.distributions import constraints

from pcbtl._validation import check_positive, check_probability

__all__ = [
    "pc_rate",
    "ReferenceGram",
    "reference_gram",
    "last_layer_pc_log_density",
    "last_layer_pc_offset",
    "LastLayerPC",
    "PriorDataConflictWarning",
    "DistanceCurve",
    "check_distance_curve",
    "distance_curve_value",
    "distance_curve_inverse",
    "ScalePC",
]


def pc_rate(U: float, alpha: float) -> float:
    r"""Rate of the exponential PC prior on the distance.

    .. math::

        λ = -\log(α) / U \quad\Longleftrightarrow\quad P(d > U) = e^{-λU} = α
        \text{ for } d \sim \mathrm{Exp}(λ)

    (Simpson et al. 2017, §3.3). ``U`` must be positive and ``alpha`` (α) strictly between 0
    and 1; a :class:`ValueError` names the offending argument.

    Example
    -------
    >>> round(pc_rate(1.0, 0.05), 4)
    2.9957
    """
    U = check_positive(U, "U")
    alpha = check_probability(alpha, "alpha")
    return -math.log(alpha) / U


# --------------------------------------------------------------------------------------------
# (a) last layer: the sphere construction
# --------------------------------------------------------------------------------------------


class ReferenceGram(NamedTuple):
    """``G = Φ̃ᵀΦ̃ / m`` of the reference features, its Cholesky factor and the ridge used."""

    G: np.ndarray
    chol: np.ndarray
    ridge: float


def reference_gram(Phi_ref: np.ndarray, *, rel_ridge: float = 1e-4) -> ReferenceGram:
    r"""Gram matrix of the ``m × p`` reference features ``Phi_ref`` (Φ̃) and ``L`` with ``LLᵀ = G``.

    .. math::

        G = \tilde Φ^\top \tilde Φ / m \;(+\,ρ I),\qquad LL^\top = G

    Computed in float64. Penultimate features of a trained network are often nearly collinear,
    so ``G`` can be singular or too ill-conditioned for a float32 Cholesky. When its smallest
    eigenvalue is below ``rel_ridge · tr(G)/p``, the ridge ``ρ = rel_ridge · tr(G)/p`` is added
    to the diagonal and returned in ``ridge``. The distance is then

    .. math::

        d^2 = (δ^\top G_0 δ + ρ\|δ\|^2) / σ^2

    (``G₀`` without ridge): the RMS change of predictions over ``Q`` plus a small penalty on the
    coefficient change itself. Without it, directions that no reference input sees would be
    unrestrained and could send predictions at new inputs anywhere (measured on band gaps with ``Q``
    the few hundred target inputs alone: eigenvalues of ``G`` near 1e-4, and test materials along
    those directions 10 eV off).
    """
    Phi_ref = np.asarray(Phi_ref, dtype=np.float64)
    m, p = Phi_ref.shape
    G = Phi_ref.T @ Phi_ref / m
    scale = max(np.trace(G) / p, 1e-300)
    eig_min = float(np.linalg.eigvalsh(G)[0])
    ridge = 0.0
    if eig_min < rel_ridge * scale:
        ridge = rel_ridge * scale
        G = G + ridge * np.eye(p)
    return ReferenceGram(G=G, chol=np.linalg.cholesky(G), ridge=ridge)


def last_layer_pc_log_density(
    beta: ArrayLike,
    beta_source: jax.Array,
    chol_G: jax.Array,
    sigma: ArrayLike,
    rate: ArrayLike,
) -> jax.Array:
    r"""Closed-form log density of the last-layer PC prior ``π(β | σ)``.

    With ``δ = β − β_S``, ``d = sqrt(δᵀGδ)/σ = ‖Lᵀδ‖/σ`` and ``p = dim β``:

    .. math::

        π(β \mid σ) = λ e^{-λd}\,\frac{Γ(p/2)}{2 π^{p/2} d^{p-1}}\,\frac{|G|^{1/2}}{σ^p},

    i.e. ``w = Lᵀδ/σ`` is uniform in direction with ``‖w‖ = d ~ Exp(λ)``; the factor
    ``Γ(p/2)/(2π^{p/2} d^{p−1})`` is one over the area of the sphere of radius ``d`` and
    ``|G|^{1/2}/σ^p`` the Jacobian of ``β ↦ w``. Dropping ``d^{−(p−1)}`` would make
    ``d ~ Gamma(p, λ)`` instead.

    Arguments: ``beta`` (…, p), ``beta_source`` (p,), ``chol_G`` lower ``L`` (p, p),
    ``sigma > 0``, ``rate`` = λ.
    """
    p = beta_source.shape[-1]
    delta = beta - beta_source
    sigma = jnp.asarray(sigma)
    w = (delta @ chol_G) / jnp.expand_dims(sigma, -1)
    d = jnp.linalg.norm(w, axis=-1)
    half_logdet = jnp.sum(jnp.log(jnp.diag(chol_G)))
    log_area = math.log(2.0) + 0.5 * p * math.log(math.pi) - gammaln(0.5 * p)
    radial = (p - 1) * jnp.log(d) if p > 1 else 0.0  # 0·log 0 = 0 when p = 1
    return jnp.log(rate) - rate * d - log_area - radial + half_logdet - p * jnp.log(sigma)


def last_layer_pc_offset(
    distance: ArrayLike, z: jax.Array, chol_G: jax.Array, sigma: ArrayLike
) -> jax.Array:
    r"""Non-centred offset of the last-layer PC prior.

    .. math::

        δ = β - β_S = d\,σ\,L^{-\top} z / \|z\|,\qquad z \sim N(0, I_p),\; d \sim \mathrm{Exp}(λ)

    with ``d`` = ``distance`` (…), ``z`` (…, p), ``L`` = ``chol_G`` and ``σ`` = ``sigma``.
    ``‖Lᵀδ‖/σ = d`` exactly, and ``z/‖z‖`` is uniform on the sphere, so ``β_S + δ`` has the
    density of :func:`last_layer_pc_log_density`.
    """
    u = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    w = jnp.expand_dims(distance, -1) * u
    flat = w.reshape(-1, w.shape[-1])
    delta = solve_triangular(chol_G.T, flat.T, lower=False).T.reshape(w.shape)
    return jnp.expand_dims(sigma, -1) * delta


class LastLayerPC(dist.Distribution):
    r"""The last-layer PC prior on ``β ∈ R^p`` given ``σ`` (see :func:`last_layer_pc_log_density`).

    ``sample`` uses the non-centred construction of :func:`last_layer_pc_offset`;
    ``log_prob`` is the closed form, so NUTS on ``β ~ LastLayerPC(...)`` alone must give
    ``d ~ Exp(λ)`` — the test that catches a wrong Jacobian.
    """

    arg_constraints = {
        "beta_source": constraints.real_vector,
        "sigma": constraints.positive,
        "rate": constraints.positive,
    }
    support = constraints.real_vector
    reparametrized_params = ["sigma"]

    def __init__(
        self,
        beta_source: ArrayLike,
        chol_G: ArrayLike,
        sigma: ArrayLike,
        rate: ArrayLike,
        *,
        validate_args: bool | None = None,
    ) -> None:
        self.beta_source = jnp.asarray(beta_source)
        self.chol_G = jnp.asarray(chol_G)
        self.sigma = jnp.asarray(sigma)
        self.rate = jnp.asarray(rate)
        super().__init__(
            batch_shape=jnp.shape(self.sigma),
            event_shape=self.beta_source.shape[-1:],
            validate_args=validate_args,
        )

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        k1, k2 = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        d = jax.random.exponential(k1, shape) / self.rate
        z = jax.random.normal(k2, shape + self.event_shape)
        return self.beta_source + last_layer_pc_offset(d, z, self.chol_G, self.sigma)

    def log_prob(self, value: ArrayLike) -> jax.Array:
        return last_layer_pc_log_density(
            value, self.beta_source, self.chol_G, self.sigma, self.rate
        )

    def distance(self, value: ArrayLike) -> jax.Array:
        """``d = ‖Lᵀ(β − β_S)‖ / σ`` for draws ``value``."""
        return jnp.linalg.norm((value - self.beta_source) @ self.chol_G, axis=-1) / self.sigma


# --------------------------------------------------------------------------------------------
# (b) scale prior: the distance curve r(τ)
# --------------------------------------------------------------------------------------------


class PriorDataConflictWarning(UserWarning):
    """The posterior sits where the PC prior expected almost none of its mass."""


class DistanceCurve(NamedTuple):
    r"""Grid values ``r`` at ``tau`` of the distance curve of the scale construction

    .. math::

        r(τ) = \sqrt{E_ε E_{x\sim Q}\big(g(x; θ_S + τ\, s⊙ε) - g_S(x)\big)^2},\qquad
        ε \sim N(0, I)

    ``tau`` is increasing with ``tau[0] = 0`` and ``r[0] = 0``; ``r`` must be strictly increasing
    for the push-forward to be one-to-one. Between grid points ``r`` is the monotone cubic
    (PCHIP, Fritsch & Carlson 1980) interpolant of :func:`distance_curve_value`; beyond the last
    point it is extended linearly with the slope of the last interval, so ``r̂`` is continuous,
    strictly increasing and unbounded, and ``ScalePC`` is an exact push-forward of ``Exp(λ)``
    through ``r̂``. Either dtype works under either JAX precision: the interpolant computes in
    the promoted dtype of the grid and the query.
    """

    tau: jax.Array
    r: jax.Array


def _end_slope(curve: DistanceCurve) -> jax.Array:
    return (curve.r[-1] - curve.r[-2]) / (curve.tau[-1] - curve.tau[-2])


def _edge_slope(h0: jax.Array, h1: jax.Array, m0: jax.Array, m1: jax.Array) -> jax.Array:
    """One-sided three-point end slope, limited to keep the cubic monotone (Moler 2004, §3.6)."""
    d = ((2.0 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    d = jnp.where(jnp.sign(d) != jnp.sign(m0), 0.0, d)
    overshoot = (jnp.sign(m0) != jnp.sign(m1)) & (jnp.abs(d) > 3.0 * jnp.abs(m0))
    return jnp.where(overshoot, 3.0 * m0, d)


def _pchip_slopes(x: jax.Array, y: jax.Array) -> jax.Array:
    r"""Knot derivatives ``d_k`` of the monotone piecewise-cubic Hermite interpolant (PCHIP).

    With ``h_k = x_{k+1} − x_k`` and secants ``m_k = (y_{k+1} − y_k)/h_k``, the interior slopes
    are the weighted harmonic means (Fritsch & Butland 1984)

    .. math::

        \frac{w_1 + w_2}{d_k} = \frac{w_1}{m_{k-1}} + \frac{w_2}{m_k},\qquad
        w_1 = 2h_k + h_{k-1},\; w_2 = h_k + 2h_{k-1},

    and ``d_k = 0`` where ``m_{k−1}`` and ``m_k`` differ in sign or either is zero; the end
    slopes are one-sided three-point estimates limited as in Moler (2004). Then
    ``0 ≤ d_k ≤ 3 min(m_{k−1}, m_k)`` for increasing data, inside the Fritsch & Carlson (1980)
    region where every cubic piece is monotone. The same slopes as SciPy's
    ``PchipInterpolator``. Two knots give the straight line.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    h = jnp.diff(x)
    m = jnp.diff(y) / h
    if x.shape[0] == 2:
        return jnp.stack([m[0], m[0]])
    h0, h1, m0, m1 = h[:-1], h[1:], m[:-1], m[1:]
    w1, w2 = 2.0 * h1 + h0, h1 + 2.0 * h0
    flat = (jnp.sign(m0) != jnp.sign(m1)) | (m0 == 0) | (m1 == 0)
    safe_m0 = jnp.where(flat, 1.0, m0)
    safe_m1 = jnp.where(flat, 1.0, m1)
    interior = jnp.where(flat, 0.0, (w1 + w2) / (w1 / safe_m0 + w2 / safe_m1))
    first = _edge_slope(h[0], h[1], m[0], m[1])
    last = _edge_slope(h[-1], h[-2], m[-1], m[-2])
    return jnp.concatenate([first[None], interior, last[None]])


def _hermite(
    y0: jax.Array,
    y1: jax.Array,
    d0: jax.Array,
    d1: jax.Array,
    h: jax.Array,
    s: jax.Array,
    nu: int,
) -> jax.Array:
    r"""Cubic Hermite piece at ``s = (τ − τ_k)/h ∈ [0, 1]``: value (``nu=0``) or ``d/dτ`` (1).

    .. math::

        p(s) = (2s^3 - 3s^2 + 1) y_0 + (s^3 - 2s^2 + s) h d_0 + (3s^2 - 2s^3) y_1
               + (s^3 - s^2) h d_1
    """
    if nu == 0:
        return (
            (2 * s**3 - 3 * s**2 + 1) * y0
            + (s**3 - 2 * s**2 + s) * h * d0
            + (3 * s**2 - 2 * s**3) * y1
            + (s**3 - s**2) * h * d1
        )
    return 6 * (s**2 - s) * (y0 - y1) / h + (3 * s**2 - 4 * s + 1) * d0 + (3 * s**2 - 2 * s) * d1


@partial(jax.jit, static_argnames="nu")
def distance_curve_value(curve: DistanceCurve, tau: ArrayLike, nu: int = 0) -> jax.Array:
    r"""``r̂(τ)`` (``nu=0``) or ``r̂′(τ)`` (``nu=1``) of the monotone interpolant, jittable.

    On ``[τ_0, τ_{K−1}]`` of the grid ``curve.tau`` (values ``curve.r``), ``r̂`` is the cubic
    Hermite interpolant with the PCHIP knot slopes of ``_pchip_slopes``; beyond it

    .. math::

        \hat r(τ) = r_{K-1} + \frac{r_{K-1} - r_{K-2}}{τ_{K-1} - τ_{K-2}} (τ - τ_{K-1}).

    Pure ``jax.numpy``: computed in the promoted dtype of ``curve`` and ``tau``, so a float32
    curve works with ``jax_enable_x64`` on (and the other way round).
    """
    if nu not in (0, 1):
        raise ValueError(f"nu must be 0 or 1, got {nu}")
    x, y = curve.tau, curve.r
    tau = jnp.asarray(tau)
    t_max = x[-1]
    d = _pchip_slopes(x, y)
    t = jnp.clip(tau, x[0], t_max)
    k = jnp.clip(jnp.searchsorted(x, t, side="right") - 1, 0, x.shape[0] - 2)
    h = x[k + 1] - x[k]
    inside = _hermite(y[k], y[k + 1], d[k], d[k + 1], h, (t - x[k]) / h, nu)
    slope = _end_slope(curve)
    if nu == 0:
        outside = y[-1] + slope * (tau - t_max)
    else:
        outside = jnp.broadcast_to(slope, jnp.shape(tau))
    return jnp.where(tau > t_max, outside, inside)


@partial(jax.jit, static_argnames="iterations")
def distance_curve_inverse(
    curve: DistanceCurve, r_value: ArrayLike, *, iterations: int = 40
) -> jax.Array:
    r"""``τ = r̂^{−1}(r_value)`` for the interpolant of :func:`distance_curve_value` (jittable).

    Inside the grid: the interval ``k`` with ``r_k ≤ r_value < r_{k+1}`` is found by search and
    the cubic piece is inverted by ``iterations`` bisection steps on ``s ∈ [0, 1]`` (each halves
    the bracket; 40 reach float64 resolution). Beyond the grid the linear extension is inverted
    exactly:

    .. math::

        τ = τ_{K-1} + (r - r_{K-1})\,\frac{τ_{K-1} - τ_{K-2}}{r_{K-1} - r_{K-2}},
        \qquad r \ge r_{K-1}.
    """
    x, y = curve.tau, curve.r
    r_value = jnp.asarray(r_value)
    dtype = jnp.result_type(x, y, r_value)
    d = _pchip_slopes(x, y)
    k = jnp.clip(jnp.searchsorted(y, r_value, side="right") - 1, 0, y.shape[0] - 2)
    h = x[k + 1] - x[k]
    y0, y1, d0, d1 = y[k], y[k + 1], d[k], d[k + 1]

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = _hermite(y0, y1, d0, d1, h, mid, 0) < r_value
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo = jnp.zeros(jnp.shape(r_value), dtype)
    lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, jnp.ones_like(lo)))
    inside = x[k] + 0.5 * (lo + hi) * h
    outside = x[-1] + (r_value - y[-1]) / _end_slope(curve)
    return jnp.where(r_value >= y[-1], outside, inside)


def check_distance_curve(tau: ArrayLike, r: ArrayLike) -> DistanceCurve:
    r"""Validate a computed curve; warn when ``r`` is not strictly increasing and repair it.

    ``tau`` must start at 0 and increase strictly (else :class:`ValueError`); ``r`` is shifted so
    that ``r_0 = 0``. A non-increasing Monte Carlo ``r`` means the push-forward is not one-to-one
    on the grid; then, with a ``RuntimeWarning``,

    .. math::

        r_k \leftarrow \max_{j \le k} r_j + 10^{-5}\, \max_j r_j\, τ_k / τ_{K-1}.

    The result is in JAX's default float dtype (float32, or float64 under ``jax_enable_x64``).
    """
    tau = np.asarray(tau, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if tau[0] != 0.0 or np.any(np.diff(tau) <= 0):
        raise ValueError("tau grid must start at 0 and increase strictly")
    r = r - r[0]
    if np.any(np.diff(r) <= 0):
        warnings.warn(
            "the Monte Carlo distance curve r(tau) is not strictly increasing on the grid, so the "
            "scale prior's push-forward is not one-to-one there; using its running maximum "
            "(increase n_eps or change the transfer set)",
            RuntimeWarning,
            stacklevel=2,
        )
        r = np.maximum.accumulate(r) + 1e-5 * r.max() * tau / tau[-1]
    # JAX's default float: float32, or float64 under ``jax_enable_x64``
    return DistanceCurve(tau=jnp.asarray(tau), r=jnp.asarray(r))


class ScalePC(dist.Distribution):
    r"""PC prior on the flexibility ``τ ≥ 0`` of the scale construction, given ``σ``.

    .. math::

        d = \hat r(τ)/σ \sim \mathrm{Exp}(λ) \quad\Longleftrightarrow\quad
        π(τ \mid σ) = λ\, e^{-λ \hat r(τ)/σ}\, \hat r'(τ) / σ,

    with ``σ`` = ``sigma``, ``λ`` = ``rate`` and ``r̂`` the monotone interpolant of the :class:`DistanceCurve` ``curve``. For a
    last-layer transfer set ``r`` is linear and ``τ`` is exponential (the PC prior of a scale).
    ``sample`` inverts ``r̂`` exactly; ``log_prob`` carries the Jacobian ``r̂′(τ)/σ``.
    """

    arg_constraints = {"sigma": constraints.positive, "rate": constraints.positive}
    support = constraints.positive

    def __init__(
        self,
        curve: DistanceCurve,
        sigma: ArrayLike,
        rate: ArrayLike,
        *,
        validate_args: bool | None = None,
    ) -> None:
        self.curve = DistanceCurve(jnp.asarray(curve.tau), jnp.asarray(curve.r))
        self.sigma = jnp.asarray(sigma)
        self.rate = jnp.asarray(rate)
        super().__init__(batch_shape=jnp.shape(self.sigma), validate_args=validate_args)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        shape = sample_shape + self.batch_shape
        d = jax.random.exponential(key, shape) / self.rate
        return distance_curve_inverse(self.curve, d * self.sigma)

    def log_prob(self, value: ArrayLike) -> jax.Array:
        r = distance_curve_value(self.curve, value)
        dr = distance_curve_value(self.curve, value, nu=1)
        return jnp.log(self.rate) - self.rate * r / self.sigma + jnp.log(dr) - jnp.log(self.sigma)
