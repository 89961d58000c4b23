"""The wire format of PROTOCOL.md v1, written once: every message, error code and close code.

Everything here is a ``msgspec.Struct``, a constant, or one of the few pure rules
over them (a room name, a seq in text, how a rejoin's ack reads), and the module
imports nothing but ``msgspec`` and the standard library, so that every side of the
protocol imports it: the server (``server/protocol.py`` builds its codecs and
frames on it), the asyncio client (``client/``), the Locust users
(``loadtest/``, a gevent world without asyncio) and the benchmarks (``bench/``).

Messages in each direction form a tagged union on ``type``; one reusable
decoder turns a frame's bytes straight into a typed object, never a dict.
Payloads are ``msgspec.Raw``: the server never parses or re-encodes what a user
published (PROTOCOL.md, "Payloads").

The last section holds *views*: structs that read only part of a message on a
hot path (a client delivery whose payload is decoded in the same pass, the load
generator's flat reply, the benchmark's seq counter). Each is tested to read
what the full schema writes (``tests/test_wire.py``), so the two cannot drift.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Final

from msgspec import Meta, Raw, Struct, StructMeta, field

# ``\Z``, not ``$``: msgspec applies patterns with ``re.search``, and ``$`` also matches
# before a trailing newline, so ``"room\n"`` would pass (issue 11, docs/protocol-choices.md).
ROOM_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,128}\Z"
RoomName = Annotated[str, Meta(pattern=ROOM_PATTERN)]
_ROOM_RE: Final = re.compile(ROOM_PATTERN)


def valid_room(name: str) -> bool:
    """Whether ``name`` is a room name on every surface (WebSocket, SSE, admin HTTP).

    A room is 1-128 characters of ``A-Z a-z 0-9 _ . : -`` and nothing else: no
    trailing newline, no other whitespace, no non-ASCII letters or digits.
    """
    return _ROOM_RE.match(name) is not None


# The one sentence every surface answers for a name that is not a room (WebSocket INVALID_MESSAGE,
# HTTP 400, the application API's ValueError).
ROOM_RULE: Final = "room must be 1-128 characters of A-Z a-z 0-9 _ . : -"


def room_problem(name: object) -> str | None:
    """Why ``name`` is not a room name (:data:`ROOM_RULE`, quoting the name), or None when it is one.

    For callers that take a name from code rather than from a decoded message (the application
    API), so anything may come: a non-string is refused with its type.
    """
    if not isinstance(name, str):
        return f"{ROOM_RULE}; got {type(name).__name__} {name!r:.60}"
    if _ROOM_RE.match(name) is None:
        return f"{ROOM_RULE}; got {name!r:.160}"
    return None


SEQ_MAX: Final = 2**63 - 1  # a Redis integer; no room gets further
# A seq on the wire is an integer in 0..2^63-1: msgspec refuses bool, float (even 1.0)
# and string in both encodings, so only a JSON integer or a MessagePack int is one.
Seq = Annotated[int, Meta(ge=0, le=SEQ_MAX)]
_SEQ_TEXT: Final = re.compile(r"[0-9]{1,19}\Z")


def parse_seq(text: str) -> int | None:
    """A seq written as text (``?since=``, ``Last-Event-ID``), or None when it is not one.

    Only ASCII digits make a number on the wire: ``str.isdigit`` and ``int`` also accept
    ``²``, ``٣`` or full-width digits, and ``int`` takes ``_``, signs and whitespace too.
    At most 2^63-1, the largest seq a broker can hold.
    """
    if _SEQ_TEXT.match(text) is None:
        return None
    value = int(text)
    return value if value <= SEQ_MAX else None


# Extension to v1 (docs/protocol-choices.md, "Epochs"): names a room's numbering.
Epoch = Annotated[str, Meta(max_length=64)]
# An epoch no room has (brokers make theirs of hex digits): a since counted in an unknown
# incarnation, never recovered (an SSE Last-Event-ID without an epoch: http._event_id).
UNKNOWN_EPOCH: Final = "?"

MSGPACK_SUBPROTOCOL: Final = "msgpack"
"""``Sec-WebSocket-Protocol`` value that selects MessagePack (binary frames); JSON (text frames) otherwise."""


class ErrorCode(enum.StrEnum):
    """``code`` of an ``error`` reply (PROTOCOL.md, "Errors")."""

    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    FORBIDDEN = "FORBIDDEN"
    NOT_JOINED = "NOT_JOINED"
    NOT_AVAILABLE = "NOT_AVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends (RFC 6455 7.4.1; 4000-4999 are ours, PROTOCOL.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_UTF8 = 1007
    INVALID_PAYLOAD = 1007  # RFC 6455's name for 1007: also invalid permessage-deflate data (an alias)
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # only as an SSE stream's closing `event: close` data (its join got UNAVAILABLE)
    HEARTBEAT_TIMEOUT = 4000
    TOKEN_EXPIRED = 4001
    DISCONNECTED = 4003  # the server API's POST /disconnect (its default code)
    SLOW_CONSUMER = 4008
    RATE_LIMIT_ABUSE = 4029


# ---------------------------------------------------------------- client -> server


class _DeclaredTag(StructMeta):
    """msgspec's Struct metaclass, keeping whether a class was declared with ``tag=`` itself.

    Under ``tag_field`` msgspec gives a subclass without ``tag=`` its class name as its tag, and a
    subclass of a tagged class inherits its parent's: either way a wire ``type`` nobody chose.
    The class's own ``tag=`` argument is kept (``declared_tag``) so that ``App.message`` can
    refuse such a type by name (docs/app-api.md, "Message types and handlers"). Class creation
    only: encoding and decoding are msgspec's as before.
    """

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> Any:
        cls = super().__new__(mcls, name, bases, namespace, **kwargs)
        tag = kwargs.get("tag")
        cls.__wsfan_declared_tag__ = tag not in (None, False)
        return cls


def declared_tag(cls: type) -> bool:
    """Whether ``cls`` (an ``Inbound`` subclass) was declared with its own ``tag=``: a string, a
    callable, or ``True`` (msgspec: the class name, asked for explicitly)."""
    return bool(cls.__dict__.get("__wsfan_declared_tag__", False))


class Inbound(Struct, tag_field="type", kw_only=True, omit_defaults=True, metaclass=_DeclaredTag):
    """Fields every client message may carry; unknown fields are ignored for forward compatibility.

    ``omit_defaults``: a client encoding one leaves absent fields out of the wire
    instead of sending ``null`` (the server reads both the same way).
    """

    id: str | None = None
    ts: int | float | None = None


class Join(Inbound, tag="join"):
    room: RoomName
    since: Seq | None = None
    # The epoch from an earlier join ack, so that a room that was lost and renumbered
    # since is not reported recovered (docs/protocol-choices.md, "Epochs").
    epoch: Epoch | None = None


class Leave(Inbound, tag="leave"):
    room: RoomName


class Publish(Inbound, tag="publish"):
    room: RoomName
    payload: Raw


class PresenceRequest(Inbound, tag="presence"):
    room: RoomName


class PresenceStatsRequest(Inbound, tag="presence_stats"):
    room: RoomName


class Echo(Inbound, tag="echo"):
    payload: Raw


class Ping(Inbound, tag="ping"):
    pass


BUILTIN_TYPES: Final[tuple[type[Inbound], ...]] = (
    Join,
    Leave,
    Publish,
    Echo,
    Ping,
    PresenceRequest,
    PresenceStatsRequest,
)


# ---------------------------------------------------------------- server -> client


class Outbound(Struct, tag_field="type", omit_defaults=True):
    pass


class Welcome(Outbound, tag="welcome"):
    """Sent once when the connection opens; ``heartbeat`` in milliseconds (0: the server sends no pings)."""

    conn: str
    user: str
    heartbeat: int
    node: str


class Delivery(Outbound, tag="message", kw_only=True):
    room: str
    seq: int
    sender: str = field(name="from")
    payload: Raw


class JoinedEvent(Outbound, tag="joined", kw_only=True, frozen=True):
    """Another connection joined the room (namespaces with join_leave); not numbered, not in history.

    The Python client hands it to ``on_event`` as is (``wsfan.client.Joined``).
    """

    room: str
    user: str
    conn: str


class LeftEvent(Outbound, tag="left", kw_only=True, frozen=True):
    """Another connection left the room (leave, disconnect, or its node died); not numbered, not in history.

    The Python client hands it to ``on_event`` as is (``wsfan.client.Left``).
    """

    room: str
    user: str
    conn: str


class BroadcastDelivery(Outbound, tag="broadcast", kw_only=True):
    """A room-less push to every connection (``App.broadcast``, ``POST /broadcast`` without rooms).

    ``{"type":"broadcast","payload":<value>}``: no room, no ``seq``, no ``from``; not in any
    history and never replayed (docs/protocol-choices.md, "Broadcast to every connection").
    """

    payload: Raw


class Subscribed(Outbound, tag="subscribed", kw_only=True, frozen=True):
    """The server joined this connection to ``room`` (``Conn.join``): sent to the connection itself.

    ``{"type":"subscribed","room","seq","epoch"?}``: ``seq`` is the room's seq at the join (the
    first delivery that follows is ``seq + 1``), ``epoch`` its numbering (as in a join ack). Sent
    before the room's first delivery to this connection, and only when the connection was not in
    the room already. Not numbered, not in history. The Python client hands it to ``on_event``
    (``wsfan.client.Subscribed``).
    """

    room: str
    seq: int
    epoch: str = ""


class Unsubscribed(Outbound, tag="unsubscribed", kw_only=True, frozen=True):
    """The server took this connection out of ``room`` (``Conn.leave``, ``POST /unsubscribe``).

    ``{"type":"unsubscribed","room","reason"?}``: after the room's last delivery to this
    connection; ``reason`` is the application's text, absent when it gave none. Only when the
    connection was in the room. The Python client hands it to ``on_event``
    (``wsfan.client.Unsubscribed``).
    """

    room: str
    reason: str = ""


class SseGap(Outbound, tag="gap", kw_only=True, frozen=True):
    """An SSE stream's ``event: gap`` (SSE only: not in ``SERVER_TYPES``): its ``Last-Event-ID``
    (or ``?since=``) could not be resumed from, a WebSocket join ack's ``recovered: false``.

    ``{"type":"gap","room","since","seq","epoch","reset"}``: ``since`` the seq asked for, ``seq``
    and ``epoch`` the room's now; ``reset`` true when the room itself was lost and renumbered
    (the id's epoch is not the room's, or ``since`` is past its seq), false when history no
    longer reaches back to ``since`` or the id named no epoch (``UNKNOWN_EPOCH``). What history
    keeps of the room follows (PROTOCOL.md, SSE).
    """

    room: str
    since: int
    seq: int
    epoch: str
    reset: bool


# ``success`` has no default on purpose: omit_defaults would otherwise drop it from the wire.
class Ack(Outbound, tag="ack", kw_only=True):
    requestId: str | None = None  # noqa: N815 - wire name
    success: bool
    data: Any = None


class Error(Outbound, tag="error", kw_only=True):
    requestId: str | None = None  # noqa: N815
    success: bool
    code: str
    message: str


class EchoReply(Outbound, tag="echo", kw_only=True):
    requestId: str | None = None  # noqa: N815
    payload: Raw


class Pong(Outbound, tag="pong", kw_only=True):
    requestId: str | None = None  # noqa: N815
    ts: int | float | None = None


class JoinData(Struct, omit_defaults=True):
    """``data`` of a join ack: the room's seq now, whether everything after ``since`` follows, its epoch."""

    room: str
    seq: int
    recovered: bool
    epoch: str = ""  # the room's numbering; a client sends it back with since when it rejoins


