r"""Many posterior fits at once: a vmapped multi-fit engine and a resumable batch-job runner.

``pcbtl batch CONFIG.toml`` (see ``benchmarks/configs/example_batch.toml``) expands a config into
*fits* — one (data setting, seed, method, options) each — and runs them:

* **Grouping.** Fits of one method with the same options, sampler settings and data shape form a
  group. A group whose estimators all allow it (:func:`pcbtl.estimators.registry.supports_batching`: every
  method sampled by single-chain NUTS) is sampled as **one vmapped NUTS job** by
  :func:`pcbtl.estimators.registry.fit_replicates` (NumPyro's functional ``hmc`` kernel under
  ``jax.vmap``, each replicate with its own step-size and mass-matrix adaptation, compiled once
  per model and shapes); other groups are fitted one by one. With several local JAX devices
  the job's replicate axis is **sharded over all of them** (``NamedSharding``): one program
  runs on every device at once.
* **Writing.** Every finished fit is written at once and atomically (temporary file in the same
  folder, then ``os.replace``): ``fits/<fit_id>.nc`` (ArviZ netCDF) and ``fits/<fit_id>.json``
  (its row), the JSON last, so a row on disk always means a complete fit. ``results.csv`` (one
  row per fit of the config; one ``data.KEY`` column per data setting, one ``option.KEY`` per
  method option) is rebuilt from those files at the start and after every group. Fit ids are
  safe file names and no file is written outside ``out``. Files get the user's umask. A
  write error (disk full, permissions) records the fit as failed and stops the job
  (:class:`JobError`; the next run redoes that fit).
* **One job per folder.** ``out/.lock`` (pid, host) is held while a job runs: a second run there
  stops; the lock of a dead process on the same host is taken over. A different config in an
  existing ``out`` is refused unless ``force`` (``--force``).
* **Resuming.** A job that is killed and started again removes orphan temporary files, reads
  ``fits/*.json`` and skips every fit already recorded (``ok``, or ``failed`` unless
  ``retry_failed``) whose files read back (the JSON a row, the netCDF in full); unreadable
  ones are rerun, so nothing finished is redone or lost. A cached source
  (``sources/<key>.npz``) that does not load is retrained and replaced.
* **Failures.** A fit that raises (e.g. non-finite draws), has more than
  ``max_divergence_fraction`` divergent draws, or non-finite draws is recorded with
  ``status = "failed"`` and its ``reason``; the job goes on. If a vmapped group raises, its fits
  are retried one by one so that one bad replicate fails alone.
* **Progress.** One ``tqdm`` bar over groups (its time estimate from finished groups), with the
  fits done as a postfix.
* **Config errors.** Every table and key is checked before any work (:class:`ConfigError`,
  naming the closest valid name); the command line prints one line and exits with 2.
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
import difflib
import errno
import hashlib
import inspect
import io
import itertools
import json
import os
import re
import socket
import sys
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

from pcbtl._files import atomic_write, atomic_write_text
from pcbtl.estimators.base import HEALTH_COLUMNS, sampler_health
from pcbtl.estimators.persistence import load_estimator, read_idata, save_fit_model
from pcbtl.estimators.registry import (
    METHODS,
    fit_all,
    make_method,
    method_options,
    supports_batching,
)
from pcbtl.estimators.registry import methods as registered
from pcbtl.evaluation import METRICS, score
from pcbtl.inference import idata_from_groups
from pcbtl.networks import SourceModel, train_source
from pcbtl.simulation import make_synthetic_task

__all__ = [
    "FitSpec",
    "JobConfig",
    "load_config",
    "expand_fits",
    "group_fits",
    "run_group",
    "run_job",
    "read_results",
    "load_fit",
    "read_results_frame",
    "ConfigError",
    "JobError",
    "make_batched_log_density",
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
    "group_seconds",
    "batched",
    "device",
    "netcdf",
    "finished_at",
)

# --------------------------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------------------------


def _to_netcdf(idata: Any, path: str) -> None:
    idata.to_netcdf(path)


def _atomic_netcdf(idata: Any, path: Path) -> Path:
    return atomic_write(path, write_path=lambda tmp: _to_netcdf(idata, tmp))


def _inside(out: Path, path: Path) -> Path:
    """``path``, after checking that it lies inside ``out`` (no file is written elsewhere)."""
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(out)):
        raise ValueError(f"refusing to write {path}: it lies outside the output folder {out}")
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


class ConfigError(ValueError):
    """A job config that cannot run: unknown table, key or method, duplicate seeds, ...

    Raised by :func:`load_config` and :class:`JobConfig` before any work is done; the command
    line prints it as one line and exits with status 2."""


class JobError(RuntimeError):
    """A job that must stop: its output folder is held by another run, belongs to another
    config, or cannot be written (disk full, permissions). The command line prints it as one
    line and exits with status 1; every fit finished before it is on disk."""

    def __init__(self, message: str, row: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.row = row


#: Top-level tables of a job config.
_TABLES = ("job", "data", "source", "sampler", "methods")
#: Data keys of ``kind = "csv"``.
_CSV_KEYS = ("kind", "path", "target", "features", "test_fraction")


def _unknown(what: str, key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {what} {key!r}{hint} (valid: {', '.join(valid)})")


def _params(fn: Callable) -> set[str] | None:
    """Keyword arguments ``fn`` accepts (``None``: any, it takes ``**kwargs``)."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind is not p.VAR_POSITIONAL} - {"self"}


