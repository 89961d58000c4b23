"""One application handler round trip vs the built-in ``echo``, in the hub alone (sans-I/O).

Each benchmark sends a batch of ``BATCH`` messages on one connection and flushes, so the
figure per reply (``extra_info["ns_per_reply"]``) is decode + dispatch + handler + encode +
queue of one reply, with no socket. ``app_async`` runs an ``async def`` handler: its
per-connection ordering (the hub's Pending queue) and one task per message are included.
``fanout_with_app`` is ``test_hub_fanout[1000]`` with an App attached (a handler, no hooks):
the built-in publish path must cost the same as without it.

Run: ``make bench-micro ARGS='-k app'`` (the lead runs it on a quiet machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

import wsfan
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.hub import Hub
from wsfan.server.protocol import Encoding

from .test_hub import Sink, make_room

BATCH = 200


class Add(wsfan.Message, tag="add"):
    a: int
    b: int


def _app(is_async: bool) -> wsfan.App:
    app = wsfan.App()
    if is_async:

        @app.message(Add)
        async def add_async(conn: wsfan.Conn, msg: Add) -> int:
            return msg.a + msg.b

    else:

        @app.message(Add)
        def add(conn: wsfan.Conn, msg: Add) -> int:
            return msg.a + msg.b

    return app


def _hub(scheduled: list[Callable[[], None]], app: wsfan.App | None) -> Hub:
    hub = Hub(MemoryBroker(300), node_id="b", schedule=scheduled.append, rate_limit=0)
    if app is not None:
        app.attach(SimpleNamespace(hub=hub))  # type: ignore[arg-type]
    return hub


@pytest.mark.parametrize("kind", ["echo", "app_sync", "app_async"])
def test_round_trip(benchmark: Any, kind: str) -> None:
    scheduled: list[Callable[[], None]] = []
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    hub = _hub(scheduled, _app(kind == "app_async") if kind != "echo" else None)
    sink = Sink()
    s = hub.open(sink, Encoding.JSON)
    if kind == "echo":
        msg = msgspec.json.encode({"type": "echo", "id": "1", "payload": 5})
    else:
        msg = msgspec.json.encode({"type": "add", "id": "1", "a": 2, "b": 3})

    async def drain() -> None:
        while s.pending is not None or scheduled:
            while scheduled:
                scheduled.pop()()
            await asyncio.sleep(0)

    def batch() -> None:
        for _ in range(BATCH):
            hub.receive(s, msg, 0x1)
        if s.pending is not None:
            loop.run_until_complete(drain())
        while scheduled:
            scheduled.pop()()

    while scheduled:  # the welcome
        scheduled.pop()()
    before = sink.frames
    benchmark(batch)
    replies = sink.frames - before
    loop.close()
    assert replies > 0 and replies % BATCH == 0, "every message answered"
    benchmark.extra_info["ns_per_reply"] = benchmark.stats.stats.mean / BATCH * 1e9


def test_fanout_with_app(benchmark: Any) -> None:
    hub, publisher, scheduled, sinks = make_room(1000)
    _app(False).attach(SimpleNamespace(hub=hub))  # type: ignore[arg-type]
    publisher.codec = hub.codecs[publisher.encoding]
    publish = msgspec.json.encode({"type": "publish", "room": "bench", "payload": {"text": "x" * 88}})

    def one() -> None:
        hub.receive(publisher, publish, 0x1)
        while scheduled:
            scheduled.pop()()

    benchmark(one)
    assert sinks[0].frames > 0 and all(s.frames == sinks[0].frames for s in sinks)
    benchmark.extra_info["ns_per_delivery"] = benchmark.stats.stats.mean / 1000 * 1e9
