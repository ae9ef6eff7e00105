r"""Penalized complexity (PC) priors on the distance between target and source predictives.

A PC prior (Simpson et al. 2017) puts an exponential prior on the distance of a model from its
*base model*. Here the base model is the source network's predictive ``p_S(y | x)`` and the
distance is

    d(ξ) = sqrt(2 KL(ξ)),   KL(ξ) = E_{x~Q} KL( p_T(·|x, ξ) || p_S(·|x) ),

with ``d ~ Exponential(λ)`` and ``λ = −log(α) / U`` so that ``P(d > U) = α`` (:func:`pc_rate`).
For a Gaussian likelihood with shared noise ``σ``, ``d = RMS_x(g_T − g_S) / σ``: the number of
noise standard deviations the target mean function moves away from the source one.

Two exact push-forward constructions live here (Abba, Williams & Reich 2023; DESIGN.md §2):

* :class:`LastLayerPC` — the multivariate "sphere" prior on the last-layer coefficients;
* :class:`ScalePC` — the prior on the flexibility ``τ`` of ``θ = θ_S + τ s⊙ε`` on any set of layers,
  through the distance curve ``r(τ)`` (:class:`DistanceCurve`).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import interpax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import gammaln
from numpyro.distributions import constraints

from pcbtl._validation import check_positive, check_probability

__all__ = [
    "pc_rate",
    "LastLayerPC",
    "last_layer_pc_log_density",
    "reference_gram",
    "DistanceCurve",
    "distance_curve_value",
    "distance_curve_inverse",
    "ScalePC",
]


def pc_rate(U: float, alpha: float) -> float:
    r"""Rate of the exponential PC prior on the distance: ``λ = −log(α) / U``.

    Chosen so that ``P(d > U) = α`` for ``d ~ Exponential(λ)`` (Simpson et al. 2017, §3.3).
    ``U`` must be positive and ``alpha`` strictly between 0 and 1.
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
    r"""Gram matrix ``G = Φ̃ᵀΦ̃ / m`` of the ``m × p`` reference features and ``L`` with ``LLᵀ = G``.

    Computed in float64. Penultimate features of a trained network are often nearly collinear,
    so ``G`` can be singular or too ill-conditioned for a float32 Cholesky. When its smallest
    eigenvalue is below ``rel_ridge · tr(G)/p``, the ridge ``ρ = rel_ridge · tr(G)/p`` is added
    to the diagonal and returned in ``ridge``. The distance is then

        d² = (δᵀG₀δ + ρ‖δ‖²) / σ²

    (``G₀`` without ridge): the RMS change of predictions over ``Q`` plus a small penalty on the
    coefficient change itself. Without it, directions that no reference input sees would be
    unrestrained and could send predictions at new inputs anywhere (DESIGN.md §2).
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


def last_layer_pc_log_density(beta, beta_source, chol_G, sigma, rate):
    r"""Closed-form log density of the last-layer PC prior ``π(β | σ)``.

    With ``δ = β − β_S``, ``d = sqrt(δᵀGδ)/σ = ‖Lᵀδ‖/σ`` and ``p = dim β``:

        π(β | σ) = λ e^{−λd} · Γ(p/2) / (2 π^{p/2} d^{p−1}) · |G|^{1/2} / σ^p,

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


