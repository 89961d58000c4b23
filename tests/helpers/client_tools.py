"""Tools for tests of the Python client (wsfan.client): read a bounded stream, hold its reconnects."""

from __future__ import annotations

import asyncio
from typing import Any

from wsfan.client import Client, Message


async def take(stream: Any, n: int, timeout: float) -> list[Message]:
    """Up to ``n`` messages from ``stream``, fewer if it stays quiet ``timeout`` s: a failing test shows what came."""
    got: list[Message] = []
    try:
        while len(got) < n:
            got.append(await stream.get(timeout))
    except TimeoutError:
        pass
    return got


def hold_reconnects(client: Client, gate: asyncio.Event) -> None:
    """``client``'s reconnect attempts wait for ``gate``: the test decides when it comes back."""
    sleep = client.reconnector.sleep

    async def held(delay: float) -> None:
        await gate.wait()
        await sleep(delay)

    client.reconnector.sleep = held
