"""Core speed benchmarks of pcbtl: gradient cost of the last-layer PC model and NUTS ESS/s.

Two measurements, each against a comparison run in the same process:

(i)  Time per NUTS gradient: ``value_and_grad`` of the log density on the flat unconstrained vector
     (:func:`pcbtl.make_log_density`, wrapped in ``jax.jit(jax.value_and_grad(...))``) of the
     last-layer PC model with the likelihood from sufficient statistics
     (:func:`pcbtl.models.last_layer_sufficient_stats`), for 100, 1,000 and 10,000 target rows,
     against the same model with the row-by-row Gaussian likelihood. Median over many calls,
     each timed with ``block_until_ready``; compilation is excluded (one warm-up call).
     The goal is a flat cost in the number of rows: ratio 10,000/100 ≤ 1.3.

(ii) ESS per second of NUTS on the last-layer PC posterior against a plain NumPyro Bayesian
     network (``numpyro.contrib.module.random_flax_module``) whose every weight has the prior
     ``N(θ_S, (prior_scale/sqrt(fan_in))²)`` centred at the source weights: same data, same
     architecture, same noise prior, same ``num_warmup``/``num_samples``/``num_chains``/seed,
     both through :func:`pcbtl.run_nuts`. ESS is ArviZ's rank-normalised bulk and tail ESS, the
     minimum over parameters (last layer: ``beta`` and ``sigma``; BNN: every weight and
     ``sigma``). Sampling time is the wall time of ``run_nuts`` (warm-up included) minus the
     JAX compile time during the call (tracing + lowering + XLA compilation, summed from
     ``jax.monitoring`` events; each sequential chain is compiled anew), reported on its own
     row. Python set-up and initialisation stay in the sampling time (which is conservative for
     the cheap model). Full mode cross-checks it against wall time minus the wall time of the
     same call with 2 warm-up steps + 2 draws per chain. One more row gives ESS per wall second
     with everything included.

Run::

    python benchmarks/bench_core.py --quick            # ≲ 60 s
    python benchmarks/bench_core.py --out results.md   # full, ≲ 10 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import random_flax_module
from numpyro.infer import init_to_median

import pcbtl
from pcbtl.models import last_layer_pc_model, last_layer_sufficient_stats
from pcbtl.priors import last_layer_pc_offset, reference_gram

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\sArviZ is undergoing", category=FutureWarning)
    import arviz as az

__all__ = ["Row", "Settings", "main", "run_benchmarks", "format_table"]


# ------------------------------------------------------------------------------------------
# settings and results
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (``quick`` or ``full``)."""

    mode: str
    hidden: tuple[int, ...]
    n_source: int
    source_epochs: int
    grad_rows: tuple[int, ...]
    grad_calls: int
    grad_repeats: int
    n_target: int
    num_warmup: int
    num_samples: int
    num_chains: int
    bnn_prior_scale: float
    overhead_check: bool
    seed: int = 0


QUICK = Settings(
    mode="quick",
    hidden=(16, 16),
    n_source=1000,
    source_epochs=40,
    grad_rows=(100, 1000, 10000),
    grad_calls=200,
    grad_repeats=3,
    n_target=100,
    num_warmup=100,
    num_samples=100,
    num_chains=1,
    bnn_prior_scale=1.0,
    overhead_check=False,
)

FULL = Settings(
    mode="full",
    hidden=(64, 64),
    n_source=3000,
    source_epochs=300,
    grad_rows=(100, 1000, 10000),
    grad_calls=2000,
    grad_repeats=5,
    n_target=100,
    num_warmup=1000,
    num_samples=1000,
    num_chains=4,
    bnn_prior_scale=1.0,
    overhead_check=True,
)


@dataclass
class Row:
    """One line of the results table; ``ratio`` is ``value / compared value`` when compared."""

    section: str
    name: str
    value: float
    unit: str
    compared_with: str = ""
    ratio: float | None = None
    note: str = ""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# (i) time per gradient
# ------------------------------------------------------------------------------------------


