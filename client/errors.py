"""The client's exceptions: one small hierarchy, so callers can catch as broadly as they need.

``ClientError`` is the root. Errors the *server* reported for one request are
``ProtocolError`` subclasses keyed by the wire ``code``, so application code can
write ``except NotJoined`` instead of comparing strings, while an unknown future
code still arrives as a plain ``ProtocolError`` rather than crashing the client.
Everything about the *connection* (handshake refused, closed, gave up) is a
``ConnectionError``-flavoured ``ClientError`` so generic network handling works.
"""

from __future__ import annotations

from typing import ClassVar


class ClientError(Exception):
    """Root of every exception raised by this package."""


class ProtocolError(ClientError):
    """The server answered a request with ``{"type": "error"}``.

    Raised from the awaiting call; the connection stays open (the protocol
    guarantees an error reply never closes it by itself).
    """

    code_name: ClassVar[str] = ""
    transient: ClassVar[bool] = False
    """True for "not now" rather than "never": the same request may succeed later (``TRANSIENT_CODES``)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class InvalidMessage(ProtocolError):
    code_name = "INVALID_MESSAGE"


class UnknownType(ProtocolError):
    code_name = "UNKNOWN_TYPE"


class Forbidden(ProtocolError):
    code_name = "FORBIDDEN"


class NotJoined(ProtocolError):
    code_name = "NOT_JOINED"


class NotAvailable(ProtocolError):
    """The room's namespace has the feature off (``presence`` / ``presence_stats``)."""

    code_name = "NOT_AVAILABLE"


class RateLimited(ProtocolError):
    code_name = "RATE_LIMITED"
    transient = True


class LimitExceeded(ProtocolError):
    """The connection is in as many rooms as the server allows (``--max-rooms-per-connection``)."""

    code_name = "LIMIT_EXCEEDED"


class Unavailable(ProtocolError):
    """The server could not take the request right now (e.g. its broker is down); retrying may work."""

    code_name = "UNAVAILABLE"
    transient = True


class InternalError(ProtocolError):
    code_name = "INTERNAL"
    transient = True


_BY_CODE: dict[str, type[ProtocolError]] = {
    cls.code_name: cls
    for cls in (
        InvalidMessage,
        UnknownType,
        Forbidden,
        NotJoined,
        NotAvailable,
        RateLimited,
        LimitExceeded,
        Unavailable,
        InternalError,
    )
}

TRANSIENT_CODES: frozenset[str] = frozenset(code for code, cls in _BY_CODE.items() if cls.transient)
"""Codes after which a rejoin is retried with a backoff instead of dropping the room (``Session._rejoin_all``)."""


def error_for(code: str, message: str = "") -> ProtocolError:
    """Build the most specific exception for a wire error code (unknown codes stay usable)."""
    return _BY_CODE.get(code, ProtocolError)(code, message)


class InvalidPayload(ClientError, ValueError):
    """A payload the client refuses before sending: it would not arrive as it was sent.

    The protocol's payload rule (PROTOCOL.md, docs/protocol-choices.md "Encodings"): a payload
    is null, a boolean, an integer in -2^63..2^64-1, a finite float, a string, an array or a
    map with string keys, nested at most 64 deep, so that every subscriber gets it exactly,
    in either encoding. In Python that is ``None``, ``bool``, ``int``, ``float``, ``str``,
    ``list`` and ``dict`` with ``str`` keys (exactly those types); anything else, a tuple,
    bytes, NaN, a datetime or a Struct included, is refused the same way in both encodings
    (JSON would have sent NaN as null, bytes as base64, ``{1: 2}`` as ``{"1": 2}``; the server
    refuses them from MessagePack). ``problem`` says what and where.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(f"payload refused before sending: {problem}")
        self.problem = problem


class RequestTimeout(ClientError, TimeoutError):
    """No reply within the request's timeout.

    Subclasses ``TimeoutError`` so ``except TimeoutError`` keeps working. The
    request may still have been executed by the server; a reply that arrives
    later is dropped silently.
    """

    def __init__(self, kind: str, timeout: float) -> None:
        super().__init__(f"no reply to {kind!r} within {timeout:g}s")
        self.kind = kind
        self.timeout = timeout


class MessageTimeout(RequestTimeout):
    """A message stream's ``get(timeout)`` waited ``timeout`` seconds for nothing.

    The message says what it waited for (``no message in room 'chat' within 2s``); ``room``
    is the stream's room (None for ``messages()`` and ``pushes()``). Nothing is lost: a
    message arriving later waits in the buffer for the next read.
    """

    def __init__(self, what: str, timeout: float, room: str | None = None) -> None:
        TimeoutError.__init__(self, f"{what} within {timeout:g}s")
        self.kind = "message"
        self.timeout = timeout
        self.room = room


class ConnectionClosed(ClientError, ConnectionError):
    """The connection ended before the request got a reply, or the client has stopped for good.

    A request in flight when the socket drops fails with this instead of being
    resent: the server may or may not have executed it (publish is not idempotent).
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed with {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class NotConnected(ClientError, ConnectionError):
    """A fire-and-forget send was attempted while no connection is open (e.g. while reconnecting)."""


class InvalidURL(ClientError, ValueError):
    """The URL is not a WebSocket URL the client can connect to, raised by ``connect()`` before any I/O.

    ``ws://`` or ``wss://``, a host, a port in 0..65535, no fragment (RFC 6455 section 3).
    The message says what is wrong without quoting the URL (it may carry a token);
    ``url`` holds it.
    """

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"invalid WebSocket URL: {problem}")
        self.url = url
        self.problem = problem


REASON_LIMIT = 200
"""Characters of a refusal's body quoted in ``str(HandshakeRejected)`` at most."""


def refusal_reason(body: bytes) -> str:
    """The reason a refused upgrade's body gives, fit for an exception message, or "".

    wsfan answers a refused upgrade with one fixed sentence of its own as ``text/plain``
    (``token expired``, ``invalid token signature``...; never a header, query or token,
    PROTOCOL.md). Any other server (a proxy's HTML page) is cut down to its first line,
    printable characters only, at most ``REASON_LIMIT`` characters.
    """
    line = body.decode("utf-8", "replace").strip().split("\n", 1)[0].strip()
    line = "".join(ch if ch.isprintable() else " " for ch in line)
    return line if len(line) <= REASON_LIMIT else line[: REASON_LIMIT - 3] + "..."


class HandshakeRejected(ClientError, ConnectionError):
    """The server answered the WebSocket upgrade with an HTTP error instead of 101.

    ``str(exc)`` is ``upgrade refused with HTTP <status>: <reason>``, the reason being the
    server's (``refusal_reason`` of ``body``; wsfan's are fixed sentences such as ``token
    expired``). ``retry_after`` holds the parsed ``Retry-After`` header in seconds (503
    while draining), which the reconnect loop honours; ``body`` the raw response body.
    """

    def __init__(self, status: int, retry_after: float | None = None, body: bytes = b"") -> None:
        reason = refusal_reason(body)
        super().__init__(f"upgrade refused with HTTP {status}" + (f": {reason}" if reason else ""))
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.reason = reason


class Unauthorized(HandshakeRejected):
    """HTTP 401: missing, bad or expired token. Retrying with the same token cannot succeed."""


class MessagesDropped(ClientError):
    """Raised once by a message stream read after its buffer overflowed.

    The stream stays usable: the next read returns the oldest message still
    buffered. ``count`` is how many messages were discarded since the last read.
    """

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} message(s) dropped: the reader did not keep up")
        self.count = count
