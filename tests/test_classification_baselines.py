"""Classification baselines (:mod:`pcbtl.estimators.classification_baselines`).

Two small tasks on four inputs. ``SOURCE_RIGHT`` (binary): the target labels are drawn from the
source classifier's own probabilities, so the source is exactly right and every method that
transfers it should beat the methods that learn from the 40 target rows alone. ``SHIFTED``
(three classes, string labels): the target's logits differ from the source's by a linear term,
for the interface checks. Every method is fitted once per task (module fixtures); the fast set
fits every method on the binary task and the methods without NUTS on the three-class task;
the NUTS methods' three-class fits and the PC classifiers' fits through the registry are
marked slow (each NUTS model compiles its own sampler: about 6 s of one core apiece).

Statistical checks state their measured values and require at most a third of the measured
gap (log losses on 2,000 test rows; every fit is seeded, so the values are reproducible).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import special
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss

from pcbtl import PCTransferClassifier, make_method, train_source_classifier
from pcbtl.estimators.classification_baselines import (
    DifferenceClassifier,
    MultiTaskClassifier,
    SourceOnlyClassifier,
    TargetOnlyClassifier,
)
from pcbtl.estimators.registry import CLASSIFICATION_METHODS

NUTS = {"num_warmup": 150, "num_samples": 75, "num_chains": 2}
FOREST = {"n_estimators": 60}
GBT = {"n_estimators": 100, "min_samples_leaf": 5}
#: per-method options of the fast fits (small samplers and forests)
OPTIONS = {
    "source-only": {},
    "target-only": NUTS,
    "fine-tuning": {"max_epochs": 60},
    "pretrained-gaussian": NUTS,
    "bayes-last-layer": NUTS,
    "multitask-bnn": {**NUTS, "max_source_rows": 300},
    "difference-bnn": NUTS,
    "latent-bnn": NUTS,
    "forest": FOREST,
    "multitask-rf": {**FOREST, "max_source_rows": 300},
    "difference-rf": FOREST,
    "latent-rf": FOREST,
    "boosting": GBT,
    "multitask-gbt": {**GBT, "max_source_rows": 300},
    "difference-gbt": GBT,
    "latent-gbt": GBT,
    "pc-last-layer": NUTS,
    "pc-scale": {**NUTS, "n_eps": 32, "n_tau": 16},
}
NUTS_METHODS = {
    "target-only",
    "pretrained-gaussian",
    "bayes-last-layer",
    "multitask-bnn",
    "difference-bnn",
    "latent-bnn",
    "pc-last-layer",
    "pc-scale",
}
BASELINES = [m for m in CLASSIFICATION_METHODS if not m.startswith("pc-")]
LABELS3 = np.array(["blue", "green", "red"])


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4))


def _draw(p: np.ndarray, seed: int) -> np.ndarray:
    """One label per row from the class probabilities ``p`` (rows), by inverse CDF."""
    u = np.random.default_rng(seed).random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)


def _source_logits(X: np.ndarray, K: int) -> np.ndarray:
    W = np.random.default_rng(40 + K).standard_normal((4, K)) * 3.0
    return np.tanh(X) @ W + np.sin(2 * X[:, [1]]) * np.arange(K)


@pytest.fixture(scope="module")
def sources():
    out = {}
    for K in (2, 3):
        X = _inputs(2000, K)
        y = _draw(special.softmax(_source_logits(X, K), axis=1), K + 10)
        out[K] = train_source_classifier(
            X, y, hidden=(8,), max_epochs=60, n_reference=300, seed=0, progress_bar=False
        )
    return out


@pytest.fixture(scope="module")
def source_right(sources):
    """Binary: 40 target rows and 2,000 test rows labelled from the source's probabilities."""
    src = sources[2]
    X, Xt = _inputs(40, 21), _inputs(2000, 22)
    return X, _draw(src.predict_proba(X), 23), Xt, _draw(src.predict_proba(Xt), 24)


