"""One connection's requests take effect and are answered in the order sent, with ``--broker redis``.

A node answers a cluster ``join`` or ``publish`` only after a Redis round trip, while
``leave``, ``echo`` and ``ping`` need none: without a per-session order a ``leave``
sent right after a ``join`` was answered (and took effect) first, leaving the
connection subscribed (issue 11 #8). Every test sends its requests back to back, without
waiting for a reply, against a real node and a real redis-server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from helpers.peers import PicowsPeer
from helpers.redis_server import RedisServer, running_redis
from helpers.servers import ServerProcess


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    yield from running_redis()


@pytest.fixture(scope="module")
def cluster_node(redis: RedisServer) -> Iterator[ServerProcess]:
    srv = ServerProcess("--broker", redis.url, "--node-id", "order", "--rate-limit", "0", "--echo-endpoint")
    srv.start()
    yield srv
    srv.kill()


async def burst(peer: PicowsPeer, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Send every request at once (ids r0, r1, ...), then read that many replies in arrival order."""
    for i, req in enumerate(requests):
        await peer.send({"id": f"r{i}", **req})
    return [await peer.recv(10) for _ in requests]


def ids(replies: list[dict[str, Any]]) -> list[str]:
    return [r.get("requestId", "?") for r in replies]


async def test_join_then_leave_is_answered_in_order_and_leaves_the_room(cluster_node):
    room = "order-join-leave"
    c = await PicowsPeer.connect(cluster_node.url)
    replies = await burst(c, {"type": "join", "room": room}, {"type": "leave", "room": room})
    assert ids(replies) == ["r0", "r1"], replies
    assert [r["type"] for r in replies] == ["ack", "ack"]
    other = await PicowsPeer.connect(cluster_node.url)
    await other.request("join", room=room)
    assert (await other.request("publish", room=room, payload="after leave"))["type"] == "ack"
    await c.no_message(0.5)  # not subscribed: the leave took effect after the join
    for p in (c, other):
        await p.close()


async def test_join_then_publish_publishes_as_a_member(cluster_node):
    room = "order-join-publish"
    c = await PicowsPeer.connect(cluster_node.url)
    replies = await burst(c, {"type": "join", "room": room}, {"type": "publish", "room": room, "payload": 1})
    assert ids(replies) == ["r0", "r1"]
    assert replies[1]["type"] == "ack" and replies[1]["data"]["seq"] == 1, replies
    await c.close()


async def test_publish_then_leave_is_answered_in_order(cluster_node):
    room = "order-publish-leave"
    c = await PicowsPeer.connect(cluster_node.url)
    await c.request("join", room=room)
    replies = await burst(c, {"type": "publish", "room": room, "payload": 1}, {"type": "leave", "room": room})
    assert ids(replies) == ["r0", "r1"] and replies[0]["data"]["seq"] == 1
    await c.close()


async def test_back_to_back_publishes_are_numbered_and_acked_in_order(cluster_node):
    room = "order-publishes"
    c = await PicowsPeer.connect(cluster_node.url)
    sub = await PicowsPeer.connect(cluster_node.url)
    await c.request("join", room=room)
    await sub.request("join", room=room)
    replies = await burst(c, *({"type": "publish", "room": room, "payload": i} for i in range(50)))
    assert ids(replies) == [f"r{i}" for i in range(50)]
    assert [r["data"]["seq"] for r in replies] == list(range(1, 51))
    got = [await sub.recv(10) for _ in range(50)]
    assert [m["payload"] for m in got] == list(range(50))
    for p in (c, sub):
        await p.close()


async def test_a_refused_publish_among_pipelined_ones_keeps_its_place(cluster_node):
    room = "order-refusal"
    c = await PicowsPeer.connect(cluster_node.url)
    await c.request("join", room=room)
    replies = await burst(
        c,
        {"type": "publish", "room": room, "payload": 1},
        {"type": "publish", "room": "not-joined", "payload": 2},
        {"type": "publish", "room": room, "payload": [18446744073709551616]},
        {"type": "publish", "room": room, "payload": 3},
        {"type": "nope"},
        {"type": "publish", "room": room, "payload": 4},
    )
    assert ids(replies) == [f"r{i}" for i in range(6)], replies
    kinds = [r.get("code", r["type"]) for r in replies]
    assert kinds == ["ack", "NOT_JOINED", "INVALID_MESSAGE", "ack", "UNKNOWN_TYPE", "ack"]
    assert [replies[i]["data"]["seq"] for i in (0, 3, 5)] == [1, 2, 3]
    await c.close()


async def test_echo_ping_and_errors_after_a_pending_join_wait_for_its_ack(cluster_node):
    room = "order-echo"
    c = await PicowsPeer.connect(cluster_node.url)
    replies = await burst(
        c,
        {"type": "join", "room": room},
        {"type": "echo", "payload": "e"},
        {"type": "ping"},
        {"type": "join", "room": "bad room"},
        {"type": "leave", "room": room},
        {"type": "join", "room": room},
    )
    assert ids(replies) == [f"r{i}" for i in range(6)], replies
    assert [r["type"] for r in replies] == ["ack", "echo", "pong", "error", "ack", "ack"]
    other = await PicowsPeer.connect(cluster_node.url)
    await other.request("join", room=room)
    await other.request("publish", room=room, payload="still a member")
    assert (await c.recv())["payload"] == "still a member", "the last join took effect last"
    for p in (c, other):
        await p.close()


async def test_messages_pipelined_over_msgpack_keep_order_too(cluster_node):
    room = "order-msgpack"
    c = await PicowsPeer.connect(cluster_node.url, msgpack=True)
    replies = await burst(
        c,
        {"type": "join", "room": room},
        {"type": "publish", "room": room, "payload": b"\x00"},  # bin: refused, in its place
        {"type": "publish", "room": room, "payload": 1},
        {"type": "leave", "room": room},
    )
    assert ids(replies) == ["r0", "r1", "r2", "r3"]
    assert [r.get("code", r["type"]) for r in replies] == ["ack", "INVALID_MESSAGE", "ack", "ack"]
    await c.close()


async def test_a_rate_limited_message_is_refused_in_its_place(redis, make_server):
    node = make_server("--broker", redis.url, "--rate-limit", "0.01", "--rate-burst", "3").start()
    c = await PicowsPeer.connect(node.url)
    replies = await burst(
        c, {"type": "join", "room": "order-rate"}, {"type": "ping"}, {"type": "ping"}, {"type": "ping"}
    )
    assert ids(replies) == ["r0", "r1", "r2", "r3"], replies
    assert [r.get("code", r["type"]) for r in replies] == ["ack", "pong", "pong", "RATE_LIMITED"]
    await c.close()
