"""The simulation study: scoring rules, seeds, the quick runner and its outputs, the CLI."""

from __future__ import annotations

import copy
import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import norm

from pcbtl.cli import main
from pcbtl.estimators.registry import methods
from pcbtl.evaluation import METRICS
from pcbtl.jobs.study import (
    QUICK,
    StudyConfig,
    grid_markdown,
    headline_markdown,
    health_markdown,
    paired_differences,
    read_csv,
    replicate_seed,
    run_study,
    summary_markdown,
    write_csv,
)
from pcbtl.predictive import mixture_crps


def test_crps_matches_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    mu, sd = rng.normal(size=50), rng.uniform(0.5, 2.0, 50)
    # one Gaussian: CRPS = σ (z(2Φ(z) − 1) + 2φ(z) − 1/√π), z = (y − μ)/σ (Gneiting & Raftery 2007)
    z = (y - mu) / sd
    exact = sd * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))
    # computed in float32 relative to y: agreement to float32 precision (the study reports
    # CRPS to 3 decimals)
    np.testing.assert_allclose(mixture_crps(mu[None], sd[None], y), exact, rtol=1e-5)
    # a 3-component mixture against E|X − y| − E|X − X'|/2 from 400,000 draws; the Monte Carlo
    # standard error is below 0.005 here, tolerance 0.02
    means, sds = rng.normal(size=(3, 5)), rng.uniform(0.3, 1.0, (3, 5))
    yy = rng.normal(size=5)
    comp = rng.integers(0, 3, (400_000, 5))
    cols = np.arange(5)
    x1 = means[comp, cols] + sds[comp, cols] * rng.standard_normal((400_000, 5))
    comp2 = rng.integers(0, 3, (400_000, 5))
    x2 = means[comp2, cols] + sds[comp2, cols] * rng.standard_normal((400_000, 5))
    mc = np.mean(np.abs(x1 - yy), 0) - 0.5 * np.mean(np.abs(x1 - x2), 0)
    np.testing.assert_allclose(mixture_crps(means, sds, yy), mc, atol=0.02)


def test_replicate_seeds_are_stable_and_distinct():
    a = replicate_seed(0, 0.5, 50, 0.0, 3)
    assert a == replicate_seed(0, 0.5, 50, 0.0, 3)
    others = {
        replicate_seed(0, 0.5, 50, 0.0, 4),
        replicate_seed(0, 1.0, 50, 0.0, 3),
        replicate_seed(0, "unrelated", 50, 0.0, 3),
        replicate_seed(0, 0.5, 100, 0.0, 3),
        replicate_seed(0, 0.5, 50, 1.0, 3),
        replicate_seed(1, 0.5, 50, 0.0, 3),
    }
    assert a not in others and len(others) == 6


def test_grid_table_marks_the_best_rmse_per_column():
    def row(method, delta, rmse, cov):
        return dict(covariate_shift=0.0, delta=delta, n_target=50, method=method, rmse=rmse,
                    **{m: cov if m == "coverage95" else 0.0 for m in METRICS if m != "rmse"},
                    fit_seconds=1.0)  # fmt: skip

    rows = [row("pc-scale", "0", 0.20 + 0.01 * r, 0.95) for r in range(2)]
    rows += [row("target-only", "0", 0.30, 0.9), row("target-only", "unrelated", 0.40, 0.93)]
    text = grid_markdown(rows)
    assert "**n_T = 50**" in text
    assert "| method | δ = 0 | δ = unrelated |" in text
    # means over replicates; the column minimum in bold; a method missing from a column: "—"
    assert "| pc-scale | **0.205** (0.95) | — |" in text
    assert "| target-only | 0.300 (0.90) | **0.400** (0.93) |" in text


