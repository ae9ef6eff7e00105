r"""Microcanonical Langevin Monte Carlo (MCLMC) for many chains, each started from its own optimum.

The sampler of the deep (scale) PC prior. Its posterior over thousands of network weights is
badly conditioned and multimodal; NUTS spends up to ``2^10 − 1`` gradients per draw there and
its chains still disagree (``benchmarks/README.md``, section ``bench_sampler.py``). What
:func:`run_mclmc` does instead, after Sommer et al. (ICLR 2025, "MILE"):

1. **Separate optima.** Every chain starts from its own point: the model's initial value plus
   ``init_jitter``-sized Gaussian noise in the unconstrained space, followed by ``init_steps``
   full-batch Adam steps on the potential energy ``U(z) = −log p(z | y)``. A short run (not a
   converged MAP, which over-fits and shrinks ``σ``) places each chain in a region of high
   posterior mass, so no warm-up is spent travelling there.
2. **MCLMC** (Robnik, De Luca, Silverstein & Seljak, JMLR 2023; BlackJAX's
   ``blackjax.mclmc``): the isokinetic Langevin dynamics whose stationary distribution, in
   the position, is ``exp(−U)``; one step of the minimal-norm (McLachlan) integrator costs two
   gradients, with no tree and no accept/reject step. The step size ``ε``, the momentum
   decoherence length ``L`` and a diagonal preconditioner are tuned per chain by
   ``blackjax.mclmc_find_L_and_step_size`` during ``num_warmup`` steps so that the energy
   error per dimension is about ``desired_energy_var``:

   .. math:: \mathrm{Var}[\Delta E]/D \approx \text{desired\_energy\_var},

   which bounds the bias of this unadjusted sampler (Robnik et al. 2023, §3). Draws are kept
   every ``thin`` steps.

All chains run in one jitted, vmapped program. The draws come back as a
:class:`pcbtl.inference.Posterior` with a ``(chain, draw)`` leading shape, including the
model's deterministic sites, so :func:`pcbtl.inference.sampler_diagnostics` judges them like
NUTS draws (R-hat across chains, over every site and over predictions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_uniform
from numpyro.infer.util import initialize_model

from pcbtl._validation import check_integer
from pcbtl.inference.posterior import Posterior
from pcbtl.interweave import Interweave, conditional_potentials, interweave_scale

__all__ = ["run_mclmc"]


def run_mclmc(
    model: Callable[..., None],
    model_kwargs: dict[str, Any],
    *,
    num_warmup: int = 2000,
    num_samples: int = 200,
    thin: int = 50,
    num_chains: int = 8,
    seed: int = 0,
    init_steps: int = 500,
    init_learning_rate: float = 1e-2,
    init_jitter: float = 0.01,
    desired_energy_var: float = 5e-4,
    init_strategy: Callable | None = None,
    interweave: Interweave | None = None,
) -> Posterior:
    r"""Sample ``model(**model_kwargs)`` with ``num_chains`` MCLMC chains (module docstring).

    Parameters
    ----------
    model, model_kwargs:
        A NumPyro model and its keyword arguments (data included).
    num_warmup:
        Integrator steps per chain spent tuning ``ε``, ``L`` and the diagonal preconditioner
        (discarded).
    num_samples, thin:
        Draws kept per chain, one every ``thin`` integrator steps (so each chain takes
        ``num_samples · thin`` steps after tuning, ``2 ·`` that many gradients).
    num_chains:
        Chains, each from its own starting optimum; they run vmapped in one program.
    init_steps, init_learning_rate, init_jitter:
        The start of every chain: the model's initial point (``init_strategy``, default
        NumPyro's ``init_to_uniform(radius=2)``: every unconstrained coordinate uniform on
        ``(−2, 2)``, a random network as a deep ensemble starts from, drawn per chain) plus
        ``N(0, init_jitter²)`` noise, then ``init_steps`` Adam steps on the potential energy
        (0: no optimisation). Starting at the prior's median instead (``θ = θ_S``, small
        ``τ``) put every chain of the band-gap task into the spike of the centred density at
        ``τ → 0``.
    desired_energy_var:
        Target energy-error variance per dimension of the tuning (BlackJAX's default 5e-4).
    interweave:
        For a centred scale model: after every ``thin`` steps, the centred and the
        non-centred slice update of the scale site (:func:`pcbtl.interweave.interweave_scale`,
        Yu & Meng 2011). Without it the scale barely moves: the thousands of weights the data
        leave free fix it through ``N(θ; θ_S, τ² s²)``, and each chain keeps the ``τ`` its
        start gave it (measured on the band-gap task, ``benchmarks/README.md``).

    Returns
    -------
    Posterior
        ``method="mclmc"``; ``sample_stats`` holds ``energy_change`` per kept draw and, per
        chain, ``step_size`` and ``L``; ``lp`` is the log density of each draw.

    Example
    -------
    >>> post = run_mclmc(model, kwargs, num_chains=4)   # doctest: +SKIP
    >>> post.samples["sigma"].shape
    (4, 200)
    """
    import blackjax
    import optax

    num_warmup = check_integer(num_warmup, "num_warmup", minimum=10)
    num_samples = check_integer(num_samples, "num_samples", minimum=1)
    thin = check_integer(thin, "thin", minimum=1)
    num_chains = check_integer(num_chains, "num_chains", minimum=1)
    init_steps = check_integer(init_steps, "init_steps", minimum=0)
    for name, value in (
        ("init_learning_rate", init_learning_rate),
        ("init_jitter", init_jitter),
        ("desired_energy_var", desired_energy_var),
    ):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if desired_energy_var <= 0:
        raise ValueError(f"desired_energy_var must be > 0, got {desired_energy_var!r}")

    key = jax.random.PRNGKey(int(seed))
    k_init, k_jitter, k_tune, k_run = jax.random.split(key, 4)
    info = initialize_model(
        jax.random.split(k_init, num_chains),  # one starting point per chain
        model,
        model_kwargs=model_kwargs,
        init_strategy=init_strategy or init_to_uniform(radius=2.0),
    )
    potential = info.potential_fn
    z0 = info.param_info.z  # leading axis: chain
    size = sum(int(np.size(v)) // num_chains for v in jax.tree_util.tree_leaves(z0))
    if size < 2:
        raise ValueError("MCLMC needs at least two unconstrained parameters; use NUTS")

    def logdensity(z):
        return -potential(z)

    def start(z_chain, k):
        leaves, tree = jax.tree_util.tree_flatten(z_chain)
        keys = jax.random.split(k, len(leaves))
        noisy = [
            leaf + init_jitter * jax.random.normal(kk, jnp.shape(leaf), jnp.result_type(leaf))
            for leaf, kk in zip(leaves, keys, strict=True)
        ]
        return jax.tree_util.tree_unflatten(tree, noisy)

    if interweave is not None:
        _, prior_potential = conditional_potentials(model, model_kwargs, interweave)
    opt = optax.adam(float(init_learning_rate))
    kernel = blackjax.mcmc.mclmc.build_kernel(desired_energy_var=float(desired_energy_var))
    n_steps = num_samples * thin
    # BlackJAX's three tuning phases (ε; ε and the preconditioner; L) take fractions of the
    # run's length: a third of ``num_warmup`` each
    frac = num_warmup / (3 * n_steps)

    def chain(z_chain, k_start, k_tune_c, k_run_c):
        z = start(z_chain, k_start)

        def opt_step(carry, _):
            z, st = carry
            g = jax.grad(potential)(z)
            upd, st = opt.update(g, st, z)
            return (optax.apply_updates(z, upd), st), None

        if init_steps:
            (z, _), _ = jax.lax.scan(opt_step, (z, opt.init(z)), None, length=init_steps)
        k1, k2 = jax.random.split(k_tune_c)
        state = blackjax.mcmc.mclmc.init(z, logdensity, k1)
        state, params, _ = blackjax.mclmc_find_L_and_step_size(
            mclmc_kernel=kernel,
            logdensity_fn=logdensity,
            num_steps=n_steps,
            state=state,
            rng_key=k2,
            frac_tune1=frac,
            frac_tune2=frac,
            frac_tune3=frac,
            desired_energy_var=float(desired_energy_var),
            diagonal_preconditioning=True,
        )

        def one(s, kk):
            s, inf = kernel(
                kk, s, logdensity, params.inverse_mass_matrix, params.L, params.step_size
            )
            return s, inf.energy_change

        def block(s, kk):
            k_steps, k_gibbs = jax.random.split(kk)
            s, de = jax.lax.scan(one, s, jax.random.split(k_steps, thin))
            if interweave is not None:
                z = dict(s.position)
                site = interweave.scale_site
                u, z = interweave_scale(
                    k_gibbs,
                    z.pop(site),
                    z,
                    potential,
                    prior_potential,
                    model_kwargs[interweave.loc_arg],
                    model_kwargs[interweave.scale_arg],
                    interweave,
                )
                z = {**z, site: u}
                lp, grad = jax.value_and_grad(logdensity)(z)
                s = s._replace(position=z, logdensity=lp, logdensity_grad=grad)
            return s, (s.position, s.logdensity, de[-1])

        _, (zs, lp, de) = jax.lax.scan(block, state, jax.random.split(k_run_c, num_samples))
        return zs, lp, de, params.step_size, params.L

    keys = [jax.random.split(k, num_chains) for k in (k_jitter, k_tune, k_run)]
    zs, lp, de, step_size, L = jax.jit(jax.vmap(chain))(z0, *keys)
    jax.block_until_ready(zs)
    # constrained values and deterministic sites, draw by draw
    constrain = jax.jit(jax.vmap(jax.vmap(info.postprocess_fn)))
    samples = {k: np.asarray(v) for k, v in constrain(zs).items()}
    return Posterior(
        samples=samples,
        sample_stats={
            "lp": np.asarray(lp),
            "energy_change": np.asarray(de),
            "step_size": np.repeat(np.asarray(step_size)[:, None], num_samples, axis=1),
            "L": np.repeat(np.asarray(L)[:, None], num_samples, axis=1),
        },
        method="mclmc",
    )
