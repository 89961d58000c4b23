"""State a client can make the server (or Redis) keep: none of it may outlive the client or grow unbounded.

Hostile findings 04, 11 and 13: a refusal at ``--max-rooms`` swept every room on the
event loop; a join's room outlived its last subscriber for ``history_ttl`` with nothing
published, so open/close churn filled the room table without holding a connection; with
Redis every join left a ``wsfan:{room}:m`` key for a day. Counters and table sizes here,
never wall time.
"""

from __future__ import annotations

import pytest

from wsfan.server.broker import BrokerUnavailable
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.namespaces import Namespace, Namespaces


def _broker(max_rooms: int, **ns: float) -> MemoryBroker:
    broker = MemoryBroker(namespaces=Namespaces(Namespace(history_size=10, **ns)), max_rooms=max_rooms)
    broker.bind(lambda pub: None)
    return broker


def test_a_refusal_at_max_rooms_never_sweeps():
    """Finding 04: each refused new room ran ``sweep()`` over every room (O(rooms) per request)."""
    broker = _broker(1_000)
    for i in range(1_000):
        broker.publish(f"full-{i}", "u", b"1", 0, "c")
    sweeps = 0
    sweep = broker.sweep

    def counted() -> int:
        nonlocal sweeps
        sweeps += 1
        return sweep()

    broker.sweep = counted  # type: ignore[method-assign]
    for i in range(200):
        with pytest.raises(BrokerUnavailable):
            broker.history(f"new-{i}", None)
        with pytest.raises(BrokerUnavailable):
            broker.publish(f"new-{i}", "u", b"1", 0, "c")
    assert sweeps == 0, "a refusal is O(1): the sweep timer makes room, not the refused request"
    assert broker.refusals == 400 and len(broker.rooms) == 1_000
    broker.subscribe("full-0")
    broker.publish("full-0", "u", b"2", 0, "c")  # existing rooms are unaffected
