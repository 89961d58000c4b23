"""HTTP responses to a client that stops reading (server/http.py, ``_QuietHandler``; PROTOCOL.md,
"HTTP beside the WebSocket").

Every response of the HTTP port is bounded like an SSE stream: a connection whose output stays
over its high-water mark for the stall limit (--heartbeat + --heartbeat-timeout + 2 s: 3 s here)
is reset and counted in ``wsfan_http_stalled_total``. A real server process and raw client
sockets with a 4 KiB receive buffer that they never read: loopback takes about 3 MB into the
kernel's send queue of such a client, so each test sends the server more than that to answer
(one large ``/history``, or pipelined ``/rooms`` and ``/presence`` requests). Before, aiohttp's
drain waited for ever: the response, its memory and the socket stayed.
"""

from __future__ import annotations

import asyncio
import json
import socket

import websockets
from test_sse_robust import ADMIN, TCP_ESTABLISHED, admin, counter, tcp_state, until

from helpers.ports import free_port
from helpers.servers import ServerProcess

STALL_FLAGS = ("--heartbeat", "500", "--heartbeat-timeout", "500")  # stall limit 0.5 + 0.5 + 2 = 3 s


def start(make_server: type[ServerProcess], *flags: str) -> tuple[ServerProcess, int]:
    port = free_port()
    args = ("--admin-key", ADMIN, "--http-port", str(port), "--rate-limit", "0", *STALL_FLAGS)
    return make_server(*args, *flags).start(), port


def stalled(ws_port: int) -> float:
    """``wsfan_http_stalled_total`` from the WebSocket port's ``/metrics`` (0 when absent)."""
    return counter(ws_port, "wsfan_http_stalled_total")


def never_reading(port: int, request: bytes) -> socket.socket:
    """A socket with a 4 KiB receive buffer that sends ``request`` (one or many) and reads nothing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\r\n".encode()


def dropped_and_released(srv: ServerProcess, port: int, s: socket.socket) -> None:
    """While the response waits the server answers others; within the stall limit (3 s, 10 s allowed
    for a loaded machine) the connection is reset (the client's socket leaves ESTABLISHED) and counted."""
    status, _ = admin(port, "GET", "/rooms")
    assert status == 200, "the server answers others meanwhile"
    assert tcp_state(s) == TCP_ESTABLISHED
    until(lambda: tcp_state(s) != TCP_ESTABLISHED, 10, "the stalled connection was reset")
    assert stalled(srv.port) == 1, "counted"
    s.close()
    assert admin(port, "GET", "/history?room=none")[0] == 200, "and goes on answering"
    assert stalled(srv.port) == 1


def test_a_history_read_by_a_client_that_stops_reading_is_dropped(make_server):
    """``GET /history`` of 100 publications of 60 KB (6 MB, the default limits allow 19 MB)."""
    srv, port = start(make_server)
    payload = "x" * 60_000
    for _ in range(100):
        assert admin(port, "POST", "/publish", {"room": "big", "payload": payload})[0] == 200
    s = never_reading(port, get("/history?room=big"))
    dropped_and_released(srv, port, s)


def test_pipelined_room_pages_to_a_client_that_stops_reading_are_dropped(make_server):
    """150 pipelined ``GET /rooms`` pages of 250 rooms with 120-character names (about 5 MB)."""
    srv, port = start(make_server, "--max-rooms-per-connection", "250")

    async def joined_then_stall() -> None:
        async with websockets.connect(srv.url) as ws:
            await ws.recv()  # welcome
            for i in range(250):
                await ws.send(json.dumps({"type": "join", "id": str(i), "room": f"r{i:03d}" + "x" * 116}))
            for _ in range(250):
                assert json.loads(await ws.recv())["type"] == "ack"
            s = never_reading(port, get("/rooms?limit=10000") * 150)
            await asyncio.to_thread(dropped_and_released, srv, port, s)

    asyncio.run(joined_then_stall())


def test_pipelined_presence_to_a_client_that_stops_reading_is_dropped(make_server):
    """1,500 pipelined ``GET /presence`` of a room with 40 connections (about 6 MB)."""
    srv, port = start(make_server, "--presence")

    async def joined_then_stall() -> None:
        conns = [await websockets.connect(srv.url) for _ in range(40)]
        try:
            for ws in conns:
                await ws.recv()  # welcome
                await ws.send(json.dumps({"type": "join", "id": "j", "room": "p"}))
                assert json.loads(await ws.recv())["type"] == "ack"
            s = never_reading(port, get("/presence?room=p") * 1500)
            await asyncio.to_thread(dropped_and_released, srv, port, s)
        finally:
            for ws in conns:
                await ws.close()

    asyncio.run(joined_then_stall())