def last_layer_pc_offset(distance, z, chol_G, sigma):
    r"""Non-centred offset ``δ = β − β_S = d σ L^{−ᵀ} z / ‖z‖`` (``z ~ N(0, I_p)``, ``d ~ Exp(λ)``).

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

    def __init__(self, beta_source, chol_G, sigma, rate, *, validate_args=None):
        self.beta_source = jnp.asarray(beta_source)
        self.chol_G = jnp.asarray(chol_G)
        self.sigma = jnp.asarray(sigma)
        self.rate = jnp.asarray(rate)
        super().__init__(
            batch_shape=jnp.shape(self.sigma),
            event_shape=self.beta_source.shape[-1:],
            validate_args=validate_args,
        )

    def sample(self, key, sample_shape=()):
        k1, k2 = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        d = jax.random.exponential(k1, shape) / self.rate
        z = jax.random.normal(k2, shape + self.event_shape)
        return self.beta_source + last_layer_pc_offset(d, z, self.chol_G, self.sigma)

    def log_prob(self, value):
        return last_layer_pc_log_density(
            value, self.beta_source, self.chol_G, self.sigma, self.rate
        )

    def distance(self, value):
        """``d = ‖Lᵀ(β − β_S)‖ / σ`` for draws ``value``."""
        return jnp.linalg.norm((value - self.beta_source) @ self.chol_G, axis=-1) / self.sigma


# --------------------------------------------------------------------------------------------
# (b) scale prior: the distance curve r(τ)
# --------------------------------------------------------------------------------------------


class PriorDataConflictWarning(UserWarning):
    """The posterior sits where the PC prior expected almost none of its mass."""


class DistanceCurve(NamedTuple):
    r"""Grid values of ``r(τ) = sqrt(E_ε E_x (g(x; θ_S + τ s⊙ε) − g_S(x))²)``.

    ``tau`` is increasing with ``tau[0] = 0`` and ``r[0] = 0``; ``r`` must be strictly increasing
    for the push-forward to be one-to-one. Between grid points ``r`` is the monotone cubic
    (PCHIP, Fritsch & Carlson 1980) interpolant; beyond the last point it is extended linearly
    with the slope of the last interval, so ``r̂`` is continuous, strictly increasing and
    unbounded, and ``ScalePC`` is an exact push-forward of ``Exp(λ)`` through ``r̂``.
    """

    tau: jax.Array
    r: jax.Array


def _end_slope(curve: DistanceCurve):
    return (curve.r[-1] - curve.r[-2]) / (curve.tau[-1] - curve.tau[-2])


def distance_curve_value(curve: DistanceCurve, tau, nu: int = 0):
    """``r̂(τ)`` (``nu=0``) or ``r̂′(τ)`` (``nu=1``) of the monotone interpolant, jittable."""
    tau = jnp.asarray(tau)
    t_max = curve.tau[-1]
    interp = interpax.PchipInterpolator(curve.tau, curve.r, check=False, extrapolate=False)
    inside = interp(jnp.clip(tau, curve.tau[0], t_max), nu)
    slope = _end_slope(curve)
    if nu == 0:
        outside = curve.r[-1] + slope * (tau - t_max)
    elif nu == 1:
        outside = jnp.broadcast_to(slope, jnp.shape(tau))
    else:
        raise ValueError(f"nu must be 0 or 1, got {nu}")
    return jnp.where(tau > t_max, outside, inside)


def distance_curve_inverse(curve: DistanceCurve, r_value, *, iterations: int = 40):
    """``τ = r̂^{−1}(r_value)`` by bisection inside the grid and exactly beyond it (jittable)."""
    r_value = jnp.asarray(r_value)
    interp = interpax.PchipInterpolator(curve.tau, curve.r, check=False, extrapolate=False)
    idx = jnp.clip(jnp.searchsorted(curve.r, r_value, side="right") - 1, 0, curve.r.shape[0] - 2)
    lo, hi = curve.tau[idx], curve.tau[idx + 1]

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = interp(mid) < r_value
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    inside = 0.5 * (lo + hi)
    outside = curve.tau[-1] + (r_value - curve.r[-1]) / _end_slope(curve)
    return jnp.where(r_value >= curve.r[-1], outside, inside)


def check_distance_curve(tau: np.ndarray, r: np.ndarray) -> DistanceCurve:
    """Validate a computed curve; warn when ``r`` is not strictly increasing and repair it.

    A non-increasing Monte Carlo ``r`` means the push-forward is not one-to-one on the grid; the
    running maximum plus a tiny increasing offset is used instead, and a ``RuntimeWarning`` says so.
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
    return DistanceCurve(tau=jnp.asarray(tau, jnp.float32), r=jnp.asarray(r, jnp.float32))


class ScalePC(dist.Distribution):
    r"""PC prior on the flexibility ``τ ≥ 0`` of the scale construction, given ``σ``.

        d = r̂(τ)/σ ~ Exp(λ)   ⇔   π(τ | σ) = λ e^{−λ r̂(τ)/σ} · r̂′(τ) / σ,

    where ``r̂`` is the monotone interpolant of the :class:`DistanceCurve` ``curve``. For a
    last-layer transfer set ``r`` is linear and ``τ`` is exponential (the PC prior of a scale).
    ``sample`` inverts ``r̂`` exactly; ``log_prob`` carries the Jacobian ``r̂′(τ)/σ``.
    """

    arg_constraints = {"sigma": constraints.positive, "rate": constraints.positive}
    support = constraints.positive

    def __init__(self, curve: DistanceCurve, sigma, rate, *, validate_args=None):
        self.curve = DistanceCurve(jnp.asarray(curve.tau), jnp.asarray(curve.r))
        self.sigma = jnp.asarray(sigma)
        self.rate = jnp.asarray(rate)
        super().__init__(batch_shape=jnp.shape(self.sigma), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape
        d = jax.random.exponential(key, shape) / self.rate
        return distance_curve_inverse(self.curve, d * self.sigma)

    def log_prob(self, value):
        r = distance_curve_value(self.curve, value)
        dr = distance_curve_value(self.curve, value, nu=1)
        return jnp.log(self.rate) - self.rate * r / self.sigma + jnp.log(dr) - jnp.log(self.sigma)
