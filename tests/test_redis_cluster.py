"""wsfan nodes over a real 3-master Redis Cluster (``--broker redis+cluster://...``, sharded pub/sub).

The cluster is built like an operator builds one (``--cluster-enabled yes`` and
``redis-cli --cluster create``, tests/helpers/redis_server.py); the nodes are real
``python -m wsfan`` processes. Rooms are chosen so that every master owns some.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.peers import PicowsPeer
from helpers.ports import free_port
from helpers.redis_server import RedisCluster, running_cluster, running_sentinel
from helpers.servers import ROOT, ServerProcess
from helpers.waiting import until
from wsfan.server.broker.redis_layout import channel_name, meta_key

ROOMS = [f"shard-room-{i}" for i in range(9)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    yield from running_cluster(3)


def node(make_server: type[ServerProcess], cluster: RedisCluster, name: str) -> ServerProcess:
    return make_server("--broker", cluster.url, "--node-id", name, "--rate-limit", "0").start()


async def joined(url: str, room: str, **fields: Any) -> tuple[PicowsPeer, dict[str, Any]]:
    peer = await PicowsPeer.connect(url)
    ack = await peer.request("join", room=room, **fields)
    assert ack["type"] == "ack", ack
    return peer, ack["data"]


def shard_channels(cluster: RedisCluster) -> dict[int, set[bytes]]:
    """Per master (by port): the shard channels someone is subscribed to there."""
    return {n.port: set(n.command("PUBSUB", "SHARDCHANNELS")) for n in cluster.nodes}


async def test_rooms_on_every_shard_fan_out_between_nodes_with_contiguous_seq(cluster, make_server):
    owners = {room: cluster.owner(meta_key(room)) for room in ROOMS}
    assert {o.port for o in owners.values()} == {n.port for n in cluster.nodes}, (
        "rooms must cover every shard"
    )
    # seq, history, epoch and presence of a room sit in one slot: the hash tag is the room.
    for room in ROOMS:
        slots = {owners[room].command("CLUSTER", "KEYSLOT", k) for k in (meta_key(room), channel_name(room))}
        assert len(slots) == 1

    a = node(make_server, cluster, "A")
    b = node(make_server, cluster, "B")
    subs = {room: (await joined(b.url, room))[0] for room in ROOMS}
    pub = await PicowsPeer.connect(a.url)
    for room in ROOMS:
        assert (await pub.request("join", room=room))["type"] == "ack"

    # Sharded pub/sub: each room's channel is subscribed on its own master only, never as a classic channel.
    channels = shard_channels(cluster)
    for room in ROOMS:
        for n in cluster.nodes:
            assert (channel_name(room).encode() in channels[n.port]) == (n.port == owners[room].port)
    assert all(n.command("PUBSUB", "CHANNELS") == [] for n in cluster.nodes)

    async def publish_all(room: str) -> list[int]:
        return [(await pub.request("publish", room=room, payload=i))["data"]["seq"] for i in range(5)]

    acked = [await publish_all(room) for room in ROOMS]
    assert all(seqs == [1, 2, 3, 4, 5] for seqs in acked)
    for room, sub in subs.items():
        got = [await sub.recv_type("message") for _ in range(5)]
        assert [(m["room"], m["seq"], m["payload"]) for m in got] == [(room, s, s - 1) for s in range(1, 6)]

    # Recovery on the other node: a subscriber of B comes back on A with since and its epoch.
    room = ROOMS[0]
    await subs[room].close()
    for i in range(5, 8):
        await pub.request("publish", room=room, payload=i)
    back, ack = await joined(a.url, room, since=5, epoch=_epoch_of(owners[room], room))
    assert ack["recovered"] is True and ack["seq"] == 8, ack
    replay = [await back.recv_type("message") for _ in range(3)]
    assert [(m["seq"], m["payload"]) for m in replay] == [(6, 5), (7, 6), (8, 7)]
    await back.no_message()

    # A node drops its shard subscription once its last local subscriber of the room leaves.
    other = ROOMS[1]
    await subs[other].close()
    channel = channel_name(other).encode()
    owner = owners[other]

    def b_unsubscribed() -> bool:
        # A still has its publisher joined: one subscriber of the channel left (A's).
        return owner.command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1

    await until(b_unsubscribed, timeout=5)
    for peer in (pub, back, *subs.values()):
        await peer.close()


async def test_a_cluster_node_serves_the_namespace_options_it_was_started_with(cluster, make_server):
    """``--presence`` and a namespace with ``allow_publish=false`` on a ``redis+cluster://`` node:
    presence is answered and a client's publish there is FORBIDDEN, as on a plain Redis broker.
    Before, the hub took its namespaces from the broker and the cluster broker had none: every
    room got the defaults (presence NOT_AVAILABLE, publishes in a read-only namespace accepted)."""
    a = make_server(
        "--broker", cluster.url, "--node-id", "NS", "--rate-limit", "0", "--presence",
        "--namespaces", "ro:allow_publish=false",
    ).start()  # fmt: skip
    peer, _ = await joined(a.url, "lobby")
    try:
        listed = await peer.request("presence", room="lobby")
        assert listed["type"] == "ack", listed
        assert [e["conn"] for e in listed["data"]["presence"]] != []
        ack = await peer.request("join", room="ro:news")
        assert ack["type"] == "ack", ack
        refused = await peer.request("publish", room="ro:news", payload={"x": 1})
        assert refused["type"] == "error" and refused["code"] == "FORBIDDEN", refused
    finally:
        await peer.close()


def _epoch_of(owner: Any, room: str) -> str:
    return owner.command("HGET", meta_key(room), "e").decode()


async def publish_until_accepted(peer: PicowsPeer, room: str, payload: Any, timeout: float = 30.0) -> dict:
    """Publish every 50 ms until the broker takes it (UNAVAILABLE while the room's shard fails over)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await peer.request("publish", room=room, payload=payload)
        if reply["type"] == "ack" or time.monotonic() > deadline:
            return reply
        assert reply["code"] == "UNAVAILABLE", reply
        await asyncio.sleep(0.05)


async def test_master_killed_replica_promoted_no_acked_publication_lost(make_server):
    # Its own cluster: 3 masters with a replica each; a silent master is replaced after 1 s.
    gen = running_cluster(3, replicas=1, node_timeout_ms=1000)
    cluster = next(gen)
    try:
        room = ROOMS[0]
        doomed = cluster.owner(meta_key(room))
        other = next(r for r in ROOMS if cluster.owner(meta_key(r)).port != doomed.port)
        a = node(make_server, cluster, "A")
        b = node(make_server, cluster, "B")
        sub, first = await joined(b.url, room)
        pub, _ = await joined(a.url, room)
        assert (await pub.request("join", room=other))["type"] == "ack"
        acked = [(await pub.request("publish", room=room, payload=i))["data"]["seq"] for i in range(5)]
        assert acked == [1, 2, 3, 4, 5]

        doomed.stop()  # SIGKILL: no goodbye to the cluster or the nodes
        # Only the dead master's rooms are affected: a room on another shard still publishes.
        assert (await pub.request("publish", room=other, payload="elsewhere"))["type"] == "ack"
        for i in range(5, 10):
            reply = await publish_until_accepted(pub, room, i)
            assert reply["type"] == "ack", (reply, a.output()[-1500:])
            acked.append(reply["data"]["seq"])
        assert cluster.owner(meta_key(room)).port != doomed.port  # a replica serves the room now
        assert acked == list(range(1, 11)), acked  # no seq reused or skipped across the failover

        got = [await sub.recv_type("message", timeout=20) for _ in range(10)]
        assert [(m["seq"], m["payload"]) for m in got] == [(s, s - 1) for s in range(1, 11)]
        # A client that missed it all recovers every acked publication from the promoted replica.
        late, ack = await joined(a.url, room, since=0, epoch=first["epoch"])
        assert ack["recovered"] is True and ack["seq"] == 10 and ack["epoch"] == first["epoch"], ack
        replay = [await late.recv_type("message") for _ in range(10)]
        assert [m["seq"] for m in replay] == acked
        for peer in (sub, pub, late):
            await peer.close()
    finally:
        gen.close()


async def test_sentinel_failover_keeps_every_acked_publication(make_server):
    gen = running_sentinel()
    setup = next(gen)
    try:
        room = "sentinel-room"
        a = make_server("--broker", setup.url, "--node-id", "A", "--rate-limit", "0").start()
        b = make_server("--broker", setup.url, "--node-id", "B", "--rate-limit", "0").start()
        sub, first = await joined(b.url, room)
        pub, _ = await joined(a.url, room)
        acked = [(await pub.request("publish", room=room, payload=i))["data"]["seq"] for i in range(5)]
        setup.master.stop()  # SIGKILL; the sentinel promotes the replica
        for i in range(5, 10):
            reply = await publish_until_accepted(pub, room, i)
            assert reply["type"] == "ack", (reply, a.output()[-1500:])
            acked.append(reply["data"]["seq"])
        assert acked == list(range(1, 11)), acked
        addr = setup.sentinel("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "wsfan")
        assert int(addr[1]) == setup.replica.port
        got = [await sub.recv_type("message", timeout=20) for _ in range(10)]
        assert [(m["seq"], m["payload"]) for m in got] == [(s, s - 1) for s in range(1, 11)]
        late, ack = await joined(b.url, room, since=0, epoch=first["epoch"])
        assert ack["recovered"] is True and ack["seq"] == 10, ack
        assert [(await late.recv_type("message"))["seq"] for _ in range(10)] == acked
        for peer in (sub, pub, late):
            await peer.close()
    finally:
        gen.close()


@pytest.mark.parametrize(
    "scheme", ["redis+cluster://127.0.0.1:{port}", "redis+sentinel://127.0.0.1:{port}/wsfan"]
)
def test_no_cluster_or_sentinel_to_ask_is_one_line_at_start(scheme):
    """Where no seed node (or sentinel) answers, the node cannot know where rooms live: exit 2, no traceback."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsfan",
            "--port",
            str(free_port()),
            "--broker",
            scheme.format(port=free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "Traceback" not in done.stderr and "cannot start:" in done.stderr and "check --broker" in done.stderr
    )
