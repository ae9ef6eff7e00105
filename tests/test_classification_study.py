"""The classification simulation study: the synthetic task, the runner's outputs and resume, the
summary tables and the command line (:mod:`pcbtl.simulation`, :mod:`pcbtl.jobs.study`).

The end-to-end study is two tiny settings (δ = 0 and unrelated, 30 target rows, one replicate,
400 source rows) with two methods without NUTS (source-only and the calibrated forest): it
checks the runner's bookkeeping, not the methods (the methods have their own tests).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest

import pcbtl.jobs.study as study
from pcbtl.cli import main
from pcbtl.estimators.registry import methods
from pcbtl.evaluation import METRICS
from pcbtl.jobs.study import (
    CLASSIFICATION,
    CLASSIFICATION_METRICS,
    CLASSIFICATION_STUDY_METHODS,
    ORACLE_COLUMNS,
    QUICK_CLASSIFICATION,
    StudyConfig,
    paired_differences,
    read_csv,
    run_study,
    summary_markdown,
    write_csv,
)
from pcbtl.simulation import CLASSIFICATION_LOGIT_SCALE, make_synthetic_classification_task

SMALL = dict(n_source=50, n_target=40, n_test=2000)


def _logit(p: np.ndarray) -> np.ndarray:
    """The binary logit ``log p₁ − log p₀``."""
    return np.log(p[:, 1]) - np.log(p[:, 0])


@pytest.mark.parametrize("K", [2, 3])
def test_task_shapes_labels_and_probabilities(K):
    t = make_synthetic_classification_task(n_classes=K, delta=1.0, n_features=6, seed=3, **SMALL)
    assert t.X_source.shape == (50, 6) and t.y_source.shape == (50,)
    assert t.X_target.shape == (40, 6) and t.y_target.shape == (40,)
    assert t.X_test.shape == (2000, 6) and t.y_test.shape == (2000,)
    assert t.p_test.shape == t.p_source_test.shape == (2000, K) and t.n_classes == K
    np.testing.assert_allclose(t.p_test.sum(axis=1), 1.0, rtol=1e-12)
    for y in (t.y_source, t.y_target, t.y_test):
        assert y.dtype.kind == "i" and set(np.unique(y)) <= set(range(K))
    # every class at least twice in the target (the default min_class_count)
    assert np.bincount(t.y_target, minlength=K).min() >= 2
    # the test labels follow p_test: mean of p(y_i) over 2,000 rows vs the frequency of each
    # class (binomial sd ≤ 0.011; tolerance 0.05)
    for k in range(K):
        assert abs(np.mean(t.y_test == k) - t.p_test[:, k].mean()) < 0.05


def test_delta_zero_target_is_the_source_and_the_shift_has_rms_delta():
    base = make_synthetic_classification_task(n_classes=2, delta=0.0, seed=7, **SMALL)
    np.testing.assert_array_equal(base.p_test, base.p_source_test)
    # source logits of sd s = 3 (teachers rescaled on 20,000 probe inputs; over 2,000 test
    # rows measured 2.9-3.1, tolerance 10%)
    assert abs(_logit(base.p_source_test).std() / CLASSIFICATION_LOGIT_SCALE - 1) < 0.1
    one = make_synthetic_classification_task(n_classes=2, delta=1.0, seed=7, **SMALL)
    two = make_synthetic_classification_task(n_classes=2, delta=2.0, seed=7, **SMALL)
    np.testing.assert_array_equal(one.X_test, base.X_test)
    np.testing.assert_allclose(one.p_source_test, base.p_source_test)
    shift1 = _logit(one.p_test) - _logit(base.p_test)
    shift2 = _logit(two.p_test) - _logit(base.p_test)
    np.testing.assert_allclose(shift2, 2 * shift1, atol=1e-8)  # linear in δ
    # the shift has RMS δ: over 30 seeds the RMS of δ = 1 measured 0.97-1.03 on 2,000 rows;
    # tolerance 0.08
    assert abs(np.sqrt(np.mean(shift1**2)) - 1.0) < 0.08
    # three classes: δ = 0 is the source too, and the shift of every logit is linear in δ
    base3 = make_synthetic_classification_task(n_classes=3, delta=0.0, seed=7, **SMALL)
    np.testing.assert_array_equal(base3.p_test, base3.p_source_test)
    d1, d2 = (
        np.log(make_synthetic_classification_task(n_classes=3, delta=d, seed=7, **SMALL).p_test)
        - np.log(base3.p_test)
        for d in (1.0, 2.0)
    )
    centred = [d - d.mean(axis=1, keepdims=True) for d in (d1, d2)]
    np.testing.assert_allclose(centred[1], 2 * centred[0], atol=1e-8)
    assert np.sqrt(np.mean(centred[0] ** 2)) > 0.5  # it moved


def test_unrelated_target_is_independent_of_the_source():
    # correlation of the source's and the target's logit over the test rows, per seed; for
    # independent random teachers it scatters around 0 (measured: sd 0.28 over 30 seeds, so
    # the mean of 20 has se 0.06; tolerance 0.2), for δ = 1 it stayed above 0.94
    unrelated, shifted = [], []
    for seed in range(20):
        u = make_synthetic_classification_task(unrelated=True, seed=seed, **SMALL)
        s = make_synthetic_classification_task(delta=1.0, seed=seed, **SMALL)
        unrelated.append(np.corrcoef(_logit(u.p_test), _logit(u.p_source_test))[0, 1])
        shifted.append(np.corrcoef(_logit(s.p_test), _logit(s.p_source_test))[0, 1])
    assert abs(np.mean(unrelated)) < 0.2
    assert min(shifted) > 0.8
    # δ is ignored for an unrelated target
    a = make_synthetic_classification_task(unrelated=True, delta=0.0, seed=1, **SMALL)
    b = make_synthetic_classification_task(unrelated=True, delta=2.0, seed=1, **SMALL)
    np.testing.assert_array_equal(a.p_test, b.p_test)


def test_task_seeds_are_reproducible_and_arguments_checked():
    a = make_synthetic_classification_task(n_classes=3, seed=5, **SMALL)
    b = make_synthetic_classification_task(n_classes=3, seed=5, **SMALL)
    c = make_synthetic_classification_task(n_classes=3, seed=6, **SMALL)
    for x, y, z in zip(a, b, c, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
            assert not np.array_equal(x, z)
    # a covariate shift moves the target and test inputs only
    shifted = make_synthetic_classification_task(n_classes=3, seed=5, covariate_shift=3, **SMALL)
    np.testing.assert_array_equal(shifted.X_source, a.X_source)
    assert abs(shifted.X_test.mean() - 3 / np.sqrt(10)) < 0.05  # 20,000 draws: se 0.007
    with pytest.raises(ValueError, match="n_classes"):
        make_synthetic_classification_task(n_classes=4)
    with pytest.raises(ValueError, match="delta"):
        make_synthetic_classification_task(delta=-1.0)
    with pytest.raises(ValueError, match="min_class_count"):
        make_synthetic_classification_task(n_classes=3, n_target=5, min_class_count=2)


def test_config_defaults_and_validation():
    assert CLASSIFICATION.task == "classification" and CLASSIFICATION.n_classes == 2
    # the grid keeps the 14 methods it started with; methods registered since are not in it
    assert CLASSIFICATION.methods == CLASSIFICATION_STUDY_METHODS
    assert len(CLASSIFICATION.methods) == 14
    assert set(CLASSIFICATION.methods) < set(methods("classification"))
    assert StudyConfig(task="classification").methods == tuple(methods("classification"))
    assert set(CLASSIFICATION.n_targets) == {25, 50, 100, 250, 500}
    assert replace(CLASSIFICATION, n_classes=3).n_classes == 3
    assert StudyConfig().methods == tuple(methods()) and StudyConfig().n_classes is None
    assert set(QUICK_CLASSIFICATION.methods) < set(methods("classification"))
    with pytest.raises(ValueError, match="n_classes must be 2 or 3"):
        StudyConfig(task="classification", n_classes=4)
    with pytest.raises(ValueError, match="for task='classification' only"):
        StudyConfig(n_classes=2)
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['pc-tangent'\] for classification"):
        StudyConfig(task="classification", methods=("pc-tangent",))
    with pytest.raises(ValueError, match="task must be one of"):
        StudyConfig(task="ranking")


#: two tiny settings, two methods without NUTS
TINY = StudyConfig(
    task="classification",
    n_classes=3,
    deltas=(0.0, "unrelated"),
    n_targets=(30,),
    n_replicates=1,
    n_source=400,
    n_test=300,
    methods=("source-only", "forest"),
    n_estimators=20,
    source_hidden=(8,),
    source_max_epochs=20,
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("cstudy")
    return out, run_study(TINY, out, verbose=False)


def test_tiny_study_writes_every_metric_of_every_method(tiny_study):
    out, rows = tiny_study
    for name in ("results.csv", "summary.md", "config.json", "logloss_vs_ntarget.png", "ece.png"):
        assert (out / name).stat().st_size > 0
    back = read_csv(out / "results.csv")
    assert len(back) == len(rows) == 2 * 2
    with open(out / "results.csv") as fh:
        header = next(csv.reader(fh))
    assert set(CLASSIFICATION_METRICS) | set(ORACLE_COLUMNS) <= set(header)
    assert not set(METRICS) & set(header)
    for r in back:
        assert r["error"] == "", (r["method"], r["error"])
        assert all(math.isfinite(r[m]) for m in (*CLASSIFICATION_METRICS, *ORACLE_COLUMNS))
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["log_loss"] > 0
        # 3 classes: the multi-class Brier score lies in [0, 2]
        assert 0 <= r["brier"] <= 2
    # the true probabilities beat the source in the unrelated setting (measured log loss 0.48
    # against 1.2 in a run of similar settings)
    for r in back:
        if r["delta"] == "unrelated" and r["method"] == "source-only":
            assert r["oracle_log_loss"] < r["log_loss"]
    # the oracle columns are the replicate's: the same on every method's row
    for delta in ("0", "unrelated"):
        assert len({r["oracle_log_loss"] for r in back if r["delta"] == delta}) == 1
    text = (out / "summary.md").read_text()
    assert "classification, K = 3 classes" in text
    assert (
        "| method | log loss | log loss − best (paired) | Brier | accuracy | ECE | fit s |" in text
    )
    assert text.count("| *true probabilities* |") == 2
    assert "| source-only |" in text and "| forest |" in text
    assert "## log loss (ECE) by target size" in text
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["task"] == "classification" and recorded["n_classes"] == 3


def test_resume_keeps_finished_settings(tiny_study, tmp_path, monkeypatch, capsys):
    src, full = tiny_study
    # a study killed in its second setting: the first setting and one row of the second on disk
    first = [r for r in full if r["delta"] == "0"]
    write_csv(first + [r for r in full if r["delta"] == "unrelated"][:1], tmp_path / "results.csv")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    trained = []
    real = study._train_source

    def counting(cfg, task, seed):
        trained.append(seed)
        return real(cfg, task, seed)

    monkeypatch.setattr(study, "_train_source", counting)
    again = run_study(TINY, tmp_path, verbose=True)
    assert "1 setting(s) already complete" in capsys.readouterr().out
    # only the unfinished setting's replicate was trained again
    assert sorted(trained) == sorted({r["seed"] for r in full if r["delta"] == "unrelated"})
    back = read_csv(tmp_path / "results.csv")
    assert len(back) == len(again) == len(full)
    for old, new in zip(first, [r for r in back if r["delta"] == "0"], strict=True):
        assert old["fit_seconds"] == new["fit_seconds"] and old["log_loss"] == new["log_loss"]
    # a finished study run again trains nothing
    trained.clear()
    run_study(TINY, tmp_path, verbose=False)
    assert trained == []
    # another configuration in the folder is refused, not mixed
    with pytest.raises(ValueError, match="different configuration"):
        run_study(replace(TINY, n_classes=2), tmp_path, verbose=False)


def test_regression_folder_recorded_before_the_task_setting_still_resumes(tmp_path, monkeypatch):
    cfg = StudyConfig(deltas=(0.0,), n_targets=(20,), n_replicates=1, methods=("source-only",))
    row = dict(delta="0", n_target=20, covariate_shift=0.0, replicate=0, seed=1,
               method="source-only", **dict.fromkeys(METRICS, 0.5), fit_seconds=0.1,
               batched=False, divergences=0, error="")  # fmt: skip
    write_csv([row], tmp_path / "results.csv")
    old = {k: v for k, v in asdict(cfg).items() if k not in ("task", "n_classes")}
    (tmp_path / "config.json").write_text(json.dumps({"config": old}, default=str))

    def refuse(*args):
        raise AssertionError("a finished setting was run again")

    monkeypatch.setattr(study, "_train_source", refuse)
    rows = run_study(cfg, tmp_path, verbose=False)
    assert len(rows) == 1 and (tmp_path / "summary.md").exists()
    assert (tmp_path / "rmse_vs_ntarget.png").exists()


def _rows(log_loss_by_method):
    """Result rows of one classification setting: ``{method: [log loss of replicate 0, …]}``."""
    out = []
    for method, values in log_loss_by_method.items():
        for r, v in enumerate(values):
            out.append(dict(covariate_shift=0.0, delta="1", n_target=50, replicate=r, seed=r,
                            method=method, log_loss=v, brier=0.2, accuracy=0.8, ece=0.03,
                            oracle_log_loss=0.35 + 0.01 * r, oracle_brier=0.1,
                            oracle_accuracy=0.85, oracle_ece=0.01, fit_seconds=1.0,
                            batched=False, divergences=0, error=""))  # fmt: skip
    return out


def test_classification_summary_pairs_on_log_loss_and_shows_the_oracle():
    shared = np.array([0.40, 0.50, 0.45, 0.55])
    rows = _rows({"pc-scale": shared, "forest": shared + 0.02, "source-only": shared + 0.001})
    comp = paired_differences(rows)[(0.0, "1", 50)]
    assert comp["pc-scale"].is_best and comp["forest"].best == "pc-scale"
    assert comp["forest"].mean == pytest.approx(0.02) and not comp["forest"].tied
    assert paired_differences(rows, metric="ece")[(0.0, "1", 50)]["forest"].tied
    with pytest.raises(ValueError, match="metric"):
        paired_differences(rows, metric="accuracy")  # higher is better: not a paired metric
    env = {"date": "2000-01-01", "pcbtl": "x", "jax": "x", "numpyro": "x",
           "scikit-learn": "x", "machine": "m"}  # fmt: skip
    text = summary_markdown(rows, env=env)
    assert "| pc-scale | 1.0 | 1/1 | 0.030 (0.030) | — |" in text
    assert "| forest | 3.0 | 0/1 |" in text
    # the true probabilities: the mean over the replicates' oracle log loss (0.35 … 0.38)
    assert "| *true probabilities* | 0.365 ± 0.006 |  | 0.100 ± 0.000 |" in text
    # methods in the order of the classification registry (forest before the architectures)
    names = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ")]
    table = names[names.index("method", names.index("method") + 1) + 1 :]
    assert table[:3] == ["source-only", "pc-scale", "forest"]


def test_cli_argument_errors_are_clear(tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["--task", "classification", "--classes", "4"], "invalid choice: 4"),
        (["--classes", "3"], "--classes is for --task classification only"),
        (["--task", "ranking"], "invalid choice: 'ranking'"),
        (["--task", "classification", "--methods", "pc-tangent"], "for classification"),
        (["--task", "classification", "--deltas", "-1"], "deltas must be non-negative"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["simulate", *extra, "--out", out])
        assert exc.value.code == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()


def test_cli_picks_the_classification_grids(tmp_path, monkeypatch):
    seen = []

    def fake_run(cfg, out, verbose):
        seen.append(cfg)
        return []

    monkeypatch.setattr(study, "run_study", fake_run)
    out = str(tmp_path)
    assert main(["simulate", "--task", "classification", "--classes", "3", "--quick",
                 "--out", out]) == 0  # fmt: skip
    assert seen[-1] == replace(QUICK_CLASSIFICATION, n_classes=3)
    assert main(["simulate", "--task", "classification", "--replicates", "5", "--out", out]) == 0
    assert seen[-1] == replace(CLASSIFICATION, n_replicates=5)
    assert main(["simulate", "--quick", "--out", out]) == 0
    assert seen[-1].task == "regression" and seen[-1] == study.QUICK
