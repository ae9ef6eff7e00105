"""The other performance figures of pcbtl (bench_core.py has gradient cost to 10,000 rows and the
last-layer ESS/s; bench_batch.py the vmapped-replicates figure). Each section runs in its own
subprocess so that its peak resident set size (RSS) is its own:

* ``chain``  — ``chain_method`` sequential / vectorized (4 chains, one device) for the PC
  last-layer, PC scale and the pretrained-Gaussian BNN: wall time of the first ``fit``
  (with compilation) and the median of three more (warm), and the median ratio
  vectorized / sequential; the default ``"auto"`` is chosen from it;
* ``grad``   — time per ``value_and_grad`` of the last-layer PC log density against target rows
  (100 … 100,000) and reference inputs (1,000 … 100,000); plus the one-off QR set-up time;
* ``tau``    — the scale prior's jitted, vmapped τ-grid ``r(τ)`` precompute against grid size,
  reference inputs and ε draws (compile excluded: one warm-up call per shape);
* ``svi``    — NUTS against SVI (mean-field) on one task: fit time, test RMSE and 95% coverage;
* ``ess``    — ESS/s (bulk and tail, minimum over parameters; sampling time = wall − JAX compile
  time) of PC last layer, PC scale (all layers) and the plain NumPyro network with Normal priors
  centred at the source weights (``bnn_model``), on a 100-row synthetic target and on a
  band-gap-sized synthetic proxy (4,604 rows);
* ``big``    — a PC last-layer fit on a 100,000-row target: time and peak RSS (goal < 2 GiB).

    python benchmarks/bench_perf.py --quick                  # tiny sizes, ≲ 2 min
    python benchmarks/bench_perf.py --out bench_perf.md      # full
    python benchmarks/bench_perf.py --sections grad,tau      # a subset
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("chain", "grad", "tau", "svi", "ess", "big")

QUICK = {
    "hidden": (8,),
    "epochs": 20,
    "draws": 40,
    "grad_rows": (100, 10000),
    "grad_refs": (1000, 10000),
    "grad_calls": 50,
    "tau_grid": (16, 32),
    "tau_refs": (200, 800),
    "tau_eps": (8, 16),
    "svi_steps": 300,
    "ess_rows": (100,),
    "ess_bandgap": None,
    "big_rows": 20000,
}
FULL = {
    "hidden": (32, 32),
    "epochs": 200,
    "draws": 500,
    "grad_rows": (100, 1000, 10000, 100000),
    "grad_refs": (1000, 10000, 100000),
    "grad_calls": 500,
    "tau_grid": (16, 64, 256),
    "tau_refs": (500, 2000, 8000),
    "tau_eps": (8, 32, 128),
    "svi_steps": 5000,
    "ess_rows": (100, 4604),
    # the real band-gap target (4,604 experimental gaps, composition features), a source
    # trained on MP PBE gaps; skipped when the shared data are absent
    "ess_bandgap": {"source_rows": 20000, "hidden": (16,), "epochs": 100, "draws": 100},
    "big_rows": 100000,
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bench_core():
    spec = importlib.util.spec_from_file_location("bench_core", HERE / "bench_core.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_core"] = mod
    spec.loader.exec_module(mod)
    return mod


def _source(s, n_target, seed=0, n_features=5):
    import pcbtl

    task = pcbtl.make_synthetic_task(
        n_source=3000, n_target=n_target, n_test=1000, n_features=n_features, seed=seed
    )
    src = pcbtl.train_source(
        task.X_source, task.y_source, hidden=s["hidden"], max_epochs=s["epochs"], progress_bar=False
    )
    return task, src


def _nuts(s):
    return {"num_warmup": s["draws"], "num_samples": s["draws"]}


# --------------------------------------------------------------------------------------------
# sections (each returns rows: (figure, value, unit, note))
# --------------------------------------------------------------------------------------------


def sec_chain(s):
    import statistics

    import jax

    import pcbtl

    task, src = _source(s, 100)
    rows = []
    for method, extra in (
        ("pc-last-layer", {}),
        ("pc-scale", {"max_reference": 1000, "n_eps": 16, "n_tau": 32}),
        ("pretrained-gaussian", {}),
    ):
        warm = {}
        for cm in ("sequential", "vectorized"):
            walls = []
            for rep in range(4):
                est = pcbtl.make_method(
                    method, src, num_chains=4, chain_method=cm, seed=rep, **_nuts(s), **extra
                )
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # short chains: health is not the point here
                    est.fit(task.X_target, task.y_target)
                walls.append(time.perf_counter() - t0)
            warm[cm] = statistics.median(walls[1:])
            steps = float(est.posterior_.sample_stats["n_steps"].mean())
            rows.append((f"{method}, chain_method={cm}, first fit", walls[0], "s", "with compilation"))  # fmt: skip
            rows.append((f"{method}, chain_method={cm}, warm fit (median of 3)", warm[cm], "s", f"4 chains, {steps:.0f} leapfrog/draw"))  # fmt: skip
            _say(f"  {method} {cm}: first {walls[0]:.1f} s, warm {warm[cm]:.1f} s")
        rows.append((f"{method}, vectorized / sequential (warm)", warm["vectorized"] / warm["sequential"], "×", ""))  # fmt: skip
    rows.append(("JAX devices in this section", jax.device_count(), "", jax.default_backend()))
    return rows


def sec_grad(s):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pcbtl
    from pcbtl.models import last_layer_pc_model, last_layer_sufficient_stats
    from pcbtl.priors import reference_gram

    n_max = max(max(s["grad_rows"]), max(s["grad_refs"]))
    task, src = _source(s, n_max)
    Phi_all = np.c_[src.features(task.X_target), np.ones(n_max)]
    y_all = task.y_target
    bc = _bench_core()
    rows = []

    def prior(m):
        gram = reference_gram(Phi_all[:m])
        return {
            "beta_source": jnp.asarray(src.head(), jnp.float32),
            "chol_G": jnp.asarray(gram.chol, jnp.float32),
            "rate": pcbtl.pc_rate(1.0, 0.05),
            "sigma_scale": float(src.y_scale),
        }

    fns, pts, setup = {}, {}, {}
    m0 = min(s["grad_refs"])
    for n in s["grad_rows"]:
        t0 = time.perf_counter()
        stats = last_layer_sufficient_stats(Phi_all[:n], y_all[:n], np.asarray(src.head()))
        setup[n] = time.perf_counter() - t0
        ld, x0 = pcbtl.make_log_density(last_layer_pc_model, {**prior(m0), "stats": stats})
        fns["rows", n], pts["rows", n] = jax.jit(jax.value_and_grad(ld)), x0
    stats = last_layer_sufficient_stats(Phi_all[:100], y_all[:100], np.asarray(src.head()))
    for m in s["grad_refs"]:
        t0 = time.perf_counter()
        pr = prior(m)
        setup["ref", m] = time.perf_counter() - t0
        ld, x0 = pcbtl.make_log_density(last_layer_pc_model, {**pr, "stats": stats})
        fns["ref", m], pts["ref", m] = jax.jit(jax.value_and_grad(ld)), x0
    t = bc.time_calls(fns, pts, s["grad_calls"], 3)
    p = int(Phi_all.shape[1])
    lo, hi = min(s["grad_rows"]), max(s["grad_rows"])
    for n in s["grad_rows"]:
        rows.append((f"grad last-layer PC, n={n} target rows", t["rows", n] * 1e6, "µs", f"p={p}"))
        rows.append((f"QR set-up of suff. stats, n={n}", setup[n] * 1e3, "ms", "once per fit"))
    for m in s["grad_refs"]:
        rows.append((f"grad last-layer PC, m={m} reference inputs", t["ref", m] * 1e6, "µs", ""))
        rows.append((f"Gram/Cholesky set-up, m={m}", setup["ref", m] * 1e3, "ms", "once per fit"))
    r = t["rows", hi] / t["rows", lo]
    rows.append((f"grad ratio n={hi} / n={lo}", r, "×", "flat in rows: goal ≤ 1.3"))
    return rows


def sec_tau(s):
    import jax
    import jax.numpy as jnp

    from pcbtl.kl import default_tau_grid, distance_curve, gaussian_kl, mc_network_kl
    from pcbtl.networks import transfer_parametrization

    task, src = _source(s, 100)
    tp = transfer_parametrization(src, "all", scale="fan_in")
    Xall = jnp.asarray(task.X_source, jnp.float32)
    base = {"n_tau": s["tau_grid"][len(s["tau_grid"]) // 2], "m": s["tau_refs"][len(s["tau_refs"]) // 2], "n_eps": s["tau_eps"][len(s["tau_eps"]) // 2]}  # fmt: skip
    rows = []

    def timed(n_tau, m, n_eps):
        Xr = jnp.tile(Xall, (max(1, -(-m // Xall.shape[0])), 1))[:m]
        grid = jnp.asarray(default_tau_grid(1.0, n_tau))
        key = jax.random.PRNGKey(0)

        def call():
            return jax.block_until_ready(
                distance_curve(
                    tp.predict_fn, tp.theta_source, tp.scales, Xr, grid, key=key, n_eps=n_eps
                )
            )

        call()  # compile
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return min(times)

    for name, values in (("n_tau", s["tau_grid"]), ("m", s["tau_refs"]), ("n_eps", s["tau_eps"])):
        for v in values:
            kw = {**base, name: v}
            sec = timed(kw["n_tau"], kw["m"], kw["n_eps"])
            rows.append(
                (
                    f"r(τ) grid, {name}={v}",
                    sec * 1e3,
                    "ms",
                    f"n_tau={kw['n_tau']}, m={kw['m']}, n_eps={kw['n_eps']}",
                )
            )
            _say(f"  {rows[-1]}")
    # one Monte Carlo KL at a τ, jitted and vmapped over ε
    Xr = Xall[: base["m"]]
    kl = jax.jit(
        lambda key, tau: mc_network_kl(
            key, tp.predict_fn, tp.theta_source, tp.scales, Xr, tau,
            lambda a, b: gaussian_kl(a, 0.2, b, 0.2), n_eps=base["n_eps"],
        )
    )  # fmt: skip
    jax.block_until_ready(kl(jax.random.PRNGKey(0), 0.1))
    t0 = time.perf_counter()
    for i in range(20):
        jax.block_until_ready(kl(jax.random.PRNGKey(i), 0.1))
    rows.append(("MC network KL at one τ (jitted, vmapped over ε)", (time.perf_counter() - t0) / 20 * 1e3, "ms", f"m={base['m']}, n_eps={base['n_eps']}"))  # fmt: skip
    rows.append(("network parameters in the transfer set", int(tp.theta_source.shape[0]), "", ""))
    return rows


def _score(est, task):
    import numpy as np

    mu = est.predict(task.X_test)
    lo, hi = est.predict_interval(task.X_test)
    return float(np.sqrt(np.mean((mu - task.y_test) ** 2))), float(
        np.mean((task.y_test >= lo) & (task.y_test <= hi))
    )


def sec_svi(s):
    import pcbtl

    task, src = _source(s, 100)
    rows = []
    for prior, extra in (
        ("last_layer", {}),
        ("scale", {"max_reference": 1000, "n_eps": 16, "n_tau": 32}),
    ):
        for inf in ("nuts", "svi"):
            est = pcbtl.PCTransferRegressor(
                src, prior=prior, inference=inf, svi_steps=s["svi_steps"], progress_bar=False,
                **_nuts(s), **extra,
            )  # fmt: skip
            t0 = time.perf_counter()
            est.fit(task.X_target, task.y_target)
            wall = time.perf_counter() - t0
            rmse, cov = _score(est, task)
            rows += [
                (f"PC {prior}, {inf.upper()}: fit time", wall, "s", "incl. compile"),
                (f"PC {prior}, {inf.upper()}: test RMSE", rmse, "", "noise sd 0.2"),
                (f"PC {prior}, {inf.upper()}: 95% coverage", cov, "", ""),
            ]
            _say(f"  {rows[-3:]}")
    return rows


ESS_METHODS = (
    ("pc-last-layer", ("beta", "sigma"), {}),
    ("pc-scale", ("tau", "eps", "sigma"), {"max_reference": 2000, "max_tree_depth": 8}),
    (
        "pc-scale-centred",
        ("tau", "theta", "sigma"),
        {"max_reference": 2000, "max_tree_depth": 8, "parametrization": "centred"},
    ),
    (
        "pc-scale-interweaved",
        ("tau", "theta", "sigma"),
        {"max_reference": 2000, "max_tree_depth": 8, "parametrization": "interweaved"},
    ),
    # the scale prior on the network linearised at θ_S: NUTS over (σ, τ), ε drawn exactly
    ("pc-tangent", ("tau", "eps", "sigma"), {"max_reference": 2000}),
    ("pretrained-gaussian", ("theta", "sigma"), {"max_tree_depth": 8}),
    # the plain network again, its prior widened to the PC scale fit's posterior median of τ:
    # the weight posterior the data imply, with the scale fixed instead of sampled
    ("pretrained-gaussian-matched", ("theta", "sigma"), {"max_tree_depth": 8}),
)
MATCHED = "pretrained-gaussian-matched"


def _bandgap_case(cfg):
    """The experimental band-gap target and a source trained on MP gaps (shared data)."""
    import numpy as np

    import pcbtl
    from pcbtl.materials.bandgap import load_bandgap_tables
    from pcbtl.materials.features import CompositionFeaturizer

    data = Path(os.environ.get("PCBTL_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
    if not (data / "bandgap" / "matbench_expt_gap.csv").is_file():
        return None
    expt, mp = load_bandgap_tables(data / "bandgap")
    feat = CompositionFeaturizer()
    keep = np.random.default_rng(0).choice(len(mp.y), cfg["source_rows"], replace=False)
    Xs = feat.transform([mp.formulas[i] for i in keep])
    src = pcbtl.train_source(
        Xs, np.asarray(mp.y)[keep], hidden=cfg["hidden"], max_epochs=cfg["epochs"],
        batch_size=256, progress_bar=False,
    )  # fmt: skip
    return feat.transform(expt.formulas), np.asarray(expt.y, np.float64), src


def sec_ess(s):
    import numpy as np

    import pcbtl

    bc = _bench_core()
    timer = bc.CompileTimer.shared()
    rows = []
    cases = []
    for n in s["ess_rows"]:
        task, src = _source(s, n, n_features=10 if n > 1000 else 5)
        label = "band-gap-sized synthetic" if n > 1000 else "synthetic"
        cases.append((label, n, task.X_target, task.y_target, src, _nuts(s)))
    if s["ess_bandgap"]:
        bg = _bandgap_case(s["ess_bandgap"])
        if bg is None:
            _say("  band-gap ESS case skipped: shared data not found (set PCBTL_SHARED_DATA)")
        else:
            X, y, src = bg
            draws = s["ess_bandgap"]["draws"]
            cases.append(("band-gap target", len(y), X, y, src, {"num_warmup": draws, "num_samples": draws}))  # fmt: skip
    chosen = os.environ.get("PCBTL_BENCH_ESS_METHODS")
    chosen = None if not chosen else {*chosen.split(","), "pretrained-gaussian"}
    if chosen is not None and MATCHED in chosen:
        chosen.add("pc-scale")
    for label, n, X, y, src, nuts in cases:
        res = {}
        tau_median = None
        for method, keep, extra in ESS_METHODS:
            if chosen is not None and method not in chosen:
                continue
            if method == MATCHED:
                if tau_median is None:  # needs the pc-scale fit before it
                    continue
                extra = {**extra, "prior_scale": tau_median}
            name = "pc-scale" if method.startswith("pc-scale") else method
            name = "pretrained-gaussian" if method == MATCHED else name
            est = pcbtl.make_method(name, src, **nuts, **extra)
            if hasattr(est, "_setup"):
                # build the prior once before timing, so its compilation is not in the fit: the
                # fit's own (warm) prior set-up is then ``prior_seconds_``, subtracted below
                est._setup(np.asarray(X, np.float32))
            with timer:
                t0 = time.perf_counter()
                est.fit(X, y)
                wall = time.perf_counter() - t0
            samples = {k: v for k, v in est.posterior_.samples.items() if k in keep}
            bulk, tail = bc.min_ess(samples)
            # sampling only: the PC models' prior set-up (Gram matrix, r(τ)) is reported apart
            prior_s = getattr(est, "prior_seconds_", 0.0)
            sampling = max(wall - timer.total - prior_s, 1e-9)
            res[method] = min(bulk, tail) / sampling
            steps = float(np.mean(est.posterior_.sample_stats["n_steps"]))
            sig = float(np.median(est.posterior_.flat("sigma")))
            note = f"{label}, n={n}: bulk {bulk:.0f}, tail {tail:.0f}, {steps:.0f} leapfrog/draw, {est.num_divergences_} div., median σ {sig:.3f}"
            if method == "pc-scale":
                tau_median = float(np.median(est.posterior_.flat("tau")))
                note += f", median τ {tau_median:.2f}"
            if method == MATCHED:
                note += f", prior scale {tau_median:.2f}"
            rows.append((f"{method} min(bulk,tail) ESS/s, {label} n={n}", res[method], "1/s", note))
            rows.append((f"{method} sampling s (wall − compile − prior set-up), {label} n={n}", sampling, "s", f"compile {timer.total:.1f} s, prior set-up {prior_s:.1f} s"))  # fmt: skip
            # what users read: the prediction at the diagnostic inputs, across chains
            diag = est.sampler_diagnostics_
            pred_ess = float(diag.get("prediction_min_bulk_ess", float("nan")))
            rows.append((f"{method} s per effective draw of the prediction (whole fit), {label} n={n}", (wall - timer.total) / pred_ess, "s", f"min bulk ESS {pred_ess:.0f} over {diag.get('prediction_points', 0)} inputs, {diag.get('prediction_share_rhat_above_1.05', float('nan')):.0%} with R-hat > 1.05"))  # fmt: skip
            _say(f"  {rows[-3]}")
        for m in [m for m in res if not m.startswith("pretrained-gaussian")]:
            rows.append((f"ratio {m} / plain BNN ESS/s, {label} n={n}", res[m] / res["pretrained-gaussian"], "×", ""))  # fmt: skip
            if MATCHED in res:
                rows.append((f"ratio {m} / plain BNN at matched prior width ESS/s, {label} n={n}", res[m] / res[MATCHED], "×", ""))  # fmt: skip
    return rows


def sec_big(s):
    import pcbtl

    n = s["big_rows"]
    task, src = _source(s, n)
    est = pcbtl.make_method("pc-last-layer", src, **_nuts(s))
    t0 = time.perf_counter()
    est.fit(task.X_target, task.y_target)
    wall = time.perf_counter() - t0
    rmse, cov = _score(est, task)
    return [
        (
            f"PC last-layer fit, n={n} target rows",
            wall,
            "s",
            f"RMSE {rmse:.3f}, coverage {cov:.2f}",
        ),
        (f"peak RSS, n={n} fit (whole process)", _rss_mib(), "MiB", "goal < 2048 MiB"),
    ]


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _run_section(name: str, mode: str) -> list[list]:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        res = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--section", name, "--mode", mode, "--json", str(out)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        sys.stderr.write(res.stderr[-4000:])
        if res.returncode != 0:
            raise RuntimeError(f"section {name} failed:\n{res.stderr[-4000:]}")
        return json.loads(out.read_text())


def environment() -> str:
    import datetime
    import platform

    import arviz as az
    import jax
    import numpyro

    return (
        f"{datetime.date.today().isoformat()}; jax {jax.__version__}, numpyro "
        f"{numpyro.__version__}, arviz {az.__version__}; python {platform.python_version()}; "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument(
        "--ess-rows",
        default=None,
        help="comma-separated synthetic target sizes of the ess section (default: the mode's); "
        "'none' runs only the band-gap case",
    )
    ap.add_argument(
        "--ess-methods",
        default=None,
        help="comma-separated subset of the ess section's samplers (default: all of "
        + ", ".join(m for m, _, _ in ESS_METHODS)
        + "); pretrained-gaussian, the reference of the ratios, is always run",
    )
    ap.add_argument(
        "--ess-draws",
        type=int,
        default=None,
        help="warm-up and kept draws of the ess section's band-gap case (default: the mode's)",
    )
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ess_rows is not None:  # read by the section subprocesses
        os.environ["PCBTL_BENCH_ESS_ROWS"] = args.ess_rows
    if args.ess_methods is not None:
        unknown = set(args.ess_methods.split(",")) - {m for m, _, _ in ESS_METHODS}
        if unknown:
            raise SystemExit(f"unknown ess methods {sorted(unknown)}")
        os.environ["PCBTL_BENCH_ESS_METHODS"] = args.ess_methods
    if args.ess_draws is not None:
        os.environ["PCBTL_BENCH_ESS_DRAWS"] = str(args.ess_draws)
    if args.section:  # child process: one section
        s = dict(QUICK if args.mode == "quick" else FULL)
        rows_env = os.environ.get("PCBTL_BENCH_ESS_ROWS")
        if rows_env:
            s["ess_rows"] = () if rows_env == "none" else tuple(int(t) for t in rows_env.split(","))
        if os.environ.get("PCBTL_BENCH_ESS_DRAWS") and s["ess_bandgap"]:
            s["ess_bandgap"] = {
                **s["ess_bandgap"],
                "draws": int(os.environ["PCBTL_BENCH_ESS_DRAWS"]),
            }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There are not enough devices")
            warnings.filterwarnings("ignore", category=FutureWarning)
            rows = [list(r) for r in globals()[f"sec_{args.section}"](s)]
        rows.append([f"peak RSS of section {args.section}", _rss_mib(), "MiB", ""])
        args.json.write_text(json.dumps(rows))
        return rows
    mode = "quick" if args.quick else "full"
    table = []
    t0 = time.perf_counter()
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; valid: {SECTIONS}")
        _say(f"[{mode}] section {name}")
        table += [[name, *r] for r in _run_section(name, mode)]
    head = f"pcbtl performance benchmarks ({mode} mode, {time.perf_counter() - t0:.0f} s)\n{environment()}\n"
    lines = ["| section | figure | value | unit | note |", "|---|---|---:|---|---|"]
    for sec, fig, val, unit, note in table:
        lines.append(f"| {sec} | {fig} | {val:.4g} | {unit} | {note} |")
    text = head + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
