r"""Many posterior fits at once: a vmapped multi-fit engine and a resumable batch-job runner.

``pcbtl batch CONFIG.toml`` (see ``benchmarks/configs/example_batch.toml``) expands a config into
*fits* — one (data setting, seed, method, options) each — and runs them:

* **Grouping.** Fits of one method with the same options, sampler settings and data shape form a
  group. A group whose estimators all allow it (:func:`pcbtl.methods.supports_batching`: every
  method sampled by single-chain NUTS) is sampled as **one vmapped NUTS job** by
  :func:`pcbtl.methods.fit_replicates` (NumPyro's functional ``hmc`` kernel under
  ``jax.vmap``, each replicate with its own step-size and mass-matrix adaptation, compiled once
  per model and shapes); other groups are fitted one by one. With several local JAX devices
  the job's replicate axis is **sharded over all of them** (``NamedSharding``): one program
  runs on every device at once.
* **Writing.** Every finished fit is written at once and atomically (temporary file in the same
  folder, then ``os.replace``): ``fits/<fit_id>.nc`` (ArviZ netCDF) and ``fits/<fit_id>.json``
  (its row), the JSON last, so a row on disk always means a complete fit. ``results.csv`` (all
  rows) is rewritten atomically after every group.
* **Resuming.** A job that is killed and started again reads ``fits/*.json`` and skips every fit
  already recorded (``ok``, or ``failed`` unless ``retry_failed``), so nothing finished is redone
  or lost; an interrupted vmapped group is rerun whole.
* **Failures.** A fit that raises (e.g. non-finite draws), has more than
  ``max_divergence_fraction`` divergent draws, or non-finite draws is recorded with
  ``status = "failed"`` and its ``reason``; the job goes on. If a vmapped group raises, its fits
  are retried one by one so that one bad replicate fails alone.
* **Progress.** One ``tqdm`` bar over fits, with the estimated time left.
* **Beyond one machine.** ``engine = "dask"`` submits each group as a task to a Dask distributed
  cluster (``scheduler`` address, or a ``LocalCluster`` of ``workers`` processes); workers write
  the fit files themselves (the output folder must be on a shared file system).

:func:`make_batched_log_density` gives the log density of ``R`` data sets of one model on an
``(R, D)`` array of flat float32 unconstrained vectors, jitted once per model and shape: the data
are arguments of the jitted function, not constants baked into it, so new data of the same shape
never retrace.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import os
import tempfile
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from pcbtl.inference import SamplerWarning
from pcbtl.priors import PriorDataConflictWarning
from pcbtl.transfer import HEALTH_COLUMNS, sampler_health

__all__ = [
    "FitSpec",
    "JobConfig",
    "load_config",
    "expand_fits",
    "group_fits",
    "run_group",
    "run_job",
    "read_results",
    "make_batched_log_density",
    "atomic_write_bytes",
    "atomic_write_text",
    "add_batch_command",
]

RESULT_COLUMNS = (
    "fit_id",
    "status",
    "reason",
    "method",
    "seed",
    "data",
    "options",
    "rmse",
    "mae",
    "coverage95",
    "width95",
    "mlpd",
    "crps",
    "divergences",
    "num_draws",
    *HEALTH_COLUMNS,
    "fit_seconds",
    "batched",
    "device",
    "netcdf",
    "finished_at",
)

#: Methods that take no NUTS settings (``num_warmup``/``num_samples``).
_NO_NUTS = ("source-only", "fine-tuning")


# --------------------------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync'ed,
    then ``os.replace`` (readers see the old file or the new one, never a partial one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_netcdf(idata: Any, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        idata.to_netcdf(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# the batched log density
# --------------------------------------------------------------------------------------------


def make_batched_log_density(
    model: Callable[..., None],
    kwargs_list: Sequence[dict[str, Any]],
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
) -> tuple[Callable[[jax.Array, Any], jax.Array], jax.Array, Any]:
    r"""Log density of ``R`` data sets of one model on flat unconstrained vectors, vmapped.

    Returns ``(log_density, x0, data)``: ``log_density(x, data)`` maps an ``(R, D)`` array of
    flat unconstrained points and the stacked model arguments ``data`` (leading axis ``R``) to
    the ``R`` log joints (Jacobians of the constraining transforms included); ``x0`` is an
    ``(R, D)`` valid initial point. Ravel/unravel are built once here; the function is jitted
    once per model and shapes and, the data being an argument, never retraces for new data of
    the same shape. ``dtype`` is float32 by default; float64 needs ``jax_enable_x64``.
    """
    from numpyro.infer.util import initialize_model, potential_energy

    if len(kwargs_list) < 1:
        raise ValueError("kwargs_list must hold at least one data set")
    points = []
    unravel = None
    for r, kw in enumerate(kwargs_list):
        info = initialize_model(jax.random.PRNGKey(seed + r), model, model_kwargs=kw)
        flat, unravel_r = ravel_pytree(info.param_info.z)
        points.append(flat)
        unravel = unravel if unravel is not None else unravel_r
    data = stack_kwargs(kwargs_list, dtype)

    def one(x, kw):
        return -potential_energy(model, (), kw, unravel(x))

    log_density = jax.jit(jax.vmap(one))
    return log_density, jnp.stack(points).astype(dtype), data


def stack_kwargs(kwargs_list: Sequence[dict[str, Any]], dtype: Any = jnp.float32) -> Any:
    """Stack the model arguments of ``R`` data sets along a new leading axis (floats cast to
    ``dtype``); all must have the same structure and shapes."""
    as_arrays = [
        jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), dict(kw)) for kw in kwargs_list
    ]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *as_arrays)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitSpec:
    """One fit: ``method`` with ``options`` on data setting ``data`` with seed ``seed``."""

    fit_id: str
    method: str
    options: dict[str, Any]
    data: dict[str, Any]
    seed: int
    sampler: dict[str, Any]
    source: dict[str, Any]

    def shape_key(self) -> str:
        """Fits with equal keys share model and data shapes (one vmapped job)."""
        shape = {k: self.data.get(k) for k in ("kind", "n_target", "n_features", "path")}
        return _canon({"m": self.method, "o": self.options, "s": self.sampler, "d": shape})


@dataclass
class JobConfig:
    """A batch job (the TOML config, see :func:`load_config`)."""

    out: Path
    methods: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    data: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"num_warmup": 500, "num_samples": 500})
    max_divergence_fraction: float = 0.05
    batch_size: int = 64
    engine: str = "local"
    workers: int = 2
    scheduler: str | None = None
    retry_failed: bool = False
    x64: bool = False

    def __post_init__(self) -> None:
        from pcbtl.methods import methods

        unknown = [m for m in self.methods if m not in methods()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid: {methods()}")
        if not self.methods:
            raise ValueError("the config names no methods ([methods.NAME] tables)")
        if not self.seeds:
            raise ValueError("the config names no seeds")
        if self.data.get("kind") not in ("synthetic", "csv"):
            raise ValueError(
                f"data.kind must be 'synthetic' or 'csv', got {self.data.get('kind')!r}"
            )
        if self.engine not in ("local", "dask"):
            raise ValueError(f"engine must be 'local' or 'dask', got {self.engine!r}")
        if not 0.0 <= float(self.max_divergence_fraction) <= 1.0:
            raise ValueError("max_divergence_fraction must lie in [0, 1]")
        if int(self.batch_size) < 1:
            raise ValueError("batch_size must be positive")


def load_config(path: str | Path, **overrides: Any) -> JobConfig:
    """Read a TOML job config; relative paths in it are relative to its folder.

    Tables: ``[job]`` (``out``, ``seeds``, ``max_divergence_fraction``, ``batch_size``,
    ``engine``, ``workers``, ``scheduler``, ``retry_failed``, ``x64``), ``[data]`` (``kind =
    "synthetic"`` with :func:`pcbtl.make_synthetic_task` settings — a list value makes a grid —
    or ``kind = "csv"`` with ``path``, ``target``, ``features``, ``test_fraction``),
    ``[source]`` (``train_source`` settings, or ``path`` to a saved source), ``[sampler]``
    (``num_warmup``, ``num_samples``) and one ``[methods.NAME]`` table of options per method.
    ``overrides`` replace ``[job]`` entries (e.g. from the command line).
    """
    path = Path(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    base = path.resolve().parent
    job = dict(raw.get("job", {}))
    job.update({k: v for k, v in overrides.items() if v is not None})
    data = dict(raw.get("data", {}))
    source = dict(raw.get("source", {}))
    for table in (data, source):
        if "path" in table:
            table["path"] = str((base / table["path"]).resolve())
    out = Path(job.pop("out", "batch-out"))
    out = out if out.is_absolute() else base / out
    seeds = job.pop("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    return JobConfig(
        out=out,
        methods={k: dict(v) for k, v in raw.get("methods", {}).items()},
        seeds=tuple(int(s) for s in seeds),
        data=data,
        source=source,
        sampler=dict(raw.get("sampler", {"num_warmup": 500, "num_samples": 500})),
        **job,
    )


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | tuple):
        return list(np.asarray(o).tolist())
    return str(o)


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def _grid(data: dict[str, Any]) -> list[dict[str, Any]]:
    keys = sorted(data)
    values = [
        v if isinstance(v, list) and k != "features" else [v]
        for k, v in ((k, data[k]) for k in keys)
    ]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def expand_fits(config: JobConfig) -> list[FitSpec]:
    """Every fit of the job, in a stable order (data setting, seed, method)."""
    fits = []
    for setting in _grid(config.data):
        for seed in config.seeds:
            for method, options in config.methods.items():
                spec = {
                    "method": method,
                    "options": options,
                    "data": setting,
                    "seed": seed,
                    "sampler": config.sampler,
                    "source": config.source,
                }
                digest = hashlib.sha1(_canon(spec).encode()).hexdigest()[:8]
                label = "_".join(
                    f"{k}{_slug(v)}"
                    for k, v in sorted(setting.items())
                    if k not in ("kind", "path", "features", "target")
                )
                fit_id = f"{method}__{label + '__' if label else ''}seed{seed}__{digest}"
                fits.append(FitSpec(fit_id=fit_id, **spec))
    ids = [f.fit_id for f in fits]
    if len(set(ids)) != len(ids):  # pragma: no cover - sha1 collision on 8 hex digits
        raise RuntimeError("duplicate fit ids")
    return fits


def group_fits(fits: Iterable[FitSpec], batch_size: int = 64) -> list[list[FitSpec]]:
    """Fits that share a model and data shape, in chunks of at most ``batch_size``."""
    groups: dict[str, list[FitSpec]] = {}
    for f in fits:
        groups.setdefault(f.shape_key(), []).append(f)
    out = []
    for members in groups.values():
        for i in range(0, len(members), batch_size):
            out.append(members[i : i + batch_size])
    return out


# --------------------------------------------------------------------------------------------
# data and source
# --------------------------------------------------------------------------------------------


@dataclass
class _Task:
    source: Any
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray | None
    y_test: np.ndarray | None


_SOURCE_CACHE: dict[str, Any] = {}


def _load_task(spec: FitSpec, out: Path) -> _Task:
    from pcbtl.networks import SourceModel, train_source
    from pcbtl.simulation import make_synthetic_task

    data = {k: v for k, v in spec.data.items() if k != "kind"}
    if spec.data["kind"] == "synthetic":
        task = make_synthetic_task(**data, seed=spec.seed)
        X, y, Xt, yt = task.X_target, task.y_target, task.X_test, task.y_test
    else:
        X, y, Xt, yt = _csv_split(spec)
    if "path" in spec.source:
        key = spec.source["path"]
        if key not in _SOURCE_CACHE:
            _SOURCE_CACHE[key] = SourceModel.load(key)
        return _Task(_SOURCE_CACHE[key], X, y, Xt, yt)
    if spec.data["kind"] != "synthetic":
        raise ValueError("data.kind = 'csv' needs [source] path = a saved SourceModel")
    key = hashlib.sha1(_canon([spec.data, spec.seed, spec.source]).encode()).hexdigest()[:16]
    if key not in _SOURCE_CACHE:
        path = out / "sources" / f"{key}.npz"
        if path.is_file():
            _SOURCE_CACHE[key] = SourceModel.load(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            opts = {"hidden": (32, 32), "max_epochs": 200, **spec.source}
            opts["hidden"] = tuple(opts["hidden"])
            src = train_source(
                task.X_source, task.y_source, seed=spec.seed, progress_bar=False, **opts
            )
            src.save(path)  # atomic (temporary file + replace)
            _SOURCE_CACHE[key] = src
    return _Task(_SOURCE_CACHE[key], X, y, Xt, yt)


def _csv_split(spec: FitSpec):
    d = spec.data
    table = np.genfromtxt(d["path"], delimiter=",", names=True, dtype=np.float64)
    cols = d.get("features") or [n for n in table.dtype.names if n != d["target"]]
    X = np.column_stack([table[c] for c in cols])
    y = np.asarray(table[d["target"]])
    frac = float(d.get("test_fraction", 0.2))
    idx = np.random.default_rng(spec.seed).permutation(len(y))
    n_test = int(round(frac * len(y)))
    te, tr = idx[:n_test], idx[n_test:]
    if n_test == 0:
        return X[tr], y[tr], None, None
    return X[tr], y[tr], X[te], y[te]


# --------------------------------------------------------------------------------------------
# running one group
# --------------------------------------------------------------------------------------------


def _method_options(spec: FitSpec) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if spec.method != "source-only":
        opts["seed"] = spec.seed
    if spec.method not in _NO_NUTS and not spec.method.endswith("-rf"):
        opts.update(spec.sampler)
    opts.update(spec.options)
    for k, v in list(opts.items()):
        if isinstance(v, list):
            opts[k] = tuple(v)
    return opts


def _build(spec: FitSpec, source: Any, builders: dict[str, Callable] | None):
    from pcbtl.methods import make_method

    if builders and spec.method in builders:
        return builders[spec.method](source, **_method_options(spec))
    return make_method(spec.method, source, **_method_options(spec))


def _fit_chunk(ests, datasets, devices=None):
    """Fit a chunk: one vmapped job (sharded over ``devices``) if every estimator allows it,
    else one by one on the first device.

    Returns ``(errors, seconds, batched)`` per estimator (``errors[i]`` is ``""`` on success).
    """
    from pcbtl.methods import fit_replicates, supports_batching

    n = len(ests)
    first = devices[0] if devices else None
    ctx = jax.default_device(first) if first is not None else _nullcontext()
    with ctx, warnings.catch_warnings():
        # sampler health and prior-data conflict go into each fit's row (HEALTH_COLUMNS, the
        # netCDF), not onto the console once per fit
        warnings.simplefilter("ignore", SamplerWarning)
        warnings.simplefilter("ignore", PriorDataConflictWarning)
        if n > 1 and all(supports_batching(e) for e in ests):
            t0 = time.perf_counter()
            try:
                fit_replicates(ests, datasets, devices=devices)
                sec = (time.perf_counter() - t0) / n
                return [""] * n, [sec] * n, [True] * n
            except Exception:  # noqa: BLE001 - one bad replicate must fail alone: refit one by one
                pass
        errors, seconds = [], []
        for est, (X, y) in zip(ests, datasets, strict=True):
            t0 = time.perf_counter()
            try:
                est.fit(X, y)
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
                errors.append(f"{type(exc).__name__}: {exc}")
            seconds.append(time.perf_counter() - t0)
        return errors, seconds, [False] * n


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _num_draws(est: Any) -> int:
    post = getattr(est, "posterior_", None)
    if post is None or "sigma" not in post.samples:
        return 0
    return int(np.prod(post.samples["sigma"].shape[:2]))


def _nonfinite_sites(est: Any) -> list[str]:
    post = getattr(est, "posterior_", None)
    if post is None:
        return []
    return [k for k, v in post.samples.items() if not np.all(np.isfinite(np.asarray(v)))]


def _idata_for(est: Any, task: _Task):
    from pcbtl.inference import idata_from_groups

    idata = getattr(est, "idata_", None)
    if idata is not None:
        return idata
    if task.X_test is None:
        return None
    mu, sd = est.predict(task.X_test, return_std=True)
    return idata_from_groups(
        {"predictions": {"mean": np.asarray(mu)[None, None], "sd": np.asarray(sd)[None, None]}},
        attrs={"pcbtl_method": type(est).__name__},
    )


def _finish(
    spec: FitSpec,
    est: Any,
    task: _Task,
    error: str,
    seconds: float,
    batched: bool,
    device: str,
    out: Path,
    threshold: float,
) -> dict[str, Any]:
    """Decide ok/failed, score, write ``fits/<id>.nc`` then ``fits/<id>.json``; return the row."""
    from pcbtl.study import METRICS, score

    metrics = dict.fromkeys(METRICS, float("nan"))
    reason = error
    divergences = int(getattr(est, "num_divergences_", 0) or 0)
    draws = _num_draws(est)
    if not reason:
        bad = _nonfinite_sites(est)
        if bad:
            reason = f"non-finite posterior draws of {', '.join(bad)}"
        elif draws and divergences > threshold * draws:
            reason = (
                f"divergences: {divergences} of {draws} draws "
                f"(> max_divergence_fraction = {threshold:g})"
            )
    if not reason and task.X_test is not None:
        try:
            metrics = score(est, task.X_test, task.y_test)
        except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
            reason = f"scoring failed: {type(exc).__name__}: {exc}"
    fits_dir = out / "fits"
    fits_dir.mkdir(parents=True, exist_ok=True)
    nc = ""
    if not error:
        try:
            idata = _idata_for(est, task)
            if idata is not None:
                _atomic_netcdf(idata, fits_dir / f"{spec.fit_id}.nc")
                nc = f"fits/{spec.fit_id}.nc"
        except Exception as exc:  # noqa: BLE001
            reason = reason or f"writing netCDF failed: {type(exc).__name__}: {exc}"
    row = {
        "fit_id": spec.fit_id,
        "status": "failed" if reason else "ok",
        "reason": reason,
        "method": spec.method,
        "seed": spec.seed,
        "data": _canon(spec.data),
        "options": _canon(spec.options),
        **metrics,
        "divergences": divergences,
        "num_draws": draws,
        **sampler_health(None if error else est),
        "fit_seconds": float(seconds),
        "batched": bool(batched),
        "device": device,
        "netcdf": nc,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(fits_dir / f"{spec.fit_id}.json", json.dumps(row, default=_json_default))
    return row


def run_group(
    specs: Sequence[FitSpec],
    out: str | Path,
    *,
    max_divergence_fraction: float = 0.05,
    builders: dict[str, Callable] | None = None,
    on_fit: Callable[[dict[str, Any]], None] | None = None,
    devices: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Run one group of fits (same model and data shapes) and write each as it finishes.

    A group that :func:`pcbtl.methods.supports_batching` is one vmapped NUTS job (sharded over
    ``devices``, default all local JAX devices); otherwise its fits run one by
    one and each is written as soon as it is done. ``on_fit(row)`` is called after each fit is
    on disk. ``builders`` maps method names to custom estimator builders (tests, extensions).
    """
    out = Path(out)
    devices = list(devices) if devices is not None else jax.local_devices()
    rows: list[dict[str, Any]] = []
    tasks, ests, failed = [], [], {}
    for i, spec in enumerate(specs):
        try:
            task = _load_task(spec, out)
            est = _build(spec, task.source, builders)
        except Exception as exc:  # noqa: BLE001 - a bad setting fails its fit, not the job
            failed[i] = f"setting up failed: {type(exc).__name__}: {exc}"
            task, est = None, None
        tasks.append(task)
        ests.append(est)

    def emit(i, error, sec, batched, device):
        row = _finish(
            specs[i], ests[i], tasks[i], error, sec, batched, device, out, max_divergence_fraction
        )
        rows.append(row)
        if on_fit is not None:
            on_fit(row)

    for i, reason in failed.items():
        row = {
            "fit_id": specs[i].fit_id,
            "status": "failed",
            "reason": reason,
            "method": specs[i].method,
            "seed": specs[i].seed,
            "data": _canon(specs[i].data),
            "options": _canon(specs[i].options),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(out / "fits" / f"{specs[i].fit_id}.json", json.dumps(row))
        rows.append(row)
        if on_fit is not None:
            on_fit(row)
    todo = [i for i in range(len(specs)) if i not in failed]
    if not todo:
        return rows
    from pcbtl.methods import supports_batching

    batchable = len(todo) > 1 and all(supports_batching(ests[i]) for i in todo)
    if not batchable:
        for i in todo:  # one by one, each written as soon as it is done
            (err,), (sec,), (b,) = _fit_chunk([ests[i]], [(tasks[i].X, tasks[i].y)])
            emit(i, err, sec, b, str(devices[0]))
        return rows
    errors, seconds, batched = _fit_chunk(
        [ests[i] for i in todo], [(tasks[i].X, tasks[i].y) for i in todo], devices
    )
    where = str(devices[0]) if len(devices) == 1 else f"sharded over {len(devices)} devices"
    for j, i in enumerate(todo):
        emit(i, errors[j], seconds[j], batched[j], where if batched[j] else str(devices[0]))
    return rows


def _run_group_remote(specs, out, threshold):
    """Dask task: run one group in a worker process and return its rows."""
    return run_group(specs, out, max_divergence_fraction=threshold)


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------


def read_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """Rows already on disk (``fits/*.json``) by fit id; unreadable files are ignored (rerun)."""
    rows = {}
    for p in sorted(Path(out, "fits").glob("*.json")):
        try:
            row = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows[row["fit_id"]] = row
    return rows


def _is_done(row: dict[str, Any] | None, out: Path, retry_failed: bool) -> bool:
    if row is None:
        return False
    if row.get("status") == "ok":
        return not row.get("netcdf") or (out / row["netcdf"]).is_file()
    return not retry_failed


def _write_table(rows: dict[str, dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for fid in sorted(rows):
        w.writerow({k: rows[fid].get(k, "") for k in RESULT_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def run_job(
    config: JobConfig,
    *,
    progress: bool = True,
    builders: dict[str, Callable] | None = None,
    on_fit: Callable[[dict[str, Any]], None] | None = None,
    client: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run every fit of ``config`` not yet on disk in ``config.out``; return all rows by fit id.

    ``engine = "local"`` runs the groups in this process; ``"dask"`` submits them to ``client``
    (a ``dask.distributed.Client``), to ``config.scheduler``, or to a new ``LocalCluster`` of
    ``config.workers`` processes. ``builders``/``on_fit``: see :func:`run_group` (local only).
    """
    from tqdm.auto import tqdm

    if config.x64:
        jax.config.update("jax_enable_x64", True)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    fits = expand_fits(config)
    meta = {
        "config": {k: v for k, v in asdict(config).items() if k != "out"},
        "n_fits": len(fits),
    }
    atomic_write_text(out / "job.json", json.dumps(meta, indent=2, default=_json_default))
    rows = read_results(out)
    todo = [f for f in fits if not _is_done(rows.get(f.fit_id), out, config.retry_failed)]
    groups = group_fits(todo, config.batch_size)
    bar = tqdm(
        total=len(fits),
        initial=len(fits) - len(todo),
        unit="fit",
        disable=not progress,
        desc="pcbtl batch",
    )
    try:
        if config.engine == "local":
            for group in groups:

                def record(row, _bar=bar):
                    rows[row["fit_id"]] = row
                    _bar.update(1)
                    if on_fit is not None:
                        on_fit(row)

                run_group(
                    group,
                    out,
                    max_divergence_fraction=config.max_divergence_fraction,
                    builders=builders,
                    on_fit=record,
                )
                _write_table(rows, out / "results.csv")
        else:
            _run_dask(config, groups, out, rows, bar, client)
    finally:
        bar.close()
        _write_table(rows, out / "results.csv")
    return rows


def _run_dask(config, groups, out, rows, bar, client) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "engine = 'dask' needs the optional extra: pip install 'pcbtl[distributed]'"
        ) from exc
    own = None
    if client is None:
        if config.scheduler:
            client = own = Client(config.scheduler)
        else:
            cluster = LocalCluster(
                n_workers=int(config.workers),
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            )
            client = own = Client(cluster)
    try:
        futures = [
            client.submit(
                _run_group_remote, g, str(out), config.max_divergence_fraction, pure=False
            )
            for g in groups
        ]
        for fut in as_completed(futures):
            for row in fut.result():
                rows[row["fit_id"]] = row
                bar.update(1)
            _write_table(rows, out / "results.csv")
    finally:
        if own is not None:
            cluster = getattr(own, "cluster", None)
            own.close()
            if cluster is not None and config.scheduler is None:
                cluster.close()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _batch(args: argparse.Namespace) -> int:
    overrides = {
        "out": args.out,
        "engine": args.engine,
        "workers": args.workers,
        "scheduler": args.scheduler,
        "retry_failed": True if args.retry_failed else None,
    }
    config = load_config(args.config, **overrides)
    fits = expand_fits(config)
    if args.dry_run:
        groups = group_fits(fits, config.batch_size)
        print(f"{len(fits)} fits in {len(groups)} groups -> {config.out}")
        for g in groups:
            print(f"  {len(g):>4} × {g[0].method} {_canon(g[0].data)}")
        return 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There are not enough devices")
        try:
            rows = run_job(config, progress=not args.no_progress)
        except KeyboardInterrupt:
            print("\ninterrupted: finished fits are saved; run the same command to resume")
            return 130
    status = [r.get("status") for r in rows.values() if r["fit_id"] in {f.fit_id for f in fits}]
    n_ok, n_failed = status.count("ok"), status.count("failed")
    print(f"{n_ok} ok, {n_failed} failed of {len(fits)} fits; table: {config.out / 'results.csv'}")
    for r in rows.values():
        if r.get("status") == "failed":
            print(f"  failed {r['fit_id']}: {r['reason']}")
    return 0 if n_failed == 0 else 1


def add_batch_command(sub) -> None:
    """Register ``pcbtl batch CONFIG.toml`` (see the module docstring)."""
    p = sub.add_parser("batch", help="run many posterior fits from a TOML config (resumable)")
    p.add_argument("config", help="job config (TOML); see benchmarks/configs/example_batch.toml")
    p.add_argument("--out", default=None, help="output folder (overrides [job] out)")
    p.add_argument("--engine", choices=("local", "dask"), default=None)
    p.add_argument("--workers", type=int, default=None, help="Dask LocalCluster processes")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument("--retry-failed", action="store_true", help="rerun fits recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="list the fits and groups and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_batch)
