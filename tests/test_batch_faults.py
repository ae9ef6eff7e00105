"""Faults of a batch job: damaged files on resume, unsafe ids, write errors, a second config or
instance in one output folder, a corrupt cached source, config typos, the table and progress."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pcbtl.cli import main
from pcbtl.jobs import batch

SMALL = textwrap.dedent(
    """
    [job]
    seeds = [0, 1]
    batch_size = 4

    [data]
    kind = "synthetic"
    n_source = 120
    n_target = 24
    n_test = 30
    n_features = 3
    shift = 1.0

    [source]
    hidden = [4]
    max_epochs = 5

    [sampler]
    num_warmup = 20
    num_samples = 20

    [methods.source-only]
    """
)


@pytest.fixture(autouse=True)
def _fresh_source_cache(monkeypatch):
    """Each test trains or loads its own sources (the cache is per process)."""
    monkeypatch.setattr(batch, "_SOURCE_CACHE", {})


def _write(tmp_path: Path, text: str = SMALL) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _config(tmp_path: Path, text: str = SMALL, **overrides) -> batch.JobConfig:
    return batch.load_config(_write(tmp_path, text), out=str(tmp_path / "out"), **overrides)


def _run(cfg, **kw) -> tuple[dict, list[str]]:
    seen: list[str] = []
    rows = batch.run_job(cfg, progress=False, on_fit=lambda r: seen.append(r["fit_id"]), **kw)
    return rows, seen


# --------------------------------------------------------------------------------------------
# 1, 9: damaged files on resume
# --------------------------------------------------------------------------------------------


def test_truncated_netcdf_is_rerun_orphans_removed_table_rebuilt(tmp_path):
    cfg = _config(tmp_path)
    rows, _ = _run(cfg)
    assert all(r["status"] == "ok" for r in rows.values())
    victim = sorted(rows)[0]
    nc = cfg.out / "fits" / f"{victim}.nc"
    os.truncate(nc, nc.stat().st_size // 2)
    assert not batch._netcdf_readable(nc)
    (cfg.out / "fits" / "orphan.nc.tmp").write_bytes(b"x")
    (cfg.out / "fits" / ".x.json.abc.tmp").write_bytes(b"x")
    (cfg.out / "results.csv").write_text("fit_id\n")  # behind the files

    rows, seen = _run(cfg)
    assert seen == [victim]  # only the damaged fit is redone
    assert batch._netcdf_readable(nc)
    assert not list((cfg.out / "fits").glob("*.tmp")) + list((cfg.out / "fits").glob(".*.tmp"))
    assert len((cfg.out / "results.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.parametrize("content", ["{}", "[1, 2]", '{"fit_id": "other"}', "{not json"])
def test_fit_json_that_is_not_a_row_is_rerun(tmp_path, content):
    cfg = _config(tmp_path, SMALL.replace("seeds = [0, 1]", "seeds = [0]"))
    rows, _ = _run(cfg)
    (fid,) = rows
    (cfg.out / "fits" / f"{fid}.json").write_text(content)
    assert batch.read_results(cfg.out) == {}
    rows, seen = _run(cfg)
    assert seen == [fid] and rows[fid]["status"] == "ok"


# --------------------------------------------------------------------------------------------
# 2: ids that become file names
# --------------------------------------------------------------------------------------------


def test_fit_ids_are_safe_file_names_and_nothing_is_written_outside_out(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    cfg = batch.JobConfig(
        out=out,
        methods={"source-only": {}},
        seeds=(0,),
        data={"kind": "synthetic", "n_source": 50, "x/../../../../escaped": "../../y"},
        source={"hidden": [4], "max_epochs": 2},
    )
    (spec,) = batch.expand_fits(cfg)
    assert "/" not in spec.fit_id and "\\" not in spec.fit_id and ".." not in spec.fit_id
    assert not spec.fit_id.startswith(".")
    rows, _ = _run(cfg)  # the unknown data key fails the fit, inside out
    assert rows[spec.fit_id]["status"] == "failed"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(out) for p in written), written
    with pytest.raises(ValueError, match="outside the output folder"):
        batch._inside(out, out / "fits" / ".." / ".." / "x.json")
    # through a config file the key is refused before any work
    with pytest.raises(batch.ConfigError, match="escaped"):
        _config(tmp_path, SMALL.replace("shift = 1.0", '"x/../../../../escaped" = 1'))


# --------------------------------------------------------------------------------------------
# 3: write errors
# --------------------------------------------------------------------------------------------


def test_disk_full_stops_cleanly_records_the_fit_and_is_rerun(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path)
    out = tmp_path / "out"

    def full(idata, tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    monkeypatch.setattr(batch, "_to_netcdf", full)
    assert main(["batch", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ENOSPC" in err and "write error" in err, err
    assert len(err.strip().splitlines()) == 1, err
    fits = out / "fits"
    assert not list(fits.glob("*.tmp")) + list(fits.glob(".*.tmp"))
    assert not list(fits.glob("*.nc"))
    (row,) = batch.read_results(out).values()  # the first fit, recorded; the job stopped
    assert row["status"] == "failed" and row["reason"].startswith("write error: ENOSPC")
    assert not (out / ".lock").exists()

    monkeypatch.undo()
    monkeypatch.setattr(batch, "_SOURCE_CACHE", {})
    assert main(["batch", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "2 ok, 0 failed of 2 fits" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 6: another config, another instance
# --------------------------------------------------------------------------------------------


def test_another_config_in_out_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "out"
    first = _write(tmp_path)
    assert main(["batch", str(first), "--out", str(out), "--no-progress"]) == 0
    job_json = (out / "job.json").read_text()
    other = tmp_path / "other.toml"
    other.write_text(SMALL.replace("shift = 1.0", "shift = 2.0"))
    capsys.readouterr()
    assert main(["batch", str(other), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "another config" in err and "--force" in err and "Traceback" not in err
    assert (out / "job.json").read_text() == job_json  # untouched
    # the same config with other run options (retry, engine settings) is the same job
    assert main(["batch", str(first), "--out", str(out), "--no-progress", "--retry-failed"]) == 0
    capsys.readouterr()
    assert main(["batch", str(other), "--out", str(out), "--no-progress", "--force"]) == 0
    captured = capsys.readouterr()
    assert "--force" in captured.err and "lists this config's fits only" in captured.err
    table = (out / "results.csv").read_text().splitlines()
    assert len(table) == 1 + 2  # the new config's fits only
    assert len(list((out / "fits").glob("*.json"))) == 4  # the old ones kept


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path, capsys):
    path = _write(tmp_path, SMALL.replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": host}))
    assert main(["batch", str(path), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"in use by pid {os.getpid()} on host {host}" in err and "Traceback" not in err
    assert not (out / "fits").exists()

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": host}))
    assert main(["batch", str(path), "--out", str(out), "--no-progress"]) == 0
    assert f"stale lock of pid {pid}" in capsys.readouterr().err
    assert not (out / ".lock").exists()


# --------------------------------------------------------------------------------------------
# 8: a corrupt cached source
# --------------------------------------------------------------------------------------------


def test_corrupt_cached_source_is_retrained_and_replaced(tmp_path, capsys):
    from pcbtl.networks import SourceModel

    cfg = _config(tmp_path, SMALL.replace("seeds = [0, 1]", "seeds = [0]"))
    (spec,) = batch.expand_fits(cfg)
    npz = cfg.out / "sources" / f"{batch._source_key(spec)}.npz"
    npz.parent.mkdir(parents=True)
    npz.write_bytes(b"PK\x03\x04 not a zip")
    rows, _ = _run(cfg)
    assert rows[spec.fit_id]["status"] == "ok", rows
    SourceModel.load(npz)  # replaced by a good one
    assert "does not load" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 10, 11: config errors, before any work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("num_warmup = 20", "num_warmpu = 20", "'num_warmpu'; did you mean 'num_warmup'"),
        ("[job]", "[jobb]", "unknown table 'jobb'; did you mean 'job'"),
        ("seeds = [0, 1]", "seeds = [0, 0]", "seeds repeats [0]"),
        ("n_target = 24", "n_targte = 24", "'n_targte'; did you mean 'n_target'"),
        ("batch_size = 4", "bacth_size = 4", "did you mean 'batch_size'"),
        ("max_epochs = 5", "max_epoch = 5", "did you mean 'max_epochs'"),
        ("[methods.source-only]", "[methods.pc-last-layer]\nUU = 1.0", "did you mean 'U'"),
        ("[methods.source-only]", "[methods.pc-last-layr]", "unknown method 'pc-last-layr'"),
        ("[methods.source-only]", "[methods.source-only]\nseed = 3", "seeds come from"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_config_errors_are_one_line_exit_2_before_any_work(
    tmp_path, capsys, old, new, message, dry_run
):
    assert old in SMALL
    path = _write(tmp_path, SMALL.replace(old, new))
    out = tmp_path / "out"
    argv = ["batch", str(path), "--out", str(out), "--no-progress"]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_unknown_method_names_the_valid_ones(tmp_path, capsys):
    path = _write(tmp_path, SMALL.replace("source-only", "no-such-method"))
    assert main(["batch", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'no-such-method'" in err and "pc-last-layer" in err and "source-only" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# 12, 13: the table, file modes, progress, dry run
# --------------------------------------------------------------------------------------------

GRID = SMALL.replace("shift = 1.0", "shift = [0.5, 1.0]").replace(
    "[methods.source-only]", "[methods.pc-last-layer]\nU = 1.0\nnum_chains = 1"
)


def test_results_table_columns_seconds_frame_and_file_modes(tmp_path):
    old = os.umask(0o022)
    try:
        cfg = _config(tmp_path, GRID.replace("seeds = [0, 1]", "seeds = [0]"))
        rows = batch.run_job(cfg, progress=False)
    finally:
        os.umask(old)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values()), rows
    header = (cfg.out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"data.shift", "data.n_target", "option.U", "option.num_chains"} <= set(header)
    assert "data" not in header and "options" not in header and "group_seconds" in header
    for r in rows.values():
        if r["batched"]:
            assert r["fit_seconds"] == pytest.approx(r["group_seconds"] / 2)
    frame = batch.read_results_frame(cfg.out)
    assert sorted(frame["data.shift"]) == [0.5, 1.0] and list(frame["option.U"]) == [1.0, 1.0]
    assert isinstance(batch.read_results(cfg.out), dict)
    for p in [cfg.out / "results.csv", cfg.out / "job.json", *(cfg.out / "fits").iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_dry_run_lists_every_setting_of_each_group_and_progress_counts_groups(tmp_path, capsys):
    path = _write(tmp_path, GRID)
    assert main(["batch", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 fits in 1 groups")
    assert "shift=[0.5,1.0]" in lines[1] and "seeds=[0,1]" in lines[1]
    assert '"num_warmup":20' in lines[1] and '"U":1.0' in lines[1]
    cfg = _config(tmp_path, SMALL.replace("batch_size = 4", "batch_size = 1"))
    batch.run_job(cfg, progress=True)
    err = capsys.readouterr().err
    assert "2/2 [" in err and "group" in err and "2/2 fits" in err, err


# ---- row 19: degenerate estimator settings are refused at fit, naming the argument ----------


@pytest.mark.parametrize("method", ["target-only", "latent-bnn", "difference-bnn"])
def test_a_network_of_width_zero_is_refused_by_name(task, source, method):
    # hidden=(0,) made a network with no units: ZeroDivisionError deep in the initialisation
    import pcbtl

    est = pcbtl.make_method(method, source, hidden=(0,), num_warmup=5, num_samples=5)
    with pytest.raises(ValueError, match=r"hidden\[0\] must be a positive integer, got 0"):
        est.fit(task.X_target, task.y_target)
    assert not hasattr(est, "posterior_")


def test_a_forest_that_reproduces_its_labels_warns_and_keeps_a_positive_width(task, source):
    # constant labels: out-of-bag error 0 and infinitesimal-jackknife variance 0 gave intervals
    # of width exactly 0 (row 21); now the noise sd is floored at 1e-3 label sds, with a warning
    import pcbtl

    est = pcbtl.make_method("latent-rf", source, n_estimators=20)
    with pytest.warns(UserWarning, match="out-of-bag error is 0"):
        est.fit(task.X_target, np.full(len(task.y_target), 1.5))
    lo, hi = est.predict_interval(task.X_test)
    assert np.all(hi - lo > 0)


@pytest.mark.parametrize("classifier", ["gbt", object()])
def test_the_hurdle_checks_its_classifier_at_fit(task, source, classifier):
    # a string or an object without fit/predict_proba failed deep inside scikit-learn (row 20)
    import pcbtl
    from pcbtl.estimators.hurdle import HurdleRegressor

    reg = pcbtl.PCTransferRegressor(source, num_warmup=10, num_samples=10, num_chains=1)
    y = np.clip(task.y_target, 0, None)
    y[:10] = 0
    with pytest.raises(ValueError, match="classifier must be None .* or a scikit-learn classifier"):
        HurdleRegressor(reg, classifier=classifier).fit(task.X_target, y)


def test_a_multitask_forest_refit_that_fails_changes_nothing(task, source, monkeypatch):
    # row 20: the row counts were set before the forest was grown, so a refit that failed there
    # left n_target_rows_ of the new data beside the old forest
    import pcbtl
    from pcbtl.estimators import architectures as pm

    src = {"source_X": task.X_source[:200], "source_y": task.y_source[:200]}
    est = pcbtl.make_method("multitask-rf", source, n_estimators=20, **src)
    est.fit(task.X_target, task.y_target)
    before = {k: v for k, v in vars(est).items() if k.endswith("_")}

    def broken(*args, **kwargs):
        raise MemoryError("forest could not be grown")

    monkeypatch.setattr(pm, "_fit_forest", broken)
    with pytest.raises(MemoryError):
        est.fit(task.X_target[:30], task.y_target[:30])
    after = {k: v for k, v in vars(est).items() if k.endswith("_")}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# --------------------------------------------------------------------------------------------
# 4: a real SIGKILL of a running job (a subprocess), then resume
# --------------------------------------------------------------------------------------------

KILLED = textwrap.dedent(
    """
    [job]
    seeds = [0, 1, 2, 3]
    max_divergence_fraction = 1.0
    batch_size = 1

    [data]
    kind = "synthetic"
    n_source = 120
    n_target = 24
    n_test = 30
    n_features = 3
    shift = 1.0

    [source]
    hidden = [4]
    max_epochs = 5

    [sampler]
    num_warmup = 30
    num_samples = 30
    num_chains = 1

    [methods.pc-last-layer]
    """
)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled), or fail after ``timeout`` s."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before it could be killed (rc {proc.returncode})")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("the job wrote no fit in time")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")
@pytest.mark.slow  # three processes that each start JAX and compile (110 s); opt-in
def test_sigkill_of_a_running_job_loses_nothing_and_resume_finishes_it(tmp_path):
    path = _write(tmp_path, KILLED)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pcbtl.cli", "batch", str(path), "--out", str(out)]
    cmd.append("--no-progress")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fits = out / "fits"

    def n_done() -> int:
        return len(list(fits.glob("*.json"))) if fits.is_dir() else 0

    # first kill: right after the first fit's files land (the process is mid-job, holding the
    # lock, with the next fit running); second kill: at a random later moment of the resumed job
    log = tmp_path / "job.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _kill_when(proc, lambda: n_done() >= 1)
    first = {p.stem: p.stat().st_mtime_ns for p in fits.glob("*.nc")}
    assert first, "a finished fit's netCDF must be on disk when its row is"
    delay = random.Random(os.getpid()).uniform(0.0, 2.0)
    t_start = time.monotonic()
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _kill_when(proc, lambda: n_done() > len(first) and time.monotonic() - t_start > delay)

    # what a SIGKILL leaves: a stale lock, maybe orphan temporary files, a table maybe behind
    assert (out / ".lock").exists()
    cfg = batch.load_config(path, out=str(out))
    rows, rerun = _run(cfg)
    ids = {f.fit_id for f in batch.expand_fits(cfg)}
    assert set(rows) == ids
    bad = {k: (r["status"], r["reason"]) for k, r in rows.items() if r["status"] != "ok"}
    assert not bad
    assert not set(rerun) & set(first)  # nothing finished before a kill is redone
    for fid, stamp in first.items():
        assert (fits / f"{fid}.nc").stat().st_mtime_ns == stamp
    assert all(batch._netcdf_readable(fits / f"{fid}.nc") for fid in ids)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no orphan left
    table = (out / "results.csv").read_text().splitlines()
    assert len(table) == 1 + len(ids)  # the table is not behind the finished fits
