"""Per-connection token bucket, with the notion of persistent abuse that earns close 4029."""

from __future__ import annotations

import time

from wsfan.server.heap import fresh


class TokenBucket:
    """Classic token bucket refilled lazily on each take, so an idle connection costs no timer.

    ``strikes`` counts refusals; it resets once a whole second passes without one.
    A client that keeps sending over its rate therefore accumulates strikes and is
    cut off, while one that bursts briefly and backs off never is.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "strikes", "last_strike")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.strikes = 0
        self.last_strike = 0.0

    def moved(self, replaced: list[object]) -> TokenBucket:
        """A copy of this bucket made now, its numbers new objects too (``heap.relocate``); the old ones go to ``replaced``."""
        copy = TokenBucket.__new__(TokenBucket)
        for name in TokenBucket.__slots__:
            value = getattr(self, name)
            new = fresh(value)
            if new is not value:
                replaced.append(value)
            setattr(copy, name, new)
        return copy

    def take(self) -> bool:
        now = time.monotonic()
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        if now - self.last_strike > 1.0:
            self.strikes = 0
        self.strikes += 1
        self.last_strike = now
        return False
