"""Lifecycle events the client reports through its ``on_event`` callback.

One callback receiving small typed records (rather than one callback per kind)
keeps the constructor short and lets an application log everything with a
single ``print``, while ``match``/``isinstance`` picks out the kinds it acts on.
Events are reported synchronously from the event loop; a callback returning an
awaitable has it scheduled as a task, so a slow handler never stalls frames.

Order (the same in the JS client, client/js/wsfan.js): ``Connected`` is the first event of
every connection. A reconnect reports ``Disconnected``, then ``Reconnecting`` before each
attempt, then ``Connected(reconnect=True)`` once every room is rejoined, then, in the order
they happened, the events of that rejoin and of the new connection so far (``Recovered`` or
``Gap`` per room, ``RejoinFailed``, ``Subscribed``, ``Joined``...). An attempt that fails
before that reports what it held when it fails, without a ``Connected``.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsfan.server.wire import JoinedEvent, LeftEvent, Subscribed, Unsubscribed, Welcome

# The server's join/leave events (``server/wire.py``), under the names the application sees.
Joined = JoinedEvent
Left = LeftEvent
# The server joined this connection to a room / took it out of one (``Conn.join``/``Conn.leave``,
# ``POST /unsubscribe``): ``Subscribed(room, seq, epoch)``, ``Unsubscribed(room, reason)``.


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection is open and (on a reconnect) every room has been rejoined; the first event of each connection.

    The ``Recovered``/``Gap``/``RejoinFailed`` events of the rejoin follow it (module docstring).
    """

    welcome: Welcome
    reconnect: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended. ``code`` is the close code received (1006 when none was: the socket died)."""

    code: int
    reason: str
    will_reconnect: bool


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """About to sleep ``delay`` seconds before reconnect ``attempt`` (1-based); ``error`` is why the last try failed."""

    attempt: int
    delay: float
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Recovered:
    """A room was rejoined and the server replayed everything after ``since``: nothing was lost."""

    room: str
    since: int
    seq: int


@dataclass(frozen=True, slots=True)
class Gap:
    """A room was rejoined but the server could not replay everything after ``since``: messages were lost.

    ``reset`` is true when the room itself was lost and renumbered from 1 (a single
    node restarted, Redis lost or evicted the room): the join ack carried another
    epoch than the one sent, or the server's seq went *backwards* (``seq < since``).
    The client then continues in the new numbering: the history the server has of
    it (seq 1..``seq``) is delivered, then live messages, each once.
    Without ``reset`` history no longer reached back to ``since``; what it still
    had is delivered.

    A room can also start over while the client stays connected (its node lost
    Redis and got it back empty): then the first delivery whose seq is not above
    the last one seen (``since``) is reported as ``Gap(reset=True)`` with that
    delivery's ``seq``, just before it is handed over.
    """

    room: str
    since: int
    seq: int
    reset: bool


@dataclass(frozen=True, slots=True)
class RejoinFailed:
    """A room could not be rejoined after a reconnect and was dropped; its message stream raises ``error``.

    Only for refusals that will not change (e.g. ``FORBIDDEN`` with a new token);
    transient ones (``UNAVAILABLE``, ``RATE_LIMITED``, ``INTERNAL``) are retried.
    """

    room: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class ServerError:
    """An error reply to a fire-and-forget message (no ``id``), e.g. RATE_LIMITED on ``publish_nowait``."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Overflow:
    """A message buffer dropped its oldest message; reported once per burst (until a read reports it).

    ``room``: the room of the dropped message (None for the buffer of room-less pushes,
    ``pushes`` True); ``dropped``: how many that buffer dropped since the client started.
    One event per room at the first drop of its burst (client.inbox).
    """

    room: str | None
    dropped: int
    pushes: bool = False


Event = (
    Connected
    | Disconnected
    | Reconnecting
    | Recovered
    | Gap
    | RejoinFailed
    | ServerError
    | Overflow
    | Joined
    | Left
    | Subscribed
    | Unsubscribed
)
"""``Joined``/``Left`` are the server's join/leave events (``server/wire.py``), handed over as they come;
``Subscribed``/``Unsubscribed`` its server-side joins and leaves of this connection (docs/app-api.md)."""
