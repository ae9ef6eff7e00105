"""Tests of pcbtl.evaluation.classification: hand-computed cases and calibrated / miscalibrated
synthetic classifiers with known ECE."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from pcbtl.evaluation.classification import (  # noqa: E402
    SCORE_NAMES,
    calibration_bins,
    classification_scores,
    expected_calibration_error,
    reliability_diagram,
)


def test_scores_of_a_hand_computed_binary_case():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.6, 0.4, 0.9])
    s = classification_scores(y, p)
    assert tuple(s) == SCORE_NAMES
    # pairs (pos, neg): (0.4, 0.2) ok, (0.4, 0.6) wrong, (0.9, ·) ok twice -> 3/4
    assert s["roc_auc"] == pytest.approx(0.75)
    # predictions 0, 1, 0, 1: two right
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["balanced_accuracy"] == pytest.approx(0.5)
    # precision 1/2, recall 1/2 -> F1 1/2
    assert s["f1"] == pytest.approx(0.5)
    ll = -(math.log(0.8) + math.log(0.4) + math.log(0.4) + math.log(0.9)) / 4
    assert s["log_loss"] == pytest.approx(ll)
    assert s["brier"] == pytest.approx((0.04 + 0.36 + 0.36 + 0.01) / 4)
    # 15 bins: 0.2 -> bin 3, 0.4 -> bin 6, 0.6 -> bin 9, 0.9 -> bin 14 (one row each)
    assert s["ece"] == pytest.approx((0.2 + 0.6 + 0.6 + 0.1) / 4)


def test_two_column_proba_and_bool_labels_give_the_same_scores():
    y = np.array([False, True, True, False, True])
    p = np.array([0.3, 0.8, 0.55, 0.1, 0.35])
    a = classification_scores(y, p)
    b = classification_scores(y.astype(int), np.c_[1 - p, p])
    assert a == pytest.approx(b)


def test_balanced_accuracy_differs_from_accuracy_on_an_imbalanced_case():
    y = np.array([0, 0, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4])  # everything predicted 0
    s = classification_scores(y, p)
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["balanced_accuracy"] == pytest.approx(0.5)
    assert s["f1"] == 0.0
    assert s["roc_auc"] == pytest.approx(1.0)


def test_multiclass_scores_by_hand():
    y = np.array([0, 1, 2])
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4]])
    s = classification_scores(y, P)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # class 0: P 1/2 R 1
    assert s["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.6) + math.log(0.4)) / 3)
    brier = (0.09 + 0.04 + 0.01 + 0.01 + 0.16 + 0.09 + 0.25 + 0.01 + 0.36) / 3
    assert s["brier"] == pytest.approx(brier)
    # top-label: confidences 0.7 (right), 0.6 (right), 0.5 (wrong), one per bin
    assert s["ece"] == pytest.approx((0.3 + 0.4 + 0.5) / 3)
    # class 0 against the rest: (0.7 > 0.1, 0.5) -> 1; class 1: 0.6 > 0.2, 0.1 -> 1;
    # class 2: 0.4 > 0.1 but < 0.3? no: 0.4 > 0.3 -> 1
    assert s["roc_auc"] == pytest.approx(1.0)


def test_ece_example_and_bin_edges():
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.25)
    # right-closed bins: 1/15 is in bin 1 together with 0, 1/15 + tiny is in bin 2
    b = calibration_bins([0, 1, 1], [0.0, 1 / 15, 1 / 15 + 1e-9])
    assert b.counts[0] == 2 and b.counts[1] == 1 and b.counts.sum() == 3
    assert b.kind == "positive"
    assert np.isnan(b.mean_score[5])
    # perfect, certain predictions
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_ece_of_a_perfectly_calibrated_classifier_is_near_zero():
    # p ~ U(0, 1), y ~ Bernoulli(p): E[ō_b] = s̄_b in every bin, so the ECE is binning noise,
    # about Σ_b (n_b/n) sqrt(2/π) sqrt(s̄(1-s̄)/n_b) ≈ 0.003 for n = 200,000 and 15 bins;
    # the tolerance 0.01 is three times that (seeded, deterministic).
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)
    ece = expected_calibration_error(y, p)
    assert ece < 0.01
    assert classification_scores(y, p)["ece"] == ece


def test_ece_of_a_known_miscalibrated_classifier():
    # reported p ~ U(0, 1) but the true probability is p²: p - p² >= 0 everywhere, so no bin
    # mixes over- and under-confidence and ECE -> E[p - p²] = 1/2 - 1/3 = 1/6 for any binning.
    # Monte Carlo error ≈ 0.003 (n = 200,000); tolerance 0.01.
    rng = np.random.default_rng(1)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p**2).astype(int)
    assert expected_calibration_error(y, p) == pytest.approx(1 / 6, abs=0.01)
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(1 / 6, abs=0.01)
    # a constant 0.7 against a fair coin: ECE = |0.5 - 0.7| = 0.2 (± 0.01: 3.5 s.e. at n=20000)
    y2 = (rng.random(20_000) < 0.5).astype(int)
    assert expected_calibration_error(y2, np.full(y2.size, 0.7)) == pytest.approx(0.2, abs=0.01)


def test_top_label_and_positive_kinds_differ_on_binary():
    y = np.array([1, 0])
    p = np.array([0.9, 0.1])  # both right with confidence 0.9
    assert expected_calibration_error(y, p, kind="top_label") == pytest.approx(0.1)
    assert expected_calibration_error(y, p, kind="positive") == pytest.approx(0.1)
    y = np.array([1, 1])
    p = np.array([0.9, 0.1])
    # positive: bins 0.1 (ō 1) and 0.9 (ō 1) -> (0.9 + 0.1)/2; top label: conf 0.9, acc 1/2
    assert expected_calibration_error(y, p, kind="positive") == pytest.approx(0.5)
    assert expected_calibration_error(y, p, kind="top_label") == pytest.approx(0.4)


def test_single_class_gives_nan_auc_and_bad_input_raises():
    s = classification_scores([1, 1, 1], np.array([0.9, 0.8, 0.3]))
    assert math.isnan(s["roc_auc"])
    assert s["balanced_accuracy"] == pytest.approx(2 / 3) == s["accuracy"]
    with pytest.raises(ValueError, match="class indices"):
        classification_scores([0, 2], [0.1, 0.9])
    with pytest.raises(ValueError, match="sum to 1"):
        classification_scores([0, 1], np.array([[0.5, 0.6], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        classification_scores([0, 1], [0.1, 1.2])
    with pytest.raises(ValueError, match="one label per row"):
        classification_scores([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="kind"):
        expected_calibration_error([0, 1], [0.1, 0.2], kind="upper")
    with pytest.raises(ValueError, match="two classes"):
        expected_calibration_error([0, 1], np.full((2, 3), 1 / 3), kind="positive")
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0, 1], [0.1, 0.2], n_bins=0)


def test_reliability_diagram_draws_bins_and_counts(tmp_path):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(2)
    p = rng.random(2000)
    y = (rng.random(p.size) < p).astype(int)
    ax = reliability_diagram(y, p, title="synthetic")
    bins = calibration_bins(y, p)
    line = ax.get_lines()[1]
    np.testing.assert_allclose(line.get_xdata(), bins.mean_score[bins.counts > 0])
    np.testing.assert_allclose(line.get_ydata(), bins.mean_outcome[bins.counts > 0])
    counts_ax = [a for a in ax.figure.axes if a is not ax][0]
    texts = sorted(int(t.get_text()) for t in counts_ax.texts)
    assert texts == sorted(bins.counts[bins.counts > 0].tolist())
    assert "ECE" in ax.get_title()
    ax.figure.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
    plt.close(ax.figure)


def test_float32_probabilities_score_without_warnings():
    # a network's float32 softmax rows sum to 1 only to ~1e-7; scikit-learn's log_loss warns
    # on that unless the rows are renormalised (warnings are errors in this suite)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((500, 2)).astype(np.float32)
    P = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    P[:, 0] += np.float32(3e-7)
    y = (rng.random(500) < P[:, 1]).astype(int)
    s = classification_scores(y, P)
    assert np.isfinite(list(s.values())).all()


def test_calibrated_ece_reference_matches_the_binomial_floor():
    from pcbtl.evaluation.classification import calibrated_ece_reference

    # constant p = 0.5, n = 100: one bin, ECE = |ȳ - 0.5| with 100 ȳ ~ Binomial(100, 1/2):
    # E = E|B - 50| / 100 = 0.0796 / 2 ... exactly sum_k |k - 50| C(100, k) / 2^100 / 100
    k = np.arange(101)
    log_pmf = np.array([math.lgamma(101) - math.lgamma(j + 1) - math.lgamma(101 - j) for j in k])
    exact = float(np.sum(np.abs(k - 50) / 100 * np.exp(log_pmf - 100 * math.log(2))))
    mean, q95 = calibrated_ece_reference(np.full(100, 0.5), n_draws=4000, seed=1)
    # Monte Carlo s.e. ≈ 0.03/sqrt(4000) ≈ 5e-4; tolerance 0.003
    assert mean == pytest.approx(exact, abs=0.003)
    assert q95 > mean
    # certain predictions leave no noise
    assert calibrated_ece_reference(np.array([0.0, 1.0, 1.0])) == (0.0, 0.0)
