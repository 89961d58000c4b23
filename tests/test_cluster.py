"""The Cluster section of PROTOCOL.md against real nodes sharing a real redis-server.

Every node is a ``python -m wsfan --broker redis://...`` process; faults are real
too (``kill -9`` of a node, redis-server killed and restarted on its port). Tests
that need Redis skip with an install hint where ``redis-server`` is missing.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import shlex
import signal
import time
import tomllib
from typing import Any

import psutil
import pytest

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.ports import free_port
from helpers.redis_server import RedisServer
from helpers.servers import ROOT, ServerProcess
from helpers.waiting import until, wait_until
from wsfan.server.broker.redis_layout import channel_name

NODE_FLAGS = ("--rate-limit", "0")


def node(make_server: type[ServerProcess], redis: RedisServer, name: str, *args: str) -> ServerProcess:
    return make_server("--broker", redis.url, "--node-id", name, *NODE_FLAGS, *args).start()


async def joined(url: str, room: str, **fields: Any) -> tuple[PicowsPeer, dict[str, Any]]:
    peer = await PicowsPeer.connect(url)
    ack = await peer.request("join", room=room, **fields)
    assert ack["type"] == "ack", ack
    return peer, ack["data"]


async def publish_until_accepted(peer: PicowsPeer, room: str, payload: Any, timeout: float = 10.0) -> dict:
    """Publish every 50 ms until the broker takes it (it answers UNAVAILABLE while down)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await peer.request("publish", room=room, payload=payload)
        if reply["type"] == "ack" or time.monotonic() > deadline:
            return reply
        assert reply["code"] == "UNAVAILABLE", reply
        await asyncio.sleep(0.05)


async def drain(peer: PicowsPeer, within: float = 0.3) -> list[dict[str, Any]]:
    """Everything that arrives until the peer is quiet for ``within`` seconds."""
    out = []
    while True:
        try:
            out.append(await peer.recv(within))
        except TimeoutError:
            return out


# ---------------------------------------------------------------- fan-out between nodes


async def test_publish_on_one_node_reaches_subscribers_on_another_with_contiguous_seq(
    redis_server, make_server
):
    a = node(make_server, redis_server, "A")
    b = node(make_server, redis_server, "B")
    room = "cross"
    sub_b, _ = await joined(b.url, room)
    sub_a, _ = await joined(a.url, room)
    pub_a, _ = await joined(a.url, room)
    pub_b, _ = await joined(b.url, room)

    async def publish(peer: PicowsPeer, tag: str) -> list[int]:
        acks = []
        for i in range(20):
            ack = await peer.request("publish", room=room, payload={"by": tag, "i": i})
            acks.append(ack["data"]["seq"])
        return acks

    seqs_a, seqs_b = await asyncio.gather(publish(pub_a, "a"), publish(pub_b, "b"))
    assert sorted(seqs_a + seqs_b) == list(range(1, 41)), "one seq per publish, no gap, across both nodes"
    for sub in (sub_a, sub_b):
        got = [await sub.recv() for _ in range(40)]
        assert [m["seq"] for m in got] == list(range(1, 41)), "every node delivers in seq order"
        assert [m["payload"]["i"] for m in got if m["payload"]["by"] == "a"] == list(range(20))
        assert {m["from"] for m in got} == {pub_a.welcome["user"], pub_b.welcome["user"]}
    # The publisher's own messages are not delivered back to it, on either node.
    assert all(m["payload"]["by"] == "b" for m in await drain(pub_a))
    assert all(m["payload"]["by"] == "a" for m in await drain(pub_b))


async def test_payload_crosses_nodes_byte_for_byte_and_across_encodings(redis_server, make_server):
    import websockets

    a = node(make_server, redis_server, "A")
    b = node(make_server, redis_server, "B")
    payload = '{ "z":1,  "a" : [1.50, 2e3, "\\u00e9\\n"] }'
    mp_sub = await WebsocketsPeer.connect(b.url, msgpack=True)
    await mp_sub.request("join", room="verbatim")
    async with websockets.connect(a.url) as pub, websockets.connect(b.url) as sub:
        for ws in (pub, sub):
            await ws.recv()
            await ws.send('{"type":"join","id":"j","room":"verbatim"}')
            await ws.recv()
        await pub.send('{"type":"publish","room":"verbatim","payload":' + payload + "}")
        text = await asyncio.wait_for(sub.recv(), 5)
    assert text.endswith('"payload":' + payload + "}"), (
        "the JSON subscriber on another node gets the exact bytes"
    )
    msg = await mp_sub.recv()
    assert msg["payload"] == json.loads(payload), "a MessagePack subscriber gets it transcoded"
    await mp_sub.close()


