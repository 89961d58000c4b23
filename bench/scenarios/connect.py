"""Connect rate: WebSocket handshakes per second and server CPU per connection.

The load generator opens ``--connections`` connections with ``--concurrency``
handshakes in flight; a connection counts once the server's first message (the
welcome) arrived. Server CPU per connect = server CPU time over that phase /
connections: TCP accept, HTTP upgrade, session set-up and the welcome, the
kernel's share of loopback TCP included.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from wsfan.bench.harness import BenchError, LoadGen, LoadGenGroup, Meter
from wsfan.bench.suite import (
    PER_PROCESS_CONNECTIONS,
    Context,
    add_common,
    closed_loop_bottleneck,
    csv_words,
    interval_dict,
    run_scenario,
    settings_from,
)

NAME = "connect"
HELP = "WebSocket handshakes/s and server CPU per connect"


@dataclass
class Settings:
    variants: tuple[str, ...] = ("wsfan", "naive", "websockets", "bun")
    connections: int = 5000
    concurrency: int = 200


QUICK: dict[str, Any] = {"connections": 300, "concurrency": 50}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--variants", type=csv_words, help="servers (default: all four)")
    p.add_argument("--connections", type=int, help="connections to open (default 5000)")
    p.add_argument("--concurrency", type=int, help="handshakes in flight (default 200)")


def measure_variant(ctx: Context, s: Settings, variant: Any) -> dict[str, Any]:
    server = ctx.servers.start(variant)
    n = max(ctx.client_procs, -(-s.connections // PER_PROCESS_CONNECTIONS))
    shares = [s.connections // n + (1 if i < s.connections % n else 0) for i in range(n)]
    gens = LoadGenGroup(
        LoadGen(
            f"{server.name}-connect-{i}",
            {
                "role": "connect",
                "url": f"ws://127.0.0.1:{server.port}/ws",
                "connections": share,
                "concurrency": max(1, s.concurrency // n),
            },
            cpu=ctx.client_cpu,
        )
        for i, share in enumerate(shares)
    )
    try:
        with gens:
            gens.start()
            gens.expect_all("ready", timeout=60)
            time.sleep(0.3)
            meter = Meter(server, gens)
            meter.start()
            gens.broadcast(cmd="go")
            dones = gens.expect_all("done", timeout=300)
            iv = meter.stop()
            gens.broadcast(cmd="close")
            gens.expect_all("closed", timeout=120)
    finally:
        code = server.stop()
    connected = sum(d["connected"] for d in dones)
    return {
        "variant": variant.key,
        "connections": s.connections,
        "connected": connected,
        "seconds": iv.wall_s,
        "handshakes_per_s": connected / iv.wall_s if iv.wall_s else None,
        "server_us_per_connect": iv.server_cpu_s / connected * 1e6 if connected else None,
        "loadgen_us_per_connect": iv.loadgen_cpu_s / connected * 1e6 if connected else None,
        "interval": interval_dict(iv, ctx, closed_loop_bottleneck(iv, ctx)),
        "server_exit_code": code,
    }


def measure(ctx: Context, s: Settings) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for v in ctx.servers.available(s.variants):
        try:
            r = measure_variant(ctx, s, v)
        except BenchError as exc:
            errors[v.key] = str(exc)[:2000]
            print(f"   connect {v.key}: FAILED {exc}", flush=True)
            continue
        rows.append(r)
        print(
            f"   connect {v.key:<11} {r['handshakes_per_s']:>8,.0f}/s {r['server_us_per_connect']:>7.0f} µs server CPU "
            f"per connect; {r['interval']['bottleneck']}",
            flush=True,
        )
    failures = [
        f"connect {r['variant']}: {r['connected']} of {r['connections']} connected"
        for r in rows
        if r["connected"] != r["connections"]
    ]
    failures += [f"connect {k}: {e}" for k, e in errors.items()]
    return {"rows": rows, "errors": errors, "failures": failures}


def run(args: argparse.Namespace) -> int:
    return run_scenario(NAME, measure, settings_from(Settings, QUICK, args), args)
