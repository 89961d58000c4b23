"""Counters kept as plain ints on the hot path; exporters read them at scrape time."""

from __future__ import annotations

import bisect

from wsfan.server.heap import move_slots

# Publish-to-flush on one node is mostly 10-100 us (bench core): the first buckets must resolve that.
PUBLISH_TO_FLUSH_BUCKETS = (
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# One pipelined batch of publishes to Redis and back: a loopback round trip is ~50-200 us.
BROKER_PUBLISH_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Stats:
    """Plain attributes, no locks, no library calls: incrementing one costs a few nanoseconds."""

    __slots__ = (
        "connections_opened",
        "connections_closed",
        "messages_in",
        "bytes_in",
        "publishes",
        "deliveries",
        "compressed_deliveries",
        "presence_events",
        "broadcasts",
        "bytes_out",
        "replies",
        "errors",
        "rate_limited",
        "rate_limit_closes",
        "slow_consumer_closes",
        "heartbeat_closes",
        "token_expired_closes",
        "rejected",
        "rooms_created",
        "http_stalled",
        "close_codes",
    )

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed = 0
        self.messages_in = 0
        self.bytes_in = 0
        self.publishes = 0
        self.deliveries = 0
        self.compressed_deliveries = (
            0  # of which to permessage-deflate subscribers (compressed or under threshold)
        )
        self.presence_events = 0  # joined/left events written to subscribers
        self.broadcasts = 0  # room-less broadcast pushes queued to connections
        self.bytes_out = 0
        self.replies = 0
        self.errors: dict[str, int] = {}
        self.rate_limited = 0
        self.rate_limit_closes = 0
        self.slow_consumer_closes = 0
        self.heartbeat_closes = 0
        self.token_expired_closes = 0
        self.rejected: dict[str, int] = {}
        self.rooms_created = 0
        self.http_stalled = 0  # HTTP connections reset: a response waited the stall limit (server/http.py)
        self.close_codes: dict[int, int] = {}

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    def relocate(self, replaced: list[object]) -> None:
        """Every counter a new object (``heap.relocate``): each ``+= 1`` made the last one during the burst."""
        move_slots(self, self.__slots__, replaced)


class Histogram:
    """Bucket counts kept as plain ints; ``bounds`` are the upper bounds in seconds (``+Inf`` is implied).

    ``observe`` costs one ``bisect`` and three additions; the metrics module turns the counts
    into a cumulative Prometheus histogram at scrape time.
    """

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def relocate(self, replaced: list[object]) -> None:
        """The counts, total and count as new objects (``heap.relocate``)."""
        move_slots(self, ("counts", "total", "count"), replaced)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1
