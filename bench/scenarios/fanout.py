"""Fan-out: rooms of 10, 100, 1,000 and 10,000 subscribers; deliveries/s, server CPU per delivery, latency.

One set of subscriber connections per server (subscriber ``g`` joins every room
larger than ``g``) and one publisher. For each room size, two phases:

- throughput (closed loop): ``--inflight`` publishes outstanding, a new one per
  ack, until ``--target-deliveries`` deliveries or ``--max-duration`` seconds.
  Server CPU per delivery = server CPU time (whole process tree) from the first
  publish until every subscriber saw the last seq, over the deliveries counted
  by the subscribers. The bottleneck column says which core was full.
- latency (open loop): ``--latency-load`` deliveries/s offered (publish rate =
  load / room size, at most ``--max-publish-rate``) for ``--latency-duration``
  seconds; a delivery's latency is its arrival minus the publish's intended send
  time. CPU per delivery is reported here too: at a fixed load it shows what
  ``--cork-ms`` buys (fewer, larger writes) and what it costs (held output).

Subscribers check every delivery's seq (no gap, none missing): deliveries must
equal publishes × subscribers exactly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsfan.bench.harness import LoadGen, LoadGenGroup, Meter
from wsfan.bench.latency import load_samples, monotonic, summarize
from wsfan.bench.roles.pacing import clock
from wsfan.bench.suite import (
    PER_PROCESS_CONNECTIONS,
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

NAME = "fanout"
HELP = "fan-out to rooms of 10..10,000: deliveries/s, server CPU per delivery, delivery latency"


@dataclass
class PhaseSettings:
    """The two phases' knobs (closed-loop throughput, open-loop latency), shared by fanout, cluster, compression."""

    sizes: tuple[int, ...] = (10, 100, 1000, 10000)
    inflight: int = 16
    target_deliveries: int = 1_000_000
    max_duration: float = 2.5
    latency_load: int = 50_000
    max_publish_rate: int = 5_000
    latency_duration: float = 2.5
    payload_size: int = 100


#: ``--quick`` sizes of the two phases (every fan-out-like scenario adds its own ``sizes``).
QUICK_PHASES: dict[str, Any] = {
    "target_deliveries": 20_000,
    "max_duration": 0.4,
    "latency_load": 10_000,
    "latency_duration": 0.4,
}


@dataclass
class Settings(PhaseSettings):
    variants: tuple[str, ...] = ("wsfan", "wsfan-cork1", "wsfan-afn", "naive", "websockets", "bun")
    separate_publisher: bool = True


QUICK: dict[str, Any] = {"sizes": (100,), **QUICK_PHASES}

#: ``--smoke`` keeps the quick phases: the server's CPU time is read in 10 ms clock ticks, and a smaller
#: phase can end before one tick, leaving a row without a CPU per delivery.
SMOKE: dict[str, Any] = {}


def add_phase_arguments(p: argparse.ArgumentParser) -> None:
    """The two phases' knobs, shared with the cluster scenario, which runs the same phases."""
    p.add_argument("--inflight", type=int, help="publishes outstanding in the throughput phase (default 16)")
    p.add_argument(
        "--target-deliveries", type=int, help="deliveries per throughput phase (default 1,000,000)"
    )
    p.add_argument(
        "--max-duration", type=float, help="max seconds of publishing per throughput phase (default 2.5)"
    )
    p.add_argument(
        "--latency-load", type=int, help="offered deliveries/s in the latency phase (default 50,000)"
    )
    p.add_argument("--latency-duration", type=float, help="seconds of the latency phase (default 2.5)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--variants", type=csv_words, help="servers, comma-separated (default: all six)")
    p.add_argument("--sizes", type=csv_ints, help="room sizes (default 10,100,1000,10000)")
    add_phase_arguments(p)
    p.add_argument(
        "--separate-publisher",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="publisher in its own load-generator process (default on)",
    )


def room_of(size: int) -> str:
    return f"fan-{size}"


