r"""Classification baselines: the competitors of :class:`pcbtl.classification.PCTransferClassifier`.

Every method is a scikit-learn classifier (``BaseEstimator`` + ``ClassifierMixin``: ``clone``,
``get_params``/``set_params`` and ``GridSearchCV`` work; parameters are checked in ``fit``, a
``ValueError`` naming the parameter; an unfitted prediction raises
:class:`sklearn.exceptions.NotFittedError`) with ``fit(X, y)`` (returns ``self``),
``predict_proba(X)`` (``(n, K)``, columns in the order of ``classes_``), ``predict_log_proba``,
``predict`` and ``score`` (accuracy). Labels may be integers, bools, floats or strings;
``classes_`` are their sorted distinct values. A method that uses the source classifier matches
the ``k``-th smallest target label to the source's class ``k`` **by position**, as
:class:`pcbtl.classification.PCTransferClassifier` does, so ``y`` must hold as many classes as
the source.

==========================  ===================================================================
name                        model
==========================  ===================================================================
``source-only``             the source classifier as it is, ``p_S(y | x)``
``target-only``             Bayesian network on the target alone, ``θ ~ N(0, s²)``, NUTS
``fine-tuning``             Adam(W) from ``θ_S``, early stopping on a validation split
``pretrained-gaussian``     transfer layers ``θ ~ N(θ_S, s²)``, NUTS
``bayes-last-layer``        softmax regression on the frozen source features,
                            ``B ~ N(B_S, τ² s²)``, ``τ ~ HalfNormal``, NUTS
``multi-task``              shared trunk, one head per task, source and target rows, NUTS
``difference``              target logits = source logits + a Bayesian correction network
``latent-variable``         the source's logits as extra inputs of a Bayesian network
``forest``                  random forest on the target alone, Platt-calibrated
``multi-task-rf``           random forest on ``[x, task]``, source and target rows
``difference-rf``           ``p_S(x)`` + a forest correction of the probabilities
``latent-variable-rf``      random forest on ``[x, source logits]``
``boosting``                boosted trees on the target alone, Platt-calibrated
``*-gbt``                   the three architectures with boosted trees in place of the forest
==========================  ===================================================================

``s`` is the fan-in scale ``prior_scale/sqrt(fan_in)`` of each weight. The Bayesian methods
sample with NUTS as :class:`pcbtl.classification.PCTransferClassifier` does (the same sampler
settings, ``num_chains = 4`` chains in one compiled job through
:func:`pcbtl.inference.run_plans`, the draws judged across chains by
:func:`pcbtl.inference.check_sampler`, ArviZ data in ``idata_``), and predict with the posterior
mean of the class probabilities,

.. math::

    \hat p(y = c_k \mid x) = \frac1S \sum_{s=1}^S \mathrm{softmax}(g(x; θ_s))_k

(``[0, g]`` for a binary network with one output). The registry (:func:`pcbtl.methods`, :func:`pcbtl.make_method` with a
:class:`pcbtl.SourceClassifier`) builds them by name.

Forests are calibrated by scikit-learn's :class:`sklearn.calibration.CalibratedClassifierCV`
(``calibration="sigmoid"``, Platt scaling, by default) rather than reported with the forest's own
vote shares: vote shares are pulled towards the middle where trees disagree and are exactly 0
or 1 where they agree (an infinite log loss on one surprising test row), and the target sets of
transfer learning are too small for isotonic regression (which needs about a thousand
calibration rows to beat Platt scaling; Niculescu-Mizil & Caruana 2005). The sigmoid acts on the
forest's log-odds (log-probabilities for ``K ≥ 3``, one-vs-rest then normalised), clipped at
``1e-3``, so that the identity map is within reach. ``calibration="none"`` gives the forest's own
probabilities (one forest, no folds).

Boosted trees (``base="gbt"``) are scikit-learn's
:class:`sklearn.ensemble.HistGradientBoostingClassifier` (``n_estimators`` boosting iterations
of shrinkage ``learning_rate``, no early stopping), calibrated the same way; for the difference
architecture one :class:`sklearn.ensemble.HistGradientBoostingRegressor` per class fits the
residual probabilities. Boosting fits the trees to the errors of the trees before, so it reaches
sharper probabilities than a forest's averaged votes; the Platt map then undoes the
overconfidence of its many iterations (on the metallicity task the slope of the fitted map is
about 0.4 on the log-odds).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import init_to_median, init_to_sample
from sklearn.base import BaseEstimator, ClassifierMixin

from pcbtl._validation import (
    check_hidden,
    check_integer,
    check_nonnegative,
    check_positive,
    check_X,
)
from pcbtl.classification.models import categorical_loglik
from pcbtl.classification.source import (
    SourceClassifier,
    check_labels,
    logit_parametrization,
    split_logit_trunk,
)
from pcbtl.estimators.base import EstimatorCore
from pcbtl.estimators.classifier import (
    CHAIN_METHODS,
    _apply_draws_jit,
    _softmax_np,
    _subsample,
)
from pcbtl.inference import (
    MCMC_METHODS,
    BatchPlan,
    Posterior,
    check_sampler,
    register_cache,
    resolve_chain_method,
    run_plans,
    sampler_diagnostics,
    to_inference_data,
)
from pcbtl.networks import (
    ACTIVATIONS,
    MLP,
    NetworkFn,
    _check_learning_rate,
    _check_validation_fraction,
    _fit_adamw,
    _layer_scales,
    _network_outputs,
    _split_and_scale,
    resolve_transfer_layers,
)

__all__ = [
    "BayesianLastLayerClassifier",
    "DifferenceClassifier",
    "FineTuneClassifier",
    "LatentVariableClassifier",
    "MultiTaskClassifier",
    "PretrainedGaussianClassifier",
    "SourceOnlyClassifier",
    "TargetOnlyClassifier",
    "bayes_last_layer_classifier_model",
    "gaussian_network_classifier_model",
]

BASES = ("bnn", "rf", "gbt")
#: ``min_samples_leaf`` when it is ``None``: the forest's and scikit-learn's boosting default
DEFAULT_LEAF = {"rf": 2, "gbt": 20}
CALIBRATIONS = ("sigmoid", "isotonic", "none")
#: probabilities are clipped here before the forest's log-odds are taken (Platt scaling input)
PROBABILITY_FLOOR = 1e-3


# --------------------------------------------------------------------------------------------
# NumPyro models
# --------------------------------------------------------------------------------------------


@jax.jit
def _network_loglik(predict_fn: NetworkFn, theta: jax.Array, X: jax.Array, Y: jax.Array):
    """The categorical log-likelihood of the network ``predict_fn`` at ``θ`` in one compiled
    call (a :class:`pcbtl.networks.NetworkFn` argument: one compilation per architecture)."""
    return categorical_loglik(predict_fn(theta, X), Y)


def gaussian_network_classifier_model(
    predict_fn: NetworkFn,
    loc: jax.Array,
    scale: jax.Array,
    X: jax.Array | None = None,
    Y: jax.Array | None = None,
) -> None:
    r"""Bayesian network classifier with independent Normal priors on its flat weights.

    .. math::

        θ \sim N(\texttt{loc}, \mathrm{diag}(\texttt{scale})^2),\qquad
        y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat g(x_i; θ))),

    ``g`` = ``predict_fn`` (outputs ``(n, n_out)``; ``ĝ = [0, g]`` for one output), ``x_i`` the
    rows of ``X`` and ``Y`` the one-hot labels ``(n, K)``. ``loc = 0`` with a fresh network is the
    target-only network (and, with other inputs or outputs, the difference, latent-variable and
    multi-task networks); ``loc = θ_S`` the pretrained Gaussian prior. Site: ``theta``.
    """
    theta = numpyro.sample("theta", dist.Normal(loc, scale).to_event(1))
    if X is not None and Y is not None:
        numpyro.factor("loglik", _network_loglik(predict_fn, theta, X, Y))


def bayes_last_layer_classifier_model(
    predict_fn: NetworkFn,
    loc: jax.Array,
    scale: jax.Array,
    tau_scale: float,
    X: jax.Array | None = None,
    Y: jax.Array | None = None,
) -> None:
    r"""Bayesian last layer (softmax regression on frozen features) centred at the source head,
    non-centred:

    .. math::

        τ \sim \mathrm{HalfNormal}(\texttt{tau\_scale}),\quad z \sim N(0, I),\quad
        θ = θ_S + τ\, s ⊙ z,\qquad y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat g(h_i; θ)))

    with ``θ_S`` = ``loc`` (the source head, kernel and bias), ``s`` = ``scale``, ``g`` =
    ``predict_fn`` acting on the frozen trunk's features ``h_i`` (rows of ``X``) and ``Y`` the
    one-hot labels. Sites ``tau``, ``z`` and the deterministic ``theta``.
    """
    tau = numpyro.sample("tau", dist.HalfNormal(tau_scale))
    z = numpyro.sample("z", dist.Normal(jnp.zeros_like(loc), 1.0).to_event(1))
    theta = numpyro.deterministic("theta", loc + tau * scale * z)
    if X is not None and Y is not None:
        numpyro.factor("loglik", _network_loglik(predict_fn, theta, X, Y))


# --------------------------------------------------------------------------------------------
# networks of the baselines (pure functions of a flat θ, cached per architecture)
# --------------------------------------------------------------------------------------------


def _fresh_logit_network(
    Z: np.ndarray, n_in: int, width: int, hidden: Any, activation: str, seed: int
) -> tuple[NetworkFn, jax.Array]:
    """A fresh MLP ``n_in → hidden → width`` on the first ``n_in`` columns of ``Z``, inputs
    standardised by those columns' mean and sd; returns the network and its fan-in scales."""
    hidden = check_hidden(hidden)
    module = MLP(hidden=hidden, out=width, activation=activation)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, n_in)))["params"]
    cols = Z[:, :n_in]
    sd = cols.std(0)
    aux = {
        "frozen": {},
        "x_mean": jnp.asarray(cols.mean(0), jnp.float32),
        "x_scale": jnp.asarray(np.where(sd > 0, sd, 1.0), jnp.float32),
    }
    layers = tuple(f"hidden_{i}" for i in range(len(hidden))) + ("output",)
    apply = _network_outputs(hidden, activation, n_in, width, layers)
    return NetworkFn(apply, aux), _layer_scales(params, "fan_in")


