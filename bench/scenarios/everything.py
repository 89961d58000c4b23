"""``python -m wsfan.bench all``: every scenario of the suite into one run folder, then report.md and plots (``--publish``: also results/latest.md).

Order: fan-out, echo, heartbeat, reconnection storm, its cost per connect + join (connect), cluster, compression, rooms (the core
scenario stays separate: ``make bench-core``). A full run takes about 20
minutes on 2 cores; ``--quick`` is the CI-sized version (under a minute). A
scenario that fails is recorded and the others still run; the exit code is 1
when any check failed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from wsfan.bench import report  # the module, not its names: report.py imports the scenarios' sections
from wsfan.bench.results import RESULTS
from wsfan.bench.scenarios import cluster, compression, connect, echo, fanout, heartbeat, rooms, storm
from wsfan.bench.suite import (
    add_common,
    context_from,
    copy_latest,
    csv_words,
    repeats_of,
    run_scenario,
    settings_from,
)

NAME = "all"
HELP = "every scenario (fanout, echo, heartbeat, storm, connect, cluster, compression, rooms) into one results folder, with report and plots"
PARTS = {m.NAME: m for m in (fanout, echo, heartbeat, storm, connect, cluster, compression, rooms)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--only", type=csv_words, help=f"subset of {','.join(PARTS)}")


#: Minutes one repetition of each scenario took in a full run on the 2-core reference machine,
#: for the time-left estimate when no earlier run folder says better (see ``_estimates``).
DEFAULT_MINUTES = {
    "fanout": 3.0,
    "echo": 1.5,
    "heartbeat": 1.5,
    "storm": 2.5,
    "connect": 3.0,
    "cluster": 1.5,
    "compression": 1.0,
    "rooms": 1.5,
}


def _estimates(quick: bool) -> dict[str, float]:
    """Seconds per repetition of each scenario: the newest earlier run of the same size if any, else defaults."""
    est = {k: v * 60 * (0.1 if quick else 1.0) for k, v in DEFAULT_MINUTES.items()}
    for folder in sorted((p for p in RESULTS.rglob("*/") if (p / "machine.json").exists()), reverse=True):
        found = False
        for name in PARTS:
            path = folder / f"{name}.json"
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if bool(doc.get("quick")) == quick and doc.get("seconds"):
                est[name] = float(doc["seconds"]) / max(1, int(doc["data"].get("repeats", 1)))
                found = True
        if found:
            break
    return est


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    ctx = context_from(args)
    code = 0
    names = [n for n in PARTS if not args.only or n in args.only]
    repeat = repeats_of(args)
    est = _estimates(args.quick)
    total, step = len(names) * repeat, 0
    remaining = sum(est.get(n, 60.0) for n in names) * repeat

    def progress(name: str) -> Callable[[int], None]:
        def show(k: int) -> None:
            nonlocal step, remaining
            if step:  # the previous step is over: what is left, from the estimates of the steps to come
                remaining = max(0.0, remaining - est.get(names[(step - 1) // repeat], 60.0))
            step += 1
            elapsed = time.monotonic() - started
            print(
                f"[{step}/{total}] {name} {k + 1}/{repeat} — {elapsed / 60:.1f} min elapsed, "
                f"about {remaining / 60:.0f} min left",
                flush=True,
            )

        return show

    for name in names:
        module = PARTS[name]
        code |= run_scenario(
            name,
            module.measure,
            settings_from(module.Settings, module.QUICK, args, module.SMOKE),
            args,
            ctx,
            render=False,
            progress=progress(name),
        )
    md = report.render_folder(ctx.out)
    print(f"report: {md} ({(time.monotonic() - started) / 60:.1f} min in all)")
    if args.publish:
        print(f"latest: {copy_latest(ctx.out, md)}")
    return code
