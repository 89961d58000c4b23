"""Wiring: settings to hub, broker, transport and listening socket; signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import random
import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from wsfan.server import heap
from wsfan.server.application import App, ConnectRequest
from wsfan.server.application import Error as AppError
from wsfan.server.auth import Authenticator, AuthError, token_from_request
from wsfan.server.broker import Broker, BrokerUnavailable
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.config import Settings, namespaces, tls_context
from wsfan.server.control import Control, join_control
from wsfan.server.deflate import POLICY, Agreement, compressed_limit, negotiate
from wsfan.server.demo import load_pages
from wsfan.server.fds import FdBudget, raise_soft_limit
from wsfan.server.handshake import (
    OriginPolicy,
    Refusal,
    Upgrade,
    check_host,
    check_upgrade,
    origin_form,
    picows_headers,
    switching,
)
from wsfan.server.http import HttpSide
from wsfan.server.hub import Hub, Session
from wsfan.server.keys import JwksKeys, load_public_key
from wsfan.server.logs import Throttle, fields, target_text
from wsfan.server.metrics import CONTENT_TYPE, Metrics, start_internal
from wsfan.server.protocol import Encoding
from wsfan.server.ratelimit import TokenBucket
from wsfan.server.startup import EXIT_USAGE
from wsfan.server.transport import Connection, ConnectionRegistry, EchoConnection, Limits, create_server
from wsfan.server.wire import MSGPACK_SUBPROTOCOL, CloseCode

log = logging.getLogger("wsfan")

# Exit code when shutdown had to abandon something (a task that ignored its cancel, a connection
# that would not close): the log line before it names what. 70 is EX_SOFTWARE (sysexits.h).
EXIT_ABANDONED = 70
# After the drain: how long each remaining step (HTTP side, leftover tasks) may take.
STOP_STEP_TIMEOUT_S = 2.0
# The body of an upgrade that failed on our side (or in the application's on_connect): never an exception's text.
INTERNAL_BODY = b"internal server error\n"

try:
    import aiofastnet  # noqa: F401 - only its presence matters

    _HAS_AIOFASTNET = True
except ImportError:
    _HAS_AIOFASTNET = False


class Node:
    """One server process: everything that lives as long as the listening socket."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        POLICY.threshold = settings.compression_threshold
        POLICY.level = settings.compression_level
        self.node_id = settings.node_id or secrets.token_hex(3)
        self.broker = make_broker(settings, self.node_id)
        loop = asyncio.get_running_loop()
        self.hub = Hub(
            self.broker,
            node_id=self.node_id,
            schedule=loop.call_soon,
            cork_delay=settings.cork_ms / 1000.0,
            schedule_later=loop.call_later,
            clock=loop.time,
            heartbeat_ms=settings.heartbeat,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            rate_abuse_strikes=settings.rate_abuse_strikes,
            max_rooms_per_connection=settings.max_rooms_per_connection,
        )
        self.registry = ConnectionRegistry(
            settings.heartbeat, settings.heartbeat_timeout, self._count_heartbeat_close
        )
        if settings.max_connections_per_ip:
            self.registry.count_per_ip()
        self.limits = Limits(
            settings.max_message_size,
            settings.slow_consumer_limit,
            settings.max_control_frames,
            settings.max_fragments,
        )
        self.draining = False
        self.control: Control | None = None  # set by start()
        self.listening = asyncio.Event()  # set once the port is open (a supervisor waits for it on SIGHUP)
        # Set by the supervisor on SIGHUP: drain by handing over to new workers, closes spread over this many s.
        self.handoff_spread: float | None = None
        self.server: asyncio.Server | None = None
        self.refusals = Throttle()
        self.authenticator = make_authenticator(settings)
        if self.authenticator is not None:
            self.hub.authorize = _authorize
        self.origins = OriginPolicy.parse(settings.allowed_origins)
        rate = settings.max_handshake_rate
        self.handshakes = TokenBucket(rate, max(1.0, rate)) if rate > 0 else None
        self.fds = FdBudget(settings.fd_reserve, self._client_sockets)
        if hasattr(self.broker, "on_fd_exhausted"):
            self.broker.on_fd_exhausted = lambda what: self.fds.note_exhausted("broker", what)
        self.metrics = Metrics(self.hub, lambda: len(self.registry.connections), self.broker, self.fds)
        # After a compaction, what traffic rewrote is made anew where it keeps no arena resident (heap.relocate).
        movers = getattr(self.broker, "compact_movers", None)
        if movers is not None:
            movers += (
                self.registry.relocate,
                self.fds.relocate,
                self.metrics.latency.hist.relocate,
                self._relocate,
            )
        # /metrics on the public ports only for a lone node without --metrics-port (workers: the supervisor's).
        self.public_metrics = not settings.metrics_port and settings.workers == 1
        self.internal: Callable[[], Awaitable[None]] | None = None
        self.http = HttpSide(self) if settings.http_port else None
        # --demo: the chat page and the browser client, read once here (server/demo.py)
        self.demo_pages = load_pages() if settings.demo else None
        self.app = _application(settings)  # wsfan.App: --app / `wsfan run module:app` / app.run()
        if self.app is not None:
            self.app.attach(self)

    def _count_heartbeat_close(self) -> None:
        self.hub.stats.heartbeat_closes += 1

    def route(
        self, request: WSUpgradeRequest, peer: Callable[[], str | None] = lambda: None
    ) -> Connection | EchoConnection | WSUpgradeResponseWithListener | None:
        """picows' listener factory: every request on the WebSocket port comes through here.

        Nothing may escape it: picows would answer an exception with 500 and the exception's
        text as the body. An unexpected error is logged and answered 500 with a fixed body.
        ``peer()`` gives the client's address, for the log of a refusal.
        """
        try:
            return self._route(request, peer)
        except Exception:
            return self._failed("route_error", "error while routing %s", request.path, peer)

    def _failed(
        self, kind: str, what: str, target: bytes, peer: Callable[[], str | None]
    ) -> WSUpgradeResponseWithListener:
        """A failure of ours (or of the application's ``on_connect``) on an upgrade: 500 with the
        fixed body ``internal server error``, counted as ``kind``, logged at ERROR with the
        traceback at most once a second per kind (``Throttle``: a client that can trigger it
        cannot flood the log); the target through ``target_text`` (no query values: tokens)."""
        self._reject(kind)
        skipped = self.refusals.ready(kind)
        if skipped is not None:
            log.error(what, target_text(target), exc_info=True, extra=fields(
                code=500, remote=peer(), path=target_text(target), event=kind, suppressed=skipped
            ))  # fmt: skip
        return _plain(500, INTERNAL_BODY)

    def _route(
        self, request: WSUpgradeRequest, peer: Callable[[], str | None]
    ) -> Connection | EchoConnection | WSUpgradeResponseWithListener | None:
        """Pick a listener by path; plain GETs (health) are answered here too, since picows serves them."""
        headers = request.headers
        refused = check_host(headers)
        if refused is not None:
            return _answer(refused)
        path, _, query = origin_form(request.path).partition(b"?")
        if path == b"/ws" or (path == b"/echo" and self.settings.echo_endpoint):
            upgrade = check_upgrade(headers)
            if isinstance(upgrade, Refusal):
                return _answer(upgrade)
            refused = self.origins.check(headers)
            if refused is not None:
                return self._refuse("origin", refused.status, refused.reason, peer, refused.headers)
            agreement = self._compression(headers)
            if path == b"/echo":
                request.headers = picows_headers(upgrade)
                echo = EchoConnection(self.limits, self.registry, agreement.window_bits if agreement else 0)
                return _upgraded(echo, None, agreement, b"")
            return self._upgrade(request, upgrade, path, query, peer, agreement)
        if path == b"/healthz":
            return _plain(503, b"draining\n") if self.draining else _plain(200, b"ok\n")
        if path == b"/metrics":
            if not self.public_metrics:
                return _plain(404, b"not here: /metrics is served on --metrics-port\n")
            return _plain(200, self.metrics.render(), {"Content-Type": CONTENT_TYPE})
        if self.demo_pages is not None and (page := self.demo_pages.get(path)) is not None:
            return _plain(200, page.body, page.headers)
        return None

    def _compression(self, headers: Any) -> Agreement | None:
        """permessage-deflate for this upgrade, if enabled and offered acceptably (server/deflate.py)."""
        if not self.settings.compression:
            return None
        return negotiate(headers.getall("Sec-WebSocket-Extensions", []))

    def _upgrade(
        self,
        request: WSUpgradeRequest,
        upgrade: Upgrade,
        path: bytes,
        query: bytes,
        peer: Callable[[], str | None],
        agreement: Agreement | None = None,
    ) -> Connection | WSUpgradeResponseWithListener:
        """A valid upgrade of ``/ws``: admission, then the token, then the encoding by subprotocol."""
        refused = self.admit(peer)
        if refused is not None:
            return refused
        identity = None
        if self.authenticator is not None:
            try:
                identity = self.authenticator.verify(token_from_request(request.headers, query))
            except AuthError as exc:
                # A 401 says why the token was refused; a 400 (two tokens) is a malformed request,
                # with the sentence of any other one (``more than one token parameter``).
                if exc.status == 401:
                    return self._refuse(
                        "auth", 401, f"unauthorized: {exc}", peer, {"WWW-Authenticate": "Bearer"}
                    )
                return self._refuse("auth", exc.status, str(exc), peer, {})
        # picows re-checks the upgrade headers after this function, stricter than RFC 6455 in
        # places: hand it the canonical form of what check_upgrade() accepted.
        data = None
        if self.app is not None and self.app.connect_hooks:
            try:
                data = self.app.connect(_connect_request(request, path, query, identity))
            except AppError as exc:
                extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
                return self._refuse("app", exc.status, f"{exc.code}: {exc.message}", peer, extra)
            except Exception:  # an application bug: never its text, one log line a second
                return self._failed(
                    "app_error", "on_connect hook failed on %s; answered 500", request.path, peer
                )
        request.headers = picows_headers(upgrade)
        bits = agreement.window_bits if agreement else 0
        encoding = Encoding.MSGPACK if MSGPACK_SUBPROTOCOL in upgrade.protocols else Encoding.JSON
        # The id is drawn now so that the welcome leaves with the 101 (handshake.SwitchingProtocols);
        # picows accepts every upgrade that check_upgrade accepted, so none is drawn for nothing.
        hub = self.hub
        conn_id = hub.new_id()
        welcome = hub.welcome(encoding, conn_id, identity.user if identity is not None else None)
        conn = Connection(hub, encoding, self.limits, self.registry, identity, bits, data, conn_id)
        subprotocol = MSGPACK_SUBPROTOCOL if encoding is Encoding.MSGPACK else None
        return _upgraded(conn, subprotocol, agreement, welcome)

    def admit(self, peer: Callable[[], str | None]) -> WSUpgradeResponseWithListener | None:
        """Admission control: refuse early and cheaply (503 + Retry-After) so a reconnection storm backs off."""
        refusal = self.admission(lambda: client_ip(peer()))
        if refusal is None:
            return None
        return self._refuse(
            refusal.kind, 503, refusal.why, peer, {"Retry-After": refusal.retry_after}, refusal.counted
        )

    def admission(self, ip: Callable[[], str]) -> Admission | None:
        """Why a new client connection from ``ip()`` (a ``/ws`` upgrade or a ``GET /sse`` stream) is
        refused now, or None: the one rule for both, each refusal a 503 with ``Retry-After``.

        ``ip()`` is asked only with ``--max-connections-per-ip`` on: through uvloop a peer's address
        is a ``getpeername`` syscall and a tuple kept with the transport, per connect.

        In order: draining; ``--max-connections`` and ``--max-connections-per-ip`` (open WebSocket
        connections and SSE streams together, ``_client_sockets`` and the registry's per-IP count);
        ``--fd-reserve``; ``--max-handshake-rate`` (a token taken only when all else passed).
        """
        if self.draining:
            return Admission("draining", "draining", counted=False)
        limit = self.settings.max_connections
        if limit and self._client_sockets() >= limit:
            return Admission("max_connections", "too many connections")
        per_ip = self.settings.max_connections_per_ip
        if per_ip and self.registry.open_from(ip()) >= per_ip:
            return Admission("max_connections_per_ip", "too many connections from this address")
        if not self.fds.room_for_client():
            # The last --fd-reserve fds are the broker's and the HTTP side's (server/fds.py).
            return Admission("fd_reserve", "server at its connection capacity")
        bucket = self.handshakes
        if bucket is not None and not bucket.take():
            return Admission(
                "handshake_rate", "too many new connections", str(max(1, math.ceil(1.0 / bucket.rate)))
            )
        return None

    def _refuse(
        self,
        kind: str,
        status: int,
        why: str,
        peer: Callable[[], str | None],
        headers: dict[str, str],
        count: bool = True,
    ) -> WSUpgradeResponseWithListener:
        """Answer an upgrade with ``status`` and ``why``, count it, log it (throttled: a storm is one line a second)."""
        if count:
            self._reject(kind)
        skipped = self.refusals.ready(kind)
        if skipped is not None:
            log.info("refused upgrade: %d %s", status, why, extra=fields(
                code=status, reason=why, remote=peer(), path="/ws", event="upgrade_refused", suppressed=skipped
            ))  # fmt: skip
        return _plain(status, f"{why}\n".encode(), headers)

    def _client_sockets(self) -> int:
        """Open client connections that hold an fd: WebSocket connections and SSE streams."""
        http = getattr(self, "http", None)  # FdBudget asks once before the HTTP side exists
        return len(self.registry.connections) + (len(http.streams) if http is not None else 0)

    def _reject(self, reason: str) -> None:
        rejected = self.hub.stats.rejected
        rejected[reason] = rejected.get(reason, 0) + 1

    def _relocate(self, replaced: list[object]) -> None:
        """``heap.relocate``'s mover for the node's own: the handshake-rate bucket (written per upgrade)."""
        if self.handshakes is not None:
            replaced.append(self.handshakes)
            self.handshakes = self.handshakes.moved(replaced)

    async def start(self) -> None:
        s = self.settings
        self.fds.watch()
        tls = tls_context(s)  # validated at load: the files were readable a moment ago
        await self.broker.start()
        # The server API's commands and GET /rooms reach every node (server/control.py).
        self.control = await join_control(self.hub)
        if self.authenticator is not None:
            await self.authenticator.start()  # a JWKS is fetched before the first upgrade is accepted
        self.server = await create_server(
            self.route,
            s.host,
            s.port,
            # A compressed message at the limit may be a few bytes over it on the wire (deflate.py).
            max_frame_size=compressed_limit(s.max_message_size) if s.compression else s.max_message_size,
            max_message_size=s.max_message_size,
            read_buffer_size=s.read_buffer_size,
            handshake_timeout=s.request_timeout,
            use_aiofastnet=s.aiofastnet and _HAS_AIOFASTNET,
            # Workers each bind the port; the kernel spreads new connections over them.
            reuse_port=s.workers > 1,
            backlog=s.backlog,
            ssl=tls,
            # A TLS handshake is part of the opening handshake: the same --request-timeout bounds it.
            **({"ssl_handshake_timeout": s.request_timeout} if tls is not None else {}),
        )
        self.registry.limit_stall_on_accept(self.server)
        self.registry.start()
        if self.http is not None:
            await self.http.start(s.host, s.http_port, tls)
        if s.metrics_port and s.workers == 1:
            self.internal = await start_internal(self, s.metrics_host or s.host, s.metrics_port)
            log.info("metrics on http://%s:%d (/healthz /metrics)", s.metrics_host or s.host, s.metrics_port)
        if self.app is not None:
            await self.app.started()
        self.listening.set()
        scheme = "ws" if tls is None else "wss"
        log.info("listening on %s://%s:%d/ws (node %s)", scheme, s.host, s.port, self.node_id)

    async def drain(self) -> list[str]:
        """Stop accepting, close every connection with 1001, wait for their handshakes up to the drain timeout.

        The listening socket stays open until the end so that, while draining, upgrades get 503 with
        Retry-After and ``/healthz`` says 503 (load balancers take the node out) instead of a refused
        connection. Every step after the drain timeout is bounded too (``STOP_STEP_TIMEOUT_S``, the
        broker's own close deadline); returns what had to be abandoned, empty after a clean stop.
        """
        self.draining = True
        spread = self.handoff_spread
        if spread is not None:
            # SIGHUP: new workers listen on the same port; stop taking connections at once.
            if self.server is not None:
                self.server.close()
            if self.http is not None:
                await self.http.stop(self.settings.drain_timeout)
                self.http = None
        self.registry.stop()
        self.hub.flush()  # what was queued before the signal still goes out, ahead of the close frame
        conns = list(self.registry.connections)
        log.info("draining %d connections%s", len(conns), f" over {spread:g}s" if spread else "")
        grace = self.settings.drain_timeout
        loop = asyncio.get_running_loop()
        if spread and conns:
            # Spread the 1001s so that the clients come back to the new workers a few at a time.
            random.shuffle(conns)
            step = spread / len(conns)
            for i, c in enumerate(conns):
                loop.call_later(i * step, c.close, CloseCode.GOING_AWAY, "server going away", grace)
        else:
            for c in conns:
                c.close(CloseCode.GOING_AWAY, "server going away", grace)
        if self.http is not None:
            self.http.going_away()  # SSE streams: event: close / data: 1001, at the same moment
        deadline = loop.time() + (spread or 0.0) + self.settings.drain_timeout
        while (
            self.registry.connections or (self.http is not None and self.http.streams)
        ) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.registry.connections):
            c.abort()
        if self.server is not None:
            self.server.close()
        abandoned = []
        if self.http is not None and not await _bounded(self.http.stop(), "http-stop"):
            abandoned.append("http side")
        if self.internal is not None and not await _bounded(self.internal(), "metrics-listener-stop"):
            abandoned.append("metrics listener")
        if self.authenticator is not None and not await _bounded(self.authenticator.stop(), "jwks-stop"):
            abandoned.append("jwks refresher")
        if self.control is not None and not await _bounded(self.control.leave(), "control-leave"):
            abandoned.append("control room presence")
        abandoned += await self.broker.close()
        return abandoned


