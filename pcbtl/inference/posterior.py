"""Posterior draws with a ``(chain, draw)`` leading shape, and the plan of one NUTS fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pcbtl.interweave import Interweave

__all__ = ["BatchPlan", "Posterior", "concatenate_chains"]


@dataclass
class Posterior:
    """Posterior draws ``samples[name]`` of shape ``(chain, draw, ...)`` and sampler statistics.

    ``method`` is ``"nuts"`` or ``"svi"``; ``sample_stats`` holds NUTS statistics in ArviZ names
    (``diverging``, ``tree_depth``, ``n_steps``, ``acceptance_rate``, ``energy``, ``lp``,
    ``step_size``) or, for SVI, the ELBO ``losses``.
    """

    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray] = field(default_factory=dict)
    method: str = "nuts"
    #: :func:`pcbtl.inference.sampler_diagnostics` of these draws, once computed
    diagnostics: dict[str, Any] | None = None

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    def flat(self, name: str) -> np.ndarray:
        """Draws of ``name`` with chains concatenated: shape ``(chain·draw, ...)``."""
        a = self.samples[name]
        return a.reshape((-1,) + a.shape[2:])

    @property
    def num_divergences(self) -> int:
        d = self.sample_stats.get("diverging")
        return int(np.sum(d)) if d is not None else 0


class BatchPlan(NamedTuple):
    """One estimator's fit, split so that many can be sampled as one batched NUTS job.

    ``model(**kwargs)`` is the NumPyro model with its data (arrays and pytrees of arrays only,
    so that replicates can be stacked); ``complete(posterior, seconds=s)`` checks the draws and
    stores the fit on the estimator; the sampler settings are those of the estimator's own
    ``fit``. ``setup_seconds`` is the time spent preparing (added to each fit's time);
    ``interweave`` an :class:`pcbtl.interweave.Interweave` when the scale site is sampled by the
    interweaved slice updates instead of NUTS; ``num_chains`` chains per fit, run as
    ``chain_method`` says (:func:`pcbtl.inference.run_nuts_batched`).
    """

    model: Callable[..., None]
    kwargs: dict[str, Any]
    complete: Callable[[Posterior, float], Any]
    num_warmup: int
    num_samples: int
    seed: int
    target_accept_prob: float
    max_tree_depth: int
    init_strategy: Callable
    setup_seconds: float = 0.0
    interweave: Interweave | None = None
    num_chains: int = 1
    chain_method: str = "auto"


def concatenate_chains(posteriors: list[Posterior]) -> Posterior:
    """One :class:`Posterior` whose chains are those of ``posteriors``, in order."""
    if not posteriors:
        raise ValueError("posteriors must hold at least one Posterior")
    first = posteriors[0]
    return Posterior(
        samples={k: np.concatenate([p.samples[k] for p in posteriors]) for k in first.samples},
        sample_stats={
            k: np.concatenate([p.sample_stats[k] for p in posteriors]) for k in first.sample_stats
        },
        method=first.method,
    )
