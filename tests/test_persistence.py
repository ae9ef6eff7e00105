"""Saving and loading fitted estimators without pickle (:mod:`pcbtl.estimators.persistence`).

Every method of :func:`pcbtl.methods` (the three PC priors among them), the PC regressor under
SVI, the hurdle model with its calibrated boosted classifier and the PC classifier (both priors)
are fitted once on tiny data, then saved and loaded, pickled and put through joblib: every
prediction must come back bit for bit. Then: a source left out of the file and passed back,
a wrong source, damaged and forged files, that no member needs pickle, what cannot be saved, and
the model files of a batch job (:func:`pcbtl.jobs.batch.load_fit`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import textwrap
import types
import zipfile
from pathlib import Path

import jax
import joblib
import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from tiny_methods import TINY_NUTS, TINY_ROWS, TINY_TEST, tiny_options

import pcbtl
from pcbtl import PCTransferClassifier, train_source_classifier
from pcbtl.estimators.persistence import (
    FORMAT_VERSION,
    load_estimator,
    registered_classes,
    save_estimator,
    source_fingerprint,
)
from pcbtl.inference import idata_group, idata_groups
from pcbtl.jobs import batch

# tiny sampler settings: the round trip is under test, not the statistics
NUTS = TINY_NUTS
OPTIONS = tiny_options(NUTS)
PC = {"progress_bar": False, **NUTS}

pytestmark = pytest.mark.filterwarnings(
    # 10 warm-up steps leave NUTS untuned, and the tiny forests reproduce some labels
    "ignore::pcbtl.inference.SamplerWarning",
    "ignore::pcbtl.priors.PriorDataConflictWarning",
    "ignore:the forest's out-of-bag error:UserWarning",
)


@pytest.fixture(scope="module")
def small(task):
    """The shared task of tests/conftest.py at the rows test_methods.py fits (its compiled
    samplers are then read from the test run's JAX cache, see tests/tiny_methods.py)."""
    return task._replace(
        X_target=task.X_target[:TINY_ROWS],
        y_target=task.y_target[:TINY_ROWS],
        X_test=task.X_test[:TINY_TEST],
        y_test=task.y_test[:TINY_TEST],
        f_test=task.f_test[:TINY_TEST],
    )


@pytest.fixture(scope="module")
def src(source):
    return source


@pytest.fixture(scope="module")
def fitted(small, src):
    """Estimators fitted on first use, by name, shared by the tests of this module."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            if name == "pc-svi":
                est = pcbtl.PCTransferRegressor(src, inference="svi", svi_steps=50, **PC)
            else:
                est = pcbtl.make_method(name, src, **OPTIONS[name])
            cache[name] = est.fit(small.X_target, small.y_target)
        return cache[name]

    return get


def _outputs(est, X) -> list[np.ndarray]:
    """Every prediction the estimator offers at ``X`` (seeded where random)."""
    out = [*est.predict(X, return_std=True), *est.predict_interval(X, level=0.9)]
    if hasattr(est, "posterior_"):
        out.append(est.sample_posterior_predictive(X, seed=3))
    if isinstance(est, pcbtl.HurdleRegressor):
        out.append(est.predict_proba_zero(X))
        out.append(est.sample_posterior_predictive(X, seed=3))
    return [np.asarray(a) for a in out]


def _assert_same_outputs(a, b, X) -> None:
    for u, v in zip(_outputs(a, X), _outputs(b, X), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


def _assert_same_state(a, b, where: str = "est") -> None:
    """Two states equal leaf by leaf: same types, arrays of the same dtype and values (NaN equal
    to NaN), source models of the same fingerprint; ArviZ objects are compared elsewhere."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, pcbtl.SourceModel | pcbtl.classification.SourceClassifier):
        assert source_fingerprint(a) == source_fingerprint(b), where
        leaves = zip(
            jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params), strict=True
        )
        assert all(type(u) is type(v) for u, v in leaves), f"{where}.params"
    elif isinstance(a, np.ndarray | jax.Array | np.generic):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), where
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(u, v, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b or (np.isnan(a) and np.isnan(b)), where
    elif a is None or isinstance(a, bool | int | str | type | types.FunctionType):
        assert a == b, where
    elif type(a).__name__ in ("InferenceData", "DataTree"):
        pass
    elif isinstance(a, np.random.Generator):
        assert a.bit_generator.state == b.bit_generator.state, where
    else:  # an object: what pickle would store of it
        ra, rb = a.__reduce_ex__(4), b.__reduce_ex__(4)
        assert ra[0] is rb[0], where
        _assert_same_state(list(ra[1:3]), list(rb[1:3]), f"{where}.<state>")


def _round_trips(est, path: Path):
    assert est.save(path) == path  # the estimators' own methods (Persistable)
    buffer = io.BytesIO()
    joblib.dump(est, buffer)
    buffer.seek(0)
    return {
        "save/load": type(est).load(path),
        "pickle": pickle.loads(pickle.dumps(est)),
        "joblib": joblib.load(buffer),
    }


# --------------------------------------------------------------------------------------------
# round trips with equal predictions
# --------------------------------------------------------------------------------------------


#: round-tripped in the default run; the other methods' round trips are opt-in (``-m slow``):
#: each needs its own NUTS compile, and these cover every kind of state (point fits, forests,
#: the three PC priors, SVI)
_DEFAULT_ROUND_TRIPS = ("source-only", "fine-tuning", "pc-last-layer", "pc-scale", "pc-tangent")
_DEFAULT_ROUND_TRIPS += ("multitask-rf", "latent-rf", "pc-svi")


@pytest.mark.parametrize(
    "name",
    [
        n if n in _DEFAULT_ROUND_TRIPS else pytest.param(n, marks=pytest.mark.slow)
        for n in [*pcbtl.methods(), "pc-svi"]
    ],
)
def test_every_method_round_trips_with_equal_predictions(name, fitted, small, tmp_path):
    est = fitted(name)
    X = small.X_test
    for how, again in _round_trips(est, tmp_path / "m.npz").items():
        assert type(again) is type(est), how
        assert repr(again) == repr(est), how
        _assert_same_outputs(est, again, X)
    loaded = load_estimator(tmp_path / "m.npz")
    _assert_same_state(est.__getstate__(), loaded.__getstate__())
    assert loaded.score(X, small.y_test) == est.score(X, small.y_test)
    if hasattr(est, "posterior_"):
        for site, draws in est.posterior_.samples.items():
            np.testing.assert_array_equal(loaded.posterior_.samples[site], draws)
    if getattr(est, "idata_", None) is not None:
        assert idata_groups(loaded.idata_) == idata_groups(est.idata_)
        for group in idata_groups(est.idata_):
            assert idata_group(loaded.idata_, group).identical(idata_group(est.idata_, group))


def test_a_loaded_model_saves_again_to_the_same_predictions(fitted, small, tmp_path):
    est = fitted("pc-scale")
    once = load_estimator(save_estimator(est, tmp_path / "a.npz"))
    twice = load_estimator(save_estimator(once, tmp_path / "b.npz"))
    _assert_same_outputs(est, twice, small.X_test)
    assert (
        twice.prior_distance_samples(50, seed=1).tolist()
        == est.prior_distance_samples(50, seed=1).tolist()
    )


def test_unfitted_estimator_round_trips(src, tmp_path):
    est = pcbtl.PCTransferRegressor(src, prior="scale", U=0.5, **PC)
    again = load_estimator(save_estimator(est, tmp_path / "u.npz"))
    assert repr(again) == repr(est) and not hasattr(again, "posterior_")
    assert source_fingerprint(again.source) == source_fingerprint(src)


@pytest.fixture(scope="module")
def hurdle(small, src):
    y = np.maximum(small.y_target - np.median(small.y_target), 0.0)  # half the rows exactly 0
    reg = pcbtl.PCTransferRegressor(src, **PC)
    clf = HistGradientBoostingClassifier(max_iter=10, random_state=0)
    return pcbtl.HurdleRegressor(reg, clf, calibration="isotonic").fit(small.X_target, y), y == 0


@pytest.mark.parametrize("calibration", ["isotonic", "sigmoid", None])
def test_hurdle_round_trips_with_equal_predictions(hurdle, small, tmp_path, calibration):
    est, zero = hurdle
    if calibration != "isotonic":  # the same regressor with another fitted zero classifier
        est = pickle.loads(pickle.dumps(est)).set_params(calibration=calibration)
        clf = pcbtl.estimators.hurdle.zero_classifier(est.classifier, calibration, 5)
        est.classifier_ = clf.fit(small.X_target, zero)
    for how, again in _round_trips(est, tmp_path / "h.npz").items():
        assert type(again) is type(est), how
        _assert_same_outputs(est, again, small.X_test)
        _assert_same_state(est.__getstate__(), again.__getstate__())


@pytest.fixture(scope="module")
def classifier_task():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 4))
    y = (X[:, 0] + 0.5 * rng.standard_normal(500) > 0).astype(int)
    source = train_source_classifier(
        X, y, hidden=(8,), max_epochs=20, n_reference=50, seed=0, progress_bar=False
    )
    return X, np.where(y == 1, "yes", "no"), source


