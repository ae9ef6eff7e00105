"""Estimators: scikit-learn regressors and classifiers over the models and samplers.

:mod:`~pcbtl.estimators.base` holds the shared core (:class:`RegressorBase`,
:class:`PosteriorRegressor`: parameter checks in ``fit``, the plan → run → complete fit used by
single and batched fits, the posterior-predictive mixture, pickling); on it stand the PC
estimators (:mod:`~pcbtl.estimators.pc`, :mod:`~pcbtl.estimators.classifier`), the baselines
(:mod:`~pcbtl.estimators.baselines`), Hutchinson et al.'s three architectures
(:mod:`~pcbtl.estimators.architectures`), the hurdle (:mod:`~pcbtl.estimators.hurdle`) and the
registry of named methods (:mod:`~pcbtl.estimators.registry`). Fitted estimators save and load
without pickle (:mod:`~pcbtl.estimators.persistence`).
"""

from pcbtl.estimators.architectures import (
    DifferenceRegressor,
    LatentVariableRegressor,
    MultiTaskRegressor,
    _SourcePredictor,
)
from pcbtl.estimators.base import PosteriorRegressor, RegressorBase, _PortableParametrization
from pcbtl.estimators.baselines import (
    BayesianLastLayerRegressor,
    BayesianNetworkRegressor,
    FineTuneRegressor,
    GaussianPredictive,
    SourceOnlyRegressor,
    _Forest,
)
from pcbtl.estimators.classifier import PCTransferClassifier
from pcbtl.estimators.hurdle import HurdleRegressor, _FlooredCalibratedClassifierCV
from pcbtl.estimators.pc import PCTransferRegressor
from pcbtl.estimators.persistence import load_estimator, register, save_estimator
from pcbtl.estimators.registry import METHODS, fit_replicates, make_method, methods

# the classes a saved estimator may hold (persistence reads no class it was not told of)
register(
    PCTransferRegressor,
    BayesianNetworkRegressor,
    SourceOnlyRegressor,
    FineTuneRegressor,
    BayesianLastLayerRegressor,
    MultiTaskRegressor,
    DifferenceRegressor,
    LatentVariableRegressor,
    HurdleRegressor,
    PCTransferClassifier,
    _PortableParametrization,
    _Forest,
    _SourcePredictor,
    _FlooredCalibratedClassifierCV,
)

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
    "load_estimator",
    "make_method",
    "methods",
    "save_estimator",
]
