r"""The registry: every transfer-learning method by name, behind one estimator interface.

Every method is a scikit-learn regressor (:class:`pcbtl.estimators.base.RegressorBase`: ``clone``,
``Pipeline``, ``GridSearchCV`` and pickling work; parameters are checked in ``fit``) with
``fit(X, y)`` (returns ``self``), ``predict(X, return_std=True)`` (predictive mean and sd),
``predict_interval(X, level=0.95)`` (``(lower, upper)``) and ``score(X, y)`` (``R²``).
:func:`methods` lists them by name and :func:`make_method` builds one from a trained
:class:`pcbtl.SourceModel`:

==========================  ===================================================================
name                        model
==========================  ===================================================================
``source-only``             the source network as it is, ``N(g_S(x), σ_S²)``
``target-only``             Bayesian network on the target alone (NUTS), ``θ ~ N(0, s²/fan_in)``
``fine-tuning``             MAP from ``θ_S`` (Adam, early stopping); residual-based interval
``pretrained-gaussian``     every weight ``~ N(θ_S, (s/√fan_in)²)``, NUTS
``bayes-last-layer``        ``β ~ N(β_S, τ² I)``, ``τ ~ HalfNormal``, body frozen, NUTS
``pc-last-layer``           PC prior on the KL distance, last layer (sphere construction)
``pc-scale``                PC prior on the KL distance, scale construction over chosen layers
``pc-tangent``              the scale construction on the network linearised at ``θ_S``
``multitask-{bnn,rf}``      one model for source and target labels, the task as an input
``difference-{bnn,rf}``     target = source prediction + a learned correction
``latent-{bnn,rf}``         the source prediction as an extra input of the target model
==========================  ===================================================================

The last three are the architectures of Hutchinson et al. (2017), with two base learners:
``bnn`` — the Bayesian network of this package (:class:`pcbtl.BayesianNetworkRegressor`, NUTS),
and ``rf`` — scikit-learn's random forest with the infinitesimal-jackknife variance of the forest
mean (Wager, Hastie & Efron 2014), computed by ``forestci.random_forest_error`` (with its
empirical-Bayes calibration). How each propagates the source model's uncertainty is in its class
docstring.

Gaussian predictive methods (source-only, fine-tuning, the forests, and the network architectures
whose source is a point network) return ``N(μ(x), s(x)²)`` and the central interval
``μ ± z_{(1+level)/2} s``. Posterior-draw methods subclass :class:`pcbtl.estimators.base.PosteriorRegressor`
and give the exact quantiles of their Gaussian mixture.

Classification (:data:`CLASSIFICATION_METHODS`, chosen when the source is a
:class:`pcbtl.SourceClassifier`): the same names where the model is the same idea, the PC
classifiers, ``forest`` and ``boosting`` (calibrated random forest and boosted trees on the target
alone), and the three architectures with a third base learner, ``gbt`` (boosted trees); see
:mod:`pcbtl.estimators.classification_baselines`.

The PC estimators are in :mod:`pcbtl.estimators.pc`, the baselines in
:mod:`pcbtl.estimators.baselines`, the architectures in :mod:`pcbtl.estimators.architectures`.
:func:`fit_replicates` fits many estimators of one method on many data sets, as one vmapped
NUTS run where they allow it (:func:`supports_batching`), else one by one.

Example
-------
>>> import pcbtl
>>> pcbtl.methods()[:3]
['source-only', 'target-only', 'fine-tuning']
>>> model = pcbtl.make_method("pc-tangent", source).fit(X, y)  # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pcbtl.classification.source import SourceClassifier
from pcbtl.estimators.architectures import (
    DifferenceRegressor,
    LatentVariableRegressor,
    MultiTaskRegressor,
)
from pcbtl.estimators.baselines import (
    BASES,
    BayesianLastLayerRegressor,
    BayesianNetworkRegressor,
    FineTuneRegressor,
    SourceOnlyRegressor,
    _check_source,
)
from pcbtl.estimators.classification_baselines import BASES as CLASSIFICATION_BASES
from pcbtl.estimators.classification_baselines import (
    BayesianLastLayerClassifier,
    DifferenceClassifier,
    FineTuneClassifier,
    LatentVariableClassifier,
    MultiTaskClassifier,
    PretrainedGaussianClassifier,
    SourceOnlyClassifier,
    TargetOnlyClassifier,
)
from pcbtl.estimators.classifier import PCTransferClassifier
from pcbtl.estimators.pc import PCTransferRegressor
from pcbtl.inference import SamplerWarning, plan_key, run_plans
from pcbtl.networks import SourceModel
from pcbtl.priors import PriorDataConflictWarning


@dataclass(frozen=True)
class MethodInfo:
    """A registered method.

    Attributes
    ----------
    build
        ``build(source, **options)`` returns an unfitted estimator.
    description
        One line: the model.
    uses_source_data
        Whether it can use the labelled source rows (``source_X``/``source_y`` options).
    uses_sampler
        Whether it samples a posterior and takes the sampler settings (``num_warmup``,
        ``num_samples``, ``num_chains``, …); false for point fits and forests.
    task
        ``"regression"`` or ``"classification"``: the labels it fits.
    """

    build: Callable[..., Any]
    description: str
    uses_source_data: bool = False
    uses_sampler: bool = True
    task: str = "regression"


_NUTS_KEYS = ("num_warmup", "num_samples", "seed", "progress_bar")


def _pc(prior):
    def build(source, **options):
        if prior in ("scale", "tangent"):
            options.setdefault("transfer_layers", "all")
        options.setdefault("progress_bar", False)
        return PCTransferRegressor(_check_source(source), prior=prior, **options)

    return build


def _target_only(source, **options):
    options.setdefault("progress_bar", False)
    return BayesianNetworkRegressor(None, **options)


def _pretrained(source, **options):
    options.setdefault("progress_bar", False)
    options.setdefault("prior_scale", 1.0)
    return BayesianNetworkRegressor(_check_source(source), **options)


def _hutchinson(cls, base):
    def build(source, **options):
        return cls(source, base=base, **options)

    return build


METHODS: dict[str, MethodInfo] = {
    "source-only": MethodInfo(
        SourceOnlyRegressor, "the source network as it is, N(g_S(x), σ_S²)", uses_sampler=False
    ),
    "target-only": MethodInfo(
        _target_only,
        "Bayesian network on the target alone, θ ~ N(0, (prior_scale/√fan_in)²), NUTS",
    ),
    "fine-tuning": MethodInfo(
        FineTuneRegressor,
        "MAP from θ_S (Adam, early stopping), residual-based interval",
        uses_sampler=False,
    ),
    "pretrained-gaussian": MethodInfo(
        _pretrained, "every weight ~ N(θ_S, (prior_scale/√fan_in)²), NUTS"
    ),
    "bayes-last-layer": MethodInfo(
        BayesianLastLayerRegressor, "β ~ N(β_S, τ²I), τ ~ HalfNormal, body frozen, NUTS"
    ),
    "pc-last-layer": MethodInfo(_pc("last_layer"), "PC prior on the KL distance, last layer"),
    "pc-scale": MethodInfo(_pc("scale"), "PC prior on the KL distance, scale over all layers"),
    "pc-tangent": MethodInfo(
        _pc("tangent"),
        "PC prior on the KL distance, scale over all layers of the network linearised at θ_S",
    ),
}


for _arch, _cls in (
    ("multitask", MultiTaskRegressor),
    ("difference", DifferenceRegressor),
    ("latent", LatentVariableRegressor),
):
    for _base in BASES:
        METHODS[f"{_arch}-{_base}"] = MethodInfo(
            _hutchinson(_cls, _base),
            f"{_arch} architecture (Hutchinson et al. 2017), base learner {_base}",
            uses_source_data=(_arch == "multitask" or _base == "rf"),
            uses_sampler=(_base != "rf"),
        )


def _classifier(cls, **defaults):
    def build(source, **options):
        return cls(source, **{**defaults, **options})

    return build


def _pc_classifier(prior):
    def build(source, **options):
        options.setdefault("progress_bar", False)
        return PCTransferClassifier(source, prior=prior, **options)

    return build


_C = "classification"

#: the classification methods, by the same names as the regression ones where the model is the
#: same idea (:mod:`pcbtl.estimators.classification_baselines`); ``make_method`` picks this table
#: when the source is a :class:`pcbtl.SourceClassifier`
CLASSIFICATION_METHODS: dict[str, MethodInfo] = {
    "source-only": MethodInfo(
        SourceOnlyClassifier, "the source classifier as it is, p_S(y | x)", False, False, _C
    ),
    "target-only": MethodInfo(
        _classifier(TargetOnlyClassifier, base="bnn"),
        "Bayesian network on the target alone, θ ~ N(0, (prior_scale/√fan_in)²), NUTS",
        task=_C,
    ),
    "fine-tuning": MethodInfo(
        FineTuneClassifier, "AdamW from θ_S, early stopping on a validation split", False, False, _C
    ),
    "pretrained-gaussian": MethodInfo(
        PretrainedGaussianClassifier, "every weight ~ N(θ_S, (prior_scale/√fan_in)²), NUTS", task=_C
    ),
    "bayes-last-layer": MethodInfo(
        BayesianLastLayerClassifier,
        "softmax regression on the frozen source features, B ~ N(B_S, τ²s²), NUTS",
        task=_C,
    ),
    "pc-last-layer": MethodInfo(
        _pc_classifier("last_layer"),
        "PC prior on the KL distance, last layer (Fisher sphere)",
        task=_C,
    ),
    "pc-scale": MethodInfo(
        _pc_classifier("scale"), "PC prior on the KL distance, scale over all layers", task=_C
    ),
    "forest": MethodInfo(
        _classifier(TargetOnlyClassifier, base="rf"),
        "random forest on the target alone, Platt-calibrated",
        False,
        False,
        _C,
    ),
    "boosting": MethodInfo(
        _classifier(TargetOnlyClassifier, base="gbt"),
        "boosted trees (HistGradientBoosting) on the target alone, Platt-calibrated",
        False,
        False,
        _C,
    ),
}
_BASE_NOTE = {
    "bnn": ", NUTS",
    "rf": ", Platt-calibrated",
    "gbt": " (boosted trees), Platt-calibrated",
}
for _arch, _cls, _what in (
    (
        "multitask",
        MultiTaskClassifier,
        "one model of source and target labels, the task as an input",
    ),
    ("difference", DifferenceClassifier, "target logits = source logits + a learned correction"),
    ("latent", LatentVariableClassifier, "the source logits as an extra input of the target model"),
):
    for _base in CLASSIFICATION_BASES:
        CLASSIFICATION_METHODS[f"{_arch}-{_base}"] = MethodInfo(
            _classifier(_cls, base=_base),
            f"{_what} (Hutchinson et al. 2017), base learner {_base}" + _BASE_NOTE[_base],
            uses_source_data=(_arch == "multitask"),
            uses_sampler=(_base == "bnn"),
            task=_C,
        )

#: the registry of each task
REGISTRIES = {"regression": METHODS, "classification": CLASSIFICATION_METHODS}


def methods(task: str = "regression") -> list[str]:
    """Names of the registered methods for ``task`` (``"regression"`` or
    ``"classification"``), in presentation order; :func:`method_table` lists both with their
    task and description."""
    if task not in REGISTRIES:
        raise ValueError(f"task must be one of {list(REGISTRIES)}, got {task!r}")
    return list(REGISTRIES[task])


def method_table() -> list[tuple[str, str, str]]:
    """``(name, task, description)`` of every registered method, regression first."""
    return [
        (n, info.task, info.description) for reg in REGISTRIES.values() for n, info in reg.items()
    ]


def make_method(name: str, source: SourceModel | SourceClassifier, **options: Any):
    """Build the method ``name`` for the trained ``source``.

    The task follows the source: a :class:`pcbtl.SourceModel` builds a regressor (names from
    ``methods()``), a :class:`pcbtl.SourceClassifier` a classifier (names from
    ``methods("classification")``). ``options`` go to the estimator's constructor (e.g.
    ``num_warmup``, ``num_samples``, ``seed``; ``prior_scale`` for the Gaussian priors; ``U``,
    ``alpha``, ``transfer_layers`` for the PC priors; ``source_X``, ``source_y`` for methods
    that use labelled source rows). An unknown name raises ``ValueError`` listing the valid
    ones for that task.
    """
    task = "classification" if isinstance(source, SourceClassifier) else "regression"
    registry = REGISTRIES[task]
    if name not in registry:
        raise ValueError(f"name must be one of {list(registry)} for {task}, got {name!r}")
    if task == "regression":
        _check_source(source)
    return registry[name].build(source, **options)


def method_options(
    name: str,
    *,
    seed: int | None = None,
    sampler: dict[str, Any] | None = None,
    task: str = "regression",
    **options: Any,
) -> dict[str, Any]:
    """The keyword options :func:`make_method` takes for method ``name`` of ``task`` in a job.

    ``seed`` goes to every method that draws random numbers (all but ``source-only``), the
    ``sampler`` settings only to methods that sample a posterior (:attr:`MethodInfo.uses_sampler`),
    then ``options`` (the method's own) override both. The simulation study, the batch runner
    and the band-gap application build their estimators through this one function.
    """
    valid = methods(task)  # a ValueError for an unknown task
    if name not in valid:
        raise ValueError(f"unknown method {name!r}; choose from {valid}")
    opts: dict[str, Any] = {}
    if seed is not None and name != "source-only":
        opts["seed"] = seed
    if sampler and REGISTRIES[task][name].uses_sampler:
        opts.update(sampler)
    opts.update(options)
    return opts


def supports_batching(estimator: Any) -> bool:
    """Whether :func:`fit_replicates` can sample ``estimator`` in a batched job: every method
    whose posterior is sampled by NUTS — the PC priors (both constructions), the Bayesian last
    layer, the target-only and pretrained-prior networks, and the Hutchinson architectures
    with the Bayesian-network base learner."""
    batchable = getattr(estimator, "_batchable", None)
    if batchable is None or not hasattr(estimator, "_batch_plan"):
        return False
    return bool(batchable())


def fit_replicates(
    estimators: list[Any], datasets: list[tuple[Any, Any]], *, devices: list[Any] | None = None
) -> list[Any]:
    """Fit ``estimators[r]`` on ``datasets[r] = (X_r, y_r)``; returns the fitted estimators.

    When every estimator :func:`supports_batching` and their plans share the model, the sampler
    settings (chains included) and the data shapes, all replicates and their chains are
    sampled as one compiled NUTS job (:func:`pcbtl.inference.run_plans`; compiled once per
    model and data shapes, so later batches of the same shapes reuse it) and each
    ``fit_seconds_`` is the replicate's own set-up time plus the batch time divided by ``R``;
    the batch is spread over ``devices`` (default all local devices). Otherwise they are
    fitted one by one. ``batched_`` tells which happened.
    """
    if len(estimators) != len(datasets):
        raise ValueError("estimators and datasets must have the same length")

    def one_by_one():
        for est, (X, y) in zip(estimators, datasets, strict=True):
            est.fit(X, y)
            est.batched_ = False
        return estimators

    if not estimators or not all(supports_batching(e) for e in estimators):
        return one_by_one()
    plans = [e._batch_plan(X, y) for e, (X, y) in zip(estimators, datasets, strict=True)]
    if len({plan_key(p) for p in plans}) != 1:
        return one_by_one()
    t0 = time.perf_counter()
    posts = run_plans(plans, devices=devices)
    # the second pass of ``fit`` (PCTransferRegressor, scale prior): a fit whose τ ran past the
    # grid of r(τ) is sampled again on the extended grid, as alone, so that its result does
    # not depend on whether it was fitted in a group (each fit's draws are its own plan's)
    again = {}
    for r, (est, post, plan) in enumerate(zip(estimators, posts, plans, strict=True)):
        reach = getattr(est, "_grid_reach", None)
        reach = reach(post, plan.complete.keywords["setup"]) if reach else 0.0
        if reach:
            again[r] = est._batch_plan(*datasets[r], tau_reach=reach)
    by_key: dict[tuple, list[int]] = {}
    for r, plan in again.items():
        by_key.setdefault(plan_key(plan), []).append(r)
    for rs in by_key.values():
        for r, post in zip(rs, run_plans([again[r] for r in rs], devices=devices), strict=True):
            plans[r], posts[r] = again[r], post
    share = (time.perf_counter() - t0) / len(plans)
    for est, post, plan, (X, _) in zip(estimators, posts, plans, datasets, strict=True):
        plan.complete(post, seconds=plan.setup_seconds + share)
        est._record_features(X)  # feature_names_in_ of a DataFrame, as fit() sets it
        est.batched_ = True
    return estimators


def fit_all(
    estimators: list[Any],
    datasets: list[tuple[Any, Any]],
    *,
    batched: bool = True,
    devices: list[Any] | None = None,
) -> tuple[list[str], list[float]]:
    """Fit every estimator on its data set, recording failures instead of raising.

    With ``batched`` and more than one estimator that all :func:`supports_batching`, they are
    fitted as one vmapped job (:func:`fit_replicates`); if that job raises, they are refitted
    one by one, so one bad replicate fails alone. The sampler's and the prior–data conflict
    warnings are not raised (jobs record :func:`pcbtl.estimators.base.sampler_health` per fit
    instead of printing the same warning for every replicate).

    Returns
    -------
    errors
        ``""`` for a fit that succeeded, else ``"ExceptionType: message"``.
    seconds
        Each fit's own time (for a vmapped job, its wall time divided evenly over the fits).
    """
    n = len(estimators)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        warnings.simplefilter("ignore", PriorDataConflictWarning)
        if batched and n > 1 and all(supports_batching(e) for e in estimators):
            t0 = time.perf_counter()
            try:
                fit_replicates(estimators, datasets, devices=devices)
                return [""] * n, [(time.perf_counter() - t0) / n] * n
            except Exception:  # noqa: BLE001 - one bad replicate must fail alone: refit one by one
                pass
        errors, seconds = [], []
        for est, (X, y) in zip(estimators, datasets, strict=True):
            t0 = time.perf_counter()
            try:
                est.fit(X, y)
                est.batched_ = False
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
                errors.append(f"{type(exc).__name__}: {exc}")
            seconds.append(time.perf_counter() - t0)
    return errors, seconds