@pytest.mark.parametrize(
    "prior",
    ["last_layer", pytest.param("scale", marks=pytest.mark.slow)],  # 30 s: opt-in
)
def test_classifier_saves_and_loads_with_equal_predictions(classifier_task, prior, tmp_path):
    X, y, source = classifier_task
    clf = PCTransferClassifier(
        source, prior=prior, U=0.5, n_eps=4, n_tau=8, max_reference=100, **PC
    )
    clf.fit(X[:40], y[:40])
    again = load_estimator(save_estimator(clf, tmp_path / "c.npz"), expected=PCTransferClassifier)
    _assert_same_state(vars(clf), vars(again))
    Xt = X[100:160]
    np.testing.assert_array_equal(again.predict_proba(Xt), clf.predict_proba(Xt))
    np.testing.assert_array_equal(again.predict(Xt), clf.predict(Xt))
    assert again.classes_.tolist() == ["no", "yes"]
    np.testing.assert_array_equal(
        again.prior_distance_samples(40, seed=2), clf.prior_distance_samples(40, seed=2)
    )
    # the source left out and passed back
    save_estimator(clf, tmp_path / "c2.npz", include_source=False)
    assert load_estimator(tmp_path / "c2.npz", source=source).source is source
    with pytest.raises(ValueError, match="saved without its source"):
        load_estimator(tmp_path / "c2.npz")


