"""The opening handshake of RFC 6455 (§4.2.1, §4.2.2, §11.3) and the request-header rules of both ports.

picows parses the request line and the header block (GET, ``HTTP/1.1``, token header
names, no control characters, no body) and answers what it cannot parse with 400 before
the application sees anything. After the application's listener factory, picows checks a
few upgrade headers itself, but stricter than the RFC in places (``Connection`` must be
exactly ``upgrade``) and looser in others (a second ``Sec-WebSocket-Key`` is ignored,
versions 7 and 8 pass). So the server decides every rule here, before picows looks:
:func:`check_upgrade` returns either the accepted :class:`Upgrade` or a :class:`Refusal`
(status, short reason, headers), and :func:`picows_headers` hands picows a canonical header
set that its own check accepts.

Header values come from picows decoded as ASCII with ``surrogateescape`` (from aiohttp as
UTF-8 with ``surrogateescape``): any byte above 0x7F is a lone surrogate or a non-ASCII
character, which no rule here accepts as a number, a key, a token or an origin.

Answers (docs/protocol-choices.md, "Handshake"):

- 400: no ``Host`` or more than one (RFC 7230 §5.4); ``Upgrade`` without the ``websocket``
  token; ``Connection`` without the ``Upgrade`` token; ``Sec-WebSocket-Key`` missing,
  repeated, or not the base64 of 16 bytes (§4.2.1 item 5, §11.3.1); a repeated singleton
  header (``Sec-WebSocket-Version``, ``Origin``, ``Authorization``); a subprotocol that is
  not an HTTP token (§4.1, §11.3.4).
- 426 with ``Upgrade: websocket``: a GET of a WebSocket path without any ``Upgrade`` header
  (RFC 7231 §6.5.15).
- 426 with ``Sec-WebSocket-Version: 13``: a version other than 13, or none (§4.2.2 item 4, §4.4).
- 403: an ``Origin`` outside ``--allowed-origins`` (§4.2.2 item 4, §10.2).
"""

from __future__ import annotations

import binascii
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from picows import WSUpgradeResponse

VERSION = "13"

# RFC 7230 §3.2.6: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP error answer: status, a short fixed reason (the body), extra response headers."""

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Upgrade:
    """An upgrade request that passed every rule: its key and the subprotocols offered, in order."""

    key: str
    protocols: tuple[str, ...]


# picows' own limits for a request head (picows.pyx: _http_max_size, _HTTP_MAX_NUM_HEADERS).
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_LINES = 128
_TOKEN_BYTES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9112 §3.2 / RFC 3986: a request target is visible ASCII (non-ASCII is percent-encoded).
_TARGET_BYTES = re.compile(rb"[\x21-\x7e]+\Z")
_CTL_BYTES = re.compile(
    rb"[\x00-\x08\x0a-\x1f\x7f]"
)  # RFC 7230 §3.2: field-value allows HTAB, not other CTLs
_NO_BODY = "a request body is not accepted here"
# RFC 9112 §2.2: a recipient MAY take a bare LF as a line end; we do not (a proxy in front that
# splits lines differently would see other headers than we do) and say so instead.
BARE_LF = "request lines must end with CRLF, not a bare LF (RFC 9112 section 2.2)"


def request_start(buf: bytes | bytearray, end: int) -> int:
    """Offset of the request line in ``buf[:end]``: past the empty lines (CRLF) sent before it.

    RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF) received before the
    request-line (clients that end a previous body with an extra CRLF send one). Any number is
    skipped; they count towards the 16 KiB head limit (:data:`MAX_HEAD_BYTES`), which bounds
    them. A bare LF there is not skipped: the head check refuses it (:data:`BARE_LF`).
    """
    i = 0
    while i + 2 <= end and buf[i] == 13 and buf[i + 1] == 10:
        i += 2
    return i


