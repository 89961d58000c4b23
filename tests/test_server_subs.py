"""Server-side subscriptions are told to the connection (PROTOCOL.md, "Server-side joins and leaves").

``conn.join`` (in ``on_open`` or a handler) sends ``{"type":"subscribed","room","seq","epoch"}``
before the room's first delivery to it, and ``conn.leave`` / ``POST /unsubscribe`` send
``{"type":"unsubscribed","room","reason"?}`` after its last one. Real server processes
(``tests/apps/subs.py``), one node and on a real redis-server (the join then waits for the
broker: ``Hub._join_async``), while a publisher floods the room, so a push out of place or a
wrong seq shows as a delivery before it or a seq that does not follow.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apps import subs as subs_app
from test_server_api import ADMIN, call

from helpers.peers import PicowsPeer
from helpers.ports import free_port
from helpers.servers import ROOT, ServerProcess
from helpers.waiting import run
from wsfan.client import ConnectionClosed, Gap, Subscribed, Unsubscribed, connect

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
APP = ("--app", "apps.subs:app", "--rate-limit", "0")


@pytest.fixture(params=["single", "redis"])
def server(request: pytest.FixtureRequest, make_server: type[ServerProcess]) -> ServerProcess:
    if request.param == "single":
        return make_server(*APP, env=ENV).start()
    redis = request.getfixturevalue("redis_server")
    return make_server(*APP, "--broker", redis.url, env=ENV).start()


class Flood:
    """A publisher that keeps publishing into ``room``, as fast as the server acks them."""

    def __init__(self, peer: PicowsPeer, room: str) -> None:
        self.peer, self.room = peer, room
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Flood:
        assert (await self.peer.request("join", room=self.room))["success"]

        async def loop() -> None:
            n = 0
            while not self.stop.is_set():  # ten at a time: the server is never far behind
                for _ in range(9):
                    n += 1
                    await self.peer.send({"type": "publish", "room": self.room, "payload": n})
                n += 1
                assert (await self.peer.request("publish", room=self.room, payload=n))["success"]

        self.task = asyncio.create_task(loop())
        return self

    async def last_seq(self) -> int:
        """Stop flooding; the seq of one final publish (every earlier one has a lower seq)."""
        self.stop.set()
        assert self.task is not None
        await self.task
        reply = await self.peer.request("publish", room=self.room, payload="last")
        assert reply["success"], reply
        return int(reply["data"]["seq"])

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task


async def subscribed_then_contiguous(
    p: PicowsPeer, room: str, last: int, skip: Callable[[dict[str, Any]], bool]
) -> int:
    """Read ``p`` up to the delivery of ``last``: the room's first message must be its ``subscribed``, the
    deliveries after it exactly seq+1, seq+2, ... ``last``. Messages ``skip`` accepts are passed over."""
    first = await p.recv()
    while skip(first):
        first = await p.recv()
    assert first["type"] == "subscribed" and first["room"] == room, f"a delivery before the push: {first}"
    assert set(first) <= {"type", "room", "seq", "epoch"} and isinstance(first["seq"], int), first
    seq = first["seq"]
    while seq < last:
        msg = await p.recv()
        if skip(msg):
            continue
        assert msg["type"] == "message" and msg["room"] == room, msg
        assert msg["seq"] == seq + 1, f"after {seq} came {msg['seq']}"
        seq = msg["seq"]
    return int(first["seq"])


def test_join_in_on_open_is_told_before_the_first_delivery(server: ServerProcess) -> None:
    async def go() -> None:
        pub = await PicowsPeer.connect(server.url)
        async with Flood(pub, "feed") as flood:
            sync = [await PicowsPeer.connect(f"{server.url}?auto=feed") for _ in range(4)]
            later = [await PicowsPeer.connect(f"{server.url}?auto_async=feed") for _ in range(4)]
            last = await flood.last_seq()
        starts = [await subscribed_then_contiguous(p, "feed", last, lambda m: False) for p in sync + later]
        # Each joined where the room then was (through a broker the joins complete in any order).
        assert all(0 <= s <= last for s in starts), (starts, last)
        for p in [pub, *sync, *later]:
            await p.close()

    run(go())


def test_join_and_leave_in_a_handler(server: ServerProcess) -> None:
    async def go() -> None:
        pub = await PicowsPeer.connect(server.url)
        c = await PicowsPeer.connect(server.url)
        assert (await c.request("join", room="mine"))["success"]
        async with Flood(pub, "feed") as flood:
            await c.send({"type": "enlist", "id": "j", "room": "feed"})
            await asyncio.sleep(0.05)  # deliveries flowing when it leaves (no assertion on time)
            await c.send({"type": "enlist", "id": "l", "room": "feed", "leave": True, "reason": "bye"})
            # Everything of feed comes between its subscribed and its unsubscribed, seqs contiguous.
            acks: dict[str, Any] = {}
            first = None
            seq = None
            while True:
                msg = await c.recv()
                if msg["type"] == "ack":
                    acks[msg["requestId"]] = msg["data"]
                    continue
                if first is None:
                    first = msg
                    assert msg["type"] == "subscribed" and msg["room"] == "feed", msg
                    seq = msg["seq"]
                    continue
                if msg["type"] == "unsubscribed":
                    assert msg == {"type": "unsubscribed", "room": "feed", "reason": "bye"}
                    break
                assert msg["type"] == "message" and msg["room"] == "feed" and msg["seq"] == seq + 1, msg
                seq = msg["seq"]
            await flood.last_seq()
            # Nothing of feed after its unsubscribed: the next message is the marker's delivery.
            assert (await pub.request("join", room="mine"))["success"]
            assert (await pub.request("publish", room="mine", payload="marker"))["success"]
            while len(acks) < 2:
                msg = await c.recv()
                assert msg["type"] == "ack", msg
                acks[msg["requestId"]] = msg["data"]
            msg = await c.recv()
            assert (msg["type"], msg["room"], msg["payload"]) == ("message", "mine", "marker"), msg
        # conn.rooms in the handler: on one node the join took effect in the call; through a broker it
        # takes effect once the broker answered (the leave waits for it: messages keep their order).
        cluster = "--broker" in server.args
        assert acks == {"j": ["mine"] if cluster else ["feed", "mine"], "l": ["mine"]}
        # Joining a room it is in, leaving one it is not in: no push (the ack is the next message).
        for request in ({"room": "mine"}, {"room": "feed", "leave": True}):
            reply = await c.request("enlist", **request)
            assert reply["type"] == "ack", reply
            nxt = await c.request("ping")
            assert nxt["type"] == "pong", nxt
        # A reason past 256 characters is the application's ValueError (INTERNAL): still in the room.
        reply = await c.request("enlist", room="mine", leave=True, reason="x" * 257)
        assert (reply["type"], reply["code"]) == ("error", "INTERNAL"), reply
        assert (await c.request("ping"))["type"] == "pong"  # and no unsubscribed before it
        await c.send({"type": "enlist", "id": "e", "room": "mine", "leave": True})
        assert await c.recv() == {"type": "unsubscribed", "room": "mine"}  # no reason: left out
        await pub.close()
        await c.close()

    run(go())


@pytest.fixture(params=["workers", "nodes"])
def cluster(
    request: pytest.FixtureRequest, redis_server: Any, make_server: type[ServerProcess]
) -> list[tuple[ServerProcess, str]]:
    """``--workers 2`` behind one port, or two nodes; on a real redis-server, each with its server-API URL."""
    count = 1 if request.param == "workers" else 2
    extra = ("--workers", "2") if request.param == "workers" else ()
    nodes = []
    for _ in range(count):
        http_port = free_port()
        srv = make_server(
            *APP, "--broker", redis_server.url, "--admin-key", ADMIN, "--http-port", str(http_port), *extra,
            env=ENV,
        ).start()  # fmt: skip
        nodes.append((srv, f"http://127.0.0.1:{http_port}"))
    return nodes


class Watched:
    """A client with the ``Subscribed``/``Unsubscribed`` events it got, and an event per kind."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.changed = asyncio.Event()
        self.client: Any = None

    def on_event(self, event: Any) -> None:
        if isinstance(event, (Subscribed, Unsubscribed, Gap)):
            self.events.append(event)
            self.changed.set()

    async def wait_for(self, kind: type, count: int) -> list[Any]:
        async def enough() -> list[Any]:
            while len(got := [e for e in self.events if isinstance(e, kind)]) < count:
                self.changed.clear()
                await self.changed.wait()
            return got

        return await asyncio.wait_for(enough(), 10)


