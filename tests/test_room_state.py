"""State a client can make the server (or Redis) keep: none of it may outlive the client or grow unbounded.

Hostile findings 04, 11 and 13: a refusal at ``--max-rooms`` swept every room on the
event loop; a join's room outlived its last subscriber for ``history_ttl`` with nothing
published, so open/close churn filled the room table without holding a connection; with
Redis every join left a ``wsfan:{room}:m`` key for a day. Counters and table sizes here,
never wall time.
"""

from __future__ import annotations

import asyncio

import pytest

from helpers.peers import PicowsPeer
from helpers.servers import ServerProcess
from helpers.waiting import wait_until
from wsfan.server.broker import BrokerUnavailable
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.namespaces import Namespace, Namespaces


def _broker(max_rooms: int, **ns: float) -> MemoryBroker:
    broker = MemoryBroker(namespaces=Namespaces(Namespace(history_size=10, **ns)), max_rooms=max_rooms)
    broker.bind(lambda pub: None)
    return broker


def test_a_refusal_at_max_rooms_never_sweeps():
    """Finding 04: each refused new room ran ``sweep()`` over every room (O(rooms) per request)."""
    broker = _broker(1_000)
    for i in range(1_000):
        broker.publish(f"full-{i}", "u", b"1", 0, "c")
    sweeps = 0
    sweep = broker.sweep

    def counted() -> int:
        nonlocal sweeps
        sweeps += 1
        return sweep()

    broker.sweep = counted  # type: ignore[method-assign]
    for i in range(200):
        with pytest.raises(BrokerUnavailable):
            broker.history(f"new-{i}", None)
        with pytest.raises(BrokerUnavailable):
            broker.publish(f"new-{i}", "u", b"1", 0, "c")
    assert sweeps == 0, "a refusal is O(1): the sweep timer makes room, not the refused request"
    assert broker.refusals == 400 and len(broker.rooms) == 1_000
    broker.subscribe("full-0")
    broker.publish("full-0", "u", b"2", 0, "c")  # existing rooms are unaffected


async def _ack(peer: PicowsPeer, kind: str, **fields: object) -> dict:
    reply = await peer.request(kind, **fields)
    assert reply["type"] == "ack", reply
    return reply["data"]


async def test_rooms_never_published_in_go_with_their_last_subscriber(make_server):
    """Finding 11: join/leave churn (or connections that joined and left) filled ``--max-rooms``
    without holding anything: each room outlived its last subscriber for ``history_ttl``."""
    srv = make_server("--max-rooms", "50", "--rate-limit", "0", "--namespaces", "chat:presence=true").start()
    p = await PicowsPeer.connect(srv.url)
    for i in range(150):  # three times the limit, one room at a time
        room = f"chat:churn-{i}" if i % 2 else f"churn-{i}"
        await _ack(p, "join", room=room)
        await _ack(p, "leave", room=room)
    for _ in range(3):  # connections that join rooms and go away
        q = await PicowsPeer.connect(srv.url)
        for i in range(40):
            await _ack(q, "join", room=f"gone-{_}-{i}")
        await q.close()
    async with asyncio.timeout(10):  # the server reads each close, then the rooms go with it
        while not await _joins(srv):
            await asyncio.sleep(0.05)
    await p.close()


async def _joins(srv: ServerProcess) -> bool:
    """True once 50 new rooms can be joined at once (the whole --max-rooms 50)."""
    p = await PicowsPeer.connect(srv.url)
    try:
        for i in range(50):
            if (await p.request("join", room=f"fresh-{i}"))["type"] != "ack":
                return False
        return True
    finally:
        await p.close()