RESERVED = channel_name("$").encode()[:-1]  # b"wsfan:{$": the channels of the reserved $wsfan.* rooms


async def test_a_node_subscribes_only_to_rooms_with_local_subscribers(redis_server, make_server):
    a = node(make_server, redis_server, "A")

    def channels() -> set[bytes]:
        # Every node is always subscribed to the server API's command room and its own reply room
        # (server/control.py: $wsfan.control, $wsfan.reply.<node>).
        return {
            c for c in redis_server.command("PUBSUB", "CHANNELS", "wsfan:*") if not c.startswith(RESERVED)
        }

    c, _ = await joined(a.url, "one")
    await c.request("join", room="two")
    assert wait_until(lambda: channels() == {b"wsfan:{one}", b"wsfan:{two}"}), channels()
    await c.request("leave", room="one")
    assert wait_until(lambda: channels() == {b"wsfan:{two}"}), channels()
    await c.close()
    assert wait_until(lambda: channels() == set()), "the last local subscriber left: unsubscribed"


# ---------------------------------------------------------------- recovery and epochs


async def test_reconnect_to_another_node_recovers_exactly_the_missed_messages(redis_server, make_server):
    a = node(make_server, redis_server, "A")
    b = node(make_server, redis_server, "B")
    room = "recover"
    client, first = await joined(a.url, room)
    assert first["seq"] == 0 and first["epoch"]
    pub, _ = await joined(b.url, room)
    for i in range(3):
        await pub.request("publish", room=room, payload=i)
    assert [(await client.recv())["seq"] for _ in range(3)] == [1, 2, 3]
    await client.close()
    for i in range(3, 8):
        await pub.request("publish", room=room, payload=i)

    back, ack = await joined(b.url, room, since=3, epoch=first["epoch"])
    assert ack == {"room": room, "seq": 8, "recovered": True, "epoch": first["epoch"]}
    replay = [await back.recv() for _ in range(5)]
    assert [(m["seq"], m["payload"]) for m in replay] == [(s, s - 1) for s in range(4, 9)]
    await back.no_message()
    await pub.request("publish", room=room, payload="live")
    assert (await back.recv())["seq"] == 9

    # Redis loses everything; the room starts over and its new seq soon passes the old since.
    redis_server.restart()
    for i in range(12):
        reply = await publish_until_accepted(pub, room, f"new {i}")
        assert reply["type"] == "ack", reply
    assert reply["data"]["seq"] == 12
    lost, ack = await joined(a.url, room, since=9, epoch=first["epoch"])
    assert ack["recovered"] is False, "history that Redis lost is never reported recovered"
    assert ack["seq"] == 12 and ack["epoch"] != first["epoch"]
    replay = [await lost.recv() for _ in range(12)]
    assert [m["payload"] for m in replay] == [f"new {i}" for i in range(12)], (
        "all of the new numbering is replayed"
    )


