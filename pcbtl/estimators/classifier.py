r"""The scikit-learn PC transfer classifier.

:class:`PCTransferClassifier` fits a target classification task with the PC prior on the KL
distance from a :class:`pcbtl.classification.SourceClassifier` (:mod:`pcbtl.classification.priors`), sampling
the posterior with NUTS across chains (:func:`pcbtl.inference.run_plans`), and predicts with the
posterior mean of the class probabilities,

.. math::

    \hat p(y = c_k \mid x) = \frac1S \sum_{s=1}^S \mathrm{softmax}(g_s(x))_k

over the ``S`` posterior draws ``g_s`` of the target network.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_uniform
from sklearn.base import BaseEstimator, ClassifierMixin

from pcbtl._validation import check_integer, check_X
from pcbtl.classification.models import (
    head_pc_classifier_model,
    head_pc_classifier_model_length,
    scale_pc_classifier_model,
)
from pcbtl.classification.priors import (
    ClassifierScalePC,
    RayLength,
    classifier_kl,
    fit_classifier_curve,
    head_prior,
    ray_direction,
    ray_limit,
    sample_head_prior,
    warn_if_bounded,
)
from pcbtl.classification.source import (
    SourceClassifier,
    check_labels,
    logit_parametrization,
    split_logit_trunk,
)
from pcbtl.estimators.base import EstimatorCore
from pcbtl.inference import (
    MCMC_METHODS,
    BatchPlan,
    Posterior,
    check_sampler,
    require_finite,
    resolve_chain_method,
    run_plans,
    sampler_diagnostics,
    to_inference_data,
)
from pcbtl.networks import resolve_transfer_layers
from pcbtl.priors import distance_curve_inverse, distance_curve_value, pc_rate

__all__ = ["PCTransferClassifier"]

PRIORS = ("last_layer", "scale")
CHAIN_METHODS = ("auto", "vectorized", "sequential")
PARAMETRIZATIONS = ("length", "noncentred")


def _apply_draws(predict_fn, thetas, X):
    return jax.lax.map(lambda th: predict_fn(th, X), thetas, batch_size=64)


_apply_draws_jit = jax.jit(_apply_draws)


@partial(jax.jit, static_argnames="n")
def _head_limits(key, prior, n):
    """``d_max`` of ``n`` random directions of the head prior."""
    z = jax.random.normal(key, (n, prior.chol.shape[0]))
    return jax.vmap(
        lambda zz: ray_limit(
            ray_direction(zz, prior.chol, prior.contrasts), prior.Phi_ref, prior.logits_ref
        )
    )(z)


@jax.jit
def _head_distances(beta, prior):
    """``d = sqrt(2 mean_x KL)`` of heads ``beta`` ``(n, p, n_out)``, from their predictions."""
    base = prior.logits_ref
    return jax.vmap(lambda b: jnp.sqrt(2.0 * jnp.mean(classifier_kl(prior.Phi_ref @ b, base))))(
        beta
    )


def init_near_source(site: dict | None = None, low: float = 0.1, high: float = 1.0) -> Any:
    """NumPyro init strategy of the PC classifiers: start at a distance ``d₀ ~ U(low, high)/λ``
    from the source — the length ``t = d₀`` (``d ≈ t`` near the source head), ``τ = r̂^{−1}(d₀)``,
    or the non-centred ``e = λ d₀ ~ U(low, high)`` — and every other site uniform in
    ``(−2, 2)`` unconstrained (``init_to_uniform``). Each chain gets its own draw.

    Why not ``init_to_median``: it draws 15 prior samples per site *eagerly* (outside ``jit``)
    to take their median, which for these priors means running the ray solver or the inverse
    of ``r̂`` op by op: measured on a loaded 2-core machine, 25 s (head) and 13 s (scale) per
    fit, against 0.6 s here.
    """
    if site is None:
        return partial(init_near_source, low=low, high=high)
    if site["type"] != "sample" or site["is_observed"]:
        return init_to_uniform(site, radius=2)
    fn = site["fn"]
    rng_key = site["kwargs"].get("rng_key")
    shape = site["kwargs"].get("sample_shape") + fn.batch_shape
    if isinstance(fn, RayLength | ClassifierScalePC):
        d0 = jax.random.uniform(rng_key, shape, minval=low, maxval=high) / fn.rate
        if isinstance(fn, RayLength):
            return d0
        return distance_curve_inverse(fn.curve, d0)
    if site["name"] == "distance_std":
        return jax.random.uniform(rng_key, shape, minval=low, maxval=high)
    return init_to_uniform(site, radius=2)


def _softmax_np(outputs: np.ndarray) -> np.ndarray:
    """Class probabilities of network outputs (``[0, g]`` for one unit), float64."""
    z = np.asarray(outputs, np.float64)
    if z.shape[-1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=-1)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _subsample(X: np.ndarray, n: int, seed: int) -> np.ndarray:
    if X.shape[0] <= n:
        return X
    keep = np.sort(np.random.default_rng(seed).choice(X.shape[0], n, replace=False))
    return X[keep]


class PCTransferClassifier(EstimatorCore, ClassifierMixin, BaseEstimator):
    r"""Bayesian transfer learning for classification with the PC prior on the KL distance.

    The target predictive ``Cat(softmax(g_T(x)))`` may move from the source's
    ``Cat(softmax(g_S(x)))`` (``Bernoulli(σ(·))`` for two classes) by

    .. math::

        d = \sqrt{2\, E_{x\sim Q}\, \mathrm{KL}(p_T(\cdot\mid x)\,\|\,p_S(\cdot\mid x))},
        \qquad d \sim \mathrm{Exp}(λ),\quad λ = -\log(\texttt{alpha})/\texttt{U},

    so that ``P(d > U) = alpha`` (Simpson et al. 2017; Abba, Williams & Reich 2023), with no
    noise scale. The classifier's KL is bounded (no target is further from the source than
    ``sqrt(2 E_x max_k −log p_S(c_k|x))``), so the exponential is truncated at the largest
    reachable distance: ``prior_tail_`` reports the achieved ``P(d > U)`` and a
    :class:`pcbtl.classification.priors.BoundedDistanceWarning` is raised when it is below
    ``alpha/2`` (state a smaller ``U`` then).

    A scikit-learn classifier: the parameters are stored as given and checked by ``fit`` (a
    ``ValueError`` naming the parameter), so ``clone``, ``get_params``/``set_params`` and
    ``GridSearchCV`` work; ``score`` is the accuracy; an unfitted ``predict`` raises
    :class:`sklearn.exceptions.NotFittedError`.

    Labels. ``y`` may hold any labels (strings, ints, bools, floats). ``classes_`` are its
    sorted distinct values, and they are matched to the source's classes **by position**: the
    ``k``-th smallest target label is the source's class ``k`` (``source.classes[k]``),
    whatever the two are called. ``y`` must therefore hold exactly as many classes as the
    source (a ``ValueError`` otherwise); relabel the target first if its sort order differs
    from the source's.

    Parameters
    ----------
    source:
        The trained :class:`pcbtl.classification.SourceClassifier` (the PC prior's base model).
    prior:
        ``"last_layer"`` (default) — body frozen, head ``B`` (bias included, one column per
        output unit) along a direction uniform on the Fisher sphere, with the exact density of
        its length along the ray (:func:`pcbtl.classification.models.head_pc_classifier_model_length`,
        or :func:`pcbtl.classification.models.head_pc_classifier_model`, see
        ``parametrization``); ``"scale"`` —
        ``θ = θ_S + τ s⊙ε`` on ``transfer_layers`` with the Monte Carlo distance curve ``r(τ)``
        (:func:`pcbtl.classification.models.scale_pc_classifier_model`).
    transfer_layers:
        ``prior="scale"``: ``"all"`` (``None``, default), ``"last"``, an int ``k`` (the last
        ``k`` layers) or layer names. Must be ``None``/``"last"``/``"output"`` for
        ``"last_layer"``.
    U, alpha:
        The PC statement ``P(d > U) = alpha`` (defaults 1 and 0.05).
    reference_X:
        Reference inputs ``x̃ ~ Q``. ``None``: the target inputs plus ``source.reference_X``.
        At most ``max_reference`` rows are used (a seeded random subset).
    num_warmup, num_samples, num_chains, chain_method, seed, target_accept_prob, max_tree_depth:
        NUTS settings (``chain_method``: ``"auto"`` — sequential on a CPU, vectorised on an
        accelerator —, ``"vectorized"`` or ``"sequential"``).
    progress_bar:
        Show the sampler's progress bar.
    n_eps, n_tau:
        Scale prior: ``ε`` draws and grid size of the Monte Carlo ``r(τ)``
        (:func:`pcbtl.classification.priors.fit_classifier_curve`); ``curve_rel_se_`` reports
        the Monte Carlo error of ``r``.
    max_reference:
        Most reference rows used by the prior (the head prior evaluates all of them at every
        NUTS step).
    scale:
        Scale prior: per-parameter scale ``s``, ``"fan_in"`` (``1/sqrt(fan_in)``) or ``"unit"``.
    rel_ridge:
        Last-layer prior: relative ridge of the Fisher metric when it is near-singular
        (:func:`pcbtl.classification.priors.fisher_metric`).
    parametrization:
        Last-layer prior: ``"length"`` (default) samples the direction non-centred and
        ``log t`` from its closed-form density
        (:func:`pcbtl.classification.models.head_pc_classifier_model_length`);
        ``"noncentred"`` samples ``(z, e)`` and solves ``d(t, u) = d`` for ``t``
        (:func:`pcbtl.classification.models.head_pc_classifier_model`). The same prior;
        measured on a 40-row binary task, the non-centred form diverged on 8 of 300
        transitions (its ``e`` tail maps to ``t`` growing like ``exp(c·e)``), the default on
        none (:func:`pcbtl.classification.priors.ray_length`).

    Fitted attributes: ``classes_``, ``n_features_in_``, ``posterior_``, ``idata_`` (groups
    posterior, sample_stats, log_likelihood, posterior_predictive and observed_data — labels in
    the last three are class indices into ``classes_`` — and prior: one chain of ``d``, and
    ``τ`` for the scale prior, drawn without data, for prior–posterior plots such as
    ``az.plot_dist_comparison(clf.idata_, var_names=["distance"])``), ``distance_`` (posterior draws of
    ``d``), ``rate_``, ``prior_tail_``, ``reference_size_``, ``num_divergences_``,
    ``fit_seconds_``, ``prior_seconds_``, ``sampler_diagnostics_``; ``ridge_`` and ``beta_``
    (last layer) or ``curve_``, ``curve_rel_se_`` and ``transfer_layers_`` (scale).

    Example
    -------
    >>> clf = PCTransferClassifier(source, num_warmup=200, num_samples=200)  # doctest: +SKIP
    >>> clf.fit(X_target, y_target).predict_proba(X_test)  # doctest: +SKIP
    """

    def __init__(
        self,
        source: SourceClassifier,
        *,
        prior: str = "last_layer",
        transfer_layers: Any = None,
        U: float = 1.0,
        alpha: float = 0.05,
        reference_X: Any = None,
        num_warmup: int = 500,
        num_samples: int = 500,
        num_chains: int = 4,
        chain_method: str = "auto",
        seed: int = 0,
        progress_bar: bool = True,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        n_eps: int = 128,
        n_tau: int = 64,
        max_reference: int = 4000,
        scale: str = "fan_in",
        rel_ridge: float = 1e-4,
        parametrization: str = "length",
    ) -> None:
        self.source = source
        self.prior = prior
        self.transfer_layers = transfer_layers
        self.U = U
        self.alpha = alpha
        self.reference_X = reference_X
        self.num_warmup = num_warmup
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.chain_method = chain_method
        self.seed = seed
        self.progress_bar = progress_bar
        self.target_accept_prob = target_accept_prob
        self.max_tree_depth = max_tree_depth
        self.n_eps = n_eps
        self.n_tau = n_tau
        self.max_reference = max_reference
        self.scale = scale
        self.rel_ridge = rel_ridge
        self.parametrization = parametrization

    # ---- scikit-learn plumbing -------------------------------------------------------------
    _FITTED_ATTRIBUTE = "posterior_"

    # ---- parameters ------------------------------------------------------------------------
    def _check_params(self) -> None:
        """Check every parameter; a ``ValueError`` names the first bad one."""
        if not isinstance(self.source, SourceClassifier):
            raise ValueError(
                f"source must be a pcbtl SourceClassifier, got {type(self.source).__name__}"
            )
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        pc_rate(self.U, self.alpha)  # names U or alpha
        if self.prior == "last_layer":
            if not (
                self.transfer_layers is None
                or (
                    isinstance(self.transfer_layers, str)
                    and self.transfer_layers in ("last", "output")
                )
                or (
                    isinstance(self.transfer_layers, list | tuple)
                    and list(self.transfer_layers) == ["output"]
                )
            ):
                raise ValueError(
                    "transfer_layers must be None or 'last' with prior='last_layer' (use "
                    f"prior='scale' for other layers), got {self.transfer_layers!r}"
                )
        else:
            resolve_transfer_layers(self.source, self._layers_arg())
        check_integer(self.num_warmup, "num_warmup", minimum=0)
        check_integer(self.num_samples, "num_samples", minimum=1)
        check_integer(self.num_chains, "num_chains", minimum=1)
        check_integer(self.seed, "seed", minimum=0)
        check_integer(self.n_eps, "n_eps", minimum=2)
        check_integer(self.n_tau, "n_tau", minimum=4)
        check_integer(self.max_reference, "max_reference", minimum=1)
        depth = check_integer(self.max_tree_depth, "max_tree_depth", minimum=1)
        if depth > 15:
            raise ValueError(f"max_tree_depth must be between 1 and 15, got {depth}")
        if self.chain_method not in CHAIN_METHODS:
            raise ValueError(
                f"chain_method must be one of {CHAIN_METHODS}, got {self.chain_method!r}"
            )
        tap = self.target_accept_prob
        if isinstance(tap, bool) or not isinstance(tap, int | float) or not 0.0 < tap < 1.0:
            raise ValueError(f"target_accept_prob must lie strictly between 0 and 1, got {tap!r}")
        if self.scale not in ("fan_in", "unit"):
            raise ValueError(f"scale must be 'fan_in' or 'unit', got {self.scale!r}")
        rr = self.rel_ridge
        if isinstance(rr, bool) or not isinstance(rr, int | float) or not 0.0 < rr < 1.0:
            raise ValueError(f"rel_ridge must lie strictly between 0 and 1, got {rr!r}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}"
            )
        if not isinstance(self.progress_bar, bool | np.bool_):
            raise ValueError(f"progress_bar must be a bool, got {self.progress_bar!r}")

    def _layers_arg(self) -> Any:
        return "all" if self.transfer_layers is None else self.transfer_layers

    def _check_data(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(X, classes, y as class indices)``, checked against the source."""
        X = check_X(X, "X", n_features=self.source.n_features, min_rows=2)
        y = check_labels(y, "y")
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                f"X and y have mismatched lengths: {X.shape[0]} rows vs {y.shape[0]} labels"
            )
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.size != self.source.n_classes:
            raise ValueError(
                f"y holds {classes.size} classes but the source classifier has "
                f"{self.source.n_classes} ({self.source.classes.tolist()}); target classes are "
                "matched to the source's by position, so y must hold all of them"
            )
        return X, classes, y_idx

    def _reference(self, X: np.ndarray | None) -> np.ndarray:
        nf = self.source.n_features
        if self.reference_X is not None:
            Xref = check_X(self.reference_X, "reference_X", n_features=nf)
        else:
            parts = [np.asarray(self.source.reference_X, np.float64)]
            if X is not None:
                parts.insert(0, X)
            Xref = np.concatenate(parts, axis=0)
            if Xref.shape[0] == 0:
                raise ValueError(
                    "no reference inputs: the source keeps none (n_reference=0) and no target "
                    "X or reference_X was given"
                )
        return _subsample(Xref, int(self.max_reference), int(self.seed)).astype(np.float32)

    # ---- the prior -------------------------------------------------------------------------
    def _setup(self, X: np.ndarray | None) -> dict[str, Any]:
        """Reference inputs and the prior's precomputed parts (Fisher metric or ``r(τ)``)."""
        t0 = time.perf_counter()
        rate = pc_rate(self.U, self.alpha)
        Xref = self._reference(X)
        setup: dict[str, Any] = {"rate": rate, "Xref": Xref}
        if self.prior == "last_layer":
            prior, ridge = head_prior(self.source, Xref, rel_ridge=float(self.rel_ridge))
            d_max = np.asarray(_head_limits(jax.random.PRNGKey(int(self.seed) + 17), prior, 1024))
            setup.update(head=prior, ridge=ridge, d_max=d_max)
        else:
            lp = logit_parametrization(self.source, self._layers_arg(), scale=self.scale)
            curve, rel_se = fit_classifier_curve(
                lp.predict_fn,
                lp.theta_source,
                lp.scales,
                jnp.asarray(Xref),
                rate,
                n_tau=int(self.n_tau),
                n_eps=int(self.n_eps),
                seed=int(self.seed),
            )
            setup.update(lp=lp, curve=curve, curve_rel_se=rel_se, d_max=np.asarray(curve.r[-1:]))
        setup["seconds"] = time.perf_counter() - t0
        return setup

    def _model_kwargs(self, setup: dict[str, Any], X=None, Y=None) -> dict[str, Any]:
        if self.prior == "last_layer":
            Phi = None
            if X is not None:
                feats = self.source.features(X)
                Phi = jnp.asarray(np.c_[feats, np.ones(feats.shape[0])], jnp.float32)
            return {"prior": setup["head"], "rate": setup["rate"], "Phi": Phi, "Y": Y}
        lp = setup["lp"]
        predict_fn, inputs = lp.predict_fn, None if X is None else jnp.asarray(X, jnp.float32)
        split = split_logit_trunk(self.source, lp)
        if split is not None and inputs is not None:
            trunk, predict_fn = split
            inputs = trunk(inputs)
        return {
            "predict_fn": predict_fn,
            "theta_source": lp.theta_source,
            "scales": lp.scales,
            "curve": setup["curve"],
            "rate": setup["rate"],
            "X": inputs,
            "Y": Y,
        }

    def _model(self):
        if self.prior == "scale":
            return scale_pc_classifier_model
        if self.parametrization == "noncentred":
            return head_pc_classifier_model
        return head_pc_classifier_model_length

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> PCTransferClassifier:
        """Sample the posterior of the transfer model given target data ``(X, y)``.

        ``num_chains`` NUTS chains run in one compiled job (:func:`pcbtl.inference.run_plans`);
        the sampler is judged across chains (:func:`pcbtl.inference.check_sampler`, which warns
        on chains that disagree, too few effective draws or many divergences). Nothing is
        stored unless the whole fit succeeds. Returns ``self``.
        """
        t0 = time.perf_counter()
        plan = self._batch_plan(X, y)
        posterior = run_plans([plan], progress_bar=bool(self.progress_bar))[0]
        plan.complete(posterior, seconds=time.perf_counter() - t0)
        self._record_features(X)
        return self

    def _batchable(self) -> bool:
        """Fits of the same prior, source architecture and data shapes can be sampled as one
        vmapped job (:func:`pcbtl.estimators.registry.fit_replicates`)."""
        return True

    def _batch_plan(self, X: Any, y: Any) -> BatchPlan:
        """The fit as a :class:`pcbtl.inference.BatchPlan` (model, arguments, settings and the
        completion that stores the fit)."""
        t0 = time.perf_counter()
        self._check_params()
        X, classes, y_idx = self._check_data(X, y)
        setup = self._setup(X)
        Y = jnp.asarray(np.eye(classes.size, dtype=np.float32)[y_idx])
        tail = warn_if_bounded(
            setup["rate"], float(self.U), float(self.alpha), setup["d_max"], stacklevel=4
        )
        setup["prior_tail"] = tail
        return BatchPlan(
            model=self._model(),
            kwargs=self._model_kwargs(setup, X, Y),
            complete=partial(self._complete, X=X, y_idx=y_idx, classes=classes, setup=setup),
            num_warmup=int(self.num_warmup),
            num_samples=int(self.num_samples),
            seed=int(self.seed),
            target_accept_prob=float(self.target_accept_prob),
            max_tree_depth=int(self.max_tree_depth),
            init_strategy=init_near_source(),
            setup_seconds=time.perf_counter() - t0,
            num_chains=int(self.num_chains),
            chain_method=resolve_chain_method(self.chain_method),
        )

    def _complete(
        self,
        posterior: Posterior,
        X: np.ndarray,
        y_idx: np.ndarray,
        classes: np.ndarray,
        setup: dict[str, Any],
        seconds: float,
    ) -> PCTransferClassifier:
        """Judge the draws, build the ArviZ groups and store the fit (the tail of ``fit``)."""
        require_finite(posterior, "distance")
        d = np.asarray(posterior.samples["distance"])
        chains, draws = d.shape[:2]
        Xd = _subsample(setup["Xref"], 256, int(self.seed))
        pd = self._draw_probs(posterior, Xd, setup)  # (S, m, K)
        cols = pd[:, :, 1:] if pd.shape[2] == 2 else pd
        posterior.diagnostics = check_sampler(
            posterior,
            int(self.max_tree_depth),
            predictions=cols.reshape(chains, draws, -1),
            stacklevel=5,
        )
        probs = self._draw_probs(posterior, X, setup)  # (S, n, K)
        n = X.shape[0]
        rows = np.arange(n)
        loglik = np.log(np.maximum(probs[:, rows, y_idx], 1e-300)).astype(np.float32)
        rng = np.random.default_rng(int(self.seed))
        u = rng.random(probs.shape[:2])
        pp = np.minimum((np.cumsum(probs, axis=2) < u[..., None]).sum(axis=2), probs.shape[2] - 1)
        shape = (chains, draws, n)
        samples = {k: v for k, v in posterior.samples.items() if k not in ("z", "eps")}
        self.idata_ = to_inference_data(
            Posterior(
                samples=samples, sample_stats=posterior.sample_stats, method=posterior.method
            ),
            log_likelihood=loglik.reshape(shape),
            posterior_predictive=pp.reshape(shape).astype(np.int64),
            observed=y_idx.astype(np.int64),
            # d (and τ) under the prior, one chain of as many draws: for prior-posterior plots
            prior={
                k: v[None] for k, v in self._prior_draws(setup, draws, int(self.seed) + 1).items()
            },
            attrs={
                "pcbtl_prior": self.prior,
                "U": float(self.U),
                "alpha": float(self.alpha),
                "classes": repr(classes.tolist()),
            },
        )
        self._state = setup
        self.classes_ = classes
        self.distance_ = posterior.flat("distance").astype(np.float64)
        self.rate_ = float(setup["rate"])
        self.prior_tail_ = float(setup["prior_tail"])
        self.reference_size_ = int(setup["Xref"].shape[0])
        self.prior_seconds_ = float(setup["seconds"])
        self.num_divergences_ = posterior.num_divergences
        if self.prior == "last_layer":
            self.ridge_ = float(setup["ridge"])
        else:
            self.curve_ = setup["curve"]
            self.curve_rel_se_ = float(setup["curve_rel_se"])
            self.transfer_layers_ = setup["lp"].layers
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = float(seconds)
        self.posterior_ = posterior
        return self

    # ---- predictions -----------------------------------------------------------------------
    def _draw_probs(
        self, posterior: Posterior, X: np.ndarray, setup: dict[str, Any], chunk: int = 2048
    ) -> np.ndarray:
        """Class probabilities of every posterior draw at ``X``: ``(S, n, K)`` float64."""
        out = []
        for start in range(0, X.shape[0], chunk):
            Xc = X[start : start + chunk]
            if self.prior == "last_layer":
                feats = self.source.features(Xc)
                Phi = np.c_[feats, np.ones(feats.shape[0])]
                beta = posterior.flat("beta").astype(np.float64)  # (S, p, n_out)
                outputs = np.einsum("np,spk->snk", Phi, beta)
            else:
                lp = setup["lp"]
                thetas = jnp.asarray(
                    lp.theta_source
                    + posterior.flat("tau")[:, None] * lp.scales * posterior.flat("eps")
                )
                outputs = np.asarray(
                    _apply_draws_jit(lp.predict_fn, thetas, jnp.asarray(Xc, jnp.float32)),
                    np.float64,
                )
            out.append(_softmax_np(outputs))
        return np.concatenate(out, axis=1)

    # ---- pickling: the scale prior's network function is rebuilt, not stored ---------------
    def _portable_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The fit state without the scale prior's :class:`pcbtl.networks.NetworkFn` (a closure
        of a cached factory, which pickle cannot store): ``"lp"`` keeps only its layer names
        (a plain tuple), in its place."""
        setup = state.get("_state")
        if isinstance(setup, dict) and "lp" in setup:
            state["_state"] = {k: (tuple(v.layers) if k == "lp" else v) for k, v in setup.items()}
        return super()._portable_state(state)

    def _restore_state(self) -> None:
        setup = getattr(self, "_state", None)
        if isinstance(setup, dict) and type(setup.get("lp")) is tuple:
            lp = logit_parametrization(self.source, list(setup["lp"]), scale=self.scale)
            self._state = {k: (lp if k == "lp" else v) for k, v in setup.items()}

    def predict_proba(self, X: Any) -> np.ndarray:
        """Posterior mean of the class probabilities, ``(n, K)``, columns as ``classes_``."""
        X = self._check_input(X)
        return self._draw_probs(self.posterior_, X, self._state).mean(axis=0)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log`` of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The class of largest posterior mean probability, as a label of ``classes_``."""
        self._check_fitted()
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    @property
    def sampler_diagnostics_(self) -> dict[str, Any]:
        """MCMC health across chains (:func:`pcbtl.inference.sampler_diagnostics`), with the
        predicted probabilities at up to 256 reference inputs."""
        self._check_fitted()
        if self.posterior_.method not in MCMC_METHODS:
            return {}
        if self.posterior_.diagnostics is None:
            self.posterior_.diagnostics = sampler_diagnostics(
                self.posterior_, int(self.max_tree_depth)
            )
        return dict(self.posterior_.diagnostics)

    @property
    def beta_(self) -> np.ndarray:
        """Posterior draws of the head ``B`` ``(S, p, n_out)`` (``prior="last_layer"``)."""
        self._check_fitted()
        if self.prior != "last_layer":
            raise AttributeError("beta_ exists only for prior='last_layer'")
        return self.posterior_.flat("beta").astype(np.float64)

    # ---- the prior -------------------------------------------------------------------------
    def prior_distance_samples(self, n: int = 1000, seed: int = 0) -> np.ndarray:
        """``n`` draws of ``d`` under the prior (needs the reference inputs only, not ``y``).

        Last layer: heads ``B`` are drawn non-centred
        (:func:`pcbtl.classification.priors.sample_head_prior`) and ``d`` is recomputed from
        their predictions on the reference inputs, ``sqrt(2 mean_x KL(p_B ‖ p_S))``, not taken
        from the draw. Scale: ``τ`` is drawn by inverting ``r̂`` and ``d = r̂(τ)``. Before
        ``fit`` the reference inputs are ``reference_X`` or the source's.
        """
        n = check_integer(n, "n", minimum=1)
        seed = check_integer(seed, "seed", minimum=0)
        self._check_params()
        setup = self._state if self.__sklearn_is_fitted__() else self._setup(None)
        return self._prior_draws(setup, n, seed)["distance"]

    def _prior_draws(self, setup: dict[str, Any], n: int, seed: int) -> dict[str, np.ndarray]:
        """``n`` prior draws of ``d`` (and of ``τ`` for the scale prior), as
        :meth:`prior_distance_samples` describes."""
        key = jax.random.PRNGKey(seed)
        if self.prior == "last_layer":
            draws = sample_head_prior(key, setup["head"], setup["rate"], n)
            d = _head_distances(draws["beta"], setup["head"])
            return {"distance": np.asarray(d, np.float64)}
        tau = ClassifierScalePC(setup["curve"], setup["rate"]).sample(key, (n,))
        return {
            "distance": np.asarray(distance_curve_value(setup["curve"], tau), np.float64),
            "tau": np.asarray(tau, np.float64),
        }
