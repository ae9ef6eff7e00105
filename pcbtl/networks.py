"""Flax networks, source training and the saved source-model artefact.

The source model is a multilayer perceptron ``g_S(x) = m_y + s_y f((x - m_x) / s_x; θ_S)`` trained on
the (large) source data set with optax (Adam, minibatches, one jitted ``lax.scan`` per epoch, early
stopping on a validation split). ``m_x, s_x`` and ``m_y, s_y`` are the input and output scalings,
kept with the parameters so that a reloaded model predicts exactly as it was trained. The noise sd
``σ_S`` is the validation root mean squared error; the source predictive is ``N(g_S(x), σ_S²)``.

Layers are named ``hidden_0, hidden_1, ...`` and ``output``; these names are what
``transfer_layers`` refers to in :class:`pcbtl.PCTransferRegressor`.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from tqdm import tqdm

from pcbtl._files import atomic_write
from pcbtl._validation import (
    check_hidden,
    check_integer,
    check_nonnegative,
    check_positive,
    check_probability,
    check_X,
    check_Xy,
    collect_errors,
    json_depth,
)

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "NetworkFn",
    "SourceModel",
    "TransferParametrization",
    "resolve_transfer_layers",
    "split_frozen_trunk",
    "train_source",
    "transfer_parametrization",
]

FORMAT_NAME = "pcbtl.SourceModel"
FORMAT_VERSION = 1

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
}


class MLP(nn.Module):
    """Fully connected network ``x -> act(W_0 x + b_0) -> ... -> W_L h + b_L``.

    ``hidden`` gives the widths of the hidden layers (named ``hidden_i``); the last layer is
    ``output`` with ``out`` units. ``__call__(x, return_features=True)`` also returns the
    penultimate activations ``φ(x)`` (the input itself when there is no hidden layer).
    """

    hidden: Sequence[int]
    out: int = 1
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array, return_features: bool = False):
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden):
            x = act(nn.Dense(width, name=f"hidden_{i}")(x))
        out = nn.Dense(self.out, name="output")(x)
        if return_features:
            return out, x
        return out


@dataclass(frozen=True, eq=False)
class SourceModel:
    """A trained source network with its scalings; the base model of the PC prior.

    Attributes
    ----------
    hidden, activation:
        The architecture (see :class:`MLP`).
    params:
        Flax parameters ``{"hidden_0": {"kernel", "bias"}, ..., "output": {...}}`` in float32,
        acting on standardised inputs and producing standardised outputs.
    x_mean, x_scale, y_mean, y_scale:
        Input and output scalings.
    noise_sd:
        ``σ_S``, the validation RMSE in the units of ``y``.
    reference_X:
        A random sample of the source inputs (the source part of the default reference
        distribution ``Q``, see :mod:`pcbtl.priors`).
    info:
        Training record (epochs, validation RMSE, ...) and an optional JSON-able featurizer
        description, saved with the model.
    """

    hidden: tuple[int, ...]
    activation: str
    params: dict[str, Any]
    x_mean: np.ndarray
    x_scale: np.ndarray
    y_mean: float
    y_scale: float
    noise_sd: float
    reference_X: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    # ---- structure -------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.x_mean.shape[0])

    @property
    def module(self) -> MLP:
        return MLP(hidden=tuple(self.hidden), out=1, activation=self.activation)

    @property
    def layer_names(self) -> list[str]:
        return [f"hidden_{i}" for i in range(len(self.hidden))] + ["output"]

    # ---- pure functions --------------------------------------------------------------------
    def scale_inputs(self, X: jax.Array) -> jax.Array:
        return (X - jnp.asarray(self.x_mean)) / jnp.asarray(self.x_scale)

    def apply(self, params: dict[str, Any], X: jax.Array) -> jax.Array:
        """``g(X; params)`` in the units of ``y`` for raw inputs ``X`` (pure, jittable)."""
        out = self.module.apply({"params": params}, self.scale_inputs(X))
        return self.y_mean + self.y_scale * out[..., 0]

    def apply_features(self, X: jax.Array) -> jax.Array:
        """Penultimate activations ``φ(X)`` of the source network (pure, jittable)."""
        _, feats = self.module.apply({"params": self.params}, self.scale_inputs(X), True)
        return feats

    # ---- user-facing -----------------------------------------------------------------------
    def predict(self, X: Any) -> np.ndarray:
        """Source predictive mean ``g_S(X)``."""
        X = check_X(X, "X", n_features=self.n_features)
        # the network's standardised output in float32, the label scaling in float64 (labels
        # far from 0, say at 10⁷, would lose their last digits in float32)
        out = np.asarray(self._jitted_standardised(self.params, jnp.asarray(X)), np.float64)
        return self.y_mean + self.y_scale * out

    def features(self, X: Any) -> np.ndarray:
        """Penultimate-layer features ``φ(X)`` (rows = inputs), without the bias column."""
        X = check_X(X, "X", n_features=self.n_features)
        return np.asarray(self._jitted_features(jnp.asarray(X)))

    @cached_property
    def _jitted_standardised(self) -> Callable:
        def standardised(params, X):
            return self.module.apply({"params": params}, self.scale_inputs(X))[..., 0]

        return jax.jit(standardised)

    @cached_property
    def _jitted_features(self) -> Callable:
        return jax.jit(self.apply_features)

    def head(self) -> np.ndarray:
        """Last-layer coefficients ``β_S`` in the units of ``y``, bias last.

        With ``Φ = [φ(X), 1]``, ``g_S(X) = Φ β_S`` exactly: ``β_S = s_y [w; b] + [0; m_y]``.
        """
        w = np.asarray(self.params["output"]["kernel"], dtype=np.float64)[:, 0]
        b = float(np.asarray(self.params["output"]["bias"])[0])
        return np.concatenate([self.y_scale * w, [self.y_scale * b + self.y_mean]])

    def rescaled(self, loc: float, scale: float) -> SourceModel:
        r"""The same network predicting ``(g_S(x) − loc)/scale``: labels standardised by the
        target's ``(loc, scale)``.

        Only the output scalings change, ``m_y ← (m_y − loc)/scale``, ``s_y ← s_y/scale`` (and
        ``σ_S ← σ_S/scale``); weights, features and reference inputs are shared. Estimators fit
        in these units, so that labels at ``10⁶`` or ``10⁻⁶`` meet the same float32 arithmetic
        as labels near 1, and the PC distance ``d = RMS(g_T − g_S)/σ`` is unchanged by it.
        """
        loc, scale = float(loc), float(scale)
        if not (np.isfinite(loc) and np.isfinite(scale) and scale > 0):
            raise ValueError(
                f"rescaled needs a finite loc and a positive scale, got {loc}, {scale}"
            )
        if loc == 0.0 and scale == 1.0:
            return self
        return replace(
            self,
            y_mean=(self.y_mean - loc) / scale,
            y_scale=self.y_scale / scale,
            noise_sd=self.noise_sd / scale,
        )

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the model to ``path`` (a NumPy ``.npz`` archive; no pickle).

        The archive holds every array under its parameter path plus a JSON header with the
        format name and version, the architecture, the scalings and ``info``. It is written
        to a uniquely named temporary file in the same directory, flushed to disk
        (``fsync``) and moved over ``path`` with :func:`os.replace`, so a reader sees the old
        file or the new one, never a mix, and several processes may save the same path at
        once (the last one wins). The file gets the mode a new file gets from the process
        umask (``0o644`` under the usual ``022``).
        """
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "hidden": [int(h) for h in self.hidden],
            "activation": self.activation,
            "y_mean": float(self.y_mean),
            "y_scale": float(self.y_scale),
            "noise_sd": float(self.noise_sd),
            "info": self.info,
        }
        try:
            header = json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"cannot save the model: info must be JSON-serialisable ({exc})"
            ) from exc
        return _save_archive(Path(path), header, self)

    @classmethod
    def load(cls, path: str | Path) -> SourceModel:
        """Read a model written by :meth:`save`, checking everything before it is used.

        The archive is read member by member with ``allow_pickle=False`` semantics, and a
        file is refused with a ``ValueError`` naming it unless:

        * its members are exactly the header, ``x_mean``, ``x_scale``, ``reference_X`` and a
          ``kernel`` and ``bias`` per layer of the architecture the header declares, each a
          plain numeric ``.npy`` array (the header a string);
        * each array's declared shape agrees with the bytes it holds, and all together take at
          most :data:`MAX_MODEL_BYTES` (1 GiB), checked *before* anything is allocated;
        * the header JSON is at most 4 MiB and nested at most 64 deep (checked before it is
          parsed), of a known format and version, with positive integer ``hidden`` widths and
          a known ``activation``;
        * ``y_mean`` is finite, ``y_scale`` and ``noise_sd`` (``σ_S``) are finite and positive,
          ``x_mean`` is finite and ``x_scale`` finite and positive (one entry per feature),
          ``reference_X`` is finite with one column per feature, and every weight is finite
          with the shape the architecture gives it: ``hidden_0/kernel`` is
          ``(n_features, hidden[0])``, ``hidden_i/kernel`` is ``(hidden[i-1], hidden[i])``,
          ``output/kernel`` is ``(hidden[-1], 1)`` and each bias has the kernel's last size.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            A corrupt, foreign, forged or inconsistent file (the message names the file).
        """
        return _load_file(path, cls._load_checked, label="SourceModel", missing="source model")

    @classmethod
    def _load_checked(cls, path: Path) -> SourceModel:
        meta, layers, arrays = _read_archive(path, _read_header, max_bytes=MAX_MODEL_BYTES)
        hidden, activation = meta["hidden"], meta["activation"]
        x_mean, x_scale, reference_X = arrays["x_mean"], arrays["x_scale"], arrays["reference_X"]
        d = x_mean.shape[0]
        _check_layer_shapes(arrays, layers, [*hidden, 1], d, f"hidden={hidden} with {d} features")
        params = {
            layer: {
                leaf: jnp.asarray(arrays[f"params/{layer}/{leaf}"]) for leaf in ("kernel", "bias")
            }
            for layer in layers
        }
        return cls(
            hidden=tuple(hidden),
            activation=activation,
            params=params,
            x_mean=x_mean,
            x_scale=x_scale,
            y_mean=meta["y_mean"],
            y_scale=meta["y_scale"],
            noise_sd=meta["noise_sd"],
            reference_X=reference_X,
            info=meta["info"],
        )


