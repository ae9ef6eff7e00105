"""Transfer-learning methods: one table-driven interface test, and one test per architecture."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import numpy as np
import pytest
from tiny_methods import TINY_NUTS, tiny_options

import pcbtl
from pcbtl.estimators.baselines import BayesianLastLayerRegressor
from pcbtl.estimators.registry import fit_replicates, make_method, methods, supports_batching
from pcbtl.inference import idata_group

EXPECTED = [
    "source-only",
    "target-only",
    "fine-tuning",
    "pretrained-gaussian",
    "bayes-last-layer",
    "pc-last-layer",
    "pc-scale",
    "pc-tangent",
    "multitask-bnn",
    "multitask-rf",
    "difference-bnn",
    "difference-rf",
    "latent-bnn",
    "latent-rf",
]

NUTS = TINY_NUTS
# tiny fits: the interface is under test here, not the statistics (their sampler warnings, of
# divergences after 40 warm-up steps, are silenced where they are used)
OPTIONS = tiny_options(NUTS)


def _seeded(name, seed):
    return {} if name == "source-only" else {"seed": seed}


_FITS: dict[str, object] = {}


def _reference_fit(name, task, source):
    """The method fitted once per test process (tiny options, seed 5, the first 40 target
    rows), shared by the interface and the equivariance tests (each fit costs its own
    compilation; the tests only read it)."""
    if name not in _FITS:
        est = make_method(name, source, **OPTIONS[name], **_seeded(name, 5))
        _FITS[name] = est.fit(task.X_target[:40], task.y_target[:40])
    return _FITS[name]


def test_methods_lists_every_method():
    assert methods() == EXPECTED
    assert pcbtl.methods() == EXPECTED
    assert set(OPTIONS) == set(EXPECTED)


def test_make_method_rejects_unknown_names_and_bad_sources(source):
    with pytest.raises(ValueError, match="name must be one of"):
        make_method("transfer-magic", source)
    with pytest.raises(ValueError, match="source"):
        make_method("pc-last-layer", "not a model")


@pytest.mark.filterwarnings("ignore::pcbtl.inference.SamplerWarning")
@pytest.mark.parametrize("name", EXPECTED)
def test_every_method_shares_the_estimator_interface(name, task, source):
    X, y = task.X_target[:40], task.y_target[:40]
    Xt = task.X_test[:50]
    with pytest.raises((RuntimeError, AttributeError)):
        make_method(name, source, **OPTIONS[name]).predict(Xt)  # not fitted yet
    est = _reference_fit(name, task, source)
    mu, sd = est.predict(Xt, return_std=True)
    assert mu.shape == (50,) and sd.shape == (50,)
    assert np.all(np.isfinite(mu)) and np.all(sd > 0)
    np.testing.assert_allclose(est.predict(Xt), mu)
    lo, hi = est.predict_interval(Xt, level=0.9)
    assert lo.shape == hi.shape == (50,)
    assert np.all(lo <= mu) and np.all(mu <= hi)
    lo50, hi50 = est.predict_interval(Xt, level=0.5)
    assert np.all(hi50 - lo50 < hi - lo)
    # the same seed gives the same result
    again = make_method(name, source, **OPTIONS[name], **_seeded(name, 5))
    assert again.fit(X, y) is again
    mu2, sd2 = again.predict(Xt, return_std=True)
    np.testing.assert_allclose(mu2, mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sd2, sd, rtol=1e-6, atol=1e-7)
    # bad input raises ValueError naming the argument
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="X"):
        make_method(name, source, **OPTIONS[name]).fit(bad, y)
    with pytest.raises(ValueError, match="mismatched"):
        make_method(name, source, **OPTIONS[name]).fit(X, y[:-1])
    with pytest.raises(ValueError, match="features"):
        est.predict(Xt[:, :2])
    with pytest.raises(ValueError, match="level"):
        est.predict_interval(Xt, level=1.5)
    # a failed refit leaves every fitted attribute as it was (issue 14, row 21)
    fitted = {k: v for k, v in vars(est).items() if k.endswith("_")}
    with pytest.raises(ValueError, match="y contains NaN"):
        est.fit(X, np.r_[y[:-1], np.nan])
    after = {k: v for k, v in vars(est).items() if k.endswith("_")}
    assert after.keys() == fitted.keys() and all(after[k] is fitted[k] for k in fitted)
    np.testing.assert_allclose(est.predict(Xt), mu)


@pytest.mark.filterwarnings("ignore::pcbtl.inference.SamplerWarning")  # tiny fits
@pytest.mark.parametrize("name", EXPECTED)
def test_every_method_is_equivariant_to_the_units_of_the_labels(name, task, source):
    # the whole problem in other units, y -> a + b y (source labels too, so the source network
    # becomes a + b g_S), must give a + b times the predictions: every estimator fits on
    # standardised labels. Labels 10 + 1e-6 y (a float32 ulp at 10 is 1e-6, the size of the
    # signal) defeat float32 without that: measured, fine-tuning 0.42, pc-scale 0.26,
    # difference-rf 0.15 and pc-last-layer 0.13 RMS off in the original units.
    # The standardised problems agree up to float rounding, which can move NUTS onto another
    # path, so the posterior means are compared with a tolerance of 0.05 (a quarter of the
    # noise sd; the Monte Carlo error of 2 x 60 draws is ~0.01 for these small posteriors).
    # The fit in the original units is the interface test's (same options, seed 5).
    X, y = task.X_target[:40], task.y_target[:40]
    Xt = task.X_test[:50]
    opts = {**OPTIONS[name], **_seeded(name, 5)}
    # the multi-task network (4 hidden units, source and target rows) is multimodal: where
    # rounding (its stacked inputs agree to 1e-9) sends its 2 x 60 draws down other paths they
    # settle in other modes (measured: means 0.11-0.34 apart, test RMSE 0.27 vs 0.40), so for
    # it the labels the sampler sees are compared, and the outputs checked to be mapped back
    multimodal = name == "multitask-bnn"
    base = _reference_fit(name, task, source)
    mu0, sd0 = base.predict(Xt, return_std=True)
    lo0, hi0 = base.predict_interval(Xt)
    for a, b in ((10.0, 1e-6),):  # labels 10 + 1e-6 y: a float32 ulp at 10 is 1e-6
        src = source.rescaled(-a / b, 1.0 / b)  # predicts a + b g_S
        o = dict(opts)
        est = make_method(name, src, **o).fit(X, a + b * y)
        mu, sd = est.predict(Xt, return_std=True)
        lo, hi = est.predict_interval(Xt)
        if multimodal:
            seen0 = np.asarray(base._batch_plan(X, y).kwargs["y"])
            seen = np.asarray(make_method(name, src, **o)._batch_plan(X, a + b * y).kwargs["y"])
            np.testing.assert_allclose(seen, seen0, atol=1e-5)  # the same standardised labels
            assert np.sqrt(np.mean(((mu - a) / b - mu0) ** 2)) < 1.0  # unmapped: off by 1e7
            continue
        err = np.sqrt(np.mean(((mu - a) / b - mu0) ** 2))
        assert err < 0.05, (name, a, b, err)
        np.testing.assert_allclose(sd / b, sd0, rtol=0.2, err_msg=f"{name} {a} {b}")
        width = np.mean((hi - lo) / b) / np.mean(hi0 - lo0)
        assert 0.8 < width < 1.25, (name, a, b, width)


@pytest.mark.slow  # statistical (25 s); opt-in
def test_difference_with_a_perfect_source_learns_a_zero_correction(task, source):
    # target labels are the source network's own predictions plus N(0, 0.2²) noise, so the true
    # correction is exactly 0. A Bayesian network fitted to 60 rows of pure noise has a posterior
    # mean of RMS about σ·sqrt(k/n) for k effective parameters; 0.25σ = 0.05 allows k ≈ 4 and
    # fails for any systematic correction of a tenth of the label sd (≈ 0.1).
    rng = np.random.default_rng(7)
    X = task.X_target
    y = source.predict(X) + 0.2 * rng.standard_normal(X.shape[0])
    est = make_method("difference-bnn", source, num_warmup=150, num_samples=150, hidden=(8,))
    est.fit(X, y)
    c_mean, c_sd = est.correction(task.X_test)
    assert np.sqrt(np.mean(c_mean**2)) < 0.05
    # and the correction's own 95% band holds 0 nearly everywhere
    assert np.mean(np.abs(c_mean) < 1.96 * c_sd + 1e-12) > 0.9


@pytest.mark.slow  # statistical, 2 fits of 200 draws (30 s); opt-in
def test_latent_variable_with_a_useless_source_matches_target_only(task, source):
    # a source whose output weights are 0 predicts one constant: the extra input carries nothing,
    # so the latent-variable model is the target-only network (plus input weights that multiply
    # a zero column). Tolerance: 10% of the test RMSE — the two runs differ only through
    # the Monte Carlo error of 200 NUTS draws on different parameter vectors.
    out = dict(source.params["output"])
    out = {"kernel": np.zeros_like(out["kernel"]), "bias": np.zeros_like(out["bias"])}
    useless = dataclasses.replace(source, params={**source.params, "output": out})
    assert np.ptp(useless.predict(task.X_test)) == 0.0
    opts = {"num_warmup": 200, "num_samples": 200, "hidden": (8,), "seed": 1}
    latent = make_method("latent-bnn", useless, **opts).fit(task.X_target, task.y_target)
    target = make_method("target-only", useless, **opts).fit(task.X_target, task.y_target)
    r_latent = np.sqrt(np.mean((latent.predict(task.X_test) - task.f_test) ** 2))
    r_target = np.sqrt(np.mean((target.predict(task.X_test) - task.f_test) ** 2))
    assert abs(r_latent - r_target) < 0.1 * r_target
    _, sd_l = latent.predict(task.X_test, return_std=True)
    _, sd_t = target.predict(task.X_test, return_std=True)
    assert abs(np.mean(sd_l) - np.mean(sd_t)) < 0.1 * np.mean(sd_t)


def test_multitask_uses_rows_with_one_missing_label(task, source):
    n = task.X_target.shape[0]
    Y = np.full((n, 2), np.nan)
    Y[: n // 2, 1] = task.y_target[: n // 2]  # target label only
    Y[n // 2 :, 0] = task.y_target[n // 2 :] - 0.5  # source label only
    Y[:5, 0] = task.y_target[:5]  # both labels
    est = make_method("multitask-rf", source, n_estimators=30).fit(task.X_target, Y)
    assert est.n_target_rows_ == n // 2
    assert est.n_source_rows_ == n - n // 2 + 5
    assert est.forest_.train_shape == (est.n_target_rows_ + est.n_source_rows_, 4)
    # the same rows with their source labels dropped give a different fit: the labels were used
    Y_t = Y.copy()
    Y_t[:, 0] = np.nan
    Y_t[n // 2 :, 0] = 0.0
    other = make_method("multitask-rf", source, n_estimators=30).fit(task.X_target, Y_t)
    assert not np.allclose(other.predict(task.X_test), est.predict(task.X_test))
    Y_bad = Y.copy()
    Y_bad[7] = np.nan
    with pytest.raises(ValueError, match="neither label"):
        make_method("multitask-rf", source).fit(task.X_target, Y_bad)
    with pytest.raises(ValueError, match="2 columns"):
        make_method("multitask-rf", source).fit(task.X_target, np.zeros((n, 3)))


def test_rf_source_uncertainty_propagates(task, source):
    # with a forest source, the difference predictive adds the source forest's jackknife
    # variance: its sd must exceed that of the correction forest alone at every point
    est = make_method(
        "difference-rf", source, n_estimators=40, source_X=task.X_source, source_y=task.y_source
    ).fit(task.X_target, task.y_target)
    _, sd = est.predict(task.X_test, return_std=True)
    _, v_s = est._source_pred(task.X_test)
    c_mu, c_sd = est.correction(task.X_test)
    np.testing.assert_allclose(sd**2, v_s + c_sd**2 + est.correction_.noise_var, rtol=1e-10)
    assert np.mean(v_s) > 0


@pytest.mark.slow  # statistical, 4 fits (40 s); exact batch = alone: test_batch_reproducible.py
def test_batched_replicates_match_one_by_one_fits(task, source):
    # two replicates (different target subsets) in one vmapped NUTS job against separate fits:
    # the posterior-mean predictions agree within Monte Carlo error. Measured spread between
    # two single fits with different seeds at 200 draws: 0.007-0.023 RMS; tolerance 0.05. And
    # each batched replicate is closer to its own single fit than to the other replicate's
    # (the batch did not mix up the data sets).
    pd = pytest.importorskip("pandas")
    columns = [f"x{j}" for j in range(task.X_target.shape[1])]
    frame = pd.DataFrame(task.X_target, columns=columns)
    data = [(frame.iloc[:40], task.y_target[:40]), (frame.iloc[20:], task.y_target[20:])]
    X_test = pd.DataFrame(task.X_test, columns=columns)
    opts = {"num_warmup": 200, "num_samples": 200, "num_chains": 2}
    for cls_name in ("bayes-last-layer", "pc-last-layer"):
        batch = [make_method(cls_name, source, **opts, seed=s) for s in (0, 1)]
        assert all(supports_batching(e) for e in batch)
        fit_replicates(batch, data)
        singles = [
            make_method(cls_name, source, **opts, seed=s).fit(X, y)
            for (X, y), s in zip(data, (0, 1), strict=True)
        ]
        preds = [e.predict(X_test) for e in singles]
        for r, est in enumerate(batch):
            assert est.batched_
            assert list(est.feature_names_in_) == columns  # as fit() records them
            own = np.sqrt(np.mean((est.predict(X_test) - preds[r]) ** 2))
            other = np.sqrt(np.mean((est.predict(X_test) - preds[1 - r]) ** 2))
            assert own < 0.05 and own < other, (cls_name, r, own, other)
            assert idata_group(est.idata_, "posterior").sizes["draw"] == 200
            assert idata_group(est.idata_, "posterior").sizes["chain"] == 2
    assert isinstance(batch[0], pcbtl.PCTransferRegressor)
    assert isinstance(make_method("bayes-last-layer", source), BayesianLastLayerRegressor)
    assert jax.default_backend() in ("cpu", "gpu", "tpu")


@pytest.mark.filterwarnings("ignore::pcbtl.inference.SamplerWarning")  # short chains: batching
@pytest.mark.slow  # every NUTS method batched (97 s); test_batch_reproducible.py stays in the default run
def test_batching_covers_every_nuts_method_and_compiles_once(task, source):
    # every single-chain NUTS method batches; point estimates and forests do not
    src_data = {"source_X": task.X_source, "source_y": task.y_source}
    nuts = {"num_warmup": 100, "num_samples": 100, "num_chains": 2}
    batchable = {
        "target-only": {**nuts, "hidden": (8,)},
        "pretrained-gaussian": nuts,
        "bayes-last-layer": nuts,
        "pc-last-layer": nuts,
        "pc-scale": {**nuts, "max_reference": 200, "n_tau": 16, "n_eps": 8},
        "pc-tangent": {**nuts, "max_reference": 200},
        "multitask-bnn": {**nuts, "hidden": (8,), "max_source_rows": 30, **src_data},
        "difference-bnn": {**nuts, "hidden": (8,)},
        "latent-bnn": {**nuts, "hidden": (8,)},
    }
    assert set(batchable) | {"source-only", "fine-tuning"} | {
        m for m in pcbtl.methods() if m.endswith("-rf")
    } == set(pcbtl.methods())
    for name in ("source-only", "fine-tuning", "difference-rf", "multitask-rf"):
        assert not supports_batching(
            make_method(name, source, **src_data) if "rf" in name else make_method(name, source)
        )
    assert supports_batching(make_method("pc-scale", source, num_chains=2))  # chains batch too
    assert not supports_batching(make_method("pc-last-layer", source, inference="svi"))
    data = [(task.X_target[:30], task.y_target[:30]), (task.X_target[30:60], task.y_target[30:60])]
    for name, opts in batchable.items():
        ests = [make_method(name, source, **opts, seed=s) for s in (0, 1)]
        assert all(supports_batching(e) for e in ests), name
        fit_replicates(ests, data)
        for est in ests:
            assert est.batched_, name
            mean, sd = est.predict(task.X_test[:50], return_std=True)
            assert mean.shape == sd.shape == (50,) and np.all(np.isfinite(mean)) and np.all(sd > 0)
            assert est.fit_seconds_ > 0
    # the same model, settings and shapes again (new data and seeds): no new compilation
    from pcbtl.inference.nuts import _batched_sampler, resolve_chain_method

    opts = batchable["pc-scale"]
    runs = []
    for seeds in ((2, 3), (4, 5)):
        ests = [make_method("pc-scale", source, **opts, seed=s) for s in seeds]
        fit_replicates(ests, data[::-1])
        plan = ests[0]._batch_plan(*data[0])
        vectorize = resolve_chain_method(plan.chain_method) != "sequential"
        sampler = _batched_sampler(
            plan.model, 100, 100, plan.target_accept_prob, plan.max_tree_depth, vectorize, (),
            plan.interweave, False,
        )  # fmt: skip
        runs.append(sampler._cache_size())
    assert runs[0] == runs[1] >= 1  # the second batch added no compilation
    # replicates whose shapes differ cannot share a batch: fitted one by one instead
    mixed = [make_method("target-only", source, **batchable["target-only"], seed=s) for s in (0, 1)]
    mixed[1].hidden = (4,)
    fit_replicates(mixed, data)
    assert not any(e.batched_ for e in mixed)


_SHARDED = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np, pcbtl
from pcbtl.inference import run_nuts_batched
from tests.test_methods import _sharding_case
kws = _sharding_case()
post = run_nuts_batched(pcbtl.models.last_layer_pc_model, kws, num_warmup=200, num_samples=200)
print(json.dumps({"devices": jax.local_device_count(),
                  "medians": [float(np.median(p.flat("distance"))) for p in post]}))
"""


