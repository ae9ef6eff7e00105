"""From a NumPyro model to a flat log density, and from draws to ArviZ.

ArviZ changed its data object at 1.0: 0.2x builds an ``arviz.InferenceData`` from
``az.from_dict(posterior=..., sample_stats=..., attrs=...)``; 1.x (Python >= 3.12) builds an
``xarray.DataTree`` from ``az.from_dict({"posterior": ..., ...}, attrs={"/": ...})``, and its
``groups`` is a property of paths (``"/posterior"``), not a method. :func:`idata_from_groups` builds
either from the same dict of groups and :func:`idata_groups` / :func:`idata_group` read either
back; nothing else in pcbtl calls ``az.from_dict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.flatten_util import ravel_pytree
from numpyro.infer.util import initialize_model

from pcbtl.inference.posterior import Posterior

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\sArviZ is undergoing", category=FutureWarning)
    import arviz as az

__all__ = [
    "ARVIZ_MAJOR",
    "idata_from_groups",
    "idata_group",
    "idata_groups",
    "idata_with_coords",
    "make_log_density",
    "to_inference_data",
]

#: major version of the ArviZ in use: 0 builds ``arviz.InferenceData``, 1 and later
#: ``xarray.DataTree``
ARVIZ_MAJOR = int(az.__version__.split(".", 1)[0])


def make_log_density(
    model: Callable[..., None], model_kwargs: dict[str, Any], *, seed: int = 0
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """A jitted log density of the model on one flat float32 unconstrained vector.

    Returns ``(log_density, x0)``: ``log_density(x)`` is the log joint (Jacobians of the
    constraining transforms included) at the flat unconstrained point ``x``, and ``x0`` a valid
    initial point. Ravel/unravel happen once here, outside the hot loop; the function is traced
    once per model and data shape.
    """
    info = initialize_model(jax.random.PRNGKey(seed), model, model_kwargs=model_kwargs)
    x0, unravel = ravel_pytree(info.param_info.z)
    potential = info.potential_fn

    @jax.jit
    def log_density(x):
        return -potential(unravel(x))

    return log_density, jnp.asarray(x0, jnp.float32)


def idata_from_groups(
    groups: dict[str, dict[str, Any] | None],
    *,
    dims: dict[str, list[str]] | None = None,
    attrs: dict[str, Any] | None = None,
    coords: dict[str, Any] | None = None,
) -> Any:
    """The ArviZ object of the installed ArviZ holding ``groups``.

    Parameters
    ----------
    groups
        Group name (``posterior``, ``sample_stats``, ``log_likelihood``,
        ``posterior_predictive``, ``predictions``, ``observed_data``, ...) → variable name →
        array. Arrays lead with ``(chain, draw)`` except in ``*_data`` groups; a group that is
        ``None`` or empty is left out.
    dims
        Variable name → names of its dimensions after ``(chain, draw)`` (after none in ``*_data``
        groups; ``predictions`` groups ignore them, as both ArviZ versions do). Others get
        ``<var>_dim_<i>``.
    attrs
        Attributes of the whole object (the root node's under ArviZ >= 1), set on every group
        as well, so ``idata.posterior.attrs`` carries them as ArviZ users expect.
    coords
        Values of named dimensions (say the feature names of a ``feature`` dimension).

    Returns
    -------
    ``arviz.InferenceData`` under ArviZ 0.x, ``xarray.DataTree`` with one child per group under
    ArviZ >= 1 (:data:`ARVIZ_MAJOR`). Both have the groups as attributes (``obj.posterior``), a
    ``to_netcdf`` and ``attrs``; read them on either with :func:`idata_groups` and
    :func:`idata_group`.

    Example
    -------
    >>> obj = idata_from_groups({"posterior": {"mu": np.zeros((2, 5))}}, attrs={"run": "a"})
    >>> idata_groups(obj), idata_group(obj, "posterior")["mu"].shape
    (['posterior'], (2, 5))
    """
    kept = {name: dict(data) for name, data in groups.items() if data}
    attrs = dict(attrs or {})
    if ARVIZ_MAJOR >= 1:
        obj = az.from_dict(kept, dims=dims, coords=coords, attrs={"/": attrs})
    else:
        obj = az.from_dict(**kept, dims=dims, coords=coords, attrs=attrs)
    for name in kept:
        obj[name].attrs.update(attrs)
    return obj


def _is_datatree(obj: Any) -> bool:
    return isinstance(obj, getattr(xr, "DataTree", ()))


def idata_groups(obj: Any) -> list[str]:
    """Names of the groups of an ArviZ object, ``InferenceData`` (ArviZ 0.x) or ``DataTree``
    (ArviZ >= 1, also what ``az.from_netcdf`` reads there): e.g. ``["posterior",
    "sample_stats", "observed_data"]``."""
    if _is_datatree(obj):
        return list(obj.children)
    return list(obj.groups())


def idata_group(obj: Any, name: str) -> xr.Dataset:
    """Group ``name`` of an ArviZ object of either version as an ``xarray.Dataset`` (a
    ``DataTree`` node's coordinates inherited from its parents included); ``KeyError`` if it
    has no such group."""
    if name not in idata_groups(obj):
        raise KeyError(f"no group {name!r} in {idata_groups(obj)}")
    if _is_datatree(obj):
        return obj[name].to_dataset()
    return obj[name]


def idata_with_coords(obj: Any, group: str, coords: dict[str, Any]) -> Any:
    """``obj`` with coordinate values ``coords`` (dimension name → values) set on ``group``, for
    ``InferenceData`` (ArviZ 0.x) and ``DataTree`` (ArviZ >= 1) alike."""
    if _is_datatree(obj):
        obj[group] = obj[group].to_dataset().assign_coords(coords)
        return obj
    setattr(obj, group, getattr(obj, group).assign_coords(coords))
    return obj


def to_inference_data(
    posterior: Posterior,
    *,
    log_likelihood: np.ndarray | None = None,
    posterior_predictive: np.ndarray | None = None,
    observed: np.ndarray | None = None,
    drop: tuple[str, ...] = (),
    attrs: dict[str, Any] | None = None,
    prior: dict[str, np.ndarray] | None = None,
    constant_data: np.ndarray | None = None,
    feature_names: Any = None,
    dims: dict[str, list[str]] | None = None,
) -> Any:
    """ArviZ data (``InferenceData``, or ``DataTree`` under ArviZ >= 1: :func:`idata_from_groups`)
    with posterior, sample_stats and, when given, the per-row ``log_likelihood``,
    ``posterior_predictive`` (both ``(chain, draw, n)``) and ``observed_data`` (variable ``y``,
    dimension ``obs``); ``prior`` (site → draws ``(1, draw, ...)``, sampled from the prior);
    ``constant_data`` (variable ``X``, dimensions ``(obs, feature)``, the features named by
    ``feature_names`` when given). ``dims`` names the dimensions of sites after
    ``(chain, draw)``; others get ``<site>_dim_<i>``. Attributes on the whole object and on every
    group: ``inference_library``, ``inference_method`` and ``attrs``."""
    post = {k: v for k, v in posterior.samples.items() if k not in drop}
    dims = {"y": ["obs"], **(dims or {})}
    for k, v in {**post, **(prior or {})}.items():
        if v.ndim > 2 and k not in dims:
            dims[k] = [f"{k}_dim_{i}" for i in range(v.ndim - 2)]
    stats = {k: v for k, v in posterior.sample_stats.items() if np.ndim(v) >= 2}
    groups: dict[str, dict[str, Any] | None] = {"posterior": post, "sample_stats": stats}
    if log_likelihood is not None:
        groups["log_likelihood"] = {"y": log_likelihood}
    if posterior_predictive is not None:
        groups["posterior_predictive"] = {"y": posterior_predictive}
    if observed is not None:
        groups["observed_data"] = {"y": observed}
    if prior:
        groups["prior"] = prior
    coords: dict[str, Any] = {}
    if constant_data is not None:
        groups["constant_data"] = {"X": constant_data}
        dims["X"] = ["obs", "feature"]
        if feature_names is not None:
            coords["feature"] = [str(f) for f in feature_names]
    all_attrs = {"inference_library": "numpyro", "inference_method": posterior.method}
    all_attrs.update(attrs or {})
    return idata_from_groups(groups, dims=dims, attrs=all_attrs, coords=coords or None)