#: Most bytes :meth:`SourceModel.load` reads from one file (all its arrays together): 1 GiB.
MAX_MODEL_BYTES = 1 << 30
_MAX_HEADER_CHARS = 4 << 20  # the JSON header of a model file, in characters
_MAX_HEADER_DEPTH = 64  # its nesting depth


def _read_npy_member(zf: zipfile.ZipFile, item: zipfile.ZipInfo, key: str) -> np.ndarray:
    """One ``.npy`` member, its header checked against its size before anything is allocated."""
    with zf.open(item) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"array {key}: .npy format version {version} is not supported")
        if dtype.hasobject or dtype.fields is not None or dtype.kind not in "fiuU":
            raise ValueError(f"array {key} has dtype {dtype}, which pcbtl does not load")
        if any(n < 0 for n in shape):
            raise ValueError(f"array {key} declares the impossible shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        held = item.file_size - fh.tell()
        if nbytes != held:
            raise ValueError(
                f"array {key} declares shape {shape} of {dtype} ({nbytes} bytes) but the "
                f"file holds {held} bytes for it"
            )
        data = fh.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"array {key} is truncated")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return arr.astype(dtype.newbyteorder("="), order="C", copy=True)


_LOAD_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    OSError,
    EOFError,
    zlib.error,
    KeyError,
    TypeError,
    RecursionError,
    MemoryError,
)


