r"""Transfer-learning methods side by side, behind one estimator interface.

Every method is a scikit-learn regressor (:class:`pcbtl.transfer.RegressorBase`: ``clone``,
``Pipeline``, ``GridSearchCV`` and pickling work; parameters are checked in ``fit``) with
``fit(X, y)`` (returns ``self``), ``predict(X, return_std=True)`` (predictive mean and sd),
``predict_interval(X, level=0.95)`` (``(lower, upper)``) and ``score(X, y)`` (``R²``). :func:`methods` lists them by name and :func:`make_method` builds one from a
trained :class:`pcbtl.SourceModel`:

==========================  ===================================================================
name                        model
==========================  ===================================================================
``source-only``             the source network as it is, ``N(g_S(x), σ_S²)``
``target-only``             Bayesian network on the target alone (NUTS), ``θ ~ N(0, s²/fan_in)``
``fine-tuning``             MAP from ``θ_S`` (Adam, early stopping); residual-based interval
``pretrained-gaussian``     every weight ``~ N(θ_S, (s/√fan_in)²)``, NUTS
``bayes-last-layer``        ``β ~ N(β_S, τ² I)``, ``τ ~ HalfNormal``, body frozen, NUTS
``pc-last-layer``           PC prior on the KL distance, last layer (sphere construction)
``pc-scale``                PC prior on the KL distance, scale construction over chosen layers
``multitask-{bnn,rf}``      one model for source and target labels, the task as an input
``difference-{bnn,rf}``     target = source prediction + a learned correction
``latent-{bnn,rf}``         the source prediction as an extra input of the target model
==========================  ===================================================================

The last three are the architectures of Hutchinson et al. (2017), with two base learners:
``bnn`` — the Bayesian network of this package (:class:`pcbtl.BayesianNetworkRegressor`, NUTS),
and ``rf`` — scikit-learn's random forest with the infinitesimal-jackknife variance of the forest
mean (Wager, Hastie & Efron 2014), computed by ``forestci.random_forest_error`` (with its
empirical-Bayes calibration). How each propagates the source model's uncertainty is in its class
docstring.

Gaussian predictive methods (source-only, fine-tuning, the forests, and the network architectures
whose source is a point network) return ``N(μ(x), s(x)²)`` and the central interval
``μ ± z_{(1+level)/2} s``. Posterior-draw methods subclass :class:`pcbtl.transfer.PosteriorRegressor`
and give the exact quantiles of their Gaussian mixture.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import init_to_median, init_to_sample
from scipy.stats import norm

from pcbtl._validation import (
    check_hidden,
    check_positive,
    check_probability,
    check_X,
    check_Xy,
    check_y,
)
from pcbtl.inference import (
    BatchPlan,
    Posterior,
    clear_caches,
    plan_key,
    run_nuts_batched,
    run_plans,
)
from pcbtl.models import gaussian_loglik_suffstats, last_layer_sufficient_stats
from pcbtl.networks import MLP, SourceModel, transfer_parametrization
from pcbtl.transfer import (
    BayesianNetworkRegressor,
    PCTransferRegressor,
    PosteriorRegressor,
    RegressorBase,
    _batched_apply,
    _with_bias,
    _without_compiled,
)

__all__ = [
    "METHODS",
    "BayesianLastLayerRegressor",
    "DifferenceRegressor",
    "FineTuneRegressor",
    "GaussianPredictive",
    "LatentVariableRegressor",
    "MultiTaskRegressor",
    "SourceOnlyRegressor",
    "bayes_last_layer_model",
    "clear_caches",
    "fit_replicates",
    "make_method",
    "methods",
    "multitask_bnn_model",
    "run_nuts_batched",
    "supports_batching",
]

BASES = ("bnn", "rf")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _check_source(source: Any) -> SourceModel:
    if not isinstance(source, SourceModel):
        raise ValueError(f"source must be a pcbtl.SourceModel, got {type(source).__name__}")
    return source


def _check_base(base: Any) -> str:
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    return base


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class GaussianPredictive(RegressorBase):
    """Base of the methods whose predictive is ``N(μ(x), s(x)²)`` (a scikit-learn regressor,
    :class:`pcbtl.transfer.RegressorBase`): subclasses implement ``_predict_gaussian(X) -> (μ, s)``
    on checked inputs and set ``n_features_in_`` in ``fit``."""

    n_features_in_: int

    def _predict_gaussian(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _checked(self, X: Any) -> np.ndarray:
        return self._check_input(X)

    def predict(self, X: Any, return_std: bool = False):
        """Predictive mean; with ``return_std`` also the predictive sd."""
        mu, sd = self._predict_gaussian(self._checked(X))
        return (mu, sd) if return_std else mu

    def predict_interval(self, X: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Central ``level`` interval ``μ ± z s`` of the Gaussian predictive."""
        level = check_probability(level, "level")
        mu, sd = self._predict_gaussian(self._checked(X))
        z = norm.ppf(0.5 + level / 2.0)
        return mu - z * sd, mu + z * sd


def _fresh_network(X: np.ndarray, y: np.ndarray, hidden, activation: str, seed: int):
    """An untrained :class:`SourceModel` shell (LeCun init) with scalings from ``(X, y)``."""
    hidden = check_hidden(hidden)
    module = MLP(hidden=hidden, activation=activation)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, X.shape[1])))["params"]
    xs = X.std(0)
    ys = float(y.std()) or 1.0
    return SourceModel(
        hidden=tuple(int(h) for h in hidden),
        activation=activation,
        params=jax.device_get(params),
        x_mean=X.mean(0).astype(np.float32),
        x_scale=np.where(xs > 0, xs, 1.0).astype(np.float32),
        y_mean=float(y.mean()),
        y_scale=ys,
        noise_sd=ys,
        reference_X=X[:0].astype(np.float32),
    )


