"""Broker over a Sentinel-managed Redis (one shard, high availability).

``--broker redis+sentinel://host:port,host:port/<master name>`` names the sentinels and the
monitored master. At start the broker asks the sentinels where the master is
(``SENTINEL GET-MASTER-ADDR-BY-NAME``) and runs a plain :class:`RedisBroker` against it. While
Redis is unreachable it asks the sentinels again every ``REDISCOVER_S``; once they name a new
master (a failover promoted a replica) the broker is pointed there
(:meth:`RedisBroker.retarget`), resubscribes and catches its subscribers up from the promoted
replica's history. With replicas, publishes are acked after ``WAIT 1`` so that the promoted
replica holds every acked publication.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from wsfan.server.broker import BrokerUnavailable
from wsfan.server.broker.redis import RedisBroker
from wsfan.server.broker.redis_cluster import host_ports

log = logging.getLogger("wsfan.broker")

SCHEME = "redis+sentinel://"
REDISCOVER_S = 0.5


def parse(url: str) -> tuple[list[tuple[str, int]], str]:
    """``redis+sentinel://h1:p1,h2:p2/name`` -> ``([(h1, p1), (h2, p2)], name)``; ``ValueError`` on a bad URL."""
    if not url.startswith(SCHEME):
        raise ValueError(f"a sentinel broker URL starts with {SCHEME}")
    hosts, _, name = url[len(SCHEME) :].partition("/")
    name = name.strip("/")
    if not name:
        raise ValueError(f"{SCHEME}host:port,.../<master name>: the master name is missing")
    return host_ports(hosts, SCHEME, 26379), name


class RedisSentinelBroker(RedisBroker):
    """A :class:`RedisBroker` that follows the master the sentinels name."""

    def __init__(self, url: str, **options: object) -> None:
        self.sentinels, self.master_name = parse(url)
        self.sentinel_url = url
        self._follow: asyncio.Task[None] | None = None
        super().__init__("redis://unknown", **options)  # type: ignore[arg-type]

    async def start(self) -> None:
        host, port, replicas = await self._master()
        self.url = f"redis://{host}:{port}"
        self.want_replicas = self.wait_replicas = min(replicas, 1)
        await super().start()
        self._follow = asyncio.get_running_loop().create_task(self._follow_master(), name="redis-sentinel")
        self._tasks.append(self._follow)

    async def _master(self) -> tuple[str, int, int]:
        """(host, port, replica count) of the master, from the first sentinel that knows it."""
        why = "no sentinel answered"
        for host, port in self.sentinels:
            client = Redis(host=host, port=port, socket_connect_timeout=1.0, socket_timeout=2.0)
            try:
                addr = await client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.master_name)
                replicas = await client.execute_command("SENTINEL REPLICAS", self.master_name) if addr else []
            except Exception as exc:  # noqa: BLE001 - next sentinel
                why = f"{host}:{port}: {type(exc).__name__}"
                continue
            finally:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001, S110 - closing a dead connection
                    pass
            if addr:
                return _text(addr[0]), int(addr[1]), sum(1 for r in replicas if _healthy(r))
            why = f"{host}:{port} does not know {self.master_name!r}"
        raise BrokerUnavailable(f"redis sentinel: no master ({why})")

    async def _follow_master(self) -> None:
        while not self._closing:
            await asyncio.sleep(REDISCOVER_S)
            if self.available:
                continue
            try:
                host, port, _ = await self._master()
            except BrokerUnavailable:
                continue
            except Exception:  # a bug must not end failover handling for the life of the process
                log.exception("asking the sentinels for the master failed")
                continue
            url = f"redis://{host}:{port}"
            if url != self.url:
                log.warning("redis sentinel: master %r is now %s:%d (failover)", self.master_name, host, port)
                self.retarget(url)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _healthy(replica: object) -> bool:
    """A ``SENTINEL REPLICAS`` entry (a dict, or a flat name/value list) the sentinel sees as up."""
    if isinstance(replica, dict):
        fields = replica
    else:
        items = [_text(x) if isinstance(x, bytes) else x for x in replica]  # type: ignore[attr-defined]
        fields = dict(zip(items[::2], items[1::2], strict=False))
    flags = fields.get("flags", "")
    flags = flags if isinstance(flags, str) else ",".join(flags)
    return not any(bad in flags for bad in ("s_down", "o_down", "disconnected"))
