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


def _nodelay(raw: Any) -> int:
    import socket

    sock = socket.socket(fileno=raw.get_extra_info("socket").fileno())
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.detach()


class _Echoed(picows.WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.echoed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type is picows.WSMsgType.TEXT and not self.echoed.done():
            self.echoed.set_result(frame.get_payload_as_bytes())


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
    pairs = [await picows.ws_connect(_Echoed, url) for _ in range(connections)]
    clients = [t for t, _ in pairs]
    try:
        async with asyncio.timeout(5):
            while len(registry.connections) < connections:
                await asyncio.sleep(0.01)
            # picows' own send path (the server's echo) works through the transport picows keeps
            for t, _ in pairs:
                t.send(picows.WSMsgType.TEXT, b"hi")
            for _, listener in pairs:
                assert await listener.echoed == b"hi"  # type: ignore[attr-defined]
        return [
            (c, c.raw.get_protocol(), c.transport.request, c.transport.response, _nodelay(c.raw))
            for c in listeners
        ]
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
    responses = {id(response) for _, _, _, response, _ in seen}
    assert len(responses) == 1
    for _, protocol, request, response, _ in seen:
        assert not hasattr(protocol, "__dict__")
        assert type(protocol).get_buffer is WSProtocol.get_buffer
        assert type(protocol).buffer_updated is WSProtocol.buffer_updated
        assert (request.method, request.path, request.version, len(request.headers)) == (b"", b"", b"", 0)
        assert type(response) is SwitchingProtocols
        assert response.first == b"" and not response.headers


def test_picows_is_shown_a_view_of_the_accepted_transport_and_the_socket_keeps_its_options() -> None:
    """picows' connection_made is shown an Accepted view (no option reads, no address lookups for an
    INFO line that is off); it forwards to uvloop's transport, whose socket still has TCP_NODELAY."""
    from wsfan.server.transport import Accepted

    seen = uvloop.run(_idle_server_side(3))
    for conn, _, _, _, nodelay in seen:
        kept = conn.transport.underlying_transport
        assert type(kept) is Accepted and kept.raw is conn.raw
        assert type(conn.raw).__name__ == "TCPTransport"
        assert nodelay == 1


_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame under 126 bytes, masked with the all-zero key (RFC 6455 5.3)."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def _joined_then_closed(port: int, i: int, close_frame: bool) -> None:
    """One client: upgrade, join a room, then leave with a close handshake or by dropping the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_UPGRADE + _masked(1, b'{"type":"join","room":"r%d","id":"j"}' % (i % 3)))
    seen = b""
    while b'"ack"' not in seen:
        chunk = await reader.read(4096)
        assert chunk, seen
        seen += chunk
    if close_frame:
        writer.write(_masked(8, b"\x03\xe8"))
        while await reader.read(4096):
            pass
    writer.close()


async def _server_garbage_after_closes(connections: int) -> list[str]:
    from wsfan.server.app import Node
    from wsfan.server.config import Settings
    from wsfan.server.hub import Session
    from wsfan.server.transport import Connection

    node = Node(Settings(port=0, rate_limit=0))
    await node.start()
    port = node.server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await _joined_then_closed(port, 0, True)  # warm-up: module-level objects made once
        gc.collect()
        gc.disable()
        try:
            await asyncio.gather(*(_joined_then_closed(port, i, i % 2 == 0) for i in range(connections)))
            async with asyncio.timeout(5):
                while node.registry.connections:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # picows' connection_lost runs from call_soon
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            kinds = (Connection, Session, picows.WSTransport)
            # type(), not isinstance(): the garbage holds weak proxies whose referents are gone
            return [type(o).__name__ for o in gc.garbage if issubclass(type(o), kinds)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    finally:
        await node.drain()


def test_closed_connections_are_freed_by_refcounting_not_left_to_the_collector() -> None:
    """A closed /ws connection leaves no reference cycle: its Connection, Session and picows transport
    are freed when it closes (with a close handshake or a dropped socket), not by a later collection.
    The Connection and its Session pointed at each other (Hub.close breaks it)."""
    assert uvloop.run(_server_garbage_after_closes(20)) == []


async def _timers_for_silent_connections(connections: int) -> tuple[int, int, int]:
    """Timer handles alive with ``connections`` accepted sockets that sent nothing, and after they were dropped."""
    server = await create_server(
        lambda request, peer: None, "127.0.0.1", 0, max_frame_size=1 << 16, read_buffer_size=4096,
        handshake_timeout=0.2, use_aiofastnet=False,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]

    def timers() -> int:
        return sum(type(o).__name__ == "TimerHandle" for o in gc.get_objects())

    gc.collect()
    before = timers()
    pairs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    await asyncio.sleep(0.05)
    during = timers() - before
    try:
        async with asyncio.timeout(2):  # dropped by the sweep 0.2-0.25 s after the accept
            for reader, _ in pairs:
                assert await reader.read(1) == b""
    finally:
        for _, writer in pairs:
            writer.close()
        server.close()
    return during, connections, len(pairs)


def test_one_timer_bounds_every_pending_handshake() -> None:
    """picows arms a timer per connection for its handshake timeout; HandshakeDeadlines sweeps them all
    with one (and still drops the silent ones in time)."""
    during, connections, dropped = uvloop.run(_timers_for_silent_connections(20))
    # the sweep's timer (and the next one while a sweep runs), this test's own sleep's, not yet freed:
    # a few, however many connections wait; picows' way is one per connection (21 here)
    assert during <= 5 and dropped == connections


async def _stall_limits(connections: int) -> tuple[int, list[int], int]:
    """(the listening socket's TCP_USER_TIMEOUT, each of ``connections`` accepted joined sockets',
    the node's stall limit), all in ms."""
    import socket

    from wsfan.server.app import Node
    from wsfan.server.config import Settings

    def user_timeout(fd: int) -> int:
        sock = socket.socket(fileno=fd)
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        finally:
            sock.detach()

    node = Node(Settings(port=0, rate_limit=0))
    await node.start()
    listener = node.server.sockets[0]  # type: ignore[union-attr]
    clients = []
    try:
        for i in range(connections):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
            clients.append(writer)
            writer.write(_UPGRADE + _masked(1, b'{"type":"join","room":"r%d","id":"j"}' % i))
            seen = b""
            while b'"ack"' not in seen:
                seen += await reader.read(4096)
        accepted = [user_timeout(c.raw.get_extra_info("socket").fileno()) for c in node.registry.connections]
        return user_timeout(listener.fileno()), accepted, int(node.registry.stall_limit * 1000)
    finally:
        for w in clients:
            w.close()
        await node.drain()


def test_accepted_sockets_inherit_the_stall_limit_from_the_listener() -> None:
    """TCP_USER_TIMEOUT (heartbeat + timeout + close grace) is set once, on the listening socket, and
    every accepted socket has it from there (Linux clones the listener): no setsockopt per connect."""
    listener, accepted, stall_ms = uvloop.run(_stall_limits(10))
    assert stall_ms > 0
    assert listener == stall_ms
    assert accepted == [stall_ms] * 10


async def _peer_lookups(**settings: Any) -> tuple[int, int]:
    """(HTTP status of a valid /ws upgrade routed by a Node with ``settings``, times it asked for the
    client's address)."""
    from multidict import CIMultiDict
    from picows import WSUpgradeRequest

    from wsfan.server.app import Node
    from wsfan.server.config import Settings

    node = Node(Settings(port=1, **settings))
    request = WSUpgradeRequest()
    request.method, request.path, request.version = b"GET", b"/ws", b"HTTP/1.1"
    request.headers = CIMultiDict(
        {
            "Host": "x",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
    )
    asked = []

    def peer() -> str:
        asked.append(1)
        return "127.0.0.1:5"

    reply = node.route(request, peer)
    return reply.response.status, len(asked)


def test_an_upgrade_asks_for_the_clients_address_only_to_count_it_per_ip() -> None:
    """Admission needs the client's IP for --max-connections-per-ip alone; without it an accepted upgrade
    does not ask (through uvloop: a getpeername syscall and an address tuple per connect)."""
    assert uvloop.run(_peer_lookups()) == (101, 0)
    assert uvloop.run(_peer_lookups(max_connections_per_ip=2)) == (101, 1)


async def _table_after_a_burst(handshakes: int) -> tuple[int, int]:
    """(size in bytes of HandshakeDeadlines' table right after ``handshakes`` came and completed, after its next sweep)."""
    import sys

    from wsfan.server.transport import HandshakeDeadlines

    deadlines = HandshakeDeadlines(0.04, asyncio.get_running_loop())  # a sweep every 0.01 s
    burst = [object() for _ in range(handshakes)]
    for p in burst:
        deadlines.add(p)  # type: ignore[arg-type]
    for p in burst:
        deadlines.discard(p)  # type: ignore[arg-type]
    right_after = sys.getsizeof(deadlines.pending)
    await asyncio.sleep(0.05)
    return right_after, sys.getsizeof(deadlines.pending)


def test_a_handshake_burst_leaves_no_table_behind() -> None:
    """The pending handshakes' dict does not keep a storm's table (about 36 B per handshake pending at
    once) once the storm is over: the next sweep finds it empty and starts a new one."""
    import sys

    right_after, later = uvloop.run(_table_after_a_burst(1000))
    assert right_after > 30_000
    assert later == sys.getsizeof({})


async def _options_set_on_an_ipv6_connection() -> tuple[int, bytes]:
    """(TCP_USER_TIMEOUT in ms, SO_LINGER) of an accepted IPv6 socket after limit_stall(3 s) and the
    SO_LINGER half of reset(), set through transport._setsockopt."""
    import socket

    from wsfan.server.transport import _LINGER_RESET, _setsockopt, limit_stall

    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            accepted.set_result(transport)

    server = await asyncio.get_running_loop().create_server(Keep, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("::1", port)
    raw = await accepted
    try:
        limit_stall(raw, 3.0)
        _setsockopt(raw, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock = socket.socket(fileno=raw.get_extra_info("socket").fileno())
        try:
            return (
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(_LINGER_RESET)),
            )
        finally:
            sock.detach()
    finally:
        writer.close()
        raw.close()
        server.close()


def test_socket_options_are_set_on_ipv6_sockets_too() -> None:
    """_setsockopt wraps the fd as an AF_INET socket object whatever its family (setsockopt does not
    read it; asking uvloop's PseudoSocket for it costs an enum per call): an IPv6 socket gets the
    options all the same."""
    from wsfan.server.transport import _LINGER_RESET

    assert uvloop.run(_options_set_on_an_ipv6_connection()) == (3000, _LINGER_RESET)
