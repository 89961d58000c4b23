"""Which rooms the application is in, and which seq it saw last in each: dedupe and recovery.

Sans-I/O on purpose: every rule below is a plain method call, unit-testable
without a socket, and the client only wires it to frames.

Rules (PROTOCOL.md: ``seq`` grows by 1 per room, ``join`` with ``since`` replays
history after ``since`` before live messages):

* A delivery is handed to the application only if its ``seq`` is greater than
  the last one handed over for that room; replays that overlap what was already
  seen are dropped (``duplicates``). So the application sees every message once,
  in order.
* A rejoin after a reconnect sends ``since`` = that last seq. While such a join
  is in flight its room's deliveries are *held*, because only the ack tells how
  to number them: ``recovered: true`` means they continue the old numbering;
  ``recovered: false`` with ``ack.seq < since`` means the server's numbering
  started over (a single node restarted and lost the room), so everything that
  arrives is new even though its seq is small. The held deliveries are then
  released through the normal dedupe rule.
* The ack's ``seq`` (the room's seq when we joined) becomes the baseline of a
  fresh join, so a reconnect before the first delivery still recovers what was
  published while we were away.
* The server never delivers our own publications to us, but history replay on
  a new connection cannot tell they were ours. The seqs of our acked publishes
  are remembered (``published``) and skipped on replay; ``last_seq`` moves over
  them as soon as everything before them was seen, so the set stays as small as
  the window of messages still in flight. (``publish_nowait`` gets no ack, so
  its messages can come back once after a reconnect.)
"""

from __future__ import annotations

from typing import Any

from client.codec import Message
from client.events import Gap, Recovered


class RoomState:
    __slots__ = ("last_seq", "joined", "held", "since", "own")

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.own: set[int] | None = None  # seqs of our own acked publishes not yet passed by last_seq
        self.joined = False  # a join was acked: the room is rejoined after a reconnect
        self.held: list[Message] | None = None  # deliveries held while a join with since is in flight
        self.since: int | None = None  # the since sent with the join in flight


class RoomTracker:
    __slots__ = ("rooms", "duplicates", "unknown")

    def __init__(self) -> None:
        self.rooms: dict[str, RoomState] = {}
        self.duplicates = 0
        self.unknown = 0

    def begin_join(self, room: str, since: int | None) -> int | None:
        """Record a join about to be sent; returns the ``since`` to send with it.

        An explicit ``since`` rewinds the room (the caller asked for a replay);
        otherwise a room we already track resumes from its last seq.
        """
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = RoomState()
        if since is None:
            since = state.last_seq
        else:
            state.last_seq = since
        state.since = since
        state.held = [] if since is not None else None
        return since

    def end_join(self, room: str, data: Any) -> tuple[list[Message], Recovered | Gap | None]:
        """Apply a join ack: returns the held deliveries now due to the application, and what happened."""
        state = self.rooms.get(room)
        if state is None:  # left while the join was in flight
            return [], None
        held, since = state.held or [], state.since
        state.held = None
        state.since = None
        state.joined = True
        seq, recovered = _ack_fields(data)
        event: Recovered | Gap | None = None
        if since is not None and seq is not None:
            if recovered:
                event = Recovered(room, since, seq)
            else:
                reset = seq < since
                event = Gap(room, since, seq, reset)
                if reset:
                    state.last_seq = None  # new numbering: nothing seen yet
                    state.own = None
        released = [m for m in held if self.accept(m)]
        if state.last_seq is None and seq is not None:
            state.last_seq = seq
        return released, event

    def abort_join(self, room: str) -> None:
        """The join failed or timed out: forget a room never acked, keep one joined before."""
        state = self.rooms.get(room)
        if state is None:
            return
        if not state.joined:
            del self.rooms[room]
        else:
            state.held = None
            state.since = None

    def leave(self, room: str) -> None:
        self.rooms.pop(room, None)

    def accept(self, msg: Message) -> bool:
        """Whether a delivery goes to the application now (hot path: one dict lookup, one compare)."""
        state = self.rooms.get(msg.room)
        if state is None:
            self.unknown += 1
            return False
        held = state.held
        if held is not None:
            held.append(msg)
            return False
        last = state.last_seq
        seq = msg.seq
        if last is not None and seq <= last:
            self.duplicates += 1
            return False
        state.last_seq = seq
        own = state.own
        if own:
            if seq in own:  # our own publication, replayed after a reconnect
                own.discard(seq)
                _pass_own(state)
                return False
            _pass_own(state)
        return True

    def published(self, room: str, seq: Any) -> None:
        """Our publish to ``room`` was acked with ``seq``: never hand it back to us."""
        state = self.rooms.get(room)
        if state is None or not isinstance(seq, int):
            return
        last = state.last_seq
        if last is not None and seq <= last:
            return
        if state.own is None:
            state.own = set()
        state.own.add(seq)
        _pass_own(state)

    def joined(self) -> list[str]:
        """Rooms to rejoin after a reconnect."""
        return [room for room, state in self.rooms.items() if state.joined]

    def connection_lost(self) -> None:
        """Joins in flight died with the connection: their held deliveries are dropped, not released.

        Dropping is safe because their seqs are above ``last_seq``, so the rejoin
        with ``since = last_seq`` replays them. Rooms never acked are forgotten
        (their ``join`` call fails with ``ConnectionClosed``).
        """
        for room in [r for r, s in self.rooms.items() if not s.joined]:
            del self.rooms[room]
        for state in self.rooms.values():
            state.held = None
            state.since = None

    def last_seq(self, room: str) -> int | None:
        state = self.rooms.get(room)
        return None if state is None else state.last_seq


def _pass_own(state: RoomState) -> None:
    """Advance ``last_seq`` over our own publications that directly follow it."""
    own, last = state.own, state.last_seq
    if own is None or last is None:
        return
    while last + 1 in own:
        last += 1
        own.discard(last)
    state.last_seq = last


def _ack_fields(data: Any) -> tuple[int | None, bool]:
    if isinstance(data, dict):
        seq = data.get("seq")
        return (seq if isinstance(seq, int) else None), bool(data.get("recovered", True))
    return None, True