class LeaveData(Struct):
    room: str


class PresenceInfo(Struct):
    conn: str
    user: str
    joined_at: int  # unix time in ms


class PresenceData(Struct):
    room: str
    presence: list[PresenceInfo]


class PresenceStatsData(Struct):
    room: str
    connections: int
    users: int


class PublishData(Struct):
    room: str
    seq: int


SERVER_TYPES: Final[tuple[type[Outbound], ...]] = (
    Welcome,
    Delivery,
    BroadcastDelivery,
    JoinedEvent,
    LeftEvent,
    Subscribed,
    Unsubscribed,
    Ack,
    Error,
    EchoReply,
    Pong,
)


# ---------------------------------------------------------------- reading a rejoin's ack


def rejoin_outcome(
    since: int, sent_epoch: str | None, seq: int, recovered: bool, epoch: str | None
) -> tuple[bool, bool]:
    """How a client reads the ack of a join it sent with ``since``: ``(recovered, reset)``.

    ``sent_epoch`` is the epoch sent with ``since`` (None: none known); ``seq``,
    ``recovered`` and ``epoch`` are the ack's (``epoch`` None when the server sends
    none). Recovered: everything after ``since`` follows, in the same numbering.
    Reset: the room was lost and renumbered (docs/protocol-choices.md, "Epochs"):
    the ack names another epoch than the one sent, even if its seq has passed
    ``since`` again, or, from a server without epochs, it is not recovered and its
    seq is below ``since``. Both Python clients use it (``client/rooms.py``,
    ``loadtest/users.py``); ``tests/vectors/numbering.json`` pins it for both languages.
    """
    renumbered = epoch is not None and sent_epoch is not None and epoch != sent_epoch
    if recovered and not renumbered:
        return True, False
    return False, renumbered or seq < since