@pytest.mark.parametrize(
    # the scale prior's network function is rebuilt on load (its own code path); the last
    # layer's state pickles as the regressors' does (20 s: opt-in)
    "prior",
    ["scale", pytest.param("last_layer", marks=pytest.mark.slow)],
)
def test_classifier_pickles(classifier_task, prior):
    X, y, source = classifier_task
    clf = PCTransferClassifier(source, prior=prior, U=0.5, **PC).fit(X[:40], y[:40])
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X[:20]), clf.predict_proba(X[:20]))


# --------------------------------------------------------------------------------------------
# the source model
# --------------------------------------------------------------------------------------------


def test_source_left_out_is_passed_back_and_checked(fitted, src, small, tmp_path):
    est = fitted("pc-last-layer")
    path = save_estimator(est, tmp_path / "m.npz", include_source=False)
    full = save_estimator(est, tmp_path / "full.npz")
    assert path.stat().st_size < full.stat().st_size
    with zipfile.ZipFile(path) as zf:
        assert not any(n.startswith("source/") for n in zf.namelist())
    with pytest.raises(ValueError, match=r"m\.npz.*saved without its source.*pass source="):
        load_estimator(path)
    again = load_estimator(path, source=src)
    assert again.source is src
    _assert_same_outputs(est, again, small.X_test)
    # a saved copy of the source is as good as the object
    copy = pcbtl.SourceModel.load(src.save(tmp_path / "src.npz"))
    _assert_same_outputs(est, load_estimator(path, source=copy), small.X_test)


def test_a_different_source_is_refused(fitted, src, small, tmp_path):
    est = fitted("pc-tangent")
    for include in (True, False):
        path = save_estimator(est, tmp_path / f"m{include}.npz", include_source=include)
        shifted = dataclasses.replace(src, y_mean=src.y_mean + 1.0)
        bumped = dataclasses.replace(
            src,
            params={
                **src.params,
                "output": {**src.params["output"], "bias": src.params["output"]["bias"] + 1e-6},
            },
        )
        other = pcbtl.train_source(
            small.X_source, small.y_source, hidden=(8,), seed=1, max_epochs=2, progress_bar=False
        )
        for wrong in (shifted, bumped, other):
            with pytest.raises(ValueError, match="is not the one this model was fitted with"):
                load_estimator(path, source=wrong)
        with pytest.raises(ValueError, match="must be a pcbtl SourceModel"):
            load_estimator(path, source="source.npz")


