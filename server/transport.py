"""picows frames in, complete messages to the hub, queued frames out. No business logic.

picows works at the frame level and leaves the rest of RFC 6455 to the
application; this module is that rest: reassembly of fragmented messages under
one size limit, UTF-8 validation of text, reserved bits, orphan continuations,
the close handshake, heartbeats and back-pressure.
"""

from __future__ import annotations

import _socket
import asyncio
import codecs
import fcntl
import logging
import socket
import struct
import termios
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from multidict import CIMultiDict
from picows import WSAutoPingStrategy, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest
from picows import picows as _picows_module
from picows.common import WSProtocolError
from picows.picows import WSProtocol

from wsfan.server.auth import Identity
from wsfan.server.deflate import POLICY, CorruptData, TooLarge, compress, compressed_limit, inflate
from wsfan.server.handshake import (
    BARE_LF,
    MAX_HEAD_BYTES,
    Refusal,
    SwitchingProtocols,
    check_request_head,
    request_start,
)
from wsfan.server.heap import moved
from wsfan.server.hub import NO_CLOSE_FRAME, Hub, Session
from wsfan.server.logs import Throttle, fields, peer_text
from wsfan.server.protocol import Encoding
from wsfan.server.ratelimit import TokenBucket
from wsfan.server.wire import CloseCode

log = logging.getLogger("wsfan.transport")

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CONTINUATION = WSMsgType.CONTINUATION
CLOSE = WSMsgType.CLOSE
PING = WSMsgType.PING
PONG = WSMsgType.PONG

_NO_HEADERS: Any = CIMultiDict()
# RFC 6455 7.4.1: reserved for local use, never sent in a close frame (picows lets 1006 through).
_NEVER_ON_THE_WIRE = frozenset((1004, 1005, 1006, 1015))
# After our close frame, how long a peer gets to answer before the socket is dropped.
CLOSE_GRACE_S = 2.0
# A peer still reading the output queued ahead of our close frame (at least this many bytes per
# grace period) gets the grace again, up to this many times: 32 s in all with the 2 s grace.
MIN_CLOSE_PROGRESS = 64 * 1024
MAX_GRACE_EXTENSIONS = 15
# uvloop's write-buffer high watermark; past it pause_writing() and our own queue take over.
WRITE_HIGH_WATER = 256 * 1024
# Closes caused by the server itself; every other close code is the peer's doing (or a limit it hit)
# and is logged at INFO: a client sending 64 MB or bad UTF-8 is not an operator's error.
_SERVER_FAULT = frozenset((CloseCode.INTERNAL_ERROR,))

# route(request, peer): ``peer()`` is the client's "host:port", looked up only when asked for.
Router = Callable[[WSUpgradeRequest, Callable[[], "str | None"]], Any]


def too_big(limit: int) -> str:
    """The reason of a 1009 close for a message past ``--max-message-size`` (docs/PROTOCOL.md)."""
    return f"message larger than {limit} bytes"


def too_big_compressed(wire_limit: int) -> str:
    """The reason of a 1009 close for a compressed message whose payload on the wire passed
    ``wire_limit`` (``deflate.compressed_limit`` of the message limit), whatever it inflates to."""
    return f"compressed message larger than {wire_limit} bytes"


# picows' parser closes the connection itself for what it finds wrong in a frame header, with its
# exception's text as the close reason (quoting sizes, opcodes, even the peer's close payload).
# Ours are fixed sentences: the same rule says the same thing whoever finds it broken.
_FRAMING_REASONS = (
    ("Received frame with invalid opcode", "reserved opcode"),
    ("Received fragmented control frame", "fragmented control frame"),
    ("Received un-masked frame", "client frames must be masked"),
    ("Received control frame with payload size", "control frame payload over 125 bytes"),
    ("Received frame with invalid", "invalid payload length: not in its shortest form, or 2^63 and up"),
    ("Received CLOSE with invalid close code size", "close frame payload of 1 byte"),
    ("Received CLOSE with invalid close code", "invalid close code"),
    ("Received CLOSE with invalid UTF-8", "invalid UTF-8 in the close reason"),
    ("Received CLOSE for the second time", "second close frame"),
)
_message_limit = 0  # the process's --max-message-size, for picows' own 1009 (set by create_server)
_frame_limit = 0  # picows' frame limit: compressed_limit(--max-message-size) with --compression


class _FramingError(WSProtocolError):
    """Put in place of picows' ``WSProtocolError`` (its parser raises the module global): same code,
    our reason. ``except WSProtocolError`` anywhere still catches it: it is a subclass."""

    def __init__(self, code: Any, message: Any) -> None:
        super().__init__(code, framing_reason(int(code), str(message)))


def framing_reason(code: int, picows_text: str) -> str:
    """Our close reason for a frame picows refused with ``code`` and ``picows_text``."""
    if code == CloseCode.MESSAGE_TOO_BIG:
        # One frame over picows' limit, refused on its header: plain or compressed is not known
        # there, so with compression on (a wider frame limit) the reason names both limits.
        if _frame_limit > _message_limit:
            return f"{too_big(_message_limit)} (or {_frame_limit} bytes compressed)"
        return too_big(_message_limit)
    for opening, reason in _FRAMING_REASONS:
        if picows_text.startswith(opening):
            return reason
    return "invalid UTF-8" if code == CloseCode.INVALID_UTF8 else "protocol error"


