"""scikit-learn conformance, table-driven over every estimator of the package.

Each estimator (the two PC priors, and every method of :func:`pcbtl.methods` built by
:func:`pcbtl.make_method`) is cloned, checked for its tags and its unfitted error, fitted once
inside a ``Pipeline`` and pickled with its predictions compared; one cheap estimator goes through
``cross_validate`` and ``GridSearchCV``; the composition featurizer feeds a transfer model in a
``Pipeline`` of formulas; and scikit-learn's own ``check_estimator`` runs on the last-layer PC
estimator with the checks it cannot pass listed with their reasons.
"""

from __future__ import annotations

import io
import pickle

import jax
import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone, is_regressor
from sklearn.exceptions import NotFittedError
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import check_estimator
from sklearn.utils.validation import check_is_fitted
from tiny_methods import TINY_NUTS, TINY_ROWS, TINY_TEST, tiny_options

import pcbtl
from pcbtl.materials.features import CompositionFeaturizer, StructureFeaturizer
from pcbtl.networks import SourceModel

# tiny sampler settings: the scikit-learn interface is under test, not the statistics (those of
# test_methods.py, on the same rows where a test fits once: the same compiled samplers)
NUTS = TINY_NUTS
OPTIONS = tiny_options(NUTS)
PC = {"progress_bar": False, **NUTS}
ESTIMATORS = ["PCTransferRegressor-last_layer", "PCTransferRegressor-scale", *OPTIONS]

# 60 warm-up steps leave NUTS untuned: its diagnostics (divergences, R-hat over 2 short chains)
# warn with a SamplerWarning, which says nothing about the scikit-learn interface under test
quiet_sampler = pytest.mark.filterwarnings("ignore::pcbtl.inference.SamplerWarning")


def _build(name: str, source: SourceModel):
    if name == "PCTransferRegressor-last_layer":
        return pcbtl.PCTransferRegressor(source, prior="last_layer", **PC)
    if name == "PCTransferRegressor-scale":
        return pcbtl.PCTransferRegressor(
            source, prior="scale", max_reference=300, n_eps=8, n_tau=16, **PC
        )
    return pcbtl.make_method(name, source, **OPTIONS[name])


