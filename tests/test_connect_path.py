"""What the connection path allocates per connection (issue 19), checked on real sockets in-process."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import picows
import uvloop

from wsfan.server.transport import create_server


class _Opened(picows.WSListener):
    """Counts server-side connections that completed the handshake."""

    def __init__(self, opened: list[Any]) -> None:
        super().__init__()
        self.opened = opened

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.opened.append(transport)


def _loggers() -> int:
    return sum(isinstance(o, logging.Logger) for o in gc.get_objects())


async def _loggers_made_by(connections: int) -> int:
    opened: list[Any] = []
    server = await create_server(
        lambda request, peer: _Opened(opened),
        "127.0.0.1",
        0,
        max_frame_size=1 << 16,
        read_buffer_size=4096,
        handshake_timeout=5.0,
        use_aiofastnet=False,
    )
    port = server.sockets[0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/ws"
    # One connection first: picows' module-level loggers ("picows.client") exist from then on.
    clients = [(await picows.ws_connect(picows.WSListener, url))[0]]
    async with asyncio.timeout(5):
        while not opened:
            await asyncio.sleep(0.01)
    gc.collect()
    before = _loggers()
    clients += [(await picows.ws_connect(picows.WSListener, url))[0] for _ in range(connections)]
    try:
        async with asyncio.timeout(5):
            while len(opened) < connections + 1:
                await asyncio.sleep(0.01)
        gc.collect()
        # Clients are picows too; a client's own loggers are counted out by comparing to its count.
        return _loggers() - before
    finally:
        for c in clients:
            c.disconnect()
        server.close()


def test_no_logger_object_per_server_connection() -> None:
    """picows makes a Logger per accepted connection when handed a Logger; the server hands it an adapter.

    20 connections: the only new Logger objects are the 20 picows clients' own (one each), none server-side.
    """
    assert uvloop.run(_loggers_made_by(20)) == 20


async def _idle_server_side(connections: int) -> list[Any]:
    """Open ``connections`` real connections to a transport-level server; its listeners, once idle."""
    from picows import WSUpgradeResponseWithListener

    from wsfan.server.handshake import switching
    from wsfan.server.transport import ConnectionRegistry, EchoConnection, Limits

    registry = ConnectionRegistry(0, 1000)
    limits = Limits(1 << 16, 1 << 20)
    listeners: list[Any] = []

    def route(request: Any, peer: Any) -> Any:
        conn = EchoConnection(limits, registry)
        listeners.append(conn)
        return WSUpgradeResponseWithListener(switching((), b""), conn)

    server = await create_server(
        route, "127.0.0.1", 0, max_frame_size=1 << 16, read_buffer_size=4096,
        handshake_timeout=5.0, use_aiofastnet=False,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/echo?x=" + "y" * 200
    clients = [(await picows.ws_connect(picows.WSListener, url))[0] for _ in range(connections)]
    try:
        async with asyncio.timeout(5):
            while len(registry.connections) < connections:
                await asyncio.sleep(0.01)
        return [(c, c.raw.get_protocol(), c.transport.request, c.transport.response) for c in listeners]
    finally:
        for c in clients:
            c.disconnect()
        server.close()


def test_an_idle_connection_keeps_no_per_connection_handshake_leftovers() -> None:
    """After the upgrade: the protocol has no instance dict and reads go straight to picows; the request
    picows keeps holds no headers, path, method or version; the 101 is the one shared object, emptied."""
    from picows.picows import WSProtocol

    from wsfan.server.handshake import SwitchingProtocols

    seen = uvloop.run(_idle_server_side(5))
    assert len(seen) == 5
    responses = {id(response) for _, _, _, response in seen}
    assert len(responses) == 1
    for _, protocol, request, response in seen:
        assert not hasattr(protocol, "__dict__")
        assert type(protocol).get_buffer is WSProtocol.get_buffer
        assert type(protocol).buffer_updated is WSProtocol.buffer_updated
        assert (request.method, request.path, request.version, len(request.headers)) == (b"", b"", b"", 0)
        assert type(response) is SwitchingProtocols
        assert response.first == b"" and not response.headers
