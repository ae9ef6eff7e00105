"""Driver of the simulation study (the code lives in :mod:`pcbtl.jobs.study`).

Full study (δ ∈ {0, 0.5, 1, 2, unrelated} × n_T ∈ {25, 50, 100, 250, 500}, 20 replicates,
n_S = 5,000, 2,000 test points, every method of ``pcbtl.methods()``; budgets of
``pcbtl.jobs.study.StudyConfig``: source network (16, 16), learner networks (16,), NUTS 150 + 150 draws
with tree depth ≤ 7 for every network, forests of 100 trees on 1,000 source rows):

    python benchmarks/simulation_study.py --out benchmarks/results/simulation_full
    # the same as: pcbtl simulate --out benchmarks/results/simulation_full

A killed run started again with the same ``--out`` keeps the finished settings. Parts of the grid
can run in parallel processes and be merged:

    pcbtl simulate --out part_small --n-targets 25,50,100
    pcbtl simulate --out part_large --n-targets 250,500
    pcbtl simulate --merge part_small part_large --out benchmarks/results/simulation_full

with covariate shift as a second block of settings:

    python benchmarks/simulation_study.py --out benchmarks/results/shift --covariate-shift 0,1.5

CI-sized run (δ ∈ {0, 2, unrelated}, n_T = 50, 3 replicates, 150 + 150 draws):

    python benchmarks/simulation_study.py --quick --out benchmarks/results/quick

Writes ``results.csv``, ``summary.md`` (the table for the README, with date, versions and
machine), ``rmse_vs_ntarget.png``, ``coverage.png`` and ``config.json`` into ``--out``.
Every option of ``pcbtl simulate`` is accepted (``--help``).
"""

from __future__ import annotations

import sys

from pcbtl.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