def _source_rows(source: SourceModel, source_X, source_y):
    """Labelled source rows: the given ones, or the source network's pseudo-labels ``g_S(x̃)``
    on the source inputs kept in ``source.reference_X`` (documented fallback)."""
    if source_X is None and source_y is None:
        Xs = np.asarray(source.reference_X, np.float64)
        return Xs, source.predict(Xs).astype(np.float64)
    if source_X is None or source_y is None:
        raise ValueError("source_X and source_y must be given together")
    Xs, ys = check_Xy(source_X, source_y, n_features=source.n_features, min_rows=2)
    Xs = check_X(Xs, "source_X")
    return Xs, ys


# --------------------------------------------------------------------------------------------
# random-forest base learner with infinitesimal-jackknife variance
# --------------------------------------------------------------------------------------------


@dataclass
class _Forest:
    """A fitted ``RandomForestRegressor`` with its training shape and OOB noise variance."""

    forest: Any
    train_shape: tuple[int, int]
    noise_var: float
    seed: int
    y_affine: tuple[float, float] = (0.0, 1.0)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Forest mean in the units of ``y`` (the trees are grown on standardised labels)."""
        loc, scale = self.y_affine
        return loc + scale * self.forest.predict(X)

    def mean_var(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forest mean and the calibrated infinitesimal-jackknife variance ``V_IJ(x)`` of it
        (Wager, Hastie & Efron 2014), clipped at 0, in the units of ``y``. ``forestci``'s
        calibration draws a random subset of trees from NumPy's global generator; it is seeded
        here and restored after."""
        import forestci

        loc, scale = self.y_affine
        mu = self.predict(X)
        state = np.random.get_state()  # noqa: NPY002 - forestci uses the global generator
        np.random.seed(self.seed % 2**32)  # noqa: NPY002
        try:
            var = forestci.random_forest_error(self.forest, self.train_shape, X, calibrate=True)
        finally:
            np.random.set_state(state)  # noqa: NPY002
        var = np.maximum(np.nan_to_num(np.asarray(var, np.float64), nan=0.0), 0.0)
        return mu, scale**2 * var


#: the smallest noise sd of a forest's predictive, in label sds (standardised units)
FOREST_NOISE_FLOOR = 1e-3


def _fit_forest(X, y, *, n_estimators, min_samples_leaf, seed, noise_rows=None) -> _Forest:
    """Fit a bootstrap forest; the noise variance is the out-of-bag mean squared error (over
    ``noise_rows`` when given: the target rows of a multi-task forest). The trees are grown on
    standardised labels (squared-error impurities of labels far from 0 cancel in float64 and
    move the splits), and every output is mapped back."""
    from sklearn.ensemble import RandomForestRegressor

    y_std, (loc, scale) = PosteriorRegressor._standardised(y)

    rf = RandomForestRegressor(
        n_estimators=int(n_estimators),
        min_samples_leaf=int(min_samples_leaf),
        bootstrap=True,
        oob_score=True,
        random_state=int(seed),
        n_jobs=-1,
    ).fit(X, y_std)
    # predictions summed over trees by several threads come out in a varying order and differ
    # in the last bit, which changes split thresholds downstream: predict single-threaded
    rf.set_params(n_jobs=1)
    oob = rf.oob_prediction_
    rows = np.ones(len(y), bool) if noise_rows is None else noise_rows
    rows = rows & np.isfinite(oob)
    noise_var = float(np.mean((oob[rows] - y_std[rows]) ** 2)) if rows.any() else 1.0
    if noise_var < FOREST_NOISE_FLOOR**2:
        # out-of-bag predictions equal to the labels (constant or perfectly separable labels):
        # the interval would have width 0 wherever the trees agree; floored and said so
        warnings.warn(
            f"the forest's out-of-bag error is {math.sqrt(noise_var) * scale:.3g} (labels it "
            "reproduces exactly, e.g. constant labels): its noise sd is floored at "
            f"{FOREST_NOISE_FLOOR:g} label sds ({FOREST_NOISE_FLOOR * scale:.3g}), so the "
            "predictive intervals are nearly zero-width; they say nothing about new data",
            UserWarning,
            stacklevel=4,
        )
        noise_var = FOREST_NOISE_FLOOR**2
    return _Forest(rf, tuple(X.shape), scale**2 * noise_var, int(seed), (loc, scale))


# --------------------------------------------------------------------------------------------
# 1. source-only
# --------------------------------------------------------------------------------------------


class SourceOnlyRegressor(GaussianPredictive):
    """The source network as it is: predictive ``N(g_S(x), σ_S²)``, ``σ_S`` its validation RMSE.

    ``fit`` only checks the target data (nothing is learned from it).
    """

    def __init__(self, source: SourceModel) -> None:
        self.source = source

    def fit(self, X: Any, y: Any) -> SourceOnlyRegressor:
        _check_source(self.source)
        Xc, y = check_Xy(X, y, n_features=self.source.n_features, min_rows=1)
        self.fit_seconds_ = 0.0
        self.n_features_in_ = Xc.shape[1]
        self._record_features(X)
        return self

    def _predict_gaussian(self, X):
        mu = self.source.predict(X).astype(np.float64)
        return mu, np.full_like(mu, self.source.noise_sd)


# --------------------------------------------------------------------------------------------
# 3. fine-tuning (MAP) with a residual-based interval
# --------------------------------------------------------------------------------------------


