r"""Save and load fitted estimators without pickle.

:func:`save_estimator` writes a fitted (or unfitted) estimator of the package to **one file**, a
NumPy ``.npz`` archive (a zip of ``.npy`` members, no pickled object anywhere), and
:func:`load_estimator` rebuilds it: predictions of the loaded model equal those of the saved one
bit for bit. The estimators' ``save(path)`` and ``load(path, source=...)`` call these two.

What the archive holds
----------------------
``__meta__``
    A JSON header (a 0-d unicode array): format name and version (:data:`FORMAT_VERSION`), the
    pcbtl, NumPy, JAX and scikit-learn versions that wrote it, the estimator's **registered
    class name** (a fixed whitelist, :func:`registered_classes`; no dotted path is ever imported from a
    file), the table of source models and the encoded state (below).
``a/<i>``
    Every NumPy or JAX array of the state, as a plain ``.npy`` array (numbers, bools, unicode
    strings, or the structured node records of scikit-learn trees; never ``object``).
``source/<g>``
    The bytes of the source model ``g`` in its own file format (:meth:`pcbtl.SourceModel.save`,
    :meth:`pcbtl.classification.SourceClassifier.save`), unless left out (``include_source=False``)
    for the caller to pass at load time.
``idata/<i>``
    ``idata_`` (ArviZ) as the bytes of its netCDF file, unless left out (``include_idata=False``).

The state is what pickle would store: the estimator's ``__getstate__()`` (which already leaves out
compiled functions), walked recursively. Leaves: ``None``, bools, ints, strings and floats
(NaN and infinities tagged) go to JSON; tuples, lists and dicts (any JSON-able keys) are tagged
JSON; arrays go to members (NumPy and JAX arrays are told apart, so both come back as they
were; an ``object`` array of strings or numbers, such as scikit-learn's ``feature_names_in_``,
is stored as a JSON list); NumPy scalars keep their dtype. Objects of a registered class are
stored as pickle's protocol would take them apart (``__reduce_ex__``: the class's registered
name, its constructor arguments and its state) and rebuilt the same way
(``cls.__new__`` then ``__setstate__``), but only for classes on the whitelist: the
estimators of the package, their small helpers (:class:`pcbtl.inference.Posterior`, the named
tuples of the priors, the forest wrapper) and the scikit-learn classes that a fitted
``RandomForestRegressor`` (the ``*-rf`` methods) and :class:`pcbtl.HurdleRegressor`'s default
classifier (gradient-boosted trees, isotonic or sigmoid recalibration) are made of. A source
model met anywhere in the state is stored once per distinct network: copies that share its
arrays (the rescaled copies the fits keep) are stored as a reference plus their own label
scalings.

What cannot be saved
--------------------
Anything else raises ``ValueError`` at save time, naming where in the estimator it sits: a
function (``HurdleRegressor(classifier_features=...)``), a scikit-learn classifier other than the
default one in :class:`pcbtl.HurdleRegressor`, a user-defined class. Use ``pickle`` or
``joblib`` for those; they work for every estimator of the package.

scikit-learn objects are stored through their own ``__getstate__``, as pickle stores them, so a
file holding a forest or a boosted classifier loads into the scikit-learn version that wrote it
(scikit-learn warns, as on unpickling, when the version differs).

Source models
-------------
``include_source=True`` (default) stores the source inside the file; ``False`` stores only its
fingerprint (:func:`source_fingerprint`: class, architecture, label scalings and a SHA-256 of
every weight, scaling and reference input), and :func:`load_estimator` then needs
``source=``. A ``source`` passed at load time is checked against the saved fingerprint in both
cases (a ``ValueError`` saying which differs otherwise) and becomes the loaded estimator's
``source``.

Safety
------
The file is written atomically (a temporary file in the same folder, fsync'ed, then
``os.replace``: :func:`pcbtl.batch.atomic_write_bytes`). Loading reads every member with
``allow_pickle=False``, checks the format name and version, that the members are exactly those
the header declares (no more, no fewer), their total size (:data:`MAX_ARCHIVE_BYTES`), the
header's size and nesting depth, every tag and registered name; a truncated, corrupt, foreign
or forged file raises ``ValueError`` naming the file (a missing one ``FileNotFoundError``),
never an error from deep inside. Restoring runs the ``__setstate__`` of whitelisted classes
only, on data only.
"""

from __future__ import annotations

import copyreg
import dataclasses
import hashlib
import importlib
import io
import json
import math
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sklearn
import xarray as xr
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestRegressor
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import LabelEncoder
from sklearn.tree import DecisionTreeRegressor

from pcbtl._files import atomic_write_bytes
from pcbtl._validation import json_depth
from pcbtl.classification.priors import HeadPrior
from pcbtl.classification.source import LogitParametrization, SourceClassifier
from pcbtl.inference import Posterior
from pcbtl.inference.convert import ARVIZ_MAJOR, az
from pcbtl.models import LastLayerStats
from pcbtl.networks import NetworkFn, SourceModel, _check_activation, _network_outputs
from pcbtl.priors import DistanceCurve, ReferenceGram
from pcbtl.tangent import TangentStats

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_ARCHIVE_BYTES",
    "Persistable",
    "register",
    "registered_classes",
    "load_estimator",
    "read_idata",
    "save_estimator",
    "save_fit_model",
    "source_fingerprint",
]

