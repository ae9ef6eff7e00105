"""Which P(metal) for the band-gap hurdle: boosted trees or the PC transfer classifier?

    python benchmarks/hurdle_classifier.py --data-dir ../shared/data/bandgap \
        --out benchmarks/results/hurdle_classifier
    python benchmarks/hurdle_classifier.py --quick --out /tmp/hc      # minutes, a smoke test

The band-gap application's hurdle (``pcbtl bandgap``, method ``--regressor``, default
``hurdle-pc-tangent-ensemble``) on Matbench's folds ``KFold(5, shuffle=True,
random_state=18012019)`` of ``matbench_expt_gap``, with each ``P(metal | x)`` of
``--classifiers``:

* ``trees`` — today's default: ``HistGradientBoostingClassifier`` on the composition features
  plus the source networks' PBE-gap prediction, cross-fitted isotonic recalibration;
* a metallicity method name (``pc-scale``, ``pc-scale-deep``, ``pc-last-layer``, ...) — the PC
  transfer classifier from a source classifier trained on the PBE metal labels (gap exactly 0)
  of the same MP rows, with the metallicity application's settings
  (:func:`pcbtl.materials.bandgap.metal_config`), fitted on the band-gap **training fold's**
  metal labels only (``matbench_expt_is_metal`` holds every band-gap test material).

Per fold the positive part (the Bayesian regressor of the non-zero gaps) is fitted **once** and
shared by every classifier, so the per-fold differences from ``trees`` are the classifier's
alone (paired). Reported per fold and classifier: the band-gap MAE and 95 % coverage (all,
metals, non-metals), the interval width, and the classifier's own scores on the held-out metal
labels (ROC-AUC, log loss, Brier score, ECE with 15 bins); then the paired differences from
``trees`` (mean ± sd over folds, folds where the classifier is better). ``fit_seconds`` is
the classifier's fit alone; ``hurdle_seconds`` the shared fit (regressor and trees). Writes
``results.csv`` (rewritten after each fold: an interrupted run keeps the folds it finished)
and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import platform
import sys
import time
from datetime import date
from pathlib import Path

import jax
import numpy as np
from sklearn.model_selection import KFold

from pcbtl.evaluation.classification import classification_scores
from pcbtl.evaluation.regression import interval_scores
from pcbtl.materials.bandgap import (
    MATBENCH_SEED,
    BandGapConfig,
    bandgap_methods,
    load_bandgap_tables,
    metal_config,
    train_metal_source,
)
from pcbtl.materials.features import CompositionFeaturizer
from pcbtl.materials.metallicity import method_factories
from pcbtl.networks import train_source

BAND = ("MAE", "coverage95", "width95", "metal_MAE", "metal_coverage95", "nonmetal_MAE")
BAND += ("nonmetal_coverage95",)
CLASS = ("roc_auc", "log_loss", "brier", "ece")
LOWER_IS_BETTER = {"MAE", "width95", "metal_MAE", "nonmetal_MAE", "log_loss", "brier", "ece"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def band_scores(y: np.ndarray, pred: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict:
    out: dict[str, float] = {}
    for tag, mask in (("", np.ones_like(y, bool)), ("metal_", y == 0), ("nonmetal_", y > 0)):
        s = interval_scores(y[mask], pred[mask], lo[mask], hi[mask])
        out.update({f"{tag}{k.upper() if k == 'mae' else k}": v for k, v in s.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/bandgap")
    parser.add_argument("--out", default="benchmarks/results/hurdle_classifier")
    parser.add_argument("--regressor", default="hurdle-pc-tangent-ensemble")
    parser.add_argument("--classifiers", default="trees,pc-scale,pc-scale-deep")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--quick", action="store_true", help="small data and chains (smoke test)")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    names = args.classifiers.split(",")
    if names[0] != "trees":
        parser.error("--classifiers must start with trees (the comparison's reference)")
    config = BandGapConfig(methods=(args.regressor,), folds=tuple(map(int, args.folds.split(","))))
    if args.quick:
        config = dataclasses.replace(
            BandGapConfig.quick(),
            methods=config.methods,
            ensemble_size=2,
            source_rows=5000,
            target_rows=600,
            metal_settings=dict(
                source_max_epochs=30,
                num_warmup=60,
                num_samples=60,
                num_chains=2,
                scale_draws=60,
                deep_draws=60,
                max_reference=500,
            ),
        )
    for name in names[1:]:
        metal_config(dataclasses.replace(config, metal_classifier=name))  # clear errors first

    expt, mp = load_bandgap_tables(args.data_dir)
    featurizer = CompositionFeaturizer()
    rng = np.random.default_rng(config.seed)
    ys = np.asarray(mp.y, np.float64)
    keep = np.arange(len(ys))
    if config.source_rows is not None:
        keep = rng.choice(len(ys), config.source_rows, replace=False)
    tkeep = np.arange(len(expt.y))
    if config.target_rows is not None:
        tkeep = np.sort(rng.choice(len(expt.y), config.target_rows, replace=False))
    say(f"featurizing {len(keep):,} MP and {len(tkeep):,} experimental formulas")
    Xs, ys = featurizer.transform([mp.formulas[i] for i in keep]), ys[keep]
    Xt = featurizer.transform([expt.formulas[i] for i in tkeep])
    yt = np.asarray(expt.y, np.float64)[tkeep]
    metal = yt == 0

    t0 = time.perf_counter()
    n_nets = config.ensemble_size if args.regressor.endswith("-ensemble") else 1
    nets = [
        train_source(Xs, ys, hidden=config.source_hidden, batch_size=256, seed=config.seed + i)
        for i in range(n_nets)
    ]
    say(f"{len(nets)} source network(s) {config.source_hidden}: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    metal_source = train_metal_source(
        Xs, ys, dataclasses.replace(config, metal_classifier=names[-1])
    )
    say(
        f"metal source classifier: validation log loss "
        f"{metal_source.info['validation_log_loss']:.3f} ({time.perf_counter() - t0:.0f} s)"
    )
    make_hurdle = bandgap_methods(nets[0], config, ensemble=nets[1:])[args.regressor]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    folds = list(KFold(n_splits=5, shuffle=True, random_state=MATBENCH_SEED).split(Xt))
    for k in config.folds:
        tr, te = folds[k]
        t0 = time.perf_counter()
        trees = make_hurdle().fit(Xt[tr], yt[tr])
        hurdle_seconds = time.perf_counter() - t0
        fit_seconds = {"trees": trees.classifier_seconds_}  # the classifier's share alone
        hurdles = {"trees": trees}
        for name in names[1:]:
            mc = metal_config(dataclasses.replace(config, metal_classifier=name))
            t0 = time.perf_counter()
            clf = method_factories(metal_source, mc)[name]().fit(Xt[tr], metal[tr])
            fit_seconds[name] = time.perf_counter() - t0
            h = copy.copy(trees)  # the same fitted positive part, another P(metal)
            h.classifier_, h.classifier_features, h.calibration = clf, None, None
            hurdles[name] = h
        for name, h in hurdles.items():
            pred = h.predict(Xt[te])
            lo, hi = h.predict_interval(Xt[te])
            pi = h.predict_proba_zero(Xt[te])
            row = {"fold": k, "classifier": name, "fit_seconds": fit_seconds[name]}
            row["hurdle_seconds"] = hurdle_seconds  # the shared fit (regressor and trees)
            row.update(band_scores(yt[te], pred, lo, hi))
            cs = classification_scores(metal[te], np.c_[1.0 - pi, pi], n_bins=15)
            row.update({m: cs[m] for m in CLASS})
            rows.append(row)
            say(
                f"fold {k} {name:<14} MAE {row['MAE']:.3f}  cover95 non-metal "
                f"{row['nonmetal_coverage95']:.3f} metal {row['metal_coverage95']:.3f}  "
                f"AUC {row['roc_auc']:.4f}  ({row['fit_seconds']:.0f} s)"
            )
        write_csv(out / "results.csv", rows)
    text = summary(rows, names, config, args, time.perf_counter() - t_start)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        )
    tmp.replace(path)


def summary(rows: list[dict], names: list[str], config, args, seconds: float) -> str:
    folds = sorted({r["fold"] for r in rows})
    by = {(r["fold"], r["classifier"]): r for r in rows}
    cols = (*BAND, *CLASS, "fit_seconds")
    lines = [
        "# P(metal) of the band-gap hurdle: boosted trees against the PC transfer classifier",
        "",
        f"{date.today().isoformat()}; jax {jax.__version__}; {platform.machine()} CPU, Python "
        f"{platform.python_version()}. `{args.regressor}` on matbench_expt_gap, "
        f"KFold(5, shuffle=True, random_state={MATBENCH_SEED}), folds {folds}"
        + (" (--quick: small data and chains)" if args.quick else "")
        + f"; {seconds / 60:.0f} min in all. Produced by `python benchmarks/hurdle_classifier.py"
        + (" --quick" if args.quick else "")
        + "`. The positive part is fitted once per fold and shared, so differences are the "
        "classifier's alone. Classifier scores on the held-out metal labels (ECE: 15 bins).",
        "",
        "Means over folds:",
        "",
        "| classifier | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name in names:
        vals = [np.mean([by[(k, name)][c] for k in folds]) for c in cols]
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{v:.0f}" if c == "fit_seconds" else f"{v:.4f}"
                for c, v in zip(cols, vals, strict=True)
            )
            + " |"
        )
    lines += [
        "",
        "Paired differences from `trees` (classifier − trees, per fold): mean ± sd over folds, "
        "and the folds where the classifier is better (coverage: nearer 0.95).",
        "",
        "| classifier | " + " | ".join(c for c in cols if c != "fit_seconds") + " |",
        "|---|" + "---:|" * (len(cols) - 1),
    ]
    for name in names[1:]:
        cells = []
        for c in cols[:-1]:
            mine = np.array([by[(k, name)][c] for k in folds])
            ref = np.array([by[(k, "trees")][c] for k in folds])
            d = mine - ref
            if "coverage" in c:  # better: nearer the nominal 0.95
                better = int(np.sum(np.abs(mine - 0.95) < np.abs(ref - 0.95)))
            elif c in LOWER_IS_BETTER:
                better = int(np.sum(d < 0))
            else:
                better = int(np.sum(d > 0))
            sd = d.std(ddof=1) if d.size > 1 else float("nan")
            cells.append(f"{d.mean():+.4f} ± {sd:.4f} ({better}/{d.size})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