def last_layer_rows_model(beta_source, chol_G, rate, sigma_scale, Phi, y) -> None:
    """The last-layer PC model with the row-by-row likelihood ``y_i ~ N(φ_iᵀβ, σ²)``.

    Same sites and prior as :func:`pcbtl.models.last_layer_pc_model` (non-centred), so both
    have the same flat unconstrained vector; only the likelihood is evaluated differently.
    """
    sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
    d = numpyro.sample("distance", dist.Exponential(rate))
    z = numpyro.sample("z", dist.Normal(jnp.zeros(beta_source.shape[-1]), 1.0).to_event(1))
    beta = beta_source + last_layer_pc_offset(d, z, chol_G, sigma)
    numpyro.sample("y", dist.Normal(Phi @ beta, sigma), obs=y)


def _with_bias(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, np.float64)
    return np.concatenate([F, np.ones((F.shape[0], 1))], axis=1)


def last_layer_prior(source: pcbtl.SourceModel, X_target: np.ndarray) -> dict[str, Any]:
    """The prior arguments :class:`pcbtl.PCTransferRegressor` builds for ``prior="last_layer"``
    with its defaults (``U = 1``, ``alpha = 0.05``, ``Q`` = target inputs + source reference
    inputs, ``σ ~ HalfNormal(sd of the source labels)``)."""
    Xref = np.concatenate([X_target, source.reference_X], axis=0).astype(np.float32)
    gram = reference_gram(_with_bias(source.features(Xref)))
    return {
        "beta_source": jnp.asarray(source.head(), jnp.float32),
        "chol_G": jnp.asarray(gram.chol, jnp.float32),
        "rate": pcbtl.pc_rate(1.0, 0.05),
        "sigma_scale": float(source.y_scale),
    }


def time_calls(
    fns: dict[Any, Callable[[jax.Array], Any]], x: dict[Any, jax.Array], calls: int, repeats: int
) -> dict[Any, float]:
    """Median seconds per call of ``fns[k](x[k])`` for every ``k``, each call blocked on.

    One warm-up call per function (compilation) first; then ``repeats`` rounds, each timing a
    block of ``calls`` calls of every function in turn (interleaved, so that drift in the
    machine's speed hits all alike). Result: the median over rounds of the per-block medians.
    """
    for k, fn in fns.items():
        jax.block_until_ready(fn(x[k]))
    medians: dict[Any, list[float]] = {k: [] for k in fns}
    times = np.empty(calls)
    for _ in range(repeats):
        for k, fn in fns.items():
            xk = x[k]
            for i in range(calls):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(xk))
                times[i] = time.perf_counter() - t0
            medians[k].append(float(np.median(times)))
    return {k: statistics.median(v) for k, v in medians.items()}


def bench_gradients(
    source: pcbtl.SourceModel, X: np.ndarray, y: np.ndarray, s: Settings
) -> list[Row]:
    prior = last_layer_prior(source, X[: s.n_target])
    Phi_all = _with_bias(source.features(X))
    beta0 = np.asarray(prior["beta_source"], np.float64)  # the stats are measured from β_S
    fns: dict[tuple[str, int], Callable] = {}
    points: dict[tuple[str, int], jax.Array] = {}
    for n in s.grad_rows:
        Phi, yn = Phi_all[:n], y[:n]
        ld_s, x0 = pcbtl.make_log_density(
            last_layer_pc_model,
            {**prior, "stats": last_layer_sufficient_stats(Phi, yn, beta0)},
            seed=s.seed,
        )
        ld_r, x0_r = pcbtl.make_log_density(
            last_layer_rows_model,
            {**prior, "Phi": jnp.asarray(Phi, jnp.float32), "y": jnp.asarray(yn, jnp.float32)},
            seed=s.seed,
        )
        if x0.shape != x0_r.shape:
            raise RuntimeError("the two last-layer models have different unconstrained vectors")
        # the two likelihoods must agree (float32: relative 1e-4 of the log density)
        a, b = float(ld_s(x0)), float(ld_r(x0))
        if not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-2):
            raise RuntimeError(f"log densities disagree at n={n}: suffstats {a} vs rows {b}")
        for kind, ld in (("suffstats", ld_s), ("rows", ld_r)):
            fns[kind, n] = jax.jit(jax.value_and_grad(ld))
            points[kind, n] = x0
    t = time_calls(fns, points, s.grad_calls, s.grad_repeats)
    per = {kind: {n: t[kind, n] for n in s.grad_rows} for kind in ("suffstats", "rows")}
    for n in s.grad_rows:
        _say(
            f"  n={n:>6}: suffstats {per['suffstats'][n] * 1e6:8.1f} µs, "
            f"rows {per['rows'][n] * 1e6:8.1f} µs"
        )
    rows: list[Row] = []
    sec = "(i) gradient"
    p = int(prior["beta_source"].shape[0])
    for n in s.grad_rows:
        rows.append(
            Row(
                sec,
                f"grad last-layer PC, suff. stats, n={n}",
                per["suffstats"][n] * 1e6,
                "µs",
                f"row-by-row, n={n}",
                per["suffstats"][n] / per["rows"][n],
                f"p={p}",
            )
        )
    for n in s.grad_rows:
        rows.append(Row(sec, f"grad last-layer PC, row-by-row, n={n}", per["rows"][n] * 1e6, "µs"))
    lo, hi = min(s.grad_rows), max(s.grad_rows)
    for kind, label in (("suffstats", "suff. stats"), ("rows", "row-by-row")):
        r = per[kind][hi] / per[kind][lo]
        note = f"target ≤ 1.3: {'met' if r <= 1.3 else 'NOT met'}" if kind == "suffstats" else ""
        rows.append(Row(sec, f"grad time ratio n={hi} / n={lo}, {label}", r, "×", note=note))
    return rows


