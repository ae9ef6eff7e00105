"""Driver of the metallicity application: DFT (MP PBE, metal = gap 0) → experimental metal
labels, Matbench's classification protocol (StratifiedKFold(5, shuffle=True,
random_state=18012019), mean over folds).

    python benchmarks/metallicity.py --data-dir ../shared/data --out benchmarks/results/metallicity
    python benchmarks/metallicity.py --quick --data-dir ../shared/data --out /tmp/metallicity
    python benchmarks/metallicity.py --methods pc-last-layer,forest --folds 0,1 --out /tmp/m

``--data-dir`` is a folder holding ``matbench_expt_is_metal`` and ``matbench_mp_gap`` (CSV or
the official JSON), directly or in its ``metallicity/`` and ``bandgap/`` folders; without it
the official Matbench files are downloaded (checksummed) into the cache. Prints a line per
finished (fold, method) and the summary table (mean ± standard error over folds, the goal
line); writes results.csv, summary.md, probabilities.npz, reliability.png, the cached
features and the source classifier into ``--out``. A second run into the same ``--out``
resumes: finished (fold, method) pairs are skipped (``--fresh`` starts over). Same as
``pcbtl metallicity``.
"""

from __future__ import annotations

import argparse
import sys

from pcbtl.materials.metallicity import add_metallicity_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/metallicity.py")
    add_metallicity_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["metallicity", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
