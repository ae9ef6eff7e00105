"""Repository-level pytest configuration: the notebooks that need the shared data.

`notebooks/03_bandgap_transfer.ipynb` and `notebooks/04_classification_transfer.ipynb` run on the
Matbench copies in ``../shared/data`` (or ``$PCBTL_SHARED_DATA``); where they are absent they are
not collected, and the report header says why. Notebook 03 (the band-gap walk-through, 95 s on the
2-core CI machine) runs with ``-m slow``: the band-gap application it steps through is run end to
end by ``tests/test_bandgap.py`` in the default run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(
    os.environ.get("PCBTL_SHARED_DATA", Path(__file__).resolve().parent.parent / "shared" / "data")
)
NEEDS = {
    "notebooks/03_bandgap_transfer.ipynb": ("bandgap/matbench_expt_gap.csv",),
    "notebooks/04_classification_transfer.ipynb": (
        "bandgap/matbench_mp_gap.csv",
        "metallicity/matbench_expt_is_metal.csv",
    ),
}
MISSING = {nb: [f for f in files if not (SHARED / f).is_file()] for nb, files in NEEDS.items()}
collect_ignore = [nb for nb, missing in MISSING.items() if missing]
OPT_IN = ("notebooks/03_bandgap_transfer.ipynb",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("::")[0] in OPT_IN:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    lines = [
        f"skipping {nb}: shared data {missing} not found in {SHARED} (set PCBTL_SHARED_DATA)"
        for nb, missing in MISSING.items()
        if missing
    ]
    return lines or None
