r"""The source classifier: a Flax MLP trained by optax, its logits, and its saved artefact.

The source network gives logits ``g_S(x) = f((x - m_x)/s_x; θ_S)`` with inputs standardised
by ``m_x, s_x`` (kept with the parameters). With ``K`` classes ``c_0 < … < c_{K-1}``
(``classes``) the source predictive is

.. math::

    p_S(y = c_1 \mid x) = σ(g_S(x)) \quad (K = 2,\ \text{one logit}),\qquad
    p_S(y = c_k \mid x) = \mathrm{softmax}(g_S(x))_k \quad (K \ge 3,\ K \text{ logits}).

Layers are named ``hidden_0, hidden_1, …`` and ``output`` (the :class:`pcbtl.networks.MLP`
module, reused here), which is what ``transfer_layers`` refers to in
:class:`pcbtl.classification.PCTransferClassifier`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from pcbtl._validation import (
    check_hidden,
    check_integer,
    check_nonnegative,
    check_X,
    collect_errors,
)
from pcbtl.networks import (
    MLP,
    NetworkFn,
    _check_activation,
    _check_featurizer,
    _check_layer_shapes,
    _check_learning_rate,
    _check_validation_fraction,
    _fit_adamw,
    _frozen_trunk,
    _head_outputs,
    _layer_scales,
    _load_file,
    _network_outputs,
    _read_archive,
    _read_network_header,
    _save_archive,
    _split_and_scale,
    resolve_transfer_layers,
)

__all__ = [
    "SourceClassifier",
    "LogitParametrization",
    "check_labels",
    "logit_parametrization",
    "split_logit_trunk",
    "train_source_classifier",
]

FORMAT_NAME = "pcbtl.SourceClassifier"
FORMAT_VERSION = 1
#: most bytes :meth:`SourceClassifier.load` reads from one file (all its arrays together)
MAX_MODEL_BYTES = 1 << 30
#: dtype kinds a label array may have: integers, unsigned, bools, floats, unicode strings
_LABEL_KINDS = "iubfU"


def check_labels(y: Any, name: str = "y") -> np.ndarray:
    """Return class labels ``y`` as a 1-D NumPy array, or raise ``ValueError`` naming ``name``.

    Labels may be integers, bools, finite floats or strings (any object array must hold
    strings only, and is converted to a unicode array). A column vector ``(n, 1)`` is
    flattened.
    """
    try:
        arr = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of class labels: {exc}") from exc
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row), got shape {arr.shape}")
    if arr.dtype.kind == "O":
        if not all(isinstance(v, str) for v in arr):
            raise ValueError(
                f"{name} must hold numbers or strings only (an object array holds other values)"
            )
        arr = arr.astype(str)
    if arr.dtype.kind == "S":
        arr = arr.astype(str)
    if arr.dtype.kind not in _LABEL_KINDS:
        raise ValueError(f"{name} has dtype {arr.dtype}; labels must be numbers or strings")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains NaN or inf (first at index {int(np.argmax(~np.isfinite(arr)))})"
        )
    return arr


@dataclass(frozen=True, eq=False)
class SourceClassifier:
    r"""A trained source classifier with its input scaling: the base model of the PC prior.

    Attributes
    ----------
    hidden, activation:
        The architecture (:class:`pcbtl.networks.MLP`); the output layer has one unit for two
        classes (the logit of ``classes[1]``) and ``K`` units for ``K ≥ 3`` classes.
    classes:
        The ``K ≥ 2`` class labels, sorted (as :func:`numpy.unique` sorts them); output unit
        ``k`` belongs to ``classes[k]``.
    params:
        Flax parameters ``{"hidden_0": {"kernel", "bias"}, …, "output": {…}}`` in float32,
        acting on standardised inputs.
    x_mean, x_scale:
        Input scaling ``(x − m_x)/s_x``.
    reference_X:
        A random sample of the source inputs (the source part of the default reference
        distribution ``Q``).
    info:
        Training record and an optional JSON-able featurizer description, saved with the model.
    """

    hidden: tuple[int, ...]
    activation: str
    classes: np.ndarray
    params: dict[str, Any]
    x_mean: np.ndarray
    x_scale: np.ndarray
    reference_X: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    # ---- structure -------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """``K``, the number of classes."""
        return int(len(self.classes))

    @property
    def n_outputs(self) -> int:
        """Width of the output layer: 1 for two classes, ``K`` otherwise."""
        return 1 if self.n_classes == 2 else self.n_classes

    @property
    def n_features(self) -> int:
        return int(self.x_mean.shape[0])

    @property
    def module(self) -> MLP:
        return MLP(hidden=tuple(self.hidden), out=self.n_outputs, activation=self.activation)

    @property
    def layer_names(self) -> list[str]:
        return [f"hidden_{i}" for i in range(len(self.hidden))] + ["output"]

    # ---- pure functions --------------------------------------------------------------------
    def scale_inputs(self, X: jax.Array) -> jax.Array:
        return (X - jnp.asarray(self.x_mean)) / jnp.asarray(self.x_scale)

    def apply(self, params: dict[str, Any], X: jax.Array) -> jax.Array:
        """Logits ``g(X; params)``, shape ``(n, n_outputs)``, for raw inputs (pure, jittable)."""
        return self.module.apply({"params": params}, self.scale_inputs(X))

    def apply_features(self, X: jax.Array) -> jax.Array:
        """Penultimate activations ``φ(X)`` (pure, jittable)."""
        _, feats = self.module.apply({"params": self.params}, self.scale_inputs(X), True)
        return feats

    @cached_property
    def _jitted_logits(self) -> Callable:
        return jax.jit(self.apply)

    @cached_property
    def _jitted_features(self) -> Callable:
        return jax.jit(self.apply_features)

    # ---- user-facing -----------------------------------------------------------------------
    def logits(self, X: Any) -> np.ndarray:
        """Raw source logits ``g_S(X)``, shape ``(n, n_outputs)`` (float64)."""
        X = check_X(X, "X", n_features=self.n_features)
        return np.asarray(self._jitted_logits(self.params, jnp.asarray(X, jnp.float32)), float)

    def decision_function(self, X: Any) -> np.ndarray:
        """``g_S(X)``: shape ``(n,)`` (the logit of ``classes[1]``) for two classes, else
        ``(n, K)``, as scikit-learn's classifiers return it."""
        out = self.logits(X)
        return out[:, 0] if self.n_classes == 2 else out

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log p_S(y = c_k | x)``, shape ``(n, K)``, columns in the order of ``classes``."""
        return np.asarray(jax.nn.log_softmax(full_logits(jnp.asarray(self.logits(X))), -1))

    def predict_proba(self, X: Any) -> np.ndarray:
        """``p_S(y = c_k | x)``, shape ``(n, K)``, columns in the order of ``classes``."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label of each row."""
        return self.classes[np.argmax(self.logits_full(X), axis=1)]

    def logits_full(self, X: Any) -> np.ndarray:
        """Logits of all ``K`` classes, ``(n, K)``: ``[0, g]`` for two classes."""
        return np.asarray(full_logits(jnp.asarray(self.logits(X))))

    def features(self, X: Any) -> np.ndarray:
        """Penultimate-layer features ``φ(X)`` (rows = inputs), without the bias column."""
        X = check_X(X, "X", n_features=self.n_features)
        return np.asarray(self._jitted_features(jnp.asarray(X, jnp.float32)), np.float64)

    def head(self) -> np.ndarray:
        """Output-layer coefficients ``B_S``, shape ``(p, n_outputs)`` with the bias as last row:
        ``g_S(X) = [φ(X), 1] B_S`` exactly."""
        w = np.asarray(self.params["output"]["kernel"], np.float64)
        b = np.asarray(self.params["output"]["bias"], np.float64)
        return np.concatenate([w, b[None, :]], axis=0)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the classifier to ``path`` (a NumPy ``.npz`` archive with a JSON header; no
        pickle).

        The archive holds every array under its parameter path, ``x_mean``, ``x_scale``,
        ``reference_X`` and the header ``__meta__`` (format name and version, architecture,
        class labels and their dtype, ``info``). It is written to a uniquely named temporary
        file in the same directory (:func:`tempfile.mkstemp`), flushed to disk and moved over
        ``path`` with :func:`os.replace`: a reader sees the old file or the new one, never a
        mix, and concurrent saves of one path do not collide. ``ValueError`` when ``info`` is
        not JSON-serialisable.
        """
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "hidden": [int(h) for h in self.hidden],
            "activation": self.activation,
            "classes": np.asarray(self.classes).tolist(),
            "classes_dtype": np.asarray(self.classes).dtype.str,
            "info": self.info,
        }
        try:
            header = json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"cannot save the classifier: info and classes must be JSON-serialisable ({exc})"
            ) from exc
        return _save_archive(Path(path), header, self)

    @classmethod
    def load(cls, path: str | Path) -> SourceClassifier:
        """Read a classifier written by :meth:`save`, checking everything before it is used.

        The file is refused with a ``ValueError`` naming it unless its members are exactly the
        header, ``x_mean``, ``x_scale``, ``reference_X`` and a ``kernel`` and ``bias`` per
        layer of the declared architecture, each a plain numeric ``.npy`` array whose declared
        shape agrees with its bytes (at most :data:`MAX_MODEL_BYTES` in all, checked before
        anything is allocated); the header is JSON of the known format and version (at most
        4 Mi characters, nested at most 64 deep) with positive integer ``hidden`` widths, a
        known ``activation`` and at least two distinct class labels of a number or string
        dtype; every array is finite, ``x_scale`` positive, ``reference_X`` has one column
        per feature and every weight has the shape the header gives it (``output/kernel`` is
        ``(hidden[-1], 1)`` for two classes and ``(hidden[-1], K)`` for ``K ≥ 3``).

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            A corrupt, foreign or inconsistent file (the message names the file).
        """
        return _load_file(
            path, cls._load_checked, label="SourceClassifier", missing="source classifier"
        )

    @classmethod
    def _load_checked(cls, path: Path) -> SourceClassifier:
        meta, layers, arrays = _read_archive(path, _read_header, max_bytes=MAX_MODEL_BYTES)
        hidden, classes = meta["hidden"], meta["classes"]
        x_mean, x_scale, reference_X = arrays["x_mean"], arrays["x_scale"], arrays["reference_X"]
        d = x_mean.shape[0]
        _check_layer_shapes(
            arrays,
            layers,
            [*hidden, 1 if len(classes) == 2 else len(classes)],
            d,
            f"the header (hidden={hidden}, {len(classes)} classes, {d} features)",
        )
        params = {
            layer: {
                leaf: np.asarray(arrays[f"params/{layer}/{leaf}"], np.float32)
                for leaf in ("kernel", "bias")
            }
            for layer in layers
        }
        return cls(
            hidden=tuple(hidden),
            activation=meta["activation"],
            classes=classes,
            params=params,
            x_mean=x_mean.astype(np.float32),
            x_scale=x_scale.astype(np.float32),
            reference_X=reference_X.astype(np.float32),
            info=meta["info"],
        )


def _read_header(arr: np.ndarray) -> dict[str, Any]:
    """The checked JSON header of a classifier file (see :meth:`SourceClassifier.load`)."""
    meta, checked = _read_network_header(arr, FORMAT_NAME, FORMAT_VERSION)
    raw, dtype_str = meta.get("classes"), meta.get("classes_dtype")
    if not isinstance(raw, list) or not all(isinstance(c, str | int | float | bool) for c in raw):
        raise ValueError("classes must be a JSON list of numbers or strings")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError:
        raise ValueError(f"classes_dtype {dtype_str!r} is not a NumPy dtype") from None
    if dtype.kind not in _LABEL_KINDS:
        raise ValueError(f"classes_dtype {dtype_str!r} is not a number or string dtype")
    try:
        classes = np.asarray(raw, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"classes do not fit classes_dtype {dtype_str!r}: {exc}") from None
    if classes.ndim != 1 or classes.size < 2 or np.unique(classes).size != classes.size:
        raise ValueError(f"classes must hold at least two distinct labels, got {raw[:10]!r}")
    if np.any(classes[1:] < classes[:-1]):
        raise ValueError("classes must be sorted")
    return {**checked, "classes": classes}


def full_logits(logits: jax.Array) -> jax.Array:
    """Logits of all ``K`` classes from the network's output: ``[0, g]`` when the output has
    one unit (two classes), the output itself otherwise (last axis)."""
    logits = jnp.asarray(logits)
    if logits.shape[-1] == 1:
        return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
    return logits


def train_source_classifier(
    X: Any,
    y: Any,
    *,
    hidden: Sequence[int] = (64, 32),
    activation: str = "tanh",
    seed: int = 0,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    max_epochs: int = 300,
    patience: int = 20,
    validation_fraction: float = 0.1,
    n_reference: int = 2000,
    featurizer: dict[str, Any] | None = None,
    progress_bar: bool = True,
) -> SourceClassifier:
    r"""Train the source classifier by minimising the mean cross-entropy with Adam(W).

    .. math::

        \mathcal L(θ) = -\frac1n \sum_{i=1}^n \log p(y_i \mid x_i; θ),\qquad
        p(y = c_k \mid x; θ) = \mathrm{softmax}(g(x; θ))_k

    (for two classes the network has one output ``g`` and ``p(y = c_1 | x) = σ(g)``, the
    sigmoid cross-entropy). Labels ``y`` may be integers, bools, floats or strings; the classes
    are the sorted distinct labels (:func:`numpy.unique`). Each epoch is one jitted
    ``lax.scan`` over shuffled minibatches of ``batch_size`` rows; training stops when the
    validation cross-entropy (on a random ``validation_fraction`` of the rows) has not
    improved for ``patience`` epochs, and the best parameters are kept. ``n_reference``
    source inputs are kept as the source part of the default reference distribution ``Q``.

    Every argument is checked before anything is compiled, and all the problems are reported
    together in one ``ValueError`` (as :func:`pcbtl.train_source` does):

    * ``X`` finite, 2-D, at least 10 rows; ``y`` one label per row with at least two classes;
    * ``hidden`` a sequence of positive integers, ``activation`` one of
      :data:`pcbtl.networks.ACTIVATIONS`;
    * ``0 < learning_rate <= 1``, ``weight_decay >= 0``;
    * ``batch_size >= 1``, ``max_epochs >= 1``, ``patience >= 0``, ``n_reference >= 0``,
      ``seed >= 0`` integers;
    * ``0 < validation_fraction < 1``, leaving at least one training row;
    * ``featurizer`` ``None`` or a JSON-serialisable dict.

    Example
    -------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((200, 2)); y = np.where(X[:, 0] > 0, "a", "b")
    >>> clf = train_source_classifier(X, y, hidden=(8,), max_epochs=5, progress_bar=False)
    >>> clf.classes.tolist(), clf.predict_proba(X[:3]).shape
    (['a', 'b'], (3, 2))
    """
    try:
        n_rows = len(X)
    except TypeError:
        n_rows = 0

    def check_data() -> tuple[np.ndarray, np.ndarray]:
        Xc = check_X(X, "X", min_rows=10)
        yc = check_labels(y, "y")
        if yc.shape[0] != Xc.shape[0]:
            raise ValueError(
                f"X and y have mismatched lengths: {Xc.shape[0]} rows vs {yc.shape[0]} labels"
            )
        if np.unique(yc).size < 2:
            raise ValueError("y must hold at least two distinct classes")
        return Xc, yc

    checked, problems = collect_errors(
        check_data,
        lambda: check_hidden(hidden),
        lambda: _check_activation(activation),
        lambda: _check_learning_rate(learning_rate),
        lambda: check_nonnegative(weight_decay, "weight_decay"),
        lambda: check_integer(batch_size, "batch_size", minimum=1),
        lambda: check_integer(max_epochs, "max_epochs", minimum=1),
        lambda: check_integer(patience, "patience", minimum=0),
        lambda: _check_validation_fraction(validation_fraction, n_rows),
        lambda: check_integer(n_reference, "n_reference", minimum=0),
        lambda: check_integer(seed, "seed", minimum=0),
        lambda: _check_featurizer(featurizer),
    )
    if problems:
        if len(problems) == 1:
            raise ValueError(problems[0])
        raise ValueError(
            f"train_source_classifier: {len(problems)} invalid arguments: " + "; ".join(problems)
        )
    (X, y), hidden, activation, learning_rate, weight_decay = checked[:5]
    batch_size, max_epochs, patience, validation_fraction, n_reference, seed = checked[5:11]

    classes, y_idx = np.unique(y, return_inverse=True)
    n_out = 1 if classes.size == 2 else int(classes.size)
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    tr_idx, val_idx, x_mean, x_scale = _split_and_scale(X, rng, validation_fraction)
    n_val = val_idx.size
    Xs = jnp.asarray((X - x_mean) / x_scale, dtype=jnp.float32)
    ys = jnp.asarray(y_idx, dtype=jnp.int32)
    Xval, yval = Xs[val_idx], ys[val_idx]
    module = MLP(hidden=hidden, out=n_out, activation=activation)

    def loss_fn(p, xb, yb):
        logits = module.apply({"params": p}, xb)
        if n_out == 1:
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[:, 0], yb.astype(float)))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def accuracy(p, xb, yb):
        logits = full_logits(module.apply({"params": p}, xb))
        return jnp.mean(jnp.argmax(logits, axis=-1) == yb)

    val_loss, params, best_epoch, epochs_run = _fit_adamw(
        module,
        loss_fn,
        (Xs[tr_idx], ys[tr_idx], Xval, yval),
        seed=seed,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        batch_size=batch_size,
        max_epochs=max_epochs,
        patience=patience,
        progress_bar=progress_bar,
    )
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
    ref_idx = rng.choice(n, size=min(int(n_reference), n), replace=False)
    info: dict[str, Any] = {
        "n_train": int(tr_idx.size),
        "n_validation": int(n_val),
        "best_epoch": int(best_epoch),
        "epochs_run": int(epochs_run),
        "validation_log_loss": float(val_loss),
        "validation_accuracy": float(accuracy(params, Xval, yval)),
        "seed": int(seed),
    }
    if featurizer is not None:
        info["featurizer"] = featurizer
    return SourceClassifier(
        hidden=hidden,
        activation=activation,
        classes=classes,
        params=params,
        x_mean=x_mean.astype(np.float32),
        x_scale=x_scale.astype(np.float32),
        reference_X=X[np.sort(ref_idx)].astype(np.float32),
        info=info,
    )


# --------------------------------------------------------------------------------------------
# flat views of the transfer layers (for the scale prior)
# --------------------------------------------------------------------------------------------


class LogitParametrization(NamedTuple):
    """A flat view of the transfer set of a :class:`SourceClassifier`.

    ``theta_source`` is the float32 vector of the source values of the parameters in
    ``layers``; ``scales`` the fixed per-parameter scales ``s``; ``predict_fn(θ, X)`` (a
    :class:`pcbtl.networks.NetworkFn`) the logits ``(n, n_outputs)`` with those parameters set
    to ``θ`` and every other parameter frozen at ``θ_S``.
    """

    layers: tuple[str, ...]
    theta_source: jax.Array
    scales: jax.Array
    predict_fn: NetworkFn


def logit_parametrization(
    source: SourceClassifier, transfer_layers: Any = "all", *, scale: str = "fan_in"
) -> LogitParametrization:
    """The flat transfer vector of ``source`` for the layers named by ``transfer_layers``
    (``"all"``, ``"last"``, an int ``k`` for the last ``k`` layers, or layer names).

    ``scale="fan_in"`` gives every parameter of a layer ``s = 1/sqrt(fan_in)``;
    ``scale="unit"`` gives ``s = 1`` (as :func:`pcbtl.networks.transfer_parametrization`).
    """
    if scale not in ("fan_in", "unit"):
        raise ValueError(f"scale must be 'fan_in' or 'unit', got {scale!r}")
    layers = resolve_transfer_layers(source, transfer_layers)
    subset = {k: source.params[k] for k in layers}
    theta0, _ = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, subset))
    scales = _layer_scales(subset, scale)
    aux = {
        "frozen": {
            k: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), v)
            for k, v in source.params.items()
            if k not in layers
        },
        "x_mean": jnp.asarray(source.x_mean, jnp.float32),
        "x_scale": jnp.asarray(source.x_scale, jnp.float32),
    }
    apply = _network_outputs(
        tuple(source.hidden), source.activation, source.n_features, source.n_outputs, layers
    )
    return LogitParametrization(layers, theta0.astype(jnp.float32), scales, NetworkFn(apply, aux))


def split_logit_trunk(
    source: SourceClassifier, lp: LogitParametrization
) -> tuple[Callable[[Any], jax.Array], NetworkFn] | None:
    """``(trunk, head)`` with ``g(x; θ) = head(θ, trunk(x))`` when the transfer layers are the
    last ``k < L`` layers (the frozen trunk is then computed once per input); else ``None``."""
    trunk = _frozen_trunk(source, lp.layers)
    if trunk is None:
        return None
    apply = _head_outputs(
        tuple(source.hidden), source.activation, source.n_features, source.n_outputs, lp.layers
    )
    return trunk, NetworkFn(apply, {})
