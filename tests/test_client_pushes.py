"""The Python client hands over what an application pushes (docs/app-api.md): room-less pushes
(``broadcast``, ``conn.send`` of the application's own types) through ``pushes()``/``on_push``, and
deliveries of rooms the server joined the connection to (``conn.join``) through ``messages()``.

A real server process serving tests/apps/probe.py, with compression on, driven by the client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from apps import probe as probe_app

from helpers.servers import ROOT, ServerProcess
from helpers.waiting import run
from wsfan.client import Broadcast, ClientError, connect

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
CLIENTS = [
    {"encoding": "json"},
    {"encoding": "msgpack"},
    {"encoding": "json", "compression": True},
    {"encoding": "msgpack", "compression": True},
]


class Notice(msgspec.Struct, tag="notice"):
    """What probe's ``push`` handler sends with ``conn.send({"type": "notice", "text": ...})``."""

    text: str


@pytest.fixture(scope="module")
def probe() -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--app",
        "apps.probe:app",
        "--rate-limit",
        "0",
        "--compression",
        "--compression-threshold",
        "16",
        env=ENV,
    ).start()
    yield srv
    srv.kill()


@pytest.mark.parametrize("options", CLIENTS, ids=lambda o: "+".join(str(v) for v in o.values()))
def test_pushes_stream_has_broadcasts_and_application_types_in_order(
    probe: ServerProcess, options: dict[str, Any]
) -> None:
    big = {"text": "compress me " * 20}  # above the threshold: a compressed frame where negotiated

    async def go() -> None:
        async with connect(probe.url, **options) as c, connect(probe.url, push_types=[Notice]) as typed:
            stream = c.pushes()
            await c.request(probe_app.Push(text="hi"))
            await c.request(probe_app.Shout(payload=big))
            await typed.request(probe_app.Push(text="typed"))
            assert await stream.get(5) == {"type": "notice", "text": "hi"}  # no push_types: a dict
            got = await stream.get(5)
            assert isinstance(got, Broadcast) and got.payload == big and got.received_at > 0
            # typed got c's broadcast too, and its own notice, decoded as its push type (no order
            # between the two: the broadcast goes round the control room, the notice does not)
            typed_pushes = typed.pushes()
            two = [await typed_pushes.get(5), await typed_pushes.get(5)]
            assert [p.payload for p in two if isinstance(p, Broadcast)] == [big]
            assert [p for p in two if not isinstance(p, Broadcast)] == [Notice(text="typed")]
            assert c.stats.pushes == 2

    run(go())


def test_typed_pushes_and_on_push(probe: ServerProcess) -> None:
    async def go() -> None:
        seen: list[Any] = []
        done = asyncio.Event()

        async def on_push(push: Any) -> None:
            seen.append(push)
            if isinstance(push, Broadcast) and push.payload == "end":
                done.set()

        async with connect(probe.url, push_types=[Notice], on_push=on_push) as c:
            with pytest.raises(ClientError):
                c.pushes()
            await c.request(probe_app.Push(text="typed"))
            await c.request(probe_app.Shout(payload="end"))
            await asyncio.wait_for(done.wait(), 5)
        assert seen[0] == Notice(text="typed")
        assert [type(p) for p in seen] == [Notice, Broadcast]

    run(go())


def test_push_types_must_be_tagged_and_not_the_protocols() -> None:
    class Untagged(msgspec.Struct):
        x: int

    class Shadow(msgspec.Struct, tag="message"):
        x: int

    async def go() -> None:
        with pytest.raises(TypeError):
            await connect("ws://127.0.0.1:9/ws", push_types=[Untagged])
        with pytest.raises(ValueError, match="message type of the protocol"):
            await connect("ws://127.0.0.1:9/ws", push_types=[Shadow])

    run(go())


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_deliveries_of_a_room_the_server_joined_us_to(probe: ServerProcess, encoding: str) -> None:
    room, marker = f"by-server-{encoding}", f"marker-{encoding}"

    async def go() -> None:
        async with connect(probe.url, encoding) as c, connect(probe.url) as other:
            all_rooms = c.messages()
            await c.join(marker)
            assert await c.request(probe_app.Enlist(room=room)) == sorted([room, marker])
            # The subscribed push came before the handler's ack (one node): listed at once.
            assert sorted(c.rooms) == sorted([room, marker])
            await other.join(room)
            await other.join(marker)
            await other.publish(room, {"n": 1})
            msg = await all_rooms.get(5)
            assert (msg.room, msg.seq, msg.payload) == (room, 1, {"n": 1})
            assert sorted(c.rooms) == sorted([room, marker])
            room_stream = c.messages(room)
            await other.publish(room, {"n": 2})
            msg = await room_stream.get(5)
            assert (msg.seq, msg.payload) == (2, {"n": 2})
            # Leaving it like a room of our own: nothing more of it, the next delivery is the marker's.
            await c.leave(room)
            assert c.rooms == [marker]
            await other.publish(room, {"n": 3})
            await other.publish(marker, "after")
            msg = await all_rooms.get(5)
            assert (msg.room, msg.payload) == (marker, "after")

    run(go())
