"""Locust users for the wsfan WebSocket protocol.

:class:`WebSocketUser` owns one connection and one receive greenlet. Every
measurement becomes a Locust request event (``request_type="WS"``), so it is
in Locust's stats, charts, CSV and HTML report:

=====================  ======================================================  =========================
name                   response time                                           failure when
=====================  ======================================================  =========================
``connect``            TCP + upgrade handshake                                 ``HTTP <status>``, network error
``join`` / ``rejoin``  join -> ack round trip (rejoin: after a reconnect)      (errors are ``error:<CODE>``)
``publish``            publish -> ack round trip                               (errors are ``error:<CODE>``)
``echo`` / ``ping``    echo / app-level ping round trip                        (errors are ``error:<CODE>``)
``delivery``           publish -> receive, from the publisher's timestamp      --
``joined`` / ``left``  another user's join / leave sent -> its event received  --
                       (--churn-interval; same Locust process only, others
                       count in ``joined (untimed)``)
``presence_stats``     presence_stats -> ack round trip (--presence-namespace) (errors are ``error:<CODE>``)
``delivery:replayed``  same, for history replayed after a rejoin (as old as    --
                       the outage, so kept out of the live ``delivery`` row)
``heartbeat``          interval since the previous server ping frame           --
``reconnect``          connection lost -> connected and every room rejoined    never reconnected
``recovered``          rejoin sent -> last missed message replayed;            history no longer reached
                       size column = messages recovered                        back (``recovered:false``)
``error:<CODE>``       request -> error reply                                  always
``close:<code>``       connection lifetime                                     always (server closed us)
``gap``                --                                                      a room seq was skipped
``timeout:<name>``     --                                                      no reply within --request-timeout
=====================  ======================================================  =========================

Storm-caused reconnections are named ``storm<N>:reconnect`` / ``storm<N>:recovered``
so that each storm gets its own row; its max is the time until everybody was back.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import weakref
from typing import Any

import gevent
import msgspec
from gevent.event import Event
from locust import User, tag, task
from locust.env import Environment
from locust.stats import StatsError

from wsfan.loadtest import wire
from wsfan.loadtest.hdr import LATENCIES
from wsfan.loadtest.opts import Settings, settings
from wsfan.loadtest.report import COUNTERS
from wsfan.loadtest.wsclient import (
    ABNORMAL_CLOSE,
    OP_BINARY,
    OP_PING,
    OP_TEXT,
    ConnectionClosed,
    HandshakeError,
    WSConnection,
)
from wsfan.server.wire import (
    MSGPACK_SUBPROTOCOL,
    Echo,
    FlatMessage,
    Inbound,
    Join,
    Leave,
    Ping,
    PresenceStatsRequest,
    Publish,
    ReplyData,
    rejoin_outcome,
)

logger = logging.getLogger("loadtest")

REQUEST_TYPE = "WS"
#: A missing seq is reported only if it has not shown up within this many seconds
#: (in a cluster our own publish ack can arrive after a later delivery).
GAP_GRACE = 2.0

_index = itertools.count()
_chat_index = itertools.count()
#: (event type, room, conn) -> perf_counter when that join or leave was sent, for every user of
#: this process: the receivers of the joined/left event time it against it.
PRESENCE_SENT: dict[tuple[str, str, str], float] = {}


def is_request_latency(name: str) -> bool:
    """Whether a measurement is a request latency, and so belongs in Locust's Aggregated row.

    Heartbeat intervals, connection lifetimes (``close:<code>``) and the age of replayed
    history are measurements too (they keep their own rows and HDR histograms) but
    not latencies of anything the user asked for: averaged with echo round trips
    they would make the Aggregated row and Locust's charts meaningless.
    """
    return not (name == "heartbeat" or name == "delivery:replayed" or name.startswith("close:"))


def log_outside_aggregate(
    stats: Any, method: str, name: str, ms: float, length: int, error: str | None
) -> None:
    """Log into one stats row and the failures table, keeping the value out of Locust's ``total`` row.

    Locust's ``RequestStats.log_request`` updates the entry and ``total`` together;
    workers ship entries and the total separately, so skipping ``total`` here keeps
    the value out of the Aggregated row on the master too. A failure is still
    counted in ``total`` (a server close is a failure of the run), without a value.
    """
    entry = stats.get(name, method)
    entry.log(ms, length)
    if error is not None:
        entry.log_error(error)
        stats.total.log_error(error)  # a failure still counts in the Aggregated row; only its value stays out
        key = StatsError.create_key(method, name, error)
        failure = stats.errors.get(key)
        if failure is None:
            failure = stats.errors[key] = StatsError(method, name, error)
        failure.occurred()


#: Every live user of this process, for the storm trigger and cleanup.
LIVE: weakref.WeakSet[WebSocketUser] = weakref.WeakSet()


class _Pending:
    __slots__ = ("name", "t0", "room")

    def __init__(self, name: str, t0: float, room: str | None) -> None:
        self.name = name
        self.t0 = t0
        self.room = room


class _Recovery:
    """A rejoin with ``since``: count replayed messages until the window is complete."""

    __slots__ = ("since", "t0", "upto", "count", "prefix")

    def __init__(self, since: int, t0: float, prefix: str) -> None:
        self.since = since
        self.t0 = t0
        self.upto: int | None = None
        self.count = 0
        self.prefix = prefix


def _error_text(exc: BaseException) -> str:
    """Short, stable failure text (Locust groups failures by it, so no addresses or counters)."""
    if isinstance(exc, HandshakeError):
        return f"HTTP {exc.status}" if exc.status else f"handshake: {exc.reason}"
    if isinstance(exc, ValueError):  # bad or missing --host
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "ECONNREFUSED"
    if isinstance(exc, OSError) and exc.errno:
        import errno as _errno

        return _errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class WebSocketUser(User):
    """Base class: connect (with optional bearer token), receive loop, reconnect + rejoin, reporting.

    Subclasses set :attr:`rooms` (joined on every connect, with ``since`` after
    a reconnect) and :meth:`period` (seconds between task runs) and write tasks
    that call :meth:`request` / :meth:`send_message`.
    """

    abstract = True
    #: Path used instead of --ws-path (e.g. the raw echo endpoint).
    path: str | None = None
    #: Report seq gaps; off for publishers that publish without acks (they cannot know their own seqs).
    track_gaps: bool = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.settings: Settings = settings(environment)
        runner = environment.runner
        self.local_index = next(_index)
        worker = int(getattr(runner, "worker_index", 0) or 0)
        workers = max(1, self.settings.wsfan_workers)
        self.global_index = self.local_index * workers + worker
        self.ident = f"{self.settings.token_sub_prefix}-{worker}-{self.local_index}"
        self.rooms: list[str] = []
        self.conn: WSConnection | None = None
        self.codec = wire.Codec(None)
        self.welcome: FlatMessage | None = None
        self.last_seq: dict[str, int] = {}
        self.room_epoch: dict[str, str] = {}
        self._fire = environment.events.request.fire
        self._rng = random.Random()
        self._pending: dict[str, _Pending] = {}
        self._rid = itertools.count(1)
        self._joins_left: set[str] = set()
        self._ready = Event()
        self._stopping = False
        self._loop: gevent.Greenlet | None = None
        self._lost_at: float | None = None
        self._storm: int = 0  # storm number that dropped us, 0 if none
        self._dropping = False
        self._connected_at = 0.0
        self._last_ping = 0.0
        self._gaps: dict[tuple[str, int], float] = {}
        self._resync: set[str] = set()
        self._recovering: dict[str, _Recovery] = {}
        self._replay_until: dict[str, int] = {}
        self._next_due: float | None = None
        self._next_housekeep = 0.0
        self._ever_connected = False
        self._pad: str | None = None
        self._retry_after: float | None = None

    # ------------------------------------------------------------ locust hooks
    def on_start(self) -> None:
        """Start the connection greenlet and wait (bounded) until connected and joined."""
        LIVE.add(self)
        self._loop = gevent.spawn(self._connection_loop)
        self._ready.wait(timeout=self.settings.connect_timeout + self.settings.request_timeout)

    def on_stop(self) -> None:
        """Close with 1000 and give the server a moment to answer, then drop the socket."""
        self._stopping = True
        LIVE.discard(self)
        conn = self.conn
        if conn is not None and not conn.closed:
            try:
                conn.close(1000)
            except OSError:
                pass
        if self._loop is not None:
            self._loop.join(timeout=0.5)
            self._loop.kill(block=False)
        if conn is not None:
            conn.abort()

    def wait_time(self) -> float:
        """Constant pacing at :meth:`period` with a random phase, so that users do not publish in lockstep."""
        period = self.period()
        now = time.monotonic()
        if self._next_due is None:
            self._next_due = now + self._rng.uniform(0, period)
        else:
            self._next_due += period
            if self._next_due < now - period:  # fell behind (e.g. blocked send): do not burst to catch up
                self._next_due = now
        return max(0.0, self._next_due - now)

    def period(self) -> float:
        """Seconds between task runs; subclasses derive it from their rate option."""
        return 1.0

    def slow_reader(self) -> bool:
        """Whether --recv-delay-ms applies to this user (chat publishers are exempt, see ChatUser)."""
        return True

    # ------------------------------------------------------------- connection
    def url(self) -> str:
        """--host plus the path, unless --host already names a path."""
        host = self.host or self.environment.host
        if not host:
            raise ValueError("no --host given (e.g. --host ws://127.0.0.1:8080)")
        path = self.path or self.settings.ws_path
        scheme_end = host.find("://")
        rest = host[scheme_end + 3 :] if scheme_end >= 0 else host
        if "/" in rest and rest[rest.index("/") :] not in ("", "/"):
            return host
        return host.rstrip("/") + path

    def _open(self) -> WSConnection | None:
        """Connect once and report ``connect``; None on failure."""
        s = self.settings
        headers: dict[str, str] = {}
        token = s.bearer(self.ident)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        t0 = time.perf_counter()
        try:
            conn = WSConnection.connect(
                self.url(),
                headers=headers,
                subprotocols=[MSGPACK_SUBPROTOCOL] if s.msgpack else None,
                timeout=s.connect_timeout,
                insecure=s.insecure,
                recv_buffer=s.recv_buffer,
                compression=s.compression,
            )
        except (OSError, HandshakeError, ConnectionClosed, ValueError) as exc:
            self._fire_event("connect", (time.perf_counter() - t0) * 1000, 0, _error_text(exc))
            if isinstance(exc, HandshakeError):
                self._retry_after = exc.retry_after
            return None
        self._fire_event("connect", (time.perf_counter() - t0) * 1000, 0, None)
        return conn

    def _connection_loop(self) -> None:
        """Own the connection: connect, join, receive until closed, back off, repeat."""
        attempt = 0
        while not self._stopping:
            try:
                conn = self._open()
                if conn is None:
                    if self.settings.no_reconnect and not self._ever_connected:
                        return
                    attempt += 1  # consecutive failed attempts: the backoff grows with them
                    delay = self.settings.backoff_delay(attempt, self._rng)
                    if self._retry_after is not None:  # the server asked (503/429): never retry sooner
                        delay = max(delay, self._retry_after)
                        self._retry_after = None
                    gevent.sleep(delay)
                    continue
                attempt = 0
                self._ever_connected = True
                self.conn = conn
                self.codec = wire.Codec(conn.subprotocol)
                self._connected_at = self._last_ping = time.monotonic()
                self._on_open()
                code, reason = self._receive(conn)
                self.conn = None
                conn.abort()
                self._ready.clear()
                if self._stopping:
                    return
                self._on_lost(code, reason)
                if self.settings.no_reconnect:
                    return
                gevent.sleep(self.settings.backoff_delay(0, self._rng))
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # a bug here must not silently kill the user
                logger.exception("connection loop of %s failed", self.ident)
                self._fire_event("internal", 0, 0, f"{type(exc).__name__}: {exc}")
                self.conn = None
                gevent.sleep(1.0)

    def _on_open(self) -> None:
        """Join every room; after a reconnect, ask for what we missed with ``since``."""
        self._joins_left = set(self.rooms)
        if not self.rooms:
            self._on_ready()
            return
        prefix = f"storm{self._storm}:" if self._storm else ""
        for room in self.rooms:
            since = self.last_seq.get(room) if self._lost_at is not None else None
            msg = Join(room=room)
            if since is not None:
                msg.since = since
                # the epoch lets the server tell "history renumbered" (restart, flushed broker) from "recovered"
                epoch = self.room_epoch.get(room)
                if epoch:
                    msg.epoch = epoch
                self._recovering[room] = _Recovery(since, time.perf_counter(), prefix)
            self.request("rejoin" if self._lost_at is not None else "join", msg, room)

    def _on_ready(self) -> None:
        """Connected and every join answered: end of a reconnection, if this was one."""
        self._ready.set()
        if self._lost_at is not None:
            name = f"storm{self._storm}:reconnect" if self._storm else "reconnect"
            self._fire_event(name, (time.perf_counter() - self._lost_at) * 1000, 0, None)
            if self._storm:
                COUNTERS.add(f"storm{self._storm}_rejoined")
            self._lost_at = None
            self._storm = 0

    def _on_lost(self, code: int, reason: str) -> None:
        """Report why the connection ended and prepare the rejoin state."""
        lifetime = (time.monotonic() - self._connected_at) * 1000
        if self._dropping:
            self._dropping = False
        else:
            self._fire_event(f"close:{code}", lifetime, 0, f"{code} {reason[:80]}".strip())
        if self._lost_at is None:
            self._lost_at = time.perf_counter()
        self._pending.clear()
        self._recovering.clear()
        self._replay_until.clear()
        # messages we were still waiting for: ask for them again with since
        for (room, seq), _deadline in self._gaps.items():
            if room in self.last_seq and seq <= self.last_seq[room]:
                self.last_seq[room] = seq - 1
        self._gaps.clear()

    def drop(self, storm: int) -> bool:
        """Abort the TCP connection as a network failure would (storm trigger); True if one was open."""
        conn = self.conn
        if conn is None or conn.closed:
            return False
        self._dropping = True
        self._storm = storm
        self._lost_at = time.perf_counter()
        conn.abort()
        return True

    @property
    def connected(self) -> bool:
        """True while a connection is open and every join has been answered."""
        return self.conn is not None and self._ready.is_set()

    # ---------------------------------------------------------------- sending
    def send_message(self, msg: Inbound) -> bool:
        """Encode and send; False if not connected (the receive loop reports the failure)."""
        conn = self.conn
        if conn is None or conn.closed:
            return False
        data = self.codec.encode(msg)
        try:
            conn.send(data, OP_BINARY if self.codec.binary else OP_TEXT)
        except OSError:
            return False
        return True

    def request(self, name: str, msg: Inbound, room: str | None = None) -> bool:
        """Send with an ``id`` and time the reply under ``name`` (ack, echo or pong)."""
        rid = str(next(self._rid))
        msg.id = rid
        self._pending[rid] = _Pending(name, time.perf_counter(), room)
        if not self.send_message(msg):
            self._pending.pop(rid, None)
            return False
        return True

    def make_payload(self, n: int) -> msgspec.Raw:
        """A payload of about --payload-size bytes carrying the send time."""
        pad = self._pad
        if pad is None:
            pad = self._pad = wire.make_payload_pad(self.codec, self.settings.payload_size, self.ident)
        return self.codec.encode_payload(wire.Payload(ts=time.time(), pub=self.ident, n=n, pad=pad))

    # -------------------------------------------------------------- receiving
    def _receive(self, conn: WSConnection) -> tuple[int, str]:
        """Read until the connection ends; return its close code and reason."""
        decode = self.codec.decode
        delay = self.settings.recv_delay_ms / 1000.0 if self.slow_reader() else 0.0
        while True:
            try:
                opcode, data = conn.recv()
            except ConnectionClosed as exc:
                return exc.code, exc.reason
            except Exception as exc:
                return ABNORMAL_CLOSE, f"{type(exc).__name__}: {exc}"
            if opcode == OP_PING:
                now = time.monotonic()
                self._fire_event("heartbeat", (now - self._last_ping) * 1000, len(data), None)
                self._last_ping = now
                continue
            if opcode != OP_TEXT and opcode != OP_BINARY:
                continue
            try:
                msg = decode(data)
            except Exception as exc:  # noqa: BLE001 - RecursionError too, from a deeply nested frame
                self._fire_event("decode", 0, len(data), f"undecodable message: {type(exc).__name__}")
                continue
            self._dispatch(msg, len(data))
            if self._gaps:
                self._expire_gaps(time.monotonic())
            if delay:
                gevent.sleep(delay)

    def _dispatch(self, msg: FlatMessage, size: int) -> None:
        kind = msg.type
        if kind == "message":
            self._on_delivery(msg, size)
        elif kind == "ack":
            p = self._pending.pop(msg.requestId or "", None)
            if p is None:
                return
            self._fire_event(p.name, (time.perf_counter() - p.t0) * 1000, size, None)
            data = msg.data
            if p.name in ("join", "rejoin"):
                self._on_join_ack(p.room or (data.room if data else None) or "", data)
            elif p.name == "publish" and data is not None and data.seq is not None and p.room:
                self._on_own_seq(p.room, data.seq)
        elif kind == "echo" or kind == "pong":
            p = self._pending.pop(msg.requestId or msg.id or "", None)
            if p is not None:
                self._fire_event(p.name, (time.perf_counter() - p.t0) * 1000, size, None)
        elif kind == "error":
            p = self._pending.pop(msg.requestId, None) if msg.requestId else None
            rt = (time.perf_counter() - p.t0) * 1000 if p else 0.0
            code = msg.code or "UNKNOWN"
            # A refused request fails its own row (publish, join, echo...) with the code as the reason;
            # an error that answers no request of ours gets a row of its own.
            self._fire_event(p.name if p is not None else f"error:{code}", rt, size, f"error:{code}")
            if p is not None and p.name in ("join", "rejoin") and p.room:
                self._recovering.pop(p.room, None)
                self._join_done(p.room)
        elif kind == "joined" or kind == "left":
            self._on_presence_event(kind, msg, size)
        elif kind == "broadcast":
            self._on_broadcast(msg, size)
        elif kind == "subscribed" or kind == "unsubscribed":
            self._on_server_membership(kind, msg, size)
        elif kind == "welcome":
            self.welcome = msg
        else:
            # Not a type of the protocol: an application's own push (conn.send, docs/app-api.md).
            # Counted in a row of its own, untimed, not a failure: load runs drive the built-in protocol.
            self._fire_event(f"push:{kind}"[:60], 0, size, None, timed=False)

    def _on_server_membership(self, kind: str, msg: FlatMessage, size: int) -> None:
        """The server joined this connection to a room or took it out (PROTOCOL.md, server-side joins):
        rows ``subscribed``/``unsubscribed``, untimed. A ``subscribed`` room's seq is tracked from the
        push's seq, so a gap in its deliveries counts; an ``unsubscribed`` one is no longer tracked."""
        room = msg.room or ""
        if kind == "subscribed":
            if msg.seq is not None and room not in self.last_seq:
                self.last_seq[room] = msg.seq
        else:
            self.last_seq.pop(room, None)
            for key in [k for k in self._gaps if k[0] == room]:
                del self._gaps[key]
        self._fire_event(kind, 0, size, None, timed=False)

    def _on_broadcast(self, msg: FlatMessage, size: int) -> None:
        """A room-less push to every connection (``POST /broadcast`` without rooms): row ``broadcast``.

        Timed like a delivery when its payload carries our ``ts`` (a load run that broadcasts),
        else counted as ``broadcast (no ts)``. No seq: nothing to track.
        """
        p = self.codec.decode_payload(msg.payload)
        if p is None:
            self._fire_event("broadcast (no ts)", 0, size, None, timed=False)
            return
        self._fire_event("broadcast", max((time.time() - p.ts) * 1000, 0.0), size, None)

    def _on_presence_event(self, kind: str, msg: FlatMessage, size: int) -> None:
        sent = PRESENCE_SENT.get((kind, msg.room or "", msg.conn or ""))
        if sent is None:  # sent by a user of another Locust process: counted, not timed
            self._fire_event(f"{kind} (untimed)", 0, size, None, timed=False)
            return
        self._fire_event(kind, (time.perf_counter() - sent) * 1000, size, None)

    def _join_done(self, room: str) -> None:
        self._joins_left.discard(room)
        if not self._joins_left and not self._ready.is_set():
            self._on_ready()

    def _on_join_ack(self, room: str, data: ReplyData | None) -> None:
        seq = data.seq if data is not None else None
        sent_epoch = self.room_epoch.get(room)
        if data is not None and data.epoch:
            self.room_epoch[room] = data.epoch
        rec = self._recovering.get(room)
        if rec is not None:
            # The same rule as the asyncio client's (server/wire.py rejoin_outcome).
            recovered, reset = (
                rejoin_outcome(rec.since, sent_epoch, seq, data.recovered is not False, data.epoch or None)
                if data is not None and seq is not None
                else (data is None or data.recovered is not False, False)
            )
            if not recovered:
                self._recovering.pop(room)
                missed = (seq - rec.since) if seq is not None else 0
                COUNTERS.add("rejoins_not_recovered")
                if reset:
                    COUNTERS.add("rejoins_reset")  # the room was lost and renumbered: since is gone
                COUNTERS.add("messages_unrecoverable", max(0, missed))
                self._fire_event(
                    f"{rec.prefix}recovered",
                    (time.perf_counter() - rec.t0) * 1000,
                    0,
                    "NOT_RECOVERED: history no longer reaches back to since",
                )
                self._resync.add(room)
                if seq:  # the server replays what the room has now (new numbering), up to seq
                    self._replay_until[room] = seq
            elif seq is None or seq <= rec.since:
                self._recovering.pop(room)
                COUNTERS.add("rejoins_nothing_missed")
            else:
                rec.upto = seq
                if rec.count >= seq - rec.since:
                    self._finish_recovery(room, rec)
        elif seq is not None:
            last = self.last_seq.get(room)
            if last is None or seq > last:
                self.last_seq[room] = seq
        self._join_done(room)

    def _finish_recovery(self, room: str, rec: _Recovery) -> None:
        self._recovering.pop(room, None)
        expected = (rec.upto - rec.since) if rec.upto is not None else rec.count
        COUNTERS.add("messages_recovered", rec.count)
        COUNTERS.add("messages_missed_while_away", expected)
        COUNTERS.add("rejoins_recovered")
        self._fire_event(f"{rec.prefix}recovered", (time.perf_counter() - rec.t0) * 1000, rec.count, None)

    def _on_delivery(self, msg: FlatMessage, size: int) -> None:
        now = time.time()
        room = msg.room or ""
        seq = msg.seq
        name = "delivery"
        if seq is not None:
            self._track_seq(room, seq)
            rec = self._recovering.get(room)
            if rec is not None and seq > rec.since:
                if rec.upto is None or seq <= rec.upto:
                    name = "delivery:replayed"
                    rec.count += 1
                    if rec.upto is not None and rec.count >= rec.upto - rec.since:
                        self._finish_recovery(room, rec)
                else:  # a live message: the replay is over
                    self._finish_recovery(room, rec)
            elif self._replay_until:
                until = self._replay_until.get(room)
                if until is not None:
                    if seq <= until:
                        name = "delivery:replayed"
                    else:
                        del self._replay_until[room]
        p = self.codec.decode_payload(msg.payload)
        if p is None:
            self._fire_event(f"{name} (no ts)", 0, size, None, timed=False)
            return
        # Replayed history is as old as the outage: kept apart so that it does not pollute live latency.
        latency = (now - p.ts) * 1000
        if latency < 0:  # clocks of publisher and subscriber machines disagree
            COUNTERS.add("negative_latency_clamped")
            latency = 0.0
        self._fire_event(name, latency, size, None)

    def _track_seq(self, room: str, seq: int) -> None:
        """Detect gaps in a room's seq; a missing seq becomes a failure only after GAP_GRACE."""
        last = self.last_seq.get(room)
        if last is None or room in self._resync:
            if room in self._resync and last is not None and seq > last + 1:
                COUNTERS.add("messages_lost_unrecoverable", seq - last - 1)
            self._resync.discard(room)
            self.last_seq[room] = seq
            return
        if seq == last + 1 or not self.track_gaps:
            self.last_seq[room] = max(seq, last)
            return
        if seq <= last:
            if self._gaps.pop((room, seq), None) is None:
                # Not a late message we were waiting for: the room started over (its history was lost
                # while we stayed joined, see docs/protocol-choices.md "Epochs") or a duplicate.
                COUNTERS.add("seq_went_back")
                self.last_seq[room] = seq
            return
        deadline = time.monotonic() + GAP_GRACE
        for missing in range(last + 1, seq):
            self._gaps[(room, missing)] = deadline
        self.last_seq[room] = seq

    def _on_own_seq(self, room: str, seq: int) -> None:
        """Our own publishes are not delivered to us, so their acks advance the room's seq instead."""
        last = self.last_seq.get(room)
        if last is None or seq <= last:
            self._gaps.pop((room, seq), None)
            if last is None:
                self.last_seq[room] = seq
            return
        self._track_seq(room, seq)

    def _expire_gaps(self, now: float) -> None:
        expired = [k for k, deadline in self._gaps.items() if deadline <= now]
        for key in expired:
            del self._gaps[key]
            COUNTERS.add("messages_missing")
            self._fire_event("gap", 0, 0, "seq gap: a room message never arrived")

    # ------------------------------------------------------------ housekeeping
    def housekeep(self) -> None:
        """At most once a second: time out unanswered requests, stale gaps and replays."""
        now = time.perf_counter()
        if now < self._next_housekeep:
            return
        self._next_housekeep = now + 1.0
        limit = self.settings.request_timeout
        if self._pending:
            late = [rid for rid, p in self._pending.items() if now - p.t0 > limit]
            for rid in late:
                p = self._pending.pop(rid)
                self._fire_event(f"timeout:{p.name}", (now - p.t0) * 1000, 0, f"no reply within {limit:g}s")
                if p.name in ("join", "rejoin") and p.room:
                    self._join_done(p.room)
        if self._recovering:
            for room, rec in list(self._recovering.items()):
                if now - rec.t0 > limit:
                    self._finish_recovery(room, rec)
        if self._gaps:
            self._expire_gaps(time.monotonic())

    def _fire_event(
        self, name: str, response_time: float, length: int, exception: str | None, timed: bool = True
    ) -> None:
        """Report one measurement (ms): Locust's row and, if it succeeded and was timed, its µs HDR histogram."""
        if exception is None and timed:
            LATENCIES.record(name, response_time)
        if not is_request_latency(name):
            log_outside_aggregate(
                self.environment.stats, REQUEST_TYPE, name, response_time, length, exception
            )
            return
        self._fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=response_time,
            response_length=length,
            exception=exception,
            context={},
        )


