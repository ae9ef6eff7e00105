"""Stochastic variational inference with NumPyro's autoguides and optax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Predictive, Trace_ELBO, autoguide

from pcbtl.inference.posterior import Posterior

__all__ = ["GUIDES", "run_svi"]


GUIDES = {
    "normal": autoguide.AutoNormal,
    "multivariate_normal": autoguide.AutoMultivariateNormal,
    "low_rank": autoguide.AutoLowRankMultivariateNormal,
}


def run_svi(
    model: Callable[..., None],
    model_kwargs: dict[str, Any],
    *,
    guide: str = "normal",
    num_steps: int = 5000,
    learning_rate: float = 5e-3,
    num_samples: int = 1000,
    num_particles: int = 1,
    seed: int = 0,
    progress_bar: bool = True,
) -> Posterior:
    """Stochastic variational inference with an autoguide and optax's Adam.

    The guide approximates the posterior of the *unconstrained* latent variables by a Gaussian
    (``"normal"``: mean field, ``AutoNormal``; ``"multivariate_normal"``: full covariance;
    ``"low_rank"``: low rank plus diagonal), fitted by maximising the ELBO (Kucukelbir et al. 2017).
    It under-states posterior correlations and tails; use NUTS for final intervals. Returns
    ``num_samples`` guide draws as one chain, deterministic sites included.
    """
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {sorted(GUIDES)}, got {guide!r}")
    g = GUIDES[guide](model)
    optim = numpyro.optim.optax_to_numpyro(optax.adam(learning_rate))
    svi = SVI(model, g, optim, Trace_ELBO(num_particles=num_particles))
    key_run, key_draw = jax.random.split(jax.random.PRNGKey(seed))
    result = svi.run(key_run, int(num_steps), progress_bar=progress_bar, **model_kwargs)
    losses = np.asarray(result.losses)
    if not np.isfinite(losses[-1]):
        raise FloatingPointError("SVI diverged (non-finite ELBO); lower learning_rate")
    prior_kwargs = {k: v for k, v in model_kwargs.items() if k != "y"}
    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(**prior_kwargs)
    sites = [
        name
        for name, site in trace.items()
        if (site["type"] == "sample" and not site["is_observed"]) or site["type"] == "deterministic"
    ]
    draws = Predictive(
        model, guide=g, params=result.params, num_samples=int(num_samples), return_sites=sites
    )(key_draw, **prior_kwargs)
    samples = {k: np.asarray(v)[None] for k, v in draws.items()}
    return Posterior(samples=samples, sample_stats={"losses": losses}, method="svi")
