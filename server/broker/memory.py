"""Single-node broker: seq counters and history rings in this process."""

from __future__ import annotations

import secrets
import time
from collections import deque

from wsfan.server.broker import DeliverFn
from wsfan.server.broker.publication import History, Publication


class RoomLog:
    """A room's seq and the last ``size`` publications, oldest first."""

    __slots__ = ("seq", "ring")

    def __init__(self, size: int) -> None:
        self.seq = 0
        self.ring: deque[Publication] = deque(maxlen=size)

    def since(self, since: int | None, epoch: str, client_epoch: str | None = None) -> History:
        if since is None:
            return History([], False, self.seq, epoch)
        if client_epoch and client_epoch != epoch:
            # The client counted in an earlier process's numbering: nothing after its
            # since is recoverable, and all this process has is news to it.
            return History(list(self.ring), False, self.seq, epoch)
        if since >= self.seq:
            # Nothing missed; a since beyond our seq means the client saw a seq
            # this process never assigned (a restart lost the room): not recovered.
            return History([], since == self.seq, self.seq, epoch)
        missed = self.seq - since
        ring = self.ring
        if missed > len(ring):
            return History(list(ring), False, self.seq, epoch)
        return History(list(ring)[len(ring) - missed :], True, self.seq, epoch)


class MemoryBroker:
    """Synchronous on purpose: a single node's publish path never leaves the current call."""

    def __init__(self, history_size: int = 300) -> None:
        self.history_size = history_size
        # Every room's seq lives and dies with this process: one epoch for all of them.
        self.epoch = secrets.token_hex(4)
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

    def history(self, room: str, since: int | None, epoch: str | None = None) -> History:
        log = self.rooms.get(room)
        if log is None:
            fresh = since == 0 and (not epoch or epoch == self.epoch)
            return History([], fresh, 0, self.epoch)
        return log.since(since, self.epoch, epoch)

    def subscribe(self, room: str) -> None:
        return None

    def unsubscribe(self, room: str) -> None:
        return None