@pytest.fixture(scope="module")
def shifted():
    """Three classes, string labels: the source's logits plus ``1.5 x₃ (−1, 0, 1)``."""
    X, Xt = _inputs(60, 31), _inputs(500, 32)

    def p(X):
        return special.softmax(_source_logits(X, 3) + 1.5 * X[:, [2]] * [-1, 0, 1], axis=1)

    return X, LABELS3[_draw(p(X), 33)], Xt, LABELS3[_draw(p(Xt), 34)]


def _build(name, source, **extra):
    return CLASSIFICATION_METHODS[name].build(source, **{**OPTIONS[name], **extra})


@pytest.fixture(scope="module")
def binary_fits(sources, source_right):
    X, y, _, _ = source_right
    return {name: _build(name, sources[2]).fit(X, y) for name in BASELINES}


def _test_log_loss(clf, Xt, yt) -> float:
    return float(log_loss(yt, clf.predict_proba(Xt), labels=clf.classes_))


def _check_probabilities(clf, X, classes) -> None:
    p = clf.predict_proba(X)
    assert p.shape == (X.shape[0], len(classes))
    assert np.all(p >= 0) and np.allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(clf.classes_, classes)
    pred = clf.predict(X)
    assert np.array_equal(pred, classes[np.argmax(p, axis=1)])
    assert np.allclose(np.exp(clf.predict_log_proba(X[:5])), p[:5])


# --------------------------------------------------------------------------------------------
# the registry and the scikit-learn interface (no fit)
# --------------------------------------------------------------------------------------------


def test_registry_names_and_descriptions(sources):
    expected = {
        "source-only",
        "target-only",
        "fine-tuning",
        "pretrained-gaussian",
        "bayes-last-layer",
        "multitask-bnn",
        "difference-bnn",
        "latent-bnn",
        "forest",
        "multitask-rf",
        "difference-rf",
        "latent-rf",
        "boosting",
        "multitask-gbt",
        "difference-gbt",
        "latent-gbt",
        "pc-last-layer",
        "pc-scale",
    }
    assert set(CLASSIFICATION_METHODS) == expected
    uses_source = {n for n, info in CLASSIFICATION_METHODS.items() if info.uses_source_data}
    assert uses_source == {"multitask-bnn", "multitask-rf", "multitask-gbt"}
    samplers = {n for n, info in CLASSIFICATION_METHODS.items() if info.uses_sampler}
    assert samplers == NUTS_METHODS
    for name, info in CLASSIFICATION_METHODS.items():
        assert info.task == "classification"
        assert isinstance(info.description, str) and info.description
        assert "\n" not in info.description
        clf = make_method(name, sources[2])  # a SourceClassifier selects this registry
        assert is_classifier(clf), name
        twin = clone(clf)
        assert twin is not clf and twin.get_params().keys() == clf.get_params().keys()
    pc = make_method("pc-scale", sources[2])
    assert isinstance(pc, PCTransferClassifier) and pc.prior == "scale" and not pc.progress_bar


@pytest.mark.parametrize("name", BASELINES)
def test_clone_get_params_and_not_fitted(sources, name):
    clf = _build(name, sources[3])
    params = clf.get_params()
    assert params["source"] is sources[3]
    assert all(params[k] == v for k, v in OPTIONS[name].items())
    twin = clone(clf)  # clone deep-copies the source (not an estimator)
    assert twin is not clf and type(twin) is type(clf)
    assert twin.get_params().keys() == params.keys()
    assert all(twin.get_params()[k] == v for k, v in OPTIONS[name].items())
    X = _inputs(3, 0)
    for method in (clf.predict, clf.predict_proba, clf.predict_log_proba):
        with pytest.raises(NotFittedError):
            method(X)
    if hasattr(type(clf), "sampler_diagnostics_"):
        with pytest.raises(NotFittedError):
            _ = clf.sampler_diagnostics_