class FineTuneRegressor(GaussianPredictive):
    r"""MAP fine-tuning of every weight from the source values, with early stopping.

    Minimises ``mean_i ((y_i − g(x_i; θ))/s_y)² + weight_decay ‖θ − θ_S‖²`` with full-batch Adam
    (``learning_rate``) from ``θ = θ_S`` (``weight_decay > 0`` is MAP under a Gaussian prior centred
    at the source). Early stopping: a random ``validation_fraction`` of the rows (at least 2)
    is held out, the step count ``e*`` with the lowest validation error is kept, and the network
    is refitted from ``θ_S`` on *all* rows for ``e*`` steps.

    The network carries no uncertainty of its own. The interval is residual-based:
    ``μ(x) ± z s`` with ``s`` the held-out RMSE at ``e*`` — a homoscedastic plug-in that ignores
    where the fine-tuned network is uncertain, which is what MAP fine-tuning offers.

    Fitted: ``params_``, ``best_step_``, ``residual_sd_``, ``validation_curve_``.
    """

    def __init__(
        self,
        source: SourceModel,
        *,
        learning_rate: float = 1e-3,
        max_steps: int = 1000,
        patience: int = 100,
        validation_fraction: float = 0.2,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.learning_rate = learning_rate
        self.max_steps = max_steps
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.weight_decay = weight_decay
        self.seed = seed

    def fit(self, X: Any, y: Any) -> FineTuneRegressor:
        src = _check_source(self.source)
        check_positive(self.learning_rate, "learning_rate")
        max_steps = _check_int(self.max_steps, "max_steps")
        _check_int(self.patience, "patience")
        check_probability(self.validation_fraction, "validation_fraction")
        if float(self.weight_decay) < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay!r}")
        X_in = X
        X, y = check_Xy(X, y, n_features=src.n_features, min_rows=4)
        t0 = time.perf_counter()
        # fit in standardised label units (the source mapped to them), outputs mapped back
        y, (loc, scale) = PosteriorRegressor._standardised(y)
        src = src.rescaled(loc, scale)
        rng = np.random.default_rng(self.seed)
        n = X.shape[0]
        n_val = min(max(2, int(round(self.validation_fraction * n))), n - 2)
        perm = rng.permutation(n)
        val = np.zeros(n, bool)
        val[perm[:n_val]] = True
        Xj = jnp.asarray(X, jnp.float32)
        yj = jnp.asarray(y, jnp.float32)
        run = _finetune_runner(src, float(self.learning_rate), float(self.weight_decay), max_steps)
        params0 = jax.tree_util.tree_map(jnp.asarray, src.params)
        w_tr = jnp.asarray(~val, jnp.float32)
        w_val = jnp.asarray(val, jnp.float32)
        _, val_curve = run(params0, Xj, yj, w_tr, w_val, max_steps)
        val_curve = np.asarray(val_curve)  # validation MSE after step k+1
        # early stopping: the best step seen before `patience` steps without improvement
        best, best_k = math.inf, 0
        for k, v in enumerate(val_curve):
            if v < best:
                best, best_k = float(v), k
            elif k - best_k >= self.patience:
                break
        steps = best_k + 1
        params, _ = run(params0, Xj, yj, jnp.ones(n, jnp.float32), w_val, steps)
        self.params_ = jax.device_get(params)
        self._fit_source = src
        self._apply = jax.jit(src.apply)
        self.y_affine_ = (loc, scale)
        self.best_step_ = int(steps)
        self.residual_sd_ = float(math.sqrt(best)) * scale
        self.validation_curve_ = val_curve * scale**2  # validation MSE in the units of y²
        self.fit_seconds_ = time.perf_counter() - t0
        self.n_features_in_ = X.shape[1]
        self._record_features(X_in)
        return self

    def _portable_state(self, state: dict[str, Any]) -> dict[str, Any]:
        state.pop("_apply", None)  # a jitted function: rebuilt on first use
        return super()._portable_state(state)

    def _predict_gaussian(self, X):
        loc, scale = self.y_affine_
        if "_apply" not in vars(self):
            self._apply = jax.jit(self._fit_source.apply)
        mu = np.asarray(self._apply(self.params_, jnp.asarray(X, jnp.float32)), np.float64)
        return loc + scale * mu, np.full_like(mu, self.residual_sd_)


def _finetune_runner(source: SourceModel, lr: float, weight_decay: float, max_steps: int):
    """A jitted ``run(params0, X, y, w_train, w_val, steps)``: ``max_steps`` Adam steps of the
    weighted loss, updates masked after ``steps``; returns the final parameters and the
    validation MSE (units of ``y``²) after every step."""
    opt = optax.adam(lr)
    theta_s = jax.tree_util.tree_map(jnp.asarray, source.params)
    s_y = source.y_scale

    def loss(p, X, y, w):
        r = (source.apply(p, X) - y) / s_y
        fit = jnp.sum(w * r**2) / jnp.maximum(jnp.sum(w), 1.0)
        sq = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), p, theta_s)
        return fit + weight_decay * sum(jax.tree_util.tree_leaves(sq))

    @jax.jit
    def run(params0, X, y, w_tr, w_val, steps):
        def step(carry, k):
            p, st = carry
            g = jax.grad(loss)(p, X, y, w_tr)
            upd, st_new = opt.update(g, st, p)
            p_new = optax.apply_updates(p, upd)
            keep = k < steps
            p = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), p_new, p)
            st = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), st_new, st)
            r = source.apply(p, X) - y
            val = jnp.sum(w_val * r**2) / jnp.maximum(jnp.sum(w_val), 1.0)
            return (p, st), val

        (p, _), vals = jax.lax.scan(step, (params0, opt.init(params0)), jnp.arange(max_steps))
        return p, vals

    return run


# --------------------------------------------------------------------------------------------
# 5. Bayesian last layer with β ~ N(β_S, τ² I)
# --------------------------------------------------------------------------------------------


def bayes_last_layer_model(beta_source, tau_scale, sigma_scale, stats=None) -> None:
    r"""Bayesian last layer centred at the source head, non-centred:

        σ ~ HalfNormal(sigma_scale),  τ ~ HalfNormal(tau_scale),  z ~ N(0, I_p),
        β = β_S + τ z,   y ~ N(Φβ, σ² I)

    with the likelihood from the QR sufficient statistics ``stats`` measured from ``β₀ = β_S``
    (:func:`pcbtl.models.last_layer_sufficient_stats` with ``beta_ref = β_S``, so the
    likelihood sees ``δ = β − β_S = τ z``; :func:`pcbtl.models.gaussian_loglik_suffstats`;
    ``None``: prior only).
    Sites ``sigma``, ``tau``, ``z`` and the deterministic ``beta``.
    """
    sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
    tau = numpyro.sample("tau", dist.HalfNormal(tau_scale))
    z = numpyro.sample("z", dist.Normal(jnp.zeros_like(beta_source), 1.0).to_event(1))
    numpyro.deterministic("beta", beta_source + tau * z)
    if stats is not None:
        numpyro.factor("loglik", gaussian_loglik_suffstats(tau * z, sigma, stats))


