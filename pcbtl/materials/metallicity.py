r"""The metallicity application: DFT (Materials Project, PBE) metal labels → experiment.

Workflow of :func:`run_metallicity` (``pcbtl metallicity``):

1. load ``matbench_mp_gap`` (source: 106,113 PBE gaps, labelled *metal* where the gap is
   exactly 0) and ``matbench_expt_is_metal`` (target: 4,921 experimental metal / non-metal
   labels, Zhuo et al. 2018) with the loaders of :mod:`pcbtl.materials.data`;
2. featurize the formulas (:class:`pcbtl.features.CompositionFeaturizer`), cached in the
   output folder (``features.npz``, keyed by the formulas and the featurizer);
3. train the source classifier on the PBE labels
   (:func:`pcbtl.classification.train_source_classifier`), saved in the output folder
   (``source_model.npz``) and reused by later runs with the same settings;
4. fit each method on the experimental labels with Matbench's classification protocol —
   ``StratifiedKFold(n_splits=5, shuffle=True, random_state=18012019)``, scores on each
   held-out fold, mean over folds (Dunn et al. 2020) — and report ROC-AUC, accuracy,
   balanced accuracy, F1, log loss, Brier score and the expected calibration error
   (:func:`pcbtl.evaluation.classification.classification_scores`; ECE with 15 equal-width bins
   of ``P(metal)``), mean ± standard error over folds, beside the goal
   (:data:`GOAL_LINE`).

The source and the target share their classes by position: class 0 non-metal, class 1 metal.

Methods
-------
A method is a name bound to ``(factory, description)`` with ``factory(source, **options)``
returning an unfitted scikit-learn classifier (``fit(X, y)``, ``predict_proba(X)``). The
names come from, in increasing precedence: the classification baselines registry
:data:`pcbtl.estimators.registry.CLASSIFICATION_METHODS`, the
built-in :data:`METALLICITY_METHODS`, and the ``registry`` argument of
:func:`run_metallicity` (:func:`available_methods`). Options: built-in methods get the
sampler and forest settings of :class:`MetallicityConfig`; every method gets
``config.method_options.get(name, {})`` on top.

References
----------
Dunn A., Wang Q., Ganose A., Dopp D., Jain A. (2020) Benchmarking materials property
prediction methods: the Matbench test set and Automatminer reference algorithm.
npj Comput. Mater. 6, 138.
Zhuo Y., Mansouri Tehrani A., Brgoch J. (2018) Predicting the band gaps of inorganic solids
by machine learning. J. Phys. Chem. Lett. 9, 1668–1673.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold

from pcbtl.classification import SourceClassifier, train_source_classifier
from pcbtl.estimators.registry import CLASSIFICATION_METHODS
from pcbtl.evaluation.classification import (
    SCORE_NAMES,
    calibrated_ece_reference,
    classification_scores,
    expected_calibration_error,
    reliability_diagram,
)
from pcbtl.materials.data import (
    find_local_table,
    load_matbench_expt_is_metal,
    load_matbench_mp_gap,
)
from pcbtl.materials.features import CompositionFeaturizer

__all__ = [
    "GOAL_LINE",
    "MATBENCH_SEED",
    "METALLICITY_METHODS",
    "MetallicityConfig",
    "add_metallicity_command",
    "available_methods",
    "calibrated_forest",
    "load_metallicity_tables",
    "matbench_folds",
    "run_metallicity",
]

MATBENCH_SEED = 18012019
GOAL_LINE = (
    "Goal: ROC-AUC ≥ 0.975 with ECE ≤ 0.02; Matbench v0.1 leaderboard best for this task: "
    "Darwin, ROC-AUC 0.960"
)
GOAL_AUC, GOAL_ECE = 0.975, 0.02

DEFAULT_METHODS = (
    "pc-last-layer",
    "pc-scale",
    "pc-scale-deep",
    "source-only",
    "forest",
    "latent-gbt",
)
#: Settings that change results: a resumed run must agree on them with the first run.
_RESULT_KEYS = (
    "source_hidden",
    "source_max_epochs",
    "source_rows",
    "target_rows",
    "num_warmup",
    "num_samples",
    "num_chains",
    "max_reference",
    "scale_layers",
    "scale_draws",
    "deep_layers",
    "deep_draws",
    "deep_chains",
    "forest_trees",
    "boosting_iterations",
    "boosting_cv",
    "network_draws",
    "network_chains",
    "multitask_source_rows",
    "n_bins",
    "seed",
    "method_options",
)

Factory = Callable[..., Any]


# ----------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------


def calibrated_forest(
    source: Any = None, *, n_estimators: int = 300, cv: int = 3, seed: int = 0, n_jobs: int = 1
) -> Any:
    """A random forest on the features, recalibrated by cross-fitted isotonic regression.

    ``CalibratedClassifierCV(RandomForestClassifier(n_estimators), method="isotonic",
    cv=StratifiedKFold(cv, shuffle=True, random_state=seed))`` (scikit-learn): ``cv`` forests,
    each with an isotonic map fitted on the fold it did not see; the prediction averages the
    ``cv`` calibrated forests. The folds are shuffled: the Matbench table is sorted by
    formula, and scikit-learn's unshuffled folds (an integer ``cv``) would calibrate each
    forest on a block of chemically alike rows. ``source`` is ignored (the forest uses the
    target data only); it is there so that the factory has the signature of every method.
    """
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)
    folds = StratifiedKFold(int(cv), shuffle=True, random_state=int(seed))
    return CalibratedClassifierCV(forest, method="isotonic", cv=folds)


#: Methods of this application beyond the registry's (:func:`pcbtl.methods`
#: ``("classification")``): name → (factory(source, **options), description); they win over a
#: registry method of the same name.
METALLICITY_METHODS: dict[str, tuple[Factory, str]] = {
    "pc-scale-deep": (
        CLASSIFICATION_METHODS["pc-scale"].build,
        "PC prior on the KL distance, scale construction on the last deep_layers layers, "
        "hidden layers included (NUTS)",
    ),
    "forest": (
        calibrated_forest,
        "random forest on the features, isotonic recalibration (cross-fitted, 3 folds)",
    ),
}


def available_methods(
    registry: Mapping[str, Factory | tuple[Factory, str]] | None = None,
) -> dict[str, tuple[Factory, str]]:
    """Every method name → ``(factory, description)``.

    The registry's classification methods
    (:data:`pcbtl.estimators.registry.CLASSIFICATION_METHODS`), then :data:`METALLICITY_METHODS`, then ``registry`` (a factory alone or a
    ``(factory, description)`` pair); later entries win.
    """
    methods: dict[str, tuple[Factory, str]] = {
        name: (info.build, info.description) for name, info in CLASSIFICATION_METHODS.items()
    }
    methods.update(METALLICITY_METHODS)
    for name, entry in (registry or {}).items():
        methods[name] = _entry(entry)
    return methods


def _entry(entry: Any) -> tuple[Factory, str]:
    if isinstance(entry, tuple):
        return entry[0], str(entry[1]) if len(entry) > 1 else ""
    if callable(entry):
        return entry, ""
    factory = getattr(entry, "factory", None)  # a record with .factory / .description
    if callable(factory):
        return factory, str(getattr(entry, "description", ""))
    raise TypeError(f"a method must be a factory or (factory, description), got {entry!r}")


# ----------------------------------------------------------------------------------------
# Configuration and data
# ----------------------------------------------------------------------------------------


@dataclass
class MetallicityConfig:
    """Settings of the application run; :meth:`quick` gives the CI-sized version.

    ``source_rows`` / ``target_rows`` (``None``: all) subsample the tables with a seeded
    random choice before featurizing; the folds are then Matbench's protocol applied to the
    subsample. ``method_options`` maps a method name to extra keyword options of its factory.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    source_hidden: tuple[int, ...] = (128, 64)
    source_max_epochs: int = 300
    source_rows: int | None = None
    target_rows: int | None = None
    num_warmup: int = 500
    num_samples: int = 500
    num_chains: int = 4
    max_reference: int = 4000  # reference rows of the PC priors (PCTransferClassifier)
    scale_layers: int = 1  # the scale prior acts on the last ``scale_layers`` layers
    scale_draws: int | None = 300  # warm-up and draws of pc-scale; None: num_warmup/samples
    deep_layers: int = 2  # pc-scale-deep: the scale prior on the last ``deep_layers`` layers
    deep_draws: int = 150  # pc-scale-deep: warm-up and draws per chain
    deep_chains: int = 2  # pc-scale-deep: chains
    #: target-only and the Hutchinson architectures with a network learner (``*-bnn``): warm-up
    #: and draws per chain, and chains (a fresh network on every row costs ~0.2 s per NUTS
    #: iteration here: 880 s per fold at 4 chains of 500 + 500)
    network_draws: int = 150
    network_chains: int = 2
    forest_trees: int = 300
    #: boosted-tree methods (``boosting``, ``*-gbt``): iterations (shrinkage 0.05) and the
    #: folds of their Platt calibration
    boosting_iterations: int = 500
    boosting_cv: int = 5
    #: source rows (a seeded subset of the PBE labels) that the multi-task methods fit with
    #: the target rows
    multitask_source_rows: int = 2000
    n_bins: int = 15
    seed: int = 0
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> MetallicityConfig:
        """One fold, 10,000 source and 1,000 target rows, a small network, short chains."""
        return cls(
            methods=("source-only", "pc-last-layer", "forest"),
            folds=(0,),
            source_hidden=(32, 16),
            source_max_epochs=30,
            source_rows=10000,
            target_rows=1000,
            num_warmup=75,
            num_samples=75,
            num_chains=2,
            max_reference=1000,
            scale_draws=75,
            forest_trees=100,
        )


