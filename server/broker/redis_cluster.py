"""Broker over a Redis Cluster: each room on the master that owns its slot, sharded pub/sub.

``--broker redis+cluster://host:port,host:port/`` names seed nodes. At start the broker asks
one of them for the slot map (``CLUSTER SLOTS``) and runs one :class:`RedisBroker` per master,
in sharded mode: a room's keys and channel carry the hash tag ``{room}``
(server/broker/redis_layout.py), so its seq, history, epoch and presence live in one slot and
the publish script stays one atomic step on that master; envelopes go out with ``SPUBLISH``
and a node ``SSUBSCRIBE``s on the owning master only, for rooms it has local subscribers for
(Redis >= 7). A publication therefore travels to one shard and the nodes listening there,
never over the cluster bus to every node.

Failover: a master that goes away makes only its rooms ``UNAVAILABLE`` (its :class:`RedisBroker`
is down); while any shard is down the slot map is read again every ``REMAP_S`` from any node
that answers, and once a replica has been promoted for the shard's slots the shard's broker is
pointed at it (:meth:`RedisBroker.retarget`): it resubscribes there and catches its
subscribers up from the replica's copy of the history. Not handled: resharding (slots moving
between masters that both stay up) while running; restart the nodes after a resharding.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.crc import key_slot

from wsfan.server.broker import BrokerUnavailable, DeliverFn, EventFn
from wsfan.server.broker.history import History
from wsfan.server.broker.publication import PresenceEntry, Publication
from wsfan.server.broker.redis import RedisBroker
from wsfan.server.broker.redis_layout import channel_name
from wsfan.server.namespaces import Namespace, Namespaces
from wsfan.server.stats import BROKER_PUBLISH_BUCKETS, Histogram

log = logging.getLogger("wsfan.broker")

SCHEME = "redis+cluster://"
SLOT_MAP_TIMEOUT_S = 5.0
REMAP_S = 0.5  # slot map re-read period while a shard is down


def seeds(url: str) -> list[tuple[str, int]]:
    """``redis+cluster://h1:p1,h2:p2[/]`` -> ``[(h1, p1), (h2, p2)]``; ``ValueError`` saying what is wrong."""
    if not url.startswith(SCHEME):
        raise ValueError(f"a cluster broker URL starts with {SCHEME}")
    return host_ports(url[len(SCHEME) :].split("/", 1)[0], SCHEME, 6379)


def host_ports(hosts: str, scheme: str, default_port: int) -> list[tuple[str, int]]:
    """``h1:p1,h2`` -> ``[(h1, p1), (h2, default_port)]``; ``ValueError`` naming the bad entry and ``scheme``."""
    out = []
    for part in hosts.split(","):
        parsed = urlsplit(f"//{part}")
        try:
            port = parsed.port or default_port
        except ValueError:
            port = 0
        if not parsed.hostname or not 0 < port < 65536:
            raise ValueError(f"{scheme}: {part!r} is not host:port")
        out.append((parsed.hostname, port))
    return out


