r"""The simulation study: every transfer-learning method of :mod:`pcbtl.estimators.registry` on one grid.

Data-generating process (one *setting* = ``(δ, n_T, c)``; every replicate seeded):

* inputs in ``d = n_features = 10`` dimensions; source inputs ``x ~ N(0, I_d)``;
* the source function ``f_S`` is a random teacher network (one tanh hidden layer of 32 units,
  rescaled to unit sd; :func:`pcbtl.simulation.teacher_network`);
* the target function is ``f_T = f_S + δ σ h`` with ``h`` an independent 8-unit teacher of unit
  RMS, so the discrepancy has RMS size ``δ`` noise sds, ``δ ∈ {0, 0.5, 1, 2}``; or the target is
  ``"unrelated"``: an independent 32-unit teacher (nothing to transfer);
* labels ``y = f(x) + σ e``, ``e ~ N(0, 1)``, ``σ = noise_sd = 0.2`` for both tasks;
* ``n_S = 5000`` source rows, ``n_T ∈ {25, 50, 100, 250, 500}`` target rows, and 2,000 fresh
  target test rows;
* optional covariate shift ``c``: target (and test) inputs ``x ~ N(c·1/√d, I_d)``.

For each replicate a source network is trained on the source rows (:func:`pcbtl.train_source`)
and every method is fitted to the target rows; the replicate's seed is a fixed function of
``(seed, δ, n_T, c, replicate)`` (:func:`replicate_seed`), so any row can be re-run alone.

Metrics on the test rows (:func:`score`): RMSE and MAE of the predictive mean against the test
labels, coverage and mean width of the central 95% interval, mean log predictive density (MLPD)
and the continuous ranked probability score (CRPS, lower is better). Posterior-draw methods are
scored with their Gaussian-mixture predictive, the others with their Gaussian predictive.

Outputs of :func:`run_study`: ``results.csv`` (one row per setting, replicate and method),
``summary.md`` (means ± standard errors over replicates, and each method's RMSE difference from
the setting's best with a *paired* standard error: :func:`paired_differences`),
``rmse_vs_ntarget.png`` and ``coverage.png``, and ``config.json``.

Classification (``StudyConfig(task="classification", n_classes=K)``, ``K ∈ {2, 3}``): the
same inputs and grid, with labels drawn from teacher logits
(:func:`pcbtl.simulation.make_synthetic_classification_task`: each source logit a teacher of
sd 3, the target's shifted by ``δ`` independent unit-RMS teachers, ``δ ∈ {0, 1, 2}`` in logit
units, or ``"unrelated"``), a source classifier
(:func:`pcbtl.classification.train_source_classifier`) and every method of
:data:`pcbtl.estimators.registry.CLASSIFICATION_METHODS`. Metrics on the test rows
(:data:`CLASSIFICATION_METRICS`, :func:`pcbtl.evaluation.classification.classification_scores`):
log loss, Brier score, accuracy and the expected calibration error (15 equal-width bins, of
``P(y = 1)`` for two classes, of the top label for three); each row also carries the same
scores of the true probabilities (``oracle_*``: the floor that no method beats but by the
noise of the test labels). Methods are ranked and paired on the log loss; the plots are
``logloss_vs_ntarget.png`` and ``ece.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import platform
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from pcbtl._files import atomic_write_text
from pcbtl.classification import train_source_classifier
from pcbtl.estimators.base import HEALTH_COLUMNS, sampler_health
from pcbtl.estimators.registry import (
    REGISTRIES,
    fit_all,
    make_method,
    method_options,
    methods,
)
from pcbtl.evaluation import METRICS, score
from pcbtl.evaluation.classification import classification_scores
from pcbtl.networks import train_source
from pcbtl.simulation import (
    CLASSIFICATION_LOGIT_SCALE,
    make_synthetic_classification_task,
    make_synthetic_task,
)

#: The scores of a classification study, in table order (lower is better but for accuracy).
CLASSIFICATION_METRICS = ("log_loss", "brier", "accuracy", "ece")
#: The same scores of the true test probabilities, on every row of a classification study.
ORACLE_COLUMNS = tuple(f"oracle_{m}" for m in CLASSIFICATION_METRICS)
TASKS = ("regression", "classification")


class _TaskView(NamedTuple):
    """What the tables and plots of a study of one task show."""

    metrics: tuple[str, ...]  # the scores of a fit, in table order
    headings: tuple[str, ...]  # their table headings
    columns: tuple[str, ...]  # every number a scored fit records (metrics, then any oracle)
    primary: str  # ranked, and paired against the best (lower is better)
    label: str  # its name in text
    calibration: str  # the calibration column of the grid table and the headline
    calibration_short: str  # its name in the progress lines
    calibration_digits: int
    calibration_worst: Any  # min (coverage: the lowest is the worst) or max (ECE)
    calibration_headline: tuple[str, str]  # (column heading, phrase of the intro)
    legend: str
    plots: tuple[str, str]  # file names: primary vs n_T, calibration boxplot
    axis_labels: tuple[str, str, str]  # primary axis, calibration axis, calibration title
    calibration_line: float | None  # the nominal value drawn in the boxplot


VIEWS = {
    "regression": _TaskView(
        METRICS,
        ("RMSE", "MAE", "coverage95", "width95", "MLPD", "CRPS"),
        METRICS,
        "rmse",
        "RMSE",
        "coverage95",
        "cover95",
        2,
        min,
        ("coverage95 mean (lowest)", "mean and lowest coverage of the 95% interval"),
        "RMSE/MAE/CRPS: lower is better; coverage95: nominal 0.95; MLPD: higher is better.",
        ("rmse_vs_ntarget.png", "coverage.png"),
        ("test RMSE", "95% interval coverage", "coverage over all settings and replicates"),
        0.95,
    ),
    "classification": _TaskView(
        CLASSIFICATION_METRICS,
        ("log loss", "Brier", "accuracy", "ECE"),
        (*CLASSIFICATION_METRICS, *ORACLE_COLUMNS),
        "log_loss",
        "log loss",
        "ece",
        "ECE",
        3,
        max,
        ("ECE mean (highest)", "mean and highest expected calibration error"),
        "log loss (nats)/Brier/ECE: lower is better; accuracy: higher is better. The row "
        "*true probabilities* scores the data-generating probabilities themselves (the "
        "floor, up to the noise of the test labels).",
        ("logloss_vs_ntarget.png", "ece.png"),
        (
            "test log loss (dotted: true probabilities)",
            "expected calibration error",
            "ECE over all settings and replicates",
        ),
        None,
    ),
}


def _task_of(rows: list[dict[str, Any]]) -> str:
    """``"classification"`` for rows with a log loss column, else ``"regression"``."""
    return "classification" if rows and "log_loss" in rows[0] else "regression"


def _method_order(task: str) -> dict[str, int]:
    return {m: i for i, m in enumerate(methods(task))}


@dataclass(frozen=True)
class StudyConfig:
    """The grid and the fitting budgets of a study.

    ``deltas`` holds discrepancy sizes (noise sds) and/or ``"unrelated"``; ``covariate_shifts``
    the input shifts ``c`` (0: none). ``source_hidden``/``source_max_epochs`` set the source
    network; ``learner_hidden`` the networks of the target-only and Hutchinson BNN learners;
    ``num_warmup``/``num_samples``/``num_chains`` every NUTS fit (studies run before chains
    were a setting recorded none: one chain) and ``max_tree_depth`` every NUTS fit of a
    network (the same tree budget for the PC scale prior and the Bayesian-network baselines);
    ``n_estimators`` every forest. The forest-based methods see the first
    ``forest_source_rows`` source rows (the calibrated infinitesimal-jackknife variance costs
    training rows × test rows × trees); ``multitask_source_rows`` source rows enter the
    multi-task network.
    ``batched=True`` fits the replicates of a setting in one vmapped NUTS job where the model
    allows it (:func:`pcbtl.estimators.registry.supports_batching`).

    ``task``: ``"regression"`` (default) or ``"classification"`` with ``n_classes`` ``K ∈
    {2, 3}`` (default 2; ``None`` for regression); ``deltas`` are then logit shifts, and
    ``noise_sd`` is not used. ``methods`` ``None`` (default): every method of the task
    (:func:`pcbtl.estimators.registry.methods`). ``pc_scale_reference`` caps the reference
    rows of ``pc-scale``, ``pc-tangent`` and, for classification, ``pc-last-layer`` (whose
    Fisher-sphere prior evaluates every reference row at each NUTS step).
    """

    deltas: tuple[Any, ...] = (0.0, 0.5, 1.0, 2.0, "unrelated")
    n_targets: tuple[int, ...] = (25, 50, 100, 250, 500)
    covariate_shifts: tuple[float, ...] = (0.0,)
    n_replicates: int = 20
    n_source: int = 5000
    n_test: int = 2000
    n_features: int = 10
    noise_sd: float = 0.2
    methods: tuple[str, ...] | None = None
    source_hidden: tuple[int, ...] = (16, 16)
    source_max_epochs: int = 300
    learner_hidden: tuple[int, ...] = (16,)
    num_warmup: int = 150
    num_samples: int = 150
    num_chains: int = 4
    max_tree_depth: int = 7
    n_estimators: int = 100
    multitask_source_rows: int = 1000
    forest_source_rows: int = 1000
    pc_scale_reference: int = 2000
    batched: bool = True
    seed: int = 0
    task: str = "regression"
    n_classes: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "classification":
            if self.n_classes is None:
                object.__setattr__(self, "n_classes", 2)
            if self.n_classes not in (2, 3):
                raise ValueError(f"n_classes must be 2 or 3, got {self.n_classes!r}")
        elif self.n_classes is not None:
            raise ValueError("n_classes is for task='classification' only; leave it None")
        if self.methods is None:
            object.__setattr__(self, "methods", tuple(methods(self.task)))
        unknown = [m for m in self.methods if m not in REGISTRIES[self.task]]
        if unknown:
            raise ValueError(
                f"methods holds unknown name(s) {unknown} for {self.task}; "
                f"valid: {methods(self.task)}"
            )
        for d in self.deltas:
            if d != "unrelated" and not (isinstance(d, int | float) and d >= 0):
                raise ValueError(f"deltas must be non-negative numbers or 'unrelated', got {d!r}")
        if self.n_replicates < 1:
            raise ValueError(f"n_replicates must be positive, got {self.n_replicates}")
        if any(int(n) < 4 for n in self.n_targets):
            raise ValueError(f"n_targets must all be at least 4, got {self.n_targets}")


#: The ``--quick`` grid (CI): δ ∈ {0, 2, unrelated}, n_T = 50, 3 replicates, short chains.
QUICK = StudyConfig(
    deltas=(0.0, 2.0, "unrelated"),
    n_targets=(50,),
    n_replicates=3,
    num_warmup=150,
    num_samples=150,
    n_estimators=100,
    source_max_epochs=150,
    multitask_source_rows=500,
    pc_scale_reference=1000,
)


#: The classification methods of the full grid: the registry's when the grid was started
#: (2026-12-02); the boosted-tree methods (``boosting``, ``*-gbt``) came later and are not in it.
CLASSIFICATION_STUDY_METHODS = (
    "source-only",
    "target-only",
    "fine-tuning",
    "pretrained-gaussian",
    "bayes-last-layer",
    "pc-last-layer",
    "pc-scale",
    "forest",
    "multitask-bnn",
    "multitask-rf",
    "difference-bnn",
    "difference-rf",
    "latent-bnn",
    "latent-rf",
)
#: The classification grid: δ ∈ {0, 1, 2} logit units and unrelated, n_T from 25 to 500,
#: 20 replicates, the methods of :data:`CLASSIFICATION_STUDY_METHODS`
#: (``replace(CLASSIFICATION, n_classes=3)`` for three classes).
CLASSIFICATION = StudyConfig(
    task="classification",
    deltas=(0.0, 1.0, 2.0, "unrelated"),
    methods=CLASSIFICATION_STUDY_METHODS,
)

#: The ``--quick --task classification`` grid (CI): δ ∈ {0, unrelated}, n_T = 50, 2 replicates,
#: five fast methods, one chain of 100 + 100 draws.
QUICK_CLASSIFICATION = StudyConfig(
    task="classification",
    deltas=(0.0, "unrelated"),
    n_targets=(50,),
    n_replicates=2,
    n_source=2000,
    n_test=1000,
    methods=("source-only", "fine-tuning", "forest", "bayes-last-layer", "pc-last-layer"),
    num_warmup=100,
    num_samples=100,
    num_chains=1,
    n_estimators=100,
    source_max_epochs=150,
    pc_scale_reference=1000,
)


def _delta_label(delta: Any) -> str:
    return "unrelated" if delta == "unrelated" else f"{float(delta):g}"


def replicate_seed(seed: int, delta: Any, n_target: int, covariate_shift: float, rep: int) -> int:
    """A 31-bit seed fixed by the setting and the replicate (stable across grids)."""
    key = f"{_delta_label(delta)}|{int(n_target)}|{float(covariate_shift):g}".encode()
    ss = np.random.SeedSequence([int(seed), zlib.crc32(key), int(rep)])
    return int(ss.generate_state(1)[0] % (2**31 - 1))


def _method_options(name: str, cfg: StudyConfig, task, seed: int) -> dict[str, Any]:
    """The study's options for method ``name`` (:func:`pcbtl.estimators.registry.method_options`
    with the study's sampler settings and each method's own sizes)."""
    sampler = {"num_warmup": cfg.num_warmup, "num_samples": cfg.num_samples}
    sampler["num_chains"] = cfg.num_chains
    extra: dict[str, Any] = {}
    base = name.rsplit("-", 1)[-1]
    if name in ("pretrained-gaussian", "pc-scale", "target-only") or base == "bnn":
        extra["max_tree_depth"] = cfg.max_tree_depth
    if name in ("pc-scale", "pc-tangent") or (  # pc-tangent: NUTS over (σ, τ), any depth
        name == "pc-last-layer" and cfg.task == "classification"
    ):
        extra["max_reference"] = cfg.pc_scale_reference
    if name == "target-only" or base == "bnn":
        extra["hidden"] = cfg.learner_hidden
    if base in ("rf", "forest"):
        extra["n_estimators"] = cfg.n_estimators
    if name.startswith("multitask-"):
        extra["max_source_rows"] = (
            cfg.multitask_source_rows if base == "bnn" else cfg.forest_source_rows
        )
    if REGISTRIES[cfg.task][name].uses_source_data:
        k = cfg.forest_source_rows if base == "rf" else len(task.y_source)
        extra.update({"source_X": task.X_source[:k], "source_y": task.y_source[:k]})
    return method_options(name, seed=seed, sampler=sampler, task=cfg.task, **extra)


def _draw_task(cfg: StudyConfig, delta: Any, n_t: int, c: float, seed: int):
    """Replicate ``seed`` of setting ``(δ, n_T, c)``: the data of the study's task."""
    common = dict(
        n_source=cfg.n_source,
        n_target=n_t,
        n_test=cfg.n_test,
        n_features=cfg.n_features,
        covariate_shift=c,
        unrelated=delta == "unrelated",
        seed=seed,
    )
    shift = 0.0 if delta == "unrelated" else float(delta)
    if cfg.task == "classification":
        return make_synthetic_classification_task(
            n_classes=int(cfg.n_classes), delta=shift, **common
        )
    return make_synthetic_task(shift=shift, noise_sd=cfg.noise_sd, **common)


