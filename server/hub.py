"""Rooms, membership, requests and fan-out: the sans-I/O core of the server.

The hub never touches a socket. It talks to each connection through a ``Peer``
(write a session's queued frames in one go, close with a code), and asks the
event loop for nothing but "call ``flush`` soon". Tests drive it with fakes and
the micro benchmarks measure it alone.

Corking, as uWebSockets does it: every outbound frame is appended to its
session's queue, and the session is marked dirty once; at the end of the event
loop iteration ``flush`` hands each dirty session's whole queue to its peer,
which writes it with one call. A publish to N subscribers is one encode, one
frame build and N list appends; a burst of publishes costs each subscriber one
write, not one per message.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from wsfan.server.broker import (
    BroadcastPush,
    Broker,
    BrokerUnavailable,
    History,
    PresenceEntry,
    PresenceEvent,
    Publication,
)
from wsfan.server.broker.publication import sse_event
from wsfan.server.deflate import delivery_kind
from wsfan.server.heap import compacted, fresh
from wsfan.server.logs import fields, log_app_failure
from wsfan.server.namespaces import Namespace, Namespaces
from wsfan.server.protocol import (
    WIRE_ENCODINGS,
    Codec,
    DecodeFailure,
    Encoding,
    PayloadRefused,
    payload_problem,
)
from wsfan.server.ratelimit import TokenBucket
from wsfan.server.stats import Stats
from wsfan.server.wire import (
    UNKNOWN_EPOCH,
    Ack,
    CloseCode,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Inbound,
    Join,
    JoinData,
    Leave,
    LeaveData,
    Outbound,
    Ping,
    Pong,
    PresenceData,
    PresenceInfo,
    PresenceRequest,
    PresenceStatsData,
    PresenceStatsRequest,
    Publish,
    PublishData,
    SseGap,
    Subscribed,
    Unsubscribed,
    Welcome,
)

log = logging.getLogger("wsfan.hub")


class Peer(Protocol):
    """What the hub needs from a connection's transport."""

    def flush(self, session: Session) -> None:
        """Write ``session.out`` to the wire (one write) and empty it, or keep it while paused."""

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and disconnect."""


class StreamPeer(Peer, Protocol):
    """A receive-only stream's transport (Server-Sent Events, ``Hub.open_stream``)."""

    def refused(self, code: str, message: str) -> None:
        """Its join was refused with error ``code`` (``ErrorCode`` or an application's) and
        ``message``: tell the client and end the stream."""


class _Gone:
    """The peer of a closed session (``Hub.close``): the connection is gone, so there is nothing to
    flush or close and no stream to refuse."""

    __slots__ = ()

    def flush(self, session: Session) -> None:
        return None

    def close(self, code: int, reason: str) -> None:
        return None

    def refused(self, code: str, message: str) -> None:
        return None


GONE: StreamPeer = _Gone()

Handler = Callable[["Session", Any], None]
_NO_ROOMS: tuple[str, ...] = ()
# A session's rooms: a tuple while it is in at most this many (membership tests scan it), then a set.
_FEW_ROOMS = 8
_PLAIN_KINDS = int(max(Encoding))  # delivery kinds above this are compressed (server/deflate.py)
Authorizer = Callable[["Session", str, str], bool]
# What a gate (``wsfan.App``'s before_join/before_publish hooks) lets a request go on with:
# ``(room, payload)`` (payload None for a join or a presence query), or None: refused, and
# the gate has answered the client itself.
Verdict = tuple[str, bytes | None] | None
Gate = Callable[["Session", str, str, "bytes | None", "str | None"], "Verdict | Awaitable[Verdict]"]
_VERBS = {"join": "join", "publish": "publish to", "presence": "see who is in"}  # FORBIDDEN texts
# Longest a cluster join waits for the node's live stream to reach its history read (Hub._caught_up).
CATCHUP_S = 1.0
NO_CLOSE_FRAME = 1006  # RFC 6455 7.1.5: the connection closed with no close frame either way
# Session.bucket of a rate-limited session that has not sent anything yet (Hub.receive makes the bucket).
_FIRST_MESSAGE: Any = TokenBucket(1.0, 1.0)


class Session:
    """One connection's protocol state. Slots keep idle connections small."""

    __slots__ = (
        "peer",
        "conn_id",
        "user",
        "codec",
        "encoding",
        "kind",
        "rooms",
        "bucket",
        "out",
        "scheduled",
        "closed",
        "claims",
        "pending",
        "data",
        "close_code",
    )

    def __init__(self, peer: Peer, conn_id: str, user: str, codec: Codec, bucket: TokenBucket | None) -> None:
        self.peer = peer
        self.conn_id = conn_id
        self.user = user
        self.codec = codec
        self.encoding = codec.encoding
        # What fan-out hands this session: its encoding, or a compressed kind (server/deflate.py).
        self.kind: int = codec.encoding
        # Most idle connections never join: they share the empty tuple until the first join; a few
        # rooms are a tuple of the rooms' own name strings, more a set (Hub._add).
        self.rooms: tuple[str, ...] | set[str] = _NO_ROOMS
        self.bucket = bucket
        self.out: list[bytes] = []
        self.scheduled = False
        self.closed = False
        self.claims: Any = None
        # Set while an asynchronous request (cluster join, publish, presence query) is in
        # flight; None on a single node, where every request completes in its own call.
        self.pending: Pending | None = None
        # Application state (``wsfan.App``: what on_connect set) and the close code its
        # on_disconnect sees (1006 until a close frame is sent or received).
        self.data: Any = None
        self.close_code = NO_CLOSE_FRAME


class Pending:
    """A session's requests in flight and the ones waiting behind them (cluster mode only).

    One connection's requests take effect and are answered in the order sent. A request
    that must wait for the broker holds the session: later requests queue here (as bytes
    copies, since the read buffer is reused) and run when nothing is in flight. Publishes
    are the exception that keeps a publisher's throughput: while only publishes are in
    flight and nothing waits, another publish goes to the broker at once, which keeps
    their order (one FIFO per node) and answers them in order; whatever it would answer
    synchronously (a refusal) is deferred into the queue instead, behind the others.
    """

    __slots__ = ("barriers", "publishes", "queue", "deferring")

    def __init__(self) -> None:
        self.barriers = 0  # joins and presence queries in flight: everything waits for them
        self.publishes = 0  # publishes in flight
        self.queue: deque[Callable[[], None]] = deque()
        self.deferring = False  # replies sent now go to the queue (a pipelined publish's refusal)


