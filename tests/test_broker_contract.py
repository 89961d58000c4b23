"""The ``Broker`` contract (``server/broker/__init__.py``), one suite for every broker.

Each test runs against the memory broker and the Redis broker (a real
redis-server on a free port), the way centrifuge runs its shared broker tests
against every implementation: seqs, history since, recovered at the history
ring's edges, epochs, unknown rooms, delivery order. The pure rule both brokers
use (``history_since``) is property-tested at the end.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers.redis_server import RedisCluster, RedisServer, require_redis, running_cluster
from helpers.waiting import until
from wsfan.server.broker import Broker, History, Publication, history_since
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.broker.publication import PresenceEntry
from wsfan.server.heap import COMPACT_AFTER, SHRINK_MIN_BYTES
from wsfan.server.namespaces import Namespace, Namespaces
from wsfan.server.protocol import Encoding

T = TypeVar("T")
HISTORY_SIZE = 3
_rooms = itertools.count()


async def settle(value: T | Awaitable[T]) -> T:
    """A broker call's result, whether it answered synchronously or with an awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


class Deliveries:
    """The ``deliver`` callback a node binds, recording publications and waking waiters."""

    def __init__(self) -> None:
        self.seen: list[Publication] = []
        self._changed = asyncio.Event()

    def __call__(self, pub: Publication) -> None:
        self.seen.append(pub)
        self._changed.set()

    def of(self, room: str) -> list[int]:
        return [p.seq for p in self.seen if p.room == room]

    async def until(self, room: str, count: int, timeout: float = 10.0) -> list[int]:
        async with asyncio.timeout(timeout):
            while len(self.of(room)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of(room)


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    """One redis-server for the module: every test uses rooms of its own."""
    srv = RedisServer(require_redis()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[RedisCluster]:
    """One 3-master Redis Cluster for the module (sharded pub/sub): every test uses rooms of its own."""
    yield from running_cluster(3)


@pytest.fixture(params=["memory", "redis", "cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


class Node:
    """One broker as a node holds it, with its deliveries."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.deliveries = Deliveries()
        self.events: list[Any] = []
        broker.bind(self.deliveries)
        broker.bind_events(self.events.append)

    async def publish(self, room: str, payload: bytes = b'{"n":1}', sender: str = "u1") -> Publication:
        return await settle(self.broker.publish(room, sender, payload, Encoding.JSON, "conn-1"))

    async def history(self, room: str, since: int | None = None, epoch: str | None = None) -> History:
        return await settle(self.broker.history(room, since, epoch))

    async def join(self, room: str) -> History:
        """What the hub does for a room's first local subscriber: subscribe, then read history."""
        await settle(self.broker.subscribe(room))
        return await self.history(room)


@pytest.fixture
async def make_node(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    started: list[Broker] = []
    srv = request.getfixturevalue("shared_redis") if kind == "redis" else None
    cluster = request.getfixturevalue("shared_cluster") if kind == "cluster" else None

    async def make(history_size: int = HISTORY_SIZE, namespaces: Namespaces | None = None) -> Node:
        if kind == "memory":
            broker: Broker = MemoryBroker(history_size, namespaces=namespaces)
        elif kind == "cluster":
            from wsfan.server.broker.redis_cluster import RedisClusterBroker

            assert cluster is not None
            broker = RedisClusterBroker(
                cluster.url, history_size=history_size, node_id=f"n{len(started)}", namespaces=namespaces
            )
        else:
            from wsfan.server.broker.redis import RedisBroker

            assert srv is not None
            broker = RedisBroker(
                srv.url, history_size=history_size, node_id=f"n{len(started)}", namespaces=namespaces
            )
        node = Node(broker)
        await broker.start()
        started.append(broker)
        return node

    yield make
    for broker in started:
        await broker.close()


@pytest.fixture
async def node(make_node: Any) -> Node:
    return await make_node()


@pytest.fixture
def room() -> str:
    return f"contract-{next(_rooms)}"


# ---------------------------------------------------------------- memory after many rooms


async def test_forgetting_many_one_shot_rooms_compacts_the_broker_and_runs_its_hooks(
    make_node: Any, room: str
) -> None:
    """Every broker shrinks its per-room tables and runs ``compact_hooks`` (the hub's) after many rooms.

    ``heap.COMPACT_AFTER`` rooms, each joined (subscribe, history) and left (unsubscribe) once;
    the memory broker forgets them at its sweep (TTL 0.05 s), the Redis ones at the unsubscribe.
    A Redis Cluster broker counts per shard: the rooms are all of one shard's slots.
    """
    ns = Namespaces(Namespace(history_size=HISTORY_SIZE, history_ttl=0.05))
    node = await make_node(namespaces=ns)
    broker = node.broker
    ran: list[bool] = []
    broker.compact_hooks.append(lambda: ran.append(True))
    names = _one_shard_rooms(broker, room, COMPACT_AFTER)
    for i in range(0, len(names), 256):
        await asyncio.gather(*(node.join(name) for name in names[i : i + 256]))
    for name in names:
        await settle(broker.unsubscribe(name))
    await until(lambda: ran)
    assert ran == [True], "one compaction for one burst of rooms"
    tables = [broker.rooms] if isinstance(broker, MemoryBroker) else _redis_tables(broker)
    await until(lambda: all(len(t) == 0 for t in tables))  # Redis confirmed every UNSUBSCRIBE
    for table in tables:
        assert sys.getsizeof(table) < SHRINK_MIN_BYTES


async def test_close_right_after_many_unsubscribes_abandons_nothing_and_logs_no_error(
    make_node: Any, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``close()`` while (UN)SUBSCRIBEs are still being written ends the writer quietly.

    redis-py drops a connection's writer under an in-flight send when the connection is closed;
    the ops writer used to die with ``AttributeError: 'NoneType' object has no attribute
    'writelines'`` (an ERROR with a traceback at every shutdown that came during a leave burst).
    """
    node = await make_node()
    broker = node.broker
    names = _one_shard_rooms(broker, room, 2048)
    for i in range(0, len(names), 512):
        await asyncio.gather(*(settle(broker.subscribe(name)) for name in names[i : i + 512]))
    for name in names:
        await settle(broker.unsubscribe(name))
    with caplog.at_level(logging.WARNING):
        abandoned = await broker.close()
    assert abandoned in ([], None), abandoned
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


def _one_shard_rooms(broker: Any, prefix: str, count: int) -> list[str]:
    """``count`` room names; on a Redis Cluster broker, all owned by its first shard."""
    names = (f"{prefix}-{i}" for i in itertools.count())
    shards = getattr(broker, "shards", None)
    if shards is None:
        return [next(names) for _ in range(count)]
    return list(itertools.islice((n for n in names if broker.shard(n) is shards[0]), count))


def _redis_tables(broker: Any) -> list[Any]:
    """Every per-room table of a Redis broker (of each shard of a cluster one)."""
    shards = getattr(broker, "shards", [broker])
    return [t for b in shards for t in (b._rooms, b._channels, b._inflight, b.local_presence)]


# ---------------------------------------------------------------- numbering


async def test_publish_assigns_contiguous_seqs_from_one_per_room(node: Node, room: str) -> None:
    other = room + "-b"
    seqs = [(await node.publish(room)).seq for _ in range(4)]
    seqs_b = [(await node.publish(other)).seq for _ in range(2)]
    seqs.append((await node.publish(room)).seq)
    assert seqs == [1, 2, 3, 4, 5] and seqs_b == [1, 2]


async def test_a_publication_keeps_what_was_published(node: Node, room: str) -> None:
    pub = await node.publish(room, b'{"k":[1,2]}', sender="alice")
    assert (pub.room, pub.seq, pub.sender, pub.payload, pub.encoding, pub.origin) == (
        room, 1, "alice", b'{"k":[1,2]}', Encoding.JSON, "conn-1",
    )  # fmt: skip
    (replayed,) = (await node.history(room, since=0)).publications
    assert (replayed.seq, replayed.sender, replayed.payload, replayed.origin) == (
        1,
        "alice",
        b'{"k":[1,2]}',
        "conn-1",
    )


async def test_publishes_of_one_node_are_numbered_in_call_order(node: Node, room: str) -> None:
    payloads = [b"%d" % i for i in range(40)]
    pubs = await asyncio.gather(*(node.publish(room, p) for p in payloads))
    assert [p.seq for p in pubs] == list(range(1, 41))
    assert [p.payload for p in pubs] == payloads


# ---------------------------------------------------------------- history since


async def test_history_without_since_replays_nothing_and_is_not_recovered(node: Node, room: str) -> None:
    for _ in range(2):
        await node.publish(room)
    hist = await node.history(room)
    assert (hist.publications, hist.recovered, hist.seq) == ([], False, 2) and hist.epoch


async def test_history_since_replays_every_later_publication_in_order(node: Node, room: str) -> None:
    for _ in range(3):
        await node.publish(room)
    hist = await node.history(room, since=1)
    assert [p.seq for p in hist.publications] == [2, 3] and hist.recovered and hist.seq == 3


async def test_since_equal_to_the_rooms_seq_is_recovered_with_nothing_to_replay(
    node: Node, room: str
) -> None:
    for _ in range(2):
        await node.publish(room)
    hist = await node.history(room, since=2)
    assert (hist.publications, hist.recovered, hist.seq) == ([], True, 2)


async def test_since_beyond_the_rooms_seq_is_not_recovered(node: Node, room: str) -> None:
    await node.publish(room)
    hist = await node.history(room, since=7)
    assert (hist.publications, hist.recovered, hist.seq) == ([], False, 1)


async def test_recovered_at_the_history_edge_and_not_past_it(make_node: Any, room: str) -> None:
    node = await make_node(history_size=HISTORY_SIZE)
    # Far more than the history keeps: Redis trims its stream approximately (MAXLEN ~),
    # so "past the edge" is measured from the first seq, which no broker keeps by now.
    total = 300
    await asyncio.gather(*(node.publish(room) for _ in range(total)))
    edge = await node.history(room, since=total - HISTORY_SIZE)
    assert [p.seq for p in edge.publications] == [total - 2, total - 1, total] and edge.recovered
    past = await node.history(room, since=1)
    assert not past.recovered and past.seq == total
    kept = [p.seq for p in past.publications]
    assert kept == list(range(kept[0], total + 1)) and kept[0] > 2  # what is kept, contiguous to the end


async def test_without_history_nothing_missed_is_recovered(make_node: Any, room: str) -> None:
    node = await make_node(history_size=0)
    for _ in range(2):
        await node.publish(room)
    missed = await node.history(room, since=1)
    assert (missed.publications, missed.recovered, missed.seq) == ([], False, 2)
    assert (await node.history(room, since=2)).recovered


# ---------------------------------------------------------------- epochs


async def test_the_rooms_epoch_is_stable_and_a_matching_epoch_recovers(node: Node, room: str) -> None:
    first = await node.history(room)
    for _ in range(3):
        await node.publish(room)
    hist = await node.history(room, since=1, epoch=first.epoch)
    assert hist.epoch == first.epoch and hist.recovered and [p.seq for p in hist.publications] == [2, 3]


async def test_another_epoch_is_not_recovered_and_replays_what_the_room_kept(node: Node, room: str) -> None:
    for _ in range(3):
        await node.publish(room)
    epoch = (await node.history(room)).epoch
    hist = await node.history(room, since=2, epoch="not-" + epoch)
    assert not hist.recovered and hist.epoch == epoch and hist.seq == 3
    assert [p.seq for p in hist.publications] == [1, 2, 3]  # all of it is news in the new numbering
    assert not (await node.history(room, since=3, epoch="not-" + epoch)).recovered  # even "nothing missed"


# ---------------------------------------------------------------- unknown rooms


async def test_an_unknown_room_has_seq_zero_and_an_epoch(node: Node, room: str) -> None:
    fresh = await node.history(room)
    assert (fresh.publications, fresh.recovered, fresh.seq) == ([], False, 0) and fresh.epoch
    assert (await node.history(room, since=0)).recovered
    assert not (await node.history(room, since=3)).recovered  # seqs this numbering never assigned
    assert not (await node.history(room, since=0, epoch="not-" + fresh.epoch)).recovered
    assert (await node.publish(room)).seq == 1  # reading history numbered nothing
    assert (await node.history(room)).epoch == fresh.epoch


# ---------------------------------------------------------------- delivery


async def test_a_subscribed_room_delivers_every_publication_once_in_seq_order(node: Node, room: str) -> None:
    await node.join(room)
    await asyncio.gather(*(node.publish(room, b"%d" % i) for i in range(25)))
    assert await node.deliveries.until(room, 25) == list(range(1, 26))
    pubs = [p for p in node.deliveries.seen if p.room == room]
    assert [p.payload for p in pubs] == [b"%d" % i for i in range(25)]


async def test_rooms_are_delivered_independently(node: Node, room: str) -> None:
    other = room + "-b"
    await node.join(room)
    await node.join(other)
    for _ in range(3):
        await node.publish(room)
        await node.publish(other)
    assert await node.deliveries.until(room, 3) == [1, 2, 3]
    assert await node.deliveries.until(other, 3) == [1, 2, 3]


@pytest.mark.parametrize("kind", ["redis", "cluster"])  # a memory broker is one node
async def test_a_node_receives_other_nodes_publications_until_it_unsubscribes(
    make_node: Any, room: str
) -> None:
    a, b = await make_node(), await make_node()
    marker = room + "-marker"
    await b.join(room)
    await b.join(marker)
    for _ in range(3):
        await a.publish(room)
    assert await b.deliveries.until(room, 3) == [1, 2, 3]
    await settle(b.broker.unsubscribe(room))
    await a.publish(room)
    # Redis hands b the marker after seq 4 (publish order): once b has the marker,
    # it would have had seq 4 if it still listened to the room.
    await a.publish(marker)
    await b.deliveries.until(marker, 1)
    assert b.deliveries.of(room) == [1, 2, 3]


# ---------------------------------------------------------------- reserved rooms


@pytest.mark.parametrize("kind", ["memory", "redis", "cluster"])
async def test_a_reserved_room_is_delivered_in_order_unnumbered_and_kept_nowhere(
    make_node: Any, room: str, request: pytest.FixtureRequest, kind: str
) -> None:
    """``$...`` rooms (the control room's commands): every subscribed node gets each publication,
    in order, with seq 0; history is empty and nothing of them is left in the broker."""
    reserved = f"$wsfan.{room}"
    nodes = [await make_node(), await make_node()] if kind != "memory" else [await make_node()]
    for n in nodes:
        hist = await n.join(reserved)
        assert (hist.publications, hist.recovered, hist.seq) == ([], False, 0)
    pubs = [await nodes[0].publish(reserved, b'{"n":%d}' % i) for i in range(5)]
    assert [p.seq for p in pubs] == [0] * 5
    for n in nodes:
        assert await n.deliveries.until(reserved, 5) == [0] * 5
        assert [p.payload for p in n.deliveries.seen if p.room == reserved] == [
            b'{"n":%d}' % i for i in range(5)
        ]
        hist = await n.history(reserved, 0)
        assert (hist.publications, hist.seq) == ([], 0)
    # The room's numbering and history are untouched by its neighbour's traffic.
    assert (await nodes[0].publish(room)).seq == 1
    if kind == "memory":
        assert reserved not in nodes[0].broker.rooms  # type: ignore[attr-defined]
    else:
        servers = [request.getfixturevalue("shared_redis")] if kind == "redis" else None
        if servers is None:
            servers = request.getfixturevalue("shared_cluster").nodes
        for srv in servers:
            keys = srv.command("KEYS", f"*{reserved}*")
            assert keys == [], keys


# ---------------------------------------------------------------- presence and join/leave events


class Events:
    """The ``bind_events`` callback, recording (joined, user, conn) per room and waking waiters."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def of(self, room: str) -> list[tuple[bool, str, str]]:
        return [(e.joined, e.user, e.conn) for e in self.node.events if e.room == room]

    async def until(self, room: str, count: int, timeout: float = 10.0) -> list[tuple[bool, str, str]]:
        async with asyncio.timeout(timeout):
            while len(self.of(room)) < count:
                await asyncio.sleep(0.01)
        return self.of(room)


async def test_listeners_count_the_nodes_subscribed_to_a_room_and_drop_a_closed_one(
    make_node: Any, kind: str, room: str
) -> None:
    """``listeners`` (what GET /rooms uses to skip a node killed -9): how many nodes are subscribed
    to each room now, through the broker; a node whose connection closed is not counted."""
    a = await make_node()
    await a.join(room)
    assert await settle(a.broker.listeners([room, room + "-none"])) == {room: 1, room + "-none": 0}
    assert await settle(a.broker.listeners([])) == {}
    if kind == "memory":
        return  # one process is the whole cluster
    b = await make_node()
    await b.join(room)
    assert await settle(a.broker.listeners([room])) == {room: 2}
    await b.broker.close()
    async with asyncio.timeout(5):
        while (await settle(a.broker.listeners([room])))[room] != 1:
            await asyncio.sleep(0.02)


async def test_presence_lists_entries_and_counts_users_once(node: Node, room: str) -> None:
    b = node.broker
    entries = [PresenceEntry("c1", "ann", 1), PresenceEntry("c2", "ann", 2), PresenceEntry("c3", "bob", 3)]
    for e in entries:
        await settle(b.join_presence(room, e, True, False))
    assert sorted(await settle(b.presence(room))) == entries
    assert await settle(b.presence_stats(room)) == (3, 2)
    await settle(b.leave_presence(room, PresenceEntry("c1", "ann", 0), True, False))
    assert sorted(await settle(b.presence(room))) == entries[1:]
    assert await settle(b.presence_stats(room)) == (2, 2)
    assert await settle(b.presence(room + "-empty")) == [] and await settle(
        b.presence_stats(room + "-x")
    ) == (0, 0)


async def test_presence_off_keeps_nothing_and_announce_off_sends_nothing(node: Node, room: str) -> None:
    await node.join(room)
    await settle(node.broker.join_presence(room, PresenceEntry("c1", "ann", 1), False, True))
    await settle(node.broker.join_presence(room, PresenceEntry("c2", "bob", 1), True, False))
    assert [e.conn for e in await settle(node.broker.presence(room))] == ["c2"]
    assert await Events(node).until(room, 1) == [(True, "ann", "c1")]
    await node.publish(room)  # a marker: events and messages of a room keep their order
    await node.deliveries.until(room, 1)
    assert Events(node).of(room) == [(True, "ann", "c1")], "announce=False sent no event"


async def test_joined_and_left_reach_a_subscribed_node_once_in_order_unnumbered(
    node: Node, room: str
) -> None:
    await node.join(room)
    await node.publish(room)
    await settle(node.broker.join_presence(room, PresenceEntry("c9", "zed", 1), True, True))
    await settle(node.broker.leave_presence(room, PresenceEntry("c9", "zed", 0), True, True))
    assert await Events(node).until(room, 2) == [(True, "zed", "c9"), (False, "zed", "c9")]
    assert (await node.publish(room)).seq == 2, "events take no seq"
    assert (await node.history(room, 0)).publications[-1].seq == 2


@pytest.mark.parametrize("kind", ["redis", "cluster"])  # a memory broker is one node
async def test_presence_and_events_are_shared_by_every_node(make_node: Any, room: str) -> None:
    a, b = await make_node(), await make_node()
    await b.join(room)
    await settle(a.broker.join_presence(room, PresenceEntry("ca", "ann", 1), True, True))
    assert await Events(b).until(room, 1) == [(True, "ann", "ca")]
    assert [e.conn for e in await settle(b.broker.presence(room))] == ["ca"]


# ---------------------------------------------------------------- history lifetime


async def test_history_expires_after_the_namespaces_ttl(make_node: Any, room: str) -> None:
    """After ``history_ttl`` without a publication, ``since`` is never recovered and nothing is replayed."""
    ttl = Namespace(name="brief", history_ttl=1.0)
    node = await make_node(namespaces=Namespaces(Namespace(), {"brief": ttl}))
    name = f"brief:{room}"
    first = await node.publish(name)
    hist = await node.history(name, 0)
    assert hist.recovered and [p.seq for p in hist.publications] == [1]
    async with asyncio.timeout(10):
        while (hist := await node.history(name, 0, hist.epoch)).recovered:
            await asyncio.sleep(0.1)
    assert hist.publications == [] and not hist.recovered
    assert first.seq == 1


# ---------------------------------------------------------------- the pure rule


@st.composite
def rooms_kept(draw: Any) -> tuple[list[Publication], int]:
    """A room's seq and what a broker kept of it: a tail, possibly empty, maybe missing an entry it could not read."""
    seq = draw(st.integers(0, 40))
    kept = draw(st.integers(0, seq))
    seqs = list(range(seq - kept + 1, seq + 1))
    if seqs and draw(st.booleans()):
        del seqs[draw(st.integers(0, len(seqs) - 1))]
    return [Publication("r", s, "u", b"1", Encoding.JSON) for s in seqs], seq


@given(
    room=rooms_kept(),
    since=st.none() | st.integers(0, 45),
    client_epoch=st.sampled_from([None, "", "e1", "e2"]),
)
@example(  # an entry in the middle could not be read: the replay is not a recovery
    room=([Publication("r", s, "u", b"1", Encoding.JSON) for s in (1, 2, 4, 5)], 5),
    since=0,
    client_epoch=None,
)
@settings(max_examples=300)
def test_history_since_replays_after_since_and_recovers_only_a_complete_replay(
    room: tuple[list[Publication], int], since: int | None, client_epoch: str | None
) -> None:
    kept, seq = room
    hist = history_since(kept, seq, "e1", since, client_epoch)
    assert (hist.seq, hist.epoch) == (seq, "e1")
    replayed = [p.seq for p in hist.publications]
    if since is None:
        assert (replayed, hist.recovered) == ([], False)
    elif client_epoch == "e2":
        assert replayed == [p.seq for p in kept] and not hist.recovered
    else:
        assert replayed == [p.seq for p in kept if p.seq > since]
        assert hist.recovered == (since <= seq and replayed == list(range(since + 1, seq + 1)))
