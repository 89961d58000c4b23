"""The state a client keeps across connections, and the plumbing between it and the socket.

A session outlives its connections. Room membership, the last seq seen per
room, the message buffers and the request ids belong here, so a reconnect (new
socket, new ``Connection``) is invisible to the application apart from events:
rooms are rejoined with ``since`` and ``epoch``, duplicates are dropped, and a
gap is reported when the server could not replay everything (a reset when the
room itself was lost and renumbered). A rejoin refused with a transient error
is retried, not dropped (``_rejoin_all``).

Requests in flight when a connection drops fail with ``ConnectionClosed``
instead of being resent, because the server may already have executed them (a
publish is not idempotent). Requests issued while reconnecting wait for the
new connection, within their own timeout.

``client.Client`` adds the public API on top; this module has no public names
apart from ``Session`` and ``Stats``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from wsfan.client.backoff import Backoff
from wsfan.client.codec import Codec, Encoding
from wsfan.client.errors import (
    ConnectionClosed,
    NotConnected,
    ProtocolError,
    RateLimited,
    RequestTimeout,
    error_for,
)
from wsfan.client.events import (
    Connected,
    Event,
    Overflow,
    RejoinFailed,
    ServerError,
    Subscribed,
    Unsubscribed,
)
from wsfan.client.inbox import Router
from wsfan.client.reconnect import Reconnector, TokenFn
from wsfan.client.rooms import RoomTracker
from wsfan.client.transport import Connection, check_url, open_connection
from wsfan.server.wire import (
    Ack,
    EchoReply,
    Error,
    JoinedEvent,
    LeftEvent,
    Message,
    Outbound,
    Pong,
    Welcome,
)

log = logging.getLogger(__name__)

EventFn = Callable[[Event], Any]
MessageFn = Callable[[Message], Any]
PushFn = Callable[[Any], Any]
# Everything else handed to ``_on_reply`` is a push: ``Broadcast`` or an application's own type.
_REPLY_KINDS: frozenset[type] = frozenset(
    (JoinedEvent, LeftEvent, Subscribed, Unsubscribed, Ack, Error, EchoReply, Pong)
)
DEFAULT: Any = object()  # "use the client's request_timeout"; None means "no timeout"


class Stats:
    """Counters cheap enough to keep on the hot path; read them in benchmarks and tests."""

    __slots__ = ("messages", "presence_events", "pushes", "sent", "reconnects", "errors")

    def __init__(self) -> None:
        self.messages = 0  # deliveries handed to the application
        self.presence_events = 0  # joined/left events received
        self.pushes = 0  # room-less pushes (broadcasts, application types) handed to the application
        self.sent = 0  # messages written to the socket
        self.reconnects = 0
        self.errors: dict[str, int] = {}  # error replies by code, including fire-and-forget ones


class Session:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        encoding: Encoding = "json",
        request_timeout: float | None = 5.0,
        open_timeout: float = 5.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float = 10.0,
        reconnect: bool = True,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_attempts: int | None = None,
        rng: random.Random | None = None,
        stable_after: float = 10.0,
        refresh_token: TokenFn | None = None,
        on_message: MessageFn | None = None,
        on_event: EventFn | None = None,
        on_push: PushFn | None = None,
        push_types: Iterable[type] = (),
        max_buffered: int = 10_000,
        raw_payloads: bool = False,
        headers: Iterable[tuple[str, str]] = (),
        compression: bool = False,
    ) -> None:
        check_url(url)
        self.url = url
        self.compression = compression
        self.token = token
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.headers = list(headers)
        self.reconnector = Reconnector(
            Backoff(backoff_base, backoff_cap, max_attempts, rng),
            enabled=reconnect,
            stable_after=stable_after,
            refresh_token=refresh_token,
        )
        self.stats = Stats()
        self.welcome: Welcome | None = None
        self._codec = Codec(encoding, raw_payloads, push_types)
        self._encode = self._codec.request
        self._on_message = on_message
        self._on_event = on_event
        self._on_push = on_push
        self._router = Router(max_buffered, self._overflowed, self._pushes_overflowed)
        self._rooms = RoomTracker(on_reset=self._emit)
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._conn: Connection | None = None
        self._ready = asyncio.Event()  # set while a connection is open and its rooms are rejoined
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._stopped: BaseException | None = None  # why the session will never connect again
        self._done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._held_events: list[Event] | None = None  # events of a connection not yet reported Connected

    # ------------------------------------------------------------ connections

    async def _open(self, reconnect: bool) -> Connection:
        """Open a connection, rejoin every room on a reconnect, then report ``Connected``.

        ``Connected`` is the first event of each connection: what happens on it before every
        room is rejoined (``Recovered``, ``Gap``, ``RejoinFailed``, ``Subscribed``, ``Joined``...)
        is held and reported right after it, in order. An attempt that fails first reports
        what it held when it fails, without a ``Connected`` (client.events).
        """
        self._held_events = []
        try:
            conn = await self._open_held(reconnect)
        except BaseException:
            self._release_events()
            raise
        held, self._held_events = self._held_events, None
        self._emit(Connected(conn.welcome, reconnect))
        for event in held or ():
            self._emit(event)
        return conn

    def _release_events(self) -> None:
        held, self._held_events = self._held_events, None
        for event in held or ():
            self._emit(event)

    async def _open_held(self, reconnect: bool) -> Connection:
        conn = await open_connection(
            self.url,
            self._codec,
            on_delivery=self._on_delivery,
            on_reply=self._on_reply,
            on_lost=self._on_lost,
            token=self.token,
            headers=self.headers,
            open_timeout=self.open_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            compression=self.compression,
        )
        if self._closing:  # close() ran while we were connecting
            conn.abort()
            raise NotConnected("client closed")
        self._conn = conn
        self.welcome = conn.welcome
        if reconnect:
            try:
                await self._rejoin_all(conn)
            except BaseException:
                conn.abort()
                raise
            self.stats.reconnects += 1
        if not conn.is_open:
            raise ConnectionClosed(*conn.closed.result()) if conn.closed.done() else NotConnected()
        self._ready.set()
        return conn

    def _reopen(self) -> Awaitable[Connection]:
        return self._open(reconnect=True)

    def _supervise(self, conn: Connection) -> None:
        run = self.reconnector.run(
            conn,
            reopen=self._reopen,
            stop=self._finish,
            emit=self._emit,
            use_token=self._use_token,
            closing=self._is_closing,
        )
        self._supervisor = asyncio.create_task(run, name=f"client reconnect {self.url}")

    def _use_token(self, token: str) -> None:
        self.token = token

    def _is_closing(self) -> bool:
        return self._closing

    async def _rejoin_all(self, conn: Connection) -> None:
        """Rejoin every room on a new connection, each with ``since`` and ``epoch``.

        * A room the server refuses for good (``FORBIDDEN`` with a new token,
          ``INVALID_MESSAGE``, any code not in ``TRANSIENT_CODES``) is dropped: its
          stream raises the error and ``RejoinFailed`` is reported.
        * ``UNAVAILABLE`` (a node whose broker is down) and ``INTERNAL`` say "not
          now": they fail the whole reconnect, like a socket that died during the
          rejoin, so the room is kept and the reconnect is retried after the next
          backoff delay (behind a load balancer possibly on a healthy node).
        * ``RATE_LIMITED`` means this client has more rooms than the server's burst:
          a new connection would be refused the same way, only time refills the
          bucket. Those rooms are retried on this connection, one at a time, with a
          jittered backoff delay after each refusal (``_rejoin_paced``).
        """
        rooms = self._rooms.joined()
        results = await asyncio.gather(*(self._rejoin(conn, room) for room in rooms), return_exceptions=True)
        limited: list[str] = []
        failure: BaseException | None = None
        for room, result in zip(rooms, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if isinstance(result, RateLimited):
                limited.append(room)
            elif isinstance(result, ProtocolError) and not result.transient:
                self._drop_room(room, result)
            elif failure is None:
                failure = result
        if failure is not None:
            raise failure  # transient refusal, or the connection failed: the whole reconnect is retried
        if limited:
            await self._rejoin_paced(conn, limited)

    async def _rejoin_paced(self, conn: Connection, rooms: list[str]) -> None:
        """Rejoin rooms refused with ``RATE_LIMITED``: one join at a time, sleeping after each refusal."""
        reference = self.reconnector.backoff
        backoff = Backoff(reference.base, reference.cap, rng=reference.rng)
        refused = True  # the first try of each of these rooms was just refused
        for room in rooms:
            while self._rooms.tracks(room):  # the application may leave the room meanwhile
                if refused:
                    await asyncio.sleep(backoff.next_delay())
                    if not self._rooms.tracks(room):
                        break
                try:
                    await self._rejoin(conn, room)
                except RateLimited:
                    refused = True
                    continue
                except ProtocolError as exc:
                    if exc.transient:
                        raise
                    self._drop_room(room, exc)
                refused = False
                backoff.reset()
                break

    def _rejoin(self, conn: Connection, room: str) -> Awaitable[dict[str, Any]]:
        return self._bounded("join", DEFAULT, self._join_on(conn, room, None))

    def _drop_room(self, room: str, error: ProtocolError) -> None:
        """The server refuses ``room`` for good: forget it, end its stream with why, and say so."""
        self._rooms.leave(room)
        self._router.end_room(room, error)
        self._emit(RejoinFailed(room, error))

    def _on_lost(self, conn: Connection, code: int, reason: str) -> None:
        """Runs synchronously when the socket closes: nothing may be sent on ``conn`` after this."""
        if conn is self._conn:
            self._conn = None
            if self._stopped is None:
                self._ready.clear()
        self._fail_pending(ConnectionClosed(code, reason))
        self._rooms.connection_lost()

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _finish(self, error: BaseException | None) -> None:
        """Stop for good. ``error`` None means the application closed us; otherwise it is why we gave up.

        Calls waiting for a connection fail; message streams drain, then end
        (after ``close()``) or raise ``error``.
        """
        if self._stopped is not None:
            return
        self._closing = True
        self._release_events()  # what an attempt in progress held is reported now
        self._stopped = error if error is not None else ConnectionClosed(1000, "client closed")
        self._conn = None
        self._fail_pending(self._stopped)
        self._router.end(error)
        self._ready.set()  # wake calls waiting for a connection: they see _stopped and raise
        done = self._done
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # marks it retrieved: wait_closed() re-raises it if anyone asks

    # ------------------------------------------------------------ incoming

    def _on_delivery(self, msg: Message) -> None:
        if self._rooms.accept(msg):
            self._hand_over(msg)

    def _hand_over(self, msg: Message) -> None:
        self.stats.messages += 1
        callback = self._on_message
        if callback is None:
            self._router.route(msg)
            return
        self._run_callback(callback, msg, "on_message")

    def _on_reply(self, msg: Outbound | Any) -> None:
        kind = type(msg)
        if kind not in _REPLY_KINDS:
            self._push(msg)  # a broadcast, or an application's own type (Codec.decode_push)
            return
        if kind is JoinedEvent or kind is LeftEvent:
            self.stats.presence_events += 1
            self._emit(msg)  # type: ignore[arg-type]
            return
        if kind is Subscribed:
            # The server joined us (Conn.join): numbered from its seq; a Gap when it is a room of
            # the previous connection and messages were published while we were away.
            gap = self._rooms.server_joined(msg.room, msg.seq, msg.epoch or None)
            self._emit(msg)  # type: ignore[arg-type]
            if gap is not None:
                self._emit(gap)
            return
        if kind is Unsubscribed:
            self._rooms.server_left(msg.room)  # after its last delivery: nothing of it follows
            self._emit(msg)  # type: ignore[arg-type]
            return
        if kind is Error:
            errors = self.stats.errors
            errors[msg.code] = errors.get(msg.code, 0) + 1
        request_id = getattr(msg, "requestId", None)
        if request_id is None:
            if kind is Error:
                self._emit(ServerError(msg.code, msg.message))
            return
        fut = self._pending.pop(request_id, None)
        if fut is None or fut.done():
            return  # the caller timed out or went away: a late reply is dropped on purpose
        if kind is Ack:
            fut.set_result(msg.data if msg.data is not None else {})
        elif kind is Error:
            fut.set_exception(error_for(msg.code, msg.message))
        elif kind is EchoReply:
            # Decoded now: the Raw payload may point into the connection's reusable read buffer.
            fut.set_result(self._codec.decode_payload(msg.payload))
        elif kind is Pong:
            fut.set_result(msg.ts)

    def _push(self, msg: Any) -> None:
        self.stats.pushes += 1
        callback = self._on_push
        if callback is None:
            self._router.pushes.put(msg)
            return
        self._run_callback(callback, msg, "on_push")

    def _emit(self, event: Event) -> None:
        held = self._held_events
        if held is not None:  # a connection is being opened: its events follow its Connected
            held.append(event)
            return
        handler = self._on_event
        if handler is not None:
            self._run_callback(handler, event, "on_event")

    def _run_callback(self, callback: Callable[[Any], Any], arg: Any, name: str) -> None:
        """Run a user callback: a coroutine it returns becomes a task; what it raises is logged, not ours."""
        try:
            result = callback(arg)
            if result is not None and inspect.isawaitable(result):
                self._spawn(result)
        except Exception:
            log.exception("%s callback failed for %r", name, arg)

    def _overflowed(self, room: str | None, dropped: int) -> None:
        self._emit(Overflow(room, dropped))

    def _pushes_overflowed(self, room: str | None, dropped: int) -> None:
        self._emit(Overflow(None, dropped, pushes=True))

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ requests

    async def _ready_connection(self) -> Connection:
        while True:
            if self._stopped is not None:
                raise self._stopped
            conn = self._conn
            if conn is not None and self._ready.is_set():
                return conn
            await self._ready.wait()

    async def _call(self, conn: Connection, kind: str, **fields: Any) -> Any:
        """Send one request with a fresh id on ``conn`` and wait for its reply (the caller bounds the wait)."""
        return await self._exchange(conn, lambda request_id: self._encode(kind, request_id, **fields))

    async def _request_message(self, message: Any) -> Any:
        """An application message (a ``wsfan.Message`` Struct) sent with a fresh id; its ack data."""
        conn = await self._ready_connection()
        encode = self._codec.encode
        return await self._exchange(
            conn, lambda request_id: encode(msgspec.structs.replace(message, id=request_id))
        )

    async def _exchange(self, conn: Connection, encode: Callable[[str], bytes]) -> Any:
        if not conn.is_open:
            raise ConnectionClosed(*conn.closed.result()) if conn.closed.done() else NotConnected()
        request_id = str(next(self._ids))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            conn.send(encode(request_id))
            self.stats.sent += 1
            return await fut
        finally:
            self._pending.pop(request_id, None)

    async def _request(self, kind: str, **fields: Any) -> Any:
        return await self._call(await self._ready_connection(), kind, **fields)

    async def _bounded(self, kind: str, timeout: float | None, work: Awaitable[Any]) -> Any:
        """Run ``work`` (waiting for a connection included) within the call's timeout."""
        limit = self.request_timeout if timeout is DEFAULT else timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await work
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(kind, limit or 0.0) from None
            raise

    async def _join_on(
        self, conn: Connection, room: str, since: int | None, epoch: str | None = None
    ) -> dict[str, Any]:
        sent_since = self._rooms.begin_join(room, since, epoch)
        # The epoch only means something together with since: the numbering since counts in.
        sent_epoch = self._rooms.epoch(room) if sent_since is not None else None
        try:
            data = await self._call(conn, "join", room=room, since=sent_since, epoch=sent_epoch)
        except BaseException:
            self._rooms.abort_join(room)
            raise
        released, event = self._rooms.end_join(room, data)
        for msg in released:
            self._hand_over(msg)
        if event is not None:
            self._emit(event)
        return data

    async def _join(self, room: str, since: int | None, epoch: str | None = None) -> dict[str, Any]:
        return await self._join_on(await self._ready_connection(), room, since, epoch)

    def _send_nowait(self, kind: str, **fields: Any) -> None:
        conn = self._conn
        if conn is None or not self._ready.is_set():
            raise NotConnected("not connected" if self._stopped is None else "client stopped")
        conn.send(self._encode(kind, **fields))
        self.stats.sent += 1
