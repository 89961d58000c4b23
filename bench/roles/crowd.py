"""Role ``crowd``: a share of a reconnecting crowd, every member connecting and joining at once.

Plain picows (not ``client/``): the figure is the *server's* cost per connect + join, so the
load generator must spend as little as it can per connection; the project client's backoff
and rejoin logic is the ``storm`` scenario's subject, not this one's.

Commands (JSON lines on stdin):

- ``connect`` (``at``: the harness's CLOCK_MONOTONIC start, ``timeout``: seconds): open
  ``connections`` connections, at most ``concurrency`` handshakes in flight. Each member
  sends its join as soon as the upgrade is answered (room ``crowd-<i mod rooms>``,
  ``room_offset`` shifts ``i`` so that several processes spread over the same rooms) and is
  *rejoined* when the server's join ack arrives. A member that fails (refused upgrade, reset,
  error reply, no ack in time) tries again after a short pause, at most ``attempts`` times,
  and never past ``at + timeout``. Reports ``joined``: members rejoined, failures, attempts,
  and each rejoined member's ack time as seconds after ``at`` (sorted, 0.1 ms resolution).
- ``drop``: close every member's TCP connection (no close frame: the crowd just vanishes, as
  after a network blip), report ``dropped``.
- ``quit``: close what is open and exit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from picows import WSFrame, WSTransport, ws_connect

from wsfan.bench.roles.base import (
    CLOSE,
    HEAD,
    TEXT,
    Base,
    Control,
    disconnect_all,
    emit,
    spread_sources,
)
from wsfan.bench.roles.pacing import clock
from wsfan.server.wire import Join


class Member(Base):
    """One crowd member: sends its join on upgrade; ready, with ``acked_at`` stamped, on the join ack."""

    def __init__(self, join: bytes) -> None:
        super().__init__()
        self.join = join
        self.acked_at = 0.0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(TEXT, self.join)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE:
            self._on_close(transport, frame)
            return
        if frame.msg_type is not TEXT or self.ready.done():
            return
        m = HEAD.decode(frame.get_payload_as_memoryview())
        if m.type == "ack":
            self.acked_at = clock()
            self.ready.set_result(None)
        elif m.type == "error":
            self.errors += 1
            self.ready.set_exception(ConnectionError(f"join refused: {m.code} {m.message}"))


async def wave(cfg: dict[str, Any], at: float, timeout: float) -> tuple[list[Member], dict[str, Any]]:
    """Every member connects and joins; returns the rejoined members and the ``joined`` report."""
    url, n, rooms = cfg["url"], cfg["connections"], max(1, cfg.get("rooms", 100))
    offset = cfg.get("room_offset", 0)
    joins = [msgspec.json.encode(Join(id="j", room=f"crowd-{k}")) for k in range(rooms)]
    deadline = at + timeout
    max_attempts = cfg.get("attempts", 5)
    sem = asyncio.Semaphore(max(1, cfg.get("concurrency", 500)))
    socket_factory = spread_sources()
    attempts = 0
    failures: dict[str, int] = {}

    async def one(i: int) -> Member | None:
        nonlocal attempts
        join = joins[(i + offset) % rooms]
        async with sem:
            for attempt in range(1, max_attempts + 1):
                attempts += 1
                listener: Member | None = None
                left = deadline - clock()
                if left <= 0:
                    break
                try:
                    _, got = await asyncio.wait_for(
                        ws_connect(
                            lambda: Member(join),
                            url,
                            socket_factory=socket_factory,
                            read_buffer_init_size=256,
                            websocket_handshake_timeout=max(1.0, left),
                        ),
                        left,
                    )
                    if got is None:  # picows: the socket closed before the server answered the upgrade
                        raise ConnectionResetError("connection closed during the handshake")
                    assert isinstance(got, Member)
                    listener = got
                    await asyncio.wait_for(listener.ready, max(0.01, deadline - clock()))
                    return listener
                except Exception as exc:  # noqa: BLE001 - every failure is counted by kind, then retried
                    kind = type(exc).__name__
                    failures[kind] = failures.get(kind, 0) + 1
                    if listener is not None and listener.transport is not None:
                        listener.transport.disconnect()
                if attempt < max_attempts:
                    await asyncio.sleep(min(0.05 * attempt, max(0.0, deadline - clock())))
        return None

    got = await asyncio.gather(*(one(i) for i in range(n)))
    members = [m for m in got if m is not None]
    times = sorted(round(m.acked_at - at, 4) for m in members)
    return members, {
        "connections": n,
        "rejoined": len(members),
        "attempts": attempts,
        "failures": failures,
        "errors": sum(m.errors for m in members),
        "times": times,
    }


async def crowd(cfg: dict[str, Any], control: Control) -> None:
    members: list[Member] = []
    emit("ready")
    while True:
        cmd = await control.next()
        what = cmd.get("cmd")
        if what == "quit":
            break
        if what == "connect":
            members, report = await wave(cfg, float(cmd["at"]), float(cmd["timeout"]))
            emit("joined", **report)
        elif what == "drop":
            disconnect_all(members)  # type: ignore[arg-type]
            members = []
            await asyncio.sleep(0.1)
            emit("dropped")
    disconnect_all(members)  # type: ignore[arg-type]