FORMAT_NAME = "pcbtl.Estimator"
FORMAT_VERSION = 1
#: most bytes :func:`load_estimator` reads from one file (all its members together): 8 GiB
MAX_ARCHIVE_BYTES = 8 << 30
_MAX_HEADER_CHARS = 256 << 20
_MAX_HEADER_DEPTH = 512
_MAX_NESTING = 200  # objects inside objects when saving (a cycle would never end)


class _Unsupported(ValueError):
    """An object the archive format cannot hold (raised by :func:`save_estimator`)."""


class _SourceMismatch(ValueError):
    """A ``source`` passed to :func:`load_estimator` that is not the saved one."""


# --------------------------------------------------------------------------------------------
# the whitelist
# --------------------------------------------------------------------------------------------


#: registered name → class: every class whose objects an archive may hold. Names are stable
#: identifiers written into files (not import paths): the pcbtl classes by their class name,
#: scikit-learn's as ``sklearn.<ClassName>``. The estimators register themselves
#: (:func:`register`, called by :mod:`pcbtl.estimators` for its classes).
_REGISTRY: dict[str, type] = {
    cls.__name__: cls
    for cls in (Posterior, DistanceCurve, ReferenceGram, LastLayerStats, TangentStats, HeadPrior)
}
#: scikit-learn's private classes that fitted forests, boosted trees and calibrated classifiers
#: hold, as ``module:name``. Private modules may move between releases: one that cannot be
#: imported is left off the whitelist (an archive holding it then cannot be written or read,
#: and says which class), instead of making ``import pcbtl`` fail.
_SKLEARN_PRIVATE = (
    "sklearn.tree._tree:Tree",
    "sklearn.ensemble._hist_gradient_boosting.binning:_BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor:TreePredictor",
    "sklearn._loss.loss:HalfBinomialLoss",
    "sklearn._loss._loss:CyHalfBinomialLoss",
    "sklearn._loss.link:LogitLink",
    "sklearn._loss.link:Interval",
    "sklearn.calibration:_CalibratedClassifier",
    "sklearn.calibration:_SigmoidCalibration",
)


