"""What every load-generator role shares: the control channel, the lean picows listener base, connecting many.

A role is ``async def role(cfg: dict, control: Control) -> None``; ``bench/roles/__init__.py``
registers every role by name and ``python -m wsfan.bench.loadgen '<json config>'`` runs one.
Control channel: JSON lines. The harness writes commands to stdin (``go``, ``expect``, ``quit``,
role-specific ones); the role reports events on stdout with :func:`emit` (``ready``,
``published``, ``done``, ``error``, ...).

Deliberately lean picows clients (not ``client/``): the load generator shares a core with
nothing but itself and has to receive up to a thousand times the publish rate, so every
callback does the least that still verifies the run. Each listener's ``on_ws_frame`` handles
close frames inline (``_on_close``) rather than through a dispatching base method: one
Python call less per delivery on the hottest path of the load generator.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import msgspec
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from wsfan.server.wire import Head

TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE


# Just enough of a server message to count it (a view of the schema): unknown fields are skipped.
HEAD = msgspec.json.Decoder(Head)


def payload_of(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (at least 12)."""
    filler = max(0, size - len(b'{"text":""}'))
    return b'{"text":"' + b"x" * filler + b'"}'


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Control:
    """Commands from the harness, one JSON object per stdin line."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader), sys.stdin)

    async def next(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            return {"cmd": "quit"}
        return json.loads(line)

    async def wait_for(self, cmd: str) -> dict[str, Any]:
        while True:
            msg = await self.next()
            if msg.get("cmd") == cmd:
                return msg
            if msg.get("cmd") == "quit":
                raise SystemExit(0)


class Base(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.errors = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"disconnected before ready (close {self.close_code})"))

    def _on_close(self, transport: WSTransport, frame: WSFrame) -> None:
        self.close_code = int(frame.get_close_code())
        if not transport.is_close_frame_sent:
            transport.send_close(frame.get_close_code())
        transport.disconnect()

    def _cold(self, data: Any) -> Head:
        r = HEAD.decode(data)
        if r.type == "error":
            self.errors += 1
        return r


async def connect_many(
    factory: Callable[[], Base],
    url: str,
    n: int,
    concurrency: int,
    after: Callable[[Base], None] | None = None,
    **options: Any,
) -> list[Base]:
    """Open ``n`` connections, ``concurrency`` handshakes at a time; each is ready when its listener says so.

    ``options`` go to ``picows.ws_connect`` (a small ``read_buffer_init_size`` keeps
    tens of thousands of idle client connections cheap).
    """
    sem = asyncio.Semaphore(concurrency)
    options.setdefault("socket_factory", spread_sources())

    async def one() -> Base:
        async with sem:
            for attempt in range(5):
                try:
                    _, listener = await ws_connect(factory, url, websocket_handshake_timeout=30, **options)
                    if listener is None:  # picows: the socket closed before the server answered the upgrade
                        raise ConnectionResetError("connection closed during the handshake")
                    break
                except OSError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            assert isinstance(listener, Base)
            if after is not None:
                after(listener)
            await asyncio.wait_for(listener.ready, 30)
            return listener

    return list(await asyncio.gather(*(one() for _ in range(n))))


_sockets_made = 0


def spread_sources(per_address: int = 1000) -> Callable[[Any], socket.socket]:
    """A picows socket factory binding each client socket to its own loopback source address.

    With one source address, every connect() searches the shared ephemeral port
    range for a free 4-tuple, which becomes quadratic past a few tens of
    thousands of sockets (two minutes of kernel time for 120,000 connections).
    All of 127.0.0.0/8 is loopback, so ``per_address`` sockets per 127.a.b.1
    keeps every search short. picows connects the returned socket itself.
    """
    a = 20 + os.getpid() % 200

    def factory(_url: Any) -> socket.socket:
        global _sockets_made
        b = (_sockets_made // per_address) % 250
        _sockets_made += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.{a}.{b}.1", 0))
        sock.setblocking(False)
        return sock

    return factory


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def disconnect_all(listeners: list[Base]) -> None:
    for c in listeners:
        t = c.transport
        if t is not None and not t.is_disconnected:
            t.disconnect()