class ChatUser(WebSocketUser):
    """Joins --rooms-per-user rooms and publishes timestamped payloads at --publish-rate.

    Rooms are assigned round-robin over --rooms (or enough rooms of --room-size),
    and --publisher-ratio of the users publish while the rest only listen, so
    both many-to-many chat and one-to-many fan-out can be modelled.
    """

    publisher: bool = False

    def on_start(self) -> None:
        s = self.settings
        # Rooms and publishers are spread over chat users only, so that a mixed run
        # (chat + echo + idle users) still fills rooms with several chat users each.
        workers = max(1, s.wsfan_workers)
        worker = int(getattr(self.environment.runner, "worker_index", 0) or 0)
        chat_index = next(_chat_index) * workers + worker
        self.rooms = s.rooms_for(chat_index)
        self.publisher = s.is_publisher(chat_index) and s.publish_rate > 0
        self.track_gaps = not (self.publisher and s.no_publish_ack)
        self._n = 0
        self._next_churn = time.monotonic() + s.churn_interval * self._rng.random()
        super().on_start()

    def period(self) -> float:
        if self.publisher:
            return 1.0 / self.settings.publish_rate
        return 1.0

    def slow_reader(self) -> bool:
        """Only listeners read slowly: a slow publisher would be throttled by TCP before the server
        ever had to buffer for it, so the slow-consumer limit would never be reached."""
        return not self.publisher

    @tag("chat", "publish")
    @task
    def publish(self) -> None:
        """Publish to one of our rooms (round-robin); skipped while reconnecting."""
        self.housekeep()
        if self.settings.churn_interval > 0 and self.connected and time.monotonic() >= self._next_churn:
            self.churn()
        if not self.publisher or not self.connected:
            return
        self._n += 1
        room = self.rooms[self._n % len(self.rooms)]
        msg = Publish(room=room, payload=self.make_payload(self._n))
        if self.settings.no_publish_ack:
            if self.send_message(msg):
                self._fire_event("publish", 0, 0, None, timed=False)
        else:
            self.request("publish", msg, room)

    def churn(self) -> None:
        """Leave and rejoin the first room: the room's others time our left and joined events."""
        self._next_churn = time.monotonic() + self.settings.churn_interval
        conn = self.welcome.conn if self.welcome is not None else None
        if not conn:
            return
        room = self.rooms[0]
        # Publications between our leave and our rejoin are not ours to receive: not gaps.
        self.last_seq.pop(room, None)
        for key in [k for k in self._gaps if k[0] == room]:
            del self._gaps[key]
        PRESENCE_SENT[("left", room, conn)] = time.perf_counter()
        self.request("leave", Leave(room=room), room)
        PRESENCE_SENT[("joined", room, conn)] = time.perf_counter()
        self.request("join", Join(room=room), room)
        if self.settings.presence_namespace:
            self.request("presence_stats", PresenceStatsRequest(room=room), room)


