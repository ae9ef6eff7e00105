"""Driver of the classification simulation study (the code lives in :mod:`pcbtl.jobs.study`).

Full grid (``pcbtl.jobs.study.CLASSIFICATION``): two and three classes, each
δ ∈ {0, 1, 2 logit units, unrelated} × n_T ∈ {25, 50, 100, 250, 500}, 20 replicates,
n_S = 5,000 source rows, 2,000 test rows, d = 10 inputs, every method of
``pcbtl.jobs.study.CLASSIFICATION_STUDY_METHODS`` (14: the registry's classification methods
when the grid was started; the later boosted-tree ones are not in it); source network (16, 16), learner networks (16,),
NUTS 4 chains of 150 + 150 draws (tree depth ≤ 7 for the networks), forests of 100 trees.
Scores: log loss, Brier, accuracy, ECE, and the same for the true probabilities.

    python benchmarks/classification_study.py            # both class counts, in turn
    python benchmarks/classification_study.py --classes 3 --replicates 5

writes ``benchmarks/results/classification_study/k2/`` and ``…/k3/`` (``results.csv``,
``summary.md``, ``logloss_vs_ntarget.png``, ``ece.png``, ``config.json``) and prints each
folder's over-all-settings table. A killed run started again with the same options keeps the
finished settings (rows are written atomically after every setting). The same as
``pcbtl simulate --task classification --classes K --out DIR``; parts of the grid can run in
parallel processes (``--n-targets``) and be merged with ``pcbtl simulate --merge``. That command
also re-runs chosen methods of chosen settings with another NUTS budget into another folder
(same seeds, so its replicates pair with the grid's), e.g. ``pcbtl simulate --task
classification --classes 2 --n-targets 250 --deltas unrelated --methods pc-scale --draws 600
--no-batch --out benchmarks/results/classification_budget/k2``.

Measured cost of one replicate at n_T = 500 (δ = 1, every method, n_S = 5,000, 4 chains of
150 + 150 draws run one after another; one process, ``nice -n 19``, on the 2-core AMD EPYC
development machine with a ``pytest`` run of ``tests/test_study.py`` beside it for part of
the two-class run and all of the three-class run, so these are upper figures), wall seconds
per method (fitting, with each fit's JIT compilation, and scoring on the 2,000 test rows):

==========================  =======  =======
method                      K = 2    K = 3
==========================  =======  =======
source training             9        22
source-only                 0.8      1.2
target-only                 40.3     63.5
fine-tuning                 4.8      8.2
pretrained-gaussian         37.2     77.1
bayes-last-layer            49.9     57.2
pc-last-layer               70.7     190.9
pc-scale                    100.1    105.5
forest                      4.0      3.9
multitask-bnn               66.4     95.4
multitask-rf                7.2      4.0
difference-bnn              69.1     30.4
difference-rf               5.3      3.8
latent-bnn                  73.0     49.9
latent-rf                   4.6      3.1
total (with the summary)    546      719
==========================  =======  =======

The NUTS methods take 95% of it. Planning figure: the grid is 4 δ × 5 n_T × 20 replicates =
400 replicates per class count; at the n_T = 500 cost that is 61 h (K = 2) + 80 h (K = 3) of
one process, an upper bound (smaller targets make cheaper gradients, but compilation and the
reference rows of the PC priors do not shrink with n_T; a guess of 50-70% of it on average
gives 70-100 process-hours, about 35-50 h on two cores running k2 and k3 side by side). The
PC classifiers' replicates are sampled as one vmapped job (``batched=True``), which may
change their share. Fewer replicates (``--replicates 5``) or chains cut it in proportion.
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
    parser.add_argument(
        "--no-batch",
        action="store_true",
        help="fit the replicates one by one (faster on a CPU; the draws are the same)",
    )
    args = parser.parse_args(argv)
    changes: dict = {"batched": False} if args.no_batch else {}
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
