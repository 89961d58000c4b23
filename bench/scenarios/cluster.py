"""Cluster: fan-out across two nodes through one Redis, against one node with its in-process broker.

Cluster mode: a private ``redis-server`` (no persistence, 127.0.0.1, free port)
and two wsfan nodes (``--broker redis://… --node-id A`` and ``B``). The publisher
is connected to node A; the room's subscribers are split in half over A
(⌈size/2⌉) and B (⌊size/2⌋), each half in its own load-generator process.
Single-node mode: one wsfan node without ``--broker``, the same three
load-generator processes (publisher, two halves of the room), all on that node.

Both modes run the fan-out scenario's two phases (``bench/scenarios/fanout.py``,
same load-generator role ``fanout_lat``, same seq checks): closed-loop
throughput (deliveries/s, server CPU per delivery) and open-loop latency at a
fixed offered load (p50/p99 from the publish's intended send time). The report
gives the Redis overhead as ratios cluster ÷ single node.
Shards mode: the two nodes over a 3-master Redis Cluster (``--broker redis+cluster://…``,
sharded pub/sub); each room lives on one master, so the ``redis-*`` rows give the cost per
delivery on the shard that owns the room (the per-shard input of the README's scale-out
path) and the node rows the per-node cost, same run as the other modes.

Pinning on 2 cores: node A, node B and redis-server all on the server core
(``--server-cpu``, 0), the load generators on the client core (1). The server
figures are therefore the three processes' sum, sharing one core the way the
single node has it alone; per-process CPU is recorded too (node CPU over the
deliveries to that node's own subscribers, redis CPU over all deliveries).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from wsfan.bench.harness import LoadGen, LoadGenGroup, Meter, ServerProcess, free_port
from wsfan.bench.scenarios import fanout
from wsfan.bench.scenarios.fanout import add_phase_arguments, measure_sizes, room_of
from wsfan.bench.scenarios.fanout import checks as fanout_checks
from wsfan.bench.servers import WSFAN
from wsfan.bench.suite import Context, add_common, csv_ints, measure_each, run_scenario, settings_from

NAME = "cluster"
HELP = "fan-out across two nodes behind one Redis vs one node: deliveries/s, CPU per delivery, latency"
INSTALL_HINT = "redis-server is not installed: `apt-get install redis-server`"
MODES = ("single", "cluster", "shards")


@dataclass
class Settings(fanout.PhaseSettings):
    sizes: tuple[int, ...] = (100, 1000)


QUICK: dict[str, Any] = {"sizes": (100,), **fanout.QUICK_PHASES}
SMOKE = fanout.SMOKE  # the quick phases (see fanout.SMOKE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--sizes", type=csv_ints, help="room sizes (default 100,1000)")
    add_phase_arguments(p)


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def start_redis(ctx: Context, binary: str) -> ServerProcess:
    """A private redis-server without persistence, pinned to the server core like the nodes."""
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--protected-mode", "yes", "--dir", tempfile.gettempdir()]
    return ServerProcess(f"redis-{port}", argv, port, cpu=ctx.server_cpu).start()


def start_redis_cluster(ctx: Context, binary: str, masters: int = 3) -> dict[str, ServerProcess]:
    """``masters`` redis-servers in cluster mode (bus ports given), joined by ``redis-cli --cluster create``."""
    folder = tempfile.mkdtemp(prefix="wsfan-bench-cluster-")
    procs: dict[str, ServerProcess] = {}
    try:
        return _cluster_up(ctx, binary, masters, folder, procs)
    except BaseException:
        for p in procs.values():  # the ones started before the failure
            p.stop()
        raise


def _cluster_up(
    ctx: Context, binary: str, masters: int, folder: str, procs: dict[str, ServerProcess]
) -> dict[str, ServerProcess]:
    for i in range(masters):
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--cluster-enabled", "yes", "--cluster-port", str(free_port()), "--dir", folder]
        argv += ["--cluster-config-file", f"{folder}/nodes-{port}.conf"]
        procs[f"redis-{i + 1}"] = ServerProcess(f"redis-{port}", argv, port, cpu=ctx.server_cpu).start()
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    addresses = [f"127.0.0.1:{p.port}" for p in procs.values()]
    subprocess.run(
        [cli, "--cluster", "create", *addresses, "--cluster-yes"], check=True, capture_output=True, timeout=60
    )
    deadline = time.monotonic() + 30
    for p in procs.values():
        while (
            b"cluster_state:ok"
            not in subprocess.run(
                [cli, "-p", str(p.port), "cluster", "info"], capture_output=True, timeout=10
            ).stdout
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    return procs


class ProcessGroup:
    """Several server processes measured as one by ``Meter``; remembers each one's share of the last interval.

    ``Meter`` reads ``cpu_times()`` once at ``start`` and once at ``stop``; every
    read keeps the per-process figures, so ``split()`` returns each process's CPU
    seconds between the last two reads.
    """

    def __init__(self, procs: dict[str, ServerProcess]) -> None:
        self.procs = procs
        self._marks: list[dict[str, float]] = []

    def cpu_times(self) -> tuple[float, float]:
        per = {name: p.cpu_times() for name, p in self.procs.items()}
        self._marks = [*self._marks[-1:], {name: u + s for name, (u, s) in per.items()}]
        return sum(u for u, _ in per.values()), sum(s for _, s in per.values())

    def split(self) -> dict[str, float]:
        if len(self._marks) < 2:
            return {}
        a, b = self._marks
        return {name: b[name] - a[name] for name in b}

    def stop(self) -> dict[str, int | None]:
        return {name: p.stop() for name, p in reversed(self.procs.items())}


def _gens(ctx: Context, mode: str, url_a: str, url_b: str, s: Settings) -> LoadGenGroup:
    """Publisher (on A) in its own process, then one process per half of every room: A's half, B's half.

    Each half-process numbers its subscribers from 0 and joins subscriber ``g`` to
    a room when ``g`` is below its half of the room, so both halves of every room
    size come out of one set of connections per process.
    """
    halves = [
        ("pub", url_a, 0, {room_of(n): n for n in s.sizes}, True),
        ("a", url_a, -(-max(s.sizes) // 2), {room_of(n): -(-n // 2) for n in s.sizes}, False),
        ("b", url_b, max(s.sizes) // 2, {room_of(n): n // 2 for n in s.sizes}, False),
    ]
    return LoadGenGroup(
        LoadGen(
            f"cluster-{mode}-{tag}",
            {
                "role": "fanout_lat",
                "name": f"cluster-{mode}-{tag}",
                "url": url,
                "subscribers": count,
                "first_index": 0,
                "rooms": rooms,
                "publisher": publisher,
                "payload_size": s.payload_size,
                "samples_dir": str(ctx.samples),
            },
            cpu=ctx.client_cpu,
        )
        for tag, url, count, rooms, publisher in halves
    )


def _annotate(group: ProcessGroup, mode: str) -> Any:
    """Per-process CPU of one interval: nodes over their own subscribers' deliveries, redis over all of them."""

    def annotate(row: dict[str, Any], iv: Any, dones: list[dict[str, Any]]) -> None:
        split = group.split()
        own = {"A": dones[1]["received"], "B": dones[2]["received"]}
        if mode == "single":
            own = {"A": dones[1]["received"] + dones[2]["received"]}
        per: dict[str, Any] = {}
        for name, cpu_s in split.items():
            n = own.get(name, row["deliveries"])
            per[name] = {
                "cpu_s": cpu_s,
                "util": cpu_s / iv.wall_s if iv.wall_s else None,
                "deliveries": n,
                "us_per_delivery": cpu_s / n * 1e6 if n else None,
            }
        row["mode"] = mode
        row["processes"] = per

    return annotate


