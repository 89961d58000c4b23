"""Single-node broker: seq counters and history rings in this process."""

from __future__ import annotations

import time
from collections import deque

from server.broker import DeliverFn
from server.broker.publication import History, Publication


class RoomLog:
    """A room's seq and the last ``size`` publications, oldest first."""

    __slots__ = ("seq", "ring")

    def __init__(self, size: int) -> None:
        self.seq = 0
        self.ring: deque[Publication] = deque(maxlen=size)

    def since(self, since: int | None) -> History:
        if since is None:
            return History([], False, self.seq)
        if since >= self.seq:
            # Nothing missed; a since beyond our seq means the client saw a seq
            # this process never assigned (a restart lost the room): not recovered.
            return History([], since == self.seq, self.seq)
        missed = self.seq - since
        ring = self.ring
        if missed > len(ring):
            return History(list(ring), False, self.seq)
        return History(list(ring)[len(ring) - missed :], True, self.seq)


class MemoryBroker:
    """Synchronous on purpose: a single node's publish path never leaves the current call."""

    def __init__(self, history_size: int = 300) -> None:
        self.history_size = history_size
        self.rooms: dict[str, RoomLog] = {}
        self._deliver: DeliverFn | None = None

    def bind(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _log(self, room: str) -> RoomLog:
        log = self.rooms.get(room)
        if log is None:
            log = self.rooms[room] = RoomLog(self.history_size)
        return log

    def publish(self, room: str, sender: str, payload: bytes, encoding: int, origin: str) -> Publication:
        log = self._log(room)
        log.seq += 1
        pub = Publication(room, log.seq, sender, payload, encoding, origin, time.perf_counter())
        if self.history_size:
            log.ring.append(pub)
        assert self._deliver is not None, "bind() the hub before publishing"
        self._deliver(pub)
        return pub

    def history(self, room: str, since: int | None) -> History:
        log = self.rooms.get(room)
        if log is None:
            return History([], since is not None and since == 0, 0)
        return log.since(since)

    def subscribe(self, room: str) -> None:
        return None

    def unsubscribe(self, room: str) -> None:
        return None