def _estimator_class(name: str) -> type | None:
    """The estimator class the registered builder of method ``name`` constructs."""
    build = METHODS[name].build
    if isinstance(build, type):
        return build
    for cell in getattr(build, "__closure__", None) or ():
        if isinstance(cell.cell_contents, type):
            return cell.cell_contents
    for n in getattr(getattr(build, "__code__", None), "co_names", ()):
        obj = getattr(build, "__globals__", {}).get(n)
        if isinstance(obj, type):
            return obj
    return None


def _takes_sampler(method: str) -> bool:
    return METHODS[method].uses_sampler


def _method_params(name: str) -> set[str] | None:
    """Options a ``[methods.NAME]`` table (and ``[sampler]``) may set for ``name``: the
    estimator's ``__init__`` keywords less those the runner sets itself."""
    cls = _estimator_class(name)
    if cls is None:
        return None
    params = _params(cls.__init__)
    if params is None:
        return None
    # source: the trained source; seed: from [job] seeds; prior/base: fixed by the method name
    return params - {"source", "seed", "prior", "base"}


def _check_options(methods: dict[str, dict[str, Any]], sampler: dict[str, Any]) -> None:

    valid = registered()
    for name, opts in methods.items():
        if name not in valid:
            raise _unknown("method", name, valid)
        if not isinstance(opts, dict):
            raise ConfigError(f"[methods.{name}] must be a table of options, got {opts!r}")
        params = _method_params(name)
        for key in opts:
            if key == "seed":
                raise ConfigError(
                    f"[methods.{name}] sets 'seed': seeds come from [job] seeds, one fit each"
                )
            if params is not None and key not in params:
                raise _unknown(f"option of method {name!r} in [methods.{name}]", key, params)
    takers = [m for m in methods if _takes_sampler(m)]
    pools = {m: _method_params(m) for m in (takers or [m for m in valid if _takes_sampler(m)])}
    union = set().union(*(p for p in pools.values() if p is not None))
    for key in sampler:
        if key in ("source", "seed", "prior", "base"):
            raise ConfigError(f"[sampler] may not set {key!r}")
        if all(p is not None and key not in p for p in pools.values()):
            raise _unknown("key in [sampler]", key, union)
        if takers:
            refuse = [m for m in takers if pools[m] is not None and key not in pools[m]]
            if refuse:
                raise ConfigError(f"[sampler] key {key!r} is not an option of method(s) {refuse}")


