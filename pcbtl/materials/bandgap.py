r"""The band-gap application: DFT (Materials Project, PBE) gaps → experimental gaps.

Workflow of :func:`run_bandgap` (``pcbtl bandgap``):

1. load ``matbench_mp_gap`` (source, 106,113 PBE gaps) and ``matbench_expt_gap`` (target, 4,604
   experimental gaps, Zhuo et al. 2018) with the loaders of :mod:`pcbtl.materials.data`;
2. featurize the formulas (:class:`pcbtl.materials.features.CompositionFeaturizer`: element fractions
   and Magpie-style statistics, Ward et al. 2016);
3. train the source network on the PBE gaps and save it with its featurizer;
4. fit each method on the experimental gaps with Matbench's protocol — ``KFold(n_splits=5,
   shuffle=True, random_state=18012019)``, metrics on each held-out fold, mean over folds
   (Dunn et al. 2020) — and report MAE, RMSE, 95% coverage, interval width and time, for all
   materials and for metals (gap 0) and non-metals separately, beside the published Matbench
   mean MAEs (:data:`PUBLISHED_MAE`).

Metals are modelled, not clipped: the ``hurdle-*`` methods are :class:`pcbtl.HurdleRegressor`
models — ``P(metal | x)`` from gradient-boosted trees (recalibrated by cross-fitted isotonic regression) on the features plus the source network's
PBE-gap prediction, and a PC-prior transfer model for the gap of non-metals.
``hurdle-pc-tangent-ensemble`` linearises the average of ``BandGapConfig.ensemble_size`` source
networks (the same training from seeds ``seed, seed + 1, …``) instead of one
(:func:`pcbtl.tangent.ensemble_parametrization`); the extra sources are trained once per run and
saved as ``source_model_<i>.npz``; its classifier's PBE-gap feature is their average too.

``BandGapConfig.metal_classifier`` chooses ``P(metal | x)`` of every ``hurdle-*`` method:
``"trees"`` (the boosted trees above) or a method of the metallicity application
(:func:`pcbtl.materials.metallicity.available_methods`, e.g. ``"pc-scale-deep"``): then a source
*classifier* is trained on the PBE metal labels (gap exactly 0) of the same MP rows, saved as
``metal_source_model.npz``, and the hurdle's classifier is that method — for the PC methods the
PC prior on the KL distance from the DFT classifier — fitted on the band-gap *training* fold's
metal labels only (``matbench_expt_is_metal`` holds every band-gap test material, so fitting on
it would leak the test labels), with its own posterior probabilities (no recalibration).
``benchmarks/hurdle_classifier.py`` compares the choices with the same positive part: over the
five folds the trees gave MAE 0.300 eV, ``pc-scale-deep`` 0.337 (worse on every fold, +0.037 ±
0.018) and ``pc-scale`` 0.375 (``benchmarks/results/hurdle_classifier/summary.md``), so
``"trees"`` is the default: they see the source networks' continuous PBE gap, the PC
classifier's source only the PBE label.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from pcbtl.classification import train_source_classifier
from pcbtl.estimators.hurdle import HurdleRegressor
from pcbtl.estimators.pc import PCTransferRegressor
from pcbtl.estimators.registry import METHODS, make_method, method_options
from pcbtl.evaluation import interval_scores
from pcbtl.materials.data import (
    find_local_table,
    load_matbench_expt_gap,
    load_matbench_mp_gap,
)
from pcbtl.materials.features import CompositionFeaturizer
from pcbtl.materials.metallicity import MetallicityConfig, available_methods, method_factories
from pcbtl.networks import train_source
from pcbtl.plots import parity_plot

__all__ = [
    "PUBLISHED_MAE",
    "MATBENCH_SEED",
    "BandGapConfig",
    "bandgap_methods",
    "load_bandgap_tables",
    "run_bandgap",
]

#: Published mean MAE (eV) on matbench_expt_gap, Matbench v0.1 leaderboard (composition-only
#: models; Dunn et al. 2020 and later submissions), as published on the Matbench v0.1 leaderboard.
PUBLISHED_MAE: dict[str, float] = {
    "Darwin": 0.287,
    "CrabNet (Ax/SAASBO)": 0.331,
    "MODNet": 0.333,
    "automatminer": 0.416,
    "RF on Magpie": 0.446,
    "dummy": 1.144,
}
MATBENCH_SEED = 18012019

DEFAULT_METHODS = (
    "source-only",
    "fine-tuning",
    "bayes-last-layer",
    "pc-last-layer",
    "difference-rf",
    "latent-rf",
    "hurdle-pc-last-layer",
    "hurdle-pc-tangent",
    "hurdle-pc-tangent-ensemble",
)


@dataclass
class BandGapConfig:
    """Settings of the application run; :meth:`quick` gives the CI-sized version."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    source_hidden: tuple[int, ...] = (128, 64)
    source_rows: int | None = None  # None: every MP row
    target_rows: int | None = None  # None: every experimental row
    num_warmup: int = 500
    num_samples: int = 500
    svi_steps: int = 4000
    scale_layers: int = 2  # the scale prior acts on the last ``scale_layers`` layers
    scale_inference: str = "nuts"
    scale_draws: int | None = 300  # warm-up and draws of the scale fits; None: the estimator's
    ensemble_size: int = 4  # source networks (seeds seed, seed + 1, ...) of the *-ensemble methods
    #: P(metal) of the hurdle-* methods: "trees" (boosted trees on the features and the source's
    #: PBE gap, isotonic recalibration) or a metallicity method name (e.g. "pc-scale-deep") on a
    #: source classifier of the PBE metal labels
    metal_classifier: str = "trees"
    #: MetallicityConfig fields (sampler, network) of that method and of its source classifier
    metal_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> BandGapConfig:
        return cls(
            methods=("source-only", "pc-last-layer", "hurdle-pc-last-layer"),
            folds=(0,),
            source_hidden=(64, 32),
            source_rows=20000,
            target_rows=1000,
            num_warmup=150,
            num_samples=150,
            svi_steps=500,
        )


