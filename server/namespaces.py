"""Room namespaces: per-prefix options for history, presence, join/leave events and who may publish.

A room's namespace is the part of its name before the first ``:`` (``chat:lobby`` is in
namespace ``chat``), as in Centrifugo. A room without ``:``, or whose prefix is not a
configured namespace, is in the default namespace, whose options are the top-level
settings (``--history-size``, ``--history-ttl``, ``--presence``...). A configured
namespace inherits every option it does not set from the default namespace.

Configured in TOML (``[namespaces.chat]`` tables), or with ``--namespaces`` /
``WSFAN_NAMESPACES`` specs ``NAME:key=value,key=value`` (several separated by ``;``).
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from wsfan.server.values import BadValue, convert_kind

SEPARATOR: Final = ":"
NAME_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,64}\Z"  # \Z: "$" would accept a trailing newline
_NAME = re.compile(NAME_PATTERN)


class Namespace(msgspec.Struct, frozen=True, kw_only=True):
    """The effective options of one namespace.

    - ``history_size``: publications kept per room (0: none).
    - ``history_ttl``: seconds without a publication after which a room's history is dropped.
    - ``presence``: ``presence``/``presence_stats`` requests are answered (otherwise ``NOT_AVAILABLE``).
    - ``join_leave``: the room's other subscribers get ``joined``/``left`` events.
    - ``allow_publish``: clients may publish (otherwise only ``POST /publish``; clients get ``FORBIDDEN``).
    - ``allow_history``: ``join`` with ``since`` replays history (otherwise ``recovered: false``, no replay,
      and no history is kept).
    """

    name: str = ""
    history_size: int = 300
    history_ttl: float = 300.0
    presence: bool = False
    join_leave: bool = False
    allow_publish: bool = True
    allow_history: bool = True

    @property
    def kept_history(self) -> int:
        """Publications kept per room: none when clients may not read them."""
        return self.history_size if self.allow_history else 0


class Namespaces:
    """Room name -> namespace options; a lookup is one ``str.partition`` and one dict get."""

    __slots__ = ("default", "named", "all", "publish_restricted", "min_ttl")

    def __init__(self, default: Namespace, named: dict[str, Namespace] | None = None) -> None:
        self.default = default
        self.named = dict(named or {})
        self.all = (default, *self.named.values())
        # The publish hot path looks a room's namespace up only when some namespace needs it.
        self.publish_restricted = any(not ns.allow_publish for ns in self.all)
        self.min_ttl = min(ns.history_ttl for ns in self.all)

    def of(self, room: str) -> Namespace:
        if not self.named:
            return self.default
        prefix, sep, _ = room.partition(SEPARATOR)
        if not sep:
            return self.default
        return self.named.get(prefix, self.default)


def parse_specs(text: str) -> dict[str, dict[str, str]]:
    """``"chat:presence=true,history_size=50;news:allow_publish=false"`` -> ``{"chat": {...}, "news": {...}}``.

    Raises ValueError with a readable message on a malformed spec.
    """
    out: dict[str, dict[str, str]] = {}
    for spec in text.split(";"):
        spec = spec.strip()
        if not spec:
            continue
        name, sep, body = spec.partition(SEPARATOR)
        name = name.strip()
        if not sep:
            raise ValueError(f"namespace spec {spec!r} must look like NAME:key=value,key=value")
        options = out.setdefault(name, {})
        for item in body.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"namespace {name!r}: option {item!r} must be key=value")
            options[key.strip().replace("-", "_")] = value.strip()
    return out


#: Each option a namespace may set: (its kind, the test of its value, what is allowed).
OPTIONS: Final[dict[str, tuple[str, Any, str]]] = {
    "history_size": ("int", lambda v: v >= 0, "a whole number >= 0"),
    "history_ttl": ("float", lambda v: v > 0, "a number of seconds > 0"),
    "presence": ("bool", None, "true or false"),
    "join_leave": ("bool", None, "true or false"),
    "allow_publish": ("bool", None, "true or false"),
    "allow_history": ("bool", None, "true or false"),
}


def build(
    default: Namespace, table: dict[str, Any], origin: dict[str, str] | None = None
) -> tuple[Namespaces, list[str]]:
    """Validate the configured namespaces; returns them and a list of problems (empty when valid).

    ``origin`` maps a namespace's name to where it was configured (``--namespaces chat``,
    ``[namespaces.chat] in --config FILE``), named in its problems: ``--namespaces chat:
    history_size: expected a whole number >= 0, got 'abc'``. The default namespace's options are the top-level settings, checked
    by ``config``.
    """
    problems: list[str] = []
    named: dict[str, Namespace] = {}
    for name, raw in table.items():
        where = (origin or {}).get(name) or f"namespace {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"namespace name {name!r}: expected 1-64 characters of A-Z a-z 0-9 _ . -")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table of options ({', '.join(OPTIONS)})")
            continue
        given: dict[str, Any] = {}
        for key, value in raw.items():
            option = key.replace("-", "_") if isinstance(key, str) else key
            if option not in OPTIONS:
                problems.append(f"{where}: unknown option {key!r}; the options are {', '.join(OPTIONS)}")
                continue
            kind, ok, allowed = OPTIONS[option]
            try:
                given[option] = convert_kind(kind, value, allowed)
            except BadValue:
                problems.append(f"{where}: {option}: expected {allowed}, got {value!r}")
                continue
            if ok is not None and not ok(given[option]):
                problems.append(f"{where}: {option}: expected {allowed}, got {value!r}")
                del given[option]
        named[name] = msgspec.structs.replace(default, name=name, **given)
    return Namespaces(default, named), problems
