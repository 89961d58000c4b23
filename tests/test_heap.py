"""Memory after many rooms went away (issue 14): tables shrink, rooms are freed, nothing pins the heap.

Structural properties only: sizes of tables and which objects are alive, never RSS or time
(the RSS figure is the bench ``rooms`` scenario's, server/heap.py explains the causes).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc

from helpers.waiting import until
from wsfan.server.broker.memory import MemoryBroker, RoomLog
from wsfan.server.broker.publication import Publication
from wsfan.server.heap import SHRINK_MIN_BYTES, compacted, release_memory
from wsfan.server.hub import Hub, Room
from wsfan.server.namespaces import Namespace, Namespaces
from wsfan.server.protocol import Codec, Encoding

ROOMS = 5_000


class Peer:
    def flush(self, session) -> None:
        session.out.clear()

    def close(self, code: int, reason: str) -> None:
        pass


def test_compacted_rebuilds_a_mostly_empty_table_and_keeps_the_others():
    for make in (lambda n: dict.fromkeys(range(n)), lambda n: set(range(n))):
        table = make(100_000)
        assert compacted(table) is table, "full: no copy"
        for k in range(10, 100_000):
            table.discard(k) if isinstance(table, set) else table.pop(k)
        small = compacted(table)
        assert small is not table and small == table
        assert sys.getsizeof(small) < SHRINK_MIN_BYTES < sys.getsizeof(table)
        tiny = make(10)
        assert compacted(tiny) is tiny, "below SHRINK_MIN_BYTES: not worth a copy"


def _live() -> tuple[int, int, int]:
    """Room logs, hub rooms and publications of this test's rooms alive (other tests may leave some)."""
    objs = gc.get_objects()
    return (
        sum(1 for o in objs if type(o) is RoomLog),
        sum(1 for o in objs if type(o) is Room and o.name.startswith("once-")),
        sum(1 for o in objs if type(o) is Publication and o.room.startswith("once-")),
    )


def test_a_sweep_frees_every_expired_room_and_shrinks_the_broker_and_hub_tables():
    gc.collect()
    logs_before = _live()[0]
    broker = MemoryBroker(namespaces=Namespaces(Namespace(history_size=10, history_ttl=0.05)))
    hub = Hub(broker, node_id="t", schedule=lambda f: f(), rate_limit=0)
    s = hub.open(Peer(), Encoding.JSON)
    names = [f"once-{i}" for i in range(ROOMS)]
    for name in names:  # all of them joined at once: the hub's table grows to ROOMS too
        hub.join(s, name)
        hub.publish(name, s.user, b"1", Encoding.JSON, origin=s.conn_id)
    for name in names:
        hub.leave(s, name)
    empty = sys.getsizeof({})
    assert len(broker.rooms) == ROOMS and sys.getsizeof(hub.rooms) > SHRINK_MIN_BYTES
    assert _live() == (logs_before + ROOMS, 0, ROOMS), "a log and a kept publication per room"
    time.sleep(0.1)  # past the 0.05 s TTL; what follows does not depend on how long it took
    assert broker.sweep() == ROOMS
    assert broker.rooms == {} and sys.getsizeof(broker.rooms) == empty
    assert sys.getsizeof(broker.subscribed) < SHRINK_MIN_BYTES
    assert hub.rooms == {} and sys.getsizeof(hub.rooms) < SHRINK_MIN_BYTES
    gc.collect()
    assert _live() == (logs_before, 0, 0), "every room is freed"


def test_release_memory_drops_what_decoding_room_names_left_behind():
    """msgspec's room-name pattern check leaves strings in CPython's type cache (server/heap.py, cause 1).

    They are allocated while rooms are, and each keeps a pymalloc arena of 1 MiB resident;
    after ``release_memory`` nothing allocated by decoding is alive.
    """
    codec = Codec(Encoding.JSON)
    codec.decode(b'{"type":"join","room":"warm"}')
    tracemalloc.start(4)
    try:
        for i in range(ROOMS):
            msg = codec.decode(b'{"type":"join","room":"r-%d"}' % i)
        del msg
        gc.collect()
        left = _decoded(tracemalloc.take_snapshot())
        release_memory()
        after = _decoded(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    assert left > 0, "the cause is still there: without release_memory blocks survive decoding"
    assert after == 0


def _decoded(snapshot: tracemalloc.Snapshot) -> int:
    """Blocks still allocated whose traceback passes through ``Codec.decode``."""
    return sum(
        t.size for t in snapshot.traces if any(f.filename.endswith("protocol.py") for f in t.traceback)
    )


async def _settled(hub: Hub) -> None:
    """Every task the hub spawned (joins, presence writes) has finished."""
    while hub._tasks:
        await asyncio.gather(*list(hub._tasks))


async def test_the_redis_broker_compacts_its_tables_and_the_hubs_after_many_one_shot_rooms(redis_server):
    """Issue 14 with ``--broker redis``: no sweep runs, so forgetting rooms must compact by itself.

    ROOMS connections each join a room of their own (presence on, so the broker keeps a local
    presence entry per room) against a real redis-server, then disconnect: the hub's room and
    session tables and every per-room table of the broker end up sized for what is left.
    """
    from wsfan.server.broker.redis import RedisBroker

    broker = RedisBroker(redis_server.url, node_id="t", namespaces=Namespaces(Namespace(presence=True)))
    hub = Hub(broker, node_id="t", schedule=lambda f: f(), rate_limit=0)
    await broker.start()
    try:
        sessions = [hub.open(Peer(), Encoding.JSON) for _ in range(ROOMS)]
        for i, s in enumerate(sessions):
            hub.join(s, f"once-{i}")
        await _settled(hub)
        tables = {
            "hub.rooms": lambda: hub.rooms,
            "hub.sessions": lambda: hub.sessions,
            "broker._rooms": lambda: broker._rooms,
            "broker._channels": lambda: broker._channels,
            "broker.local_presence": lambda: broker.local_presence,
        }
        for name, table in tables.items():
            assert len(table()) == ROOMS, name
            assert sys.getsizeof(table()) > SHRINK_MIN_BYTES, name
        for s in sessions:
            hub.close(s)
        await _settled(hub)
        await until(lambda: not broker._inflight)  # Redis confirmed every UNSUBSCRIBE
        tables["broker._inflight"] = lambda: broker._inflight
        for name, table in tables.items():
            assert len(table()) == 0, name
            assert sys.getsizeof(table()) < SHRINK_MIN_BYTES, f"{name} kept its largest table"
    finally:
        await broker.close()
