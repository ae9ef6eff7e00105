"""benchmarks/bench_batch.py and bench_perf.py run in quick mode (that they run, not how fast).

The cheap bench_perf sections (gradient, τ-grid) and bench_batch run in the default suite; every
bench_perf section in quick mode (≈ 3–6 min on 2 cores) is marked slow.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module
    finally:
        sys.modules.pop(name, None)


def _check(rows, value_index):
    assert rows
    for r in rows:
        v = r[value_index]
        assert math.isfinite(v) and v >= 0, r


@pytest.mark.slow  # a benchmark's smoke run (88 s); opt-in
def test_bench_batch_quick(tmp_path):
    mod = _load("bench_batch")
    rows = mod.main(["--quick", "--out", str(tmp_path / "b.md")])
    names = [r[0] for r in rows]
    assert "speed-up vmapped vs loop of run_nuts" in names
    _check(rows, 1)
    assert "| figure | value |" in (tmp_path / "b.md").read_text()


@pytest.mark.slow  # a benchmark's smoke run (26 s); opt-in
def test_bench_perf_quick_cheap_sections(tmp_path):
    mod = _load("bench_perf")
    rows = mod.main(["--quick", "--sections", "grad,tau", "--out", str(tmp_path / "p.md")])
    names = {r[1] for r in rows}
    assert "grad ratio n=10000 / n=100" in names
    assert "peak RSS of section tau" in names
    _check(rows, 2)


@pytest.mark.slow
def test_bench_perf_quick_all_sections(tmp_path):
    mod = _load("bench_perf")
    rows = mod.main(["--quick", "--out", str(tmp_path / "p.md")])
    assert {r[0] for r in rows} == set(mod.SECTIONS)
    _check(rows, 2)
