"""Hub fan-out to N in-memory sinks: one publish decoded, delivered and flushed to N subscribers;
one broadcast to N connections (shared frame vs one built per connection).

Driven sans-I/O exactly as tests/test_hub.py does (a fake ``Peer`` and a
``schedule`` that queues the flush), so the figure is the hub's own cost per
publish: decode, seq and history, one frame build, N queue appends, N flush
calls. ``extra_info["ns_per_delivery"]`` divides it by N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from wsfan.server.broker import BroadcastPush
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.hub import Hub, Session
from wsfan.server.protocol import Encoding
from wsfan.server.wire import BroadcastDelivery


class Sink:
    """The cheapest possible peer: takes the queued frames and drops them, as a socket write would."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = 0

    def flush(self, session: Session) -> None:
        self.frames += len(session.out)
        session.out.clear()

    def close(self, code: int, reason: str) -> None:
        pass


def make_room(n: int) -> tuple[Hub, Session, list[Callable[[], None]], list[Sink]]:
    scheduled: list[Callable[[], None]] = []
    hub = Hub(MemoryBroker(300), node_id="b", schedule=scheduled.append, rate_limit=0)
    sinks = [Sink() for _ in range(n + 1)]
    sessions = [hub.open(s, Encoding.JSON) for s in sinks]
    join = msgspec.json.encode({"type": "join", "room": "bench"})
    for s in sessions:
        hub.receive(s, join, 0x1)
    while scheduled:
        scheduled.pop()()
    return hub, sessions[0], scheduled, sinks[1:]


@pytest.mark.parametrize("n", [10, 100, 1000, 10000])
def test_hub_fanout(benchmark: Any, n: int) -> None:
    hub, publisher, scheduled, sinks = make_room(n)
    publish = msgspec.json.encode({"type": "publish", "room": "bench", "payload": {"text": "x" * 88}})

    def one() -> None:
        hub.receive(publisher, publish, 0x1)
        while scheduled:
            scheduled.pop()()

    benchmark(one)
    rounds = sinks[0].frames
    assert rounds > 0 and all(s.frames == rounds for s in sinks), "every subscriber got every publication"
    benchmark.extra_info["subscribers"] = n
    benchmark.extra_info["ns_per_delivery"] = benchmark.stats.stats.mean / n * 1e9


def make_connections(n: int, mix: str) -> tuple[Hub, list[Callable[[], None]], list[Sink]]:
    """``n`` open connections in no room: all JSON, or JSON and MessagePack alternating (the worst
    order for the broadcast loop, which looks a frame up again at each change of kind)."""
    scheduled: list[Callable[[], None]] = []
    hub = Hub(MemoryBroker(300), node_id="b", schedule=scheduled.append, rate_limit=0)
    sinks = [Sink() for _ in range(n)]
    for i, sink in enumerate(sinks):
        hub.open(sink, Encoding.MSGPACK if mix == "json+msgpack" and i % 2 else Encoding.JSON)
    while scheduled:
        scheduled.pop()()
    for sink in sinks:
        sink.frames = 0  # the welcomes
    return hub, scheduled, sinks


BROADCAST_PAYLOAD = msgspec.json.encode({"notice": "x" * 88})


@pytest.mark.parametrize("n", [100, 10000])
@pytest.mark.parametrize("mix", ["json", "json+msgpack"])
def test_hub_broadcast(benchmark: Any, n: int, mix: str) -> None:
    """``Hub.broadcast``: one push to every connection, its frame built once per kind, then flushed."""
    hub, scheduled, sinks = make_connections(n, mix)

    def one() -> None:
        hub.broadcast(BroadcastPush(BROADCAST_PAYLOAD))
        while scheduled:
            scheduled.pop()()

    benchmark(one)
    rounds = sinks[0].frames
    assert rounds > 0 and all(s.frames == rounds for s in sinks), "every connection got every broadcast"
    benchmark.extra_info["connections"] = n
    benchmark.extra_info["ns_per_connection"] = benchmark.stats.stats.mean / n * 1e9


@pytest.mark.parametrize("n", [100, 10000])
def test_broadcast_built_per_connection(benchmark: Any, n: int) -> None:
    """The baseline ``test_hub_broadcast`` is measured against: the same push encoded and framed
    for each connection (``Hub.reply``), as a server without a shared frame would."""
    hub, scheduled, sinks = make_connections(n, "json")
    push = BroadcastDelivery(payload=msgspec.Raw(BROADCAST_PAYLOAD))

    def one() -> None:
        for s in hub.sessions.values():
            hub.reply(s, push)
        while scheduled:
            scheduled.pop()()

    benchmark(one)
    assert sinks[0].frames > 0
    benchmark.extra_info["connections"] = n
    benchmark.extra_info["ns_per_connection"] = benchmark.stats.stats.mean / n * 1e9