async def create_server(
    route: Router,
    host: str,
    port: int,
    *,
    max_frame_size: int,
    max_message_size: int | None = None,
    read_buffer_size: int,
    handshake_timeout: float,
    use_aiofastnet: bool,
    **server_kwargs: Any,
) -> asyncio.Server:
    """picows' ``ws_create_server``, but the router also learns the client's address.

    picows hands a listener factory only the parsed request; a refused upgrade (401, 503) must
    be logged with the address it came from, so each connection gets its own small factory
    that knows its protocol (and so its socket). picows drops the factory after the handshake.
    Auto-pong and auto-ping are off: transport.py answers pings and sends its own (heartbeats).
    ``max_frame_size`` is picows' limit on one frame's payload (above it picows closes 1009 as soon
    as the header announces it); ``max_message_size`` (default: the same) is the limit its 1009
    reason names.
    """
    global _message_limit, _frame_limit
    _message_limit = max_message_size if max_message_size is not None else max_frame_size
    _frame_limit = max_frame_size
    _picows_module.WSProtocolError = _FramingError  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    # picows gives each connection its own ``logging.Logger`` (named after the fd; about 340 B and
    # a Logger construction per connect, picows.pyx WSProtocol.connection_made) unless the logger
    # is not a Logger: one shared adapter keeps picows' records (name "picows.server") without it.
    logger = _PicowsLog(logging.getLogger("picows.server"))
    # picows' connection_made asks the socket for 4 options and both addresses, for an INFO line;
    # unless that line is wanted, it is shown a view of the transport that answers without asking.
    lean = not use_aiofastnet and not logger.isEnabledFor(logging.INFO)
    if use_aiofastnet:
        import aiofastnet

        def create(factory: Callable[[], WSProtocol], **kw: Any) -> Any:
            return aiofastnet.create_server(loop, factory, **kw)
    else:
        create = loop.create_server

    class Opened(OpenedProtocol):
        # Per server, in the class: a connection holds no reference to the router.
        __slots__ = ()
        router = staticmethod(route)

    class Protocol(Opened, GatedProtocol):  # what a connection starts as; Opened once its head passed
        __slots__ = ()
        opened_class = Opened
        lean_accept = lean
        deadlines = HandshakeDeadlines(handshake_timeout, loop)

    # picows' own handshake timeout is a timer per connection (call_later in connection_made, cancelled
    # when the upgrade is answered): None here, HandshakeDeadlines does it with one sweep for all.
    def protocol_factory() -> WSProtocol:
        return Protocol(
            logger, True, None,
            False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE, False,
            max_frame_size, None, read_buffer_size,
        )  # fmt: skip

    return await create(protocol_factory, host=host, port=port, **server_kwargs)


class HandshakeDeadlines:
    """Connections still in their opening handshake, each with the time it must have sent its request
    head by (``--request-timeout`` after the accept); one periodic sweep drops the late ones.

    picows' own timeout arms a timer per connection (``loop.call_later`` in ``connection_made``,
    cancelled when the upgrade is answered): about 3,600 instructions per connect (callgrind,
    docs/connection-cost.md), and a ``TimerHandle`` in a reference cycle with the protocol when
    the connection ends before its head. Here a connection is a dict entry from its accept until
    its head is complete (or refused, or the peer left); deadlines are in insertion order (one
    timeout for all), so a sweep stops at the first one still in the future. The sweep runs every
    ``timeout / 4`` (at most 1 s) while any handshake is pending, so a late peer is dropped within
    1.25 × the timeout (at most 1 s past it), as picows would (its log line, its future, a close):
    the slowloris bound stays (tests/test_handshake.py, tests/test_request_inputs.py).
    """

    __slots__ = ("timeout", "tick", "pending", "_loop", "_timer")

    def __init__(self, timeout: float | None, loop: asyncio.AbstractEventLoop) -> None:
        """``timeout``: seconds (None or 0: no deadline, as picows' ``websocket_handshake_timeout=None``)."""
        self.timeout = timeout or 0.0
        self.tick = max(0.01, min(1.0, self.timeout / 4))
        self.pending: dict[WSProtocol, float] = {}
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def add(self, protocol: WSProtocol) -> None:
        if not self.timeout:
            return
        self.pending[protocol] = self._loop.time() + self.timeout
        if self._timer is None:
            self._timer = self._loop.call_later(self.tick, self.sweep)

    def discard(self, protocol: WSProtocol) -> None:
        self.pending.pop(protocol, None)

    def sweep(self) -> None:
        """Drop every connection past its deadline; run again in a tick while any handshake is pending."""
        self._timer = None
        pending = self.pending
        now = self._loop.time()
        late = []
        for protocol, deadline in pending.items():
            if deadline > now:
                break
            late.append(protocol)
        for protocol in late:
            del pending[protocol]
            protocol._handshake_timeout_callback()  # picows': INFO line, the handshake future, disconnect()
        if pending:
            self._timer = self._loop.call_later(self.tick, self.sweep)
        else:
            # A dict never shrinks as entries leave: a storm's table (about 36 B per handshake that
            # was pending at once) would stay; a new one costs nothing until the next accept.
            self.pending = {}


# One scratch buffer for every connection still in its handshake: a read is copied out of it
# before the next one can start (get_buffer and buffer_updated run back to back on one loop).
_HEAD_SCRATCH = bytearray(MAX_HEAD_BYTES)


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' logger: its INFO lines (one per connect and disconnect) checked in one call, not three."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.log(logging.INFO, msg, *args, **kwargs)


_UVLOOP_TCP: type | None
try:
    from uvloop.loop import TCPTransport as _UVLOOP_TCP
except ImportError:  # pragma: no cover - uvloop is a dependency
    _UVLOOP_TCP = None