def _save_archive(path: Path, header: str, model: Any) -> Path:
    """Write ``model``'s arrays (``x_mean``, ``x_scale``, ``reference_X``, every parameter under
    ``params/<layer>/<leaf>``) and the JSON ``header`` to ``path`` as a NumPy ``.npz`` archive.

    The archive goes to a uniquely named temporary file in the same directory
    (:func:`tempfile.mkstemp`), is flushed to disk (``fsync``), given the mode a new file gets
    from the umask and moved over ``path`` with :func:`os.replace`; the directory entry is then
    flushed too. A reader sees the old file or the new one, never a mix.
    """
    arrays: dict[str, np.ndarray] = {
        "__meta__": np.array(header),
        "x_mean": np.asarray(model.x_mean),
        "x_scale": np.asarray(model.x_scale),
        "reference_X": np.asarray(model.reference_X),
    }
    for layer, leaves in model.params.items():
        for name, value in leaves.items():
            arrays[f"params/{layer}/{name}"] = np.asarray(value)
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_file(path: str | Path, read: Callable[[Path], Any], *, label: str, missing: str) -> Any:
    """``read(path)``, with a missing file a ``FileNotFoundError`` (``"no {missing} file at …"``)
    and any failure to read it a ``ValueError`` naming the file as not a valid ``label`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {missing} file at {path}")
    try:
        return read(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid pcbtl {label} file: {exc}") from None
    except _LOAD_ERRORS as exc:
        raise ValueError(
            f"{path} is not a valid pcbtl {label} file: {type(exc).__name__}: {exc}"
        ) from None


def _read_archive(
    path: Path, read_header: Callable[[np.ndarray], dict[str, Any]], *, max_bytes: int
) -> tuple[dict[str, Any], list[str], dict[str, np.ndarray]]:
    """``(meta, layers, arrays)`` of a network archive written by :func:`_save_archive`.

    ``meta`` is ``read_header`` of the ``__meta__`` member (it must hold ``hidden``);
    ``layers`` the layer names of that architecture; ``arrays`` the members ``x_mean``,
    ``x_scale``, ``reference_X`` and ``params/<layer>/<leaf>``, each checked to be a finite
    number array (integers become float64). Refused with a ``ValueError`` unless the members are
    exactly these, all ``.npy``, at most ``max_bytes`` in all (checked before anything is read),
    ``x_mean`` a non-empty vector, ``x_scale`` positive of its shape and ``reference_X`` one
    column per feature. The layer shapes are left to :func:`_check_layer_shapes`.
    """
    with zipfile.ZipFile(path) as zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for item in zf.infolist():
            if not item.filename.endswith(".npy") or item.filename[:-4] in members:
                raise ValueError(f"unexpected or repeated archive member {item.filename!r}")
            members[item.filename[:-4]] = item
        total = sum(item.file_size for item in members.values())
        if total > max_bytes:
            raise ValueError(
                f"its arrays take {total} bytes, more than MAX_MODEL_BYTES = {max_bytes} bytes"
            )
        if "__meta__" not in members:
            raise ValueError("missing header (__meta__)")
        if members["__meta__"].file_size > 4 * _MAX_HEADER_CHARS + 4096:  # UCS-4 + .npy head
            raise ValueError(f"the header is larger than {_MAX_HEADER_CHARS} characters")
        meta = read_header(_read_npy_member(zf, members["__meta__"], "__meta__"))
        hidden = meta["hidden"]
        layers = [f"hidden_{i}" for i in range(len(hidden))] + ["output"]
        expected = ["x_mean", "x_scale", "reference_X"] + [
            f"params/{layer}/{leaf}" for layer in layers for leaf in ("kernel", "bias")
        ]
        missing = [k for k in expected if k not in members]
        unexpected = sorted(set(members) - set(expected) - {"__meta__"})
        if missing or unexpected:
            raise ValueError(
                f"its arrays do not match the declared architecture hidden={hidden}: "
                f"missing {missing[:6]}, unexpected {unexpected[:6]}"
            )
        arrays = {k: _read_npy_member(zf, members[k], k) for k in expected}
    for key, arr in arrays.items():
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"array {key} has dtype {arr.dtype}, not a number type")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"array {key} contains NaN or infinity")
        if arr.dtype.kind in "iu":
            arrays[key] = arr.astype(np.float64)
    x_mean, x_scale, reference_X = arrays["x_mean"], arrays["x_scale"], arrays["reference_X"]
    if x_mean.ndim != 1 or x_mean.size < 1:
        raise ValueError(f"x_mean must be a non-empty vector, got shape {x_mean.shape}")
    d = x_mean.shape[0]
    if x_scale.shape != (d,):
        raise ValueError(f"x_scale has shape {x_scale.shape} but x_mean has shape {(d,)}")
    if not np.all(x_scale > 0):
        i = int(np.argmin(x_scale > 0))
        raise ValueError(f"x_scale must be positive, but entry {i} is {x_scale[i]}")
    if reference_X.ndim != 2 or reference_X.shape[1] != d:
        raise ValueError(f"reference_X must have shape (m, {d}), got {reference_X.shape}")
    return meta, layers, arrays


def _check_layer_shapes(
    arrays: dict[str, np.ndarray],
    layers: Sequence[str],
    widths: Sequence[int],
    n_features: int,
    declared: str,
) -> None:
    """Refuse (``ValueError``) a ``kernel`` or ``bias`` in ``arrays`` whose shape is not the one
    the layer ``widths`` (hidden then output) on ``n_features`` inputs give it; ``declared``
    describes the header in the message."""
    fan_in = n_features
    for layer, fan_out in zip(layers, widths, strict=True):
        for leaf, shape in (("kernel", (fan_in, fan_out)), ("bias", (fan_out,))):
            key = f"params/{layer}/{leaf}"
            if arrays[key].shape != shape:
                raise ValueError(
                    f"array {key} has shape {arrays[key].shape} but {declared} gives it "
                    f"shape {shape}"
                )
        fan_in = fan_out


def _finite(meta: dict[str, Any], key: str, *, positive: bool) -> float:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite" if positive else "a finite"
        raise ValueError(f"{key} must be {kind} number, got {value!r}")
    return float(value)


def _read_network_header(
    arr: np.ndarray, format_name: str, format_version: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, checked)`` of the JSON header ``arr`` of a network archive: ``meta`` the parsed
    object, ``checked`` its ``hidden``, ``activation`` and ``info`` (default ``{}``).

    ``ValueError`` unless ``arr`` is a string of at most ``_MAX_HEADER_CHARS`` characters
    holding a JSON object nested at most ``_MAX_HEADER_DEPTH`` deep (checked before parsing),
    of format ``format_name`` and version ``format_version``, with positive integer ``hidden``
    widths, a known ``activation`` and an ``info`` object. The caller checks its own keys.
    """
    if arr.dtype.kind != "U" or arr.shape != ():
        raise ValueError(f"the header __meta__ must be a string, got {arr.dtype} {arr.shape}")
    text = str(arr[()])
    if len(text) > _MAX_HEADER_CHARS:
        raise ValueError(f"the header holds {len(text)} characters (limit {_MAX_HEADER_CHARS})")
    depth = json_depth(text)
    if depth > _MAX_HEADER_DEPTH:
        raise ValueError(f"the header JSON is nested {depth} deep (limit {_MAX_HEADER_DEPTH})")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"the header must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != format_name:
        raise ValueError(f"format is {meta.get('format')!r}, not {format_name!r}")
    if meta.get("version") != format_version:
        raise ValueError(
            f"format version {meta.get('version')} is not supported "
            f"(this pcbtl reads version {format_version})"
        )
    hidden = meta.get("hidden")
    if not (
        isinstance(hidden, list)
        and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
    ):
        raise ValueError(f"hidden must be a list of positive integer widths, got {hidden!r}")
    activation = _check_activation(meta.get("activation"))
    info = meta.get("info", {})
    if not isinstance(info, dict):
        raise ValueError(f"info must be a JSON object, got {type(info).__name__}")
    return meta, {"hidden": [int(h) for h in hidden], "activation": activation, "info": info}


