"""A tiny blocking WebSocket client over a plain TCP socket, for frame-level tests.

Unlike a real client library it lets a test send anything: any opcode, the FIN
flag off, reserved bits on, unmasked frames, a declared length that does not
match the payload. It never answers the server by itself (no automatic pong,
no automatic close reply) unless asked, so a test sees every frame the server
sent. Every read has a timeout: a server that does not answer fails the test
instead of hanging it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
from dataclasses import dataclass, field

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

RSV1 = 0x4
RSV2 = 0x2
RSV3 = 0x1

DEFAULT_TIMEOUT = 3.0


class ConnectionClosed(Exception):
    """The server closed the TCP connection (EOF or reset) while a frame was expected."""


class HandshakeFailed(Exception):
    """The server answered the upgrade request with something other than a valid 101."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"upgrade refused: HTTP {status} {body[:200]!r}")
        self.status = status
        self.headers = headers
        self.body = body


@dataclass
class Frame:
    """One frame as the server sent it."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0  # the three reserved bits, RSV1 = 0x4, RSV2 = 0x2, RSV3 = 0x1
    masked: bool = False

    @property
    def is_control(self) -> bool:
        return self.opcode >= 0x8

    def close_info(self) -> tuple[int | None, str]:
        """(code, reason) of a close frame; (None, "") for an empty one."""
        assert self.opcode == CLOSE, f"not a close frame: opcode {self.opcode:#x}"
        if not self.payload:
            return None, ""
        (code,) = struct.unpack("!H", self.payload[:2])
        return code, self.payload[2:].decode("utf-8", errors="replace")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def close_payload(code: int | None = None, reason: bytes | str = b"") -> bytes:
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode()
    return struct.pack("!H", code) + reason


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """Encode one frame. ``length`` overrides the declared payload length (a lie the server must catch)."""
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    n = len(payload) if length is None else length
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return header + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return header + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    k = int.from_bytes((key * (len(data) // 4 + 1))[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(len(data), "big")


def _read_http_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionClosed(f"EOF during HTTP response head: {buf!r}")
        buf += chunk
        if len(buf) > 65536:
            raise HandshakeFailed(0, {}, buf)
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def http_request(
    host: str,
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 request with ``Connection: close``: (status, lower-cased headers, body)."""
    deadline = time.monotonic() + timeout
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, body = _read_http_head(sock, deadline)
        status, hdrs = _parse_head(head)
        want = int(hdrs["content-length"]) if "content-length" in hdrs else None
        while want is None or len(body) < want:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if want is None:
                    break
                raise
            if not chunk:
                break
            body += chunk
    return status, hdrs, body


