"""Speed of the PC transfer classifiers: gradient cost and fit time against the Bayesian
last layer.

For two and three classes, on tasks of :func:`pcbtl.simulation.make_synthetic_classification_task`
(δ = 1, a (16, 16) source network trained on 5,000 rows, the classification study's sizes):

(i)  Time per gradient of the log density that NUTS follows (``jax.value_and_grad`` of
     :func:`pcbtl.make_log_density` of the fit's model and arguments) for ``pc-last-layer``
     (the Fisher-sphere direction and the exact length density, evaluated on 2,000 reference
     rows at every step) and ``pc-scale`` (the last layer's weights through the network, the
     ``r(τ)`` curve); median over repeats of ``calls`` timed calls, compilation excluded.
(ii) Wall time of a whole fit (4 chains of 150 + 150 draws, the study's settings) of
     ``pc-last-layer`` and ``pc-scale`` against ``bayes-last-layer`` (a Gaussian head prior
     with a learned scale; no distance to compute) on the same data: median over ``fits``
     fits after one warm-up fit (so the JIT compilation is excluded), and the ratio to the
     Bayesian last layer's median.

Run::

    python benchmarks/bench_classification.py --quick     # ≲ 3 min on a 2-core CPU
    python benchmarks/bench_classification.py --out benchmarks/results/perf/classification.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pcbtl
from pcbtl.classification import train_source_classifier
from pcbtl.estimators.registry import make_method, method_options
from pcbtl.simulation import make_synthetic_classification_task

METHODS = ("bayes-last-layer", "pc-last-layer", "pc-scale")


def _estimator(name: str, source, seed: int):
    opts = method_options(
        name,
        seed=seed,
        sampler={"num_warmup": 150, "num_samples": 150, "num_chains": 4},
        task="classification",
        **({"max_reference": 2000} if name.startswith("pc-") else {}),
    )
    return make_method(name, source, **opts)


def gradient_ms(est, X: np.ndarray, y: np.ndarray, calls: int, repeats: int) -> float:
    """Median milliseconds per ``value_and_grad`` call of the fit's log density."""
    plan = est._batch_plan(X, y)
    log_density, x0 = pcbtl.make_log_density(plan.model, plan.kwargs)
    vg = jax.jit(jax.value_and_grad(log_density))
    jax.block_until_ready(vg(x0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = vg(x0)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def fit_seconds(name: str, source, X: np.ndarray, y: np.ndarray, fits: int) -> float:
    """Median wall seconds of ``fits`` fits after a warm-up fit (seeds 1, 2, …)."""
    _estimator(name, source, 0).fit(X, y)
    times = []
    for seed in range(1, fits + 1):
        t0 = time.perf_counter()
        _estimator(name, source, seed).fit(X, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n_targets: tuple[int, ...], calls: int, repeats: int, fits: int) -> list[str]:
    rows = [
        "| classes | n_T | method | ms per gradient | fit s (median) | fit / bayes-last-layer |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for K in (2, 3):
        for n_t in n_targets:
            task = make_synthetic_classification_task(n_classes=K, delta=1.0, n_target=n_t, seed=0)
            source = train_source_classifier(
                task.X_source, task.y_source, hidden=(16, 16), progress_bar=False
            )
            X, y = task.X_target, task.y_target
            secs = {m: fit_seconds(m, source, X, y, fits) for m in METHODS}
            for m in METHODS:
                grad = (
                    f"{gradient_ms(_estimator(m, source, 0), X, y, calls, repeats):.3f}"
                    if m.startswith("pc-")
                    else "—"
                )
                ratio = secs[m] / secs["bayes-last-layer"]
                rows.append(f"| {K} | {n_t} | {m} | {grad} | {secs[m]:.1f} | {ratio:.1f} |")
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n_T = 25 only, fewer repeats")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    if args.quick:
        n_targets, calls, repeats, fits = (25,), 100, 3, 2
    else:
        n_targets, calls, repeats, fits = (25, 500), 300, 5, 3
    header = (
        f"# Classification speed ({'quick' if args.quick else 'full'})\n\n"
        f"{datetime.date.today()} · pcbtl {pcbtl.__version__} · JAX {jax.__version__} · "
        f"{platform.machine()} {platform.processor() or ''}, {jax.devices()[0].platform}\n"
    )
    print(header, flush=True)
    with warnings.catch_warnings():
        # short chains on small targets: the sampler's own warnings are not the subject here
        warnings.simplefilter("ignore")
        rows = run(n_targets, calls, repeats, fits)
    text = header + "\n" + "\n".join(rows) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    jnp.zeros(1)  # start the backend before the first timing
    sys.exit(main())
