"""Source training, features, last-layer head and the saved artefact."""

from __future__ import annotations

import json
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

import pcbtl
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
    from pcbtl.transfer import _apply_draws_pytree, _batched_apply

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