def check_request_head(head: bytes) -> Refusal | None:
    """The request line and header block of the WebSocket port (``head`` without the blank line), as RFC 7230 says.

    The same rules picows applies before the listener factory, so that what picows would
    refuse is refused here first with a fixed sentence (picows answers with its parser's
    exception text, which quotes the offending line back): a request line of three parts,
    GET (else 405 with ``Allow: GET``), a target of visible ASCII (a control character or a raw
    byte above 0x7F is 400, as on the ``--http-port``), ``HTTP/1.1``, at most 128 header lines (else 431,
    RFC 6585 §5), no obsolete line folding, ``name: value`` with a token name and no control
    characters but HTAB, no ``Transfer-Encoding`` and no non-zero ``Content-Length``; every line
    ends with CRLF (a bare LF is 400 :data:`BARE_LF`, RFC 9112 §2.2).

    Every connection passes here, so a good head costs one regex match and two substring
    searches (about 10 us for a browser's head on a busy core); the line-by-line
    walk runs only to name what is wrong with a bad one.
    """
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    if b"\n" in request_line:
        return Refusal(400, BARE_LF)
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return Refusal(400, "malformed request line")
    method, target, version = parts
    if method != b"GET":
        return Refusal(405, "only GET is served on this port", {"Allow": "GET"})
    if not target:
        return Refusal(400, "malformed request line")
    if _TARGET_BYTES.match(target) is None:
        return Refusal(400, "malformed request target: visible ASCII only (RFC 3986, RFC 9112 section 3.2)")
    if version != b"HTTP/1.1":
        return Refusal(400, "HTTP/1.1 is required")
    if line_end < 0:
        return None
    if head.count(b"\r\n") > MAX_HEADER_LINES:
        return Refusal(431, f"more than {MAX_HEADER_LINES} header fields")
    block = head[line_end + 2 :] + b"\r\n"
    lower = block.lower()  # a body field named anywhere, even inside a value, takes the slow path
    if _HEADER_BLOCK.match(block) is None or b"transfer-encoding" in lower or b"content-length" in lower:
        return _check_header_lines(block[:-2].split(b"\r\n"))
    return None


# Header lines that are all ``token ":" field-value`` (HTAB, visible ASCII, obs-text), CRLF-terminated.
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\Z")


def _check_header_lines(lines: list[bytes]) -> Refusal | None:
    """The slow path of :func:`check_request_head`: which header line breaks which rule."""
    lengths = []
    for line in lines:
        if b"\n" in line:
            return Refusal(400, BARE_LF)
        if line[:1] in (b" ", b"\t"):
            return Refusal(400, "obsolete header line folding")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN_BYTES.match(name) is None:
            return Refusal(400, "malformed header line")
        value = value.strip(b" \t")
        if _CTL_BYTES.search(value) is not None:
            return Refusal(400, "control character in a header value")
        lower = name.lower()
        if lower == b"transfer-encoding":
            return Refusal(400, _NO_BODY)
        if lower == b"content-length":
            lengths.append(value)
    if len(lengths) > 1 or (lengths and (not lengths[0] or lengths[0].strip(b"0"))):
        return Refusal(400, _NO_BODY)
    return None


def http_answer(refusal: Refusal) -> bytes:
    """A refusal as a whole HTTP/1.1 response that closes the connection: status, headers, the
    reason as a ``text/plain`` line."""
    body = refusal.reason.encode() + b"\n"
    extra = "".join(f"{k}: {v}\r\n" for k, v in refusal.headers.items())
    return (
        f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}\r\nConnection: close\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def list_elements(values: Iterable[str]) -> list[str]:
    """RFC 7230 §7 ``#rule``: the elements of every line of a list header, OWS stripped, empty ones dropped.

    Several header lines of one name are the same as one line with the values joined by commas
    (RFC 7230 §3.2.2), which is what §11.3.4 says of ``Sec-WebSocket-Protocol``.
    """
    return [e for v in values for e in (part.strip(" \t") for part in v.split(",")) if e]


def has_token(values: list[str], token: str) -> bool:
    """Whether the lines of a list header (:func:`list_elements`) hold ``token`` (lower-case), ASCII case-insensitively.

    One line without a comma, what nearly every client sends, is compared as it is.
    """
    if len(values) == 1 and "," not in values[0]:
        return values[0].strip(" \t").lower() == token
    return token in (e.lower() for e in list_elements(values))


