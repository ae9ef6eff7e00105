"""Shared fixtures: one small synthetic task and one source network per test session."""

from __future__ import annotations

import numpy as np
import pytest

import pcbtl


@pytest.fixture(scope="session")
def task():
    return pcbtl.make_synthetic_task(
        n_source=1500, n_target=60, n_test=400, n_features=3, shift=2.0, noise_sd=0.2, seed=1
    )


@pytest.fixture(scope="session")
def source(task):
    return pcbtl.train_source(
        task.X_source, task.y_source, hidden=(16, 16), seed=0, max_epochs=150, progress_bar=False
    )


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free the compiled XLA programs after each test module.

    Every compiled CPU program keeps its own memory mappings; the whole suite compiles
    thousands of programs in one process, which reached the kernel's per-process limit on
    mappings (``vm.max_map_count``, 65,530 here): thread creation and XLA's JIT linker then fail
    ("can't start new thread", "Failed to materialize symbols"). A user's session compiles a
    few models; the suite compiles every model of the package.
    """
    yield
    pcbtl.clear_caches()
