"""Counters kept as plain ints on the hot path; exporters read them at scrape time."""

from __future__ import annotations


class Stats:
    """Plain attributes, no locks, no library calls: incrementing one costs a few nanoseconds."""

    __slots__ = (
        "connections_opened",
        "connections_closed",
        "messages_in",
        "bytes_in",
        "publishes",
        "deliveries",
        "presence_events",
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
        "close_codes",
    )

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed = 0
        self.messages_in = 0
        self.bytes_in = 0
        self.publishes = 0
        self.deliveries = 0
        self.presence_events = 0  # joined/left events written to subscribers
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
        self.close_codes: dict[int, int] = {}

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}
