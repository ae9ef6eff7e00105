r"""The baselines users compare the PC prior against, as scikit-learn regressors.

* :class:`SourceOnlyRegressor` — the source network as it is: ``y ~ N(g_S(x), σ_S²)``.
* :class:`BayesianNetworkRegressor` — a Bayesian network with Normal priors on every weight,
  ``θ_j ~ N(m_j, (s/\sqrt{\mathrm{fan\_in}_j})^2)``, with ``m = 0`` (target-only) or
  ``m = θ_S`` (the pretrained Gaussian prior centred on the source), ``σ ~ HalfNormal``, NUTS.
* :class:`FineTuneRegressor` — the MAP from ``θ_S`` (Adam, early stopping on a validation
  split), with a residual-based Gaussian interval.
* :class:`BayesianLastLayerRegressor` — the source body frozen, the last layer
  ``β ~ N(β_S, τ² I)`` with ``τ ~ HalfNormal``, NUTS on the Gaussian sufficient statistics.

Gaussian-predictive methods (:class:`GaussianPredictive`) return ``N(μ(x), s(x)²)`` and the
central interval ``μ ± z_{(1+level)/2} s``; posterior-draw methods
(:class:`pcbtl.estimators.base.PosteriorRegressor`) give the exact quantiles of their Gaussian
mixture. Every method is also reachable by name through :func:`pcbtl.make_method`.
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
import optax
from numpyro.infer import init_to_median, init_to_sample
from scipy.stats import norm

from pcbtl._validation import (
    check_hidden,
    check_positive,
    check_probability,
    check_X,
    check_Xy,
)
from pcbtl.estimators.base import (
    PosteriorRegressor,
    RegressorBase,
    _architecture,
    _batched_apply,
    _with_bias,
)
from pcbtl.inference import (
    BatchPlan,
    Posterior,
    require_finite,
)
from pcbtl.models import (
    bayes_last_layer_model,
    bnn_model,
    last_layer_sufficient_stats,
)
from pcbtl.networks import (
    MLP,
    SourceModel,
    transfer_parametrization,
)

BASES = ("bnn", "rf")


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
    :class:`pcbtl.estimators.base.RegressorBase`): subclasses implement ``_predict_gaussian(X) -> (μ, s)``
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
        require_finite(posterior, "sigma")
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
        require_finite(posterior, "sigma")
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
