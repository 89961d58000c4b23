"""Core figures: CPU per delivered message (corked server vs a naive send-per-subscriber loop),
idle memory per connection, CPU per echo reply.

Fan-out: one room of ``--subscribers`` connections plus one publisher that keeps
``--inflight`` publishes outstanding (a new one on each ack), ``--payload-size``
bytes each, for ``--publishes`` publishes or ``--duration`` seconds, whichever
comes first. The server is pinned to one core, the load generator to the other.
CPU per delivery = server CPU time (utime + stime of its process tree) between
"go" and the moment every subscriber has seen the last seq, divided by the
deliveries the subscribers received. The figure stays valid when the load
generator limits the rate; which side was saturated is reported next to it.

Memory: server RSS after ``--idle-connections`` idle connections minus RSS
before, per connection. Echo: server CPU per reply with ``--echo-connections``
connections each keeping one echo round trip in flight.

Both servers run on loopback, so part of the receiving side's TCP work is done
in the sending process's ``send()`` and is charged to the server's stime; that
is the same for both variants per byte, and more per call for the naive one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wsfan.bench.harness import (
    CLIENT_CPU,
    SERVER_CPU,
    BenchError,
    Interval,
    LoadGen,
    LoadGenGroup,
    Meter,
    ServerProcess,
    SyscallCounter,
    free_port,
    raise_nofile,
    reset_logs,
)
from wsfan.bench.results import machine_info, results_dir, timestamp, write_results
from wsfan.bench.scenarios.core_report import markdown, print_table, summarize

NAME = "core"
HELP = "CPU per delivery (corked vs naive), idle memory per connection, CPU per echo reply"

ROOM = "bench"
VARIANTS = ("wsfan", "naive")


@dataclass
class Settings:
    subscribers: int = 1000
    inflight: int = 16
    payload_size: int = 100
    publishes: int = 5000
    duration: float = 20.0
    idle_connections: int = 5000
    echo_connections: int = 100
    echo_duration: float = 5.0
    client_procs: int = 1
    repeat: int = 2
    server_cpu: int = SERVER_CPU
    client_cpu: int = CLIENT_CPU
    quick: bool = False
    syscalls: bool = False
    parts: tuple[str, ...] = ("fanout", "memory", "echo")


QUICK = {"publishes": 300, "duration": 3.0, "idle_connections": 1000, "echo_duration": 1.5, "repeat": 1}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument(
        "--quick", action="store_true", help=f"CI smoke run under 30 s: {QUICK} unless set explicitly"
    )
    p.add_argument("--subscribers", type=int, help=f"fan-out room size (default {d.subscribers})")
    p.add_argument("--inflight", type=int, help=f"publishes kept in flight (default {d.inflight})")
    p.add_argument("--payload-size", type=int, help=f"publish payload bytes (default {d.payload_size})")
    p.add_argument("--publishes", type=int, help=f"max publishes per fan-out run (default {d.publishes})")
    p.add_argument("--duration", type=float, help=f"max seconds of publishing per run (default {d.duration})")
    p.add_argument(
        "--idle-connections",
        type=int,
        help=f"connections for the memory figure (default {d.idle_connections})",
    )
    p.add_argument(
        "--echo-connections",
        type=int,
        help=f"connections doing echo round trips (default {d.echo_connections})",
    )
    p.add_argument(
        "--echo-duration", type=float, help=f"seconds of echo traffic per run (default {d.echo_duration})"
    )
    p.add_argument(
        "--client-procs", type=int, help="load-generator processes, all on the client core (default 1)"
    )
    p.add_argument(
        "--repeat", type=int, help=f"fan-out runs per variant; medians are reported (default {d.repeat})"
    )
    p.add_argument(
        "--server-cpu", type=int, help=f"core the server is pinned to; -1 = unpinned (default {d.server_cpu})"
    )
    p.add_argument(
        "--client-cpu", type=int, help=f"core the load generators are pinned to (default {d.client_cpu})"
    )
    p.add_argument(
        "--syscalls",
        action="store_true",
        default=None,
        help="count the server's send/recv/epoll calls with perf (adds a little overhead; off for official figures)",
    )
    p.add_argument("--only", help="comma-separated subset of fanout,memory,echo")
    p.add_argument("--no-write", action="store_true", help="print the table only; write no file")
    p.add_argument(
        "--publish",
        action="store_true",
        help="write results/core-<stamp>.json and results/core-latest.md (the committed figures); "
        "otherwise results/local/ (quick: results/tmp/), which git ignores",
    )
    p.add_argument(
        "--render",
        metavar="JSON",
        help="run nothing: rebuild core-latest.md (results/ with --publish, else results/local/) from a core-*.json",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(quick=args.quick)
    if args.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
    for k in asdict(s):
        v = getattr(args, k, None)
        if v is not None and k != "quick":
            setattr(s, k, v)
    if args.only:
        s.parts = tuple(x.strip() for x in args.only.split(",") if x.strip())
    return s


# ---------------------------------------------------------------- servers


def server_argv(variant: str, port: int) -> list[str]:
    if variant == "naive":
        return [sys.executable, "-m", "wsfan.bench.baselines.naive_picows", "--port", str(port)]
    # Rate limit off: the publisher sends thousands of messages per second by design.
    return [
        sys.executable,
        "-m",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--rate-limit",
        "0",
        "--log-level",
        "warning",
        "--echo-endpoint",
    ]


def start_server(variant: str, s: Settings) -> ServerProcess:
    port = free_port()
    return ServerProcess(f"{variant}-{port}", server_argv(variant, port), port, cpu=s.server_cpu).start()


def interval_dict(iv: Interval, s: Settings) -> dict[str, Any]:
    return iv.to_dict(
        s.server_cpu if s.server_cpu >= 0 else None, s.client_cpu if s.client_cpu >= 0 else None
    )


# ---------------------------------------------------------------- runs


def fanout_run(variant: str, s: Settings) -> dict[str, Any]:
    server = start_server(variant, s)
    url = f"ws://127.0.0.1:{server.port}/ws"
    shares = [
        s.subscribers // s.client_procs + (1 if i < s.subscribers % s.client_procs else 0)
        for i in range(s.client_procs)
    ]
    gens = LoadGenGroup(
        LoadGen(
            f"{server.name}-fanout-{i}",
            {
                "role": "fanout",
                "url": url,
                "room": ROOM,
                "subscribers": n,
                "publisher": i == 0,
                "inflight": s.inflight,
                "payload_size": s.payload_size,
                "max_publishes": s.publishes,
                "duration": s.duration,
            },
            cpu=s.client_cpu,
        )
        for i, n in enumerate(shares)
    )
    try:
        with gens:
            gens.start()
            gens.expect_all("ready", timeout=180)
            time.sleep(0.5)  # let the connection storm's last callbacks finish before measuring
            meter = Meter(server, gens, s.syscalls)
            meter.start()
            gens.broadcast(cmd="go")
            pub = gens.gens[0].expect("published", timeout=s.duration + 180)
            gens.broadcast(cmd="expect", first_seq=pub["first_seq"], last_seq=pub["last_seq"], timeout=180)
            dones = gens.expect_all("done", timeout=200)
            iv = meter.stop()
    finally:
        exit_code = server.stop()
    received = sum(d["received"] for d in dones)
    expected = pub["publishes"] * s.subscribers
    gaps = sum(d["gaps"] for d in dones)
    ok = (
        received == expected
        and gaps == 0
        and pub["errors"] == 0
        and pub["last_seq"] - pub["first_seq"] + 1 == pub["publishes"]
        and not any(d["incomplete"] or d["disconnected"] or d["errors"] for d in dones)
    )
    return {
        "variant": variant,
        "publishes": pub["publishes"],
        "publish_seconds": pub["seconds"],
        "seq_range": [pub["first_seq"], pub["last_seq"]],
        "publisher_errors": pub["errors"],
        "deliveries": received,
        "expected_deliveries": expected,
        "gaps": gaps,
        "clients": dones,
        "count_ok": ok,
        "server_us_per_delivery": iv.server_cpu_s / received * 1e6 if received else None,
        "loadgen_us_per_delivery": iv.loadgen_cpu_s / received * 1e6 if received else None,
        "deliveries_per_s": received / iv.wall_s if iv.wall_s else None,
        "deliveries_per_write": _per_write(received, iv),
        "interval": interval_dict(iv, s),
        "server_exit_code": exit_code,
    }


def memory_run(variant: str, s: Settings) -> dict[str, Any]:
    server = start_server(variant, s)
    gen = LoadGen(
        f"{server.name}-idle",
        {"role": "idle", "url": f"ws://127.0.0.1:{server.port}/ws", "connections": s.idle_connections},
        cpu=s.client_cpu,
    )
    try:
        time.sleep(0.5)
        before = server.rss()
        gen.start()
        ready = gen.expect("ready", timeout=300)
        time.sleep(1.0)  # let handshake garbage be freed and the heartbeat sweep run once
        after = server.rss()
        gen.stop()
    finally:
        gen.stop()
        exit_code = server.stop()
    return {
        "variant": variant,
        "connections": ready["connections"],
        "connect_seconds": ready["seconds"],
        "rss_before": before,
        "rss_after": after,
        "bytes_per_connection": (after - before) / ready["connections"],
        "server_exit_code": exit_code,
    }


def echo_run(variant: str, mode: str, s: Settings) -> dict[str, Any]:
    server = start_server(variant, s)
    path = "/echo" if mode == "raw" else "/ws"
    gens = LoadGenGroup(
        [
            LoadGen(
                f"{server.name}-echo-{mode}",
                {
                    "role": "echo",
                    "url": f"ws://127.0.0.1:{server.port}{path}",
                    "mode": mode,
                    "connections": s.echo_connections,
                    "payload_size": s.payload_size,
                    "duration": s.echo_duration,
                },
                cpu=s.client_cpu,
            )
        ]
    )
    try:
        with gens:
            gens.start()
            gens.expect_all("ready", timeout=120)
            time.sleep(0.3)
            meter = Meter(server, gens, s.syscalls)
            meter.start()
            gens.broadcast(cmd="go")
            (done,) = gens.expect_all("done", timeout=s.echo_duration + 60)
            iv = meter.stop()
    finally:
        exit_code = server.stop()
    replies = done["replies"]
    return {
        "variant": variant,
        "mode": mode,
        "connections": s.echo_connections,
        "replies": replies,
        "errors": done["errors"],
        "server_us_per_reply": iv.server_cpu_s / replies * 1e6 if replies else None,
        "loadgen_us_per_reply": iv.loadgen_cpu_s / replies * 1e6 if replies else None,
        "replies_per_s": replies / iv.wall_s if iv.wall_s else None,
        "replies_per_write": _per_write(replies, iv),
        "interval": interval_dict(iv, s),
        "server_exit_code": exit_code,
    }


def _per_write(n: int, iv: Interval) -> float | None:
    writes = iv.server_syscalls.get("sendmsg", 0) + iv.server_syscalls.get("sendto", 0)
    return n / writes if writes else None


# ---------------------------------------------------------------- entry


def render(path: str, out_dir: Path) -> int:
    payload = json.loads(Path(path).read_text())
    _, rows = summarize(payload["runs"], payload["settings"]["subscribers"], VARIANTS)
    print_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{NAME}-latest.md"
    md_path.write_text(markdown(rows, payload))
    print(f"\nwrote {md_path} from {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        out_dir = results_dir(args.quick, args.publish)
    except ValueError as exc:
        print(f"bench core: {exc}", file=sys.stderr)
        return 2
    if args.render:
        return render(args.render, results_dir(False, args.publish))
    s = settings_from(args)
    if s.syscalls and not SyscallCounter.available():
        print("--syscalls needs perf and /sys/kernel/tracing; counting nothing", file=sys.stderr)
        s.syscalls = False
    nofile = raise_nofile(s.idle_connections * 2 + 1000)
    reset_logs()
    started = time.monotonic()
    stamp = timestamp()
    payload: dict[str, Any] = {
        "scenario": NAME,
        "stamp": stamp,
        "started_at": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {**asdict(s), "nofile": nofile, "server_args": {v: server_argv(v, 0) for v in VARIANTS}},
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    results: dict[str, list[dict[str, Any]]] = {"fanout": [], "memory": [], "echo": []}
    try:
        if "fanout" in s.parts:
            for i in range(s.repeat):
                # Alternate the order so slow drift in background load hits both variants alike.
                for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                    r = fanout_run(v, s)
                    results["fanout"].append(r)
                    print(
                        f"fanout {v} run {i + 1}: {r['server_us_per_delivery']:.2f} µs/delivery server, "
                        f"{r['deliveries']:,} deliveries, "
                        + (
                            f"{r['deliveries_per_write']:.1f} per write syscall, "
                            if r["deliveries_per_write"]
                            else ""
                        )
                        + f"server {r['interval']['server_util']:.0%} / "
                        f"load gen {r['interval']['loadgen_util']:.0%} of a core, count ok={r['count_ok']}",
                        flush=True,
                    )
        if "memory" in s.parts:
            for v in VARIANTS:
                r = memory_run(v, s)
                results["memory"].append(r)
                print(f"memory {v}: {r['bytes_per_connection'] / 1024:.2f} KB/connection", flush=True)
        if "echo" in s.parts:
            for v, mode in (("wsfan", "protocol"), ("wsfan", "raw"), ("naive", "protocol")):
                r = echo_run(v, mode, s)
                results["echo"].append(r)
                print(f"echo {v} {mode}: {r['server_us_per_reply']:.2f} µs/reply", flush=True)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    summary, rows = summarize(results, s.subscribers, VARIANTS)
    payload.update(
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
        seconds=time.monotonic() - started,
        summary=summary,
        runs=results,
    )
    md = markdown(rows, payload)
    print()
    print_table(rows)
    if not args.no_write:
        json_path, md_path = write_results(NAME, payload, md, out_dir)
        print(f"\nwrote {json_path} and {md_path} ({payload['seconds']:.0f} s)")
    ok = all(summary.get(f"{v}_count_ok", True) for v in VARIANTS)
    return 0 if ok else 1
