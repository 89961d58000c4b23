"""Reconnection storm cost: a crowd that connects and joins all at once, on wsfan, Bun, naive picows and wsfan of a baseline commit.

Each size is one crowd: ``N`` bare WebSocket clients on uvloop transports (role ``crowd``,
``bench/roles/crowd.py``: 1.5–2× less load-generator CPU per connect than picows' client)
spread over ``ceil(N / 19,000)`` load-generator processes (each process has its own hard
limit of 20,000 open files) and over many 127.a.b.1 source addresses (so the kernel's
ephemeral-port search stays short), all pinned to the load-generator core, the server to
the server core. Every client connects, sends its join as soon as the upgrade is answered,
and is **rejoined** when the server's join ack arrived (rooms ``crowd-0..rooms-1``, spread
evenly). Two waves per server:

- ``connect``: the crowd arrives at a freshly started server;
- ``reconnect``: the same crowd drops every TCP connection at once (no close frame, as after a
  network blip), the server is left to notice and clean up until its CPU is quiet, then the
  whole crowd comes back at once. This is the reconnection storm; ``connect`` is kept beside
  it to show what a warm server saves.

Figures per wave:

- **server CPU per connect + join** = (utime + stime of the server's whole process tree, read
  from ``/proc/<pid>/stat`` via psutil, at the end of the wave − at its start) ÷ clients
  rejoined. The wave starts when the harness tells the load generators to go and ends when
  every load generator reported; it holds TCP accept, the upgrade, the session, the welcome,
  the join and its ack, and the kernel's share of loopback TCP that ran in the server's
  context (the client side's share runs on the load-generator core).
- **time to all rejoined** (``t100``) = last join ack − go, on CLOCK_MONOTONIC shared by
  every process; ``t50``/``t99`` likewise. **Connects/s** = clients rejoined ÷ t100.
- **KB per idle connection** = (server tree RSS with the crowd joined and idle, ``settle``
  seconds after the wave − RSS before the first wave) ÷ clients. After ``reconnect`` this
  also shows whether a storm leaves memory behind.
- **which side saturated**: each side's CPU over the wave ÷ wall time, the side at ≥ 90 % of
  its core named (``bench/harness.py``); several load-generator processes share one core.

A process holds at most ``nofile - 500`` connections (19,500 with the limit of 20,000 here):
size 0 means that. ``--workers-sizes`` crowds go to ``wsfan --workers 2`` behind a private
``redis-server`` (both workers pinned to the server core): a crowd larger than one process
can hold (30,000 by default), each worker holding its own share under its own limit; the
redis-server's CPU per connect + join is given apart (it is not in the server's process tree).
``--baseline REF`` adds the same server at commit ``REF`` (``bench/baselines/commit.py``),
measured in the same run, so gains show as ratios against it as well as against Bun; the
JSON records its full commit hash.

The naive picows server (``bench/baselines/naive_picows.py``) runs by default at the sizes up
to ``baseline_max_size`` (10,000): **the floor of picows on uvloop**. It answers the same
upgrade with picows' own handshake, sends a welcome and acks the same join frame (its decoder
is the project's ``wire.Join``) with nothing else per connection, so the same crowd measures
it unchanged and wsfan ÷ naive is what wsfan adds on top of its stack.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from wsfan.bench.baselines.commit import BaselineError, tree
from wsfan.bench.harness import BenchError, LoadGen, LoadGenGroup, Meter, ServerProcess
from wsfan.bench.roles.pacing import clock
from wsfan.bench.scenarios.cluster import INSTALL_HINT, redis_binary, start_redis
from wsfan.bench.scenarios.heartbeat import max_connections
from wsfan.bench.servers import ALL, WSFAN, Variant
from wsfan.bench.suite import (
    PER_PROCESS_CONNECTIONS,
    Context,
    add_common,
    closed_loop_bottleneck,
    csv_ints,
    csv_words,
    interval_dict,
    measure_each,
    run_scenario,
    settings_from,
)

NAME = "connect"
HELP = (
    "reconnection storm cost: a crowd of 10,000 / one process's max / 30,000 over 2 workers connects and joins "
    "at once: server CPU per connect+join, connects/s, time to all rejoined, KB per idle connection; wsfan vs Bun "
    "vs naive picows (the floor of picows on uvloop) vs a baseline commit"
)

#: Today's wsfan when this scenario was written (main before issue #19's work): the default --baseline.
BASELINE_COMMIT = "03ec70803d448d56a458cc72369ac7e291dbbdc4"
WAVES = ("connect", "reconnect")


@dataclass
class Settings:
    # naive picows: the floor of picows on uvloop (up to baseline_max_size); websockets with --variants.
    variants: tuple[str, ...] = ("wsfan", "bun", "naive")
    sizes: tuple[int, ...] = (10_000, 0)  # 0 = as many as one server process can hold
    workers_sizes: tuple[int, ...] = (30_000,)
    baseline_max_size: int = 10_000  # naive and websockets only up to this size
    rooms: int = 100
    concurrency: int = 1000  # handshakes in flight over all load-generator processes
    timeout: float = 120.0  # per wave
    settle: float = 1.0
    quiet_limit: float = 20.0  # at most this long waiting for the server to finish the drop
    baseline: str = BASELINE_COMMIT  # "" or "none": no baseline server


QUICK: dict[str, Any] = {
    "sizes": (100,),
    "workers_sizes": (150,),
    "rooms": 10,
    "concurrency": 100,
    "timeout": 15.0,
    "settle": 0.2,
    "quiet_limit": 3.0,
    "baseline": "",
}
#: The quick size: a quick crowd's CPU is already near one 10 ms tick per row.
SMOKE: dict[str, Any] = {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument(
        "--variants",
        type=csv_words,
        help="servers (default wsfan,bun,naive; naive and websockets only up to 10,000)",
    )
    p.add_argument(
        "--sizes", type=csv_ints, help="crowd sizes for one server process; 0 = its max (default 10000,0)"
    )
    p.add_argument(
        "--workers-sizes",
        type=csv_ints,
        help="crowd sizes for wsfan --workers 2 behind redis (default 30000; empty string = none)",
    )
    p.add_argument("--rooms", type=int, help="rooms the crowd joins, spread evenly (default 100)")
    p.add_argument(
        "--concurrency", type=int, help="handshakes in flight over all load generators (default 1000)"
    )
    p.add_argument("--timeout", type=float, help="seconds one wave may take (default 120)")
    p.add_argument(
        "--baseline",
        help=f"git ref of the wsfan to compare with in the same run (default {BASELINE_COMMIT[:7]}, "
        "quick: none; 'none' turns it off)",
    )


@dataclass(frozen=True)
class Crowd:
    variant: Variant
    size: int
    workers: int = 1

    @property
    def key(self) -> str:
        return self.variant.key + (f"-w{self.workers}" if self.workers > 1 else "")


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def wait_quiet(server: ServerProcess, limit: float, below: float = 0.05, step: float = 0.25) -> float:
    """Sleep until the server's CPU over ``step`` is under ``below`` of a core (at most ``limit`` s); seconds waited."""
    t0 = time.monotonic()
    last = server.cpu_seconds()
    while time.monotonic() - t0 < limit:
        time.sleep(step)
        now = server.cpu_seconds()
        if (now - last) / step < below:
            break
        last = now
    return time.monotonic() - t0


