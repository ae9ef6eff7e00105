"""Benchmark 3: R replicate fits as one vmapped NUTS job against R separate ``MCMC.run`` calls.

Same task, model (last-layer PC prior), data sets, warm-up, draws and seeds in every variant:

* ``vmapped``: :func:`pcbtl.inference.run_nuts_batched` — one jitted ``vmap`` over replicates of
  NumPyro's functional NUTS kernel (each replicate adapts its own step size and mass matrix);
* ``loop run_nuts``: :func:`pcbtl.run_nuts` per replicate (a fresh ``numpyro.infer.MCMC`` per
  fit, what a user looping over fits does; each call compiles);
* ``loop one MCMC``: one ``MCMC`` object re-run on each data set (``jit_model_args=True``: the
  compiled sampler is reused, the strongest loop baseline);
* ``estimators``: the estimator level, :func:`pcbtl.estimators.registry.fit_replicates` (vmapped, with set-up
  and ArviZ export) against ``PCTransferRegressor.fit`` in a loop.

Wall times include compilation (a job pays it once; the loop pays it per call unless the MCMC
object is reused). Peak resident set size of the process is reported at the end.

    python benchmarks/bench_batch.py --quick          # 4 replicates, ≲ 1 min
    python benchmarks/bench_batch.py --out bench_batch.md   # 64 replicates (≈ 10 min, 2 cores)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import jax
import numpyro
from numpyro.infer import MCMC, NUTS, init_to_median

import pcbtl
from pcbtl.estimators.registry import fit_replicates, make_method
from pcbtl.inference import run_nuts_batched
from pcbtl.models import last_layer_pc_model

QUICK = {"R": 4, "n_target": 100, "warmup": 50, "samples": 50, "hidden": (8,), "epochs": 30}
FULL = {"R": 64, "n_target": 100, "warmup": 500, "samples": 500, "hidden": (32, 32), "epochs": 200}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment() -> str:
    import arviz as az

    return (
        f"{datetime.date.today().isoformat()}; jax {jax.__version__}, numpyro "
        f"{numpyro.__version__}, arviz {az.__version__}; python {platform.python_version()}; "
        f"{platform.machine()}, {jax.device_count()} JAX device(s) ({jax.devices()[0].platform})"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(s: dict) -> list[tuple[str, float, str]]:
    R, n = s["R"], s["n_target"]
    task = pcbtl.make_synthetic_task(n_source=2000, n_target=R * n, n_test=10, seed=0)
    source = pcbtl.train_source(
        task.X_source, task.y_source, hidden=s["hidden"], max_epochs=s["epochs"], progress_bar=False
    )
    datasets = [
        (task.X_target[r * n : (r + 1) * n], task.y_target[r * n : (r + 1) * n]) for r in range(R)
    ]
    opts = {"num_warmup": s["warmup"], "num_samples": s["samples"]}

    def ests():
        return [make_method("pc-last-layer", source, seed=r, **opts) for r in range(R)]

    # model kwargs of every replicate, as the estimator builds them
    kwargs = []
    for est, (X, y) in zip(ests(), datasets, strict=True):
        setup = est._setup(X)
        kwargs.append(est._model_kwargs(setup, X, y))
    rows = []
    _say(f"[{R} replicates] vmapped run_nuts_batched ...")
    t0 = time.perf_counter()
    posts = run_nuts_batched(
        last_layer_pc_model,
        kwargs,
        num_warmup=s["warmup"],
        num_samples=s["samples"],
        seeds=list(range(R)),
    )
    t_vmap = time.perf_counter() - t0
    div_v = sum(p.num_divergences for p in posts)
    _say(f"  {t_vmap:.1f} s")
    _say("  loop of pcbtl.run_nuts ...")
    t0 = time.perf_counter()
    div_l = 0
    for r, kw in enumerate(kwargs):
        p = pcbtl.run_nuts(
            last_layer_pc_model,
            kw,
            num_warmup=s["warmup"],
            num_samples=s["samples"],
            num_chains=1,  # one chain per replicate, as in the vmapped job
            seed=r,
            init_strategy=init_to_median(num_samples=15),
            progress_bar=False,
        )
        div_l += p.num_divergences
    t_loop = time.perf_counter() - t0
    _say(f"  {t_loop:.1f} s")
    _say("  loop of one reused MCMC object ...")
    mcmc = MCMC(
        NUTS(last_layer_pc_model, init_strategy=init_to_median(num_samples=15)),
        num_warmup=s["warmup"],
        num_samples=s["samples"],
        progress_bar=False,
        jit_model_args=True,
    )
    t0 = time.perf_counter()
    for r, kw in enumerate(kwargs):
        mcmc.run(jax.random.PRNGKey(r), **kw)
        jax.block_until_ready(mcmc.get_samples())
    t_reuse = time.perf_counter() - t0
    _say(f"  {t_reuse:.1f} s")
    _say("  estimators: fit_replicates vs fit loop ...")
    t0 = time.perf_counter()
    fitted = fit_replicates(ests(), datasets)
    t_est_v = time.perf_counter() - t0
    assert all(e.batched_ for e in fitted)
    t0 = time.perf_counter()
    for est, (X, y) in zip(ests(), datasets, strict=True):
        est.fit(X, y)
    t_est_l = time.perf_counter() - t0
    _say(f"  {t_est_v:.1f} s vs {t_est_l:.1f} s")
    rows += [
        (f"{R} fits, vmapped job (run_nuts_batched)", t_vmap, f"{div_v} divergences in all"),
        (f"{R} fits, loop of run_nuts (fresh MCMC each)", t_loop, f"{div_l} divergences in all"),
        (f"{R} fits, loop of one reused MCMC (jit_model_args)", t_reuse, ""),
        ("speed-up vmapped vs loop of run_nuts", t_loop / t_vmap, "goal ≥ 5×"),
        ("speed-up vmapped vs loop of one reused MCMC", t_reuse / t_vmap, ""),
        (f"{R} estimator fits, fit_replicates (vmapped)", t_est_v, "set-up + NUTS + ArviZ"),
        (f"{R} estimator fits, PCTransferRegressor.fit loop", t_est_l, ""),
        ("speed-up estimators vmapped vs loop", t_est_l / t_est_v, ""),
        ("peak RSS of the process", peak_rss_mib(), "MiB"),
    ]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There are not enough devices")
        rows = run(s)
    head = (
        f"pcbtl batch benchmark ({'quick' if args.quick else 'full'}: {s['R']} replicates × "
        f"{s['n_target']} rows, source {s['hidden']}, {s['warmup']}+{s['samples']} draws, 1 chain)\n"
        f"{environment()}\n"
    )
    table = "| figure | value | note |\n|---|---:|---|\n" + "\n".join(
        f"| {a} | {b:.3g} | {c} |" for a, b, c in rows
    )
    print(head)
    print(table)
    if args.out:
        args.out.write_text(head + "\n" + table + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
