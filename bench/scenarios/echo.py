"""Echo: round-trip latency at fixed offered loads (open loop) and at the maximum (closed loop).

Every server answers ``{"type":"echo","id":...,"payload":...}`` on ``/ws``.
Open loop: ``--connections`` connections share one schedule of ``rate`` requests
per second for ``--duration`` seconds; latency = reply arrival minus the request's
*intended* send time, so a stall anywhere (server, kernel, load generator) is
counted in full instead of being hidden by a sender that waited (no coordinated
omission). Closed loop ("max"): each connection keeps one request in flight
for ``--max-duration`` seconds; its rate is the maximum the pair of processes
reaches, and its latency is measured from the actual send.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from wsfan.bench.harness import LoadGen, LoadGenGroup, Meter
from wsfan.bench.latency import load_samples, monotonic, summarize
from wsfan.bench.roles.pacing import clock
from wsfan.bench.suite import (
    Context,
    add_common,
    clean_samples,
    closed_loop_bottleneck,
    csv_ints,
    csv_words,
    interval_dict,
    measure_each,
    open_loop_bottleneck,
    run_scenario,
    settings_from,
)

NAME = "echo"
HELP = "echo RTT percentiles at fixed offered loads (open loop) and at the maximum (closed loop)"


@dataclass
class Settings:
    variants: tuple[str, ...] = ("wsfan", "naive", "websockets", "bun")
    rates: tuple[int, ...] = (1000, 5000, 20000)
    duration: float = 3.0
    max_duration: float = 3.0
    connections: int = 50
    payload_size: int = 100


QUICK: dict[str, Any] = {"rates": (1000,), "duration": 0.4, "max_duration": 0.4, "connections": 20}
SMOKE: dict[str, Any] = {"duration": 0.2, "max_duration": 0.2, "connections": 10}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--variants", type=csv_words, help="servers, comma-separated (default: all four)")
    p.add_argument("--rates", type=csv_ints, help="offered loads in requests/s (default 1000,5000,20000)")
    p.add_argument("--duration", type=float, help="seconds per offered load (default 3)")
    p.add_argument("--max-duration", type=float, help="seconds of the closed-loop maximum (default 3)")
    p.add_argument("--connections", type=int, help="connections (default 50)")


def _gens(ctx: Context, name: str, url: str, s: Settings) -> LoadGenGroup:
    n = ctx.client_procs
    return LoadGenGroup(
        LoadGen(
            f"{name}-echo-{i}",
            {
                "role": "echo_lat",
                "name": f"{name}-{i}",
                "url": url,
                "connections": s.connections // n + (1 if i < s.connections % n else 0),
                "payload_size": s.payload_size,
                "samples_dir": str(ctx.samples),
            },
            cpu=ctx.client_cpu,
        )
        for i in range(n)
    )


def _phase(
    ctx: Context, gens: LoadGenGroup, meter: Meter, command: dict[str, Any], timeout: float
) -> tuple[list[dict[str, Any]], Any]:
    meter.start()
    n = len(gens.gens)
    for i, g in enumerate(gens.gens):
        g.send(**command, stride=n, offset=i)
    dones = gens.expect_all("done", timeout=timeout)
    return dones, meter.stop()


def measure_variant(ctx: Context, s: Settings, variant: Any) -> list[dict[str, Any]]:
    server = ctx.servers.start(variant)
    url = f"ws://127.0.0.1:{server.port}/ws"
    rows: list[dict[str, Any]] = []
    try:
        with _gens(ctx, server.name, url, s) as gens:
            gens.start()
            gens.expect_all("ready", timeout=120)
            time.sleep(0.3)
            meter = Meter(server, gens)
            for rate in s.rates:
                count = int(rate * s.duration)
                cmd = {
                    "cmd": "open",
                    "phase": f"open{rate}",
                    "t0": clock() + 0.05,
                    "rate": rate,
                    "count": count,
                }
                dones, iv = _phase(ctx, gens, meter, cmd, s.duration + 60)
                rows.append(_row(ctx, variant.key, f"{rate:,}/s", rate, dones, iv, open_loop=True))
            dones, iv = _phase(
                ctx, gens, meter, {"cmd": "closed", "phase": "max", "duration": s.max_duration}, 60
            )
            rows.append(_row(ctx, variant.key, "max", None, dones, iv, open_loop=False))
    finally:
        code = server.stop()
    for r in rows:
        r["server_exit_code"] = code
    return rows


def _row(
    ctx: Context, key: str, load: str, rate: int | None, dones: list[dict[str, Any]], iv: Any, open_loop: bool
) -> dict[str, Any]:
    paths = [d.get("samples") for d in dones]
    lat = summarize(load_samples(paths))
    clean_samples(paths)
    sent = sum(d["sent"] for d in dones)
    received = sum(d["received"] for d in dones)
    lags = [d.get("send_lag", {}).get("p99_us") for d in dones if d.get("send_lag")]
    lag = max(lags) if lags else None
    bn = open_loop_bottleneck(iv, ctx, lag, sent - received) if open_loop else closed_loop_bottleneck(iv, ctx)
    return {
        "variant": key,
        "load": load,
        "offered_rate": rate,
        "open_loop": open_loop,
        "connections": sum(d.get("connections", 0) for d in dones) or None,
        "sent": sent,
        "received": received,
        "errors": sum(d["errors"] for d in dones),
        "achieved_rate": received / iv.wall_s if iv.wall_s else None,
        "server_us_per_reply": iv.server_cpu_s / received * 1e6 if received else None,
        "send_lag_p99_us": lag,
        "latency": lat,
        "interval": interval_dict(iv, ctx, bn),
    }


def checks(rows: list[dict[str, Any]]) -> list[str]:
    failures = []
    for r in rows:
        tag = f"echo {r['variant']} {r['load']}"
        if r["received"] != r["sent"]:
            failures.append(f"{tag}: {r['sent'] - r['received']} of {r['sent']} requests unanswered")
        if r["errors"]:
            failures.append(f"{tag}: {r['errors']} error replies")
        if not monotonic(r["latency"]):
            failures.append(f"{tag}: percentiles not monotonic")
        if r["latency"].get("negative"):
            failures.append(f"{tag}: {r['latency']['negative']} negative latencies")
        if r["latency"].get("count") != r["received"]:
            failures.append(f"{tag}: {r['latency'].get('count')} samples for {r['received']} replies")
    return failures


def describe(r: dict[str, Any]) -> str:
    lat = r["latency"]
    return (
        f"   echo {r['variant']:<11} {r['load']:>9}: {r['achieved_rate'] or 0:>9,.0f}/s "
        f"p50 {lat.get('p50', 0):>7.0f} µs p99 {lat.get('p99', 0):>8.0f} µs "
        f"max {lat.get('max', 0):>8.0f} µs; {r['interval']['bottleneck']}"
    )


def measure(ctx: Context, s: Settings) -> dict[str, Any]:
    return measure_each(
        NAME,
        ctx.servers.available(s.variants),
        lambda v: measure_variant(ctx, s, v),
        describe,
        checks,
        key=lambda v: v.key,
    )


def run(args: argparse.Namespace) -> int:
    return run_scenario(NAME, measure, settings_from(Settings, QUICK, args, SMOKE), args)