def _application(settings: Settings) -> App | None:
    """The App this process serves: ``--app module:attr``, else the one whose ``run()`` started it."""
    from wsfan.server import application

    if settings.app:
        return application.load(settings.app)  # checked at preflight
    return application.RUNNING


@dataclass(frozen=True, slots=True)
class Admission:
    """A refused new connection (``Node.admission``): its reason label (``wsfan_rejected_connections_total``
    and the log's throttle), the 503's text, its ``Retry-After`` and whether it is counted."""

    kind: str
    why: str
    retry_after: str = "1"
    counted: bool = True


def client_ip(peer: str | None) -> str:
    """The IP address of a ``logs.peer_text`` ("1.2.3.4:5", "[::1]:5"), as its socket's peername has it."""
    if not peer:
        return ""
    host = peer.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def _connect_request(request: WSUpgradeRequest, path: bytes, query: bytes, identity: Any) -> ConnectRequest:
    return ConnectRequest(
        path=path,
        query=query,
        headers=request.headers,
        user=identity.user if identity is not None else None,
        claims=getattr(identity, "claims", None),
    )


def _sighup_alone() -> None:
    log.warning("SIGHUP ignored: a restart without downtime needs the supervisor (--workers 2 or more)")


def _authorize(s: Session, action: str, room: str) -> bool:
    ident = s.claims
    return ident is None or ident.allows(room)