def _same(a, b) -> bool:
    """Parameter values equal: arrays by value, source models field by field."""
    if isinstance(a, SourceModel) and isinstance(b, SourceModel):
        leaves = [
            np.array_equal(np.asarray(x), np.asarray(z))
            for x, z in zip(
                jax.tree_util.tree_leaves(a.params),
                jax.tree_util.tree_leaves(b.params),
                strict=True,
            )
        ]
        return (
            all(leaves)
            and np.array_equal(a.reference_X, b.reference_X)
            and (a.hidden, a.activation, a.y_mean, a.y_scale, a.noise_sd)
            == (b.hidden, b.activation, b.y_mean, b.y_scale, b.noise_sd)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("name", ESTIMATORS)
def test_clone_get_set_params_and_repr(name, source):
    est = _build(name, source)
    params = est.get_params()
    twin = clone(est)
    assert type(twin) is type(est) and twin is not est
    assert set(twin.get_params()) == set(params)
    for key, value in twin.get_params().items():
        assert _same(value, params[key]), key
    assert repr(twin) == repr(est)
    assert repr(est).startswith(type(est).__name__ + "(")
    if params.get("num_samples") == 30:  # set in OPTIONS: shown, as every non-default
        assert "num_samples=30" in repr(est)
        assert twin.set_params(num_samples=12) is twin
        assert twin.get_params()["num_samples"] == 12 and est.get_params()["num_samples"] == 30


@pytest.mark.parametrize("name", ESTIMATORS)
def test_regressor_tags_and_not_fitted_error(name, source, task):
    est = _build(name, source)
    assert is_regressor(est)
    with pytest.raises(NotFittedError, match="not fitted"):
        est.predict(task.X_test[:5])
    with pytest.raises(NotFittedError):
        check_is_fitted(est)


def test_parameters_are_checked_in_fit_not_in_init(source, task):
    est = pcbtl.PCTransferRegressor(source, U=-1.0, prior="gaussian", **PC)  # stored as given
    assert est.get_params()["U"] == -1.0
    with pytest.raises(ValueError, match="prior must"):
        est.fit(task.X_target, task.y_target)
    with pytest.raises(ValueError, match="U must be"):
        est.set_params(prior="last_layer").fit(task.X_target, task.y_target)
    with pytest.raises(ValueError, match="source"):
        pcbtl.PCTransferRegressor("not a model").fit(task.X_target, task.y_target)


#: the Bayesian-network baselines share one NumPyro network model: bayes-last-layer and
#: difference-bnn stand for them by default, the others (15-40 s each) run with -m slow
PIPELINE_OPT_IN = ("target-only", "pretrained-gaussian", "multitask-bnn", "latent-bnn", "latent-rf")


@quiet_sampler
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in PIPELINE_OPT_IN else n for n in ESTIMATORS],
)
def test_pipeline_fit_predict_score_and_pickle(name, source, task):
    X, y = task.X_target[:TINY_ROWS], task.y_target[:TINY_ROWS]
    Xt = task.X_test[:TINY_TEST]
    pipe = Pipeline([("scale", FunctionTransformer()), ("m", _build(name, source))])
    assert pipe.fit(X, y) is pipe
    est = pipe.named_steps["m"]
    check_is_fitted(est)
    assert est.n_features_in_ == 3 and not hasattr(est, "feature_names_in_")
    mu, sd = pipe.predict(Xt, return_std=True)
    assert mu.shape == sd.shape == (50,) and np.all(np.isfinite(mu)) and np.all(sd > 0)
    yt = task.y_test[:TINY_TEST]
    assert pipe.score(Xt, yt) == pytest.approx(r2_score(yt, mu))
    # a fitted estimator survives pickling (its compiled functions are rebuilt on load), alone
    # and inside the pipeline, with the same predictions to the last bit
    again = pickle.loads(pickle.dumps(est))
    mu2, sd2 = again.predict(Xt, return_std=True)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sd2, sd)
    lo, hi = est.predict_interval(Xt)
    lo2, hi2 = again.predict_interval(Xt)
    np.testing.assert_array_equal(lo2, lo)
    np.testing.assert_array_equal(hi2, hi)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pipe)).predict(Xt), mu)
    buffer = io.BytesIO()
    joblib.dump(pipe, buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(joblib.load(buffer).predict(Xt), mu)
    # pickling does not disturb the original
    np.testing.assert_array_equal(est.predict(Xt), mu)


@quiet_sampler
def test_dataframe_feature_names(source, task):
    cols = ["a", "b", "c"]
    X = pd.DataFrame(task.X_target[:TINY_ROWS], columns=cols)
    est = pcbtl.make_method("pc-last-layer", source, **OPTIONS["pc-last-layer"]).fit(
        X, task.y_target[:TINY_ROWS]
    )
    assert list(est.feature_names_in_) == cols and est.n_features_in_ == 3
    Xt = pd.DataFrame(task.X_test[:20], columns=cols)
    mu = est.predict(Xt)
    assert mu.shape == (20,) and np.all(np.isfinite(mu))
    with pytest.raises(ValueError, match="feature names"):
        est.predict(Xt.rename(columns={"a": "z"}))
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        est.predict(task.X_test[:20])
    # a refit on an array forgets the names
    est.fit(task.X_target[:TINY_ROWS], task.y_target[:TINY_ROWS])
    assert not hasattr(est, "feature_names_in_")


@quiet_sampler
def test_cross_validate_and_grid_search(source, task):
    est = pcbtl.make_method("pc-last-layer", source, **OPTIONS["pc-last-layer"])
    X, y = task.X_target, task.y_target
    cv = cross_validate(est, X, y, cv=2, error_score="raise", return_estimator=True)
    assert cv["test_score"].shape == (2,) and np.all(np.isfinite(cv["test_score"]))
    assert all(e is not est and hasattr(e, "posterior_") for e in cv["estimator"])
    assert not hasattr(est, "posterior_")  # the estimator itself stays unfitted
    grid = GridSearchCV(est, {"U": [1.0, 4.0]}, cv=2, error_score="raise").fit(X, y)
    assert grid.best_params_["U"] in (1.0, 4.0)
    assert len(grid.cv_results_["params"]) == 2
    assert grid.best_estimator_.U == grid.best_params_["U"]
    assert grid.predict(task.X_test[:10]).shape == (10,)


@quiet_sampler
def test_hurdle_is_an_estimator_and_pickles(source, task):
    reg = pcbtl.PCTransferRegressor(source, **PC)
    hurdle = pcbtl.HurdleRegressor(reg, calibration=None)
    assert is_regressor(hurdle)
    assert clone(hurdle).get_params()["regressor__num_samples"] == NUTS["num_samples"]
    with pytest.raises(NotFittedError):
        hurdle.predict(task.X_test[:5])
    X = task.X_target
    y = np.maximum(task.y_target - np.median(task.y_target), 0.0)  # half the rows exactly 0
    assert hurdle.fit(X, y) is hurdle
    assert not hasattr(reg, "posterior_")  # the regressor parameter is cloned, not fitted
    mu = hurdle.predict(task.X_test[:30])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(hurdle)).predict(task.X_test[:30]), mu)