# ------------------------------------------------------------------------------------------
# (ii) ESS per second
# ------------------------------------------------------------------------------------------


def flax_bnn_model(source, prior_scale, sigma_scale, X, y=None) -> None:
    """Plain NumPyro BNN over the source architecture, ``random_flax_module`` style.

    Every parameter has the prior ``N(θ_S, (prior_scale/sqrt(fan_in))²)`` (fan-in of its
    layer), ``σ ~ HalfNormal(sigma_scale)``, ``y ~ N(m_y + s_y f((x − m_x)/s_x; θ), σ²)``
    with the source network's scalings.
    """
    prior = {}
    for layer, leaves in source.params.items():
        fan_in = leaves["kernel"].shape[0]
        for name, value in leaves.items():
            prior[f"{layer}.{name}"] = dist.Normal(
                jnp.asarray(value, jnp.float32), prior_scale / math.sqrt(fan_in)
            )
    net = random_flax_module("net", source.module, prior=prior, input_shape=(1, X.shape[-1]))
    sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
    mean = source.y_mean + source.y_scale * net(source.scale_inputs(X))[..., 0]
    numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


class CompileTimer:
    """Sums JAX's compile events (tracing, lowering to MLIR, XLA compilation) while active."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    _instance: CompileTimer | None = None

    def __init__(self) -> None:
        self.active = False
        self.seconds: dict[str, float] = defaultdict(float)
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    @classmethod
    def shared(cls) -> CompileTimer:
        """The one timer of this process (JAX listeners cannot be unregistered publicly)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event in self.EVENTS:
            self.seconds[event] += duration

    def __enter__(self) -> CompileTimer:
        self.seconds.clear()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def min_ess(samples: dict[str, np.ndarray]) -> tuple[float, float]:
    """Minimum bulk and tail ESS over every scalar parameter in ``samples`` ((chain, draw, ...))."""
    data = az.convert_to_dataset({k: np.asarray(v, np.float64) for k, v in samples.items()})
    out = []
    for method in ("bulk", "tail"):
        ess = az.ess(data, method=method)
        out.append(min(float(np.nanmin(ess[v].values)) for v in ess.data_vars))
    return out[0], out[1]


@dataclass
class SamplerResult:
    """One timed ``run_nuts`` call and the minimum ESS of its draws.

    ``wall``: seconds of the whole call; ``compile``: JAX compile seconds inside it
    (``jax.monitoring``), ``sampling = wall − compile``. ``overhead`` (cross-check, optional):
    wall seconds of the same call with 2 warm-up + 2 draws per chain (compilation,
    initialisation, Python set-up: what does not grow with the number of draws).
    """

    wall: float
    compile: float
    overhead: float | None
    ess_bulk: float
    ess_tail: float
    n_params: int
    divergences: int
    mean_steps: float

    @property
    def sampling(self) -> float:
        return self.wall - self.compile

    @property
    def ess_per_s(self) -> float:
        """min(bulk, tail) ESS per second of sampling (compilation excluded)."""
        return min(self.ess_bulk, self.ess_tail) / self.sampling

    @property
    def ess_per_wall_s(self) -> float:
        """min(bulk, tail) ESS per second of the whole ``run_nuts`` call (compile included)."""
        return min(self.ess_bulk, self.ess_tail) / self.wall

    def __str__(self) -> str:
        return (
            f"wall {self.wall:.2f} s (compile {self.compile:.2f} s, 2+2-draw run "
            f"{self.overhead} s), ESS bulk {self.ess_bulk:.1f} "
            f"tail {self.ess_tail:.1f} over {self.n_params} params, "
            f"{self.divergences} divergences, {self.mean_steps:.0f} leapfrog steps/draw"
        )


