"""A small RFC 6455 WebSocket client on gevent sockets, for the load generator.

Why not websocket-client: it works under gevent, but it reads the handshake one
byte per ``recv`` call and every frame with two or three ``recv`` calls plus a
lock and several objects per frame. In a reconnection storm or a fan-out test
the load generator, not the server, then becomes the bottleneck. This client
reads the handshake and frames from one buffer filled 64 KiB at a time and
hands complete messages to the caller, so one greenlet per connection can keep
up with tens of thousands of small messages per second on one core.

It only does what the load generator needs: client handshake (with extra
headers and subprotocols, ``ws://`` and ``wss://``), masked sends, message
reassembly, automatic pong replies and close-code reporting. It has no Locust
dependency so it can be tested on its own.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import ssl
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.lock import Semaphore

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

#: Close code reported when the TCP connection ended without a close frame.
ABNORMAL_CLOSE = 1006
#: Close code carried by a close frame without a status code.
NO_STATUS = 1005

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_READ_CHUNK = 65536
_MAX_HANDSHAKE = 65536
#: A client-side cap so that a misbehaving server cannot make us buffer without bound.
MAX_MESSAGE = 64 * 1024 * 1024


class WSError(Exception):
    """Base class of every error raised by this module."""


class HandshakeError(WSError):
    """The upgrade was refused or malformed; ``status`` is the HTTP status (0 if none)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    @property
    def retry_after(self) -> float | None:
        """Seconds from a ``Retry-After: <seconds>`` header (admission control during storms), if any."""
        value = self.headers.get("retry-after", "")
        try:
            return max(0.0, float(value)) if value else None
        except ValueError:
            return None  # an HTTP date: not worth parsing for a load generator


class ConnectionClosed(WSError):
    """The connection is over; ``code`` is the peer's close code or 1006 if none came."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed {code} {reason}".strip())
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed ``ws://`` / ``wss://`` URL."""

    secure: bool
    host: str
    port: int
    resource: str  # path plus query, what goes on the request line

    @property
    def host_header(self) -> str:
        default = 443 if self.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """Split a WebSocket URL; ``http(s)://`` is accepted as a synonym of ``ws(s)://``.

    Locust's web UI pre-fills hosts with ``http://``, so accepting it avoids a
    confusing failure when someone starts a run from the UI.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"not a WebSocket URL: {url!r}")
    secure = scheme in ("wss", "https")
    if not parts.hostname:
        raise ValueError(f"no host in URL: {url!r}")
    port = parts.port or (443 if secure else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return Target(secure, parts.hostname, port, resource)


def _mask(key: bytes, payload: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``key`` using one big-int operation (fast in CPython)."""
    n = len(payload)
    if n == 0:
        return b""
    keystream = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keystream, "little")).to_bytes(n, "little")


def _frame_header(opcode: int, length: int) -> bytes:
    """Header of a final, masked client frame (the mask key follows it)."""
    b0 = 0x80 | opcode
    if length < 126:
        return bytes((b0, 0x80 | length))
    if length < 65536:
        return struct.pack("!BBH", b0, 0x80 | 126, length)
    return struct.pack("!BBQ", b0, 0x80 | 127, length)


