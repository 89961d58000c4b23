"""The servers under test: our server and its deployment variants, and the baselines, as one list.

A ``Variant`` knows how to start itself on a port with a given heartbeat; the
scenarios never spell out a command line. Every variant speaks the same
protocol subset (welcome, join, leave, publish, echo, ping), so a load
generator does not know which one it talks to.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsfan.bench.baselines.bun import SERVER_JS
from wsfan.bench.harness import SERVER_CPU, ServerProcess, free_port


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    kind: str  # wsfan | naive | websockets | bun
    args: tuple[str, ...] = ()
    baseline: bool = False
    note: str = ""
    # A wsfan of another commit: the folder ``baselines/commit.py`` laid out, started as the working directory.
    cwd: str = ""

    def argv(
        self,
        port: int,
        *,
        heartbeat_ms: int | None = None,
        extra: Sequence[str] = (),
        bun: Path | None = None,
    ) -> list[str]:
        """The command line; ``heartbeat_ms`` None keeps each server's own default, 0 turns heartbeats off."""
        if self.kind == "wsfan":
            # Rate limit off: the load generators publish thousands of messages per second by design.
            argv = [sys.executable, "-m", "wsfan", "--host", "127.0.0.1", "--port", str(port)]
            if self.cwd:
                argv = ["env", f"--chdir={self.cwd}", *argv]
            argv += ["--rate-limit", "0", "--log-level", "warning", "--echo-endpoint"]
            if heartbeat_ms is not None:
                argv += ["--heartbeat", str(heartbeat_ms)]
        elif self.kind == "naive":
            argv = [sys.executable, "-m", "wsfan.bench.baselines.naive_picows", "--port", str(port)]
        elif self.kind == "websockets":
            argv = [sys.executable, "-m", "wsfan.bench.baselines.websockets_server", "--port", str(port)]
            if heartbeat_ms is not None:
                argv += ["--ping-interval", f"{heartbeat_ms / 1000:g}"]
        elif self.kind == "bun":
            if bun is None:
                raise ValueError("the Bun variant needs a bun binary")
            argv = [str(bun), str(SERVER_JS), "--port", str(port)]
            if heartbeat_ms:
                argv += ["--idle-timeout", str(max(1, heartbeat_ms // 1000))]
        else:
            raise ValueError(f"unknown server kind {self.kind!r}")
        return argv + list(self.args) + list(extra)


WSFAN = Variant("wsfan", "wsfan", "wsfan")
CORK = Variant(
    "wsfan-cork1", "wsfan --cork-ms 1", "wsfan", ("--cork-ms", "1"), note="adaptive write batching, ≤ 1 ms"
)
AIOFASTNET = Variant(
    "wsfan-afn", "wsfan --aiofastnet", "wsfan", ("--aiofastnet",), note="aiofastnet transports"
)
DEFLATE = Variant(
    "wsfan-deflate",
    "wsfan --compression",
    "wsfan",
    ("--compression",),
    note="permessage-deflate, one compressed frame per publication",
)
NAIVE = Variant("naive", "naive picows", "naive", baseline=True, note="one send() per subscriber")
WEBSOCKETS = Variant("websockets", "websockets lib", "websockets", baseline=True, note="broadcast(), asyncio")
BUN = Variant("bun", "Bun", "bun", baseline=True, note="Bun.serve, ws.publish")
BUN_DEFLATE = Variant(
    "bun-deflate",
    "Bun perMessageDeflate",
    "bun",
    ("--deflate",),
    note="perMessageDeflate: true, ws.publish(..., compress)",
)

ALL: dict[str, Variant] = {
    v.key: v for v in (WSFAN, CORK, AIOFASTNET, DEFLATE, NAIVE, WEBSOCKETS, BUN, BUN_DEFLATE)
}
BASELINES = tuple(v.key for v in ALL.values() if v.baseline)


@dataclass
class Servers:
    """Starts variants pinned to the server core; knows whether Bun is there."""

    cpu: int = SERVER_CPU
    bun: Path | None = None
    bun_note: str = ""
    skipped: dict[str, str] = field(default_factory=dict)

    def available(self, keys: Sequence[str]) -> list[Variant]:
        out = []
        for key in keys:
            if ALL[key].kind == "bun" and self.bun is None:
                self.skipped[key] = self.bun_note
                continue
            out.append(ALL[key])
        return out

    def start(
        self,
        variant: Variant,
        *,
        heartbeat_ms: int | None = None,
        extra: Sequence[str] = (),
        port: int | None = None,
        name: str | None = None,
        ready_timeout: float = 30.0,
    ) -> ServerProcess:
        port = port or free_port()
        argv = variant.argv(port, heartbeat_ms=heartbeat_ms, extra=extra, bun=self.bun)
        return ServerProcess(name or f"{variant.key}-{port}", argv, port, cpu=self.cpu).start(ready_timeout)
