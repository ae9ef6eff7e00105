r"""The built-in demo (``pcbtl demo``): a synthetic source/target task fitted end to end.

It simulates a source task (3,000 rows) and a shifted target (100 rows,
:func:`pcbtl.simulation.make_synthetic_task`), trains the source network, fits a target-only
Bayesian network and the PC prior with both constructions (last layer, scale), and writes the
posteriors (ArviZ netCDF), a parity plot per method and the prior/posterior of the distance
``d``. It is the README's first command and the smallest complete use of the package.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pcbtl._validation import check_integer
from pcbtl.estimators.baselines import BayesianNetworkRegressor
from pcbtl.estimators.pc import PCTransferRegressor
from pcbtl.evaluation import interval_scores
from pcbtl.networks import train_source
from pcbtl.plots import distance_plot, parity_plot
from pcbtl.simulation import make_synthetic_task


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(
    out: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress_bar: bool = True,
    draws: int | None = None,
    chains: int = 4,
) -> dict:
    """The built-in demo: synthetic source/target task, source network, three fits, outputs.

    Writes ``pc_last_layer.nc`` and ``pc_scale.nc`` (ArviZ netCDF), ``parity.png`` and
    ``distance.png`` into ``out`` and returns the metrics table as a dict. Every NUTS fit runs
    ``chains`` chains of ``draws`` warm-up and ``draws`` kept iterations (500, or 200 with
    ``quick``, where ``draws`` is not given).
    """
    if draws is not None:
        draws = check_integer(draws, "draws", minimum=10)
    chains = check_integer(chains, "chains", minimum=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    n_draws = draws if draws is not None else (200 if quick else 500)
    nuts = {"num_warmup": n_draws, "num_samples": n_draws, "num_chains": chains}
    t_start = time.perf_counter()
    _say("[1/5] simulating a source task (3,000 rows) and a shifted target (100 rows)")
    task = make_synthetic_task(n_source=3000, n_target=100, n_test=1000, seed=seed)
    _say("[2/5] training the source network (64-64, Adam, early stopping)")
    source = train_source(task.X_source, task.y_source, seed=seed, progress_bar=progress_bar)
    source.save(out / "source_model.npz")
    _say(f"      validation RMSE {source.noise_sd:.3f}; saved {out / 'source_model.npz'}")

    results: dict[str, dict[str, float]] = {}
    intervals: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    mu = source.predict(task.X_test)
    half = 1.959964 * source.noise_sd
    intervals["source-only"] = (mu, mu - half, mu + half)

    _say("[3/5] target-only Bayesian network (NUTS)")
    target_only = BayesianNetworkRegressor(**nuts, seed=seed, progress_bar=progress_bar).fit(
        task.X_target, task.y_target
    )
    lo, hi = target_only.predict_interval(task.X_test)
    intervals["target-only BNN"] = (target_only.predict(task.X_test), lo, hi)

    fits = {}
    for step, prior in (("4a", "last_layer"), ("4b", "scale")):
        _say(f"[{step}/5] PC prior on the KL distance, prior={prior!r} (NUTS)")
        model = PCTransferRegressor(
            source,
            prior=prior,
            **nuts,
            seed=seed,
            progress_bar=progress_bar,
        ).fit(task.X_target, task.y_target)
        lo, hi = model.predict_interval(task.X_test)
        intervals[f"PC prior ({prior})"] = (model.predict(task.X_test), lo, hi)
        model.idata_.to_netcdf(str(out / f"pc_{prior}.nc"))
        fits[prior] = model

    for name, (m, lo, hi) in intervals.items():
        s = interval_scores(task.y_test, m, lo, hi)
        results[name] = {"RMSE": s["rmse"], "coverage95": s["coverage95"], "width95": s["width95"]}

    _say("[5/5] results on 1,000 held-out target points (noise sd 0.2)")
    _say(f"{'method':<24}{'RMSE':>8}{'cover95':>9}{'width95':>9}")
    for name, r in results.items():
        _say(f"{name:<24}{r['RMSE']:>8.3f}{r['coverage95']:>9.3f}{r['width95']:>9.3f}")

    _say("\ndistance d from the source model (noise sds): prior vs posterior quantiles")
    _say(f"{'':<24}{'5%':>8}{'50%':>8}{'95%':>8}")
    rate = fits["last_layer"].rate_
    prior_q = -np.log(1 - np.array([0.05, 0.5, 0.95])) / rate
    head = f"prior Exp(λ={rate:.2f})"
    _say(f"{head:<24}" + "".join(f"{q:>8.2f}" for q in prior_q))
    for prior, model in fits.items():
        q = np.quantile(model.distance_, [0.05, 0.5, 0.95])
        _say(f"{'posterior ' + prior:<24}" + "".join(f"{v:>8.2f}" for v in q))

    fig, axes = plt.subplots(1, len(intervals), figsize=(4.2 * len(intervals), 4.2))
    for ax, (name, (m, lo, hi)) in zip(axes, intervals.items(), strict=True):
        parity_plot(task.y_test, m, lo, hi, title=name, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "parity.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (prior, model) in zip(axes, fits.items(), strict=True):
        distance_plot(model.distance_, model.rate_, ax=ax)
        ax.set_title(f"PC prior ({prior})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "distance.png", dpi=110)
    plt.close(fig)
    _say(
        f"\nwrote {out}/pc_last_layer.nc, pc_scale.nc, parity.png, distance.png "
        f"in {time.perf_counter() - t_start:.0f} s"
    )
    return results


def _demo(args: argparse.Namespace) -> int:
    run_demo(
        Path(args.out),
        quick=args.quick,
        seed=args.seed,
        progress_bar=not args.no_progress,
        draws=args.draws,
        chains=args.chains,
    )
    return 0


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="fit the built-in synthetic transfer task and write outputs")
    p.add_argument("--out", default="pcbtl-demo", help="output folder (default: pcbtl-demo)")
    p.add_argument("--quick", action="store_true", help="fewer posterior draws (200, not 500)")
    p.add_argument(
        "--draws", type=int, default=None, help="warm-up and kept NUTS iterations per chain"
    )
    p.add_argument("--chains", type=int, default=4, help="NUTS chains per fit (default: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_demo)
