"""The application API: ``wsfan.App``, message handlers and hooks on the hub's extension points.

The built-in protocol stays on; an application adds message types (tagged msgspec Structs)
and lifecycle hooks. Nothing here is on the fan-out path: an application type is one more
entry in the hub's handler table (dispatch by type, as for ``join`` or ``publish``), and the
connect/disconnect hooks run once per connection. See docs/app-api.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from wsfan.server import control
from wsfan.server.broker import BrokerUnavailable, Publication
from wsfan.server.control import close_problem
from wsfan.server.logs import log_app_failure
from wsfan.server.protocol import WIRE_ENCODINGS, Encoding, PayloadRefused, encode_payload, payload_problem
from wsfan.server.wire import BUILTIN_TYPES, ErrorCode, Inbound, declared_tag, room_problem, valid_room

if TYPE_CHECKING:
    from wsfan.server.app import Node
    from wsfan.server.hub import Hub, Session, Verdict

log = logging.getLogger("wsfan.app")

Message = Inbound  # application message types subclass this: ``class Chat(wsfan.Message, tag="chat")``
M = TypeVar("M", bound=Inbound)
F = TypeVar("F", bound=Callable[..., Any])

MAX_REASON = 256  # characters of an ``unsubscribed`` push's reason (Conn.leave, POST /unsubscribe)
_BUILTIN_TAGS = frozenset(t.__struct_config__.tag for t in BUILTIN_TYPES)

# Set by ``App.run`` so that the process it starts (and the workers it forks) serve that App.
RUNNING: App | None = None


_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class Error(Exception):
    """Raise in a handler or hook to answer ``{"type":"error","requestId":<id>,"success":false,"code","message"}``.

    ``code`` is 1-64 characters of ``A-Z 0-9 _`` starting with a letter (PROTOCOL.md: codes are
    upper case; the built-in codes are there too), else ``ValueError`` at construction; ``message``
    is shown to the client as is, so it must not carry internal detail. In ``on_connect``
    ``status`` (401 or 403) is the HTTP answer to the upgrade instead.
    """

    def __init__(self, code: str, message: str = "", status: int = 403) -> None:
        if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
            raise ValueError(
                f"wsfan.Error's code must be upper case: 1-64 characters of A-Z 0-9 _, starting with a "
                f"letter (PROTOCOL.md, error codes), e.g. Error('NOT_FOUND', 'no such document'); got {code!r:.80}"
            )
        if status not in (401, 403):
            raise ValueError("an on_connect refusal is 401 (who are you?) or 403 (not you)")
        super().__init__(code, message)
        self.code = code
        self.message = message or code
        self.status = status


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final[Any] = _Keep()  # ``Publish(payload=KEEP)``: the payload as the client sent it (the default)


@dataclass(frozen=True, slots=True)
class Join:
    """What a ``before_join`` hook returns to move the request to another room: ``Join(room="chat:lobby:eu")``.

    The client is joined to (or, for a ``presence`` query, shown) ``room`` instead of the one it
    asked for; the ack's ``data.room`` names it, and its deliveries carry it. ``room`` must be a
    room name (1-128 characters of ``A-Z a-z 0-9 _ . : -``) that the token's ``rooms`` claim
    allows; otherwise the client gets ``INTERNAL`` or ``FORBIDDEN`` (docs/app-api.md).
    """

    room: str


@dataclass(frozen=True, slots=True)
class Publish:
    """What a ``before_publish`` hook returns to change a publication: a new ``room``, a new ``payload``, or both.

    ``room`` None keeps the client's room; ``payload`` left out (``KEEP``) keeps the client's
    bytes untouched. A new payload is any msgspec-encodable value (``None`` is JSON ``null``);
    it is encoded once, in the publisher's encoding, and must be deliverable in both encodings
    (PROTOCOL.md, payload rule). The same room rules as ``Join`` apply.
    """

    room: str | None = None
    payload: Any = KEEP


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What ``on_connect`` sees of an upgrade: ``path`` and ``query`` (bytes, as sent), headers
    (case-insensitive, ``headers["Origin"]``), ``user`` (the token's subject, or None without
    auth) and ``claims`` (the verified JWT's claims, or None)."""

    path: bytes
    query: bytes
    headers: Mapping[str, str]
    user: str | None
    claims: Mapping[str, Any] | None


