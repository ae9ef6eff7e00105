r"""Scikit-learn estimators over the NumPyro models.

:class:`PCTransferRegressor` fits the target with the PC prior on the KL distance from the source
predictive (DESIGN.md §2); :class:`BayesianNetworkRegressor` is a plain Bayesian network with
Normal priors (target-only, or centred at the source weights). Both share the posterior-predictive
machinery of :class:`PosteriorRegressor`: for posterior draws ``(g_s, σ_s)``, ``s = 1..S``, the
predictive is the mixture ``(1/S) Σ_s N(g_s(x), σ_s²)``.

Every estimator of the package is a scikit-learn regressor (``BaseEstimator`` and
``RegressorMixin``, through :class:`RegressorBase`): ``__init__`` only stores its parameters
(they are checked in ``fit``), so ``clone``, ``get_params``/``set_params``, ``Pipeline``,
``cross_validate`` and ``GridSearchCV`` work; ``fit`` returns ``self``; ``score`` is the
coefficient of determination ``R²``; an unfitted ``predict`` raises
``sklearn.exceptions.NotFittedError``. A fitted estimator pickles: the compiled functions it
holds are left out and rebuilt on load.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr
from numpyro.infer import Predictive, init_to_median, init_to_sample
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import validate_data

from pcbtl._validation import (
    check_hidden,
    check_integer,
    check_positive,
    check_probability,
    check_X,
    check_Xy,
)
from pcbtl.inference import (
    MCMC_METHODS,
    BatchPlan,
    Posterior,
    check_sampler,
    concatenate_chains,
    idata_groups,
    idata_with_coords,
    resolve_chain_method,
    run_mclmc,
    run_plans,
    run_svi,
    sampler_diagnostics,
    to_inference_data,
)
from pcbtl.interweave import Interweave
from pcbtl.kl import default_tau_grid, distance_curve
from pcbtl.models import (
    bnn_model,
    last_layer_pc_model,
    last_layer_sufficient_stats,
    scale_pc_model,
    tangent_pc_model,
)
from pcbtl.networks import (
    MLP,
    NetworkFn,
    SourceModel,
    TransferParametrization,
    _flat_apply,
    resolve_transfer_layers,
    split_frozen_trunk,
    transfer_parametrization,
)
from pcbtl.priors import (
    DistanceCurve,
    LastLayerPC,
    PriorDataConflictWarning,
    ScalePC,
    check_distance_curve,
    distance_curve_value,
    pc_rate,
    reference_gram,
)
from pcbtl.tangent import (
    ensemble_apply,
    ensemble_parametrization,
    tangent_conditional_eps,
    tangent_jacobian,
    tangent_kappa,
    tangent_means,
    tangent_stats,
)

__all__ = [
    "HEALTH_COLUMNS",
    "BayesianNetworkRegressor",
    "PCTransferRegressor",
    "PosteriorRegressor",
    "RegressorBase",
    "sampler_health",
]

#: the sampler figures a results table records per fit (see :func:`sampler_health`)
HEALTH_COLUMNS = (
    "min_bulk_ess",
    "max_rhat",
    "prediction_max_rhat",
    "prediction_share_rhat_above_1.05",
    "stuck_chains",
)


def sampler_health(est: Any) -> dict[str, float]:
    """The figures of ``HEALTH_COLUMNS`` for a fitted estimator: smallest bulk ESS and largest
    R-hat over the scalar sites, largest prediction R-hat and the share of predictions with
    R-hat above 1.05 (across chains), and the number of chains that did not move. NaN for an
    estimator without NUTS draws, or ``None`` (a fit that raised)."""
    out = dict.fromkeys(HEALTH_COLUMNS, float("nan"))
    try:
        diag = est.sampler_diagnostics_
    except (AttributeError, RuntimeError, ValueError):
        return out
    for k in HEALTH_COLUMNS:
        v = diag.get(k, float("nan"))
        out[k] = float(len(v)) if isinstance(v, list) else float(v)
    return out


PRIORS = ("last_layer", "scale", "tangent")
INFERENCES = ("nuts", "mclmc", "svi")
PARAMETRIZATIONS = ("auto", "noncentred", "centred", "interweaved")


@jax.jit
def _mixture_quantiles(means, sds, probs):
    """Quantiles ``q`` with ``(1/S) Σ_s Φ((q − μ_s)/σ_s) = prob``, by bisection (means: (S, n))."""
    lo = jnp.min(means - 10.0 * sds[:, None], axis=0)
    hi = jnp.max(means + 10.0 * sds[:, None], axis=0)

    def one(prob):
        def body(_, b):
            lo, hi = b
            mid = 0.5 * (lo + hi)
            below = jnp.mean(ndtr((mid - means) / sds[:, None]), axis=0) < prob
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo_, hi_ = jax.lax.fori_loop(0, 60, body, (lo, hi))
        return 0.5 * (lo_ + hi_)

    return jax.vmap(one)(probs)


class _PortableParametrization(NamedTuple):
    """A :class:`pcbtl.networks.TransferParametrization` as plain arrays, for pickling: its
    :class:`pcbtl.networks.NetworkFn` holds a closure of the cached factory ``_flat_apply``,
    which pickle cannot store, so the factory's arguments (``architecture``: hidden widths,
    activation, input width) travel instead and the function is rebuilt on load."""

    layers: tuple[str, ...]
    theta_source: np.ndarray
    scales: np.ndarray
    aux: Any
    architecture: tuple[tuple[int, ...], str, int]
    members: int = 1  # > 1: the averaged network of an ensemble (pcbtl.tangent)


def _architecture(net: SourceModel) -> tuple[tuple[int, ...], str, int]:
    """``(hidden, activation, n_features)`` of a network: the key of its ``_flat_apply``."""
    return tuple(int(h) for h in net.hidden), str(net.activation), int(net.n_features)


def _portable_parametrization(
    tp: TransferParametrization, architecture: tuple[tuple[int, ...], str, int]
) -> _PortableParametrization:
    return _PortableParametrization(
        tuple(tp.layers),
        np.asarray(tp.theta_source),
        np.asarray(tp.scales),
        jax.device_get(tp.predict_fn.aux),
        architecture,
        # an ensemble's aux is its members' aux stacked on a leading axis
        int(np.size(tp.predict_fn.aux["y_mean"])),
    )


def _live_parametrization(p: _PortableParametrization) -> TransferParametrization:
    """Rebuild the parametrization (the same cached apply function as a fresh fit gets)."""
    hidden, activation, n_features = p.architecture
    apply = _flat_apply(tuple(hidden), activation, int(n_features), tuple(p.layers))
    if p.members > 1:
        apply = ensemble_apply(apply, int(p.members))
    aux = jax.tree_util.tree_map(jnp.asarray, p.aux)
    return TransferParametrization(
        tuple(p.layers),
        jnp.asarray(p.theta_source),
        jnp.asarray(p.scales),
        NetworkFn(apply, aux),
    )


def _without_compiled(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every :class:`pcbtl.SourceModel` in it (inside dicts, lists and tuples)
    replaced by a copy without its cached jitted functions (they are rebuilt on first use)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, SourceModel):
        out: Any = dataclasses.replace(obj)
    elif isinstance(obj, dict):
        out = {k: _without_compiled(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [_without_compiled(v, memo) for v in obj]
    elif type(obj) is tuple:
        out = tuple(_without_compiled(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


class RegressorBase(RegressorMixin, BaseEstimator):
    """The scikit-learn base of every estimator in the package.

    ``BaseEstimator`` gives ``get_params``/``set_params``, ``clone`` and the ``repr``;
    ``RegressorMixin`` gives the ``"regressor"`` tags and ``score(X, y)``, the coefficient of
    determination ``R² = 1 − Σ_i (y_i − ŷ_i)² / Σ_i (y_i − ȳ)²`` of :meth:`predict`.
    Subclasses store their parameters in ``__init__`` unchanged and check them in ``fit``,
    which ends with :meth:`_record_features` and returns ``self``; prediction methods start
    with :meth:`_check_input`. Fitted means having the attribute ``_FITTED_ATTRIBUTE``.

    Pickling (``pickle``, ``joblib.dump``) leaves out what cannot be pickled — the jitted
    functions a :class:`pcbtl.SourceModel` caches, and whatever :meth:`_portable_state` of a
    subclass takes out — and :meth:`_restore_state` rebuilds it on load, so predictions after
    a round trip equal those before.
    """

    #: the attribute a successful ``fit`` sets last
    _FITTED_ATTRIBUTE = "n_features_in_"

    def __sklearn_is_fitted__(self) -> bool:
        return self._FITTED_ATTRIBUTE in vars(self)

    def _check_fitted(self) -> None:
        """Raise :class:`sklearn.exceptions.NotFittedError` (a ``ValueError`` and an
        ``AttributeError``) unless fitted."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y)")

    def _record_features(self, X: Any) -> None:
        """Set ``feature_names_in_`` from the columns of a DataFrame ``X`` (remove it for any
        other ``X``); ``n_features_in_`` is set by the fit itself."""
        validate_data(self, X, reset=True, skip_check_array=True, ensure_2d=False)
        names = getattr(self, "feature_names_in_", None)
        idata = getattr(self, "idata_", None)
        if names is not None and idata is not None and "constant_data" in idata_groups(idata):
            # the constant_data group's feature dimension, named after the DataFrame's columns
            self.idata_ = idata_with_coords(idata, "constant_data", {"feature": list(names)})

    def _check_input(self, X: Any) -> np.ndarray:
        """Fitted check, the feature-name check of scikit-learn (an error when the columns of
        a DataFrame differ from those seen in ``fit``, a warning when only one of them had
        names), and ``X`` as a checked float64 array."""
        self._check_fitted()
        X_checked = check_X(X, "X", n_features=self.n_features_in_)
        validate_data(self, X, reset=False, skip_check_array=True, ensure_2d=False)
        return X_checked

    # ---- pickling ------------------------------------------------------------------------
    def _portable_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The picklable form of ``vars(self)`` (``state`` is a copy of it)."""
        return _without_compiled(state)

    def _restore_state(self) -> None:
        """Rebuild, after unpickling, what :meth:`_portable_state` took out."""

    def __getstate__(self) -> dict[str, Any]:
        return self._portable_state(dict(super().__getstate__()))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._restore_state()


class PosteriorRegressor(RegressorBase):
    """Shared predictive methods for estimators holding posterior draws of ``(g, σ)``.

    Subclasses set ``posterior_`` (a :class:`pcbtl.inference.Posterior`) and implement
    ``_posterior_means(X) -> (S, n)``; ``σ`` draws are the ``sigma`` site.
    """

    n_features_in_: int

    #: how the chains of one fit run (``"vectorized"``: vmapped in one program;
    #: ``"sequential"``: one after another in it; ``"auto"``: vectorized on a GPU or TPU,
    #: sequential on a CPU, as measured); several devices take one chain each
    CHAIN_METHODS = ("auto", "vectorized", "sequential")

    def _check_sampler_settings(self) -> None:
        """Validate the NUTS settings every posterior-draw estimator shares."""
        for name, least in (("num_warmup", 0), ("num_samples", 1), ("num_chains", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        _check_choice(getattr(self, "chain_method", "auto"), self.CHAIN_METHODS, "chain_method")
        tap = getattr(self, "target_accept_prob", 0.8)
        if not isinstance(tap, int | float) or not 0.0 < float(tap) < 1.0:
            raise ValueError(f"target_accept_prob must lie strictly between 0 and 1, got {tap!r}")

    def _plan(
        self,
        model: Callable[..., None],
        kwargs: dict[str, Any],
        complete: Callable[..., Any],
        *,
        init_strategy: Callable,
        t0: float,
        max_tree_depth: int | None = None,
        interweave: Interweave | None = None,
    ) -> BatchPlan:
        """The :class:`pcbtl.inference.BatchPlan` of a fit, with this estimator's sampler
        settings (``num_warmup``, ``num_samples``, ``num_chains``, ``chain_method``, ``seed``,
        ``target_accept_prob``, ``max_tree_depth``): the one place they are read."""
        self._check_sampler_settings()
        return BatchPlan(
            model=model,
            kwargs=kwargs,
            complete=complete,
            num_warmup=int(self.num_warmup),
            num_samples=int(self.num_samples),
            seed=int(self.seed),
            target_accept_prob=float(getattr(self, "target_accept_prob", 0.8)),
            max_tree_depth=int(max_tree_depth or getattr(self, "max_tree_depth", 10)),
            init_strategy=init_strategy,
            setup_seconds=time.perf_counter() - t0,
            interweave=interweave,
            num_chains=int(self.num_chains),
            chain_method=resolve_chain_method(getattr(self, "chain_method", "auto")),
        )

    def _fit_nuts(self, X: Any, y: Any):
        """``fit`` of a NUTS estimator: plan, sample all chains in one job, complete."""
        t0 = time.perf_counter()
        plan = self._batch_plan(X, y)
        posterior = run_plans([plan], progress_bar=bool(getattr(self, "progress_bar", False)))[0]
        plan.complete(posterior, seconds=time.perf_counter() - t0)
        self._record_features(X)
        return self

    def _batchable(self) -> bool:
        return True

    _FITTED_ATTRIBUTE = "posterior_"

    def _portable_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The fit state ``_state`` without its network functions: a
        :class:`pcbtl.networks.TransferParametrization` (alone, or as ``"tp"`` of a dict
        that holds its ``"source"``) becomes a :class:`_PortableParametrization`."""
        fit_state = state.get("_state")
        if isinstance(fit_state, TransferParametrization):
            state["_state"] = _portable_parametrization(fit_state, state["_architecture"])
        elif isinstance(fit_state, dict) and isinstance(
            fit_state.get("tp"), TransferParametrization
        ):
            arch = _architecture(fit_state["source"])
            state["_state"] = {**fit_state, "tp": _portable_parametrization(fit_state["tp"], arch)}
        return super()._portable_state(state)

    def _restore_state(self) -> None:
        fit_state = getattr(self, "_state", None)
        if isinstance(fit_state, _PortableParametrization):
            self._state = _live_parametrization(fit_state)
        elif isinstance(fit_state, dict) and isinstance(
            fit_state.get("tp"), _PortableParametrization
        ):
            self._state = {**fit_state, "tp": _live_parametrization(fit_state["tp"])}

    def _posterior_means_from(self, posterior: Posterior, X: np.ndarray, state: Any) -> np.ndarray:
        """Draws of the mean function at ``X``, shape ``(S, n)``, for a posterior and fit state."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _posterior_means(self, X: np.ndarray) -> np.ndarray:
        return self._posterior_means_from(self.posterior_, X, self._state)

    #: rows of the reference inputs at which the prediction R-hat is computed
    N_DIAGNOSTIC_INPUTS = 256

    def _diagnostic_inputs(self, X: np.ndarray, state: Any) -> np.ndarray:
        """Inputs at which the chains' predictions are compared: a seeded subsample of at most
        ``N_DIAGNOSTIC_INPUTS`` rows of the reference inputs (here the training rows)."""
        return _subsample(X, self.N_DIAGNOSTIC_INPUTS)

    @property
    def sampler_diagnostics_(self) -> dict[str, Any]:
        """MCMC health of the fit across chains (:func:`pcbtl.inference.sampler_diagnostics`),
        predictions at the diagnostic inputs included; ``{}`` for SVI."""
        self._check_fitted()
        if self.posterior_.method not in MCMC_METHODS:
            return {}
        if self.posterior_.diagnostics is None:
            self.posterior_.diagnostics = sampler_diagnostics(
                self.posterior_, getattr(self, "max_tree_depth", None)
            )
        return dict(self.posterior_.diagnostics)

    @property
    def sigma_draws_(self) -> np.ndarray:
        """Posterior draws of the noise sd ``σ`` in the units of ``y``."""
        self._check_fitted()
        return self.posterior_.flat("sigma") * self._affine[1]

    # ---- label scale ---------------------------------------------------------------------
    @staticmethod
    def _label_scaling(y: np.ndarray) -> tuple[float, float]:
        """``(loc, scale)`` = mean and sd of the labels (scale 1 for constant labels): the fit
        runs on ``(y − loc)/scale`` and every output is mapped back."""
        loc, scale = float(np.mean(y)), float(np.std(y))
        return loc, (scale if np.isfinite(scale) and scale > 0 else 1.0)

    @classmethod
    def _standardised(cls, y: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """``((y − loc)/scale, (loc, scale))`` with :meth:`_label_scaling`."""
        affine = cls._label_scaling(y)
        return (y - affine[0]) / affine[1], affine

    @property
    def _affine(self) -> tuple[float, float]:
        return getattr(self, "y_affine_", (0.0, 1.0))

    def _means(self, X: Any) -> np.ndarray:
        """Draws of the mean function at ``X`` in the units of ``y``, shape ``(S, n)``."""
        loc, scale = self._affine
        return loc + scale * self._internal_means(X)

    def _internal_means(self, X: Any) -> np.ndarray:
        X = self._check_input(X)
        return np.asarray(self._posterior_means(X), np.float64)

    @property
    def _internal_sigma(self) -> np.ndarray:
        return self.sigma_draws_ / self._affine[1]

    def predict(self, X: Any, return_std: bool = False):
        """Posterior predictive mean; with ``return_std`` also the predictive sd
        ``sqrt(Var_s g_s(x) + E_s σ_s²)`` (epistemic plus noise)."""
        loc, scale = self._affine
        means = self._internal_means(X)
        mu = loc + scale * means.mean(axis=0)
        if not return_std:
            return mu
        sd = scale * np.sqrt(means.var(axis=0) + np.mean(self._internal_sigma**2))
        return mu, sd

    def predict_interval(self, X: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Central ``level`` posterior predictive interval ``(lower, upper)`` for each row of ``X``:
        exact quantiles of the Gaussian mixture over posterior draws (no sampling noise),
        found in the standardised label units of the fit and mapped back."""
        level = check_probability(level, "level")
        loc, scale = self._affine
        means = self._internal_means(X)
        a = (1.0 - level) / 2.0
        q = _mixture_quantiles(
            jnp.asarray(means, jnp.float32),
            jnp.asarray(self._internal_sigma, jnp.float32),
            jnp.array([a, 1 - a]),
        )
        q = np.asarray(q, np.float64)
        return loc + scale * q[0], loc + scale * q[1]

    def sample_posterior_predictive(self, X: Any, seed: int = 0) -> np.ndarray:
        """One draw ``y ~ N(g_s(x), σ_s²)`` per posterior draw ``s``: array ``(S, n)``."""
        loc, scale = self._affine
        means = self._internal_means(X)
        noise = np.random.default_rng(seed).standard_normal(means.shape)
        return loc + scale * (means + self._internal_sigma[:, None] * noise)

    def _finish(
        self,
        posterior: Posterior,
        X,
        y,
        state,
        drop=(),
        attrs=None,
        chunk=4096,
        affine: tuple[float, float] = (0.0, 1.0),
        diagnostic_means: np.ndarray | None = None,
    ):
        """Posterior-predictive and log-likelihood groups at the training rows, and idata.

        The sampler is judged first (:func:`pcbtl.inference.check_sampler`), with the draws of
        the mean function at :meth:`_diagnostic_inputs` (``diagnostic_means``, ``(S, m)``, when
        the caller has them already).

        ``y`` and the draws are in the standardised units of the fit, ``(y − loc)/scale`` with
        ``affine = (loc, scale)``; the ArviZ groups are in the units of the labels:
        ``log N(y_i | g_s(x_i), σ_s²)`` (which is the standardised one minus ``log scale``),
        one predictive draw per posterior draw and row, ``σ`` (and the last-layer ``β``,
        bias last) mapped back; the network weights stay as sampled (their output layer is
        followed by ``loc + scale ·``, recorded in the posterior's attributes ``y_loc`` and
        ``y_scale``). Evaluated ``chunk`` rows at a time into float32 arrays (float64 when the
        labels sit far from 0 relative to their spread), so a 100,000-row target does not
        hold float64 ``(S, n)`` temporaries.
        """
        loc, scale = affine
        chains, draws = posterior.samples["sigma"].shape[:2]
        if posterior.method in MCMC_METHODS:
            preds = diagnostic_means
            if preds is None:
                Xd = self._diagnostic_inputs(X, state)
                preds = self._posterior_means_from(posterior, Xd, state)
            posterior.diagnostics = check_sampler(
                posterior,
                getattr(self, "max_tree_depth", None),
                predictions=np.asarray(preds).reshape(chains, draws, -1),
                stacklevel=6,
            )
        sig = posterior.flat("sigma").astype(np.float64)
        n = X.shape[0]
        out_dtype = np.float64 if abs(loc) > 1e3 * scale else np.float32
        loglik = np.empty((sig.shape[0], n), np.float32)
        pp = np.empty((sig.shape[0], n), out_dtype)
        rng = np.random.default_rng(0)
        log_norm = np.log(sig * scale)[:, None] + 0.5 * np.log(2 * np.pi)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            means = self._posterior_means_from(posterior, X[rows], state)  # (S, chunk)
            z = (y[rows] - means) / sig[:, None]
            loglik[:, rows] = -0.5 * z**2 - log_norm
            pp[:, rows] = loc + scale * (means + sig[:, None] * rng.standard_normal(means.shape))
        shape = (chains, draws, n)
        prior = self._prior_group(state, draws, affine)
        samples = dict(posterior.samples)
        samples["sigma"] = samples["sigma"] * scale
        if "beta" in samples:
            beta = samples["beta"] * scale
            beta[..., -1] += loc
            samples["beta"] = beta
        return to_inference_data(
            Posterior(
                samples=samples, sample_stats=posterior.sample_stats, method=posterior.method
            ),
            log_likelihood=loglik.reshape(shape),
            posterior_predictive=pp.reshape(shape),
            observed=loc + scale * np.asarray(y, np.float64),
            drop=drop,
            attrs={**(attrs or {}), "y_loc": float(loc), "y_scale": float(scale)},
            prior=prior,
            constant_data=np.asarray(X, np.float32),
        )

    def _prior_group(
        self, state: Any, draws: int, affine: tuple[float, float]
    ) -> dict[str, np.ndarray] | None:
        """Draws ``(1, draws)`` of the scalar sites under the prior for idata's ``prior`` group
        (σ in the units of ``y``); ``None`` where an estimator has none."""
        return None