# ---------------------------------------------------------------- views for hot paths


class Probe(Struct):
    """A message that failed the schema: only its ``type`` and ``id``, to answer it (server, cold path)."""

    type: Any = None
    id: Any = None


class Message(Delivery, tag="message", kw_only=True):
    """A ``Delivery`` as the client hands it to the application, payload decoded in the same pass.

    ``received_at`` is not on the wire: the client sets it to ``time.perf_counter()``
    when the frame was read, so benchmarks measure publish-to-delivery latency
    without the time the message waited in the client's buffer.
    """

    payload: Any = None
    received_at: float = 0.0


class RawMessage(Message, tag="message", kw_only=True):
    """A ``Message`` whose payload was left encoded (``raw_payloads=True``): decode only what you need."""

    payload: Raw = Raw(b"")


class Broadcast(BroadcastDelivery, tag="broadcast", kw_only=True):
    """A ``BroadcastDelivery`` as the client hands it to the application, payload decoded.

    ``received_at`` is not on the wire: ``time.perf_counter()`` when the frame was read.
    """

    payload: Any = None
    received_at: float = 0.0


class RawBroadcast(Broadcast, tag="broadcast", kw_only=True):
    """A ``Broadcast`` whose payload was left encoded (``raw_payloads=True``)."""

    payload: Raw = Raw(b"")