def _sharding_case():
    t = pcbtl.make_synthetic_task(n_source=300, n_target=40, n_features=3, seed=0)
    src = pcbtl.train_source(t.X_source, t.y_source, hidden=(8,), max_epochs=20, progress_bar=False)
    kws = []
    for r in range(4):
        est = pcbtl.PCTransferRegressor(src)
        kws.append(est._model_kwargs(est._setup(t.X_target), t.X_target, t.y_target + 0.1 * r))
    return kws


@pytest.mark.slow  # a subprocess with 2 forced host devices plus a second run: ~1 min
def test_batched_replicates_are_sharded_over_several_devices():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    from pcbtl.inference import run_nuts_batched

    post = run_nuts_batched(
        pcbtl.models.last_layer_pc_model, _sharding_case(), num_warmup=200, num_samples=200
    )
    single = [float(np.median(p.flat("distance"))) for p in post]
    # sharding changes XLA's partitioning, hence float rounding, hence the NUTS paths: compare
    # posteriors, not draws. 200 draws: Monte Carlo error of a median of d is ~0.05; allow 0.25
    np.testing.assert_allclose(result["medians"], single, atol=0.25)


@pytest.mark.slow  # compiles a sampler with host callbacks (35 s); opt-in
def test_batched_sampler_progress_bar_follows_the_iterations(capsys):
    # one bar over warm-up + kept iterations, moved by host callbacks from the compiled loop;
    # it must end at the total and be closed (no bar left open for the next job)
    from pcbtl.inference.nuts import _PROGRESS_BARS, run_nuts_batched

    kws = _sharding_case()[:2]
    run_nuts_batched(
        pcbtl.models.last_layer_pc_model, kws, num_warmup=30, num_samples=20, progress_bar=True
    )
    err = capsys.readouterr().err
    assert "50/50" in err and "NUTS, 1 chain(s) x 2 fits" in err
    assert not _PROGRESS_BARS


@pytest.mark.slow  # recompiles every sampler (46 s); opt-in
def test_clear_caches_frees_the_compiled_samplers_and_fits_still_work():
    from pcbtl.inference.nuts import _INIT_CACHE, _batched_sampler, run_nuts_batched

    kws = _sharding_case()[:2]
    run = partial(run_nuts_batched, pcbtl.models.last_layer_pc_model, kws, num_warmup=20)
    first = run(num_samples=10)
    assert _batched_sampler.cache_info().currsize >= 1 and len(_INIT_CACHE) >= 1
    pcbtl.clear_caches()
    assert _batched_sampler.cache_info().currsize == 0 and not _INIT_CACHE
    # recompiled on demand, and the same seeds give the same draws
    again = run(num_samples=10)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_allclose(a.samples["distance"], b.samples["distance"], rtol=1e-5)