def time_nuts(
    model, kwargs: dict[str, Any], keep: Callable[[str], bool], s: Settings, timer: CompileTimer
) -> SamplerResult:
    """Time ``run_nuts`` with the settings ``s``, summing JAX compile time during the call.

    With ``s.overhead_check``, first a short call to warm the process and a timed short call
    with 2 warm-up steps and 2 draws per chain (same chains, seed, initialisation): its wall
    time is the fixed overhead, for a cross-check of ``wall − compile``."""

    def run(num_warmup: int, num_samples: int):
        with timer:
            t0 = time.perf_counter()
            post = pcbtl.run_nuts(
                model,
                kwargs,
                num_warmup=num_warmup,
                num_samples=num_samples,
                num_chains=s.num_chains,
                chain_method="sequential",
                seed=s.seed,
                init_strategy=init_to_median(num_samples=15),
                progress_bar=False,
            )
            wall = time.perf_counter() - t0
        return post, wall, timer.total

    # the first call also pays one-off costs that later calls find cached (numpyro's and the
    # model's jitted helpers), so the overhead is measured on a second short call
    overhead = None
    if s.overhead_check:
        run(2, 2)
        _, overhead, _ = run(2, 2)
    post, wall, compile_s = run(s.num_warmup, s.num_samples)
    if not compile_s < wall:  # pragma: no cover - would mean the compile events were mis-summed
        raise RuntimeError(f"compile time {compile_s:.3f} s exceeds wall time {wall:.3f} s")
    params = {k: v for k, v in post.samples.items() if keep(k)}
    bulk, tail = min_ess(params)
    n_params = sum(int(np.prod(v.shape[2:])) for v in params.values())
    return SamplerResult(
        wall=wall,
        compile=compile_s,
        overhead=overhead,
        ess_bulk=bulk,
        ess_tail=tail,
        n_params=n_params,
        divergences=post.num_divergences,
        mean_steps=float(np.mean(post.sample_stats["n_steps"])),
    )


