"""The batch engine: batched log density (no retracing), resumable jobs, failures, Dask, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcbtl
from pcbtl.jobs import batch
from pcbtl.models import last_layer_pc_model, last_layer_sufficient_stats
from pcbtl.priors import reference_gram

TINY = textwrap.dedent(
    """
    [job]
    seeds = [0, 1, 2]
    batch_size = 2
    max_divergence_fraction = 0.05

    [data]
    kind = "synthetic"
    n_source = 200
    n_target = 30
    n_test = 50
    n_features = 3
    shift = 1.0

    [source]
    hidden = [8]
    max_epochs = 10

    [sampler]
    num_warmup = 60
    num_samples = 20

    [methods.pc-last-layer]
    U = 1.0
    """
)


def _config(tmp_path: Path, text: str = TINY, **overrides) -> batch.JobConfig:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return batch.load_config(path, out=str(tmp_path / "out"), **overrides)


# --------------------------------------------------------------------------------------------
# the batched log density
# --------------------------------------------------------------------------------------------


def _last_layer_kwargs(seed: int, n: int = 40, p: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    Phi = np.c_[rng.standard_normal((n, p - 1)), np.ones(n)]
    beta_s = rng.standard_normal(p)
    y = Phi @ beta_s + 0.3 * rng.standard_normal(n)
    gram = reference_gram(Phi)
    return {
        "beta_source": jnp.asarray(beta_s, jnp.float32),
        "chol_G": jnp.asarray(gram.chol, jnp.float32),
        "rate": 3.0,
        "sigma_scale": 1.0,
        "stats": last_layer_sufficient_stats(Phi, y, beta_s),
    }


def test_batched_log_density_matches_single_and_never_retraces():
    traces = []

    def model(**kw):
        traces.append(1)  # runs once per trace of the log density (and per initialisation)
        last_layer_pc_model(**kw)

    first = [_last_layer_kwargs(s) for s in range(3)]
    ld, x0, data = batch.make_batched_log_density(model, first)
    assert x0.shape == (3, 1 + 1 + 4) and x0.dtype == jnp.float32
    values = ld(x0, data)
    for r, kw in enumerate(first):  # each replicate equals the one-data-set log density
        ld1, _ = pcbtl.make_log_density(last_layer_pc_model, kw)
        np.testing.assert_allclose(values[r], ld1(x0[r]), rtol=1e-5)
    n_traces = len(traces)
    for s in range(5):  # new data and points of the same shapes: no new trace
        data_s = batch.stack_kwargs([_last_layer_kwargs(10 * s + r) for r in range(3)])
        out = ld(x0 + 0.01 * s, data_s)
        assert out.shape == (3,) and bool(jnp.all(jnp.isfinite(out)))
        jax.block_until_ready(jax.grad(lambda x, d=data_s: ld(x, d).sum())(x0))
    grad_traces = len(traces) - n_traces  # the gradient is traced once, not once per call
    for s in range(3):
        data_s = batch.stack_kwargs([_last_layer_kwargs(100 + 10 * s + r) for r in range(3)])
        ld(x0, data_s)
    assert len(traces) == n_traces + grad_traces
    assert grad_traces <= 5  # one jax.grad trace per distinct closure, at most
    assert ld._cache_size() == 1


# --------------------------------------------------------------------------------------------
# config and fit ids
# --------------------------------------------------------------------------------------------


def test_config_grid_ids_and_groups(tmp_path):
    text = TINY.replace("shift = 1.0", "shift = [0.0, 1.0]").replace(
        "n_target = 30", "n_target = [30, 40]"
    )
    cfg = _config(tmp_path, text)
    fits = batch.expand_fits(cfg)
    assert len(fits) == 2 * 2 * 3
    assert len({f.fit_id for f in fits}) == len(fits)
    assert [f.fit_id for f in batch.expand_fits(cfg)] == [f.fit_id for f in fits]  # stable
    groups = batch.group_fits(fits, batch_size=64)
    # shift changes the data but not the shapes: one group per n_target
    assert sorted(len(g) for g in groups) == [6, 6]
    assert all(len({f.data["n_target"] for f in g}) == 1 for g in groups)
    assert len(batch.group_fits(fits, batch_size=4)) == 4
    with pytest.raises(ValueError, match="unknown method"):
        _config(tmp_path, TINY.replace("pc-last-layer", "no-such-method"))
    with pytest.raises(ValueError, match="data.kind"):
        _config(tmp_path, TINY.replace('"synthetic"', '"parquet"'))


def test_atomic_write_leaves_no_temporary(tmp_path):
    p = batch.atomic_write_text(tmp_path / "a" / "x.json", "{}")
    batch.atomic_write_text(p, '{"b": 1}')
    assert json.loads(p.read_text()) == {"b": 1}
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]


# --------------------------------------------------------------------------------------------
# resumption, failures
# --------------------------------------------------------------------------------------------


def test_job_killed_part_way_resumes_without_redoing_or_losing(tmp_path):
    cfg = _config(tmp_path)
    seen: list[str] = []

    def kill_after_one(row):
        seen.append(row["fit_id"])
        if len(seen) == 1:
            raise KeyboardInterrupt  # killed inside a vmapped group, after its 1st fit is written

    with pytest.raises(KeyboardInterrupt):
        batch.run_job(cfg, progress=False, on_fit=kill_after_one)
    on_disk = batch.read_results(cfg.out)
    assert sorted(on_disk) == sorted(seen)  # every finished fit is on disk, nothing else
    stamps = {f: (cfg.out / "fits" / f"{f}.nc").stat().st_mtime_ns for f in seen}
    assert not list((cfg.out / "fits").glob(".*.tmp"))

    rerun: list[str] = []
    rows = batch.run_job(cfg, progress=False, on_fit=lambda r: rerun.append(r["fit_id"]))
    all_ids = {f.fit_id for f in batch.expand_fits(cfg)}
    assert set(rows) == all_ids
    assert set(rerun) == all_ids - set(seen)  # nothing redone
    for f, t in stamps.items():  # nothing rewritten
        assert (cfg.out / "fits" / f"{f}.nc").stat().st_mtime_ns == t
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert all(r["min_bulk_ess"] > 0 and r["max_rhat"] > 0.5 for r in rows.values()), rows
    table = (cfg.out / "results.csv").read_text().splitlines()
    assert "min_bulk_ess,max_rhat" in table[0]
    assert len(table) == 1 + len(all_ids)
    assert sum(r["batched"] for r in rows.values()) >= 2  # the first group ran vmapped

    again: list[str] = []
    batch.run_job(cfg, progress=False, on_fit=lambda r: again.append(r["fit_id"]))
    assert again == []


class _Diverging:
    """Wraps a real estimator and reports every draw divergent."""

    def __init__(self, inner):
        self.inner = inner

    def fit(self, X, y):
        self.inner.fit(X, y)
        self.posterior_ = self.inner.posterior_
        self.idata_ = self.inner.idata_
        self.num_divergences_ = int(self.posterior_.samples["sigma"].size)
        return self


def test_failed_fits_are_recorded_and_the_job_goes_on(tmp_path):
    text = TINY + textwrap.dedent(
        """
        [methods.bayes-last-layer]

        [methods.pretrained-gaussian]
        """
    )
    text = text.replace("seeds = [0, 1, 2]", "seeds = [0, 1]")
    text = text.replace("U = 1.0", "U = 1.0\nsigma_scale = 1e-30")  # σ ~ HalfNormal(1e-30)
    cfg = _config(tmp_path, text)

    def diverging(source, **options):
        return _Diverging(pcbtl.make_method("bayes-last-layer", source, **options))

    def broken(source, **options):
        class Broken:
            def fit(self, X, y):
                raise FloatingPointError("non-finite posterior draws of sigma; fit failed")

        return Broken()

    rows = batch.run_job(
        cfg,
        progress=False,
        builders={"bayes-last-layer": diverging, "pretrained-gaussian": broken},
    )
    assert len(rows) == 6
    by = {}
    for r in rows.values():
        by.setdefault(r["method"], []).append(r)
    for r in by["pc-last-layer"]:  # a vmapped group that fails falls back to one-by-one
        assert r["status"] == "failed" and "valid initial parameters" in r["reason"]
    for r in by["bayes-last-layer"]:
        # every draw of the default 4 chains of 20 draws diverges
        assert r["status"] == "failed" and r["reason"].startswith("divergences: 80 of 80")
        assert (cfg.out / r["netcdf"]).is_file()  # kept for diagnosis
    for r in by["pretrained-gaussian"]:
        assert r["status"] == "failed" and r["reason"].startswith("FloatingPointError: non-finite")
    table = (cfg.out / "results.csv").read_text()
    assert table.count(",failed,") == 6
    # failed fits count as done unless retried
    assert batch.run_job(cfg, progress=False, builders={}).keys() == rows.keys()


# --------------------------------------------------------------------------------------------
# devices, Dask, command line
# --------------------------------------------------------------------------------------------

_TWO_DEVICES = """
import sys
from pathlib import Path
from pcbtl.jobs import batch
import jax
assert jax.local_device_count() == 2, jax.devices()
cfg = batch.load_config(sys.argv[1], out=sys.argv[2], batch_size=64)
rows = batch.run_job(cfg, progress=False)
batched = [r for r in rows.values() if r["batched"]]
# 3 replicates on 2 devices: padded to 4, the copy's draws discarded
assert len(batched) == 3 and all(r["status"] == "ok" for r in batched), rows
print(sorted({r["device"] for r in batched}), len(batched) > 0)
"""


def test_vmapped_group_is_sharded_over_local_devices(tmp_path):
    (tmp_path / "job.toml").write_text(TINY)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "job.toml"), str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    devices, all_batched = res.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert eval(devices) == ["sharded over 2 devices"] and all_batched == "True", res.stdout


@pytest.mark.slow  # the optional Dask engine (42 s)
def test_dask_local_cluster_runs_a_job(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    text = TINY.replace("seeds = [0, 1, 2]", "seeds = [0, 1]") + textwrap.dedent(
        """
        [methods.bayes-last-layer]
        """
    )
    cfg = _config(tmp_path, text, engine="dask")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        rows = batch.run_job(cfg, progress=False, client=client)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values()), rows
    assert all((cfg.out / r["netcdf"]).is_file() for r in rows.values())
    assert len((cfg.out / "results.csv").read_text().splitlines()) == 5


def test_cli_batch_dry_run_and_run(tmp_path, capsys):
    from pcbtl.cli import main

    path = tmp_path / "job.toml"
    path.write_text(TINY.replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    assert main(["batch", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "2 fits in 1 groups" in capsys.readouterr().out
    assert main(["batch", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "2 ok, 0 failed of 2 fits" in capsys.readouterr().out