class BayesianLastLayerRegressor(PosteriorRegressor):
    r"""Body frozen at ``θ_S``; head ``β`` (bias last) with ``β ~ N(β_S, τ² I)``, ``τ`` sampled.

    See :func:`bayes_last_layer_model`. ``tau_scale`` defaults to ``s_y/√p`` (``s_y`` the sd of
    the source labels, ``p`` the head size), so that a prior draw moves the predictions by about
    one label sd; ``sigma_scale`` defaults to ``s_y``. Unlike the PC prior, the isotropic
    ``N(β_S, τ²I)`` ignores how much each coefficient direction changes the predictions.
    NUTS; fitted attributes as for :class:`pcbtl.PCTransferRegressor` plus ``tau_``.
    """

    def __init__(
        self,
        source: SourceModel,
        *,
        tau_scale: float | None = None,
        sigma_scale: float | None = None,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        progress_bar: bool = False,
    ) -> None:
        self.source = source
        self.tau_scale = tau_scale
        self.sigma_scale = sigma_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.progress_bar = progress_bar

    def _prepare(self, X, y):
        """Checked data, the fit state and the model keyword arguments (also used batched)."""
        src = _check_source(self.source)
        for name in ("tau_scale", "sigma_scale"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        X, y = check_Xy(X, y, n_features=src.n_features, min_rows=2)
        y, affine = self._standardised(y)
        src = src.rescaled(*affine)
        beta_s = src.head()
        p = beta_s.shape[0]
        tau_scale = (
            self.tau_scale / affine[1] if self.tau_scale is not None else src.y_scale / math.sqrt(p)
        )
        sigma_scale = self.sigma_scale / affine[1] if self.sigma_scale is not None else src.y_scale
        kwargs = dict(
            beta_source=jnp.asarray(beta_s, jnp.float32),
            tau_scale=float(tau_scale),
            sigma_scale=float(sigma_scale),
            stats=last_layer_sufficient_stats(_with_bias(src.features(X)), y, beta_s),
        )
        return X, y, kwargs, affine

    def fit(self, X: Any, y: Any) -> BayesianLastLayerRegressor:
        """Sample ``(σ, τ, β)`` given ``(X, y)`` (``num_chains`` NUTS chains in one job)."""
        return self._fit_nuts(X, y)

    def _batch_plan(self, X: Any, y: Any) -> BatchPlan:
        t0 = time.perf_counter()
        X, y, kwargs, affine = self._prepare(X, y)
        return self._plan(
            bayes_last_layer_model,
            kwargs,
            partial(self._complete, X=X, y=y, affine=affine),
            init_strategy=init_to_median(num_samples=15),
            t0=t0,
        )

    def _complete(self, posterior: Posterior, X, y, seconds: float, affine=(0.0, 1.0)):
        if not np.all(np.isfinite(posterior.samples["sigma"])):
            raise FloatingPointError("non-finite posterior draws of sigma; fit failed")
        self.idata_ = self._finish(posterior, X, y, None, affine=affine)
        self.y_affine_ = affine
        self._state = None
        self.posterior_ = posterior
        self.tau_ = posterior.flat("tau") * affine[1]
        self.n_features_in_ = X.shape[1]
        self.num_divergences_ = posterior.num_divergences
        self.fit_seconds_ = seconds
        return self

    def _posterior_means_from(self, posterior, X, state):
        Phi = _with_bias(self.source.features(X))  # features do not depend on the label scale
        return (Phi @ posterior.flat("beta").T.astype(np.float64)).T


# --------------------------------------------------------------------------------------------
# 8. multi-task
# --------------------------------------------------------------------------------------------


def multitask_bnn_model(predict_fn, loc, prior_scale, sigma_scale, X=None, y=None, task=None):
    r"""One Bayesian network for both tasks, the task indicator ``t ∈ {0, 1}`` as the last input:

        θ ~ N(loc, prior_scale²),  σ_S, σ ~ HalfNormal(sigma_scale),
        y_i ~ N(g([x_i, t_i]; θ), σ_{t_i}²)      (t = 0 source, t = 1 target)

    with a separate noise sd per task. Sites ``theta``, ``sigma_source`` and ``sigma`` (target).
    """
    sigma_s = numpyro.sample("sigma_source", dist.HalfNormal(sigma_scale))
    sigma = numpyro.sample("sigma", dist.HalfNormal(sigma_scale))
    theta = numpyro.sample("theta", dist.Normal(loc, prior_scale).to_event(1))
    if X is not None and y is not None:
        sd = jnp.where(task > 0.5, sigma, sigma_s)
        numpyro.sample("y", dist.Normal(predict_fn(theta, X), sd), obs=y)


def _stack_tasks(X, Y, Xs, ys):
    """Rows ``[x, t]`` with labels for every present label: target column → t=1, source → t=0."""
    rows, labels, tasks = [], [], []
    y_src, y_tgt = Y[:, 0], Y[:, 1]
    for col, t in ((y_tgt, 1.0), (y_src, 0.0)):
        ok = np.isfinite(col)
        rows.append(X[ok])
        labels.append(col[ok])
        tasks.append(np.full(int(ok.sum()), t))
    if Xs is not None:
        rows.append(Xs)
        labels.append(ys)
        tasks.append(np.zeros(len(ys)))
    Xa = np.concatenate(rows)
    t = np.concatenate(tasks)
    return np.concatenate([Xa, t[:, None]], axis=1), np.concatenate(labels), t


class MultiTaskRegressor(PosteriorRegressor):
    r"""Multi-task architecture (Hutchinson et al. 2017): one model learns source and target
    labels together, with the task ``t`` (0 source, 1 target) as an extra input; predictions are
    for ``t = 1``.

    ``fit(X, y)``: ``y`` is the 1-D target label, or an ``(n, 2)`` array ``[source label,
    target label]`` per row with NaN where a row lacks that label (a row with one label still
    counts for that task; a row with neither raises). Further source rows come from
    ``source_X, source_y``; when neither these nor a source column are given, the source rows
    are the source network's inputs ``source.reference_X`` with its predictions ``g_S`` as
    (pseudo-)labels. At most ``max_source_rows`` source rows are used (a seeded subset).

    Base learners: ``"bnn"`` — :func:`multitask_bnn_model` (NUTS, a noise sd per task; the
    predictive is the mixture over draws of ``N(g([x, 1]; θ), σ²)``); ``"rf"`` — a random forest on
    ``[x, t]``, predictive ``N(f̂(x, 1), V_IJ(x, 1) + σ̂_T²)``, ``σ̂_T²`` the out-of-bag MSE on the
    target rows. The source's own uncertainty is part of the joint model: nothing is added.
    """

    def __init__(
        self,
        source: SourceModel,
        *,
        base: str = "bnn",
        source_X: Any = None,
        source_y: Any = None,
        max_source_rows: int = 1000,
        hidden: tuple[int, ...] = (32,),
        activation: str = "tanh",
        prior_scale: float = 1.0,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        max_tree_depth: int = 8,
        n_estimators: int = 200,
        min_samples_leaf: int = 2,
        seed: int = 0,
        progress_bar: bool = False,
    ) -> None:
        self.source = source
        self.base = base
        self.source_X = source_X
        self.source_y = source_y
        self.max_source_rows = max_source_rows
        self.hidden = hidden
        self.activation = activation
        self.prior_scale = prior_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.max_tree_depth = max_tree_depth
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.seed = seed
        self.progress_bar = progress_bar

    #: fitted with either base learner (``posterior_`` exists only for ``"bnn"``)
    _FITTED_ATTRIBUTE = "n_features_in_"

    def _stack(self, X: Any, y: Any):
        """Checked data stacked as rows ``[x, t]`` (see :func:`_stack_tasks`)."""
        src = _check_source(self.source)
        _check_base(self.base)
        check_positive(self.prior_scale, "prior_scale")
        max_rows = _check_int(self.max_source_rows, "max_source_rows", 0)
        X = check_X(X, "X", n_features=src.n_features)
        try:
            Y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"y must be a numeric array: {exc}") from exc
        if Y.ndim == 1:
            Y = np.stack([np.full_like(Y, np.nan), check_y(Y, "y")], axis=1)
        if Y.ndim != 2 or Y.shape[1] != 2:
            raise ValueError(f"y must be 1-D or have 2 columns (source, target), got {Y.shape}")
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"X and y have mismatched lengths: {X.shape[0]} vs {Y.shape[0]}")
        if np.any(np.isinf(Y)):
            raise ValueError("y contains inf (use NaN for a missing label)")
        if np.any(np.all(np.isnan(Y), axis=1)):
            raise ValueError("y has rows with neither label (NaN in both columns)")
        if int(np.isfinite(Y[:, 1]).sum()) < 2:
            raise ValueError("y must hold at least 2 target labels")
        t0 = time.perf_counter()
        Xs = ys = None
        if self.source_X is not None or self.source_y is not None or np.all(np.isnan(Y[:, 0])):
            Xs, ys = _source_rows(src, self.source_X, self.source_y)
            if Xs.shape[0] > max_rows:
                keep = np.sort(np.random.default_rng(self.seed).choice(len(ys), max_rows, False))
                Xs, ys = Xs[keep], ys[keep]
        Xa, ya, task = _stack_tasks(X, Y, Xs, ys)
        return X, Xa, ya, task, t0

    def fit(self, X: Any, y: Any) -> MultiTaskRegressor:
        """Fit the base learner on the stacked source and target rows; returns ``self``."""
        X_in = X
        X, Xa, ya, task, t0 = self._stack(X, y)
        if self.base == "rf":
            forest = _fit_forest(
                Xa,
                ya,
                n_estimators=self.n_estimators,
                min_samples_leaf=self.min_samples_leaf,
                seed=self.seed,
                noise_rows=task == 1,
            )
            # stored only once the fit has succeeded: a failed refit keeps the previous model
            self.forest_ = forest
            self.fit_seconds_ = time.perf_counter() - t0
            self.n_features_in_ = X.shape[1]
            self._record_rows(task)
        else:
            plan = self._bnn_plan(Xa, ya, task, t0)
            posterior = run_plans([plan], progress_bar=self.progress_bar)[0]
            plan.complete(posterior, seconds=time.perf_counter() - t0)
        self._record_features(X_in)
        return self

    def _record_rows(self, task: np.ndarray) -> None:
        self.n_source_rows_ = int((task == 0).sum())
        self.n_target_rows_ = int((task == 1).sum())

    def _batch_plan(self, X: Any, y: Any) -> BatchPlan:
        _, Xa, ya, task, t0 = self._stack(X, y)
        return self._bnn_plan(Xa, ya, task, t0)

    def _batchable(self) -> bool:
        return self.base == "bnn"

    def _bnn_plan(self, Xa, ya, task, t0: float) -> BatchPlan:
        ya, affine = self._standardised(ya)
        net = _fresh_network(Xa, ya, self.hidden, self.activation, self.seed)
        tp = transfer_parametrization(net, "all", scale="fan_in")
        kwargs = dict(
            predict_fn=tp.predict_fn,
            loc=jnp.zeros_like(tp.theta_source),
            prior_scale=self.prior_scale * tp.scales,
            sigma_scale=float(net.y_scale),
            X=jnp.asarray(Xa, jnp.float32),
            y=jnp.asarray(ya, jnp.float32),
            task=jnp.asarray(task, jnp.float32),
        )

        def complete(posterior: Posterior, seconds: float) -> MultiTaskRegressor:
            if not np.all(np.isfinite(posterior.samples["sigma"])):
                raise FloatingPointError("non-finite posterior draws of sigma; fit failed")
            tgt = task == 1
            self.idata_ = self._finish(posterior, Xa[tgt][:, :-1], ya[tgt], tp, affine=affine)
            self._record_rows(task)
            self.y_affine_ = affine
            self._state = tp
            self._architecture = (
                tuple(int(h) for h in self.hidden),
                str(self.activation),
                int(Xa.shape[1]),
            )
            self.posterior_ = posterior
            self.num_divergences_ = posterior.num_divergences
            self.n_features_in_ = Xa.shape[1] - 1
            self.fit_seconds_ = seconds
            return self

        return self._plan(
            multitask_bnn_model, kwargs, complete, init_strategy=init_to_sample(), t0=t0
        )

    def _posterior_means_from(self, posterior, X, tp):
        Xa = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
        return _batched_apply(
            tp.predict_fn, jnp.asarray(posterior.flat("theta")), jnp.asarray(Xa, jnp.float32)
        )

    def _forest_gaussian(self, X):
        Xa = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
        mu, v = self.forest_.mean_var(Xa)
        return mu, np.sqrt(v + self.forest_.noise_var)

    @property
    def sigma_draws_(self) -> np.ndarray:
        self._check_fitted()
        if self.base == "rf":
            raise AttributeError("sigma_draws_ exists only for base='bnn'")
        return self.posterior_.flat("sigma") * self._affine[1]

    def predict(self, X: Any, return_std: bool = False):
        if getattr(self, "forest_", None) is not None and self.base == "rf":
            mu, sd = self._forest_gaussian(self._check_input(X))
            return (mu, sd) if return_std else mu
        return super().predict(X, return_std)

    def predict_interval(self, X: Any, level: float = 0.95):
        if getattr(self, "forest_", None) is not None and self.base == "rf":
            level = check_probability(level, "level")
            mu, sd = self._forest_gaussian(self._check_input(X))
            z = norm.ppf(0.5 + level / 2.0)
            return mu - z * sd, mu + z * sd
        return super().predict_interval(X, level)

    def sample_posterior_predictive(self, X: Any, seed: int = 0) -> np.ndarray:
        if self.base == "rf":
            raise AttributeError("sample_posterior_predictive exists only for base='bnn'")
        return super().sample_posterior_predictive(X, seed)


