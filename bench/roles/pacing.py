"""Open-loop pacing and sample files, shared by the latency roles.

Coordinated omission: a sender that waits for replies, or that simply falls
behind, sends later than planned, and latency measured from the actual send
hides exactly the stalls that matter. Here message ``i`` has an intended send
time ``t0 + i / rate`` fixed before the run, latency is measured from that
intended time, and how late each message actually left (``lag``) is recorded
too, so a load generator that could not keep its schedule is visible.

Timing: libuv timers have millisecond resolution, which would add up to 1 ms of
noise to every sample. The pacer therefore sleeps on a timer only while the
next send is more than ``SPIN_S`` away and yields to the event loop in a tight
loop (``sleep(0)``, which still processes every socket) for the last stretch.
The cost is a busy load-generator core during open-loop phases; it is why open
loop phases judge the load generator by its schedule lag rather than its CPU.

Clock: ``time.monotonic`` is CLOCK_MONOTONIC, one clock for every process on a
Linux machine, so the harness can hand the same ``t0`` to several processes.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SPIN_S = 0.002
clock = time.monotonic


class Pacer:
    """Sends indices ``offset, offset + stride, ...`` below ``count``; index ``i`` is due at ``t0 + i / rate``."""

    def __init__(self, t0: float, rate: float, count: int, stride: int = 1, offset: int = 0) -> None:
        self.t0 = t0
        self.interval = 1.0 / rate
        self.count = count
        self.stride = max(1, stride)
        self.offset = offset
        self.lags = array("d")
        self.sent = 0

    async def run(self, send: Callable[[int], None]) -> None:
        t0, interval, count, stride = self.t0, self.interval, self.count, self.stride
        lags = self.lags
        i = self.offset
        while i < count:
            now = clock()
            due = t0 + i * interval
            if now >= due:
                # Everything due by now leaves in this wake-up, each with its own lag.
                while i < count and t0 + i * interval <= now:
                    lags.append(now - (t0 + i * interval))
                    send(i)
                    self.sent += 1
                    i += stride
                continue
            wait = due - now
            await asyncio.sleep(wait - SPIN_S if wait > SPIN_S * 1.5 else 0)

    def lag_summary(self) -> dict[str, float]:
        if not self.lags:
            return {}
        a = np.frombuffer(self.lags, dtype=np.float64) * 1e6
        p50, p99 = np.percentile(a, [50, 99])
        return {"p50_us": float(p50), "p99_us": float(p99), "max_us": float(a.max())}


def save_samples(samples: array, directory: str, name: str) -> str:
    """Raw latencies (seconds) to ``<directory>/<name>.npy``; returns the path for the harness."""
    path = Path(directory) / f"{name}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.frombuffer(samples, dtype=np.float64) if samples else np.empty(0))
    return str(path)


def summary_fields(extra: dict[str, Any], pacer: Pacer | None) -> dict[str, Any]:
    if pacer is not None:
        extra["send_lag"] = pacer.lag_summary()
        extra["paced"] = pacer.sent
    return extra
