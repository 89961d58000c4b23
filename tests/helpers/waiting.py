"""Bounded waiting: every wait in the suite has a deadline, so a missing event fails instead of hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def run(coro: Any, timeout: float = 30.0) -> Any:
    """Run one async test body with a hard timeout, so a hung await fails instead of stalling the suite."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` on the running loop until truthy, else ``TimeoutError``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll a synchronous predicate until it returns something truthy; its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
