"""before_join / before_publish hooks that allow, refuse, rewrite or fail (docs/app-api.md, "Hooks").

Real server processes serving tests/apps/hooks.py, with a JWT whose ``rooms`` claim is
``s-*`` and ``a-*``: every outcome for a join and a publish, by a sync hook (``s-`` rooms)
and an async one (``a-`` rooms). A property test drives the hub alone with generated rooms
and payloads through a rewriting hook.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import jwt
import msgspec
import pytest
import websockets
from apps import hooks as hooks_app
from hypothesis import given, settings
from hypothesis import strategies as st
from test_app_api import ENV
from test_hub import RecordingPeer, make_hub, send
from test_hub import run as run_hub

import wsfan
from helpers.peers import WebsocketsPeer
from helpers.ports import free_port
from helpers.servers import ServerProcess
from helpers.waiting import run
from wsfan.client import connect
from wsfan.server.protocol import Encoding, payload_problem
from wsfan.server.wire import valid_room

SECRET = "app-hooks-test-secret-0123456789abcdef"
CLAIM = ["s-*", "a-*"]


def token(user: str = "ann", rooms: list[str] | None = CLAIM) -> str:
    claims: dict[str, Any] = {"sub": user, "exp": int(time.time()) + 600}
    if rooms is not None:
        claims["rooms"] = rooms
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def hooks() -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--app", "apps.hooks:app", "--jwt-secret", SECRET, "--rate-limit", "0", env=ENV
    ).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def hooks_http() -> Iterator[tuple[ServerProcess, int]]:
    http_port = free_port()
    srv = ServerProcess(
        "--app", "apps.hooks:app", "--jwt-secret", SECRET, "--rate-limit", "0",
        "--http-port", str(http_port), env=ENV,
    ).start()  # fmt: skip
    yield srv, http_port
    srv.kill()


async def sse_events(http_port: int, room: str) -> tuple[int, list[tuple[str, str]]]:
    """``GET /sse`` for ``room`` with the test token, read until the server ends the stream:
    the HTTP status and the ``(event, data)`` pairs (comments left out; ``message`` when unnamed)."""
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{http_port}/sse"
        async with http.get(url, params={"room": room, "token": token()}) as r:
            body = await asyncio.wait_for(r.content.read(), 10)
            status = r.status
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append((fields.get("event", "message"), fields.get("data", "")))
    return status, events


@pytest.mark.parametrize("p", ["s", "a"], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("what", "code", "message", "close"),
    [
        ("deny", "FORBIDDEN", "not allowed to join '{room}'", 1008),
        ("refuse", "ROOM_FULL", "the room is full", 1008),
        ("escape", "FORBIDDEN", "not allowed to join '{room}'", 1008),
        ("bad", "INTERNAL", "the server's before_join hook gave an invalid room", 1011),
        ("crash", "INTERNAL", "internal error", 1011),
    ],
)
def test_an_sse_join_refused_by_a_hook_tells_the_code_and_message(
    hooks_http: tuple[ServerProcess, int], p: str, what: str, code: str, message: str, close: int
) -> None:
    """EventSource can read only a 200 stream: the refusal is an ``error`` event, then ``close``."""
    room = f"{p}-{what}"
    status, events = run(sse_events(hooks_http[1], room))
    assert status == 200
    assert events == [
        ("error", json.dumps({"code": code, "message": message.format(room=room)}, separators=(",", ":"))),
        ("close", str(close)),
    ]


@pytest.mark.parametrize("p", ["s", "a"], ids=["sync", "async"])
def test_an_sse_stream_is_told_the_room_its_join_took_effect_in(
    hooks_http: tuple[ServerProcess, int], p: str
) -> None:
    """The ``: joined <room>`` comment names the room a before_join hook moved the join to (the
    room whose deliveries follow, as a WebSocket ack's ``data.room``), once the join took effect;
    a refused join gets no such comment (it used to be written first, naming the room asked for)."""

    async def go() -> None:
        url = f"http://127.0.0.1:{hooks_http[1]}/sse"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, params={"room": f"{p}-lobby", "token": token()}) as r:
                assert r.status == 200
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first == f": joined {p}-lobby.eu\n\n".encode()
            async with http.get(url, params={"room": f"{p}-deny", "token": token()}) as r:
                body = await asyncio.wait_for(r.content.read(), 5)
            assert body.startswith(b"event: error\n"), body

    run(go())


async def peer(srv: ServerProcess, user: str = "ann", msgpack: bool = False) -> WebsocketsPeer:
    return await WebsocketsPeer.connect(f"{srv.url}?token={token(user)}", msgpack=msgpack)


def error(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["type"] == "error" and reply["success"] is False, reply
    return reply["code"], reply["message"]


@pytest.mark.parametrize("p", ["s", "a"], ids=["sync", "async"])
def test_join_outcomes(hooks: ServerProcess, p: str) -> None:
    async def go() -> None:
        c = await peer(hooks)
        allowed = await c.request("join", room=f"{p}-allow")
        assert allowed["success"] and allowed["data"]["room"] == f"{p}-allow"
        assert error(await c.request("join", room=f"{p}-deny")) == (
            "FORBIDDEN",
            f"not allowed to join '{p}-deny'",
        )
        assert error(await c.request("join", room=f"{p}-refuse")) == ("ROOM_FULL", "the room is full")
        moved = await c.request("join", room=f"{p}-lobby")
        assert moved["success"] and moved["data"]["room"] == f"{p}-lobby.eu", moved
        assert error(await c.request("join", room=f"{p}-bad")) == (
            "INTERNAL", "the server's before_join hook gave an invalid room",
        )  # fmt: skip
        # Rewritten into a room the token's claim does not allow: refused, the claim is checked again.
        assert error(await c.request("join", room=f"{p}-escape")) == (
            "FORBIDDEN", f"not allowed to join '{p}-escape'",
        )  # fmt: skip
        assert error(await c.request("join", room=f"{p}-crash")) == ("INTERNAL", "internal error")
        assert error(await c.request("join", room=f"{p}-weird")) == (
            "INTERNAL", "the server's before_join hook gave an invalid result",
        )  # fmt: skip
        # The hooks run for presence queries too (after the claim), with the same answers.
        assert error(await c.request("presence", room=f"{p}-refuse"))[0] == "ROOM_FULL"
        assert error(await c.request("presence_stats", room=f"{p}-deny")) == (
            "FORBIDDEN", f"not allowed to see who is in '{p}-deny'",
        )  # fmt: skip
        # Nothing but the two accepted joins changed the connection, and it keeps working.
        assert (await c.request("mine"))["data"] == [f"{p}-allow", f"{p}-lobby.eu"]
        assert (await c.request("ping"))["type"] == "pong"

        # Deliveries of the rewritten room reach the connection that asked for the original.
        other = await peer(hooks, "bob")
        assert (await other.request("join", room=f"{p}-lobby.eu"))["success"]
        assert (await other.request("publish", room=f"{p}-lobby.eu", payload="hi"))["success"]
        msg = await c.recv_type("message")
        assert (msg["room"], msg["payload"]) == (f"{p}-lobby.eu", "hi")
        await c.close()
        await other.close()

    run(go())
    out = hooks.output()
    assert f"secret detail join-crash {p}-crash" in out and "Traceback" in out
    assert f"moved a join of '{p}-escape' to 'secret.vault'" in out
    assert "'bad room!', not a room name" in out


def test_the_claim_is_checked_before_any_hook(hooks: ServerProcess) -> None:
    async def go() -> None:
        c = await peer(hooks)
        assert error(await c.request("join", room="secret.vault")) == (
            "FORBIDDEN", "not allowed to join 'secret.vault'",
        )  # fmt: skip
        # A token without the claim lets a hook's rewrite through: the hooks alone decide.
        free = await WebsocketsPeer.connect(f"{hooks.url}?token={token('cy', rooms=None)}")
        moved = await free.request("join", room="s-escape")
        assert moved["success"] and moved["data"]["room"] == "secret.vault"
        await c.close()
        await free.close()

    run(go())


def _publish_raw(rid: str, room: str, payload: str) -> str:
    return f'{{"type":"publish","id":"{rid}","room":"{room}","payload":{payload}}}'


@pytest.mark.parametrize("p", ["s", "a"], ids=["sync", "async"])
def test_publish_outcomes(hooks: ServerProcess, p: str) -> None:
    rooms = [f"{p}-allow", f"{p}-lobby", f"{p}-censor"]  # joined; lobby is moved to lobby.eu

    async def go() -> None:
        pub = await peer(hooks, "pub")
        # The subscriber reads raw text frames: the payload bytes themselves are checked.
        async with websockets.connect(f"{hooks.url}?token={token('sub')}") as sub:
            json.loads(await sub.recv())  # welcome
            for i, room in enumerate(rooms):
                assert (await pub.request("join", room=room))["success"]
                await sub.send(json.dumps({"type": "join", "id": f"j{i}", "room": room}))
                assert json.loads(await sub.recv())["success"]

            odd = '{"b":1,  "a":[1.50,2e0]}'  # not how msgspec would write it: it must arrive as sent
            await pub.send_raw(_publish_raw("p1", f"{p}-allow", odd))
            assert (await pub.recv_type("ack"))["data"] == {"room": f"{p}-allow", "seq": 1}
            moved = await pub.request("publish", room=f"{p}-lobby", payload="x")
            assert moved["success"] and moved["data"]["room"] == f"{p}-lobby.eu", moved
            assert (await pub.request("publish", room=f"{p}-censor", payload={"text": "shout"}))["success"]

            refused = {
                "deny": ("FORBIDDEN", f"not allowed to publish to '{p}-deny'"),
                "refuse": ("TOO_LOUD", "keep it down"),
                "bad": ("INTERNAL", "the server's before_publish hook gave an invalid room"),
                "escape": ("FORBIDDEN", f"not allowed to publish to '{p}-escape'"),
                "crash": ("INTERNAL", "internal error"),
                "weird": ("INTERNAL", "the server's before_publish hook gave an invalid result"),
                "huge": ("INTERNAL", "the server's before_publish hook gave a payload it cannot send"),
                "unsendable": ("INTERNAL", "the server's before_publish hook gave a payload it cannot send"),
            }
            for what, expected in refused.items():
                assert (
                    error(await pub.request("publish", room=f"{p}-{what}", payload={"text": what}))
                    == expected
                )
            assert (await pub.request("publish", room=f"{p}-allow", payload="end"))["data"]["seq"] == 2

            frames = []
            while not frames or '"payload":"end"' not in frames[-1]:
                frames.append(await sub.recv())
            assert [json.loads(f)["room"] for f in frames] == [
                f"{p}-allow",
                f"{p}-lobby.eu",
                f"{p}-censor",
                f"{p}-allow",
            ]
            assert f'"payload":{odd}' in frames[0]  # allowed unchanged: not re-encoded
            assert frames[2].endswith(
                '"payload":{"text":"***","was":5}}'
            )  # rewritten: encoded once, by msgspec
        assert (await pub.request("ping"))["type"] == "pong"
        await pub.close()

    run(go())
    out = hooks.output()
    assert f"secret detail publish-crash {p}-crash" in out
    assert f"moved a publish of '{p}-escape' to 'secret.vault'" in out


def test_rewritten_payload_of_a_msgpack_publisher_reaches_json(hooks: ServerProcess) -> None:
    async def go() -> None:
        pub = await peer(hooks, "mp", msgpack=True)
        sub = await peer(hooks, "js")
        for c in (pub, sub):
            assert (await c.request("join", room="s-censor"))["success"]
        assert (await pub.request("publish", room="s-censor", payload={"text": "héllo"}))["success"]
        msg = await sub.recv_type("message")
        assert msg["payload"] == {"text": "***", "was": 5}
        await pub.close()
        await sub.close()

    run(go())


def test_async_hooks_keep_the_connections_order(hooks: ServerProcess) -> None:
    """A publish sent right behind a join whose async hook is still running waits for that join."""

    async def go() -> None:
        c = await peer(hooks)
        await c.send({"type": "join", "id": "1", "room": "a-lobby"})
        await c.send({"type": "publish", "id": "2", "room": "a-lobby", "payload": 1})
        await c.send({"type": "join", "id": "3", "room": "a-refuse"})
        await c.send({"type": "ping", "id": "4"})
        got = [await c.recv() for _ in range(4)]
        assert [m["requestId"] for m in got] == ["1", "2", "3", "4"]
        assert got[0]["data"]["room"] == got[1]["data"]["room"] == "a-lobby.eu"
        assert got[2]["code"] == "ROOM_FULL" and got[3]["type"] == "pong"
        await c.close()

    run(go())


def test_hook_signatures() -> None:
    app = wsfan.App()

    @app.before_publish
    def two(conn: Any, room: str) -> None: ...

    @app.before_publish
    def three(conn: Any, room: str, payload: Any) -> None: ...

    @app.before_publish
    def star(*args: Any) -> None: ...

    assert [takes for _, takes in app.publish_hooks] == [False, True, True]
    assert repr(wsfan.Publish()) == "Publish(room=None, payload=KEEP)"


# ---------------------------------------------------------------- property: any rewrite, the hub alone


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def _hub_with(hook: Any, kind: str) -> tuple[Any, Any]:
    hub, scheduled = make_hub()
    hub.authorize = lambda s, action, room: not room.startswith("no")  # the claim: anything but no*
    app = wsfan.App()
    (app.before_publish if kind == "publish" else app.before_join)(hook)
    app.attach(SimpleNamespace(hub=hub))  # type: ignore[arg-type]
    return hub, scheduled


rooms_a_hook_may_choose = st.builds(
    str.__add__,
    st.sampled_from(["", "no"]),  # "no...": outside the claim of _hub_with
    st.one_of(st.text(max_size=140), st.from_regex(r"[A-Za-z0-9_.:-]{1,130}", fullmatch=True)),
)


@settings(max_examples=300)
@given(rooms_a_hook_may_choose)
def test_any_room_a_hook_chooses_is_joined_only_if_valid_and_allowed(target: str) -> None:
    hub, scheduled = _hub_with(lambda conn, room: wsfan.Join(room=target), "join")
    peer = RecordingPeer()
    s = hub.open(peer, Encoding.JSON)
    send(hub, s, {"type": "join", "id": "j", "room": "asked"})
    run_hub(scheduled)
    reply = peer.messages()[-1]
    if not valid_room(target):
        assert reply["code"] == "INTERNAL" and set(s.rooms) == set()
    elif target.startswith("no"):
        assert reply["code"] == "FORBIDDEN" and reply["message"] == "not allowed to join 'asked'"
        assert set(s.rooms) == set()
    else:
        assert reply["data"]["room"] == target and set(s.rooms) == {target} and set(hub.rooms) == {target}


def _send(hub: Any, s: Any, obj: dict[str, Any]) -> None:
    if s.encoding is Encoding.MSGPACK:
        hub.receive(s, msgspec.msgpack.encode(obj), 0x2)
    else:
        hub.receive(s, msgspec.json.encode(obj), 0x1)


def _deliverable(value: Any, encoding: Encoding) -> bool:
    try:
        encoded = (msgspec.msgpack if encoding is Encoding.MSGPACK else msgspec.json).encode(value)
    except (OverflowError, msgspec.EncodeError):
        return False
    return payload_problem(encoded, encoding) is None


@settings(max_examples=300)
@given(json_values, st.sampled_from([Encoding.JSON, Encoding.MSGPACK]))
def test_any_payload_a_hook_chooses_is_delivered_as_chosen_or_refused(value: Any, encoding: Encoding) -> None:
    hub, scheduled = _hub_with(lambda conn, room, payload: wsfan.Publish(payload=value), "publish")
    pub = hub.open(RecordingPeer(), encoding)
    sub_peer = RecordingPeer()
    sub = hub.open(sub_peer, Encoding.JSON)
    for s in (pub, sub):
        _send(hub, s, {"type": "join", "room": "r"})
    _send(hub, pub, {"type": "publish", "id": "p", "room": "r", "payload": 0})
    run_hub(scheduled)
    delivered = [m["payload"] for m in sub_peer.messages() if m["type"] == "message"]
    if _deliverable(value, encoding):
        assert delivered == [msgspec.json.decode(msgspec.json.encode(value))]
    else:
        assert delivered == [] and hub.stats.errors.get("INTERNAL") == 1


@pytest.mark.parametrize("p", ["s", "a"], ids=["sync", "async"])
def test_the_python_client_follows_a_join_a_hook_moved(hooks: ServerProcess, p: str) -> None:
    """``join("s-lobby")`` that the hook moves to ``s-lobby.eu``: the client files the join under
    the ack's room, lists it, and hands over its deliveries as the joined room's (docs/app-api.md)."""
    asked, actual = f"{p}-lobby", f"{p}-lobby.eu"

    async def go() -> None:
        async with connect(hooks.url, token()) as c:
            everything = c.messages()
            data = await c.join(asked)
            assert data["room"] == actual
            assert c.rooms == [actual] and c.last_seq(asked) is None
            other = await peer(hooks, "bob")
            assert (await other.request("join", room=actual))["data"]["room"] == actual
            published = await other.request("publish", room=actual, payload={"n": 1})
            msg = await everything.get(5)
            assert (msg.room, msg.seq, msg.payload) == (actual, published["data"]["seq"], {"n": 1})
            assert c.last_seq(actual) == msg.seq and c.stats.messages == 1
            assert await c.request(hooks_app.Mine()) == [actual]
            await c.leave(actual)  # left by the name the ack gave
            assert c.rooms == [] and await c.request(hooks_app.Mine()) == []
            await other.close()

    run(go())


# ---------------------------------------------------------------- HTTP presence: the same hooks

ADMIN = "app-hooks-admin-key-0123456789"


@pytest.fixture(scope="module")
def hooks_presence() -> Iterator[tuple[ServerProcess, int]]:
    http_port = free_port()
    srv = ServerProcess(
        "--app", "apps.hooks:app", "--jwt-secret", SECRET, "--rate-limit", "0", "--presence",
        "--admin-key", ADMIN, "--http-port", str(http_port), env=ENV,
    ).start()  # fmt: skip
    yield srv, http_port
    srv.kill()


@pytest.mark.parametrize("path", ["presence", "presence_stats"])
@pytest.mark.parametrize("p", ["s", "a"], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("what", "status"),
    [
        ("allow", 200),
        ("deny", 403),
        ("refuse", 403),
        ("lobby", 200),
        ("escape", 403),
        ("bad", 500),
        ("crash", 500),
    ],
)
def test_http_presence_by_a_user_runs_the_hooks_a_websocket_request_does(
    hooks_presence: tuple[ServerProcess, int], path: str, p: str, what: str, status: int
) -> None:
    """``GET /presence`` and ``/presence_stats`` with a user's token answer what a WebSocket
    ``presence`` / ``presence_stats`` of the same user gets: the before_join hooks run (refuse,
    move, fail), then the token's claim on a room a hook chose (docs/app-api.md). They were
    skipped: a room the application refuses to show was listed (hostile finding 02). The admin
    key (the operator's API) sees any room, hooks not run."""
    srv, http_port = hooks_presence
    room = f"{p}-{what}"

    async def go() -> None:
        c = await peer(srv)
        ws = await c.request(path, room=room)
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{http_port}/{path}"
            async with http.get(url, params={"room": room, "token": token()}) as r:
                assert r.status == status, await r.text()
                body = await r.json()
            async with http.get(
                url, params={"room": room}, headers={"Authorization": f"Bearer {ADMIN}"}
            ) as r:
                assert r.status == 200 and (await r.json())["room"] == room  # the operator: no hooks
        if status == 200:
            assert ws["success"] and body == ws["data"], (body, ws)
            assert body["room"] == (room + ".eu" if what == "lobby" else room)
        else:
            assert (body["code"], body["error"]) == error(ws), (body, ws)
        await c.close()

    run(go())


def test_http_presence_on_a_server_without_auth_runs_the_hooks(make_server: type[ServerProcess]) -> None:
    """No --jwt-secret: anyone may ask GET /presence, and the application's before_join still
    decides, as for a WebSocket client (examples/chat.py shows chat:* rooms only)."""
    http_port = free_port()
    make_server("--app", "examples.chat:app", "--presence", "--http-port", str(http_port), env=ENV).start()

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            for path in ("presence", "presence_stats"):
                url = f"http://127.0.0.1:{http_port}/{path}"
                async with http.get(url, params={"room": "secret"}) as r:
                    assert r.status == 403
                    assert await r.json() == {
                        "error": "not allowed to see who is in 'secret'",
                        "code": "FORBIDDEN",
                    }
                async with http.get(url, params={"room": "chat:lobby"}) as r:
                    assert r.status == 200 and (await r.json())["room"] == "chat:lobby"

    run(go())


def test_a_hook_cannot_join_an_sse_stream_to_a_second_room(make_server: type[ServerProcess]) -> None:
    """``conn.join`` on an SSE stream for a room it is not in raises ``ValueError``
    (``Conn.join``): a stream carries one room, since a browser resumes it with one
    ``Last-Event-ID`` and ids are ``<epoch>:<seq>`` of one room. Uncaught in the hook, it refuses
    the stream's join as any failing hook does (``INTERNAL``, 1011) and is logged with the rule.
    Before, the stream was in both rooms, the second's ids mixed into the first's numbering.
    A WebSocket connection, which names the room of every delivery, is joined to both. Its own
    server: hook failures are logged one line a second, and the module's server has others."""
    http_port = free_port()
    srv = make_server(
        "--app", "apps.hooks:app", "--jwt-secret", SECRET, "--http-port", str(http_port), env=ENV
    ).start()  # fmt: skip
    status, events = run(sse_events(http_port, "s-also"))
    assert status == 200
    assert events == [("error", '{"code":"INTERNAL","message":"internal error"}'), ("close", "1011")]
    assert "a stream carries only the room it was opened for" in srv.output()

    async def websocket() -> None:
        async with websockets.connect(f"{srv.url}?token={token()}") as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"type": "join", "id": "1", "room": "s-also"}))
            got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
            assert {"type": "subscribed", "room": "s-also.also"}.items() <= got[0].items(), got
            assert got[1]["type"] == "ack" and got[1]["data"]["room"] == "s-also", got

    run(websocket())
