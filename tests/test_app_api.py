"""The application API (docs/app-api.md) on a real server process serving tests/apps/probe.py.

Driven with the ``websockets`` library (raw wire shapes) and the Python client (``Client.request``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import msgspec
import pytest
import websockets
from apps import probe as probe_app
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.peers import WebsocketsPeer, ask
from helpers.ports import free_port, wait_for_port
from helpers.servers import ROOT, ServerProcess
from helpers.waiting import run
from wsfan.client import connect
from wsfan.client.errors import InternalError, InvalidMessage, ProtocolError
from wsfan.server.protocol import FIELD_RULES, Encoding, describe_invalid
from wsfan.server.wire import ROOM_RULE, Join, valid_room

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
SECRET = "app-api-test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def probe() -> Iterator[ServerProcess]:
    srv = ServerProcess("--app", "apps.probe:app", "--rate-limit", "0", env=ENV).start()
    yield srv
    srv.kill()


def test_return_value_is_the_ack_data_and_no_id_means_no_reply(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        assert await ask(p, "a1", "add", a=2, b=3) == {
            "type": "ack",
            "requestId": "a1",
            "success": True,
            "data": 5,
        }
        await p.send({"type": "add", "a": 1, "b": 1})  # no id: handled, nothing sent back
        await p.no_message(0.3)
        await p.close()

    run(go())


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"a": "x", "b": 1}, "a"),
        ({"b": 1}, "a"),
    ],
)
def test_invalid_application_message_names_the_field(probe: ServerProcess, fields: dict, path: str) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        reply = await ask(p, "v1", "add", **fields)
        assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE"
        assert f"'{path}'" in reply["message"] or f"`$.{path}`" in reply["message"], reply
        assert (await ask(p, "v2", "add", a=1, b=1))["data"] == 2  # the connection keeps working
        await p.close()

    run(go())


def test_nested_field_path_like_builtins(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        reply = await ask(p, "n1", "order", items=[{"name": "a", "qty": 1}, {"name": "b", "qty": 0}])
        assert reply["code"] == "INVALID_MESSAGE"
        assert "items[1].qty" in reply["message"], reply
        assert (await ask(p, "n2", "order", items=[{"name": "a", "qty": 2}]))["data"] == {"total": 2}
        await p.close()

    run(go())


def test_async_handlers_answer_in_the_order_sent(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        # The first takes longest: without the per-connection queue the acks would come back reversed.
        delays = [0.3, 0.1, 0.0]
        for i, delay in enumerate(delays):
            await p.send({"type": "slow", "id": f"s{i}", "n": i, "delay": delay})
        await p.send({"type": "add", "id": "after", "a": 1, "b": 2})  # sync, but sent after them
        got = [await p.recv() for _ in range(4)]
        assert [m["requestId"] for m in got] == ["s0", "s1", "s2", "after"]
        assert [m["data"] for m in got[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        await p.close()

    run(go())


@pytest.mark.parametrize("how", ["error", "aerror"])
def test_wsfan_error_is_an_error_reply(probe: ServerProcess, how: str) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        reply = await ask(p, "e1", "fail", how=how)
        assert reply["type"] == "error" and reply["success"] is False
        assert reply["code"] == "OUT_OF_STOCK" and reply["message"] in ("no more widgets", "none left")
        await p.close()

    run(go())


@pytest.mark.parametrize("how", ["crash", "acrash"])
def test_unexpected_exception_is_internal_logged_and_the_connection_lives(
    probe: ServerProcess, how: str
) -> None:
    # One log line a second per failing handler (logs.APP_FAILURES): past the previous case's.
    time.sleep(1.05)

    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        reply = await ask(p, "c1", "fail", how=how)
        assert reply == {
            "type": "error",
            "requestId": "c1",
            "success": False,
            "code": "INTERNAL",
            "message": "internal error",
        }
        assert (await ask(p, "c2", "add", a=40, b=2))["data"] == 42
        await p.close()

    run(go())
    out = probe.output()
    assert f"secret detail {how}" in out and "Traceback" in out  # logged with its trace, never sent


def test_python_client_request(probe: ServerProcess) -> None:
    async def go() -> None:
        async with connect(probe.url) as c:
            assert await c.request(probe_app.Add(a=1, b=2)) == 3
            assert await c.request(probe_app.Slow(n=7, delay=0)) == {"n": 7}
            with pytest.raises(ProtocolError) as err:
                await c.request(probe_app.Fail(how="error"))
            assert err.value.code == "OUT_OF_STOCK"
            with pytest.raises(InternalError):
                await c.request(probe_app.Fail(how="crash"))
            with pytest.raises(InvalidMessage):
                await c.request(probe_app.Order(items=[probe_app.Item(name="x", qty=0)]))

    run(go())


def test_on_connect_sets_data_and_refuses(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url + "?x=1", additional_headers={"X-Agent": "probe/1"})
        reply = await ask(p, "w1", "whoami")
        assert reply["data"] == {
            "id": p.welcome["conn"],
            "user": p.welcome["user"],
            "data": {"agent": "probe/1", "path": "/ws", "role": None},
        }
        await p.close()
        for status in (401, 403):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(probe.url, additional_headers={"X-Refuse": str(status)})
            assert refused.value.response.status_code == status
            body = refused.value.response.body.decode()
            assert body == ("WHO: say who you are\n" if status == 401 else "NOPE: not you\n")

    run(go())


def test_on_connect_sees_jwt_claims(make_server: type[ServerProcess]) -> None:
    srv = make_server("--app", "apps.probe:app", "--jwt-secret", SECRET, env=ENV).start()
    token = jwt.encode(
        {"sub": "ann", "exp": int(time.time()) + 600, "role": "editor"}, SECRET, algorithm="HS256"
    )

    async def go() -> None:
        p = await WebsocketsPeer.connect(f"{srv.url}?token={token}")
        reply = await ask(p, "w", "whoami")
        assert reply["data"]["user"] == "ann" and reply["data"]["data"]["role"] == "editor"
        await p.close()

    run(go())


def test_conn_send_join_leave(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        other = await WebsocketsPeer.connect(probe.url)
        await p.send({"type": "push", "id": "p1", "text": "hello"})
        assert await p.recv() == {"type": "notice", "text": "hello"}  # sent by the handler, before its ack
        assert (await p.recv())["requestId"] == "p1"
        assert (await ask(p, "j1", "enlist", room="r-a"))["data"] == ["r-a"]
        assert (await ask(other, "o1", "join", room="r-a"))["success"]
        assert (await ask(other, "o2", "publish", room="r-a", payload={"n": 1}))["success"]
        delivery = await p.recv_type("message")
        assert delivery["room"] == "r-a" and delivery["payload"] == {"n": 1}
        assert (await ask(p, "j2", "enlist", room="r-a", leave=True))["data"] == []
        assert (await ask(other, "o3", "publish", room="r-a", payload={"n": 2}))["success"]
        await p.no_message(0.3)  # left: no delivery
        await p.close()
        await other.close()

    run(go())


# Names application code might pass that no client could: each would make a room that breaks
# another surface (GET /history?room=, Redis keys {room}, the reserved control room).
NOT_ROOMS = ["", "bad room", "room\n", "x" * 129, "caf\u00e9", "$wsfan.control", "a/b", "{tag}"]


@pytest.mark.parametrize("name", NOT_ROOMS)
def test_conn_join_and_leave_refuse_what_is_not_a_room(probe: ServerProcess, name: str) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        for rid, leave in (("j", False), ("l", True)):
            reply = await ask(p, rid, "enlist", room=name, leave=leave)
            assert reply["code"] == "BAD_ROOM", reply
            assert reply["message"].startswith(ROOM_RULE + "; got "), reply
        # the connection is in no room, and a real one still works
        assert (await ask(p, "ok", "enlist", room="fine"))["data"] == ["fine"]
        await p.close()

    run(go())


@pytest.mark.parametrize("name", NOT_ROOMS)
def test_app_publish_refuses_what_is_not_a_room(probe: ServerProcess, name: str) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        assert (await ask(p, "j", "join", room="watch"))["success"]
        # A disconnect command for this connection's user, aimed at the control room: it must not
        # reach it (it would close every connection of the user).
        command = {"type": "disconnect", "user": p.welcome["user"], "code": 4003}
        reply = await ask(p, "a", "announce", room=name, payload=command)
        assert reply["code"] == "BAD_ROOM" and reply["message"].startswith(ROOM_RULE), reply
        await p.send({"type": "announce", "id": "a2", "room": "watch", "payload": 1})
        got = [await p.recv(), await p.recv()]  # still connected, still served: delivery, then ack
        assert got[0]["type"] == "message" and got[0]["room"] == "watch"
        assert got[1]["requestId"] == "a2" and got[1]["data"] == got[0]["seq"]
        await p.close()

    run(go())


def test_hooks_refuse_join_and_publish(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        assert (await ask(p, "h1", "join", room="vault"))["code"] == "FORBIDDEN"
        assert (await ask(p, "h2", "join", room="quiet-room"))["success"]
        assert (await ask(p, "h3", "publish", room="quiet-room", payload=1))["code"] == "FORBIDDEN"
        assert (await ask(p, "h4", "join", room="loud"))["success"]
        assert (await ask(p, "h5", "publish", room="loud", payload=1))["success"]
        await p.close()

    run(go())


@pytest.mark.parametrize(("how", "code"), [("client", 4321), ("server", 4400)])
def test_on_disconnect_sees_the_close_code_and_rooms(probe: ServerProcess, how: str, code: int) -> None:
    async def go() -> None:
        watcher = await WebsocketsPeer.connect(probe.url)
        assert (await ask(watcher, "w1", "join", room="audit"))["success"]
        p = await WebsocketsPeer.connect(probe.url)
        assert (await ask(p, "j", "join", room="r-gone"))["success"]
        if how == "client":
            await p.close_handshake(code)
        else:
            await p.send({"type": "kick", "code": code, "reason": "bye"})
            assert await p.wait_closed() == code
        msg = await watcher.recv_type("message")
        assert msg["payload"] == {"gone": p.welcome["conn"], "code": code, "rooms": ["r-gone"]}
        await watcher.close()

    run(go())


def test_bad_close_code_from_handler_is_internal(probe: ServerProcess) -> None:
    async def go() -> None:
        p = await WebsocketsPeer.connect(probe.url)
        assert (await ask(p, "k", "kick", code=1006))["code"] == "INTERNAL"  # 1006 is never on the wire
        assert (await ask(p, "k2", "add", a=1, b=1))["data"] == 2
        await p.close()

    run(go())


def test_wsfan_run_cli_and_bad_spec() -> None:
    port = free_port()
    wsfan_bin = str(Path(sys.executable).with_name("wsfan"))
    bad = subprocess.run(
        [wsfan_bin, "run", "apps.nope:app", "--port", str(port)],
        cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "no module named 'apps.nope'" in bad.stderr
    notapp = subprocess.run(
        [wsfan_bin, "run", "apps.probe:Add", "--port", str(port)],
        cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert notapp.returncode == 2 and "is not a wsfan.App" in notapp.stderr
    proc = subprocess.Popen(
        [wsfan_bin, "run", "apps.probe:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=proc)

        async def go() -> None:
            async with connect(f"ws://127.0.0.1:{port}/ws") as c:
                assert await c.request(probe_app.Add(a=20, b=1)) == 21

        run(go())
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


@pytest.mark.parametrize(
    "code", ["lowercase", "Not_Upper", "1ABC", "_X", "A B", "A-B", "X" * 65, "É", "", None, 7]
)
def test_an_error_code_that_is_not_upper_case_is_refused_at_construction(code: Any) -> None:
    """PROTOCOL.md: codes are upper case; wsfan.Error("lowercase", ...) was sent as is."""
    import wsfan

    with pytest.raises(
        ValueError, match=r"wsfan.Error's code must be upper case: 1-64 characters of A-Z 0-9 _"
    ):
        wsfan.Error(code, "m")


@pytest.mark.parametrize("code", ["X", "NOT_FOUND", "E2", "A" * 64, "OUT_OF_STOCK"])
def test_upper_case_error_codes_are_accepted(code: str) -> None:
    import wsfan

    assert wsfan.Error(code, "m").code == code


def test_the_message_base_class_is_refused_at_registration() -> None:
    """@app.message(wsfan.Message) was accepted and did nothing (no message is the base class)."""
    import wsfan

    app = wsfan.App()
    with pytest.raises(TypeError, match=r"wsfan.Message is the base class; register a subclass with a tag"):
        app.message(wsfan.Message)
    assert app.handlers == {}


def test_import_wsfan_stays_cheap() -> None:
    code = "import sys, wsfan; assert 'wsfan.server' not in sys.modules; wsfan.App; assert 'wsfan.server.application' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_an_app_whose_message_type_has_no_tag_does_not_start() -> None:
    """``class Shout(wsfan.Message)`` without ``tag=`` would be ``{"type":"Shout"}`` on the wire
    (msgspec's default, the class name): ``@app.message(Shout)`` raises ``TypeError`` naming the
    class and the fix, so ``wsfan run`` stops with exit code 2 and that line. Before, the server
    started and served ``"Shout"``, a type the developer never chose (the test timed out)."""
    wsfan_bin = str(Path(sys.executable).with_name("wsfan"))
    refused = subprocess.run(
        [wsfan_bin, "run", "apps.untagged:app", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "Shout has no tag: its wire type would silently be 'Shout'" in refused.stderr
    assert "class Shout(wsfan.Message, tag='...')" in refused.stderr


def test_a_message_type_must_declare_its_own_tag() -> None:
    """The rule of ``App.message`` (``wire.declared_tag``): the registered class itself says
    ``tag=`` (a string, a callable, or True for the class name, asked for); a base class without
    one is fine as long as it is not registered; a subclass of a tagged type that declares none
    (it would share its parent's wire type) is refused."""
    import wsfan

    app = wsfan.App()

    class Base(wsfan.Message):  # shared fields, never registered
        room: str = ""

    class Say(Base, tag="say"):
        text: str = ""

    class Loud(Say):  # inherits "say"
        pass

    class Named(wsfan.Message, tag=True):  # the class name, explicitly
        pass

    app.message(Say)(lambda conn, msg: None)
    app.message(Named)(lambda conn, msg: None)
    with pytest.raises(TypeError, match="Base has no tag"):
        app.message(Base)
    with pytest.raises(
        TypeError, match="Loud declares no tag of its own: it would share the wire type 'say' with Say"
    ):
        app.message(Loud)
    assert msgspec.json.encode(Say(text="hi")) == b'{"type":"say","text":"hi"}'


def test_declaring_mistakes_are_refused() -> None:
    import msgspec

    import wsfan

    app = wsfan.App()
    with pytest.raises(TypeError):
        app.message(msgspec.Struct)  # not a wsfan.Message

    class Ping(wsfan.Message, tag="ping"):
        pass

    with pytest.raises(ValueError, match="built-in"):
        app.message(Ping)  # would shadow the built-in ping
    with pytest.raises(ValueError):
        wsfan.Error("")
    with pytest.raises(ValueError):
        wsfan.Error("X", status=500)

    async def coro(request: Any) -> None: ...

    with pytest.raises(TypeError):
        app.on_connect(coro)
    app.message(probe_app.Add)(lambda conn, msg: None)
    with pytest.raises(ValueError):
        app.message(probe_app.Add)(lambda conn, msg: None)
    with pytest.raises(RuntimeError):
        asyncio.run(app.publish("r", 1))  # not served


_SAFE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(?:\[[0-9]{1,9}\]|\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,16}")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_field_path_in_errors_is_only_schema_names_and_indexes(tail: str) -> None:
    """Whatever follows ``- at `$.`` in msgspec's text (a dict key a client chose, say), the reply
    repeats only a path of field names and list indexes, never the rest."""
    text = describe_invalid(msgspec.ValidationError(f"Expected `int`, got `str` - at `$.{tail}`"))
    m = re.fullmatch(r"invalid value for '(.*)'", text)
    if m is not None:
        assert _SAFE_PATH.fullmatch(m.group(1)) and tail.startswith(m.group(1))
    else:
        assert text in FIELD_RULES.values() or text.startswith("the message must be")


def test_nested_path_from_a_real_schema() -> None:
    decoder = msgspec.json.Decoder(probe_app.Order)
    with pytest.raises(msgspec.ValidationError) as err:
        decoder.decode(b'{"type":"order","items":[{"name":"a","qty":1},{"name":"b","qty":0}]}')
    assert describe_invalid(err.value) == "invalid value for 'items[1].qty'"


_join_decoder = msgspec.json.Decoder(Join)


def _wire_takes(name: str) -> bool:
    """Whether a client's ``join`` naming ``name`` passes the wire's schema."""
    try:
        _join_decoder.decode(msgspec.json.encode({"type": "join", "room": name}))
    except msgspec.ValidationError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=140), st.from_regex(r"[A-Za-z0-9_.:$ -]{0,130}", fullmatch=True)))