@register_cache
@lru_cache(maxsize=64)
def _offset_apply(inner: Any, n_offset: int) -> Any:
    """``apply(θ, aux, Z) = inner(θ, aux, Z[:, :-k]) + Z[:, -k:]``: the last ``k`` columns of
    the input are added to the network's outputs (the difference architecture)."""

    def apply(theta: jax.Array, aux: dict[str, Any], Z: jax.Array) -> jax.Array:
        return inner(theta, aux, Z[:, :-n_offset]) + Z[:, -n_offset:]

    return apply


@register_cache
@lru_cache(maxsize=64)
def _task_apply(inner: Any, n_out: int) -> Any:
    """``apply(θ, aux, Z)``: a network with ``2·n_out`` outputs on ``Z[:, :-1]`` whose first
    ``n_out`` outputs are the source head and the last ``n_out`` the target head, chosen per row
    by the task indicator ``Z[:, -1]`` (0 source, 1 target)."""

    def apply(theta: jax.Array, aux: dict[str, Any], Z: jax.Array) -> jax.Array:
        out = inner(theta, aux, Z[:, :-1])
        return jnp.where(Z[:, -1:] > 0.5, out[:, n_out:], out[:, :n_out])

    return apply


def _one_hot(y_idx: np.ndarray, K: int) -> np.ndarray:
    return np.eye(K, dtype=np.float32)[y_idx]


def _source_features(source: SourceClassifier, X: np.ndarray) -> np.ndarray:
    """What the latent-variable methods add to the inputs: the source logit ``g_S(x)`` (two
    classes) or the log-probabilities ``log p_S(c_k | x)`` (``K ≥ 3``: the logits without their
    arbitrary common shift)."""
    if source.n_classes == 2:
        return source.logits(X)
    return source.predict_log_proba(X)


# --------------------------------------------------------------------------------------------
# the forest learner (wrapped by CalibratedClassifierCV)
# --------------------------------------------------------------------------------------------


class _ForestLearner(ClassifierMixin, BaseEstimator):
    """A tree ensemble on class indices ``0..K-1``: a random forest (``kind="rf"``) or boosted
    trees (``"gbt"``, :class:`sklearn.ensemble.HistGradientBoostingClassifier` with
    ``n_estimators`` iterations of shrinkage ``learning_rate``). With ``n_offset = K > 0``, the
    difference learner: a regression ensemble ``c`` on ``Z[:, :-K]`` fitted to
    ``onehot(y) − p_S``, where the last ``K`` columns of ``Z`` hold ``p_S(x)``, predicting
    ``p_S + c`` clipped at :data:`PROBABILITY_FLOOR` and renormalised (boosting: one regressor
    per class). ``decision_function``, the input of Platt scaling, is the log-odds of class 1
    (two classes) or the log-probabilities, clipped at the floor; for boosted classifiers the
    booster's own unclipped scores."""

    def __init__(
        self,
        n_estimators: int = 200,
        min_samples_leaf: int = 2,
        n_offset: int = 0,
        seed: int = 0,
        kind: str = "rf",
        learning_rate: float = 0.05,
    ) -> None:
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.n_offset = n_offset
        self.seed = seed
        self.kind = kind
        self.learning_rate = learning_rate

    def fit(self, Z: np.ndarray, y: np.ndarray) -> _ForestLearner:
        from sklearn.ensemble import (
            HistGradientBoostingClassifier,
            HistGradientBoostingRegressor,
            RandomForestClassifier,
            RandomForestRegressor,
        )

        self.classes_ = np.unique(y)
        k = int(self.n_offset)
        resid = np.eye(k)[np.asarray(y, int)] - Z[:, -k:] if k else None
        if self.kind == "gbt":
            kw = dict(
                max_iter=int(self.n_estimators),
                learning_rate=float(self.learning_rate),
                min_samples_leaf=int(self.min_samples_leaf),
                early_stopping=False,
                random_state=int(self.seed),
            )
            if k:
                self.forest_ = [
                    HistGradientBoostingRegressor(**kw).fit(Z[:, :-k], resid[:, j])
                    for j in range(k)
                ]
            else:
                self.forest_ = HistGradientBoostingClassifier(**kw).fit(Z, y)
            return self
        kw = dict(
            n_estimators=int(self.n_estimators),
            min_samples_leaf=int(self.min_samples_leaf),
            random_state=int(self.seed),
        )
        if k:
            self.forest_ = RandomForestRegressor(**kw).fit(Z[:, :-k], resid)
        else:
            self.forest_ = RandomForestClassifier(**kw).fit(Z, y)
        return self

    def _correction(self, Z: np.ndarray) -> np.ndarray:
        if isinstance(self.forest_, list):
            return np.stack([m.predict(Z) for m in self.forest_], axis=1)
        return self.forest_.predict(Z)

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        k = int(self.n_offset)
        if not k:
            return self.forest_.predict_proba(Z)
        p = np.maximum(Z[:, -k:] + self._correction(Z[:, :-k]), PROBABILITY_FLOOR)
        return p / p.sum(axis=1, keepdims=True)

    def decision_function(self, Z: np.ndarray) -> np.ndarray:
        if self.kind == "gbt" and not int(self.n_offset):
            # the booster's own log-odds (class scores for K ≥ 3): never exactly ±∞, so
            # nothing to clip; clipping its probabilities at 1e-3 would flatten the many
            # rows that 500 iterations put beyond 0.999 before the Platt map sees them
            return self.forest_.decision_function(Z)
        logp = np.log(np.maximum(self.predict_proba(Z), PROBABILITY_FLOOR))
        return logp[:, 1] - logp[:, 0] if logp.shape[1] == 2 else logp