class ReplyData(Struct):
    """``data`` of a join or publish ack (``JoinData``, ``PublishData``), every field optional."""

    room: str | None = None
    seq: int | None = None
    recovered: bool | None = None
    epoch: str | None = None


class FlatMessage(Struct):
    """Every server message flattened into one struct (the load generator's decoder; unknown fields ignored)."""

    type: str
    requestId: str | None = None  # noqa: N815 - wire name
    success: bool | None = None
    code: str | None = None
    message: str | None = None
    data: ReplyData | None = None
    room: str | None = None
    seq: int | None = None
    from_: str | None = field(default=None, name="from")
    payload: Raw = Raw()
    epoch: str | None = None  # subscribed
    reason: str | None = None  # unsubscribed
    conn: str | None = None
    user: str | None = None
    heartbeat: int | None = None
    node: str | None = None
    ts: float | None = None
    id: str | None = None  # the raw /echo endpoint echoes the client's own envelope, which carries "id"


class AckSeq(Struct):
    """``data`` of a join or publish ack, only its ``seq``."""

    seq: int = 0


class Head(Struct):
    """The least of a server message that lets a benchmark count it: type, seq, request id, error, ack seq."""

    type: str = ""
    seq: int = 0
    requestId: str | None = None  # noqa: N815 - wire name
    data: AckSeq | None = None
    code: str | None = None
    message: str | None = None