def test_multi_task_parameters_include_its_source_rows(sources):
    Xs = _inputs(5, 1)
    clf = MultiTaskClassifier(sources[2], source_X=Xs, source_y=np.zeros(5), base="rf")
    params = clf.get_params()
    assert params["source_X"] is Xs and params["max_source_rows"] == 1000
    assert params["base"] == "rf" and params["hidden"] == (16,)
    assert np.array_equal(clone(clf).get_params()["source_X"], Xs)


# --------------------------------------------------------------------------------------------
# every method on the binary task where the source is right
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_binary_fit_gives_probabilities(binary_fits, source_right, name):
    clf = binary_fits[name]
    X, _, Xt, _ = source_right
    _check_probabilities(clf, Xt[:50], np.array([0, 1]))
    assert clf.n_features_in_ == 4 and clf.fit_seconds_ > 0
    if name in NUTS_METHODS:
        post = clf.idata_.posterior
        assert post.sizes["chain"] == 2 and post.sizes["draw"] == 75
        ll = clf.idata_.log_likelihood["y"]
        assert ll.shape == (2, 75, X.shape[0]) and np.all(np.asarray(ll) <= 0)
        assert set(np.unique(clf.idata_.posterior_predictive["y"])) <= {0, 1}
        assert "max_rhat" in clf.sampler_diagnostics_


def test_source_only_is_the_source_exactly(sources, binary_fits, source_right, shifted):
    """Guards the column order and the class mapping: the probabilities are the source's,
    bit for bit, under integer and string labels."""
    Xt = source_right[2]
    assert np.array_equal(
        binary_fits["source-only"].predict_proba(Xt), sources[2].predict_proba(Xt)
    )
    X, y, Xt3, _ = shifted
    clf = SourceOnlyClassifier(sources[3]).fit(X, y)
    assert np.array_equal(clf.predict_proba(Xt3), sources[3].predict_proba(Xt3))
    assert np.array_equal(clf.predict(Xt3), LABELS3[sources[3].predict(Xt3)])


def test_target_only_learns_from_the_target_rows(binary_fits, source_right):
    """Target-only network, forest and boosted trees against the class frequencies of the 40
    training rows (the best constant predictor they could fall back to). Measured: network
    0.548, forest 0.512, boosting 0.525, constant 0.704 nats per row; required margin 0.05, a
    third of the smallest gap. Fails when the labels are shuffled before the fit (checked)."""
    _, y, Xt, yt = source_right
    rate = np.clip(np.mean(y), 0.01, 0.99)
    constant = float(log_loss(yt, np.tile([1 - rate, rate], (len(yt), 1))))
    net = _test_log_loss(binary_fits["target-only"], Xt, yt)
    forest = _test_log_loss(binary_fits["forest"], Xt, yt)
    boosting = _test_log_loss(binary_fits["boosting"], Xt, yt)
    assert net < constant - 0.05, (net, constant)
    assert forest < constant - 0.05, (forest, constant)
    assert boosting < constant - 0.05, (boosting, constant)


@pytest.mark.parametrize(
    ("name", "reference", "margin"),
    [
        # measured log loss of the method against its reference (nats per row)
        ("fine-tuning", "target-only", 0.05),  # 0.394 vs 0.548
        ("pretrained-gaussian", "target-only", 0.05),  # 0.433 vs 0.548
        ("bayes-last-layer", "target-only", 0.05),  # 0.386 vs 0.548
        ("difference-bnn", "target-only", 0.05),  # 0.394 vs 0.548
        ("multitask-bnn", "target-only", 0.015),  # 0.504 vs 0.548
        ("latent-bnn", "target-only", 0.015),  # 0.506 vs 0.548
        ("multitask-rf", "forest", 0.015),  # 0.456 vs 0.512
        ("difference-rf", "forest", 0.015),  # 0.459 vs 0.512
        ("latent-rf", "forest", 0.015),  # 0.466 vs 0.512
        ("multitask-gbt", "boosting", 0.013),  # 0.484 vs 0.525
        ("difference-gbt", "boosting", 0.013),  # 0.486 vs 0.525
        ("latent-gbt", "boosting", 0.006),  # 0.506 vs 0.525
    ],
)
def test_transfer_beats_target_only_where_the_source_is_right(
    binary_fits, source_right, name, reference, margin
):
    """Each transfer method against the target-only method of its base learner, in test log
    loss, on 40 target rows labelled by the source itself. Measured values beside the
    parameters; the margin is at most a third of the measured gap (0.05 where it is above
    0.1, 0.015 where it is 0.04–0.06). Checked to fail when the method's use of the source is
    removed (prior centred at 0, fine-tuning from random weights, the source's logits or
    probabilities replaced by zeros, noise or the uniform, source labels shuffled), except
    bayes-last-layer: centring its head at 0 still passes (the learned scale lets the frozen
    source features carry the transfer), so that case guards the source features only."""
    _, _, Xt, yt = source_right
    ours = _test_log_loss(binary_fits[name], Xt, yt)
    theirs = _test_log_loss(binary_fits[reference], Xt, yt)
    assert ours < theirs - margin, (ours, theirs)