def _train_source(cfg: StudyConfig, task, seed: int):
    """The source network of one replicate (a regressor or a classifier)."""
    trainer = train_source_classifier if cfg.task == "classification" else train_source
    return trainer(
        task.X_source,
        task.y_source,
        hidden=cfg.source_hidden,
        max_epochs=cfg.source_max_epochs,
        seed=seed,
        progress_bar=False,
    )


def _score_fit(cfg: StudyConfig, est, task) -> dict[str, float]:
    """The metric columns of one fitted method on the replicate's test rows; for
    classification also the ``oracle_*`` scores of the true probabilities."""
    if cfg.task == "regression":
        return score(est, task.X_test, task.y_test)
    got = classification_scores(task.y_test, est.predict_proba(task.X_test))
    true = classification_scores(task.y_test, task.p_test)
    return {
        **{m: got[m] for m in CLASSIFICATION_METRICS},
        **{f"oracle_{m}": true[m] for m in CLASSIFICATION_METRICS},
    }


def _settings(cfg: StudyConfig):
    # smallest targets first: a study stopped early still covers every δ at the sizes done
    for c in cfg.covariate_shifts:
        for n_t in sorted(int(n) for n in cfg.n_targets):
            for delta in cfg.deltas:
                yield delta, n_t, float(c)


