"""Tiny per-method settings for tests of the estimator interface (not of the statistics)."""

from __future__ import annotations

from typing import Any

#: NUTS draws of the interface fits in test_methods.py, test_persistence.py and test_sklearn.py.
#: Those files fit the same methods on the same rows (the first ``TINY_ROWS`` target rows of the
#: shared task of tests/conftest.py, predictions at the first ``TINY_TEST`` test rows) with the
#: same settings, so they run the same XLA programs: whichever worker compiles one first writes
#: it to the test run's JAX cache and the others read it (the draws are fixed loop lengths of
#: the compiled sampler, so other numbers would compile other programs)
TINY_NUTS: dict[str, Any] = {"num_warmup": 60, "num_samples": 60, "num_chains": 2}
TINY_ROWS, TINY_TEST = 40, 50


def tiny_options(nuts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Options of every ``pcbtl.methods()`` name for a fit of seconds, ``nuts`` the NUTS draws."""
    return {
        "source-only": {},
        "target-only": {**nuts, "hidden": (4,)},
        "fine-tuning": {"max_steps": 200, "patience": 50},
        "pretrained-gaussian": nuts,
        "bayes-last-layer": nuts,
        "pc-last-layer": nuts,
        "pc-scale": {**nuts, "max_reference": 300, "n_eps": 8, "n_tau": 16},
        "pc-tangent": {**nuts, "max_reference": 300},
        "multitask-bnn": {**nuts, "hidden": (4,), "max_source_rows": 100},
        "multitask-rf": {"n_estimators": 30, "max_source_rows": 300},
        "difference-bnn": {**nuts, "hidden": (4,)},
        "difference-rf": {"n_estimators": 30},
        "latent-bnn": {**nuts, "hidden": (4,)},
        "latent-rf": {"n_estimators": 30},
    }