def _importable(paths: tuple[str, ...]) -> list[type]:
    out = []
    for path in paths:
        module, name = path.split(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


_REGISTRY.update(
    {
        f"sklearn.{cls.__name__}": cls
        for cls in (
            RandomForestRegressor,
            DecisionTreeRegressor,
            HistGradientBoostingClassifier,
            IsotonicRegression,
            StratifiedKFold,
            LabelEncoder,
            *_importable(_SKLEARN_PRIVATE),
        )
    }
)


def register(*classes: type) -> None:
    """Allow objects of ``classes`` in an archive, under their class names.

    Raises ``ValueError`` if a name is already taken by another class (names are what files
    hold, so two classes must never share one)."""
    for cls in classes:
        other = _REGISTRY.setdefault(cls.__name__, cls)
        if other is not cls:
            raise ValueError(f"{cls.__name__}: name already registered for {other!r}")


def _classes() -> dict[str, type]:
    return _REGISTRY


def _names() -> dict[type, str]:
    return {cls: name for name, cls in _REGISTRY.items()}


def registered_classes() -> dict[str, type]:
    """Registered name → class of every object an archive may hold (the whitelist)."""
    return dict(_classes())


# --------------------------------------------------------------------------------------------
# source models
# --------------------------------------------------------------------------------------------


def _source_types() -> tuple[type, ...]:
    return SourceModel, SourceClassifier


#: the per-copy label scalings of a SourceModel (a rescaled copy differs in these only)
_SCALINGS = ("y_mean", "y_scale", "noise_sd")


def source_fingerprint(source: Any) -> str:
    """A SHA-256 fingerprint of a source model: its class, architecture (hidden widths,
    activation, number of inputs; the classes of a classifier), label scalings (``y_mean``,
    ``y_scale``, ``noise_sd`` of a :class:`pcbtl.SourceModel`) and the bytes, dtypes and
    shapes of every weight, of the input scalings and of ``reference_X``. Two models with equal
    fingerprints predict alike; ``info`` (the training record) is not part of it.

    Parameters
    ----------
    source
        A :class:`pcbtl.SourceModel` or :class:`pcbtl.classification.SourceClassifier`.

    Returns
    -------
    str
        ``"sha256:<hex>"``.
    """
    model_types = _source_types()
    if not isinstance(source, model_types):
        raise ValueError(f"source must be a pcbtl source model, got {type(source).__name__}")
    h = hashlib.sha256()
    head: dict[str, Any] = {
        "class": type(source).__name__,
        "hidden": [int(w) for w in source.hidden],
        "activation": str(source.activation),
        "n_features": int(source.n_features),
    }
    if isinstance(source, model_types[0]):
        head.update({k: float(getattr(source, k)) for k in _SCALINGS})
    else:
        head["classes"] = np.asarray(source.classes).tolist()
    h.update(json.dumps(head, sort_keys=True).encode())
    arrays = [("x_mean", source.x_mean), ("x_scale", source.x_scale)]
    arrays.append(("reference_X", source.reference_X))
    for layer in sorted(source.params):
        for leaf in sorted(source.params[layer]):
            arrays.append((f"{layer}/{leaf}", source.params[layer][leaf]))
    for name, value in arrays:
        a = np.ascontiguousarray(np.asarray(value))
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def _describe(source: Any) -> str:
    return (
        f"{type(source).__name__}(hidden={tuple(int(w) for w in source.hidden)}, "
        f"activation={source.activation!r}, n_features={source.n_features})"
    )


def _source_bytes(source: Any) -> bytes:
    """The bytes of ``source``'s own file (:meth:`SourceModel.save`)."""
    with tempfile.TemporaryDirectory(prefix="pcbtl-source-") as tmp:
        path = Path(tmp) / "source.npz"
        source.save(path)
        return path.read_bytes()


def _source_from_bytes(data: bytes, kind: str) -> Any:
    model_types = dict(zip(("SourceModel", "SourceClassifier"), _source_types(), strict=True))
    if kind not in model_types:
        raise ValueError(f"unknown source model kind {kind!r}")
    with tempfile.TemporaryDirectory(prefix="pcbtl-source-") as tmp:
        path = Path(tmp) / "source.npz"
        path.write_bytes(data)
        return model_types[kind].load(path)


# --------------------------------------------------------------------------------------------
# ArviZ objects
# --------------------------------------------------------------------------------------------


def _is_idata(obj: Any) -> bool:
    """An ArviZ record: ``InferenceData`` (ArviZ 0.x) or an xarray ``DataTree`` (ArviZ 1.x,
    which has no ``InferenceData``)."""
    if ARVIZ_MAJOR >= 1:  # touching az.InferenceData there raises a MigrationWarning
        return isinstance(obj, getattr(xr, "DataTree", ()))
    return isinstance(obj, az.InferenceData)


def _idata_bytes(idata: Any) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pcbtl-idata-") as tmp:
        path = Path(tmp) / "idata.nc"
        idata.to_netcdf(str(path))
        return path.read_bytes()


def read_idata(path: str | Path) -> Any:
    """An ArviZ netCDF file read fully into memory (the file is closed after): an
    ``arviz.InferenceData`` under ArviZ 0.x, an ``xarray.DataTree`` under ArviZ >= 1."""

    if ARVIZ_MAJOR >= 1:  # pragma: no cover - ArviZ 1 needs Python >= 3.12
        obj = az.from_netcdf(str(path))
        obj = obj.load()
        close = getattr(obj, "close", None)
        if close is not None:
            close()
        return obj
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(str(path))


def _idata_from_bytes(data: bytes) -> Any:
    with tempfile.TemporaryDirectory(prefix="pcbtl-idata-") as tmp:
        path = Path(tmp) / "idata.nc"
        path.write_bytes(data)
        return read_idata(path)


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------

_TAGS = (
    "__tuple__",
    "__dict__",
    "__float__",
    "__array__",
    "__objarray__",
    "__np__",
    "__dtype__",
    "__source__",
    "__logitparam__",
    "__idata__",
    "__rng__",
    "__obj__",
)

#: the NumPy bit generators whose state a ``numpy.random.Generator`` may be stored with
_BIT_GENERATORS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        np.random.PCG64,
        np.random.PCG64DXSM,
        np.random.MT19937,
        np.random.Philox,
        np.random.SFC64,
    )
}