class RedisClusterBroker:
    """The ``Broker`` of a wsfan cluster over a Redis Cluster: one sharded ``RedisBroker`` per master."""

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 300,
        node_id: str = "",
        namespaces: Namespaces | None = None,
        presence_ttl: float = 60.0,
        meta_ttl: float = 86_400.0,
    ) -> None:
        self.url = url
        self.seeds = seeds(url)
        self.node_id = node_id
        # The hub reads its namespaces from its broker (Hub.__init__): without this attribute a
        # cluster node served every room with the defaults, whatever --presence, --join-leave,
        # --namespaces (allow_publish=false included) said; the shards had them, the hub did not.
        self.namespaces = namespaces or Namespaces(Namespace(history_size=history_size))
        self._options = {"history_size": history_size, "node_id": node_id, "namespaces": namespaces, "presence_ttl": presence_ttl,
                         "meta_ttl": meta_ttl}  # fmt: skip
        self.shards: list[RedisBroker] = []
        self._first_slot: dict[RedisBroker, int] = {}  # a slot each shard serves: finds its new master
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self._starts: list[int] = []  # first slot of each range, sorted
        self._owners: list[RedisBroker] = []  # the shard serving the range that starts there
        self._deliver: DeliverFn | None = None
        self._on_event: EventFn | None = None
        self.on_fd_exhausted = None
        self.publish_rtt = Histogram(BROKER_PUBLISH_BUCKETS)  # every shard's publishes, one histogram
        self.script_rtt = Histogram(BROKER_PUBLISH_BUCKETS)  # every shard's batches of joins' script calls
        # Run by whichever shard compacts (heap.Compaction, per shard): the hub's tables.
        self.compact_hooks: list[Callable[[], None]] = []
        # ... and after them the hub's movers (heap.relocate; the shards move the shared publish_rtt).
        self.compact_movers: list[Callable[[list[object]], None]] = []

    # ------------------------------------------------------------ lifecycle

    def bind(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    def bind_events(self, on_event: EventFn) -> None:
        self._on_event = on_event

    async def start(self) -> None:
        """Read the slot map from the first seed that answers, then start one broker per master."""
        ranges = await self._slot_map()
        by_address: dict[tuple[str, int], RedisBroker] = {}
        for start, _end, host, port, replicas in sorted(ranges):
            shard = by_address.get((host, port))
            if shard is None:
                # A master with a replica acks a publish once the replica has it (WAIT 1): a failover
                # then loses no acked publication.
                shard = by_address[(host, port)] = RedisBroker(
                    f"redis://{host}:{port}", sharded=True, wait_replicas=min(replicas, 1), **self._options
                )
                assert self._deliver is not None and self._on_event is not None, "bind the hub first"
                shard.bind(self._deliver)
                shard.bind_events(self._on_event)
                shard.on_fd_exhausted = self.on_fd_exhausted
                shard.publish_rtt = self.publish_rtt
                shard.script_rtt = self.script_rtt
                shard.compaction.hooks.append(self._compact)
                shard.compaction.movers.append(self._relocate)
            self._first_slot.setdefault(shard, start)
            self._starts.append(start)
            self._owners.append(shard)
        self.shards = list(by_address.values())
        await asyncio.gather(*(s.start() for s in self.shards))
        self._watch = asyncio.get_running_loop().create_task(
            self._follow_failovers(), name="redis-cluster-map"
        )
        log.info("redis cluster: %d masters, %d slot ranges", len(self.shards), len(self._starts))

    def _compact(self) -> None:
        for hook in self.compact_hooks:
            hook()

    def _relocate(self, replaced: list[object]) -> None:
        for move in self.compact_movers:
            move(replaced)

    async def _follow_failovers(self) -> None:
        """While a shard is down, re-read the slot map and point the shard at its slots' new master."""
        while not self._closing:
            await asyncio.sleep(REMAP_S)
            down = [s for s in self.shards if not s.available]
            if not down:
                continue
            try:
                ranges = await self._slot_map()
            except BrokerUnavailable:
                continue
            except Exception:  # a bug must not end failover handling for the life of the process
                log.exception("reading the redis cluster slot map failed")
                continue
            for shard in down:
                slot = self._first_slot[shard]
                for start, end, host, port, _ in ranges:
                    url = f"redis://{host}:{port}"
                    if start <= slot <= end and url != shard.url:
                        log.warning(
                            "redis cluster: slots from %d moved to %s:%d (failover)", slot, host, port
                        )
                        shard.retarget(url)

    def _addresses(self) -> list[tuple[str, int]]:
        """Where to ask for the slot map: the seeds, then every master known so far."""
        known = [(urlsplit(s.url).hostname or "", urlsplit(s.url).port or 6379) for s in self.shards]
        return list(dict.fromkeys([*self.seeds, *known]))

    async def _slot_map(self) -> list[tuple[int, int, str, int, int]]:
        """``CLUSTER SLOTS`` as (first slot, last slot, master host, master port, replica count)."""
        why = "no seed answered"
        for host, port in self._addresses():
            client = Redis(
                host=host, port=port, socket_connect_timeout=1.0, socket_timeout=SLOT_MAP_TIMEOUT_S
            )
            try:
                reply = await client.execute_command("CLUSTER SLOTS")
            except Exception as exc:  # noqa: BLE001 - next seed; the reason is logged
                why = f"{host}:{port}: {type(exc).__name__}"
                continue
            finally:
                await client.aclose()
            return [(int(r[0]), int(r[1]), _text(r[2][0]) or host, int(r[2][1]), len(r) - 3) for r in reply]
        raise BrokerUnavailable(f"redis cluster slot map unavailable ({why})")

    async def close(self) -> list[str]:
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        results = await asyncio.gather(*(s.close() for s in self.shards))
        return [name for r in results for name in r]

    # ------------------------------------------------------------ routing

    def shard(self, room: str) -> RedisBroker:
        """The broker of the master that owns the room's slot (CRC16 of the tag, mod 16384)."""
        slot = key_slot(channel_name(room).encode())
        return self._owners[bisect.bisect_right(self._starts, slot) - 1]

    @property
    def available(self) -> bool:
        return bool(self.shards) and all(s.available for s in self.shards)

    @property
    def reconnects(self) -> int:
        return sum(s.reconnects for s in self.shards)

    @property
    def script_calls(self) -> int:
        """Script calls (joins' history reads, presence writes) every shard sent, in ``script_rtt.count`` batches."""
        return sum(s.script_calls for s in self.shards)

    # ------------------------------------------------------------ Broker

    def publish(
        self, room: str, sender: str, payload: bytes, encoding: int, origin: str
    ) -> asyncio.Future[Publication]:
        return self.shard(room).publish(room, sender, payload, encoding, origin)

    def history(self, room: str, since: int | None, epoch: str | None = None) -> Awaitable[History]:
        return self.shard(room).history(room, since, epoch)

    def subscribe(self, room: str) -> None:
        self.shard(room).subscribe(room)

    def unsubscribe(self, room: str) -> None:
        self.shard(room).unsubscribe(room)

    def join_presence(
        self, room: str, entry: PresenceEntry, presence: bool, announce: bool
    ) -> Awaitable[None]:
        return self.shard(room).join_presence(room, entry, presence, announce)

    def leave_presence(
        self, room: str, entry: PresenceEntry, presence: bool, announce: bool
    ) -> Awaitable[None]:
        return self.shard(room).leave_presence(room, entry, presence, announce)

    def presence(self, room: str) -> Awaitable[list[PresenceEntry]]:
        return self.shard(room).presence(room)

    async def listeners(self, rooms: list[str]) -> dict[str, int]:
        """Each room asked of the master that owns it (a node SSUBSCRIBEs there only)."""
        by_shard: dict[RedisBroker, list[str]] = {}
        for room in rooms:
            by_shard.setdefault(self.shard(room), []).append(room)
        out: dict[str, int] = {}
        for part in await asyncio.gather(*(s.listeners(rs) for s, rs in by_shard.items())):
            out.update(part)
        return out

    def presence_stats(self, room: str) -> Awaitable[tuple[int, int]]:
        return self.shard(room).presence_stats(room)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