async def test_a_forgotten_unpublished_room_keeps_its_epoch_and_a_published_one_does_not(make_server):
    """The epoch rule (docs/protocol-choices.md, "Epochs") with rooms forgotten at their last leave:
    one never published in comes back under its epoch, so a rejoin with since 0 is recovered as
    when it was kept; once published in and forgotten, a rejoin with the old epoch never is."""
    srv = make_server("--rate-limit", "0", "--history-ttl", "0.3").start()
    p = await PicowsPeer.connect(srv.url)
    first = await _ack(p, "join", room="quiet")
    await _ack(p, "leave", room="quiet")
    again = await _ack(p, "join", room="quiet", since=0, epoch=first["epoch"])
    assert (again["seq"], again["recovered"], again["epoch"]) == (0, True, first["epoch"])
    for i in range(2):
        await _ack(p, "publish", room="quiet", payload=i)
    await _ack(p, "leave", room="quiet")
    kept = await _ack(p, "join", room="quiet", since=0, epoch=first["epoch"])
    assert (kept["seq"], kept["recovered"], kept["epoch"]) == (2, True, first["epoch"]), "published: kept"
    assert [(await p.recv())["seq"] for _ in range(2)] == [1, 2]
    await _ack(p, "leave", room="quiet")
    async with asyncio.timeout(15):  # the sweep forgets it past its TTL (0.3 s)
        while (back := await _ack(p, "join", room="quiet", since=2, epoch=first["epoch"]))["recovered"]:
            await _ack(p, "leave", room="quiet")
            await asyncio.sleep(0.1)
    assert (back["seq"], back["epoch"] != first["epoch"]) == (0, True), "a new numbering, a new epoch"
    await _ack(p, "leave", room="quiet")
    since0 = await _ack(p, "join", room="quiet", since=0, epoch=first["epoch"])
    assert since0["recovered"] is False, "a since 0 of the old numbering may have missed 1 and 2"
    await p.close()


async def test_redis_keeps_nothing_of_rooms_nobody_published_in_once_nobody_holds_them(
    redis_server, make_server
):
    """Finding 13: every join wrote ``wsfan:{room}:m`` for ``--history-meta-ttl`` (a day), published in
    or not. Now a room's meta lives ``--presence-ttl`` until its first publish, kept alive while a
    node holds subscribers, so its epoch stands for them; a publish gives it the meta TTL."""
    srv = make_server("--broker", redis_server.url, "--rate-limit", "0", "--presence-ttl", "2").start()
    p = await PicowsPeer.connect(srv.url)
    held = await _ack(p, "join", room="held")
    for i in range(100):
        await _ack(p, "join", room=f"churn-{i}")
        await _ack(p, "leave", room=f"churn-{i}")
    ttls = [redis_server.command("TTL", f"wsfan:{{churn-{i}}}:m") for i in range(100)]
    assert all(t <= 2 for t in ttls), "the hold TTL, not the meta TTL"
    assert wait_until(lambda: not redis_server.command("KEYS", "wsfan:{churn-*"), timeout=15), "all gone"
    assert redis_server.command("EXISTS", "wsfan:{held}:m") == 1, "held by a subscriber: kept alive"

    await _ack(p, "publish", room="held", payload=1)
    assert redis_server.command("TTL", "wsfan:{held}:m") > 3600, "published: the meta TTL (a day)"
    q = await PicowsPeer.connect(srv.url)
    back = await _ack(q, "join", room="held", since=0, epoch=held["epoch"])
    assert (back["seq"], back["recovered"], back["epoch"]) == (1, True, held["epoch"])
    await q.close()
    await p.close()


async def test_a_connection_joins_at_most_max_rooms_per_connection(make_server):
    """Rooms per connection had no bound: one connection could hold --max-rooms of the node's rooms
    (Centrifugo's channel limit per connection is the model; default 100)."""
    srv = make_server("--rate-limit", "0").start()
    p = await PicowsPeer.connect(srv.url)
    for i in range(100):
        await _ack(p, "join", room=f"many-{i}")
    err = await p.request("join", room="many-100")
    assert (err["type"], err["code"]) == ("error", "LIMIT_EXCEEDED"), err
    assert "100 rooms" in err["message"] and err["requestId"]
    await _ack(p, "join", room="many-0", since=0)  # a room it is in: a rejoin, not one more
    await _ack(p, "leave", room="many-0")
    await _ack(p, "join", room="many-100")
    q = await PicowsPeer.connect(srv.url)
    await _ack(q, "join", room="many-101")  # per connection, not per node
    await q.close()
    await p.close()

    small = make_server("--rate-limit", "0", "--max-rooms-per-connection", "2").start()
    p = await PicowsPeer.connect(small.url)
    for room in ("a", "b"):
        await _ack(p, "join", room=room)
    assert (await p.request("join", room="c"))["code"] == "LIMIT_EXCEEDED"
    assert (await p.request("echo", payload=1))["type"] == "echo", "the connection stays usable"
    await p.close()
