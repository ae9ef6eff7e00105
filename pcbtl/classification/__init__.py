r"""Classification targets: a source classifier and the PC transfer classifier.

:func:`train_source_classifier` trains the source network (binary or ``K``-class) and returns a
:class:`SourceClassifier` that predicts and saves/loads; :class:`pcbtl.PCTransferClassifier`
(in :mod:`pcbtl.estimators.classifier`) fits the
target with the PC prior on ``d = sqrt(2 E_{x~Q} KL(p_T ‖ p_S))`` (:mod:`pcbtl.classification.priors`), by either
exact construction: the head prior on the Fisher sphere (:mod:`pcbtl.classification.priors`)
or the scale prior through the Monte Carlo ``r(τ)``. The NumPyro models are in
:mod:`pcbtl.classification.models`.

Layers (imports point down): ``source`` (network, training, artefact) → ``priors`` (KL,
constructions) → ``models`` (NumPyro); the scikit-learn estimator stands above them, with the
other estimators, in :mod:`pcbtl.estimators`.
"""

from pcbtl.classification.models import head_pc_classifier_model, scale_pc_classifier_model
from pcbtl.classification.priors import (
    BoundedDistanceWarning,
    ClassifierScalePC,
    classifier_kl,
    sample_head_prior,
)
from pcbtl.classification.source import SourceClassifier, train_source_classifier

__all__ = [
    "BoundedDistanceWarning",
    "ClassifierScalePC",
    "SourceClassifier",
    "classifier_kl",
    "head_pc_classifier_model",
    "sample_head_prior",
    "scale_pc_classifier_model",
    "train_source_classifier",
]