def _read_header(arr: np.ndarray) -> dict[str, Any]:
    """The checked JSON header of a model file (see :meth:`SourceModel.load`)."""
    meta, checked = _read_network_header(arr, FORMAT_NAME, FORMAT_VERSION)
    return {
        **checked,
        "y_mean": _finite(meta, "y_mean", positive=False),
        "y_scale": _finite(meta, "y_scale", positive=True),
        "noise_sd": _finite(meta, "noise_sd", positive=True),
    }


# ---- argument checks shared by train_source and train_source_classifier -------------------


def _check_activation(activation: Any) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def _check_learning_rate(learning_rate: Any) -> float:
    lr = check_positive(learning_rate, "learning_rate")
    if lr > 1.0:
        raise ValueError(f"learning_rate must be at most 1 (Adam on standardised data), got {lr!r}")
    return lr


def _check_validation_fraction(validation_fraction: Any, n_rows: int) -> float:
    """``validation_fraction`` in ``(0, 1)``, leaving a training row of ``n_rows`` (if known)."""
    fraction = check_probability(validation_fraction, "validation_fraction")
    if n_rows and n_rows - max(1, int(round(fraction * n_rows))) < 1:
        raise ValueError(f"validation_fraction={fraction} leaves no training rows out of {n_rows}")
    return fraction