def run_study(
    config: StudyConfig, out: str | Path | None = None, *, verbose: bool = True
) -> list[dict[str, Any]]:
    """Run every (setting, replicate, method) of ``config``; write the outputs into ``out``.

    Returns the rows of ``results.csv``. A method that raises is recorded with NaN metrics and
    its error message (column ``error``) instead of stopping the study.
    """
    out = None if out is None else Path(out)
    rows: list[dict[str, Any]] = []
    done: set[tuple[str, int, float]] = set()
    if out is not None:
        rows, done = _resume(config, out, verbose)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"config": asdict(config), **environment()}
    if verbose:
        import jax

        print(f"JAX devices: {jax.local_device_count()} × {jax.default_backend()}", flush=True)
    earlier = _earlier_seconds(out) if done else 0.0
    t_start = time.perf_counter()
    view = VIEWS[config.task]

    def save_meta() -> None:
        if out is not None:
            meta["elapsed_seconds"] = earlier + time.perf_counter() - t_start
            atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))

    save_meta()
    for delta, n_t, c in _settings(config):
        label = _delta_label(delta)
        if (label, n_t, c) in done:
            continue
        seeds = [replicate_seed(config.seed, delta, n_t, c, r) for r in range(config.n_replicates)]
        tasks, sources = [], []
        t0 = time.perf_counter()
        for s in seeds:
            tasks.append(_draw_task(config, delta, n_t, c, s))
            sources.append(_train_source(config, tasks[-1], s))
        if verbose:
            print(
                f"setting δ={label} n_T={n_t} shift={c:g}: {len(seeds)} sources trained in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        for name in config.methods:
            t0 = time.perf_counter()
            ests = [
                make_method(name, src, **_method_options(name, config, task, s))
                for task, src, s in zip(tasks, sources, seeds, strict=True)
            ]
            errors, _ = fit_all(
                ests, [(t.X_target, t.y_target) for t in tasks], batched=config.batched
            )
            for r, (est, task, s) in enumerate(zip(ests, tasks, seeds, strict=True)):
                metrics = dict.fromkeys(view.columns, float("nan"))
                if not errors[r]:
                    try:
                        metrics = _score_fit(config, est, task)
                    except Exception as exc:  # noqa: BLE001
                        errors[r] = f"{type(exc).__name__}: {exc}"
                rows.append(
                    {
                        "delta": label,
                        "n_target": n_t,
                        "covariate_shift": c,
                        "replicate": r,
                        "seed": s,
                        "method": name,
                        **metrics,
                        "fit_seconds": float(getattr(est, "fit_seconds_", float("nan"))),
                        "batched": bool(getattr(est, "batched_", False)),
                        "divergences": int(getattr(est, "num_divergences_", 0)),
                        **sampler_health(est if not errors[r] else None),
                        "error": errors[r],
                    }
                )
            if verbose:
                latest = rows[-len(ests) :]
                first = np.nanmean([rw[view.primary] for rw in latest])
                cal = np.nanmean([rw[view.calibration] for rw in latest])
                print(
                    f"  {name:<20} {time.perf_counter() - t0:6.1f} s  {view.label} {first:.3f}  "
                    f"{view.calibration_short} {cal:.{view.calibration_digits}f}"
                    + ("  [batched]" if latest[0]["batched"] else ""),
                    flush=True,
                )
        if out is not None:
            write_csv(rows, out / "results.csv")
            save_meta()
    if out is not None:
        write_csv(rows, out / "results.csv")
        save_meta()
        atomic_write_text(
            out / "summary.md", summary_markdown(rows, meta["elapsed_seconds"], config)
        )
        plot_results(rows, out)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` to ``path`` atomically (:func:`pcbtl._files.atomic_write_text`)."""
    if not rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _earlier_seconds(out: Path | None) -> float:
    """Run time recorded by earlier invocations of a resumed study."""
    try:
        return float(json.loads((out / "config.json").read_text()).get("elapsed_seconds", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _resume(
    config: StudyConfig, out: Path, verbose: bool
) -> tuple[list[dict[str, Any]], set[tuple[str, int, float]]]:
    """Rows already in ``out/results.csv`` from a run of the same ``config``, and the settings
    they complete (every method and replicate present), so a killed study goes on where it
    stopped. Rows of incomplete settings are dropped (those settings are run again). A folder
    holding a study of another configuration is refused rather than mixed."""
    csv_path, cfg_path = out / "results.csv", out / "config.json"
    if not csv_path.exists():
        return [], set()
    if cfg_path.exists():
        old = _recorded_config(json.loads(cfg_path.read_text()).get("config") or {})
        new = json.loads(json.dumps(asdict(config), default=str))
        # how the replicates are sampled (one vmapped job or one by one) does not change the
        # draws (same seeds, same plans), so a study may resume with the other choice
        for k in _EXECUTION_KEYS:
            old.pop(k, None)
            new.pop(k, None)
        if old != new:
            raise ValueError(
                f"{out} holds a study of a different configuration; choose another --out "
                "folder (or remove that one) to start a new study"
            )
    rows = read_csv(csv_path)
    have: dict[tuple[str, int, float], set[tuple[int, str]]] = defaultdict(set)
    for r in rows:
        have[(r["delta"], r["n_target"], r["covariate_shift"])].add((r["replicate"], r["method"]))
    need = {(r, m) for r in range(config.n_replicates) for m in config.methods}
    done = {key for key, got in have.items() if need <= got}
    rows = [r for r in rows if (r["delta"], r["n_target"], r["covariate_shift"]) in done]
    if verbose and done:
        print(f"resuming {out}: {len(done)} setting(s) already complete, skipped", flush=True)
    return rows, done


#: settings of how a study runs, not of what it computes (ignored when resuming)
_EXECUTION_KEYS = ("batched",)


def _recorded_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A configuration recorded in a ``config.json``, with the settings added since (the
    task) at the values that studies recorded before them ran with."""
    return {"task": "regression", "n_classes": None, **cfg}


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` (of either task) with numbers parsed."""
    out = []
    numbers = {*METRICS, *CLASSIFICATION_METRICS, *ORACLE_COLUMNS, "fit_seconds"}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for k in (*(k for k in row if k in numbers), "covariate_shift"):
                row[k] = float(row[k])
            for k in ("n_target", "replicate", "seed", "divergences"):
                row[k] = int(row[k])
            for k in HEALTH_COLUMNS:  # absent from studies written before they were recorded
                if k in row:
                    row[k] = _number(row[k])
            row["batched"] = row["batched"] == "True"
            out.append(row)
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, tuple[float, float, int]]]:
    """``{(shift, delta, n_T, method): {metric: (mean, standard error, n)}}`` over replicates
    (the metrics of the rows' task, the ``oracle_*`` columns of a classification study, and
    ``fit_seconds``)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["covariate_shift"], r["delta"], r["n_target"], r["method"])].append(r)
    columns = VIEWS[_task_of(rows)].columns
    out = {}
    for key, rs in groups.items():
        stats = {}
        for m in (*columns, "fit_seconds"):
            v = np.array([r[m] for r in rs], float)
            v = v[np.isfinite(v)]
            se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
            stats[m] = (float(v.mean()) if v.size else float("nan"), se, int(v.size))
        out[key] = stats
    return out


