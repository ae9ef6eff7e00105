r"""Is an MCMC posterior (NUTS or MCLMC) fit to read? Diagnostics across chains, over every site and prediction.

:func:`sampler_diagnostics` computes, across all chains, the rank-normalised split
:math:`\hat R` and bulk and tail effective sample sizes (Vehtari, Gelman, Simpson, Carpenter &
Bürkner 2021, *Bayesian Analysis* 16:667–718) for every element of every site (weights
included), and, when given, for the posterior draws of the mean prediction ``g(x)`` at a set of
inputs (the "prediction :math:`\hat R`"). It also counts divergent transitions, trees at the depth
limit and chains that do not move. :func:`check_sampler` turns them into one
:class:`SamplerWarning` that names the worst site and says what to do.

What is judged, and why:

* **Predictions and scalar sites** (``σ``, ``τ``, ``d``, ...): these are identified, and they
  are what users read. Network weights are not identified (hidden units can be permuted, and
  chains started apart settle in different but equivalent modes), so a large weight
  :math:`\hat R` with agreeing predictions is no fault; weight figures are reported, not judged.
* **Stuck chains**: a chain whose state stays unchanged on more than half of its draws (a step
  size that collapsed, every transition divergent) has zero within-chain variance, which makes
  ESS and :math:`\hat R` meaningless; it always warns.
* **Divergences**: more than 1 % of the draws (Betancourt 2017: a divergence marks a region the
  integrator cannot enter, so the draws are biased away from it).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numpyro.diagnostics import effective_sample_size, gelman_rubin
from scipy.special import ndtri
from scipy.stats import rankdata

from pcbtl.inference.posterior import Posterior

__all__ = [
    "SamplerWarning",
    "check_sampler",
    "require_finite",
    "rhat_ess",
    "sampler_diagnostics",
]

#: above this many elements a site's R-hat and ESS are computed on a seeded subsample
MAX_ELEMENTS = 20_000


class SamplerWarning(RuntimeWarning):
    """MCMC draws that are not fit to read: chains that disagree, too few effective draws, a
    chain that does not move, or many divergent transitions."""


#: the samplers whose draws are judged (SVI draws are independent draws of a fitted guide)
MCMC_METHODS = ("nuts", "mclmc")


def _split(x: np.ndarray) -> np.ndarray:
    """Each chain's first and last halves as two chains (the middle draw of an odd length is
    dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _rank_normal(x: np.ndarray) -> np.ndarray:
    """Normal scores of the pooled ranks of each column: ``Φ⁻¹((r − 3/8)/(S + 1/4))`` over the
    ``S`` draws of all chains, ties given their average rank."""
    chains, draws = x.shape[:2]
    flat = np.ascontiguousarray(x.reshape(chains * draws, -1).T)  # ranks along contiguous rows
    ranks = rankdata(flat, axis=1).T.reshape(x.shape)
    return ndtri((ranks - 0.375) / (chains * draws + 0.25))