def test_difference_with_a_vanishing_correction_is_the_source(sources, source_right):
    """``prior_scale = 1e-4`` pins the correction network's weights to within about 1e-4 of 0
    (40 rows cannot move a prior that narrow), so the fitted difference model must give the
    source's probabilities to 1e-3; it fails when the source's logits are dropped from the
    sum (checked)."""
    X, y, Xt, _ = source_right
    labels = np.array(["metal", "nonmetal"])
    clf = _build("difference-bnn", sources[2], prior_scale=1e-4).fit(X, labels[y])
    assert np.array_equal(clf.classes_, labels)
    p = clf.predict_proba(Xt)
    assert np.max(np.abs(p - sources[2].predict_proba(Xt))) < 1e-3


# --------------------------------------------------------------------------------------------
# the three-class task with string labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [pytest.param(m, marks=pytest.mark.slow) if m in NUTS_METHODS else m for m in BASELINES]
    + [pytest.param(m, marks=pytest.mark.slow) for m in ("pc-last-layer", "pc-scale")],
)
def test_three_class_fit_with_string_labels(sources, shifted, name):
    X, y, Xt, yt = shifted
    clf = _build(name, sources[3]).fit(X, y)
    _check_probabilities(clf, Xt, LABELS3)
    loss = _test_log_loss(clf, Xt, yt)
    assert np.isfinite(loss) and loss < np.log(3), loss


# --------------------------------------------------------------------------------------------
# inputs and parameters
# --------------------------------------------------------------------------------------------


def test_dataframe_feature_names(sources, source_right):
    X, y, Xt, _ = source_right
    cols = ["a", "b", "c", "d"]
    clf = _build("latent-rf", sources[2]).fit(pd.DataFrame(X, columns=cols), y)
    assert list(clf.feature_names_in_) == cols
    p = clf.predict_proba(pd.DataFrame(Xt[:5], columns=cols))
    assert p.shape == (5, 2) and np.allclose(p.sum(axis=1), 1)
    with pytest.raises(ValueError, match="feature names"):
        clf.predict_proba(pd.DataFrame(Xt[:5], columns=["a", "b", "c", "e"]))
    clf.fit(X, y)
    assert not hasattr(clf, "feature_names_in_")


def test_bad_data_is_refused(sources, source_right):
    X, y, _, _ = source_right
    clf = SourceOnlyClassifier(sources[2])
    with pytest.raises(ValueError, match="features"):
        clf.fit(X[:, :3], y)
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(np.where(np.arange(4) == 2, np.nan, X), y)
    with pytest.raises(ValueError, match="mismatched"):
        clf.fit(X, y[:-1])
    with pytest.raises(ValueError, match="3 classes"):
        clf.fit(X, np.arange(len(y)) % 3)
    with pytest.raises(ValueError, match="two distinct"):
        TargetOnlyClassifier(base="rf").fit(X, np.zeros(len(y)))
    with pytest.raises(ValueError, match="SourceClassifier"):
        DifferenceClassifier(None, base="rf").fit(X, y)
    fitted = clf.fit(X, y)
    with pytest.raises(ValueError, match="features"):
        fitted.predict_proba(X[:, :3])
    with pytest.raises(ValueError, match="2 target rows of every class"):
        TargetOnlyClassifier(base="rf").fit(X, np.r_[1, np.zeros(len(y) - 1)])
    # calibration="none": one forest, no folds, so one row of a class is enough
    TargetOnlyClassifier(base="rf", calibration="none", **FOREST).fit(
        X, np.r_[1, np.zeros(len(y) - 1)]
    )