def _check_tables(raw: dict[str, Any], job_overrides: Iterable[str] = ()) -> None:
    """Every table and key of a raw TOML config against what the runner accepts."""

    for table in raw:
        if table not in _TABLES:
            raise _unknown("table", table, _TABLES)
        if not isinstance(raw[table], dict):
            raise ConfigError(f"[{table}] must be a table, got {raw[table]!r}")
    job_keys = {f for f in JobConfig.__dataclass_fields__ if f not in _TABLES} | {"out", "seeds"}
    for key in [*raw.get("job", {}), *job_overrides]:
        if key not in job_keys:
            raise _unknown("key in [job]", key, job_keys)
    data = raw.get("data", {})
    kind = data.get("kind")
    if kind == "synthetic":
        data_keys = (_params(make_synthetic_task) or set()) - {"seed"} | {"kind"}
    elif kind == "csv":
        data_keys = set(_CSV_KEYS)
        if "path" not in data or "target" not in data:
            raise ConfigError("[data] kind = 'csv' needs 'path' and 'target'")
    else:
        raise ConfigError(f"data.kind must be 'synthetic' or 'csv', got {kind!r}")
    for key in data:
        if key not in data_keys:
            raise _unknown(f"key in [data] (kind = {kind!r})", key, data_keys)
    source_keys = (_params(train_source) or set()) - {"X", "y", "seed", "progress_bar"} | {"path"}
    for key in raw.get("source", {}):
        if key not in source_keys:
            raise _unknown("key in [source]", key, source_keys)


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
        if not self.methods:
            raise ConfigError("the config names no methods ([methods.NAME] tables)")
        _check_options(self.methods, self.sampler)
        if not self.seeds:
            raise ConfigError("the config names no seeds")
        dup = sorted({s for s in self.seeds if list(self.seeds).count(s) > 1})
        if dup:
            raise ConfigError(f"[job] seeds repeats {dup}: each seed must appear once")
        if self.data.get("kind") not in ("synthetic", "csv"):
            raise ConfigError(
                f"data.kind must be 'synthetic' or 'csv', got {self.data.get('kind')!r}"
            )
        if self.engine not in ("local", "dask"):
            raise ConfigError(f"engine must be 'local' or 'dask', got {self.engine!r}")
        if not 0.0 <= float(self.max_divergence_fraction) <= 1.0:
            raise ConfigError("max_divergence_fraction must lie in [0, 1]")
        if int(self.batch_size) < 1:
            raise ConfigError("batch_size must be positive")


def load_config(path: str | Path, **overrides: Any) -> JobConfig:
    """Read a TOML job config; relative paths in it are relative to its folder.

    Tables: ``[job]`` (``out``, ``seeds``, ``max_divergence_fraction``, ``batch_size``,
    ``engine``, ``workers``, ``scheduler``, ``retry_failed``, ``x64``), ``[data]`` (``kind =
    "synthetic"`` with :func:`pcbtl.make_synthetic_task` settings — a list value makes a grid —
    or ``kind = "csv"`` with ``path``, ``target``, ``features``, ``test_fraction``),
    ``[source]`` (``train_source`` settings, or ``path`` to a saved source), ``[sampler]``
    (``num_warmup``, ``num_samples``) and one ``[methods.NAME]`` table of options per method.
    ``overrides`` replace ``[job]`` entries (e.g. from the command line).

    Every table and key is checked before anything runs (the keys of ``[sampler]`` and
    ``[methods.NAME]`` against the estimators' ``__init__`` signatures); a wrong one raises
    :class:`ConfigError` naming it and the closest valid name.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    _check_tables(raw, [k for k, v in overrides.items() if v is not None])
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
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ConfigError(f"[job] seeds must be an integer or a list of integers, got {seeds!r}")
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


def _safe_name(text: str) -> str:
    """``text`` as one safe file name: letters, digits, ``.``, ``_`` and ``-`` only, no ``..``
    and no leading dot (so never a path separator, a parent folder or a hidden file)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text)
    name = re.sub(r"\.{2,}", "-", name)
    return name.lstrip(".") or "-"


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
                fits.append(FitSpec(fit_id=_safe_name(fit_id), **spec))
    ids = [f.fit_id for f in fits]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"duplicate fit ids {dup[:3]}: repeated seeds or settings?")
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
    key = _source_key(spec)
    if key not in _SOURCE_CACHE:
        path = _inside(out, out / "sources" / f"{key}.npz")
        src = None
        if path.is_file():
            try:
                src = SourceModel.load(path)
            except (ValueError, OSError) as exc:  # corrupt or truncated: retrain and replace
                _say(f"cached source {path.name} does not load ({exc}); retraining it")
        if src is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            opts = {"hidden": (32, 32), "max_epochs": 200, **spec.source}
            opts["hidden"] = tuple(opts["hidden"])
            src = train_source(
                task.X_source, task.y_source, seed=spec.seed, progress_bar=False, **opts
            )
            src.save(path)  # atomic (temporary file + replace)
        _SOURCE_CACHE[key] = src
    return _Task(_SOURCE_CACHE[key], X, y, Xt, yt)