def single(headers: Any, name: str) -> str | None | Refusal:
    """The value of a header that may appear at most once; a :class:`Refusal` (400) when repeated."""
    values = headers.getall(name, [])
    if len(values) > 1:
        return Refusal(400, f"more than one {name} header")
    return values[0] if values else None


def check_host(headers: Any) -> Refusal | None:
    """RFC 7230 §5.4: an HTTP/1.1 request has exactly one ``Host`` (it may be empty), of printable ASCII."""
    host = single(headers, "Host")
    if isinstance(host, Refusal):
        return host
    if host is None:
        return Refusal(400, "missing Host header")
    if not (host.isascii() and host.isprintable()) or " " in host:
        return Refusal(400, "malformed Host header")
    return None


def valid_key(key: str) -> bool:
    """§4.2.1 item 5: ``Sec-WebSocket-Key`` is the base64 of 16 bytes (24 characters, padding included)."""
    if len(key) != 24 or not key.isascii():
        return False
    try:  # base64.b64decode(key, validate=True) without its Python layers
        return len(binascii.a2b_base64(key.encode(), strict_mode=True)) == 16
    except binascii.Error:
        return False


class OriginPolicy:
    """``--allowed-origins``: shell globs over the serialized origin (RFC 6454 §6.2), ASCII case-insensitive.

    An empty pattern list allows every origin. A request without ``Origin`` is not from a
    browser (browsers always send it on a WebSocket upgrade, RFC 6455 §4.1 item 8, and on a
    cross-origin ``EventSource``) and is allowed: the policy stops cross-site WebSocket
    hijacking, which needs a browser. ``Origin: null`` (sandboxed frames, ``file:``) is
    allowed only by a pattern that matches ``null`` (``*`` does).
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(p.strip().lower() for p in patterns if p.strip())
        self._re = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns))
            if self.patterns
            else None
        )

    @classmethod
    def parse(cls, text: str) -> OriginPolicy:
        """From the flag's text: patterns separated by commas or whitespace."""
        return cls(re.split(r"[\s,]+", text))

    @property
    def allows_any(self) -> bool:
        return self._re is None

    def check(self, headers: Any) -> Refusal | None:
        """None when the request may proceed; 400 for repeated or non-ASCII ``Origin``, 403 for a foreign one."""
        origin = single(headers, "Origin")
        if isinstance(origin, Refusal):
            return origin
        if origin is None or self._re is None:
            return None
        if not (origin.isascii() and origin.isprintable()):
            return Refusal(400, "malformed Origin header")
        if self._re.fullmatch(origin.lower()) is None:
            return Refusal(403, "origin not allowed")
        return None