class Room:
    """Local subscribers of one room, grouped by delivery kind so fan-out never checks it per subscriber.

    A kind is an encoding (JSON, MessagePack, SSE) or a compressed variant of one
    (``server/deflate.py``); each group gets one frame per publication.
    """

    __slots__ = ("name", "json", "msgpack", "sse", "groups", "recovering", "last", "catchup", "epoch")

    def __init__(self, name: str) -> None:
        self.name = name
        self.json: dict[Session, None] = {}
        self.msgpack: dict[Session, None] = {}
        self.sse: dict[Session, None] = {}
        # (kind, members) for every kind in use: the list fan-out walks. Compressed kinds are
        # appended when their first subscriber joins.
        self.groups: list[tuple[int, dict[Session, None]]] = [
            (Encoding.JSON, self.json),
            (Encoding.MSGPACK, self.msgpack),
            (Encoding.SSE, self.sse),
        ]
        # Sessions whose join is waiting for history from an asynchronous broker:
        # live publications are parked here so that replay comes first.
        self.recovering: dict[Session, list[Publication]] = {}
        # The seq of the last publication this node delivered (its live stream's position), and
        # joins waiting for that stream to reach the seq their history read returned (``_caught_up``).
        self.last = 0
        self.catchup: list[tuple[int, asyncio.Future[None]]] = []
        # The room's epoch as this node last heard it (a join's history read): the incarnation
        # its live deliveries belong to, named in their SSE ``id:``. A room lost and restarted
        # while it kept subscribers here (Redis lost it) keeps the old one until the next join.
        self.epoch = ""

    def __len__(self) -> int:
        return sum(len(members) for _, members in self.groups)

    def __bool__(self) -> bool:
        # Asked at every leave (is the room empty now?): a loop that stops at the first member,
        # not __len__'s generator over every group (Python's truth test falls back to __len__).
        for _, members in self.groups:
            if members:
                return True
        return False

    def members(self, kind: int) -> dict[Session, None]:
        if kind == Encoding.JSON:
            return self.json
        if kind == Encoding.MSGPACK:
            return self.msgpack
        if kind == Encoding.SSE:
            return self.sse
        for k, members in self.groups:
            if k == kind:
                return members
        members = {}
        self.groups.append((kind, members))
        return members


