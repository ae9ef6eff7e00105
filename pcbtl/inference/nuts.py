r"""NUTS: NumPyro's ``MCMC`` for one model, and a compiled engine for many chains and fits at once.

:func:`run_nuts_batched` is what every NUTS estimator of pcbtl uses: ``R`` fits of one model
(replicates of a study, or just one fit) with ``C`` chains each, sampled as one jitted program
built from NumPyro's functional ``hmc`` kernel (Hoffman & Gelman 2014; windowed step-size and
diagonal mass-matrix adaptation as in ``MCMC``), compiled once per model, sampler settings and
data shapes. :func:`run_nuts` wraps ``numpyro.infer.MCMC`` for users who want NumPyro's own
driver.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS, init_to_median

from pcbtl.inference.posterior import BatchPlan, Posterior
from pcbtl.interweave import Interweave, conditional_potentials, interweave_scale
from pcbtl.networks import _flat_apply, _head_apply, _head_outputs, _network_outputs
from pcbtl.tangent import ensemble_apply

__all__ = [
    "CHAIN_METHODS",
    "chain_keys",
    "clear_caches",
    "plan_key",
    "resolve_chain_method",
    "run_nuts",
    "run_nuts_batched",
    "run_plans",
]

CHAIN_METHODS = ("sequential", "vectorized", "parallel")


def run_nuts(
    model: Callable[..., None],
    model_kwargs: dict[str, Any],
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 4,
    chain_method: str = "sequential",
    seed: int = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    init_strategy: Callable | None = None,
    progress_bar: bool = True,
) -> Posterior:
    """Sample ``model(**model_kwargs)`` with NumPyro's NUTS (Hoffman & Gelman 2014).

    ``chain_method`` is passed to ``numpyro.infer.MCMC``: ``"sequential"`` (default: on a CPU the
    chains of these models share the cores better one after another than in lock-step, where the
    longest tree sets the pace), ``"vectorized"`` or ``"parallel"`` (needs several JAX devices).
    Deterministic sites are included in ``samples``.
    """
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
    for name, value in (("num_warmup", num_warmup), ("num_samples", num_samples)):
        if int(value) < (0 if name == "num_warmup" else 1):
            raise ValueError(f"{name} must be a non-negative integer, got {value}")
    if int(num_chains) < 1:
        raise ValueError(f"num_chains must be at least 1, got {num_chains}")
    kernel_kwargs: dict[str, Any] = {
        "target_accept_prob": target_accept_prob,
        "max_tree_depth": max_tree_depth,
        "dense_mass": dense_mass,
    }
    if init_strategy is not None:
        kernel_kwargs["init_strategy"] = init_strategy
    mcmc = MCMC(
        NUTS(model, **kernel_kwargs),
        num_warmup=int(num_warmup),
        num_samples=int(num_samples),
        num_chains=int(num_chains),
        chain_method=chain_method,
        progress_bar=progress_bar,
    )
    with warnings.catch_warnings():
        # NumPyro warns when num_chains exceeds the device count and then runs them sequentially,
        # which is what was asked for anyway.
        warnings.filterwarnings("ignore", message="There are not enough devices")
        mcmc.run(
            jax.random.PRNGKey(seed),
            extra_fields=(
                "diverging",
                "num_steps",
                "accept_prob",
                "energy",
                "potential_energy",
                "adapt_state.step_size",
            ),
            **model_kwargs,
        )
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    extra = {k: np.asarray(v) for k, v in mcmc.get_extra_fields(group_by_chain=True).items()}
    stats = {
        "diverging": extra["diverging"].astype(bool),
        "n_steps": extra["num_steps"],
        "tree_depth": np.floor(np.log2(np.maximum(extra["num_steps"], 1))).astype(int) + 1,
        "acceptance_rate": extra["accept_prob"],
        "energy": extra["energy"],
        "lp": -extra["potential_energy"],
        "step_size": extra["adapt_state.step_size"],
    }
    return Posterior(samples=samples, sample_stats=stats, method="nuts")


_INIT_CACHE: dict[tuple[Any, str], Callable] = {}


def _chain_init(model: Callable[..., None], init_strategy: Callable) -> Callable:
    """Jitted initial points (unconstrained) of the chains of one fit: keys ``(C, 2)``, that
    fit's data and the parameter prototype (zeros: shapes only). One compilation per model and
    strategy (``repr`` of the strategy: its function and arguments) and shapes, called once per
    fit, so a fit's initial points come from the same program whatever other fits share its
    job (a program vmapped over the fits of a group would change with the group's size)."""
    from numpyro.infer.util import find_valid_initial_params

    key = (model, repr(init_strategy))
    if key not in _INIT_CACHE:

        def one(rng_key, kw, prototype):
            return find_valid_initial_params(
                rng_key,
                model,
                init_strategy=init_strategy,
                model_kwargs=kw,
                prototype_params=prototype,
            )

        _INIT_CACHE[key] = jax.jit(jax.vmap(one, in_axes=(0, None, None)))
    return _INIT_CACHE[key]


#: further ``functools.lru_cache`` caches of compiled-function builders, registered by the
#: modules above this one (:func:`register_cache`), emptied by :func:`clear_caches`
_REGISTERED_CACHES: list[Any] = []


def register_cache(cache: Any) -> Any:
    """Have :func:`clear_caches` empty ``cache`` (anything with ``cache_clear()``, e.g. an
    ``lru_cache``-wrapped builder of network apply functions); returns ``cache``, so that it can
    decorate. For estimator modules, which this layer cannot import."""
    if not callable(getattr(cache, "cache_clear", None)):
        raise TypeError(f"register_cache needs an object with cache_clear(), got {cache!r}")
    _REGISTERED_CACHES.append(cache)
    return cache


def clear_caches() -> None:
    """Free every compiled sampler pcbtl holds, and JAX's own compilation caches.

    pcbtl keeps one compiled NUTS program per model and sampler setting, one jitted
    initialiser per model, and one network apply function per architecture, so that repeated
    fits reuse them. Each compiled CPU program holds its own memory mappings; a long session
    that fits many different architectures or settings (a notebook, a study over many
    configurations) can call this between them to give the memory back. Later fits compile
    again on first use; fitted estimators keep working.
    """

    _batched_sampler.cache_clear()
    _INIT_CACHE.clear()
    builders = (_flat_apply, _head_apply, _network_outputs, _head_outputs, ensemble_apply)
    for cache in (*builders, *_REGISTERED_CACHES):
        cache.cache_clear()
    jax.clear_caches()
    gc.collect()


#: the progress bar of the batched job now running (host side; see ``_progress_tick``)
_PROGRESS_BARS: list[Any] = []


def _progress_tick(i: Any) -> None:
    """Host callback of the batched sampler: move the open bar to iteration ``max(i) + 1``.

    Under ``vmap`` and ``shard_map`` every chain, fit and device reports the same iteration, so
    the bar follows the furthest report rather than counting calls."""
    if _PROGRESS_BARS:
        bar = _PROGRESS_BARS[-1]
        done = int(np.max(np.asarray(i))) + 1
        if done > bar.n:
            bar.update(done - bar.n)


@lru_cache(maxsize=64)
def _batched_sampler(
    model: Callable[..., None],
    nw: int,
    ns: int,
    tap: float,
    depth: int,
    vectorize: bool = True,
    devices: tuple[Any, ...] = (),
    interweave: Interweave | None = None,
    progress: bool = False,
) -> Callable:
    """The jitted, vmapped NUTS run for one model and sampler settings, built once.

    The returned function takes keys and initial points of shape ``(R, C, ...)`` (``R`` fits,
    ``C`` chains each) and the fits' stacked data ``(R, ...)``, shared by the chains of a fit.
    ``vectorize`` vmaps chains and fits (every NUTS step waits for the deepest tree of the
    batch); otherwise they run one after another inside the program (``lax.map``).

    The data are arguments, never constants, so the program is compiled once per model,
    settings and data shapes and reused by every later batch of the same shapes (a study's
    replicates of every setting with the same target size share one compilation).

    With ``interweave`` the scale site is taken out of NUTS: each iteration is NUTS on the
    other sites given ``τ``, then the two interweaved slice updates of ``τ``
    (:mod:`pcbtl.interweave`).
    """
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import constrain_fn, potential_energy

    def one(key, z_init, kw):
        if interweave is None:

            def pe(z):
                return potential_energy(model, (), kw, z)

            init_kernel, kernel = hmc(pe, algo="NUTS")
            state = init_kernel(
                z_init, nw, target_accept_prob=tap, max_tree_depth=depth, rng_key=key
            )

            sample_kernel = kernel

            def hmc_state_of(s):
                return s

            def full_z(s):
                return s.z

        else:
            s_site = interweave.scale_site
            full_pe, prior_pe = conditional_potentials(model, kw, interweave)
            loc, scl = kw[interweave.loc_arg], kw[interweave.scale_arg]

            def pe_given(u):
                return lambda z: full_pe({**z, s_site: u})

            init_kernel, kernel = hmc(potential_fn_gen=pe_given, algo="NUTS")
            rest = {k: v for k, v in z_init.items() if k != s_site}
            state = (
                init_kernel(
                    rest,
                    nw,
                    target_accept_prob=tap,
                    max_tree_depth=depth,
                    rng_key=key,
                    model_args=(z_init[s_site],),
                ),
                z_init[s_site],
            )

            def sample_kernel(s):
                hmc_state, u = s
                hmc_state = kernel(hmc_state, model_args=(u,))
                k_next, k_move = jax.random.split(hmc_state.rng_key)
                u, z = interweave_scale(
                    k_move, u, hmc_state.z, full_pe, prior_pe, loc, scl, interweave
                )
                energy, grad = jax.value_and_grad(pe_given(u))(z)
                hmc_state = hmc_state._replace(
                    z=z, z_grad=grad, potential_energy=energy, rng_key=k_next
                )
                return hmc_state, u

            def hmc_state_of(s):
                return s[0]

            def full_z(s):
                return {**s[0].z, s_site: s[1]}

        def warm(i, s):
            if progress:
                jax.debug.callback(_progress_tick, i)
            return sample_kernel(s)

        state = jax.lax.fori_loop(0, nw, warm, state)

        def collect(s, i):
            if progress:
                jax.debug.callback(_progress_tick, nw + i)
            s = sample_kernel(s)
            h = hmc_state_of(s)
            stats = (
                h.diverging,
                h.num_steps,
                h.accept_prob,
                h.energy,
                h.potential_energy,
                h.adapt_state.step_size,
            )
            return s, (full_z(s), stats)

        _, (zs, stats) = jax.lax.scan(collect, state, jnp.arange(ns))
        draws = jax.vmap(lambda z: constrain_fn(model, (), kw, z, return_deterministic=True))(zs)
        return draws, stats

    if vectorize:
        per_fit = jax.vmap(one, in_axes=(0, 0, None))  # chains of one fit share its data
        batch = jax.vmap(per_fit)
    else:

        def per_fit(keys, z0, kw):
            return jax.lax.map(lambda a: one(a[0], a[1], kw), (keys, z0))

        def batch(keys, z0, data):
            return jax.lax.map(lambda a: per_fit(*a), (keys, z0, data))

    if len(devices) > 1:
        # each device runs its own slice of the replicates with its own loops (shard_map): no
        # cross-device reduction inside the NUTS while-loops, so devices never wait on each
        # other (a plain sharded vmap would synchronise every tree-building step)
        from jax.sharding import Mesh
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.array(devices), ("r",))
        batch = jax.shard_map(batch, mesh=mesh, in_specs=P("r"), out_specs=P("r"), check_vma=False)
    return jax.jit(batch)