def test_the_application_api_takes_exactly_the_rooms_the_wire_takes(name: str) -> None:
    """conn.join, conn.leave and app.publish accept a name iff a client's join could carry it;
    a refused call changes nothing, and the hub never holds a room the wire could not name."""
    from test_hub import RecordingPeer, make_hub
    from test_hub import run as run_hub

    import wsfan

    hub, scheduled = make_hub()
    app = wsfan.App()
    app.attach(SimpleNamespace(hub=hub))  # type: ignore[arg-type]
    peer = RecordingPeer()
    conn = wsfan.Conn(hub, hub.open(peer, Encoding.JSON))
    takes = _wire_takes(name)
    assert takes == valid_room(name)
    calls = [
        lambda: conn.join(name),
        lambda: asyncio.run(app.publish(name, {"n": 1})),
        lambda: conn.leave(name),
    ]
    for call in calls:
        if takes:
            call()
        else:
            with pytest.raises(ValueError, match=re.escape(ROOM_RULE)):
                call()
    run_hub(scheduled)
    delivered = [m for m in peer.messages() if m["type"] == "message"]
    if takes:
        assert delivered == [
            {"type": "message", "room": name, "seq": 1, "from": "server", "payload": {"n": 1}}
        ]
    else:
        assert delivered == [] and hub.rooms == {} and hub.broker.rooms == {}
    assert conn.rooms == frozenset()
    assert all(valid_room(r) for r in hub.rooms) and all(valid_room(r) for r in hub.broker.rooms)
