"""Every value application code hands the server to send obeys the payload rule (PROTOCOL.md,
docs/protocol-choices.md "A payload must be deliverable in every encoding"): a before_publish
hook's payload, a handler's result, ``conn.send``, ``app.publish``, ``app.broadcast``.

NaN, infinities, integers past 64 bits, bytes, non-string keys and unencodable objects are
refused (hostile findings 07 and 10: a hook's NaN was published as null; ``add(1e308, 1e308)``
was acked as null in JSON and inf in MessagePack). A real server serving tests/apps/values.py,
driven in both encodings; then a Hypothesis property over generated values (NaN, inf, -0.0,
huge integers, nested) through each surface of an App on an in-process hub.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from apps import values as values_app
from hypothesis import given, settings
from hypothesis import strategies as st
from test_app_api import ENV
from test_hub import RecordingPeer, make_hub
from test_hub import run as run_hub

import wsfan
from helpers.peers import WebsocketsPeer, ask
from helpers.servers import ServerProcess
from helpers.waiting import run
from wsfan.server.application import HANDLER_RESULT_REFUSED
from wsfan.server.protocol import Encoding

REFUSED = {"nan", "inf", "ninf", "nested_nan", "big", "bytes", "int_key", "unencodable", "overflow"}
HOOK_REFUSED = "the server's before_publish hook gave a payload it cannot send"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--app", "apps.values:app", "--rate-limit", "0", env=ENV).start()
    yield srv
    srv.kill()


def same(got: Any, want: Any) -> bool:
    """Equal, and -0.0 kept as -0.0 (the sign of a zero is part of the value)."""
    if isinstance(want, float):
        return isinstance(got, float) and got == want and math.copysign(1, got) == math.copysign(1, want)
    if isinstance(want, dict):
        return (
            isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    return got == want and type(got) is type(want)


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
@pytest.mark.parametrize("name", sorted(values_app.VALUES))
def test_every_surface_refuses_what_one_encoding_cannot_carry(
    server: ServerProcess, msgpack: bool, name: str
) -> None:
    value = values_app.VALUES[name]

    async def go() -> None:
        p = await WebsocketsPeer.connect(server.url, msgpack=msgpack)
        sub = await WebsocketsPeer.connect(server.url, msgpack=not msgpack)
        for c in (p, sub):
            assert (await ask(c, "j", "join", room="r"))["success"]
        # A handler's result, sync and async.
        for type_ in ("give_now", "give"):
            reply = await ask(p, type_, type_, name=name)
            if name in REFUSED:
                assert (reply["code"], reply["message"]) == ("INTERNAL", HANDLER_RESULT_REFUSED), reply
            else:
                assert reply["success"] and same(reply["data"], value), reply
        # conn.send
        reply = await ask(p, "s", "send", name=name)
        if name in REFUSED:
            assert reply["data"].startswith("refused: payload "), reply
        else:
            assert reply["data"] == "sent"
        # app.publish, app.broadcast
        for broadcast in (False, True):
            reply = await ask(p, "a", "announce", name=name, broadcast=broadcast)
            assert (
                reply["data"].startswith("refused: payload ") if name in REFUSED else reply["data"] == "sent"
            )
        # A before_publish hook's payload: refused before a seq, nothing delivered.
        reply = await ask(p, "p", "publish", room="r", payload={"use": name})
        if name in REFUSED:
            assert (reply["code"], reply["message"]) == ("INTERNAL", HOOK_REFUSED), reply
        else:
            assert reply["success"], reply
        # What the subscriber (the other encoding) got: exactly the values sent, nothing for the refused.
        got = []
        await sub.send({"type": "ping", "id": "end"})
        while (msg := await sub.recv())["type"] != "pong":
            got.append(msg)
        kinds = [(m["type"], m.get("from")) for m in got]
        if name in REFUSED:
            assert got == [], got
        else:
            # The room's deliveries in publication order; the broadcast once, wherever it falls
            # between them (App.broadcast returns once the broker took it, PROTOCOL.md: no order
            # is promised between a broadcast and a room's publications).
            assert [k for k in kinds if k[0] == "message"] == [
                ("message", "server"),
                ("message", p.welcome["user"]),
            ], kinds
            assert kinds.count(("broadcast", None)) == 1, kinds
            assert all(same(m["payload"], value) for m in got)
        await p.close()
        await sub.close()

    run(go())


# ---------------------------------------------------------------- the property, every surface

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, 1e308, -1e308, 5e-324])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)  # fmt: skip


def portable(value: Any) -> bool:
    """The rule, written out independently of the server's code: finite floats, 64-bit integers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return -(2**63) <= value <= 2**64 - 1
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(portable, value))
    return all(portable(v) for v in value.values())


