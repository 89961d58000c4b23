"""One WebSocket connection on picows: handshake, frames in, frames out, close. No pub/sub logic.

A ``Connection`` lives exactly as long as one socket; reconnecting creates a new
one. The listener decodes each frame once, stamps deliveries with their arrival
time, and hands them to two callables supplied by the client (deliveries on the
hot path, everything else on the cold path), so this module never needs to know
about rooms, requests or retries.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSError,
    WSFrame,
    WSHandshakeError,
    WSInvalidURL,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    ws_connect,
)
from picows.url import parse_url

from wsfan.client.backoff import parse_retry_after
from wsfan.client.codec import Codec
from wsfan.client.errors import ClientError, ConnectionClosed, HandshakeRejected, InvalidURL, Unauthorized
from wsfan.server.wire import MSGPACK_SUBPROTOCOL, Broadcast, Message, Outbound, Welcome

log = logging.getLogger(__name__)

ABNORMAL_CLOSURE = 1006  # RFC 6455: no close frame was received (socket died, or we aborted it)
DeliveryFn = Callable[[Message], None]
ReplyFn = Callable[[Outbound | Any], None]  # replies, events, and pushes (any application type)
LostFn = Callable[["Connection", int, str], None]

_TEXT, _BINARY, _CLOSE, _CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE, WSMsgType.CONTINUATION


class _Listener(WSListener):
    """picows callbacks for one connection. Must never raise: picows would close the socket with 1011."""

    def __init__(
        self, codec: Codec, on_delivery: DeliveryFn, on_reply: ReplyFn, response: WSUpgradeResponse
    ) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.codec = codec
        self.response = response
        self.on_delivery = on_delivery
        self.on_reply = on_reply
        self.on_lost: LostFn | None = None
        self.connection: Connection | None = None
        self.welcome: asyncio.Future[Welcome] = loop.create_future()
        self.closed: asyncio.Future[tuple[int, str]] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self._fragments: bytearray | None = None
        # permessage-deflate (RFC 7692), set after the handshake if the server accepted our offer:
        # the inflater, and whether the server keeps its context between messages
        self.inflater: Any = None
        self.server_takeover = False
        self._compressed = False
        self.writable: asyncio.Future[None] | None = None  # pending while picows paused our writes
        # Raw payloads keep a reference to the decoded buffer, and picows reuses its
        # read buffer after on_ws_frame returns: those must decode from a bytes copy.
        self._copy = codec.raw_payloads

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        received_at = perf_counter()
        kind = frame.msg_type
        if kind is _TEXT or kind is _BINARY:
            self._compressed = frame.rsv1 and self.inflater is not None
            if not frame.fin:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
                return
            data: Any = frame.get_payload_as_bytes() if self._copy else frame.get_payload_as_memoryview()
        elif kind is _CONT:
            if self._fragments is None:
                return
            self._fragments += frame.get_payload_as_memoryview()
            if not frame.fin:
                return
            data, self._fragments = bytes(self._fragments), None
        elif kind is _CLOSE:
            self._on_close_frame(transport, frame)
            return
        else:
            return  # PING is answered by picows (auto-pong), PONG consumed by its auto-ping
        if self._compressed:
            self._compressed = False
            try:
                data = self._inflate(data)
            except zlib.error:
                log.warning("invalid permessage-deflate data from the server; closing")
                transport.send_close(WSCloseCode.PROTOCOL_ERROR)
                transport.disconnect()
                return
        try:
            msg = self.codec.decode(data)
        except Exception:  # noqa: BLE001 - a hostile server's nesting raises RecursionError
            self._push(data)  # the cold path: an application's own message type, or garbage
            return
        try:
            if isinstance(msg, Message):
                msg.received_at = received_at
                self.on_delivery(msg)
            elif type(msg) is Welcome:
                if not self.welcome.done():
                    self.welcome.set_result(msg)
            else:
                if isinstance(msg, Broadcast):
                    msg.received_at = received_at
                self.on_reply(msg)
        except Exception:
            log.exception("client callback failed while handling %s", type(msg).__name__)

    def _push(self, data: bytes | memoryview) -> None:
        """A message the protocol's union could not decode: hand it over as an application push, or log it."""
        try:
            push = self.codec.decode_push(data)
        except Exception as exc:  # noqa: BLE001 - NotAPush, DecodeError, RecursionError alike
            log.warning("ignoring undecodable server message: %s", type(exc).__name__)
            return
        try:
            self.on_reply(push)
        except Exception:
            log.exception("client callback failed while handling a %s push", type(push).__name__)

    def _inflate(self, data: bytes | memoryview) -> bytes:
        """One compressed message (RFC 7692 §7.2.2): append the stripped tail and inflate."""
        inflater = self.inflater
        if not self.server_takeover:
            inflater = self.inflater = zlib.decompressobj(-15)  # no shared context: a fresh one each time
        return inflater.decompress(bytes(data) + b"\x00\x00\xff\xff")

    def _on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        code = frame.get_close_code()
        self.close_code = int(code)
        try:
            self.close_reason = frame.get_close_reason()
        except UnicodeDecodeError:
            self.close_reason = ""
        # Complete the closing handshake (RFC 6455 5.5.1). The server sends nothing after
        # its close frame, so our side can be closed right away (graceful: the echo is flushed).
        transport.send_close(code if self.close_code else WSCloseCode.OK)
        transport.disconnect()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.resume_writing()  # nobody may wait for a dead socket to drain
        code, reason = self.close_code, self.close_reason
        if code is None:
            code = ABNORMAL_CLOSURE
            shake = transport.close_handshake
            sent = shake.sent if shake is not None else None
            if sent is not None and int(sent.code) == WSCloseCode.GOING_AWAY.value:
                reason = reason or "no pong from wsfan.server (dead connection)"
        if not self.closed.done():
            self.closed.set_result((code, reason))
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionClosed(code, reason or "closed before welcome"))
            self.welcome.exception()  # retrieved here: nobody may await it any more
        if self.on_lost is not None and self.connection is not None:
            try:
                self.on_lost(self.connection, code, reason)
            except Exception:
                log.exception("client connection-lost callback failed")