def _builtin_options(name: str, config: MetallicityConfig) -> dict[str, Any]:
    """The run's settings as options of method ``name``: the PC priors' own (reference rows,
    transfer layers, draws); for the registry's other methods the sampler settings of the
    sampled ones (``num_warmup`` … for the Bayesian last layer; ``network_draws`` and
    ``network_chains`` for the fresh networks; the pretrained Gaussian prior on the layers
    and with the budget of ``pc-scale-deep``) and the tree count of the forest versions."""
    if name.startswith("pc-"):
        opts: dict[str, Any] = dict(
            num_warmup=config.num_warmup,
            num_samples=config.num_samples,
            num_chains=config.num_chains,
            max_reference=config.max_reference,
            seed=config.seed,
            progress_bar=False,
        )
        if name == "pc-scale":
            opts["transfer_layers"] = config.scale_layers
            if config.scale_draws is not None:
                opts.update(num_warmup=config.scale_draws, num_samples=config.scale_draws)
        if name == "pc-scale-deep":
            opts.update(
                transfer_layers=config.deep_layers,
                num_warmup=config.deep_draws,
                num_samples=config.deep_draws,
                num_chains=config.deep_chains,
            )
        return opts
    if name == "forest":
        return dict(n_estimators=config.forest_trees, seed=config.seed)
    info = CLASSIFICATION_METHODS.get(name)
    if info is None or name == "source-only":
        return {}
    opts = {"seed": config.seed}
    if info.uses_sampler:
        opts.update(
            num_warmup=config.num_warmup,
            num_samples=config.num_samples,
            num_chains=config.num_chains,
            progress_bar=False,
        )
    if name == "target-only" or name.endswith("-bnn"):
        opts.update(
            num_warmup=config.network_draws,
            num_samples=config.network_draws,
            num_chains=config.network_chains,
        )
    if name == "pretrained-gaussian":  # the layers and sampler budget of pc-scale-deep
        opts.update(
            transfer_layers=config.deep_layers,
            num_warmup=config.deep_draws,
            num_samples=config.deep_draws,
            num_chains=config.deep_chains,
        )
    if name.endswith("-rf"):
        opts["n_estimators"] = config.forest_trees
    if name == "boosting" or name.endswith("-gbt"):
        opts.update(n_estimators=config.boosting_iterations, cv=config.boosting_cv)
    if name.startswith("multitask-"):
        opts["max_source_rows"] = config.multitask_source_rows
    return opts