@pytest.mark.parametrize(
    ("cls", "params", "match"),
    [
        (TargetOnlyClassifier, {"base": "svm"}, "base"),
        (TargetOnlyClassifier, {"prior_scale": -1.0}, "prior_scale"),
        (TargetOnlyClassifier, {"hidden": (0,)}, "hidden"),
        (TargetOnlyClassifier, {"num_chains": 0}, "num_chains"),
        (TargetOnlyClassifier, {"target_accept_prob": 1.0}, "target_accept_prob"),
        (TargetOnlyClassifier, {"chain_method": "parallel"}, "chain_method"),
        (TargetOnlyClassifier, {"base": "rf", "calibration": "platt"}, "calibration"),
        (TargetOnlyClassifier, {"base": "rf", "cv": 1}, "cv"),
        (TargetOnlyClassifier, {"base": "rf", "n_estimators": 0}, "n_estimators"),
        (TargetOnlyClassifier, {"base": "gbt", "learning_rate": 0.0}, "learning_rate"),
        (TargetOnlyClassifier, {"base": "gbt", "min_samples_leaf": 0}, "min_samples_leaf"),
        (MultiTaskClassifier, {"max_source_rows": 0}, "max_source_rows"),
    ],
)
def test_bad_parameters_are_named(sources, source_right, cls, params, match):
    X, y, _, _ = source_right
    with pytest.raises(ValueError, match=match):
        cls(sources[2], **params).fit(X, y)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fine-tuning", {"learning_rate": 0.0}, "learning_rate"),
        ("fine-tuning", {"validation_fraction": 1.5}, "validation_fraction"),
        ("fine-tuning", {"transfer_layers": ["nope"]}, "transfer_layers"),
        ("pretrained-gaussian", {"prior_scale": 0.0}, "prior_scale"),
        ("bayes-last-layer", {"tau_scale": -2.0}, "tau_scale"),
    ],
)
def test_bad_parameters_of_the_source_network_methods(sources, source_right, name, params, match):
    X, y, _, _ = source_right
    with pytest.raises(ValueError, match=match):
        CLASSIFICATION_METHODS[name].build(sources[2], **params).fit(X, y)


def test_multi_task_source_rows(sources, source_right):
    """Source rows from the constructor or from fit (not both), labels checked against the
    source's classes, at most max_source_rows of them."""
    X, y, _, _ = source_right
    Xs = _inputs(200, 5)
    ys = sources[2].predict(Xs)
    clf = MultiTaskClassifier(sources[2], base="rf", max_source_rows=150, **FOREST)
    clf.fit(X, y, source_X=Xs, source_y=ys)
    assert (clf.n_source_rows_, clf.n_target_rows_) == (150, len(y))
    clf.set_params(source_X=Xs, source_y=ys).fit(X, y)
    assert clf.n_source_rows_ == 150
    with pytest.raises(ValueError, match="not both"):
        clf.fit(X, y, source_X=Xs, source_y=ys)
    clf.set_params(source_X=None, source_y=None)
    with pytest.raises(ValueError, match="together"):
        clf.fit(X, y, source_X=Xs)
    with pytest.raises(ValueError, match="not one of the source's classes"):
        clf.fit(X, y, source_X=Xs, source_y=np.full(200, 7))
    with pytest.raises(ValueError, match="mismatched"):
        clf.fit(X, y, source_X=Xs, source_y=ys[:-1])
    clf.fit(X, y)  # the source's reference inputs with drawn labels
    assert clf.n_source_rows_ == 150


