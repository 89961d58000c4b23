"""Heartbeat overhead: server CPU and memory with idle connections, per heartbeat interval.

One server per (variant, connection count, interval), each with that many idle
connections; the load generators answer every ping and count them per server.
Servers are measured side by side, pinned to the server core, in a few groups:
all "light" servers of one variant share one window of ``--window`` seconds (at
least the longest interval, so every interval's pings fall in it), and a server
expected to need more than a quarter of the core (websockets at 1 s with 10,000
connections) gets a shorter window of its own, so that no group fills the core.
CPU % = the server's CPU seconds / window; idle servers barely use the core, so
neighbours do not change what each one costs, and the core's total busy time
is reported next to the figures.

RSS per connection = (server RSS with the connections − RSS before any) / connections.
``websockets`` runs with its own ``ping_interval`` at the same intervals (it
sends a ping every interval whether or not the peer was quiet; wsfan pings only
connections idle for a full interval, which is every connection here). The
naive picows loop has no heartbeat and Bun's (uWebSockets') timer ticks every
4 s and ties pings to its idle timeout, so neither has an interval to compare.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from wsfan.bench.harness import BenchError, LoadGen, LoadGenGroup, ServerProcess, core_times
from wsfan.bench.suite import (
    PER_PROCESS_CONNECTIONS,
    Context,
    add_common,
    csv_ints,
    csv_words,
    run_scenario,
    settings_from,
)

NAME = "heartbeat"
HELP = "server CPU %% and RSS per connection with 1k/10k/max idle connections, heartbeat 1 s/5 s/30 s/off"


@dataclass
class Settings:
    variants: tuple[str, ...] = ("wsfan", "websockets")
    counts: tuple[int, ...] = (1000, 10000, 19500)
    intervals_ms: tuple[int, ...] = (1000, 5000, 30000, 0)
    window: float = 31.0
    warmup: float = 3.0
    baseline_max_count: int = 10000


QUICK: dict[str, Any] = {"counts": (200,), "intervals_ms": (1000, 0), "window": 1.6, "warmup": 0.3}
#: The quick size: a 1 s heartbeat must ping inside the window, and fewer connections can leave no RSS to measure.
SMOKE: dict[str, Any] = {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--variants", type=csv_words, help="servers (default wsfan,websockets)")
    p.add_argument("--counts", type=csv_ints, help="idle connections per server (default 1000,10000,19500)")
    p.add_argument(
        "--intervals-ms", type=csv_ints, help="heartbeat intervals in ms, 0 = off (default 1000,5000,30000,0)"
    )
    p.add_argument("--window", type=float, help="measuring window in seconds (default 31)")


def max_connections(nofile: int) -> int:
    """What one server process can hold: the open-file limit minus a margin for everything else."""
    return max(100, min(20_000, nofile - 500))


def _chunks(targets: list[tuple[int, str, int]]) -> list[list[tuple[int, str, int]]]:
    """Spread (slot, url, n) over processes of at most PER_PROCESS_CONNECTIONS connections each."""
    procs: list[list[tuple[int, str, int]]] = [[]]
    room = PER_PROCESS_CONNECTIONS
    for slot, url, n in targets:
        while n > 0:
            take = min(n, room)
            procs[-1].append((slot, url, take))
            n -= take
            room -= take
            if room == 0:
                procs.append([])
                room = PER_PROCESS_CONNECTIONS
    return [p for p in procs if p]


# Rough server CPU per ping (µs), only to plan which servers can share the core in one window.
PING_COST_US = {"wsfan": 12.0, "websockets": 100.0}
HEAVY = 0.25  # a server expected to use more than this share of the core gets a window of its own


@dataclass(frozen=True)
class Cell:
    variant: Any
    count: int
    heartbeat_ms: int

    @property
    def expected_util(self) -> float:
        if not self.heartbeat_ms:
            return 0.0
        return self.count / (self.heartbeat_ms / 1000) * PING_COST_US.get(self.variant.kind, 100.0) / 1e6


def plan(cells: list[Cell], window: float) -> list[tuple[list[Cell], float]]:
    """Groups of servers measured side by side, each with its window.

    Light servers of one variant share one window as long as the longest interval;
    a heavy one (short interval, many connections) runs alone, with a window of a
    few intervals, so that no group fills the core and disturbs its neighbours.
    """
    groups: list[tuple[list[Cell], float]] = []
    for key in dict.fromkeys(c.variant.key for c in cells):
        mine = [c for c in cells if c.variant.key == key]
        light = [c for c in mine if c.expected_util < HEAVY]
        if light:
            groups.append((light, window))
        for c in mine:
            if c.expected_util >= HEAVY:
                groups.append(([c], min(window, max(5.0, 5 * c.heartbeat_ms / 1000))))
    return groups


def measure_group(ctx: Context, s: Settings, cells: list[Cell], window: float) -> list[dict[str, Any]]:
    servers: list[tuple[Cell, ServerProcess]] = []
    try:
        for c in cells:
            name = f"{c.variant.key}-hb{c.heartbeat_ms}-{c.count}"
            servers.append((c, ctx.servers.start(c.variant, heartbeat_ms=c.heartbeat_ms, name=name)))
        time.sleep(0.5)
        rss0 = [srv.rss() for _, srv in servers]
        targets = [(slot, f"ws://127.0.0.1:{srv.port}/ws", c.count) for slot, (c, srv) in enumerate(servers)]
        gens = LoadGenGroup(
            LoadGen(
                f"idle-{cells[0].variant.key}-{i}",
                {"role": "idle_multi", "targets": chunk},
                cpu=ctx.client_cpu,
            )
            for i, chunk in enumerate(_chunks(targets))
        )
        with gens:
            gens.start()
            t = time.monotonic()
            ready = gens.expect_all("ready", timeout=900)
            connect_s = time.monotonic() - t
            time.sleep(s.warmup)
            gens.broadcast(cmd="count")
            gens.expect_all("counts", timeout=60)
            cpu0 = [srv.cpu_seconds() for _, srv in servers]
            lg0 = gens.cpu_seconds()
            core0 = core_times()
            w0 = time.perf_counter()
            time.sleep(window)
            wall = time.perf_counter() - w0
            cpu1 = [srv.cpu_seconds() for _, srv in servers]
            lg1 = gens.cpu_seconds()
            core1 = core_times()
            gens.broadcast(cmd="count")
            counts = gens.expect_all("counts", timeout=60)
            rss1 = [srv.rss() for _, srv in servers]
    finally:
        codes = [srv.stop() for _, srv in servers]
    busy = [(b1 - b0) / max(t1 - t0, 1e-9) for (t0, b0, _), (t1, b1, _) in zip(core0, core1, strict=False)]
    server_core = busy[ctx.server_cpu] if 0 <= ctx.server_cpu < len(busy) else None
    ours = sum(c1 - c0 for c0, c1 in zip(cpu0, cpu1, strict=True)) / wall
    rows = []
    for slot, (c, _) in enumerate(servers):
        pings = sum(x["pings"][slot] for x in counts if slot < len(x["pings"]))
        still_open = sum(x["open"][slot] for x in counts if slot < len(x["open"]))
        cpu = cpu1[slot] - cpu0[slot]
        rows.append(
            {
                "variant": c.variant.key,
                "connections": c.count,
                "heartbeat_ms": c.heartbeat_ms,
                "window_s": wall,
                "server_cpu_s": cpu,
                "server_cpu_pct": cpu / wall * 100,
                "pings": pings,
                "pings_per_s": pings / wall,
                "server_us_per_ping": cpu / pings * 1e6 if pings else None,
                "rss_before": rss0[slot],
                "rss_after": rss1[slot],
                "bytes_per_connection": (rss1[slot] - rss0[slot]) / c.count,
                "open_at_end": still_open,
                "server_exit_code": codes[slot],
                "connect_seconds": connect_s,
                "loadgen_util": (lg1 - lg0) / wall,
                "server_core_busy": server_core,
                "servers_side_by_side": len(servers),
                "servers_util_sum": ours,
                "ready": [r["connections"] for r in ready],
            }
        )
    return rows


def checks(rows: list[dict[str, Any]]) -> list[str]:
    failures = []
    for r in rows:
        tag = f"heartbeat {r['variant']} {r['connections']} conns {r['heartbeat_ms']} ms"
        if r["open_at_end"] != r["connections"]:
            failures.append(f"{tag}: {r['open_at_end']} of {r['connections']} connections still open")
        if r["heartbeat_ms"] == 0 and r["pings"]:
            failures.append(f"{tag}: {r['pings']} pings with heartbeats off")
        if r["heartbeat_ms"] and r["window_s"] >= r["heartbeat_ms"] / 1000 * 1.2 and not r["pings"]:
            failures.append(f"{tag}: no ping in a {r['window_s']:.1f} s window")
        if not 0 <= r["server_cpu_pct"] <= 100 * 1.05:
            failures.append(f"{tag}: CPU {r['server_cpu_pct']:.1f}% out of range")
    return failures


def measure(ctx: Context, s: Settings) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    cap = max_connections(ctx.nofile)
    cells = [
        Cell(v, min(count, cap), hb)
        for v in ctx.servers.available(s.variants)
        for count in s.counts
        if not v.baseline or count <= s.baseline_max_count
        for hb in s.intervals_ms
    ]
    for group, window in plan(cells, s.window):
        what = f"{group[0].variant.key} × {len(group)} servers, {sum(c.count for c in group):,} conns, {window:g} s"
        try:
            gr = measure_group(ctx, s, group, window)
        except BenchError as exc:
            errors[what] = str(exc)[:2000]
            print(f"   heartbeat {what}: FAILED {exc}", flush=True)
            continue
        print(f"   heartbeat group {what} (connected in {gr[0]['connect_seconds']:.0f} s)", flush=True)
        rows += gr
        for r in gr:
            print(
                f"   heartbeat {r['variant']:<11} {r['connections']:>6} conns hb {r['heartbeat_ms']:>5} ms: "
                f"CPU {r['server_cpu_pct']:5.2f}% {r['pings_per_s']:>8,.0f} pings/s "
                f"{r['bytes_per_connection'] / 1024:6.2f} KB/conn",
                flush=True,
            )
    rows.sort(key=lambda r: (r["connections"], -(r["heartbeat_ms"] or 10**9), r["variant"] != "wsfan"))
    failures = checks(rows) + [f"heartbeat {k}: {e}" for k, e in errors.items()]
    return {"rows": rows, "errors": errors, "failures": failures, "max_connections": cap}


def run(args: argparse.Namespace) -> int:
    return run_scenario(NAME, measure, settings_from(Settings, QUICK, args, SMOKE), args)