def test_http_unsubscribe_reaches_the_client_on_every_worker_and_node(
    cluster: list[tuple[ServerProcess, str]],
) -> None:
    """``POST /unsubscribe`` to one node: the user's clients on the other worker or node get
    ``Unsubscribed``, ``client.rooms`` drops the room (one it joined itself and one the server
    joined it to), and nothing of the room reaches them after it."""

    async def go() -> None:
        urls = [srv.url for srv, _ in cluster]
        watched: list[Watched] = []
        nodes: set[str] = set()
        for attempt in range(60):  # one client per node (--workers 2: the kernel picks the worker)
            w = Watched()
            w.client = await connect(f"{urls[attempt % len(urls)]}?auto=by-server", on_event=w.on_event)
            if w.client.welcome.node in nodes:
                await w.client.close()
                continue
            nodes.add(w.client.welcome.node)
            watched.append(w)
            if len(watched) == 2:
                break
        assert len(watched) == 2, "a client on each of two nodes"
        pub = await connect(urls[0])
        await pub.join("mine")
        await pub.join("by-server")
        await pub.join("marker")
        for w in watched:
            assert [(e.room, e.seq) for e in await w.wait_for(Subscribed, 1)] == [("by-server", 0)]
            await w.client.join("mine")
            await w.client.join("marker")
            assert sorted(w.client.rooms) == ["by-server", "marker", "mine"]
            for room in ("mine", "by-server"):
                body = {"user": w.client.welcome.user, "room": room, "reason": f"not {room}"}
                status, reply = await call("POST", cluster[0][1] + "/unsubscribe", body)
                assert status == 200, reply
        # Every client is out of both rooms before anything is published: a publication made
        # while one of them was still in (its node not yet told) would rightly reach it.
        for w in watched:
            got = await w.wait_for(Unsubscribed, 2)
            assert sorted((e.room, e.reason) for e in got) == [
                ("by-server", "not by-server"),
                ("mine", "not mine"),
            ]
            assert w.client.rooms == ["marker"]
        await pub.publish("mine", "after")
        await pub.publish("by-server", "after")
        await pub.publish("marker", "marker")
        for w in watched:
            msg = await w.client.messages().get(5)
            assert (msg.room, msg.payload) == ("marker", "marker"), msg  # nothing of the rooms it left
        for c in [*(w.client for w in watched), pub]:
            await c.close()

    run(go())