def origin_form(target: bytes) -> bytes:
    """The request target as path and query: ``http://host:port/ws?x`` becomes ``/ws?x``.

    RFC 6455 §4.1 allows the absolute form of the Request-URI (RFC 7230 §5.3.2), which a
    proxy may forward; the path then starts at the first ``/`` after the authority (``/``
    when there is none). Anything else is returned as it is.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https", b"ws", b"wss"):
        return target
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    tail = rest[cut:]
    return tail if tail.startswith(b"/") else b"/" + tail


def check_upgrade(headers: Any) -> Upgrade | Refusal:
    """Every rule of RFC 6455 §4.2.1 on a GET of a WebSocket path; the first broken rule's answer.

    ``headers`` is a case-insensitive multi-dict (picows' ``CIMultiDict``). Method and HTTP
    version were checked by picows (GET, ``HTTP/1.1``), ``Host`` by :func:`check_host`.
    """
    upgrade = headers.getall("Upgrade", [])
    if not upgrade:
        return Refusal(426, "this is a WebSocket endpoint: send an upgrade request", {"Upgrade": "websocket"})
    if not has_token(upgrade, "websocket"):
        return Refusal(400, "Upgrade header lacks the websocket token")
    if not has_token(headers.getall("Connection", []), "upgrade"):
        return Refusal(400, "Connection header lacks the Upgrade token")
    version = single(headers, "Sec-WebSocket-Version")
    if isinstance(version, Refusal):
        return version
    if version != VERSION:
        return Refusal(426, "unsupported WebSocket version: only 13", {"Sec-WebSocket-Version": VERSION})
    keys = headers.getall("Sec-WebSocket-Key", [])
    if len(keys) != 1:
        return Refusal(400, "exactly one Sec-WebSocket-Key header is required")
    if not valid_key(keys[0]):
        return Refusal(400, "Sec-WebSocket-Key must be the base64 of 16 bytes")
    protocols = list_elements(headers.getall("Sec-WebSocket-Protocol", ()))
    if protocols and not all(_TOKEN.match(p) for p in protocols):
        return Refusal(400, "Sec-WebSocket-Protocol must be a list of tokens")
    return Upgrade(keys[0], tuple(protocols))


# What picows' _validate_upgrade_request reads (lower-case get/in/[] lookups only, picows.pyx).
_CANONICAL = {"upgrade": "websocket", "connection": "upgrade", "sec-websocket-version": VERSION}


def picows_headers(upgrade: Upgrade) -> dict[str, str]:
    """The request headers picows re-checks after the listener factory, in the one form it accepts.

    picows looks them up by lower-case name only (``get``, ``in``, ``[]``), so a plain dict
    serves (a ``CIMultiDict`` costs more to build on every connect). Nothing else reads the
    request headers after the handshake (transport.py drops them on connect).
    """
    headers = _CANONICAL.copy()
    headers["sec-websocket-key"] = upgrade.key
    return headers


class _Headers(dict[str, str]):
    """A 101's header map: picows sets ``Sec-WebSocket-Accept`` in it, which ``to_bytes`` then takes out."""

    __slots__ = ()


class SwitchingProtocols(WSUpgradeResponse):  # type: ignore[misc]
    """picows' 101 answer with its bytes built once, and the connection's first frame in the same write.

    ``create_101_response`` builds a header multi-dict and encodes each header line on every
    connect; here the head is fixed per set of extra headers (subprotocol, extensions), one
    object per set (:func:`switching`) shared by every connection. The listener factory sets
    ``first`` (the welcome frame) just before returning it; picows then, in the same call,
    sets the accept header and calls ``to_bytes``, and writes the result: the 101 and the
    welcome leave in one ``write`` (one syscall, one TCP segment) instead of two. The bytes
    are those picows would send (same header order, ``Connection``/``Upgrade`` after the extra
    headers, ``Sec-WebSocket-Accept`` last), followed by the frame.
    """

    __slots__ = ("first", "_head")

    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self.version = b"HTTP/1.1"
        self.status = HTTPStatus.SWITCHING_PROTOCOLS
        self.headers = _Headers()
        self.body = None
        self.first = b""
        lines = "".join(f"{k}: {v}\r\n" for k, v in extra)
        self._head = (
            f"HTTP/1.1 101 Switching Protocols\r\n{lines}"
            "Connection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: "
        ).encode()

    def to_bytes(self) -> bytearray:
        """The head, the accept value picows just set, the blank line, then ``first`` (taken: sent once)."""
        out = bytearray(self._head)
        out += self.headers.pop("Sec-WebSocket-Accept").encode()
        out += b"\r\n\r\n"
        out += self.first
        self.first = b""
        return out


_SWITCHING: dict[tuple[tuple[str, str], ...], SwitchingProtocols] = {}
_MAX_SHARED = 64


def switching(extra: tuple[tuple[str, str], ...] = (), first: bytes = b"") -> SwitchingProtocols:
    """The shared 101 for these extra headers, carrying ``first`` for the connection being answered.

    Only for a listener factory's return value: picows writes it before any other connection's
    factory can run (same call), which is what makes sharing one object safe.
    """
    response = _SWITCHING.get(extra)
    if response is None:
        response = SwitchingProtocols(extra)
        if len(_SWITCHING) < _MAX_SHARED:  # extension parameters vary a little; never without bound
            _SWITCHING[extra] = response
    response.first = first
    return response