class Conn:
    """One live connection, as application code sees it (handed to every handler and hook).

    ``id`` is the ``conn`` of its ``welcome``; ``user`` the token's subject (or the id when
    anonymous); ``data`` whatever ``on_connect`` returned (a dict unless it returned something
    else), yours to change.
    """

    __slots__ = ("_hub", "_s", "_rooms")

    def __init__(self, hub: Hub, session: Session, rooms: frozenset[str] | None = None) -> None:
        self._hub = hub
        self._s = session
        self._rooms = rooms  # on_disconnect: the rooms it was in when it closed

    @property
    def id(self) -> str:
        return self._s.conn_id

    @property
    def user(self) -> str:
        return self._s.user

    @property
    def data(self) -> Any:
        s = self._s
        if s.data is None:
            s.data = {}
        return s.data

    @data.setter
    def data(self, value: Any) -> None:
        self._s.data = value

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this connection is in, a copy; in ``on_disconnect``, the rooms it was in."""
        return self._rooms if self._rooms is not None else frozenset(self._s.rooms)

    @property
    def closed(self) -> bool:
        return self._s.closed

    def send(self, message: Any) -> None:
        """Send one message to this connection only, in its encoding: a msgspec Struct (a tagged
        one carries its ``type``) or a dict, e.g. ``conn.send({"type": "notice", "text": "hi"})``.
        Sent as one WebSocket message after what is already queued; dropped once closed."""
        s = self._s
        data = encode_payload(message, s.encoding if s.encoding in WIRE_ENCODINGS else Encoding.JSON)
        if not s.closed:
            self._hub.reply(s, msgspec.Raw(data))

    def join(self, room: str) -> None:
        """Subscribe the connection to ``room``, telling it: ``{"type":"subscribed","room","seq","epoch"}``
        (``seq``: the room's seq now, so the first delivery that follows is ``seq + 1``), sent
        before any delivery of the room; then the room's ``message`` deliveries (with
        ``join_leave``, the others get a ``joined`` event). Nothing is sent when the connection is
        in the room already. Skips the token's ``rooms`` claim and the ``before_join`` hooks: the
        server decided. On a cluster the join takes effect once the broker answered.

        ``ValueError`` when ``room`` is not a room name a client could send (1-128 characters
        of ``A-Z a-z 0-9 _ . : -``, PROTOCOL.md), open or closed connection alike.

        ``ValueError`` too on an SSE stream (``GET /sse``) for a room it is not in: a stream
        carries the one room it was opened for (the one its ``before_join`` hooks chose), because
        its event ids are ``<epoch>:<seq>`` of that room and a browser resumes with one
        ``Last-Event-ID`` (WHATWG HTML 9.2): ids of a second room would be taken for the first's
        (docs/app-api.md, "SSE streams"; PROTOCOL.md, SSE). Likewise on the ``conn`` of an HTTP
        read (``GET /presence`` with a user's token), which is no connection. Raised in a
        ``before_join`` hook and not caught there, it refuses the stream's join as any failing
        hook does (``INTERNAL``, logged with this message)."""
        _check_room(room)
        s = self._s
        if s.closed:
            return
        if s.encoding is Encoding.SSE and room not in s.rooms:
            if s.conn_id in self._hub.sessions:
                raise ValueError(
                    f"conn.join({room!r}) on SSE stream {s.conn_id}: a stream carries only the room it "
                    "was opened for (its event ids are that room's); open another GET /sse for "
                    f"{room!r}, or rewrite the stream's own join with return wsfan.Join(room=...)"
                )
            raise ValueError(
                f"conn.join({room!r}) on {s.conn_id}: the conn of an HTTP request (GET /presence), "
                "not a connection: it cannot join rooms"
            )
        self._hub.join(s, room, trusted=True)

    def leave(self, room: str, reason: str = "") -> None:
        """Unsubscribe from ``room``, telling the connection: ``{"type":"unsubscribed","room","reason"?}``
        (``reason`` left out when empty), sent after the room's last delivery to it (``left``
        event to the others with join_leave). Nothing is sent when it is not in the room.

        ``ValueError`` for a name that is not a room name, as ``join``, or a ``reason`` that is
        not a string of at most 256 characters."""
        _check_room(room)
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise ValueError(f"reason must be a string of at most {MAX_REASON} characters")
        s = self._s
        if not s.closed and room in s.rooms:
            self._hub.leave(s, room, reason)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with a WebSocket close frame ``code`` (1000, or 4000-4999 for your own) and ``reason``."""
        problem = close_problem(code, reason)
        if problem is not None:
            raise ValueError(problem)
        if not self._s.closed:
            self._s.peer.close(code, reason)

    def __repr__(self) -> str:
        return f"<Conn {self.id} user={self.user!r}>"


