"""Presence and joined/left events across nodes sharing a real redis-server, and TTLs on every key."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from helpers.peers import PicowsPeer
from helpers.redis_server import RedisServer
from helpers.servers import ServerProcess
from helpers.tcp_proxy import TcpProxy
from helpers.waiting import wait_until

NS = ("--namespaces", "chat:presence=true,join_leave=true", "--presence-ttl", "1", "--rate-limit", "0")


def node(make_server: type[ServerProcess], redis: RedisServer, name: str, *args: str) -> ServerProcess:
    return make_server("--broker", redis.url, "--node-id", name, *NS, *args).start()


async def joined(url: str, room: str, **fields) -> PicowsPeer:
    peer = await PicowsPeer.connect(url)
    ack = await peer.request("join", room=room, **fields)
    assert ack["type"] == "ack", ack
    return peer


async def presence(peer: PicowsPeer, room: str) -> list[str]:
    ack = await peer.request("presence", room=room)
    assert ack["type"] == "ack", ack
    return sorted(e["conn"] for e in ack["data"]["presence"])


async def events(peer: PicowsPeer, within: float = 0.5) -> list[tuple[str, str]]:
    """Every joined/left event until the peer is quiet for ``within`` seconds, as (type, conn)."""
    out = []
    while True:
        try:
            msg = await peer.recv(within)
        except TimeoutError:
            return out
        out.append((msg["type"], msg["conn"]))


async def test_joined_and_left_cross_nodes_exactly_once(redis_server, make_server):
    a, b = node(make_server, redis_server, "A"), node(make_server, redis_server, "B")
    room = "chat:x"
    pa = await joined(a.url, room)
    pb = await joined(b.url, room)
    pc = await joined(a.url, room)
    conn = {p: p.welcome["conn"] for p in (pa, pb, pc)}
    # The join ack comes once the joiner is in presence and its arrival is on its way.
    asker = await PicowsPeer.connect(b.url)  # not in the room: its replies hide no event
    assert await presence(asker, room) == sorted(conn.values())
    await pc.request("join", room=room)  # again: no second arrival
    assert await events(pb) == [("joined", conn[pc])]
    await pb.request("leave", room=room)
    await pc.close()
    got = await events(pa)
    assert got[:2] == [("joined", conn[pb]), ("joined", conn[pc])]
    # Leaves on two nodes race each other: each is seen once, in either order.
    assert sorted(got[2:]) == sorted([("left", conn[pb]), ("left", conn[pc])])
    assert await events(pb) == [], "nothing after it left"
    for p in (pa, pb, asker):
        await p.close()


async def test_presence_is_cluster_wide_and_a_killed_node_leaves_within_the_ttl(redis_server, make_server):
    a, b = node(make_server, redis_server, "A"), node(make_server, redis_server, "B")
    room = "chat:who"
    pa = await joined(a.url, room)
    pb1 = await joined(b.url, room)
    pb2 = await joined(b.url, room)
    all_conns = sorted(p.welcome["conn"] for p in (pa, pb1, pb2))
    assert await presence(pa, room) == all_conns
    assert await presence(pb1, room) == all_conns, "the same answer on every node"
    stats = await pa.request("presence_stats", room=room)
    assert stats["data"] == {"room": room, "connections": 3, "users": 3}

    await pb2.close()  # a disconnect on B is seen on A
    assert (await pa.recv_type("left"))["conn"] == pb2.welcome["conn"]
    assert await presence(pa, room) == sorted(p.welcome["conn"] for p in (pa, pb1))

    # Presence outlives several refresh periods while the node lives.
    await asyncio.sleep(1.5)
    assert len(await presence(pa, room)) == 2

    b.proc.kill()  # SIGKILL: B cannot say goodbye; its entries expire and A announces them
    started = time.monotonic()
    left = await pa.recv_type("left", timeout=5)
    assert left["conn"] == pb1.welcome["conn"]
    assert time.monotonic() - started < 3, "gone within the TTL (1 s) plus a refresh period"
    assert await presence(pa, room) == [pa.welcome["conn"]]
    await pa.no_message(0.8)  # announced once, not by every refresh after
    await pa.close()


async def test_every_redis_key_has_a_ttl(redis_server, make_server):
    a = node(make_server, redis_server, "A", "--history-ttl", "120", "--history-meta-ttl", "600")
    pubs = [await joined(a.url, room) for room in ("chat:ttl", "plain", "chat:quiet")]
    for p, room in zip(pubs, ("chat:ttl", "plain"), strict=False):
        assert (await p.request("publish", room=room, payload=1))["type"] == "ack"
    await presence(pubs[0], "chat:ttl")
    keys = set(redis_server.command("KEYS", "*"))
    cursor, scanned = 0, set()
    while True:
        cursor, batch = redis_server.command("SCAN", cursor, "COUNT", 100)
        scanned.update(batch)
        if int(cursor) == 0:
            break
    assert scanned == keys and len(keys) >= 7, keys  # meta x3, history x2, presence x2 (x2 rooms)
    ttls = {k.decode(): redis_server.command("TTL", k) for k in scanned}
    assert all(t > 0 for t in ttls.values()), ttls
    assert ttls["wsfan:{plain}:h"] <= 120 and ttls["wsfan:{plain}:m"] <= 600
    assert ttls["wsfan:{chat:ttl}:p"] <= 1 and ttls["wsfan:{chat:ttl}:x"] <= 1
    for p in pubs:
        await p.close()


async def test_join_leave_without_presence_keeps_nothing_in_redis(redis_server, make_server):
    """Events only (issue 14): the joins and leaves are announced, no presence key is written,
    and what the rooms did write (their seq and history) has a TTL like every key."""
    a = make_server(
        "--broker", redis_server.url, "--node-id", "A", "--rate-limit", "0",
        "--namespaces", "live:join_leave=true", "--history-ttl", "120", "--history-meta-ttl", "600",
    ).start()  # fmt: skip
    room = "live:x"
    stays = await joined(a.url, room)
    comer = await joined(a.url, room)
    await comer.request("leave", room=room)
    assert await events(stays) == [("joined", comer.welcome["conn"]), ("left", comer.welcome["conn"])]
    assert (await stays.request("publish", room=room, payload=1))["type"] == "ack"
    keys = {k.decode() for k in redis_server.command("KEYS", "*")}
    mine = {k for k in keys if k.startswith("wsfan:{live:x}")}
    assert mine == {"wsfan:{live:x}:m", "wsfan:{live:x}:h"}, "no presence hash or expiry set"
    assert all(redis_server.command("TTL", k) > 0 for k in keys), "the node's own keys too"
    for p in (stays, comer):
        await p.close()


async def test_an_expired_seq_restarts_under_a_new_epoch(redis_server, make_server):
    a = node(make_server, redis_server, "A", "--history-ttl", "1", "--history-meta-ttl", "1")
    pub = await joined(a.url, "plain")
    for i in range(2):
        await pub.request("publish", room="plain", payload=i)
    first = await pub.request("join", room="plain", since=0)
    epoch = first["data"]["epoch"]
    assert first["data"]["recovered"] is True
    assert wait_until(lambda: redis_server.command("EXISTS", "wsfan:{plain}:m") == 0, timeout=5)
    ack = await pub.request("publish", room="plain", payload="new")
    assert ack["data"]["seq"] == 1, "the room started over"
    late = await joined(a.url, "plain", since=2, epoch=epoch)
    await late.close()
    again = await pub.request("join", room="plain", since=2, epoch=epoch)
    assert again["data"]["recovered"] is False and again["data"]["epoch"] != epoch
    await pub.close()


async def test_a_drained_node_leaves_presence_at_once_not_after_the_ttl(redis_server, make_server):
    args = ("--presence-ttl", "60", "--drain-timeout", "2")
    a, b = node(make_server, redis_server, "A", *args), node(make_server, redis_server, "B", *args)
    room = "chat:drain"
    pa = await joined(a.url, room)
    pb = await joined(b.url, room)
    assert (await pa.recv_type("joined"))["conn"] == pb.welcome["conn"]
    started = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)  # a graceful stop: B's connections leave, announced
    left = await pa.recv_type("left", timeout=10)
    assert left["conn"] == pb.welcome["conn"] and time.monotonic() - started < 10
    assert await presence(pa, room) == [pa.welcome["conn"]], "gone now, not after the 60 s TTL"
    assert b.proc.wait(15) == 0
    await pa.close()


async def until(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll an async predicate every 50 ms until it is true (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_leave_while_redis_is_away_leaves_presence_when_it_is_back(redis_server, make_server):
    """A connection that leaves while its node is cut off from Redis (a partition: Redis keeps its
    data) gets its ack; its presence entry is removed as soon as the node reaches Redis again, not
    at the end of --presence-ttl (60 s here): the node remembers the leaves it could not write."""
    proxy = TcpProxy(redis_server.port).start()
    try:
        args = ("--presence-ttl", "60")
        a = make_server("--broker", f"redis://127.0.0.1:{proxy.port}/0", "--node-id", "A", *NS, *args).start()
        b = node(make_server, redis_server, "B", *args)
        room = "chat:partition"
        pa = await joined(a.url, room)
        pb = await joined(b.url, room)
        assert await presence(pb, room) == sorted([pa.welcome["conn"], pb.welcome["conn"]])
        proxy.cut()

        async def away() -> bool:
            return (await pa.request("presence", room=room)).get("code") == "UNAVAILABLE"

        assert await until(away)
        assert (await pa.request("leave", room=room))["type"] == "ack"
        assert await presence(pb, room) == sorted([pa.welcome["conn"], pb.welcome["conn"]])  # not written
        proxy.start()

        async def back() -> bool:
            return (await pa.request("presence", room=room))["type"] == "ack"

        assert await until(back)
        started = time.monotonic()

        async def gone() -> bool:
            return await presence(pb, room) == [pb.welcome["conn"]]

        assert await until(gone) and time.monotonic() - started < 3, time.monotonic() - started
        await pa.close()
        await pb.close()
    finally:
        proxy.stop()