class Connection:
    """An open WebSocket that has received its welcome."""

    __slots__ = ("welcome", "subprotocol", "_transport", "_listener", "_opcode")

    def __init__(self, transport: WSTransport, listener: _Listener, welcome: Welcome) -> None:
        self._transport = transport
        self._listener = listener
        self._opcode = listener.codec.opcode
        self.welcome = welcome
        self.subprotocol = listener.response.headers.get("Sec-WebSocket-Protocol")

    @property
    def is_open(self) -> bool:
        return not self._listener.closed.done() and not self._transport.is_close_frame_sent

    @property
    def closed(self) -> asyncio.Future[tuple[int, str]]:
        """Resolves to ``(close code, reason)`` when the socket is gone."""
        return self._listener.closed

    def send(self, data: bytes) -> None:
        self._transport.send(self._opcode, data)

    @property
    def writable(self) -> bool:
        """False while the socket's write buffer is over its high-water mark."""
        return self._listener.writable is None

    async def drain(self) -> None:
        """Wait until the write buffer fell below its low-water mark (or the socket closed)."""
        waiter = self._listener.writable
        if waiter is not None:
            await asyncio.shield(waiter)

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> tuple[int, str]:
        """Start the closing handshake and wait for the server to end the socket (abort after ``timeout``)."""
        if not self._listener.closed.done():
            if not self._transport.is_close_frame_sent:
                self._transport.send_close(WSCloseCode(code), reason.encode())
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._listener.closed)
            except TimeoutError:
                self._transport.disconnect(graceful=False)
                await asyncio.shield(self._listener.closed)
        return self._listener.closed.result()

    def abort(self) -> None:
        self._transport.disconnect(graceful=False)


