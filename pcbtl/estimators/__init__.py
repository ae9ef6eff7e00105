"""Estimators: scikit-learn regressors and classifiers over the models and samplers.

:mod:`~pcbtl.estimators.base` holds the shared core (:class:`RegressorBase`,
:class:`PosteriorRegressor`: parameter checks in ``fit``, the plan → run → complete fit used by
single and batched fits, the posterior-predictive mixture, pickling); on it stand the PC
estimators (:mod:`~pcbtl.estimators.pc`, :mod:`~pcbtl.estimators.classifier`), the baselines
(:mod:`~pcbtl.estimators.baselines`), Hutchinson et al.'s three architectures
(:mod:`~pcbtl.estimators.architectures`), the hurdle (:mod:`~pcbtl.estimators.hurdle`) and the
registry of named methods (:mod:`~pcbtl.estimators.registry`).
"""

from pcbtl.estimators.architectures import (
    DifferenceRegressor,
    LatentVariableRegressor,
    MultiTaskRegressor,
)
from pcbtl.estimators.base import PosteriorRegressor, RegressorBase
from pcbtl.estimators.baselines import (
    BayesianLastLayerRegressor,
    BayesianNetworkRegressor,
    FineTuneRegressor,
    GaussianPredictive,
    SourceOnlyRegressor,
)
from pcbtl.estimators.classifier import PCTransferClassifier
from pcbtl.estimators.hurdle import HurdleRegressor
from pcbtl.estimators.pc import PCTransferRegressor
from pcbtl.estimators.registry import METHODS, fit_replicates, make_method, methods

__all__ = [
    "METHODS",
    "BayesianLastLayerRegressor",
    "BayesianNetworkRegressor",
    "DifferenceRegressor",
    "FineTuneRegressor",
    "GaussianPredictive",
    "HurdleRegressor",
    "LatentVariableRegressor",
    "MultiTaskRegressor",
    "PCTransferClassifier",
    "PCTransferRegressor",
    "PosteriorRegressor",
    "RegressorBase",
    "SourceOnlyRegressor",
    "fit_replicates",
    "make_method",
    "methods",
]