class GiveP(wsfan.Message, tag="give_p"):
    pass


class SendP(wsfan.Message, tag="send_p"):
    pass


chosen: dict[str, Any] = {}
prop_app = wsfan.App()
prop_app.message(GiveP)(lambda conn, msg: chosen["value"])


@prop_app.message(SendP)
def _send_p(conn: wsfan.Conn, msg: SendP) -> str:
    try:
        conn.send({"type": "pushed", "value": chosen["value"]})
    except ValueError:
        return "refused"
    return "sent"


@prop_app.before_publish
def _rewrite(conn: wsfan.Conn, room: str, payload: Any) -> Any:
    return wsfan.Publish(payload=chosen["value"])


def decode(frame: bytes, encoding: Encoding) -> dict[str, Any]:
    n = frame[1] & 0x7F
    body = frame[2 + (2 if n == 126 else 8 if n == 127 else 0) :]
    return (msgspec.msgpack if encoding is Encoding.MSGPACK else msgspec.json).decode(body)


def finished(coro: Any) -> Any:
    """The result of a coroutine that completes without suspending (the in-process broker's publish)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("suspended")


@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from([Encoding.JSON, Encoding.MSGPACK]))
def test_any_value_from_application_code_is_sent_exactly_or_refused(value: Any, encoding: Encoding) -> None:
    chosen["value"] = value
    hub, scheduled = make_hub()
    prop_app.attach(SimpleNamespace(hub=hub))  # type: ignore[arg-type]
    peer, sub_peer = RecordingPeer(), RecordingPeer()
    s = hub.open(peer, encoding)
    sub = hub.open(sub_peer, Encoding.MSGPACK if encoding is Encoding.JSON else Encoding.JSON)
    codec = msgspec.msgpack if encoding is Encoding.MSGPACK else msgspec.json
    for c in (s, sub):
        hub.receive(c, hub.codecs[c.encoding].encode_value({"type": "join", "room": "r"}), c.encoding)
    for request in ({"type": "give_p", "id": "g"}, {"type": "send_p", "id": "s"}, {"type": "publish", "id": "p", "room": "r", "payload": 0}):  # fmt: skip
        hub.receive(s, codec.encode(request), encoding)
    run_hub(scheduled)
    got = {m.get("requestId") or m["type"]: m for m in (decode(f, encoding) for b in peer.writes for f in b)}
    delivered = [decode(f, sub.encoding) for b in sub_peer.writes for f in b]
    delivered = [m for m in delivered if m["type"] == "message"]
    refused = []
    for call in (lambda: prop_app.publish("r", value), lambda: prop_app.broadcast(value)):
        try:
            finished(call())
        except ValueError:
            refused.append(True)
    run_hub(scheduled)
    delivered_later = [decode(f, sub.encoding) for b in sub_peer.writes for f in b if decode(f, sub.encoding)["type"] == "message"]  # fmt: skip
    if portable(value):
        assert (
            same(got["g"].get("data"), value)
            and got["s"]["data"] == "sent"
            and same(got["pushed"]["value"], value)
        )
        assert got["p"]["success"] and [same(m["payload"], value) for m in delivered] == [True]
        assert refused == [] and len(delivered_later) == 2 and same(delivered_later[-1]["payload"], value)
    else:
        assert (got["g"]["code"], got["g"]["message"]) == ("INTERNAL", HANDLER_RESULT_REFUSED)
        assert got["s"]["data"] == "refused" and "pushed" not in got
        assert (got["p"]["code"], got["p"]["message"]) == ("INTERNAL", HOOK_REFUSED) and delivered == []
        assert refused == [True, True] and delivered_later == []
