"""The seam between one node and the rest of the cluster: the ``Broker`` contract.

The hub publishes through a ``Broker`` and receives every publication back through
the callback it binds, whether the broker lives in this process (single node,
``memory.py``) or in Redis (cluster, ``redis.py``). The hub never knows which one
it has. ``tests/test_broker_contract.py`` runs one suite against every
implementation (centrifuge's shared broker tests are the model).

Rules every broker keeps:

Sync or async
    ``publish``, ``history``, ``subscribe``, ``unsubscribe`` and the presence calls
    return either the value itself or an awaitable of it. The in-process broker
    answers synchronously so that the single-node hot path never creates a task;
    the hub awaits only when handed an awaitable (``inspect.isawaitable``).
    ``bind``/``bind_events`` are synchronous and come before ``start``; ``start``
    and ``close`` are coroutines, ``close`` bounded in time.

Numbering
    ``publish`` assigns the room's next seq: 1, 2, 3... per room, no gaps, no
    repeats within one epoch, in the order one node called ``publish``. A room's
    ``epoch`` names its numbering; it changes only when the room was lost and its
    seq started over (a restarted process, Redis without the room, an expired room).

History
    ``history(room, since, epoch)`` is ``history_since`` (``history.py``: the one
    pure function every broker uses) applied to what the broker kept of the room.
    A room nobody published to has seq 0 and an epoch; asking fixes that epoch for
    the publications that follow. An asynchronous broker reads history only once
    the room's live publications flow to this node, so a join sees every seq once:
    in the replay or live (the hub parks live ones meanwhile).

Delivery
    ``deliver`` (bound with ``bind``) is called on the event loop, synchronously,
    once per publication of every room this node subscribed to, in seq order per
    room, the publishing node included. It may also be called for rooms this node
    did not subscribe to (the memory broker delivers every room): the hub drops
    those. A room's deliveries are guaranteed from the moment a ``history`` call
    made after ``subscribe`` has returned (the hub's join does exactly that) until
    ``unsubscribe``.

Reserved rooms
    A room whose name starts with ``RESERVED_PREFIX`` (``$``; no client can name one, PROTOCOL.md)
    is the server's own: the control room and the survey reply rooms (``server/control.py``).
    Its publications are commands, not a room's messages: ``publish`` fans one out to every
    subscribed node like any other, in order, but gives it no seq (0), keeps no history and
    creates nothing that outlives it (no seq counter, no stream, no Redis key but presence's);
    ``history`` of one is empty (seq 0). A node away from the broker misses what was sent
    meanwhile (no catch-up), as Centrifugo's control channel does.

Errors
    The only error a caller handles is ``BrokerUnavailable`` ("not now": the client
    gets ``UNAVAILABLE``). ``publish``, ``history`` and the presence reads report
    it by raising it (synchronous broker) or through their awaitable (asynchronous
    broker); either way nothing was published or read. Its ``public`` text is what
    the client is told, a sentence of ours; its message (which may quote Redis) is
    for logs only. Any other exception is a bug: the hub logs it and answers
    ``INTERNAL``. ``subscribe``/``unsubscribe`` never fail: a broker that lost its
    backend resubscribes every wanted room when it is back, and delivers what the
    rooms' subscribers missed meanwhile before anything newer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from wsfan.server.broker.history import History, history_since
from wsfan.server.broker.publication import BroadcastPush, PresenceEntry, PresenceEvent, Publication

DeliverFn = Callable[[Publication], None]
EventFn = Callable[[PresenceEvent], None]


# Rooms starting with this are the server's own: unnumbered, no history (the contract's "Reserved rooms").
RESERVED_PREFIX = "$"


def reserved(room: str) -> bool:
    """Whether ``room`` is a reserved room (``$...``): unnumbered and history-less in every broker."""
    return room.startswith(RESERVED_PREFIX)


# What a client is told when the broker is down: no address, no library error, only what to do.
UNAVAILABLE_TEXT = "broker unavailable; retry shortly"


class BrokerUnavailable(Exception):
    """The broker cannot take a publish right now; the client gets ``UNAVAILABLE``.

    Its text (which may name the Redis address or quote redis-py) is for logs only:
    clients are told ``public``, a sentence of ours (``UNAVAILABLE_TEXT`` unless the
    broker has something the client can act on, such as the room limit).
    """

    def __init__(self, why: str = "", public: str = UNAVAILABLE_TEXT) -> None:
        super().__init__(why)
        self.public = public


class Broker(Protocol):
    def bind(self, deliver: DeliverFn) -> None:
        """Register the node's fan-out; called for every publication of a room this node subscribed to."""

    def bind_events(self, on_event: EventFn) -> None:
        """Register the node's fan-out of ``joined``/``left`` events, for rooms this node subscribed to."""

    async def start(self) -> None: ...

    async def close(self) -> list[str]:
        """Release connections and tasks within a bounded time; returns what had to be abandoned (empty: clean)."""

    def publish(
        self, room: str, sender: str, payload: bytes, encoding: int, origin: str
    ) -> Publication | Awaitable[Publication]:
        """Assign the room's next seq, keep the publication in history and fan it out to every node."""

    def history(self, room: str, since: int | None, epoch: str | None = None) -> History | Awaitable[History]:
        """``history_since`` of what the broker kept of ``room``: replay, recovered, seq, epoch.

        Publications with ``seq > since`` (none when since is None). An ``epoch`` other
        than the room's means ``since`` counts in a numbering that is gone: the result is
        not recovered, and carries whatever history the room has now.
        """

    def subscribe(self, room: str) -> None | Awaitable[None]:
        """This node has its first local subscriber of ``room``."""

    def unsubscribe(self, room: str) -> None | Awaitable[None]:
        """This node's last local subscriber of ``room`` left."""

    def join_presence(
        self, room: str, entry: PresenceEntry, presence: bool, announce: bool
    ) -> None | Awaitable[None]:
        """A connection joined: keep it in the room's presence (``presence``), send ``joined`` (``announce``)."""

    def leave_presence(
        self, room: str, entry: PresenceEntry, presence: bool, announce: bool
    ) -> None | Awaitable[None]:
        """A connection left or disconnected: drop it from presence, send ``left``."""

    def listeners(self, rooms: list[str]) -> dict[str, int] | Awaitable[dict[str, int]]:
        """How many node processes are subscribed to each room now, through the broker, cluster-wide
        (Redis ``PUBSUB NUMSUB``: a node killed -9 drops out as soon as its connection closes,
        without waiting for any TTL). ``BrokerUnavailable`` as for presence."""

    def presence(self, room: str) -> list[PresenceEntry] | Awaitable[list[PresenceEntry]]:
        """Every connection in the room's presence, across the cluster, in one round trip at most."""

    def presence_stats(self, room: str) -> tuple[int, int] | Awaitable[tuple[int, int]]:
        """``(connections, distinct users)`` in the room's presence."""


__all__ = [
    "RESERVED_PREFIX",
    "UNAVAILABLE_TEXT",
    "BroadcastPush",
    "Broker",
    "BrokerUnavailable",
    "DeliverFn",
    "EventFn",
    "History",
    "PresenceEntry",
    "PresenceEvent",
    "Publication",
    "history_since",
    "reserved",
]