class App:
    """An application on wsfan: message types with handlers, and hooks. Serve it with
    ``wsfan run module:app [flags]`` or ``app.run(port=...)`` (docs/app-api.md)."""

    def __init__(self) -> None:
        self.handlers: dict[type[Inbound], Callable[[Conn, Any], Any]] = {}
        self.connect_hooks: list[Callable[[ConnectRequest], Any]] = []
        self.open_hooks: list[Callable[[Conn], Any]] = []
        self.disconnect_hooks: list[Callable[[Conn, int], Any]] = []
        # (hook, whether it takes the payload as a third argument)
        self.join_hooks: list[tuple[Callable[..., Any], bool]] = []
        self.publish_hooks: list[tuple[Callable[..., Any], bool]] = []
        self.startup_hooks: list[Callable[[], Any]] = []
        self.hub: Hub | None = None

    # ------------------------------------------------------------ declaring

    def message(self, message_type: type[M]) -> Callable[[F], F]:
        """``@app.message(Chat)``: ``handler(conn, msg)`` (sync or async) for every valid ``Chat``.

        ``message_type`` subclasses ``wsfan.Message`` and declares its own ``tag=`` (its ``type``
        on the wire; ``tag=True`` for the class name): ``TypeError`` naming the class and the fix
        otherwise, since msgspec would silently give it its class name, or its parent's tag, as
        its wire type (``wire.declared_tag``; docs/app-api.md, "Message types and handlers");
        ``ValueError`` for a built-in type's tag or a second handler. An invalid message is
        answered ``INVALID_MESSAGE`` with the field path, as for built-in types. When the message had an ``id``, the return value is the ``ack``'s ``data``
        (``{"type":"ack","requestId":id,"success":true,"data":<value>}``); ``raise Error``
        answers ``error`` with its code; any other exception is logged with its trace and
        answered ``INTERNAL`` (the connection stays open). A connection's next message waits
        until an async handler finished: replies come in the order the messages were sent.
        """
        if not (isinstance(message_type, type) and issubclass(message_type, Inbound)):
            raise TypeError("@app.message takes a wsfan.Message subclass with a tag")
        if message_type is Inbound:
            raise TypeError(
                "@app.message(wsfan.Message) would match nothing: wsfan.Message is the base class; "
                "register a subclass with a tag, e.g. class Chat(wsfan.Message, tag='chat')"
            )
        tag = message_type.__struct_config__.tag
        name = message_type.__name__
        if not isinstance(tag, str):
            raise TypeError(f"{name} needs a tag: class {name}(wsfan.Message, tag='...')")
        if not declared_tag(message_type):
            # msgspec's default (its class name) or its base's tag: a wire type nobody chose.
            base = next((b for b in message_type.__mro__[1:] if b is not Inbound and declared_tag(b)), None)
            if base is not None:
                raise TypeError(
                    f"{name} declares no tag of its own: it would share the wire type {tag!r} with "
                    f"{base.__name__}; declare one: class {name}({base.__name__}, tag='...')"
                )
            raise TypeError(
                f"{name} has no tag: its wire type would silently be {tag!r} (msgspec's default, the "
                f"class name); declare the one you mean: class {name}(wsfan.Message, tag='...') "
                "(or tag=True for the class name)"
            )
        if tag in _BUILTIN_TAGS:
            raise ValueError(f"{tag!r} is a built-in message type (PROTOCOL.md): choose another tag")

        def register(fn: F) -> F:
            if message_type in self.handlers:
                raise ValueError(f"{message_type.__name__} already has a handler")
            self.handlers[message_type] = fn
            return fn

        return register

    def on_connect(self, fn: F) -> F:
        """``@app.on_connect``: ``fn(request: ConnectRequest)`` before the upgrade is accepted (sync).

        Return the connection's initial ``conn.data`` (or None); ``raise Error(code, message,
        status=401|403)`` refuses the upgrade with that HTTP status and ``message`` as the body.
        """
        if inspect.iscoroutinefunction(fn):
            raise TypeError("on_connect runs before the 101 answer and must be a plain function")
        self.connect_hooks.append(fn)
        return fn

    def on_open(self, fn: F) -> F:
        """``@app.on_open``: ``fn(conn)`` (sync or async) once a WebSocket connection is open, after its
        ``welcome``: the place for server-side subscriptions (``conn.join``, each told to the
        client with a ``subscribed`` push). Runs again for every new connection, a client's
        reconnect included: that is how server-joined rooms come back after one (clients do not
        rejoin them, docs/app-api.md). An async hook holds the connection's messages until it
        returns (they are handled after, in order). A failure is logged; the connection stays.
        Not for SSE streams."""
        self.open_hooks.append(fn)
        return fn

    def on_disconnect(self, fn: F) -> F:
        """``@app.on_disconnect``: ``fn(conn, code)`` once the connection is gone (sync or async);
        ``code`` is the close code sent or received (1005: none given, 1006: no close frame)."""
        self.disconnect_hooks.append(fn)
        return fn

    def before_join(self, fn: F) -> F:
        """``@app.before_join``: ``fn(conn, room)`` (sync or async) before a client's ``join``,
        ``presence`` and ``presence_stats``, an SSE stream's join and a user's ``GET /presence`` /
        ``/presence_stats`` (not the admin key's): allow, refuse or rewrite.

        Returns None or True (go on), False (``FORBIDDEN``), or ``Join(room=...)`` (go on in that
        room); ``raise Error(code, message)`` answers that error. Any other exception or result is
        logged and answered ``INTERNAL``. Hooks run in the order declared, each seeing the room
        the previous one chose, after the token's ``rooms`` check, which runs again on a room a
        hook chose. Nothing else happens to a refused request (docs/app-api.md, "Hooks").
        """
        self.join_hooks.append((fn, False))
        return fn

    def before_publish(self, fn: F) -> F:
        """``@app.before_publish``: ``fn(conn, room)`` or ``fn(conn, room, payload)`` (sync or async)
        before a client's ``publish``: allow, refuse or rewrite.

        ``payload`` (only for a hook that takes a third argument: decoding costs) is the client's
        payload as Python values. Returns None or True (go on), False (``FORBIDDEN``), or
        ``Publish(room=..., payload=...)`` (go on with those); errors as for ``before_join``.
        The namespace's ``allow_publish`` and the membership (``NOT_JOINED``) are checked on the
        room finally chosen.
        """
        self.publish_hooks.append((fn, _takes_payload(fn)))
        return fn

    def on_startup(self, fn: F) -> F:
        """``@app.on_startup``: ``fn()`` (sync or async) in every worker once it listens, e.g. to
        start a background task with ``asyncio.create_task``."""
        self.startup_hooks.append(fn)
        return fn

    # ------------------------------------------------------------ from application code

    async def publish(self, room: str, payload: Any) -> int:
        """Publish ``payload`` (any JSON value) to ``room`` from the server: every subscriber, on
        every node through the broker, gets ``{"type":"message","room","seq","payload","from":"server"}``.
        Returns the seq. Raises ``ValueError`` for a ``room`` that is not a room name (as
        ``Conn.join``) or a payload not deliverable in both encodings (``PayloadRefused``), and
        ``BrokerUnavailable`` when the broker cannot be reached; nothing is published then."""
        _check_room(room)
        hub = self._attached()
        result = hub.publish(room, "server", encode_payload(payload, Encoding.JSON), Encoding.JSON)
        if isinstance(result, Publication):
            return result.seq
        pub = await result  # type: ignore[misc]
        return pub.seq

    async def broadcast(self, payload: Any) -> None:
        """Push ``payload`` (any JSON value) to every WebSocket connection on every node (through the
        broker): each gets ``{"type":"broadcast","payload":payload}`` once, in its own encoding
        (and compression). No room, no seq, no history: a connection that is not open at that
        moment never sees it; SSE streams get it as ``event: broadcast``. Returns once the broker took it (delivery on
        each node follows within the broker's delivery time). Raises ``ValueError`` for a
        payload not deliverable in both encodings and ``BrokerUnavailable`` when the broker
        cannot be reached."""
        hub = self._attached()
        result = control.broadcast(hub, encode_payload(payload, Encoding.JSON))
        if not isinstance(result, Publication):
            await result

    @property
    def node_id(self) -> str:
        """This process's node id (the ``node`` of every ``welcome`` it sends)."""
        return self._attached().node_id

    @property
    def connections(self) -> int:
        """Open connections (WebSocket and SSE) on this process."""
        return len(self._attached().sessions)

    def _attached(self) -> Hub:
        if self.hub is None:
            raise RuntimeError(
                "this App is not being served: run it with `wsfan run module:app` or app.run()"
            )
        return self.hub

    # ------------------------------------------------------------ serving

    def run(self, *argv: str, **flags: Any) -> int:
        """Serve this App: ``app.run(port=9000, workers=2)`` is ``wsfan run <this app> --port 9000 --workers 2``.

        Flags as keyword arguments (``_`` for ``-``; True/False for switches) or as strings.
        Without either, the command line's (``sys.argv[1:]``): ``python myapp.py --port 9000``
        with ``app.run()`` under ``if __name__ == "__main__"``; a bad flag exits with the usage error.
        Returns the exit code when the server stops (SIGTERM/SIGINT).
        """
        global RUNNING
        from wsfan.__main__ import main

        args = list(argv) if argv or flags else sys.argv[1:]
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False:
                args.append("--no-" + name.replace("_", "-"))
            else:
                args += [flag, str(value)]
        RUNNING = self
        return main(args)

    def attach(self, node: Node) -> None:
        """Install this App on a node's hub (called by the node at start; once per process)."""
        hub = node.hub
        self.hub = hub
        for message_type, fn in self.handlers.items():
            hub.register(message_type, self._handler(hub, fn))
        if self.disconnect_hooks:
            hub.on_close = self._closed
        if self.open_hooks:
            hub.on_open = self._opened
        if self.join_hooks or self.publish_hooks:
            # After hub.authorize (the token's rooms claim, the first hook), which the hub runs
            # again on any room these hooks choose.
            hub.gate = self._gate

    def _handler(self, hub: Hub, fn: Callable[[Conn, Any], Any]) -> Callable[[Session, Any], None]:
        def handle(s: Session, msg: Any) -> None:
            try:
                result = fn(Conn(hub, s), msg)
            except Error as exc:
                hub.error(s, msg.id, exc.code, exc.message)  # type: ignore[arg-type]
                return
            if inspect.isawaitable(result):
                hub._spawn_held(s, self._finish(hub, s, msg, result))
            elif msg.id is not None:
                _answer(hub, s, msg, fn, result)

        return handle

    async def _finish(self, hub: Hub, s: Session, msg: Any, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Error as exc:
            hub.error(s, msg.id, exc.code, exc.message)  # type: ignore[arg-type]
            return
        except Exception:
            log_app_failure(
                log, "handler_failed", "handler for %s failed", type(msg).__name__,
                exc_info=True, where=type(msg).__name__, conn=s.conn_id, user=s.user,
            )  # fmt: skip
            hub.error(s, msg.id, ErrorCode.INTERNAL, "internal error")
            return
        if msg.id is not None and not s.closed:
            _answer(hub, s, msg, pending, result)

    def _gate(
        self, s: Session, action: str, room: str, payload: bytes | None, request_id: str | None
    ) -> Verdict | Awaitable[Verdict]:
        """The hub's gate: the before_* hooks on one request; ``(room, payload)`` to go on with, or None."""
        hooks = self.publish_hooks if action == "publish" else self.join_hooks
        if not hooks:
            return room, payload
        return _HookRun(self._attached(), s, action, room, payload, request_id, hooks).run(0)

    def _opened(self, s: Session) -> None:
        hub = self._attached()
        conn = Conn(hub, s)
        for i, hook in enumerate(self.open_hooks):
            try:
                result = hook(conn)
            except Exception:
                log_app_failure(
                    log, "on_open_failed", "on_open hook %s failed", _name(hook),
                    exc_info=True, where=_name(hook), conn=s.conn_id, user=s.user,
                )  # fmt: skip
                continue
            if inspect.isawaitable(result):
                # The rest run after it, and the connection's messages wait for all of them.
                hub._spawn_held(s, self._open_rest(s, conn, result, i + 1))
                return

    async def _open_rest(self, s: Session, conn: Conn, pending: Awaitable[Any], start: int) -> None:
        for hook in [None, *self.open_hooks[start:]]:
            try:
                result = pending if hook is None else hook(conn)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                name = _name(hook) if hook is not None else "(async)"
                log_app_failure(
                    log, "on_open_failed", "on_open hook %s failed", name,
                    exc_info=True, where=name, conn=s.conn_id, user=s.user,
                )  # fmt: skip
            if s.closed:
                return

    def _closed(self, s: Session) -> None:
        conn = Conn(self._attached(), s, frozenset(s.rooms))
        for hook in self.disconnect_hooks:
            try:
                result = hook(conn, s.close_code)
                if inspect.isawaitable(result):
                    self._attached()._spawn(_logged(result, "on_disconnect"))
            except Exception:
                log_app_failure(
                    log, "on_disconnect_failed", "on_disconnect hook %s failed", _name(hook),
                    exc_info=True, where=_name(hook), conn=s.conn_id, user=s.user,
                )  # fmt: skip

    def connect(self, request: ConnectRequest) -> Any:
        """Run the on_connect hooks; the connection's initial data. ``Error`` propagates (a refusal)."""
        data = None
        for hook in self.connect_hooks:
            result = hook(request)
            if result is not None:
                data = result
        return data

    async def started(self) -> None:
        for hook in self.startup_hooks:
            result = hook()
            if inspect.isawaitable(result):
                await result


_VERBS = {"join": "join", "publish": "publish to", "presence": "see who is in"}


class _HookRun:
    """One request through the before_* hooks, in order; switches to awaiting at the first async hook.

    Every refusal is answered here (the hub only goes on with a verdict): ``Error`` with its
    code, False with ``FORBIDDEN``, a failure or a result that is not allowed with ``INTERNAL``
    (logged with the hook's name; the client never sees an exception's text).
    """

    __slots__ = ("hub", "s", "action", "asked", "room", "raw", "value", "request_id", "hooks")

    def __init__(
        self,
        hub: Hub,
        s: Session,
        action: str,
        room: str,
        raw: bytes | None,
        request_id: str | None,
        hooks: list[tuple[Callable[..., Any], bool]],
    ) -> None:
        self.hub = hub
        self.s = s
        self.action = action
        self.asked = self.room = room
        self.raw = raw  # the client's payload bytes, None for a join
        self.value: Any = KEEP  # the payload as Python values, once a hook asked for it or rewrote it
        self.request_id = request_id
        self.hooks = hooks

    def run(self, start: int) -> Verdict | Awaitable[Verdict]:
        conn = Conn(self.hub, self.s)
        for i in range(start, len(self.hooks)):
            fn, takes_payload = self.hooks[i]
            try:
                if takes_payload:
                    if self.value is KEEP and not self._decode():
                        return None
                    result = fn(conn, self.room, self.value)
                else:
                    result = fn(conn, self.room)
            except Exception as exc:  # noqa: BLE001 - answered: Error as is, anything else INTERNAL
                return self._failed(fn, exc)
            if inspect.isawaitable(result):
                return self._rest(i, fn, result)
            if not self._apply(fn, result):
                return None
        return self._verdict()

    async def _rest(self, i: int, fn: Callable[..., Any], pending: Awaitable[Any]) -> Verdict:
        try:
            result = await pending
        except Exception as exc:  # noqa: BLE001
            return self._failed(fn, exc)
        if self.s.closed or not self._apply(fn, result):
            return None
        more = self.run(i + 1)
        return await more if inspect.isawaitable(more) else more  # type: ignore[misc]

    def _decode(self) -> bool:
        """The client's payload as Python values for a hook that takes it; False once refused."""
        assert self.raw is not None
        problem = payload_problem(self.raw, self.s.encoding)
        if problem is not None:  # what the publish would have answered, before any hook sees it
            self.hub.error(self.s, self.request_id, ErrorCode.INVALID_MESSAGE, problem)
            return False
        self.value = self.s.codec.decode_payload(self.raw)
        return True

    def _apply(self, fn: Callable[..., Any], result: Any) -> bool:
        """Take one hook's result: True to go on (room/payload possibly changed), False once answered."""
        if result is None or result is True:
            return True
        if result is False:
            verb = _VERBS[self.action]
            self.hub.error(
                self.s, self.request_id, ErrorCode.FORBIDDEN, f"not allowed to {verb} {self.asked!r}"
            )
            return False
        publish = self.action == "publish"
        if isinstance(result, Publish if publish else Join):
            room = result.room
            if room is not None:
                if not (isinstance(room, str) and valid_room(room)):
                    return self._bad(fn, f"moved the request to {room!r}, not a room name", "an invalid room")
                self.room = room
            if publish and result.payload is not KEEP:  # type: ignore[union-attr]
                self.value = result.payload  # type: ignore[union-attr]
                self.raw = None  # encoded once, after the last hook
            return True
        expected = "Publish(...)" if publish else "Join(room=...)"
        return self._bad(fn, f"returned {result!r}, not None, True, False or {expected}", "an invalid result")

    def _verdict(self) -> Verdict:
        if self.raw is not None or self.value is KEEP:
            return self.room, self.raw
        fn = self.hooks[-1][0]
        try:
            payload = encode_payload(self.value, self.s.encoding)
        except PayloadRefused as exc:  # the payload rule, as for App.publish and a handler's result
            self._bad(fn, f"chose a payload that is not deliverable: {exc}", "a payload it cannot send")
            return None
        return self.room, payload

    def _failed(self, fn: Callable[..., Any], exc: Exception) -> None:
        if isinstance(exc, Error):
            self.hub.error(self.s, self.request_id, exc.code, exc.message)  # type: ignore[arg-type]
            return None
        log_app_failure(
            log, "hook_failed", "before_%s hook %s failed on %r", self._hook_kind(), _name(fn), self.asked,
            exc_info=exc, where=_name(fn), conn=self.s.conn_id, user=self.s.user, room=self.asked,
        )  # fmt: skip
        self.hub.error(self.s, self.request_id, ErrorCode.INTERNAL, "internal error")
        return None

    def _bad(self, fn: Callable[..., Any], why: str, public: str) -> bool:
        kind = self._hook_kind()
        log_app_failure(
            log, "hook_result_refused", "before_%s hook %s %s; %s of %r answered INTERNAL",
            kind, _name(fn), why, self.action, self.asked, where=_name(fn),
            conn=self.s.conn_id, user=self.s.user, room=self.asked,
        )  # fmt: skip
        message = f"the server's before_{kind} hook gave {public}"
        self.hub.error(self.s, self.request_id, ErrorCode.INTERNAL, message)
        return False

    def _hook_kind(self) -> str:
        return "publish" if self.action == "publish" else "join"


def _answer(hub: Hub, s: Session, msg: Any, fn: Any, result: Any) -> None:
    """A handler's result as the ack's ``data``, held to the payload rule (``encode_payload``): a
    value both encodings carry exactly. Anything else (NaN, an infinity, 2**70, bytes...) is the
    handler's bug: logged at ERROR, answered ``INTERNAL`` "the server's handler gave a result it
    cannot send" (never null in JSON and inf in MessagePack)."""
    try:
        data = msgspec.Raw(encode_payload(result, s.encoding)) if result is not None else None
    except PayloadRefused as exc:
        log_app_failure(
            log, "handler_result_refused", "handler %s for %s returned a value that is not deliverable: %s; "
            "answered INTERNAL", _name(fn), type(msg).__name__, exc, where=type(msg).__name__,
            conn=s.conn_id, user=s.user,
        )  # fmt: skip
        hub.error(s, msg.id, ErrorCode.INTERNAL, HANDLER_RESULT_REFUSED)
        return
    hub.ack(s, msg.id, data)


HANDLER_RESULT_REFUSED: Final = "the server's handler gave a result it cannot send"


def _check_room(room: Any) -> None:
    """The wire's room rule (``wire.ROOM_PATTERN``) on a name from application code: ``ValueError``."""
    problem = room_problem(room)
    if problem is not None:
        raise ValueError(problem)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _takes_payload(fn: Callable[..., Any]) -> bool:
    """Whether a before_publish hook takes a third positional argument (the payload)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or a callable without a signature: (conn, room)
        return False
    positional = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 3


class AppImportFailed(ValueError):
    """``load``: the application's module raised while it was imported (its bug, not a usage error).

    ``str()`` is the one line saying which; ``traceback()`` is the exception's traceback with
    wsfan's and importlib's frames left out (the application's own frames and the libraries it
    called), ``traceback(full=True)`` all of it.
    """

    def __init__(self, line: str, exc: BaseException) -> None:
        super().__init__(line)
        self.exc = exc

    def traceback(self, full: bool = False) -> str:
        te = traceback.TracebackException.from_exception(self.exc)
        if not full:
            seen: set[int] = set()
            todo: list[traceback.TracebackException | None] = [te]
            while todo:
                one = todo.pop()
                if one is None or id(one) in seen:
                    continue
                seen.add(id(one))
                one.stack = traceback.StackSummary.from_list([f for f in one.stack if not _ours(f.filename)])
                todo += [one.__cause__, one.__context__]
        return "".join(te.format())


def _ours(filename: str) -> bool:
    """A frame of wsfan's own code or of the import machinery (left out of an application's traceback)."""
    if filename.startswith(("<frozen importlib", _IMPORTLIB)):
        return True
    return any(filename.startswith(folder) for folder in _OUR_FOLDERS)


_IMPORTLIB = str(Path(importlib.__file__ or ".").resolve().parent) + "/"
_OUR_FOLDERS = tuple(
    str(Path(p).resolve()) + "/"
    for p in {Path(__file__).parent, Path(sys.modules["wsfan"].__file__ or ".").parent}
    if p is not None
)


class _NotAFile(Exception):
    """``_from_file``'s own refusal (no such file, a name taken): one line, no traceback."""