async def open_connection(
    url: str,
    codec: Codec,
    *,
    on_delivery: DeliveryFn,
    on_reply: ReplyFn,
    on_lost: LostFn,
    token: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    open_timeout: float | None = 5.0,
    ping_interval: float | None = 20.0,
    ping_timeout: float = 10.0,
    max_frame_size: int = 16 * 1024 * 1024,
    compression: bool = False,
    **picows_options: Any,
) -> Connection:
    """Connect, negotiate the encoding, and wait for the server's welcome.

    ``compression=True`` offers permessage-deflate (RFC 7692): what the server compresses
    is inflated here; what this client sends goes uncompressed (§6 lets a sender choose).

    Raises ``Unauthorized`` (401), ``HandshakeRejected`` (other HTTP status, with
    ``retry_after`` and the server's reason in its message), ``InvalidURL``,
    ``ConnectionClosed`` (closed before the welcome, or an upgrade answer picows could not
    use), ``TimeoutError`` or ``OSError``; never picows' own exceptions.
    """
    extra = list(headers)
    if token:
        extra.append(("Authorization", f"Bearer {token}"))
    if codec.encoding == "msgpack":
        extra.append(("Sec-WebSocket-Protocol", MSGPACK_SUBPROTOCOL))
    if compression:
        extra.append(("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"))

    def factory(request: WSUpgradeRequest, response: WSUpgradeResponse) -> _Listener:
        listener = _Listener(codec, on_delivery, on_reply, response)
        agreed = (response.headers.get("Sec-WebSocket-Extensions") or "").lower() if compression else ""
        if "permessage-deflate" in agreed:  # set before any frame can arrive
            listener.inflater = zlib.decompressobj(-15)
            listener.server_takeover = "server_no_context_takeover" not in agreed
        return listener

    transport: WSTransport | None = None
    try:
        async with asyncio.timeout(open_timeout):
            transport, listener = await ws_connect(
                factory,
                url,
                extra_headers=extra,
                websocket_handshake_timeout=open_timeout,
                enable_auto_ping=ping_interval is not None,
                auto_ping_idle_timeout=ping_interval or 20.0,
                # picows requires reply timeout <= idle timeout
                auto_ping_reply_timeout=min(ping_timeout, ping_interval or ping_timeout),
                auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
                enable_auto_pong=True,
                max_frame_size=max_frame_size,
                max_redirects=0,
                **picows_options,
            )
            if listener is None:
                # picows resolves the handshake with no listener when the socket closed before the
                # server's answer (WSProtocol.connection_lost: ``set_result(None)``), e.g. a server that
                # exits while draining: a failed attempt like any other, to be retried.
                raise ConnectionClosed(ABNORMAL_CLOSURE, "connection closed during the handshake")
            if not isinstance(listener, _Listener):
                raise ClientError(f"picows returned an unexpected listener {type(listener).__name__}")
            if codec.encoding == "msgpack":
                chosen = listener.response.headers.get("Sec-WebSocket-Protocol")
                if chosen != MSGPACK_SUBPROTOCOL:
                    raise ClientError(
                        f"server did not accept subprotocol {MSGPACK_SUBPROTOCOL!r} (got {chosen!r})"
                    )
            welcome = await asyncio.shield(listener.welcome)
    except WSError as exc:
        if transport is not None:
            transport.disconnect(graceful=False)
        raise _rejected(exc) from exc
    except BaseException:
        if transport is not None:
            transport.disconnect(graceful=False)
        raise
    conn = Connection(transport, listener, welcome)
    listener.connection = conn
    listener.on_lost = on_lost
    if listener.closed.done():  # died between the welcome and now: report it like any later loss
        code, reason = listener.closed.result()
        on_lost(conn, code, reason)
    return conn


def check_url(url: str) -> None:
    """Raise ``InvalidURL`` unless picows can connect to ``url`` (ws/wss, a host, a valid port, no fragment).

    The same parse ``ws_connect`` runs (picows.url.parse_url), done once when the client is
    created, so a bad URL is a ``ClientError`` at once, never picows' own exception later.
    """
    if not isinstance(url, str):
        raise InvalidURL(repr(url), "the URL must be a string")
    try:
        parse_url(url)
    except WSInvalidURL as exc:
        problem = str(exc).rpartition(": ")[2] or "not a ws:// or wss:// URL"
        raise InvalidURL(url, problem) from None
    except (ValueError, UnicodeError) as exc:  # urllib: bad port, bad IPv6 literal; idna: bad host
        raise InvalidURL(url, str(exc) or type(exc).__name__) from None


def _rejected(exc: WSError) -> BaseException:
    """A wsfan ``ClientError`` for what picows raised while connecting (never picows' own exception)."""
    if isinstance(exc, WSInvalidURL):
        return InvalidURL(exc.url, str(exc).rpartition(": ")[2])
    response = exc.response if isinstance(exc, WSHandshakeError) else None
    if response is None:
        return ConnectionClosed(ABNORMAL_CLOSURE, f"handshake failed ({type(exc).__name__})")
    status = int(response.status)
    body = exc.raw_body or b""
    if status == 401:
        return Unauthorized(status, None, body)
    return HandshakeRejected(status, parse_retry_after(response.headers.get("Retry-After")), body)