async def test_an_unchanged_epoch_recovers_and_a_changed_one_does_not_on_a_single_node(make_server):
    """The in-process broker has a per-process epoch: a restarted node is told apart the same way."""
    first = make_server(*NODE_FLAGS).start()
    c, before = await joined(first.url, "single")
    await c.close()
    first.kill()
    second = make_server(*NODE_FLAGS, port=first.port).start()
    pub, _ = await joined(second.url, "single")
    for i in range(5):
        await pub.request("publish", room="single", payload=i)
    stale, ack = await joined(second.url, "single", since=2, epoch=before["epoch"])
    assert ack["recovered"] is False and ack["epoch"] != before["epoch"]
    assert [(await stale.recv())["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]
    fresh, ack = await joined(second.url, "single", since=2, epoch=ack["epoch"])
    assert ack["recovered"] is True
    assert [(await fresh.recv())["seq"] for _ in range(3)] == [3, 4, 5]
    err = await fresh.request("join", room="single", since=2, epoch="e" * 65)
    assert err["code"] == "INVALID_MESSAGE", "an epoch is at most 64 characters"


# ---------------------------------------------------------------- faults


class Tap:
    """Reads one peer's inbox in the background: acked seqs of its publishes, seqs delivered to it."""

    def __init__(self, peer: PicowsPeer) -> None:
        self.peer = peer
        self.acked: list[int] = []
        self.delivered: list[int] = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.peer.inbox.get()
            if msg["type"] == "ack" and "seq" in msg.get("data", {}) and "recovered" not in msg["data"]:
                self.acked.append(msg["data"]["seq"])
            elif msg["type"] == "message":
                self.delivered.append(msg["seq"])

    def stop(self) -> None:
        self.task.cancel()


async def pump(peer: PicowsPeer, room: str, stop: asyncio.Event, tag: str) -> int:
    """Publish every 2 ms until ``stop`` or the peer is closed; the number of publishes sent."""
    n = 0
    while not stop.is_set() and not peer.closed.is_set():
        n += 1
        await peer.send({"type": "publish", "id": f"{tag}{n}", "room": room, "payload": n})
        await asyncio.sleep(0.002)
    return n


async def test_kill_9_of_a_node_loses_no_acknowledged_message(redis_server, make_server):
    a = node(make_server, redis_server, "A")
    b = node(make_server, redis_server, "B")
    room = "kill9"
    sub, ack = await joined(a.url, room)
    epoch = ack["epoch"]
    pub_a, _ = await joined(a.url, room)
    pub_b, _ = await joined(b.url, room)
    taps = {name: Tap(p) for name, p in (("sub", sub), ("pub_a", pub_a), ("pub_b", pub_b))}
    stop = asyncio.Event()
    pumps = [
        asyncio.ensure_future(pump(pub_a, room, stop, "a")),
        asyncio.ensure_future(pump(pub_b, room, stop, "b")),
    ]
    await until(lambda: len(taps["sub"].delivered) >= 20 and taps["pub_b"].acked, timeout=10)  # traffic flows

    a.proc.send_signal(signal.SIGKILL)
    await sub.wait_closed()
    await pub_a.wait_closed()
    assert taps["sub"].delivered, "the subscriber saw traffic before the kill"
    assert taps["pub_a"].acked, "node A acknowledged publishes before the kill"
    acked_b = len(taps["pub_b"].acked)
    await until(
        lambda: len(taps["pub_b"].acked) >= acked_b + 20, timeout=10
    )  # B's publisher goes on meanwhile

    # Both of A's clients come back on B; the subscriber recovers from the last seq it saw.
    seen = taps["sub"].delivered
    sub2, ack = await joined(b.url, room, since=seen[-1], epoch=epoch)
    assert ack["recovered"] is True
    taps["sub2"] = Tap(sub2)
    pub_a2, _ = await joined(b.url, room)
    taps["pub_a2"] = Tap(pub_a2)
    pumps.append(asyncio.ensure_future(pump(pub_a2, room, stop, "c")))
    await until(lambda: len(taps["pub_a2"].acked) >= 20, timeout=10)  # A's publisher carries on through B
    stop.set()
    _, sent_b, sent_a2 = await asyncio.gather(*pumps)
    # Every publish B took is acknowledged, and the subscriber has seen the last acknowledged seq.
    await until(lambda: (len(taps["pub_b"].acked), len(taps["pub_a2"].acked)) == (sent_b, sent_a2), 10)
    last = max(taps["pub_b"].acked + taps["pub_a2"].acked)
    await until(lambda: max(taps["sub2"].delivered, default=0) >= last, 10)
    for tap in taps.values():
        tap.stop()

    got = seen + taps["sub2"].delivered
    acked = set(taps["pub_a"].acked + taps["pub_b"].acked + taps["pub_a2"].acked)
    assert acked <= set(got), f"acknowledged but never delivered: {sorted(acked - set(got))}"
    assert got == list(range(1, got[-1] + 1)), "every seq exactly once, in order, across the failover"
    assert taps["pub_a2"].acked and max(taps["pub_a2"].acked) > ack["seq"], (
        "A's publisher carried on through B"
    )


async def test_redis_outage_keeps_nodes_serving_and_delivery_resumes(redis_server, make_server):
    a = node(make_server, redis_server, "A")
    b = node(make_server, redis_server, "B")
    room = "outage"
    sa, _ = await joined(a.url, room)
    sb, _ = await joined(b.url, room)
    await sa.request("publish", room=room, payload="before")
    assert (await sb.recv())["payload"] == "before"

    redis_server.stop()
    for peer in (sa, sb):
        err = await peer.request("publish", room=room, payload="during")
        assert err["type"] == "error" and err["code"] == "UNAVAILABLE", err
        err = await peer.request("join", room="new-room")
        assert err["code"] == "UNAVAILABLE", "a join needs the broker for its seq and history"
        pong = await peer.request("ping", ts=1)
        assert pong == {"type": "pong", "requestId": pong["requestId"], "ts": 1}, "local service goes on"
    for _ in range(10):  # many refusals, one log line
        await sa.request("publish", room=room, payload="during")

    redis_server.start()
    reply = await publish_until_accepted(sa, room, "after")
    assert reply["type"] == "ack"
    msg = await sb.recv_type("message")
    assert msg["payload"] == "after", "the rooms were resubscribed: cross-node delivery resumed"
    assert msg["seq"] == 1, "Redis lost the room: its numbering started over"
    await sb.request("publish", room=room, payload="back")
    assert (await sa.recv_type("message"))["payload"] == "back"
    assert not sa.closed.is_set() and not sb.closed.is_set(), "no connection was dropped"
    for srv in (a, b):
        log = srv.output()
        assert log.count("lost redis") == 1 and log.count("is back;") == 1, log


async def test_a_node_that_lost_its_pubsub_connection_catches_up_in_order(redis_server, make_server):
    """Redis drops a subscriber connection (output buffer limit, network): the node reconnects and
    fills what its subscribers missed from history, so they still see every seq once, in order."""
    a = node(make_server, redis_server, "A")
    b = node(make_server, redis_server, "B")
    sub, _ = await joined(b.url, "catchup")
    pub, _ = await joined(a.url, "catchup")

    def kill_b_pubsub() -> None:
        import redis

        with redis.Redis(host="127.0.0.1", port=redis_server.port) as r:
            (victim,) = [c["id"] for c in r.client_list(_type="pubsub") if c["name"] == "wsfan-B"]
            r.client_kill_filter(_id=victim)

    for i in range(300):
        if i == 100:
            kill_b_pubsub()
        await pub.send({"type": "publish", "room": "catchup", "payload": i})
        await asyncio.sleep(0.001)
    got = [await sub.recv() for _ in range(300)]
    assert [(m["seq"], m["payload"]) for m in got] == [(i + 1, i) for i in range(300)]
    await sub.no_message()
    assert "lost redis" in b.output() and "lost redis" not in a.output()


# ---------------------------------------------------------------- workers and production


def worker_pids(srv: ServerProcess) -> set[int]:
    assert srv.proc is not None
    return {p.pid for p in psutil.Process(srv.proc.pid).children()}


async def connect_until_nodes(url: str, count: int, at_least: int, tries: int = 60) -> list[PicowsPeer]:
    """Connect until ``count`` workers answered (the kernel picks one per connection)."""
    peers: list[PicowsPeer] = []
    for _ in range(tries):
        peers.append(await PicowsPeer.connect(url))
        if len({p.welcome["node"] for p in peers}) >= count and len(peers) >= at_least:
            break
        await asyncio.sleep(0.02)
    return peers


async def connect_until_new_node(url: str, known: set[str], tries: int = 60) -> list[PicowsPeer]:
    peers: list[PicowsPeer] = []
    for _ in range(tries):
        peers.append(await PicowsPeer.connect(url))
        if peers[-1].welcome["node"] not in known:
            break
        await asyncio.sleep(0.05)
    return peers


async def test_workers_share_the_port_and_a_room_spans_them(redis_server, make_server):
    srv = make_server("--workers", "2", "--broker", redis_server.url, *NODE_FLAGS).start()
    peers = await connect_until_nodes(srv.url, 2, at_least=6)
    nodes = {p.welcome["node"] for p in peers}
    assert len(nodes) == 2, f"connections spread over both workers: {nodes}"
    for p in peers:
        assert (await p.request("join", room="span"))["type"] == "ack"
    publishers = [next(p for p in peers if p.welcome["node"] == n) for n in sorted(nodes)]
    for i, p in enumerate(publishers):
        for j in range(5):  # no ids: a request() would skip the other worker's deliveries
            await p.send({"type": "publish", "room": "span", "payload": [i, j]})
    for p in peers:
        expected = [[i, j] for i in range(2) for j in range(5) if publishers[i] is not p]
        got = [(await p.recv_type("message"))["payload"] for _ in expected]
        assert sorted(got) == expected

    # A worker that dies is replaced; the other keeps its connections.
    before = worker_pids(srv)
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(worker_pids(srv) - before) == 1 and len(worker_pids(srv)) == 2, 10)
    fresh = await connect_until_new_node(srv.url, nodes)
    assert fresh[-1].welcome["node"] not in nodes, "the replacement worker serves connections"

    # SIGTERM to the supervisor: every worker drains with 1001, exit code 0.
    survivors = [p for p in peers + fresh if not p.closed.is_set()]
    assert await asyncio.to_thread(srv.stop) == 0  # in a thread: the peers must answer the close frames
    for p in survivors:
        assert await p.wait_closed() == 1001


async def test_production_profile_from_the_sample_toml_starts_against_redis(redis_server, make_server):
    import urllib.request

    import jwt

    secret, http_port = "s" * 32, free_port()
    env = {
        "WSFAN_BROKER": redis_server.url,
        "WSFAN_JWT_SECRET": secret,
        "WSFAN_ADMIN_KEY": "k" * 32,
        "WSFAN_HTTP_PORT": str(http_port),
        "WSFAN_METRICS_PORT": str(free_port()),  # the file's 9102 may be taken on this machine
    }
    # The test's --host/--port flags and environment win over the file, so nothing leaves 127.0.0.1.
    srv = make_server("--config", str(ROOT / "deploy" / "production.toml"), env=env).start()
    assert wait_until(lambda: len(worker_pids(srv)) == (os.cpu_count() or 1), 10), "one worker per core"
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    peer = await PicowsPeer.connect(f"{srv.url}?token={token}")
    assert peer.welcome["user"] == "alice"
    ack = await peer.request("join", room="prod")
    assert ack["type"] == "ack" and ack["data"]["epoch"]
    with pytest.raises(Exception):  # noqa: B017 - no token, no WebSocket (401)
        await PicowsPeer.connect(srv.url)
    with pytest.raises(Exception):  # noqa: B017 - /echo is off in production
        await PicowsPeer.connect(f"ws://127.0.0.1:{srv.port}/echo")
    health = await asyncio.to_thread(
        urllib.request.urlopen, f"http://127.0.0.1:{http_port}/healthz", timeout=5
    )
    assert health.status == 200
    # The backend's admin publish goes through Redis like any other and reaches every worker.
    post = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/publish",
        data=b'{"room":"prod","payload":{"from":"backend"}}',
        headers={"Authorization": "Bearer " + "k" * 32, "Content-Type": "application/json"},
    )
    reply = await asyncio.to_thread(urllib.request.urlopen, post, timeout=5)
    assert json.loads(reply.read()) == {"room": "prod", "seq": 1}
    assert (await peer.recv_type("message"))["payload"] == {"from": "backend"}
    assert await asyncio.to_thread(srv.stop) == 0
    lines = [line for line in srv.output().splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines), "JSON log lines"