def test_the_network_is_stored_once_and_rescaled_copies_by_reference(fitted, tmp_path):
    est = fitted("fine-tuning")  # holds the source and a rescaled copy of it
    assert est._fit_source.y_scale != est.source.y_scale
    path = save_estimator(est, tmp_path / "m.npz")
    with zipfile.ZipFile(path) as zf:
        assert [n for n in zf.namelist() if n.startswith("source/")] == ["source/0.npy"]
    again = load_estimator(path)
    assert again._fit_source.y_scale == est._fit_source.y_scale
    assert again._fit_source.params is again.source.params


# --------------------------------------------------------------------------------------------
# damaged, forged and foreign files
# --------------------------------------------------------------------------------------------


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write_members(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _meta(members: dict[str, bytes]) -> dict:
    arr = np.lib.format.read_array(io.BytesIO(members["__meta__.npy"]))
    return json.loads(str(arr[()]))


def _with_meta(members: dict[str, bytes], meta: dict) -> dict[str, bytes]:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array(json.dumps(meta)))
    return {**members, "__meta__.npy": buf.getvalue()}


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "good.npz"
    return save_estimator(fitted("pc-last-layer"), path)


def test_the_archive_holds_no_pickle(saved, fitted, tmp_path):
    paths = [saved, save_estimator(fitted("latent-rf"), tmp_path / "rf.npz")]
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                assert not npz[name].dtype.hasobject, name
        with zipfile.ZipFile(path) as zf:
            assert all(n.endswith(".npy") for n in zf.namelist())


def test_damaged_files_raise_a_value_error_naming_the_file(saved, tmp_path):
    data = saved.read_bytes()
    members = _members(saved)
    meta = _meta(members)
    text = json.dumps(meta, separators=(",", ":"))
    array = next(k for k in members if k.startswith("a/"))
    cases = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "not a zip": b"hello, this is not an archive" * 10,
    }
    for label, content in cases.items():
        bad = tmp_path / f"{label.replace(' ', '_')}.npz"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{bad.name} is not a valid pcbtl estimator file"):
            load_estimator(bad)
    forged = {
        "version": ({**meta, "version": FORMAT_VERSION + 1}, "format version"),
        "format": ({**meta, "format": "pcbtl.SourceModel"}, "format is"),
        "class": ({**meta, "class": "os.system"}, "unknown estimator class"),
        "sklearn class": ({**meta, "class": "sklearn.RandomForestRegressor"}, "unknown estimator"),
        "state": (
            {**meta, "state": {**meta["state"], "__obj__": "PCTransferRegressor", "new": 3}},
            "bad constructor flag",
        ),
        "inner class": (
            json.loads(text.replace('"__obj__":"Posterior"', '"__obj__":"builtins.eval"')),
            "unknown class name 'builtins.eval'",
        ),
        "tag": (
            json.loads(text.replace('"__tuple__"', '"__reduce__"', 1)),
            "unknown tag",
        ),
    }
    for label, (new_meta, message) in forged.items():
        bad = _write_members(tmp_path / "forged.npz", _with_meta(members, new_meta))
        with pytest.raises(ValueError, match=message) as info:
            load_estimator(bad)
        assert "forged.npz" in str(info.value), label
    # a member missing, one too many, one replaced by a pickle
    dropped = {k: v for k, v in members.items() if k != array}
    with pytest.raises(ValueError, match=r"missing \['a/"):
        load_estimator(_write_members(tmp_path / "dropped.npz", dropped))
    extra = {**members, "a/999.npy": members[array]}
    with pytest.raises(ValueError, match=r"unexpected \['a/999'\]"):
        load_estimator(_write_members(tmp_path / "extra.npz", extra))
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    pickled = {**members, array: buf.getvalue()}
    with pytest.raises(ValueError, match="allow_pickle"):
        load_estimator(_write_members(tmp_path / "pickled.npz", pickled))
    with pytest.raises(FileNotFoundError, match="no estimator file"):
        load_estimator(tmp_path / "absent.npz")