#: "Tied with the best" means a mean paired difference within this many paired standard errors.
TIE_SE = 1.0


_LOWER_IS_BETTER = ("rmse", "mae", "crps", "log_loss", "brier", "ece")


@dataclass(frozen=True)
class PairedDifference:
    """One method against the best method of a setting (:func:`paired_differences`).

    ``mean`` and ``se``: mean and standard error of ``metric_m,r − metric_best,r`` over the ``n``
    replicates ``r`` both methods have (``0``, ``0`` and the method's own count for the best
    itself; ``se`` is NaN when ``n < 2``). ``tied``: the method is the best, or ``n ≥ 2`` and
    ``mean ≤ k · se``. ``n_method`` and ``n_best``: the replicates each has on its own.
    """

    method: str
    best: str
    mean: float
    se: float
    n: int
    n_method: int
    n_best: int
    tied: bool

    @property
    def is_best(self) -> bool:
        return self.method == self.best


def paired_differences(
    rows: list[dict[str, Any]], metric: str | None = None, k: float = TIE_SE
) -> dict[tuple[float, str, int], dict[str, PairedDifference]]:
    r"""Every method against the best of its setting, on paired per-replicate differences.

    Replicate ``r`` of a setting gives every method the same source, target and test data
    (:func:`replicate_seed`), so methods are compared replicate by replicate: the shared
    replicate effect (an easy or a hard draw of the data) cancels from the difference, where
    the unpaired rule ``mean_m − mean_b ≤ √(se_m² + se_b²)`` counts it as noise in both
    standard errors.

    For each setting ``(shift, δ, n_T)``, the best method ``b`` has the lowest mean ``metric``
    over its finite replicates (ties in the mean go to the earlier method of
    :func:`pcbtl.estimators.registry.methods` of the rows' task). For each method ``m`` with replicates ``R_m`` (finite values
    only: a failed fit is NaN and left out) and the best's ``R_b`` (written for RMSE; any
    lower-is-better ``metric`` alike):

    .. math::

        d_{m,r} = \mathrm{RMSE}_{m,r} - \mathrm{RMSE}_{b,r}, \qquad
        r \in R_m \cap R_b, \qquad n = |R_m \cap R_b|,

        \bar d_m = \frac{1}{n} \sum_r d_{m,r}, \qquad
        \operatorname{se}(\bar d_m) = \frac{\operatorname{sd}(d_{m,\cdot})}{\sqrt{n}}
        = \sqrt{\frac{\sum_r (d_{m,r} - \bar d_m)^2}{n (n - 1)}},

        m \text{ is tied with } b \iff n \ge 2 \ \text{and}\ \bar d_m \le k \operatorname{se}(\bar d_m),

    with ``k = TIE_SE = 1`` (the one standard error of the unpaired rule this replaces). With
    fewer than two shared replicates there is no standard error and no tie is called. With
    missing replicates :math:`\bar d_m` may be negative (``m`` ahead of ``b`` on the shared
    replicates); that is a tie.

    ``metric`` is a lower-is-better metric: ``rmse``, ``mae`` or ``crps`` (regression;
    default ``rmse``), ``log_loss``, ``brier`` or ``ece`` (classification; default
    ``log_loss``). Pure: ``rows`` is
    not changed. Returns ``{(shift, delta, n_T): {method: PairedDifference}}``; a method
    without a finite value in a setting is left out of it. Raises ``ValueError`` when a
    setting holds a replicate of a method twice.
    """
    task = _task_of(rows)
    metric = VIEWS[task].primary if metric is None else metric
    if metric not in _LOWER_IS_BETTER:
        raise ValueError(f"metric must be one of {_LOWER_IS_BETTER}, got {metric!r}")
    values: dict[tuple, dict[str, dict[int, float]]] = defaultdict(dict)
    for row in rows:
        setting = (row["covariate_shift"], row["delta"], row["n_target"])
        per_rep = values[setting].setdefault(row["method"], {})
        rep = int(row["replicate"])
        if rep in per_rep:
            raise ValueError(
                f"replicate {rep} of {row['method']} appears twice in setting {setting}"
            )
        per_rep[rep] = float(row[metric])
    order = _method_order(task)
    out: dict[tuple[float, str, int], dict[str, PairedDifference]] = {}
    for setting, by_method in values.items():
        finite = {
            m: {r: v for r, v in reps.items() if math.isfinite(v)} for m, reps in by_method.items()
        }
        finite = {m: reps for m, reps in finite.items() if reps}
        if not finite:
            out[setting] = {}
            continue
        means = {m: float(np.mean(list(reps.values()))) for m, reps in finite.items()}
        best = min(means, key=lambda m: (means[m], order.get(m, len(order)), m))
        ref = finite[best]
        comp = {}
        for m, reps in finite.items():
            if m == best:
                comp[m] = PairedDifference(m, best, 0.0, 0.0, len(ref), len(ref), len(ref), True)
                continue
            shared = sorted(set(reps) & set(ref))
            d = np.array([reps[r] - ref[r] for r in shared], float)
            n = int(d.size)
            mean = float(d.mean()) if n else float("nan")
            se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            tied = n > 1 and mean <= k * se
            comp[m] = PairedDifference(m, best, mean, se, n, len(reps), len(ref), tied)
        out[setting] = comp
    return out