def _calibration_splits(
    y_idx: np.ndarray, is_target: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds of the target rows; every other row (source rows) is always trained on.

    ``min(folds, smallest class count)`` folds; ``ValueError`` when a class has fewer than 2
    target rows."""
    from sklearn.model_selection import StratifiedKFold

    tgt = np.flatnonzero(is_target)
    other = np.flatnonzero(~is_target)
    counts = np.bincount(y_idx[tgt])
    k = min(int(folds), int(counts.min()))
    if k < 2:
        raise ValueError(
            "calibration needs at least 2 target rows of every class (one per fold); got "
            f"{counts.tolist()}: set calibration='none'"
        )
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed))
    return [
        (np.sort(np.concatenate([other, tgt[tr]])), tgt[te])
        for tr, te in skf.split(tgt, y_idx[tgt])
    ]


# --------------------------------------------------------------------------------------------
# the scikit-learn base
# --------------------------------------------------------------------------------------------


def _check_choice(value: Any, options: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _identity(X: np.ndarray) -> np.ndarray:
    return X


def _extended_signature(init: Callable, extra: dict[str, Any]) -> inspect.Signature:
    """The signature of ``init`` with the keyword-only parameters ``extra`` (name → default)
    after its first two (``self``, ``source``): what scikit-learn reads to list the parameters
    of a subclass whose ``__init__`` passes the parent's on as ``**params``."""
    params = list(inspect.signature(init).parameters.values())
    added = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra.items()
    ]
    return inspect.Signature([*params[:2], *added, *params[2:]])


