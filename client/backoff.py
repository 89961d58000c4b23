"""Reconnect delays: exponential backoff with full jitter, and ``Retry-After`` parsing.

Full jitter (``uniform(0, min(cap, base * 2**attempt))``, AWS architecture blog
"Exponential Backoff And Jitter") spreads a crowd of clients that lost the same
server over the whole window, so a restarted node is not hit by all of them in
the same millisecond. The random source is injectable so tests can seed it and
predict every delay.
"""

from __future__ import annotations

import email.utils
import math
import random
import time


class Backoff:
    """Computes successive reconnect delays; ``reset()`` after a connection proved stable.

    ``max_attempts=None`` retries forever, which is what a long-lived subscriber
    wants; a finite value lets batch jobs and tests give up.
    """

    __slots__ = ("base", "cap", "max_attempts", "rng", "attempt")

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        max_attempts: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if base < 0 or cap < 0:
            raise ValueError("backoff base and cap must be >= 0")
        if max_attempts is not None and max_attempts < 0:
            raise ValueError("max_attempts must be >= 0 or None")
        self.base = base
        self.cap = cap
        self.max_attempts = max_attempts
        self.rng = rng if rng is not None else random.Random()
        self.attempt = 0

    @property
    def exhausted(self) -> bool:
        return self.max_attempts is not None and self.attempt >= self.max_attempts

    def window(self, attempt: int) -> float:
        """Upper bound of the jitter window for ``attempt`` (0-based)."""
        # Guard the power: 2**attempt overflows a float long after the cap applies.
        if attempt >= 64:
            return self.cap
        return min(self.cap, self.base * (2**attempt))

    def next_delay(self, retry_after: float | None = None) -> float:
        """Delay before the next attempt, and count that attempt.

        With ``retry_after`` (the server asked us to stay away that long), the
        jittered delay is added on top of it: the server's minimum is honoured and
        the crowd is still spread out after it, instead of all returning at once.
        """
        delay = self.rng.uniform(0.0, self.window(self.attempt))
        self.attempt += 1
        if retry_after is not None and retry_after > 0:
            delay += retry_after
        return delay

    def reset(self) -> None:
        self.attempt = 0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)
