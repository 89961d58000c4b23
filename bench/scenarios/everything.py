"""``python -m wsfan.bench all``: every scenario of the suite into one run folder, then report.md and plots (``--publish``: also results/latest.md).

Order: fan-out, echo, heartbeat, reconnection storm, connect rate, cluster, compression, rooms (the core
scenario stays separate: ``make bench-core``). A full run takes about 15
minutes on 2 cores; ``--quick`` is the CI-sized version (under a minute). A
scenario that fails is recorded and the others still run; the exit code is 1
when any check failed.
"""

from __future__ import annotations

import argparse
import time

from wsfan.bench import report  # the module, not its names: report.py imports the scenarios' sections
from wsfan.bench.scenarios import cluster, compression, connect, echo, fanout, heartbeat, rooms, storm
from wsfan.bench.suite import add_common, context_from, copy_latest, csv_words, run_scenario, settings_from

NAME = "all"
HELP = "every scenario (fanout, echo, heartbeat, storm, connect, cluster, compression, rooms) into one results folder, with report and plots"
PARTS = {m.NAME: m for m in (fanout, echo, heartbeat, storm, connect, cluster, compression, rooms)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--only", type=csv_words, help=f"subset of {','.join(PARTS)}")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    ctx = context_from(args)
    code = 0
    for name, module in PARTS.items():
        if args.only and name not in args.only:
            continue
        code |= run_scenario(
            name, module.measure, settings_from(module.Settings, module.QUICK, args), args, ctx, render=False
        )
    md = report.render_folder(ctx.out)
    print(f"report: {md} ({(time.monotonic() - started) / 60:.1f} min in all)")
    if args.publish:
        print(f"latest: {copy_latest(ctx.out, md)}")
    return code
