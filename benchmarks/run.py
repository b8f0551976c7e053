"""The stdlib language models at equal parameter count and equal budget on the synthetic tasks:
`nestc bench` (nestc/bench.py) under another name, with the same arguments.

Usage: python benchmarks/run.py [--models ...] [--tasks ...] [--steps N] [--batch B]
[--minutes M] [--dim D] [--depth L] [--lengths ...] [-k task.knob=v] [--out DIR] [--seed S]
[--threads N] [--quick] [--update-docs] (python benchmarks/run.py --help for the rest).
Writes DIR/results.md, DIR/results.json and a plot per task; results.md records the run as the
equivalent `nestc bench ...` command.
"""

from __future__ import annotations

import sys

from nestc.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