def test_python_client_reports_the_gap_of_a_server_joined_room_after_a_reconnect(
    server: ServerProcess,
) -> None:
    """The client does not rejoin a server-joined room; the server's ``on_open`` joins the new
    connection again, and its ``subscribed`` seq past the last seq handed over is a ``Gap``."""

    async def go() -> None:
        w = Watched()
        reconnect = asyncio.Event()

        async def gated_sleep(delay: float) -> None:
            await reconnect.wait()  # the test publishes while the client is away, then lets it in

        w.client = c = await connect(f"{server.url}?auto=feed", on_event=w.on_event)
        c.reconnector.sleep = gated_sleep
        pub = await connect(server.url)
        await pub.join("feed")
        first = (await w.wait_for(Subscribed, 1))[0]
        assert first.room == "feed" and c.rooms == ["feed"]
        stream = c.messages("feed")
        for n in (1, 2):
            await pub.publish("feed", n)
        assert [(await stream.get(5)).payload for _ in range(2)] == [1, 2]
        last = c.last_seq("feed")
        assert last == first.seq + 2
        with pytest.raises(ConnectionClosed):  # the server closes it (no ack); the client reconnects
            await c.request(subs_app.Kick(code=4100))
        assert not c.connected and c.rooms == []  # a server-joined room is the connection's
        for n in (3, 4, 5):
            await pub.publish("feed", n)  # missed: the client is not connected
        reconnect.set()
        subscribed = await w.wait_for(Subscribed, 2)
        gaps = await w.wait_for(Gap, 1)
        assert subscribed[1].seq == last + 3 and subscribed[1].epoch == first.epoch
        assert gaps == [Gap("feed", last, last + 3, False)]
        assert w.events.index(gaps[0]) == w.events.index(subscribed[1]) + 1  # told right after it
        assert c.rooms == ["feed"]
        await pub.publish("feed", 6)
        msg = await stream.get(5)
        assert (msg.seq, msg.payload) == (last + 4, 6)
        await c.close()
        await pub.close()

    run(go())
