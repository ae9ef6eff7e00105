r"""The PC transfer regressor: the target's predictive model with a penalized complexity prior on
its Kullback–Leibler distance from the source's.

The source predictive is ``p_S(y | x) = N(g_S(x), σ²)``; the target's is
``p_T(y | x, ξ) = N(g(x; ξ), σ²)`` with transfer parameters ``ξ``. Over reference inputs
``x̃ ~ Q`` (the target inputs and a sample of the source's),

.. math::

    \mathrm{KL}(ξ) = E_{x \sim Q}\, \mathrm{KL}\big(p_T(\cdot \mid x, ξ)\,\|\,p_S(\cdot \mid x)\big),
    \qquad d(ξ) = \sqrt{2\,\mathrm{KL}(ξ)} = \frac{\operatorname{RMS}_x\big(g(x; ξ) − g_S(x)\big)}{σ},

    d \sim \operatorname{Exp}(λ), \qquad λ = −\log(α) / U,

so the user states ``P(d > U) = α``: how many noise sds the target's mean function may move from
the source's (Simpson et al. 2017 for PC priors; Abba, Williams & Reich 2023 for the KL-distance
prior on a predictive model). The prior on ``ξ`` is the push-forward that makes ``d ~ Exp(λ)``
exactly; :class:`PCTransferRegressor` offers three constructions:

* ``prior="last_layer"`` — body frozen, head ``β`` with ``G = Φ̃ᵀΦ̃/m`` and ``d = \sqrt{δᵀGδ}/σ``,
  ``δ = β − β_S``, uniform in direction on the ``G``-ellipsoid (:class:`pcbtl.priors.LastLayerPC`);
* ``prior="scale"`` — ``θ = θ_S + τ s⊙ε`` over a transfer set of layers, ``ε ~ N(0, I)``,
  ``d = r(τ)/σ`` with ``r(τ)² = E_ε E_x (g(x; θ) − g_S(x))²`` by Monte Carlo and
  ``π(τ | σ) = λ e^{−λ r(τ)/σ} r′(τ)/σ`` (:class:`pcbtl.priors.ScalePC`);
* ``prior="tangent"`` — the scale construction on the network linearised at ``θ_S``,
  ``g(x) = g_S(x) + τ J_s(x) ε``, where ``r(τ) = κτ`` exactly and ``ε`` integrates out
  (:mod:`pcbtl.tangent`).

The fitted estimator reports ``distance_`` (posterior draws of ``d``), ``shift_`` (the realised RMS
shift of the fitted mean over the reference inputs, in noise sds) and warns
(:class:`pcbtl.priors.PriorDataConflictWarning`) when the posterior puts ``d`` beyond the prior's
0.999 quantile.

Example
-------
>>> import pcbtl
>>> task = pcbtl.make_synthetic_task(n_source=2000, n_target=100, seed=0)
>>> source = pcbtl.train_source(task.X_source, task.y_source)  # doctest: +SKIP
>>> model = pcbtl.PCTransferRegressor(source, prior="tangent").fit(task.X_target, task.y_target)  # doctest: +SKIP
>>> lower, upper = model.predict_interval(task.X_test)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Predictive, init_to_median

from pcbtl._validation import (
    check_integer,
    check_positive,
    check_X,
    check_Xy,
)
from pcbtl.estimators.base import (
    PosteriorRegressor,
    _architecture,
    _batched_apply,
    _check_choice,
    _subsample,
    _with_bias,
)
from pcbtl.inference import (
    BatchPlan,
    Posterior,
    concatenate_chains,
    require_finite,
    run_mclmc,
    run_plans,
    run_svi,
)
from pcbtl.interweave import Interweave
from pcbtl.kl import default_tau_grid, distance_curve
from pcbtl.models import (
    last_layer_pc_model,
    last_layer_sufficient_stats,
    scale_pc_model,
    tangent_pc_model,
)
from pcbtl.networks import (
    SourceModel,
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
    ensemble_parametrization,
    tangent_conditional_eps,
    tangent_jacobian,
    tangent_kappa,
    tangent_means,
    tangent_stats,
)

PRIORS = ("last_layer", "scale", "tangent")


INFERENCES = ("nuts", "mclmc", "svi")


PARAMETRIZATIONS = ("auto", "noncentred", "centred", "interweaved")


#: the centred scale model as one function object (batched samplers are cached per model)
_scale_pc_model_centred = partial(scale_pc_model, centred=True)


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
        ``"last_layer"`` — body frozen, head ``β`` with the exact sphere prior (:class:`pcbtl.priors.LastLayerPC`);
        ``"scale"`` — ``θ = θ_S + τ s⊙ε`` on ``transfer_layers`` with the prior on ``τ`` through
        the Monte Carlo distance curve ``r(τ)`` (:class:`pcbtl.priors.ScalePC`);
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
        require_finite(posterior, "sigma", "distance")
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