# Options uvloop has already set on an accepted TCP socket, or that are in their initial state there:
# TCP_NODELAY (uvloop sets it on every TCP transport) and TCP_QUICKACK (on until the first delayed ACK).
_ALREADY_SET = frozenset(
    ((socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", -1)))
)


class Accepted:
    """An accepted uvloop TCP transport as picows keeps it (``WSTransport.underlying_transport``).

    Everything is the real transport's (``raw``): attributes are forwarded. While picows'
    ``connection_made`` runs, the object is an :class:`_Accepting` instead, which is also the
    socket picows asks for there: it sets TCP_NODELAY and TCP_QUICKACK, which uvloop has already
    set (or that are already on), and reads four options and both addresses only for an INFO line
    nobody logs. Through uvloop each of those costs a ``socket.socket`` built and detached
    (``PseudoSocket``) and a syscall: about 12 % of the server's instructions per connect + join
    (callgrind), 6 syscalls, and two address tuples uvloop would keep per connection. The
    upstream change that makes this view unnecessary: picows skipping the option reads when its
    logger is not enabled for INFO, and the two ``setsockopt`` calls when the transport is
    uvloop's (which sets TCP_NODELAY itself).
    """

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    # What picows and this module use, found on the class (``__getattr__`` runs only after a failed
    # lookup has raised AttributeError inside, which costs more than the call it forwards).
    write = property(lambda self: self.raw.write)
    writelines = property(lambda self: self.raw.writelines)
    get_write_buffer_size = property(lambda self: self.raw.get_write_buffer_size)
    get_extra_info = property(lambda self: self.raw.get_extra_info)
    close = property(lambda self: self.raw.close)
    abort = property(lambda self: self.raw.abort)
    is_closing = property(lambda self: self.raw.is_closing)
    set_protocol = property(lambda self: self.raw.set_protocol)
    get_protocol = property(lambda self: self.raw.get_protocol)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _Accepting(Accepted):
    """:class:`Accepted` while picows' ``connection_made`` runs: the transport and its socket in one."""

    __slots__ = ()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self
        if name == "peername" or name == "sockname":
            return None  # only logged at INFO, which is off (create_server)
        return self.raw.get_extra_info(name, default)

    def fileno(self) -> int:
        return int(self.raw.get_extra_info("socket").fileno())

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if (level, option) not in _ALREADY_SET:
            _setsockopt(self.raw, level, option, value)

    def getsockopt(self, level: int, option: int, *args: Any) -> int:
        return 0  # only logged at INFO, which is off


def real_transport(t: Any) -> Any:
    """The uvloop (or other) transport behind ``WSTransport.underlying_transport``."""
    return t.raw if type(t) is Accepted else t


class OpenedProtocol(WSProtocol):
    """picows' protocol, whose listener factory also learns the client's address (``router``).

    What a connection's protocol is once its request head passed :class:`GatedProtocol`:
    picows' own ``get_buffer``/``buffer_updated`` take every later read. Slots, no ``__dict__``.
    """

    __slots__ = ("_head",)
    router: Router

    def __init__(self, *args: Any) -> None:
        # picows' arguments after (host, port, is_client_side, listener_factory)
        super().__init__(None, None, False, self._listener, *args)
        self._head: bytearray | None = None

    def _listener(self, request: WSUpgradeRequest) -> Any:
        return self.router(request, self.peer)

    def peer(self) -> str | None:
        """The client's "host:port" (None once the socket is gone), looked up only when asked for."""
        t = self.transport
        return (
            None
            if t is None
            else peer_text(real_transport(t.underlying_transport).get_extra_info("peername"))
        )


class GatedProtocol(OpenedProtocol):
    """picows' protocol, with the request head checked by :func:`check_request_head` before picows parses it.

    Until the head is complete, this class's ``get_buffer``/``buffer_updated`` collect the
    bytes; a head that breaks a rule is answered here with a fixed sentence and the connection
    closed, a head past 16 KiB with 431. A good head is handed to picows' own methods: the
    instance becomes its ``opened_class`` (the same slots, without these two methods) and
    ``set_protocol`` makes the transport look the methods up again, so every later read goes
    straight to picows, as before. The handshake timeout is ``deadlines``' (one sweep), from the
    accept until the head passed or was refused.
    """

    __slots__ = ()
    opened_class: type[OpenedProtocol]
    lean_accept = False
    deadlines: HandshakeDeadlines

    def connection_made(self, transport: Any) -> None:
        if self.lean_accept and type(transport) is _UVLOOP_TCP:
            view = _Accepting(transport)
            WSProtocol.connection_made(self, view)
            view.__class__ = Accepted
        else:
            WSProtocol.connection_made(self, transport)
        self.deadlines.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # Gone before its head was complete (an Opened protocol has picows' connection_lost only).
        self.deadlines.discard(self)
        WSProtocol.connection_lost(self, exc)

    def get_buffer(self, size_hint: int) -> memoryview:
        return memoryview(_HEAD_SCRATCH)

    def buffer_updated(self, nbytes: int) -> None:
        head = self._head
        if head is None:
            # Usually the whole head arrives in one read: looked for in the scratch buffer, uncopied.
            start = request_start(_HEAD_SCRATCH, nbytes)
            end = _HEAD_SCRATCH.find(b"\r\n\r\n", start, nbytes)
            if end < 0:
                head = self._head = bytearray(_HEAD_SCRATCH[:nbytes])
                self._incomplete(head)
                return
            data = memoryview(_HEAD_SCRATCH)[start:nbytes]
        else:
            head += _HEAD_SCRATCH[:nbytes]
            start = request_start(head, len(head))
            end = head.find(b"\r\n\r\n", start)
            if end < 0:
                self._incomplete(head)
                return
            data = memoryview(head)[start:]
        # Empty lines before the request line (RFC 9112 §2.2) are skipped: picows gets the head without them.
        refusal = check_request_head(bytes(data[: end - start]))
        if refusal is not None:
            self._refuse(refusal)
            return
        self._head = None
        self.deadlines.discard(self)
        # picows' get_buffer and buffer_updated again; uvloop keeps bound methods: look them up anew
        self.__class__ = self.opened_class
        real_transport(self.transport.underlying_transport).set_protocol(self)
        while data:
            room = WSProtocol.get_buffer(self, len(data))
            n = min(len(room), len(data))
            room[:n] = data[:n]
            data = data[n:]
            WSProtocol.buffer_updated(self, n)

    def _incomplete(self, head: bytearray) -> None:
        """No CRLF CRLF yet: refuse a head with a bare LF at once (RFC 9112 §2.2; one ended with bare
        LFs never gets a CRLF CRLF) or one past 16 KiB."""
        if head.count(b"\n") != head.count(b"\r\n"):
            self._refuse(Refusal(400, BARE_LF))
        elif len(head) >= MAX_HEAD_BYTES:
            self._refuse(Refusal(431, "request head larger than 16 KiB"))

    def _refuse(self, refusal: Refusal) -> None:
        self._head = None
        self.deadlines.discard(self)
        self.__class__ = self.opened_class
        raw = real_transport(self.transport.underlying_transport)
        body = refusal.reason.encode() + b"\n"
        extra = "".join(f"{k}: {v}\r\n" for k, v in refusal.headers.items())
        raw.write(
            f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\nConnection: close\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
            + body
        )
        raw.close()
        log.debug("refused request head: %d %s", refusal.status, refusal.reason)


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(raw: Any) -> None:
    """Close a TCP transport with a reset (RST) instead of a FIN, discarding what the kernel still holds.

    A plain close (uvloop's ``abort()`` closes the fd at once) leaves the socket to the kernel as
    an orphan in FIN-WAIT-1 that keeps its whole unsent queue (megabytes on loopback) for as long
    as the peer answers its zero-window probes (backed off up to 2 minutes apart, tcp_orphan_retries
    of them: many minutes; 20 dropped clients held 74 MiB for over 180 s). ``SO_LINGER`` with a
    zero timeout makes ``close()`` send RST and free the queue (socket(7), tcp(7)). Used wherever
    the server gives up on a peer: the close grace ran out (slow consumer 4008, heartbeat 4000,
    rate limit 4029, token expiry, protocol errors) and the drain timeout on shutdown.
    """
    _setsockopt(raw, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    raw.abort()


def unsent_bytes(raw: Any) -> int:
    """Output not yet acknowledged by the peer: uvloop's buffer plus the kernel's send queue (SIOCOUTQ)."""
    queued = raw.get_write_buffer_size()
    sock = raw.get_extra_info("socket")
    if sock is not None:
        try:
            queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            pass
    return queued


def limit_stall(raw: Any, seconds: float) -> None:
    """Let the kernel drop the connection once its output has made no progress for ``seconds``.

    ``TCP_USER_TIMEOUT`` (tcp(7), RFC 5482) also bounds zero-window probing (Linux >= 5.1) and
    survives the close: an orphan that still holds queued output after a graceful close (the
    peer's close answered, picows' own close after a framing error) is freed when it expires,
    where ``tcp_orphan_retries`` would let a zero-window peer keep it forever.
    """
    _setsockopt(raw, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))


def _setsockopt(raw: Any, level: int, option: int, value: int | bytes) -> None:
    sock = raw.get_extra_info("socket")
    if sock is not None:
        try:
            # uvloop's PseudoSocket.setsockopt builds a socket.socket (Python __init__) per call;
            # the C type on the same fd, detached after, sets the option without it. Its family and
            # type are given, not asked: setsockopt never reads them, and PseudoSocket's ``family`` and
            # ``type`` each build an enum member (about 9,000 instructions for the two, callgrind,
            # docs/connection-cost.md); without them the type would ask the kernel (getsockopt).
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, sock.fileno())
            try:
                s.setsockopt(level, option, value)
            finally:
                s.detach()
        except OSError:  # already closed by the peer: nothing is queued
            pass


class Limits:
    """The per-connection limits the transport enforces, shared by all connections.

    ``max_control_frames``: pings and pongs a connection may send per second (a token bucket of
    that rate and size, ``ratelimit.TokenBucket``, made at its first control frame); past it close
    1008. ``max_fragments``: frames one message may arrive in; past it close 1008. 0 turns either
    off. Both bound the CPU one peer spends of the server per byte it sends (a 2-byte ping or a
    1-byte continuation frame costs a frame callback each); PROTOCOL.md, protocol-choices.md.
    """

    __slots__ = ("max_message_size", "slow_consumer_limit", "max_control_frames", "max_fragments")

    def __init__(
        self,
        max_message_size: int,
        slow_consumer_limit: int,
        max_control_frames: float = 0.0,
        max_fragments: int = 0,
    ) -> None:
        self.max_message_size = max_message_size
        self.slow_consumer_limit = slow_consumer_limit
        self.max_control_frames = max_control_frames
        self.max_fragments = max_fragments


def too_many_control_frames(limit: float) -> str:
    """The close reason (1008) of a peer over ``--max-control-frames``."""
    return f"more than {limit:g} control frames per second"


def too_many_fragments(limit: int) -> str:
    """The close reason (1008) of a message over ``--max-fragments``."""
    return f"message in more than {limit} fragments"


class Assembler(WSListener):
    """Turns frames into whole messages and enforces RFC 6455; subclasses decide what a message means."""

    # picows' WSListener is an extension type: slots keep the per-connection footprint small.
    __slots__ = (
        "transport",
        "raw",
        "limits",
        "heard",
        "idle_since",
        "ping_sent_at",
        "closing",
        "_frag",
        "_frag_op",
        "_frag_count",
        "_control",
        "_utf8",
        "_close_timer",
        "_close_left",
        "_close_checks",
        "registry",
        "deflate_bits",
        "_inflate",
    )

    def __init__(self, limits: Limits, registry: ConnectionRegistry, deflate_bits: int = 0) -> None:
        super().__init__()
        # permessage-deflate window negotiated in the handshake (0: none); server/deflate.py
        self.deflate_bits = deflate_bits
        self._inflate = False  # the message being reassembled is compressed
        self.transport: WSTransport | None = None
        self.raw: Any = None
        self.limits = limits
        self.registry = registry
        # A frame came since the heartbeat sweep last looked: a flag, not a counter, so that traffic
        # allocates nothing here that outlives it (an int past 256 is a new block per frame, server/heap.py).
        self.heard = False
        self.idle_since = 0.0
        self.ping_sent_at = 0.0
        self.closing = False
        self._frag: bytearray | None = None
        self._frag_op: WSMsgType = TEXT
        self._frag_count = 0
        self._control: TokenBucket | None = None  # made at the first ping or pong
        self._utf8: Any = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._close_left = 0
        self._close_checks = 0

    # ------------------------------------------------------------ picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = real_transport(transport.underlying_transport)
        self.raw.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.registry.stall_limit and not self.registry.stall_inherited:
            limit_stall(self.raw, self.registry.stall_limit)
        # picows keeps the upgrade request and response for the connection's lifetime; what they
        # hold is dead weight once connected (header maps about 0.6 KB; method, path and version
        # 113 B more). Ours is a shared SwitchingProtocols with nothing of this connection's.
        request = transport.request
        if request is not None:
            request.headers = _NO_HEADERS
            request.method = request.path = request.version = b""
        response = transport.response
        if response is not None and type(response) is not SwitchingProtocols:
            response.headers = _NO_HEADERS
        self.idle_since = self.registry.now()
        self.registry.add(self)
        self.opened()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closing:
            # picows closed it on a frame it refused (unmasked, too big, bad opcode...): its close
            # frame went first (not an answer to the peer's close). Logged here, in our format with the
            # connection's fields; picows' own line (no conn, no remote) is dropped (logs._PeerFaults).
            hs = transport.close_handshake
            if hs is not None and hs.sent is not None and not hs.recv_then_sent:
                self.peer_fault(int(hs.sent.code), hs.sent.reason)
        self.registry.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.closed()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.heard = True
        op = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # RSV1 means "compressed" (RFC 7692 §6), on the first frame of a data message only.
            if frame.rsv2 or frame.rsv3 or not self.deflate_bits or not (op is TEXT or op is BINARY):
                self.close(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
                return
        if op is TEXT or op is BINARY:
            if self._frag is not None:
                self.close(CloseCode.PROTOCOL_ERROR, "data frame inside a fragmented message")
                return
            self._inflate = frame.rsv1
            if frame.fin:
                data = frame.get_payload_as_memoryview()
                if self._inflate:
                    self._inflate = False
                    self._inflated(data, op)
                    return
                if frame.payload_size > self.limits.max_message_size:
                    # picows' own limit is compressed_limit() with --compression: over ours, under its
                    self.close(CloseCode.MESSAGE_TOO_BIG, too_big(self.limits.max_message_size))
                    return
                if op is TEXT:
                    try:
                        str(data, "utf-8")
                    except UnicodeDecodeError:
                        self.close(CloseCode.INVALID_UTF8, "invalid UTF-8 in a text message")
                        return
                self.message(data, op.value)
                return
            self._start_fragments(frame, op)
        elif op is CONTINUATION:
            self._continue_fragments(frame)
        elif op is CLOSE:
            self._on_close_frame(frame)
        elif op is PING or op is PONG:
            limit = self.limits.max_control_frames
            if limit:
                bucket = self._control
                if bucket is None:
                    bucket = self._control = TokenBucket(limit, limit)
                if not bucket.take():
                    self.fail(CloseCode.POLICY_VIOLATION, too_many_control_frames(limit))
                    return
            # Answered here rather than by picows' auto-pong, so that the RSV check above applies to pings too.
            if op is PING and not self.closing:
                transport.send_pong(frame.get_payload_as_bytes())
            # PONG only needs to count as traffic (heard above).

    def relocate(self, memo: dict[int, object], replaced: list[object]) -> None:
        """Re-create what traffic rewrites on this connection (``heap.relocate``): timestamps, the ping bucket."""
        self.idle_since = moved(self.idle_since, memo, replaced)
        self.ping_sent_at = moved(self.ping_sent_at, memo, replaced)
        if self._control is not None:
            replaced.append(self._control)
            self._control = self._control.moved(replaced)

    def pause_writing(self) -> None:
        self.paused(True)

    def resume_writing(self) -> None:
        self.paused(False)

    # ------------------------------------------------------------ fragments

    def _inflated(self, data: bytes | bytearray | memoryview, op: WSMsgType) -> None:
        """A whole compressed message: inflate it under the size limit, then validate it like any other."""
        try:
            plain = inflate(data, self.limits.max_message_size)
        except TooLarge:
            self.close(CloseCode.MESSAGE_TOO_BIG, too_big(self.limits.max_message_size))
            return
        except CorruptData as exc:  # our fixed sentences (deflate.INVALID, deflate.AFTER_FINAL)
            self.close(CloseCode.INVALID_PAYLOAD, str(exc))
            return
        if op is TEXT:
            try:
                plain.decode("utf-8")
            except UnicodeDecodeError:
                self.close(CloseCode.INVALID_UTF8, "invalid UTF-8 in a text message")
                return
        self.message(plain, op.value)

    def _start_fragments(self, frame: WSFrame, op: WSMsgType) -> None:
        self._frag = bytearray(frame.get_payload_as_memoryview())
        self._frag_op = op
        self._frag_count = 1
        if op is TEXT and not self._inflate:  # compressed text is checked once inflated
            self._utf8 = codecs.getincrementaldecoder("utf-8")()
            if not self._check_utf8(self._frag, False):
                return
        self._check_size()

    def _continue_fragments(self, frame: WSFrame) -> None:
        buf = self._frag
        if buf is None:
            self.close(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
            return
        self._frag_count += 1
        limit = self.limits.max_fragments
        if limit and self._frag_count > limit:
            self._frag = None
            self.fail(CloseCode.POLICY_VIOLATION, too_many_fragments(limit))
            return
        chunk = frame.get_payload_as_memoryview()
        buf += chunk
        if not self._check_size():
            return
        if self._inflate:
            if frame.fin:
                self._frag = None
                self._inflate = False
                self._inflated(buf, self._frag_op)
            return
        if self._frag_op is TEXT and not self._check_utf8(chunk, frame.fin):
            return
        if frame.fin:
            self._frag = None
            self._utf8 = None
            self.message(bytes(buf), self._frag_op.value)

    def _check_size(self) -> bool:
        buf = self._frag
        limit = self.limits.max_message_size
        if self._inflate:
            limit = compressed_limit(limit)  # inflate() has the real limit, on the inflated size
        if buf is not None and len(buf) > limit:
            self._frag = None
            # A compressed message over its wire limit need not inflate past the message limit (empty
            # deflate blocks inflate to nothing): the reason names the limit it passed.
            reason = too_big_compressed(limit) if self._inflate else too_big(limit)
            self.close(CloseCode.MESSAGE_TOO_BIG, reason)
            return False
        return True

    def _check_utf8(self, chunk: bytes | bytearray | memoryview, final: bool) -> bool:
        # Incremental so that invalid UTF-8 fails fast, at the fragment that carries it.
        try:
            self._utf8.decode(chunk, final)
        except UnicodeDecodeError:
            self._frag = None
            self.close(CloseCode.INVALID_UTF8, "invalid UTF-8 in a text message")
            return False
        return True

    # ------------------------------------------------------------ closing

    def _on_close_frame(self, frame: WSFrame) -> None:
        t = self.transport
        assert t is not None
        if not t.is_close_frame_sent:
            code = int(frame.get_close_code())
            if frame.payload_size == 0:
                t.send(CLOSE, b"")  # an empty close is answered with an empty close
            elif code < 1000 or code in _NEVER_ON_THE_WIRE or code >= 5000:
                t.send_close(CloseCode.PROTOCOL_ERROR, b"invalid close code")
            else:
                t.send_close(code)
        self.closing = True
        limit_stall(self.raw, CLOSE_GRACE_S)
        t.disconnect()
        # A graceful disconnect waits for our queued output to leave; a peer that sent its close and
        # stopped reading would hold this connection forever, so the grace applies here too.
        self._start_grace(CLOSE_GRACE_S)

    def close(self, code: int, reason: str = "", grace: float = CLOSE_GRACE_S) -> None:
        """Start the closing handshake; drop the socket if the peer does not answer within ``grace`` seconds."""
        t = self.transport
        if t is None or self.closing:
            return
        self.closing = True
        self._frag = None
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            level = logging.ERROR if code in _SERVER_FAULT else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "closing %s with %d: %s",
                    self.name(),
                    code,
                    reason,
                    extra=self.log_fields(code, reason),
                )
        t.send_close(code, reason.encode()[:123])
        self._start_grace(grace)

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): the close frame and a FIN, without reading on.

        For a flood (control frames, fragments): waiting for the peer's close would parse the rest of
        the flood (every frame a callback). Reading stops at once (what the kernel holds stays
        unread), the close frame and a FIN leave (closing the fd instead would answer the unread
        input with an RST, which can reach the peer before our close frame is read), and the close
        grace resets the connection 2 s later, as after any close the peer does not finish.
        """
        if self.transport is None or self.closing:
            return
        self.close(code, reason)
        raw = self.raw
        raw.pause_reading()
        if raw.can_write_eof():
            raw.write_eof()

    def _start_grace(self, grace: float) -> None:
        if self._close_timer is None and self.transport is not None:
            self._close_left = unsent_bytes(self.raw)
            self._close_timer = asyncio.get_running_loop().call_later(grace, self._grace_over, grace)

    def _grace_over(self, grace: float) -> None:
        """The peer did not finish the close in time: reset it, unless it is still reading what is queued.

        A peer that keeps reading (at least ``MIN_CLOSE_PROGRESS`` bytes since the last check) gets
        another ``grace``, at most ``MAX_GRACE_EXTENSIONS`` times; one that read less is dropped now.
        """
        self._close_timer = None
        t = self.transport
        if t is None or t.is_disconnected:
            return
        left = unsent_bytes(self.raw)
        if (
            left
            and self._close_left - left >= MIN_CLOSE_PROGRESS
            and self._close_checks < MAX_GRACE_EXTENSIONS
        ):
            self._close_left = left
            self._close_checks += 1
            self._close_timer = asyncio.get_running_loop().call_later(grace, self._grace_over, grace)
            return
        self.abort()

    def abort(self) -> None:
        """Drop a peer that did not answer our close in time.

        With output still unsent the TCP connection is reset (see ``reset``): a FIN would queue
        behind it and leave the kernel an orphan holding it. With nothing unsent a plain close
        (FIN) pins nothing, and the peer can still read everything we sent, the close frame too.
        """
        t = self.transport
        if t is not None and not t.is_disconnected:
            raw = self.raw
            if unsent_bytes(raw):
                reset(raw)
            else:
                raw.abort()

    # ------------------------------------------------------------ for subclasses

    def name(self) -> str:
        return hex(id(self))

    def remote(self) -> str | None:
        """The peer's ``host:port`` (asked of the socket on demand: not kept per connection)."""
        raw = self.raw
        return None if raw is None else peer_text(raw.get_extra_info("peername"))

    def log_fields(self, code: int | None = None, reason: str | None = None) -> dict[str, Any]:
        return fields(conn=self.name(), code=code, reason=reason, remote=self.remote())

    def peer_fault(self, code: int, reason: bytes | str | None) -> None:
        """A close picows sent for a frame it refused: one INFO line (the peer's doing), event
        ``peer_protocol_error``, with ``conn``, ``user``, ``remote``, ``code`` and ``reason``; at most
        one a second (``ConnectionRegistry.faults``), the next saying how many were left out."""
        if not log.isEnabledFor(logging.INFO):
            return
        skipped = self.registry.faults.ready("peer_protocol_error")
        if skipped is None:
            return
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else (reason or "")
        extra = self.log_fields(code, text)
        extra.update(fields(event="peer_protocol_error", suppressed=skipped))
        log.info(
            "closed %s with %d: %s (a frame the peer sent breaks RFC 6455)",
            self.name(),
            code,
            text,
            extra=extra,
        )

    def opened(self) -> None: ...

    def closed(self) -> None: ...

    def message(self, data: bytes | memoryview, opcode: int) -> None: ...

    def paused(self, on: bool) -> None: ...

    def stalled(self) -> bool:
        """Whether a sweep should close this connection as a slow consumer (``Connection`` says)."""
        return False

    def slow_consumer(self) -> None: ...


class Connection(Assembler):
    """A ``/ws`` connection: whole messages go to the hub, the hub's queued frames come back here."""

    __slots__ = (
        "hub",
        "session",
        "is_paused",
        "backlog",
        "counted",
        "_expiry",
        "_opening",
    )

    def __init__(
        self,
        hub: Hub,
        encoding: Encoding,
        limits: Limits,
        registry: ConnectionRegistry,
        identity: Identity | None = None,
        deflate_bits: int = 0,
        data: Any = None,
        conn_id: str | None = None,
    ) -> None:
        """``data``: the application's on_connect result, handed to the session (server/application.py);
        ``conn_id``: drawn with ``Hub.new_id`` when the welcome went out with the 101 (None: the hub
        draws one and queues the welcome)."""
        super().__init__(limits, registry, deflate_bits)
        self.hub = hub
        self.session: Session | None = None
        self.is_paused = False
        self.backlog = 0
        self.counted = 0
        self._expiry: asyncio.TimerHandle | None = None
        # What opened() needs, in one slot, dropped once the session exists.
        self._opening: tuple[Encoding, Identity | None, Any, str | None] | None = (
            encoding, identity, data, conn_id,
        )  # fmt: skip

    def relocate(self, memo: dict[int, object], replaced: list[object]) -> None:
        super().relocate(memo, replaced)
        self.backlog = moved(self.backlog, memo, replaced)
        self.counted = moved(self.counted, memo, replaced)

    def name(self) -> str:
        return self.session.conn_id if self.session is not None else "?"

    def log_fields(self, code: int | None = None, reason: str | None = None) -> dict[str, Any]:
        s = self.session
        return fields(
            conn=self.name(),
            user=s.user if s is not None else None,
            code=code,
            reason=reason,
            remote=self.remote(),
        )

    def opened(self) -> None:
        assert self._opening is not None
        encoding, ident, data, conn_id = self._opening
        self._opening = None
        bits = self.deflate_bits
        if ident is None:
            self.session = self.hub.open(self, encoding, deflate_bits=bits, data=data, conn_id=conn_id)
        else:
            self.session = self.hub.open(
                self, encoding, user=ident.user, claims=ident, deflate_bits=bits, data=data, conn_id=conn_id
            )
            if ident.expires_at is not None:
                # One timer per authenticated connection, fired when the token stops being accepted
                # (exp + leeway, the same instant verify() refuses it): no periodic scan.
                loop = asyncio.get_running_loop()
                delay = max(0.0, ident.expires_at - time.time())
                self._expiry = loop.call_at(loop.time() + delay, self._token_expired)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connected %s", self.session.conn_id, extra=self.log_fields())

    def _token_expired(self) -> None:
        self._expiry = None
        self.hub.stats.token_expired_closes += 1
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    def closed(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        s = self.session
        if s is not None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("disconnected %s", s.conn_id, extra=fields(conn=s.conn_id, user=s.user))
            self.hub.close(s)

    def message(self, data: bytes | memoryview, opcode: int) -> None:
        if not self.closing:
            self.hub.receive(self.session, data, opcode)  # type: ignore[arg-type]

    # ------------------------------------------------------------ Peer

    def close(self, code: int, reason: str = "", grace: float = CLOSE_GRACE_S) -> None:
        # Replies queued in this loop iteration (e.g. the RATE_LIMITED errors
        # before a 4029) go out ahead of the close frame, as they were sent first.
        s = self.session
        if s is not None and s.close_code == NO_CLOSE_FRAME and not self.closing:
            s.close_code = code  # what the application's on_disconnect sees
        first = not self.closing
        if s is not None and s.out and first:
            self.flush(s)
        super().close(code, reason, grace)
        if s is not None and first and not s.closed and self.transport is not None:
            # The server decided: the session ends now (its rooms, presence, on_disconnect), at the
            # next loop turn (not inside whatever called close), not when the peer answers the
            # close frame or the grace ends, up to CLOSE_GRACE_S later (a POST /disconnect left
            # the user in presence that long). closed() finds it ended.
            asyncio.get_running_loop().call_soon(self.hub.close, s)

    def _on_close_frame(self, frame: WSFrame) -> None:
        s = self.session
        if s is not None and s.close_code == NO_CLOSE_FRAME:
            # The client's code (1005: its close frame had none), for the application's on_disconnect.
            s.close_code = int(frame.get_close_code()) if frame.payload_size else 1005
        super()._on_close_frame(frame)

    def flush(self, session: Session) -> None:
        out = session.out
        if not out:
            return
        if self.closing or self.transport.is_close_frame_sent:  # type: ignore[union-attr]
            # No data after our close frame (RFC 6455 5.5.1), also when picows sent it for a framing error.
            out.clear()
            return
        if self.is_paused:
            self._hold(session)
            return
        t = self.raw
        if len(out) == 1:
            t.write(out[0])
        else:
            t.writelines(out)
        out.clear()

    def _hold(self, session: Session) -> None:
        # The socket is not draining: keep frames in our queue and count them, so
        # memory stays bounded by the slow-consumer limit instead of growing in uvloop.
        out = session.out
        for i in range(self.counted, len(out)):
            self.backlog += len(out[i])
        self.counted = len(out)
        if self.backlog > self.limits.slow_consumer_limit:
            self.slow_consumer()

    def stalled(self) -> bool:
        """Still paused at a sweep, with more than the limit waiting beyond uvloop's high-water mark.

        Asked once per registry sweep (at most a second apart): a burst fanned out in one loop
        iteration is written, and buffered by uvloop, before ``pause_writing`` can stop
        anything, and no later write may come to notice it. A healthy reader has drained it
        (and resumed) by the next sweep; a reader that stopped has not.
        """
        if not self.is_paused or self.closing:
            return False
        over_mark = self.raw.get_write_buffer_size() - WRITE_HIGH_WATER
        return self.backlog + max(0, over_mark) > self.limits.slow_consumer_limit

    def slow_consumer(self) -> None:
        """Close with 4008 and free our queue (what uvloop holds goes with the socket)."""
        self.hub.stats.slow_consumer_closes += 1
        if self.session is not None:
            self.session.out.clear()
        self.backlog = self.counted = 0
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: outbound buffer over the limit")

    def paused(self, on: bool) -> None:
        self.is_paused = on
        if not on:
            self.backlog = self.counted = 0
            s = self.session
            if s is not None:
                self.flush(s)


class EchoConnection(Assembler):
    """``/echo``: every message back verbatim, after the same assembly and validation (for Autobahn)."""

    __slots__ = ()

    def message(self, data: bytes | memoryview, opcode: int) -> None:
        if self.closing:
            return
        t = self.transport
        assert t is not None
        if self.deflate_bits and len(data) >= POLICY.threshold:
            t.send(WSMsgType(opcode), compress(bytes(data), self.deflate_bits, POLICY.level), rsv1=True)
        else:
            t.send(WSMsgType(opcode), data)


class ConnectionRegistry:
    """Every open connection, for heartbeats and shutdown; one periodic sweep instead of a timer each."""

    def __init__(
        self, heartbeat_ms: int, timeout_ms: int, on_timeout: Callable[[], None] | None = None
    ) -> None:
        self.connections: set[Assembler] = set()
        # --max-connections-per-ip: open connections by client IP address, and each one's (None: off)
        self.per_ip: dict[str, int] | None = None
        self.ips: dict[Assembler, str] = {}
        self.heartbeat = heartbeat_ms / 1000.0
        self.timeout = timeout_ms / 1000.0
        # A connection whose output made no progress for this long is one the heartbeat would have
        # closed (a peer that reads nothing sees no ping): the kernel may drop it, orphan or not.
        self.stall_limit = self.heartbeat + self.timeout + CLOSE_GRACE_S if heartbeat_ms > 0 else 0.0
        # True once the listening sockets carry it (limit_stall_on_accept): accepted sockets inherit it.
        self.stall_inherited = False
        self._timer: asyncio.TimerHandle | None = None
        self._tick = 1.0
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        self._on_timeout = on_timeout
        self.faults = Throttle()  # peer_fault's lines: one a second

    def now(self) -> float:
        return self._loop.time()

    def limit_stall_on_accept(self, server: asyncio.Server) -> None:
        """Set ``stall_limit`` on the listening sockets instead of on each accepted one.

        Linux copies a listening socket's TCP_USER_TIMEOUT into every socket it accepts (the new
        socket is a clone of the listener), so one ``setsockopt`` per listener replaces one per
        connection (a ``socket.socket`` built on the fd and detached, and a syscall, each connect).
        A listener that refuses the option (another platform, a transport without sockets) leaves
        it per connection, as before.
        """
        if not self.stall_limit:
            return
        ms = max(1, int(self.stall_limit * 1000))
        try:
            sockets = list(server.sockets)
            for sock in sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
        except (AttributeError, OSError):
            return
        self.stall_inherited = bool(sockets)

    def add(self, c: Assembler) -> None:
        self.connections.add(c)
        if self.per_ip is not None:
            peername = c.raw.get_extra_info("peername") if c.raw is not None else None
            ip = self.hold_ip(peername)
            if ip is not None:
                self.ips[c] = ip

    def discard(self, c: Assembler) -> None:
        self.connections.discard(c)
        if self.per_ip is not None:
            self.release_ip(self.ips.pop(c, None))

    def hold_ip(self, peername: Any) -> str | None:
        """Count one more open connection from a socket's ``peername`` (WebSocket connections and
        SSE streams share the budget of ``--max-connections-per-ip``); its IP, to hand back to
        ``release_ip``, or None when not counting or the peername has no address."""
        per_ip = self.per_ip
        if per_ip is None or not isinstance(peername, tuple) or not peername:
            return None
        ip = str(peername[0])
        per_ip[ip] = per_ip.get(ip, 0) + 1
        return ip

    def release_ip(self, ip: str | None) -> None:
        """One connection counted by ``hold_ip`` for ``ip`` is gone (None: it was not counted)."""
        per_ip = self.per_ip
        if per_ip is None or ip is None:
            return
        left = per_ip[ip] - 1
        if left:
            per_ip[ip] = left
        else:
            del per_ip[ip]

    def count_per_ip(self) -> None:
        """Count open connections by client IP address from now on (``--max-connections-per-ip``)."""
        self.per_ip = {}

    def open_from(self, ip: str) -> int:
        """Open connections from ``ip`` (as in its socket's peername); 0 unless counting."""
        return 0 if self.per_ip is None else self.per_ip.get(ip, 0)

    def start(self) -> None:
        # Always: besides heartbeats the sweep finds stalled slow consumers (Connection.stalled).
        # A tick of a quarter of the shorter interval keeps pings and timeouts
        # within 25% of their settings while costing one pass per tick.
        self._tick = max(0.02, min(1.0, min(self.heartbeat or 4.0, self.timeout) / 4))
        self._stopped = False
        self._timer = self._loop.call_later(self._tick, self._sweep_and_reschedule)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep_and_reschedule(self) -> None:
        # One timer handle at a time (not a task asleep: a future and a handle per tick), so that
        # ``relocate`` can move it.
        self._timer = None  # fired: nothing for ``relocate`` to move until the next one
        try:
            self.sweep(self._loop.time())
        finally:
            if not self._stopped:
                self._timer = self._loop.call_later(self._tick, self._sweep_and_reschedule)

    def relocate(self, replaced: list[object]) -> None:
        """``heap.relocate``'s mover for every open connection's small state and the sweep's timer."""
        memo: dict[int, object] = {}
        for c in self.connections:
            c.relocate(memo, replaced)
        timer = self._timer
        if timer is not None:
            timer.cancel()
            replaced.append(timer)
            self._timer = self._loop.call_at(timer.when(), self._sweep_and_reschedule)

    def sweep(self, now: float) -> None:
        hb, timeout = self.heartbeat, self.timeout
        for c in list(self.connections):
            if c.stalled():
                c.slow_consumer()
                continue
            if not hb:
                continue
            if c.heard:
                c.heard = False
                c.idle_since = now
                c.ping_sent_at = 0.0
            elif c.closing:
                continue
            elif c.transport is not None and c.transport.is_close_frame_sent:
                # picows closed it itself (a framing error: 1002, 1009) and disconnects gracefully,
                # which waits for a peer that may never read: give it the close grace, then reset.
                hs = c.transport.close_handshake
                if hs is not None and hs.sent is not None and not hs.recv_then_sent:
                    c.peer_fault(int(hs.sent.code), hs.sent.reason)  # not logged at the disconnect then
                c.closing = True
                c._start_grace(CLOSE_GRACE_S)
            elif c.ping_sent_at:
                if now - c.ping_sent_at >= timeout:
                    if self._on_timeout is not None:
                        self._on_timeout()
                    c.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout: no pong")
            elif now - c.idle_since >= hb:
                c.ping_sent_at = now
                t = c.transport
                if t is not None:
                    t.send_ping()