def load_bandgap_tables(
    data_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[Any, Any]:
    """``(expt, mp)`` :class:`pcbtl.materials.data.BandGapData` tables.

    With ``data_dir``, ``matbench_expt_gap.{csv,json.gz,json}`` and ``matbench_mp_gap.{…}``
    are read from it or from its ``bandgap/`` folder
    (:func:`pcbtl.materials.data.find_local_table`); otherwise the official Matbench files
    are downloaded into ``cache_dir`` (checksummed) on first use.
    """
    expt = load_matbench_expt_gap(
        path=find_local_table(data_dir, "matbench_expt_gap"), cache_dir=cache_dir
    )
    mp = load_matbench_mp_gap(
        path=find_local_table(data_dir, "matbench_mp_gap"), cache_dir=cache_dir
    )
    return expt, mp


def _metal_features(source, ensemble=()) -> Callable[[np.ndarray], np.ndarray]:
    """The classifier's features: ``X`` and the PBE gap predicted by the source (averaged over
    ``source`` and ``ensemble`` when there is one)."""
    nets = [source, *ensemble]

    def features(X: np.ndarray) -> np.ndarray:
        return np.c_[X, np.mean([net.predict(X) for net in nets], axis=0)]

    return features


def metal_config(config: BandGapConfig) -> MetallicityConfig:
    """The :class:`pcbtl.materials.metallicity.MetallicityConfig` of the hurdle's ``P(metal)``
    when ``config.metal_classifier`` is not ``"trees"``: the metallicity application's
    defaults (the settings its five-fold table was measured with), the band-gap run's source
    network size and seed, then ``config.metal_settings``. ``ValueError`` for an unknown method
    or setting."""
    known = available_methods()
    if config.metal_classifier not in ("trees", *known):
        raise ValueError(
            f"metal_classifier must be 'trees' or one of {sorted(known)}, "
            f"got {config.metal_classifier!r}"
        )
    fields = set(MetallicityConfig.__dataclass_fields__)
    unknown = sorted(set(config.metal_settings) - fields)
    if unknown:
        raise ValueError(f"metal_settings: unknown MetallicityConfig field(s) {unknown}")
    settings = dict(source_hidden=config.source_hidden, seed=config.seed)
    settings.update(config.metal_settings)
    return MetallicityConfig(methods=(config.metal_classifier,), **settings)


def train_metal_source(X: np.ndarray, gap: np.ndarray, config: BandGapConfig, featurizer=None):
    """The source classifier of ``P(metal)``: :func:`pcbtl.classification.train_source_classifier`
    on the PBE labels ``metal = (gap == 0)`` (classes ``[False, True]``: non-metal, metal), with
    the network of :func:`metal_config`."""
    mc = metal_config(config)
    return train_source_classifier(
        X,
        np.asarray(gap) == 0.0,
        hidden=mc.source_hidden,
        max_epochs=mc.source_max_epochs,
        batch_size=256,
        seed=mc.seed,
        featurizer=featurizer,
        progress_bar=False,
    )


def bandgap_methods(
    source,
    config: BandGapConfig,
    source_X=None,
    source_y=None,
    ensemble=(),
    metal_source=None,
) -> dict:
    """Factories ``name -> () -> estimator`` for the methods of ``config`` on ``source``;
    ``ensemble`` holds the further source networks of ``hurdle-pc-tangent-ensemble``;
    ``metal_source`` the source classifier of ``P(metal)`` (:func:`train_metal_source`), needed
    when ``config.metal_classifier`` is not ``"trees"``."""
    metal = metal_config(config)  # checks the name and the settings
    if config.metal_classifier != "trees":
        if metal_source is None:
            raise ValueError(
                f"metal_classifier={config.metal_classifier!r} needs metal_source, the source "
                "classifier of the PBE metal labels (train_metal_source)"
            )
        metal_factory = method_factories(metal_source, metal)[config.metal_classifier]

    sampler = dict(num_warmup=config.num_warmup, num_samples=config.num_samples, seed=config.seed)
    quiet = dict(progress_bar=False)

    scale_opts: dict[str, Any] = dict(
        transfer_layers=config.scale_layers,
        inference=config.scale_inference,
        svi_steps=config.svi_steps,
    )
    if config.scale_draws is not None:
        scale_opts.update(num_warmup=config.scale_draws, num_samples=config.scale_draws)

    def pc(prior: str) -> PCTransferRegressor:
        if prior == "scale":
            return PCTransferRegressor(source, prior=prior, seed=config.seed, **scale_opts, **quiet)
        if prior in ("tangent", "tangent-ensemble"):
            return PCTransferRegressor(
                source,
                prior="tangent",
                transfer_layers=config.scale_layers,
                ensemble=tuple(ensemble) if prior == "tangent-ensemble" else None,
                **sampler,
                **quiet,
            )
        return PCTransferRegressor(source, prior=prior, **sampler, **quiet)

    hurdles = {f"hurdle-pc-{p.replace('_', '-')}": p for p in ("last_layer", "scale", "tangent")}
    hurdles["hurdle-pc-tangent-ensemble"] = "tangent-ensemble"

    factories: dict[str, Callable[[], Any]] = {}
    for name in config.methods:
        if name in hurdles:
            if config.metal_classifier == "trees":
                factories[name] = lambda prior=hurdles[name]: HurdleRegressor(
                    pc(prior),
                    classifier_features=_metal_features(
                        source, ensemble if prior == "tangent-ensemble" else ()
                    ),
                )
            else:
                factories[name] = lambda prior=hurdles[name]: HurdleRegressor(
                    pc(prior), metal_factory(), calibration=None
                )
        elif name in METHODS:
            opts: dict[str, Any] = {}
            if METHODS[name].uses_sampler:
                opts.update(quiet)
            if METHODS[name].uses_source_data and source_X is not None:
                opts.update(source_X=source_X, source_y=source_y)
            if name == "pc-scale":
                opts.update(scale_opts)
            if name == "pc-tangent":
                opts.update(transfer_layers=config.scale_layers)
            opts = method_options(name, sampler=sampler, **opts)
            factories[name] = lambda name=name, opts=opts: make_method(name, source, **opts)
        else:
            raise ValueError(
                f"methods: unknown method {name!r}; choose from {list(METHODS) + list(hurdles)}"
            )
    return factories


def _scores(y: np.ndarray, pred: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict:
    """:func:`pcbtl.evaluation.interval_scores` over all rows, the metals and the non-metals,
    keyed ``MAE``, ``metal_MAE``, ``nonmetal_coverage95``, …"""
    out: dict[str, float] = {}
    for tag, mask in (("", np.ones_like(y, bool)), ("metal_", y == 0), ("nonmetal_", y > 0)):
        if mask.any():
            s = interval_scores(y[mask], pred[mask], lo[mask], hi[mask])
            out.update(
                {f"{tag}{k.upper() if k in ('mae', 'rmse') else k}": v for k, v in s.items()}
            )
    return out


def run_bandgap(
    out: str | Path,
    *,
    config: BandGapConfig | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """Run the application (see the module docstring); returns the per-fold result rows.

    Writes into ``out``: ``source_model.npz`` (with its featurizer), ``results.csv`` (one row
    per fold and method), ``summary.md`` (means over folds beside the published MAEs; date,
    versions, machine), ``predictions.npz`` (out-of-fold predictions and intervals per
    method), ``parity.png`` and ``calibration.png``. Each finished (fold, method) row is
    appended to ``results.csv`` at once, so an interrupted run keeps what it finished.
    """
    import jax

    config = config or BandGapConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    progress("loading Matbench band-gap tables")
    expt, mp = load_bandgap_tables(data_dir, cache_dir)
    featurizer = CompositionFeaturizer()
    progress(f"featurizing {len(mp):,} MP and {len(expt):,} experimental formulas")
    Xs, ys = featurizer.transform(mp.formulas), np.asarray(mp.y, np.float64)
    Xt, yt = featurizer.transform(expt.formulas), np.asarray(expt.y, np.float64)
    if config.source_rows is not None and config.source_rows < len(ys):
        keep = rng.choice(len(ys), config.source_rows, replace=False)
        Xs, ys = Xs[keep], ys[keep]
    target_index = np.arange(len(yt))
    if config.target_rows is not None and config.target_rows < len(yt):
        target_index = np.sort(rng.choice(len(yt), config.target_rows, replace=False))
    Xt, yt = Xt[target_index], yt[target_index]

    progress(f"training the {config.source_hidden} source network on {len(ys):,} PBE gaps")
    t0 = time.perf_counter()
    source = train_source(
        Xs,
        ys,
        hidden=config.source_hidden,
        batch_size=256,
        seed=config.seed,
        featurizer=featurizer.to_dict(),
        progress_bar=False,
    )
    source.save(out / "source_model.npz")
    progress(
        f"  validation RMSE {source.noise_sd:.3f} eV after {source.info['epochs_run']} epochs "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    ensemble = []
    if any(m.endswith("-ensemble") for m in config.methods):
        for i in range(1, int(config.ensemble_size)):
            t0 = time.perf_counter()
            net = train_source(
                Xs,
                ys,
                hidden=config.source_hidden,
                batch_size=256,
                seed=config.seed + i,
                featurizer=featurizer.to_dict(),
                progress_bar=False,
            )
            net.save(out / f"source_model_{i}.npz")
            ensemble.append(net)
            progress(
                f"  ensemble source {i} (seed {config.seed + i}): validation RMSE "
                f"{net.noise_sd:.3f} eV ({time.perf_counter() - t0:.0f} s)"
            )
    metal_source = None
    if config.metal_classifier != "trees" and any(m.startswith("hurdle") for m in config.methods):
        t0 = time.perf_counter()
        metal_source = train_metal_source(Xs, ys, config, featurizer=featurizer.to_dict())
        metal_source.save(out / "metal_source_model.npz")
        progress(
            f"  metal source classifier ({config.metal_classifier} hurdles): validation log loss "
            f"{metal_source.info['validation_log_loss']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    factories = bandgap_methods(
        source,
        config,
        source_X=Xs[:5000],
        source_y=ys[:5000],
        ensemble=ensemble,
        metal_source=metal_source,
    )
    folds = list(KFold(n_splits=5, shuffle=True, random_state=MATBENCH_SEED).split(Xt))
    rows: list[dict] = []
    oof = {m: np.full((3, len(yt)), np.nan) for m in factories}
    csv_path = out / "results.csv"
    csv_path.unlink(missing_ok=True)
    for k in config.folds:
        tr, te = folds[k]
        for name, factory in factories.items():
            t0 = time.perf_counter()
            try:
                est = factory().fit(Xt[tr], yt[tr])
                pred = np.asarray(est.predict(Xt[te]), np.float64)
                lo, hi = (np.asarray(a, np.float64) for a in est.predict_interval(Xt[te]))
                if not name.startswith("hurdle"):
                    # gaps are non-negative: clip the point prediction and interval (the
                    # hurdle methods model the zeros instead)
                    pred, lo, hi = (np.clip(a, 0.0, None) for a in (pred, lo, hi))
                row = {"fold": k, "method": name, "seconds": time.perf_counter() - t0}
                row.update(_scores(yt[te], pred, lo, hi))
                oof[name][:, te] = np.vstack([pred, lo, hi])
                row["error"] = ""
            except Exception as exc:  # noqa: BLE001 - a failed method is recorded, the run goes on
                row = {"fold": k, "method": name, "seconds": time.perf_counter() - t0}
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            _append_csv(csv_path, row)
            progress(
                f"fold {k} {name:<22} "
                + (
                    f"MAE {row['MAE']:.3f}  cover95 {row['coverage95']:.3f}  "
                    f"({row['seconds']:.0f} s)"
                    if not row["error"]
                    else f"FAILED: {row['error']}"
                )
            )
    np.savez(out / "predictions.npz", y=yt, index=target_index, **{m: v for m, v in oof.items()})
    summary = _summary(rows, config, source, len(ys), len(yt), jax.__version__)
    (out / "summary.md").write_text(summary)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=list))
    _plots(out, yt, oof)
    progress(summary)
    return rows


def _append_csv(path: Path, row: dict) -> None:
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _summary(rows, config, source, n_source, n_target, jax_version) -> str:
    import numpyro

    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = ("MAE", "RMSE", "coverage95", "width95", "metal_MAE", "nonmetal_MAE", "seconds")
    lines = [
        f"Band gaps, DFT (MP PBE, {n_source:,} rows) → experiment ({n_target:,} rows); "
        f"KFold(5, shuffle=True, random_state={MATBENCH_SEED}), folds {list(config.folds)}; "
        f"mean over folds.",
        f"{date.today().isoformat()}; pcbtl source {config.source_hidden} (validation RMSE "
        f"{source.noise_sd:.3f} eV); hurdle P(metal): {config.metal_classifier}; "
        f"jax {jax_version}, numpyro {numpyro.__version__}; "
        f"{platform.machine()} CPU, Python {platform.python_version()}.",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m in methods:
        ok = [r for r in rows if r["method"] == m and not r["error"]]
        if not ok:
            lines.append(f"| {m} | failed: {rows[[r['method'] for r in rows].index(m)]['error']} |")
            continue
        vals = []
        for c in cols:
            v = [r[c] for r in ok if c in r]
            vals.append(f"{np.mean(v):.3f}" if c != "seconds" else f"{np.mean(v):.0f}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += ["", "Published Matbench v0.1 mean MAE (eV) on matbench_expt_gap:", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in PUBLISHED_MAE.items()]
    return "\n".join(lines) + "\n"


def _plots(out: Path, y: np.ndarray, oof: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {m: v for m, v in oof.items() if np.isfinite(v[0]).any()}
    if not done:
        return
    fig, axes = plt.subplots(1, len(done), figsize=(4.2 * len(done), 4.2), squeeze=False)
    for ax, (m, (pred, lo, hi)) in zip(axes[0], done.items(), strict=True):
        ok = np.isfinite(pred)
        parity_plot(y[ok], pred[ok], lo[ok], hi[ok], title=m, ax=ax)
        ax.set_xlabel("experimental gap (eV)")
        ax.set_ylabel("predicted gap (eV)")
    fig.tight_layout()
    fig.savefig(out / "parity.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    names, cover_all, cover_nm = [], [], []
    for m, (pred, lo, hi) in done.items():
        ok = np.isfinite(pred)
        inside = (y[ok] >= lo[ok]) & (y[ok] <= hi[ok])
        names.append(m)
        cover_all.append(inside.mean())
        cover_nm.append(inside[y[ok] > 0].mean())
    idx = np.arange(len(names))
    ax.bar(idx - 0.2, cover_all, 0.4, label="all")
    ax.bar(idx + 0.2, cover_nm, 0.4, label="non-metals")
    ax.axhline(0.95, color="k", ls="--", lw=0.8)
    ax.set_xticks(idx, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("95% interval coverage")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=100)
    plt.close(fig)


def add_bandgap_command(sub) -> None:
    """Register ``pcbtl bandgap [--quick] [--data-dir DIR] --out DIR``."""

    def run(args) -> int:
        config = BandGapConfig.quick() if args.quick else BandGapConfig()
        if args.methods:
            config.methods = tuple(args.methods.split(","))
        if args.folds:
            config.folds = tuple(int(f) for f in args.folds.split(","))
        if args.metal_classifier:
            config.metal_classifier = args.metal_classifier
        metal_config(config)  # a clear error before any data is loaded
        run_bandgap(args.out, config=config, data_dir=args.data_dir, cache_dir=args.cache_dir)
        return 0

    p = sub.add_parser("bandgap", help="DFT → experimental band-gap transfer (Matbench protocol)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small CI-sized run (one fold)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Matbench files, or with bandgap/ (else download)",
    )
    p.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/pcbtl)")
    p.add_argument("--methods", default=None, help="comma-separated method names")
    p.add_argument("--folds", default=None, help="comma-separated fold numbers 0-4")
    p.add_argument(
        "--metal-classifier",
        default=None,
        help="P(metal) of the hurdle-* methods: 'trees' (default) or a metallicity method "
        "name such as pc-scale-deep (PC prior from a DFT metal classifier)",
    )
    p.set_defaults(func=run)