def test_health_table_counts_disagreeing_fits_and_names_the_worst_setting():
    def row(method, delta, r, pred, par=float("nan"), div=0, stuck=0.0, ess=200.0):
        return dict(covariate_shift=0.0, delta=delta, n_target=50, replicate=r, method=method,
                    divergences=div, prediction_max_rhat=pred, max_rhat=par,
                    stuck_chains=stuck, min_bulk_ess=ess)  # fmt: skip

    rows = [row("pc-scale", "0", r, 1.01, par=1.02) for r in range(4)]
    rows += [row("pc-scale", "unrelated", 0, 1.50, par=1.30, ess=7.0)]
    rows += [row("pc-scale", "unrelated", 1, 1.12, par=1.05, div=3, stuck=1.0)]
    rows += [row("pc-scale", "unrelated", r, 1.02, par=1.01) for r in (2, 3)]
    rows += [row("target-only", d, r, 1.03) for d in ("0", "unrelated") for r in range(4)]
    rows += [row("forest", "0", r, float("nan"), ess=float("nan")) for r in range(4)]
    text = health_markdown(rows)
    # 2 of 8 pc-scale fits disagree on a prediction (1.50, 1.12 > 1.1), 1 on a parameter
    # (1.30), 1 diverged, 1 had a stuck chain; both in the unrelated setting (2 of its 4 fits)
    assert "| pc-scale | 1/8 | 2/8 | 1/8 | 1/8 | 200 | δ = unrelated, n_T = 50: 2/4 |" in text
    # networks: no parameter R-hat (—), nothing flagged (—); forests: no line at all
    assert "| target-only | 0/8 | 0/8 | — | 0/8 | 200 | — |" in text
    assert "| forest |" not in text
    assert health_markdown(rows[-4:]) == ""
    # the summary carries the section where the rows have sampler figures, and only there
    bare = _rows({"pc-scale": [0.3, 0.31]})
    health = {"prediction_max_rhat": 1.2, "max_rhat": 1.0, "stuck_chains": 0, "min_bulk_ess": 9}
    assert "## Sampler health" not in summary_markdown(bare, env=_ENV)
    text = summary_markdown([{**r, **health} for r in bare], env=_ENV)
    assert "## Sampler health" in text and "| pc-scale | 0/2 | 2/2 | 0/2 | 0/2 | 9 |" in text


def _rows(rmse_by_method, delta="1", n_target=50):
    """Result rows of one setting: ``{method: [RMSE of replicate 0, 1, ...]}`` (None: no row)."""
    out = []
    for method, values in rmse_by_method.items():
        for r, v in enumerate(values):
            if v is None:
                continue
            other = {m: 0.5 for m in METRICS if m != "rmse"}
            out.append(dict(covariate_shift=0.0, delta=delta, n_target=n_target, replicate=r,
                            seed=r, method=method, rmse=v, **other, fit_seconds=1.0,
                            batched=False, divergences=0, error=""))  # fmt: skip
    return out


