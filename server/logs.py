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
refused, never the token, the key or an ``Authorization`` header.
Nothing on the hot path (decode, fan-out, frames) logs.
"""

from __future__ import annotations

import logging
import math
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


def bind(**context: Any) -> None:
    """Fields added to every record of this process from now on (e.g. ``worker=1`` in a worker)."""
    _context.update(context)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class _PeerFaults(logging.Filter):
    """picows logs a frame it refuses (too big, unmasked, bad opcode...) at ERROR; it is the peer's
    fault, closed with 1002/1007/1009, so it becomes INFO here with its close code as ``code``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("picows.") and str(record.msg).startswith("WS parser error"):
            if self.level > logging.INFO:
                return False
            record.levelno, record.levelname = logging.INFO, "INFO"
            info = record.args[0] if isinstance(record.args, tuple) and record.args else None
            if isinstance(info, tuple) and info:
                record.code = int(info[0])
            record.event = "peer_protocol_error"
        return True


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
    handler.addFilter(_PeerFaults(root.level))
    # picows logs every disconnect at INFO; at scale that is noise on the hot path.
    logging.getLogger("picows").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
