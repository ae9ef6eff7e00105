"""benchmarks/bench_core.py runs in its quick mode and prints a complete table.

This proves the benchmark runs and its figures are well formed, not how fast anything is: the
figures depend on the machine, so only finiteness and positivity are checked.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_core", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_core"] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_core", None)


@pytest.mark.slow  # a benchmark's smoke run (39 s); opt-in
def test_quick_benchmark_table(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    rows = bench.main(["--quick", "--out", str(out)])
    names = [r.name for r in rows]

    expected = [
        *(f"grad last-layer PC, suff. stats, n={n}" for n in (100, 1000, 10000)),
        *(f"grad last-layer PC, row-by-row, n={n}" for n in (100, 1000, 10000)),
        "grad time ratio n=10000 / n=100, suff. stats",
        "grad time ratio n=10000 / n=100, row-by-row",
        "PC last layer: min(bulk, tail) ESS/s",
        "BNN N(θ_S,s²): min(bulk, tail) ESS/s",
        "PC last layer: min bulk ESS",
        "PC last layer: min tail ESS",
        "BNN N(θ_S,s²): min bulk ESS",
        "BNN N(θ_S,s²): min tail ESS",
        "PC last layer: sampling time (wall − compile)",
        "BNN N(θ_S,s²): sampling time (wall − compile)",
    ]
    missing = [e for e in expected if e not in names]
    assert not missing, f"rows missing from the table: {missing}"
    assert len(set(names)) == len(names)

    for r in rows:
        assert math.isfinite(r.value) and r.value > 0, r
        if r.ratio is not None:
            assert math.isfinite(r.ratio) and r.ratio > 0, r
            assert r.compared_with, r
    # the compared figures carry their ratio (the comparison is measured in the same run)
    by_name = {r.name: r for r in rows}
    assert by_name["PC last layer: min(bulk, tail) ESS/s"].ratio is not None
    assert by_name["grad last-layer PC, suff. stats, n=10000"].ratio is not None

    printed = capsys.readouterr().out
    written = out.read_text(encoding="utf-8")
    for text in (printed, written):
        assert "| section | figure | value |" in text
        assert "jax " in text and "numpyro " in text
        for e in expected:
            assert f"| {e} |" in text
