"""Driver of the band-gap application: DFT (MP PBE) gaps → experimental gaps, Matbench protocol.

    python benchmarks/bandgap.py --data-dir ../shared/data/bandgap --out results/bandgap
    python benchmarks/bandgap.py --quick --data-dir ../shared/data/bandgap --out /tmp/bandgap
    python benchmarks/bandgap.py --methods hurdle-pc-scale --folds 0,1 --out /tmp/bg

Without ``--data-dir`` the official Matbench files are downloaded (checksummed) into the cache.
Prints per-fold lines as fits finish and the summary table (means over folds beside the published
Matbench MAEs); writes results.csv, summary.md, predictions.npz, parity.png, calibration.png and
the source model into ``--out``. Same as ``pcbtl bandgap``.
"""

from __future__ import annotations

import sys

from pcbtl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bandgap", *sys.argv[1:]]))
