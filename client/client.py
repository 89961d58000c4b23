"""The public asyncio client: ``connect()``, requests with replies, fire-and-forget sends, deliveries.

Everything that survives a reconnect lives in ``client.session.Session``; the
reconnect policy in ``client.reconnect``; this module is the API surface only,
so its methods read like the protocol table in PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from time import perf_counter
from typing import Any

from msgspec import Raw

from wsfan.client.codec import Encoding
from wsfan.client.errors import ClientError, NotConnected
from wsfan.client.inbox import MessageStream
from wsfan.client.session import DEFAULT, Session


class Client(Session):
    """A pub/sub session against one server URL. Create it with ``await connect(...)``.

    Keyword options (all optional):

    * ``token``: JWT sent as ``Authorization: Bearer``.
    * ``encoding``: ``"json"`` (text frames) or ``"msgpack"`` (offers subprotocol
      ``msgpack``, binary frames; fails if the server does not accept it).
    * ``request_timeout`` (5 s): default for every call, overridable per call with
      ``timeout=``; None waits forever. Includes waiting for a reconnect.
    * ``open_timeout`` (5 s): TCP + upgrade + welcome.
    * ``ping_interval`` (20 s) / ``ping_timeout`` (10 s): after ``ping_interval``
      without incoming data a ping frame is sent; no pong within ``ping_timeout``
      declares the connection dead (close 1006) and it is reconnected. None disables.
      ``ping_timeout`` is capped at ``ping_interval`` (a picows constraint).
    * ``reconnect`` (True), ``backoff_base`` (0.5 s), ``backoff_cap`` (30 s),
      ``max_attempts`` (None = forever), ``rng`` (``random.Random``, seed it in
      tests), ``stable_after`` (10 s), ``refresh_token``: see ``client.reconnect``.
    * ``on_message``: called with every delivery instead of buffering it (the
      cheapest path, for benchmarks); ``messages()`` is then unavailable.
    * ``on_event``: called with ``client.events`` records (connected, disconnected,
      reconnecting, recovered, gap, ..., ``Subscribed``/``Unsubscribed`` when the server
      joins this connection to a room or takes it out of one).
    * ``on_push``: called with every room-less push instead of buffering it for
      ``pushes()``. All three callbacks may be ``async``.
    * ``push_types``: msgspec Structs with a ``tag`` (e.g. the server's own
      ``wsfan.Message`` classes) that pushes of those ``type`` values decode into;
      pushes of other application types arrive as dicts.
    * ``max_buffered`` (10000): bound of the message buffer (all rooms together) and of
      the pushes' buffer; overflow drops the oldest and the next read that could have
      returned it raises ``MessagesDropped`` (see ``client.inbox``).
    * ``raw_payloads`` (False): deliver payloads as ``msgspec.Raw`` (undecoded).
    * ``headers``: extra ``(name, value)`` upgrade headers.
    """

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> Client:
        """Open the first connection. It is not retried: a wrong URL or token should fail loudly."""
        if self._done is not None:
            raise ClientError("client already started")
        self._done = asyncio.get_running_loop().create_future()
        try:
            conn = await self._open(reconnect=False)
        except BaseException as exc:
            self._finish(exc if isinstance(exc, Exception) else None)
            raise
        self._supervise(conn)
        return self

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good: no reconnect; message streams drain and end; waiting calls fail."""
        if self._closing:  # already closing or stopped: closing again is a no-op, never an error
            if self._done is not None:
                await asyncio.wait([self._done])
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        conn = self._conn
        if conn is not None:
            await conn.close(code, reason)
        self._finish(None)

    async def wait_closed(self) -> None:
        """Wait until the client stopped. Returns after ``close()``; raises why it stopped on its own.

        It stops on its own when the server closed with 1000/4001 and no new token
        was supplied (``ConnectionClosed``), on a 401 while reconnecting
        (``Unauthorized``), or when ``max_attempts`` reconnects failed
        (``ConnectionClosed(1006)``).
        """
        if self._done is not None:
            await asyncio.shield(self._done)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def encoding(self) -> Encoding:
        return self._codec.encoding

    @property
    def connected(self) -> bool:
        """True while a connection is open and every room has been rejoined."""
        return self._conn is not None and self._ready.is_set()

    @property
    def stopped(self) -> BaseException | None:
        """Why the client stopped for good (``ConnectionClosed`` after ``close()``), or None while running."""
        return self._stopped

    @property
    def rooms(self) -> list[str]:
        """Rooms whose deliveries this client hands over.

        The rooms joined (acked), rejoined automatically after a reconnect, and the rooms the
        server joined this connection to (``conn.join`` in an application, docs/app-api.md),
        from their ``subscribed`` push until an ``unsubscribed`` push or the end of the
        connection: they are the connection's, so they are not rejoined (the server decides
        again on the new connection, e.g. in ``on_open``) and what was published meanwhile is
        not recovered but reported: a ``Gap`` when the server's next ``subscribed`` is past the
        last seq handed over. ``join()`` one of them to make it the client's.
        """
        return self._rooms.subscribed()

    def last_seq(self, room: str) -> int | None:
        """The last seq handed to the application for ``room``: what a rejoin sends as ``since``."""
        return self._rooms.last_seq(room)

    def epoch(self, room: str) -> str | None:
        """The epoch of ``room``'s numbering from its last join ack: what a rejoin sends with ``since``.

        None before the first ack, and with servers that send no epoch.
        """
        return self._rooms.epoch(room)

    # ------------------------------------------------------------ requests (one reply each)

    async def join(
        self,
        room: str,
        since: int | None = None,
        *,
        epoch: str | None = None,
        timeout: float | None = DEFAULT,
    ) -> dict[str, Any]:
        """Subscribe; with ``since`` the server first replays history after it.

        Returns the ack data ``{"room", "seq", "recovered", "epoch"}`` (``epoch``
        from servers that support it). ``room`` is the room actually joined: a server's
        ``before_join`` hook may move the join to another room (docs/app-api.md), and the
        client then tracks, lists (``rooms``), hands over and rejoins that room, not ``room``. A ``Recovered`` or ``Gap`` event is reported
        when ``since`` was given. ``epoch`` is the numbering ``since`` counts in, as
        returned by ``epoch(room)``: pass both to resume a position saved by an
        earlier process; when the room has been renumbered since (``Gap`` with
        ``reset=True``) its whole new history is delivered. Rejoins after a
        reconnect send both by themselves.
        """
        return await self._bounded("join", timeout, self._join(room, since, epoch))

    async def leave(self, room: str, *, timeout: float | None = DEFAULT) -> dict[str, Any]:
        """Unsubscribe. The room is forgotten at once (no rejoin; its stream ends) even if the reply is lost.

        Also leaves a room the server joined this connection to. Deliveries already in flight
        until the server's ack are dropped.
        """
        connected = self.connected
        self._rooms.leave(room, sent=connected)
        self._router.end_room(room)
        if not connected:  # the next connection will not have it: nothing to tell the server
            return {"room": room}
        data = await self._bounded("leave", timeout, self._request("leave", room=room))
        self._rooms.left(room)
        return data

    async def publish(self, room: str, payload: Any, *, timeout: float | None = DEFAULT) -> dict[str, Any]:
        """Publish to a joined room; returns ``{"room", "seq"}``. ``payload`` may be pre-encoded ``msgspec.Raw``.

        ``payload`` is held to the protocol's payload rule first: what every subscriber can receive
        exactly, in either encoding (``None``, ``bool``, ``int`` in -2^63..2^64-1, finite ``float``,
        ``str``, ``list``, ``dict`` with ``str`` keys, at most 64 deep); anything else raises
        ``InvalidPayload`` before anything is sent, in both encodings (``errors.InvalidPayload``).
        """
        payload = self._codec.payload(payload)
        data = await self._bounded("publish", timeout, self._request("publish", room=room, payload=payload))
        self._rooms.published(room, data.get("seq") if isinstance(data, dict) else None)
        return data

    async def presence(self, room: str, *, timeout: float | None = DEFAULT) -> list[dict[str, Any]]:
        """Who is in ``room``, cluster-wide: ``[{"conn", "user", "joined_at"}]`` (``joined_at`` in unix ms).

        Needs no membership; raises ``NotAvailable`` where the room's namespace has presence
        off and ``Forbidden`` outside the token's ``rooms`` claim. Arrivals and departures are
        reported as ``Joined``/``Left`` events to ``on_event`` (namespaces with ``join_leave``).
        """
        data = await self._bounded("presence", timeout, self._request("presence", room=room))
        return list(data.get("presence", []))

    async def presence_stats(self, room: str, *, timeout: float | None = DEFAULT) -> dict[str, int]:
        """``{"connections", "users"}`` in ``room`` (users counted once however many connections they have)."""
        data = await self._bounded("presence_stats", timeout, self._request("presence_stats", room=room))
        return {"connections": data["connections"], "users": data["users"]}

    async def echo(self, payload: Any, *, timeout: float | None = DEFAULT) -> Any:
        """The server sends ``payload`` back to this connection only; returns it decoded.

        The payload rule of ``publish`` applies (``InvalidPayload``)."""
        payload = self._codec.payload(payload)
        return await self._bounded("echo", timeout, self._request("echo", payload=payload))

    async def ping(self, *, timeout: float | None = DEFAULT) -> float:
        """Application-level round trip through the server's message loop (not just its socket), in seconds."""
        started = perf_counter()
        await self._bounded("ping", timeout, self._request("ping", ts=time.time() * 1000.0))
        return perf_counter() - started

    async def request(self, message: Any, *, timeout: float | None = DEFAULT) -> Any:
        """Send an application message (a ``wsfan.Message`` Struct, docs/app-api.md) with a fresh id.

        Returns the ``data`` of its ``ack`` (the server handler's return value, ``{}`` for None);
        an ``error`` reply raises the ``ServerError`` subclass of its code (``InvalidMessage``,
        ``InternalError``...; an application's own code raises ``ProtocolError`` with ``.code``).
        """
        kind = type(message).__struct_config__.tag
        return await self._bounded(str(kind), timeout, self._request_message(message))

    # ------------------------------------------------------------ fire-and-forget (no id, no reply)

    def publish_nowait(self, room: str, payload: Any) -> None:
        """Publish without an id, for load generation: no ack; errors arrive as ``ServerError`` events.

        Raises ``NotConnected`` while there is no connection (it is not queued), ``InvalidPayload``
        as ``publish`` does.
        """
        self._send_nowait("publish", room=room, payload=payload)

    @property
    def writable(self) -> bool:
        """False while the socket's write buffer is over its high-water mark: a load generator should ``drain()``."""
        conn = self._conn
        return conn is not None and conn.writable

    async def drain(self) -> None:
        """Back-pressure for fire-and-forget senders: wait until the socket accepts writes again.

        Returns at once when not connected; the next ``*_nowait`` call then raises ``NotConnected``.
        """
        conn = self._conn
        if conn is not None:
            await conn.drain()

    def echo_nowait(self, payload: Any) -> None:
        """Echo without an id; the echoed reply is discarded."""
        self._send_nowait("echo", payload=payload)

    def send_raw(self, data: bytes) -> None:
        """Write one already-encoded message as is (tests of server validation, replaying traffic)."""
        conn = self._conn
        if conn is None:
            raise NotConnected("not connected")
        conn.send(data)
        self.stats.sent += 1

    # ------------------------------------------------------------ deliveries and payloads

    def messages(self, room: str | None = None) -> MessageStream:
        """Deliveries of every room, or of one: ``async for msg in client.messages("r")``.

        Rooms the server joined this connection to are included (see ``rooms``).

        A stream is a view of the client's one bounded buffer (``max_buffered``), filled from
        the first connection on, so nothing is lost between ``join()`` and the first read:
        ``await client.messages(room).get(timeout)`` in a loop reads every message, each once,
        oldest first, however many stream objects it creates and drops. Each message is read
        once, by the first read that asks for it (a waiting read of its room before a waiting
        all-rooms read). Overflow drops the oldest and is reported once (``MessagesDropped``,
        ``Overflow``). The rules: ``client.inbox``. Unavailable with ``on_message``.
        """
        if self._on_message is not None:
            raise ClientError("messages() is not available when the client was created with on_message")
        return self._router.stream(room)

    def pushes(self) -> MessageStream:
        """Room-less pushes from the server, in order: ``async for push in client.pushes()``.

        Each is a ``Broadcast`` (``{"type":"broadcast","payload"}``: ``App.broadcast`` or
        ``POST /broadcast`` without rooms; ``.payload`` decoded) or a message of the
        application's own type sent with ``conn.send`` (docs/app-api.md): an instance of
        its ``push_types`` class, else a dict such as ``{"type": "notice", "text": "hi"}``.
        One buffer, bounded like ``messages()`` (``Overflow(pushes=True)``), filled from
        the first connection on; every ``pushes()`` stream reads from it (each push is
        read once). Unavailable with ``on_push``.
        """
        if self._on_push is not None:
            raise ClientError("pushes() is not available when the client was created with on_push")
        return MessageStream(self._router.pushes)

    def encode_payload(self, value: Any) -> Raw:
        """Encode a payload once in this client's encoding, to publish it many times for free (``InvalidPayload`` as ``publish``)."""
        return self._codec.encode_payload(value)

    def decode_payload(self, payload: Any) -> Any:
        """Decode a ``Raw`` payload received with ``raw_payloads=True``."""
        return self._codec.decode_payload(payload)


class _Connecting:
    """What ``connect()`` returns: await it for a started client, or use it with ``async with``."""

    __slots__ = ("_client",)

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client.start().__await__()

    async def __aenter__(self) -> Client:
        return await self._client.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()


def connect(url: str, token: str | None = None, encoding: Encoding = "json", **options: Any) -> _Connecting:
    """``client = await connect("ws://host:port/ws", token, "msgpack", on_event=print)``.

    Returns once the server's welcome arrived (``client.welcome``). The first
    connection is not retried. See ``Client`` for the options.
    """
    return _Connecting(Client(url, token=token, encoding=encoding, **options))