def rhat_ess(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Rank-normalised split :math:`\hat R`, bulk ESS and tail ESS of each column of ``draws``.

    ``draws`` has shape ``(chain, draw, k)``; every chain is split into its two halves, and a
    single chain is judged as those halves. With ``z`` the normal scores of the pooled ranks,
    :math:`\hat R` compares between-chain and within-chain variances of the split chains,

    .. math::

        \hat R = \sqrt{\frac{\frac{N-1}{N} W + \frac{1}{N} B}{W}},

    with ``W`` the mean within-chain variance and ``B/N`` the variance of the chain means; the
    larger of its values on ``z`` (bulk) and on the normal scores of ``|x − median|`` (folded,
    for the tails) is returned (Vehtari et al. 2021). Bulk ESS is the effective size of ``z``,
    tail ESS the smaller of those of the 5 % and 95 % quantile indicators ``1{x ≤ q}``.

    :math:`\hat R` equals ArviZ's ``rhat`` (to rounding). The effective sizes use NumPyro's
    ``effective_sample_size`` (Geyer's initial monotone sequence, as in Stan 2.18) on the split
    chains: ArviZ's estimator adds one autocorrelation term and caps antithetic chains at
    ``S log10 S``, so its figures differ by a few per cent on mixing chains. All columns are
    computed at once; ArviZ 0.2x loops over them in Python (4 chains of 200 draws of 4,868
    columns, the weights of a 64-64 network's scale prior: 2.3-2.5 s here, 8.2-9.5 s with
    ArviZ 0.23). Columns that are constant give NaN.
    """
    x = np.asarray(draws, np.float64)
    if x.ndim != 3:
        raise ValueError(f"draws must have shape (chain, draw, k), got {x.shape}")
    if x.shape[0] == 1:  # one chain: its halves, split again below
        half = x.shape[1] // 2
        x = x[0, : 2 * half].reshape((2, half) + x.shape[2:])
    if x.shape[1] < 4:
        raise ValueError(f"need at least 4 draws per chain, got {x.shape[1]}")
    pooled = x.reshape(-1, x.shape[2])
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant columns: NaN, flagged apart
        z_bulk = _rank_normal(_split(x))
        z_fold = _rank_normal(_split(np.abs(x - np.median(pooled, axis=0))))
        rhat = np.maximum(gelman_rubin(z_bulk), gelman_rubin(z_fold))
        bulk = effective_sample_size(z_bulk)
        lo, hi = np.quantile(pooled, [0.05, 0.95], axis=0)
        tail = np.minimum(
            effective_sample_size(_split((x <= lo).astype(np.float64))),
            effective_sample_size(_split((x <= hi).astype(np.float64))),
        )
    constant = np.all(pooled == pooled[:1], axis=0)
    for a in (rhat, bulk, tail):
        a[constant | ~np.isfinite(a)] = np.nan
    return rhat, bulk, tail


def _element_names(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*shape)]


def require_finite(posterior: Posterior, *sites: str) -> None:
    """Raise ``FloatingPointError`` if any draw of ``sites`` is NaN or infinite.

    A fit whose sampler produced non-finite draws (an overflow in the likelihood, a step size
    that ran away) has failed; its draws must not reach predictions."""
    for name in sites:
        if not np.all(np.isfinite(np.asarray(posterior.samples[name]))):
            raise FloatingPointError(f"non-finite posterior draws of {name}; fit failed")


def stuck_chains(posterior: Posterior) -> list[int]:
    """Chains whose whole state is unchanged from one draw to the next on more than half of
    their draws."""
    chains, draws = next(iter(posterior.samples.values())).shape[:2]
    if draws < 2:
        return []
    moved = np.zeros((chains, draws - 1), bool)
    for v in posterior.samples.values():
        a = np.asarray(v).reshape(chains, draws, -1)
        moved |= np.any(a[:, 1:] != a[:, :-1], axis=2)
    return [int(c) for c in np.nonzero(moved.mean(axis=1) < 0.5)[0]]


def sampler_diagnostics(
    posterior: Posterior,
    max_tree_depth: int | None = None,
    *,
    predictions: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Health of an MCMC run (NUTS or MCLMC) across its chains, over every site and over the predictions.

    Parameters
    ----------
    posterior:
        MCMC draws, ``(chain, draw, ...)`` per site (deterministic sites included).
    max_tree_depth:
        The sampler's depth limit, to count trees that hit it (NaN without it).
    predictions:
        Optional draws of the mean prediction ``g(x)`` at ``m`` inputs, ``(chain, draw, m)``
        (an estimator passes a subsample of its reference inputs).
    seed:
        Seeds the subsample of a site's elements when it has more than ``MAX_ELEMENTS``.

    Returns
    -------
    dict
        ``chains``, ``draws`` (all chains), ``divergences``, ``divergence_share``,
        ``depth_limit_share`` (trees with ``2^max_tree_depth − 1`` leapfrog steps),
        ``stuck_chains`` (indices, see :func:`stuck_chains`);
        over the scalar sites: ``min_bulk_ess``, ``min_tail_ess``, ``max_rhat`` and ``worst``
        (the site of the smallest bulk ESS); over every element of every site:
        ``all_max_rhat``, ``all_min_bulk_ess``, ``all_worst`` (the element of the largest
        :math:`\hat R`, e.g. ``theta[17]``), ``all_share_rhat_above_1.1`` and ``elements``;
        over the predictions: ``prediction_points``, ``prediction_max_rhat``,
        ``prediction_share_rhat_above_1.05``, ``prediction_share_rhat_above_1.1`` and
        ``prediction_min_bulk_ess`` (NaN without ``predictions``). A single chain is judged
        as its two halves.
    """
    if posterior.method not in MCMC_METHODS:
        raise ValueError(
            f"sampler diagnostics are for MCMC draws ({MCMC_METHODS}), got method={posterior.method!r}"
        )
    nan = float("nan")
    chains, draws = next(iter(posterior.samples.values())).shape[:2]
    out: dict[str, Any] = {
        "chains": int(chains),
        "draws": int(chains * draws),
        "divergences": posterior.num_divergences,
        "divergence_share": posterior.num_divergences / max(chains * draws, 1),
        "stuck_chains": stuck_chains(posterior),
    }
    steps = posterior.sample_stats.get("n_steps")
    out["depth_limit_share"] = (
        float(np.mean(np.asarray(steps) >= 2**max_tree_depth - 1))
        if steps is not None and max_tree_depth is not None
        else nan
    )
    out.update(
        min_bulk_ess=nan,
        min_tail_ess=nan,
        max_rhat=nan,
        worst=None,
        all_max_rhat=nan,
        all_min_bulk_ess=nan,
        all_worst=None,
        elements=0,
        prediction_points=0,
        prediction_max_rhat=nan,
        prediction_min_bulk_ess=nan,
    )
    out["all_share_rhat_above_1.1"] = nan
    out["prediction_share_rhat_above_1.05"] = nan
    out["prediction_share_rhat_above_1.1"] = nan
    if draws < 4:
        return out
    rng = np.random.default_rng(seed)
    names: list[str] = []
    columns: list[np.ndarray] = []
    scalar_names: list[str] = []
    for name, value in sorted(posterior.samples.items()):
        a = np.asarray(value, np.float64)
        shape = a.shape[2:]
        flat = a.reshape(chains, draws, -1)
        labels = _element_names(name, shape)
        if flat.shape[2] > MAX_ELEMENTS:
            keep = np.sort(rng.choice(flat.shape[2], MAX_ELEMENTS, replace=False))
            flat, labels = flat[:, :, keep], [labels[i] for i in keep]
        if not shape:
            scalar_names.append(name)
        names.extend(labels)
        columns.append(flat)
    rhat, bulk, tail = rhat_ess(np.concatenate(columns, axis=2))
    scalar = np.array([n in scalar_names for n in names])
    if scalar.any():
        b = np.where(np.isnan(bulk[scalar]), np.inf, bulk[scalar])
        out.update(
            min_bulk_ess=float(np.nanmin(bulk[scalar])) if np.isfinite(b).any() else nan,
            min_tail_ess=float(np.nanmin(tail[scalar])) if np.isfinite(tail[scalar]).any() else nan,
            max_rhat=float(np.nanmax(rhat[scalar])) if np.isfinite(rhat[scalar]).any() else nan,
            worst=[n for n, s in zip(names, scalar, strict=True) if s][int(np.argmin(b))],
        )
    finite = np.isfinite(rhat)
    out["elements"] = len(names)
    if finite.any():
        i = int(np.nanargmax(np.where(finite, rhat, -np.inf)))
        out.update(
            all_max_rhat=float(rhat[i]),
            all_worst=names[i],
            all_min_bulk_ess=float(np.nanmin(bulk[finite])),
        )
        out["all_share_rhat_above_1.1"] = float(np.mean(rhat[finite] > 1.1))
    if predictions is not None:
        p = np.asarray(predictions, np.float64)
        if p.ndim != 3 or p.shape[:2] != (chains, draws):
            raise ValueError(
                f"predictions must have shape (chain, draw, points) = ({chains}, {draws}, m), "
                f"got {p.shape}"
            )
        prhat, pbulk, _ = rhat_ess(p)
        ok = np.isfinite(prhat)
        out["prediction_points"] = int(p.shape[2])
        if ok.any():
            out["prediction_max_rhat"] = float(np.max(prhat[ok]))
            out["prediction_min_bulk_ess"] = float(np.nanmin(pbulk[ok]))
            out["prediction_share_rhat_above_1.05"] = float(np.mean(prhat[ok] > 1.05))
            out["prediction_share_rhat_above_1.1"] = float(np.mean(prhat[ok] > 1.1))
    return out


def check_sampler(
    posterior: Posterior,
    max_tree_depth: int | None = None,
    *,
    predictions: np.ndarray | None = None,
    min_ess_share: float = 0.05,
    max_rhat: float = 1.1,
    max_prediction_share: float = 0.01,
    max_divergence_share: float = 0.01,
    min_draws: int = 200,
    min_chain_draws: int = 100,
    stacklevel: int = 2,
) -> dict[str, Any]:
    r""":func:`sampler_diagnostics`, and a :class:`SamplerWarning` when the draws are unreliable.

    Always judged: stuck chains (any), and divergent transitions above
    ``max_divergence_share`` of the draws (1 %). Judged from ``min_draws`` draws on (200 in all
    chains, and at least ``min_chain_draws``, 100, per chain; with fewer, :math:`\hat R` of well-mixed chains strays past 1.1 by chance: measured
    here, 1.11 at 100 draws of one chain and bulk ESS 41): the smallest bulk ESS of the scalar
    sites below ``min_ess_share`` of the draws (5 %), their largest :math:`\hat R` above
    ``max_rhat`` (1.1), and more than ``max_prediction_share`` (1 %) of the predictions with
    :math:`\hat R` above ``max_rhat``. The message names the worst site, the share of
    predictions with :math:`\hat R > 1.05`, the worst weight, and what to try. MCLMC draws are judged the same way (they have no
    divergences); SVI posteriors
    are returned unchecked (``{}``).
    """
    if posterior.method not in MCMC_METHODS:
        return {}
    diag = sampler_diagnostics(posterior, max_tree_depth, predictions=predictions)
    problems: list[str] = []
    advice: list[str] = []
    if diag["stuck_chains"]:
        problems.append(
            f"chain(s) {diag['stuck_chains']} of {diag['chains']} did not move on most draws"
        )
        advice.append(
            "a chain that does not move has a collapsed step size or diverges at every step: "
            "keep target_accept_prob between 0.6 and 0.95 and check the data for non-finite "
            "or degenerate values"
        )
    if diag["divergence_share"] > max_divergence_share:
        problems.append(
            f"{diag['divergences']} of {diag['draws']} transitions diverged "
            f"({diag['divergence_share']:.1%})"
        )
        advice.append(
            "divergences bias the draws away from regions of high curvature: raise "
            "target_accept_prob (e.g. 0.95) or reparametrise"
        )
    per_chain = diag["draws"] // max(diag["chains"], 1)
    judged = (
        diag["draws"] >= min_draws and per_chain >= min_chain_draws and not diag["stuck_chains"]
    )
    if judged:
        if diag["min_bulk_ess"] < min_ess_share * diag["draws"]:
            problems.append(
                f"bulk ESS {diag['min_bulk_ess']:.1f} of {diag['draws']} draws for "
                f"{diag['worst']!r}"
            )
        if diag["max_rhat"] > max_rhat:
            problems.append(f"R-hat up to {diag['max_rhat']:.2f} over the scalar sites")
        pshare = diag["prediction_share_rhat_above_1.1"]
        if np.isfinite(pshare) and pshare > max_prediction_share:
            problems.append(
                f"the chains disagree on the predictions: R-hat > 1.05 at "
                f"{diag['prediction_share_rhat_above_1.05']:.1%} of "
                f"{diag['prediction_points']} reference inputs (max "
                f"{diag['prediction_max_rhat']:.2f})"
            )
        if len(problems) > len(advice):
            longer = (
                "raise max_tree_depth"
                if posterior.method == "nuts"
                else "space the draws further apart (thin)"
            )
            advice.append(
                f"run more warm-up and draws or more chains, {longer}, or check the "
                "model (a prior far from the data mixes slowly)"
            )
    if problems:
        depth = diag["depth_limit_share"]
        extra = [] if np.isnan(depth) else [f"{depth:.0%} of the trees hit the depth limit"]
        if np.isfinite(diag["all_max_rhat"]):
            extra.append(
                f"largest R-hat of any element {diag['all_max_rhat']:.2f} at {diag['all_worst']!r}"
            )
        if diag["chains"] == 1:
            extra.append("one chain, judged as its two halves: run num_chains >= 2")
        warnings.warn(
            f"{posterior.method.upper()} posterior not fit to read: "
            + "; ".join(problems)
            + (f" ({'; '.join(extra)})" if extra else "")
            + ". "
            + " ".join(a[0].upper() + a[1:] + "." for a in advice),
            SamplerWarning,
            stacklevel=stacklevel,
        )
    return diag
