r"""NumPyro model functions of the PC transfer classifiers (what the estimator samples).

Both take the labels as a one-hot matrix ``Y`` ``(n, K)`` and add the categorical
log-likelihood ``Σ_i Σ_k Y_{ik} log softmax(g(x_i))_k`` as a factor (labels travel as floats
through the batched sampler, which casts every argument to float32); without ``Y`` they are
the prior alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from pcbtl.classification.priors import (
    ClassifierScalePC,
    HeadPrior,
    RayLength,
    _full,
    ray_direction,
    ray_distance,
    ray_length,
    ray_limit,
    truncated_distance,
)
from pcbtl.priors import DistanceCurve, distance_curve_value

__all__ = [
    "categorical_loglik",
    "head_pc_classifier_model",
    "head_pc_classifier_model_length",
    "scale_pc_classifier_model",
]


@jax.jit
def categorical_loglik(outputs: jax.Array, Y: jax.Array) -> jax.Array:
    r"""``Σ_i Σ_k Y_{ik} log softmax(ĝ(x_i))_k`` for network outputs ``outputs`` ``(n, n_out)``
    (``ĝ = [0, g]`` for one output unit) and one-hot labels ``Y`` ``(n, K)``."""
    return jnp.sum(Y * jax.nn.log_softmax(_full(outputs), axis=-1))


def head_pc_classifier_model(
    prior: HeadPrior,
    rate: Any,
    Phi: jax.Array | None = None,
    Y: jax.Array | None = None,
) -> None:
    r"""Head (last-layer) PC transfer classifier, non-centred (:mod:`pcbtl.classification.priors`).

    Body frozen at the source; head ``B ∈ R^{p × n_out}`` (bias last row):

    .. math::

        z \sim N(0, I_{pJ}),\quad e \sim \mathrm{Exp}(1),\quad
        V = \mathrm{ray\_direction}(z),\quad d = \mathrm{truncated\_distance}(e, λ, d_{\max}(V)),

        t = \mathrm{ray\_length}(d, V),\quad B = B_S + tV,\quad
        y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat Φ_i B)),

    with ``λ`` = ``rate``, ``Φ̂`` = ``Phi`` (target features with bias column) and the
    reference quantities in ``prior`` (:class:`pcbtl.classification.priors.HeadPrior`).
    ``d(t, V) = d`` exactly, so ``d | V`` is the exponential truncated at ``d_max(V)``.
    Sites: ``z``, ``distance_std`` (``e``), and the deterministic ``distance``, ``t``, ``beta``.
    """
    P = prior.chol.shape[0]
    z = numpyro.sample("z", dist.Normal(jnp.zeros(P), 1.0).to_event(1))
    e = numpyro.sample("distance_std", dist.Exponential(1.0))
    V = ray_direction(z, prior.chol, prior.contrasts)
    d_max = ray_limit(V, prior.Phi_ref, prior.logits_ref)
    d = numpyro.deterministic("distance", truncated_distance(e, rate, d_max))
    t = numpyro.deterministic("t", ray_length(d, V, prior.Phi_ref, prior.logits_ref))
    beta = numpyro.deterministic("beta", prior.beta_source + t * V)
    if Phi is not None and Y is not None:
        numpyro.factor("loglik", categorical_loglik(Phi @ beta, Y))


def head_pc_classifier_model_length(
    prior: HeadPrior,
    rate: Any,
    Phi: jax.Array | None = None,
    Y: jax.Array | None = None,
) -> None:
    r"""The head PC transfer classifier with the length ``t`` sampled from its density.

    The same prior as :func:`head_pc_classifier_model`, written as

    .. math::

        z \sim N(0, I_{pJ}),\quad V = \mathrm{ray\_direction}(z),\quad
        t \mid V \sim π(t \mid V) = \frac{λ e^{-λ d(t, V)}}{1 - e^{-λ d_{\max}(V)}}
        \frac{\partial d}{\partial t},\quad B = B_S + tV

    (:class:`pcbtl.classification.priors.RayLength`; NUTS moves in ``log t``). Non-centred in
    the direction, centred in the length: no root-finding, and ``log t`` has exponential
    tails, where the fully non-centred ``e`` of :func:`head_pc_classifier_model` maps its
    upper tail to ``t`` growing like ``exp(c·e)`` (``d`` creeping up to ``d_max``), which
    makes NUTS diverge on far proposals. Sites: ``z``, ``t``, and the deterministic
    ``distance`` and ``beta``.
    """
    P = prior.chol.shape[0]
    z = numpyro.sample("z", dist.Normal(jnp.zeros(P), 1.0).to_event(1))
    V = ray_direction(z, prior.chol, prior.contrasts)
    t = numpyro.sample("t", RayLength(V, prior, rate))
    d, beta, loglik = _head_outputs(t, V, prior, Phi, Y)
    numpyro.deterministic("distance", d)
    numpyro.deterministic("beta", beta)
    if loglik is not None:
        numpyro.factor("loglik", loglik)


@jax.jit
def _head_outputs(t, V, prior, Phi, Y):
    """Distance, head and log-likelihood in one compiled call (the engine's initialisation runs
    the model outside ``jit``, one compiled program per call: fewer, larger calls)."""
    d = ray_distance(t, V, prior.Phi_ref, prior.logits_ref)
    beta = prior.beta_source + t * V
    loglik = None if Phi is None or Y is None else categorical_loglik(Phi @ beta, Y)
    return d, beta, loglik


def scale_pc_classifier_model(
    predict_fn: Any,
    theta_source: jax.Array,
    scales: jax.Array,
    curve: DistanceCurve,
    rate: Any,
    X: jax.Array | None = None,
    Y: jax.Array | None = None,
) -> None:
    r"""Scale PC transfer classifier over a chosen transfer set (:mod:`pcbtl.classification.priors`).

    .. math::

        τ \sim \mathrm{ClassifierScalePC}(\hat r, λ) \iff d = \hat r(τ) \sim
        \mathrm{Exp}(λ) \text{ truncated at } \hat r(τ_{\mathrm{end}}),\qquad
        ε \sim N(0, I_D),

        θ = θ_S + τ\, s⊙ε,\qquad y_i \sim \mathrm{Cat}(\mathrm{softmax}(g(x_i; θ))),

    with ``g`` = ``predict_fn`` (outputs for the flat transfer vector), ``θ_S`` =
    ``theta_source``, ``s`` = ``scales``, ``r̂`` the interpolated Monte Carlo ``curve``
    (:func:`pcbtl.classification.priors.fit_classifier_curve`) and ``λ`` = ``rate``.
    Sites: ``tau``, ``eps``, and the deterministic ``distance``.
    """
    tau = numpyro.sample("tau", ClassifierScalePC(curve, rate))
    eps = numpyro.sample("eps", dist.Normal(jnp.zeros_like(theta_source), 1.0).to_event(1))
    numpyro.deterministic("distance", distance_curve_value(curve, tau))
    if X is not None and Y is not None:
        numpyro.factor("loglik", _scale_loglik(predict_fn, theta_source, scales, tau, eps, X, Y))


@jax.jit
def _scale_loglik(predict_fn, theta_source, scales, tau, eps, X, Y):
    """The categorical log-likelihood at ``θ = θ_S + τ s⊙ε`` in one compiled call (a
    :class:`pcbtl.networks.NetworkFn` is a pytree argument: one compilation per architecture)."""
    return categorical_loglik(predict_fn(theta_source + tau * scales * eps, X), Y)