_TLS_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def _tls_context(insecure: bool) -> ssl.SSLContext:
    """One gevent-cooperative TLS context per verification mode, shared by all connections (saves memory)."""
    ctx = _TLS_CONTEXTS.get(insecure)
    if ctx is None:
        ctx = gssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _TLS_CONTEXTS[insecure] = ctx
    return ctx


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Return (code, reason) of a close frame payload (1005 when it has no code)."""
    if len(payload) < 2:
        return NO_STATUS, ""
    (code,) = struct.unpack_from("!H", payload)
    return code, payload[2:].decode("utf-8", "replace")


class WSConnection:
    """One client WebSocket connection.

    Thread model: exactly one greenlet calls :meth:`recv`; any greenlet may call
    the send methods (they are serialised by a gevent lock, because two greenlets
    blocking in ``sendall`` on the same gevent socket is an error).
    """

    def __init__(
        self,
        sock: gsocket.socket,
        subprotocol: str | None,
        leftover: bytes,
        status: int,
        deflate: bool = False,
    ) -> None:
        self.sock = sock
        # permessage-deflate accepted by the server (RFC 7692): inbound messages with RSV1 are
        # inflated, each on its own (wsfan never keeps a context); we send uncompressed.
        self.deflate = deflate
        self._frag_compressed = False
        self.subprotocol = subprotocol
        self.handshake_status = status
        self._buf = bytearray(leftover)
        self._pos = 0
        self._wlock = Semaphore()
        self._frag_opcode: int | None = None
        self._frag_parts: list[bytes] = []
        self.close_sent = False
        self.closed = False

    # ------------------------------------------------------------------ connect
    @classmethod
    def connect(
        cls,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        subprotocols: list[str] | None = None,
        timeout: float = 10.0,
        insecure: bool = False,
        recv_buffer: int = 0,
        compression: bool = False,
    ) -> WSConnection:
        """Open TCP (and TLS), perform the upgrade, return a connection ready to use.

        ``timeout`` bounds the TCP connect and the handshake; afterwards the
        socket blocks cooperatively without a timeout (heartbeats are the
        server's job). ``insecure`` skips TLS certificate checks (self-signed
        test deployments). ``recv_buffer`` > 0 sets SO_RCVBUF before connecting, to
        simulate a slow consumer with a small kernel buffer. ``compression`` offers
        permessage-deflate (what the server compresses is inflated here).
        Raises :class:`HandshakeError` on a non-101 answer and ``OSError``
        (including ``TimeoutError``) on network failures.
        """
        target = parse_url(url)
        sock = gsocket.socket(
            gsocket.AF_INET6 if ":" in target.host else gsocket.AF_INET, gsocket.SOCK_STREAM
        )
        try:
            if recv_buffer > 0:
                sock.setsockopt(gsocket.SOL_SOCKET, gsocket.SO_RCVBUF, recv_buffer)
            sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            sock.connect(cls._resolve(target))
            if target.secure:
                sock = _tls_context(insecure).wrap_socket(sock, server_hostname=target.host)
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            lines = [
                f"GET {target.resource} HTTP/1.1",
                f"Host: {target.host_header}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            if subprotocols:
                lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
            if compression:
                lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
            for name, value in (headers or {}).items():
                lines.append(f"{name}: {value}")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status, reason, resp_headers, leftover = cls._read_response(sock)
            if status != 101:
                raise HandshakeError(status, reason, resp_headers)
            expected = base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")
            if resp_headers.get("sec-websocket-accept", "") != expected:
                raise HandshakeError(status, "bad Sec-WebSocket-Accept")
            if resp_headers.get("upgrade", "").lower() != "websocket":
                raise HandshakeError(status, "missing Upgrade: websocket")
            subprotocol = resp_headers.get("sec-websocket-protocol") or None
            if subprotocol is not None and subprotocol not in (subprotocols or []):
                raise HandshakeError(status, f"unrequested subprotocol {subprotocol!r}")
            agreed = resp_headers.get("sec-websocket-extensions", "").lower()
            if agreed and not (compression and agreed.startswith("permessage-deflate")):
                raise HandshakeError(status, f"unrequested extension {agreed!r}")
            sock.settimeout(None)
            return cls(sock, subprotocol, leftover, status, deflate=bool(agreed))
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _resolve(target: Target) -> tuple[str, int]:
        return (target.host, target.port)

    @staticmethod
    def _read_response(sock: gsocket.socket) -> tuple[int, str, dict[str, str], bytes]:
        """Read the HTTP response head with large reads; return what came after it too."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                if not data:
                    raise HandshakeError(0, "connection closed before any response")
                break
            data += chunk
            if len(data) > _MAX_HANDSHAKE:
                raise HandshakeError(0, "response head too large")
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise HandshakeError(0, "truncated response head")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise HandshakeError(0, f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        resp_headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            resp_headers[name.strip().lower()] = value.strip()
        return status, reason, resp_headers, rest

    # ------------------------------------------------------------------ receive
    def _fill(self) -> None:
        """Read more bytes; compact first so that the buffer never grows by consumed data."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            chunk = self.sock.recv(_READ_CHUNK)
        except OSError as exc:
            self.closed = True
            raise ConnectionClosed(ABNORMAL_CLOSE, f"{type(exc).__name__}: {exc}") from exc
        if not chunk:
            self.closed = True
            raise ConnectionClosed(ABNORMAL_CLOSE, "EOF without close frame")
        self._buf += chunk

    def _read_frame(self) -> tuple[bool, int, bytes, bool]:
        buf = self._buf
        while len(buf) - self._pos < 2:
            self._fill()
            buf = self._buf
        pos = self._pos
        b0 = buf[pos]
        b1 = buf[pos + 1]
        if b0 & 0x70 and (b0 & 0x30 or not self.deflate):
            raise ConnectionClosed(1002, "RSV bits set by server")
        length = b1 & 0x7F
        hdr = 2
        if length == 126:
            hdr = 4
        elif length == 127:
            hdr = 10
        masked = b1 & 0x80
        if masked:
            hdr += 4
        while len(self._buf) - self._pos < hdr:
            self._fill()
        buf = self._buf
        pos = self._pos
        if length == 126:
            (length,) = struct.unpack_from("!H", buf, pos + 2)
        elif length == 127:
            (length,) = struct.unpack_from("!Q", buf, pos + 2)
        if length > MAX_MESSAGE:
            raise ConnectionClosed(1009, f"server frame of {length} bytes")
        while len(self._buf) - self._pos < hdr + length:
            self._fill()
        buf = self._buf
        pos = self._pos
        start = pos + hdr
        payload = bytes(buf[start : start + length])
        if masked:  # servers must not mask, but unmasking costs nothing to support
            payload = _mask(bytes(buf[start - 4 : start]), payload)
        end = start + length
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return bool(b0 & 0x80), b0 & 0x0F, payload, bool(b0 & 0x40)

    @staticmethod
    def _inflate(data: bytes) -> bytes:
        """One permessage-deflate message without context (RFC 7692 §7.2.2)."""
        return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")

    def recv(self) -> tuple[int, bytes]:
        """Return the next (opcode, payload): a complete TEXT/BINARY message, or a PING/PONG.

        Pings are answered before they are returned (so heartbeats work even if
        the caller ignores them). A close frame is answered and then raised as
        :class:`ConnectionClosed` with the server's code; a dropped TCP
        connection raises it with 1006.
        """
        while True:
            fin, opcode, payload, compressed = self._read_frame()
            if compressed and opcode != OP_TEXT and opcode != OP_BINARY:
                raise ConnectionClosed(1002, "RSV1 on a frame that does not start a message")
            if opcode == OP_TEXT or opcode == OP_BINARY:
                if self._frag_opcode is not None:
                    raise ConnectionClosed(1002, "new data frame inside a fragmented message")
                if fin:
                    return opcode, self._inflate(payload) if compressed else payload
                self._frag_compressed = compressed
                self._frag_opcode = opcode
                self._frag_parts = [payload]
            elif opcode == OP_CONT:
                if self._frag_opcode is None:
                    raise ConnectionClosed(1002, "orphan continuation frame")
                self._frag_parts.append(payload)
                if fin:
                    op = self._frag_opcode
                    data = b"".join(self._frag_parts)
                    if self._frag_compressed:
                        data = self._inflate(data)
                    self._frag_opcode = None
                    self._frag_parts = []
                    return op, data
            elif opcode == OP_PING:
                try:
                    self.send(payload, OP_PONG)
                except OSError:
                    pass  # the next read reports the failure
                return OP_PING, payload
            elif opcode == OP_PONG:
                return OP_PONG, payload
            elif opcode == OP_CLOSE:
                code, reason = parse_close_payload(payload)
                if not self.close_sent:
                    try:
                        self.close(code if code not in (NO_STATUS, ABNORMAL_CLOSE) else 1000)
                    except OSError:
                        pass
                self.closed = True
                raise ConnectionClosed(code, reason)
            else:
                raise ConnectionClosed(1002, f"unknown opcode {opcode}")

    # --------------------------------------------------------------------- send
    def send(self, payload: bytes, opcode: int = OP_TEXT) -> None:
        """Send one complete, masked frame."""
        key = random.getrandbits(32).to_bytes(4, "little")
        frame = _frame_header(opcode, len(payload)) + key + _mask(key, payload)
        with self._wlock:
            self.sock.sendall(frame)

    def ping(self, payload: bytes = b"") -> None:
        """Send a WebSocket ping frame."""
        self.send(payload, OP_PING)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame once; the caller keeps reading until the server's close arrives."""
        if self.close_sent:
            return
        self.close_sent = True
        self.send(struct.pack("!H", code) + reason.encode("utf-8")[:120], OP_CLOSE)

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (what a network failure looks like).

        ``shutdown`` first, so a greenlet blocked in ``recv`` wakes up with EOF
        instead of an error about a file descriptor closed under it.
        """
        self.closed = True
        try:
            self.sock.shutdown(gsocket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
