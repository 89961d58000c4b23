"""``python -m wsfan.bench all``: every scenario of the suite into one run folder, then report.md and plots (``--publish``: also results/latest.md).

Order: fan-out, echo, heartbeat, reconnection storm, its cost per connect + join (connect), cluster, compression, rooms (the core
scenario stays separate: ``make bench-core``). A full run takes about 20
minutes on 2 cores; ``--quick`` is the CI-sized version (about 2 minutes: 2 min 4 s on the 2-core
reference machine shared with other work, up to 3 on a busier one). A
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


#: Seconds each scenario took in ``all --quick`` on the 2-core reference machine, shared with other
#: work (load average 2.3): 2 min 4 s in all with the report (2026-11-30).
DEFAULT_QUICK_SECONDS = {
    "fanout": 16.0,
    "echo": 9.0,
    "heartbeat": 8.0,
    "storm": 24.0,
    "connect": 10.0,
    "cluster": 16.0,
    "compression": 11.0,
    "rooms": 26.0,
}


def _estimates(quick: bool) -> dict[str, float]:
    """Seconds per repetition of each scenario: the newest earlier run of the same size if any, else defaults."""
    est = dict(DEFAULT_QUICK_SECONDS) if quick else {k: v * 60 for k, v in DEFAULT_MINUTES.items()}
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


class TimeLeft:
    """The progress line's estimate of the time left: the estimates of the steps to come (``_estimates``),
    scaled by how the finished steps compared to theirs (a shared or slower machine takes longer than
    any earlier run said: 2.8 min for a quick run the defaults put at 1.6), shown in seconds under
    1.5 min, so that it never says "about 0 min left" while steps remain.
    """

    def __init__(self, steps: list[float], clock: Callable[[], float] = time.monotonic) -> None:
        self.steps = steps  # estimated seconds of each step, in order
        self.clock = clock
        self.started = clock()
        self.done = -1  # steps finished; -1 until the first starts

    def next_step(self) -> None:
        """A step starts: the one before it (if any) is over."""
        self.done += 1

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds left for the steps not finished (the current one included)."""
        done = max(self.done, 0)
        ahead = sum(self.steps[done:])
        behind = sum(self.steps[:done])
        scale = self.elapsed() / behind if done and behind > 0 else 1.0
        return ahead * min(max(scale, 0.25), 10.0)

    def text(self) -> str:
        left = self.left()
        about = f"{max(10, round(left / 10) * 10):.0f} s" if left < 90 else f"{left / 60:.0f} min"
        return f"{self.elapsed() / 60:.1f} min elapsed, about {about} left"


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    ctx = context_from(args)
    code = 0
    names = [n for n in PARTS if not args.only or n in args.only]
    repeat = repeats_of(args)
    est = _estimates(args.quick)
    total, step = len(names) * repeat, 0
    eta = TimeLeft([est.get(n, 60.0) for n in names for _ in range(repeat)])

    def progress(name: str) -> Callable[[int], None]:
        def show(k: int) -> None:
            nonlocal step
            eta.next_step()
            step += 1
            print(f"[{step}/{total}] {name} {k + 1}/{repeat} — {eta.text()}", flush=True)

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