# --------------------------------------------------------------------------------------------
# batched fitting (one vmapped NUTS job for many replicates)
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pcbtl.inference.SamplerWarning")  # short chains
@pytest.mark.parametrize(
    "name",
    # the multi-task network's batched path (44 s of this test with the others) is opt-in; the
    # other two cover a baseline with its own attributes and a PC classifier
    ["bayes-last-layer", pytest.param("multitask-bnn", marks=pytest.mark.slow), "pc-last-layer"],
)
def test_replicates_fit_as_one_batch_like_alone(name, sources, binary_fits, source_right):
    """fit_replicates samples the NUTS classifiers of two data sets in one job: each replicate's
    probabilities are those of its own fit alone (same seed and data: the same plan, so the
    same draws up to floating point; 0.0000 measured, allowed 0.02 mean absolute difference,
    a tenth of the gap to the other replicate's fit, 0.16–0.39 measured), and the whole fit is
    stored (classes, the subclass attributes, feature names of a DataFrame)."""
    from pcbtl.estimators.registry import fit_replicates, supports_batching

    X, y, Xt, _ = source_right
    X2 = _inputs(40, 41)
    y2 = 1 - _draw(sources[2].predict_proba(X2), 42)  # labels opposite to the source's
    cols = ["a", "b", "c", "d"]
    data = [(pd.DataFrame(X, columns=cols), y), (X2, y2)]
    assert not supports_batching(_build("latent-rf", sources[2]))
    assert not supports_batching(_build("fine-tuning", sources[2]))
    alone = binary_fits.get(name) or _build(name, sources[2]).fit(X, y)
    ests = [_build(name, sources[2], seed=0), _build(name, sources[2], seed=1)]
    assert all(supports_batching(e) for e in ests), name
    fit_replicates(ests, data)
    assert all(e.batched_ for e in ests), name
    p0 = ests[0].predict_proba(pd.DataFrame(Xt, columns=cols))[:, 1]
    p1 = ests[1].predict_proba(Xt)[:, 1]
    same = np.abs(p0 - alone.predict_proba(Xt)[:, 1]).mean()
    other = np.abs(p1 - p0).mean()
    assert same < 0.02 and same < 0.1 * other, (name, same, other)
    assert list(ests[0].feature_names_in_) == cols and not hasattr(ests[1], "feature_names_in_")
    for est in ests:
        assert np.array_equal(est.classes_, [0, 1]) and est.fit_seconds_ > 0
        assert est.idata_.posterior.sizes["chain"] == NUTS["num_chains"]
    if name == "bayes-last-layer":
        assert ests[1].tau_.shape == (NUTS["num_chains"] * NUTS["num_samples"],)
    if name == "multitask-bnn":
        assert (ests[1].n_source_rows_, ests[1].n_target_rows_) == (300, 40)
    if name == "pc-last-layer":
        assert ests[0].distance_.shape == (NUTS["num_chains"] * NUTS["num_samples"],)


def test_boosted_scores_reach_platt_scaling_unclipped():
    """Platt scaling of boosted trees sees the booster's own log-odds: on separable data 200
    iterations give |log-odds| far beyond log(1000) = 6.9, where the forests' probabilities are
    clipped (at 1e-3). Clipping them flattened the most confident rows of the metallicity task
    before the calibration map (pooled ECE 0.023 against 0.015 unclipped). Fails when the
    boosted learner's scores are clipped like the forest's (checked)."""
    from pcbtl.estimators.classification_baselines import _ForestLearner

    X = _inputs(300, 5)
    y = (X[:, 0] > 0).astype(int)
    gbt = _ForestLearner(200, 5, kind="gbt", learning_rate=0.1).fit(X, y)
    scores = gbt.decision_function(X)
    assert np.allclose(scores, gbt.forest_.decision_function(X))
    assert np.max(np.abs(scores)) > 10.0
    rf = _ForestLearner(50, 2).fit(X, y)
    assert np.max(np.abs(rf.decision_function(X))) <= np.log(1000) + 1e-9