class EchoUser(WebSocketUser):
    """Request/response at a fixed --echo-rate: the simplest round-trip latency, immune to clock skew."""

    def on_start(self) -> None:
        if self.settings.echo_path:
            self.path = self.settings.echo_path
        self._n = 0
        super().on_start()

    def period(self) -> float:
        rate = self.settings.echo_rate
        return 1.0 / rate if rate > 0 else 1.0

    @tag("echo")
    @task
    def echo(self) -> None:
        """Send one echo request; the reply is matched by requestId (or by id on the raw /echo endpoint)."""
        self.housekeep()
        if not self.connected or self.settings.echo_rate <= 0:
            return
        self._n += 1
        self.request("echo", Echo(payload=self.make_payload(self._n)))


class IdleUser(WebSocketUser):
    """Holds a connection and only answers heartbeats: the cost of many quiet connections.

    With --app-ping-interval it also sends an app-level ping and times the pong.
    """

    def period(self) -> float:
        # Without app pings there is nothing to do but housekeeping, and waking thousands of idle
        # users every second would cost the generator more CPU than the heartbeats being measured.
        interval = self.settings.app_ping_interval
        return interval if interval > 0 else 5.0

    @tag("idle")
    @task
    def idle(self) -> None:
        """Nothing to do but housekeeping (and the optional app-level ping)."""
        self.housekeep()
        if self.settings.app_ping_interval > 0 and self.connected:
            self.request("ping", Ping(ts=time.time()))


def drop_all(storm: int, ratio: float = 1.0) -> int:
    """Abort the connections of ``ratio`` of this process's users at once; return how many dropped."""
    users = [u for u in list(LIVE) if u.conn is not None and not u._stopping]
    random.shuffle(users)
    k = round(len(users) * max(0.0, min(1.0, ratio)))
    dropped = 0
    for user in users[:k]:
        if user.drop(storm):
            dropped += 1
    COUNTERS.add(f"storm{storm}_dropped", dropped)
    return dropped
