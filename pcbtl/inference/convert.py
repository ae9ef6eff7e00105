"""From a NumPyro model to a flat log density, and from draws to ArviZ."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import initialize_model

from pcbtl.inference.posterior import Posterior

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\sArviZ is undergoing", category=FutureWarning)
    import arviz as az

__all__ = ["make_log_density", "to_inference_data"]


def make_log_density(
    model: Callable[..., None], model_kwargs: dict[str, Any], *, seed: int = 0
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """A jitted log density of the model on one flat float32 unconstrained vector.

    Returns ``(log_density, x0)``: ``log_density(x)`` is the log joint (Jacobians of the
    constraining transforms included) at the flat unconstrained point ``x``, and ``x0`` a valid
    initial point. Ravel/unravel happen once here, outside the hot loop; the function is traced
    once per model and data shape.
    """
    info = initialize_model(jax.random.PRNGKey(seed), model, model_kwargs=model_kwargs)
    x0, unravel = ravel_pytree(info.param_info.z)
    potential = info.potential_fn

    @jax.jit
    def log_density(x):
        return -potential(unravel(x))

    return log_density, jnp.asarray(x0, jnp.float32)


def to_inference_data(
    posterior: Posterior,
    *,
    log_likelihood: np.ndarray | None = None,
    posterior_predictive: np.ndarray | None = None,
    observed: np.ndarray | None = None,
    drop: tuple[str, ...] = (),
    attrs: dict[str, Any] | None = None,
) -> az.InferenceData:
    """ArviZ ``InferenceData`` with posterior, sample_stats and, when given, the per-row
    ``log_likelihood``, ``posterior_predictive`` (both ``(chain, draw, n)``) and ``observed_data``
    (variable ``y``, dimension ``obs``)."""
    post = {k: v for k, v in posterior.samples.items() if k not in drop}
    dims: dict[str, list[str]] = {"y": ["obs"]}
    for k, v in post.items():
        if v.ndim > 2:
            dims[k] = [f"{k}_dim_{i}" for i in range(v.ndim - 2)]
    stats = {k: v for k, v in posterior.sample_stats.items() if np.ndim(v) >= 2}
    kwargs: dict[str, Any] = {"posterior": post, "sample_stats": stats or None}
    if log_likelihood is not None:
        kwargs["log_likelihood"] = {"y": log_likelihood}
    if posterior_predictive is not None:
        kwargs["posterior_predictive"] = {"y": posterior_predictive}
    if observed is not None:
        kwargs["observed_data"] = {"y": observed}
    all_attrs = {"inference_library": "numpyro", "inference_method": posterior.method}
    all_attrs.update(attrs or {})
    return az.from_dict(**kwargs, dims=dims, attrs=all_attrs)
