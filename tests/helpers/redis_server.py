"""A real ``redis-server`` for the cluster tests, on a free port of 127.0.0.1, without persistence.

Without persistence a restart loses every room, which is exactly the data loss the
epoch has to reveal. Where redis-server is missing the tests skip and say how to
install it; with ``WSFAN_REQUIRE_REDIS=1`` (set by ``.ci/run``) a missing binary fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.ports import free_port, wait_for_port

INSTALL_HINT = "redis-server is not installed: `apt-get install redis-server` (or `brew install redis`)"


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def require_redis() -> str:
    """The redis-server path, or skip (fail under WSFAN_REQUIRE_REDIS=1) with how to install it."""
    binary = redis_binary()
    try:
        import redis  # noqa: F401 - the server's RedisBroker needs it too
    except ImportError:
        binary = None
    if binary is None:
        if os.environ.get("WSFAN_REQUIRE_REDIS") == "1":
            pytest.fail(f"{INSTALL_HINT}; WSFAN_REQUIRE_REDIS=1 makes this a failure", pytrace=False)
        pytest.skip(INSTALL_HINT)
    return binary


class RedisServer:
    """One redis-server process; ``stop``/``start`` keep the port, so nodes can reconnect to it."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="wsfan-redis-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more redis-server arguments (cluster mode)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += [
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--dir",
            tempfile.gettempdir(),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a crash, not a shutdown: nothing is saved, clients see a reset
            self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    def command(self, *args: Any) -> Any:
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as r:
            return r.execute_command(*args)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")


def running_redis() -> Iterator[RedisServer]:
    """The body of a ``redis_server`` fixture: one fresh redis-server per test, stopped after it."""
    srv = RedisServer(require_redis()).start()
    yield srv
    srv.stop()


class RedisCluster:
    """A Redis Cluster of ``masters`` redis-server processes on free ports (no replicas), slots spread evenly.

    Built the way an operator does: ``--cluster-enabled yes`` on each node, then
    ``redis-cli --cluster create ... --cluster-yes``; ready once every node says ``cluster_state:ok``.
    """

    def __init__(
        self, binary: str, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 15000
    ) -> None:
        self.binary = binary
        self.folder = Path(tempfile.mkdtemp(prefix="wsfan-cluster-"))
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms = (
            node_timeout_ms  # how long a master may be silent before its replica takes over
        )
        self.nodes = [RedisServer(binary) for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...``, the form ``--broker`` takes."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            folder = self.folder / str(node.port)
            folder.mkdir()
            # The bus port is given: the default (port + 10000) may be past 65535 or taken.
            node.extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"),
                          "--cluster-port", str(free_port()), "--dir", str(folder),
                          "--cluster-node-timeout", str(self.node_timeout_ms), "--repl-diskless-sync-delay", "0"]  # fmt: skip
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        while self.replicas and not all(
            n.command("INFO", "replication").get("master_link_status") == "up"
            for n in self.nodes
            if n not in self.primaries()
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("redis cluster replicas did not connect")
            time.sleep(0.05)
        return self

    def primaries(self) -> list[RedisServer]:
        """The nodes serving slots now (after a failover: the promoted replicas, not the dead masters)."""
        live = next(n for n in self.nodes if n.alive())
        ports = {int(r[2][1]) for r in live.command("CLUSTER", "SLOTS")}
        return [n for n in self.nodes if n.port in ports]

    def owner(self, key: str) -> RedisServer:
        """The master serving ``key``'s slot."""
        live = next(n for n in self.nodes if n.alive())
        slot = live.command("CLUSTER", "KEYSLOT", key)
        for start, end, master, *_ in live.command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise LookupError(key)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def running_cluster(
    masters: int = 3, replicas: int = 0, node_timeout_ms: int = 15000
) -> Iterator[RedisCluster]:
    """The body of a cluster fixture: a fresh Redis Cluster, stopped after the test (or module)."""
    cluster = RedisCluster(require_redis(), masters, replicas, node_timeout_ms).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class RedisSentinelSetup:
    """A master, one replica and one sentinel (quorum 1) watching them as ``wsfan``; a dead master is
    replaced after ``down_after_ms``."""

    def __init__(self, binary: str, down_after_ms: int = 1000) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="wsfan-sentinel-"))
        self.master, self.replica = RedisServer(binary), RedisServer(binary)
        self.master.extra = ["--repl-diskless-sync-delay", "0"]
        self.replica.extra = [
            "--replicaof",
            "127.0.0.1",
            str(self.master.port),
            "--repl-diskless-sync-delay",
            "0",
        ]
        self.port = free_port()
        self.binary, self.down_after_ms = binary, down_after_ms
        self.log = self.folder / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/wsfan"

    def sentinel(self, *args: Any) -> Any:
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as r:
            return r.execute_command(*args)

    def start(self) -> RedisSentinelSetup:
        self.master.start()
        self.replica.start()
        conf = self.folder / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor wsfan 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds wsfan {self.down_after_ms}\n"
            "sentinel failover-timeout wsfan 10000\n"
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port, proc=self.proc)
        deadline = time.monotonic() + 30
        while not (
            self.replica.command("INFO", "replication").get("master_link_status") == "up"
            and len(self.sentinel("SENTINEL", "REPLICAS", "wsfan")) == 1
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("replica or sentinel not ready")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.master.stop()
        self.replica.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def running_sentinel() -> Iterator[RedisSentinelSetup]:
    setup = RedisSentinelSetup(require_redis()).start()
    try:
        yield setup
    finally:
        setup.stop()