def percentile(sorted_times: list[float], q: float) -> float | None:
    if not sorted_times:
        return None
    return sorted_times[min(len(sorted_times) - 1, max(0, math.ceil(q * len(sorted_times)) - 1))]


def measure_crowd(ctx: Context, s: Settings, c: Crowd) -> list[dict[str, Any]]:
    redis: ServerProcess | None = None
    extra: list[str] = []
    if c.workers > 1:
        binary = redis_binary()
        if binary is None:
            raise BenchError(f"--workers {c.workers} needs redis-server: {INSTALL_HINT}")
        redis = start_redis(ctx, binary)
        extra = ["--workers", str(c.workers), "--broker", f"redis://127.0.0.1:{redis.port}/0"]
    try:
        server = ctx.servers.start(c.variant, extra=extra, name=f"{c.key}-crowd{c.size}")
        try:
            return _measure(ctx, s, c, server, redis)
        finally:
            code = server.stop()
            if code not in (0, None):
                print(f"   connect {c.key} {c.size}: server exit code {code}", flush=True)
    finally:
        if redis is not None:
            redis.stop()


def _measure(
    ctx: Context, s: Settings, c: Crowd, server: ServerProcess, redis: ServerProcess | None
) -> list[dict[str, Any]]:
    time.sleep(0.3 if ctx.quick else 1.0)
    rss0 = server.rss()
    procs = max(ctx.client_procs, -(-c.size // PER_PROCESS_CONNECTIONS))
    sizes = shares(c.size, procs)
    gens = LoadGenGroup(
        LoadGen(
            f"{c.key}-crowd{c.size}-{i}",
            {
                "role": "crowd",
                "url": f"ws://127.0.0.1:{server.port}/ws",
                "connections": n,
                "rooms": s.rooms,
                "room_offset": sum(sizes[:i]),
                "concurrency": max(1, s.concurrency // procs),
            },
            cpu=ctx.client_cpu,
        )
        for i, n in enumerate(sizes)
    )
    rows = []
    with gens:
        gens.start()
        gens.expect_all("ready", timeout=60)
        for wave in WAVES:
            quiet_s = None
            if wave == "reconnect":
                gens.broadcast(cmd="drop")
                gens.expect_all("dropped", timeout=60)
                quiet_s = wait_quiet(server, s.quiet_limit)
            meter = Meter(server, gens)
            redis0 = redis.cpu_seconds() if redis is not None else 0.0
            meter.start()
            at = clock()
            gens.broadcast(cmd="connect", at=at, timeout=s.timeout)
            reports = gens.expect_all("joined", timeout=s.timeout + 60)
            iv = meter.stop()
            redis_s = redis.cpu_seconds() - redis0 if redis is not None else None
            time.sleep(s.settle)
            rss = server.rss()
            times = sorted(t for r in reports for t in r["times"])
            rejoined = sum(r["rejoined"] for r in reports)
            failures: dict[str, int] = {}
            for r in reports:
                for k, v in r["failures"].items():
                    failures[k] = failures.get(k, 0) + v
            t100 = times[-1] if times else None
            rows.append(
                {
                    "variant": c.key,
                    "size": c.size,
                    "phase": wave,
                    "workers": c.workers,
                    "load_generators": procs,
                    "rejoined": rejoined,
                    "attempts": sum(r["attempts"] for r in reports),
                    "failures": failures,
                    "errors": sum(r["errors"] for r in reports),
                    "t50_s": percentile(times, 0.5),
                    "t99_s": percentile(times, 0.99),
                    "t100_s": t100,
                    "connects_per_s": rejoined / t100 if t100 else None,
                    "server_us_per_connect": iv.server_cpu_s / rejoined * 1e6 if rejoined else None,
                    "loadgen_us_per_connect": iv.loadgen_cpu_s / rejoined * 1e6 if rejoined else None,
                    # --workers: the broker's redis-server (on the server core too, not in the server's tree)
                    "redis_us_per_connect": redis_s / rejoined * 1e6
                    if rejoined and redis_s is not None
                    else None,
                    "rss_before": rss0,
                    "rss_after": rss,
                    "kb_per_connection": (rss - rss0) / rejoined / 1024 if rejoined else None,
                    "quiet_wait_s": quiet_s,
                    "interval": interval_dict(iv, ctx, closed_loop_bottleneck(iv, ctx)),
                }
            )
    return rows


def crowds(ctx: Context, s: Settings) -> list[Crowd]:
    cap = max_connections(ctx.nofile)
    variants = ctx.servers.available([v for v in s.variants if v in ALL])
    base: Variant | None = None
    if s.baseline and s.baseline.lower() != "none":
        try:
            folder, sha = tree(s.baseline)
        except BaselineError as exc:
            ctx.servers.skipped[f"wsfan@{s.baseline}"] = str(exc)
        else:
            base = replace(
                WSFAN,
                key=f"wsfan@{sha[:7]}",
                label=f"wsfan {sha[:7]} (baseline)",
                baseline=True,
                cwd=str(folder),
                note=f"wsfan at commit {sha}",
            )
    out = []
    for size in dict.fromkeys(min(cap, n) if n > 0 else cap for n in s.sizes):
        for v in [*variants[:1], *([base] if base else []), *variants[1:]]:
            if v.kind in ("naive", "websockets") and size > s.baseline_max_size:
                continue
            out.append(Crowd(v, size))
    for size in s.workers_sizes:
        for v in (WSFAN, base):
            if v is not None:
                out.append(Crowd(v, size, workers=2))
    return out


def describe(r: dict[str, Any]) -> str:
    def t(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}s"

    us = r["server_us_per_connect"]
    kb = r["kb_per_connection"]
    return (
        f"   connect {r['variant']:<16} {r['size']:>6,} {r['phase']:<9} {r['rejoined']:>6,} rejoined "
        f"t50 {t(r['t50_s'])} t100 {t(r['t100_s'])} {r['connects_per_s'] or 0:>7,.0f}/s "
        f"{'—' if us is None else f'{us:.0f}'} µs server CPU/connect+join "
        f"{'—' if kb is None else f'{kb:.2f}'} KB/conn; {r['interval']['bottleneck']}"
    )


def checks(rows: list[dict[str, Any]]) -> list[str]:
    failures = []
    for r in rows:
        tag = f"connect {r['variant']} {r['size']} {r['phase']}"
        if r["rejoined"] != r["size"]:
            failures.append(f"{tag}: {r['rejoined']} of {r['size']} rejoined (failures {r['failures']})")
        if r["errors"]:
            failures.append(f"{tag}: {r['errors']} error replies")
    return failures


def measure(ctx: Context, s: Settings) -> dict[str, Any]:
    todo = crowds(ctx, s)
    result = measure_each(NAME, todo, lambda c: measure_crowd(ctx, s, c), describe, checks, key=_key)
    result["baseline"] = next((c.variant.note for c in todo if c.variant.cwd), None)
    result["max_connections"] = max_connections(ctx.nofile)
    return result


def _key(c: Crowd) -> str:
    return f"{c.key} {c.size}"


def run(args: argparse.Namespace) -> int:
    s = settings_from(Settings, QUICK, args, SMOKE)
    if s.baseline.lower() == "none":
        s.baseline = ""
    return run_scenario(NAME, measure, s, args)
