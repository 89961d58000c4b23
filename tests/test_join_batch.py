"""Joins through Redis are batched: one pipeline of history reads (and presence writes) per batch.

Every test runs a real ``python -m wsfan --broker redis://...`` process against a real
redis-server and a crowd of real WebSocket connections. A connection's joins run one at a time
(its later requests wait behind a pending join, docs/protocol-choices.md "Cluster"), so a storm
of N joins at once is N connections, each sending one join in the same event-loop turn of the
test, after every one of them is upgraded.

Before the batching every join was its own ``EVALSHA`` on a connection of the broker's pool
(64, 5 s checkout timeout): behind a link with a 50 ms one-way delay (``TcpProxy(delay=...)``,
netem's delay, so the cost is the same on an idle or a loaded machine) 5,000 joins needed
at least 5,000 / 64 x 0.1 s = 7.8 s of round trips; those still waiting for a connection after
5 s got redis-py's "No connection available", which took the broker down: UNAVAILABLE for them
and for the joins in flight.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from helpers.redis_server import RedisServer, running_cluster
from helpers.servers import ServerProcess
from helpers.tcp_proxy import TcpProxy
from helpers.waiting import until
from wsfan.server.broker import UNAVAILABLE_TEXT
from wsfan.server.broker.redis_layout import meta_key

FLAGS = ("--rate-limit", "0", "--node-id", "n1")


class _Member(asyncio.Protocol):
    """A bare WebSocket client: upgrade, then the first ack or error reply of what it sends."""

    def __init__(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.up = False
        self.closed = False  # closed by the test: nothing more to report

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        for fut in (self.upgraded, self.reply):
            if not fut.done():
                fut.set_exception(ConnectionResetError(f"closed ({exc})"))

    def send_text(self, payload: bytes) -> None:
        """A masked text frame, all-zero mask key (RFC 6455 5.3 asks for a mask, not a random one)."""
        n = len(payload)
        head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
        assert self.transport is not None
        self.transport.write(head + b"\0\0\0\0" + payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.up:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(ConnectionRefusedError(buf[: buf.find(b"\r\n")].decode()))
                return
            self.up = True
            self.upgraded.set_result(None)
            buf = buf[end + 4 :]
        pos = 0
        while len(buf) - pos >= 2:
            op, size, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if size == 126:
                size, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                size, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if len(buf) - pos < head + size:
                break
            payload = buf[pos + head : pos + head + size]
            pos += head + size
            if op == 1:
                msg = json.loads(payload)
                if msg["type"] in ("ack", "error") and not self.reply.done():
                    self.reply.set_result(msg)
            elif op == 9:  # ping: pong
                assert self.transport is not None
                self.transport.write(bytes((0x8A, 0x80 | size)) + b"\0\0\0\0" + payload)
        self.buf = buf[pos:]


async def crowd(server: ServerProcess, n: int) -> list[_Member]:
    """``n`` upgraded connections (at most 200 handshakes in flight), every welcome received."""
    loop = asyncio.get_running_loop()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    gate = asyncio.Semaphore(200)

    async def one() -> _Member:
        async with gate:
            _, member = await loop.create_connection(lambda: _Member(request), "127.0.0.1", server.port)
            await member.upgraded
            return member

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def storm(members: list[_Member], rooms: list[str], timeout: float) -> list[dict[str, Any]]:
    """Member ``i`` joins ``rooms[i]``, every join written in one loop turn; the replies, in order."""
    for i, (member, room) in enumerate(zip(members, rooms, strict=True)):
        member.send_text(json.dumps({"type": "join", "id": str(i), "room": room}).encode())
    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*(m.reply for m in members)))


def close_all(members: list[_Member]) -> None:
    for m in members:
        m.closed = True
        if m.transport is not None:
            m.transport.abort()


def metrics(server: ServerProcess) -> dict[str, float]:
    """``GET /metrics``: every unlabelled series' value by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def reads_processed(redis: RedisServer) -> int:
    """Redis' ``total_reads_processed``: socket reads of client input. A round trip needs at least one,
    whatever it carries (one command or a pipeline of hundreds), so this bounds round trips from above."""
    return int(redis.command("INFO", "stats")["total_reads_processed"])


def grew(server: ServerProcess, before: dict[str, float]) -> dict[str, float]:
    """How much each series grew since ``before`` (a ``metrics()`` of the same server)."""
    return {k: v - before.get(k, 0.0) for k, v in metrics(server).items()}


