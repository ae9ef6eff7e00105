r"""NumPyro model functions: the PC transfer models and a plain Bayesian network.

These are the functions behind the estimators; a power user can pass them to their own
``numpyro.infer.MCMC``. All share the noise prior

    σ ~ HalfNormal(sigma_scale)

(``sigma_scale`` defaults, in the estimators, to the standard deviation of the source labels:
weakly informative on the scale of the data). Given ``σ``, the PC priors hold
``d = RMS_x(g_T − g_S)/σ ~ Exp(λ)`` exactly, so ``d`` is also ``Exp(λ)`` marginally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from pcbtl.priors import (
    DistanceCurve,
    LastLayerPC,
    ScalePC,
    distance_curve_value,
    last_layer_pc_offset,
)
from pcbtl.tangent import TangentStats, tangent_loglik

__all__ = [
    "LastLayerStats",
    "last_layer_sufficient_stats",
    "gaussian_loglik_suffstats",
    "gaussian_loglik_rows",
    "last_layer_pc_model",
    "scale_pc_model",
    "tangent_pc_model",
    "bnn_model",
]


class LastLayerStats(NamedTuple):
    """Sufficient statistics of a Gaussian linear model ``y = Φβ + e`` from a QR of ``Φ``.

    ``R`` (k×p, k = min(n, p)) from ``Φ = QR``; ``c = Qᵀy − Rβ₀`` the projected labels relative to
    a reference point ``β₀`` (the source head in the transfer models); ``rss0 = ‖y‖² − ‖Qᵀy‖²``
    the residual sum of squares of the least-squares fit; ``n`` the number of rows.
    """

    R: jax.Array
    c: jax.Array
    rss0: jax.Array
    n: jax.Array


def last_layer_sufficient_stats(
    Phi: np.ndarray, y: np.ndarray, beta_ref: np.ndarray | None = None
) -> LastLayerStats:
    """QR of ``Φ`` (n×p) and the statistics of :class:`LastLayerStats`, in float64, once.

    ``beta_ref`` is the point ``β₀`` the coefficients are measured from (default 0).
    """
    Phi = np.asarray(Phi, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    Q, R = np.linalg.qr(Phi, mode="reduced")
    Qty = Q.T @ y
    # ‖y‖² − ‖Qᵀy‖², evaluated as the residual of the projection (no cancellation)
    rss0 = float(np.sum((y - Q @ Qty) ** 2))
    if beta_ref is not None:
        Qty = Qty - R @ np.asarray(beta_ref, dtype=np.float64)
    return LastLayerStats(
        R=jnp.asarray(R, jnp.float32),
        c=jnp.asarray(Qty, jnp.float32),
        rss0=jnp.asarray(rss0, jnp.float32),
        n=jnp.asarray(Phi.shape[0], jnp.float32),
    )


def gaussian_loglik_suffstats(delta, sigma, stats: LastLayerStats):
    r"""``Σ_i log N(y_i | φ_iᵀβ, σ²)`` from sufficient statistics, O(p²) whatever ``n``.

    ``delta = β − β₀`` is measured from the reference point of ``stats``. Uses the stable
    decomposition ``‖y − Φβ‖² = ‖Rδ − c‖² + (‖y‖² − ‖Qᵀy‖²)`` with ``c = Qᵀy − Rβ₀`` computed in
    float64 once: the expanded ``yᵀy − 2βᵀΦᵀy + βᵀΦᵀΦβ`` cancels catastrophically in float32,
    and so does ``Rβ − Qᵀy`` when ``β`` is large (labels far from zero) — measuring from ``β₀``
    keeps every float32 quantity of the size of the residuals.
    """
    resid = stats.R @ delta - stats.c
    ss = jnp.sum(resid**2, axis=-1) + stats.rss0
    return -stats.n * (jnp.log(sigma) + 0.5 * jnp.log(2 * jnp.pi)) - 0.5 * ss / sigma**2


def gaussian_loglik_rows(mean, sigma, y):
    """Row-by-row ``log N(y_i | mean_i, σ²)`` (the reference the sufficient statistics must match)."""
    return dist.Normal(mean, jnp.expand_dims(sigma, -1)).log_prob(y)


def _sigma(sigma_scale):
    return numpyro.sample("sigma", dist.HalfNormal(sigma_scale))


def _rate(rate, rate_log_sd):
    r"""Fixed ``λ``, or the hyperprior ``U = U₀ e^{s z}``, ``z ~ N(0, 1)`` (``s = rate_log_sd``).

    Since ``λ = −log(α)/U``, this is ``λ = λ₀ e^{−s z}``: a log-normal hyperprior on the PC
    rate, centred at the rate implied by the user's ``(U, α)``. Sites ``U_z`` and ``rate``.
    """
    if rate_log_sd is None:
        return rate
    z = numpyro.sample("U_z", dist.Normal(0.0, 1.0))
    return numpyro.deterministic("rate", rate * jnp.exp(-rate_log_sd * z))


def last_layer_pc_model(
    beta_source: jax.Array,
    chol_G: jax.Array,
    rate: float,
    sigma_scale: float,
    stats: LastLayerStats | None = None,
    *,
    centred: bool = False,
    rate_log_sd: float | None = None,
) -> None:
    r"""Last-layer PC transfer model (:class:`pcbtl.priors.LastLayerPC`).

    Body frozen at ``θ_S``; head ``β ∈ R^p`` (bias last) with the sphere PC prior given ``σ``:

        d ~ Exp(λ),  z ~ N(0, I_p),  β = β_S + d σ L^{−ᵀ} z/‖z‖     (non-centred, default)
        β ~ LastLayerPC(β_S, L, σ, λ)                               (``centred=True``)

    with ``LLᵀ = G = Φ̃ᵀΦ̃/m`` over reference features. Likelihood
    ``y ~ N(Φβ, σ² I)`` through :func:`gaussian_loglik_suffstats`, with ``stats`` measured from
    ``β₀ = β_S`` (``last_layer_sufficient_stats(Φ, y, beta_source)``; ``stats=None``: prior only).
    With ``rate_log_sd`` the rate gets the log-normal hyperprior of :func:`_rate` and ``d`` is
    sampled non-centred as ``d = e/λ``, ``e ~ Exp(1)`` (site ``distance_std``).
    Sites: ``sigma``, ``distance``, ``z`` (non-centred) and ``beta``.
    """
    sigma = _sigma(sigma_scale)
    rate = _rate(rate, rate_log_sd)
    p = beta_source.shape[-1]
    if centred:
        prior = LastLayerPC(beta_source, chol_G, sigma, rate)
        beta = numpyro.sample("beta", prior)
        numpyro.deterministic("distance", prior.distance(beta))
    else:
        if rate_log_sd is None:
            d = numpyro.sample("distance", dist.Exponential(rate))
        else:
            e = numpyro.sample("distance_std", dist.Exponential(1.0))
            d = numpyro.deterministic("distance", e / rate)
        z = numpyro.sample("z", dist.Normal(jnp.zeros(p), 1.0).to_event(1))
        delta = last_layer_pc_offset(d, z, chol_G, sigma)
        beta = numpyro.deterministic("beta", beta_source + delta)
    if stats is not None:
        if centred:
            delta = beta - beta_source
        numpyro.factor("loglik", gaussian_loglik_suffstats(delta, sigma, stats))


def scale_pc_model(
    predict_fn: Callable[[jax.Array, jax.Array], jax.Array],
    theta_source: jax.Array,
    scales: jax.Array,
    curve: DistanceCurve,
    rate: float,
    sigma_scale: float,
    X: jax.Array | None = None,
    y: jax.Array | None = None,
    rate_log_sd: float | None = None,
    *,
    centred: bool = False,
) -> None:
    r"""Scale PC transfer model over a chosen transfer set (:class:`pcbtl.priors.ScalePC`).

        τ ~ ScalePC(r̂, σ, λ)  ⇔  d = r̂(τ)/σ ~ Exp(λ),   ε ~ N(0, I_D)
        θ = θ_S + τ s⊙ε,   y_i ~ N(g(x_i; θ), σ²)

    ``predict_fn(θ, X)`` evaluates the network with the flat transfer vector ``θ`` (see
    :func:`pcbtl.networks.transfer_parametrization`); ``curve`` is the precomputed Monte Carlo
    ``r(τ)`` (:func:`pcbtl.kl.distance_curve`); ``rate_log_sd`` as in :func:`last_layer_pc_model`.
    Sites: ``sigma``, ``tau``, ``eps``, ``distance``.

    ``centred=True`` writes the same prior as ``θ ~ N(θ_S, τ² diag(s²))`` and samples ``θ``
    (site ``theta`` instead of ``eps``). With many target rows the likelihood fixes ``θ``
    closely and the non-centred ``ε = (θ − θ_S)/(τ s)`` is tied to ``τ`` (a funnel); sampling
    ``θ`` removes that coupling. With few rows the non-centred form is the better one.
    """
    sigma = _sigma(sigma_scale)
    rate = _rate(rate, rate_log_sd)
    tau = numpyro.sample("tau", ScalePC(curve, sigma, rate))
    if centred:
        theta = numpyro.sample("theta", dist.Normal(theta_source, tau * scales).to_event(1))
    else:
        eps = numpyro.sample("eps", dist.Normal(jnp.zeros_like(theta_source), 1.0).to_event(1))
        theta = theta_source + tau * scales * eps
    numpyro.deterministic("distance", distance_curve_value(curve, tau) / sigma)
    if X is not None and y is not None:
        numpyro.sample("y", dist.Normal(predict_fn(theta, X), sigma), obs=y)


def tangent_pc_model(
    kappa: float,
    rate: float,
    sigma_scale: float,
    stats: TangentStats | None = None,
    rate_log_sd: float | None = None,
) -> None:
    r"""Scale PC model on the network linearised at the source, ``ε`` integrated out
    (:mod:`pcbtl.tangent`).

        σ ~ HalfNormal(sigma_scale),   τ | σ ~ Exp(λκ/σ)  ⇔  d = κτ/σ ~ Exp(λ),
        u = y − g_S(X) ~ N(0, σ² I + τ² J_s J_sᵀ)

    ``kappa`` is ``κ = sqrt(mean_x̃ ‖J_s(x̃)‖²)`` over the reference inputs
    (:func:`pcbtl.tangent.tangent_kappa`), so that ``r(τ) = κτ`` exactly; ``stats`` the
    eigen-statistics of ``J_s(X)`` and the residuals (:func:`pcbtl.tangent.tangent_stats`;
    ``None``: prior only); ``rate_log_sd`` as in :func:`last_layer_pc_model`.
    Sites: ``sigma``, ``tau``, ``distance``. The weights' ``ε`` is drawn afterwards from its
    exact Gaussian conditional (:func:`pcbtl.tangent.tangent_conditional_eps`).
    """
    sigma = _sigma(sigma_scale)
    rate = _rate(rate, rate_log_sd)
    tau = numpyro.sample("tau", dist.Exponential(rate * kappa / sigma))
    numpyro.deterministic("distance", kappa * tau / sigma)
    if stats is not None:
        numpyro.factor("loglik", tangent_loglik(tau, sigma, stats))


def bnn_model(
    predict_fn: Callable[[jax.Array, jax.Array], jax.Array],
    loc: jax.Array,
    prior_scale: float | jax.Array,
    sigma_scale: float,
    X: jax.Array | None = None,
    y: jax.Array | None = None,
) -> None:
    r"""Bayesian network with independent Normal priors on the flat weight vector.

        θ ~ N(loc, prior_scale²),  y_i ~ N(g(x_i; θ), σ²)

    ``loc = 0`` gives a target-only network; ``loc = θ_S`` the usual "prior centred on the
    pretrained weights". Sites: ``sigma``, ``theta``.
    """
    sigma = _sigma(sigma_scale)
    theta = numpyro.sample("theta", dist.Normal(loc, prior_scale).to_event(1))
    if X is not None and y is not None:
        numpyro.sample("y", dist.Normal(predict_fn(theta, X), sigma), obs=y)


def bayes_last_layer_model(beta_source, tau_scale, sigma_scale, stats=None) -> None:
    r"""Bayesian last layer centred at the source head, non-centred:

        σ ~ HalfNormal(sigma_scale),  τ ~ HalfNormal(tau_scale),  z ~ N(0, I_p),
        β = β_S + τ z,   y ~ N(Φβ, σ² I)

    with the likelihood from the QR sufficient statistics ``stats`` measured from ``β₀ = β_S``
    (:func:`pcbtl.models.last_layer_sufficient_stats` with ``beta_ref = β_S``, so the
    likelihood sees ``δ = β − β_S = τ z``; :func:`pcbtl.models.gaussian_loglik_suffstats`;
    ``None``: prior only).
    Sites ``sigma``, ``tau``, ``z`` and the deterministic ``beta``.
    """
    sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
    tau = numpyro.sample("tau", dist.HalfNormal(tau_scale))
    z = numpyro.sample("z", dist.Normal(jnp.zeros_like(beta_source), 1.0).to_event(1))
    numpyro.deterministic("beta", beta_source + tau * z)
    if stats is not None:
        numpyro.factor("loglik", gaussian_loglik_suffstats(tau * z, sigma, stats))


def multitask_bnn_model(predict_fn, loc, prior_scale, sigma_scale, X=None, y=None, task=None):
    r"""One Bayesian network for both tasks, the task indicator ``t ∈ {0, 1}`` as the last input:

        θ ~ N(loc, prior_scale²),  σ_S, σ ~ HalfNormal(sigma_scale),
        y_i ~ N(g([x_i, t_i]; θ), σ_{t_i}²)      (t = 0 source, t = 1 target)

    with a separate noise sd per task. Sites ``theta``, ``sigma_source`` and ``sigma`` (target).
    """
    sigma_s = numpyro.sample("sigma_source", dist.HalfNormal(sigma_scale))
    sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
    theta = numpyro.sample("theta", dist.Normal(loc, prior_scale).to_event(1))
    if X is not None and y is not None:
        sd = jnp.where(task > 0.5, sigma, sigma_s)
        numpyro.sample("y", dist.Normal(predict_fn(theta, X), sd), obs=y)
