"""Command-line entry point: ``pcbtl demo`` (and the other jobs registered in ``COMMANDS``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from pcbtl.jobs.batch import add_batch_command
from pcbtl.jobs.demo import add_demo_command
from pcbtl.jobs.study import add_simulate_command
from pcbtl.materials.bandgap import add_bandgap_command
from pcbtl.materials.metallicity import add_metallicity_command

#: Sub-command registrars: each adds its parser to the ``subparsers`` object.
COMMANDS: list[Callable] = [
    add_demo_command,
    add_simulate_command,
    add_batch_command,
    add_bandgap_command,
    add_metallicity_command,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pcbtl", description="Deep Bayesian transfer learning with a PC prior on KL distance"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