def environment() -> dict[str, str]:
    """Date, package versions and machine, for the record."""
    import numpyro
    import sklearn

    return {
        "date": time.strftime("%Y-%m-%d"),
        "pcbtl": version("pcbtl"),
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{_cpu_name()}, {__import__('os').cpu_count()} cores, {jax.default_backend()}".strip(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def summary_markdown(
    rows: list[dict[str, Any]],
    seconds: float | None = None,
    config: StudyConfig | None = None,
    env: dict[str, Any] | None = None,
) -> str:
    """Markdown tables of means ± standard errors, one table per setting, with each method's
    paired difference from the setting's best (:func:`paired_differences`) in RMSE
    (regression) or log loss (classification, with a last row for the true probabilities).

    ``env``: the record of :func:`environment` to print (by default this process's; a summary
    rewritten from a finished study passes the one in its ``config.json``).
    """
    env = environment() if env is None else env
    task = _task_of(rows)
    view = VIEWS[task]
    summ = summarise(rows)
    paired = paired_differences(rows)
    reps = max((r["replicate"] for r in rows), default=-1) + 1
    title = "" if task == "regression" else f" ({task}"
    if config is not None and task == "classification":
        title += f", K = {config.n_classes} classes"
    lines = [
        f"# pcbtl simulation study{title}{')' if title else ''}",
        "",
        f"{env['date']} · pcbtl {env['pcbtl']} · JAX {env['jax']} · NumPyro {env['numpyro']} · "
        f"scikit-learn {env['scikit-learn']} · {env['machine']}",
        "",
        f"{reps} replicate(s) per setting; entries are mean ± standard error over replicates. "
        + view.legend,
    ]
    if config is not None:
        noise = (
            f"noise sd = {config.noise_sd}"
            if config.task == "regression"
            else f"source logit sd = {CLASSIFICATION_LOGIT_SCALE:g}, δ in logit units"
        )
        lines.append(
            f"n_S = {config.n_source}, n_test = {config.n_test}, d = {config.n_features}, "
            f"{noise}; NUTS {config.num_chains} chain(s) of "
            f"{config.num_warmup} warmup + {config.num_samples} draws; "
            f"source network {config.source_hidden}; "
            f"learner networks {config.learner_hidden}; forests {config.n_estimators} trees."
        )
    if seconds is not None:
        lines.append(f"Total run time {seconds / 60:.1f} min (over every resumed invocation).")
    lines += ["", "## Over all settings", "", _headline_markdown(summ, paired, task).rstrip("\n")]
    health = health_markdown(rows)
    if health:
        lines += ["", "## Sampler health", "", health.rstrip("\n")]
    lines += [
        "",
        f"## {view.label} ({view.headings[view.metrics.index(view.calibration)]}) by target size",
        "",
        _grid_markdown(summ, task).rstrip("\n"),
    ]
    settings = sorted({k[:3] for k in summ}, key=lambda k: (k[0], _delta_order(k[1]), k[2]))
    order = _method_order(task)
    heads = [view.headings[0], f"{view.headings[0]} − best (paired)", *view.headings[1:]]
    for c, delta, n_t in settings:
        lines += [
            "",
            f"## δ = {delta}, n_T = {n_t}, covariate shift = {c:g}",
            "",
            "| method | " + " | ".join(heads) + " | fit s |",
            "|---|" + "---|" * (len(heads) + 1),
        ]
        comp = paired.get((c, delta, n_t), {})
        keys = sorted(
            (k for k in summ if k[:3] == (c, delta, n_t)), key=lambda k: order.get(k[3], 99)
        )
        for k in keys:
            s = summ[k]
            cells = [_pm(*s[m][:2], 3) for m in view.metrics] + [f"{s['fit_seconds'][0]:.1f}"]
            cells.insert(1, _paired_cell(comp.get(k[3]), reps))
            lines.append(f"| {k[3]} | " + " | ".join(cells) + " |")
        if keys and task == "classification":
            lines.append(_oracle_row(rows, (c, delta, n_t)))
    return "\n".join(lines) + "\n"