def make_authenticator(settings: Settings) -> Authenticator | None:
    """JWT checks when any key is configured (HS256 secret, PEM public key, JWKS URL); None: anonymous."""
    s = settings
    if not (s.jwt_secret or s.jwt_public_key or s.jwks_url):
        return None
    return Authenticator(
        s.jwt_secret,
        s.jwt_leeway,
        public_key=load_public_key(s.jwt_public_key) if s.jwt_public_key else None,  # checked at preflight
        jwks=JwksKeys(s.jwks_url, s.jwks_refresh) if s.jwks_url else None,
        audience=s.jwt_audience,
        issuer=s.jwt_issuer,
    )


def make_broker(settings: Settings, node_id: str) -> Broker:
    """In-process unless a broker URL is given; the hub cannot tell the difference."""
    spaces = namespaces(settings)[0]  # already validated by config.load
    many: type | None = None  # a broker over several Redis servers, found by the URL's scheme
    if settings.broker.startswith("redis+sentinel://"):
        from wsfan.server.broker.redis_sentinel import RedisSentinelBroker as many
    elif settings.broker.startswith("redis+cluster://"):
        from wsfan.server.broker.redis_cluster import RedisClusterBroker as many
    if many is not None:
        return many(
            settings.broker,
            node_id=node_id,
            namespaces=spaces,
            presence_ttl=settings.presence_ttl,
            meta_ttl=settings.history_meta_ttl,
        )
    if settings.broker:
        from wsfan.server.broker.redis import RedisBroker

        return RedisBroker(
            settings.broker,
            node_id=node_id,
            namespaces=spaces,
            presence_ttl=settings.presence_ttl,
            meta_ttl=settings.history_meta_ttl,
        )
    return MemoryBroker(namespaces=spaces, max_rooms=settings.max_rooms)