def method_factories(
    source: Any,
    config: MetallicityConfig,
    registry: Mapping[str, Factory | tuple[Factory, str]] | None = None,
    *,
    source_data: tuple[Any, Any] | None = None,
) -> dict[str, Callable[[], Any]]:
    """``name → () -> unfitted estimator`` for ``config.methods`` (see :func:`available_methods`).

    ``source_data = (X_source, y_source)``: the labelled source rows, given to the methods that
    fit them beside the target rows (the multi-task ones; each keeps a seeded subset of
    ``config.multitask_source_rows`` rows); without it those methods draw source labels from
    the source classifier's probabilities at its reference inputs.
    ``ValueError`` naming the choices for an unknown method.
    """
    methods = available_methods(registry)
    unknown = [m for m in config.methods if m not in methods]
    if unknown:
        raise ValueError(f"methods: unknown method(s) {unknown}; choose from {sorted(methods)}")
    out: dict[str, Callable[[], Any]] = {}
    for name in config.methods:
        factory = methods[name][0]
        opts = {**_builtin_options(name, config), **config.method_options.get(name, {})}
        info = CLASSIFICATION_METHODS.get(name)
        if source_data is not None and info is not None and info.uses_source_data:
            opts.setdefault("source_X", source_data[0])
            opts.setdefault("source_y", source_data[1])
        out[name] = lambda factory=factory, opts=opts: factory(source, **opts)
    return out


