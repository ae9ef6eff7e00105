"""The band-gap application on the shared Matbench copies, in a tiny configuration."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from shared_data import SHARED_DATA

from pcbtl.classification import train_source_classifier
from pcbtl.estimators.classifier import PCTransferClassifier
from pcbtl.estimators.pc import PCTransferRegressor
from pcbtl.materials.bandgap import (
    PUBLISHED_MAE,
    BandGapConfig,
    bandgap_methods,
    metal_config,
    run_bandgap,
)

BANDGAP = SHARED_DATA / "bandgap"
needs_data = pytest.mark.skipif(
    not (BANDGAP / "matbench_expt_gap.csv").is_file(),
    reason=f"shared band-gap data not found at {BANDGAP} (set PCBTL_SHARED_DATA)",
)


@needs_data
def test_bandgap_run_writes_every_output(tmp_path):
    config = BandGapConfig(
        methods=("source-only", "pc-last-layer", "hurdle-pc-last-layer"),
        folds=(0,),
        source_hidden=(16,),
        source_rows=3000,
        target_rows=400,
        num_warmup=100,
        num_samples=100,
    )
    rows = run_bandgap(tmp_path, config=config, data_dir=BANDGAP, progress=lambda _: None)
    assert [r["method"] for r in rows] == list(config.methods)
    assert all(r["error"] == "" for r in rows)
    with open(tmp_path / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 3
    for col in ("MAE", "coverage95", "width95", "metal_MAE", "nonmetal_MAE", "seconds"):
        assert all(np.isfinite(float(r[col])) for r in table), col
    by = {r["method"]: r for r in rows}
    # the hurdle model puts point mass at 0: metals get (near-)zero predictions
    assert by["hurdle-pc-last-layer"]["metal_MAE"] < by["source-only"]["metal_MAE"]
    summary = (tmp_path / "summary.md").read_text()
    assert "hurdle-pc-last-layer" in summary and f"{PUBLISHED_MAE['MODNet']:.3f}" in summary
    for name in ("parity.png", "calibration.png", "source_model.npz", "predictions.npz"):
        assert (tmp_path / name).stat().st_size > 0
    from pcbtl import SourceModel
    from pcbtl.materials.features import CompositionFeaturizer

    source = SourceModel.load(tmp_path / "source_model.npz")
    featurizer = CompositionFeaturizer.from_dict(source.info["featurizer"])
    assert source.predict(featurizer.transform(["GaAs", "Ag0.5Ge1Pb1.75S4"])).shape == (2,)


def test_unknown_method_is_rejected(source):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        bandgap_methods(source, BandGapConfig(methods=("magic",)))


def test_tangent_ensemble_method_hands_its_sources_to_the_regressor(source):
    other = dataclasses.replace(source)
    config = BandGapConfig(methods=("hurdle-pc-tangent", "hurdle-pc-tangent-ensemble"))
    made = {k: f() for k, f in bandgap_methods(source, config, ensemble=[other]).items()}
    assert made["hurdle-pc-tangent"].regressor.ensemble is None
    reg = made["hurdle-pc-tangent-ensemble"].regressor
    assert reg.prior == "tangent" and reg.source is source and list(reg.ensemble) == [other]
    # the classifier's PBE-gap feature is the sources' average
    shifted = dataclasses.replace(source, y_mean=source.y_mean + 1.0)
    made = bandgap_methods(source, config, ensemble=[shifted])
    X = np.zeros((3, source.n_features))
    one = made["hurdle-pc-tangent"]().classifier_features(X)[:, -1]
    two = made["hurdle-pc-tangent-ensemble"]().classifier_features(X)[:, -1]
    np.testing.assert_allclose(two - one, 0.5, rtol=1e-5)


def test_metal_classifier_option_builds_a_pc_classifier_on_the_metal_source(source):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, source.n_features))
    metal_source = train_source_classifier(
        X, X[:, 0] > 0, hidden=(4,), max_epochs=3, progress_bar=False
    )
    config = BandGapConfig(
        methods=("hurdle-pc-last-layer", "pc-last-layer"),
        metal_classifier="pc-scale",
        metal_settings={"scale_draws": 40, "num_chains": 3},
    )
    made = {k: f() for k, f in bandgap_methods(source, config, metal_source=metal_source).items()}
    hurdle = made["hurdle-pc-last-layer"]
    clf = hurdle.classifier
    assert isinstance(clf, PCTransferClassifier) and clf.source is metal_source
    assert (clf.prior, clf.num_warmup, clf.num_samples, clf.num_chains) == ("scale", 40, 40, 3)
    # the posterior's own probabilities: no cross-fitted recalibration, no extra features
    assert hurdle.calibration is None and hurdle.classifier_features is None
    assert isinstance(made["pc-last-layer"], PCTransferRegressor)  # other methods unchanged
    with pytest.raises(ValueError, match="needs metal_source"):
        bandgap_methods(source, config)
    with pytest.raises(ValueError, match="metal_classifier must be 'trees' or one of"):
        bandgap_methods(source, dataclasses.replace(config, metal_classifier="magic"))
    with pytest.raises(ValueError, match=r"unknown MetallicityConfig field\(s\) \['draws'\]"):
        metal_config(dataclasses.replace(config, metal_settings={"draws": 3}))