class _ClassifierBase(EstimatorCore, ClassifierMixin, BaseEstimator):
    """Label handling, input checks and the prediction methods of every baseline.

    Subclasses implement ``_fit(X, y_idx, K, **options)`` on checked data (storing what they
    predict from only once it has succeeded) and ``_proba(X)`` on checked inputs; ``fit`` then
    stores ``classes_``, ``n_features_in_``, ``fit_seconds_`` (and ``feature_names_in_`` for a
    DataFrame).
    """

    #: whether ``source`` is required (and its classes matched by position)
    _needs_source = True

    def _source(self) -> SourceClassifier | None:
        src = self.source
        if src is None and not self._needs_source:
            return None
        if not isinstance(src, SourceClassifier):
            raise ValueError(f"source must be a pcbtl SourceClassifier, got {type(src).__name__}")
        return src

    def _check_params(self) -> None:
        """Check the parameters (a ``ValueError`` naming the first bad one)."""
        self._source()

    def _check_data(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, classes, y as class indices)``, with as many classes as the source."""
        src = self._source()
        X = check_X(X, "X", n_features=None if src is None else src.n_features, min_rows=2)
        y = check_labels(y, "y")
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                f"X and y have mismatched lengths: {X.shape[0]} rows vs {y.shape[0]} labels"
            )
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError("y must hold at least two distinct classes")
        if self._needs_source and classes.size != src.n_classes:
            raise ValueError(
                f"y holds {classes.size} classes but the source classifier has "
                f"{src.n_classes} ({src.classes.tolist()}); target classes are matched to the "
                "source's by position, so y must hold all of them"
            )
        return X, classes, y_idx

    def fit(self, X: Any, y: Any):
        """Fit to the target data ``(X, y)``; returns ``self``. Nothing is stored unless the
        whole fit succeeds."""
        return self._fit_checked(X, y)

    def _fit_checked(self, X: Any, y: Any, **options: Any):
        t0 = time.perf_counter()
        self._check_params()
        Xc, classes, y_idx = self._check_data(X, y)
        fitted = self._fit(Xc, y_idx, classes.size, **options)
        self._finish_fit(fitted, Xc, classes, time.perf_counter() - t0)
        self._record_features(X)
        return self

    def _finish_fit(self, fitted: Any, X: np.ndarray, classes: np.ndarray, seconds: float) -> None:
        """The tail of every fit (alone or in a batch): ``_after_fit`` and the fitted
        attributes every classifier has."""
        self._after_fit(fitted)
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = float(seconds)

    def _after_fit(self, fitted: Any) -> None:
        """Subclass hook: extra fitted attributes from what ``_fit`` returned."""

    def _fit(self, X: np.ndarray, y_idx: np.ndarray, K: int, **options: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover - abstract

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, ``(n, K)``, columns in the order of ``classes_``."""
        return self._proba(self._check_input(X))

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log`` of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class, as a label of ``classes_``."""
        self._check_fitted()
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


# --------------------------------------------------------------------------------------------
# source-only and fine-tuning
# --------------------------------------------------------------------------------------------


class SourceOnlyClassifier(_ClassifierBase):
    r"""The source classifier as it is: ``p(y = c_k | x) = p_S(y = c_k | x)``,

    .. math::

        p_S(y = c_k \mid x) = \mathrm{softmax}(\hat g_S(x))_k ,

    the ``k``-th target class matched to the source's ``k``-th class by position. ``fit`` only
    checks the target data and records the labels; nothing is learned from them.

    Parameters
    ----------
    source:
        The trained :class:`pcbtl.classification.SourceClassifier`.

    Example
    -------
    >>> clf = SourceOnlyClassifier(source).fit(X_target, y_target)  # doctest: +SKIP
    >>> clf.predict_proba(X_test)  # equals source.predict_proba(X_test)  # doctest: +SKIP
    """

    def __init__(self, source: SourceClassifier) -> None:
        self.source = source

    def _fit(self, X, y_idx, K, **options):
        self._fitted_source = self.source

    def _proba(self, X):
        return self._fitted_source.predict_proba(X)


class _Shift(nn.Module):
    """The parameter ``δ`` (zeros at initialisation) of a fine-tuning run ``θ = θ_S + δ``."""

    size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.param("delta", nn.initializers.zeros, (self.size,))


class FineTuneClassifier(_ClassifierBase):
    r"""Fine-tuning: the source weights trained further on the target, from the source optimum.

    The transfer layers' weights ``θ = θ_S + δ`` start at ``δ = 0`` and minimise the mean
    cross-entropy of the training part of the target rows,

    .. math::

        \mathcal L(δ) = -\frac1{n_{tr}} \sum_{i \in tr}
        \log \mathrm{softmax}(\hat g(x_i; θ_S + δ))_{y_i},

    with AdamW (``learning_rate``; its decoupled weight decay ``weight_decay`` shrinks ``δ``,
    that is pulls ``θ`` towards ``θ_S``: the "L2-SP" penalty of Li, Grandvalet & Davoine 2018)
    in shuffled minibatches of ``batch_size`` rows (the package's source-training loop). A
    random ``validation_fraction`` of the rows (at least one) is held out; the weights of the
    epoch with the lowest validation log loss are kept, and training stops after ``patience``
    epochs without improvement. A point estimate: the probabilities carry no weight
    uncertainty.

    Parameters
    ----------
    source:
        The trained :class:`pcbtl.classification.SourceClassifier`.
    transfer_layers:
        The layers trained: ``"all"`` (default), ``"last"``, an int ``k`` (last ``k``) or names;
        the others stay at ``θ_S``.
    learning_rate, weight_decay, batch_size, max_epochs, patience, validation_fraction, seed:
        The optimiser and the early stopping.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``theta_`` (the trained flat transfer
    vector), ``best_epoch_``, ``epochs_run_``, ``validation_log_loss_``, ``fit_seconds_``.

    Example
    -------
    >>> clf = FineTuneClassifier(source, learning_rate=1e-3).fit(X, y)  # doctest: +SKIP
    >>> clf.predict_proba(X_test)  # doctest: +SKIP
    """

    def __init__(
        self,
        source: SourceClassifier,
        *,
        transfer_layers: Any = "all",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        max_epochs: int = 300,
        patience: int = 20,
        validation_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.transfer_layers = transfer_layers
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.seed = seed

    def _check_params(self) -> None:
        src = self._source()
        resolve_transfer_layers(src, self.transfer_layers)
        _check_learning_rate(self.learning_rate)
        check_nonnegative(self.weight_decay, "weight_decay")
        check_integer(self.batch_size, "batch_size", minimum=1)
        check_integer(self.max_epochs, "max_epochs", minimum=1)
        check_integer(self.patience, "patience", minimum=0)
        check_integer(self.seed, "seed", minimum=0)
        _check_validation_fraction(self.validation_fraction, 0)

    def _fit(self, X, y_idx, K, **options):
        _check_validation_fraction(self.validation_fraction, X.shape[0])
        lp = logit_parametrization(self.source, self.transfer_layers, scale="unit")
        theta_s, predict_fn = lp.theta_source, lp.predict_fn
        tr, val, _, _ = _split_and_scale(
            X, np.random.default_rng(int(self.seed)), float(self.validation_fraction)
        )
        Xj = jnp.asarray(X, jnp.float32)
        Yj = jnp.asarray(_one_hot(y_idx, K))

        def loss_fn(p, xb, yb):
            return -categorical_loglik(predict_fn(theta_s + p["delta"], xb), yb) / xb.shape[0]

        val_loss, params, best, ran = _fit_adamw(
            _Shift(int(theta_s.shape[0])),
            loss_fn,
            (Xj[tr], Yj[tr], Xj[val], Yj[val]),
            seed=int(self.seed),
            learning_rate=float(self.learning_rate),
            weight_decay=float(self.weight_decay),
            batch_size=int(self.batch_size),
            max_epochs=int(self.max_epochs),
            patience=int(self.patience),
            progress_bar=False,
        )
        self.theta_ = np.asarray(theta_s + params["delta"], np.float32)
        self._predict_fn = predict_fn
        self.best_epoch_ = int(best)
        self.epochs_run_ = int(ran)
        self.validation_log_loss_ = float(val_loss)

    def _proba(self, X):
        out = self._predict_fn(jnp.asarray(self.theta_), jnp.asarray(X, jnp.float32))
        return _softmax_np(np.asarray(out))


# --------------------------------------------------------------------------------------------
# NUTS: the shared machinery
# --------------------------------------------------------------------------------------------


class _NutsFit(NamedTuple):
    """One NUTS fit: the model, its arguments other than the data, the network whose outputs
    are the logits and the init strategy."""

    model: Any
    kwargs: dict[str, Any]
    predict_fn: NetworkFn
    init_strategy: Any


class _PosteriorClassifier(_ClassifierBase):
    """NUTS fits of a network classifier: sampling, diagnostics, ArviZ data, predictions.

    Per fit, ``_input_map()`` gives ``(inputs, context)``: ``inputs(X)`` the network's inputs
    for raw inputs (kept for prediction), ``context`` whatever ``_nuts_fit`` needs besides;
    ``_training_rows`` the rows fitted (target rows, and source rows for the multi-task
    model); ``_nuts_fit(Z, K, context)`` the model and the network.
    """

    def _check_sampler_settings(self) -> None:
        check_integer(self.num_warmup, "num_warmup", minimum=0)
        check_integer(self.num_samples, "num_samples", minimum=1)
        check_integer(self.num_chains, "num_chains", minimum=1)
        check_integer(self.seed, "seed", minimum=0)
        depth = check_integer(self.max_tree_depth, "max_tree_depth", minimum=1)
        if depth > 15:
            raise ValueError(f"max_tree_depth must be between 1 and 15, got {depth}")
        _check_choice(self.chain_method, CHAIN_METHODS, "chain_method")
        tap = self.target_accept_prob
        if isinstance(tap, bool) or not isinstance(tap, int | float) or not 0.0 < tap < 1.0:
            raise ValueError(f"target_accept_prob must lie strictly between 0 and 1, got {tap!r}")
        if not isinstance(self.progress_bar, bool | np.bool_):
            raise ValueError(f"progress_bar must be a bool, got {self.progress_bar!r}")

    def _input_map(self) -> tuple[Callable[[np.ndarray], np.ndarray], Any]:
        return _identity, None

    def _training_rows(self, X, y_idx, inputs, **options):
        """``(Z, labels, is_target)``: the model inputs and class indices of the rows fitted."""
        return inputs(X), y_idx, np.ones(X.shape[0], bool)

    def _nuts_fit(self, Z: np.ndarray, K: int, context: Any) -> _NutsFit:
        raise NotImplementedError  # pragma: no cover - abstract

    def _nuts_plan(self, X: np.ndarray, y_idx: np.ndarray, K: int, **options: Any) -> BatchPlan:
        """The NUTS fit on checked data as a :class:`pcbtl.inference.BatchPlan` whose
        ``complete(posterior, seconds)`` judges the draws, stores the fit and returns the
        training rows' target mask."""
        self._check_sampler_settings()
        t0 = time.perf_counter()
        inputs, context = self._input_map()
        Z, labels, is_target = self._training_rows(X, y_idx, inputs, **options)
        nf = self._nuts_fit(Z, K, context)
        return BatchPlan(
            model=nf.model,
            kwargs={
                **nf.kwargs,
                "X": jnp.asarray(Z, jnp.float32),
                "Y": jnp.asarray(_one_hot(labels, K)),
            },
            complete=partial(
                self._store_nuts,
                Z=Z,
                labels=labels,
                is_target=is_target,
                K=K,
                nf=nf,
                inputs=inputs,
            ),
            num_warmup=int(self.num_warmup),
            num_samples=int(self.num_samples),
            seed=int(self.seed),
            target_accept_prob=float(self.target_accept_prob),
            max_tree_depth=int(self.max_tree_depth),
            init_strategy=nf.init_strategy,
            setup_seconds=time.perf_counter() - t0,
            num_chains=int(self.num_chains),
            chain_method=resolve_chain_method(self.chain_method),
        )

    def _store_nuts(
        self,
        posterior: Posterior,
        seconds: float = 0.0,
        *,
        Z: np.ndarray,
        labels: np.ndarray,
        is_target: np.ndarray,
        K: int,
        nf: _NutsFit,
        inputs: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        if not np.all(np.isfinite(posterior.samples["theta"])):
            raise FloatingPointError("non-finite posterior draws of the weights; fit failed")
        Zt, yt = Z[is_target], labels[is_target]
        probs = _draw_probs(posterior, nf.predict_fn, Zt)  # (S, n, K)
        chains, draws = posterior.samples["theta"].shape[:2]
        rows = _subsample(np.arange(Zt.shape[0])[:, None], 256, int(self.seed))[:, 0]
        cols = probs[:, rows, 1:] if K == 2 else probs[:, rows]
        posterior.diagnostics = check_sampler(
            posterior,
            int(self.max_tree_depth),
            predictions=cols.reshape(chains, draws, -1),
            stacklevel=6,
        )
        self.idata_ = _classifier_idata(posterior, probs, yt, int(self.seed), type(self).__name__)
        self._inputs = inputs
        self._predict_fn = nf.predict_fn
        self.forest_ = None
        self.posterior_ = posterior
        self.num_divergences_ = posterior.num_divergences
        return is_target

    def _fit(self, X, y_idx, K, **options):
        plan = self._nuts_plan(X, y_idx, K, **options)
        posterior = run_plans([plan], progress_bar=bool(self.progress_bar))[0]
        return plan.complete(posterior)

    # ---- batched fitting (pcbtl.estimators.registry.fit_replicates) ----------------------------
    def _batchable(self) -> bool:
        return True

    def _fit_options(self) -> dict[str, Any]:
        """The ``_fit`` options of a fit without ``fit`` keywords (subclass hook)."""
        return {}

    def _batch_plan(self, X: Any, y: Any) -> BatchPlan:
        """``fit(X, y)`` as a :class:`pcbtl.inference.BatchPlan`, so that many fits of the same
        network and data shapes are sampled as one vmapped NUTS job; its ``complete`` stores
        the whole fit (``fit_seconds_`` the seconds it is given)."""
        t0 = time.perf_counter()
        self._check_params()
        Xc, classes, y_idx = self._check_data(X, y)
        plan = self._nuts_plan(Xc, y_idx, classes.size, **self._fit_options())

        def complete(posterior: Posterior, seconds: float = 0.0):
            fitted = plan.complete(posterior)
            self._finish_fit(fitted, Xc, classes, seconds)
            return self

        return plan._replace(complete=complete, setup_seconds=time.perf_counter() - t0)

    def _proba(self, X):
        return _draw_probs(self.posterior_, self._predict_fn, self._inputs(X)).mean(axis=0)

    @property
    def sampler_diagnostics_(self) -> dict[str, Any]:
        """MCMC health across chains (:func:`pcbtl.inference.sampler_diagnostics`), with the
        predicted probabilities at up to 256 target rows (``{}`` for a forest)."""
        self._check_fitted()
        if self.posterior_ is None or self.posterior_.method not in MCMC_METHODS:
            return {}
        if self.posterior_.diagnostics is None:
            self.posterior_.diagnostics = sampler_diagnostics(
                self.posterior_, int(self.max_tree_depth)
            )
        return dict(self.posterior_.diagnostics)


def _draw_probs(
    posterior: Posterior, predict_fn: NetworkFn, Z: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """Class probabilities of every draw of ``theta`` at the inputs ``Z``: ``(S, n, K)``."""
    thetas = jnp.asarray(posterior.flat("theta"), jnp.float32)
    parts = []
    for start in range(0, Z.shape[0], chunk):
        Zc = jnp.asarray(Z[start : start + chunk], jnp.float32)
        parts.append(_softmax_np(np.asarray(_apply_draws_jit(predict_fn, thetas, Zc))))
    return np.concatenate(parts, axis=1)


def _classifier_idata(
    posterior: Posterior, probs: np.ndarray, y_idx: np.ndarray, seed: int, method: str
) -> Any:
    """ArviZ data of a classifier's draws: per-row log-likelihood ``log p_s(y_i | x_i)``, one
    posterior-predictive label per draw and row (inverse CDF of ``p_s(· | x_i)``, seeded) and
    the observed class indices."""
    S, n, K = probs.shape
    shape = (posterior.num_chains, S // posterior.num_chains, n)
    picked = np.take_along_axis(probs, np.broadcast_to(y_idx[None, :, None], (S, n, 1)), axis=2)
    u = np.random.default_rng(seed).random((S, n, 1))
    drawn = np.minimum(np.sum(np.cumsum(probs, axis=2) < u, axis=2), K - 1)
    loglik = np.log(np.maximum(picked[..., 0], 1e-300)).astype(np.float32)
    return to_inference_data(
        posterior,
        log_likelihood=loglik.reshape(shape),
        posterior_predictive=drawn.astype(np.int64).reshape(shape),
        observed=np.asarray(y_idx, np.int64),
        drop=("z",),
        attrs={"pcbtl_method": method},
    )


# --------------------------------------------------------------------------------------------
# pretrained Gaussian prior and Bayesian last layer
# --------------------------------------------------------------------------------------------


class _SourceNetworkClassifier(_PosteriorClassifier):
    """The source network with a prior on its transfer layers (``_layers()``); the frozen
    trunk below them is computed once per input
    (:func:`pcbtl.classification.source.split_logit_trunk`)."""

    def _layers(self) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

    def _input_map(self):
        lp = logit_parametrization(self.source, self._layers(), scale="fan_in")
        split = split_logit_trunk(self.source, lp)
        if split is None:
            return _identity, (lp, lp.predict_fn)
        trunk, head = split
        return (lambda X: np.asarray(trunk(X), np.float64)), (lp, head)


_NUTS_DOC = """num_warmup, num_samples, num_chains, chain_method, seed, progress_bar, target_accept_prob,
    max_tree_depth:
        NUTS settings, as :class:`pcbtl.classification.PCTransferClassifier` (4 chains,
        ``chain_method="auto"``: sequential on a CPU, vectorised on an accelerator), except
        ``max_tree_depth`` 8 (as the regression networks) and the progress bar off."""


class PretrainedGaussianClassifier(_SourceNetworkClassifier):
    r"""The "pretrained prior": a Gaussian centred at the source weights on the transfer layers.

    .. math::

        θ \sim N(θ_S, \mathrm{diag}(s)^2),\quad s = \texttt{prior\_scale}/\sqrt{\mathrm{fan\_in}},
        \qquad y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat g(x_i; θ)))

    on the layers ``transfer_layers`` (``"all"`` by default); the others stay at ``θ_S``
    (:func:`gaussian_network_classifier_model`). Unlike the PC prior, the scale is fixed and
    says nothing about how far the predictions may move.

    Parameters
    ----------
    source:
        The trained :class:`pcbtl.classification.SourceClassifier`.
    transfer_layers:
        ``"all"``, ``"last"``, an int ``k`` (the last ``k`` layers) or layer names.
    prior_scale:
        The prior sd of a weight in units of ``1/sqrt(fan_in)``.
    {nuts}

    Fitted attributes: ``classes_``, ``n_features_in_``, ``posterior_`` (site ``theta``, the
    transfer vector), ``idata_``, ``num_divergences_``, ``sampler_diagnostics_``,
    ``fit_seconds_``.

    Example
    -------
    >>> clf = PretrainedGaussianClassifier(source, num_warmup=300).fit(X, y)  # doctest: +SKIP
    >>> clf.predict_proba(X_test)  # doctest: +SKIP
    """

    def __init__(
        self,
        source: SourceClassifier,
        *,
        transfer_layers: Any = "all",
        prior_scale: float = 1.0,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        progress_bar: bool = False,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 8,
    ) -> None:
        self.source = source
        self.transfer_layers = transfer_layers
        self.prior_scale = prior_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.progress_bar = progress_bar
        self.target_accept_prob = target_accept_prob
        self.max_tree_depth = max_tree_depth

    def _layers(self):
        return self.transfer_layers

    def _check_params(self) -> None:
        resolve_transfer_layers(self._source(), self.transfer_layers)
        check_positive(self.prior_scale, "prior_scale")

    def _nuts_fit(self, Z, K, context):
        lp, head = context
        kwargs = {"predict_fn": head, "loc": lp.theta_source, "scale": self.prior_scale * lp.scales}
        return _NutsFit(
            gaussian_network_classifier_model, kwargs, head, init_to_median(num_samples=15)
        )


class BayesianLastLayerClassifier(_SourceNetworkClassifier):
    r"""Bayesian last layer: softmax (two classes: logistic) regression on the frozen source
    features, centred at the source head with a learned scale.

    .. math::

        τ \sim \mathrm{HalfNormal}(\texttt{tau\_scale}),\quad
        B = B_S + τ\, s ⊙ z,\ z \sim N(0, I),\qquad
        y_i \sim \mathrm{Cat}(\mathrm{softmax}([φ(x_i), 1]\, B)),

    ``φ`` the source's penultimate features, ``B_S`` its head (bias included) and
    ``s = 1/sqrt(fan_in)`` (:func:`bayes_last_layer_classifier_model`), so that ``τ = 1`` moves
    the logits by about one unit. The isotropic prior ignores how much each direction of ``B``
    changes the predictions (the PC prior measures it).

    Parameters
    ----------
    source:
        The trained :class:`pcbtl.classification.SourceClassifier`.
    tau_scale:
        Scale of the half-normal prior of ``τ``.
    {nuts}

    Fitted attributes: those of :class:`PretrainedGaussianClassifier` (``theta`` is the head,
    kernel and bias) and ``tau_`` (the draws of ``τ``).

    Example
    -------
    >>> clf = BayesianLastLayerClassifier(source).fit(X, y)  # doctest: +SKIP
    >>> clf.tau_.mean(), clf.predict_proba(X_test)  # doctest: +SKIP
    """

    def __init__(
        self,
        source: SourceClassifier,
        *,
        tau_scale: float = 1.0,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        progress_bar: bool = False,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 8,
    ) -> None:
        self.source = source
        self.tau_scale = tau_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.progress_bar = progress_bar
        self.target_accept_prob = target_accept_prob
        self.max_tree_depth = max_tree_depth

    def _layers(self):
        return "last"

    def _check_params(self) -> None:
        self._source()
        check_positive(self.tau_scale, "tau_scale")

    def _nuts_fit(self, Z, K, context):
        lp, head = context
        kwargs = {
            "predict_fn": head,
            "loc": lp.theta_source,
            "scale": lp.scales,
            "tau_scale": float(self.tau_scale),
        }
        return _NutsFit(
            bayes_last_layer_classifier_model, kwargs, head, init_to_median(num_samples=15)
        )

    def _after_fit(self, fitted: Any) -> None:
        self.tau_ = self.posterior_.flat("tau").astype(np.float64)


PretrainedGaussianClassifier.__doc__ = PretrainedGaussianClassifier.__doc__.replace(
    "{nuts}", _NUTS_DOC
)
BayesianLastLayerClassifier.__doc__ = BayesianLastLayerClassifier.__doc__.replace(
    "{nuts}", _NUTS_DOC
)


# --------------------------------------------------------------------------------------------
# target-only and Hutchinson's architectures, with a network or a forest
# --------------------------------------------------------------------------------------------


class _ArchitectureClassifier(_PosteriorClassifier):
    """An architecture with a choice of base learner: ``"bnn"`` (a fresh Bayesian network,
    :func:`gaussian_network_classifier_model`, NUTS), ``"rf"`` (a calibrated random forest) or
    ``"gbt"`` (calibrated boosted trees).
    Subclasses define the inputs (``_input_map``, ``_forest_input_map``), the rows
    (``_training_rows``), the network (``_network``) and the forest (``_learner``)."""

    def __init__(
        self,
        source: SourceClassifier | None = None,
        *,
        base: str = "bnn",
        hidden: tuple[int, ...] = (16,),
        activation: str = "tanh",
        prior_scale: float = 1.0,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        progress_bar: bool = False,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 8,
        n_estimators: int = 200,
        min_samples_leaf: int | None = None,
        learning_rate: float = 0.05,
        calibration: str = "sigmoid",
        cv: int = 3,
    ) -> None:
        self.source = source
        self.base = base
        self.hidden = hidden
        self.activation = activation
        self.prior_scale = prior_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.progress_bar = progress_bar
        self.target_accept_prob = target_accept_prob
        self.max_tree_depth = max_tree_depth
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.learning_rate = learning_rate
        self.calibration = calibration
        self.cv = cv

    def _check_params(self) -> None:
        self._source()
        _check_choice(self.base, BASES, "base")
        if self.base == "bnn":
            check_hidden(self.hidden)
            _check_choice(self.activation, tuple(ACTIVATIONS), "activation")
            check_positive(self.prior_scale, "prior_scale")
        else:
            check_integer(self.n_estimators, "n_estimators", minimum=1)
            if self.min_samples_leaf is not None:
                check_integer(self.min_samples_leaf, "min_samples_leaf", minimum=1)
            if self.base == "gbt":
                check_positive(self.learning_rate, "learning_rate")
            _check_choice(self.calibration, CALIBRATIONS, "calibration")
            check_integer(self.cv, "cv", minimum=2)
            check_integer(self.seed, "seed", minimum=0)

    # ---- the network ------------------------------------------------------------------------
    def _network(self, Z: np.ndarray, n_out: int) -> tuple[NetworkFn, jax.Array]:
        """The network on the model inputs ``Z`` and its fan-in scales."""
        return _fresh_logit_network(
            Z, Z.shape[1], n_out, self.hidden, self.activation, int(self.seed)
        )

    def _nuts_fit(self, Z, K, context):
        net, scales = self._network(Z, 1 if K == 2 else K)
        kwargs = {
            "predict_fn": net,
            "loc": jnp.zeros_like(scales),
            "scale": self.prior_scale * scales,
        }
        return _NutsFit(gaussian_network_classifier_model, kwargs, net, init_to_sample())

    # ---- the forest -------------------------------------------------------------------------
    def _forest_input_map(self) -> Callable[[np.ndarray], np.ndarray]:
        return self._input_map()[0]

    def _learner(self, K: int) -> _ForestLearner:
        leaf = self.min_samples_leaf
        return _ForestLearner(
            int(self.n_estimators),
            DEFAULT_LEAF[self.base] if leaf is None else int(leaf),
            0,
            int(self.seed),
            kind=self.base,
            learning_rate=float(self.learning_rate),
        )

    def _batchable(self) -> bool:
        return self.base == "bnn"

    def _fit(self, X, y_idx, K, **options):
        if self.base == "bnn":
            return super()._fit(X, y_idx, K, **options)
        from sklearn.calibration import CalibratedClassifierCV

        inputs = self._forest_input_map()
        Z, labels, is_target = self._training_rows(X, y_idx, inputs, **options)
        learner = self._learner(K)
        if self.calibration == "none":
            forest = learner.fit(Z, labels)
        else:
            splits = _calibration_splits(labels, is_target, int(self.cv), int(self.seed))
            forest = CalibratedClassifierCV(learner, method=self.calibration, cv=splits)
            forest.fit(Z, labels)
        self._inputs = inputs
        self.forest_ = forest
        self.posterior_ = None
        return is_target

    def _proba(self, X):
        if self.forest_ is None:
            return super()._proba(X)
        return self.forest_.predict_proba(self._inputs(X))


_ARCHITECTURE_PARAMETERS = """Parameters
    ----------
    source:
        The trained :class:`pcbtl.classification.SourceClassifier`.
    base:
        ``"bnn"`` (default, a Bayesian network), ``"rf"`` (a random forest) or ``"gbt"``
        (boosted trees, :class:`sklearn.ensemble.HistGradientBoostingClassifier`).
    hidden, activation, prior_scale:
        The network (hidden widths, default ``(16,)``) and its prior sd in units of
        ``1/sqrt(fan_in)`` (``base="bnn"``).
    {nuts}
    n_estimators, min_samples_leaf, learning_rate, calibration, cv:
        The trees (``base="rf"`` or ``"gbt"``): trees of the forest or boosting iterations;
        fewest rows in a leaf (``None``: 2 for the forest, 20 for boosting, scikit-learn's
        default there); the shrinkage of each boosting step (``"gbt"`` only). Their
        calibration: ``"sigmoid"`` (default, Platt scaling of the log-odds), ``"isotonic"`` or
        ``"none"`` (the ensemble's own probabilities), on ``min(cv, smallest class count)``
        shuffled stratified folds of the target rows
        (:class:`sklearn.calibration.CalibratedClassifierCV`, one ensemble per fold,
        averaged); every class needs two target rows unless ``calibration="none"``.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``fit_seconds_``; ``posterior_``
    (site ``theta``), ``idata_``, ``num_divergences_``, ``sampler_diagnostics_``
    (``base="bnn"``); ``forest_`` (the calibrated trees, ``base="rf"`` or ``"gbt"``; ``None`` for
    ``"bnn"``, whose ``posterior_`` is ``None`` for ``"rf"``)."""


class TargetOnlyClassifier(_ArchitectureClassifier):
    r"""The target alone: a Bayesian network (``base="bnn"``), a random forest (``"rf"``) or
    boosted trees (``"gbt"``).

    ``"bnn"`` (:func:`gaussian_network_classifier_model`, NUTS):

    .. math::

        θ \sim N(0, \mathrm{diag}(s)^2),\quad s = \texttt{prior\_scale}/\sqrt{\mathrm{fan\_in}},
        \qquad y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat g((x_i - m)/v; θ))),

    a fresh network with ``hidden`` layers and one output (two classes) or ``K``, inputs
    standardised by the target's mean ``m`` and sd ``v``. ``"rf"`` / ``"gbt"``: scikit-learn's
    random forest / boosted trees on ``x``, calibrated (see the module). The source is not
    used: it may be ``None`` (when given, ``X`` must have its number of features), and ``y``
    may hold any number ``K ≥ 2`` of classes.

    {parameters}

    Example
    -------
    >>> clf = TargetOnlyClassifier(None, num_warmup=300, num_samples=300)  # doctest: +SKIP
    >>> clf.fit(X, y).predict_proba(X_test)  # doctest: +SKIP
    >>> TargetOnlyClassifier(None, base="rf").fit(X, y).predict(X_test)  # doctest: +SKIP
    """

    _needs_source = False


class DifferenceClassifier(_ArchitectureClassifier):
    r"""Difference architecture (Hutchinson et al. 2017): the target model corrects the source.

    ``base="bnn"``: the target's logits are the source's plus a Bayesian correction network
    ``c`` (fresh, on the standardised ``x``; :func:`gaussian_network_classifier_model`, NUTS),

    .. math::

        g_T(x) = g_S(x) + c(x; θ),\quad θ \sim N(0, \mathrm{diag}(s)^2),\qquad
        y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat g_T(x_i))),

    so ``θ = 0`` (and ``prior_scale → 0``) is the source itself. ``base="rf"``: a forest has no
    logits to correct, so it corrects the probabilities, the classification form of
    Hutchinson's ``y_T − ŷ_S``: a regression forest ``c`` is fitted to the residuals
    ``e_{y_i} − p_S(x_i)`` (``e_k`` the one-hot label, so ``E[e_y | x] − p_S(x) = p_T(x) −
    p_S(x)``) and

    .. math::

        p_T(x) \propto \max(p_S(x) + c(x),\ 10^{-3}),

    then calibrated as the other forests. The source's prediction is the given source
    classifier's (no source rows are needed).

    {parameters}

    Example
    -------
    >>> clf = DifferenceClassifier(source, num_warmup=300).fit(X, y)  # doctest: +SKIP
    >>> clf.predict_proba(X_test)  # doctest: +SKIP
    """

    def _input_map(self):
        src = self.source
        return (lambda X: np.concatenate([X, src.logits(X)], axis=1)), None

    def _forest_input_map(self):
        src = self.source
        return lambda X: np.concatenate([X, src.predict_proba(X)], axis=1)

    def _learner(self, K):
        return super()._learner(K).set_params(n_offset=K)

    def _network(self, Z, n_out):
        inner, scales = super()._network(Z[:, :-n_out], n_out)
        return NetworkFn(_offset_apply(inner.apply, n_out), inner.aux), scales


class LatentVariableClassifier(_ArchitectureClassifier):
    r"""Explicit latent-variable architecture (Hutchinson et al. 2017): the source's prediction
    is an extra input of the target model.

    .. math::

        z(x) = g_S(x)\ (K = 2),\quad z(x) = \log p_S(\cdot \mid x)\ (K \ge 3),\qquad
        p_T(y \mid x) = h(x, z(x)),

    with ``h`` a fresh Bayesian network on ``[x, z]`` (``base="bnn"``, inputs standardised,
    :func:`gaussian_network_classifier_model`, NUTS) or a calibrated random forest on it
    (``"rf"``), or calibrated boosted trees (``"gbt"``; on the metallicity task the best of the
    package's methods, ROC-AUC 0.976). The log-probabilities are the logits without their
    arbitrary common shift.

    {parameters}

    Example
    -------
    >>> clf = LatentVariableClassifier(source, base="rf").fit(X, y)  # doctest: +SKIP
    >>> clf.predict_proba(X_test)  # doctest: +SKIP
    """

    def _input_map(self):
        src = self.source
        return (lambda X: np.concatenate([X, _source_features(src, X)], axis=1)), None


def _with_task(X: np.ndarray, task: float) -> np.ndarray:
    return np.concatenate([X, np.full((X.shape[0], 1), task)], axis=1)


class MultiTaskClassifier(_ArchitectureClassifier):
    r"""Multi-task architecture (Hutchinson et al. 2017): one model learns the source and the
    target labels together; predictions are the target task's.

    ``base="bnn"``: a shared trunk and one output head per task (one Bayesian network whose
    output layer has ``2·n_out`` units, the first ``n_out`` the source head ``g_0``, the others
    the target head ``g_1``; :func:`gaussian_network_classifier_model`, NUTS),

    .. math::

        θ \sim N(0, \mathrm{diag}(s)^2),\qquad
        y_i \sim \mathrm{Cat}(\mathrm{softmax}(\hat g_{t_i}(x_i; θ))),\quad
        t_i = 0 \text{ (source row)},\ 1 \text{ (target row)};

    ``"rf"``: a random forest on ``[x, t]``, predicting at ``t = 1``, calibrated on folds of
    the target rows only (the source rows are in every training fold).

    Source rows: ``source_X, source_y`` (labels among ``source.classes``, matched to the
    target's by position), given to the constructor or to ``fit`` (not both). Without them
    the source rows are the inputs the source keeps (``source.reference_X``) with labels drawn
    from the source's probabilities ``p_S(· | x)`` (seeded). At most ``max_source_rows`` source
    rows are used (a seeded random subset).

    {parameters}

    Also fitted: ``n_source_rows_``, ``n_target_rows_``.

    Example
    -------
    >>> clf = MultiTaskClassifier(source, base="rf")  # doctest: +SKIP
    >>> clf.fit(X, y, source_X=Xs, source_y=ys).predict_proba(X_test)  # doctest: +SKIP
    """

    def __init__(
        self,
        source: SourceClassifier | None = None,
        *,
        source_X: Any = None,
        source_y: Any = None,
        max_source_rows: int = 1000,
        **params: Any,
    ) -> None:
        self.source_X = source_X
        self.source_y = source_y
        self.max_source_rows = max_source_rows
        super().__init__(source, **params)

    # scikit-learn reads the parameters from the signature: the three above and the parent's
    __init__.__signature__ = _extended_signature(  # type: ignore[attr-defined]
        _ArchitectureClassifier.__init__,
        {"source_X": None, "source_y": None, "max_source_rows": 1000},
    )

    def fit(self, X: Any, y: Any, *, source_X: Any = None, source_y: Any = None):
        """Fit to the target rows ``(X, y)`` and the source rows (``source_X, source_y`` here or
        in the constructor, not both; see the class); returns ``self``."""
        given = source_X is not None or source_y is not None
        if given and (self.source_X is not None or self.source_y is not None):
            raise ValueError("give source_X, source_y to the constructor or to fit, not both")
        rows = (source_X, source_y) if given else (self.source_X, self.source_y)
        return self._fit_checked(X, y, source_rows=rows)

    def _check_params(self) -> None:
        super()._check_params()
        check_integer(self.max_source_rows, "max_source_rows", minimum=1)

    def _source_rows(self, Xs: Any, ys: Any) -> tuple[np.ndarray, np.ndarray]:
        """Source inputs and class indices (see the class)."""
        src = self.source
        rng = np.random.default_rng(int(self.seed))
        if Xs is None and ys is None:
            Xs = np.asarray(src.reference_X, np.float64)
            if Xs.shape[0] == 0:
                raise ValueError(
                    "no source rows: give source_X, source_y (the source keeps no reference_X)"
                )
            u = rng.random((Xs.shape[0], 1))
            idx = np.sum(np.cumsum(src.predict_proba(Xs), axis=1) < u, axis=1)
            idx = np.minimum(idx, src.n_classes - 1)
        elif Xs is None or ys is None:
            raise ValueError("source_X and source_y must be given together")
        else:
            Xs = check_X(Xs, "source_X", n_features=src.n_features)
            ys = check_labels(ys, "source_y")
            if ys.shape[0] != Xs.shape[0]:
                raise ValueError(
                    f"source_X and source_y have mismatched lengths: {Xs.shape[0]} rows vs "
                    f"{ys.shape[0]} labels"
                )
            known = np.isin(ys, src.classes)
            if not np.all(known):
                raise ValueError(
                    f"source_y holds a label that is not one of the source's classes "
                    f"{src.classes.tolist()}: {ys[np.argmin(known)]!r}"
                )
            idx = np.searchsorted(src.classes, ys)
        m = int(self.max_source_rows)
        if Xs.shape[0] > m:
            keep = np.sort(rng.choice(Xs.shape[0], m, replace=False))
            Xs, idx = Xs[keep], idx[keep]
        return Xs, idx

    def _input_map(self):
        return (lambda X: _with_task(X, 1.0)), None

    def _training_rows(self, X, y_idx, inputs, source_rows=(None, None)):
        Xs, ys = self._source_rows(*source_rows)
        Z = np.concatenate([inputs(X), _with_task(Xs, 0.0)])
        is_target = np.r_[np.ones(X.shape[0], bool), np.zeros(Xs.shape[0], bool)]
        return Z, np.concatenate([y_idx, ys]), is_target

    def _network(self, Z, n_out):
        inner, scales = _fresh_logit_network(
            Z, Z.shape[1] - 1, 2 * n_out, self.hidden, self.activation, int(self.seed)
        )
        return NetworkFn(_task_apply(inner.apply, n_out), inner.aux), scales

    def _fit_options(self) -> dict[str, Any]:
        return {"source_rows": (self.source_X, self.source_y)}

    def _after_fit(self, fitted: Any) -> None:
        self.n_target_rows_ = int(fitted.sum())
        self.n_source_rows_ = int((~fitted).sum())


for _cls in (
    TargetOnlyClassifier,
    DifferenceClassifier,
    LatentVariableClassifier,
    MultiTaskClassifier,
):
    _cls.__doc__ = _cls.__doc__.replace(
        "{parameters}", _ARCHITECTURE_PARAMETERS.replace("{nuts}", _NUTS_DOC)
    )
