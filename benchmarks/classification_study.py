"""Driver of the classification simulation study (the code lives in :mod:`pcbtl.jobs.study`).

Full grid (``pcbtl.jobs.study.CLASSIFICATION``): two and three classes, each
δ ∈ {0, 1, 2 logit units, unrelated} × n_T ∈ {25, 50, 100, 250, 500}, 20 replicates,
n_S = 5,000 source rows, 2,000 test rows, d = 10 inputs, every method of
``pcbtl.methods("classification")`` (14); source network (16, 16), learner networks (16,),
NUTS 4 chains of 150 + 150 draws (tree depth ≤ 7 for the networks), forests of 100 trees.
Scores: log loss, Brier, accuracy, ECE, and the same for the true probabilities.

    python benchmarks/classification_study.py            # both class counts, in turn
    python benchmarks/classification_study.py --classes 3 --replicates 5

writes ``benchmarks/results/classification_study/k2/`` and ``…/k3/`` (``results.csv``,
``summary.md``, ``logloss_vs_ntarget.png``, ``ece.png``, ``config.json``) and prints each
folder's over-all-settings table. A killed run started again with the same options keeps the
finished settings (rows are written atomically after every setting). The same as
``pcbtl simulate --task classification --classes K --out DIR``; parts of the grid can run in
parallel processes (``--n-targets``) and be merged with ``pcbtl simulate --merge``.

Measured cost of one replicate at n_T = 500 (δ = 1, every method, n_S = 5,000, 4 chains of
150 + 150 draws run one after another; one process, ``nice -n 19``, on the 2-core AMD EPYC
development machine, with a test run beside it part of the time), seconds per method
(fitting and scoring on the 2,000 test rows; the source classifier's training first):

==========================  =======  =======
method                      K = 2    K = 3
==========================  =======  =======
source training             9        TBD
source-only                 0.8      TBD
target-only                 40.3     TBD
fine-tuning                 4.8      TBD
pretrained-gaussian         37.2     TBD
bayes-last-layer            49.9     TBD
pc-last-layer               70.7     TBD
pc-scale                    100.1    TBD
forest                      4.0      TBD
multitask-bnn               TBD      TBD
multitask-rf                TBD      TBD
difference-bnn              TBD      TBD
difference-rf               TBD      TBD
latent-bnn                  TBD      TBD
latent-rf                   TBD      TBD
total                       TBD      TBD
==========================  =======  =======
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from pcbtl.jobs.study import CLASSIFICATION, headline_markdown, run_study

OUT = Path(__file__).resolve().parent / "results" / "classification_study"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, choices=(2, 3), nargs="+", default=[2, 3])
    parser.add_argument("--replicates", type=int, default=None, help="replicates per setting")
    parser.add_argument("--n-targets", default=None, help="comma-separated target sizes")
    parser.add_argument("--out", type=Path, default=OUT, help="parent folder of k2/ and k3/")
    args = parser.parse_args(argv)
    changes = {}
    if args.replicates is not None:
        changes["n_replicates"] = args.replicates
    if args.n_targets:
        changes["n_targets"] = tuple(int(t) for t in args.n_targets.split(","))
    for k in args.classes:
        cfg = replace(CLASSIFICATION, n_classes=k, **changes)
        rows = run_study(cfg, args.out / f"k{k}", verbose=True)
        print(f"\n## K = {k} classes ({args.out / f'k{k}'})\n")
        print(headline_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
