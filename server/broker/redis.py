"""Cluster broker: room seq, history and fan-out between nodes, all in Redis.

How a room looks in Redis (keys, the atomic publish script, epochs, the envelope)
is in ``server/broker/redis_layout.py``; this module is about talking to Redis:
staying connected, subscribing, batching, and what a node does when Redis goes.

Connection model: one dedicated connection for pub/sub (read by one task, written
by one task so SUBSCRIBE/UNSUBSCRIBE keep their order), and the client's pool for
the rest. Publishes are queued and sent as one pipeline per batch by a single
task: one round trip for a burst, and a node's publishes reach Redis in the
order its clients sent them. Joins' history reads and presence writes go the same
way, through a second queue and task (``_call``): a storm of joins costs a round
trip per batch, not one per join, and holds one pooled connection, not one each
(before, 5,000 joins at once waited for the pool's 64 connections past its 5 s
checkout timeout, which took the broker down). Every Redis call may fail; a
failure takes the broker down (UNAVAILABLE for clients, one log line) until the
reconnect loop, with backoff, has resubscribed every room and caught up what its
subscribers missed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wsfan.server.broker import BrokerUnavailable, DeliverFn, EventFn, reserved
from wsfan.server.broker.history import History, history_since
from wsfan.server.broker.publication import PresenceEntry, PresenceEvent, Publication
from wsfan.server.broker.redis_layout import (
    EVENT_SEQ,
    HISTORY_LUA,
    HOLD_LUA,
    PRESENCE_ADD_LUA,
    PRESENCE_READ_LUA,
    PRESENCE_REFRESH_LUA,
    PRESENCE_REMOVE_LUA,
    PUBLISH_LUA,
    UNNUMBERED_SEQ,
    Body,
    Envelope,
    PresenceInfo,
    channel_name,
    decode_envelope,
    decode_info,
    encode_body,
    evalsha_head,
    history_key,
    meta_key,
    presence_keys,
    publish_command_head,
    resp_arg,
    room_args,
    script_call,
    unnumbered_command,
)
from wsfan.server.fds import is_exhausted
from wsfan.server.heap import Compaction, compact_in_place
from wsfan.server.namespaces import Namespace, Namespaces
from wsfan.server.startup import redact
from wsfan.server.stats import BROKER_PUBLISH_BUCKETS, Histogram

# Connections to Redis per node (history reads and scripts; publishes are pipelined on one).
POOL_SIZE = 64
log = logging.getLogger("wsfan.broker")

RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0
# A join waits this long for its room's SUBSCRIBE to be confirmed before reading history.
SUBSCRIBE_TIMEOUT_S = 5.0
# SUBSCRIBE arguments per command when resubscribing many rooms at once.
CHUNK = 1000
# Publishes per pipeline: a backlog goes out in several round trips, so none grows without bound.
MAX_BATCH = 512
# Script calls (joins' history reads, presence writes) per pipeline: a history reply can be
# hundreds of envelopes, so a storm of joins goes out in several round trips of this many.
MAX_CALLS = 256
# A batch of publishes or of script calls not answered by then counts as a lost connection.
REPLY_TIMEOUT_S = 5.0
# close(): how long the broker's tasks get to end, and then the connections to close, each.
CLOSE_TIMEOUT_S = 2.0

_LOST = (RedisConnectionError, RedisTimeoutError, OSError)


_Item = TypeVar("_Item")


class _Call:
    """One queued script call (``RedisBroker._call``): its script, its RESP after the sha, its waiter."""

    __slots__ = ("lua", "argc", "tail", "fut")

    def __init__(self, lua: str, argc: int, tail: bytes, fut: asyncio.Future[Any]) -> None:
        self.lua = lua  # the script's source as written (before ``_lua``): the key of ``_scripts``
        self.argc = argc
        self.tail = tail
        self.fut = fut


class _Room:
    """This node's subscription to one room's channel."""

    __slots__ = ("name", "channel", "args", "ready", "last", "epoch", "floor", "stale")

    def __init__(self, name: str, args: tuple[bytes, bytes, bytes, bytes]) -> None:
        self.name = name
        self.channel = channel_name(name).encode()
        self.args = args  # rooms with local subscribers are the ones published to most
        # Set once Redis confirmed the SUBSCRIBE on the current connection (or the
        # connection was lost, to wake joins waiting on it: they re-check availability).
        self.ready = asyncio.Event()
        self.last = 0  # the last seq handed to the hub: where a catch-up after a reconnect starts
        self.epoch = ""
        self.floor = 0  # after a catch-up: live messages up to here were already delivered
        self.stale = False  # resubscribed after a lost connection: catch up before ready


class RedisBroker:
    """The ``Broker`` of a cluster: every call that needs Redis returns an awaitable."""

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 300,
        node_id: str = "",
        namespaces: Namespaces | None = None,
        presence_ttl: float = 60.0,
        meta_ttl: float = 86_400.0,
        sharded: bool = False,
        wait_replicas: int = 0,
    ) -> None:
        self.url = url
        # One master of a Redis Cluster (server/broker/redis_cluster.py): its rooms' envelopes go out
        # with SPUBLISH and are read with SSUBSCRIBE (Redis >= 7), so they never cross the cluster bus.
        self.sharded = sharded
        # With replicas: a publish is acked only once this many replicas have it (WAIT after the
        # batch), so a replica promoted after the master dies holds every acked publication.
        # ``want_replicas`` is asked for; ``wait_replicas`` is what the master has now (a promoted
        # replica has none until the old master comes back as its replica).
        self.want_replicas = self.wait_replicas = wait_replicas
        self._sub, self._unsub = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self._message = b"smessage" if sharded else b"message"
        self._confirms = (b"ssubscribe", b"sunsubscribe") if sharded else (b"subscribe", b"unsubscribe")
        self.namespaces = namespaces or Namespaces(Namespace(history_size=history_size))
        self.history_size = self.namespaces.default.kept_history
        self.node_id = node_id
        # Called with the error text when a connection to Redis fails for want of file descriptors.
        self.on_fd_exhausted: Callable[[str], None] | None = None
        # Redis EXPIRE takes whole seconds.
        self.presence_ttl = max(1, math.ceil(presence_ttl))
        self.meta_ttl = max(1, math.ceil(meta_ttl))
        self._meta_arg = resp_arg(str(self.meta_ttl).encode())
        # This node's presence entries (room -> conn -> packed info): refreshed in Redis every
        # third of the TTL, and written again after a reconnect.
        self.local_presence: dict[str, dict[str, bytes]] = {}
        # Presence entries of this node that left while Redis was away (room -> conns): removed
        # from Redis as soon as it is back, with the rewrite of local_presence. Without it an entry
        # Redis kept (a partition, not a restart) stayed listed until its TTL ran out.
        self.unwritten_leaves: dict[str, set[str]] = {}
        self._presence_wake = asyncio.Event()
        self._scripts: dict[str, Any] = {}
        self._on_event: EventFn | None = None
        self.available = False
        # Health for /metrics (read at scrape time): reconnections after a loss, publish round trips.
        self.reconnects = 0
        self.publish_rtt = Histogram(BROKER_PUBLISH_BUCKETS)
        # Round trips of batched script calls (its count: pipelines sent) and the calls they carried.
        self.script_rtt = Histogram(BROKER_PUBLISH_BUCKETS)
        self.script_calls = 0
        self._state = "starting"
        self._why = "broker not connected yet"
        self._closing = False
        self._refusing = False
        self._deliver: DeliverFn | None = None
        self._redis: Redis | None = None
        self._sub_conn: AbstractConnection | None = None
        self._rooms: dict[str, _Room] = {}
        self._channels: dict[bytes, _Room] = {}
        self._inflight: dict[bytes, int] = {}  # (UN)SUBSCRIBEs sent on this connection, not yet confirmed
        self._ops: list[tuple[str, list[bytes]]] = []
        self._ops_wake = asyncio.Event()
        self._outbox: list[tuple[str, bytes, asyncio.Future[Publication], Publication]] = []
        self._outbox_wake = asyncio.Event()
        self._calls: list[_Call] = []
        self._calls_wake = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_sha = ""
        # Past heap.COMPACT_AFTER forgotten rooms (_forgot): this broker's per-room tables, then the hub's.
        self.compaction = Compaction()
        self.compaction.hooks.append(self._compact_tables)
        self.compact_hooks = self.compaction.hooks
        self.compaction.movers.append(self._relocate)
        self.compact_movers = self.compaction.movers

    # ------------------------------------------------------------ lifecycle

    def bind(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    def bind_events(self, on_event: EventFn) -> None:
        self._on_event = on_event

    async def start(self) -> None:
        """Connect, or start without Redis and keep trying: the node serves its connections either way."""
        # No retries inside redis-py: a failed publish must answer UNAVAILABLE at once and
        # must never be sent twice; reconnecting is this class's job, with its own backoff.
        # A blocking pool: a burst of joins (a reconnection storm) waits for a free connection
        # instead of failing with "Too many connections" once redis-py's default cap is reached.
        self._redis = self._client()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connect_forever(), name="redis-connect"),
            loop.create_task(self._write_ops_forever(), name="redis-ops-writer"),
            loop.create_task(
                self._drain_forever(
                    self._outbox_wake, self._take_publishes, self._publish_batch, self._fail, "publishes"
                ),
                name="redis-publisher",
            ),
            loop.create_task(
                self._drain_forever(
                    self._calls_wake, self._take_calls, self._call_batch, self._fail_calls, "script calls"
                ),
                name="redis-scripts",
            ),
            loop.create_task(self._refresh_presence_forever(), name="redis-presence"),
        ]
        await self._first_attempt.wait()

    def _client(self) -> Redis:
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=POOL_SIZE,
            timeout=5.0,
            retry=Retry(NoBackoff(), 0),
            # RESP2: pub/sub messages are plain replies, no push-notification layer per message
            # (a ?protocol=3 in the URL still works: the reader asks for pushes too).
            protocol=2,
            socket_connect_timeout=2.0,
            socket_timeout=5.0,
            client_name=f"wsfan-{self.node_id}" if self.node_id else None,
        )
        return Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))

    def retarget(self, url: str) -> None:
        """Talk to ``url`` from the next reconnect on (a Redis Cluster replica promoted in place of this master).

        The reconnect loop then resubscribes every room there and catches up from its history,
        which the replica holds. Called only while the broker is down.
        """
        old, self.url = self._redis, url
        self._redis = self._client()
        self._scripts = {}  # redis-py Scripts are bound to their client
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.aclose(), name="redis-close-old")
            self._tasks.append(task)

    async def close(self) -> list[str]:
        """Stop every task and close the connections, within ``2 * CLOSE_TIMEOUT_S`` whatever redis-py does.

        Returns what was abandoned (task names, "connections"), empty after a clean close. The
        loops end on ``_closing`` rather than on a cancel alone: on Python 3.11 a cancel can be
        swallowed inside redis-py (``asyncio.wait_for`` in ``send_packed_command`` returns the
        result when the write finished as the cancel arrived, bpo-37658/gh-86296), and a
        ``while True`` loop then waits for its next wake-up forever.
        """
        self._closing = True
        self.available = False
        self._why = "server shutting down"
        self._ops_wake.set()
        self._outbox_wake.set()
        self._calls_wake.set()
        self._presence_wake.set()
        tasks = [*self._tasks, *([self._reader] if self._reader else [])]
        for t in tasks:
            t.cancel()
        abandoned: list[str] = []
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            abandoned = sorted(t.get_name() for t in pending)
        self._fail(self._outbox, "server shutting down")
        self._outbox = []
        self._fail_calls(self._calls, "server shutting down")
        self._calls = []
        if self._redis is not None:
            closing = asyncio.get_running_loop().create_task(self._close_connections(), name="redis-close")
            _, pending = await asyncio.wait([closing], timeout=CLOSE_TIMEOUT_S)
            if pending:
                closing.cancel()
                abandoned.append("redis connections")
        if abandoned:
            log.error("broker close abandoned %s after %.0fs", ", ".join(abandoned), CLOSE_TIMEOUT_S)
        return abandoned

    async def _close_connections(self) -> None:
        assert self._redis is not None
        await self._drop(self._sub_conn)
        self._sub_conn = None
        await self._redis.aclose()

    # ------------------------------------------------------------ Broker

    def publish(
        self, room: str, sender: str, payload: bytes, encoding: int, origin: str
    ) -> asyncio.Future[Publication]:
        fut: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
        if not self.available:
            fut.set_exception(BrokerUnavailable(self._why))
            return fut
        body = encode_body(Body(sender, encoding, origin, time.time(), payload))
        self._outbox.append((room, body, fut, Publication(room, 0, sender, payload, encoding, origin)))
        self._outbox_wake.set()
        return fut

    async def history(self, room: str, since: int | None, epoch: str | None = None) -> History:
        if reserved(room):  # never numbered, never kept: nothing to read, no key to create
            return History([], False, 0, "")
        if not self.available:
            raise BrokerUnavailable(self._why)
        r = self._rooms.get(room)
        if r is not None and not r.ready.is_set():
            # History is read only once live messages flow, or a publish between the
            # read and the SUBSCRIBE would be in neither (the hub parks live ones meanwhile).
            try:
                await asyncio.wait_for(r.ready.wait(), SUBSCRIBE_TIMEOUT_S)
            except TimeoutError:
                raise BrokerUnavailable("broker did not confirm the subscription") from None
            if not self.available:
                raise BrokerUnavailable(self._why)
        hist = await self._read_history(room, since, epoch)
        if r is not None:
            if r.epoch != hist.epoch:
                r.epoch, r.last = hist.epoch, hist.seq
            elif hist.seq > r.last:
                r.last = hist.seq
        return hist

    def subscribe(self, room: str) -> None:
        if room in self._rooms:
            return
        r = self._rooms[room] = _Room(room, self._room_args(room))
        self._channels[r.channel] = r
        self._queue(self._sub, r.channel)

    def unsubscribe(self, room: str) -> None:
        r = self._rooms.pop(room, None)
        if r is None:
            return
        if self._channels.get(r.channel) is r:
            del self._channels[r.channel]
        self._queue(self._unsub, r.channel)
        if room not in self.local_presence:
            self._forgot()

    def _forgot(self) -> None:
        """A room is in none of this node's tables any more (unsubscribed, no local presence)."""
        if self.compaction.forgot(1, len(self._rooms)):
            self.compaction.run_soon()  # not inside the hub's leave: between callbacks

    def _relocate(self, replaced: list[object]) -> None:
        """``heap.relocate``'s mover: the round-trip histograms, written per batch."""
        self.publish_rtt.relocate(replaced)
        self.script_rtt.relocate(replaced)

    def _compact_tables(self) -> None:
        """Shrink every per-room table a burst of rooms grew (``heap.compact_in_place``).

        In place: the reader loop holds ``_channels`` itself (the fan-out path reads no attribute).
        """
        for table in (self._rooms, self._channels, self._inflight, self.local_presence):
            compact_in_place(table)

    # ------------------------------------------------------------ publishing

    async def _drain_forever(
        self,
        wake: asyncio.Event,
        take: Callable[[], list[_Item]],
        send: Callable[[list[_Item]], Awaitable[None]],
        fail: Callable[[list[_Item], str], None],
        what: str,
    ) -> None:
        """Send a queue in batches until close: ``take()`` the next batch (empty: wait for ``wake``), ``send`` it.

        The one loop of both queues (publishes, script calls). A bug in ``send`` fails its batch
        and the loop goes on (it must not stop every later publish or join of this node); a
        cancel (``close``) fails the batch in flight too, so no waiter is left hanging.
        """
        while not self._closing:
            await wake.wait()
            wake.clear()
            while not self._closing:
                batch = take()
                if not batch:
                    break
                try:
                    await send(batch)
                except Exception:
                    log.exception("a batch of %s failed", what)
                    fail(batch, "internal error in the broker")
                except BaseException:
                    fail(batch, "server shutting down")
                    raise

    def _take_publishes(self) -> list[tuple[str, bytes, asyncio.Future[Publication], Publication]]:
        batch, self._outbox = self._outbox[:MAX_BATCH], self._outbox[MAX_BATCH:]
        return batch

    async def _publish_batch(
        self, batch: list[tuple[str, bytes, asyncio.Future[Publication], Publication]], retried: bool = False
    ) -> None:
        if not self.available or self._redis is None:
            self._fail(batch, self._why)
            return
        # The commands are packed here rather than by redis-py, whose generic packing cost
        # more than everything else on a publish; the replies are read back in order.
        head = publish_command_head(self._publish_sha)
        # One candidate epoch per batch: it is used only by a room that does not exist yet,
        # and a room cannot be created twice within one round trip on one connection.
        epoch = resp_arg(secrets.token_hex(4).encode())
        rooms = self._rooms
        commands = []
        numbered = []
        for room, body, _, _ in batch:
            r = rooms.get(room)
            keys, channel, size, ttls = r.args if r is not None else self._room_args(room)
            if reserved(room):  # a command (server/control.py): published as is, nothing kept
                numbered.append(False)
                commands.append(unnumbered_command(channel, body, self.sharded))
            else:
                numbered.append(True)
                commands.append(b"".join((head, keys, resp_arg(body), channel, size, epoch, ttls)))
        if self.wait_replicas:
            n, ms = str(self.wait_replicas).encode(), str(int(REPLY_TIMEOUT_S * 500)).encode()
            commands.append(b"*3\r\n$4\r\nWAIT\r\n" + resp_arg(n) + resp_arg(ms))
        pool = self._redis.connection_pool
        results: list[Any] = []
        try:
            conn = await pool.get_connection()
        except _LOST as exc:
            self._fail(batch, self._why)
            self._lost(exc)
            return
        sent_at = time.perf_counter()
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await conn.send_packed_command(commands, check_health=False)
                for _ in commands:
                    try:
                        results.append(await conn.read_response(timeout=math.inf, disconnect_on_error=False))
                    except ResponseError as exc:
                        results.append(exc)
        except (*_LOST, TimeoutError) as exc:
            # The scripts may or may not have run: the clients are told it is not known to be published.
            await conn.disconnect(nowait=True)
            self._fail(batch, "broker connection lost; the message may not have been published")
            self._lost(exc)
            return
        finally:
            await pool.release(conn)
        self.publish_rtt.observe(time.perf_counter() - sent_at)
        if self.wait_replicas:
            copies = results.pop()
            if isinstance(copies, Exception) or copies < self.wait_replicas:
                # Published on the master, but not known to survive its loss: not acked.
                self._fail(batch, "broker replica did not confirm; the message may not have been published")
                await self._count_replicas()
                return
        again = []
        for item, res, has_seq in zip(batch, results, numbered, strict=True):
            fut, pub = item[2], item[3]
            if isinstance(res, NoScriptError) and not retried:
                again.append(item)
            elif isinstance(res, Exception):
                if not self._refusing:  # e.g. OOM or a read-only replica: once, not per message
                    self._refusing = True
                    log.warning("redis refuses publishes: %s", res)
                self._fail([item], f"broker refused the publish: {res}")
            else:
                self._refusing = False
                if not fut.done():
                    pub.seq = res if has_seq else 0  # PUBLISH answers how many nodes listen
                    fut.set_result(pub)
        if again:
            # Someone flushed the script cache (SCRIPT FLUSH, failover): load and run those once more.
            try:
                self._publish_sha = await self._redis.script_load(self._lua(PUBLISH_LUA))
            except _LOST as exc:
                self._fail(again, self._why)
                self._lost(exc)
                return
            await self._publish_batch(again, retried=True)

    @staticmethod
    def _fail(items: Iterable[tuple[Any, Any, asyncio.Future[Publication], Any]], why: str) -> None:
        for item in items:
            fut = item[2]
            if not fut.done():
                fut.set_exception(BrokerUnavailable(why))

    # ------------------------------------------------------------ script calls (joins)

    def _call(
        self, lua: str, keys: tuple[str, ...], args: tuple[bytes | str | int, ...]
    ) -> asyncio.Future[Any]:
        """Queue ``EVALSHA`` of ``lua`` (as ``_lua`` makes it) for the next batch; its future gets the raw reply.

        The future fails with ``BrokerUnavailable`` (Redis away, or lost during the batch: every
        call of that batch, and the broker goes down through ``_lost``) or with the
        ``ResponseError`` of this call alone (the caller logs it and answers with its own
        sentence). Calls go out in the order queued, ``MAX_CALLS`` per pipeline, one pipeline at
        a time (``_drain_forever``): a presence add and the leave after it reach Redis in order.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.available:
            fut.set_exception(BrokerUnavailable(self._why))
            return fut
        argc, tail = script_call(keys, args)
        self._calls.append(_Call(lua, argc, tail, fut))
        self._calls_wake.set()
        return fut

    def _take_calls(self) -> list[_Call]:
        """The next batch of script calls: what queued during a round trip (or one loop turn), ``MAX_CALLS`` at most."""
        batch, self._calls = self._calls[:MAX_CALLS], self._calls[MAX_CALLS:]
        return batch

    async def _call_batch(self, batch: list[_Call], retried: bool = False) -> None:
        """One round trip on one pooled connection: every call's ``EVALSHA``, then every reply, in order.

        Non-transactional (no MULTI): each call succeeds or fails alone. In a Redis Cluster each
        call's keys are one room's (one slot), and this broker talks to the master that owns them
        (``redis_cluster.RedisClusterBroker.shard``), so a batch never needs splitting by node.
        NOSCRIPT (Redis lost its script cache: SCRIPT FLUSH, a restart or failover between two
        reconnects) loads each script concerned once and sends those calls again, once.
        """
        if not self.available or self._redis is None:
            self._fail_calls(batch, self._why)
            return
        heads: dict[tuple[str, int], bytes] = {}
        commands = []
        for call in batch:
            key = (call.lua, call.argc)
            head = heads.get(key)
            if head is None:
                head = heads[key] = evalsha_head(self._script(call.lua).sha, call.argc)
            commands.append(head + call.tail)
        pool = self._redis.connection_pool
        try:
            conn = await pool.get_connection()
        except _LOST as exc:
            self._lost(exc)
            self._fail_calls(batch, self._why)
            return
        results: list[Any] = []
        clean = False
        sent_at = time.perf_counter()
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await conn.send_packed_command(commands, check_health=False)
                for _ in commands:
                    try:
                        results.append(await conn.read_response(timeout=math.inf, disconnect_on_error=False))
                    except ResponseError as exc:
                        results.append(exc)
            clean = True
        except (*_LOST, TimeoutError) as exc:
            self._lost(exc)
            self._fail_calls(batch, self._why)
            return
        finally:
            if not clean:  # replies may be left unread on it: never handed out again
                await conn.disconnect(nowait=True)
            await pool.release(conn)
        self.script_rtt.observe(time.perf_counter() - sent_at)
        self.script_calls += len(batch)
        again = []
        for call, res in zip(batch, results, strict=True):
            fut = call.fut
            if isinstance(res, NoScriptError) and not retried:
                again.append(call)
            elif fut.done():
                continue  # its waiter was cancelled
            elif isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        if again:
            try:
                for lua in dict.fromkeys(call.lua for call in again):
                    await self._redis.script_load(self._script(lua).script)
            except _LOST as exc:
                self._lost(exc)
                self._fail_calls(again, self._why)
                return
            except ResponseError as exc:
                for call in again:
                    if not call.fut.done():
                        call.fut.set_exception(exc)
                return
            await self._call_batch(again, retried=True)

    @staticmethod
    def _fail_calls(calls: Iterable[_Call], why: str) -> None:
        for call in calls:
            if not call.fut.done():
                call.fut.set_exception(BrokerUnavailable(why))

    # ------------------------------------------------------------ history

    async def _read_history(self, room: str, since: int | None, epoch: str | None) -> History:
        """``HISTORY_LUA`` on the room's keys, in the next batch of script calls (``_call``).

        Raises ``BrokerUnavailable``: Redis lost (every waiter of the batch; the broker goes down)
        or Redis refused this read (a ``ResponseError``, e.g. WRONGTYPE on the meta key: logged with
        redis' text, and only this join fails, with our sentence).
        """
        args = (
            "" if since is None else str(since), epoch or "", secrets.token_hex(4), self.meta_ttl,
            self.presence_ttl,
        )  # fmt: skip
        try:
            reply = await self._call(HISTORY_LUA, (meta_key(room), history_key(room)), args)
        except ResponseError as exc:
            # The reason goes to the log; the client's UNAVAILABLE carries our sentence, not redis' text.
            log.warning("redis refused the history read of %r: %s", room, exc)
            raise BrokerUnavailable("broker refused the history read") from None
        seq, current = int(reply[0]), reply[1].decode()
        pubs: list[Publication] = []
        for entry in reply[2:]:
            try:
                pubs.append(self._publication(room, entry, live=False))
            except Exception:  # noqa: BLE001 - any decoder failure
                # Skipped: its seq is missing from the replay, so history_since does not call it recovered.
                log.error("skipped a malformed history entry of %r", room)
        return history_since(pubs, seq, current, since, epoch)

    def _room_args(self, room: str) -> tuple[bytes, bytes, bytes, bytes]:
        """A room's parts of a publish command, as RESP: keys, channel, history size, history and meta TTLs."""
        ns = self.namespaces.of(room)
        keys, channel = room_args(room)
        ttl = resp_arg(str(max(1, math.ceil(ns.history_ttl))).encode())
        return keys, channel, resp_arg(str(ns.kept_history).encode()), ttl + self._meta_arg

    # ------------------------------------------------------------ presence

    def _lua(self, lua: str) -> str:
        """A script as this broker runs it: with SPUBLISH for PUBLISH on a cluster shard.

        The channel ``wsfan:{room}`` hashes to the slot of the room's keys (the same tag), so a
        script that declares them may SPUBLISH to it on the shard that owns them.
        """
        return lua.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'") if self.sharded else lua

    def _script(self, lua: str) -> Any:
        """A redis-py Script: EVALSHA, loading the script again if Redis lost it (also inside pipelines)."""
        script = self._scripts.get(lua)
        if script is None:
            assert self._redis is not None
            script = self._scripts[lua] = self._redis.register_script(self._lua(lua))
        return script

    async def join_presence(self, room: str, entry: PresenceEntry, presence: bool, announce: bool) -> None:
        info = encode_body(PresenceInfo(entry.user, entry.joined_at)) if presence else b""
        if presence:
            self.local_presence.setdefault(room, {})[entry.conn] = info
            self._written_leave(room, entry.conn)  # back in: its removal is no longer due
        args = [entry.conn, info, self.presence_ttl, channel_name(room), self._event(entry, True, announce)]
        await self._presence_write(PRESENCE_ADD_LUA, room, args)

    async def leave_presence(self, room: str, entry: PresenceEntry, presence: bool, announce: bool) -> None:
        if presence:
            members = self.local_presence.get(room)
            if members is not None:
                members.pop(entry.conn, None)
                if not members:
                    del self.local_presence[room]
                    if room not in self._rooms:
                        self._forgot()
        args = [entry.conn, "1" if presence else "", channel_name(room), self._event(entry, False, announce)]
        if not await self._presence_write(PRESENCE_REMOVE_LUA, room, args) and presence:
            self.unwritten_leaves.setdefault(room, set()).add(entry.conn)
            self._presence_wake.set()  # written at the refresh after the reconnect (or now, if back already)

    def _written_leave(self, room: str, conn: str) -> None:
        pending = self.unwritten_leaves.get(room)
        if pending is not None:
            pending.discard(conn)
            if not pending:
                del self.unwritten_leaves[room]

    @staticmethod
    def _event(entry: PresenceEntry, joined: bool, announce: bool) -> bytes:
        if not announce:
            return b""
        body = Body(entry.user, 1 if joined else 0, entry.conn, time.time(), b"")
        return encode_body(Envelope(EVENT_SEQ, body))

    async def _presence_write(self, lua: str, room: str, args: list[Any]) -> bool:
        """Best effort: while Redis is away the entry stays local and is written again on reconnect
        (a leave: ``unwritten_leaves``). Whether Redis has it (False: away, lost or refused)."""
        if not self.available or self._redis is None:
            return False
        try:
            await self._call(lua, presence_keys(room), tuple(args))
        except BrokerUnavailable:
            return False
        except ResponseError as exc:
            log.warning("redis refused a presence update of %r: %s", room, exc)
            return False
        return True

    async def presence(self, room: str) -> list[PresenceEntry]:
        reply = await self._read_presence(room, "list")
        out = []
        for i in range(0, len(reply), 2):
            try:
                info = decode_info(reply[i + 1])
                conn = reply[i].decode()
            except Exception:  # noqa: BLE001 - any decoder failure: one unreadable entry, not a failed query
                log.error("skipped a malformed presence entry of %r", room)
                continue
            out.append(PresenceEntry(conn, info.user, info.joined_at))
        return out

    async def presence_stats(self, room: str) -> tuple[int, int]:
        reply = await self._read_presence(room, "stats")
        return int(reply[0]), int(reply[1])

    async def listeners(self, rooms: list[str]) -> dict[str, int]:
        """Subscribers of each room's channel on this Redis (``PUBSUB NUMSUB``, ``SHARDNUMSUB`` in a
        cluster shard): one per node process subscribed, gone the moment its connection closes."""
        if not rooms:
            return {}
        if not self.available or self._redis is None:
            raise BrokerUnavailable(self._why)
        channels = [channel_name(room) for room in rooms]
        count = self._redis.pubsub_shardnumsub if self.sharded else self._redis.pubsub_numsub
        try:
            reply = await count(*channels)
        except _LOST as exc:
            self._lost(exc)
            raise BrokerUnavailable(self._why) from None
        except ResponseError as exc:
            log.warning("redis refused PUBSUB NUMSUB: %s", exc)
            raise BrokerUnavailable("broker refused the subscriber count") from None
        found = {(ch.decode() if isinstance(ch, bytes) else str(ch)): int(n) for ch, n in reply}
        return {room: found.get(ch, 0) for room, ch in zip(rooms, channels, strict=True)}

    async def _read_presence(self, room: str, mode: str) -> Any:
        if not self.available or self._redis is None:
            raise BrokerUnavailable(self._why)
        announce = "1" if self.namespaces.of(room).join_leave else ""
        try:
            return await self._script(PRESENCE_READ_LUA)(
                keys=presence_keys(room), args=[mode, announce, channel_name(room)]
            )
        except _LOST as exc:
            self._lost(exc)
            raise BrokerUnavailable(self._why) from None
        except ResponseError as exc:
            # As for history: redis' text to the log, our sentence to the client.
            log.warning("redis refused the presence read of %r: %s", room, exc)
            raise BrokerUnavailable("broker refused the presence read") from None

    async def _refresh_presence_forever(self) -> None:
        """Every third of the TTL (or at once after a reconnect), keep this node's presence alive in Redis."""
        rewrite = False
        while not self._closing:
            try:
                await asyncio.wait_for(self._presence_wake.wait(), self.presence_ttl / 3)
                rewrite = True  # woken: Redis came back, and may have lost our entries
            except TimeoutError:
                pass
            self._presence_wake.clear()
            if not self.available or self._redis is None:
                continue
            try:
                await self._hold_unpublished()
                if self.local_presence or self.unwritten_leaves:
                    await self._refresh_presence(rewrite)
                    rewrite = False
            except _LOST as exc:
                self._lost(exc)
            except Exception:  # a bug must not end presence for the life of the process
                log.exception("refreshing presence failed")

    async def _hold_unpublished(self) -> None:
        """Keep alive the meta hash (the epoch its joins acked) of each subscribed room not yet published in.

        Such a hash lives ``presence_ttl`` (``HISTORY_LUA``), so joins of rooms nobody publishes
        in leave nothing in Redis once no node holds them; while one does, its subscribers'
        epoch stands and a rejoin with ``since`` is recovered. One script per room (Redis Cluster:
        one slot per script), all in one pipeline, every third of ``presence_ttl``.
        """
        assert self._redis is not None
        rooms = [r.name for r in self._rooms.values() if not r.last and not reserved(r.name)]
        if not rooms:
            return
        hold = self._script(HOLD_LUA)
        async with self._redis.pipeline(transaction=False) as pipe:
            for room in rooms:
                await hold(keys=[meta_key(room)], args=[self.presence_ttl], client=pipe)
            await pipe.execute(raise_on_error=False)

    async def _refresh_presence(self, rewrite: bool) -> None:
        assert self._redis is not None
        ttl = self.presence_ttl
        leaves = self.unwritten_leaves
        self.unwritten_leaves = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            try:
                for room, conns in leaves.items():
                    for conn in conns:  # no left event: the room's subscribers were told at the leave
                        await self._script(PRESENCE_REMOVE_LUA)(
                            keys=presence_keys(room), args=[conn, "1", "", ""], client=pipe
                        )  # queued in the pipeline
            except BaseException:
                self._keep_leaves(leaves)
                raise
            for room, members in list(self.local_presence.items()):
                keys = presence_keys(room)
                if rewrite:
                    for conn, info in members.items():
                        await self._script(PRESENCE_ADD_LUA)(
                            keys=keys, args=[conn, info, ttl, "", ""], client=pipe
                        )  # queued in the pipeline
                announce = "1" if self.namespaces.of(room).join_leave else ""
                args = [ttl, announce, channel_name(room), *members]
                await self._script(PRESENCE_REFRESH_LUA)(keys=keys, args=args, client=pipe)
            try:
                await pipe.execute(raise_on_error=False)
            except BaseException:
                self._keep_leaves(leaves)  # Redis went away again: still due
                raise

    def _keep_leaves(self, leaves: dict[str, set[str]]) -> None:
        """Leaves a refresh could not write, due again (minus conns that joined back meanwhile)."""
        for room, conns in leaves.items():
            back = self.local_presence.get(room, {})
            self.unwritten_leaves.setdefault(room, set()).update(c for c in conns if c not in back)

    def _publication(self, room: str, data: bytes, live: bool) -> Publication:
        env = decode_envelope(data)
        b = env.body
        # published_at is on this process's perf_counter clock; replays are not live, so 0.
        at = time.perf_counter() - max(0.0, time.time() - b.ts) if live else 0.0
        return Publication(room, env.seq, b.sender, b.payload, b.encoding, b.origin, at)

    # ------------------------------------------------------------ connection, pub/sub

    async def _connect_forever(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._closing:
            conn: AbstractConnection | None = None
            try:
                conn = await self._connect()
                delay = RECONNECT_MIN_S
                self._first_attempt.set()
                if self._closing:  # close() came while connecting (its cancel may have been swallowed)
                    break
                reader = self._reader = asyncio.get_running_loop().create_task(self._read(conn))
                await asyncio.wait([reader])
                exc = None if reader.cancelled() else reader.exception()
                self._down(exc)  # a no-op when _lost() already took the broker down
            except (*_LOST, ResponseError) as exc:
                self._down(exc)
            except Exception as exc:  # a bug must not end reconnecting for the life of the process
                log.exception("broker connection loop failed")
                self._down(exc)
            finally:
                if conn is not None and conn is self._sub_conn:
                    self._sub_conn = None
                await self._drop(conn)
            self._first_attempt.set()
            if self._closing:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect(self) -> AbstractConnection:
        r = self._redis
        assert r is not None
        await r.ping()
        await self._count_replicas()
        self._publish_sha = await r.script_load(self._lua(PUBLISH_LUA))
        await r.script_load(HISTORY_LUA)  # every join runs it: loaded now, not after a NOSCRIPT
        conn = await r.connection_pool.get_connection()
        # From here on nothing awaits until the writer is woken: the full SUBSCRIBE below is
        # built from exactly the rooms wanted now, and later (un)subscribes queue behind it.
        self._sub_conn = conn
        self._inflight = {}
        channels = []
        for room in self._rooms.values():
            room.ready.clear()
            room.stale = bool(room.last or room.epoch)
            channels.append(room.channel)
        self._ops = [(self._sub, channels)] if channels else []
        self._ops_wake.set()
        self._up(len(channels))
        return conn

    async def _count_replicas(self) -> None:
        """Wait for as many replicas as asked for, but no more than the master has connected now."""
        if not self.want_replicas or self._redis is None:
            return
        try:
            have = int((await self._redis.info("replication")).get("connected_slaves", 0))
        except (*_LOST, ResponseError):
            return
        wait = min(self.want_replicas, have)
        if wait != self.wait_replicas:
            log.warning("redis at %s has %d replica(s): publishes wait for %d", redact(self.url), have, wait)
            self.wait_replicas = wait

    async def _read(self, conn: AbstractConnection) -> None:
        channels = self._channels
        deliver = self._deliver
        on_event = self._on_event
        assert deliver is not None and on_event is not None, "bind the hub before starting the broker"
        decode = decode_envelope
        message, confirms = self._message, self._confirms
        perf, wall = time.perf_counter, time.time
        while not self._closing:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False, push_request=True)
            kind = reply[0]
            if kind == message:
                room = channels.get(reply[1])
                if room is None:
                    continue  # unsubscribed locally, the UNSUBSCRIBE not confirmed yet
                try:
                    env = decode(reply[2])
                except Exception:  # noqa: BLE001 - any decoder failure (RecursionError too)
                    log.error("dropped a malformed envelope on %r", reply[1])
                    continue
                seq = env.seq
                if seq <= EVENT_SEQ:  # not numbered, outside history and catch-up:
                    b = env.body
                    if seq == EVENT_SEQ:  # a joined/left event
                        on_event(PresenceEvent(room.name, b.encoding == 1, b.sender, b.origin))
                    elif seq == UNNUMBERED_SEQ:  # a reserved room's publication (a command)
                        at = perf() - max(0.0, wall() - b.ts)
                        deliver(Publication(room.name, 0, b.sender, b.payload, b.encoding, b.origin, at))
                    continue
                if room.floor:
                    if seq <= room.floor:
                        continue  # delivered by the catch-up that followed a reconnect
                    room.floor = 0
                room.last = seq
                b = env.body
                deliver(
                    Publication(
                        room.name, seq, b.sender, b.payload, b.encoding, b.origin,
                        perf() - max(0.0, wall() - b.ts),
                    )
                )  # fmt: skip
            elif kind in confirms:
                await self._confirmed(reply[1])

    async def _confirmed(self, channel: bytes) -> None:
        left = self._inflight.get(channel, 0) - 1
        if left > 0:
            self._inflight[channel] = left
            return
        inflight = self._inflight
        inflight.pop(channel, None)
        if not inflight:
            inflight.clear()  # in place (_send_ops holds it): frees the table a burst of joins grew
        room = self._channels.get(channel)
        if room is None or room.ready.is_set():
            return
        if room.stale:
            room.stale = False
            await self._catch_up(room)
        room.ready.set()

    async def _catch_up(self, room: _Room) -> None:
        """Deliver what the room's local subscribers missed while this node had no pub/sub connection.

        Runs inside the reader, so live messages wait in the socket meanwhile and order holds.
        """
        try:
            hist = await self._read_history(room.name, room.last, room.epoch)
        except BrokerUnavailable:
            return
        deliver = self._deliver
        assert deliver is not None
        missed = [p for p in hist.publications if p.seq > room.last or hist.epoch != room.epoch]
        for pub in missed:
            deliver(pub)
        if missed:
            log.debug("caught up %d publications of %s after reconnecting", len(missed), room.name)
        room.epoch, room.last, room.floor = hist.epoch, hist.seq, hist.seq

    def _queue(self, command: str, channel: bytes) -> None:
        if self._sub_conn is None:
            return  # the next connection subscribes every wanted room anyway
        ops = self._ops
        if ops and ops[-1][0] == command:
            ops[-1][1].append(channel)
        else:
            ops.append((command, [channel]))
        self._ops_wake.set()

    async def _write_ops_forever(self) -> None:
        """The only writer on the pub/sub connection, so (UN)SUBSCRIBEs reach Redis in call order."""
        while not self._closing:
            await self._ops_wake.wait()
            self._ops_wake.clear()
            conn = self._sub_conn
            ops, self._ops = self._ops, []
            if conn is None or self._closing:
                continue
            try:
                await self._send_ops(conn, ops)
            except _LOST as exc:
                self._lost(exc, conn)
            except AttributeError:
                # redis-py drops a connection's writer (None) when close() or a reconnect
                # disconnects it under an in-flight send; only that case is ours to ignore.
                if not (self._closing or conn is not self._sub_conn):
                    raise

    async def _send_ops(self, conn: AbstractConnection, ops: list[tuple[str, list[bytes]]]) -> None:
        inflight = self._inflight
        # SSUBSCRIBE takes channels of one slot only (CROSSSLOT otherwise): one channel per command.
        chunk_size = 1 if self.sharded else CHUNK
        for command, channels in ops:
            for i in range(0, len(channels), chunk_size):
                if conn is not self._sub_conn or self._closing:
                    return  # replaced or closing meanwhile; a new connection subscribes every wanted room
                chunk = channels[i : i + chunk_size]
                for ch in chunk:
                    inflight[ch] = inflight.get(ch, 0) + 1
                await conn.send_command(command, *chunk, check_health=False)

    # ------------------------------------------------------------ state

    def _lost(self, exc: BaseException, conn: AbstractConnection | None = None) -> None:
        """A command failed on a dead connection: go down now and let the reconnect loop take over."""
        if conn is not None and conn is not self._sub_conn:
            return
        self._down(exc)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    def _down(self, exc: BaseException | None) -> None:
        if exc is not None and self.on_fd_exhausted is not None and is_exhausted(exc):
            self.on_fd_exhausted(str(exc))  # logged (throttled) and counted there, every time
        if exc is not None:
            # Clients get this sentence in UNAVAILABLE; redis' own text (addresses, errno) only goes to the log below.
            self._why = "broker unavailable: connection to redis lost"
        self.available = False
        self._sub_conn = None
        for room in self._rooms.values():
            room.ready.set()  # wake joins waiting for a subscription; they see available False
        if self._state != "down" and not self._closing:
            if self._state == "starting":
                log.warning(
                    "redis at %s unavailable (%s); serving without it, retrying", redact(self.url), exc
                )
            else:
                log.warning(
                    "lost redis at %s (%s); publishes get UNAVAILABLE until it returns", redact(self.url), exc
                )
            self._state = "down"

    def _up(self, rooms: int) -> None:
        if self._closing:
            return
        self.available = True
        if self._state == "down":
            self._presence_wake.set()  # write this node's presence again: Redis may have lost it
            self.reconnects += 1
            log.warning("redis at %s is back; resubscribed %d rooms", redact(self.url), rooms)
        elif self._state == "starting":
            log.info("connected to redis at %s", redact(self.url))
        self._state = "up"

    async def _drop(self, conn: AbstractConnection | None) -> None:
        if conn is None or self._redis is None:
            return
        try:
            await conn.disconnect(nowait=True)
            await self._redis.connection_pool.release(conn)
        except Exception:  # noqa: BLE001 - a dying socket may fail to close; it is gone either way
            pass
