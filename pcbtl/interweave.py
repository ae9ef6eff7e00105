r"""NUTS within Gibbs for the scale PC model, with ancillarity–sufficiency interweaving of ``τ``.

The scale model (:func:`pcbtl.models.scale_pc_model`) ties thousands of weights to one
flexibility ``τ`` through ``θ = θ_S + τ s⊙ε``. Sampled jointly by NUTS, either parametrization
meets a funnel: non-centred (``ε``), many target rows fix ``θ`` and so tie ``ε`` to ``τ``;
centred (``θ``), the weights the data leave free fix ``τ`` through ``N(θ; θ_S, τ² s²)``. Either
way NUTS takes tiny steps along ``τ`` (measured on the 4,604-row band-gap target: bulk ESS of
``τ`` about 1 in 100 draws, ``benchmarks/results/perf/bench_perf_ess.md``).

This module samples ``τ`` outside NUTS. One iteration is

1. NUTS on every other site (``θ``, ``σ``, …) given ``τ``, with the centred prior
   ``θ ~ N(θ_S, τ² s²)``: for fixed ``τ`` this is the geometry of a plain Bayesian network with
   Normal priors around the source weights;
2. the *sufficient* (centred) update of ``τ`` given ``θ`` and ``σ``: its conditional uses the
   prior alone, ``π(τ | σ) ∏_j N(θ_j; θ_{S,j}, τ² s_j²)`` (no pass over the data);
3. the *ancillary* (non-centred) update of ``τ`` given ``ε = (θ − θ_S)/(τ s)`` and ``σ``:
   ``π(τ | σ) N(ε; 0, I) ∏_i N(y_i; g(x_i; θ_S + τ s⊙ε), σ²)``, then ``θ ← θ_S + τ s⊙ε``.

Alternating the two updates of the same variable is the interweaving strategy of Yu & Meng
(2011, *J. Comput. Graph. Stat.* 20:531–570, "To center or not to center: that is not the
question"): the centred step mixes well where the data pin ``θ`` down, the non-centred step
where they do not, and interweaving both is at least as good as the better of the two. Each
``τ`` update is one univariate slice-sampling step on ``u = log τ`` (stepping out and shrinkage,
Neal 2003, *Ann. Stat.* 31:705–767), which leaves its conditional exactly invariant and needs no
tuning; the Jacobian of ``τ = e^u`` is included.

Both updates evaluate the model's own potential energy (``numpyro.infer.util.potential_energy``),
so they hold for any model with a positive scale site and a Normal weight site of this form; the
sites and argument names are set by :class:`Interweave`.

(NumPyro has no univariate slice sampler and its ``Gibbs`` blocks may not change another
block's sites, which step 3 must; hence the ~40 lines below.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Interweave", "slice_step", "interweave_scale"]


class Interweave(NamedTuple):
    """Which sites and model arguments the interweaving ``τ`` updates act on.

    ``scale_site``: the positive scale (``τ``); ``weight_site``: the weights with prior
    ``N(model_kwargs[loc_arg], τ² model_kwargs[scale_arg]²)``; ``data_args``: the model
    arguments holding the data (set to ``None`` for the prior-only centred update);
    ``width``: initial slice width on ``log τ``; ``max_steps``: stepping-out budget;
    ``max_shrink``: shrinkage steps before the update keeps the current value.
    """

    scale_site: str = "tau"
    weight_site: str = "theta"
    loc_arg: str = "theta_source"
    scale_arg: str = "scales"
    data_args: tuple[str, ...] = ("X", "y")
    width: float = 1.0
    max_steps: int = 8
    max_shrink: int = 40


def slice_step(
    key: jax.Array,
    log_density: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    *,
    width: float = 1.0,
    max_steps: int = 8,
    max_shrink: int = 40,
) -> jax.Array:
    r"""One univariate slice-sampling update of ``x0`` for ``log_density`` (Neal 2003, §4).

    Draw the level ``log h = log p(x0) − e``, ``e ~ Exp(1)``; place an interval of ``width``
    at random around ``x0`` and step it out (at most ``max_steps`` widths in all, split at
    random between the two ends) while its ends lie inside the slice; then draw uniformly on
    the interval, shrinking it towards ``x0`` after each rejection. The update leaves ``p``
    invariant; a non-finite ``log p`` counts as outside the slice. If ``max_shrink`` draws
    are all rejected (the interval has then shrunk by ``2^{-max_shrink}`` around ``x0``) ``x0``
    is kept. Jittable and vmappable (``lax.while_loop`` throughout).
    """
    k_level, k_pos, k_split, k_shrink = jax.random.split(key, 4)
    level = log_density(x0) - jax.random.exponential(k_level)
    left = x0 - width * jax.random.uniform(k_pos)
    right = left + width
    n_left = jnp.floor(max_steps * jax.random.uniform(k_split)).astype(jnp.int32)
    n_right = max_steps - 1 - n_left

    def inside(x):
        lp = log_density(x)
        return jnp.isfinite(lp) & (lp > level)

    left, _ = jax.lax.while_loop(
        lambda c: (c[1] > 0) & inside(c[0]), lambda c: (c[0] - width, c[1] - 1), (left, n_left)
    )
    right, _ = jax.lax.while_loop(
        lambda c: (c[1] > 0) & inside(c[0]), lambda c: (c[0] + width, c[1] - 1), (right, n_right)
    )

    def shrink(c):
        _, lo, hi, _, i, k = c
        k, sub = jax.random.split(k)
        x1 = lo + (hi - lo) * jax.random.uniform(sub)
        ok = inside(x1)
        lo = jnp.where(~ok & (x1 < x0), x1, lo)
        hi = jnp.where(~ok & (x1 >= x0), x1, hi)
        return x1, lo, hi, ok, i + 1, k

    x1, _, _, accepted, _, _ = jax.lax.while_loop(
        lambda c: ~c[3] & (c[4] < max_shrink),
        shrink,
        (x0, left, right, jnp.asarray(False), jnp.asarray(0), k_shrink),
    )
    return jnp.where(accepted, x1, x0)


def interweave_scale(
    key: jax.Array,
    u: jax.Array,
    z: dict[str, jax.Array],
    potential_fn: Callable[[dict[str, jax.Array]], jax.Array],
    prior_potential_fn: Callable[[dict[str, jax.Array]], jax.Array],
    loc: jax.Array,
    scale: jax.Array,
    spec: Interweave,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The centred then the non-centred slice update of ``u = log τ`` (steps 2–3 above).

    ``z`` holds the unconstrained values of every other site; ``potential_fn`` and
    ``prior_potential_fn`` map all unconstrained sites (``τ`` as ``log τ``) to the negative log
    joint, with and without the data. Returns the new ``u`` and ``z`` (its weights moved with
    ``τ`` at fixed ``ε``). With ``D`` weights, the non-centred target in ``u`` is the centred
    joint plus ``D·u``: ``∑_j log N(θ_j; θ_{S,j}, e^{2u} s_j²) = log N(ε; 0, I) − D u − ∑ log s_j
    − (D/2) log 2π``.
    """
    s_site, w_site = spec.scale_site, spec.weight_site
    k_c, k_nc = jax.random.split(key)
    options = dict(width=spec.width, max_steps=spec.max_steps, max_shrink=spec.max_shrink)

    def centred(v):
        return -prior_potential_fn({**z, s_site: v})

    u = slice_step(k_c, centred, u, **options)
    eps = (z[w_site] - loc) / (jnp.exp(u) * scale)
    dim = eps.size

    def weights(v):
        return loc + jnp.exp(v) * scale * eps

    def noncentred(v):
        return -potential_fn({**z, s_site: v, w_site: weights(v)}) + dim * v

    u = slice_step(k_nc, noncentred, u, **options)
    return u, {**z, w_site: weights(u)}


def conditional_potentials(
    model: Callable[..., None], kwargs: dict[str, Any], spec: Interweave
) -> tuple[Callable, Callable]:
    """``(potential_fn, prior_potential_fn)`` of ``model(**kwargs)`` over all unconstrained sites."""
    from numpyro.infer.util import potential_energy

    prior_kwargs = {**kwargs, **{name: None for name in spec.data_args}}

    def potential_fn(params):
        return potential_energy(model, (), kwargs, params)

    def prior_potential_fn(params):
        return potential_energy(model, (), prior_kwargs, params)

    return potential_fn, prior_potential_fn