# --------------------------------------------------------------------------------------------
# 9.–10. difference and explicit latent variable
# --------------------------------------------------------------------------------------------


class _SourcePredictor:
    """The source prediction ``ĝ_S(x)`` and its epistemic variance ``v_S(x)`` for the
    difference and latent-variable architectures.

    ``bnn``: the source network — a point estimate, so ``v_S = 0`` (it has no weight
    uncertainty; ``σ_S`` is the *label* noise of the source task, not an error of ``g_S``).
    ``rf``: a forest fitted to the source rows, ``v_S = V_IJ(x)`` (Wager et al. 2014).
    """

    def __init__(self, source, base, source_X, source_y, n_estimators, leaf, seed):
        self.source = source
        self.forest = None
        if base == "rf":
            Xs, ys = _source_rows(source, source_X, source_y)
            self.forest = _fit_forest(
                Xs, ys, n_estimators=n_estimators, min_samples_leaf=leaf, seed=seed
            )

    def __getstate__(self) -> dict[str, Any]:
        return _without_compiled(dict(vars(self)))

    def __call__(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.forest is None:
            mu = self.source.predict(X).astype(np.float64)
            return mu, np.zeros_like(mu)
        return self.forest.mean_var(X)


class _TwoStage(GaussianPredictive):
    """Shared set-up of :class:`DifferenceRegressor` and :class:`LatentVariableRegressor`."""

    def __init__(
        self,
        source: SourceModel,
        *,
        base: str = "bnn",
        source_X: Any = None,
        source_y: Any = None,
        hidden: tuple[int, ...] = (32,),
        activation: str = "tanh",
        prior_scale: float = 1.0,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        max_tree_depth: int = 8,
        n_estimators: int = 200,
        min_samples_leaf: int = 2,
        n_source_draws: int = 16,
        seed: int = 0,
        progress_bar: bool = False,
    ) -> None:
        self.source = source
        self.base = base
        self.source_X = source_X
        self.source_y = source_y
        self.hidden = hidden
        self.activation = activation
        self.prior_scale = prior_scale
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.max_tree_depth = max_tree_depth
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.n_source_draws = n_source_draws
        self.seed = seed
        self.progress_bar = progress_bar

    def _start(self, X, y):
        src = _check_source(self.source)
        _check_base(self.base)
        check_positive(self.prior_scale, "prior_scale")
        _check_int(self.n_source_draws, "n_source_draws")
        X, y = check_Xy(X, y, n_features=src.n_features, min_rows=4)
        sp = _SourcePredictor(
            src,
            self.base,
            self.source_X,
            self.source_y,
            self.n_estimators,
            self.min_samples_leaf,
            self.seed + 1,
        )
        return X, y, sp

    def fit(self, X: Any, y: Any):
        """Fit the source predictor's view of ``(X, y)``, then the base learner on it."""
        t0 = time.perf_counter()
        X_in = X
        X, y, sp = self._start(X, y)
        g, _ = sp(X)
        Xl, yl = self._learner_data(X, y, g)
        if self.base == "rf":
            learner = _fit_forest(
                Xl,
                yl,
                n_estimators=self.n_estimators,
                min_samples_leaf=self.min_samples_leaf,
                seed=self.seed,
            )
        else:
            learner = self._bnn_learner().fit(Xl, yl)
        self._complete_fit(learner, X, y, g, sp, time.perf_counter() - t0)
        self._record_features(X_in)
        return self

    def _complete_fit(self, learner, X, y, g, sp, seconds: float):
        self._store(learner, X, y, g, sp)
        self._source_pred = sp
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = seconds
        return self

    def _batchable(self) -> bool:
        return self.base == "bnn"

    def _batch_plan(self, X: Any, y: Any) -> BatchPlan:
        """The base network's plan; completing it also completes this estimator."""
        t0 = time.perf_counter()
        X, y, sp = self._start(X, y)
        g, _ = sp(X)
        learner = self._bnn_learner()
        plan = learner._batch_plan(*self._learner_data(X, y, g))

        def complete(posterior: Posterior, seconds: float):
            plan.complete(posterior, seconds=seconds)
            return self._complete_fit(learner, X, y, g, sp, seconds)

        return plan._replace(complete=complete, setup_seconds=time.perf_counter() - t0)

    def _bnn_learner(self) -> BayesianNetworkRegressor:
        return BayesianNetworkRegressor(
            hidden=tuple(self.hidden),
            activation=self.activation,
            prior_scale=self.prior_scale,
            num_warmup=self.num_warmup,
            num_samples=self.num_samples,
            num_chains=self.num_chains,
            chain_method=self.chain_method,
            max_tree_depth=self.max_tree_depth,
            seed=self.seed,
            progress_bar=self.progress_bar,
        )

    @staticmethod
    def _learner_moments(learner, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, epistemic variance and noise variance of a fitted base learner at ``X``."""
        if isinstance(learner, _Forest):
            mu, v = learner.mean_var(X)
            return mu, v, np.full_like(mu, learner.noise_var)
        means = learner._means(X)
        noise = float(np.mean(learner.sigma_draws_**2))
        return means.mean(0), means.var(0), np.full(X.shape[0], noise)


class DifferenceRegressor(_TwoStage):
    r"""Difference architecture (Hutchinson et al. 2017): ``y_T(x) = ĝ_S(x) + c(x) + e``; the
    correction ``c`` is the base learner fitted to the residuals ``r_i = y_i − ĝ_S(x_i)``.

    Predictive ``N(μ, s²)`` with

        μ(x)  = ĝ_S(x) + E[c(x)]
        s²(x) = v_S(x) + Var[c(x)] + σ_c²

    ``Var[c(x)]`` is the epistemic variance of the correction (the variance of the posterior
    draws ``c_s(x)`` for ``bnn``, ``V_IJ`` for ``rf``), ``σ_c²`` its noise variance (``E_s σ_s²``,
    or the out-of-bag MSE of the forest), and ``v_S(x)`` the epistemic variance of the source
    prediction (see :class:`_SourcePredictor`: 0 for the source network, ``V_IJ`` of the source
    forest). Adding ``v_S`` treats the source error at ``x`` as independent of what the correction
    learned from the residuals at the training rows: conservative, as in Hutchinson et al. The
    source label noise ``σ_S`` does not enter: the target's noise is ``σ_c``.

    Fitted: ``correction_`` (the base learner), ``residuals_``.
    """

    def _learner_data(self, X, y, g):
        return X, y - g

    def _store(self, learner, X, y, g, sp) -> None:
        self.residuals_ = y - g
        self.correction_ = learner

    def correction(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Mean and epistemic sd of the learned correction ``c(x)``."""
        X = self._checked(X)
        mu, v, _ = self._learner_moments(self.correction_, X)
        return mu, np.sqrt(v)

    def _predict_gaussian(self, X):
        g, v_s = self._source_pred(X)
        c, v_c, noise = self._learner_moments(self.correction_, X)
        return g + c, np.sqrt(v_s + v_c + noise)


class LatentVariableRegressor(_TwoStage):
    r"""Explicit latent-variable architecture (Hutchinson et al. 2017): the source prediction
    ``z = ĝ_S(x)`` becomes an extra input of the target model ``h(x, z)``.

    The target model is the base learner fitted on ``[X, ĝ_S(X)]``. When the source prediction is
    uncertain (``v_S > 0``: the source forest) it is propagated by Monte Carlo with
    ``K = n_source_draws`` draws ``z_k = ĝ_S(x) + √v_S(x) e_k``, ``e_k ~ N(0, 1)`` (seeded):

        μ(x)  = (1/K) Σ_k E[h(x, z_k)]
        s²(x) = Var_h(x, ĝ_S(x)) + Var_k E[h(x, z_k)] + σ_h²

    ``Var_h`` the epistemic variance of ``h`` (posterior draws or ``V_IJ``), ``σ_h²`` its noise
    variance. For the source network ``v_S = 0`` and ``K = 1``: the target model's own
    predictive at ``z = g_S(x)``.
    """

    def _learner_data(self, X, y, g):
        loc, scale = PosteriorRegressor._label_scaling(y)
        return np.concatenate([X, ((g - loc) / scale)[:, None]], axis=1), y

    def _store(self, learner, X, y, g, sp) -> None:
        self.target_model_ = learner
        # the source prediction enters as a feature in the target's standardised label units
        # (a feature at 10⁷ would lose its last digits in the float32 network and forest)
        self.z_affine_ = PosteriorRegressor._label_scaling(y)

    def _z(self, g: np.ndarray) -> np.ndarray:
        loc, scale = self.z_affine_
        return (g - loc) / scale

    def _predict_gaussian(self, X):
        g, v_s = self._source_pred(X)
        mu0, v_h, noise = self._learner_moments(self.target_model_, np.c_[X, self._z(g)])
        if not np.any(v_s > 0):
            return mu0, np.sqrt(v_h + noise)
        e = np.random.default_rng(self.seed + 2).standard_normal(int(self.n_source_draws))
        mus = []
        for ek in e:
            z = self._z(g + np.sqrt(v_s) * ek)
            if isinstance(self.target_model_, _Forest):
                mus.append(self.target_model_.predict(np.c_[X, z]))
            else:
                mus.append(self.target_model_._means(np.c_[X, z]).mean(0))
        mus = np.asarray(mus)
        return mus.mean(0), np.sqrt(v_h + mus.var(0) + noise)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its builder, a one-line description, and whether it can use the
    labelled source rows (``source_X``/``source_y`` options)."""

    build: Callable[..., Any]
    description: str
    uses_source_data: bool = False


_NUTS_KEYS = ("num_warmup", "num_samples", "seed", "progress_bar")


def _pc(prior):
    def build(source, **options):
        if prior in ("scale", "tangent"):
            options.setdefault("transfer_layers", "all")
        options.setdefault("progress_bar", False)
        return PCTransferRegressor(_check_source(source), prior=prior, **options)

    return build


def _target_only(source, **options):
    options.setdefault("progress_bar", False)
    return BayesianNetworkRegressor(None, **options)


def _pretrained(source, **options):
    options.setdefault("progress_bar", False)
    options.setdefault("prior_scale", 1.0)
    return BayesianNetworkRegressor(_check_source(source), **options)


def _hutchinson(cls, base):
    def build(source, **options):
        return cls(source, base=base, **options)

    return build


METHODS: dict[str, MethodInfo] = {
    "source-only": MethodInfo(SourceOnlyRegressor, "the source network as it is, N(g_S(x), σ_S²)"),
    "target-only": MethodInfo(
        _target_only,
        "Bayesian network on the target alone, θ ~ N(0, (prior_scale/√fan_in)²), NUTS",
    ),
    "fine-tuning": MethodInfo(
        FineTuneRegressor, "MAP from θ_S (Adam, early stopping), residual-based interval"
    ),
    "pretrained-gaussian": MethodInfo(
        _pretrained, "every weight ~ N(θ_S, (prior_scale/√fan_in)²), NUTS"
    ),
    "bayes-last-layer": MethodInfo(
        BayesianLastLayerRegressor, "β ~ N(β_S, τ²I), τ ~ HalfNormal, body frozen, NUTS"
    ),
    "pc-last-layer": MethodInfo(_pc("last_layer"), "PC prior on the KL distance, last layer"),
    "pc-scale": MethodInfo(_pc("scale"), "PC prior on the KL distance, scale over all layers"),
    "pc-tangent": MethodInfo(
        _pc("tangent"),
        "PC prior on the KL distance, scale over all layers of the network linearised at θ_S",
    ),
}
for _arch, _cls in (
    ("multitask", MultiTaskRegressor),
    ("difference", DifferenceRegressor),
    ("latent", LatentVariableRegressor),
):
    for _base in BASES:
        METHODS[f"{_arch}-{_base}"] = MethodInfo(
            _hutchinson(_cls, _base),
            f"{_arch} architecture (Hutchinson et al. 2017), base learner {_base}",
            uses_source_data=(_arch == "multitask" or _base == "rf"),
        )


def methods() -> list[str]:
    """Names of the registered transfer-learning methods, in presentation order."""
    return list(METHODS)


def make_method(name: str, source: SourceModel, **options: Any):
    """Build the method ``name`` (see :func:`methods`) for the trained ``source``.

    ``options`` go to the estimator's constructor (e.g. ``num_warmup``, ``num_samples``,
    ``seed``; ``prior_scale`` for the Gaussian priors; ``U``, ``alpha``, ``transfer_layers`` for
    the PC priors; ``source_X``, ``source_y`` for methods that use labelled source rows). An
    unknown name raises ``ValueError`` listing the valid ones.
    """
    if name not in METHODS:
        raise ValueError(f"name must be one of {methods()}, got {name!r}")
    _check_source(source)
    return METHODS[name].build(source, **options)


# --------------------------------------------------------------------------------------------
# replicates of one setting as one compiled NUTS job
# --------------------------------------------------------------------------------------------


def supports_batching(estimator: Any) -> bool:
    """Whether :func:`fit_replicates` can sample ``estimator`` in a batched job: every method
    whose posterior is sampled by NUTS — the PC priors (both constructions), the Bayesian last
    layer, the target-only and pretrained-prior networks, and the Hutchinson architectures
    with the Bayesian-network base learner."""
    batchable = getattr(estimator, "_batchable", None)
    if batchable is None or not hasattr(estimator, "_batch_plan"):
        return False
    return bool(batchable())


def fit_replicates(
    estimators: list[Any], datasets: list[tuple[Any, Any]], *, devices: list[Any] | None = None
) -> list[Any]:
    """Fit ``estimators[r]`` on ``datasets[r] = (X_r, y_r)``; returns the fitted estimators.

    When every estimator :func:`supports_batching` and their plans share the model, the sampler
    settings (chains included) and the data shapes, all replicates and their chains are
    sampled as one compiled NUTS job (:func:`pcbtl.inference.run_plans`; compiled once per
    model and data shapes, so later batches of the same shapes reuse it) and each
    ``fit_seconds_`` is the replicate's own set-up time plus the batch time divided by ``R``;
    the batch is spread over ``devices`` (default all local devices). Otherwise they are
    fitted one by one. ``batched_`` tells which happened.
    """
    if len(estimators) != len(datasets):
        raise ValueError("estimators and datasets must have the same length")

    def one_by_one():
        for est, (X, y) in zip(estimators, datasets, strict=True):
            est.fit(X, y)
            est.batched_ = False
        return estimators

    if not estimators or not all(supports_batching(e) for e in estimators):
        return one_by_one()
    plans = [e._batch_plan(X, y) for e, (X, y) in zip(estimators, datasets, strict=True)]
    if len({plan_key(p) for p in plans}) != 1:
        return one_by_one()
    t0 = time.perf_counter()
    posts = run_plans(plans, devices=devices)
    # the second pass of ``fit`` (PCTransferRegressor, scale prior): a fit whose τ ran past the
    # grid of r(τ) is sampled again on the extended grid, as alone, so that its result does
    # not depend on whether it was fitted in a group (each fit's draws are its own plan's)
    again = {}
    for r, (est, post, plan) in enumerate(zip(estimators, posts, plans, strict=True)):
        reach = getattr(est, "_grid_reach", None)
        reach = reach(post, plan.complete.keywords["setup"]) if reach else 0.0
        if reach:
            again[r] = est._batch_plan(*datasets[r], tau_reach=reach)
    by_key: dict[tuple, list[int]] = {}
    for r, plan in again.items():
        by_key.setdefault(plan_key(plan), []).append(r)
    for rs in by_key.values():
        for r, post in zip(rs, run_plans([again[r] for r in rs], devices=devices), strict=True):
            plans[r], posts[r] = again[r], post
    share = (time.perf_counter() - t0) / len(plans)
    for est, post, plan, (X, _) in zip(estimators, posts, plans, datasets, strict=True):
        plan.complete(post, seconds=plan.setup_seconds + share)
        est._record_features(X)  # feature_names_in_ of a DataFrame, as fit() sets it
        est.batched_ = True
    return estimators