def _gens(ctx: Context, name: str, url: str, s: Settings) -> LoadGenGroup:
    """Subscriber processes, plus the publisher in a process of its own when ``separate_publisher``.

    A separate publisher keeps the open-loop schedule independent of delivery
    processing: in one process, a publish due while a thousand deliveries are being
    read waits for all of them, and that wait would count as latency.
    """
    total = max(s.sizes)
    n = max(ctx.client_procs, -(-total // PER_PROCESS_CONNECTIONS))
    shares = [total // n + (1 if i < total % n else 0) for i in range(n)]
    firsts = [sum(shares[:i]) for i in range(n)]
    if s.separate_publisher:
        shares, firsts = [0, *shares], [0, *firsts]
    return LoadGenGroup(
        LoadGen(
            f"{name}-fanout-{i}",
            {
                "role": "fanout_lat",
                "name": f"{name}-{i}",
                "url": url,
                "subscribers": share,
                "first_index": first,
                "rooms": {room_of(size): size for size in s.sizes},
                "publisher": i == 0,
                "payload_size": s.payload_size,
                "samples_dir": str(ctx.samples),
                # the compression scenario: subscribers offer permessage-deflate, chat-like payloads
                "compression": getattr(s, "compression", False),
                "chat_payload": getattr(s, "chat_payload", False),
            },
            cpu=ctx.client_cpu,
        )
        for i, (share, first) in enumerate(zip(shares, firsts, strict=True))
    )


def _sum(dones: list[dict[str, Any]], key: str) -> int:
    return sum(d[key] for d in dones)


def _counts(dones: list[dict[str, Any]], pub: dict[str, Any], base: int, size: int) -> dict[str, Any]:
    received, expected = _sum(dones, "received"), _sum(dones, "expected")
    return {
        "publishes": pub["publishes"],
        "seq_range": [pub["first_seq"], pub["last_seq"]],
        "deliveries": received,
        "expected_deliveries": expected,
        "gaps": _sum(dones, "gaps"),
        "wire_bytes": sum(d.get("wire_bytes", 0) for d in dones),
        "incomplete": _sum(dones, "incomplete"),
        "disconnected": _sum(dones, "disconnected"),
        "errors": _sum(dones, "errors") + pub["errors"],
        "close_codes": sorted({c for d in dones for c in d["close_codes"]}),
        "count_ok": (
            received == expected == pub["publishes"] * size
            and pub["first_seq"] == base + 1
            and pub["last_seq"] - base == pub["publishes"]
            and _sum(dones, "gaps") == 0
            and pub["errors"] == 0
        ),
    }


def measure_variant(ctx: Context, s: Settings, variant: Any) -> list[dict[str, Any]]:
    server = ctx.servers.start(variant)
    url = f"ws://127.0.0.1:{server.port}/ws"
    rows: list[dict[str, Any]] = []
    try:
        with _gens(ctx, server.name, url, s) as gens:
            gens.start()
            t = time.monotonic()
            gens.expect_all("ready", timeout=600)
            connect_s = time.monotonic() - t
            time.sleep(0.5)
            rows = measure_sizes(ctx, s, gens, Meter(server, gens), variant.key)
    finally:
        code = server.stop()
    for r in rows:
        r["server_exit_code"] = code
        r["connect_seconds"] = connect_s if "connect_s" in locals() else None
    return rows


def measure_sizes(
    ctx: Context,
    s: Any,
    gens: LoadGenGroup,
    meter: Meter,
    key: str,
    annotate: Callable[[dict[str, Any], Any, list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Both phases for every room size, on load generators already connected and ``ready``.

    ``gens.gens[0]`` holds the publisher. ``annotate(row, interval, dones)`` may add
    figures to each row (the cluster scenario's CPU per node).
    """
    rows: list[dict[str, Any]] = []
    for size in s.sizes:
        room, base = room_of(size), 0
        # throughput: closed loop
        limit = max(1, s.target_deliveries // size)
        gens.broadcast(cmd="arm", room=room, base=base)
        gens.expect_all("armed", timeout=30)
        meter.start()
        gens.gens[0].send(
            cmd="closed",
            room=room,
            base=base,
            inflight=s.inflight,
            limit=limit,
            duration=s.max_duration,
        )
        pub = gens.gens[0].expect("published", timeout=s.max_duration + 120)
        gens.broadcast(cmd="expect", phase="thr", base=base, last_seq=pub["last_seq"], timeout=120)
        dones = gens.expect_all("done", timeout=150)
        iv = meter.stop()
        thr = _counts(dones, pub, base, size)
        rows.append(_row(ctx, key, size, "throughput", thr, iv, None, closed_loop_bottleneck(iv, ctx)))
        if annotate is not None:
            annotate(rows[-1], iv, dones)
        base = pub["last_seq"]
        # latency: open loop at a fixed offered load
        rate = min(s.max_publish_rate, s.latency_load / size)
        count = max(3, int(rate * s.latency_duration))
        for _ in range(3):  # an "armed" later than t0 would count its delay as latency: arm again
            t0 = clock() + 0.1
            gens.broadcast(cmd="arm", room=room, base=base, t0=t0, rate=rate)
            gens.expect_all("armed", timeout=30)
            if clock() < t0 - 0.02:
                break
        meter.start()
        gens.gens[0].send(cmd="open", room=room, base=base, t0=t0, rate=rate, count=count)
        pub = gens.gens[0].expect("published", timeout=s.latency_duration + 60)
        gens.broadcast(cmd="expect", phase=f"lat{size}", base=base, last_seq=base + count, timeout=60)
        dones = gens.expect_all("done", timeout=90)
        iv = meter.stop()
        lat = _counts(dones, pub, base, size)
        paths = [d.get("samples") for d in dones]
        lat["latency"] = summarize(load_samples(paths))
        clean_samples(paths)
        lat["offered_publish_rate"] = rate
        lat["send_lag_p99_us"] = pub.get("send_lag", {}).get("p99_us")
        missing = lat["expected_deliveries"] - lat["deliveries"]
        bn = open_loop_bottleneck(iv, ctx, lat["send_lag_p99_us"], missing)
        rows.append(_row(ctx, key, size, "latency", lat, iv, rate * size, bn))
        if annotate is not None:
            annotate(rows[-1], iv, dones)
    return rows


def _row(
    ctx: Context,
    key: str,
    size: int,
    phase: str,
    counts: dict[str, Any],
    iv: Any,
    offered: float | None,
    bottleneck: str,
) -> dict[str, Any]:
    n = counts["deliveries"]
    return {
        "variant": key,
        "size": size,
        "phase": phase,
        **counts,
        "offered_deliveries_per_s": offered,
        "deliveries_per_s": n / iv.wall_s if iv.wall_s else None,
        "server_us_per_delivery": iv.server_cpu_s / n * 1e6 if n else None,
        "wire_bytes_per_delivery": counts["wire_bytes"] / n if n else None,
        "loadgen_us_per_delivery": iv.loadgen_cpu_s / n * 1e6 if n else None,
        "interval": interval_dict(iv, ctx, bottleneck),
    }


def checks(rows: list[dict[str, Any]]) -> list[str]:
    failures = []
    for r in rows:
        tag = f"fanout {r['variant']} size {r['size']} {r['phase']}"
        if not r["count_ok"]:
            failures.append(
                f"{tag}: deliveries {r['deliveries']:,} / expected {r['expected_deliveries']:,} "
                f"({r['publishes']} publishes × {r['size']}), {r['gaps']} gaps, {r['errors']} errors"
            )
        lat = r.get("latency")
        if lat is not None:
            if not monotonic(lat):
                failures.append(f"{tag}: percentiles not monotonic")
            if lat.get("count") != r["deliveries"]:
                failures.append(f"{tag}: {lat.get('count')} latency samples for {r['deliveries']} deliveries")
            if lat.get("negative"):
                failures.append(f"{tag}: {lat['negative']} negative latencies")
    return failures


def describe(r: dict[str, Any], who: str, detail: str = "") -> str:
    """One progress line per fan-out row (fanout, cluster and compression print the same shape)."""
    lat = r.get("latency") or {}
    return (
        f"   {who} {r['size']:>6} {r['phase']:<10} {r['deliveries_per_s'] or 0:>10,.0f} del/s "
        f"{r['server_us_per_delivery'] or 0:>6.2f} µs/del{detail}"
        + (f" p50 {lat.get('p50', 0):>7.0f} µs p99 {lat.get('p99', 0):>8.0f} µs" if lat else "")
        + f"; {r['interval']['bottleneck']}; ok={r['count_ok']}"
    )


def measure(ctx: Context, s: Settings) -> dict[str, Any]:
    return measure_each(
        NAME,
        ctx.servers.available(s.variants),
        lambda v: measure_variant(ctx, s, v),
        lambda r: describe(r, f"fanout {r['variant']:<11}"),
        checks,
        key=lambda v: v.key,
    )


def run(args: argparse.Namespace) -> int:
    return run_scenario(NAME, measure, settings_from(Settings, QUICK, args, SMOKE), args)
