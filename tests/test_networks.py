"""Source training, features, last-layer head and the saved artefact."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

import pcbtl
from pcbtl import networks
from pcbtl.networks import (
    NetworkFn,
    SourceModel,
    resolve_transfer_layers,
    transfer_parametrization,
)


def test_source_learns_the_teacher(task, source):
    # the teacher has unit sd and the label noise sd is 0.2: a working fit is far below 1
    rmse = np.sqrt(np.mean((source.predict(task.X_source) - task.y_source) ** 2))
    assert rmse < 0.4
    assert 0.1 < source.noise_sd < 0.4
    assert source.reference_X.shape == (1500, 3)
    assert source.info["best_epoch"] < source.info["epochs_run"]


def test_features_and_head_reproduce_predictions(task, source):
    X = task.X_test[:50]
    phi = source.features(X)
    assert phi.shape == (50, 16)
    Phi = np.concatenate([phi, np.ones((50, 1))], axis=1)
    np.testing.assert_allclose(Phi @ source.head(), source.predict(X), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path, task, source):
    path = source.save(tmp_path / "src.npz")
    again = SourceModel.load(path)
    assert again.hidden == source.hidden and again.activation == source.activation
    for layer in source.params:
        for name in source.params[layer]:
            np.testing.assert_array_equal(
                np.asarray(again.params[layer][name]), np.asarray(source.params[layer][name])
            )
    np.testing.assert_array_equal(again.predict(task.X_test), source.predict(task.X_test))
    np.testing.assert_array_equal(again.reference_X, source.reference_X)
    assert again.noise_sd == source.noise_sd and again.info == source.info
    with zipfile.ZipFile(path) as z:
        meta = json.loads(np.load(z.open("__meta__.npy")).item())
    assert meta["format"] == "pcbtl.SourceModel" and meta["version"] == 1
    assert meta["hidden"] == [16, 16]


def test_load_rejects_corrupt_foreign_and_pickled_files(tmp_path, source):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="not a valid pcbtl SourceModel"):
        SourceModel.load(bad)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(ValueError, match="not a valid pcbtl SourceModel"):
        SourceModel.load(foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __meta__=np.array([{"format": "pcbtl.SourceModel"}], dtype=object))
    with pytest.raises(ValueError):
        SourceModel.load(pickled)
    good = source.save(tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["__meta__"]))
    meta["version"] = 99
    arrays["__meta__"] = np.array(json.dumps(meta))
    future = tmp_path / "future.npz"
    np.savez(future, **arrays)
    with pytest.raises(ValueError, match="version 99"):
        SourceModel.load(future)
    with pytest.raises(FileNotFoundError):
        SourceModel.load(tmp_path / "missing.npz")


def test_train_source_rejects_bad_input(task):
    X, y = task.X_source[:100], task.y_source[:100]
    with pytest.raises(ValueError, match="X contains NaN"):
        pcbtl.train_source(np.where(X > 2, np.nan, X), y, progress_bar=False)
    with pytest.raises(ValueError, match="mismatched lengths"):
        pcbtl.train_source(X, y[:-1], progress_bar=False)
    with pytest.raises(ValueError, match="activation"):
        pcbtl.train_source(X, y, activation="sigmoidal", progress_bar=False)


def test_transfer_layers_resolution(source):
    assert resolve_transfer_layers(source, "all") == ("hidden_0", "hidden_1", "output")
    assert resolve_transfer_layers(source, "last") == ("output",)
    assert resolve_transfer_layers(source, 2) == ("hidden_1", "output")
    assert resolve_transfer_layers(source, ["output", "hidden_0"]) == ("hidden_0", "output")
    with pytest.raises(ValueError, match="transfer_layers"):
        resolve_transfer_layers(source, ["hidden_7"])
    with pytest.raises(ValueError, match="transfer_layers"):
        resolve_transfer_layers(source, 4)


def test_transfer_parametrization_reproduces_source(task, source):
    tp = transfer_parametrization(source, 2)
    assert tp.theta_source.shape == (16 * 16 + 16 + 16 + 1,)
    np.testing.assert_allclose(
        np.asarray(tp.predict_fn(tp.theta_source, task.X_test)),
        source.predict(task.X_test),
        rtol=1e-6,
        atol=1e-6,
    )
    # fan-in scales: 1/sqrt(16) for both transferred layers
    np.testing.assert_allclose(np.asarray(tp.scales), 0.25)


def test_networks_of_one_architecture_share_one_compilation(task, source):
    # the flat network is a pytree (parameters as data): a second source of the same
    # architecture reuses the compiled program, and gives its own (different) predictions
    from pcbtl.estimators.base import _apply_draws_pytree, _batched_apply

    other = pcbtl.train_source(
        task.X_source, task.y_source, hidden=(16, 16), seed=7, max_epochs=20, progress_bar=False
    )
    X = jnp.asarray(task.X_test[:64], jnp.float32)
    outs, sizes = [], []
    for src in (source, other):
        tp = transfer_parametrization(src, "last")
        outs.append(_batched_apply(tp.predict_fn, tp.theta_source[None], X)[0])
        sizes.append(_apply_draws_pytree._cache_size())
        np.testing.assert_allclose(outs[-1], src.predict(task.X_test[:64]), rtol=1e-5, atol=1e-5)
    # (other tests may have compiled other shapes before: count what the second source adds)
    assert sizes[1] == sizes[0]
    assert not np.allclose(outs[0], outs[1])
    assert type(transfer_parametrization(source, 1).predict_fn) is NetworkFn


# ------------------------------------------------------------------ forged model files


def _nan_at(key: str, index: tuple[int, ...], value: float = float("nan")):
    def edit(meta: dict, arrays: dict) -> None:
        arr = np.array(arrays[key], copy=True)
        arr[index] = value
        arrays[key] = arr

    return edit


def _set_meta(key: str, value: object):
    def edit(meta: dict, arrays: dict) -> None:
        meta[key] = value

    return edit


def _set_array(key: str, value: object):
    def edit(meta: dict, arrays: dict) -> None:
        if value is None:
            del arrays[key]
        else:
            arrays[key] = np.asarray(value)

    return edit


def _raw_meta(text: str):
    def edit(meta: dict, arrays: dict) -> str:
        return text

    return edit


_FORGERIES = [
    # (case, edit of the header dict / the arrays, what the message must name)
    ("y_mean-nan", _set_meta("y_mean", float("nan")), "y_mean"),
    ("y_mean-text", _set_meta("y_mean", "0.5"), "y_mean"),
    ("y_scale-inf", _set_meta("y_scale", float("inf")), "y_scale"),
    ("y_scale-zero", _set_meta("y_scale", 0.0), "y_scale"),
    ("y_scale-negative", _set_meta("y_scale", -2.0), "y_scale"),
    ("noise_sd-zero", _set_meta("noise_sd", 0.0), "noise_sd"),
    ("noise_sd-negative", _set_meta("noise_sd", -0.1), "noise_sd"),
    ("noise_sd-nan", _set_meta("noise_sd", float("nan")), "noise_sd"),
    ("x_scale-nan", _nan_at("x_scale", (1,)), "x_scale"),
    ("x_scale-zero", _nan_at("x_scale", (0,), 0.0), "x_scale"),
    ("x_mean-inf", _nan_at("x_mean", (2,), float("inf")), "x_mean"),
    ("kernel-nan", _nan_at("params/hidden_0/kernel", (1, 3)), "params/hidden_0/kernel"),
    ("bias-inf", _nan_at("params/output/bias", (0,), float("inf")), "params/output/bias"),
    ("reference-nan", _nan_at("reference_X", (5, 0)), "reference_X"),
    ("kernel-shape", _set_array("params/hidden_1/kernel", np.zeros((16, 15), np.float32)), "shape"),
    ("bias-shape", _set_array("params/output/bias", np.zeros((2,), np.float32)), "shape"),
    ("x_scale-shape", _set_array("x_scale", np.ones(2, np.float32)), "x_scale"),
    ("reference-shape", _set_array("reference_X", np.zeros((4, 2), np.float32)), "reference_X"),
    ("hidden-disagrees", _set_meta("hidden", [16, 8]), "shape"),
    ("hidden-float", _set_meta("hidden", [4.7, 16]), "hidden"),
    ("hidden-zero", _set_meta("hidden", [0, 16]), "hidden"),
    ("hidden-extra-layer", _set_meta("hidden", [16, 16, 16]), "params/hidden_2"),
    ("missing-array", _set_array("x_mean", None), "x_mean"),
    ("unexpected-array", _set_array("params/hidden_9/kernel", np.zeros(2)), "unexpected"),
    ("activation", _set_meta("activation", "sigmoidal"), "activation"),
    ("info-list", _set_meta("info", [1, 2]), "info"),
    ("meta-not-json", _raw_meta("{format: pcbtl"), "header"),
    ("meta-deep", _raw_meta("[" * 100_000 + "]" * 100_000), "nested"),
    ("meta-array", _set_array("__meta__", np.arange(3.0)), "__meta__"),
    ("text-weights", _set_array("params/output/bias", np.array(["a"])), "params/output/bias"),
]


@pytest.mark.parametrize(
    ("edit", "names"), [c[1:] for c in _FORGERIES], ids=[c[0] for c in _FORGERIES]
)
def test_load_rejects_forged_files_naming_them(tmp_path, source, edit, names):
    with np.load(source.save(tmp_path / "good.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["__meta__"]))
    text = edit(meta, arrays)
    if "__meta__" in arrays and arrays["__meta__"].dtype.kind == "U":
        arrays["__meta__"] = np.array(text if text is not None else json.dumps(meta))
    forged = tmp_path / "forged.npz"
    np.savez(forged, **arrays)
    with pytest.raises(ValueError) as info:
        SourceModel.load(forged)
    msg = str(info.value)
    assert str(forged) in msg and names in msg, msg


def _replace_member(src, dst, member: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, data if item.filename == member else zin.read(item))


def test_load_checks_declared_sizes_before_allocating(tmp_path, source, monkeypatch):
    good = source.save(tmp_path / "good.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (100_000, 100_000)}
    )
    huge = tmp_path / "huge.npz"  # a 40 GB array declared in a file of a few kB
    _replace_member(good, huge, "params/hidden_0/kernel.npy", header.getvalue() + bytes(192))
    with pytest.raises(ValueError, match=r"huge\.npz.*hidden_0/kernel.*\(100000, 100000\)"):
        SourceModel.load(huge)
    # an honest file larger than the limit is refused before its arrays are read
    monkeypatch.setattr(networks, "MAX_MODEL_BYTES", 10_000)
    with pytest.raises(ValueError, match=r"good\.npz.*10000 bytes"):
        SourceModel.load(good)


# --------------------------------------------------------------------------- saving


def test_save_uses_a_unique_temporary_file(tmp_path, source):
    path = tmp_path / "src.npz"
    (tmp_path / "src.npz.tmp").mkdir()  # a fixed temporary name would be taken
    source.save(path)
    assert SourceModel.load(path).noise_sd == source.noise_sd
    errors: list[BaseException] = []

    def save_repeatedly() -> None:  # several writers of one path at the same time
        try:
            for _ in range(3):
                source.save(path)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=save_repeatedly) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    np.testing.assert_array_equal(SourceModel.load(path).reference_X, source.reference_X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz", "src.npz.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_file_mode_follows_the_umask(tmp_path, source, umask):
    old = os.umask(umask)
    try:
        path = source.save(tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------- train_source arguments


class _TrainingStarted(Exception):
    pass


def _no_training(*args, **kwargs):
    raise _TrainingStarted


_BAD_ARGUMENTS = [
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": 1e6}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"patience": -5}, "patience"),
    ({"patience": 2.5}, "patience"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"hidden": (4.7,)}, "hidden"),
    ({"hidden": (16, 0)}, "hidden"),
    ({"hidden": (True,)}, "hidden"),
    ({"hidden": "64"}, "hidden"),
    ({"hidden": 64}, "hidden"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 8.5}, "batch_size"),
    ({"max_epochs": 0}, "max_epochs"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"n_reference": -1}, "n_reference"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"validation_fraction": float("nan")}, "validation_fraction"),
    ({"validation_fraction": 0.99}, "validation_fraction"),  # no training rows left
    ({"activation": "sigmoidal"}, "activation"),
    ({"featurizer": {"scaler": object()}}, "featurizer"),
    ({"featurizer": ["magpie"]}, "featurizer"),
]


@pytest.mark.parametrize(("kwargs", "name"), _BAD_ARGUMENTS, ids=[n for _, n in _BAD_ARGUMENTS])
def test_train_source_rejects_bad_arguments_before_training(task, monkeypatch, kwargs, name):
    monkeypatch.setattr(networks, "MLP", _no_training)  # stop before any compilation
    X, y = task.X_source[:40], task.y_source[:40]
    with pytest.raises(ValueError, match=name):
        pcbtl.train_source(X, y, progress_bar=False, **{"max_epochs": 2, **kwargs})


def test_train_source_reports_every_bad_argument_at_once(task, monkeypatch):
    monkeypatch.setattr(networks, "MLP", _no_training)  # stop before any compilation
    X, y = task.X_source[:40], task.y_source[:40]
    with pytest.raises(ValueError) as info:
        pcbtl.train_source(
            X, y, learning_rate=-1, patience=-5, weight_decay=-1, hidden=(4.7,), progress_bar=False
        )
    for name in ("learning_rate", "patience", "weight_decay", "hidden"):
        assert name in str(info.value)
    # the edges of what is accepted reach the network
    with pytest.raises(_TrainingStarted):
        pcbtl.train_source(
            X,
            y,
            learning_rate=1.0,
            patience=0,
            weight_decay=0,
            hidden=(np.int64(4),),
            seed=np.int32(3),
            n_reference=0,
            progress_bar=False,
        )


def test_a_feature_with_a_vanishing_spread_still_saves_a_loadable_model(tmp_path):
    # spread 1e-46: positive in float64, zero in float32; the model must save and load
    rng = np.random.default_rng(0)
    X = np.c_[rng.standard_normal((120, 2)), 1e-46 * rng.standard_normal(120)]
    y = X[:, 0] - X[:, 1]
    src = pcbtl.train_source(X, y, hidden=(4,), max_epochs=3, progress_bar=False)
    assert np.all(src.x_scale > 0) and src.noise_sd > 0
    path = tmp_path / "m.npz"
    src.save(path)
    again = pcbtl.SourceModel.load(path)
    np.testing.assert_allclose(again.predict(X[:5]), src.predict(X[:5]), rtol=1e-6)
