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


async def assert_nothing_more(streams: Any, url: str, room: str, timeout: float = 5.0) -> None:
    """Publish a marker to ``room`` from a fresh client: it must be the very next message of every stream.

    A room is delivered in order, so anything still queued or in flight to a stream (a duplicate, a
    late replay) would come before the marker: this checks "exactly once" without a quiet-period sleep.
    ``streams`` is one ``MessageStream`` or a list of them (every one subscribed to ``room``).
    """
    from wsfan.client import connect

    streams = streams if isinstance(streams, list) else [streams]
    async with connect(url) as marker:
        await marker.join(room)
        await marker.publish(room, {"marker": "end"})
    for stream in streams:
        nxt = await stream.get(timeout)
        assert nxt.payload == {"marker": "end"}, f"{nxt} arrived after the last expected message"