# ---------------------------------------------------------------------------------------------
# featurizers as transformers
# ---------------------------------------------------------------------------------------------

FORMULAS = ["Fe2O3", "NaCl", "GaAs", "SiO2"]


def test_composition_featurizer_is_a_transformer():
    feat = CompositionFeaturizer(stats=("mean", "max"))
    assert feat.fit(FORMULAS) is feat
    X = feat.transform(FORMULAS)
    np.testing.assert_array_equal(X, feat.featurize(FORMULAS).X)
    np.testing.assert_array_equal(feat.fit_transform(FORMULAS), X)
    names = feat.get_feature_names_out()
    assert list(names) == feat.feature_names and len(names) == X.shape[1]
    assert clone(feat).get_params()["stats"] == ("mean", "max")
    # a Series and a one-column DataFrame (what ColumnTransformer passes) work too
    np.testing.assert_array_equal(feat.transform(pd.Series(FORMULAS)), X)
    np.testing.assert_array_equal(feat.transform(pd.DataFrame({"formula": FORMULAS})), X)
    frame = clone(feat).set_output(transform="pandas").fit_transform(pd.Series(FORMULAS))
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(names)
    np.testing.assert_array_equal(frame.to_numpy(), X)
    # the saved description still round-trips; bad parameters raise in fit, not in __init__
    again = CompositionFeaturizer.from_dict(feat.to_dict())
    np.testing.assert_array_equal(again.transform(FORMULAS), X)
    bad = CompositionFeaturizer(stats=("median",))
    with pytest.raises(ValueError, match="unknown statistics"):
        bad.fit(FORMULAS)
    assert pickle.loads(pickle.dumps(feat)).transform(FORMULAS).shape == X.shape


def test_structure_featurizer_is_a_transformer():
    from ase.build import bulk

    crystals = [bulk("Si", "diamond", a=5.431), bulk("Cu", "fcc", a=3.615)]
    feat = StructureFeaturizer()
    assert feat.fit(crystals) is feat
    X = feat.transform(crystals)
    assert list(feat.get_feature_names_out()) == feat.feature_names and X.shape[1] == len(
        feat.feature_names
    )
    assert clone(feat).get_params()["composition"] is None
    frame = StructureFeaturizer().set_output(transform="pandas").fit_transform(crystals)
    np.testing.assert_array_equal(frame.to_numpy(), X)
    with pytest.raises(ValueError, match="nn_tolerance"):
        StructureFeaturizer(nn_tolerance=-1.0).fit(crystals)


@pytest.fixture(scope="module")
def formula_task():
    """200 random binary formulas ``A_a B_b``, their composition features and a synthetic
    target (electronegativity difference and mean row, plus noise), and a tiny source trained
    on the first 150."""
    rng = np.random.default_rng(0)
    elements = ["Li", "Na", "K", "Mg", "Ca", "Al", "Ga", "Zn", "O", "S", "Se", "N", "F", "Cl"]
    formulas = []
    for _ in range(200):
        a, b = rng.choice(elements, 2, replace=False)
        formulas.append(f"{a}{rng.integers(1, 4)}{b}{rng.integers(1, 4)}")
    feat = CompositionFeaturizer()
    F = feat.transform(formulas)
    names = feat.feature_names
    y = (
        F[:, names.index("range_Electronegativity")]
        + 0.3 * F[:, names.index("mean_Row")]
        + 0.05 * rng.standard_normal(len(formulas))
    )
    source = pcbtl.train_source(
        F[:150], y[:150], hidden=(16, 16), seed=0, max_epochs=60, progress_bar=False
    )
    return formulas, y, source