class Hub:
    def __init__(
        self,
        broker: Broker,
        *,
        node_id: str,
        schedule: Callable[[Callable[[], None]], Any],
        heartbeat_ms: int = 30000,
        rate_limit: float = 100.0,
        rate_burst: float = 200.0,
        rate_abuse_strikes: int = 50,
        max_rooms_per_connection: int = 0,
        codecs: dict[Encoding, Codec] | None = None,
        cork_delay: float = 0.0,
        schedule_later: Callable[[float, Callable[[], None]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        namespaces: Namespaces | None = None,
    ) -> None:
        self.broker = broker
        self.namespaces = namespaces or getattr(broker, "namespaces", None) or Namespaces(Namespace())
        self.node_id = node_id
        self.heartbeat_ms = heartbeat_ms
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst
        self.rate_abuse_strikes = rate_abuse_strikes
        # Rooms a connection may join itself (0: no limit; --max-rooms-per-connection, default 100).
        self.max_rooms_per_connection = max_rooms_per_connection
        self.stats = Stats()
        self.sessions: dict[str, Session] = {}
        self.rooms: dict[str, Room] = {}
        # The token's rooms claim (server/app.py): the first check of a join, publish or presence query.
        self.authorize: Authorizer | None = None
        # The application's hooks (``wsfan.App``): after ``authorize``; may refuse, rewrite or await.
        self.gate: Gate | None = None
        self._schedule = schedule
        if cork_delay and schedule_later is None:
            raise ValueError("cork_delay needs schedule_later")
        self.cork_delay = cork_delay
        self._schedule_later = schedule_later
        self._clock = clock
        self._last_flush = 0.0
        self._dirty: list[Session] = []
        self._replies: list[Session] = []
        self._flush_pending = False
        self._ids = itertools.count(1)
        self._extra_types: tuple[type[Inbound], ...] = ()
        # Application lifecycle hooks (wsfan.App): once per connection, never per message.
        self.on_open: Callable[[Session], None] | None = None
        self.on_close: Callable[[Session], None] | None = None
        self._handlers: dict[type, Handler] = {
            Join: self._on_join,
            Leave: self._on_leave,
            Publish: self._on_publish,
            Echo: self._on_echo,
            Ping: self._on_ping,
            PresenceRequest: self._on_presence,
            PresenceStatsRequest: self._on_presence_stats,
        }
        self.codecs = codecs or {e: Codec(e) for e in WIRE_ENCODINGS}
        self._tasks: set[asyncio.Task[None]] = set()
        self.flush_observers: list[Callable[[list[Publication]], None]] = []
        self._flushed: list[Publication] = []
        broker.bind(self.deliver)
        broker.bind_events(self.deliver_event)
        hooks = getattr(broker, "compact_hooks", None)  # every broker of server/broker/ (heap.Compaction)
        if hooks is not None:
            hooks.append(self.compact)
        movers = getattr(broker, "compact_movers", None)
        if movers is not None:
            movers.append(self.relocate)

    # ------------------------------------------------------------ extension points

    def register(self, message_type: type[Inbound], handler: Handler) -> None:
        """Add an application message type (a tagged ``Inbound`` Struct) with its handler.

        Decoders are rebuilt once here, so the built-in types' hot path is untouched.
        """
        self._extra_types += (message_type,)
        self._handlers[message_type] = handler
        self.codecs = {e: Codec(e, self._extra_types) for e in WIRE_ENCODINGS}

    def compact(self) -> None:
        """Rebuild the room and session tables when they are mostly empty (``heap.compacted``).

        Dicts keep the table of their largest size: without this, a node that once had
        200,000 rooms keeps a 7.7 MB table for the handful it has now. Called by the
        broker after it forgot many rooms (``heap.Compaction``); O(rooms + sessions), never per request.
        """
        self.rooms = compacted(self.rooms)
        self.sessions = compacted(self.sessions)

    def relocate(self, replaced: list[object]) -> None:
        """``heap.relocate``'s mover for what traffic rewrites in the hub: counters, rate-limit buckets, queues.

        Each of these was last made while the burst ran (a counter's ``+= 1``, a bucket made at a
        connection's first message, the flush's fresh lists): new objects now, O(sessions).
        """
        self.stats.relocate(replaced)
        for s in self.sessions.values():
            bucket = s.bucket
            if type(bucket) is TokenBucket and bucket is not _FIRST_MESSAGE:
                replaced.append(bucket)
                s.bucket = bucket.moved(replaced)
        last = self._last_flush
        self._last_flush = fresh(last)
        replaced.append(last)
        for name in ("_dirty", "_replies", "_flushed"):
            if not getattr(self, name):
                replaced.append(getattr(self, name))
                setattr(self, name, [])

    # ------------------------------------------------------------ connection lifecycle

    def new_id(self) -> str:
        """A connection id unique on this node: ``<node id>-<hex counter>``."""
        return f"{self.node_id}-{next(self._ids):x}"

    def welcome(self, encoding: Encoding, conn_id: str, user: str | None = None) -> bytes:
        """The welcome frame for ``conn_id`` in ``encoding`` (``user`` None: anonymous, the user is the id).

        The transport sends it in the same write as the 101 answer (server/handshake.py
        ``SwitchingProtocols``) and then opens the session with ``open(..., conn_id=conn_id)``.
        """
        msg = Welcome(conn=conn_id, user=user or conn_id, heartbeat=self.heartbeat_ms, node=self.node_id)
        return self.codecs[encoding].frame(msg)

    def open(
        self,
        peer: Peer,
        encoding: Encoding,
        user: str | None = None,
        claims: Any = None,
        deflate_bits: int = 0,
        data: Any = None,
        conn_id: str | None = None,
    ) -> Session:
        """A new WebSocket session; ``deflate_bits`` is the permessage-deflate window it negotiated (0: none).

        ``data`` is the application's state for it (what ``App.on_connect`` returned). Without
        ``conn_id`` a new id is drawn and the welcome is queued; with one (from ``new_id``), its
        welcome (``welcome``) has already gone out. The ``on_open`` hook runs after the welcome.
        """
        welcomed = conn_id is not None
        if conn_id is None:
            conn_id = f"{self.node_id}-{next(self._ids):x}"
        # The token bucket is made on the first message (receive): an idle connection holds none,
        # and a bucket made later starts as full as one made now would be by then (burst).
        bucket = _FIRST_MESSAGE if self.rate_limit > 0 else None
        s = Session(peer, conn_id, user or conn_id, self.codecs[encoding], bucket)
        if deflate_bits:
            s.kind = delivery_kind(encoding, deflate_bits)
        s.claims = claims
        s.data = data
        self.sessions[conn_id] = s
        self.stats.connections_opened += 1
        if not welcomed:
            self.reply(s, Welcome(conn=conn_id, user=s.user, heartbeat=self.heartbeat_ms, node=self.node_id))
        if self.on_open is not None:
            self.on_open(s)
        return s

    def open_stream(self, peer: StreamPeer, user: str | None = None, claims: Any = None) -> Session:
        """A receive-only subscriber (Server-Sent Events): no welcome, no replies, deliveries as SSE events."""
        conn_id = f"{self.node_id}-{next(self._ids):x}"
        s = Session(peer, conn_id, user or conn_id, self.codecs[Encoding.JSON], None)
        s.encoding = Encoding.SSE
        s.kind = Encoding.SSE
        s.claims = claims
        self.sessions[conn_id] = s
        self.stats.connections_opened += 1
        return s

    def request_session(self, peer: StreamPeer, user: str | None = None, claims: Any = None) -> Session:
        """A session for one HTTP request that reads a room on a user's behalf (``GET /presence``,
        ``GET /presence_stats`` with a token, or on a server without auth): the ``conn`` the
        application's hooks see, with a fresh id and the token's user. Not a connection: not in
        ``sessions``, not counted, sent nothing; its refusals go to ``peer.refused`` (as an SSE
        stream's). ``end_request`` ends it."""
        conn_id = self.new_id()
        s = Session(peer, conn_id, user or conn_id, self.codecs[Encoding.JSON], None)
        s.encoding = Encoding.SSE
        s.kind = Encoding.SSE
        s.claims = claims
        return s

    async def read_gate(self, s: Session, room: str) -> str | None:
        """The rule of a ``presence`` / ``presence_stats`` message for a request session
        (``request_session``; the token's ``rooms`` claim already checked on ``room``): the
        application's gate (before_join hooks), then the claim again on a room a hook chose.
        The room to read, or None once refused (told to ``s.peer.refused``: code, message)."""
        if self.gate is None:
            return room
        chosen: list[str] = []
        try:
            verdict = self.gate(s, "presence", room, None, None)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:  # the gate answers its hooks' failures; this would be a bug of its own
            log.exception("presence gate failed", extra=fields(conn=s.conn_id, user=s.user, room=room))
            self.error(s, None, ErrorCode.INTERNAL, "internal error")
            return None
        self._go(s, "presence", room, None, verdict, lambda name, _: chosen.append(name))
        return chosen[0] if chosen else None

    def end_request(self, s: Session) -> None:
        """End a request session: out of any room a hook joined it to, its peer dropped."""
        s.closed = True
        for name in list(s.rooms):
            self._remove(s, name)
        s.out = []
        s.peer = GONE

    def join(
        self,
        s: Session,
        room: str,
        since: int | None = None,
        request_id: str | None = None,
        trusted: bool = False,
        epoch: str | None = None,
    ) -> None:
        """Subscribe with optional recovery; used by the ``join`` message, SSE streams and applications.

        ``trusted`` (the server's own decision, ``Conn.join``) skips ``authorize`` and the gate,
        and tells the connection: ``{"type":"subscribed","room","seq","epoch"}`` when it was not in
        the room yet, queued before any delivery of the room to it (PROTOCOL.md, server-side
        subscriptions). ``epoch``: the room incarnation ``since`` counts in (a join's ``epoch``,
        an SSE ``Last-Event-ID``'s), None when unknown (docs/protocol-choices.md, "Epochs").
        """
        m = Join(room=room, since=since, epoch=epoch, id=request_id)
        if trusted:
            self._join(s, m, server=True)
        else:
            self._on_join(s, m)

    def leave(self, s: Session, room: str, reason: str = "") -> None:
        """Take ``s`` out of ``room`` on the server's decision (``Conn.leave``, ``POST /unsubscribe``).

        A no-op when it is not in it; otherwise it gets ``{"type":"unsubscribed","room","reason"?}``,
        queued after the room's last delivery to it (nothing of the room is queued once it left).
        An SSE stream (one room's) gets it as ``event: unsubscribed`` and then ends, ``event: close``
        with ``data: 1000`` (PROTOCOL.md, SSE): open but in no room it would only hold an fd.
        """
        if room not in s.rooms:
            return
        self._remove(s, room)
        self.reply(s, Unsubscribed(room=room, reason=reason))
        if s.encoding is Encoding.SSE:
            s.peer.close(CloseCode.NORMAL, "unsubscribed")

    def close(self, s: Session) -> None:
        """Forget a session whose connection is gone; it leaves every room."""
        if s.closed:
            return
        s.closed = True
        s.out = []
        if s.pending is not None:
            s.pending.queue.clear()  # requests waiting behind a broker call die with the connection
        self.sessions.pop(s.conn_id, None)
        self.stats.connections_closed += 1
        if self.on_close is not None and s.encoding is not Encoding.SSE:
            self.on_close(s)  # still in its rooms, so the application can announce the departure
        for name in list(s.rooms):
            self._remove(s, name)
        # The connection holds its session and the session its peer: a reference cycle that only the
        # cyclic collector would free (a connection's transport, buffers and futures with it), and a
        # storm of closes made it collect often. Nothing uses a closed session's peer (every caller
        # checks ``closed``), so it gets one that does nothing and refcounting frees both at once.
        s.peer = GONE

    # ------------------------------------------------------------ inbound

    def receive(self, s: Session, data: bytes | memoryview, opcode: int) -> None:
        """Handle one complete message. ``data`` may alias a reusable read buffer: copy what outlives the call."""
        stats = self.stats
        stats.messages_in += 1
        stats.bytes_in += len(data)
        codec = s.codec
        # The bucket is charged before decoding so that a flood of garbage is limited too.
        bucket = s.bucket
        if bucket is _FIRST_MESSAGE:
            bucket = s.bucket = TokenBucket(self.rate_limit, self.rate_burst)
        if bucket is not None and not bucket.take():
            p = s.pending
            if p is None:
                self._refuse(s, bucket, codec.request_id(data))
                return
            p.deferring = True  # counted now, answered in its place behind the requests in flight
            try:
                self._refuse(s, bucket, codec.request_id(data))
            finally:
                p.deferring = False
            return
        if s.pending is not None:
            self._receive_behind(s, s.pending, data, opcode)
            return
        self._handle(s, data, opcode)

    def _handle(self, s: Session, data: bytes | memoryview, opcode: int) -> None:
        codec = s.codec
        if opcode != codec.opcode:
            kind = "text (JSON)" if codec.encoding is Encoding.JSON else "binary (MessagePack)"
            other = self.codecs[Encoding.MSGPACK if codec.encoding is Encoding.JSON else Encoding.JSON]
            self.error(
                s, other.request_id(data), ErrorCode.INVALID_MESSAGE, f"this connection speaks {kind} frames"
            )
            return
        try:
            msg = codec.decode(data)
        except DecodeFailure as f:
            self.error(s, f.request_id, f.code, f.message)
            return
        try:
            self._handlers[type(msg)](s, msg)
        except Exception:
            log_app_failure(
                log, "handler_failed", "handler for %s failed", type(msg).__name__,
                exc_info=True, where=type(msg).__name__, conn=s.conn_id, user=s.user,
            )  # fmt: skip
            self.error(s, msg.id, ErrorCode.INTERNAL, "internal error")

    def _receive_behind(self, s: Session, p: Pending, data: bytes | memoryview, opcode: int) -> None:
        """A message that arrived while an earlier request of ``s`` is in flight (docs: Cluster)."""
        if not p.barriers and not p.queue and opcode == s.codec.opcode:
            try:
                msg = s.codec.decode(data)
            except DecodeFailure:
                msg = None
            if type(msg) is Publish:
                p.deferring = True
                try:
                    self._dispatch(s, msg)
                finally:
                    p.deferring = False
                return
        p.queue.append(functools.partial(self._handle, s, bytes(data), opcode))

    def _dispatch(self, s: Session, msg: Inbound) -> None:
        try:
            self._handlers[type(msg)](s, msg)
        except Exception:
            log_app_failure(
                log, "handler_failed", "handler for %s failed", type(msg).__name__,
                exc_info=True, where=type(msg).__name__, conn=s.conn_id, user=s.user,
            )  # fmt: skip
            self.error(s, msg.id, ErrorCode.INTERNAL, "internal error")

    def _hold(self, s: Session, barrier: bool) -> None:
        """An asynchronous request of ``s`` is now in flight: later ones wait for it."""
        p = s.pending
        if p is None:
            p = s.pending = Pending()
        if barrier:
            p.barriers += 1
        else:
            p.publishes += 1

    def _release(self, s: Session, barrier: bool) -> None:
        """An asynchronous request of ``s`` completed (answered); run what waited, in order."""
        p = s.pending
        if p is None:
            return
        if barrier:
            p.barriers -= 1
        else:
            p.publishes -= 1
        if p.barriers or p.publishes:
            return
        s.pending = None
        queue = p.queue
        while queue and not s.closed:
            queue.popleft()()
            again = s.pending
            if again is not None:  # that request went to the broker: the rest wait for it
                again.queue.extend(queue)
                return

    def _refuse(self, s: Session, bucket: TokenBucket, request_id: str | None) -> None:
        self.stats.rate_limited += 1
        if bucket.strikes > self.rate_abuse_strikes:
            self.stats.rate_limit_closes += 1
            log.info(
                "closing %s: still over the rate limit after %d refusals", s.conn_id, bucket.strikes - 1,
                extra=fields(conn=s.conn_id, user=s.user, code=4029, event="rate_limit_abuse"),
            )  # fmt: skip
            s.peer.close(4029, "rate limit abuse")
            return
        self.error(
            s, request_id, ErrorCode.RATE_LIMITED, f"over {self.rate_limit:g} messages/s; message dropped"
        )

    def _allowed(self, s: Session, action: str, room: str) -> bool:
        auth = self.authorize
        return auth is None or auth(s, action, room)

    def _on_join(self, s: Session, m: Join) -> None:
        room = m.room
        if not self._allowed(s, "join", room):
            self.error(s, m.id, ErrorCode.FORBIDDEN, f"not allowed to join {room!r}")
            return
        if self.gate is not None:
            self._gated(s, "join", room, None, m.id, functools.partial(self._join_as, s, m))
            return
        self._join(s, m)

    def _join_as(self, s: Session, m: Join, room: str, payload: bytes | None) -> None:
        self._join(s, m if room == m.room else Join(room=room, since=m.since, epoch=m.epoch, id=m.id))

    def _gated(
        self,
        s: Session,
        action: str,
        room: str,
        payload: bytes | None,
        request_id: str | None,
        go: Callable[[str, bytes | None], None],
    ) -> None:
        """Run the application's gate on a request that passed ``authorize``, then ``go(room, payload)``.

        The gate answers its refusals itself. A gate that awaits holds the connection
        (``Pending``): its later requests wait, so they still take effect in the order sent.
        A room the gate changed is checked against ``authorize`` again: a hook cannot take a
        connection into a room its token does not allow.
        """
        assert self.gate is not None
        verdict = self.gate(s, action, room, payload, request_id)
        if verdict is None or isinstance(verdict, tuple):
            self._go(s, action, room, request_id, verdict, go)
        else:
            self._spawn_held(s, self._gated_async(s, action, room, request_id, verdict, go))

    async def _gated_async(
        self,
        s: Session,
        action: str,
        room: str,
        request_id: str | None,
        pending: Awaitable[Verdict],
        go: Callable[[str, bytes | None], None],
    ) -> None:
        try:
            verdict = await pending
        except Exception:  # the gate answers its hooks' failures; this would be a bug of its own
            log.exception("%s gate failed", action, extra=fields(conn=s.conn_id, user=s.user, room=room))
            self.error(s, request_id, ErrorCode.INTERNAL, "internal error")
            return
        if not s.closed:
            self._go(s, action, room, request_id, verdict, go)

    def _go(
        self,
        s: Session,
        action: str,
        asked: str,
        request_id: str | None,
        verdict: Verdict,
        go: Callable[[str, bytes | None], None],
    ) -> None:
        if verdict is None:
            return
        room, payload = verdict
        if room != asked and not self._allowed(s, action, room):
            log.warning(
                "an application hook moved a %s of %r to %r, which the token does not allow; refused",
                action, asked, room, extra=fields(conn=s.conn_id, user=s.user, room=room),
            )  # fmt: skip
            self.error(s, request_id, ErrorCode.FORBIDDEN, f"not allowed to {_VERBS[action]} {asked!r}")
            return
        go(room, payload)

    def _join(self, s: Session, m: Join, server: bool = False) -> None:
        """Join ``s`` to ``m.room``; ``server``: the server's decision, told with a ``subscribed`` push.

        A connection's own join of one more room than ``max_rooms_per_connection`` is refused
        with ``LIMIT_EXCEEDED`` (PROTOCOL.md; Centrifugo's channel limit per connection): each
        room costs a slot of the node's ``--max-rooms``, a broker subscription and fan-out
        tables, and nothing else bounded how many one connection could hold. Its joins run one
        at a time (``Pending``), so ``s.rooms`` is its count. The server's own joins are not refused.
        """
        room = m.room
        limit = self.max_rooms_per_connection
        if limit and not server and len(s.rooms) >= limit and room not in s.rooms:
            self.error(
                s, m.id, ErrorCode.LIMIT_EXCEEDED,
                f"in {len(s.rooms)} rooms, the most a connection may join; leave one first",
            )  # fmt: skip
            return
        ns = self.namespaces.of(room)
        try:
            # Without allow_history a since is not honoured: recovered false, nothing replayed.
            hist = self.broker.history(room, m.since if ns.allow_history else None, m.epoch)
        except BrokerUnavailable as exc:  # the in-process broker's room limit
            self.error(s, m.id, ErrorCode.UNAVAILABLE, exc.public)
            return
        if isinstance(hist, History):
            first = room not in s.rooms
            self._add(s, room)
            self._joined(s, m.id, room, hist, server and first, m)
            if first and (ns.presence or ns.join_leave):
                self._presence_join(s, room, ns)
        else:
            self._spawn_held(s, self._join_async(s, m.id, room, hist, server, m))

    async def _join_async(
        self,
        s: Session,
        request_id: str | None,
        name: str,
        pending: Awaitable[History],
        server: bool = False,
        asked: Join | None = None,
    ) -> None:
        room = self._room(name)
        parked: list[Publication] = room.recovering.setdefault(s, [])
        ns = self.namespaces.of(name)
        announced = False
        try:
            hist = await pending
            await self._caught_up(room, hist)
            if (ns.presence or ns.join_leave) and name not in s.rooms and not s.closed:
                # Before the ack, live messages still parked: a client that has its ack is in
                # presence, and the others are being told (in order with the room's messages).
                announced = True
                done = self._presence_join(s, name, ns)
                if done is not None:
                    await done
        except BrokerUnavailable as exc:
            room.recovering.pop(s, None)
            self._forget_if_unused(room)
            self.error(s, request_id, ErrorCode.UNAVAILABLE, exc.public)
            return
        except Exception:  # a bug or a broker reply we cannot read: answered all the same
            log.exception("join of %r failed", name, extra=fields(conn=s.conn_id, user=s.user, room=name))
            room.recovering.pop(s, None)
            self._forget_if_unused(room)
            self.error(s, request_id, ErrorCode.INTERNAL, "internal error")
            return
        finally:
            room.recovering.pop(s, None)
        if s.closed:
            if announced:
                self._presence_leave(s, name)
            self._forget_if_unused(room)
            return
        first = name not in s.rooms
        self._add(s, name)
        self._joined(s, request_id, name, hist, server and first, asked)
        last = hist.publications[-1].seq if hist.publications else hist.seq
        for pub in parked:
            if pub.seq > last and pub.origin != s.conn_id:
                self._replay(s, pub, hist.epoch)

    async def _caught_up(self, room: Room, hist: History) -> None:
        """Wait until this node's live stream of ``room`` has passed ``hist.seq`` (at most ``CATCHUP_S``).

        A broker's history read and its live stream are two channels: publications up to
        ``hist.seq`` may still be on their way to this node when the read returns. Joined now,
        the connection would get them live after an ack (or ``subscribed``) that says the room
        is at ``hist.seq``, and a client would take a seq going back for a restarted room. They
        are parked meanwhile like any live publication during the join, and replayed only when
        above what history covered. No wait when the stream is there already (a quiet room), nor
        when this node has delivered nothing of the room since it subscribed (``room.last`` 0:
        its position is unknown, and waiting would hold every first join of a quiet room; what
        was published between the broker confirming the subscription and the history read can
        still arrive after the join then: a window of one broker round trip, on a room's first
        join on a node). A stream that does not get there (the room renumbered) is not waited
        for longer than ``CATCHUP_S``.
        """
        if room.last == 0 or room.last >= hist.seq or not room.recovering:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (hist.seq, fut)
        room.catchup.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), CATCHUP_S)
        except TimeoutError:
            log.debug(
                "room %r: live stream at %d, history at %d; joined anyway", room.name, room.last, hist.seq
            )
        finally:
            if entry in room.catchup:
                room.catchup.remove(entry)

    def _forget_if_unused(self, room: Room) -> None:
        """A join that failed or whose connection left created the room: do not keep it subscribed."""
        if not room and not room.recovering and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            unsub = self.broker.unsubscribe(room.name)
            if inspect.isawaitable(unsub):
                self._spawn(_await(unsub))

    def _joined(
        self,
        s: Session,
        request_id: str | None,
        room: str,
        hist: History,
        push: bool = False,
        asked: Join | None = None,
    ) -> None:
        # The ack (or a server join's ``subscribed``) goes first, so a client learns ``recovered``
        # and the seq it counts from before the replayed and live messages, which are all queued
        # after it on the same session queue.
        r = self.rooms.get(room)
        if r is not None:
            r.epoch = hist.epoch  # the newest this node heard: SSE ids of live deliveries carry it
        if s.encoding is Encoding.SSE:
            # An SSE stream's "ack": a comment naming the room the join took effect in (a
            # before_join hook may have moved it), sent once it did, before any delivery.
            self.send(s, b": joined %s\n\n" % room.encode())
            if asked is not None and asked.since is not None and not hist.recovered:
                # Its Last-Event-ID (or since) could not be resumed from: a WebSocket ack's
                # ``recovered: false``, as an event before the replay of what is kept.
                known = asked.epoch and asked.epoch != UNKNOWN_EPOCH
                reset = bool(known and asked.epoch != hist.epoch) or asked.since > hist.seq
                gap = SseGap(room=room, since=asked.since, seq=hist.seq, epoch=hist.epoch, reset=reset)
                self.send(s, sse_event(b"gap", s.codec.encode(gap)))
        if push:
            self.reply(s, Subscribed(room=room, seq=hist.seq, epoch=hist.epoch))
        if request_id is not None:
            self.ack(
                s, request_id, JoinData(room=room, seq=hist.seq, recovered=hist.recovered, epoch=hist.epoch)
            )
        for pub in hist.publications:
            self._replay(s, pub, hist.epoch)

    def _replay(self, s: Session, pub: Publication, epoch: str = "") -> None:
        """Queue one publication from history (or parked during a join) for one session.

        ``epoch``: the room's, as the history read that returned it (or the join it was parked
        for) said; an SSE frame's ``id:`` carries it.
        """
        if not pub.epoch:
            pub.epoch = epoch
        try:
            frame = pub.frame(s.kind)
        except Exception:  # noqa: BLE001 - as in deliver: one bad publication must not fail the join
            log.exception("room %r seq %d cannot be replayed as %s", pub.room, pub.seq, s.encoding.name)
            return
        self.send(s, frame)

    def _on_leave(self, s: Session, m: Leave) -> None:
        # Leaving a room one is not in is a no-op that still acks, as in Socket.IO.
        if m.room in s.rooms:
            self._remove(s, m.room)
        if m.id is not None:
            self.ack(s, m.id, LeaveData(room=m.room))

    def _on_publish(self, s: Session, m: Publish) -> None:
        room = m.room
        if not self._allowed(s, "publish", room):
            self.error(s, m.id, ErrorCode.FORBIDDEN, f"not allowed to publish to {room!r}")
            return
        if self.gate is not None:
            go = functools.partial(self._publish_checked, s, m.id)
            self._gated(s, "publish", room, bytes(m.payload), m.id, go)
            return
        self._publish_checked(s, m.id, room, m.payload)

    def _publish_checked(self, s: Session, request_id: str | None, room: str, payload: Any) -> None:
        """A client's publish past the permission checks: namespace rule, membership, then the broker."""
        if self.namespaces.publish_restricted and not self.namespaces.of(room).allow_publish:
            self.error(
                s, request_id, ErrorCode.FORBIDDEN, f"clients may not publish to {room!r}: its namespace "
                "takes publications from the server API (POST /publish) only",
            )  # fmt: skip
            return
        if room not in s.rooms:
            self.error(s, request_id, ErrorCode.NOT_JOINED, f"join {room!r} before publishing to it")
            return
        self.publish(
            room, s.user, bytes(payload), s.encoding, origin=s.conn_id, reply_to=s, request_id=request_id
        )

    def publish(
        self,
        room: str,
        sender: str,
        payload: bytes,
        encoding: int,
        *,
        origin: str = "",
        reply_to: Session | None = None,
        request_id: str | None = None,
    ) -> Publication | Awaitable[Publication] | None:
        """Publish into a room from a client or from the backend (admin publish).

        The payload must be deliverable in every encoding (``payload_problem``) before it
        gets a seq: a refusal is ``INVALID_MESSAGE`` to ``reply_to``, or ``PayloadRefused``
        raised to a backend caller. None means the publish was refused and ``reply_to`` has
        been told why.
        """
        problem = payload_problem(payload, encoding)
        if problem is not None:
            if reply_to is None:
                raise PayloadRefused(problem)
            self.error(reply_to, request_id, ErrorCode.INVALID_MESSAGE, problem)
            return None
        self.stats.publishes += 1
        try:
            result = self.broker.publish(room, sender, payload, encoding, origin)
        except BrokerUnavailable as exc:
            if reply_to is None:
                raise  # the backend caller (admin publish) turns it into its own error
            self.error(reply_to, request_id, ErrorCode.UNAVAILABLE, exc.public)
            return None
        if isinstance(result, Publication):
            if reply_to is not None and request_id is not None:
                self.ack(reply_to, request_id, PublishData(room=room, seq=result.seq))
            return result
        if reply_to is not None:
            if isinstance(result, asyncio.Future):
                # A callback on the broker's future costs far less than a task per publish.
                self._hold(reply_to, barrier=False)
                result.add_done_callback(lambda f: self._published(reply_to, request_id, room, f))
            else:
                self._spawn_held(reply_to, self._publish_async(reply_to, request_id, room, result), False)
        return result

    def _published(
        self, s: Session, request_id: str | None, room: str, done: asyncio.Future[Publication]
    ) -> None:
        try:
            self._answer_publish(s, request_id, room, done)
        finally:
            self._release(s, barrier=False)

    def _answer_publish(
        self, s: Session, request_id: str | None, room: str, done: asyncio.Future[Publication]
    ) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is None:
            if request_id is not None:
                self.ack(s, request_id, PublishData(room=room, seq=done.result().seq))
        elif isinstance(exc, BrokerUnavailable):
            self.error(s, request_id, ErrorCode.UNAVAILABLE, exc.public)
        else:
            log.error(
                "publish to %r failed",
                room,
                exc_info=exc,
                extra=fields(conn=s.conn_id, user=s.user, room=room),
            )
            self.error(s, request_id, ErrorCode.INTERNAL, "internal error")

    async def _publish_async(
        self, s: Session, request_id: str | None, room: str, pending: Awaitable[Publication]
    ) -> None:
        try:
            pub = await pending
        except BrokerUnavailable as exc:
            self.error(s, request_id, ErrorCode.UNAVAILABLE, exc.public)
            return
        if request_id is not None:
            self.ack(s, request_id, PublishData(room=room, seq=pub.seq))

    # ------------------------------------------------------------ presence

    def _presence_join(self, s: Session, room: str, ns: Namespace) -> Awaitable[None] | None:
        """Put a first-time joiner in presence and announce it; the broker's awaitable, if any, to wait for."""
        if s.encoding is Encoding.SSE:
            return None  # receive-only streams are not in presence and are not announced
        entry = PresenceEntry(s.conn_id, s.user, int(time.time() * 1000))
        done = self.broker.join_presence(room, entry, ns.presence, ns.join_leave)
        return done if inspect.isawaitable(done) else None

    def _presence_leave(self, s: Session, room: str) -> None:
        ns = self.namespaces.of(room)
        if (ns.presence or ns.join_leave) and s.encoding is not Encoding.SSE:
            entry = PresenceEntry(s.conn_id, s.user, 0)
            self._broker_call(self.broker.leave_presence(room, entry, ns.presence, ns.join_leave))

    def _broker_call(self, result: Any) -> None:
        if inspect.isawaitable(result):
            self._spawn(_await(result))

    def _on_presence(self, s: Session, m: PresenceRequest) -> None:
        self._presence_query(s, m.id, m.room, stats=False)

    def _on_presence_stats(self, s: Session, m: PresenceStatsRequest) -> None:
        self._presence_query(s, m.id, m.room, stats=True)

    def _presence_query(self, s: Session, request_id: str | None, room: str, stats: bool) -> None:
        """``presence`` and ``presence_stats`` always reply (like ``echo``): the ack is their effect."""
        if not self._allowed(s, "presence", room):
            self.error(s, request_id, ErrorCode.FORBIDDEN, f"not allowed to see who is in {room!r}")
            return
        if self.gate is not None:
            go = functools.partial(self._presence_answer, s, request_id, stats)
            self._gated(s, "presence", room, None, request_id, go)
            return
        self._presence_answer(s, request_id, stats, room)

    def _presence_answer(
        self, s: Session, request_id: str | None, stats: bool, room: str, _: bytes | None = None
    ) -> None:
        if not self.namespaces.of(room).presence:
            self.error(
                s, request_id, ErrorCode.NOT_AVAILABLE, f"presence is off for {room!r} (its namespace)"
            )
            return
        try:
            result = self.broker.presence_stats(room) if stats else self.broker.presence(room)
        except BrokerUnavailable as exc:
            self.error(s, request_id, ErrorCode.UNAVAILABLE, exc.public)
            return
        if inspect.isawaitable(result):
            self._spawn_held(s, self._presence_reply_async(s, request_id, room, result))
        else:
            self.ack(s, request_id, presence_data(room, result))

    async def _presence_reply_async(
        self, s: Session, request_id: str | None, room: str, pending: Any
    ) -> None:
        try:
            result = await pending
        except BrokerUnavailable as exc:
            self.error(s, request_id, ErrorCode.UNAVAILABLE, exc.public)
            return
        if not s.closed:
            self.ack(s, request_id, presence_data(room, result))

    def _on_echo(self, s: Session, m: Echo) -> None:
        # Encoded right away: m.payload still points into the frame being handled.
        self.reply(s, EchoReply(requestId=m.id, payload=m.payload))

    def _on_ping(self, s: Session, m: Ping) -> None:
        self.reply(s, Pong(requestId=m.id, ts=m.ts))

    # ------------------------------------------------------------ membership

    def _room(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
            self.stats.rooms_created += 1
            sub = self.broker.subscribe(name)
            if inspect.isawaitable(sub):
                self._spawn(_await(sub))
        return room

    def _add(self, s: Session, name: str) -> None:
        room = self._room(name)
        room.members(s.kind)[s] = None
        rooms = s.rooms
        if name in rooms:
            return
        # The room's own name object, not the one just decoded: one string per room, not per member.
        name = room.name
        if type(rooms) is tuple:
            # Up to _FEW_ROOMS rooms a tuple (56 B for one) instead of a set (216 B even for one).
            if len(rooms) < _FEW_ROOMS:
                s.rooms = (*rooms, name)
                return
            rooms = s.rooms = set(rooms)
        rooms.add(name)  # type: ignore[union-attr]

    def _remove(self, s: Session, name: str) -> None:
        rooms = s.rooms
        if name in rooms:
            if type(rooms) is tuple:
                s.rooms = tuple(r for r in rooms if r != name)
            else:
                rooms.discard(name)  # type: ignore[union-attr]
                if len(rooms) <= _FEW_ROOMS:
                    # Sets never shrink: a connection back to a few rooms goes back to a tuple, so a
                    # table sized during a burst of joins does not outlive it.
                    s.rooms = tuple(rooms)
            self._presence_leave(s, name)
        room = self.rooms.get(name)
        if room is None:
            return
        room.members(s.kind).pop(s, None)
        if not room and not room.recovering:
            del self.rooms[name]
            unsub = self.broker.unsubscribe(name)
            if inspect.isawaitable(unsub):
                self._spawn(_await(unsub))

    # ------------------------------------------------------------ outbound

    def deliver(self, pub: Publication) -> None:
        """Fan a publication out to this node's subscribers, the publishing connection excluded."""
        room = self.rooms.get(pub.room)
        if room is None:
            return
        origin = self.sessions.get(pub.origin) if pub.origin else None
        dirty = self._dirty
        n = 0
        size = 0
        if room.sse and not pub.epoch:
            pub.epoch = room.epoch  # for the SSE frame's ``id: <epoch>:<seq>``
        for kind, members in room.groups:
            if not members or (len(members) == 1 and origin in members):
                continue
            try:
                frame = pub.frame(kind)
            except Exception:  # noqa: BLE001 - e.g. an envelope from a node that did not check its payload
                log.exception("room %r seq %d cannot be delivered as kind %#x", pub.room, pub.seq, kind)
                continue
            # The loop of ``_fan``, inlined: a call per group measured ~10 % slower (bench/micro).
            count = 0
            for s in members:
                if s is origin:
                    continue
                s.out.append(frame)
                if not s.scheduled:
                    s.scheduled = True
                    dirty.append(s)
                count += 1
            n += count
            size += count * len(frame)
            if kind > _PLAIN_KINDS:
                self.stats.compressed_deliveries += count
        if room.recovering:
            for parked in room.recovering.values():
                parked.append(pub)
        room.last = pub.seq
        if room.catchup:
            _release_catchup(room, pub.seq)
        stats = self.stats
        stats.deliveries += n
        stats.bytes_out += size
        if n:
            self._flushed.append(pub)
            if not self._flush_pending:
                self._request_flush()

    def broadcast(self, push: BroadcastPush) -> int:
        """Queue a room-less push for every WebSocket connection of this node; how many got it.

        The fan-out of ``deliver`` over ``sessions`` instead of a room: one frame per delivery
        kind in use (``push.frame`` builds and shares it), appended to each connection's queue
        and written at the next flush, so the slow-consumer and pause rules of the transport
        apply as to any delivery. SSE streams get it as ``event: broadcast`` (no ``id:``: their
        last event ID stays the room's seq). Reached through the control room
        (``server/control.py``), once per node per broadcast.
        """
        dirty = self._dirty
        n = 0
        size = 0
        frames: dict[int, bytes] = {}
        last = -1
        frame = b""
        for s in self.sessions.values():
            kind = s.kind
            if kind != last:  # connections of one kind often follow each other: no lookup then
                last = kind
                got = frames.get(kind)
                if got is None:
                    try:
                        got = push.frame(kind)
                    except Exception:  # noqa: BLE001 - as in deliver: one bad kind must not stop the rest
                        log.exception("broadcast cannot be delivered as kind %#x", kind)
                        got = b""
                    frames[kind] = got
                frame = got
            if not frame:
                continue
            s.out.append(frame)
            if not s.scheduled:
                s.scheduled = True
                dirty.append(s)
            n += 1
            size += len(frame)
        stats = self.stats
        stats.broadcasts += n
        stats.bytes_out += size
        if n and not self._flush_pending:
            self._request_flush()
        return n

    def deliver_event(self, event: PresenceEvent) -> None:
        """Fan a ``joined``/``left`` event out to this node's subscribers, its subject excluded.

        Built once per encoding like a delivery; SSE streams get it as ``event: joined|left``
        (no ``id:``), events are small: never compressed.
        """
        room = self.rooms.get(event.room)
        if room is None:
            return
        subject = self.sessions.get(event.conn)
        n = 0
        for kind, members in room.groups:
            if not members or (len(members) == 1 and subject in members):
                continue
            n += self._fan(members, event.frame(kind if kind == Encoding.SSE else kind & 0xFF), subject)
        self.stats.presence_events += n
        if n and not self._flush_pending:
            self._request_flush()

    def _fan(self, members: dict[Session, None], frame: bytes, skip: Session | None) -> int:
        """Queue one shared frame for every member but ``skip`` (a write each at the next flush); how many."""
        dirty = self._dirty
        count = 0
        for s in members:
            if s is skip:
                continue
            s.out.append(frame)
            if not s.scheduled:
                s.scheduled = True
                dirty.append(s)
            count += 1
        return count

    def reply(self, s: Session, msg: Outbound) -> None:
        """Queue a message to one session (welcome, ack, error, echo, pong) in its encoding.

        A Server-Sent Events stream (a session opened with ``open_stream``, its ``encoding``
        ``Encoding.SSE``) sends nothing back: of these it gets only the server's pushes about its
        own subscription (``subscribed``, ``unsubscribed``) as named events (``sse_event``); no
        welcome, ack, error, echo, pong or application message. The kind is the session's; the
        hub never looks into a frame to tell.
        """
        if s.encoding is Encoding.SSE:
            if isinstance(msg, (Subscribed, Unsubscribed)):
                name = b"subscribed" if isinstance(msg, Subscribed) else b"unsubscribed"
                self.send(s, sse_event(name, s.codec.encode(msg)))
            return
        self.send(s, s.codec.frame(msg))

    def send(self, s: Session, frame: bytes) -> None:
        """Queue one complete frame, already built for the session's delivery kind (replies, replay)."""
        p = s.pending
        if p is not None and p.deferring:
            p.queue.append(functools.partial(self.send, s, frame))
            return
        s.out.append(frame)
        if not s.scheduled:
            s.scheduled = True
            # Replies are written before fan-out: a publisher gets its ack (and sends its next
            # publish) while the server is still writing to subscribers, so the next loop
            # iteration finds more publishes to batch into each subscriber's write.
            self._replies.append(s)
            if not self._flush_pending:
                self._request_flush()

    def ack(self, s: Session, request_id: str | None, data: Any) -> None:
        self.stats.replies += 1
        self.reply(s, Ack(requestId=request_id, success=True, data=data))

    def error(self, s: Session, request_id: str | None, code: ErrorCode, message: str) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        if s.encoding is Encoding.SSE:
            # A stream's only request is its join: refused (a hook, the broker, the room limit),
            # the stream would stay open and silent, so it ends, telling why (``StreamPeer``).
            s.peer.refused(code, message)  # type: ignore[attr-defined]
            return
        self.reply(s, Error(requestId=request_id, success=False, code=code, message=message))

    def _request_flush(self) -> None:
        self._flush_pending = True
        delay = self.cork_delay
        if delay:
            # Adaptive corking: right away after a quiet spell, otherwise no sooner than
            # ``cork_delay`` after the previous flush, so a busy room's subscribers get
            # fewer, larger writes (Nagle-like, but bounded and off by default).
            wait = self._last_flush + delay - self._clock()
            if wait > 0:
                self._schedule_later(wait, self.flush)
                return
        self._schedule(self.flush)

    def flush(self) -> None:
        """Hand every dirty session's queue to its peer: one write per connection per loop iteration."""
        self._flush_pending = False
        if self.cork_delay:
            self._last_flush = self._clock()
        replies = self._replies
        if replies:
            self._replies = []
            for s in replies:
                s.scheduled = False
                if not s.closed:
                    s.peer.flush(s)
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for s in dirty:
                s.scheduled = False
                if not s.closed:
                    s.peer.flush(s)
        flushed = self._flushed
        if flushed:
            self._flushed = []
            for observe in self.flush_observers:
                observe(flushed)

    # ------------------------------------------------------------ tasks

    def _spawn_held(self, s: Session, coro: Awaitable[None], barrier: bool = True) -> None:
        """Run a request's asynchronous part; ``s``'s later requests wait for it (``Pending``)."""
        self._hold(s, barrier)
        self._spawn(self._held(s, coro, barrier))

    async def _held(self, s: Session, coro: Awaitable[None], barrier: bool) -> None:
        try:
            await coro
        finally:
            self._release(s, barrier)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _release_catchup(room: Room, seq: int) -> None:
    """The room's live stream reached ``seq``: wake the joins waiting for it (``Hub._caught_up``)."""
    waiting = room.catchup
    room.catchup = [entry for entry in waiting if entry[0] > seq]
    for target, fut in waiting:
        if target <= seq and not fut.done():
            fut.set_result(None)


def presence_data(room: str, result: Any) -> PresenceData | PresenceStatsData:
    """The ack data of a presence query: a list of entries, or a ``(connections, users)`` pair."""
    if isinstance(result, tuple):
        return PresenceStatsData(room=room, connections=result[0], users=result[1])
    return PresenceData(room=room, presence=[PresenceInfo(e.conn, e.user, e.joined_at) for e in result])


async def _await(aw: Awaitable[Any]) -> None:
    try:
        await aw
    except Exception:
        log.exception("broker call failed")
