"""Prometheus exposition of the hub's plain-int counters, read at scrape time.

The hot path never calls into prometheus_client: it bumps ints on ``Stats`` and
``Histogram``. Collectors turn those into metric families only when ``/metrics``
is scraped.

With several workers (``--workers N``) each worker's families are sent to the
supervisor, which serves one aggregated endpoint on ``--metrics-port``
(``merge``): counters and histograms are summed over the workers (a worker that
exited keeps contributing its last counts, so sums never go down), gauges and
``process_*`` series keep one series per worker with a ``worker`` label.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import math
import platform
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from wsfan.server.broker import Publication
from wsfan.server.control import reserved
from wsfan.server.stats import PUBLISH_TO_FLUSH_BUCKETS, Histogram

if TYPE_CHECKING:
    from wsfan.server.app import Node
    from wsfan.server.broker import Broker
    from wsfan.server.fds import FdBudget
    from wsfan.server.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Server-initiated closes counted in Stats: (attribute, close code, reason label).
CLOSES = (
    ("heartbeat_closes", 4000, "heartbeat_timeout"),
    ("token_expired_closes", 4001, "token_expired"),
    ("slow_consumer_closes", 4008, "slow_consumer"),
    ("rate_limit_closes", 4029, "rate_limit_abuse"),
)


class LatencyHistogram:
    """Publish-to-flush latency: one observation per publication per flush, not per subscriber."""

    __slots__ = ("hist", "clock")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.hist = Histogram(PUBLISH_TO_FLUSH_BUCKETS)
        self.clock = clock

    def observe_flushed(self, pubs: list[Publication]) -> None:
        now = self.clock()
        hist = self.hist  # Histogram.observe inlined: this runs once per publication per flush
        counts, bounds = hist.counts, hist.bounds
        for pub in pubs:
            if pub.published_at:
                dt = now - pub.published_at
                counts[bisect.bisect_left(bounds, dt)] += 1
                hist.total += dt
                hist.count += 1


def histogram_family(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    """A cumulative Prometheus histogram of ``hist``'s per-bucket counts."""
    cumulative, buckets = 0, []
    for bound, n in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.total)


