"""Role ``crowd``: a share of a reconnecting crowd, every member connecting and joining at once.

A bare WebSocket client on uvloop transports (``Member``), not picows' client nor ``client/``:
the figure is the *server's* cost per connect + join, so the load generator must spend as
little as it can per connection, or it saturates long before the server does; the project
client's backoff and rejoin logic is the ``storm`` scenario's subject, not this one's.

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
import urllib.parse
from typing import Any

import msgspec

from wsfan.bench.roles.base import HEAD, Control, emit, spread_sources
from wsfan.bench.roles.pacing import clock
from wsfan.server.wire import Join


class Member(asyncio.Protocol):
    """One crowd member on a bare uvloop transport: upgrade, join, wait for the ack, answer pings.

    A WebSocket client reduced to what the crowd needs, because the load generator's cost per
    connection decides whether the server or the load generator saturates first (picows'
    client costs several times more per connect). The upgrade request is fixed bytes (a fixed
    ``Sec-WebSocket-Key``: nothing here checks the server's accept hash); client frames are
    masked with the all-zero key (RFC 6455 §5.3 requires a mask, not a particular one), so the
    join and the pongs are sent as prebuilt bytes. Server frames are parsed just enough to find
    text frames (the welcome, the join ack), pings (answered) and a close.
    """

    __slots__ = (
        "request",
        "join",
        "transport",
        "buf",
        "upgraded",
        "ready",
        "acked_at",
        "errors",
        "close_code",
    )

    def __init__(self, request: bytes, join: bytes, ready: asyncio.Future[None]) -> None:
        self.request = request
        self.join = join
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.ready = ready
        self.acked_at = 0.0
        self.errors = 0
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's TCPTransport is not an asyncio.Transport subclass
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(
                ConnectionResetError(f"closed before the join ack ({exc or self.close_code})")
            )

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if not status.startswith(b"HTTP/1.1 101"):
                self._fail(ConnectionRefusedError(status.decode(errors="replace")))
                return
            self.upgraded = True
            self.transport.write(self.join)  # type: ignore[union-attr]
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            op, size = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if n - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if n - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < head + size:
                break
            payload = buf[pos + head : pos + head + size]
            pos += head + size
            if op == 1:
                if not self.ready.done():
                    m = HEAD.decode(payload)
                    if m.type == "ack":
                        self.acked_at = clock()
                        self.ready.set_result(None)
                    elif m.type == "error":
                        self.errors += 1
                        self._fail(ConnectionError(f"join refused: {m.code} {m.message}"))
                        return
            elif (
                op == 9
            ):  # ping: pong with the same payload (short: the server's pings carry none or a few bytes)
                self.transport.write(bytes((0x8A, 0x80 | size)) + ZERO_MASK + payload)  # type: ignore[union-attr]
            elif op == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if size >= 2 else 1005
                self._fail(ConnectionResetError(f"server closed with {self.close_code}"))
                return
        self.buf = buf[pos:]

    def disconnect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


ZERO_MASK = b"\x00\x00\x00\x00"


def text_frame(payload: bytes) -> bytes:
    """A masked client text frame (all-zero mask key, so the payload goes as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    else:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + ZERO_MASK + payload


async def wave(cfg: dict[str, Any], at: float, timeout: float) -> tuple[list[Member], dict[str, Any]]:
    """Every member connects and joins; returns the rejoined members and the ``joined`` report."""
    url, n, rooms = cfg["url"], cfg["connections"], max(1, cfg.get("rooms", 100))
    offset = cfg.get("room_offset", 0)
    joins = [text_frame(msgspec.json.encode(Join(id="j", room=f"crowd-{k}"))) for k in range(rooms)]
    deadline = at + timeout
    max_attempts = cfg.get("attempts", 5)
    sem = asyncio.Semaphore(max(1, cfg.get("concurrency", 500)))
    socket_factory = spread_sources()
    attempts = 0
    failures: dict[str, int] = {}

    loop = asyncio.get_running_loop()
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()

    async def attempt(join: bytes) -> Member:
        sock = socket_factory(None)
        try:
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        ready: asyncio.Future[None] = loop.create_future()
        _, member = await loop.create_connection(lambda: Member(request, join, ready), sock=sock)
        try:
            await ready
        except BaseException:
            member.disconnect()
            raise
        return member

    async def one(i: int) -> Member | None:
        nonlocal attempts
        join = joins[(i + offset) % rooms]
        async with sem:
            for n_try in range(1, max_attempts + 1):
                left = deadline - clock()
                if left <= 0:
                    break
                attempts += 1
                try:
                    async with asyncio.timeout(left):
                        return await attempt(join)
                except Exception as exc:  # noqa: BLE001 - every failure is counted by kind, then retried
                    kind = type(exc).__name__
                    failures[kind] = failures.get(kind, 0) + 1
                if n_try < max_attempts:
                    await asyncio.sleep(min(0.05 * n_try, max(0.0, deadline - clock())))
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
            for m in members:
                m.disconnect()
            members = []
            await asyncio.sleep(0.1)
            emit("dropped")
    for m in members:
        m.disconnect()
