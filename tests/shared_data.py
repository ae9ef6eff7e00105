"""Where the shared test data live: ``$PCBTL_SHARED_DATA``, else ``../shared/data`` beside the
repository. Tests that need a file skip with a stated reason where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("PCBTL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