@quiet_sampler
def test_featurizer_and_transfer_model_in_one_pipeline(formula_task):
    formulas, y, source = formula_task
    pipe = Pipeline(
        [
            ("features", CompositionFeaturizer()),
            ("m", pcbtl.PCTransferRegressor(source, **PC)),
        ]
    )
    pipe.fit(formulas[150:180], y[150:180])
    pred = pipe.predict(formulas[180:])
    assert pred.shape == (20,) and np.all(np.isfinite(pred))
    # with pandas output the regressor sees (and records) the featurizer's column names
    pipe_df = clone(pipe).set_output(transform="pandas").fit(formulas[150:180], y[150:180])
    names = list(pipe_df.named_steps["features"].get_feature_names_out())
    assert list(pipe_df.named_steps["m"].feature_names_in_) == names
    np.testing.assert_allclose(pipe_df.predict(formulas[180:]), pred)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pipe)).predict(formulas[180:]), pred)


# ---------------------------------------------------------------------------------------------
# scikit-learn's own estimator checks
# ---------------------------------------------------------------------------------------------


SOURCE_WIDTH = (
    "the source network fixes the number of input features (3 here) and the check fits on "
    "data of another width"
)
#: the scikit-learn checks the last-layer PC regressor does not pass, and why
EXPECTED_FAILED_CHECKS = {
    **dict.fromkeys(
        [
            "check_dtype_object",
            "check_estimators_dtypes",
            "check_estimators_fit_returns_self",
            "check_estimators_overwrite_params",
            "check_fit2d_1feature",
            "check_fit2d_1sample",
            "check_fit_check_is_fitted",
            "check_fit_idempotent",
            "check_n_features_in",
            "check_n_features_in_after_fitting",
            "check_positive_only_tag_during_fit",
            "check_readonly_memmap_input",
            "check_regressor_data_not_an_array",
            "check_regressors_int",
            "check_regressors_no_decision_function",
            "check_regressors_train",
        ],
        SOURCE_WIDTH,
    ),
    "check_complex_data": "complex X is cast to float (a NumPy ComplexWarning), not rejected",
    "check_estimator_sparse_array": "sparse X is rejected as not numeric, without 'sparse'",
    "check_estimator_sparse_matrix": "sparse X is rejected as not numeric, without 'sparse'",
    "check_estimator_sparse_tag": "sparse X is rejected as not numeric, without 'sparse'",
    "check_estimators_empty_data_messages": "pcbtl's own message for 0 features or rows",
    "check_fit2d_predict1d": "pcbtl's own message for a 1-D X ('X must be 2-D')",
    "check_methods_subset_invariance": (
        "the float32 source network's features round differently with the batch size "
        "(relative differences near 1e-7, the check's tolerance)"
    ),
    "check_requires_y_none": "pcbtl's own message for y=None ('y must be a numeric array')",
    "check_supervised_y_2d": "a column y is flattened without a DataConversionWarning",
}


# a few checks skip themselves (array API without SCIPY_ARRAY_API) and say so with a
# SkipTestWarning; the tiny sampler settings warn as above
@pytest.mark.slow  # about 30 s of the default run's 15-minute budget; opt-in with -m slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
@quiet_sampler
def test_check_estimator_on_the_last_layer_pc_regressor(source):
    est = pcbtl.PCTransferRegressor(
        source, progress_bar=False, num_warmup=10, num_samples=10, num_chains=2
    )
    results = check_estimator(est, expected_failed_checks=EXPECTED_FAILED_CHECKS, on_fail=None)
    failed = {r["check_name"]: str(r["exception"]) for r in results if r["status"] == "failed"}
    assert not failed, failed
    status = {r["check_name"]: r["status"] for r in results}
    for name in (
        "check_estimator_cloneable",
        "check_estimator_repr",
        "check_no_attributes_set_in_init",
        "check_estimators_unfitted",
        "check_estimators_pickle",
        "check_pipeline_consistency",
        "check_get_params_invariance",
        "check_set_params",
        "check_dont_overwrite_parameters",
    ):
        assert status[name] == "passed", name