def chain_keys(seed: int, num_chains: int) -> tuple[jax.Array, jax.Array]:
    """Initialisation and sampling keys of the ``num_chains`` chains of the fit with ``seed``.

    Chain 0 uses ``PRNGKey(seed)`` and ``PRNGKey(seed + 1)``; chain ``c ≥ 1`` folds ``c`` into
    both, so the chains of one fit never share a key with the chains of another seed.
    """
    k_init, k_run = jax.random.PRNGKey(int(seed)), jax.random.PRNGKey(int(seed) + 1)
    inits = [k_init] + [jax.random.fold_in(k_init, c) for c in range(1, num_chains)]
    runs = [k_run] + [jax.random.fold_in(k_run, c) for c in range(1, num_chains)]
    return jnp.stack(inits), jnp.stack(runs)


def run_nuts_batched(
    model: Callable[..., None],
    kwargs_list: list[dict[str, Any]],
    *,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 1,
    seeds: list[int] | None = None,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    init_strategy: Callable | None = None,
    vectorize: bool = True,
    devices: list[Any] | None = None,
    interweave: Interweave | None = None,
    progress_bar: bool = False,
) -> list[Posterior]:
    """NUTS for ``R`` data sets of the same model and shapes, ``num_chains`` chains each, as one
    compiled job.

    ``kwargs_list[r]`` are the model's keyword arguments for fit ``r``; all must hold arrays (or
    floats) of the same shapes. Every chain gets its own initial point (from ``init_strategy``,
    default ``init_to_median(num_samples=15)``), its own key (:func:`chain_keys` of
    ``seeds[r]``) and its own step-size and diagonal mass-matrix adaptation (NumPyro's
    functional ``numpyro.infer.hmc.hmc`` kernel; windowed adaptation as in ``MCMC``), so each
    is exactly the single-chain sampler, only batched; the chains of a fit share its data.

    A fit's draws are a function of its own seed and data (and the shared settings) only, not
    of which other fits share the job, how many or in what order: its keys come from its seed,
    its initial points from one call per fit of the same compiled initialiser, and the
    adaptation is per chain; the vmapped axis of the runs never has width one (see below),
    because XLA compiles a unit batch dimension into another program whose rounding NUTS
    would amplify into another path. So a fit alone, or after a resume, gives the draws it
    gave in a group (measured on CPU: bitwise; ``tests/test_batch_reproducible.py``). Seeds
    default to the fits' positions (``seeds[r] = r``): pass them to make the fits' order
    irrelevant.

    ``vectorize=True`` vmaps chains and fits: one program step advances all of them, and every
    NUTS tree runs until the deepest tree of the batch finishes (masked), so a step costs the
    longest chain's tree. ``vectorize=False`` runs them one after another inside the same
    compiled program (``lax.map``): no waiting for the deepest tree, no vectorisation. With
    several devices (``devices``, default all local devices: GPUs, or CPU host devices) the
    runs are split over them with ``jax.shard_map`` (one chain per device when there are at
    least as many devices as chains): each device runs its slice with its own loops, all at
    once; the runs are padded to a multiple of the device count (and, when vmapped, to at
    least two per device) with copies of the last one, whose draws are discarded. The program
    is compiled once per model, sampler settings and shapes (:func:`_batched_sampler`).
    ``interweave`` (an :class:`pcbtl.interweave.Interweave`) samples the scale site by
    interweaved slice updates between NUTS steps on the other sites (NUTS within Gibbs).
    ``progress_bar`` shows one bar over the iterations (host callbacks from the compiled
    loop). Returns one :class:`pcbtl.inference.Posterior` per fit, with draws of shape
    ``(num_chains, num_samples, ...)``.
    """
    from numpyro.infer.util import initialize_model

    R = len(kwargs_list)
    if R < 1:
        raise ValueError("kwargs_list must hold at least one fit")
    C = int(num_chains)
    if isinstance(num_chains, bool) or C != num_chains or C < 1:
        raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}")
    for name, value, least in (("num_warmup", num_warmup, 0), ("num_samples", num_samples, 1)):
        if isinstance(value, bool) or int(value) != value or int(value) < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not 0.0 < float(target_accept_prob) < 1.0:
        raise ValueError(
            f"target_accept_prob must lie strictly between 0 and 1, got {target_accept_prob!r}"
        )
    seeds = list(range(R)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != R:
        raise ValueError(f"seeds has {len(seeds)} entries for {R} fits")
    init_strategy = init_strategy or init_to_median(num_samples=15)
    as_arrays = [
        jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), kw) for kw in kwargs_list
    ]
    try:
        data = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *as_arrays)
    except ValueError as exc:
        raise ValueError(
            f"the fits' model arguments differ in structure or shape, so they cannot be "
            f"stacked into one batch: {exc}"
        ) from exc
    # Everything a fit starts from is a function of its own seed and data only: its keys
    # (chain_keys of its seed), and its initial points, found by one call per fit of the same
    # compiled initialiser (never one call vmapped over the group, whose size would change the
    # program and so the rounding), from a prototype that only gives the parameters' shapes.
    pairs = [chain_keys(s, C) for s in seeds]
    keys = jnp.stack([p[1] for p in pairs])  # (R, C, 2)
    # shapes only, traced abstractly: run eagerly, the model's log density and its gradient
    # would be dispatched op by op, each op compiled on its own (seconds per model)
    prototype = jax.eval_shape(
        lambda key: (
            initialize_model(
                key, model, model_kwargs=kwargs_list[0], init_strategy=init_strategy
            ).param_info.z
        ),
        pairs[0][0][0],
    )
    prototype = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), prototype)
    init = _chain_init(model, init_strategy)
    starts = [init(p[0], kw, prototype) for p, kw in zip(pairs, as_arrays, strict=True)]
    z0 = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[z for (z, _, _), _ in starts])
    valid = np.stack([np.asarray(v) for _, v in starts])  # (R, C)
    if not bool(np.all(valid)):
        bad = sorted({int(r) for r, c in zip(*np.nonzero(~valid), strict=True)})
        raise RuntimeError(
            f"cannot find valid initial parameters (finite log density and gradient) for "
            f"fit(s) {bad}"
        )
    devices = list(devices) if devices is not None else jax.local_devices()
    runs = R
    if len(devices) > 1 and C > 1:
        # one run per chain, so that the chains of a single fit spread over the devices
        keys, z0 = jax.tree_util.tree_map(lambda a: a.reshape((R * C, 1) + a.shape[2:]), (keys, z0))
        data = jax.tree_util.tree_map(lambda a: jnp.repeat(a, C, axis=0), data)
        runs = R * C
    # runs per device: the same number on every device (shard_map splits evenly) and, when
    # vmapped, at least two. XLA drops a batch dimension of size one and compiles another
    # program (other fusions and dot kernels, hence other rounding, which NUTS amplifies into
    # another path within a few hundred iterations), so a fit run alone would not give the
    # draws it gives in a group; from two on, a run's draws do not depend on the width, on
    # its position or on the other runs (measured on CPU: bitwise the same).
    per_device = -(-runs // len(devices))
    if vectorize:
        per_device = max(per_device, 2)
    pad = per_device * len(devices) - runs
    if pad:  # copies of the last run (the same path, so no longer trees), discarded below
        keys, z0, data = jax.tree_util.tree_map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), (keys, z0, data)
        )
    sampler = _batched_sampler(
        model,
        int(num_warmup),
        int(num_samples),
        float(target_accept_prob),
        int(max_tree_depth),
        bool(vectorize),
        tuple(devices) if len(devices) > 1 else (),
        interweave,
        bool(progress_bar),
    )
    if len(devices) == 1:
        keys, z0, data = jax.device_put((keys, z0, data), devices[0])
    if progress_bar:
        from tqdm.auto import tqdm

        what = f"{C} chain(s)" + ("" if R == 1 else f" x {R} fits")
        _PROGRESS_BARS.append(tqdm(total=int(num_warmup) + int(num_samples), desc=f"NUTS, {what}"))
    try:
        # one host transfer of the whole result (indexing a sharded device array per fit
        # would dispatch one gather per fit and site)
        draws, stats = jax.device_get(sampler(keys, z0, data))
    finally:
        if progress_bar:
            _PROGRESS_BARS.pop().close()

    def by_fit(a):  # (runs, per, ...) -> (R, C, ...), padding dropped
        a = np.asarray(a)[:runs]
        return a.reshape((R, C) + a.shape[2:])

    draws = {k: by_fit(v) for k, v in draws.items()}
    stats = [by_fit(a) for a in stats]
    out = []
    for r in range(R):
        samples = {k: v[r] for k, v in draws.items()}
        div, nsteps, acc, energy, pot, step = (a[r] for a in stats)
        sample_stats = {
            "diverging": div.astype(bool),
            "n_steps": nsteps,
            "tree_depth": np.floor(np.log2(np.maximum(nsteps, 1))).astype(int) + 1,
            "acceptance_rate": acc,
            "energy": energy,
            "lp": -pot,
            "step_size": step,
        }
        out.append(Posterior(samples=samples, sample_stats=sample_stats, method="nuts"))
    return out