#: R-hat above which a fit's chains are counted as disagreeing in :func:`health_markdown`
HEALTH_RHAT = 1.1


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def health_markdown(rows: list[dict[str, Any]], rhat: float = HEALTH_RHAT) -> str:
    r"""How well the samplers of the study's posterior-draw methods mixed, one line per method.

    Columns, over the fits of every setting (a fit = one replicate of one method): fits with at
    least one divergent transition; fits whose chains disagree on a prediction (largest
    :math:`\hat R` over the test-row predictions above ``rhat``); the same over the scalar
    parameter sites where the method records them (``—`` for networks, whose weights are
    identified only up to symmetries, so that only their predictions are judged); fits with a
    chain that did not move; the median of the smallest bulk ESS over the sites; and the
    setting with the most fits whose predictions disagree. A method without any NUTS figure
    (forests, point estimates) has no line; no such method at all gives ``""``.
    """
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    task = _task_of(rows)
    order = _method_order(task)
    lines = []
    for m in sorted(by_method, key=lambda m: order.get(m, 99)):
        rs = by_method[m]
        pred = np.array([_number(r.get("prediction_max_rhat")) for r in rs])
        if not np.isfinite(pred).any():
            continue
        par = np.array([_number(r.get("max_rhat")) for r in rs])
        ess = np.array([_number(r.get("min_bulk_ess")) for r in rs])
        stuck = np.array([_number(r.get("stuck_chains")) for r in rs])
        div = np.array([_number(r.get("divergences")) for r in rs])
        n = len(rs)
        flagged: dict[tuple, int] = defaultdict(int)
        fits: dict[tuple, int] = defaultdict(int)
        for r, v in zip(rs, pred, strict=True):
            setting = (r["covariate_shift"], r["delta"], r["n_target"])
            flagged[setting] += bool(v > rhat)
            fits[setting] += 1
        worst = max(flagged, key=lambda k: (flagged[k], -_delta_order(k[1]), k[2]))
        shift = f", shift {worst[0]:g}" if worst[0] else ""
        where = (
            f"δ = {worst[1]}, n_T = {worst[2]}{shift}: {flagged[worst]}/{fits[worst]}"
            if flagged[worst]
            else "—"
        )
        par_txt = f"{int(np.sum(par > rhat))}/{n}" if np.isfinite(par).any() else "—"
        ess_txt = f"{np.nanmedian(ess):.0f}" if np.isfinite(ess).any() else "—"
        lines.append(
            f"| {m} | {int(np.sum(div > 0))}/{n} | {int(np.sum(pred > rhat))}/{n} | {par_txt} "
            f"| {int(np.sum(stuck > 0))}/{n} | {ess_txt} | {where} |"
        )
    if not lines:
        return ""
    head = [
        f"Fits (one replicate of one method) of the posterior-draw methods: with divergent "
        f"transitions; whose chains disagree (R̂ > {rhat:g}) on some test prediction, or on a "
        "scalar parameter site where the method records them (— for networks: their weights "
        "are identified only up to symmetries, so their predictions are judged); with a chain "
        "that did not move; the median smallest bulk ESS; and the setting with the most "
        "disagreeing fits. Such a fit's score is that of its chains pooled.",
        "",
        f"| method | divergent | predictions R̂ > {rhat:g} | parameters R̂ > {rhat:g} | "
        "stuck chain | median min bulk ESS | most disagreeing setting |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    return "\n".join(head + lines) + "\n"


def _oracle_row(rows: list[dict[str, Any]], setting: tuple[float, str, int]) -> str:
    """The table row of the true probabilities' scores in one setting (one value per
    replicate: every method's row of a replicate carries the same)."""
    per_rep: dict[int, dict[str, float]] = {}
    for r in rows:
        if (r["covariate_shift"], r["delta"], r["n_target"]) == setting:
            if math.isfinite(r[ORACLE_COLUMNS[0]]):
                per_rep.setdefault(int(r["replicate"]), r)
    cells = []
    for col in ORACLE_COLUMNS:
        v = np.array([r[col] for r in per_rep.values()], float)
        se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
        cells.append(_pm(float(v.mean()) if v.size else float("nan"), se, 3))
    cells.insert(1, "")
    return "| *true probabilities* | " + " | ".join(cells) + " | |"


def grid_markdown(rows: list[dict[str, Any]]) -> str:
    """Mean test RMSE and, in brackets, mean 95% coverage (classification: mean log loss and
    mean ECE): one table per ``(shift, n_T)``, methods down, ``δ`` across, the best mean of
    each column in bold."""
    return _grid_markdown(summarise(rows), _task_of(rows))


def _grid_markdown(
    summ: dict[tuple, dict[str, tuple[float, float, int]]], task: str = "regression"
) -> str:
    view = VIEWS[task]
    first, cal = view.primary, view.calibration
    order = _method_order(task)
    blocks = sorted({(k[0], k[2]) for k in summ})
    out = []
    for c, n_t in blocks:
        deltas = sorted({k[1] for k in summ if (k[0], k[2]) == (c, n_t)}, key=_delta_order)
        names = sorted(
            {k[3] for k in summ if (k[0], k[2]) == (c, n_t)}, key=lambda m: order.get(m, 99)
        )
        best = {
            d: min(summ[(c, d, n_t, m)][first][0] for m in names if (c, d, n_t, m) in summ)
            for d in deltas
        }
        shift = f", covariate shift {c:g}" if c else ""
        out += [
            f"**n_T = {n_t}{shift}**",
            "",
            "| method | " + " | ".join(f"δ = {d}" for d in deltas) + " |",
        ]
        out.append("|---|" + "---|" * len(deltas))
        for m in names:
            cells = []
            for d in deltas:
                s = summ.get((c, d, n_t, m))
                if s is None:
                    cells.append("—")
                    continue
                value = f"{s[first][0]:.3f}"
                value = f"**{value}**" if s[first][0] == best[d] else value
                cells.append(f"{value} ({s[cal][0]:.{view.calibration_digits}f})")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def headline_markdown(rows: list[dict[str, Any]]) -> str:
    r"""One line per method over every setting of ``rows``: the claim of the study at a glance.

    Columns: mean RMSE rank (1 = best) over settings; the settings where the method is *best
    or tied*: the best mean RMSE, or a mean paired RMSE difference from the best within
    ``TIE_SE`` (one) paired standard error over the replicates both have
    (:func:`paired_differences`); mean 95% coverage and the lowest per-setting mean coverage;
    and the worst ratio of its mean RMSE to target-only's over the settings (``> 1``: negative
    transfer somewhere; ``—`` without target-only). A line under the table says how many
    comparisons rest on fewer replicates than the study has (failed or missing fits) and how
    many could not be called (fewer than two shared replicates). Classification rows: the
    log loss in place of the RMSE, the mean and the highest per-setting mean ECE in place of
    the coverage.
    """
    return _headline_markdown(summarise(rows), paired_differences(rows), _task_of(rows))


def _headline_markdown(
    summ: dict[tuple, dict[str, tuple[float, float, int]]],
    paired: dict[tuple[float, str, int], dict[str, PairedDifference]],
    task: str = "regression",
) -> str:
    view = VIEWS[task]
    label, cal = view.label, view.calibration
    settings = sorted({k[:3] for k in summ}, key=lambda k: (k[0], _delta_order(k[1]), k[2]))
    names = [m for m in methods(task) if any(k[3] == m for k in summ)]
    ranks: dict[str, list[float]] = defaultdict(list)
    tied: dict[str, int] = defaultdict(int)
    worst: dict[str, float] = {}
    for st in settings:
        rm = {m: summ[(*st, m)][view.primary] for m in names if (*st, m) in summ}
        rm = {m: v for m, v in rm.items() if math.isfinite(v[0])}
        if not rm:
            continue
        order = sorted(rm, key=lambda m: rm[m][0])
        for i, m in enumerate(order):
            ranks[m].append(i + 1)
        for m, comp in paired.get(st, {}).items():
            tied[m] += comp.tied
        if "target-only" in rm:
            base = rm["target-only"][0]
            for m, v in rm.items():
                worst[m] = max(worst.get(m, 0.0), v[0] / base)
    comps = [c for st in settings for c in paired.get(st, {}).values() if not c.is_best]
    most = max((c.n_best for st in settings for c in paired.get(st, {}).values()), default=0)
    short = [c for c in comps if c.n < most]
    cal_heading, cal_phrase = view.calibration_headline
    lines = [
        f"Over {len(settings)} settings (δ × n_T × shift): mean {label} rank; settings where the "
        f"method is best or tied with the best (its mean paired {label} difference from the best "
        f"within {TIE_SE:g} paired standard error, sd of the per-replicate differences / √n: "
        f"replicate r gives every method the same data); {cal_phrase}; and the worst "
        f"{label} relative to target-only (> 1: negative transfer).",
        "",
        f"| method | mean {label} rank | best or tied | {cal_heading} | worst {label} / "
        "target-only |",
        "|---|---:|---:|---|---:|",
    ]
    for m in sorted(names, key=lambda m: np.mean(ranks[m]) if ranks[m] else math.inf):
        cov = [summ[(*st, m)][cal][0] for st in settings if (*st, m) in summ]
        cov = [c for c in cov if math.isfinite(c)]
        cov_txt = f"{np.mean(cov):.3f} ({view.calibration_worst(cov):.3f})" if cov else "—"
        w = f"{worst[m]:.2f}" if m in worst else "—"
        rank = f"{np.mean(ranks[m]):.1f}" if ranks[m] else "—"
        lines.append(f"| {m} | {rank} | {tied[m]}/{len(settings)} | {cov_txt} | {w} |")
    if not short:
        note = f"Every comparison with the best pairs all {most} replicate(s)."
    else:
        note = (
            f"{len(short)} of {len(comps)} comparisons with the best pair fewer than {most} "
            f"replicates (failed or missing fits; fewest {min(c.n for c in short)})."
        )
    uncalled = sum(c.n < 2 for c in comps)
    if uncalled:
        note += (
            f" {uncalled} comparison(s) have fewer than 2 shared replicates: no standard error, "
            "so no tie is called."
        )
    lines += ["", note]
    return "\n".join(lines) + "\n"


def _paired_cell(comp: PairedDifference | None, reps: int) -> str:
    """``+0.0123 ± 0.0045 tied`` (``(n = 17)`` when fewer than ``reps`` pairs)."""
    if comp is None:
        return "—"
    if comp.is_best:
        return "best"
    if comp.n == 0:
        return "— (no shared replicates)"
    if comp.n == 1:
        return f"{comp.mean:+.4f} (1 pair: no se, no tie called)"
    text = f"{comp.mean:+.4f} ± {comp.se:.4f}" + (" tied" if comp.tied else "")
    return text + (f" (n = {comp.n})" if comp.n < reps else "")


def merge_studies(dirs: list[str | Path], out: str | Path) -> list[dict[str, Any]]:
    """Combine the ``results.csv`` of studies run in parts (e.g. different ``--n-targets`` in
    parallel processes) into one folder: ``results.csv``, ``summary.md`` and the plots.

    The parts must share every setting of the configuration except the grid (``deltas``,
    ``n_targets``, ``covariate_shifts``); a setting present in several parts is taken from
    the first. The run time is the sum of the parts' times.
    """
    grid = ("deltas", "n_targets", "covariate_shifts")
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    base_cfg: dict[str, Any] | None = None
    union: dict[str, list] = {g: [] for g in grid}
    seconds = 0.0
    for d in dirs:
        d = Path(d)
        meta = json.loads((d / "config.json").read_text())
        cfg = _recorded_config(meta["config"])
        for g in grid:
            union[g] += [v for v in cfg.pop(g) if v not in union[g]]
        if base_cfg is None:
            base_cfg = cfg
        elif cfg != base_cfg:
            diff = sorted(k for k in cfg if cfg[k] != base_cfg.get(k))
            raise ValueError(f"{d} was run with other settings ({diff}); cannot merge")
        seconds += float(meta.get("elapsed_seconds", 0.0))
        part = read_csv(d / "results.csv")
        keys = {(r["covariate_shift"], r["delta"], r["n_target"]) for r in part}
        new = keys - seen
        rows += [r for r in part if (r["covariate_shift"], r["delta"], r["n_target"]) in new]
        seen |= keys
    if base_cfg is None:
        raise ValueError("no study folders given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _config_from_dict({**base_cfg, **union})
    meta = {"config": asdict(config), "merged_from": [str(d) for d in dirs], **environment()}
    meta["elapsed_seconds"] = seconds
    atomic_write_text(out / "config.json", json.dumps(meta, indent=2, default=str))
    write_csv(rows, out / "results.csv")
    atomic_write_text(out / "summary.md", summary_markdown(rows, seconds, config))
    plot_results(rows, out)
    return rows


def _config_from_dict(cfg: dict[str, Any]) -> StudyConfig:
    """The :class:`StudyConfig` recorded (as JSON) in a study's ``config.json``."""
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields}
    known.setdefault("num_chains", 1)  # recorded before chains were a setting: one chain
    return StudyConfig(**known)


def write_summary(folder: str | Path) -> Path:
    """Rewrite ``folder/summary.md`` from the study's ``results.csv`` and ``config.json``.

    Nothing is re-run: the tables are recomputed from the recorded rows (e.g. after a change
    to how the summary compares methods), and the header keeps the run's recorded date,
    versions, machine and run time. Returns the path written.
    """
    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    rows = read_csv(folder / "results.csv")
    seconds = meta.get("elapsed_seconds")
    text = summary_markdown(
        rows,
        None if seconds is None else float(seconds),
        _config_from_dict(meta["config"]),
        env={k: v for k, v in meta.items() if k not in ("config", "merged_from")},
    )
    atomic_write_text(folder / "summary.md", text)
    return folder / "summary.md"


def _delta_order(label: str) -> float:
    return math.inf if label == "unrelated" else float(label)


def _pm(mean: float, se: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "—"
    if not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def plot_results(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``rmse_vs_ntarget.png`` (mean RMSE ± se vs n_T, a panel per δ, first covariate shift) and
    ``coverage.png`` (95% coverage of every replicate and setting, per method); for a
    classification study ``logloss_vs_ntarget.png`` (with the true probabilities' mean log
    loss dotted) and ``ece.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = _task_of(rows)
    view = VIEWS[task]
    first, cal = view.primary, view.calibration
    summ = summarise(rows)
    shift0 = min(k[0] for k in summ)
    deltas = sorted({k[1] for k in summ}, key=_delta_order)
    names = [m for m in methods(task) if any(k[3] == m for k in summ)]
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(
        1, len(deltas), figsize=(4.0 * len(deltas), 3.8), squeeze=False, sharey=False
    )
    for ax, delta in zip(axes[0], deltas, strict=True):
        for i, m in enumerate(names):
            ks = sorted(
                (k for k in summ if k[0] == shift0 and k[1] == delta and k[3] == m),
                key=lambda k: k[2],
            )
            if not ks:
                continue
            x = [k[2] for k in ks]
            y = [summ[k][first][0] for k in ks]
            e = [summ[k][first][1] if math.isfinite(summ[k][first][1]) else 0 for k in ks]
            style = "-" if m.startswith("pc-") else "--"
            lw = 2.2 if m.startswith("pc-") else 1.0
            ax.errorbar(x, y, yerr=e, marker="o", ms=3, ls=style, lw=lw, color=cmap(i), label=m)
        if task == "classification":
            oracle = {}  # n_T → the true probabilities' mean log loss (the same for every method)
            for k in summ:
                if k[0] == shift0 and k[1] == delta:
                    oracle.setdefault(k[2], summ[k][ORACLE_COLUMNS[0]][0])
            xs = sorted(oracle)
            ax.plot(xs, [oracle[n] for n in xs], "k:", lw=1.2, label="true probabilities")
        ax.set_xscale("log")
        # the target sizes themselves as ticks (log-scale minor labels would overlap)
        sizes = sorted({k[2] for k in summ})
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("target size n_T")
        ax.set_title(f"δ = {delta}", fontsize=10)
    axes[0][0].set_ylabel(view.axis_labels[0])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    p1 = out / view.plots[0]
    fig.savefig(p1, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    data = [[r[cal] for r in rows if r["method"] == m and math.isfinite(r[cal])] for m in names]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=8)
    if view.calibration_line is not None:
        ax.axhline(view.calibration_line, color="k", lw=0.8, ls=":")
    ax.set_ylabel(view.axis_labels[1])
    ax.set_title(view.axis_labels[2], fontsize=10)
    fig.tight_layout()
    p2 = out / view.plots[1]
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def _parse_delta(text: str) -> Any:
    return "unrelated" if text == "unrelated" else float(text)


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    def fail(message: str):
        if parser is None:
            raise ValueError(message)
        parser.error(message)  # exits with status 2 and the usage line

    if args.classes is not None and args.task != "classification":
        fail("--classes is for --task classification only")
    if args.summary_only:
        path = write_summary(args.out)
        print(f"rewrote {path} from {args.out}/results.csv (nothing re-run)")
        return 0
    if args.merge:
        rows = merge_studies(args.merge, args.out)
        print(f"merged {len(args.merge)} studies into {args.out} ({len(rows)} rows)")
        return 0
    changes: dict[str, Any] = {}
    if args.task == "classification":
        cfg = QUICK_CLASSIFICATION if args.quick else CLASSIFICATION
        if args.classes is not None:
            changes["n_classes"] = args.classes
    else:
        cfg = QUICK if args.quick else StudyConfig()
    if args.replicates is not None:
        changes["n_replicates"] = args.replicates
    if args.methods:
        changes["methods"] = tuple(args.methods.split(","))
    if args.deltas:
        changes["deltas"] = tuple(_parse_delta(t) for t in args.deltas.split(","))
    if args.n_targets:
        changes["n_targets"] = tuple(int(t) for t in args.n_targets.split(","))
    if args.covariate_shift:
        changes["covariate_shifts"] = tuple(float(t) for t in args.covariate_shift.split(","))
    if args.draws is not None:
        changes["num_warmup"] = changes["num_samples"] = args.draws
    if args.no_batch:
        changes["batched"] = False
    changes["seed"] = args.seed
    try:
        cfg = replace(cfg, **changes)
    except ValueError as exc:  # an unknown method, a negative δ, …: said as a usage error
        fail(str(exc))
    rows = run_study(cfg, args.out, verbose=True)
    bad = [r for r in rows if r["error"]]
    plots = VIEWS[cfg.task].plots
    print(
        f"wrote {args.out}/results.csv ({len(rows)} rows), summary.md, {plots[0]}, "
        f"{plots[1]}" + (f"; {len(bad)} failed fits (see the error column)" if bad else "")
    )
    return 0


def add_simulate_command(sub) -> None:
    """Registrar of ``pcbtl simulate`` for :data:`pcbtl.cli.COMMANDS`."""
    p = sub.add_parser(
        "simulate",
        help="run the simulation study (every method on the δ × n_T grid) and write its outputs",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI grid: δ ∈ {0, 2, unrelated}, n_T = 50, 3 replicates, 150+150 NUTS draws "
        "(classification: δ ∈ {0, unrelated}, n_T = 50, 2 replicates, 5 fast methods, one "
        "chain of 100+100 draws)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default="regression",
        help="regression (default) or classification (δ then in logit units; the grid "
        "δ ∈ {0, 1, 2, unrelated} × n_T ∈ {25, …, 500}, every classification method)",
    )
    p.add_argument(
        "--classes",
        type=int,
        choices=(2, 3),
        default=None,
        help="number of classes of --task classification (default 2)",
    )
    p.add_argument("--replicates", type=int, default=None, help="replicates per setting")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {methods()} (regression) or of "
        f"{methods('classification')} (classification)",
    )
    p.add_argument("--deltas", default=None, help="comma-separated δ values and/or 'unrelated'")
    p.add_argument("--n-targets", default=None, help="comma-separated target sizes")
    p.add_argument("--covariate-shift", default=None, help="comma-separated input shifts c")
    p.add_argument("--draws", type=int, default=None, help="NUTS warmup = samples = DRAWS")
    p.add_argument("--no-batch", action="store_true", help="fit replicates one by one")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="instead of running: combine studies run in parts (e.g. different --n-targets) "
        "into --out",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="instead of running: rewrite --out's summary.md from its results.csv and config.json",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: _simulate(args, p))