class _Encoder:
    """Turns a state into JSON plus arrays (see the module docstring)."""

    def __init__(self, include_idata: bool) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.array_ids: dict[int, str] = {}
        self.keep: list[Any] = []  # the objects whose id() is a key above stay alive
        self.groups: list[dict[str, Any]] = []  # one per distinct source network
        self.group_objects: list[Any] = []
        self.idata: list[bytes] = []
        self.include_idata = include_idata
        self.names = _names()
        self.source_types = _source_types()
        self.depth = 0
        self.owners: list[dict[str, Any]] = []  # the states of the objects being encoded

    # ---- leaves ------------------------------------------------------------------------------
    def array(self, a: Any, kind: str) -> dict[str, Any]:
        key = self.array_ids.get(id(a))
        if key is None:
            arr = np.asarray(a)
            if arr.dtype.hasobject:
                raise _Unsupported("an object array")
            key = f"a/{len(self.arrays)}"
            self.arrays[key] = arr
            self.array_ids[id(a)] = key
            self.keep.append(a)
        return {"__array__": key, "kind": kind}

    def object_array(self, a: np.ndarray, where: str) -> dict[str, Any]:
        """An ``object`` array of strings, numbers and ``None`` (say ``feature_names_in_``)."""
        items = [str(x) if isinstance(x, str) else x for x in a.ravel().tolist()]
        if not all(type(x) in (type(None), bool, int, float, str) for x in items):
            kinds = sorted({type(x).__name__ for x in items})
            raise _Unsupported(f"an object array of {kinds} at {where}")
        return {
            "__objarray__": [self.encode(x, where) for x in items],
            "shape": list(a.shape),
        }

    # ---- source models -----------------------------------------------------------------------
    @staticmethod
    def _network_key(src: Any) -> tuple:
        """Copies of one network (``dataclasses.replace``, ``rescaled``) share these objects."""
        return (
            type(src),
            id(src.params),
            id(src.x_mean),
            id(src.x_scale),
            id(src.reference_X),
            tuple(src.hidden),
            src.activation,
        )

    def source(self, src: Any) -> dict[str, Any]:
        """A source model: a reference to its network (stored once per network) plus, for a
        :class:`pcbtl.SourceModel`, its own label scalings."""
        key = self._network_key(src)
        known = [self._network_key(other) for other in self.group_objects]
        if key in known:
            g = known.index(key)
        else:
            g = len(self.group_objects)
            self.group_objects.append(src)
            self.keep.append(src)
            self.groups.append(
                {
                    "kind": type(src).__name__,
                    "fingerprint": source_fingerprint(src),
                    "describe": _describe(src),
                    # the weights' array type (the model file reads them back as JAX arrays)
                    "numpy_params": all(
                        isinstance(leaf, np.ndarray)
                        for leaf in jax.tree_util.tree_leaves(src.params)
                    ),
                }
            )
        out: dict[str, Any] = {"__source__": g}
        if isinstance(src, self.source_types[0]):
            out["scalings"] = [self.encode(getattr(src, k), "source") for k in _SCALINGS]
        return out

    def logit_parametrization(self, lp: Any, where: str) -> dict[str, Any]:
        """A classifier's :class:`LogitParametrization` (its ``NetworkFn`` holds a cached
        function): the arrays, and the architecture of the owner's source to rebuild it."""

        src = self.owners[-1].get("source") if self.owners else None
        if not isinstance(src, self.source_types[1]):
            raise _Unsupported(f"a LogitParametrization without its SourceClassifier at {where}")
        arch = [
            [int(w) for w in src.hidden],
            str(src.activation),
            int(src.n_features),
            int(src.n_outputs),
        ]
        layers = tuple(lp.layers)
        if lp.predict_fn.apply is not _network_outputs(
            tuple(arch[0]), arch[1], arch[2], arch[3], layers
        ):
            raise _Unsupported(f"a LogitParametrization of another network at {where}")
        return {
            "__logitparam__": self.encode(
                [list(layers), lp.theta_source, lp.scales, lp.predict_fn.aux, arch], where
            )
        }

    # ---- the walk ----------------------------------------------------------------------------
    def encode(self, obj: Any, where: str) -> Any:
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise _Unsupported(f"objects nested more than {_MAX_NESTING} deep at {where}")
        try:
            return self._encode(obj, where)
        finally:
            self.depth -= 1

    def _encode(self, obj: Any, where: str) -> Any:

        t = type(obj)
        if obj is None or t in (bool, str):
            return obj
        if t is int:
            return obj
        if t is float:
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return self.object_array(obj, where)
            return self.array(obj, "numpy")
        if isinstance(obj, jax.Array):
            return self.array(obj, "jax")
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise _Unsupported(f"a NumPy object scalar at {where}")
            return {"__np__": obj.dtype.str, "value": self.encode(obj.item(), where)}
        if isinstance(obj, np.dtype):
            if obj.hasobject or obj.fields is not None:
                raise _Unsupported(f"the dtype {obj} at {where}")
            return {"__dtype__": obj.str}
        if t is list:
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if t is tuple:
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if t is dict:
            return {
                "__dict__": [
                    [self.encode(k, where), self.encode(v, f"{where}[{k!r}]")]
                    for k, v in obj.items()
                ]
            }
        if isinstance(obj, self.source_types):
            return self.source(obj)
        if t is LogitParametrization:
            return self.logit_parametrization(obj, where)
        if t is np.random.Generator or t is np.random.RandomState:
            bits = obj.bit_generator if t is np.random.Generator else obj._bit_generator
            name = type(bits).__name__
            if _BIT_GENERATORS.get(name) is not type(bits):
                raise _Unsupported(f"a random generator on {name} at {where}")
            return {
                "__rng__": "Generator" if t is np.random.Generator else "RandomState",
                "bit_generator": name,
                "state": self.encode(bits.state, where),
            }
        if _is_idata(obj):
            if not self.include_idata:
                return None
            key = f"idata/{len(self.idata)}"
            self.idata.append(_idata_bytes(obj))
            return {"__idata__": key}
        name = self.names.get(t)
        if name is None:
            what = "a function" if callable(obj) else f"an object of type {t.__name__}"
            raise _Unsupported(
                f"{where} holds {what} ({t.__module__}.{t.__qualname__}), which pcbtl's "
                "archive format does not store; save this estimator with pickle or joblib"
            )
        return self.reduced(obj, name, where)

    def reduced(self, obj: Any, name: str, where: str) -> dict[str, Any]:
        """A registered object as pickle's protocol takes it apart: constructor and state."""
        rv = obj.__reduce_ex__(4)
        if not isinstance(rv, tuple) or len(rv) < 2:
            raise _Unsupported(f"{where}: {name} does not reduce to a constructor and state")
        func, args = rv[0], rv[1]
        state = rv[2] if len(rv) > 2 else None
        if any(x is not None for x in rv[3:]):
            raise _Unsupported(f"{where}: {name} reduces to list or dict items")
        if func is copyreg.__newobj__:
            if not args or args[0] is not type(obj):
                raise _Unsupported(f"{where}: {name} reduces to another class")
            new, args = True, tuple(args[1:])
        elif func is type(obj):
            new = False
        else:
            raise _Unsupported(f"{where}: {name} reduces to {func!r}")
        if isinstance(state, dict) and "source" in state:
            # the estimator's own source first, so that it names the group of its network
            state = {"source": state["source"], **state}
        self.owners.append(state if isinstance(state, dict) else {})
        try:
            encoded_state = self.encode(state, where)
        finally:
            self.owners.pop()
        return {
            "__obj__": name,
            "new": new,
            "args": self.encode(tuple(args), f"{where}.<args>"),
            "state": encoded_state,
        }


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