def test_systemd_unit_runs_the_production_config_and_stops_with_a_drain():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "wsfan.service")
    service = unit["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[1:4] == ["-m", "wsfan", "--config"] and command[4].endswith("production.toml")
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    with open(ROOT / "deploy" / "production.toml", "rb") as f:
        config = tomllib.load(f)["server"]
    assert config["production"] is True
    drain = config.get("drain_timeout", 10) + config.get("drain_spread", 0)
    assert float(service["TimeoutStopSec"]) > drain, "systemd waits longer than the drain"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID", "systemctl reload is the SIGHUP handover"


async def test_a_burst_of_joins_on_one_node_all_succeed(redis_server, make_server):
    """A reconnection storm: far more concurrent history reads than Redis connections in the pool."""
    a = node(make_server, redis_server, "burst")
    peers = await asyncio.gather(*(PicowsPeer.connect(a.url) for _ in range(150)))
    acks = await asyncio.gather(
        *(p.request("join", room=f"burst-{i % 3}", since=0) for i, p in enumerate(peers))
    )
    assert [ack["type"] for ack in acks] == ["ack"] * 150, {a.get("code") for a in acks}
    assert all(ack["data"]["recovered"] is True for ack in acks)
    await asyncio.gather(*(p.close() for p in peers))