def measure_mode(ctx: Context, s: Settings, mode: str, binary: str) -> list[dict[str, Any]]:
    procs: dict[str, ServerProcess] = {}
    group = ProcessGroup(procs)
    rows: list[dict[str, Any]] = []
    codes: dict[str, int | None] = {}
    try:
        if mode == "cluster":
            procs["redis"] = start_redis(ctx, binary)
            broker = f"redis://127.0.0.1:{procs['redis'].port}/0"
            for node in ("A", "B"):
                procs[node] = ctx.servers.start(
                    WSFAN, extra=("--broker", broker, "--node-id", node), name=f"cluster-{node}"
                )
        elif mode == "shards":
            procs.update(start_redis_cluster(ctx, binary))
            broker = "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in procs.values())
            for node in ("A", "B"):
                procs[node] = ctx.servers.start(
                    WSFAN, extra=("--broker", broker, "--node-id", node), name=f"shards-{node}"
                )
        else:
            procs["A"] = ctx.servers.start(WSFAN, extra=("--node-id", "A"), name="single-A")
        url_a = f"ws://127.0.0.1:{procs['A'].port}/ws"
        url_b = f"ws://127.0.0.1:{procs['B'].port}/ws" if "B" in procs else url_a
        with _gens(ctx, mode, url_a, url_b, s) as gens:
            gens.start()
            gens.expect_all("ready", timeout=300)
            time.sleep(0.5)
            meter = Meter(group, gens)  # type: ignore[arg-type]
            rows = measure_sizes(ctx, s, gens, meter, mode, _annotate(group, mode))
    finally:
        codes = group.stop()
    for r in rows:
        r["exit_codes"] = codes
        r["server_exit_code"] = next((c for c in codes.values() if c not in (0, None)), 0)
    return rows


def checks(rows: list[dict[str, Any]]) -> list[str]:
    return [f.replace("fanout ", "cluster ", 1) for f in fanout_checks(rows)]


def measure(ctx: Context, s: Settings) -> dict[str, Any]:
    binary = redis_binary()
    if binary is None:
        ctx.servers.skipped["redis"] = INSTALL_HINT
        print(f"   cluster: skipped ({INSTALL_HINT})", flush=True)
        return {"rows": [], "errors": {}, "failures": [], "skipped": INSTALL_HINT}

    def line(r: dict[str, Any]) -> str:
        per = " ".join(
            f"{k} {v['us_per_delivery'] or 0:.2f}" for k, v in r["processes"].items() if v["us_per_delivery"]
        )
        return fanout.describe(r, f"cluster {r['variant']:<8}", f" ({per})")

    return measure_each(NAME, MODES, lambda mode: measure_mode(ctx, s, mode, binary), line, checks)


def run(args: argparse.Namespace) -> int:
    return run_scenario(NAME, measure, settings_from(Settings, QUICK, args, SMOKE), args)