def resolve_chain_method(chain_method: str) -> str:
    """``"auto"`` → ``"vectorized"`` on a GPU or TPU, ``"sequential"`` on a CPU.

    On a CPU the vmapped chains of a NUTS step wait for the deepest tree among them and gain
    little from vectorisation; one after another inside the same program they were as fast or
    faster here (``benchmarks/bench_perf.py --sections chain``). Accelerators run the vmapped chains in
    parallel.
    """
    if chain_method == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "vectorized"
    return chain_method


def run_plans(
    plans: list[BatchPlan], *, devices: list[Any] | None = None, progress_bar: bool = False
) -> list[Posterior]:
    """Sample the fits described by ``plans`` (one model and sampler settings) in one job.

    Each plan's ``num_chains`` chains run as its ``chain_method`` says: ``"vectorized"``
    (vmapped, the default) or ``"sequential"`` (one after another in the same program); on
    several devices the chains and fits are spread over them (:func:`run_nuts_batched`).
    """
    first = plans[0]
    return run_nuts_batched(
        first.model,
        [p.kwargs for p in plans],
        num_warmup=first.num_warmup,
        num_samples=first.num_samples,
        num_chains=first.num_chains,
        seeds=[p.seed for p in plans],
        target_accept_prob=first.target_accept_prob,
        max_tree_depth=first.max_tree_depth,
        init_strategy=first.init_strategy,
        vectorize=resolve_chain_method(first.chain_method) != "sequential",
        devices=devices,
        interweave=first.interweave,
        progress_bar=progress_bar,
    )


def plan_key(plan: BatchPlan) -> tuple:
    """What plans must share to be sampled in one job: model, sampler settings and shapes."""
    return (
        plan.model,
        plan.num_warmup,
        plan.num_samples,
        plan.num_chains,
        plan.chain_method,
        plan.target_accept_prob,
        plan.max_tree_depth,
        plan.interweave,
        repr(plan.init_strategy),
        tuple(np.shape(a) for a in jax.tree_util.tree_leaves(plan.kwargs)),
        jax.tree_util.tree_structure(plan.kwargs),
    )
