"""Prometheus exposition of the hub's plain-int counters, read at scrape time.

The hot path never calls into prometheus_client: it bumps ints on ``Stats`` and
appends to a bucket array. A custom collector turns those into metric families
only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from wsfan.server.broker import Publication

if TYPE_CHECKING:
    from wsfan.server.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """Publish-to-flush latency: one observation per publication per flush, not per subscriber."""

    __slots__ = ("counts", "total", "count", "clock")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0
        self.clock = clock

    def observe_flushed(self, pubs: list[Publication]) -> None:
        now = self.clock()
        counts = self.counts
        for pub in pubs:
            if pub.published_at:
                dt = now - pub.published_at
                counts[bisect.bisect_left(LATENCY_BUCKETS, dt)] += 1
                self.total += dt
                self.count += 1


class HubCollector:
    def __init__(self, hub: Hub, connections: Callable[[], int], latency: LatencyHistogram) -> None:
        self.hub = hub
        self.connections = connections
        self.latency = latency

    def collect(self) -> Iterator[Metric]:
        st = self.hub.stats
        yield GaugeMetricFamily("wsfan_connections", "Open WebSocket connections", value=self.connections())
        yield GaugeMetricFamily(
            "wsfan_sessions", "Open sessions (WebSocket and SSE)", value=len(self.hub.sessions)
        )
        yield GaugeMetricFamily("wsfan_rooms", "Rooms with local subscribers", value=len(self.hub.rooms))
        counters = [
            ("wsfan_connections_opened", "Connections accepted", st.connections_opened),
            ("wsfan_connections_closed", "Connections closed", st.connections_closed),
            ("wsfan_messages_in", "Messages received from clients", st.messages_in),
            ("wsfan_bytes_in", "Message bytes received from clients", st.bytes_in),
            ("wsfan_publishes", "Publications accepted on this node", st.publishes),
            ("wsfan_deliveries", "Deliveries queued to subscribers", st.deliveries),
            ("wsfan_bytes_out", "Delivery bytes queued to subscribers", st.bytes_out),
            ("wsfan_presence_events", "joined/left events queued to subscribers", st.presence_events),
            ("wsfan_replies", "Acks sent", st.replies),
            ("wsfan_rate_limited", "Messages dropped by the rate limit", st.rate_limited),
            ("wsfan_rate_limit_closes", "Connections closed with 4029", st.rate_limit_closes),
            ("wsfan_slow_consumer_closes", "Connections closed with 4008", st.slow_consumer_closes),
            ("wsfan_heartbeat_closes", "Connections closed with 4000", st.heartbeat_closes),
            ("wsfan_token_expired_closes", "Connections closed with 4001", st.token_expired_closes),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
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
        lat = self.latency
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), lat.counts, strict=True):
            cumulative += n
            buckets.append((_le(bound), cumulative))
        yield HistogramMetricFamily(
            "wsfan_publish_to_flush_seconds",
            "Time from a publication reaching this node's hub to its frames being written to subscribers",
            buckets=buckets,
            sum_value=lat.total,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Metrics:
    """One registry per node (not the global one), so several nodes in one test process never mix."""

    def __init__(self, hub: Hub, connections: Callable[[], int]) -> None:
        self.latency = LatencyHistogram()
        hub.flush_observers.append(self.latency.observe_flushed)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(hub, connections, self.latency))

    def render(self) -> bytes:
        return generate_latest(self.registry)
