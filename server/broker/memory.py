"""Single-node broker: seq counters, history rings and presence in this process.

Rooms do not live forever: one sweep timer (not a timer per room) drops a room's history
once no publication came for its namespace's ``history_ttl``, and forgets the room
altogether (seq and epoch too) when it also has no subscriber and no presence. A room
never published in is forgotten as soon as nobody is in it (nothing to recover). A room
that was published in comes back under a new epoch, so a client rejoining with ``since``
and the old epoch is told ``recovered: false`` instead of being handed another
incarnation's messages (one never published in keeps its epoch: ``epoch_of``).
``max_rooms`` bounds how many rooms exist at once: past it, creating one more raises
``BrokerUnavailable`` (clients get ``UNAVAILABLE``) until the sweep timer forgets idle
rooms; a refusal costs O(1), it never sweeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import deque
from collections.abc import Callable

from wsfan.server.broker import BrokerUnavailable, DeliverFn, EventFn, reserved
from wsfan.server.broker.history import History, history_since
from wsfan.server.broker.publication import PresenceEntry, PresenceEvent, Publication
from wsfan.server.heap import Compaction, compacted, move_slots
from wsfan.server.namespaces import Namespace, Namespaces

# Sweep period bounds, seconds: a quarter of the shortest history_ttl, within these.
SWEEP_MIN_S = 0.05
SWEEP_MAX_S = 5.0
# Epoch generations: a room's epoch names its bucket's generation, which grows each time a room
# of the bucket that was published in is forgotten. A fixed table, whatever the rooms.
EPOCH_BUCKETS = 4096


class RoomLog:
    """A room's seq, epoch, the last ``size`` publications (oldest first) and when it was last active."""

    __slots__ = ("seq", "ring", "epoch", "ttl", "last")

    def __init__(self, size: int, epoch: str, ttl: float, now: float) -> None:
        self.seq = 0
        self.ring: deque[Publication] = deque(maxlen=size)
        self.epoch = epoch
        self.ttl = ttl
        self.last = now  # perf_counter of the last publication (or of the room's creation)

    def since(self, since: int | None, client_epoch: str | None = None) -> History:
        """``history_since`` of this room's ring: a client epoch from an earlier incarnation
        (a restart or an expiry lost the room) is not recovered."""
        return history_since(self.ring, self.seq, self.epoch, since, client_epoch)