class _Decoder:
    def __init__(
        self,
        arrays: Callable[[str], np.ndarray],
        sources: list[Any],
        idata: Callable[[str], Any],
    ) -> None:
        self.arrays = arrays
        self.sources = sources
        self.idata = idata
        self.classes = _classes()
        self.source_types = _source_types()

    def decode(self, obj: Any) -> Any:
        if obj is None or type(obj) in (bool, int, str, float):
            return obj
        if type(obj) is list:
            return [self.decode(v) for v in obj]
        if type(obj) is not dict or len(obj) < 1:
            raise ValueError(f"unexpected JSON value {str(obj)[:80]!r} in the state")
        tag = next(iter(obj))
        if tag not in _TAGS:
            raise ValueError(f"unknown tag {tag!r} in the state")
        return getattr(self, "d_" + tag.strip("_"))(obj)

    def d_tuple(self, obj: dict[str, Any]) -> tuple:
        return tuple(self.decode(v) for v in _list(obj["__tuple__"]))

    def d_dict(self, obj: dict[str, Any]) -> dict:
        out = {}
        for pair in _list(obj["__dict__"]):
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("a dict entry is not a [key, value] pair")
            key = self.decode(pair[0])
            try:
                hash(key)
            except TypeError:
                raise ValueError(f"a dict key of type {type(key).__name__}") from None
            out[key] = self.decode(pair[1])
        return out

    def d_float(self, obj: dict[str, Any]) -> float:
        text = obj["__float__"]
        if text not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad non-finite float {text!r}")
        return float(text)

    def d_array(self, obj: dict[str, Any]) -> Any:
        arr = self.arrays(_str(obj["__array__"]))
        kind = obj.get("kind")
        if kind == "numpy":
            return arr
        if kind == "jax":
            return jnp.asarray(arr)
        raise ValueError(f"unknown array kind {kind!r}")

    def d_objarray(self, obj: dict[str, Any]) -> np.ndarray:
        items = [self.decode(v) for v in _list(obj["__objarray__"])]
        shape = tuple(int(n) for n in _list(obj["shape"]))
        if any(type(x) not in (type(None), bool, int, float, str) for x in items):
            raise ValueError("an object array holds something other than strings and numbers")
        if math.prod(shape) != len(items):
            raise ValueError(f"an object array of shape {shape} holds {len(items)} items")
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(shape)

    def d_np(self, obj: dict[str, Any]) -> np.generic:
        dtype = np.dtype(_str(obj["__np__"]))
        if dtype.hasobject or dtype.fields is not None:
            raise ValueError(f"a NumPy scalar of dtype {dtype}")
        return dtype.type(self.decode(obj["value"]))

    def d_dtype(self, obj: dict[str, Any]) -> np.dtype:
        dtype = np.dtype(_str(obj["__dtype__"]))
        if dtype.hasobject or dtype.fields is not None:
            raise ValueError(f"the dtype {dtype}")
        return dtype

    def d_source(self, obj: dict[str, Any]) -> Any:
        g = obj["__source__"]
        if type(g) is not int or not 0 <= g < len(self.sources):
            raise ValueError(f"reference to an unknown source model {g!r}")
        src = self.sources[g]
        if "scalings" not in obj:
            return src
        if not isinstance(src, self.source_types[0]):
            raise ValueError("label scalings given for a source classifier")
        values = [self.decode(v) for v in _list(obj["scalings"])]
        if len(values) != len(_SCALINGS):
            raise ValueError("a source model reference needs three label scalings")
        for name, value in zip(_SCALINGS, values, strict=True):
            if not isinstance(value, float | int | np.floating) or isinstance(value, bool):
                raise ValueError(f"the source model's {name} must be a number")
        if all(v == getattr(src, k) for k, v in zip(_SCALINGS, values, strict=True)):
            return src
        return dataclasses.replace(src, **dict(zip(_SCALINGS, values, strict=True)))

    def d_logitparam(self, obj: dict[str, Any]) -> Any:

        parts = self.decode(obj["__logitparam__"])
        if type(parts) is not list or len(parts) != 5:
            raise ValueError("a LogitParametrization needs five parts")
        layers, theta, scales, aux, arch = parts
        if type(arch) is not list or len(arch) != 4:
            raise ValueError("a LogitParametrization's architecture needs four parts")
        hidden, activation, n_features, n_out = arch
        hidden = tuple(_positive_int(w) for w in _list(hidden))
        layers = tuple(_str(n) for n in _list(layers))
        known = {f"hidden_{i}" for i in range(len(hidden))} | {"output"}
        if not layers or not set(layers) <= known:
            raise ValueError(f"unknown transfer layers {layers}")
        apply = _network_outputs(
            hidden,
            _check_activation(activation),
            _positive_int(n_features),
            _positive_int(n_out),
            layers,
        )
        if not isinstance(aux, dict):
            raise ValueError("a LogitParametrization's aux must be a dict")
        return LogitParametrization(layers, theta, scales, NetworkFn(apply, aux))

    def d_rng(self, obj: dict[str, Any]) -> Any:
        kind = obj["__rng__"]
        bits_cls = _BIT_GENERATORS.get(_str(obj.get("bit_generator")))
        if kind not in ("Generator", "RandomState") or bits_cls is None:
            raise ValueError(f"unknown random generator {kind!r} on {obj.get('bit_generator')!r}")
        bits = bits_cls()
        bits.state = self.decode(obj["state"])
        return np.random.Generator(bits) if kind == "Generator" else np.random.RandomState(bits)

    def d_idata(self, obj: dict[str, Any]) -> Any:
        return self.idata(_str(obj["__idata__"]))

    def d_obj(self, obj: dict[str, Any]) -> Any:
        name = _str(obj["__obj__"])
        cls = self.classes.get(name)
        if cls is None:
            raise ValueError(f"unknown class name {name!r} (not on pcbtl's whitelist)")
        args = self.decode(obj["args"])
        if type(args) is not tuple:
            raise ValueError(f"the arguments of {name} must be a tuple")
        new = obj.get("new")
        if new is True:
            inst = cls.__new__(cls, *args)
        elif new is False:
            inst = cls(*args)
        else:
            raise ValueError(f"bad constructor flag for {name}")
        state = self.decode(obj["state"])
        if state is None:
            return inst
        setstate = getattr(inst, "__setstate__", None)
        if setstate is not None:
            setstate(state)
            return inst
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        if state:
            if type(state) is not dict:
                raise ValueError(f"the state of {name} must be a dict")
            inst.__dict__.update(state)
        if slots:
            if type(slots) is not dict:
                raise ValueError(f"the slot state of {name} must be a dict")
            for k, v in slots.items():
                setattr(inst, k, v)
        return inst


