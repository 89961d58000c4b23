"""``python -m wsfan.bench <scenario> [options]``: run a benchmark scenario, print its table, write ``results/``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from wsfan.bench.scenarios import SCENARIOS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wsfan.bench", description=__doc__)
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, module in SCENARIOS.items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
    return parser


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a test's or CI's timeout) unwinds like Ctrl-C: every scenario's ``finally`` and
    ``with`` stop the servers and load generators it started (Python's default would exit at once
    and leave them running)."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    if getattr(args, "smoke", False):
        args.quick = True  # a smoke run is a quick run in every other respect (results/tmp/, no --publish)
    return SCENARIOS[args.scenario].run(args)


if __name__ == "__main__":
    sys.exit(main())
