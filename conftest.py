"""Repository-level pytest configuration: the notebooks that need the shared data.

`notebooks/03_bandgap_transfer.ipynb` and `notebooks/04_classification_transfer.ipynb` run on the
Matbench copies in ``../shared/data`` (or ``$PCBTL_SHARED_DATA``); where they are absent they are
not collected, and the report header says why. Notebook 03 (the band-gap walk-through, 95 s on the
2-core CI machine) runs with ``-m slow``: the band-gap application it steps through is run end to
end by ``tests/test_bandgap.py`` in the default run.

It also turns on JAX's persistent compilation cache for the test run (``.jax_cache/`` beside this
file, git-ignored; a ``JAX_COMPILATION_CACHE_DIR`` already set wins). The suite compiles the same
models in many modules, two xdist workers, the notebook kernels and the CLI subprocesses, and the
per-module ``pcbtl.clear_caches()`` of ``tests/conftest.py`` drops the in-memory copies; about half
of the suite's time was XLA compilation. The environment variables are set before anything imports
JAX, so the workers and the subprocesses they start read them too. The cache is keyed by the
program, the JAX version and the compiler flags, so a stale entry cannot be served; it changes
timings, not results. It is not size-capped (JAX's cap needs the ``filelock`` package): delete the
folder to reclaim its space.

Each xdist worker is pinned to its own share of the cores (below).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

_JAX_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
    # every program: the suite's many small ones are compiled again in each module (the
    # per-module cache clearing) and each process; 0 rather than 0.3 s took three interface
    # test files from 230 to 202 s on 2 workers
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}
for _name, _value in _JAX_CACHE.items():
    os.environ.setdefault(_name, _value)

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and hasattr(os, "sched_setaffinity"):
    # One xdist worker per share of the cores, set before JAX starts its thread pools (they,
    # and the notebook kernels and CLI subprocesses, inherit the affinity). Left to itself every
    # worker's XLA spreads over all cores: on 2 cores the 2-worker suite then spent twice the CPU
    # time of a serial run for the same wall time.
    _cpus = sorted(os.sched_getaffinity(0))
    if len(_cpus) >= _WORKERS:
        _worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
        os.sched_setaffinity(0, _cpus[_worker::_WORKERS])

SHARED = Path(os.environ.get("PCBTL_SHARED_DATA", ROOT.parent / "shared" / "data"))
NEEDS = {
    "notebooks/03_bandgap_transfer.ipynb": ("bandgap/matbench_expt_gap.csv",),
    "notebooks/04_classification_transfer.ipynb": (
        "bandgap/matbench_mp_gap.csv",
        "metallicity/matbench_expt_is_metal.csv",
    ),
}
MISSING = {nb: [f for f in files if not (SHARED / f).is_file()] for nb, files in NEEDS.items()}
collect_ignore = [nb for nb, missing in MISSING.items() if missing]
OPT_IN = ("notebooks/03_bandgap_transfer.ipynb",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("::")[0] in OPT_IN:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    lines = [
        f"skipping {nb}: shared data {missing} not found in {SHARED} (set PCBTL_SHARED_DATA)"
        for nb, missing in MISSING.items()
        if missing
    ]
    return lines or None
