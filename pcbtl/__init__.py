"""pcbtl: deep Bayesian transfer learning with a PC prior on the KL distance.

The public surface: train a source network (:func:`train_source`), then fit the target with
:class:`PCTransferRegressor`, whose prior says how far (in KL distance) the target's predictive
model may move from the source's (Abba, Williams & Reich 2023). The NumPyro model functions
(:mod:`pcbtl.models`), the priors (:mod:`pcbtl.priors`) and KL estimators (:mod:`pcbtl.kl`)
are public for users who build their own samplers. Classification targets:
:func:`train_source_classifier` and :class:`PCTransferClassifier` (:mod:`pcbtl.classification`,
:mod:`pcbtl.estimators.classifier`).

The package is layered, imports pointing only down: maths (:mod:`~pcbtl.kl`, :mod:`~pcbtl.priors`,
:mod:`~pcbtl.models`, :mod:`~pcbtl.networks`, :mod:`~pcbtl.tangent`, :mod:`~pcbtl.predictive`,
:mod:`pcbtl.classification`) → :mod:`pcbtl.inference` (model → posterior) →
:mod:`pcbtl.estimators` (scikit-learn estimators, the registry) → :mod:`~pcbtl.evaluation`
(metrics) → :mod:`pcbtl.materials` (data, features, band gap) and :mod:`pcbtl.jobs` (demo,
simulation study, batch runner) → :mod:`~pcbtl.cli` (argument parsing).
"""

from pcbtl import classification, kl, models, priors
from pcbtl.classification import SourceClassifier, train_source_classifier
from pcbtl.estimators import (
    BayesianNetworkRegressor,
    HurdleRegressor,
    PCTransferClassifier,
    PCTransferRegressor,
    make_method,
    methods,
)
from pcbtl.inference import (
    Posterior,
    clear_caches,
    make_log_density,
    run_nuts,
    run_svi,
    to_inference_data,
)
from pcbtl.networks import SourceModel, train_source, transfer_parametrization
from pcbtl.priors import LastLayerPC, ScalePC, pc_rate
from pcbtl.simulation import make_synthetic_classification_task, make_synthetic_task

__version__ = "0.1.0"

__all__ = [
    "BayesianNetworkRegressor",
    "HurdleRegressor",
    "LastLayerPC",
    "PCTransferClassifier",
    "PCTransferRegressor",
    "Posterior",
    "ScalePC",
    "SourceClassifier",
    "SourceModel",
    "classification",
    "clear_caches",
    "kl",
    "make_log_density",
    "make_method",
    "methods",
    "make_synthetic_classification_task",
    "make_synthetic_task",
    "models",
    "pc_rate",
    "priors",
    "run_nuts",
    "run_svi",
    "to_inference_data",
    "train_source",
    "train_source_classifier",
    "transfer_parametrization",
]
