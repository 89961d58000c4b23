"""The seam between one node and the rest of the cluster.

The hub publishes through a ``Broker`` and receives every publication back through
the callback it binds, whether the broker lives in this process (single node) or
in Redis (cluster). The hub never knows which one it has.

Calls that may need the network return either a value or an awaitable of it: the
in-process broker answers synchronously so the single-node hot path never creates
a task, and the hub awaits only when it is handed an awaitable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from wsfan.server.broker.publication import History, PresenceEntry, PresenceEvent, Publication

DeliverFn = Callable[[Publication], None]
EventFn = Callable[[PresenceEvent], None]


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
        """Publications with ``seq > since`` (none when since is None), the room's seq and epoch.

        An ``epoch`` other than the room's means ``since`` counts in a numbering that is
        gone: the result is not recovered, and carries whatever history the room has now.
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

    def presence(self, room: str) -> list[PresenceEntry] | Awaitable[list[PresenceEntry]]:
        """Every connection in the room's presence, across the cluster, in one round trip at most."""

    def presence_stats(self, room: str) -> tuple[int, int] | Awaitable[tuple[int, int]]:
        """``(connections, distinct users)`` in the room's presence."""


__all__ = [
    "UNAVAILABLE_TEXT",
    "Broker",
    "BrokerUnavailable",
    "DeliverFn",
    "EventFn",
    "History",
    "PresenceEntry",
    "PresenceEvent",
    "Publication",
]