def _list(value: Any) -> list:
    if type(value) is not list:
        raise ValueError(f"expected a JSON list, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _positive_int(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:

    try:
        pcbtl_version = version("pcbtl")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        pcbtl_version = "unknown"
    return {
        "pcbtl": pcbtl_version,
        "numpy": np.__version__,
        "jax": jax.__version__,
        "sklearn": sklearn.__version__,
    }


def _param_sources(est: Any) -> list[Any]:
    """The source models among the estimator's parameters (nested ones included)."""
    types = _source_types()
    try:
        params = est.get_params(deep=True)
    except Exception:  # noqa: BLE001 - not a scikit-learn estimator: no parameters to read
        return []
    return [v for v in params.values() if isinstance(v, types)]


def save_estimator(
    est: Any,
    path: str | Path,
    *,
    include_source: bool = True,
    include_idata: bool = True,
) -> Path:
    """Write the estimator ``est`` to ``path``: one ``.npz`` archive, no pickle.

    Parameters
    ----------
    est
        An estimator of the package (a class of :func:`registered_classes`), fitted or not.
    path
        The file to write (its folder must exist). Written atomically: readers see the old
        file or the new one.
    include_source
        Store the source model(s) inside the file (default). ``False`` stores the fingerprint
        (:func:`source_fingerprint`) of the estimator's ``source`` parameter only; loading then
        needs ``source=`` (other source networks the state holds, if any, are stored anyway).
    include_idata
        Store ``idata_`` (the ArviZ record of the fit: posterior, sample statistics,
        log-likelihood, posterior predictive, observed and constant data) as netCDF bytes.
        ``False`` leaves it out (``idata_`` is then ``None`` after loading); predictions do not
        use it.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        ``est`` is not a registered estimator, or holds something the format does not store
        (a function, a foreign class): the message says where, and that pickle or joblib
        can save it.
    """
    names = _names()
    name = names.get(type(est))
    if name is None or name.startswith("sklearn."):
        raise ValueError(
            f"save_estimator saves the estimators of pcbtl, not {type(est).__name__}; "
            "use pickle or joblib"
        )
    enc = _Encoder(include_idata=bool(include_idata))
    try:
        # the estimator's own source parameter first: it names the group of its network
        for src in _param_sources(est):
            enc.source(src)
        state = enc.encode(est, type(est).__name__)
    except _Unsupported as exc:
        raise ValueError(f"cannot save this {type(est).__name__}: {exc}") from None
    external = set()
    if not include_source:
        param_groups = {enc.source(src)["__source__"] for src in _param_sources(est)}
        fingerprints = {enc.groups[g]["fingerprint"] for g in param_groups}
        if len(fingerprints) > 1:
            raise ValueError(
                f"this {type(est).__name__} holds {len(fingerprints)} different source models; "
                "save it with include_source=True"
            )
        external = param_groups
    members: dict[str, np.ndarray] = dict(enc.arrays)
    sources = []
    for g, (group, obj) in enumerate(zip(enc.groups, enc.group_objects, strict=True)):
        stored = g not in external
        sources.append({**group, "stored": stored})
        if stored:
            members[f"source/{g}"] = np.frombuffer(_source_bytes(obj), np.uint8)
    for i, data in enumerate(enc.idata):
        members[f"idata/{i}"] = np.frombuffer(data, np.uint8)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "versions": _versions(),
        "class": name,
        "sources": sources,
        "members": sorted(members),
        "state": state,
    }
    header = json.dumps(meta, allow_nan=False, separators=(",", ":"))
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.array(header), **members)

    return atomic_write_bytes(Path(path), buf.getvalue())


