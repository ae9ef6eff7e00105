r"""The estimator core every regressor of the package stands on.

:class:`RegressorBase` makes an estimator a scikit-learn regressor (``BaseEstimator`` and
``RegressorMixin``): ``__init__`` only stores its parameters, which are checked in ``fit``, so
``clone``, ``get_params``/``set_params``, ``Pipeline``, ``cross_validate`` and ``GridSearchCV``
work; ``fit`` returns ``self``; ``score`` is ``R²``; an unfitted ``predict`` raises
``sklearn.exceptions.NotFittedError``; ``feature_names_in_`` and ``n_features_in_`` are set by
``fit``; a fitted estimator pickles (the compiled functions it holds are left out and rebuilt on
load).

:class:`PosteriorRegressor` adds what every estimator with posterior draws ``(g_s, σ_s)``,
``s = 1..S``, shares: one fit in three steps — plan (the model and its arguments, a
:class:`pcbtl.inference.BatchPlan`), run (single, multi-chain or batched NUTS, SVI or MCLMC in
:mod:`pcbtl.inference`) and complete (checks, diagnostics, ArviZ data) — so a single fit and a
vmapped batch of fits run the same code; and the posterior predictive, the mixture

.. math::

    p(y \mid x) = \frac1S \sum_{s=1}^S N\big(y;\ g_s(x),\ σ_s^2\big),

with mean ``(1/S) Σ_s g_s(x)``, variance ``(1/S) Σ_s (g_s(x)² + σ_s²) − mean²`` and exact
quantiles (:func:`pcbtl.predictive.mixture_quantiles`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import validate_data

from pcbtl._validation import (
    check_probability,
    check_X,
)
from pcbtl.classification.source import SourceClassifier
from pcbtl.estimators.persistence import Persistable
from pcbtl.inference import (
    MCMC_METHODS,
    BatchPlan,
    Posterior,
    check_sampler,
    idata_groups,
    idata_with_coords,
    resolve_chain_method,
    run_plans,
    sampler_diagnostics,
    to_inference_data,
)
from pcbtl.interweave import Interweave
from pcbtl.networks import (
    NetworkFn,
    SourceModel,
    TransferParametrization,
    _flat_apply,
)
from pcbtl.predictive import mixture_quantiles
from pcbtl.tangent import ensemble_apply

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
    """``obj`` with every :class:`pcbtl.SourceModel` and :class:`pcbtl.SourceClassifier` in it
    (inside dicts, lists and tuples) replaced by a copy without its cached jitted functions
    (they are rebuilt on first use)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, SourceModel | SourceClassifier):
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


class EstimatorCore(Persistable):
    """What every estimator of the package shares, regressor or classifier: the fitted check
    (``NotFittedError`` until the attribute ``_FITTED_ATTRIBUTE`` is set), the input check of
    prediction methods, :meth:`save` / :meth:`load` without pickle, and pickling.

    Pickling (``pickle``, ``joblib.dump``) leaves out what cannot be pickled — the jitted
    functions a :class:`pcbtl.SourceModel` or :class:`pcbtl.SourceClassifier` caches, and
    whatever :meth:`_portable_state` of a subclass takes out — and :meth:`_restore_state`
    rebuilds it on load, so predictions after a round trip equal those before."""

    #: the attribute a successful ``fit`` sets last
    _FITTED_ATTRIBUTE = "n_features_in_"

    def __sklearn_is_fitted__(self) -> bool:
        return self._FITTED_ATTRIBUTE in vars(self)

    def _check_fitted(self) -> None:
        """Raise :class:`sklearn.exceptions.NotFittedError` (a ``ValueError`` and an
        ``AttributeError``) unless fitted."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y)")

    def _check_input(self, X: Any) -> np.ndarray:
        """Fitted check, the feature-name check of scikit-learn (an error when the columns of
        a DataFrame differ from those seen in ``fit``, a warning when only one of them had
        names), and ``X`` as a checked float64 array."""
        self._check_fitted()
        X_checked = check_X(X, "X", n_features=self.n_features_in_)
        validate_data(self, X, reset=False, skip_check_array=True, ensure_2d=False)
        return X_checked

    def _record_features(self, X: Any) -> None:
        """Set ``feature_names_in_`` from the columns of a DataFrame ``X`` (remove it for any
        other ``X``); ``n_features_in_`` is set by the fit itself."""
        validate_data(self, X, reset=True, skip_check_array=True, ensure_2d=False)
        names = getattr(self, "feature_names_in_", None)
        idata = getattr(self, "idata_", None)
        if names is not None and idata is not None and "constant_data" in idata_groups(idata):
            # the constant_data group's feature dimension, named after the DataFrame's columns
            self.idata_ = idata_with_coords(idata, "constant_data", {"feature": list(names)})

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


class RegressorBase(EstimatorCore, RegressorMixin, BaseEstimator):
    """The scikit-learn base of every estimator in the package.

    ``BaseEstimator`` gives ``get_params``/``set_params``, ``clone`` and the ``repr``;
    ``RegressorMixin`` gives the ``"regressor"`` tags and ``score(X, y)``, the coefficient of
    determination ``R² = 1 − Σ_i (y_i − ŷ_i)² / Σ_i (y_i − ȳ)²`` of :meth:`predict`.
    Subclasses store their parameters in ``__init__`` unchanged and check them in ``fit``,
    which ends with :meth:`_record_features` and returns ``self``; prediction methods start
    with :meth:`_check_input`. Fitted means having the attribute ``_FITTED_ATTRIBUTE``;
    pickling, :meth:`save` and :meth:`load` come from :class:`EstimatorCore`.
    """


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
        q = mixture_quantiles(
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


def _with_bias(features: np.ndarray) -> np.ndarray:
    """``Φ = [φ(X), 1]`` in float64."""
    f = np.asarray(features, np.float64)
    return np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)
