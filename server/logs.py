"""Logging setup: human-readable text by default, one JSON object per line in production.

JSON lines come from python-json-logger's ``JsonFormatter`` over the stdlib ``logging``
module. Each line has ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``, ``pid`` and,
in a worker of ``--workers N``, ``worker`` (its index, 0..N-1); plus whatever the call
site passes in ``extra=``, with these names (see ``fields``):

``conn``    connection id (``welcome.conn``)        ``user``    the token's ``sub``
``room``    a room name                             ``code``    WebSocket close code or HTTP status
``remote``  the peer's ``host:port``                ``reason``  why (a refusal, a close)
``path``    request path of a refused upgrade       ``event``   a stable name to filter on
``suppressed`` lines of the same event left out since the previous one (``Throttle``)

Secrets never reach a log line: call sites pass only the reason a token or key was
refused, never the token, the key or an ``Authorization`` header, and a request target
only through ``target_text`` (the query's values left out: ``?token=<jwt>`` is how browsers
authenticate). Behind them one filter on the handler (``_Redact``, installed by ``setup``)
runs ``redact`` over every record's message, string fields and traceback, so that text the
server does not choose (an application's exception, a library's message) cannot carry a
token either. Nothing on the hot path (decode, fan-out, frames) logs.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

# Record attributes renamed to the JSON keys documented above.
_RENAMED = {"levelname": "level", "name": "logger", "message": "msg", "process": "pid"}
_context: dict[str, Any] = {}


def fields(
    *,
    conn: str | None = None,
    user: str | None = None,
    room: str | None = None,
    code: int | None = None,
    remote: str | None = None,
    reason: str | None = None,
    path: str | None = None,
    event: str | None = None,
    suppressed: int | None = None,
) -> dict[str, Any]:
    """The ``extra=`` mapping of a log call: one place that spells the field names, Nones left out."""
    given = {
        "conn": conn,
        "user": user,
        "room": room,
        "code": code,
        "remote": remote,
        "reason": reason,
        "path": path,
        "event": event,
        "suppressed": suppressed or None,
    }
    return {k: v for k, v in given.items() if v is not None}


MAX_TARGET_TEXT = 200  # characters of a request target kept in a log line

# What ``redact`` replaces, in order. A JWT (compact JWS: three base64url parts, the first the
# base64url of '{"', RFC 7515 section 7.1), the credential after an HTTP auth scheme (RFC 9110
# section 11), and the value of every query parameter of a request target (a token, a key, an
# application's own secret parameter: which one is a secret is not ours to guess).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_SCHEME = re.compile(r"(?i)\b(bearer|basic|digest)(\s+|%20|\+)[^\s'\",;<][^\s'\",;]*")
_QUERY_VALUE = re.compile(r"([?&][^=&?#\s'\"]{1,64}=)[^&#\s'\"<][^&#\s'\"]*")
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``<redacted>``: JWTs, what follows ``Bearer``/``Basic``,
    and the value of every ``?name=value`` / ``&name=value`` (the names are kept, for the operator).

    A placeholder in angle brackets (``Bearer <jwt>`` in a sentence of ours) is left as it is.
    Used by the log handler's filter on every record, so it must not raise: any string goes in.
    """
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    text = _SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if "=" in text:
        text = _QUERY_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def target_text(target: bytes | str) -> str:
    """A request target (path and query, as sent) for a log line: the path, then the query's
    parameter names with their values left out (``/ws?token=<redacted>&x=<redacted>``), at most
    ``MAX_TARGET_TEXT`` characters. Bytes are read as Latin-1 (never fails); control characters
    are escaped, so a line cannot be split or forged."""
    if isinstance(target, bytes):
        target = target.decode("latin-1")
    path, sep, query = target.partition("?")
    if sep:
        names = [part.partition("=")[0][:64] for part in query.split("&") if part]
        path += "?" + "&".join(f"{name}={REDACTED}" for name in names)
    text = path[:MAX_TARGET_TEXT].encode("unicode_escape").decode("ascii")
    return redact(text)


def peer_text(peername: Any) -> str | None:
    """``host:port`` of a socket's ``peername`` (IPv4 or IPv6 tuple), or None when unknown."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None


class Throttle:
    """At most one log line per kind and interval, so that a flood (a storm of refused upgrades,
    a scan with bad tokens) cannot turn into a flood of log lines; the next line tells how many
    were left out. Not thread-safe: one per event loop.
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def ready(self, kind: str) -> int | None:
        """None: leave this line out. Otherwise log it, with this many left out before it."""
        now = self.clock()
        if now - self._last.get(kind, -math.inf) < self.interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._skipped.pop(kind, 0)


# Failures of application code a client can trigger (a handler or hook that raises on its input):
# at most one line a second per kind, so that one client cannot flood the log with tracebacks.
APP_FAILURES = Throttle()


def log_app_failure(
    logger: logging.Logger,
    kind: str,
    msg: str,
    *args: Any,
    exc_info: BaseException | bool | None = None,
    where: str = "",
    conn: str | None = None,
    user: str | None = None,
    room: str | None = None,
) -> None:
    """Log a failure of application code at ERROR, ``kind`` as its ``event``, at most once a second
    per kind and ``where`` (the failing function or message type: each bug gets its own line;
    ``APP_FAILURES``); the line after a quiet spell tells how many were left out."""
    skipped = APP_FAILURES.ready(f"{kind}:{where}")
    if skipped is not None:
        extra = fields(conn=conn, user=user, room=room, event=kind, suppressed=skipped)
        logger.error(msg, *args, exc_info=exc_info, extra=extra)


def bind(**context: Any) -> None:
    """Fields added to every record of this process from now on (e.g. ``worker=1`` in a worker)."""
    _context.update(context)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _Redact(logging.Filter):
    """``redact`` over what a record will print: its message (formatted here, then frozen), its
    string fields (``reason``, ``path``...) and its traceback, before any formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string: logging's own error handling shows it
            return True
        record.msg, record.args = redact(message), None
        for name in _FIELD_NAMES:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, redact(value))
        if record.exc_info:
            # Formatted once here (both formatters print exc_text when exc_info is gone).
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FIELD_NAMES = ("conn", "user", "room", "remote", "reason", "path", "event")


class _PeerFaults(logging.Filter):
    """picows logs a frame it refuses (too big, unmasked, bad opcode...) at ERROR, without the
    connection: ``WS parser error: (<WSCloseCode.PROTOCOL_ERROR: 1002>, '...')``. It is the peer's
    fault, closed with 1002/1007/1009, and the connection logs it itself, in our format with its
    ``conn`` and ``remote`` (``transport.Assembler.peer_fault``, event ``peer_protocol_error``, INFO):
    picows' line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("picows.") and str(record.msg).startswith("WS parser error"))


class _Json(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}{process}",
            style="{",
            rename_fields=_RENAMED,
            timestamp="ts",
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: Mapping
    ) -> None:
        super().add_fields(log_record, record, dict(message_dict))
        log_record["level"] = record.levelname.lower()
        # "ts" first: easier to read for people, no difference to log shippers.
        ts = log_record.pop("ts", None)
        if ts is not None:
            items = list(log_record.items())
            log_record.clear()
            log_record["ts"] = ts
            log_record.update(items)


def setup(level: str, fmt: str = "text") -> None:
    """Install one stderr handler on the root logger; ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    handler.addFilter(_PeerFaults())
    handler.addFilter(_Redact())
    # picows logs every disconnect at INFO; at scale that is noise on the hot path.
    logging.getLogger("picows").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