def upgrade_head(
    path: str = "/ws",
    *,
    key: str | None = None,
    host: str = "127.0.0.1",
    extra: list[tuple[str, str | bytes]] | None = None,
    drop: tuple[str, ...] = (),
) -> bytes:
    """A valid upgrade request head, byte for byte, with headers removed (``drop``, lower-case names) or
    added (``extra``, in order, repeats allowed, values as ``bytes`` for non-ASCII)."""
    base = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key or base64.b64encode(os.urandom(16)).decode()),
        ("Sec-WebSocket-Version", "13"),
    ]
    fields = [(k, v) for k, v in base if k.lower() not in drop] + list(extra or [])
    lines = [f"GET {path} HTTP/1.1".encode()]
    lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def send_head(
    host: str, port: int, head: bytes, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` exactly as given; (status, lower-cased headers, body). For a 101 the body is
    whatever arrived with the head (the server's first frames, if any), and the socket is closed."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head)
        head_in, body = _read_http_head(sock, deadline)
        status, hdrs = _parse_head(head_in)
        if status == 101:
            return status, hdrs, body
        want = int(hdrs.get("content-length", "-1"))
        while len(body) < want:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return status, hdrs, body


@dataclass
class RawWS:
    """One client connection. Build it with :meth:`connect`."""

    sock: socket.socket
    timeout: float = DEFAULT_TIMEOUT
    status: int = 101
    headers: dict[str, str] = field(default_factory=dict)
    _buf: bytearray = field(default_factory=bytearray)

    # ------------------------------------------------------------ opening

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        path: str = "/ws",
        *,
        protocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        rcvbuf: int | None = None,
    ) -> RawWS:
        """TCP connect and the HTTP upgrade by hand; raises :class:`HandshakeFailed` unless a valid 101.

        ``rcvbuf`` (bytes) shrinks SO_RCVBUF before connecting: a peer that reads nothing then
        backs the server's writes up quickly (slow-consumer tests).
        """
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                f"GET {path} HTTP/1.1",
                f"Host: {host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            if protocols:
                lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head, rest = _read_http_head(sock, deadline)
            status, hdrs = _parse_head(head)
            if status != 101:
                raise HandshakeFailed(status, hdrs, rest)
            if hdrs.get("sec-websocket-accept") != accept_key(key):
                raise HandshakeFailed(status, hdrs, b"bad Sec-WebSocket-Accept")
            if hdrs.get("upgrade", "").lower() != "websocket":
                raise HandshakeFailed(status, hdrs, b"missing Upgrade: websocket")
        except BaseException:
            sock.close()
            raise
        return cls(sock=sock, timeout=timeout, status=status, headers=hdrs, _buf=bytearray(rest))

    @property
    def subprotocol(self) -> str | None:
        return self.headers.get("sec-websocket-protocol")

    # ------------------------------------------------------------ sending

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(
        self,
        opcode: int,
        payload: bytes | str = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        length: int | None = None,
    ) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        self.sock.sendall(build_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length))

    def send_text(self, text: str | bytes) -> None:
        self.send_frame(TEXT, text)

    def send_binary(self, data: bytes) -> None:
        self.send_frame(BINARY, data)

    def send_fragments(self, opcode: int, chunks: list[bytes]) -> None:
        """One message as ``len(chunks)`` frames: ``opcode`` first, continuations after, FIN on the last."""
        frames = b"".join(
            build_frame(opcode if i == 0 else CONT, chunk, fin=i == len(chunks) - 1)
            for i, chunk in enumerate(chunks)
        )
        self.sock.sendall(frames)

    def send_close(self, code: int | None = 1000, reason: bytes | str = b"") -> None:
        self.send_frame(CLOSE, close_payload(code, reason))

    # ------------------------------------------------------------ receiving

    def _fill(self, n: int, deadline: float) -> None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame within {self.timeout}s (have {bytes(self._buf)!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError as e:
                raise ConnectionClosed(f"connection reset: {e}") from e
            if not chunk:
                raise ConnectionClosed(f"EOF while waiting for a frame (have {bytes(self._buf)!r})")
            self._buf += chunk

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv_frame(self, timeout: float | None = None) -> Frame:
        """The next frame exactly as sent; raises TimeoutError or ConnectionClosed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(2, deadline)
        b0, b1 = self._buf[0], self._buf[1]
        n = b1 & 0x7F
        masked = bool(b1 & 0x80)
        hlen = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if masked else 0)
        self._fill(hlen, deadline)
        header = self._take(hlen)
        if n == 126:
            (n,) = struct.unpack("!H", header[2:4])
        elif n == 127:
            (n,) = struct.unpack("!Q", header[2:10])
        self._fill(n, deadline)
        payload = self._take(n)
        if masked:
            payload = _xor(payload, header[-4:])
        return Frame(
            opcode=b0 & 0xF, payload=payload, fin=bool(b0 & 0x80), rsv=(b0 >> 4) & 0x7, masked=masked
        )

    def recv_message(self, timeout: float | None = None, *, answer_pings: bool = True) -> tuple[int, bytes]:
        """The next data message, reassembled: (opcode, payload). Pings are answered, pongs skipped.

        A close frame raises :class:`ConnectionClosed` carrying the close frame's code in the message.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        opcode: int | None = None
        parts: list[bytes] = []
        while True:
            f = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if f.opcode == PING:
                if answer_pings:
                    self.send_frame(PONG, f.payload)
                continue
            if f.opcode == PONG:
                continue
            if f.opcode == CLOSE:
                raise ConnectionClosed(f"close frame instead of a message: {f.close_info()}")
            if opcode is None:
                opcode = f.opcode
            parts.append(f.payload)
            if f.fin:
                return opcode, b"".join(parts)

    def expect_close(self, timeout: float | None = None, *, reply: bool = True) -> tuple[int | None, str]:
        """Skip data frames until the server's close frame: its (code, reason). Optionally answer it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            f = self.recv_frame(max(deadline - time.monotonic(), 0.001))
            if f.opcode == CLOSE:
                info = f.close_info()
                if reply:
                    try:
                        self.send_frame(CLOSE, f.payload[:2])
                    except OSError:
                        pass
                return info

    def wait_eof(self, timeout: float | None = None) -> bool:
        """True if the server closes the TCP connection within ``timeout`` (any frames before EOF are dropped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
            self._buf += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawWS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
