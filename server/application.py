"""The application API: ``wsfan.App``, message handlers and hooks on the hub's extension points.

The built-in protocol stays on; an application adds message types (tagged msgspec Structs)
and lifecycle hooks. Nothing here is on the fan-out path: an application type is one more
entry in the hub's handler table (dispatch by type, as for ``join`` or ``publish``), and the
connect/disconnect hooks run once per connection. See docs/app-api.md.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from wsfan.server import control
from wsfan.server.broker import BrokerUnavailable, Publication
from wsfan.server.control import close_problem
from wsfan.server.logs import fields
from wsfan.server.protocol import Encoding
from wsfan.server.wire import BUILTIN_TYPES, ErrorCode, Inbound

if TYPE_CHECKING:
    from wsfan.server.app import Node
    from wsfan.server.hub import Hub, Session

log = logging.getLogger("wsfan.app")

Message = Inbound  # application message types subclass this: ``class Chat(wsfan.Message, tag="chat")``
M = TypeVar("M", bound=Inbound)
F = TypeVar("F", bound=Callable[..., Any])

_BUILTIN_TAGS = frozenset(t.__struct_config__.tag for t in BUILTIN_TYPES)

# Set by ``App.run`` so that the process it starts (and the workers it forks) serve that App.
RUNNING: App | None = None


class Error(Exception):
    """Raise in a handler or hook to answer ``{"type":"error","requestId":<id>,"success":false,"code","message"}``.

    ``code`` is any short upper-case string (the built-in codes are in PROTOCOL.md); ``message``
    is shown to the client as is, so it must not carry internal detail. In ``on_connect``
    ``status`` (401 or 403) is the HTTP answer to the upgrade instead.
    """

    def __init__(self, code: str, message: str = "", status: int = 403) -> None:
        if not code or not isinstance(code, str):
            raise ValueError(
                "wsfan.Error needs a non-empty code, e.g. Error('NOT_FOUND', 'no such document')"
            )
        if status not in (401, 403):
            raise ValueError("an on_connect refusal is 401 (who are you?) or 403 (not you)")
        super().__init__(code, message)
        self.code = code
        self.message = message or code
        self.status = status


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
        if not self._s.closed:
            self._hub.reply(self._s, message)

    def join(self, room: str) -> None:
        """Subscribe the connection to ``room`` as a ``join`` without an id would: no ack is sent;
        it receives the room's ``message`` deliveries from now on (with ``join_leave``, the
        others get a ``joined`` event). Skips the ``before_join`` hooks: the server decided."""
        if not self._s.closed:
            self._hub.join(self._s, room, trusted=True)

    def leave(self, room: str) -> None:
        """Unsubscribe from ``room``, as a ``leave`` without an id (no ack; ``left`` event with join_leave)."""
        s = self._s
        if not s.closed and room in s.rooms:
            self._hub.leave(s, room)

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
        self.disconnect_hooks: list[Callable[[Conn, int], Any]] = []
        self.join_hooks: list[Callable[[Conn, str], Any]] = []
        self.publish_hooks: list[Callable[[Conn, str], Any]] = []
        self.startup_hooks: list[Callable[[], Any]] = []
        self.hub: Hub | None = None

    # ------------------------------------------------------------ declaring

    def message(self, message_type: type[M]) -> Callable[[F], F]:
        """``@app.message(Chat)``: ``handler(conn, msg)`` (sync or async) for every valid ``Chat``.

        ``message_type`` subclasses ``wsfan.Message`` with a ``tag`` (its ``type`` on the wire);
        an invalid one is answered ``INVALID_MESSAGE`` with the field path, as for built-in
        types. When the message had an ``id``, the return value is the ``ack``'s ``data``
        (``{"type":"ack","requestId":id,"success":true,"data":<value>}``); ``raise Error``
        answers ``error`` with its code; any other exception is logged with its trace and
        answered ``INTERNAL`` (the connection stays open). A connection's next message waits
        until an async handler finished: replies come in the order the messages were sent.
        """
        if not (isinstance(message_type, type) and issubclass(message_type, Inbound)):
            raise TypeError("@app.message takes a wsfan.Message subclass with a tag")
        tag = message_type.__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(
                f"{message_type.__name__} needs a tag: class {message_type.__name__}(Message, tag='...')"
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

    def on_disconnect(self, fn: F) -> F:
        """``@app.on_disconnect``: ``fn(conn, code)`` once the connection is gone (sync or async);
        ``code`` is the close code sent or received (1005: none given, 1006: no close frame)."""
        self.disconnect_hooks.append(fn)
        return fn

    def before_join(self, fn: F) -> F:
        """``@app.before_join``: ``fn(conn, room) -> bool`` (sync) before a client's ``join`` and
        ``presence`` queries; False answers ``FORBIDDEN``. Runs after the token's ``rooms`` check."""
        self.join_hooks.append(fn)
        return fn

    def before_publish(self, fn: F) -> F:
        """``@app.before_publish``: ``fn(conn, room) -> bool`` (sync) before a client's ``publish``;
        False answers ``FORBIDDEN``. Runs after the token's ``rooms`` check."""
        self.publish_hooks.append(fn)
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
        Returns the seq. Raises ``ValueError`` for a payload not deliverable in both encodings
        and ``BrokerUnavailable`` when the broker cannot be reached."""
        hub = self._attached()
        result = hub.publish(room, "server", msgspec.json.encode(payload), Encoding.JSON)
        if isinstance(result, Publication):
            return result.seq
        pub = await result  # type: ignore[misc]
        return pub.seq

    async def broadcast(self, payload: Any) -> None:
        """Push ``payload`` (any JSON value) to every WebSocket connection on every node (through the
        broker): each gets ``{"type":"broadcast","payload":payload}`` once, in its own encoding
        (and compression). No room, no seq, no history: a connection that is not open at that
        moment never sees it; SSE streams get none. Returns once the broker took it (delivery on
        each node follows within the broker's delivery time). Raises ``ValueError`` for a
        payload not deliverable in both encodings and ``BrokerUnavailable`` when the broker
        cannot be reached."""
        hub = self._attached()
        result = control.broadcast(hub, msgspec.json.encode(payload))
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
        Returns the exit code when the server stops (SIGTERM/SIGINT).
        """
        global RUNNING
        from wsfan.__main__ import main

        args = list(argv)
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
        if self.join_hooks or self.publish_hooks:
            builtin = hub.authorize  # the token's rooms claim: the first hook
            hub.authorize = lambda s, action, room: (
                (builtin is None or builtin(s, action, room)) and self._allow(s, action, room)
            )

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
                hub.ack(s, msg.id, result)

        return handle

    async def _finish(self, hub: Hub, s: Session, msg: Any, pending: Awaitable[Any]) -> None:
        try:
            result = await pending
        except Error as exc:
            hub.error(s, msg.id, exc.code, exc.message)  # type: ignore[arg-type]
            return
        except Exception:
            log.exception(
                "handler for %s failed", type(msg).__name__, extra=fields(conn=s.conn_id, user=s.user)
            )
            hub.error(s, msg.id, ErrorCode.INTERNAL, "internal error")
            return
        if msg.id is not None and not s.closed:
            hub.ack(s, msg.id, result)

    def _allow(self, s: Session, action: str, room: str) -> bool:
        hooks = self.publish_hooks if action == "publish" else self.join_hooks
        if not hooks:
            return True
        conn = Conn(self._attached(), s)
        try:
            return all(hook(conn, room) is not False for hook in hooks)
        except Exception:
            log.exception("before_%s hook failed; refused", action, extra=fields(conn=s.conn_id, room=room))
            return False

    def _closed(self, s: Session) -> None:
        conn = Conn(self._attached(), s, frozenset(s.rooms))
        for hook in self.disconnect_hooks:
            try:
                result = hook(conn, s.close_code)
                if inspect.isawaitable(result):
                    self._attached()._spawn(_logged(result, "on_disconnect"))
            except Exception:
                log.exception("on_disconnect hook failed", extra=fields(conn=s.conn_id, user=s.user))

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


async def _logged(aw: Awaitable[Any], what: str) -> None:
    try:
        await aw
    except Exception:
        log.exception("%s hook failed", what)


def load(spec: str) -> App:
    """``"package.module:attribute"`` to the App it names; ``ValueError`` with what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--app {spec!r}: give module:attribute, e.g. myapp:app")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--app {spec!r}: cannot import {module_name!r} ({exc})") from None
    app: Any = module
    for part in attr.split("."):
        app = getattr(app, part, None)
    if not isinstance(app, App):
        raise ValueError(f"--app {spec!r}: {attr!r} in {module_name!r} is not a wsfan.App")
    return app


__all__ = ["App", "BrokerUnavailable", "ConnectRequest", "Conn", "Error", "Message", "load"]