class MemoryBroker:
    """Synchronous on purpose: a single node's publish path never leaves the current call."""

    def __init__(
        self,
        history_size: int = 300,
        *,
        namespaces: Namespaces | None = None,
        max_rooms: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.namespaces = namespaces or Namespaces(Namespace(history_size=history_size))
        self.history_size = self.namespaces.default.kept_history
        self.max_rooms = max_rooms  # 0: no limit
        # Epochs: this process's random prefix, a keyed hash of the room name and its bucket's
        # generation (``epoch_of``).
        self.epoch = secrets.token_hex(4)
        self._key = secrets.token_bytes(16)
        self._generations = [0] * EPOCH_BUCKETS
        self.rooms: dict[str, RoomLog] = {}
        self.subscribed: set[str] = set()
        self.presences: dict[str, dict[str, PresenceEntry]] = {}
        self._clock = clock
        self._deliver: DeliverFn | None = None
        self._on_event: EventFn | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.expired = 0  # rooms forgotten by the sweep, for tests and metrics
        self.refusals = 0  # new rooms refused at max_rooms
        self.released = 0  # rooms never published in, forgotten when their last subscriber left
        # Past heap.COMPACT_AFTER forgotten rooms: this broker's tables, then the hub's (a hook).
        self.compaction = Compaction()
        self.compaction.hooks.append(self._compact_tables)
        self.compact_hooks = self.compaction.hooks
        # ... and after them, what re-creates long-lived small objects (heap.relocate): ours, the hub's.
        self.compaction.movers.append(self._relocate)
        self.compact_movers = self.compaction.movers

    def bind(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    def bind_events(self, on_event: EventFn) -> None:
        self._on_event = on_event

    async def start(self) -> None:
        self._schedule_sweep()

    async def close(self) -> list[str]:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        return []

    # ------------------------------------------------------------ lifetime

    def _schedule_sweep(self) -> None:
        period = min(SWEEP_MAX_S, max(SWEEP_MIN_S, self.namespaces.min_ttl / 4))
        self._sweeper = asyncio.get_running_loop().call_later(period, self._sweep_and_reschedule)

    def _sweep_and_reschedule(self) -> None:
        self._sweeper = None  # this one has fired: a compaction in the sweep has no timer to move
        self.sweep()
        self._schedule_sweep()

    def sweep(self) -> int:
        """Drop the history of rooms idle past their TTL; forget those nobody is in. Returns rooms forgotten.

        A room never published in (seq 0) that nobody is in goes at once, whatever its age:
        e.g. one an admin ``GET /history`` created (``unsubscribe`` forgets the others).
        """
        now = self._clock()
        idle = [name for name, log in self.rooms.items() if not log.seq or now - log.last >= log.ttl]
        forgotten = 0
        for name in idle:
            log = self.rooms[name]
            log.ring.clear()
            if name not in self.subscribed and name not in self.presences:
                del self.rooms[name]
                forgotten += 1
                if log.seq:  # its numbering is gone: the next incarnation gets another epoch
                    self._generations[self._bucket(name)[0]] += 1
        self.expired += forgotten
        if self.compaction.forgot(forgotten, len(self.rooms)):
            self.compact()
        return forgotten

    def compact(self) -> None:
        """Shrink the tables a burst of rooms grew, the hub's too, and give the freed memory back.

        Run by ``sweep`` once it has forgotten ``heap.COMPACT_AFTER`` rooms and at least as
        many as are left (``heap.Compaction``); its cost (a full garbage collection,
        server/heap.py) is paid per thousands of rooms, never per request.
        """
        self.compaction.run()

    def _compact_tables(self) -> None:
        self.rooms = dict(self.rooms)
        self.subscribed = compacted(self.subscribed)
        self.presences = compacted(self.presences)

    def _bucket(self, room: str) -> tuple[int, str]:
        digest = hashlib.blake2b(room.encode(), key=self._key, digest_size=8).digest()
        return int.from_bytes(digest[:2]) % EPOCH_BUCKETS, digest[2:].hex()

    def epoch_of(self, room: str) -> str:
        """The epoch a new incarnation of ``room`` gets: ``<process><room hash><generation>``, 21+ hex digits.

        The rule (docs/protocol-choices.md, "Epochs"): two incarnations of a room that were
        published in never share an epoch, so a ``since`` of one is never recovered in the
        other. Forgetting a room that was published in moves its bucket to a new generation
        (``sweep``); a room never published in is forgotten without it (``unsubscribe``), so it
        comes back under the same epoch while its bucket's generation stands: its rejoining
        subscribers (``since`` 0) are recovered, as when it was kept, and nothing of it is
        remembered per room. Between those two incarnations no other could be published in.
        """
        bucket, tag = self._bucket(room)
        return f"{self.epoch}{tag}{self._generations[bucket]:x}"

    def _relocate(self, replaced: list[object]) -> None:
        """The sweep's counters (expired, the epoch generations) and timer as new objects
        (``heap.relocate``): each was last made while the burst ran."""
        move_slots(self, ("expired", "_generations"), replaced)
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.cancel()
            replaced.append(sweeper)
            self._sweeper = asyncio.get_running_loop().call_at(sweeper.when(), self._sweep_and_reschedule)

    def _log(self, room: str) -> RoomLog:
        log = self.rooms.get(room)
        if log is None:
            if self.max_rooms and len(self.rooms) >= self.max_rooms:
                # O(1): no sweep here. A sweep walks every room, and a client refused in a loop
                # would run one per request, stalling every connection on the node (hostile
                # finding 04: 150 refused joins held another client's echo 1.5 s at 100,000
                # rooms). Idle rooms go on the sweep timer, at most SWEEP_MAX_S later.
                self.refusals += 1
                raise BrokerUnavailable(
                    public=f"room limit reached ({self.max_rooms} rooms); retry once idle rooms expire"
                )
            ns = self.namespaces.of(room)
            log = self.rooms[room] = RoomLog(
                ns.kept_history, self.epoch_of(room), ns.history_ttl, self._clock()
            )
        return log

    # ------------------------------------------------------------ Broker

    def publish(self, room: str, sender: str, payload: bytes, encoding: int, origin: str) -> Publication:
        log = self.rooms.get(room)
        if log is None:
            if reserved(room):  # a command (server/control.py): delivered, never numbered or kept
                return self._deliver_unnumbered(room, sender, payload, encoding, origin)
            log = self._log(room)
        log.seq += 1
        now = time.perf_counter()
        pub = Publication(room, log.seq, sender, payload, encoding, origin, now)
        log.last = now
        ring = log.ring
        if ring.maxlen:
            ring.append(pub)
        assert self._deliver is not None, "bind() the hub before publishing"
        self._deliver(pub)
        return pub

    def _deliver_unnumbered(
        self, room: str, sender: str, payload: bytes, encoding: int, origin: str
    ) -> Publication:
        pub = Publication(room, 0, sender, payload, encoding, origin, time.perf_counter())
        assert self._deliver is not None, "bind() the hub before publishing"
        self._deliver(pub)
        return pub

    def history(self, room: str, since: int | None, epoch: str | None = None) -> History:
        if reserved(room):
            return History([], False, 0, "")
        # A join creates the room, so that the epoch it acks is the one later publishes keep.
        return self._log(room).since(since, epoch)

    def subscribe(self, room: str) -> None:
        self.subscribed.add(room)

    def unsubscribe(self, room: str) -> None:
        self.subscribed.discard(room)
        self._forget_if_unpublished(room)

    def _forget_if_unpublished(self, room: str) -> None:
        """Forget a room nobody is in (no subscriber, no presence) that was never published in.

        It has nothing to recover (seq 0, no history), so keeping it for ``history_ttl`` only
        held a ``max_rooms`` slot: join/leave (or SSE open/close) churn filled the node's room
        table without holding a connection (hostile finding 11). Its next join creates it again
        under the same epoch unless a room of its epoch bucket was published in and forgotten
        meanwhile (``epoch_of``). A room with publications waits for the sweep, its history kept
        until its TTL.
        """
        log = self.rooms.get(room)
        if log is None or log.seq or room in self.subscribed or room in self.presences:
            return
        del self.rooms[room]
        self.released += 1
        if self.compaction.forgot(1, len(self.rooms)):
            self.compaction.run_soon()  # not inside the hub's leave: between callbacks

    def listeners(self, rooms: list[str]) -> dict[str, int]:
        """This process is the whole cluster: 1 for a room it subscribed to, else 0."""
        return {room: int(room in self.subscribed) for room in rooms}

    # ------------------------------------------------------------ presence

    def join_presence(self, room: str, entry: PresenceEntry, presence: bool, announce: bool) -> None:
        if presence:
            self.presences.setdefault(room, {})[entry.conn] = entry
        if announce:
            self._announce(PresenceEvent(room, True, entry.user, entry.conn))

    def leave_presence(self, room: str, entry: PresenceEntry, presence: bool, announce: bool) -> None:
        if presence:
            members = self.presences.get(room)
            if members is not None:
                members.pop(entry.conn, None)
                if not members:
                    del self.presences[room]
                    self._forget_if_unpublished(room)
        if announce:
            self._announce(PresenceEvent(room, False, entry.user, entry.conn))

    def presence(self, room: str) -> list[PresenceEntry]:
        return list(self.presences.get(room, {}).values())

    def presence_stats(self, room: str) -> tuple[int, int]:
        members = self.presences.get(room, {})
        return len(members), len({e.user for e in members.values()})

    def _announce(self, event: PresenceEvent) -> None:
        assert self._on_event is not None, "bind_events() the hub before announcing"
        self._on_event(event)