def load_metallicity_tables(
    data_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[Any, Any]:
    """``(expt_is_metal, mp_gap)`` :class:`pcbtl.materials.data.BandGapData` tables.

    With ``data_dir``, ``matbench_expt_is_metal.{csv,json.gz,json}`` and
    ``matbench_mp_gap.{…}`` are looked for in it and in its ``bandgap/`` and
    ``metallicity/`` folders (:func:`pcbtl.materials.data.find_local_table`); otherwise the official Matbench
    files are downloaded into ``cache_dir`` (checksummed) on first use.
    """

    expt = load_matbench_expt_is_metal(
        path=find_local_table(data_dir, "matbench_expt_is_metal"), cache_dir=cache_dir
    )
    mp = load_matbench_mp_gap(
        path=find_local_table(data_dir, "matbench_mp_gap"), cache_dir=cache_dir
    )
    return expt, mp


def matbench_folds(y: Any, n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Matbench's classification folds: ``StratifiedKFold(5, shuffle=True,
    random_state=18012019).split(y, y)`` as a list of ``(train, test)`` index arrays."""
    y = np.asarray(y)
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=MATBENCH_SEED)
    return [(tr, te) for tr, te in skf.split(np.zeros((y.shape[0], 1)), y)]


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _featurize_cached(out: Path, featurizer: Any, formulas: dict[str, list[str]], progress):
    """Features of each formula list, read from ``out/features.npz`` when its key matches."""
    key = _digest(featurizer.to_dict(), formulas)
    path = out / "features.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) == key:
                progress("  features read from the cache (features.npz)")
                return {k: np.asarray(f[k]) for k in formulas}
    t0 = time.perf_counter()
    arrays = {k: featurizer.transform(v) for k, v in formulas.items()}
    tmp = out / "features.tmp.npz"
    np.savez(tmp, key=np.asarray(key), **arrays)
    tmp.replace(path)
    progress(f"  featurized in {time.perf_counter() - t0:.1f} s (cached in features.npz)")
    return arrays


def _source_cached(out: Path, Xs, ys, config: MetallicityConfig, featurizer, key: str, progress):
    """The trained source classifier, from ``out/source_model.npz`` when it was trained with
    the same settings and data (recorded in ``source_model.json``)."""

    path, meta_path = out / "source_model.npz", out / "source_model.json"
    meta = {
        "key": key,
        "hidden": list(config.source_hidden),
        "max_epochs": config.source_max_epochs,
        "seed": config.seed,
    }
    if path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                source = SourceClassifier.load(path)
                progress("  source classifier read from the cache (source_model.npz)")
                return source
        except (ValueError, OSError) as exc:
            progress(f"  cached source unusable ({exc}); retraining")
    t0 = time.perf_counter()
    source = train_source_classifier(
        Xs,
        ys,
        hidden=config.source_hidden,
        batch_size=256,
        max_epochs=config.source_max_epochs,
        seed=config.seed,
        featurizer=featurizer.to_dict(),
        progress_bar=False,
    )
    source.save(path)
    meta_path.write_text(json.dumps(meta))
    info = source.info
    progress(
        f"  validation log loss {info['validation_log_loss']:.3f}, accuracy "
        f"{info['validation_accuracy']:.3f} after {info['epochs_run']} epochs "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return source


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k, v in list(r.items()):
            if k in ("method", "error", "warnings"):
                continue
            try:
                r[k] = float(v) if v not in ("", None) else float("nan")
            except ValueError:
                pass
        r["fold"] = int(r["fold"])
        r["error"] = r.get("error") or ""
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(
            [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        )
    tmp.replace(path)


def _check_resume(out: Path, config: MetallicityConfig) -> None:
    path = out / "config.json"
    now = {k: _jsonable(getattr(config, k)) for k in _RESULT_KEYS}
    if path.is_file():
        before = json.loads(path.read_text())
        diff = [k for k in _RESULT_KEYS if k in before and before[k] != now[k]]
        if diff:
            raise ValueError(
                f"{out} holds results of a run with other settings ({', '.join(diff)}); "
                "use another output folder or resume=False (--fresh) to start over"
            )
    path.write_text(json.dumps({**_jsonable(asdict(config))}, indent=2))


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=list))


def _load_oof(path: Path, n: int, methods: Sequence[str]) -> dict[str, np.ndarray]:
    oof = {m: np.full(n, np.nan) for m in methods}
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            for k in f.files:
                if k.startswith("p_") and f[k].shape == (n,):
                    oof[k[2:]] = np.asarray(f[k], np.float64)
    return oof


def _save_oof(path: Path, y, index, formulas, oof: dict[str, np.ndarray]) -> None:
    tmp = path.parent / "probabilities.tmp.npz"
    np.savez(
        tmp,
        y=y,
        index=index,
        formula=np.asarray(formulas),
        **{f"p_{m}": v for m, v in oof.items()},
    )
    tmp.replace(path)


def run_metallicity(
    out: str | Path,
    *,
    config: MetallicityConfig | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    registry: Mapping[str, Factory | tuple[Factory, str]] | None = None,
    resume: bool = True,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    r"""Run the application (see the module docstring); returns every result row of ``out``.

    Writes into ``out``:

    * ``features.npz`` — the featurized formulas (reused while the formulas and featurizer
      are the same);
    * ``source_model.npz`` / ``source_model.json`` — the source classifier and the settings
      it was trained with (reused while they are the same);
    * ``results.csv`` — one row per (fold, method): the scores of
      :func:`pcbtl.evaluation.classification.classification_scores` on the held-out fold,
      ``seconds`` (fit + predict), ``n_train``, ``n_test``, ``warnings`` (count and the first
      message raised during the fit) and ``error`` (empty, or the exception of a failed
      fit: the run goes on);
    * ``probabilities.npz`` — out-of-fold ``P(metal)`` per method (``p_<method>``, NaN
      where not computed), ``y``, ``index`` (row of the target table) and ``formula``;
    * ``summary.md`` — mean ± standard error over folds per method (``se = sd/√k`` with
      the ``k`` finished folds, ``sd`` with ``k − 1`` degrees of freedom), the ECE of the
      pooled out-of-fold probabilities, the goal line;
    * ``reliability.png`` — reliability diagrams of the pooled out-of-fold probabilities;
    * ``config.json``.

    Each finished (fold, method) is written at once. With ``resume`` (default) a later run
    into the same folder skips the (fold, method) pairs that ``results.csv`` holds without
    an error, retries failed ones, and keeps their probabilities; it refuses (``ValueError``)
    a folder whose ``config.json`` differs in a setting that changes results.

    Parameters
    ----------
    out:
        Output folder (created).
    config:
        :class:`MetallicityConfig` (default: the full run).
    data_dir:
        Folder holding the two Matbench files (see :func:`load_metallicity_tables`); ``None``
        downloads them.
    cache_dir:
        Download cache (default ``$PCBTL_CACHE_DIR`` or ``~/.cache/pcbtl``).
    registry:
        Extra methods, name → factory or (factory, description) (:func:`available_methods`).
    resume:
        Keep and skip finished rows of an earlier run into ``out``.
    progress:
        Called with one line of text per step.

    Returns
    -------
    list of dict
        The rows of ``results.csv`` (earlier finished rows included).
    """

    config = config or MetallicityConfig()
    bad_folds = [k for k in config.folds if not (isinstance(k, int) and 0 <= k < 5)]
    if bad_folds:
        raise ValueError(f"folds must be among 0-4, got {bad_folds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, oof_path = out / "results.csv", out / "probabilities.npz"
    if not resume:
        for p in (csv_path, oof_path, out / "config.json"):
            p.unlink(missing_ok=True)
    _check_resume(out, config)
    rng = np.random.default_rng(config.seed)

    progress("loading Matbench tables (matbench_expt_is_metal, matbench_mp_gap)")
    expt, mp = load_metallicity_tables(data_dir, cache_dir)
    src_index = np.arange(len(mp))
    if config.source_rows is not None and config.source_rows < len(mp):
        src_index = np.sort(rng.choice(len(mp), config.source_rows, replace=False))
    target_index = np.arange(len(expt))
    if config.target_rows is not None and config.target_rows < len(expt):
        target_index = np.sort(rng.choice(len(expt), config.target_rows, replace=False))
    src_formulas = [mp.formulas[i] for i in src_index]
    tgt_formulas = [expt.formulas[i] for i in target_index]
    ys = (np.asarray(mp.y)[src_index] == 0.0).astype(np.int64)  # metal = PBE gap exactly 0
    yt = np.asarray(expt.y)[target_index].astype(np.int64)

    featurizer = CompositionFeaturizer()
    progress(f"featurizing {len(ys):,} MP and {len(yt):,} experimental formulas")
    feats = _featurize_cached(
        out, featurizer, {"source": src_formulas, "target": tgt_formulas}, progress
    )
    Xs, Xt = feats["source"], feats["target"]

    progress(
        f"source classifier {config.source_hidden} on {len(ys):,} PBE labels "
        f"({ys.mean():.1%} metals)"
    )
    source = _source_cached(
        out, Xs, ys, config, featurizer, _digest(src_formulas, ys.tolist()), progress
    )
    factories = method_factories(source, config, registry, source_data=(Xs, ys))
    folds = matbench_folds(yt)

    rows = _read_rows(csv_path) if resume else []
    rows = [r for r in rows if not r["error"]]  # failed rows are retried
    done = {(r["fold"], r["method"]) for r in rows}
    oof = _load_oof(oof_path, len(yt), list(factories))
    for k in config.folds:
        tr, te = folds[k]
        for name, make in factories.items():
            if (k, name) in done:
                progress(f"fold {k} {name:<18} done earlier (results.csv), skipped")
                continue
            row: dict[str, Any] = {"fold": k, "method": name}
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    est = make().fit(Xt[tr], yt[tr])
                    P = np.asarray(est.predict_proba(Xt[te]), np.float64)
                if P.ndim != 2 or P.shape != (len(te), 2):
                    raise ValueError(f"predict_proba returned shape {P.shape}, not ({len(te)}, 2)")
                row["seconds"] = time.perf_counter() - t0
                row.update(classification_scores(yt[te], P, n_bins=config.n_bins))
                row.update(n_train=len(tr), n_test=len(te))
                row["warnings"] = (
                    f"{len(caught)}: {type(caught[0].message).__name__}: "
                    f"{str(caught[0].message)[:200]}"
                    if caught
                    else ""
                )
                row["error"] = ""
                oof[name][te] = P[:, 1]
            except Exception as exc:  # noqa: BLE001 - a failed method is recorded, the run goes on
                row["seconds"] = time.perf_counter() - t0
                row["error"] = f"{type(exc).__name__}: {exc}"
                oof[name][te] = np.nan
            # replace an earlier failed row of the same (fold, method)
            all_rows = [r for r in _read_rows(csv_path) if (r["fold"], r["method"]) != (k, name)]
            _write_rows(csv_path, [*all_rows, row])
            _save_oof(oof_path, yt, target_index, tgt_formulas, oof)
            rows.append(row)
            progress(
                f"fold {k} {name:<18} "
                + (
                    f"ROC-AUC {row['roc_auc']:.4f}  ECE {row['ece']:.4f}  "
                    f"log loss {row['log_loss']:.4f}  ({row['seconds']:.0f} s)"
                    if not row["error"]
                    else f"FAILED: {row['error']}"
                )
            )
    rows = _read_rows(csv_path)
    pooled = {
        m: expected_calibration_error(yt[np.isfinite(p)], p[np.isfinite(p)], n_bins=config.n_bins)
        for m, p in oof.items()
        if np.isfinite(p).any()
    }
    null = {}  # per-fold ECE a perfectly calibrated classifier would score, mean over folds
    for m, p in oof.items():
        ks = sorted({r["fold"] for r in rows if r["method"] == m and not r["error"]})
        refs = [
            calibrated_ece_reference(p[folds[k][1]], n_bins=config.n_bins)[0]
            for k in ks
            if np.isfinite(p[folds[k][1]]).all()
        ]
        if refs:
            null[m] = float(np.mean(refs))
    summary = _summary(rows, config, source, len(ys), len(yt), pooled, null)
    (out / "summary.md").write_text(summary)
    _plots(out, yt, oof, config.n_bins)
    progress(summary)
    return rows


def _mean_se(v: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(v, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan
    se = float(np.std(a, ddof=1) / np.sqrt(a.size)) if a.size > 1 else math.nan
    return float(np.mean(a)), se


def _summary(
    rows: list[dict],
    config: MetallicityConfig,
    source: Any,
    n_source: int,
    n_target: int,
    pooled_ece: Mapping[str, float],
    null_ece: Mapping[str, float],
) -> str:
    import jax
    import numpyro

    methods = _by_auc(rows)
    folds = sorted({r["fold"] for r in rows})
    info = source.info
    lines = [
        f"Metallicity, DFT (MP PBE, metal = gap 0, {n_source:,} rows) → experiment "
        f"(matbench_expt_is_metal, {n_target:,} rows); StratifiedKFold(5, shuffle=True, "
        f"random_state={MATBENCH_SEED}), folds {folds}; mean ± standard error over folds.",
        f"{date.today().isoformat()}; source classifier {tuple(config.source_hidden)} "
        f"(validation log loss {info.get('validation_log_loss', float('nan')):.3f}, accuracy "
        f"{info.get('validation_accuracy', float('nan')):.3f}); jax {jax.__version__}, "
        f"numpyro {numpyro.__version__}; {platform.machine()} CPU, Python "
        f"{platform.python_version()}. ECE: {config.n_bins} equal-width bins of P(metal).",
        "",
        GOAL_LINE + ".",
        "",
        "| method | folds | "
        + " | ".join(SCORE_NAMES)
        + " | ece if calibrated | pooled ece | seconds/fold | goal | goal, pooled ece |",
        "|---|---:|" + "---:|" * (len(SCORE_NAMES) + 3) + ":---:|:---:|",
    ]
    for m in methods:
        ok = [r for r in rows if r["method"] == m and not r["error"]]
        failed = [r for r in rows if r["method"] == m and r["error"]]
        if not ok:
            lines.append(f"| {m} | 0 | failed: {failed[0]['error'][:150]} |")
            continue
        cells = []
        for c in SCORE_NAMES:
            mean, se = _mean_se([r[c] for r in ok])
            cells.append(f"{mean:.4f}" + (f" ± {se:.4f}" if np.isfinite(se) else ""))
        sec, _ = _mean_se([r["seconds"] for r in ok])
        auc, _ = _mean_se([r["roc_auc"] for r in ok])
        ece, _ = _mean_se([r["ece"] for r in ok])
        goal = "met" if auc >= GOAL_AUC and ece <= GOAL_ECE else "not met"
        nf = f"{len(ok)}" + (f" (+{len(failed)} failed)" if failed else "")
        pe, ne = pooled_ece.get(m, math.nan), null_ece.get(m, math.nan)
        pooled_goal = "met" if auc >= GOAL_AUC and pe <= GOAL_ECE else "not met"
        lines.append(
            f"| {m} | {nf} | "
            + " | ".join(cells)
            + f" | {ne:.4f} | {pe:.4f} | {sec:.0f} | {goal} | {pooled_goal} |"
        )
    lines += [
        "",
        "Scores are computed on each held-out fold and averaged (Matbench's protocol); the goal "
        "column judges the fold means, the last column the fold-mean ROC-AUC with the pooled "
        "ECE (the fold-mean ECE of a perfectly calibrated classifier is above 0.02 at this "
        "fold size: see *ece if calibrated*). *pooled ece* is the ECE of all out-of-fold "
        "probabilities together (reliability.png): with about 5 times the rows per bin it "
        "carries less binning noise, which biases the ECE upwards (a calibrated classifier "
        "scores about Σ_b (n_b/n) sqrt(2 s̄_b(1−s̄_b)/(π n_b)) > 0). *ece if calibrated* is "
        "that floor for each method's own fold probabilities: the mean over folds of the "
        "ECE scored when the labels are drawn from the predicted probabilities "
        "(pcbtl.evaluation.classification.calibrated_ece_reference, 200 draws); a fold-mean "
        "ECE near it is consistent with perfect calibration at this fold size.",
        "",
        "The source classifier is trained on DFT labels only (no experimental label); the "
        "MP table shares many compositions with the experimental one, as it would for any "
        "user of the Materials Project.",
        *_paired_markdown(rows, methods),
    ]
    return "\n".join(lines) + "\n"


def _by_auc(rows: list[dict]) -> list[str]:
    """The methods of ``rows``, highest mean ROC-AUC over their finished folds first."""
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def mean_auc(m: str) -> float:
        v = [r["roc_auc"] for r in rows if r["method"] == m and not r["error"]]
        return float(np.mean(v)) if v else -math.inf

    return sorted(methods, key=lambda m: -mean_auc(m))


def _paired_markdown(rows: list[dict], methods: list[str]) -> list[str]:
    """Paired differences over the shared folds against the method with the highest mean
    ROC-AUC: mean ± standard error of (method − reference) per fold, and on how many folds
    the method is the better of the two."""
    scores = {
        m: {r["fold"]: r for r in rows if r["method"] == m and not r["error"]} for m in methods
    }
    ref = next((m for m in methods if scores[m]), None)
    if ref is None:
        return []
    out = [
        "",
        f"Paired over the shared folds, method − {ref} (the highest mean ROC-AUC): mean ± "
        "standard error of the per-fold difference, and the folds on which the method is "
        "the better of the two.",
        "",
        "| method | folds | Δ roc_auc | better | Δ log_loss | better | Δ ece | better |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        shared = sorted(set(scores[m]) & set(scores[ref]))
        if m == ref or len(shared) < 2:
            continue
        cells = []
        for c, higher_better in (("roc_auc", True), ("log_loss", False), ("ece", False)):
            d = np.array([scores[m][k][c] - scores[ref][k][c] for k in shared])
            mean, se = _mean_se(d.tolist())
            wins = int(np.sum(d > 0 if higher_better else d < 0))
            cells.append(f"{mean:+.4f} ± {se:.4f} | {wins}/{len(shared)}")
        out.append(f"| {m} | {len(shared)} | " + " | ".join(cells) + " |")
    return out


def _plots(out: Path, y: np.ndarray, oof: dict[str, np.ndarray], n_bins: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {m: p for m, p in oof.items() if np.isfinite(p).any()}
    if not done:
        return
    cols = min(len(done), 3)
    nrows = math.ceil(len(done) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 4.4 * nrows), squeeze=False)
    for ax, (m, p) in zip(axes.flat, done.items(), strict=False):
        ok = np.isfinite(p)
        reliability_diagram(y[ok], p[ok], n_bins=n_bins, ax=ax, title=f"{m} (n={ok.sum()})")
        ax.set_xlabel("mean predicted P(metal)")
        ax.set_ylabel("fraction of metals")
    for ax in list(axes.flat)[len(done) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)


def add_metallicity_command(sub: Any) -> None:
    """Register ``pcbtl metallicity [--quick] [--data-dir DIR] --out DIR`` on ``sub`` (the
    subparsers of the ``pcbtl`` command)."""

    def run(args: Any) -> int:
        config = MetallicityConfig.quick() if args.quick else MetallicityConfig()
        if args.methods:
            config.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if args.folds:
            config.folds = tuple(int(f) for f in args.folds.split(","))
        run_metallicity(
            args.out,
            config=config,
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
            resume=not args.fresh,
            progress=lambda s: print(s, flush=True),
        )
        return 0

    p = sub.add_parser(
        "metallicity",
        help="DFT → experimental metal/non-metal transfer (Matbench expt_is_metal protocol)",
    )
    p.add_argument("--out", required=True, help="output folder (an earlier run there resumes)")
    p.add_argument("--quick", action="store_true", help="small CI-sized run (one fold)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the Matbench files, or with metallicity/ and bandgap/ (else download)",
    )
    p.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/pcbtl)")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: " + ",".join(DEFAULT_METHODS) + ")",
    )
    p.add_argument("--folds", default=None, help="comma-separated fold numbers 0-4")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    p.set_defaults(func=run)
