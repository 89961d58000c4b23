"""What an SSE stream gets besides its room's deliveries (PROTOCOL.md, "HTTP beside the WebSocket").

A real server process over real sockets: broadcasts, ``joined``/``left`` events and the server's
``unsubscribed`` reach a ``GET /sse`` stream as named events without an ``id:`` field (its last
event ID stays the room's seq); the ``: joined`` comment comes once the join took effect.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import pytest
from test_server_api import ADMIN, call

from helpers.peers import PicowsPeer
from helpers.ports import free_port, wait_for_port
from helpers.servers import ServerProcess
from helpers.waiting import run

SECRET = "sse-pushes-test-secret-0123456789abcdef"


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 600)}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[ServerProcess, str]]:
    http_port = free_port()
    srv = ServerProcess(
        "--jwt-secret", SECRET, "--admin-key", ADMIN, "--http-port", str(http_port),
        "--rate-limit", "0", "--namespaces", "chat:join_leave=true",
    ).start()  # fmt: skip
    wait_for_port(http_port)
    yield srv, f"http://127.0.0.1:{http_port}"
    srv.kill()


class Stream:
    """An open ``GET /sse`` response read one event (block up to a blank line) at a time."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def block(self, timeout: float = 5) -> bytes:
        return await asyncio.wait_for(self.resp.content.readuntil(b"\n\n"), timeout)

    async def event(self, timeout: float = 5) -> dict[str, str]:
        """The next event's fields (``data`` lines joined), comments (``: keepalive``) skipped."""
        while True:
            lines = (await self.block(timeout)).decode().strip("\n").split("\n")
            fields: dict[str, str] = {}
            for line in lines:
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value
            if fields:
                return fields

    async def rest(self, timeout: float = 5) -> bytes:
        """Everything until the server ends the stream."""
        return await asyncio.wait_for(self.resp.content.read(), timeout)


@asynccontextmanager
async def sse(base: str, room: str, user: str) -> AsyncIterator[Stream]:
    """A stream of ``room`` as ``user``, past its ``: joined`` comment (the join took effect)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/sse", params={"room": room, "token": token(user)}) as resp,
    ):
        assert resp.status == 200
        stream = Stream(resp)
        assert await stream.block() == f": joined {room}\n\n".encode()
        yield stream


def data(event: dict[str, str]) -> Any:
    return json.loads(event["data"])


def test_an_sse_stream_gets_broadcasts_as_named_events_without_an_id(node: tuple[ServerProcess, str]) -> None:
    """``event: broadcast``, the WebSocket push's JSON as data, no ``id:``: the browser's last event ID
    (its Last-Event-ID on a reconnect) stays the room's seq across it."""
    srv, base = node

    async def go() -> None:
        ws = await PicowsPeer.connect(f"{srv.url}?token={token('wes')}")
        async with sse(base, "feed", "sam") as stream:
            assert (await call("POST", base + "/publish", {"room": "feed", "payload": "before"}))[0] == 200
            first = await stream.event()
            assert first["id"].endswith(":1") and data(first)["payload"] == "before"  # <epoch>:<seq>
            assert (await call("POST", base + "/broadcast", {"payload": {"to": "all"}}))[0] == 200
            pushed = await stream.event()
            assert set(pushed) == {"event", "data"} and pushed["event"] == "broadcast"
            assert data(pushed) == {"type": "broadcast", "payload": {"to": "all"}}
            assert (await ws.recv_type("broadcast"))["payload"] == {"to": "all"}  # the same push as /ws
            assert (await call("POST", base + "/publish", {"room": "feed", "payload": "after"}))[0] == 200
            after = await stream.event()
            assert after["id"] == first["id"][:-1] + "2" and "event" not in after
            assert data(after)["payload"] == "after"
        await ws.close()

    run(go())


def test_an_sse_stream_gets_joined_and_left_of_its_room(node: tuple[ServerProcess, str]) -> None:
    """In a namespace with join_leave, a stream is told of arrivals and departures like a WebSocket
    subscriber (it is not in presence itself: nobody is told of it)."""
    srv, base = node

    async def go() -> None:
        async with sse(base, "chat:hall", "sam") as stream:
            ws = await PicowsPeer.connect(f"{srv.url}?token={token('wes')}")
            assert (await ws.request("join", room="chat:hall"))["type"] == "ack"
            conn = ws.welcome["conn"]
            body = {"room": "chat:hall", "user": "wes", "conn": conn}
            joined = await stream.event()
            assert joined["event"] == "joined" and "id" not in joined
            assert data(joined) == {"type": "joined", **body}
            await ws.request("leave", room="chat:hall")
            left = await stream.event()
            assert left["event"] == "left" and "id" not in left and data(left) == {"type": "left", **body}
            await ws.close()

    run(go())


def test_unsubscribe_ends_an_sse_stream_after_telling_it(node: tuple[ServerProcess, str]) -> None:
    """``POST /unsubscribe`` of a stream's user and room: ``event: unsubscribed`` with the push's JSON,
    after the room's last delivery, then ``event: close`` ``1000`` (a stream is one room's); before,
    the stream stayed open and silent, holding its fd."""
    _, base = node

    async def go() -> None:
        async with sse(base, "desk", "sue") as stream, sse(base, "desk", "sid") as other:
            assert (await call("POST", base + "/publish", {"room": "desk", "payload": 1}))[0] == 200
            reason = {"user": "sue", "room": "desk", "reason": "moved"}
            assert (await call("POST", base + "/unsubscribe", reason))[0] == 200
            body = await stream.rest()
            epoch = (await call("GET", base + "/history?room=desk"))[1]["epoch"].encode()
            assert body == (
                b"id: "
                + epoch
                + b':1\ndata: {"type":"message","room":"desk","seq":1,"from":"server","payload":1}\n\n'
                b'event: unsubscribed\ndata: {"type":"unsubscribed","room":"desk","reason":"moved"}\n\n'
                b"event: close\ndata: 1000\n\n"
            ), body
            assert (await call("POST", base + "/publish", {"room": "desk", "payload": 2}))[0] == 200
            assert [data(await other.event())["payload"] for _ in range(2)] == [1, 2]  # only sue's ended

    run(go())
