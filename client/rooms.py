"""Which rooms the application is in, and which seq it saw last in each: dedupe and recovery.

Sans-I/O on purpose: every rule below is a plain method call, unit-testable
without a socket, and the client only wires it to frames.

Rules (PROTOCOL.md: ``seq`` grows by 1 per room, ``join`` with ``since`` replays
history after ``since`` before live messages):

* A delivery is handed to the application only if its ``seq`` is greater than
  the last one handed over for that room; replays that overlap what was already
  seen are dropped (``duplicates``). So the application sees every message once,
  in order.
* A rejoin after a reconnect sends ``since`` = that last seq, and the room's
  ``epoch`` from the last join ack (docs/protocol-choices.md, "Epochs": the
  identity of the room's numbering). While such a join is in flight its room's
  deliveries are *held*, because only the ack tells how to number them:
  ``recovered: true`` means they continue the old numbering. The room was
  *reset* (lost and renumbered from 1: a single node restarted, Redis lost the
  room) when the ack carries another epoch than the one sent, or, from a server
  without epochs, ``recovered: false`` with ``ack.seq < since``. Then nothing of
  the new numbering has been seen: the baseline becomes 0, so the history the
  server replays after the ack (seq 1..n) and the live messages after it are all
  handed over, although their seqs are not above the old last seq. The held
  deliveries are then released through the normal dedupe rule.
* A delivery whose ``seq`` is not above the last one seen, on a connection that
  stayed joined, means the room started over while we were in it (Redis lost it
  and the node delivers the new numbering: docs/protocol-choices.md, "Epochs"),
  unless it is one of the seqs a rejoin's replay could repeat (``since`` < seq <=
  the ack's seq, until the replay is past). It is handed over as the first
  message of the new numbering and reported as ``Gap(reset=True)`` through
  ``on_reset``; the room's epoch becomes unknown, so the next rejoin sends
  ``since`` alone and learns the new epoch from its ack.
* The ack's ``seq`` (the room's seq when we joined) becomes the baseline of a
  fresh join, so a reconnect before the first delivery still recovers what was
  published while we were away.
* The server never delivers our own publications to us, but history replay on
  a new connection cannot tell they were ours. The seqs of our acked publishes
  are remembered (``published``) and skipped on replay; ``last_seq`` moves over
  them as soon as everything before them was seen, so the set stays as small as
  the window of messages still in flight. (``publish_nowait`` gets no ack, so
  its messages can come back once after a reconnect.)
* A ``subscribed`` push (``server_joined``) says the server joined this connection
  to a room (``Conn.join``, docs/app-api.md), with the room's seq and epoch then:
  the room is tracked from that seq (``by_server``), its deliveries handed over
  under the rules above, and it is listed by ``subscribed()``. It belongs to the
  connection: it is not rejoined after a reconnect (the server decides again, e.g.
  in ``on_open``); its seq and epoch are kept (``former``), and when the server
  joins the next connection to it again, a ``subscribed`` whose seq is past the
  last one seen (or in another epoch, or behind it) is a ``Gap`` (``reset`` for
  the latter two): what was published meanwhile is not replayed. A room the
  application joined or is joining itself stays the application's (its join
  numbers it). An explicit ``join()`` makes a server-joined room the application's.
* An ``unsubscribed`` push (``server_left``) comes after the room's last delivery:
  the room is forgotten, unless the application's own join of it is in flight
  (sent after the server took us out: its ack makes the room the application's).
* A delivery of a room neither joined nor announced by ``subscribed`` (a server
  older than these pushes) is a server join too, tracked from that delivery.
  Deliveries of a room the application is leaving (``leave`` sent, not yet acked)
  are still in flight from before the leave: they are dropped (``unknown``), not
  mistaken for a server join.
* A join ack whose ``data.room`` names another room than the one asked for (a
  ``before_join`` hook moved the join, docs/app-api.md) means the connection is in
  that room: the join's state moves to it (merged into the room's state if it was
  already tracked), so its deliveries are handed over as the joined room's, it is
  listed by ``subscribed()``, and it is the room rejoined (with ``since`` and
  ``epoch``) after a reconnect. The room asked for is not tracked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsfan.client.events import Gap, Recovered
from wsfan.server.wire import Message, rejoin_outcome


class RoomState:
    __slots__ = ("last_seq", "joined", "held", "since", "own", "epoch", "replay", "by_server", "joining")

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.epoch: str | None = None  # the room's numbering, from the last join ack that carried one
        self.own: set[int] | None = None  # seqs of our own acked publishes not yet passed by last_seq
        self.joined = False  # a join was acked: the room is rejoined after a reconnect
        self.held: list[Message] | None = None  # deliveries held while a join with since is in flight
        self.since: int | None = None  # the since sent with the join in flight
        # After a join with since: (since, ack seq, ends at ack seq) bounds the seqs its replay
        # may repeat, which are duplicates, not a restarted room. Cleared once the replay is past.
        self.replay: tuple[int, int, bool] | None = None
        self.by_server = False  # the server joined this connection to it (subscribed, or a delivery)
        self.joining = False  # the application's join is in flight


class RoomTracker:
    __slots__ = ("rooms", "leaving", "duplicates", "unknown", "resets", "on_reset", "former")

    def __init__(self, on_reset: Callable[[Gap], None] | None = None) -> None:
        self.rooms: dict[str, RoomState] = {}
        self.leaving: set[str] = set()  # left by the application, the server's ack not in yet
        self.duplicates = 0
        self.unknown = 0
        self.resets = 0  # rooms seen starting over on a live connection
        self.on_reset = on_reset  # told of each, before its first message is handed over
        # Server-joined rooms of lost connections: (last seq seen, epoch), read when the server
        # joins a later connection to them again.
        self.former: dict[str, tuple[int | None, str | None]] = {}

    def begin_join(self, room: str, since: int | None, epoch: str | None = None) -> int | None:
        """Record a join about to be sent; returns the ``since`` to send with it (see ``epoch()``).

        An explicit ``since`` rewinds the room (the caller asked for a replay), and an
        explicit ``epoch`` says which numbering it counts in (one saved by the
        application); otherwise a room we already track resumes from its last seq.
        """
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = RoomState()
        if since is None:
            # A room only the server joined us to is the connection's: nothing of it to recover.
            since = state.last_seq if state.joined else None
        else:
            state.last_seq = since
            if epoch:
                state.epoch = epoch
        state.since = since
        state.held = [] if since is not None else None
        state.joining = True
        return since

    def end_join(self, room: str, data: Any) -> tuple[list[Message], Recovered | Gap | None]:
        """Apply a join ack: returns the held deliveries now due to the application, and what happened."""
        state = self.rooms.get(room)
        if state is None:  # left while the join was in flight
            return [], None
        held, since = state.held or [], state.since
        state.held = None
        state.since = None
        was_joined, state.joined = state.joined, True
        state.joining = False
        seq, recovered, epoch = _ack_fields(data)
        moved = _ack_room(data)
        if moved is not None and moved != room:  # a server hook put the connection in another room
            state = self._move(room, moved, state, was_joined)
            room = moved
        sent_epoch = state.epoch
        if epoch is not None:
            state.epoch = epoch
        event: Recovered | Gap | None = None
        state.replay = None
        if since is not None and seq is not None:
            recovered, reset = rejoin_outcome(since, sent_epoch, seq, recovered, epoch)
            if recovered:
                event = Recovered(room, since, seq)
            else:
                event = Gap(room, since, seq, reset)
                if reset:
                    # Nothing of the new numbering was seen: what the server replays after
                    # this ack (all the history of the new numbering) is news, and so are
                    # the live messages after it, so the baseline is 0, not the ack's seq.
                    state.last_seq = 0
                    state.own = None
            floor = 0 if reset else since
            if seq > floor:
                # The replay that follows may repeat what was held before the ack (it ends
                # at the ack's seq when nothing was held; otherwise past it, at a live one).
                state.replay = (floor, seq, not held)
        released = [m for m in held if self.accept(m)]
        if state.last_seq is None and seq is not None:
            state.last_seq = seq
        return released, event

    def _move(self, asked: str, actual: str, state: RoomState, was_joined: bool) -> RoomState:
        """The join of ``asked`` was acked for ``actual``: track the join under ``actual``.

        ``asked`` stays tracked only when it was joined before this join (the connection is
        still in it: an earlier join was not moved)."""
        if was_joined:
            state = RoomState()  # asked keeps its own numbering; actual starts from this ack
        else:
            del self.rooms[asked]
        self.leaving.discard(actual)  # the join came after that leave: actual's deliveries are ours
        known = self.rooms.get(actual)
        if known is None:
            state.joined = True
            self.rooms[actual] = state
            return state
        # Already tracked (joined, or joined by the server): its numbering and what it handed
        # over stand (a join of it still in flight keeps its own held deliveries).
        known.joined = True
        return known

    def abort_join(self, room: str) -> None:
        """The join failed or timed out: forget a room never acked, keep one joined before."""
        state = self.rooms.get(room)
        if state is None:
            return
        state.joining = False
        if not state.joined and not state.by_server:
            del self.rooms[room]
        else:
            state.held = None
            state.since = None

    def leave(self, room: str, sent: bool = True) -> None:
        """The application left ``room``; ``sent``: a ``leave`` went to the server (``left`` follows)."""
        self.rooms.pop(room, None)
        if sent:
            self.leaving.add(room)

    def left(self, room: str) -> None:
        """The server acked our ``leave``: a later delivery of ``room`` is a server join again."""
        self.leaving.discard(room)

    def server_joined(self, room: str, seq: int, epoch: str | None) -> Gap | None:
        """A ``subscribed`` push: the server joined us to ``room`` at ``seq`` (numbering ``epoch``).

        Returns a ``Gap`` when the server joined a lost connection to the room too and
        messages were published since the last one seen (``reset``: another epoch, or a seq
        behind it); None otherwise. A room of the application's own is left to its join.
        """
        self.leaving.discard(room)
        former = self.former.pop(room, None)
        state = self.rooms.get(room)
        if state is not None:  # ours (joined or joining), or already known: its numbering stands
            state.by_server = True
            if state.last_seq is None and state.held is None:
                state.last_seq = seq
            if state.epoch is None and epoch:
                state.epoch = epoch
            return None
        state = self.rooms[room] = RoomState()
        state.by_server = True
        state.last_seq = seq
        state.epoch = epoch or None
        if former is None or former[0] is None:
            return None
        last, old_epoch = former
        renumbered = bool(epoch and old_epoch and epoch != old_epoch)
        if seq == last and not renumbered:
            return None  # nothing was published while we were away
        return Gap(room, last, seq, renumbered or seq < last)

    def server_left(self, room: str) -> None:
        """An ``unsubscribed`` push: the server took us out of ``room``; nothing of it follows."""
        self.former.pop(room, None)
        state = self.rooms.get(room)
        if state is None:
            return
        if state.joining:  # our join, sent after the server's leave: its ack makes the room ours
            state.joined = False
            state.by_server = False
            return
        del self.rooms[room]

    def accept(self, msg: Message) -> bool:
        """Whether a delivery goes to the application now (hot path: one dict lookup, one compare)."""
        state = self.rooms.get(msg.room)
        if state is None:
            return self._server_joined(msg)
        held = state.held
        if held is not None:
            held.append(msg)
            return False
        last = state.last_seq
        seq = msg.seq
        if last is not None and seq <= last:
            replay = state.replay
            if replay is None or not replay[0] < seq <= replay[1]:
                return self._restarted(state, msg, last)
            self.duplicates += 1
            if seq == replay[1]:
                state.replay = None
            return False
        state.last_seq = seq
        replay = state.replay
        if replay is not None and (seq > replay[1] or (seq == replay[1] and replay[2])):
            state.replay = None  # the replay is past: from now on a seq going back is a restart
        own = state.own
        if own:
            if seq in own:  # our own publication, replayed after a reconnect
                own.discard(seq)
                _pass_own(state)
                return False
            _pass_own(state)
        return True

    def _server_joined(self, msg: Message) -> bool:
        """A delivery of a room we are not in: a server join (tracked from here), or in flight from before our leave."""
        room = msg.room
        if room in self.leaving:
            self.unknown += 1
            return False
        state = self.rooms[room] = RoomState()
        state.by_server = True
        state.last_seq = msg.seq
        return True

    def _restarted(self, state: RoomState, msg: Message, last: int) -> bool:
        """A live seq went back: the room started over. ``msg`` opens its new numbering."""
        self.resets += 1
        state.last_seq = msg.seq
        state.own = None
        state.replay = None
        state.epoch = None  # the new one is learnt from the next join ack (since alone until then)
        if self.on_reset is not None:
            self.on_reset(Gap(msg.room, last, msg.seq, True))
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

    def tracks(self, room: str) -> bool:
        """Whether ``room`` is joined (acked) and not left since."""
        state = self.rooms.get(room)
        return state is not None and state.joined

    def joined(self) -> list[str]:
        """Rooms to rejoin after a reconnect."""
        return [room for room, state in self.rooms.items() if state.joined]

    def subscribed(self) -> list[str]:
        """Rooms whose deliveries reach the application: joined, and the ones the server joined us to."""
        return [room for room, state in self.rooms.items() if state.joined or state.by_server]

    def connection_lost(self) -> None:
        """Joins in flight died with the connection: their held deliveries are dropped, not released.

        Dropping is safe because their seqs are above ``last_seq``, so the rejoin
        with ``since = last_seq`` replays them. Rooms never acked are forgotten
        (their ``join`` call fails with ``ConnectionClosed``), and so are the rooms
        the server had joined that connection to.
        """
        for room in [r for r, s in self.rooms.items() if not s.joined]:
            state = self.rooms.pop(room)  # joins in flight, and the rooms the server had joined us to
            if state.by_server:
                self.former[room] = (state.last_seq, state.epoch)
        self.leaving.clear()  # the new connection is in none of them
        for state in self.rooms.values():
            state.held = None
            state.since = None
            state.replay = None
            state.joining = False

    def last_seq(self, room: str) -> int | None:
        state = self.rooms.get(room)
        return None if state is None else state.last_seq

    def epoch(self, room: str) -> str | None:
        """The room's epoch from the last join ack (None if the server sends none): sent back with ``since``."""
        state = self.rooms.get(room)
        return None if state is None else state.epoch


def _pass_own(state: RoomState) -> None:
    """Advance ``last_seq`` over our own publications that directly follow it."""
    own, last = state.own, state.last_seq
    if own is None or last is None:
        return
    while last + 1 in own:
        last += 1
        own.discard(last)
    state.last_seq = last


def _ack_room(data: Any) -> str | None:
    """The join ack's ``room`` (the room actually joined), or None when it names none."""
    room = data.get("room") if isinstance(data, dict) else None
    return room if isinstance(room, str) and room else None


def _ack_fields(data: Any) -> tuple[int | None, bool, str | None]:
    """The join ack's ``seq``, ``recovered`` and ``epoch``, leniently (a field of the wrong type is absent)."""
    if isinstance(data, dict):
        seq = data.get("seq")
        epoch = data.get("epoch")
        return (
            seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            bool(data.get("recovered", True)),
            epoch if isinstance(epoch, str) and epoch else None,
        )
    return None, True, None