def _source_key(spec: FitSpec) -> str:
    """File stem of the cached source of ``spec`` (``out/sources/<key>.npz``)."""
    return hashlib.sha1(_canon([spec.data, spec.seed, spec.source]).encode()).hexdigest()[:16]


def _say(message: str) -> None:
    """A one-line notice to the user (stderr)."""
    print(f"pcbtl batch: {message}", file=sys.stderr)


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
    opts = method_options(spec.method, seed=spec.seed, sampler=spec.sampler, **spec.options)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def _build(spec: FitSpec, source: Any, builders: dict[str, Callable] | None):

    if builders and spec.method in builders:
        return builders[spec.method](source, **_method_options(spec))
    return make_method(spec.method, source, **_method_options(spec))


def _fit_chunk(ests, datasets, devices=None):
    """Fit a chunk with :func:`pcbtl.estimators.registry.fit_all` on the first of ``devices``
    (one vmapped job sharded over ``devices`` where every estimator allows it).

    Returns ``(errors, seconds, batched)`` per estimator (``errors[i]`` is ``""`` on success).
    """
    first = devices[0] if devices else None
    ctx = jax.default_device(first) if first is not None else _nullcontext()
    with ctx:
        errors, seconds = fit_all(ests, datasets, devices=devices)
    return errors, seconds, [bool(getattr(e, "batched_", False)) for e in ests]


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
    group_seconds: float | None = None,
) -> dict[str, Any]:
    """Decide ok/failed, score, write ``fits/<id>.nc`` then ``fits/<id>.json``; return the row.

    A write that fails with ``OSError`` (disk full, permissions) records the fit as failed with
    ``reason = "write error: ..."`` (on disk if the row can still be written; such a fit is rerun
    by the next run) and raises :class:`JobError`: the job stops, nothing half-written stays."""

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
    write_error = None
    if not error:
        try:
            idata = _idata_for(est, task)
            if idata is not None:
                _atomic_netcdf(idata, _inside(out, fits_dir / f"{spec.fit_id}.nc"))
                nc = f"fits/{spec.fit_id}.nc"
            save_fit_model(est, _inside(out, fits_dir / f"{spec.fit_id}.model.npz"))
        except OSError as exc:
            write_error = f"{_WRITE_ERROR}{_os_error(exc)}"
        except Exception as exc:  # noqa: BLE001
            reason = reason or f"writing netCDF failed: {type(exc).__name__}: {exc}"
    if write_error:
        reason = write_error
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
        "group_seconds": float(seconds if group_seconds is None else group_seconds),
        "batched": bool(batched),
        "device": device,
        "netcdf": nc,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        _write_row(out, row)
    except OSError as exc:
        row["status"], row["reason"] = "failed", f"{_WRITE_ERROR}{_os_error(exc)}"
        write_error = row["reason"]
    if write_error:
        raise JobError(f"fit {spec.fit_id}: {write_error}", row=row)
    return row


_WRITE_ERROR = "write error: "