def codes(replies: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in replies:
        key = "ack" if r["type"] == "ack" else r["code"]
        out[key] = out.get(key, 0) + 1
    return out


async def test_a_storm_of_5000_joins_behind_a_slow_link_is_acked_in_full(redis_server, make_server):
    """5,000 joins at once, Redis 50 ms away each way: every one acked, none UNAVAILABLE.

    Failed before the batching (joins waited for one of 64 pooled connections each, past the
    pool's 5 s checkout timeout, and the broker went down): on the old code (1bf56f4) this test
    got 2,067 UNAVAILABLE of 5,000. Now a batch of up to ``MAX_CALLS`` joins costs one round
    trip: 21 round trips for the 5,000 (measured).
    """
    n = 5_000
    proxy = TcpProxy(redis_server.port, delay=0.05).start()
    try:
        server = make_server("--broker", f"redis://127.0.0.1:{proxy.port}/0", *FLAGS).start()
        members = await crowd(server, n)
        before = metrics(server)
        try:
            replies = await storm(members, [f"storm-{i % 500}" for i in range(n)], timeout=60)
        finally:
            close_all(members)
        assert codes(replies) == {"ack": n}, codes(replies)
        m = grew(server, before)
        assert m["wsfan_broker_reconnects_total"] == 0
        batches = m["wsfan_broker_script_seconds_count"]
        assert m["wsfan_broker_script_calls_total"] == n
        assert batches <= n / 20, f"{batches:.0f} round trips for {n} joins"
    finally:
        proxy.stop()


async def test_joins_at_once_cost_few_round_trips_as_redis_counts_them(redis_server, make_server):
    """2,000 joins (presence on, so each also writes its presence entry) at once: far fewer round trips.

    Counted twice: by the server (``wsfan_broker_script_seconds_count``: pipelines sent, and
    ``wsfan_broker_script_calls_total``: calls in them) and by Redis itself (``total_reads_processed``,
    socket reads of client input, which covers the crowd's SUBSCRIBEs too and bounds round trips
    from above). Before, each join was two round trips of its own (history read, presence add):
    on the old code (1bf56f4) Redis read client input 4,196 times during this test; now 59 times
    (the server: 19 pipelines for the 4,000 calls), measured.
    """
    n = 2_000
    server = make_server("--broker", redis_server.url, "--presence", *FLAGS).start()
    members = await crowd(server, n)
    counted = metrics(server)
    try:
        before = reads_processed(redis_server)
        replies = await storm(members, [f"rt-{i % 100}" for i in range(n)], timeout=60)
        after = reads_processed(redis_server)
    finally:
        close_all(members)
    assert codes(replies) == {"ack": n}, codes(replies)
    assert after - before <= n / 5, f"redis read client input {after - before} times for {n} joins"
    m = grew(server, counted)
    assert m["wsfan_broker_script_calls_total"] == 2 * n  # a history read and a presence add per join
    assert m["wsfan_broker_script_seconds_count"] <= 2 * n / 20
    stats = redis_server.command("HLEN", "wsfan:{rt-7}:p")
    assert stats == n // 100  # every joiner is in presence


async def test_a_refused_history_read_fails_only_its_join_in_the_batch(redis_server, make_server):
    """A room whose meta key is a string (WRONGTYPE for the history script): that join gets
    UNAVAILABLE with our sentence (redis' text only in the log), the 199 joins
    batched with it are acked, and the broker stays up."""
    redis_server.command("SET", "wsfan:{bad}:m", "not a hash")
    proxy = TcpProxy(redis_server.port, delay=0.02).start()  # joins queue behind the first batch
    try:
        server = make_server("--broker", f"redis://127.0.0.1:{proxy.port}/0", *FLAGS).start()
        members = await crowd(server, 200)
        rooms = [f"good-{i}" for i in range(200)]
        rooms[150] = "bad"
        before = metrics(server)
        try:
            replies = await storm(members, rooms, timeout=30)
        finally:
            close_all(members)
        bad = replies.pop(150)
        assert bad["type"] == "error" and bad["code"] == "UNAVAILABLE", bad
        assert bad["message"] == UNAVAILABLE_TEXT, bad  # ours; redis' text is for the log
        assert "WRONGTYPE" not in json.dumps(bad)
        assert codes(replies) == {"ack": 199}, codes(replies)
        m = metrics(server)
        assert m["wsfan_broker_connected"] == 1 and m["wsfan_broker_reconnects_total"] == 0
        batches = m["wsfan_broker_script_seconds_count"] - before["wsfan_broker_script_seconds_count"]
        assert batches <= 10  # 200 joins, the bad one among them: it shared its batch
        assert "redis refused the history read of 'bad'" in server.output()
        assert "WRONGTYPE" in server.output()
    finally:
        proxy.stop()


async def test_joins_after_redis_lost_its_scripts_reload_them_once(redis_server, make_server):
    """SCRIPT FLUSH under a running node: the next batch of joins (presence on: two scripts) gets
    NOSCRIPT, loads each script once, runs those calls again, and every join is acked."""
    server = make_server("--broker", redis_server.url, "--presence", *FLAGS).start()
    members = await crowd(server, 300)
    try:
        warm = await storm(members[:1], ["warm"], timeout=10)
        assert codes(warm) == {"ack": 1}
        redis_server.command("SCRIPT", "FLUSH")
        replies = await storm(members[1:], [f"flushed-{i % 30}" for i in range(299)], timeout=30)
    finally:
        close_all(members)
    assert codes(replies) == {"ack": 299}, codes(replies)
    assert redis_server.command("HLEN", "wsfan:{flushed-3}:p") == 10
    m = metrics(server)
    assert m["wsfan_broker_reconnects_total"] == 0


async def test_redis_lost_under_a_batch_answers_every_join_unavailable(redis_server, make_server):
    """The link to Redis cut while a batch of history reads is on its way (the proxy holds it for
    its 0.25 s delay): every join of the storm is answered UNAVAILABLE, none hangs, none is acked
    from a dead connection, and the broker says it is down."""
    proxy = TcpProxy(redis_server.port, delay=0.25).start()
    try:
        server = make_server("--broker", f"redis://127.0.0.1:{proxy.port}/0", *FLAGS).start()
        members = await crowd(server, 100)
        try:
            proxy.record = True
            for i, member in enumerate(members):
                member.send_text(json.dumps({"type": "join", "id": str(i), "room": f"cut-{i}"}).encode())
            await until(lambda: any(b"EVALSHA" in chunk for chunk in proxy.sent), timeout=20)
            assert not any(m.reply.done() for m in members)
            proxy.cut()
            async with asyncio.timeout(30):
                replies = await asyncio.gather(*(m.reply for m in members))
        finally:
            close_all(members)
        assert codes(replies) == {"UNAVAILABLE": 100}, codes(replies)
        assert metrics(server)["wsfan_broker_connected"] == 0
        assert "lost redis" in server.output()
    finally:
        proxy.stop()


async def test_a_storm_of_joins_on_a_redis_cluster_reaches_each_rooms_master_in_batches(make_server):
    """600 joins at once over 300 rooms spread over a 3-master Redis Cluster: every join acked,
    each room's meta hash (the epoch its joins acked) on the master that owns its slot (a call
    sent to another master would get MOVED, a refused join), in batches per master."""
    n, rooms = 600, [f"cl-{i}" for i in range(300)]
    cluster_gen = running_cluster(3)
    cluster = next(cluster_gen)
    try:
        server = make_server("--broker", cluster.url, *FLAGS).start()
        members = await crowd(server, n)
        before = metrics(server)
        owners = {room: cluster.owner(meta_key(room)) for room in rooms}
        assert len({o.port for o in owners.values()}) == 3
        try:
            replies = await storm(members, [rooms[i % 300] for i in range(n)], timeout=60)
        finally:
            close_all(members)
        assert codes(replies) == {"ack": n}, codes(replies)
        epochs = {r["data"]["room"]: r["data"]["epoch"] for r in replies}
        for room in rooms:
            assert owners[room].command("HGET", meta_key(room), "e").decode() == epochs[room], room
        m = grew(server, before)
        assert m["wsfan_broker_script_calls_total"] == n
        # Batches are what queued meanwhile: here each room's first join waits for its own SSUBSCRIBE
        # (one channel per command on a shard), so they are small (234 for 600 measured), one master each.
        assert 3 <= m["wsfan_broker_script_seconds_count"] < n
    finally:
        next(cluster_gen, None)