class HubCollector:
    """The node's own series: connections, traffic, errors, closes, latency and broker health."""

    def __init__(
        self, hub: Hub, connections: Callable[[], int], latency: LatencyHistogram, broker: Broker
    ) -> None:
        self.hub = hub
        self.connections = connections
        self.latency = latency
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        st = self.hub.stats
        yield GaugeMetricFamily("wsfan_connections", "Open WebSocket connections", value=self.connections())
        yield GaugeMetricFamily(
            "wsfan_sessions", "Open sessions (WebSocket and SSE)", value=len(self.hub.sessions)
        )
        yield GaugeMetricFamily(
            "wsfan_rooms",
            "Rooms with local subscribers",
            value=len(self.hub.rooms) - reserved(self.hub),
        )
        counters = [
            ("wsfan_connections_opened", "Connections accepted", st.connections_opened),
            ("wsfan_connections_closed", "Connections closed", st.connections_closed),
            ("wsfan_messages_received", "Messages received from clients", st.messages_in),
            ("wsfan_received_bytes", "Message bytes received from clients", st.bytes_in),
            ("wsfan_publishes", "Publications accepted on this node", st.publishes),
            ("wsfan_deliveries", "Deliveries queued to subscribers", st.deliveries),
            (
                "wsfan_compressed_deliveries",
                "Deliveries to permessage-deflate subscribers (one shared compressed frame per publication)",
                st.compressed_deliveries,
            ),
            ("wsfan_delivered_bytes", "Delivery bytes queued to subscribers", st.bytes_out),
            ("wsfan_presence_events", "joined/left events queued to subscribers", st.presence_events),
            ("wsfan_broadcasts", "Room-less broadcast pushes queued to connections", st.broadcasts),
            ("wsfan_replies", "Acks sent", st.replies),
            ("wsfan_rate_limited_messages", "Messages refused by the rate limit", st.rate_limited),
            ("wsfan_rooms_created", "Rooms that got their first local subscriber", st.rooms_created),
            (
                "wsfan_http_stalled",
                "HTTP connections reset because a response waited the stall limit on a client that read nothing",
                st.http_stalled,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        closes = CounterMetricFamily(
            "wsfan_closes", "Connections the server closed, by close code", labels=["code", "reason"]
        )
        for attr, code, reason in CLOSES:
            closes.add_metric([str(code), reason], getattr(st, attr))
        yield closes
        errors = CounterMetricFamily("wsfan_errors", "Error replies by code", labels=["code"])
        for code, n in sorted(st.errors.items()):
            errors.add_metric([str(code)], n)
        yield errors
        drops = CounterMetricFamily(
            "wsfan_rejected_connections", "Upgrades refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(st.rejected.items()):
            drops.add_metric([reason], n)
        yield drops
        yield histogram_family(
            "wsfan_publish_to_flush_seconds",
            "Time from a publication reaching this node's hub to its frames being written to subscribers",
            self.latency.hist,
        )
        yield from broker_families(self.broker)


def broker_families(broker: Broker) -> Iterator[Metric]:
    """Health of a networked broker (Redis); the in-process broker has none to report."""
    rtt: Histogram | None = getattr(broker, "publish_rtt", None)
    if rtt is None:
        return
    yield GaugeMetricFamily(
        "wsfan_broker_connected", "1 while the broker (Redis) connection is up", value=int(broker.available)
    )
    yield CounterMetricFamily(
        "wsfan_broker_reconnects", "Times the broker connection came back after being lost", broker.reconnects
    )
    yield histogram_family(
        "wsfan_broker_publish_seconds", "Round trip of one pipelined batch of publishes to the broker", rtt
    )
    scripts: Histogram | None = getattr(broker, "script_rtt", None)
    if scripts is not None:
        yield histogram_family(
            "wsfan_broker_script_seconds",
            "Round trip of one pipelined batch of script calls (joins' history reads, presence writes)",
            scripts,
        )
        yield CounterMetricFamily(
            "wsfan_broker_script_calls",
            "Script calls sent in those batches (calls per batch: this / wsfan_broker_script_seconds_count)",
            broker.script_calls,  # type: ignore[attr-defined]
        )


def build_labels() -> dict[str, str]:
    """Versions of wsfan and of what it runs on, for ``wsfan_build_info``."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("wsfan"),
        "python": platform.python_version(),
        "picows": version("picows"),
        "uvloop": version("uvloop"),
    }


class BuildCollector:
    def __init__(self) -> None:
        self.labels = build_labels()

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily(
            "wsfan_build", "Versions this process runs (value always 1)", value=self.labels
        )


class FdCollector:
    """``wsfan_fd_exhausted_total{where}``: EMFILE/ENFILE seen (broker connects) or the process found at its limit.

    ``process_open_fds`` and ``process_max_fds`` (ProcessCollector) give the level; refusals for the
    reserve are ``wsfan_rejected_connections_total{reason="fd_reserve"}``.
    """

    def __init__(self, fds: FdBudget) -> None:
        self.fds = fds

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "wsfan_fd_exhausted", "Times the process ran out of file descriptors, by where", labels=["where"]
        )
        for where, n in sorted(self.fds.exhausted.items()):
            family.add_metric([where], n)
        yield family


class Metrics:
    """One registry per node (not the global one), so several nodes in one test process never mix."""

    def __init__(
        self, hub: Hub, connections: Callable[[], int], broker: Broker, fds: FdBudget | None = None
    ) -> None:
        self.latency = LatencyHistogram()
        hub.flush_observers.append(self.latency.observe_flushed)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(hub, connections, self.latency, broker))
        if fds is not None:
            self.registry.register(FdCollector(fds))
        self.registry.register(BuildCollector())
        ProcessCollector(registry=self.registry)  # process_*: CPU, RSS, open fds (Linux /proc)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> bytes:
        """This node's families, msgpack-encoded for the supervisor's ``merge``."""
        return encode_families(self.registry.collect())


async def start_internal(node: Node, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """A lone node's ``--metrics-port`` listener (aiohttp): ``/metrics`` and ``/healthz``; returns its stop."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=node.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=503, text="draining\n") if node.draining else web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    from wsfan.server.http import QuietRunner  # a request aiohttp cannot parse: 400, our words, DEBUG

    runner = QuietRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner.cleanup


# ---------------------------------------------------------------- several workers


class Family(msgspec.Struct, array_like=True):
    """One metric family as sent from a worker to the supervisor; ``name`` without ``_total``."""

    name: str
    type: str
    documentation: str
    samples: list[tuple[str, dict[str, str], float]]


_family_decoder = msgspec.msgpack.Decoder(list[Family])


def encode_families(metrics: Iterable[Metric]) -> bytes:
    return msgspec.msgpack.encode(
        [
            Family(m.name, m.type, m.documentation, [(s.name, s.labels, s.value) for s in m.samples])
            for m in metrics
        ]
    )


def decode_families(data: bytes) -> list[Family]:
    return _family_decoder.decode(data)


def summed(family: Family) -> bool:
    """Counters and histograms add up over workers; gauges and ``process_*`` stay per worker."""
    return family.type in ("counter", "histogram") and not family.name.startswith("process_")


class Retired:
    """What exited workers had counted, so that an aggregate counter never goes down."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def add(self, families: list[Family]) -> None:
        for fam in families:
            if not summed(fam):
                continue
            kept = self.families.get(fam.name)
            if kept is None:
                self.families[fam.name] = Family(fam.name, fam.type, fam.documentation, list(fam.samples))
            else:
                kept.samples.extend(fam.samples)


def merge(workers: dict[str, list[Family]], retired: Retired, own: Iterable[Metric] = ()) -> list[Metric]:
    """One exposition out of every worker's families, keyed by worker name (the ``worker`` label).

    Sums keep the order of first appearance of each sample, so that histogram buckets
    stay in ascending ``le`` order. Each sum is ``math.fsum`` of the workers' values: correctly
    rounded, so it does not depend on the order of the addends. A plain ``+`` chain did: when a
    worker exited and its last counts moved to ``retired`` (summed last), a ``_sum`` series could
    come out one ulp lower than at the previous scrape (3.3e-05 after 3.300000000000001e-05, found
    by Hypothesis), and Prometheus reads any decrease of a counter as a reset (``rate()`` jumps).
    """
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}

    def family(f: Family) -> Metric:
        m = merged.get(f.name)
        if m is None:
            m = merged[f.name] = Metric(f.name, f.documentation, f.type)
        return m

    for worker, families in [*workers.items(), ("", list(retired.families.values()))]:
        for f in families:
            m = family(f)
            if summed(f):
                acc = sums.setdefault(f.name, {})
                for name, labels, value in f.samples:
                    key = (name, tuple(labels.items()))
                    acc.setdefault(key, []).append(value)
            else:
                for name, labels, value in f.samples:
                    m.add_sample(name, {"worker": worker, **labels}, value)
    for fname, acc in sums.items():
        m = merged[fname]
        for (name, labels), values in acc.items():
            m.add_sample(name, dict(labels), math.fsum(values))
    for extra in own:
        m = merged.get(extra.name)
        if m is None:
            merged[extra.name] = extra
        else:
            m.samples.extend(extra.samples)
    return list(merged.values())