def _from_file(path: str) -> ModuleType:
    """The module of a Python file (``load``): imported once under the file's name, its folder on
    ``sys.path``. ``_NotAFile`` with what is wrong when there is no such file or its name is another
    module's already; what the module raises while it runs propagates."""
    try:
        file = Path(path).resolve(strict=True)
    except OSError:
        file = None
    if file is None or not file.is_file():
        raise _NotAFile(f"no such file {path!r}")
    name = file.stem
    known = sys.modules.get(name)
    if known is not None:
        if getattr(known, "__file__", None) and Path(known.__file__).resolve() == file:  # type: ignore[arg-type]
            return known
        raise _NotAFile(
            f"cannot import {path!r}: a module named {name!r} is imported already, from elsewhere"
        )
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise _NotAFile(f"{path!r} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: what it defines (msgspec Structs) names its module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


async def _logged(aw: Awaitable[Any], what: str) -> None:
    try:
        await aw
    except Exception:
        log_app_failure(log, f"{what}_failed", "%s hook failed", what, exc_info=True, where="(async)")


def load(spec: str) -> App:
    """``"package.module:attribute"`` or ``"path/to/file.py:attribute"`` to the App it names;
    ``ValueError`` with what is wrong.

    A module is imported from ``sys.path`` (``wsfan run`` puts the current directory first, as
    uvicorn does). A file (the part before ``:`` ends in ``.py``; relative to the current
    directory) is run as ``python path/to/file.py`` would run it, but under its own name: its
    folder first on ``sys.path`` (its sibling modules import), imported once as the module named
    after the file, so an app runs the same from any directory (``wsfan run examples/chat.py:app``).

    A module or file that does not exist, or an attribute that is not there or not an App, is a
    ``ValueError`` whose text is one line for the operator; a module that raised while it was
    imported is ``AppImportFailed`` (a ``ValueError``) carrying that exception for its traceback.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--app {spec!r}: give module:attribute, e.g. myapp:app")
    try:
        module = (
            _from_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
        )
    except ModuleNotFoundError as exc:
        # The module itself (or a package above it) is missing: the spec is wrong. A module the
        # application imports is missing: the application's problem, reported with its traceback.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ValueError(
                f"--app {spec!r}: no module named {exc.name!r} (looked in the current directory and sys.path)"
            ) from None
        raise AppImportFailed(_raised(spec, module_name, exc), exc) from None
    except _NotAFile as exc:
        raise ValueError(f"--app {spec!r}: {exc}") from None
    except Exception as exc:
        raise AppImportFailed(_raised(spec, module_name, exc), exc) from None
    app: Any = module
    where = module_name
    for part in attr.split("."):
        if not hasattr(app, part):
            raise ValueError(f"--app {spec!r}: {where!r} has no attribute {part!r}")
        app = getattr(app, part)
        where = f"{where}.{part}" if where != module_name else f"{module_name}:{part}"
    if not isinstance(app, App):
        raise ValueError(
            f"--app {spec!r}: {attr!r} in {module_name!r} is not a wsfan.App (it is of type {type(app).__name__})"
        )
    return app


def _raised(spec: str, module_name: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"--app {spec!r}: importing {module_name!r} raised {what} (the application's traceback follows)"


__all__ = [
    "KEEP",
    "App",
    "AppImportFailed",
    "BrokerUnavailable",
    "ConnectRequest",
    "Conn",
    "Error",
    "Join",
    "Message",
    "Publish",
    "load",
]
