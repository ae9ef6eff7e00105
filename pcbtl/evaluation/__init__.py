"""Metrics and scoring, in one place: :mod:`~pcbtl.evaluation.regression` (RMSE, MAE, interval
coverage and width, log predictive density and CRPS of a fitted regressor) and
:mod:`~pcbtl.evaluation.classification` (ROC-AUC, accuracy, balanced accuracy, F1, log loss,
Brier score, expected calibration error and the reliability diagram of class probabilities).
Every job (the simulation study, the batch runner, the band-gap and metallicity applications,
the demo) scores through these functions."""

from pcbtl.evaluation.classification import (
    calibration_bins,
    classification_scores,
    expected_calibration_error,
    reliability_diagram,
)
from pcbtl.evaluation.regression import METRICS, interval_scores, score

__all__ = [
    "METRICS",
    "calibration_bins",
    "classification_scores",
    "expected_calibration_error",
    "interval_scores",
    "reliability_diagram",
    "score",
]