def _os_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name} {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def _write_row(out: Path, row: dict[str, Any]) -> None:
    path = _inside(out, out / "fits" / f"{row['fit_id']}.json")
    atomic_write_text(path, json.dumps(row, default=_json_default))


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

    A group that :func:`pcbtl.estimators.registry.supports_batching` is one vmapped NUTS job (sharded over
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

    def emit(i, error, sec, batched, device, group_sec=None):
        try:
            row = _finish(
                specs[i],
                ests[i],
                tasks[i],
                error,
                sec,
                batched,
                device,
                out,
                max_divergence_fraction,
                group_sec,
            )
        except JobError as exc:
            if exc.row is not None and on_fit is not None:
                on_fit(exc.row)
            raise
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
        try:
            _write_row(out, row)
        except OSError as exc:
            raise JobError(f"fit {specs[i].fit_id}: {_WRITE_ERROR}{_os_error(exc)}") from None
        rows.append(row)
        if on_fit is not None:
            on_fit(row)
    todo = [i for i in range(len(specs)) if i not in failed]
    if not todo:
        return rows

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
    group_sec = float(sum(seconds))
    for j, i in enumerate(todo):
        dev = where if batched[j] else str(devices[0])
        emit(i, errors[j], seconds[j], batched[j], dev, group_sec if batched[j] else None)
    return rows


def _run_group_remote(specs, out, threshold):
    """Dask task: run one group in a worker process and return its rows."""
    return run_group(specs, out, max_divergence_fraction=threshold)


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------


def _load_rows(out: Path) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Readable rows of ``fits/*.json`` by fit id, and the unreadable files (not JSON, not an
    object, no ``fit_id`` or one that does not match the file name)."""
    rows, bad = {}, []
    for p in sorted(Path(out, "fits").glob("*.json")):
        try:
            row = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            bad.append(p)
            continue
        if not isinstance(row, dict) or row.get("fit_id") != p.stem:
            bad.append(p)
            continue
        rows[row["fit_id"]] = row
    return rows, bad


def load_fit(out: str | Path, fit_id: str, source: Any = None) -> Any:
    """The fitted model of fit ``fit_id`` of the batch job in ``out``, as it was after ``fit``.

    Reads ``fits/<fit_id>.model.npz`` (:func:`pcbtl.estimators.persistence.load_estimator`; the job
    writes it next to the netCDF, without the source and the ArviZ record) with the fit's
    source: ``source`` if given (checked against the saved fingerprint), else the job's —
    ``[source] path``, or the cached ``sources/<key>.npz`` of the fit's data setting and seed
    (found through ``job.json``). ``idata_`` is read from ``fits/<fit_id>.nc``. Predictions
    equal those of the fitted estimator in the job.

    Raises ``FileNotFoundError`` when the fit has no model file (a failed fit, or a job run by
    a pcbtl without model files) or its source is gone, ``ValueError`` for an unknown fit id
    or a source that is not the one the fit used.
    """
    out = Path(out)
    if not isinstance(fit_id, str) or _safe_name(fit_id) != fit_id:
        raise ValueError(f"{fit_id!r} is not a fit id (a safe file name)")
    model = _inside(out, out / "fits" / f"{fit_id}.model.npz")
    if not model.is_file():
        raise FileNotFoundError(
            f"no model file for fit {fit_id} in {out / 'fits'} (a fit that raised, or a job "
            "run by a pcbtl that wrote none)"
        )
    if source is None:
        source = _fit_source(out, fit_id)
    est = load_estimator(model, source=source)
    nc = out / "fits" / f"{fit_id}.nc"
    if "idata_" in vars(est) and est.idata_ is None and nc.is_file():
        est.idata_ = read_idata(nc)
    return est


def _fit_source(out: Path, fit_id: str) -> Any:
    """The source model fit ``fit_id`` of the job in ``out`` used (see :func:`load_fit`)."""
    try:
        meta = json.loads((out / "job.json").read_text(encoding="utf-8"))
        settings = dict(meta["config"])
        settings["seeds"] = tuple(settings["seeds"])
        config = JobConfig(out=out, **settings)
    except FileNotFoundError:
        raise FileNotFoundError(f"no job.json in {out}: not a batch job folder") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{out / 'job.json'} does not read as a job config: {exc}") from None
    spec = next((f for f in expand_fits(config) if f.fit_id == fit_id), None)
    if spec is None:
        raise ValueError(f"{fit_id!r} is not a fit of the job in {out} (job.json)")
    if "path" in spec.source:
        return SourceModel.load(spec.source["path"])
    return SourceModel.load(_inside(out, out / "sources" / f"{_source_key(spec)}.npz"))


def read_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """Rows already on disk (``fits/*.json``) by fit id; unreadable files (not JSON, or not a
    row: ``{}``, ``[1, 2]``, ...) are ignored (the job reruns those fits)."""
    return _load_rows(Path(out))[0]


def _netcdf_readable(path: Path) -> bool:
    """Whether the netCDF file opens and every variable of every group reads in full."""
    try:
        import h5netcdf

        with h5netcdf.File(path, "r") as f:

            def visit(group) -> None:
                for var in group.variables.values():
                    var[...]
                for sub in group.groups.values():
                    visit(sub)

            visit(f)
        return True
    except ImportError:  # pragma: no cover - h5netcdf comes with ArviZ
        pass
    except Exception:  # noqa: BLE001 - truncated or corrupt: rerun the fit
        return False
    try:  # pragma: no cover
        import arviz as az

        az.from_netcdf(path).to_dict()
        return True
    except Exception:  # noqa: BLE001
        return False


def _is_done(row: dict[str, Any] | None, out: Path, retry_failed: bool) -> bool:
    if row is None:
        return False
    if str(row.get("reason", "")).startswith(_WRITE_ERROR):
        return False  # stopped by a write error: not a result, rerun
    if row.get("status") == "ok":
        return not row.get("netcdf") or (out / row["netcdf"]).is_file()
    return not retry_failed


def _verified(rows: dict[str, dict[str, Any]], out: Path, ids: Iterable[str]) -> list[str]:
    """Fit ids (of ``ids``) recorded on disk whose netCDF file does not read in full."""
    bad = []
    for fid in ids:
        row = rows.get(fid)
        nc = row.get("netcdf") if row else None
        if nc and (out / nc).is_file() and not _netcdf_readable(out / nc):
            bad.append(fid)
    return bad


def _expand_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its ``data`` and ``options`` JSON as one ``data.KEY`` / ``option.KEY`` entry
    per data setting and per method option."""
    flat = {k: v for k, v in row.items() if k not in ("data", "options")}
    for col, prefix in (("data", "data."), ("options", "option.")):
        value = row.get(col)
        try:
            value = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            value = None
        for k, v in (value or {}).items() if isinstance(value, dict) else ():
            flat[prefix + k] = v if isinstance(v, str | int | float | bool) else _canon(v)
    return flat


def _table(rows: Iterable[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    flat = [_expand_row(r) for r in rows]
    extra = sorted({k for r in flat for k in r if k.startswith(("data.", "option."))})
    base = [c for c in RESULT_COLUMNS if c not in ("data", "options")]
    i = base.index("seed") + 1
    return [*base[:i], *extra, *base[i:]], flat


def read_results_frame(out: str | Path):
    """The rows on disk (``fits/*.json``) as a :class:`pandas.DataFrame`, one row per fit and
    one column per data setting (``data.KEY``) and method option (``option.KEY``), as in
    ``results.csv``. Needs pandas (``pip install 'pcbtl[dev]'``)."""
    import pandas as pd

    rows = read_results(out)
    columns, flat = _table(rows[k] for k in sorted(rows))
    return pd.DataFrame(flat, columns=columns)


def _write_table(
    rows: dict[str, dict[str, Any]], path: Path, ids: Iterable[str] | None = None
) -> None:
    """``results.csv``: the rows of ``ids`` (default all) — see :func:`read_results_frame`."""
    keep = sorted(rows) if ids is None else sorted(set(ids) & set(rows))
    columns, flat = _table(rows[k] for k in keep)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in flat:
        w.writerow({k: r.get(k, "") for k in columns})
    atomic_write_text(path, buf.getvalue())


#: Config entries that decide the fits and their results; another value is another job.
_IDENTITY = ("methods", "seeds", "data", "source", "sampler", "max_divergence_fraction", "x64")


def _identity(config_dict: dict[str, Any]) -> str:
    return _canon({k: config_dict.get(k) for k in _IDENTITY})


def _check_same_job(out: Path, meta: dict[str, Any], force: bool) -> None:
    path = out / "job.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["config"]
        same = _identity(old) == _identity(json.loads(_canon(meta["config"])))
    except (OSError, ValueError, KeyError, TypeError):
        old, same = None, False
    if same:
        return
    what = "holds an unreadable job.json" if old is None else "holds a job of another config"
    if not force:
        raise JobError(
            f"{out} {what}; use another --out, or --force to run this config there "
            "(its results.csv then lists this config's fits only)"
        )
    _say(
        f"--force: {out} {what}; job.json is replaced and results.csv lists this config's "
        "fits only (files of other fits stay in fits/, fits of equal id are reused)"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """``out/.lock`` (pid, host, start time) held while a job runs in ``out``."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def acquire(self) -> None:
        info = {**self.me, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".lock.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(info, fh)
                os.link(tmp, self.path)  # atomic: fails if the lock exists
                self.held = True
                return
            except FileExistsError:
                pass
            finally:
                Path(tmp).unlink(missing_ok=True)
            try:
                other = json.loads(self.path.read_text(encoding="utf-8"))
                pid, host = int(other["pid"]), str(other["host"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                raise JobError(
                    f"{self.path} exists but is unreadable; if no job runs in "
                    f"{self.path.parent}, delete it"
                ) from None
            if host == self.me["host"] and not _pid_alive(pid):
                _say(f"taking over the stale lock of pid {pid} on {host} (that process is gone)")
                self.path.unlink(missing_ok=True)
                continue
            raise JobError(
                f"{self.path.parent} is in use by pid {pid} on host {host} "
                f"(since {other.get('started', '?')}); if that job is gone, delete {self.path}"
            )
        raise JobError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def run_job(
    config: JobConfig,
    *,
    progress: bool = True,
    builders: dict[str, Callable] | None = None,
    on_fit: Callable[[dict[str, Any]], None] | None = None,
    client: Any = None,
    force: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run every fit of ``config`` not yet on disk in ``config.out``; return all rows by fit id.

    ``engine = "local"`` runs the groups in this process; ``"dask"`` submits them to ``client``
    (a ``dask.distributed.Client``), to ``config.scheduler``, or to a new ``LocalCluster`` of
    ``config.workers`` processes. ``builders``/``on_fit``: see :func:`run_group` (local only).

    Before any fit: ``out/.lock`` is taken (another live run there raises :class:`JobError`
    naming its pid and host; the lock of a dead process on this host is taken over); a
    different config already in ``out`` raises :class:`JobError` unless ``force``; orphan
    temporary files in ``fits/`` are removed; every recorded fit is checked (its JSON a row,
    its netCDF readable in full) and unreadable ones are rerun; ``results.csv`` is rebuilt
    from the files. A write error (disk full, permissions) stops the job with
    :class:`JobError`. Progress counts groups, so its time estimate comes from whole groups.
    """
    from tqdm.auto import tqdm

    if config.x64:
        jax.config.update("jax_enable_x64", True)
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"cannot create the output folder: {_os_error(exc)}") from None
    fits = expand_fits(config)
    ids = [f.fit_id for f in fits]
    meta = {
        "config": {k: v for k, v in asdict(config).items() if k != "out"},
        "n_fits": len(fits),
    }
    lock = _Lock(out)
    try:
        lock.acquire()
    except OSError as exc:
        raise JobError(f"cannot write the lock file: {_os_error(exc)}") from None
    try:
        _check_same_job(out, meta, force)
        fits_dir = out / "fits"
        for tmp in [*fits_dir.glob("*.tmp"), *fits_dir.glob(".*.tmp"), *out.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        rows, bad_files = _load_rows(out)
        for p in bad_files:
            _say(f"{p.name} is not a readable fit row; rerunning that fit")
        for fid in _verified(rows, out, ids):
            _say(f"fits/{fid}.nc does not read in full; rerunning that fit")
            del rows[fid]
        atomic_write_text(out / "job.json", json.dumps(meta, indent=2, default=_json_default))
        _write_table(rows, out / "results.csv", ids)
        todo = [f for f in fits if not _is_done(rows.get(f.fit_id), out, config.retry_failed)]
        groups = group_fits(todo, config.batch_size)
        bar = tqdm(total=len(groups), unit="group", disable=not progress, desc="pcbtl batch")
        n_done = [len(fits) - len(todo)]

        def record(row):
            rows[row["fit_id"]] = row
            n_done[0] += 1
            bar.set_postfix_str(f"{n_done[0]}/{len(fits)} fits", refresh=False)
            if on_fit is not None:
                on_fit(row)

        try:
            if config.engine == "local":
                for group in groups:
                    run_group(
                        group,
                        out,
                        max_divergence_fraction=config.max_divergence_fraction,
                        builders=builders,
                        on_fit=record,
                    )
                    bar.update(1)
                    _write_table(rows, out / "results.csv", ids)
            else:
                _run_dask(config, groups, out, rows, bar, client, ids, record)
        finally:
            bar.close()
            try:
                _write_table(rows, out / "results.csv", ids)
            except OSError:
                pass  # the fits are on disk; the next run rebuilds the table
    except OSError as exc:
        raise JobError(f"cannot write to {out}: {_os_error(exc)}") from None
    finally:
        lock.release()
    return rows


def _run_dask(config, groups, out, rows, bar, client, ids, record) -> None:
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
                record(row)
            bar.update(1)
            _write_table(rows, out / "results.csv", ids)
    finally:
        if own is not None:
            cluster = getattr(own, "cluster", None)
            own.close()
            if cluster is not None and config.scheduler is None:
                cluster.close()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _describe_group(group: Sequence[FitSpec]) -> str:
    """One line with every setting of a group: method, options, sampler, seeds, data."""
    first = group[0]
    data = []
    for k in sorted({k for f in group for k in f.data}):
        values = []
        for f in group:
            v = f.data.get(k)
            if v not in values:
                values.append(v)
        data.append(f"{k}={_canon(values[0] if len(values) == 1 else values)}")
    seeds = sorted({f.seed for f in group})
    parts = [f"{len(group):>4} × {first.method}", f"options={_canon(first.options)}"]
    if _takes_sampler(first.method):
        parts.append(f"sampler={_canon(first.sampler)}")
    parts += [f"seeds={_canon(seeds)}", "data: " + " ".join(data)]
    return " ".join(parts)


def _batch(args: argparse.Namespace) -> int:
    overrides = {
        "out": args.out,
        "engine": args.engine,
        "workers": args.workers,
        "scheduler": args.scheduler,
        "retry_failed": True if args.retry_failed else None,
    }
    try:
        config = load_config(args.config, **overrides)
        fits = expand_fits(config)
    except (ValueError, TypeError) as exc:
        print(f"pcbtl batch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pcbtl batch: error: cannot read {args.config}: {_os_error(exc)}", file=sys.stderr)
        return 2
    if args.dry_run:
        groups = group_fits(fits, config.batch_size)
        print(f"{len(fits)} fits in {len(groups)} groups -> {config.out}")
        for g in groups:
            print("  " + _describe_group(g))
        return 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There are not enough devices")
        try:
            rows = run_job(config, progress=not args.no_progress, force=args.force)
        except KeyboardInterrupt:
            print("\ninterrupted: finished fits are saved; run the same command to resume")
            return 130
        except JobError as exc:
            print(f"pcbtl batch: error: {exc}", file=sys.stderr)
            return 1
    ids = {f.fit_id for f in fits}
    status = [r.get("status") for r in rows.values() if r["fit_id"] in ids]
    n_ok, n_failed = status.count("ok"), status.count("failed")
    print(f"{n_ok} ok, {n_failed} failed of {len(fits)} fits; table: {config.out / 'results.csv'}")
    for r in rows.values():
        if r.get("status") == "failed" and r["fit_id"] in ids:
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
    p.add_argument(
        "--dry-run", action="store_true", help="check the config, list the groups and exit"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="run in an --out that holds another config (results.csv then lists this one's)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_batch)
