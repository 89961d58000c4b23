"""Broker over a Redis Cluster: each room on the master that owns its slot, sharded pub/sub.

``--broker redis+cluster://host:port,host:port/`` names seed nodes. At start the broker asks
one of them for the slot map (``CLUSTER SLOTS``) and runs one :class:`RedisBroker` per master,
in sharded mode: a room's keys and channel carry the hash tag ``{room}``
(server/broker/redis_layout.py), so its seq, history, epoch and presence live in one slot and
the publish script stays one atomic step on that master; envelopes go out with ``SPUBLISH``
and a node ``SSUBSCRIBE``s on the owning master only, for rooms it has local subscribers for
(Redis >= 7). A publication therefore travels to one shard and the nodes listening there,
never over the cluster bus to every node.

Not handled here (yet): a slot map that changes while running (resharding, a replica promoted
after a master dies). A master that goes away makes its rooms ``UNAVAILABLE`` (its
:class:`RedisBroker` is down and reconnects to the same address); the other shards' rooms are
unaffected.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.crc import key_slot

from wsfan.server.broker import BrokerUnavailable, DeliverFn, EventFn
from wsfan.server.broker.history import History
from wsfan.server.broker.publication import PresenceEntry, Publication
from wsfan.server.broker.redis import RedisBroker
from wsfan.server.broker.redis_layout import channel_name
from wsfan.server.namespaces import Namespaces
from wsfan.server.stats import BROKER_PUBLISH_BUCKETS, Histogram

log = logging.getLogger("wsfan.broker")

SCHEME = "redis+cluster://"
SLOT_MAP_TIMEOUT_S = 5.0


def seeds(url: str) -> list[tuple[str, int]]:
    """``redis+cluster://h1:p1,h2:p2[/]`` -> ``[(h1, p1), (h2, p2)]``; ``ValueError`` saying what is wrong."""
    if not url.startswith(SCHEME):
        raise ValueError(f"a cluster broker URL starts with {SCHEME}")
    rest = url[len(SCHEME) :].split("/", 1)[0]
    out = []
    for part in rest.split(","):
        parsed = urlsplit(f"//{part}")
        try:
            port = parsed.port or 6379
        except ValueError:
            port = 0
        if not parsed.hostname or not 0 < port < 65536:
            raise ValueError(f"{SCHEME}: {part!r} is not host:port")
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
        self._options = {"history_size": history_size, "node_id": node_id, "namespaces": namespaces, "presence_ttl": presence_ttl,
                         "meta_ttl": meta_ttl}  # fmt: skip
        self.shards: list[RedisBroker] = []
        self._starts: list[int] = []  # first slot of each range, sorted
        self._owners: list[RedisBroker] = []  # the shard serving the range that starts there
        self._deliver: DeliverFn | None = None
        self._on_event: EventFn | None = None
        self.on_fd_exhausted = None
        self.publish_rtt = Histogram(BROKER_PUBLISH_BUCKETS)  # every shard's publishes, one histogram

    # ------------------------------------------------------------ lifecycle

    def bind(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    def bind_events(self, on_event: EventFn) -> None:
        self._on_event = on_event

    async def start(self) -> None:
        """Read the slot map from the first seed that answers, then start one broker per master."""
        ranges = await self._slot_map()
        by_address: dict[tuple[str, int], RedisBroker] = {}
        for start, _end, host, port in sorted(ranges):
            shard = by_address.get((host, port))
            if shard is None:
                shard = by_address[(host, port)] = RedisBroker(
                    f"redis://{host}:{port}", sharded=True, **self._options
                )
                assert self._deliver is not None and self._on_event is not None, "bind the hub first"
                shard.bind(self._deliver)
                shard.bind_events(self._on_event)
                shard.on_fd_exhausted = self.on_fd_exhausted
                shard.publish_rtt = self.publish_rtt
            self._starts.append(start)
            self._owners.append(shard)
        self.shards = list(by_address.values())
        await asyncio.gather(*(s.start() for s in self.shards))
        log.info("redis cluster: %d masters, %d slot ranges", len(self.shards), len(self._starts))

    async def _slot_map(self) -> list[tuple[int, int, str, int]]:
        why = "no seed answered"
        for host, port in self.seeds:
            client = Redis(
                host=host, port=port, socket_connect_timeout=2.0, socket_timeout=SLOT_MAP_TIMEOUT_S
            )
            try:
                reply = await client.execute_command("CLUSTER SLOTS")
            except Exception as exc:  # noqa: BLE001 - next seed; the reason is logged
                why = f"{host}:{port}: {type(exc).__name__}"
                continue
            finally:
                await client.aclose()
            return [(int(r[0]), int(r[1]), _text(r[2][0]) or host, int(r[2][1])) for r in reply]
        raise BrokerUnavailable(f"redis cluster slot map unavailable ({why})")

    async def close(self) -> list[str]:
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

    def presence_stats(self, room: str) -> Awaitable[tuple[int, int]]:
        return self.shard(room).presence_stats(room)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
