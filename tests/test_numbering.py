"""The client's numbering rules (gap, duplicate, reset, recovered:false), from the shared vectors.

``tests/vectors/numbering.json`` is run here against ``client/rooms.py`` and by
``tests/browser/numbering.test.mjs`` against ``client/js/wsfan.js``: one rule
changed in one client and not the other fails one of the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wsfan.client.events import Gap, Recovered
from wsfan.client.rooms import RoomTracker
from wsfan.server.wire import Message, rejoin_outcome

VECTORS = json.loads((Path(__file__).parent / "vectors" / "numbering.json").read_text())
CASES = VECTORS["cases"]


def event_dict(event: Recovered | Gap | None) -> dict[str, Any] | None:
    if event is None:
        return None
    if isinstance(event, Recovered):
        return {"type": "recovered", "room": event.room, "since": event.since, "seq": event.seq}
    return {"type": "gap", "room": event.room, "since": event.since, "seq": event.seq, "reset": event.reset}


def delivery(room: str, seq: int) -> Message:
    return Message(room=room, seq=seq, sender="u", payload=seq)


def run_step(rooms: RoomTracker, resets: list[Gap], step: dict[str, Any], where: str) -> None:
    if "join" in step:
        room = step["join"]
        sent = rooms.begin_join(room, step.get("since"), step.get("epoch"))
        assert sent == step["sends"], where
        if "epoch_after" in step:
            assert rooms.epoch(room) == step["epoch_after"], where
    elif "ack" in step:
        released, event = rooms.end_join(step["ack"], step["data"])
        assert [m.seq for m in released] == step["released"], where
        assert event_dict(event) == step["event"], where
    elif "deliver" in step:
        room = step["deliver"]
        assert [rooms.accept(delivery(room, s)) for s in step["seqs"]] == step["accepted"], where
    elif "published" in step:
        rooms.published(step["published"], step["seq"])
    elif "lost" in step:
        rooms.connection_lost()
    elif "abort" in step:
        rooms.abort_join(step["abort"])
    elif "leave" in step:
        rooms.leave(step["leave"])
    elif "left" in step:
        rooms.left(step["left"])
    elif "server_join" in step:
        event = rooms.server_joined(step["server_join"], step["seq"], step.get("epoch"))
        assert event_dict(event) == step["event"], where
    elif "server_leave" in step:
        rooms.server_left(step["server_leave"])
    elif "expect" in step:
        want = step["expect"]
        for counter in ("duplicates", "resets", "unknown"):
            if counter in want:
                assert getattr(rooms, counter) == want[counter], f"{where}: {counter}"
        for room, seq in want.get("last_seq", {}).items():
            assert rooms.last_seq(room) == seq, f"{where}: last_seq of {room}"
        for room, epoch in want.get("epoch", {}).items():
            assert rooms.epoch(room) == epoch, f"{where}: epoch of {room}"
        if "joined" in want:
            assert rooms.joined() == want["joined"], where
        if "subscribed" in want:
            assert rooms.subscribed() == want["subscribed"], where
        if "reset_events" in want:
            assert [event_dict(g) for g in resets] == want["reset_events"], where
    else:
        raise AssertionError(f"{where}: unknown step {step}")


@pytest.mark.parametrize("case", CASES, ids=[c["rule"] for c in CASES])
def test_numbering_rule(case: dict[str, Any]) -> None:
    resets: list[Gap] = []
    rooms = RoomTracker(on_reset=resets.append)
    for i, step in enumerate(case["steps"]):
        run_step(rooms, resets, step, f"step {i}: {json.dumps(step)}")


def test_every_step_kind_is_exercised() -> None:
    kinds = {next(iter(step)) for case in CASES for step in case["steps"]}
    assert kinds == set(VECTORS["steps"]), (
        "a step kind documented in the vectors but never used (or the reverse)"
    )


@pytest.mark.parametrize(
    ("since", "sent_epoch", "seq", "recovered", "epoch", "outcome"),
    [
        (3, "e1", 5, True, "e1", (True, False)),  # everything after since follows
        (3, None, 5, True, None, (True, False)),  # a server without epochs
        (3, "e1", 500, False, "e1", (False, False)),  # history no longer reaches back: a gap
        (5, None, 2, False, None, (False, True)),  # the seq went back: renumbered
        (3, "e1", 9, False, "e2", (False, True)),  # another epoch, though the seq passed since again
        (3, "e1", 9, True, "e2", (False, True)),  # an ack that contradicts itself is still a reset
        (3, None, 9, True, "e2", (True, False)),  # no epoch was sent: nothing to compare with
    ],
)
def test_rejoin_outcome_is_the_rule_both_python_clients_read_acks_by(
    since: int,
    sent_epoch: str | None,
    seq: int,
    recovered: bool,
    epoch: str | None,
    outcome: tuple[bool, bool],
) -> None:
    """``client/rooms.py`` and the Locust user (``loadtest/users.py``) both call ``rejoin_outcome``."""
    assert rejoin_outcome(since, sent_epoch, seq, recovered, epoch) == outcome