def _answer(refusal: Refusal) -> WSUpgradeResponseWithListener:
    return _plain(refusal.status, refusal.reason.encode() + b"\n", refusal.headers or None)


def _upgraded(
    conn: Connection | EchoConnection,
    subprotocol: str | None,
    agreement: Agreement | None,
    first: bytes,
) -> WSUpgradeResponseWithListener:
    """The 101 for an accepted upgrade (with the agreed subprotocol and extension), ``first`` in its write."""
    extra: tuple[tuple[str, str], ...] = ()
    if subprotocol is not None:
        extra += (("Sec-WebSocket-Protocol", subprotocol),)
    if agreement is not None:
        extra += (("Sec-WebSocket-Extensions", agreement.response),)
    return WSUpgradeResponseWithListener(switching(extra, first), conn)


def _plain(status: int, body: bytes, headers: dict[str, str] | None = None) -> WSUpgradeResponseWithListener:
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


async def _bounded(coro: Any, name: str) -> bool:
    """Run ``coro`` as a task for at most ``STOP_STEP_TIMEOUT_S``; False (and cancelled) when it overran."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _, pending = await asyncio.wait([task], timeout=STOP_STEP_TIMEOUT_S)
    if pending:
        task.cancel()
        return False
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s failed during shutdown: %r", name, task.exception())
    return True


async def _leftover_tasks() -> list[str]:
    """Cancel the tasks still running after the drain and wait for them, bounded; the names of those that stay.

    ``asyncio.run``/``uvloop.run`` would otherwise cancel them and wait with no deadline, so one
    task that swallows its cancel would keep the process alive after every client got its 1001.
    """
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in left:
        t.cancel()
    if not left:
        return []
    _, pending = await asyncio.wait(left, timeout=STOP_STEP_TIMEOUT_S)
    return sorted(t.get_name() for t in pending)


async def serve(settings: Settings, attach: Callable[[Node, asyncio.Event], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain; exit code 0 after a clean drain, ``EXIT_ABANDONED`` otherwise.

    Shutdown is bounded: drain timeout, then at most a few ``STOP_STEP_TIMEOUT_S`` steps. When a
    step overran, an error line names what was abandoned and the process leaves at once with
    ``EXIT_ABANDONED`` (``os._exit``: the loop's own cleanup would wait for the stuck task).
    ``attach(node, stop)`` (the worker side of a supervisor) is called before the node starts.
    """
    raise_soft_limit()
    # From here on every pymalloc arena is known, so that a compaction can give back the empty pools
    # of the arenas a burst of rooms left behind (server/heap.py, point 5).
    if not heap.track_arenas():
        log.debug(
            "memory: empty pymalloc pools are not given back (wsfan.server._pools not built or not usable)"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM that arrives as soon as the port is open must still drain cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _sighup_alone)
    node = Node(settings)
    if attach is not None:
        attach(node, stop)
    try:
        await node.start()
    except OSError as exc:  # the port was free at preflight but taken since (startup.py)
        log.error(
            "cannot listen on %s: %s; check --host, --port and --http-port", settings.host, exc.strerror
        )
        await node.broker.close()
        return EXIT_USAGE
    except BrokerUnavailable as exc:  # a cluster's slot map or a sentinel's master is needed to start
        log.error("cannot start: %s; check --broker", exc)
        await node.broker.close()
        return EXIT_USAGE
    # Everything built so far (modules, settings, the hub) lives as long as the process: out of the
    # collector's generations, so the collections a connection storm triggers skip it (gc was 5.9 % of
    # a connect + join in results/profiles/connect-join-before.svg, 1.3 % after).
    gc.freeze()
    await stop.wait()
    abandoned = await node.drain()
    abandoned += await _leftover_tasks()
    if abandoned:
        log.error("stopped, abandoning %s; exit code %d", ", ".join(abandoned), EXIT_ABANDONED)
        logging.shutdown()
        os._exit(EXIT_ABANDONED)
    log.info("stopped")
    return 0