#: ten replicates sharing a large replicate effect (an easy or a hard draw of the data: RMSE
#: sd 0.05 across replicates, the same for every method), and ±1 signs for paired noise
N_REP = 10
SHARED = 0.3 + 0.05 * np.linspace(-1.5, 1.5, N_REP)
SIGNS = np.array([1.0, -1.0] * (N_REP // 2))


def _unpaired_tie(a, b):
    """The rule this replaces: mean(a) − mean(b) within √(se_a² + se_b²)."""
    se = [np.std(v, ddof=1) / math.sqrt(len(v)) for v in (a, b)]
    return np.mean(a) - np.mean(b) <= math.hypot(*se)


def test_paired_rule_separates_a_consistent_difference_that_the_unpaired_rule_calls_a_tie():
    best = SHARED
    # 0.01 worse in every replicate (paired noise 0.001), under a replicate effect of sd 0.05
    behind = SHARED + 0.01 + 0.001 * SIGNS
    # the construction: the unpaired rule would call this a tie (se of each mean ≈ 0.016)
    assert _unpaired_tie(behind, best)
    rows = _rows({"pc-scale": best, "difference-bnn": behind})
    comp = paired_differences(rows)[(0.0, "1", 50)]
    assert comp["pc-scale"].is_best and comp["pc-scale"].tied
    d = comp["difference-bnn"]
    assert d.best == "pc-scale" and d.n == d.n_method == d.n_best == N_REP
    assert d.mean == pytest.approx(0.01, abs=1e-12)
    # sd of the differences / √n: the replicate effect cancels
    assert d.se == pytest.approx(0.001 * math.sqrt(N_REP / (N_REP - 1)) / math.sqrt(N_REP))
    assert not d.tied
    table = headline_markdown(rows)
    assert "| pc-scale | 1.0 | 1/1 |" in table
    assert "| difference-bnn | 2.0 | 0/1 |" in table
    assert "paired standard error" in table and "all 10 replicate(s)" in table


def test_paired_rule_calls_a_genuinely_noisy_difference_a_tie():
    best = SHARED
    # 0.005 worse on average, but ±0.05 from replicate to replicate: paired se ≈ 0.017
    noisy = SHARED + 0.005 + 0.05 * SIGNS
    rows = _rows({"pc-scale": best, "target-only": noisy})
    d = paired_differences(rows)[(0.0, "1", 50)]["target-only"]
    assert d.mean == pytest.approx(0.005, abs=1e-12)
    assert d.se == pytest.approx(0.05 / math.sqrt(N_REP - 1))
    assert d.tied
    assert "| target-only | 2.0 | 1/1 |" in headline_markdown(rows)
    # the one-paired-se threshold itself: a difference of 1.2 paired se is not a tie
    beyond = SHARED + 1.2 * 0.05 / math.sqrt(N_REP - 1) + 0.05 * SIGNS
    comp = paired_differences(_rows({"pc-scale": best, "target-only": beyond}))
    assert not comp[(0.0, "1", 50)]["target-only"].tied


def test_paired_rule_pairs_only_shared_replicates_and_is_pure():
    best = list(SHARED)
    behind = list(SHARED + 0.01 + 0.001 * SIGNS)
    noisy = list(SHARED + 0.005 + 0.05 * SIGNS)
    best[9] = None  # the best method lacks replicate 9
    behind[3] = None  # difference-bnn lacks replicate 3
    noisy[0] = float("nan")  # a failed fit (NaN metrics, as the runner records it)
    rows = _rows({"pc-scale": best, "difference-bnn": behind, "target-only": noisy})
    before = copy.deepcopy(rows)
    comp = paired_differences(rows)[(0.0, "1", 50)]
    assert repr(rows) == repr(before)  # pure (repr: NaN == NaN)
    assert comp["pc-scale"].n == 9
    d = comp["difference-bnn"]
    assert (d.n, d.n_method, d.n_best) == (8, 9, 9)  # replicates 0-2, 4-8
    shared = [0, 1, 2, 4, 5, 6, 7, 8]
    diffs = np.array([behind[r] - best[r] for r in shared])
    assert d.mean == pytest.approx(diffs.mean())
    assert d.se == pytest.approx(diffs.std(ddof=1) / math.sqrt(8))
    assert (comp["target-only"].n, comp["target-only"].n_method) == (8, 9)  # 1-8
    text = summary_markdown(rows, env=_ENV)
    assert "2 of 2 comparisons with the best pair fewer than 9 replicates" in text
    assert "(n = 8)" in text
    assert [ln for ln in text.splitlines() if ln.startswith("| pc-scale | 0.")][0].count("best")


def test_single_replicate_cannot_call_a_tie():
    rows = _rows({"pc-scale": [0.30], "difference-bnn": [0.30001]})
    comp = paired_differences(rows)[(0.0, "1", 50)]
    assert comp["pc-scale"].tied  # the best is always "best or tied"
    d = comp["difference-bnn"]
    assert d.n == 1 and math.isnan(d.se) and not d.tied
    text = summary_markdown(rows, env=_ENV)
    assert "| difference-bnn | 2.0 | 0/1 |" in text
    assert "1 pair: no se, no tie called" in text
    assert "1 comparison(s) have fewer than 2 shared replicates" in text


def test_paired_rule_refuses_duplicate_replicates_and_other_metrics():
    rows = _rows({"pc-scale": [0.3, 0.31]})
    with pytest.raises(ValueError, match="twice"):
        paired_differences(rows + rows[:1])
    with pytest.raises(ValueError, match="metric"):
        paired_differences(rows, metric="coverage95")


_ENV = {"date": "2000-01-01", "pcbtl": "x", "jax": "x", "numpyro": "x",
        "scikit-learn": "x", "machine": "recorded machine"}  # fmt: skip


def test_summary_is_rewritten_from_a_finished_study(tmp_path):
    rows = _rows({"pc-scale": SHARED, "difference-bnn": SHARED + 0.01 + 0.001 * SIGNS})
    write_csv(rows, tmp_path / "results.csv")
    cfg = {"config": {"n_replicates": N_REP, "methods": ["pc-scale", "difference-bnn"]},
           **_ENV, "elapsed_seconds": 600.0}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["simulate", "--summary-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    # the recorded run, not this process: date, machine and run time from config.json
    assert "2000-01-01" in text and "recorded machine" in text and "10.0 min" in text
    assert "| difference-bnn | 2.0 | 0/1 |" in text and "+0.0100 ± 0.0003 |" in text


def test_config_validation():
    with pytest.raises(ValueError, match="methods"):
        StudyConfig(methods=("no-such-method",))
    with pytest.raises(ValueError, match="deltas"):
        StudyConfig(deltas=(-1.0,))
    with pytest.raises(ValueError, match="n_replicates"):
        StudyConfig(n_replicates=0)
    assert QUICK.n_replicates == 3 and "unrelated" in QUICK.deltas
    assert StudyConfig().n_replicates >= 20 and StudyConfig().n_source == 5000


def test_simulate_is_registered_in_the_cli(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.slow  # the quick study of every method (112 s); test_studies_run_in_parts_merge_into_one stays in the default run
def test_quick_study_writes_every_method_and_metric(tmp_path):
    # a smaller grid than `pcbtl simulate --quick` (which takes ~10 min on 2 cores): δ = 0 only,
    # 2 replicates, 40 target rows, short chains, small networks
    cfg = StudyConfig(
        deltas=(0.0,),
        n_targets=(40,),
        n_replicates=2,
        n_source=1000,
        n_test=500,
        num_warmup=100,
        num_samples=100,
        num_chains=2,
        n_estimators=50,
        source_hidden=(16, 16),
        source_max_epochs=100,
        learner_hidden=(8,),
        multitask_source_rows=300,
        pc_scale_reference=500,
    )
    rows = run_study(cfg, tmp_path, verbose=False)
    for name in ("results.csv", "summary.md", "rmse_vs_ntarget.png", "coverage.png"):
        assert (tmp_path / name).stat().st_size > 0
    back = read_csv(tmp_path / "results.csv")
    assert len(back) == len(rows) == 2 * len(methods())
    assert {r["method"] for r in back} == set(methods())
    with open(tmp_path / "results.csv") as fh:
        header = next(csv.reader(fh))
    assert set(METRICS) <= set(header)
    for r in back:
        assert r["error"] == "", (r["method"], r["error"])
        assert all(math.isfinite(r[m]) for m in METRICS), r
        assert 0.0 <= r["coverage95"] <= 1.0 and r["width95"] > 0 and r["crps"] > 0
    # batched wherever the posterior is sampled by single-chain NUTS
    nuts = {"target-only", "pretrained-gaussian", "bayes-last-layer", "pc-last-layer", "pc-scale"}
    nuts |= {"pc-tangent", "multitask-bnn", "difference-bnn", "latent-bnn"}
    assert all(r["batched"] == (r["method"] in nuts) for r in back)
    # calibration of the PC prior with a related source (δ = 0): the mean coverage of the 95%
    # interval over 2 × 500 test points lies in [0.85, 1.0] (binomial sd of one replicate's
    # coverage at 0.95 is 0.01; the band leaves room for the short chains)
    for name in ("pc-last-layer", "pc-scale", "pc-tangent"):
        cov = np.mean([r["coverage95"] for r in back if r["method"] == name])
        assert 0.85 <= cov <= 1.0, (name, cov)
    text = (tmp_path / "summary.md").read_text()
    assert "pc-last-layer" in text and "±" in text and "JAX" in text


#: two settings (δ = 0 and unrelated), two cheap methods: the runner's bookkeeping, not the fits
TWO_SETTINGS = StudyConfig(
    deltas=(0.0, "unrelated"),
    n_targets=(30,),
    n_replicates=2,
    n_source=600,
    n_test=200,
    methods=("source-only", "pc-last-layer"),
    num_warmup=80,
    num_samples=80,
    num_chains=2,
    source_hidden=(8,),
    source_max_epochs=40,
)


@pytest.mark.slow  # (45 s) the same runner's resume: test_classification_study.py
def test_killed_study_resumes_where_it_stopped(tmp_path, capsys):
    cfg = TWO_SETTINGS
    full = run_study(cfg, tmp_path, verbose=False)
    assert len(full) == 2 * 2 * 2
    # a run killed during the second setting: its first row made it to disk, the rest did not
    first = [r for r in full if r["delta"] == "0"]
    partial = first + [r for r in full if r["delta"] == "unrelated"][:1]
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(full[0]))
        w.writeheader()
        w.writerows(partial)
    again = run_study(cfg, tmp_path, verbose=True)
    assert "1 setting(s) already complete" in capsys.readouterr().out
    back = read_csv(tmp_path / "results.csv")
    assert len(again) == len(back) == len(full)
    # the complete setting is kept as it was; the incomplete one is re-run in full, and a
    # re-run of a seeded replicate gives the same numbers
    for old, new in zip(first, [r for r in back if r["delta"] == "0"], strict=True):
        assert old["rmse"] == pytest.approx(new["rmse"], rel=1e-12)
        assert old["fit_seconds"] == pytest.approx(new["fit_seconds"], rel=1e-12)
    redo = {(r["replicate"], r["method"]): r for r in back if r["delta"] == "unrelated"}
    assert len(redo) == 4
    for r in full:
        if r["delta"] == "unrelated":
            assert redo[(r["replicate"], r["method"])]["rmse"] == pytest.approx(r["rmse"], rel=0.05)
    # a folder holding another configuration is refused, not mixed
    with pytest.raises(ValueError, match="different configuration"):
        run_study(replace(cfg, n_replicates=3), tmp_path, verbose=False)


@pytest.mark.slow  # two studies and a merge (45 s); resume: test_killed_study_resumes_where_it_stopped
def test_studies_run_in_parts_merge_into_one(tmp_path):
    base = replace(
        TWO_SETTINGS,
        n_targets=(20,),
        n_source=500,
        num_warmup=60,
        num_samples=60,
        num_chains=2,
        source_max_epochs=30,
    )
    a = run_study(base, tmp_path / "a", verbose=False)
    b = run_study(replace(base, n_targets=(30,)), tmp_path / "b", verbose=False)
    rows = main(["simulate", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "m")])  # fmt: skip
    assert rows == 0
    merged = read_csv(tmp_path / "m" / "results.csv")
    assert len(merged) == len(a) + len(b)
    assert {r["n_target"] for r in merged} == {20, 30}
    text = (tmp_path / "m" / "summary.md").read_text()
    assert "Over 4 settings" in text and "n_T = 30" in text and "n_T = 20" in text
    # the over-all-settings table lists every method; without target-only in the study the
    # negative-transfer column reads "—"
    assert "| source-only |" in text and "| pc-last-layer |" in text and " — |" in text
    # parts run with other settings are refused
    run_study(replace(base, n_targets=(40,), num_samples=61), tmp_path / "c", verbose=False)
    with pytest.raises(ValueError, match="other settings"):
        main(["simulate", "--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out",
              str(tmp_path / "n")])  # fmt: skip