def _check_featurizer(featurizer: Any) -> dict[str, Any] | None:
    if featurizer is None:
        return None
    if not isinstance(featurizer, dict):
        raise ValueError(f"featurizer must be a dict or None, got {type(featurizer).__name__}")
    try:
        json.dumps(featurizer)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"featurizer must be JSON-serialisable: {exc}") from None
    return featurizer


def _split_and_scale(
    X: np.ndarray, rng: np.random.Generator, validation_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_rows, validation_rows, x_mean, x_scale)``: a random split of the rows of ``X``
    (at least one validation row) and the input scaling of the training rows."""
    n = X.shape[0]
    perm = rng.permutation(n)
    n_val = max(1, int(round(validation_fraction * n)))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    x_mean = X[tr_idx].mean(0)
    x_scale = X[tr_idx].std(0)
    # a spread that float32 cannot hold (or that is rounding noise on the feature's magnitude)
    # marks a constant feature: scaled by 1, so the saved model's x_scale stays positive
    tiny = np.maximum(np.abs(x_mean), 1.0) * 1e-12
    x_scale = np.where((x_scale > tiny) & (x_scale > np.finfo(np.float32).tiny), x_scale, 1.0)
    return tr_idx, val_idx, x_mean, x_scale


def _fit_adamw(
    module: nn.Module,
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    data: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    seed: int,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    progress_bar: bool,
) -> tuple[float, Any, int, int]:
    """Train ``module`` (initialised from ``PRNGKey(seed)``) by minimising ``loss_fn(params, X,
    y)`` with AdamW, with early stopping on the validation loss.

    ``data`` is ``(X_train, y_train, X_val, y_val)``. Each epoch is one jitted ``lax.scan`` over
    shuffled minibatches of ``batch_size`` rows; training stops when the validation loss has
    not improved for ``patience`` epochs. Returns ``(best validation loss, its parameters, its
    epoch, epochs run)``; ``FloatingPointError`` when the validation loss is not finite.
    """
    Xtr, ytr, Xval, yval = data
    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    params = module.init(init_key, Xtr[:1])["params"]
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = opt.init(params)
    bs = min(int(batch_size), Xtr.shape[0])
    n_batches = Xtr.shape[0] // bs

    @jax.jit
    def epoch(p, state, k):
        order = jax.random.permutation(k, Xtr.shape[0])[: n_batches * bs].reshape(n_batches, bs)

        def step(carry, idx):
            p, state = carry
            loss, g = jax.value_and_grad(loss_fn)(p, Xtr[idx], ytr[idx])
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state), loss

        (p, state), losses = jax.lax.scan(step, (p, state), order)
        return p, state, losses.mean(), loss_fn(p, Xval, yval)

    best = (math.inf, params, 0)
    bar = tqdm(range(int(max_epochs)), desc="source training", disable=not progress_bar)
    ep = 0
    for ep in bar:
        key, k = jax.random.split(key)
        params, opt_state, train_loss, val_loss = epoch(params, opt_state, k)
        val_loss = float(val_loss)
        if not math.isfinite(val_loss):
            raise FloatingPointError(
                f"source training diverged at epoch {ep} (validation loss {val_loss}); "
                "lower learning_rate"
            )
        if val_loss < best[0]:
            best = (val_loss, params, ep)
        bar.set_postfix(train=f"{float(train_loss):.4f}", val=f"{val_loss:.4f}")
        if ep - best[2] >= patience:
            break
    bar.close()
    return best[0], best[1], best[2], ep + 1


def train_source(
    X: Any,
    y: Any,
    *,
    hidden: Sequence[int] = (64, 64),
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
) -> SourceModel:
    """Train the source network by minimising the mean squared error with Adam(W).

    Each epoch is one jitted ``lax.scan`` over shuffled minibatches of ``batch_size`` rows.
    Training stops when the validation MSE (on a random ``validation_fraction`` of the rows)
    has not improved for ``patience`` epochs; the best parameters are kept. The noise sd of the
    source predictive, ``σ_S``, is the validation RMSE. ``n_reference`` source inputs are kept
    as the source part of the default reference distribution of the PC prior.

    Every argument is checked before anything is compiled or trained, and all the problems
    are reported together in one ``ValueError``:

    * ``X`` (rows = inputs) and ``y`` finite, of matching lengths, at least 10 rows;
    * ``hidden`` a sequence of positive integers (widths; ``()`` is a linear model), and
      ``activation`` one of :data:`ACTIVATIONS`;
    * ``0 < learning_rate <= 1``: inputs and labels are standardised, and Adam moves each
      weight by about ``learning_rate`` per step, so a step above 1 can only diverge (the
      default ``1e-3`` is the usual choice);
    * ``weight_decay >= 0`` and finite (AdamW's decoupled decay);
    * ``batch_size >= 1``, ``max_epochs >= 1``, ``patience >= 0``, ``n_reference >= 0`` and
      ``seed >= 0`` integers (not floats such as ``4.7``);
    * ``0 < validation_fraction < 1``, leaving at least one training row;
    * ``featurizer`` ``None`` or a JSON-serialisable dict (it is saved with the model).
    """
    try:
        n_rows = len(X)  # for the validation split's check (X itself is checked below)
    except TypeError:
        n_rows = 0

    checked, problems = collect_errors(
        lambda: check_Xy(X, y, min_rows=10),
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
        raise ValueError(f"train_source: {len(problems)} invalid arguments: " + "; ".join(problems))
    (X, y), hidden, activation, learning_rate, weight_decay = checked[:5]
    batch_size, max_epochs, patience, validation_fraction, n_reference, seed = checked[5:11]

    rng = np.random.default_rng(seed)
    n = X.shape[0]
    tr_idx, val_idx, x_mean, x_scale = _split_and_scale(X, rng, validation_fraction)
    n_val = val_idx.size
    y_mean = float(y[tr_idx].mean())
    y_scale = float(y[tr_idx].std()) or 1.0
    Xs = jnp.asarray((X - x_mean) / x_scale, dtype=jnp.float32)
    ys = jnp.asarray((y - y_mean) / y_scale, dtype=jnp.float32)
    module = MLP(hidden=hidden, out=1, activation=activation)

    def loss_fn(p, xb, yb):
        return jnp.mean((module.apply({"params": p}, xb)[:, 0] - yb) ** 2)

    val_mse, params, best_epoch, epochs_run = _fit_adamw(
        module,
        loss_fn,
        (Xs[tr_idx], ys[tr_idx], Xs[val_idx], ys[val_idx]),
        seed=seed,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        batch_size=batch_size,
        max_epochs=max_epochs,
        patience=patience,
        progress_bar=progress_bar,
    )
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    ref_idx = rng.choice(n, size=min(int(n_reference), n), replace=False)
    info: dict[str, Any] = {
        "n_train": int(tr_idx.size),
        "n_validation": int(n_val),
        "best_epoch": int(best_epoch),
        "epochs_run": int(epochs_run),
        "validation_rmse": float(math.sqrt(val_mse) * y_scale),
        "seed": int(seed),
    }
    if featurizer is not None:
        info["featurizer"] = featurizer
    return SourceModel(
        hidden=hidden,
        activation=activation,
        params=jax.device_get(params),
        x_mean=x_mean.astype(np.float32),
        x_scale=x_scale.astype(np.float32),
        y_mean=y_mean,
        y_scale=y_scale,
        # floored: a network that reproduces its validation rows exactly would otherwise save
        # a noise sd of 0, a degenerate predictive that SourceModel.load refuses
        noise_sd=float(max(math.sqrt(val_mse), 1e-6) * y_scale),
        reference_X=X[np.sort(ref_idx)].astype(np.float32),
        info=info,
    )


@jax.tree_util.register_pytree_node_class
class NetworkFn:
    r"""``g(X; θ)`` for a flat vector ``θ`` of the transfer layers, everything else held as data.

    Calling ``fn(θ, X)`` evaluates ``m_y + s_y f((X − m_x)/s_x; θ ∪ θ_frozen)``. The instance is a
    JAX pytree whose leaves are the frozen parameters and the scalings (``aux``) and whose static
    part is the architecture's apply function, shared (cached) by every network of the same
    architecture and transfer set. So a jitted function that takes a ``NetworkFn`` as an
    *argument* compiles once per architecture and shape, not once per source network, and the
    networks of many replicates can be stacked leaf by leaf and ``vmap``-ed over.
    """

    def __init__(self, apply: Callable[..., jax.Array], aux: dict[str, Any]) -> None:
        self.apply = apply
        self.aux = aux

    def __call__(self, theta: jax.Array, X: jax.Array) -> jax.Array:
        return self.apply(theta, self.aux, X)

    def tree_flatten(self):
        return (self.aux,), self.apply

    @classmethod
    def tree_unflatten(cls, apply, children):
        return cls(apply, children[0])


@lru_cache(maxsize=128)
def _network_outputs(
    hidden: tuple[int, ...], activation: str, n_features: int, n_out: int, layers: tuple[str, ...]
) -> Callable[..., jax.Array]:
    """``apply(θ, aux, X)`` → the network's raw outputs ``(n, n_out)``, with the parameters of
    ``layers`` set from the flat vector ``θ`` and the others from ``aux["frozen"]``; inputs
    scaled by ``aux["x_mean"]``, ``aux["x_scale"]``. One function object per architecture and
    transfer set, so a jitted caller that takes the :class:`NetworkFn` as an argument compiles
    once. Regression (:func:`_flat_apply`) and classification (logits) both build on it."""
    module = MLP(hidden=tuple(hidden), out=n_out, activation=activation)
    template = module.init(jax.random.PRNGKey(0), jnp.zeros((1, n_features)))["params"]
    _, unravel = ravel_pytree({k: template[k] for k in layers})

    def apply(theta: jax.Array, aux: dict[str, Any], X: jax.Array) -> jax.Array:
        params = {**aux["frozen"], **unravel(theta)}
        return module.apply({"params": params}, (X - aux["x_mean"]) / aux["x_scale"])

    return apply


@lru_cache(maxsize=128)
def _head_outputs(
    hidden: tuple[int, ...], activation: str, n_features: int, n_out: int, layers: tuple[str, ...]
) -> Callable[..., jax.Array]:
    """``apply(θ, aux, H)`` → raw outputs of the transfer ``layers`` alone, from the frozen
    trunk's output ``H`` (see :func:`_frozen_trunk`)."""
    module = MLP(hidden=tuple(hidden), out=n_out, activation=activation)
    template = module.init(jax.random.PRNGKey(0), jnp.zeros((1, n_features)))["params"]
    _, unravel = ravel_pytree({k: template[k] for k in layers})
    act = ACTIVATIONS[activation]

    def apply(theta: jax.Array, aux: dict[str, Any], H: jax.Array) -> jax.Array:
        params = unravel(theta)
        h = H
        for name in layers:
            h = h @ params[name]["kernel"] + params[name]["bias"]
            if name != "output":
                h = act(h)
        return h

    return apply


@lru_cache(maxsize=128)
def _flat_apply(
    hidden: tuple[int, ...], activation: str, n_features: int, layers: tuple[str, ...]
) -> Callable[..., jax.Array]:
    """The regression network's ``apply(θ, aux, X)`` → ``g(X)`` in the units of ``y``."""
    raw = _network_outputs(tuple(hidden), activation, n_features, 1, tuple(layers))

    def apply(theta: jax.Array, aux: dict[str, Any], X: jax.Array) -> jax.Array:
        return aux["y_mean"] + aux["y_scale"] * raw(theta, aux, X)[..., 0]

    return apply


class TransferParametrization(NamedTuple):
    """A flat view of the transfer set of a source network.

    ``theta_source`` is the float32 vector of the source values of the parameters in
    ``layers`` (raveled once, outside any sampler loop); ``scales`` holds the fixed
    per-parameter scales ``s``; ``predict_fn(θ, X)`` (a :class:`NetworkFn`) evaluates ``g(X)``
    in the units of ``y`` with those parameters set to ``θ`` and every other parameter frozen
    at ``θ_S``.
    """

    layers: tuple[str, ...]
    theta_source: jax.Array
    scales: jax.Array
    predict_fn: NetworkFn


@lru_cache(maxsize=128)
def _head_apply(
    hidden: tuple[int, ...], activation: str, n_features: int, layers: tuple[str, ...]
) -> Callable[..., jax.Array]:
    """``apply(θ, aux, H)`` of the transfer layers alone, from the trunk's output ``H``, in the
    units of ``y``."""
    raw = _head_outputs(tuple(hidden), activation, n_features, 1, tuple(layers))

    def apply(theta: jax.Array, aux: dict[str, Any], H: jax.Array) -> jax.Array:
        return aux["y_mean"] + aux["y_scale"] * raw(theta, aux, H)[..., 0]

    return apply


def _frozen_trunk(source: Any, layers: Sequence[str]) -> Callable[[Any], jax.Array] | None:
    """The jitted trunk ``t(X)`` of ``source`` below the transfer ``layers`` (its frozen layers,
    inputs scaled by ``x_mean, x_scale``), or ``None`` unless ``layers`` are the last ``k < L``
    layers."""
    names = list(source.layer_names)
    k = len(layers)
    if k == len(names) or tuple(names[-k:]) != tuple(layers):
        return None
    frozen = names[: len(names) - k]
    params = {
        n: {a: jnp.asarray(v, jnp.float32) for a, v in source.params[n].items()} for n in frozen
    }
    act = ACTIVATIONS[source.activation]
    x_mean = jnp.asarray(source.x_mean, jnp.float32)
    x_scale = jnp.asarray(source.x_scale, jnp.float32)

    @jax.jit
    def trunk(X: jax.Array) -> jax.Array:
        h = (X - x_mean) / x_scale
        for n in frozen:
            h = act(h @ params[n]["kernel"] + params[n]["bias"])
        return h

    return lambda X: trunk(jnp.asarray(X, jnp.float32))


def _layer_scales(subset: dict[str, Any], scale: str) -> jax.Array:
    """The flat float32 per-parameter scales of the layers ``subset``: ``1/sqrt(fan_in)`` of
    each layer for ``scale="fan_in"``, else 1."""
    scales_tree = {
        k: jax.tree_util.tree_map(
            lambda a, fan=v["kernel"].shape[0]: jnp.full(
                np.shape(a), 1.0 / math.sqrt(fan) if scale == "fan_in" else 1.0, jnp.float32
            ),
            v,
        )
        for k, v in subset.items()
    }
    scales, _ = ravel_pytree(scales_tree)
    return scales


def split_frozen_trunk(
    source: SourceModel, tp: TransferParametrization
) -> tuple[Callable[[Any], jax.Array], NetworkFn] | None:
    r"""Split ``g(x; θ) = h(t(x); θ)`` when the transfer layers are the last ``k`` layers.

    The first ``L − k`` layers are then frozen, so the trunk
    ``t(x) = act(W_{L−k−1} ⋯ act(W_0 (x − m_x)/s_x + b_0) ⋯ + b_{L−k−1})`` is the same for every
    ``θ`` and can be computed once per input; the head ``h(H; θ)`` (a :class:`NetworkFn` taking
    ``H = t(X)`` instead of ``X``) is all a sampler needs to evaluate at each step. Returns
    ``(trunk, head)``, or ``None`` when nothing is frozen below the transfer set or the set is
    not a suffix of the layers.
    """
    trunk = _frozen_trunk(source, tp.layers)
    if trunk is None:
        return None
    aux = {"y_mean": tp.predict_fn.aux["y_mean"], "y_scale": tp.predict_fn.aux["y_scale"]}
    apply = _head_apply(tuple(source.hidden), source.activation, source.n_features, tp.layers)
    return trunk, NetworkFn(apply, aux)


def resolve_transfer_layers(source: SourceModel, transfer_layers: Any) -> tuple[str, ...]:
    """Turn ``"all"``, ``"last"``, an int ``k`` (last ``k`` layers) or a list of names into names."""
    names = source.layer_names
    if isinstance(transfer_layers, str):
        if transfer_layers == "all":
            return tuple(names)
        if transfer_layers == "last":
            return ("output",)
        transfer_layers = [transfer_layers]
    if isinstance(transfer_layers, int | np.integer) and not isinstance(transfer_layers, bool):
        k = int(transfer_layers)
        if not 1 <= k <= len(names):
            raise ValueError(f"transfer_layers={k} must be between 1 and {len(names)}")
        return tuple(names[-k:])
    try:
        chosen = list(transfer_layers)
    except TypeError:
        raise ValueError(
            f"transfer_layers must be 'all', 'last', an int or layer names, got {transfer_layers!r}"
        ) from None
    unknown = [c for c in chosen if c not in names]
    if unknown or not chosen:
        raise ValueError(
            f"transfer_layers names unknown layer(s) {unknown or chosen!r}; "
            f"the source network has {names}"
        )
    return tuple(n for n in names if n in chosen)


def transfer_parametrization(
    source: SourceModel, transfer_layers: Any = "all", *, scale: str = "fan_in"
) -> TransferParametrization:
    """Build the flat transfer vector of ``source`` for the layers named by ``transfer_layers``.

    ``scale="fan_in"`` gives every parameter of a layer ``s = 1/sqrt(fan_in)`` (the scale at
    which LeCun-initialised weights live, so one unit of ``τ`` is a comparable change in every
    layer); ``scale="unit"`` gives ``s = 1``.
    """
    if scale not in ("fan_in", "unit"):
        raise ValueError(f"scale must be 'fan_in' or 'unit', got {scale!r}")
    layers = resolve_transfer_layers(source, transfer_layers)
    frozen = {k: v for k, v in source.params.items() if k not in layers}
    subset = {k: source.params[k] for k in layers}
    theta0, _ = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, subset))
    theta0 = theta0.astype(jnp.float32)
    scales = _layer_scales(subset, scale)
    aux = {
        "frozen": jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), frozen),
        "x_mean": jnp.asarray(source.x_mean, jnp.float32),
        "x_scale": jnp.asarray(source.x_scale, jnp.float32),
        "y_mean": jnp.asarray(source.y_mean, jnp.float32),
        "y_scale": jnp.asarray(source.y_scale, jnp.float32),
    }
    apply = _flat_apply(tuple(source.hidden), source.activation, source.n_features, layers)
    return TransferParametrization(layers, theta0, scales, NetworkFn(apply, aux))
