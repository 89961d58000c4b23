"""What every scenario of the full suite shares: options, the run folder, the JSON files, bottleneck words.

A run writes into one folder, ``results/<YYYYMMDD-HHMM>-<host>/`` (``--quick`` runs
into ``results/tmp/quick-<host>/``, which git ignores): ``machine.json`` and one
``<scenario>.json`` per scenario (raw figures, settings, load averages), then
``report.md`` and the PNG plots rebuilt from whatever JSON files the folder
holds. Unless ``--publish`` is given, a full run writes under ``results/local/`` (git-ignored);
only a published ``all`` run writes ``results/<YYYYMMDD-HHMM>-<host>/`` and ``results/latest.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from wsfan.bench.baselines.bun import ensure_bun
from wsfan.bench.harness import (
    CLIENT_CPU,
    LAG_LIMIT_US,
    LOGS,
    SATURATED,
    SERVER_CPU,
    BenchError,
    Interval,
    raise_nofile,
    reset_logs,
)
from wsfan.bench.repeats import combine
from wsfan.bench.results import RESULTS, machine_info, results_dir
from wsfan.bench.servers import Servers

# A process holds at most this many sockets: the machine's hard open-file limit is 20,000 and cannot be raised.
PER_PROCESS_CONNECTIONS = 19_000


@dataclass
class Context:
    out: Path
    quick: bool
    servers: Servers
    server_cpu: int
    client_cpu: int
    client_procs: int
    samples: Path
    nofile: int

    @property
    def cpus(self) -> tuple[int | None, int | None]:
        return (
            self.server_cpu if self.server_cpu >= 0 else None,
            self.client_cpu if self.client_cpu >= 0 else None,
        )


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick", action="store_true", help="CI-sized run (seconds, not minutes); figures indicative only"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="smaller than --quick (and implies it): the fewest clients, rooms and seconds that still run every "
        "code path of the scenario and write every table and plot; the test suite's size, figures meaningless",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="run folder (default results/local/<YYYYMMDD-HHMM>-<host>/, quick: results/tmp/, "
        "--publish: results/<YYYYMMDD-HHMM>-<host>/)",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="a run to commit: write under results/ (and results/latest.md); only on a quiet machine",
    )
    p.add_argument(
        "--repeat",
        type=int,
        help="measure each scenario this many times; rows keep the median and each figure's min/median/max "
        "(default 3, quick runs 1)",
    )
    p.add_argument(
        "--client-procs", type=int, default=1, help="load-generator processes, all on the client core"
    )
    p.add_argument(
        "--server-cpu", type=int, default=SERVER_CPU, help="core the servers are pinned to; -1 = unpinned"
    )
    p.add_argument(
        "--client-cpu", type=int, default=CLIENT_CPU, help="core the load generators are pinned to"
    )
    p.add_argument(
        "--bun",
        choices=("auto", "install", "off"),
        default="auto",
        help="Bun baseline: auto = install with npm on full runs, use only if already installed on quick runs",
    )


def default_out(quick: bool, publish: bool = False) -> Path:
    """The run folder: see :func:`wsfan.bench.results.results_dir` for which runs may touch results/."""
    host = socket.gethostname().split(".")[0] or "host"
    if quick:
        return results_dir(quick, publish) / f"quick-{host}"
    return results_dir(quick, publish) / f"{dt.datetime.now():%Y%m%d-%H%M}-{host}"


def context_from(args: argparse.Namespace, connections_hint: int = 20_000) -> Context:
    try:
        out = (args.out or default_out(args.quick, getattr(args, "publish", False))).resolve()
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    install = args.bun == "install" or (args.bun == "auto" and not args.quick)
    bun, note = (None, "Bun turned off (--bun off)") if args.bun == "off" else ensure_bun(install)
    reset_logs()
    samples = LOGS / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        out=out,
        quick=args.quick,
        servers=Servers(cpu=args.server_cpu, bun=bun, bun_note=note),
        server_cpu=args.server_cpu,
        client_cpu=args.client_cpu,
        client_procs=max(1, args.client_procs),
        samples=samples,
        nofile=raise_nofile(connections_hint + 1000),
    )
    machine = machine_info()
    machine["bun"] = note
    machine["nofile"] = ctx.nofile
    (out / "machine.json").write_text(json.dumps(machine, indent=2, default=str) + "\n")
    return ctx


S = TypeVar("S")


def settings_from(
    cls: type[S], quick: dict[str, Any], args: argparse.Namespace, smoke: dict[str, Any] | None = None
) -> S:
    """Defaults, then the quick overrides, then (``--smoke``) the smoke ones, then any option given explicitly."""
    s = cls()
    if args.quick or getattr(args, "smoke", False):
        for k, v in quick.items():
            setattr(s, k, v)
    if getattr(args, "smoke", False):
        for k, v in (smoke or {}).items():
            setattr(s, k, v)
    for f in fields(cls):  # type: ignore[arg-type]
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(s, f.name, type(getattr(s, f.name))(v) if isinstance(getattr(s, f.name), tuple) else v)
    return s


def csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def csv_words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def save(
    ctx: Context, name: str, settings: Any, data: dict[str, Any], started: float, load0: list[float]
) -> Path:
    payload = {
        "scenario": name,
        "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "quick": ctx.quick,
        "loadavg_before": load0,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "settings": asdict(settings),
        "skipped": dict(ctx.servers.skipped),
        "client_procs": ctx.client_procs,
        "cpus": {"server": ctx.server_cpu, "client": ctx.client_cpu},
        "data": data,
    }
    path = ctx.out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def run_scenario(
    name: str,
    measure: Callable[[Context, Any], dict[str, Any]],
    settings: Any,
    args: argparse.Namespace,
    ctx: Context | None = None,
    render: bool = True,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Measure one scenario (``--repeat`` times) into the run folder and rebuild the folder's report.

    Returns 0 when every check of every repetition passed. ``progress(k)`` is called before
    repetition ``k`` (``bench all`` prints its step counter and time estimate there).
    """
    # Imported here: report.py renders the scenarios' sections (compression.section), whose modules import this one.
    from wsfan.bench.report import render_folder

    ctx = ctx or context_from(args)
    load0 = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    repeat = repeats_of(args)
    print(f"== {name} ({'quick' if ctx.quick else 'full'}, {repeat}×) -> {ctx.out}", flush=True)
    runs = []
    for k in range(repeat):
        if repeat > 1:
            print(f"   {name}: repetition {k + 1}/{repeat}", flush=True)
        if progress is not None:
            progress(k)
        runs.append(measure(ctx, settings))
    data = combine(runs)
    path = save(ctx, name, settings, data, started, load0)
    print(f"   wrote {path} ({time.monotonic() - started:.0f} s)", flush=True)
    if render:
        md = render_folder(ctx.out)
        print(f"   report: {md}", flush=True)
    failures = data.get("failures", [])
    for f in failures:
        print(f"   CHECK FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def repeats_of(args: argparse.Namespace) -> int:
    """``--repeat``, else 3 for a full run and 1 for a quick one."""
    n = getattr(args, "repeat", None)
    return max(1, n) if n else (1 if getattr(args, "quick", False) else 3)


def clean_samples(paths: list[str | None]) -> None:
    for p in paths:
        if p:
            with contextlib.suppress(OSError):
                os.unlink(p)


def copy_latest(folder: Path, md: Path) -> Path:
    """``results/latest.md``: the folder's report with image links made relative to ``results/``."""
    rel = os.path.relpath(folder, RESULTS)
    text = md.read_text().replace("](./", f"]({rel}/")
    latest = RESULTS / "latest.md"
    latest.write_text(text)
    return latest


# ---------------------------------------------------------------- bottleneck words


def closed_loop_bottleneck(iv: Interval, ctx: Context) -> str:
    """A closed loop runs as fast as the slower side: whichever core was full is the bottleneck."""
    return iv.bottleneck(*ctx.cpus)


def open_loop_bottleneck(iv: Interval, ctx: Context, lag_p99_us: float | None, missing: int) -> str:
    """Open loop: the load generator spins to pace, so its CPU says nothing; its schedule lag does.

    Both sides can be named: a server that fell behind, and a load generator whose
    sends left late (its lag is part of every latency measured from the intended time).
    """
    found = []
    server_other = iv.other_load(ctx.cpus[0], iv.server_util)
    if iv.server_util >= SATURATED:
        found.append("server")
    elif missing:
        found.append("server (replies missing)")
    elif server_other is not None and iv.server_util + server_other >= SATURATED:
        found.append("server (shared core)")
    if lag_p99_us is not None and lag_p99_us > LAG_LIMIT_US:
        found.append(f"load generator (sent late: p99 lag {lag_p99_us / 1000:.1f} ms)")
    return " and ".join(found) or "neither (below capacity)"


def interval_dict(iv: Interval, ctx: Context, bottleneck: str) -> dict[str, Any]:
    d = iv.to_dict(*ctx.cpus)
    d["bottleneck"] = bottleneck
    return d


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def measure_each(
    scenario: str,
    keys: Iterable[Any],
    measure_one: Callable[[Any], list[dict[str, Any]]],
    describe: Callable[[dict[str, Any]], str],
    checks: Callable[[list[dict[str, Any]]], list[str]],
    key: Callable[[Any], str] = str,
) -> dict[str, Any]:
    """The scenario loop: measure each variant (or mode) in turn, print one line per row, then check the rows.

    A variant whose measurement raises ``BenchError`` is recorded under ``errors`` (first 2,000
    characters) and the others still run. Returns ``{"rows", "errors", "failures"}``, the shape
    ``run_scenario`` saves and the report reads.
    """
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for k in keys:
        try:
            found = measure_one(k)
        except BenchError as exc:
            errors[key(k)] = str(exc)[:2000]
            print(f"   {scenario} {key(k)}: FAILED {exc}", flush=True)
            continue
        rows += found
        for r in found:
            print(describe(r), flush=True)
    failures = checks(rows) + [f"{scenario} {k}: {e}" for k, e in errors.items()]
    return {"rows": rows, "errors": errors, "failures": failures}