#: the centred scale model as one function object (batched samplers are cached per model)
_scale_pc_model_centred = partial(scale_pc_model, centred=True)


def _subsample(X: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` rows of ``X``, a seeded random subset in their original order."""
    if X.shape[0] <= n:
        return X
    keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], n, replace=False))
    return X[keep]


def _check_choice(value: Any, options: tuple[str, ...], name: str) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _apply_draws(predict_fn, thetas: jax.Array, X: jax.Array) -> jax.Array:
    return jax.lax.map(lambda th: predict_fn(th, X), thetas, batch_size=64)


_apply_draws_static = jax.jit(_apply_draws, static_argnums=(0,))
_apply_draws_pytree = jax.jit(_apply_draws)


def _batched_apply(predict_fn, thetas: jax.Array, X: jax.Array) -> np.ndarray:
    """``predict_fn(θ_s, X)`` for every row of ``thetas``, in vmapped batches (``lax.map``);
    compiled once per architecture and shape for a :class:`pcbtl.networks.NetworkFn`, once per
    function object for any other callable."""
    jitted = _apply_draws_pytree if isinstance(predict_fn, NetworkFn) else _apply_draws_static
    return np.asarray(jitted(predict_fn, thetas, X))


class PCTransferRegressor(PosteriorRegressor):
    r"""Bayesian transfer learning with the PC prior on the KL distance from the source model.

    The target predictive ``N(g_T(x), σ²)`` is allowed to move from the source predictive
    ``N(g_S(x), σ²)`` by ``d = RMS_{x~Q}(g_T − g_S)/σ`` noise sds, with ``d ~ Exp(λ)``,
    ``λ = −log(alpha)/U`` so that ``P(d > U) = alpha`` (Abba, Williams & Reich 2023;
    Simpson et al. 2017). ``σ ~ HalfNormal(sigma_scale)``.

    A scikit-learn regressor (:class:`RegressorBase`): the parameters below are stored as given
    and checked by ``fit`` (a ``ValueError`` naming the argument), so ``clone``, ``Pipeline``,
    ``cross_validate`` and ``GridSearchCV`` (say over ``U``) work, ``score`` is ``R²`` of the
    predictive mean, and a fitted model pickles.

    Parameters
    ----------
    source:
        The trained :class:`pcbtl.SourceModel` (the PC prior's base model).
    prior:
        ``"last_layer"`` — body frozen, head ``β`` with the exact sphere prior (DESIGN.md §2 a);
        ``"scale"`` — ``θ = θ_S + τ s⊙ε`` on ``transfer_layers`` with the prior on ``τ`` through
        the Monte Carlo distance curve ``r(τ)`` (DESIGN.md §2 b);
        ``"tangent"`` — the same construction on the network linearised at ``θ_S``,
        ``g(x) = g_S(x) + τ J_s(x) ε`` (:mod:`pcbtl.tangent`): ``r(τ) = κτ`` exactly, ``ε`` is
        integrated out, the sampler sees only ``(σ, τ)`` and ``ε`` is drawn exactly from its
        Gaussian conditional afterwards. It mixes where the deep scale posterior does not
        (measured on the band gaps, ``benchmarks/README.md``), at the price of a model that
        moves from the source only along its tangent space.
    ensemble:
        ``prior="tangent"`` only: further source networks of the same architecture (e.g. the
        same training from other seeds). ``None`` (default) or empty: the base model is
        ``source``. Otherwise it is the average of ``source`` and these, linearised as one
        network (:func:`pcbtl.tangent.ensemble_parametrization`): one ``τ``, one ``σ``,
        ``d = κτ/σ`` measured from the averaged source.
    transfer_layers:
        For ``prior="scale"`` or ``"tangent"``: ``"all"`` (default), ``"last"``, an int ``k`` (last ``k`` layers)
        or layer names (``hidden_0``, ..., ``output``). Must be ``None``/``"last"`` for
        ``"last_layer"``.
    U, alpha:
        The PC statement ``P(d > U) = alpha`` (defaults 1 and 0.05).
    U_log_sd:
        ``None`` (default): ``U`` is fixed. A number ``s``: the data-driven alternative, a
        hyperprior ``U ~ LogNormal(log U, s²)`` (equivalently a log-normal prior on the rate
        ``λ``), useful when the source may sit several noise sds from the target (e.g. DFT vs
        experimental band gaps); marginally ``d`` then has a heavier-than-exponential tail.
    reference_X:
        Inputs ``x̃ ~ Q`` on which source and target are compared. ``None``: the target inputs
        plus the source inputs kept in ``source.reference_X``.
    num_chains, chain_method:
        NUTS chains (4 by default, so that the diagnostics can compare chains) and how they
        run: ``"vectorized"`` (vmapped in one compiled program: each step waits for the
        deepest tree of the chains), ``"sequential"`` (one after another inside it) or
        ``"auto"`` (default: vectorized on a GPU or TPU, sequential on a CPU). Measured on 2 CPU
        cores, 4 chains of 250 + 250 draws on the 60-row test task (by hand; the same
        comparison is ``benchmarks/bench_perf.py --sections chain``): sequential 4.1–5.0 s
        against vectorized 4.8–7.1 s for the scale prior, the same within noise for the last
        layer. With several JAX devices (GPUs, or CPU host devices from
        ``numpyro.set_host_device_count``) each device runs its own chains.
    inference:
        ``"nuts"`` (default), ``"mclmc"`` or ``"svi"`` (mean-field Gaussian guide; see
        :func:`pcbtl.inference.run_svi` for what it approximates). ``"mclmc"``
        (:func:`pcbtl.inference.run_mclmc`): unadjusted microcanonical Langevin chains, each
        from its own random start optimised for ``init_steps`` Adam steps, ``num_warmup ·
        thin`` tuning steps, then ``num_samples`` draws ``thin`` steps apart. It agrees with
        NUTS on small tasks (tested) at a fixed cost per draw, but on the band-gap task (8,321
        weights) its chains disagreed and some drifted to extreme weights
        (``benchmarks/README.md``, ``bench_sampler.py``): read its diagnostics.
    sigma_scale:
        Scale of the HalfNormal prior on ``σ``; ``None`` uses the sd of the source labels.
    n_eps, n_tau, max_reference, scale:
        Scale prior only: ``ε`` draws and grid size of ``r(τ)``; at most ``max_reference``
        reference rows (a random subset) enter ``r(τ)``; per-parameter scale ``s``. The prior
        is exact in ``d`` up to the Monte Carlo error of ``r``, which ``curve_rel_se_``
        reports (largest ``se(r)/r`` over the grid): measured on a 16-16 test network, the
        former default of 32 draws left ``r`` 5–15 % off, enough for a Kolmogorov–Smirnov
        test of ``d ~ Exp(λ)`` to reject; 128 (default) halves that, 256 gives about 2 %.
        ``prior="tangent"`` uses ``max_reference`` (the rows ``κ`` averages over) and
        ``scale``; it needs no Monte Carlo.
    parametrization:
        Scale prior only. ``"noncentred"`` (default) samples ``ε`` with ``θ = θ_S + τ s⊙ε``:
        best when the target data are few and the posterior stays near the prior. ``"centred"``
        samples ``θ ~ N(θ_S, τ² diag(s²))`` itself: best when many target rows pin ``θ`` down
        (thousands of rows), where the non-centred ``ε`` is tied to ``τ`` by a funnel. Both
        are the same prior (see :func:`pcbtl.models.scale_pc_model`). ``"interweaved"``
        takes ``τ`` out of NUTS: NUTS samples the centred weights and ``σ`` given ``τ``, and
        ``τ`` gets a centred and a non-centred slice update per iteration (NUTS within Gibbs
        with ancillarity–sufficiency interweaving, :mod:`pcbtl.interweave`). ``"auto"``
        (default): centred under ``inference="mclmc"`` (measured: non-centred MCLMC chains fell
        into ``τ → 0``), non-centred otherwise.
    thin, init_steps:
        ``inference="mclmc"`` only: integrator steps between kept draws, and Adam steps from
        each chain's random start before tuning.
    max_tree_depth:
        NUTS tree-depth limit (at most ``2^depth − 1`` leapfrog steps per draw).

    Fitted attributes: ``idata_``, ``posterior_``, ``distance_``, ``shift_``,
    ``prior_conflict_``, ``sampler_diagnostics_``, ``rate_``, ``reference_size_``,
    ``num_divergences_``, ``fit_seconds_`` (of which ``prior_seconds_`` built the prior: the
    reference Gram matrix, or the Monte Carlo ``r(τ)``), and ``ridge_`` (last layer) or
    ``curve_`` and ``tau_beyond_curve_`` (scale: the share of the ``τ`` draws beyond the grid of
    ``r(τ)``; above 5 % the grid is extended and the fit run again, and if it still runs past,
    a :class:`pcbtl.priors.PriorDataConflictWarning` says so).

    What ``distance_`` is, exactly (posterior draws of the ``d`` the prior is placed on):

    * ``prior="last_layer"``: ``d = sqrt(δᵀGδ)/σ`` with ``δ = β − β_S`` and ``G`` the reference
      Gram matrix (plus its ridge, if any): exactly the RMS over all reference inputs of the
      shift of the mean function, in noise sds.
    * ``prior="scale"``: ``d = r̂(τ)/σ``, the Monte Carlo curve at the drawn ``τ``. It averages
      over the latent ``ε`` (the divergence of the PC prior is between the joint models of
      ``(ε, y)``), so it is the RMS shift a *typical* ``ε`` at that ``τ`` would give, not the
      shift of the drawn network; with data, ``ε`` moves to where the data want it and the two
      differ.
    * ``prior="tangent"``: ``d = κτ/σ``, exactly the ``ε``-averaged RMS shift of the linearised
      mean function over the reference inputs (``κ`` is ``kappa_``).

    ``shift_`` gives, for both, the realised ``RMS_{x̃}(g_θ(x̃) − g_S(x̃))/σ`` of each draw over a
    subsample of ``N_DIAGNOSTIC_INPUTS`` reference inputs. ``prior_conflict_`` compares the
    posterior of ``d`` with its prior (median, the prior's 0.999 quantile, the share beyond and
    ``λ·median(d)`` in nats); a median beyond that quantile raises a
    :class:`pcbtl.priors.PriorDataConflictWarning` for either construction.
    """

    def __init__(
        self,
        source: SourceModel,
        *,
        prior: str = "last_layer",
        transfer_layers: Any = None,
        U: float = 1.0,
        alpha: float = 0.05,
        U_log_sd: float | None = None,
        reference_X: Any = None,
        inference: str = "nuts",
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        progress_bar: bool = True,
        sigma_scale: float | None = None,
        target_accept_prob: float = 0.8,
        svi_steps: int = 5000,
        svi_learning_rate: float = 5e-3,
        n_eps: int = 128,
        n_tau: int = 64,
        max_reference: int = 4000,
        scale: str = "fan_in",
        max_tree_depth: int = 10,
        parametrization: str = "auto",
        thin: int = 20,
        init_steps: int = 500,
        ensemble: Any = None,
    ) -> None:
        self.source = source
        self.ensemble = ensemble
        self.prior = prior
        self.transfer_layers = transfer_layers
        self.U = U
        self.alpha = alpha
        self.U_log_sd = U_log_sd
        self.reference_X = reference_X
        self.inference = inference
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.progress_bar = progress_bar
        self.sigma_scale = sigma_scale
        self.target_accept_prob = target_accept_prob
        self.svi_steps = svi_steps
        self.svi_learning_rate = svi_learning_rate
        self.n_eps = n_eps
        self.n_tau = n_tau
        self.max_reference = max_reference
        self.scale = scale
        self.max_tree_depth = max_tree_depth
        self.parametrization = parametrization
        self.thin = thin
        self.init_steps = init_steps

    # ---- set-up ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        self._check_sampler_settings()
        if not isinstance(self.source, SourceModel):
            raise ValueError(f"source must be a pcbtl.SourceModel, got {type(self.source)}")
        _check_choice(self.prior, PRIORS, "prior")
        _check_choice(self.inference, INFERENCES, "inference")
        _check_choice(self.parametrization, PARAMETRIZATIONS, "parametrization")
        check_integer(self.thin, "thin", minimum=1)
        check_integer(self.init_steps, "init_steps", minimum=0)
        # the Monte Carlo r(τ) needs ε draws, reference rows and a grid of at least two points
        check_integer(self.n_eps, "n_eps", minimum=1)
        check_integer(self.max_reference, "max_reference", minimum=1)
        check_integer(self.n_tau, "n_tau", minimum=2)
        if isinstance(self.max_tree_depth, bool) or not isinstance(self.max_tree_depth, int):
            raise ValueError(f"max_tree_depth must be an int, got {self.max_tree_depth!r}")
        if not 1 <= self.max_tree_depth <= 15:
            raise ValueError(f"max_tree_depth must be between 1 and 15, got {self.max_tree_depth}")
        pc_rate(self.U, self.alpha)  # raises ValueError naming U or alpha
        if self.prior == "last_layer":
            if self.transfer_layers not in (None, "last", "output", ("output",), ["output"]):
                raise ValueError(
                    "transfer_layers must be None or 'last' with prior='last_layer' "
                    f"(use prior='scale' for other layers), got {self.transfer_layers!r}"
                )
        else:
            resolve_transfer_layers(self.source, self._layers_arg())
        if self.sigma_scale is not None:
            check_positive(self.sigma_scale, "sigma_scale")
        if self.U_log_sd is not None:
            check_positive(self.U_log_sd, "U_log_sd")
        if self.scale not in ("fan_in", "unit"):
            raise ValueError(f"scale must be 'fan_in' or 'unit', got {self.scale!r}")
        if self.ensemble is not None and len(self.ensemble) > 0:
            if self.prior != "tangent":
                raise ValueError("ensemble needs prior='tangent'")
            arch = _architecture(self.source)
            for net in self.ensemble:
                if not isinstance(net, SourceModel) or _architecture(net) != arch:
                    raise ValueError(
                        "ensemble must hold pcbtl.SourceModel networks of the source's "
                        f"architecture {arch}"
                    )

    def _parametrization(self) -> str:
        """``parametrization`` with ``"auto"`` resolved: centred under MCLMC, non-centred
        otherwise. Measured on the band-gap task (``benchmarks/README.md``): non-centred MCLMC
        chains and interweaved ones (centred weights plus the slice updates of ``τ``) fell
        into the spike of the joint density at ``τ → 0``, ``θ → θ_S`` (an unadjusted sampler
        is drawn into it); centred ones did not."""
        if self.parametrization != "auto":
            return self.parametrization
        return "centred" if self.inference == "mclmc" else "noncentred"

    def _layers_arg(self) -> Any:
        return "all" if self.transfer_layers is None else self.transfer_layers

    def _reference(self, X: np.ndarray | None) -> np.ndarray:
        nf = self.source.n_features
        if self.reference_X is not None:
            return check_X(self.reference_X, "reference_X", n_features=nf).astype(np.float32)
        parts = [np.asarray(self.source.reference_X, np.float32)]
        if X is not None:
            parts.insert(0, X.astype(np.float32))
        return np.concatenate(parts, axis=0)

    def _sigma_scale(self) -> float:
        return float(self.sigma_scale) if self.sigma_scale is not None else self.source.y_scale

    def _setup(
        self,
        X: np.ndarray | None,
        y: np.ndarray | None = None,
        tau_reach: float = 0.0,
        affine: tuple[float, float] = (0.0, 1.0),
    ) -> dict[str, Any]:
        """Everything the prior needs: the reference inputs, and for the scale prior the grid of
        ``r(τ)``, whose fine part is sized from the source's residual sd on ``(X, y)`` (a
        guess of the fitted ``σ``) and which reaches at least ``tau_reach``. ``y`` is in the
        standardised units ``(y − loc)/scale`` of ``affine``; the source (``setup["source"]``)
        and ``sigma_scale`` are mapped to them. ``setup["seconds"]`` is the time it took."""
        t0 = time.perf_counter()
        rate = pc_rate(self.U, self.alpha)
        Xref = self._reference(X)
        src = self.source.rescaled(*affine)
        setup: dict[str, Any] = {
            "rate": rate,
            "sigma_scale": self._sigma_scale() / affine[1],
            "Xref": Xref,
            "source": src,
            "affine": affine,
        }
        if self.prior == "last_layer":
            Phi_ref = _with_bias(src.features(Xref))
            gram = reference_gram(Phi_ref)
            setup.update(
                beta_source=jnp.asarray(src.head(), jnp.float32),
                chol_G=jnp.asarray(gram.chol, jnp.float32),
                ridge=gram.ridge,
                Phi_ref=Phi_ref,
            )
        elif self.prior == "tangent":
            tp = transfer_parametrization(src, self._layers_arg(), scale=self.scale)
            if self.ensemble:
                members = [
                    transfer_parametrization(net.rescaled(*affine), tp.layers, scale=self.scale)
                    for net in self.ensemble
                ]
                tp = ensemble_parametrization([tp, *members])
            Xref_c = _subsample(Xref, int(self.max_reference), self.seed)
            kappa = tangent_kappa(tp.predict_fn, tp.theta_source, tp.scales, Xref_c)
            if not (np.isfinite(kappa) and kappa > 0):
                raise ValueError(
                    "the source network's output does not depend on the transfer layers at the "
                    f"reference inputs (kappa = {kappa}); choose other transfer_layers"
                )
            setup.update(tp=tp, kappa=kappa, curve_reference_size=int(Xref_c.shape[0]))
            if X is not None and y is not None:
                J = tangent_jacobian(tp.predict_fn, tp.theta_source, tp.scales, X)
                setup["stats"] = tangent_stats(J, y - self._base_predict(setup, X))
        else:
            tp = transfer_parametrization(src, self._layers_arg(), scale=self.scale)
            rng = np.random.default_rng(self.seed)
            if Xref.shape[0] > self.max_reference:
                Xref_c = Xref[rng.choice(Xref.shape[0], self.max_reference, replace=False)]
            else:
                Xref_c = Xref
            low_rate = rate if self.U_log_sd is None else rate * math.exp(-2 * self.U_log_sd)
            sigma_fine = 0.674 * setup["sigma_scale"]  # the prior median of σ
            if X is not None and y is not None:
                resid = float(np.sqrt(np.mean((y - src.predict(X)) ** 2)))
                if np.isfinite(resid) and resid > 0:
                    sigma_fine = min(resid, setup["sigma_scale"])
            curve, rel_se = _fit_distance_curve(
                tp,
                jnp.asarray(Xref_c),
                low_rate,
                setup["sigma_scale"],
                self.n_tau,
                self.n_eps,
                self.seed,
                sigma_fine=sigma_fine,
                tau_reach=tau_reach,
            )
            setup.update(
                tp=tp,
                curve=curve,
                curve_rel_se=rel_se,
                curve_reference_size=int(Xref_c.shape[0]),
            )
        setup["seconds"] = time.perf_counter() - t0
        return setup

    def _base_predict(self, setup: dict[str, Any], X: np.ndarray) -> np.ndarray:
        """The base model's mean ``g_S(X)`` (standardised units): the source, or with
        ``ensemble`` the averaged network of ``setup["tp"]``."""
        if self.prior == "tangent" and self.ensemble:
            tp = setup["tp"]
            return np.asarray(tp.predict_fn(tp.theta_source, jnp.asarray(X, jnp.float32)), float)
        return setup["source"].predict(X)

    def _model_kwargs(self, setup: dict[str, Any], X=None, y=None) -> dict[str, Any]:
        common = {
            "rate": setup["rate"],
            "sigma_scale": setup["sigma_scale"],
            "rate_log_sd": None if self.U_log_sd is None else float(self.U_log_sd),
        }
        if self.prior == "last_layer":
            stats = None
            if X is not None:
                stats = last_layer_sufficient_stats(
                    _with_bias(setup["source"].features(X)), y, setup["beta_source"]
                )
            return dict(
                beta_source=setup["beta_source"], chol_G=setup["chol_G"], stats=stats, **common
            )
        if self.prior == "tangent":
            stats = setup.get("stats") if X is not None else None
            return dict(
                kappa=float(setup["kappa"]),
                # the basis V is for the draws of ε after sampling, not for the sampler
                stats=None if stats is None else stats._replace(basis=None),
                **common,
            )
        tp = setup["tp"]
        predict_fn, inputs = tp.predict_fn, None if X is None else jnp.asarray(X, jnp.float32)
        split = split_frozen_trunk(setup["source"], tp)
        if split is not None and inputs is not None:
            # the frozen layers below the transfer set give the same output at every step:
            # computed once here, the sampler evaluates only the transfer layers
            trunk, predict_fn = split
            inputs = trunk(inputs)
        return dict(
            predict_fn=predict_fn,
            theta_source=tp.theta_source,
            scales=tp.scales,
            curve=setup["curve"],
            X=inputs,
            y=None if y is None else jnp.asarray(y, jnp.float32),
            **common,
        )

    # ---- fitting -----------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> PCTransferRegressor:
        """Sample the posterior of the transfer model given target data ``(X, y)``.

        NUTS runs ``num_chains`` chains in one compiled job
        (:func:`pcbtl.inference.run_nuts_batched`); SVI fits its guide. Nothing is stored on
        the estimator unless the whole fit succeeds. The parameters are checked here (a
        ``ValueError`` naming the first bad one). Returns ``self``.
        """
        if self.inference == "nuts":
            self._fit_nuts(X, y)
        elif self.inference == "mclmc":
            self._fit_mclmc(X, y)
        else:
            self._fit_svi(X, y)
        self._record_features(X)
        return self

    def _fit_svi(self, X: Any, y: Any) -> PCTransferRegressor:
        self._check_params()
        X, y = check_Xy(X, y, n_features=self.source.n_features, min_rows=2)
        t0 = time.perf_counter()
        y, affine = self._standardised(y)
        setup = self._setup(X, y, affine=affine)
        posterior = run_svi(
            self._model(),
            self._model_kwargs(setup, X, y),
            num_steps=self.svi_steps,
            learning_rate=self.svi_learning_rate,
            num_samples=self.num_samples * self.num_chains,
            seed=self.seed,
            progress_bar=self.progress_bar,
        )
        return self._complete(posterior, X, y, setup, time.perf_counter() - t0)

    def _model(self) -> Callable[..., None]:
        if self.prior == "last_layer":
            return last_layer_pc_model
        if self.prior == "tangent":
            return tangent_pc_model
        return (
            scale_pc_model if self._parametrization() == "noncentred" else _scale_pc_model_centred
        )

    def _interweave(self) -> Interweave | None:
        if self.prior == "scale" and self._parametrization() == "interweaved":
            return Interweave()
        return None

    def _grid_reach(self, posterior: Posterior, setup: dict[str, Any]) -> float:
        """For the scale prior, when more than 5 % of the ``τ`` draws ran past the grid of
        ``r(τ)``: the reach of the extended grid, 1.5 times the largest draw; else 0."""
        if self.prior != "scale":
            return 0.0
        tau = posterior.flat("tau")
        if np.mean(tau > float(setup["curve"].tau[-1])) > 0.05:
            return 1.5 * float(np.max(tau))
        return 0.0

    def _fit_nuts(self, X: Any, y: Any) -> PCTransferRegressor:
        """Plan, sample, complete; for the scale prior, when more than 5 % of the ``τ`` draws
        ran past the grid of ``r(τ)``, the grid is extended to 1.5 times the largest draw and
        the fit run once more (then :class:`pcbtl.priors.PriorDataConflictWarning` if it still
        runs past)."""
        t0 = time.perf_counter()
        plan = self._batch_plan(X, y)
        posterior = run_plans([plan], progress_bar=bool(self.progress_bar))[0]
        reach = self._grid_reach(posterior, plan.complete.keywords["setup"])
        if reach:
            plan = self._batch_plan(X, y, tau_reach=reach)
            posterior = run_plans([plan], progress_bar=bool(self.progress_bar))[0]
        return plan.complete(posterior, seconds=time.perf_counter() - t0)

    def _batch_plan(self, X: Any, y: Any, tau_reach: float = 0.0) -> BatchPlan:
        """The fit as a plan: model, arguments, sampler settings and its completion."""
        self._check_params()
        X, y = check_Xy(X, y, n_features=self.source.n_features, min_rows=2)
        t0 = time.perf_counter()
        y, affine = self._standardised(y)
        setup = self._setup(X, y, tau_reach, affine)
        return self._plan(
            self._model(),
            self._model_kwargs(setup, X, y),
            partial(self._complete, X=X, y=y, setup=setup),
            init_strategy=init_to_median(num_samples=15),
            t0=t0,
            interweave=self._interweave(),
        )

    def _batchable(self) -> bool:
        return self.inference == "nuts"

    #: how many times chains that fell into the spike at ``τ → 0`` are replaced (MCLMC)
    MAX_RESTARTS = 2

    def _fit_mclmc(self, X: Any, y: Any) -> PCTransferRegressor:
        """MCLMC from separate optima (:func:`pcbtl.inference.run_mclmc`): ``num_chains``
        chains, ``num_warmup · thin`` tuning steps and ``num_samples`` draws ``thin`` steps
        apart per chain; the same grid extension of ``r(τ)`` as :meth:`_fit_nuts`.

        The centred density has a spike at ``τ → 0``, ``θ → θ_S`` (``∏ N(θ_j; θ_{S,j}, τ²s_j²)``
        grows like ``τ^{−D}``) whose posterior mass is negligible when the data pull away from
        the source, but into which an unadjusted sampler can fall (measured on the band-gap
        task: 2 of 4 chains in one fit). Chains whose median ``τ`` is below 5 % of the largest
        chain median are replaced by chains of a fresh run (new seed), at most
        ``MAX_RESTARTS`` times; ``restarted_chains_`` counts them. When every chain sits near
        ``τ = 0`` (the data agree with the source) nothing is replaced."""
        self._check_params()
        X, y = check_Xy(X, y, n_features=self.source.n_features, min_rows=2)
        t0 = time.perf_counter()
        y, affine = self._standardised(y)

        def sample(tau_reach: float):
            setup = self._setup(X, y, tau_reach, affine)
            kwargs = self._model_kwargs(setup, X, y)

            def run(seed: int, chains: int) -> Posterior:
                return run_mclmc(
                    self._model(),
                    kwargs,
                    num_warmup=max(int(self.num_warmup) * int(self.thin), 10),
                    num_samples=int(self.num_samples),
                    thin=int(self.thin),
                    num_chains=chains,
                    seed=seed,
                    init_steps=int(self.init_steps),
                    interweave=self._interweave(),
                )

            posterior = run(int(self.seed), int(self.num_chains))
            restarted = 0
            for attempt in range(1, self.MAX_RESTARTS + 1):
                bad = _collapsed_chains(posterior) if self.prior == "scale" else []
                if not bad or len(bad) == posterior.num_chains:
                    break
                # as many fresh chains as fell in (a new seed), judged against the good ones
                fresh = run(int(self.seed) + 7919 * attempt, len(bad))
                pooled = concatenate_chains([posterior, fresh])
                fell = set(_collapsed_chains(pooled))
                good = [c for c in range(fresh.num_chains) if posterior.num_chains + c not in fell]
                take = good[: len(bad)]
                restarted += len(take)
                posterior = _replace_chains(posterior, bad[: len(take)], fresh, take)
            setup["restarted_chains"] = restarted
            return setup, posterior

        setup, posterior = sample(0.0)
        reach = self._grid_reach(posterior, setup)
        if reach:
            setup, posterior = sample(reach)
        return self._complete(posterior, X, y, setup, time.perf_counter() - t0)

    def _complete(self, posterior: Posterior, X, y, setup, seconds: float) -> PCTransferRegressor:
        """Check the draws and store the fit (the tail of :meth:`fit`)."""
        for name in ("sigma", "distance"):
            if not np.all(np.isfinite(posterior.samples[name])):
                raise FloatingPointError(f"non-finite posterior draws of {name}; fit failed")
        beyond = 0.0
        if self.prior == "scale":
            beyond = _warn_beyond_curve(posterior.flat("tau"), setup["curve"])
        if self.prior == "tangent" and "eps" not in posterior.samples:
            posterior = _with_tangent_eps(posterior, setup["stats"], self.seed)
            # the basis (D × k) served the draws of ε; the fitted model does not need it
            setup = {**setup, "stats": None}
        conflict = _prior_conflict(
            posterior.flat("distance"), setup["rate"], self.U_log_sd, stacklevel=5
        )
        Xd = self._diagnostic_inputs(X, setup)
        means = np.asarray(self._posterior_means_from(posterior, Xd, setup), np.float64)
        shift = _realised_shift(means, self._base_predict(setup, Xd), posterior.flat("sigma"))
        idata = self._finish(
            posterior,
            X,
            y,
            setup,
            # the latent ε (scale, tangent) and z (last layer) are auxiliary: the weights are
            # θ = θ_S + τ s⊙ε, the head β; neither belongs in the posterior users read
            drop=("eps", "theta") if self.prior != "last_layer" else ("z",),
            attrs={"pcbtl_prior": self.prior, "U": float(self.U), "alpha": float(self.alpha)},
            affine=setup["affine"],
            diagnostic_means=means,
        )
        self._state = setup
        self.posterior_ = posterior
        self.idata_ = idata
        self.distance_ = posterior.flat("distance")
        self.rate_ = setup["rate"]
        self.sigma_scale_ = setup["sigma_scale"] * setup["affine"][1]
        self.y_affine_ = setup["affine"]
        self.reference_size_ = int(setup["Xref"].shape[0])
        self.prior_seconds_ = setup["seconds"]
        self.n_features_in_ = X.shape[1]
        self.num_divergences_ = posterior.num_divergences
        self.shift_ = shift
        self.prior_conflict_ = conflict
        if self.prior == "last_layer":
            self.ridge_ = setup["ridge"]
        elif self.prior == "tangent":
            self.kappa_ = float(setup["kappa"])
            self.transfer_layers_ = setup["tp"].layers
        else:
            self.curve_ = setup["curve"]
            self.curve_rel_se_ = setup["curve_rel_se"]
            self.transfer_layers_ = setup["tp"].layers
            self.tau_beyond_curve_ = beyond
            self.restarted_chains_ = int(setup.get("restarted_chains", 0))
        self.fit_seconds_ = seconds
        return self

    # ---- predictions -------------------------------------------------------------------------
    def _prior_group(
        self, state: Any, draws: int, affine: tuple[float, float]
    ) -> dict[str, np.ndarray] | None:
        """``σ`` (units of ``y``), ``d`` and, by construction, ``τ`` (scale, tangent) and the
        rate hyperprior's sites, drawn from the model without data (``draws`` draws, one
        chain); vector sites (``β``, ``ε``, ``z``) are left out."""
        kwargs = self._model_kwargs(state)
        draws_ = Predictive(self._model(), num_samples=int(draws))(
            jax.random.PRNGKey(int(self.seed) + 1), **kwargs
        )
        out = {
            k: np.asarray(v, np.float64)[None]
            for k, v in draws_.items()
            if np.ndim(v) == 1 and k in ("sigma", "tau", "distance", "rate", "U_z")
        }
        out["sigma"] = out["sigma"] * affine[1]
        return out

    def _diagnostic_inputs(self, X: np.ndarray, state: Any) -> np.ndarray:
        """A seeded subsample of the reference inputs ``x̃ ~ Q`` (target and source rows)."""
        return _subsample(state["Xref"], self.N_DIAGNOSTIC_INPUTS, self.seed)

    def _posterior_means_from(self, posterior: Posterior, X: np.ndarray, setup: Any) -> np.ndarray:
        if self.prior == "last_layer":
            Phi = _with_bias(setup["source"].features(X))
            return (Phi @ posterior.flat("beta").T.astype(np.float64)).T
        tp = setup["tp"]
        if self.prior == "tangent":
            return tangent_means(
                tp.predict_fn,
                tp.theta_source,
                tp.scales,
                posterior.flat("tau"),
                posterior.flat("eps"),
                X,
            )
        if "theta" in posterior.samples:
            thetas = jnp.asarray(posterior.flat("theta"))
        else:
            thetas = tp.theta_source + jnp.asarray(posterior.flat("tau"))[
                :, None
            ] * tp.scales * jnp.asarray(posterior.flat("eps"))
        return _batched_apply(tp.predict_fn, thetas, jnp.asarray(X, jnp.float32))

    @property
    def beta_(self) -> np.ndarray:
        """Posterior draws of the last-layer coefficients (``prior="last_layer"``), bias last."""
        self._check_fitted()
        if self.prior != "last_layer":
            raise AttributeError("beta_ exists only for prior='last_layer'")
        loc, scale = self._affine
        beta = self.posterior_.flat("beta").astype(np.float64) * scale
        beta[:, -1] += loc
        return beta

    # ---- the prior ---------------------------------------------------------------------------
    def prior_distance_samples(self, n: int = 1000, seed: int = 0) -> np.ndarray:
        """Draws of ``d`` under the prior; needs only the reference inputs, not ``y``.

        Last layer: ``(σ, β)`` are drawn by the sphere construction and ``d`` is recomputed from
        the predictions, ``d² = (mean_{x̃}(Φ̃β − Φ̃β_S)² + ρ‖β − β_S‖²)/σ²`` with the ridge ``ρ``
        of :func:`pcbtl.priors.reference_gram` (0 unless ``G`` is near-singular). Scale: ``(σ, τ)`` are drawn by inverting
        ``r̂`` and ``d = r̂(τ)/σ``. Under an exact construction ``d ~ Exp(λ)``.
        """
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        self._check_params()
        setup = self._state if hasattr(self, "posterior_") else self._setup(None)
        k_sigma, k_theta, k_rate = jax.random.split(jax.random.PRNGKey(seed), 3)
        sigma = setup["sigma_scale"] * jnp.abs(jax.random.normal(k_sigma, (int(n),)))
        rate = setup["rate"]
        if self.U_log_sd is not None:
            rate = rate * jnp.exp(-self.U_log_sd * jax.random.normal(k_rate, (int(n),)))
        if self.prior == "last_layer":
            prior = LastLayerPC(setup["beta_source"], setup["chol_G"], sigma, rate)
            beta = np.asarray(prior.sample(k_theta), np.float64)
            Phi_ref = setup["Phi_ref"]
            delta = beta - np.asarray(setup["beta_source"], np.float64)
            sq = np.mean((Phi_ref @ delta.T) ** 2, axis=0) + setup["ridge"] * np.sum(delta**2, 1)
            return np.sqrt(sq) / np.asarray(sigma, np.float64)
        if self.prior == "tangent":
            # τ | σ ~ Exp(λκ/σ), so d = κτ/σ
            e = jax.random.exponential(k_theta, (int(n),))
            return np.asarray(e / rate, np.float64)
        prior = ScalePC(setup["curve"], sigma, rate)
        tau = prior.sample(k_theta)
        return np.asarray(distance_curve_value(setup["curve"], tau) / sigma)


def _with_tangent_eps(posterior: Posterior, stats, seed: int) -> Posterior:
    """``posterior`` with one exact conditional draw of ``ε`` per draw of ``(τ, σ)``
    (:func:`pcbtl.tangent.tangent_conditional_eps`), as site ``eps`` of shape
    ``(chain, draw, D)``."""
    chains, draws = posterior.samples["tau"].shape[:2]
    eps = tangent_conditional_eps(posterior.flat("tau"), posterior.flat("sigma"), stats, seed)
    samples = {**posterior.samples, "eps": eps.reshape(chains, draws, -1)}
    return dataclasses.replace(posterior, samples=samples)


def _collapsed_chains(posterior: Posterior, site: str = "tau", share: float = 0.05) -> list[int]:
    """Chains whose median ``site`` is below ``share`` of the largest chain median."""
    med = np.median(np.asarray(posterior.samples[site]).reshape(posterior.num_chains, -1), axis=1)
    top = float(np.max(med))
    if not np.isfinite(top) or top <= 0:
        return []
    return [int(c) for c in np.nonzero(med < share * top)[0]]


def _replace_chains(
    posterior: Posterior, out: list[int], fresh: Posterior, take: list[int]
) -> Posterior:
    """``posterior`` with its chains ``out`` replaced by the chains ``take`` of ``fresh``."""
    if not out:
        return posterior

    def swap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = np.array(a, copy=True)
        a[out] = np.asarray(b)[take]
        return a

    return Posterior(
        samples={k: swap(v, fresh.samples[k]) for k, v in posterior.samples.items()},
        sample_stats={
            k: swap(v, fresh.sample_stats[k])
            for k, v in posterior.sample_stats.items()
            if k in fresh.sample_stats
        },
        method=posterior.method,
    )


def _realised_shift(means: np.ndarray, g_source: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    r"""Draws of the realised shift ``RMS_{x̃}(g_θ(x̃) − g_S(x̃)) / σ``, from the draws of the
    mean function ``means`` ``(S, m)`` and the source ``g_source`` ``(m,)`` at the same inputs."""
    g_s = np.asarray(g_source, np.float64)
    rms = np.sqrt(np.mean((np.asarray(means, np.float64) - g_s[None, :]) ** 2, axis=1))
    return rms / np.asarray(sigma, np.float64)


def _warn_beyond_curve(tau: np.ndarray, curve: DistanceCurve, limit: float = 0.05) -> float:
    """Share of the draws of ``τ`` beyond the Monte Carlo grid of ``r(τ)``; warn above ``limit``.

    The grid reaches the prior's 0.999 quantile of ``d`` at ``σ = 2·sigma_scale``
    (:func:`_fit_distance_curve`); marginally over ``σ ~ HalfNormal(sigma_scale)`` the prior
    puts ``E[exp(−13.8 sigma_scale/σ)] ≈ 2·10⁻⁴`` of its mass beyond (fixed ``U``; less with
    ``U_log_sd``, whose grid reaches further), under the 0.1 % the warning quotes. Beyond it,
    ``r̂`` is the linear extension of the last grid interval, not a Monte Carlo estimate; a
    posterior out there means the data put the target much further from the source than
    ``(U, α)`` said, and the reported distances rest on the extension.
    """
    t_max = float(curve.tau[-1])
    share = float(np.mean(np.asarray(tau) > t_max))
    if share > limit:
        warnings.warn(
            f"{share:.0%} of the posterior draws of tau lie beyond the Monte Carlo grid of r(tau) "
            f"(tau > {t_max:.3g}; the PC prior put < 0.1 % of its mass there): the data place the "
            "target much further from the source than the prior statement P(d > U) = alpha "
            "expected, and r(tau) there is a linear extension. Check that the source is relevant, "
            "or state a larger U (or set U_log_sd).",
            PriorDataConflictWarning,
            stacklevel=5,
        )
    return share


def _with_bias(features: np.ndarray) -> np.ndarray:
    """``Φ = [φ(X), 1]`` in float64."""
    f = np.asarray(features, np.float64)
    return np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)


def _fit_distance_curve(
    tp, Xref, rate, sigma_scale, n_tau, n_eps, seed, *, sigma_fine=None, tau_reach=0.0
):
    r"""Monte Carlo ``r(τ)`` on a grid fine where the fit will be and long enough for the prior.

    With ``q = −log(10⁻³)/λ`` the prior's 0.999 quantile of ``d``, the grid is the union of
    ``default_tau_grid(τ_a, K)`` and ``default_tau_grid(τ_b, K)`` (``2K − 1`` points), where
    ``r(τ_a) ≥ 2 q σ_fine`` (``σ_fine``: a guess of the fitted noise sd, the source's residual
    sd on the target) and ``r(τ_b) ≥ 2 q · sigma_scale``, and ``τ_b ≥ tau_reach`` (set when a
    first fit ran past the grid). A first pass on a geometric probe grid ``2^{−12}..2^{12}``
    finds ``τ_a`` and ``τ_b``. All passes share the ``ε`` draws (common random numbers).
    """
    key = jax.random.PRNGKey(seed + 7919)
    q = -math.log(1e-3) / rate
    sigma_fine = sigma_scale if sigma_fine is None else min(float(sigma_fine), sigma_scale)
    probe = np.concatenate([[0.0], np.geomspace(2.0**-12, 2.0**12, n_tau - 1)])
    r_probe, _ = distance_curve(
        tp.predict_fn, tp.theta_source, tp.scales, Xref, jnp.asarray(probe), key=key, n_eps=n_eps
    )
    r_probe = np.asarray(r_probe)

    def reach(target: float) -> float:
        hit = np.nonzero(r_probe >= target)[0]
        return float(probe[hit[0]] if hit.size else probe[-1])

    tau_b = max(reach(2.0 * q * sigma_scale), float(tau_reach))
    tau_a = min(reach(2.0 * q * sigma_fine), tau_b)
    grid = np.union1d(default_tau_grid(tau_a, n_tau), default_tau_grid(tau_b, n_tau))
    while grid.size < 2 * n_tau - 1:  # shared knots: keep the length (one compilation)
        gap = int(np.argmax(np.diff(grid)))
        grid = np.insert(grid, gap + 1, 0.5 * (grid[gap] + grid[gap + 1]))
    r, se_r2 = distance_curve(
        tp.predict_fn, tp.theta_source, tp.scales, Xref, jnp.asarray(grid), key=key, n_eps=n_eps
    )
    r, se_r2 = np.asarray(r, np.float64), np.asarray(se_r2, np.float64)
    # relative Monte Carlo error of r: se(r) / r ≈ se(r²) / (2 r²), largest over the grid
    pos = r > 0
    rel_se = float(np.max(se_r2[pos] / (2 * r[pos] ** 2))) if pos.any() else 0.0
    return check_distance_curve(grid, r), rel_se


def prior_distance_quantile(rate: float, prob: float = 0.999, rate_log_sd: float | None = None):
    r"""The ``prob`` quantile of the prior of ``d``.

    Fixed ``U``: ``d ~ Exp(λ)``, quantile ``−log(1 − prob)/λ``. With the hyperprior
    ``U ~ LogNormal(log U, s²)`` (``rate_log_sd = s``) the rate is ``λ e^{−s z}``, ``z ~ N(0, 1)``,
    and the quantile ``q`` solves ``E_z exp(−λ e^{−s z} q) = 1 − prob`` (Gauss–Hermite over
    ``z``, bisection over ``log q``).
    """
    if rate_log_sd is None:
        return -math.log1p(-prob) / rate
    z, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()

    def tail(q):
        return float(np.sum(w * np.exp(-rate * np.exp(-rate_log_sd * z) * q)))

    lo, hi = math.log(1e-12 / rate), math.log(1e6 / rate)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if tail(math.exp(mid)) > 1 - prob else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _prior_conflict(
    distance: np.ndarray, rate: float, rate_log_sd: float | None, stacklevel: int = 4
) -> dict[str, float]:
    r"""Compare the posterior of ``d`` with its PC prior; warn when they conflict.

    Returns ``median_d``, ``q999`` (the prior's 0.999 quantile of ``d``), ``share_beyond``
    (posterior share with ``d > q999``) and ``nats = λ · median_d``: how far the prior's log
    density at the posterior median lies below its value at the base model ``d = 0``
    (``log π(0) − log π(d) = λd``). Warns (:class:`pcbtl.priors.PriorDataConflictWarning`)
    when the posterior median of ``d`` lies beyond ``q999``: a region the prior gave 0.1 %.
    """
    d = np.asarray(distance, np.float64).reshape(-1)
    q999 = prior_distance_quantile(rate, 0.999, rate_log_sd)
    med = float(np.median(d))
    out = {
        "median_d": med,
        "q999": float(q999),
        "share_beyond": float(np.mean(d > q999)),
        "nats": float(rate * med),
    }
    if med > q999:
        warnings.warn(
            f"prior-data conflict: the posterior median of the distance d from the source model "
            f"is {med:.3g} noise sds, beyond the PC prior's 0.999 quantile {q999:.3g} "
            f"({out['share_beyond']:.0%} of the draws lie beyond it); the prior's log density "
            f"there is {out['nats']:.1f} nats below its value at the source model "
            f"(lambda = {rate:.3g}). The target differs from the source far more than "
            "P(d > U) = alpha said: check that the source is relevant, state a larger U, or "
            "let the data choose it (U_log_sd).",
            PriorDataConflictWarning,
            stacklevel=stacklevel,
        )
    return out


class BayesianNetworkRegressor(PosteriorRegressor):
    r"""Bayesian MLP with independent Normal priors on every weight, fitted by NUTS.

        θ ~ N(μ, (prior_scale · s)²),   σ ~ HalfNormal(sigma_scale),   y ~ N(g(x; θ), σ²)

    with ``s = 1/sqrt(fan_in)`` per layer. Target-only (``source=None``): a fresh network with
    ``μ = 0`` on inputs and outputs standardised with the target data. Pretrained prior
    (``source`` given): the source architecture and scalings with ``μ = θ_S`` — the usual
    "prior centred on the pretrained weights".
    """

    def __init__(
        self,
        source: SourceModel | None = None,
        *,
        hidden: tuple[int, ...] = (32,),
        activation: str = "tanh",
        prior_scale: float = 1.0,
        sigma_scale: float | None = None,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        max_tree_depth: int = 8,
        progress_bar: bool = True,
    ) -> None:
        self.source = source
        self.hidden = hidden
        self.activation = activation
        self.prior_scale = prior_scale
        self.sigma_scale = sigma_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.max_tree_depth = max_tree_depth
        self.progress_bar = progress_bar

    def _network(self, X: np.ndarray, y: np.ndarray) -> SourceModel:
        if self.source is not None:
            return self.source
        hidden = check_hidden(self.hidden)
        module = MLP(hidden=hidden, activation=self.activation)
        params = module.init(jax.random.PRNGKey(self.seed), jnp.zeros((1, X.shape[1])))["params"]
        xs = X.std(0)
        return SourceModel(
            hidden=hidden,
            activation=self.activation,
            params=jax.device_get(params),
            x_mean=X.mean(0).astype(np.float32),
            x_scale=np.where(xs > 0, xs, 1.0).astype(np.float32),
            y_mean=float(y.mean()),
            y_scale=float(y.std()) or 1.0,
            noise_sd=float(y.std()) or 1.0,
            reference_X=X[:0].astype(np.float32),
        )

    def _prepare(self, X: Any, y: Any):
        """Checked data, the flat network and the keyword arguments of :func:`bnn_model`."""
        check_positive(self.prior_scale, "prior_scale")
        nf = None if self.source is None else self.source.n_features
        X, y = check_Xy(X, y, n_features=nf, min_rows=2)
        y, affine = self._standardised(y)
        net = self._network(X, y)
        if self.source is not None:
            net = net.rescaled(*affine)
        tp = transfer_parametrization(net, "all", scale="fan_in")
        loc = tp.theta_source if self.source is not None else jnp.zeros_like(tp.theta_source)
        if self.sigma_scale is not None:
            check_positive(self.sigma_scale, "sigma_scale")
            sigma_scale = self.sigma_scale / affine[1]
        else:
            sigma_scale = net.y_scale
        kwargs = dict(
            predict_fn=tp.predict_fn,
            loc=loc,
            prior_scale=self.prior_scale * tp.scales,
            sigma_scale=float(sigma_scale),
            X=jnp.asarray(X, jnp.float32),
            y=jnp.asarray(y, jnp.float32),
        )
        return X, y, tp, kwargs, affine

    def _init_strategy(self) -> Callable:
        return init_to_median() if self.source is not None else init_to_sample()

    def fit(self, X: Any, y: Any) -> BayesianNetworkRegressor:
        """Sample the posterior of the network weights and noise sd given ``(X, y)``
        (``num_chains`` NUTS chains in one job)."""
        return self._fit_nuts(X, y)

    def _batch_plan(self, X: Any, y: Any) -> BatchPlan:
        """The fit as a plan for :func:`pcbtl.inference.run_plans`."""
        t0 = time.perf_counter()
        X, y, tp, kwargs, affine = self._prepare(X, y)
        return self._plan(
            bnn_model,
            kwargs,
            partial(self._complete, X=X, y=y, tp=tp, affine=affine),
            init_strategy=self._init_strategy(),
            t0=t0,
        )

    def _complete(
        self, posterior: Posterior, X, y, tp, seconds: float, affine=(0.0, 1.0)
    ) -> BayesianNetworkRegressor:
        if not np.all(np.isfinite(posterior.samples["sigma"])):
            raise FloatingPointError("non-finite posterior draws of sigma; fit failed")
        idata = self._finish(posterior, X, y, tp, affine=affine)
        self.y_affine_ = affine
        self._state = tp
        self._architecture = (
            _architecture(self.source)
            if self.source is not None
            else (tuple(int(h) for h in self.hidden), str(self.activation), int(X.shape[1]))
        )
        self.posterior_ = posterior
        self.idata_ = idata
        self.n_features_in_ = X.shape[1]
        self.num_divergences_ = posterior.num_divergences
        self.fit_seconds_ = seconds
        return self

    def _posterior_means_from(self, posterior: Posterior, X: np.ndarray, tp: Any) -> np.ndarray:
        return _batched_apply(
            tp.predict_fn, jnp.asarray(posterior.flat("theta")), jnp.asarray(X, jnp.float32)
        )
