"""Posterior sampling: model + keyword arguments → posterior draws, diagnostics, ArviZ.

This layer knows NumPyro models, not estimators. :func:`run_nuts_batched` samples one or many
fits of a model with several chains each in one compiled program (what every NUTS estimator of
pcbtl uses); :func:`run_nuts` wraps NumPyro's ``MCMC``; :func:`run_mclmc` runs microcanonical Langevin
chains from separate optima (the scale prior's default); :func:`run_svi` fits an autoguide;
:func:`sampler_diagnostics` and :func:`check_sampler` judge NUTS draws across chains, over every
site and over predictions; :func:`to_inference_data` writes ArviZ data (``InferenceData`` under
ArviZ 0.x, ``xarray.DataTree`` under 1.x: :func:`idata_from_groups`), which
:func:`idata_groups` and :func:`idata_group` read on either.
"""

from pcbtl.inference.convert import (
    idata_from_groups,
    idata_group,
    idata_groups,
    idata_with_coords,
    make_log_density,
    to_inference_data,
)
from pcbtl.inference.diagnostics import (
    MCMC_METHODS,
    SamplerWarning,
    check_sampler,
    require_finite,
    rhat_ess,
    sampler_diagnostics,
    stuck_chains,
)
from pcbtl.inference.mclmc import run_mclmc
from pcbtl.inference.nuts import (
    CHAIN_METHODS,
    chain_keys,
    clear_caches,
    plan_key,
    register_cache,
    resolve_chain_method,
    run_nuts,
    run_nuts_batched,
    run_plans,
)
from pcbtl.inference.posterior import BatchPlan, Posterior, concatenate_chains
from pcbtl.inference.svi import GUIDES, run_svi

__all__ = [
    "CHAIN_METHODS",
    "GUIDES",
    "MCMC_METHODS",
    "BatchPlan",
    "Posterior",
    "SamplerWarning",
    "chain_keys",
    "check_sampler",
    "clear_caches",
    "register_cache",
    "concatenate_chains",
    "idata_from_groups",
    "idata_group",
    "idata_groups",
    "idata_with_coords",
    "make_log_density",
    "plan_key",
    "resolve_chain_method",
    "require_finite",
    "rhat_ess",
    "run_mclmc",
    "run_nuts",
    "run_nuts_batched",
    "run_plans",
    "run_svi",
    "sampler_diagnostics",
    "stuck_chains",
    "to_inference_data",
]