def test_load_checks_the_expected_class(saved):
    assert isinstance(
        load_estimator(saved, expected=pcbtl.PCTransferRegressor), pcbtl.PCTransferRegressor
    )
    with pytest.raises(ValueError, match="holds a PCTransferRegressor, not a HurdleRegressor"):
        load_estimator(saved, expected=pcbtl.HurdleRegressor)


# --------------------------------------------------------------------------------------------
# what the format does not hold
# --------------------------------------------------------------------------------------------


def test_what_cannot_be_saved_is_refused_with_the_way_out(src, tmp_path):
    hurdle = pcbtl.HurdleRegressor(pcbtl.PCTransferRegressor(src), classifier_features=np.log1p)
    with pytest.raises(ValueError, match=r"classifier_features.*pickle or joblib"):
        save_estimator(hurdle, tmp_path / "h.npz")
    from sklearn.linear_model import LogisticRegression

    other = pcbtl.HurdleRegressor(pcbtl.PCTransferRegressor(src), LogisticRegression())
    with pytest.raises(ValueError, match=r"LogisticRegression.*pickle or joblib"):
        save_estimator(other, tmp_path / "h.npz")
    with pytest.raises(ValueError, match="saves the estimators of pcbtl"):
        save_estimator(LogisticRegression(), tmp_path / "h.npz")
    assert not (tmp_path / "h.npz").exists()
    assert "PCTransferRegressor" in registered_classes()


# --------------------------------------------------------------------------------------------
# batch jobs
# --------------------------------------------------------------------------------------------

JOB = textwrap.dedent(
    """
    [job]
    seeds = [0]

    [data]
    kind = "synthetic"
    n_source = 120
    n_target = 24
    n_test = 30
    n_features = 3
    shift = 1.0

    [source]
    hidden = [4]
    max_epochs = 5

    [sampler]
    num_warmup = 10
    num_samples = 10

    [methods.pc-last-layer]
    num_chains = 2

    [methods.fine-tuning]
    max_steps = 50
    """
)


def test_batch_fits_load_as_models(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "_SOURCE_CACHE", {})
    path = tmp_path / "job.toml"
    path.write_text(JOB, encoding="utf-8")
    cfg = batch.load_config(path, out=str(tmp_path / "out"))
    built = {}

    def keep(name):
        def build(source, **options):
            est = pcbtl.make_method(name, source, **options)
            built[name] = est
            return est

        return build

    rows = batch.run_job(cfg, progress=False, builders={m: keep(m) for m in cfg.methods})
    assert all(r["status"] == "ok" for r in rows.values()), rows
    task = pcbtl.make_synthetic_task(
        n_source=120, n_target=24, n_test=30, n_features=3, shift=1.0, seed=0
    )
    for fit_id, row in rows.items():
        est = built[row["method"]]
        again = batch.load_fit(cfg.out, fit_id)
        _assert_same_outputs(est, again, task.X_test)
        if row["method"] == "pc-last-layer":
            assert again.idata_ is not None
            assert idata_group(again.idata_, "posterior").identical(
                idata_group(est.idata_, "posterior")
            )
        with pytest.raises(ValueError, match="is not the one this model was fitted with"):
            batch.load_fit(cfg.out, fit_id, source=dataclasses.replace(est.source, y_mean=9.0))
    with pytest.raises(FileNotFoundError, match="no model file for fit pc-last-layer__seed7"):
        batch.load_fit(cfg.out, "pc-last-layer__seed7__deadbeef")
    fits = cfg.out / "fits"
    (fits / "stray.model.npz").write_bytes((fits / f"{fit_id}.model.npz").read_bytes())
    with pytest.raises(ValueError, match="not a fit of the job"):
        batch.load_fit(cfg.out, "stray")
    with pytest.raises(ValueError, match="not a fit id"):
        batch.load_fit(cfg.out, "../job")


def test_a_moved_private_scikit_learn_class_is_left_off_the_whitelist():
    # private scikit-learn modules may move between releases: importing pcbtl must not fail
    from pcbtl.estimators import persistence

    found = persistence._importable(("sklearn.tree._tree:Tree", "sklearn.nowhere:X"))
    assert [c.__name__ for c in found] == ["Tree"]
    assert persistence._importable(("sklearn.tree:NoSuchClass",)) == []
