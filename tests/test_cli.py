"""The main job: `pcbtl demo` end to end in quick settings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pcbtl.cli import main
from pcbtl.inference import idata_group, idata_groups

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"\sArviZ is undergoing", category=FutureWarning)
    import arviz as az


def test_demo_writes_its_outputs(tmp_path, capsys):
    # 2 chains of 100 + 100 draws: the outputs and the ordering of the methods, not the README's
    # figures (those are `demo --quick`, 4 chains of 200 + 200)
    args = ["demo", "--draws", "100", "--chains", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    for row in ("source-only", "target-only BNN", "PC prior (last_layer)", "PC prior (scale)"):
        assert row in out
    assert "posterior last_layer" in out and "prior Exp" in out
    for name in (
        "pc_last_layer.nc",
        "pc_scale.nc",
        "parity.png",
        "distance.png",
        "source_model.npz",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    idata = az.from_netcdf(tmp_path / "pc_scale.nc")  # InferenceData (ArviZ 0.x) or DataTree
    assert {"posterior", "posterior_predictive", "log_likelihood", "sample_stats"} <= set(
        idata_groups(idata)
    )
    assert np.all(np.isfinite(idata_group(idata, "posterior")["distance"].values))
    # the PC prior must beat the biased source on the shifted synthetic target
    lines = {line[:24].strip(): line[24:].split() for line in out.splitlines() if line[:24].strip()}
    assert float(lines["PC prior (scale)"][0]) < float(lines["source-only"][0])


def test_demo_refuses_a_budget_too_small_to_judge(tmp_path):
    from pcbtl.jobs.demo import run_demo

    with pytest.raises(ValueError, match="draws must be an >= 10 integer, got 5"):
        run_demo(tmp_path / "a", draws=5)
    with pytest.raises(ValueError, match="chains must be a positive integer, got 0"):
        run_demo(tmp_path / "b", chains=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written
