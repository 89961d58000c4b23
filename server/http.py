"""The HTTP side server (aiohttp, on ``--http-port``): health, metrics, admin publish and SSE.

picows answers plain GETs on the WebSocket port (``/healthz`` and ``/metrics``
live there too), but a POST body or a long-lived stream needs a real HTTP
server. Both share the node's hub, so an admin publish or an SSE subscriber is
just another publisher or subscriber of the same rooms.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler

from wsfan.server import control
from wsfan.server.auth import AuthError, Identity, token_from_request
from wsfan.server.broker import BrokerUnavailable, Publication
from wsfan.server.control import close_problem
from wsfan.server.handshake import BARE_LF, MAX_HEADER_LINES, Refusal, single
from wsfan.server.hub import Session, presence_data
from wsfan.server.logs import Throttle, fields, peer_text
from wsfan.server.metrics import CONTENT_TYPE
from wsfan.server.protocol import Encoding, PayloadRefused, describe_invalid, payload_problem
from wsfan.server.transport import (
    CLOSE_GRACE_S,
    MAX_GRACE_EXTENSIONS,
    MIN_CLOSE_PROGRESS,
    reset,
    unsent_bytes,
)
from wsfan.server.wire import (
    ROOM_RULE,
    SEQ_MAX,
    UNKNOWN_EPOCH,
    CloseCode,
    ErrorCode,
    RoomName,
    parse_seq,
    valid_room,
)

if TYPE_CHECKING:
    from wsfan.server.app import Node

log = logging.getLogger("wsfan.http")

SSE_KEEPALIVE_S = 15.0
# One DEBUG line a second for a client gone mid-response, on every connection of this process.
_gone = Throttle()


class RequestPeer:
    """The peer of ``Hub.request_session``: an HTTP request, which is sent nothing; a refusal of
    its read is kept (``refusal``: code, message) for the HTTP answer."""

    __slots__ = ("refusal",)

    def __init__(self) -> None:
        self.refusal: tuple[str, str] | None = None

    def flush(self, session: Session) -> None:
        session.out.clear()

    def close(self, code: int, reason: str) -> None:
        return None

    def refused(self, code: str, message: str) -> None:
        if self.refusal is None:
            self.refusal = (code, message)


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse is the client's fault, not ours.

    aiohttp answers such a request (a non-ASCII byte in the URL, a control character in a
    header, a line past 8190 bytes) with 400 and its parser's exception text, which quotes
    the request back, and logs a traceback at ERROR for each one, so any client can fill
    the log. Here a 4xx gets the status line's phrase as its body and one DEBUG line;
    5xx keep aiohttp's own handling (a fixed body unless aiohttp's debug mode is on).

    ``on_lost``: called once when the connection is lost, set by a handler that waits for
    nothing the client sends (an SSE stream), which aiohttp does not cancel on a disconnect
    (``handler_cancellation`` off): without it a stream whose client left would be noticed only
    at its next write, the keepalive up to 15 s later, holding its places in the limits until then.
    ``on_resume``: called when the transport's write buffer fell below its low-water mark again
    (``resume_writing``), set by the same handler: an SSE stream writes nothing more while the
    client has not read what the transport holds, and waits for this instead of aiohttp's drain,
    which has no timeout.

    Every other response (the server API's ``/history``, up to ``--history-size`` publications of
    ``--max-message-size``, about 19 MB by default; ``/rooms``; ``/presence``; ``/metrics``; any
    answer a client pipelines requests for) is written by aiohttp, whose drain has no timeout
    either: a client that stops reading would keep the handler, its response and its socket for
    ever. So the rule of an SSE stream (``HttpSide._pump``) holds for them too: a connection whose
    write buffer stays over its high-water mark (``pause_writing`` with no ``resume_writing``) for
    the stall limit (``stall_limit``: ``ConnectionRegistry.stall_limit``, --heartbeat +
    --heartbeat-timeout + the 2 s close grace, 42 s by default; none with --heartbeat 0) is
    reset (``transport.reset``: RST, the kernel's queue freed), counted in
    ``wsfan_http_stalled_total`` (``on_stall``). A client that reads, however slowly, resumes the
    transport and restarts the wait. An SSE stream (``on_resume`` set) keeps its own rule: 4008 and
    the close grace.
    """

    __slots__ = ("on_lost", "on_resume", "stall_limit", "on_stall", "_stall_timer")

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._cancel_stall()
        on_lost: Callable[[], None] | None = getattr(self, "on_lost", None)
        if on_lost is not None:
            self.on_lost = None
            on_lost()

    def pause_writing(self) -> None:
        super().pause_writing()
        stall: float = getattr(self, "stall_limit", 0.0)
        if stall and getattr(self, "on_resume", None) is None:
            self._cancel_stall()
            self._stall_timer = self._loop.call_later(stall, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stall()
        on_resume: Callable[[], None] | None = getattr(self, "on_resume", None)
        if on_resume is not None:
            on_resume()

    def _cancel_stall(self) -> None:
        timer: asyncio.TimerHandle | None = getattr(self, "_stall_timer", None)
        if timer is not None:
            self._stall_timer = None
            timer.cancel()

    def _stalled(self) -> None:
        """The client read nothing for the stall limit while a response waited: reset the connection.

        The handler's pending write then fails with ``ConnectionError`` (``handle_error``: one DEBUG
        line), which ends it and lets its response go.
        """
        self._stall_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or not self.writing_paused:
            return
        if getattr(self, "on_resume", None) is not None:
            return  # an SSE stream since: its writer bounds its own stall
        on_stall: Callable[[], None] | None = getattr(self, "on_stall", None)
        if on_stall is not None:
            on_stall()
        reset(transport)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            transport = request.transport
            if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
                # A handler's write found its client gone ("Connection lost", a reset): the client's
                # doing, not an error of ours (README, logging), and nobody is left to answer. aiohttp
                # would log it at ERROR with a traceback, once per request.
                skipped = _gone.ready("http_client_gone")
                if skipped is not None:
                    log.debug("client %s gone mid-response: %s", request.remote, type(exc).__name__, extra=fields(
                        remote=request.remote, path=request.path, event="http_client_gone", suppressed=skipped,
                    ))  # fmt: skip
                raise ConnectionError("client gone")  # aiohttp's own "premature client disconnection"
            return super().handle_error(request, status, exc, message)
        log.debug("malformed request from %s: %s", request.remote, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started: cannot send the error")
        status, text = _parser_answer(status, message)
        resp = web.Response(status=status, text=text)
        resp.force_close()
        return resp


# llhttp's fixed openings for a line ended by a bare LF (request line, header line).
_BARE_LF_ERRORS = (
    "Bad status line:\n  Expected CRLF after version",
    "Missing expected CR after header value",
)


def _parser_answer(status: int, message: str | None) -> tuple[int, str]:
    """Status and body for a request aiohttp's parser refused: the WebSocket port's sentence (and,
    for too many header fields, its 431) where the rule is the same, else the status's phrase.

    Never the parser's own text, which quotes the request back.
    """
    if message is not None:
        if message.startswith(_BARE_LF_ERRORS):
            return 400, BARE_LF + "\n"
        if message.startswith("Too many headers"):
            return 431, f"more than {MAX_HEADER_LINES} header fields\n"  # RFC 6585 §5
        if message.startswith("Got more than 8190 bytes"):
            return 400, "a request line or header line longer than 8190 bytes\n"
    return status, f"{status} {HTTPStatus(status).phrase}\n"


class _QuietServer(web.Server):
    stall_limit: float = 0.0
    on_stall: Callable[[], None] | None = None

    def __call__(self) -> RequestHandler:
        handler = _QuietHandler(self, loop=self._loop, **self._kwargs)
        handler.stall_limit = self.stall_limit
        handler.on_stall = self.on_stall
        return handler


class QuietRunner(web.AppRunner):
    """An AppRunner whose connections use :class:`_QuietHandler` (aiohttp has no handler-class option).

    ``stall_limit`` (seconds, 0: none) and ``on_stall`` go to every connection: how long a
    response may wait for a client that reads nothing, and what to count when one is given up.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        stall_limit: float = 0.0,
        on_stall: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.stall_limit = stall_limit
        self.on_stall = on_stall

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _QuietServer  # same object and state, one method more
        assert isinstance(server, _QuietServer)
        server.stall_limit = self.stall_limit
        server.on_stall = self.on_stall
        return server


# The server API's bodies ignore fields they do not know, as WebSocket messages do
# (docs/protocol-choices.md: newer callers can talk to older servers).
class AdminPublish(msgspec.Struct):
    room: RoomName
    payload: msgspec.Raw


_admin_decoder = msgspec.json.Decoder(AdminPublish)
MAX_BROADCAST_ROOMS = 1000


class AdminBroadcast(msgspec.Struct):
    """``POST /broadcast`` body: one payload to 1-1000 distinct rooms, or (no ``rooms``) to every connection."""

    payload: msgspec.Raw
    rooms: Annotated[list[RoomName], msgspec.Meta(min_length=1, max_length=MAX_BROADCAST_ROOMS)] | None = None


_broadcast_decoder = msgspec.json.Decoder(AdminBroadcast)


class AdminDisconnect(msgspec.Struct):
    """``POST /disconnect`` body: close every connection of ``user``, cluster-wide."""

    user: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    code: int = CloseCode.DISCONNECTED
    reason: str = "disconnected by the server"


class AdminUnsubscribe(msgspec.Struct):
    """``POST /unsubscribe`` body: take ``user``'s connections out of ``room``, cluster-wide."""

    user: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    room: RoomName
    # The unsubscribed push's reason (omitted there when empty); the limit is Conn.leave's.
    reason: Annotated[str, msgspec.Meta(max_length=256)] = ""


#: The server API's sentences for a body field that fails its schema (protocol.describe_invalid).
BODY_RULES: dict[str, str] = {
    "room": ROOM_RULE,
    "rooms": f"rooms must be a list of 1 to {MAX_BROADCAST_ROOMS} distinct room names "
    "(or absent, to send to every connection)",
    "rooms[]": "{path}: " + ROOM_RULE,
    "user": "user must be a string of 1-256 characters",
    "code": "code must be an integer: 1000, 1001, 1008, 1011 or 4000-4999 (RFC 6455 7.4)",
    "reason": "reason must be a string (of at most 256 characters for /unsubscribe)",
}
_disconnect_decoder = msgspec.json.Decoder(AdminDisconnect)
_unsubscribe_decoder = msgspec.json.Decoder(AdminUnsubscribe)


class HistoryEntry(msgspec.Struct):
    seq: int
    sender: str = msgspec.field(name="from")
    payload: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class HistoryReply(msgspec.Struct):
    room: str
    seq: int
    epoch: str
    publications: list[HistoryEntry]


DEFAULT_ROOMS_LIMIT = 1000
MAX_ROOMS_LIMIT = 10_000


class RoomCount(msgspec.Struct):
    room: str
    subscribers: int


class RoomsReply(msgspec.Struct):
    """``GET /rooms``: a page of the cluster's rooms; ``next`` the ``after`` of the following page."""

    node: str
    rooms: list[RoomCount]
    next: str | None
    nodes: list[str]
    missing: list[str]


def _json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


@web.middleware
async def _routing_errors_in_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """An unknown path (404) or method (405, with ``Allow``) answered like every other error of this
    port, ``{"error": "..."}`` (aiohttp's own answer is a ``405: Method Not Allowed`` text)."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _json_error(405, f"{request.method} is not served here: use {allowed}", Allow=allowed)
    except web.HTTPNotFound:
        return _json_error(404, "no such endpoint")


def _room_param(request: web.Request) -> str | web.Response:
    """The one ``room`` query parameter, a valid room name (:func:`valid_room`), or the 400 to answer."""
    rooms = request.query.getall("room", [])
    if len(rooms) > 1:
        return _json_error(400, "more than one room parameter")
    room = rooms[0] if rooms else ""
    if not valid_room(room):
        return _json_error(400, ROOM_RULE)
    return room


def number_rule(name: str, low: int, high: int) -> str:
    """The one 400 sentence for a number given as text (query parameter or header) out of its rule."""
    top = "2^63-1" if high == SEQ_MAX else str(high)
    return f"{name} must be one integer from {low} to {top} in ASCII digits"


def _number(text: str, name: str, low: int, high: int) -> int | web.Response:
    """``text`` as an integer in ``low..high`` (:func:`parse_seq`: ASCII digits only), or the 400."""
    value = parse_seq(text)
    if value is None or not low <= value <= high:
        return _json_error(400, number_rule(name, low, high))
    return value


# The epoch part of an SSE event id: visible ASCII, at most the 64 characters of a join's epoch.
_EPOCH_TEXT = re.compile(r"[!-~]{1,64}\Z")
LAST_EVENT_ID_RULE = (
    "Last-Event-ID must be <epoch>:<seq> (this server's event ids) or <seq>, "
    "the seq one integer from 0 to 2^63-1 in ASCII digits"
)


def _event_id(text: str) -> tuple[int, str] | web.Response:
    """A ``Last-Event-ID`` as ``(since, epoch)``, or the 400 (``LAST_EVENT_ID_RULE``).

    ``<epoch>:<seq>`` is an id this server wrote (``sse_delivery``): the stream resumes as a
    WebSocket join with ``since`` and ``epoch`` does, so another incarnation of the room is told
    (``event: gap``), never continued. A bare ``<seq>`` (an id written before ids carried the
    epoch, or a page's own) counts in an unknown incarnation (``UNKNOWN_EPOCH``): after a restart
    it would look like a resumable seq of the new numbering, so it is never taken as one: a gap,
    and everything kept (docs/protocol-choices.md, "Epochs"). The seq is :func:`parse_seq`'s.
    """
    epoch, colon, seq = text.rpartition(":")
    value = parse_seq(seq)
    if value is None or value > SEQ_MAX or (colon and not _EPOCH_TEXT.match(epoch)):
        return _json_error(400, LAST_EVENT_ID_RULE)
    return value, epoch if colon else UNKNOWN_EPOCH


def _query_number(
    request: web.Request, name: str, low: int, high: int, default: int | None
) -> int | None | web.Response:
    """The query parameter ``name`` (``since``, ``limit``) as an integer in ``low..high``.

    One parser and one sentence (:func:`number_rule`) for every HTTP endpoint: absent gives
    ``default``; present it must be given once, as ASCII digits (:func:`parse_seq`; ``since=``
    empty, a sign, ``_``, spaces, non-ASCII digits are not numbers), in range; else the 400.
    """
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        return _json_error(400, number_rule(name, low, high))
    return _number(values[0], name, low, high)


def _json_payload(pub: Publication) -> msgspec.Raw:
    """A kept publication's payload as JSON (MessagePack ones transcoded; they passed payload_problem)."""
    if pub.encoding == Encoding.JSON:
        return msgspec.Raw(pub.payload)
    return msgspec.Raw(msgspec.json.encode(msgspec.msgpack.decode(pub.payload)))


class SseError(msgspec.Struct):
    """The data of an SSE stream's ``event: error``: why its join was refused (PROTOCOL.md, SSE)."""

    code: str
    message: str


class SsePeer:
    """A hub peer that hands SSE event bytes to the stream's writer task, bounded like a slow consumer.

    What the server holds for one stream is the queue here (``backlog`` bytes) plus the
    transport's write buffer (``buffered``); past ``limit`` (``--slow-consumer-limit``) the stream
    is a slow consumer: the queue is dropped and the stream ends with 4008, as a WebSocket
    connection is closed at the same limit (PROTOCOL.md, close codes).
    """

    def __init__(self, limit: int, transport: asyncio.Transport | None = None) -> None:
        self.chunks: deque[bytes] = deque()
        self.backlog = 0
        self.limit = limit
        self.transport = transport
        self.wakeup = asyncio.Event()
        self.close_code: int | None = None
        self.refusal: tuple[str, str] | None = None  # (code, message) of a refused join
        self.gone = False  # the client's connection is closed (``lost``)

    def buffered(self) -> int:
        """Bytes the server holds for this stream: our queue plus the transport's write buffer."""
        t = self.transport
        return self.backlog + (t.get_write_buffer_size() if t is not None else 0)

    def refused(self, code: str, message: str) -> None:
        """The stream's join was refused: an ``error`` event with ``code`` and ``message``, then
        ``close`` with 1013 (UNAVAILABLE: try again later), 1011 (INTERNAL) or 1008 (anything
        else: a hook's FORBIDDEN or its own code)."""
        self.refusal = (code, message)
        if code == ErrorCode.UNAVAILABLE:
            close = CloseCode.TRY_AGAIN_LATER
        elif code == ErrorCode.INTERNAL:
            close = CloseCode.INTERNAL_ERROR
        else:
            close = CloseCode.POLICY_VIOLATION
        self.close(close, message)

    def flush(self, session: Session) -> None:
        if not session.out:
            return
        if self.close_code == CloseCode.SLOW_CONSUMER:
            session.out.clear()  # dropped: nothing more is queued for a slow consumer
            return
        data = b"".join(session.out)
        session.out.clear()
        self.chunks.append(data)
        self.backlog += len(data)
        if self.buffered() > self.limit:
            self.slow()
        self.wakeup.set()

    def slow(self) -> None:
        """A slow consumer (over ``limit``, or a write that waited too long): drop the queue, end with 4008."""
        self.chunks.clear()
        self.backlog = 0
        self.close_code = (
            CloseCode.SLOW_CONSUMER
        )  # wins over an end asked for before: nothing queued is written
        self.wakeup.set()

    def close(self, code: int, reason: str) -> None:
        """End the stream with ``event: close`` / ``data: <code>``; the first end asked for wins."""
        if self.close_code is None:
            self.close_code = code
        self.wakeup.set()

    def lost(self) -> None:
        """The client is gone (its connection closed): the stream ends, nothing more is written."""
        self.gone = True
        self.wakeup.set()

    def resumed(self) -> None:
        """The transport's write buffer drained below its low-water mark: the writer may go on."""
        self.wakeup.set()


def _body_problem(exc: BaseException, shape: str) -> str:
    """Why a server API body was refused, in our words: ``body must be a JSON object {'room','payload'}``,
    then what is wrong with it (a field's rule from ``BODY_RULES``, a missing field, not JSON at all)."""
    expected = f"body must be a JSON object {shape}"
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        if " - at `$" not in text and not text.startswith("Object missing required field"):
            return expected  # the body is JSON, but not an object (an array, a number...)
    return f"{expected}: {describe_invalid(exc, 'JSON', BODY_RULES)}"


#: The server API's endpoints: 404 without --admin-key (``HttpSide._admin_only``).
ADMIN_PATHS = frozenset({"/publish", "/broadcast", "/history", "/rooms", "/disconnect", "/unsubscribe"})


class HttpSide:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.runner: web.AppRunner | None = None
        self.streams: set[asyncio.Task[None]] = set()
        self.peers: set[SsePeer] = set()  # the open streams' peers (``going_away``)
        self.refusals = Throttle()
        self.ends = Throttle()  # streams ended as slow consumers
        # A payload of --max-message-size fits, with room for the JSON around it.
        self.body_limit = node.settings.max_message_size + 1024
        app = web.Application(client_max_size=self.body_limit, middlewares=[_routing_errors_in_json])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/publish", self.publish)
        app.router.add_post("/broadcast", self.broadcast)
        app.router.add_get("/history", self.history)
        app.router.add_get("/rooms", self.rooms)
        app.router.add_post("/disconnect", self.disconnect)
        app.router.add_post("/unsubscribe", self.unsubscribe)
        # No HEAD: the answer to one would be a stream (a subscriber, body bytes a HEAD must not get).
        app.router.add_get("/sse", self.sse, allow_head=False)
        app.router.add_get("/presence", self.presence)
        app.router.add_get("/presence_stats", self.presence_stats)
        self.app = app

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Listen on ``host:port`` (https:// with ``tls``, the same context as the WebSocket port's)."""
        # keepalive_timeout bounds a connection's wait for its next request head, the first one
        # included (aiohttp arms it at connection_made): one header line a second, or nothing,
        # is dropped after --request-timeout, like the WebSocket port's handshake timeout.
        self.runner = QuietRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.node.settings.request_timeout,
            stall_limit=self.node.registry.stall_limit,
            on_stall=self._stalled,
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, host, port, reuse_port=self.node.settings.workers > 1, ssl_context=tls
        )
        await site.start()
        scheme = "http" if tls is None else "https"
        log.info("HTTP endpoints on %s://%s:%d (%s)", scheme, host, port, " ".join(self.served_paths()))

    def served_paths(self) -> list[str]:
        """The paths of this listener that answer, for the startup line: without them it would list
        endpoints that only say 404 here (``/metrics`` under ``--metrics-port`` or ``--workers`` > 1,
        the server API without ``--admin-key``)."""
        paths = {r.resource.canonical for r in self.app.router.routes() if r.resource is not None}
        if not self.node.public_metrics:
            paths.discard("/metrics")
        if not self.node.settings.admin_key:
            paths -= ADMIN_PATHS
        return sorted(paths)

    def _stalled(self) -> None:
        """A response given up: its client read nothing for the stall limit (``_QuietHandler._stalled``)."""
        self.node.hub.stats.http_stalled += 1
        skipped = self.ends.ready("http_stalled")
        if skipped is not None:
            log.info("resetting an HTTP connection: its client read nothing for %.0f s", self.node.registry.stall_limit,
                     extra=fields(event="http_stalled", suppressed=skipped))  # fmt: skip

    def going_away(self) -> None:
        """End every open stream with ``event: close`` / ``data: 1001``, as a drain closes every
        WebSocket connection with 1001 (PROTOCOL.md, shutdown); what was queued before goes first."""
        for peer in list(self.peers):
            peer.close(CloseCode.GOING_AWAY, "server going away")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop the listener: streams get ``going_away`` and up to ``grace`` seconds to write it
        (``_finish``), then what is left is cancelled."""
        self.going_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.streams and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self.streams):
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    def _refused(
        self,
        request: web.Request,
        status: int,
        why: str,
        level: int,
        kind: str,
        user: str | None = None,
        room: str | None = None,
    ) -> web.Response:
        """A refused request as JSON ``{"error": why}``, logged (throttled per kind) with the peer's address."""
        skipped = self.refusals.ready(kind)
        if skipped is not None:
            peer = request.transport.get_extra_info("peername") if request.transport is not None else None
            log.log(level, "refused %s %s: %d %s", request.method, request.path, status, why, extra=fields(
                code=status, reason=why, remote=peer_text(peer), path=request.path, user=user, room=room,
                event="http_refused", suppressed=skipped,
            ))  # fmt: skip
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return _json_error(status, why, **headers)

    def _is_admin(self, request: web.Request) -> bool | Refusal:
        """Whether the request carries ``Authorization: Bearer <--admin-key>`` (constant-time compare).

        False without a configured key; a :class:`Refusal` (400) for two ``Authorization`` headers.
        aiohttp hands header bytes that are not UTF-8 over as lone surrogates: the bytes as sent
        are compared, so they are simply a wrong key, not an encoding error.
        """
        key = self.node.settings.admin_key
        given = single(request.headers, "Authorization")
        if isinstance(given, Refusal):
            return given
        sent = (given or "").encode("utf-8", "surrogateescape")
        return bool(key) and hmac.compare_digest(sent, f"Bearer {key}".encode())

    async def _identity(
        self, request: web.Request, room: str, verb: str, kind: str
    ) -> Identity | None | web.Response:
        """The request's token identity, allowed in ``room`` (None: no auth configured), or the logged
        refusal to answer with: 401 with the token's fixed reason, 403 ``not allowed to <verb> 'room'``."""
        auth = self.node.authenticator
        if auth is None:
            return None
        try:
            identity = await auth.verify_async(token_from_request(request.headers, request.query_string))
        except AuthError as exc:
            return self._refused(request, exc.status, str(exc), logging.INFO, f"{kind}_auth", room=room)
        if not identity.allows(room):
            why = f"not allowed to {verb} {room!r}"
            return self._refused(request, 403, why, logging.INFO, f"{kind}_forbidden", identity.user, room)
        return identity

    async def healthz(self, request: web.Request) -> web.Response:
        if self.node.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.node.public_metrics:
            return web.Response(status=404, text="not here: /metrics is served on --metrics-port\n")
        return web.Response(body=self.node.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _admin_only(self, request: web.Request) -> web.Response | None:
        """The server API's gate: 404 without ``--admin-key``, 401 (logged) without the key, 400 for two keys."""
        if not self.node.settings.admin_key:
            return _json_error(404, "the server API is off: start the server with --admin-key")
        admin = self._is_admin(request)
        if isinstance(admin, Refusal):
            return _json_error(admin.status, admin.reason)
        if not admin:
            # WARNING: someone without the key tried the admin endpoint (the key itself is never logged).
            return self._refused(request, 401, "missing or wrong admin key", logging.WARNING, "admin_key")
        return None

    async def _admin_body(self, request: web.Request) -> bytes | web.Response:
        """The request body, read within ``--request-timeout`` (408) and ``--max-message-size`` (413,
        at once when ``Content-Length`` announces more).

        A client that disconnects before the whole body arrived (any ``ConnectionError``) is logged at
        DEBUG (aiohttp would log it with a traceback at ERROR, once per such request).
        """
        too_big = _json_error(
            413,
            f"body larger than {self.body_limit} bytes (--max-message-size "
            f"{self.node.settings.max_message_size} + 1024 for the JSON around the payload)",
        )
        announced = request.content_length
        if announced is not None and announced > self.body_limit:
            # Refused on its Content-Length, before a byte of it is read (else: 408 after the timeout).
            too_big.force_close()
            return too_big
        try:
            async with asyncio.timeout(self.node.settings.request_timeout):
                return await request.read()
        except TimeoutError:
            return _json_error(408, "request body not received in time")
        except ConnectionError:  # the client went away mid-body (reset, lost): its doing, nobody to answer
            log.debug("admin request body cut short by %s", request.remote)
            return _json_error(400, "request body cut short")
        except web.HTTPRequestEntityTooLarge:
            return too_big

    async def _admin_request(
        self, request: web.Request, decoder: msgspec.json.Decoder[Any], shape: str
    ) -> Any:
        """The admin key, the bounded body, then the decoded body: the message, or the refusal to send.

        Any decoder failure (RecursionError too) is a 400 naming ``shape`` in our words
        (``_body_problem``).
        """
        refused = self._admin_only(request)
        if refused is not None:
            return refused
        body = await self._admin_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            return decoder.decode(body)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad body
            return _json_error(400, _body_problem(exc, shape))

    async def publish(self, request: web.Request) -> web.Response:
        msg = await self._admin_request(request, _admin_decoder, "{'room','payload'}")
        if isinstance(msg, web.Response):
            return msg
        try:
            result = self.node.hub.publish(msg.room, "server", bytes(msg.payload), Encoding.JSON)
            pub = result if isinstance(result, Publication) else await result
        except PayloadRefused as exc:  # our own words: why the payload cannot reach every encoding
            return _json_error(400, str(exc))
        except BrokerUnavailable as exc:  # why is in the broker's log; a client learns only what to do
            return _json_error(503, exc.public, **{"Retry-After": "1"})
        return web.json_response({"room": pub.room, "seq": pub.seq})

    async def broadcast(self, request: web.Request) -> web.Response:
        """``POST /broadcast`` ``{"rooms": [...], "payload": any}``: one publication per room, in order.

        200 ``{"results": [{"room","seq"}]}``; 400 bad body, duplicate rooms or a payload not
        deliverable in both encodings (nothing published); 503 ``{"error", "results"}`` when the
        broker failed midway (``results``: the rooms published before it).

        Without ``rooms`` (``{"payload": any}``): every WebSocket connection on every node gets
        ``{"type":"broadcast","payload"}`` (no room, no seq: ``control.broadcast``); 200
        ``{"to": "all"}`` once the broker took it; 400 payload refused; 503 broker unavailable.
        """
        msg = await self._admin_request(request, _broadcast_decoder, "{'rooms'?,'payload'}")
        if isinstance(msg, web.Response):
            return msg
        if msg.rooms is None:
            try:
                result = control.broadcast(self.node.hub, bytes(msg.payload))
                if not isinstance(result, Publication):
                    await result
            except PayloadRefused as exc:
                return _json_error(400, str(exc))
            except BrokerUnavailable as exc:
                return _json_error(503, exc.public, **{"Retry-After": "1"})
            return web.json_response({"to": "all"})
        if len(set(msg.rooms)) != len(msg.rooms):
            return _json_error(400, "rooms must be distinct")
        payload = bytes(msg.payload)
        problem = payload_problem(payload, Encoding.JSON)
        if problem is not None:
            return _json_error(400, problem)
        results: list[dict[str, Any]] = []
        hub = self.node.hub
        for room in msg.rooms:
            try:
                result = hub.publish(room, "server", payload, Encoding.JSON)
                pub = result if isinstance(result, Publication) else await result
            except BrokerUnavailable as exc:
                return web.json_response(
                    {"error": exc.public, "results": results}, status=503, headers={"Retry-After": "1"}
                )
            results.append({"room": room, "seq": pub.seq})
        return web.json_response({"results": results})

    async def disconnect(self, request: web.Request) -> web.Response:
        """``POST /disconnect`` ``{"user", "code"?, "reason"?}``: every connection of the user, on every
        node, gets a close frame with ``code`` (default 4003) and ``reason``; 200 ``{"user","code"}`` once
        the broker took the command; 400 bad body or code; 503 broker unavailable."""
        return await self._command(request, _disconnect_decoder, "{'user','code','reason'}")

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """``POST /unsubscribe`` ``{"user","room","reason"?}``: the user's connections leave ``room`` on
        every node, each told with ``{"type":"unsubscribed","room","reason"?}`` (others get ``left``
        where the namespace has join_leave); 200 ``{"user","room"}``."""
        return await self._command(request, _unsubscribe_decoder, "{'user','room','reason'}")

    async def _command(
        self, request: web.Request, decoder: msgspec.json.Decoder[Any], shape: str
    ) -> web.Response:
        msg = await self._admin_request(request, decoder, shape)
        if isinstance(msg, web.Response):
            return msg
        if isinstance(msg, AdminDisconnect):
            problem = close_problem(msg.code, msg.reason)
            if problem is not None:
                return _json_error(400, problem)
            command: control.Command = control.Disconnect(msg.user, msg.code, msg.reason)
            answer = {"user": msg.user, "code": msg.code}
        else:
            command = control.Unsubscribe(msg.user, msg.room, msg.reason)
            answer = {"user": msg.user, "room": msg.room}
        try:
            result = control.send(self.node.hub, command)
            if not isinstance(result, Publication):
                await result
        except BrokerUnavailable as exc:
            return _json_error(503, exc.public, **{"Retry-After": "1"})
        return web.json_response(answer)

    async def history(self, request: web.Request) -> web.Response:
        """``GET /history?room=[&since=]``: what the broker keeps of a room, cluster-wide.

        200 ``{"room","seq","epoch","publications":[{"seq","from","payload"}]}`` (publications after
        ``since``, default all kept, oldest first); 400 bad room or since; 503 broker unavailable.
        Up to ``--history-size`` x ``--max-message-size`` (about 19 MB by default): a client that
        stops reading it is reset after the stall limit (``_QuietHandler``, PROTOCOL.md).
        """
        refused = self._admin_only(request)
        if refused is not None:
            return refused
        room = _room_param(request)
        if isinstance(room, web.Response):
            return room
        since = _query_number(request, "since", 0, SEQ_MAX, 0)
        if isinstance(since, web.Response):
            return since
        assert since is not None
        try:
            hist = self.node.hub.broker.history(room, since)
            if inspect.isawaitable(hist):
                hist = await hist
        except BrokerUnavailable as exc:
            return _json_error(503, exc.public, **{"Retry-After": "1"})
        entries = [HistoryEntry(p.seq, p.sender, _json_payload(p)) for p in hist.publications]
        reply = HistoryReply(room=room, seq=hist.seq, epoch=hist.epoch, publications=entries)
        return web.Response(body=msgspec.json.encode(reply), content_type="application/json")

    async def rooms(self, request: web.Request) -> web.Response:
        """``GET /rooms[?prefix=P][&after=R][&limit=N]``: rooms with subscribers across the cluster.

        200 ``{"node","rooms":[{"room","subscribers"}],"next","nodes","missing"}``: subscribers
        (WebSocket and SSE) summed over every worker and node that answered within
        ``control.SURVEY_TIMEOUT_S`` (``nodes``; ``missing``: those that did not, or could not: a node
        not connected to the broker, killed -9, is not waited for; ``Control.reachable``), sorted by room
        name, at most ``limit`` (1-10000, default 1000) named after ``after`` and starting with
        ``prefix``; ``next`` is the ``after`` of the following page (null on the last). 400 bad
        parameter; 503 broker unavailable. A survey over the control room (server/control.py).
        """
        refused = self._admin_only(request)
        if refused is not None:
            return refused
        query = request.query
        params: dict[str, str] = {}
        for name in ("prefix", "after"):
            values = query.getall(name, [])
            if len(values) > 1:
                return _json_error(400, f"more than one {name} parameter")
            if values:
                params[name] = values[0]
        for name in ("prefix", "after"):
            if params.get(name) and not valid_room(params[name]):
                return _json_error(400, f"{name} must be 1-128 characters of A-Z a-z 0-9 _ . : -")
        limit = _query_number(request, "limit", 1, MAX_ROOMS_LIMIT, DEFAULT_ROOMS_LIMIT)
        if isinstance(limit, web.Response):
            return limit
        assert limit is not None
        control = self.node.control
        assert control is not None  # joined at start, before this side listens
        try:
            page = await control.rooms(params.get("prefix", ""), params.get("after", ""), limit)
        except BrokerUnavailable as exc:
            return _json_error(503, exc.public, **{"Retry-After": "1"})
        reply = RoomsReply(
            node=self.node.node_id,
            rooms=[RoomCount(name, count) for name, count in page.rooms],
            next=page.rooms[-1][0] if page.more and page.rooms else None,
            nodes=page.nodes,
            missing=page.missing,
        )
        return web.Response(body=msgspec.json.encode(reply), content_type="application/json")

    async def presence(self, request: web.Request) -> web.Response:
        """``GET /presence?room=``: ``{"room","presence":[{"conn","user","joined_at"}]}``."""
        return await self._presence(request, stats=False)

    async def presence_stats(self, request: web.Request) -> web.Response:
        """``GET /presence_stats?room=``: ``{"room","connections","users"}``."""
        return await self._presence(request, stats=True)

    async def _presence(self, request: web.Request, stats: bool) -> web.Response:
        """Admin key (any room: the operator's API) or a user's JWT (rooms its ``rooms`` claim allows,
        then the application's before_join hooks, as a WebSocket ``presence``: ``_gated_read``); open
        to anyone on an anonymous server, hooks included.

        400 bad room, 401 bad credentials, 403 room not allowed (by the claim or a hook), 404
        presence off in the room's namespace, 500 a hook failed, 503 broker unavailable.
        """
        room = _room_param(request)
        if isinstance(room, web.Response):
            return room
        admin = self._is_admin(request)
        if isinstance(admin, Refusal):
            return _json_error(admin.status, admin.reason)
        hub = self.node.hub
        if not admin:
            identity = await self._identity(request, room, "see who is in", "presence")
            if isinstance(identity, web.Response):
                return identity
            # A user's read: the rule of a WebSocket presence request, the application's
            # before_join hooks included (which may refuse it or choose another room).
            chosen = await self._gated_read(room, identity)
            if isinstance(chosen, web.Response):
                return chosen
            room = chosen
        if not hub.namespaces.of(room).presence:
            return _json_error(404, f"presence is off for {room!r} (its namespace)")
        broker = hub.broker
        try:
            result = broker.presence_stats(room) if stats else broker.presence(room)
            if inspect.isawaitable(result):
                result = await result
        except BrokerUnavailable as exc:
            return _json_error(503, exc.public, **{"Retry-After": "1"})
        return web.Response(
            body=msgspec.json.encode(presence_data(room, result)), content_type="application/json"
        )

    async def _gated_read(self, room: str, identity: Identity | None) -> str | web.Response:
        """``Hub.read_gate`` for one request: the room to read, or the refusal as
        ``{"error": message, "code": code}``: 403 for ``FORBIDDEN`` and an application's own
        code, 500 ``INTERNAL``, 503 ``UNAVAILABLE`` (with ``Retry-After: 1``)."""
        hub = self.node.hub
        if hub.gate is None:
            return room
        peer = RequestPeer()
        s = hub.request_session(peer, identity.user if identity is not None else None, identity)
        try:
            chosen = await hub.read_gate(s, room)
        finally:
            hub.end_request(s)
        if chosen is not None:
            return chosen
        code, message = peer.refusal or (ErrorCode.INTERNAL, "internal error")
        status = 500 if code == ErrorCode.INTERNAL else 503 if code == ErrorCode.UNAVAILABLE else 403
        headers = {"Retry-After": "1"} if status == 503 else None
        return web.json_response({"error": message, "code": code}, status=status, headers=headers)

    async def sse(self, request: web.Request) -> web.StreamResponse:
        """``GET /sse?room=R[&since=N][&token=T]``: a room's deliveries as Server-Sent Events.

        Every input is checked before the stream opens, each with a 400 and a fixed reason:
        ``room`` (one, :func:`valid_room`), ``since`` (one, ASCII digits, :func:`_query_number`; an
        empty ``since=`` is 400), ``Last-Event-ID`` (one, :func:`_event_id`: ``<epoch>:<seq>`` or
        ``<seq>``; an empty one is none),
        ``Origin`` (403 outside ``--allowed-origins``), admission (``Node.admission``, the rule of a
        WebSocket upgrade: 503 with ``Retry-After`` while draining, past ``--max-connections`` or
        ``--max-connections-per-ip``, which count streams and WebSocket connections together, once
        only ``--fd-reserve`` fds are left, past ``--max-handshake-rate``), the token (401).
        """
        room = _room_param(request)
        if isinstance(room, web.Response):
            return room
        last_event_id = single(request.headers, "Last-Event-ID")
        if isinstance(last_event_id, Refusal):
            return _json_error(last_event_id.status, last_event_id.reason)
        since = _query_number(request, "since", 0, SEQ_MAX, None)
        if isinstance(since, web.Response):
            return since
        epoch: str | None = None
        if last_event_id:  # an EventSource's reconnect: it wins over the URL's since (an empty one is none)
            resumed = _event_id(last_event_id)
            if isinstance(resumed, web.Response):
                return resumed
            since, epoch = resumed
        refused = self.node.origins.check(request.headers)
        if refused is not None:
            return self._refused(
                request, refused.status, refused.reason, logging.INFO, "sse_origin", room=room
            )
        # Admission as for a WebSocket upgrade, before the token's work: a stream holds an fd and a
        # place in the connection limits for as long as it lives (server/fds.py, Node.admission).
        node = self.node
        peername = request.transport.get_extra_info("peername") if request.transport is not None else None
        ip = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        refusal = node.admission(lambda: ip)
        if refusal is not None:
            if refusal.counted:
                node._reject(refusal.kind)
            refused = self._refused(
                request, 503, refusal.why, logging.WARNING, f"sse_{refusal.kind}", room=room
            )
            refused.headers["Retry-After"] = refusal.retry_after
            return refused
        # Counted from here (no await in between: two requests cannot both take the last place).
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        held = node.registry.hold_ip(peername)
        try:
            return await self._stream(request, room, since, epoch)
        finally:
            self.streams.discard(task)
            node.registry.release_ip(held)

    async def _stream(
        self, request: web.Request, room: str, since: int | None, epoch: str | None
    ) -> web.StreamResponse:
        """An admitted ``GET /sse``: the token, then the stream until it ends.

        A client that goes while it is written to (``ConnectionError``: aiohttp's ``Connection
        lost``, ``ClientConnectionResetError``, a reset) is its doing: one DEBUG line a second
        (``_client_gone``), never aiohttp's ERROR traceback.
        """
        identity = await self._identity(request, room, "join", "sse")
        if isinstance(identity, web.Response):
            return identity
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        protocol = request.protocol
        transport = request.transport
        try:
            writer = await resp.prepare(request)
        except ConnectionError:
            self._client_gone(request, room)
            return resp
        if (
            transport is None
            or not isinstance(writer, StreamWriter)
            or not isinstance(protocol, _QuietHandler)
        ):
            return resp  # gone before the stream began (or not our connection handler: no stream)
        hub = self.node.hub
        peer = SsePeer(self.node.settings.slow_consumer_limit, transport)
        self.peers.add(peer)
        protocol.on_lost = peer.lost
        protocol.on_resume = peer.resumed
        s = hub.open_stream(peer, identity.user if identity else None, identity)
        tail: bytes | None = None
        try:
            # ``: joined <room>`` comes from the hub once the join took effect, naming the room it
            # took effect in (a before_join hook may move it); a refused join gets none.
            hub.join(s, room, since, epoch=epoch)
            tail = await self._pump(writer, protocol, peer, identity, s)
        except ConnectionError:
            self._client_gone(request, room)
        except asyncio.CancelledError:
            pass
        finally:
            hub.close(s)  # out of its room now, not once the client has read the closing events
            protocol.on_resume = None
            self.peers.discard(peer)
        if peer.close_code == CloseCode.SLOW_CONSUMER:
            hub.stats.slow_consumer_closes += 1
            skipped = self.ends.ready("sse_slow_consumer")
            if skipped is not None:
                log.info(
                    "ending SSE stream of %s with 4008: slow consumer", s.user, extra=fields(
                        user=s.user, room=room, code=CloseCode.SLOW_CONSUMER, reason="slow consumer",
                        remote=peer_text(transport.get_extra_info("peername")),
                        event="sse_slow_consumer", suppressed=skipped,
                    ),
                )  # fmt: skip
        if tail is not None and not peer.gone:
            try:
                await self._finish(resp, writer, transport, peer, tail)
            except ConnectionError:
                self._client_gone(request, room)
            except asyncio.CancelledError:
                pass
        return resp

    def _client_gone(self, request: web.Request, room: str) -> None:
        """A stream's client went while the server wrote to it: DEBUG, one line a second."""
        skipped = _gone.ready("sse_client_gone")
        if skipped is not None:
            log.debug("SSE client %s gone mid-write", request.remote, extra=fields(
                room=room, remote=request.remote, event="sse_client_gone", suppressed=skipped,
            ))  # fmt: skip

    async def _pump(
        self,
        writer: StreamWriter,
        protocol: _QuietHandler,
        peer: SsePeer,
        identity: Identity | None,
        s: Session,
    ) -> bytes | None:
        """Write the stream's events until it ends; return its closing events (None: the client left).

        Writes never wait (aiohttp's drain has no timeout): while the transport holds more than
        its high-water mark (``writing_paused``: the client has not read it) nothing more goes in,
        deliveries wait in ``peer``'s queue, and ``SsePeer.flush`` ends the stream with 4008 once
        queue and transport buffer pass ``--slow-consumer-limit``. A wait longer than the stall
        limit (``ConnectionRegistry.stall_limit``: --heartbeat + --heartbeat-timeout + the 2 s
        close grace, 42 s by default, the bound of a WebSocket connection whose output made no
        progress; none with --heartbeat 0) ends it with 4008 too. What the hub queued before the
        end is part of the closing events (an ``unsubscribed``), unless the stream ended for being slow.
        """
        loop = asyncio.get_running_loop()
        expires = identity.expires_at if identity is not None else None
        stall = self.node.registry.stall_limit
        paused_at: float | None = None
        while peer.close_code is None:
            if peer.gone:
                return None
            timeout = SSE_KEEPALIVE_S
            if expires is not None:
                left = expires - time.time()
                if left <= 0:
                    return b"event: close\ndata: token expired\n\n"
                timeout = min(timeout, left)
            peer.wakeup.clear()
            if protocol.writing_paused:
                now = loop.time()
                if paused_at is None:
                    paused_at = now
                if stall:
                    if now - paused_at >= stall:
                        peer.slow()
                        break
                    timeout = min(timeout, paused_at + stall - now)
                await _wait(peer, timeout)
                continue
            paused_at = None
            if peer.chunks:
                data = peer.chunks[0] if len(peer.chunks) == 1 else b"".join(peer.chunks)
                peer.chunks.clear()
                peer.backlog = 0
                await writer.write(data, drain=False)
            elif not await _wait(peer, timeout):
                # A comment line: keeps proxies and load balancers from closing an idle stream.
                await writer.write(b": keepalive\n\n", drain=False)
        if peer.close_code != CloseCode.SLOW_CONSUMER:
            peer.flush(s)  # queued but not flushed yet: the hub flushes at the end of the loop turn
        code = peer.close_code
        parts = [] if code == CloseCode.SLOW_CONSUMER else list(peer.chunks)
        peer.chunks.clear()
        peer.backlog = 0
        if peer.refusal is not None and code != CloseCode.SLOW_CONSUMER:
            error = msgspec.json.encode(SseError(*peer.refusal))  # one line: JSON escapes newlines
            parts.append(b"event: error\ndata: %s\n\n" % error)
        parts.append(b"event: close\ndata: %d\n\n" % code)
        return b"".join(parts)

    async def _finish(
        self,
        resp: web.StreamResponse,
        writer: StreamWriter,
        transport: asyncio.Transport,
        peer: SsePeer,
        tail: bytes,
    ) -> None:
        """End a stream: ``tail`` (its closing events), the end of the chunked body, and the connection.

        The client gets the close grace of a WebSocket close to read what is still unsent
        (``transport.unsent_bytes``: our transport's buffer and the kernel's): ``CLOSE_GRACE_S``,
        again while it reads at least ``MIN_CLOSE_PROGRESS`` bytes per grace, at most
        ``MAX_GRACE_EXTENSIONS`` times. One that does not is reset (``transport.reset``), which
        frees at once what the kernel holds for it instead of leaving an orphan socket with it.
        """
        resp.force_close()  # the stream was this connection's purpose; a client reconnects anew
        await writer.write(tail, drain=False)
        loop = asyncio.get_running_loop()
        left = 0 if transport.is_closing() else unsent_bytes(transport)
        before, extensions = left, 0
        deadline = loop.time() + CLOSE_GRACE_S
        poll = 0.005
        while left and not transport.is_closing():  # closing: lost, or reset (its fd is gone)
            now = loop.time()
            if now >= deadline:
                if before - left >= MIN_CLOSE_PROGRESS and extensions < MAX_GRACE_EXTENSIONS:
                    before, extensions = left, extensions + 1
                    deadline = now + CLOSE_GRACE_S
                else:
                    reset(transport)
                    return
            peer.wakeup.clear()
            await _wait(peer, min(poll, deadline - now))
            poll = min(poll * 2, 0.25)
            left = 0 if transport.is_closing() else unsent_bytes(transport)
        await resp.write_eof()  # ConnectionError once the client is gone (the caller's to catch)


async def _wait(peer: SsePeer, timeout: float) -> bool:
    """Wait for ``peer``'s wakeup at most ``timeout`` seconds: True when it came."""
    try:
        async with asyncio.timeout(timeout):
            await peer.wakeup.wait()
    except TimeoutError:
        return False
    return True