def bench_ess(
    source: pcbtl.SourceModel, X: np.ndarray, y: np.ndarray, s: Settings, timer: CompileTimer
) -> list[Row]:
    prior = last_layer_prior(source, X)
    stats = last_layer_sufficient_stats(
        _with_bias(source.features(X)), y, np.asarray(prior["beta_source"], np.float64)
    )
    pc_kwargs = {**prior, "stats": stats}
    _say("  NUTS, last-layer PC ...")
    pc = time_nuts(last_layer_pc_model, pc_kwargs, lambda k: k in ("beta", "sigma"), s, timer)
    _say(f"    {pc}")
    bnn_kwargs = {
        "source": source,
        "prior_scale": s.bnn_prior_scale,
        "sigma_scale": float(source.y_scale),
        "X": jnp.asarray(X, jnp.float32),
        "y": jnp.asarray(y, jnp.float32),
    }
    _say("  NUTS, random_flax_module BNN with N(θ_S, s²) prior ...")
    bnn = time_nuts(
        flax_bnn_model, bnn_kwargs, lambda k: k.startswith("net/") or k == "sigma", s, timer
    )
    _say(f"    {bnn}")
    sec = "(ii) ESS/s"
    draws = f"{s.num_chains}×({s.num_warmup}+{s.num_samples})"
    rows = []
    for label, r in (("PC last layer", pc), ("BNN N(θ_S,s²)", bnn)):
        note = (
            f"{r.n_params} params, {draws} draws, {r.divergences} div., "
            f"{r.mean_steps:.0f} leapfrog/draw"
        )
        rows += [
            Row(sec, f"{label}: sampling time (wall − compile)", r.sampling, "s", note=note),
            Row(sec, f"{label}: JAX compile time", r.compile, "s"),
            Row(sec, f"{label}: min bulk ESS", r.ess_bulk, "draws"),
            Row(sec, f"{label}: min tail ESS", r.ess_tail, "draws"),
        ]
        if r.overhead is not None:
            rows.append(
                Row(
                    sec,
                    f"{label}: sampling time, cross-check (wall − wall of a 2+2-draw run)",
                    r.wall - r.overhead,
                    "s",
                    note=f"2+2-draw run: {r.overhead:.1f} s",
                )
            )
    rows += [
        Row(
            sec,
            "PC last layer: min(bulk, tail) ESS/s",
            pc.ess_per_s,
            "1/s",
            "BNN N(θ_S,s²)",
            pc.ess_per_s / bnn.ess_per_s,
        ),
        Row(sec, "BNN N(θ_S,s²): min(bulk, tail) ESS/s", bnn.ess_per_s, "1/s"),
        Row(
            sec,
            "PC last layer: min(bulk, tail) ESS per wall s incl. compile",
            pc.ess_per_wall_s,
            "1/s",
            "BNN N(θ_S,s²)",
            pc.ess_per_wall_s / bnn.ess_per_wall_s,
        ),
        Row(
            sec,
            "BNN N(θ_S,s²): min(bulk, tail) ESS per wall s incl. compile",
            bnn.ess_per_wall_s,
            "1/s",
        ),
        Row(
            sec,
            "PC last layer: min bulk ESS/s",
            pc.ess_bulk / pc.sampling,
            "1/s",
            "BNN N(θ_S,s²)",
            (pc.ess_bulk / pc.sampling) / (bnn.ess_bulk / bnn.sampling),
        ),
        Row(
            sec,
            "PC last layer: min tail ESS/s",
            pc.ess_tail / pc.sampling,
            "1/s",
            "BNN N(θ_S,s²)",
            (pc.ess_tail / pc.sampling) / (bnn.ess_tail / bnn.sampling),
        ),
    ]
    return rows


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    if not math.isfinite(v):  # pragma: no cover - shown as is
        return str(v)
    if v == 0 or 0.01 <= abs(v) < 1e5:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.3e}"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table."""
    lines = [
        "| section | figure | value | unit | compared with | ratio | note |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else _fmt(r.ratio)
        lines.append(
            f"| {r.section} | {r.name} | {_fmt(r.value)} | {r.unit} | {r.compared_with} "
            f"| {ratio} | {r.note} |"
        )
    return "\n".join(lines)


def environment() -> str:
    return (
        f"{datetime.date.today().isoformat()}; jax {jax.__version__}, numpyro "
        f"{numpyro.__version__}, arviz {az.__version__}; python {platform.python_version()}; "
        f"{platform.machine()} CPU, {jax.device_count()} JAX device(s) "
        f"({jax.devices()[0].platform})"
    )


def run_benchmarks(s: Settings) -> list[Row]:
    """Run both benchmarks with settings ``s`` and return the table rows."""
    timer = CompileTimer.shared()
    n_grad = max(s.grad_rows)
    task = pcbtl.make_synthetic_task(n_source=s.n_source, n_target=n_grad, n_test=10, seed=s.seed)
    _say(f"[{s.mode}] training the source network {s.hidden} on {s.n_source} rows")
    t0 = time.perf_counter()
    source = pcbtl.train_source(
        task.X_source,
        task.y_source,
        hidden=s.hidden,
        seed=s.seed,
        max_epochs=s.source_epochs,
        progress_bar=False,
    )
    _say(f"  done in {time.perf_counter() - t0:.1f} s (validation RMSE {source.noise_sd:.3f})")
    _say("(i) time per gradient of the last-layer PC log density")
    rows = bench_gradients(source, task.X_target, task.y_target, s)
    _say(f"(ii) ESS/s on {s.n_target} target rows")
    rows += bench_ess(source, task.X_target[: s.n_target], task.y_target[: s.n_target], s, timer)
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (≲ 60 s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    s = Settings(**{**base.__dict__, "seed": args.seed})
    t0 = time.perf_counter()
    rows = run_benchmarks(s)
    total = time.perf_counter() - t0
    header = (
        f"pcbtl core benchmarks ({s.mode} mode, source MLP {s.hidden}, {total:.0f} s in all)\n"
        f"{environment()}\n"
    )
    table = format_table(rows)
    print(header)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{header}\n{table}\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
