r"""The three transfer architectures of Hutchinson et al. (2017), each with two base learners.

* :class:`MultiTaskRegressor` — one model of source and target labels with the task as an
  input: ``y = f(x, t)``, ``t ∈ {source, target}``, fitted on both label sets.
* :class:`DifferenceRegressor` — the target as the source prediction plus a learned
  correction: ``y = g_S(x) + h(x)``, ``h`` fitted to ``y − g_S(x)`` on the target rows.
* :class:`LatentVariableRegressor` — the source prediction as an extra input of the target
  model: ``y = h(x, g_S(x))``.

The base learner ``base="bnn"`` is the package's Bayesian network
(:class:`pcbtl.estimators.baselines.BayesianNetworkRegressor`, NUTS) and ``base="rf"`` a
scikit-learn random forest with the infinitesimal-jackknife variance of the forest mean (Wager,
Hastie & Efron 2014; ``forestci``), so every architecture returns a predictive distribution. How
each propagates the source model's own uncertainty is in its class docstring.
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_sample
from scipy.stats import norm

from pcbtl._validation import (
    check_positive,
    check_probability,
    check_X,
    check_Xy,
    check_y,
)
from pcbtl.estimators.base import (
    PosteriorRegressor,
    _batched_apply,
    _without_compiled,
)
from pcbtl.estimators.baselines import (
    BayesianNetworkRegressor,
    GaussianPredictive,
    _check_base,
    _check_int,
    _check_source,
    _fit_forest,
    _Forest,
    _fresh_network,
    _source_rows,
)
from pcbtl.inference import (
    BatchPlan,
    Posterior,
    require_finite,
    run_plans,
)
from pcbtl.models import multitask_bnn_model
from pcbtl.networks import SourceModel, transfer_parametrization


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
            require_finite(posterior, "sigma")
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