def save_fit_model(est: Any, path: str | Path) -> Path | None:
    """The model file of a batch fit (:func:`pcbtl.jobs.batch.load_fit` reads it): ``est`` saved
    without its source and without ``idata_`` (the job keeps both: the source in
    ``sources/`` or at ``[source] path``, the ArviZ record in ``fits/<fit_id>.nc``).

    Returns ``path``, or ``None`` with a ``RuntimeWarning`` when the estimator holds something
    the format does not store (the fit itself stands; only :func:`pcbtl.jobs.batch.load_fit` cannot
    rebuild it). An ``OSError`` (disk full, permissions) propagates: the job records it as a
    write error.
    """
    try:
        return save_estimator(est, path, include_source=False, include_idata=False)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - the fit stands without its model file
        warnings.warn(
            f"the fitted model was not saved to {path} ({type(exc).__name__}: {exc}); "
            "pcbtl.jobs.batch.load_fit cannot rebuild this fit",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _read_header(zf: zipfile.ZipFile) -> dict[str, Any]:
    infos: dict[str, zipfile.ZipInfo] = {}
    for item in zf.infolist():
        if not item.filename.endswith(".npy") or item.filename[:-4] in infos:
            raise ValueError(f"unexpected or repeated archive member {item.filename!r}")
        infos[item.filename[:-4]] = item
    total = sum(item.file_size for item in infos.values())
    if total > MAX_ARCHIVE_BYTES:
        raise ValueError(f"its members take {total} bytes, more than {MAX_ARCHIVE_BYTES}")
    if "__meta__" not in infos:
        raise ValueError("missing header (__meta__): not a pcbtl estimator file")
    if infos["__meta__"].file_size > 4 * _MAX_HEADER_CHARS + 4096:
        raise ValueError(f"the header is larger than {_MAX_HEADER_CHARS} characters")
    with zf.open(infos["__meta__"]) as fh:
        arr = np.lib.format.read_array(fh, allow_pickle=False)
    if arr.dtype.kind != "U" or arr.shape != ():
        raise ValueError(f"the header must be a string, got {arr.dtype} {arr.shape}")
    text = str(arr[()])
    depth = json_depth(text)
    if depth > _MAX_HEADER_DEPTH:
        raise ValueError(f"the header JSON is nested {depth} deep (limit {_MAX_HEADER_DEPTH})")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the header is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError("the header must be a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"format version {meta.get('version')!r} is not supported "
            f"(this pcbtl reads version {FORMAT_VERSION})"
        )
    declared = meta.get("members")
    if type(declared) is not list or not all(type(m) is str for m in declared):
        raise ValueError("the header's member list is missing or malformed")
    missing = sorted(set(declared) - set(infos))
    unexpected = sorted(set(infos) - set(declared) - {"__meta__"})
    if missing or unexpected:
        raise ValueError(
            f"its members do not match the header: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    meta["_infos"] = infos
    return meta


def _read_member(zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], key: str) -> np.ndarray:
    if key not in infos or key == "__meta__":
        raise ValueError(f"the state refers to a missing member {key!r}")
    with zf.open(infos[key]) as fh:
        arr = np.lib.format.read_array(fh, allow_pickle=False)
        if fh.read(1):
            raise ValueError(f"member {key!r} holds more bytes than its array")
    return arr


def _load_sources(
    meta: dict[str, Any], read: Callable[[str], np.ndarray], source: Any
) -> list[Any]:
    groups = meta.get("sources")
    if type(groups) is not list:
        raise ValueError("the header's source list is missing or malformed")
    passed_fp = None
    if source is not None:
        if not isinstance(source, _source_types()):
            raise _SourceMismatch(
                f"source must be a pcbtl SourceModel or SourceClassifier, got "
                f"{type(source).__name__}"
            )
        passed_fp = source_fingerprint(source)
    out: list[Any] = []
    used = False
    for g, group in enumerate(groups):
        if type(group) is not dict:
            raise ValueError("a source entry is not an object")
        kind, fp = _str(group.get("kind")), _str(group.get("fingerprint"))
        if passed_fp is not None and passed_fp == fp and kind == type(source).__name__:
            out.append(source)
            used = True
            continue
        if group.get("stored") is True:
            src = _source_from_bytes(read(f"source/{g}").tobytes(), kind)
            if group.get("numpy_params") is True:
                params = {k: {a: np.array(v) for a, v in d.items()} for k, d in src.params.items()}
                src = dataclasses.replace(src, params=params)
            if source_fingerprint(src) != fp:
                raise ValueError(f"source model {g} does not match its recorded fingerprint")
            out.append(src)
            continue
        if group.get("stored") is not False:
            raise ValueError("a source entry lacks its 'stored' flag")
        saved = group.get("describe", kind)
        if source is None:
            raise _SourceMismatch(
                f"it was saved without its source model ({saved}, {fp}); pass source= "
                "(the model it was fitted with)"
            )
        raise _SourceMismatch(
            f"the source passed ({_describe(source)}, {passed_fp}) is not the one this model "
            f"was fitted with ({saved}, {fp}): architecture, label scalings or weights differ"
        )
    if source is not None and not used:
        raise _SourceMismatch(
            f"the source passed ({_describe(source)}, {passed_fp}) is not the one this model "
            "was fitted with ("
            + "; ".join(f"{g.get('describe')}, {g.get('fingerprint')}" for g in groups)
            + ")"
        )
    return out


def load_estimator(path: str | Path, source: Any = None, *, expected: type | None = None) -> Any:
    """Read an estimator written by :func:`save_estimator`.

    Parameters
    ----------
    path
        The file.
    source
        The source model the estimator was fitted with. Needed when the file was saved with
        ``include_source=False``; optional otherwise (it then replaces the stored copy). Either
        way it must have the fingerprint recorded in the file (:func:`source_fingerprint`).
    expected
        If given, the loaded estimator must be an instance of this class (the classmethods
        ``Estimator.load`` pass their class).

    Returns
    -------
    The estimator, with the predictions it had when saved.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        A truncated, corrupt, foreign or forged file, a format version this pcbtl does not
        read, an unknown class name, a missing or extra member (the message names the file);
        a ``source`` that is not the saved one, or none when the file holds none; an estimator
        of another class than ``expected``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no estimator file at {path}")
    try:
        est = _load(path, source)
    except _SourceMismatch as exc:
        raise ValueError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid pcbtl estimator file: {exc}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, KeyError) as exc:
        raise ValueError(
            f"{path} is not a valid pcbtl estimator file: {type(exc).__name__}: {exc}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a forged state failing inside a constructor
        raise ValueError(
            f"{path} is not a valid pcbtl estimator file: its state does not rebuild "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if expected is not None and not isinstance(est, expected):
        raise ValueError(f"{path} holds a {type(est).__name__}, not a {expected.__name__}")
    return est


def _load(path: Path, source: Any) -> Any:
    with zipfile.ZipFile(path) as zf:
        meta = _read_header(zf)
        infos = meta.pop("_infos")
        name = meta.get("class")
        classes = _classes()
        if type(name) is not str or name not in classes or name.startswith("sklearn."):
            raise ValueError(f"unknown estimator class {name!r}")
        cache: dict[str, np.ndarray] = {}

        def read(key: str) -> np.ndarray:
            if key not in cache:
                cache[key] = _read_member(zf, infos, key)
            return cache[key]

        def idata(key: str) -> Any:
            data = read(key)
            if data.dtype != np.uint8 or data.ndim != 1:
                raise ValueError(f"member {key!r} is not netCDF bytes")
            return _idata_from_bytes(data.tobytes())

        sources = _load_sources(meta, read, source)
        decoder = _Decoder(read, sources, idata)
        state = meta.get("state")
        if type(state) is not dict or state.get("__obj__") != name:
            raise ValueError(f"the state is not that of a {name}")
        est = decoder.decode(state)
        unread = sorted(
            k for k in infos if k != "__meta__" and k not in cache and not k.startswith("source/")
        )
        if unread:
            raise ValueError(f"members the state does not use: {unread[:6]}")
    if type(est) is not classes[name]:
        raise ValueError(f"the state rebuilt a {type(est).__name__}, not a {name}")
    return est


class Persistable:
    """Mixin of the package's estimators: :meth:`save` and :meth:`load` without pickle.

    Example
    -------
    >>> model.save("model.npz")  # doctest: +SKIP
    >>> same = pcbtl.PCTransferRegressor.load("model.npz")  # doctest: +SKIP
    >>> lean = model.save("lean.npz", include_source=False)  # doctest: +SKIP
    >>> same = pcbtl.PCTransferRegressor.load("lean.npz", source=source)  # doctest: +SKIP
    """

    def save(
        self, path: str | Path, *, include_source: bool = True, include_idata: bool = True
    ) -> Path:
        """Write this fitted estimator to ``path`` (:func:`save_estimator`: one ``.npz``
        archive, no pickle); ``include_source=False`` stores only the source's fingerprint
        (pass the source to :meth:`load`), ``include_idata=False`` leaves out ``idata_``."""
        return save_estimator(
            self, path, include_source=include_source, include_idata=include_idata
        )

    @classmethod
    def load(cls, path: str | Path, source: Any = None) -> Any:
        """Read an estimator of this class written by :meth:`save` (:func:`load_estimator`);
        ``source``, when given, must be the one it was fitted with (checked by fingerprint)."""
        return load_estimator(path, source=source, expected=cls)
