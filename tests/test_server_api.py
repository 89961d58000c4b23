"""Server HTTP API beside POST /publish: POST /broadcast, GET /history, GET /rooms (admin key).

Real server processes over real sockets; the cluster cases run two nodes on a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import msgspec
import pytest

from helpers.peers import WebsocketsPeer
from helpers.ports import free_port
from helpers.rawws import RawWS
from helpers.servers import ServerProcess
from helpers.waiting import run
from wsfan.server.protocol import Encoding, payload_problem

NON_FINITE = "payload has a NaN or infinite float (or a number past the float range)"

ADMIN = "server-api-admin-key-0123456789"


def start(make_server: type[ServerProcess], *args: str) -> tuple[ServerProcess, str]:
    http_port = free_port()
    srv = make_server("--admin-key", ADMIN, "--http-port", str(http_port), *args).start()
    return srv, f"http://127.0.0.1:{http_port}"


async def call(method: str, url: str, body: Any = None, key: str | None = ADMIN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.request(method, url, data=data, headers=headers) as r:
        return r.status, await r.json()


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[ServerProcess, str]]:
    """One node for the module's refusals and bad input, which must change nothing on it (each test checks
    that, on rooms of its own); a test that publishes and then reads the node's whole state starts its own."""
    http_port = free_port()
    srv = ServerProcess("--admin-key", ADMIN, "--http-port", str(http_port)).start()
    yield srv, f"http://127.0.0.1:{http_port}"
    srv.kill()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/broadcast"),
        ("GET", "/history?room=r"),
        ("GET", "/rooms"),
        ("POST", "/publish"),
        ("POST", "/disconnect"),
        ("POST", "/unsubscribe"),
    ],
)
@pytest.mark.parametrize("key", [None, "wrong"])
def test_every_endpoint_needs_the_admin_key(
    node: tuple[ServerProcess, str], method: str, path: str, key: str | None
) -> None:
    status, body = run(call(method, node[1] + path, {"rooms": ["r"], "payload": 1}, key=key))
    assert status == 401 and body == {"error": "missing or wrong admin key"}


def test_off_without_admin_key(make_server: type[ServerProcess]) -> None:
    http_port = free_port()
    make_server("--http-port", str(http_port)).start()
    for method, path in [
        ("POST", "/broadcast"),
        ("GET", "/history?room=r"),
        ("GET", "/rooms"),
        ("POST", "/disconnect"),
        ("POST", "/unsubscribe"),
    ]:
        status, body = run(
            call(method, f"http://127.0.0.1:{http_port}{path}", {"rooms": ["r"], "payload": 1})
        )
        assert status == 404 and "--admin-key" in body["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "JSON"),
        ({"rooms": [], "payload": 1}, "rooms must be a list of 1 to 1000"),
        ({"rooms": ["bad room"], "payload": 1}, "room"),
        ({"rooms": ["a", "a"], "payload": 1}, "distinct"),
        ({"rooms": ["a"]}, "payload"),
        ({"rooms": [f"r{i}" for i in range(1001)], "payload": 1}, "rooms must be a list of 1 to 1000"),
        ({"rooms": ["a"], "payload": 2**64}, "64"),
    ],
)
def test_broadcast_bad_input_publishes_nothing(
    node: tuple[ServerProcess, str], body: Any, needle: str
) -> None:
    base = node[1]

    async def go() -> None:
        status, reply = await call("POST", base + "/broadcast", body)
        assert status == 400 and needle in reply["error"], reply
        status, hist = await call("GET", base + "/history?room=a")
        assert status == 200 and hist["seq"] == 0 and hist["publications"] == []

    run(go())


def test_broadcast_history_rooms(make_server: type[ServerProcess]) -> None:
    srv, base = start(make_server)  # its own node: GET /rooms must list exactly this test's rooms

    async def go() -> None:
        a = await WebsocketsPeer.connect(srv.url)
        b = await WebsocketsPeer.connect(srv.url, msgpack=True)
        for p, room in ((a, "r1"), (b, "r2"), (b, "r1")):
            await p.send({"type": "join", "room": room, "id": "j"})
            assert (await p.recv_type("ack"))["success"]
        status, reply = await call(
            "POST", base + "/broadcast", {"rooms": ["r1", "r2", "r3"], "payload": {"n": 1}}
        )
        assert status == 200 and reply == {
            "results": [{"room": "r1", "seq": 1}, {"room": "r2", "seq": 1}, {"room": "r3", "seq": 1}]
        }
        assert (await a.recv_type("message"))["payload"] == {"n": 1}
        got = {(await b.recv_type("message"))["room"] for _ in range(2)}
        assert got == {"r1", "r2"}
        await b.send({"type": "publish", "room": "r1", "payload": [1, "x"], "id": "p"})
        assert (await b.recv_type("ack"))["data"]["seq"] == 2
        status, hist = await call("GET", base + "/history?room=r1")
        assert status == 200 and hist["room"] == "r1" and hist["seq"] == 2 and hist["epoch"]
        assert hist["publications"] == [
            {"seq": 1, "from": "server", "payload": {"n": 1}},
            {"seq": 2, "from": b.welcome["user"], "payload": [1, "x"]},  # MessagePack, shown as JSON
        ]
        status, hist = await call("GET", base + "/history?room=r1&since=1")
        assert [p["seq"] for p in hist["publications"]] == [2]
        status, rooms = await call("GET", base + "/rooms")
        assert status == 200 and rooms["rooms"] == [
            {"room": "r1", "subscribers": 2},
            {"room": "r2", "subscribers": 1},
        ]
        assert rooms["node"] == a.welcome["node"]
        await a.close()
        await b.close()

    run(go())


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?room=bad room",
        "?room=a&room=b",
        "?room=a&since=-1",
        "?room=a&since=x",
        "?room=a&since=1&since=2",
    ],
)
def test_history_bad_input(node: tuple[ServerProcess, str], query: str) -> None:
    status, reply = run(call("GET", node[1] + "/history" + query))
    assert status == 400 and ("room" in reply["error"] or "since" in reply["error"])


def test_broadcast_and_history_across_nodes(redis_server, make_server: type[ServerProcess]) -> None:
    a, base_a = start(make_server, "--broker", redis_server.url)
    b, base_b = start(make_server, "--broker", redis_server.url)

    async def go() -> None:
        peer = await WebsocketsPeer.connect(b.url)
        await peer.send({"type": "join", "room": "x1", "id": "j"})
        assert (await peer.recv_type("ack"))["success"]
        status, reply = await call("POST", base_a + "/broadcast", {"rooms": ["x1", "x2"], "payload": "hi"})
        assert status == 200 and [r["seq"] for r in reply["results"]] == [1, 1]
        msg = await peer.recv_type("message")
        assert (msg["room"], msg["payload"]) == ("x1", "hi")
        status, hist = await call("GET", base_b + "/history?room=x2")
        assert status == 200 and hist["publications"] == [{"seq": 1, "from": "server", "payload": "hi"}]
        await peer.close()

    run(go())


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/disconnect", b"[", "JSON"),
        ("/disconnect", {}, "user"),
        ("/disconnect", {"user": ""}, "user"),
        ("/disconnect", {"user": "u", "code": 1006}, "code"),
        ("/disconnect", {"user": "u", "code": 5000}, "code"),
        ("/disconnect", {"user": "u", "reason": "x" * 124}, "123 bytes"),
        ("/unsubscribe", {"user": "u"}, "room"),
        ("/unsubscribe", {"user": "u", "room": "bad room"}, "room"),
        ("/unsubscribe", {"user": "u", "room": "r", "reason": "x" * 257}, "reason"),
    ],
)
def test_commands_bad_input_change_nothing(
    node: tuple[ServerProcess, str], path: str, body: Any, needle: str
) -> None:
    srv, base = node

    async def go() -> None:
        p = await WebsocketsPeer.connect(srv.url)
        assert (await p.request("join", room="r"))["success"]
        user = p.welcome["user"]
        # "u" stands for this connection's user: a bad command about it must leave it alone.
        aimed = {**body, "user": user} if isinstance(body, dict) and body.get("user") == "u" else body
        status, reply = await call("POST", base + path, aimed)
        assert status == 400 and needle in reply["error"], reply
        assert (await p.request("publish", room="r", payload=1))["success"]  # still connected and in the room
        await p.close()

    run(go())


SECRET = "server-api-jwt-secret-0123456789abcdef"


def _token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture(params=["single", "cluster"])
def auth_nodes(
    request: pytest.FixtureRequest, make_server: type[ServerProcess]
) -> list[tuple[ServerProcess, str]]:
    """One node, or two on a real redis-server; each with its server-API base URL."""
    if request.param == "single":
        return [start(make_server, "--jwt-secret", SECRET)]
    redis = request.getfixturevalue("redis_server")
    return [start(make_server, "--broker", redis.url, "--jwt-secret", SECRET) for _ in range(2)]


def test_disconnect_closes_every_connection_of_the_user(auth_nodes: list[tuple[ServerProcess, str]]) -> None:
    base = auth_nodes[0][1]

    async def go() -> None:
        mine = [
            await WebsocketsPeer.connect(f"{s.url}?token={_token('ann')}")
            for s, _ in auth_nodes
            for _ in range(2)
        ]
        other = await WebsocketsPeer.connect(f"{auth_nodes[-1][0].url}?token={_token('bob')}")
        status, reply = await call(
            "POST", base + "/disconnect", {"user": "ann", "code": 4100, "reason": "bye"}
        )
        assert status == 200 and reply == {"user": "ann", "code": 4100}
        for p in mine:
            assert await p.wait_closed() == 4100
        assert (await other.request("ping"))["type"] == "pong"  # someone else: untouched
        status, reply = await call("POST", base + "/disconnect", {"user": "bob"})
        assert status == 200 and await other.wait_closed() == 4003  # the default code

    run(go())


def test_a_disconnected_user_leaves_presence_at_once(make_server: type[ServerProcess]) -> None:
    """POST /disconnect: the user's connection leaves presence (and its rooms) as soon as the server
    closes it, not when its client answers the close frame. A client that never answers (here a raw
    socket that stops reading) stayed in presence for the close grace, 2 s (hostile finding)."""
    srv, base = start(make_server, "--jwt-secret", SECRET, "--presence")
    ws = RawWS.connect("127.0.0.1", srv.port, path=f"/ws?token={_token('ann')}")
    ws.recv_message()  # welcome
    ws.send_text(b'{"type":"join","id":"j","room":"lobby"}')
    ws.recv_message()  # the ack

    async def stats() -> int:
        status, reply = await call("GET", base + "/presence_stats?room=lobby")
        assert status == 200, reply
        return int(reply["connections"])

    async def go() -> None:
        assert await stats() == 1
        status, _ = await call("POST", base + "/disconnect", {"user": "ann"})
        assert status == 200
        started = time.monotonic()
        while await stats() and time.monotonic() - started < 5:
            await asyncio.sleep(0.02)
        assert time.monotonic() - started < 0.5, "still in presence while its close handshake is pending"

    run(go())
    assert ws.recv_frame(timeout=2).close_info()[0] == 4003  # the close frame came all the same
    ws.close()


def test_unsubscribe_takes_the_user_out_of_one_room(auth_nodes: list[tuple[ServerProcess, str]]) -> None:
    base = auth_nodes[0][1]
    ann_node, ann_base = auth_nodes[-1]

    async def go() -> None:
        ann = await WebsocketsPeer.connect(f"{ann_node.url}?token={_token('ann')}")
        pub = await WebsocketsPeer.connect(f"{auth_nodes[0][0].url}?token={_token('pub')}")
        for p in (ann, pub):
            for room in ("a", "b"):
                assert (await p.request("join", room=room))["success"]
        status, reply = await call(
            "POST", base + "/unsubscribe", {"user": "ann", "room": "a", "reason": "moved"}
        )
        assert status == 200 and reply == {"user": "ann", "room": "a"}
        # It takes effect on each node as the command arrives, and tells the connection.
        assert await ann.recv_type("unsubscribed") == {"type": "unsubscribed", "room": "a", "reason": "moved"}
        assert {"room": "a", "subscribers": 1} in (await call("GET", ann_base + "/rooms"))[1]["rooms"]
        assert (await pub.request("publish", room="a", payload="to-a"))["success"]
        assert (await pub.request("publish", room="b", payload="to-b"))["success"]
        msg = await ann.recv_type("message")
        assert (msg["room"], msg["payload"]) == ("b", "to-b")
        assert (await ann.request("join", room="a"))["success"]  # may come back: not a ban
        await ann.close()
        await pub.close()

    run(go())


# ---------------------------------------------------------------- the server API's error texts


def test_the_413_states_the_limit_it_enforces(node: tuple[ServerProcess, str]) -> None:
    """The body limit is --max-message-size + 1024 (app-api.md); the 413 said 'body larger than 65536
    bytes' while 66,429 bytes were accepted. The number it states is the largest body accepted."""
    base = node[1]

    def body(size: int) -> bytes:
        head = b'{"room":"big-body","payload":"'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    async def go() -> None:
        status, reply = await call("POST", base + "/publish", body(70_000))
        assert status == 413, reply
        assert reply["error"] == (
            "body larger than 66560 bytes (--max-message-size 65536 + 1024 for the JSON around the payload)"
        )
        limit = int(reply["error"].split()[3])
        assert (await call("POST", base + "/publish", body(limit + 1)))[0] == 413
        status, reply = await call("POST", base + "/publish", body(limit))
        assert status != 413, reply

    run(go())


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/publish", b"[1]", "body must be a JSON object {'room','payload'}"),
        ("/publish", b"1", "body must be a JSON object {'room','payload'}"),
        ("/broadcast", b'"x"', "body must be a JSON object {'rooms'?,'payload'}"),
        ("/disconnect", b"[]", "body must be a JSON object {'user','code','reason'}"),
        ("/unsubscribe", b"null", "body must be a JSON object {'user','room','reason'}"),
        (
            "/broadcast",
            {"rooms": [], "payload": 1},
            "body must be a JSON object {'rooms'?,'payload'}: rooms must be a list of 1 to 1000 distinct "
            "room names (or absent, to send to every connection)",
        ),
        (
            "/broadcast",
            {"rooms": [f"r{i}" for i in range(1001)], "payload": 1},
            "body must be a JSON object {'rooms'?,'payload'}: rooms must be a list of 1 to 1000 distinct "
            "room names (or absent, to send to every connection)",
        ),
        (
            "/broadcast",
            {"rooms": ["a", "bad room"], "payload": 1},
            "body must be a JSON object {'rooms'?,'payload'}: rooms[1]: room must be 1-128 characters of "
            "A-Z a-z 0-9 _ . : -",
        ),
        ("/publish", b'{"room":"a","payload":1e400}', NON_FINITE),
        ("/broadcast", b'{"rooms":["a"],"payload":-1e400}', NON_FINITE),
        ("/broadcast", b'{"payload":[1e999]}', NON_FINITE),
        (
            "/disconnect",
            {"user": "u", "code": "x"},
            "body must be a JSON object {'user','code','reason'}: code must be an integer: 1000, 1001, 1008, "
            "1011 or 4000-4999 (RFC 6455 7.4)",
        ),
    ],
)
def test_server_api_bad_bodies_are_told_in_http_words(
    node: tuple[ServerProcess, str], path: str, body: Any, expected: str
) -> None:
    """No 'type' field (HTTP bodies have none), the 1-1000 range of rooms, one sentence for a
    non-finite number in either encoding; nothing is published."""
    base = node[1]

    async def go() -> None:
        status, reply = await call("POST", base + path, body)
        assert (status, reply) == (400, {"error": expected})
        status, hist = await call("GET", base + "/history?room=a")
        assert status == 200 and hist["seq"] == 0

    run(go())


def test_non_finite_is_one_sentence_in_both_encodings() -> None:
    assert payload_problem(b"1e400", Encoding.JSON) == NON_FINITE
    assert payload_problem(msgspec.msgpack.encode(float("nan")), Encoding.MSGPACK) == NON_FINITE
    assert payload_problem(msgspec.msgpack.encode([float("-inf")]), Encoding.MSGPACK) == NON_FINITE


@pytest.mark.parametrize(
    ("path", "body", "answer"),
    [
        ("/publish", {"room": "extra-a", "payload": 1, "extra": 2}, {"room": "extra-a", "seq": 1}),
        (
            "/broadcast",
            {"rooms": ["extra-b"], "payload": 1, "x": {}},
            {"results": [{"room": "extra-b", "seq": 1}]},
        ),
        ("/broadcast", {"payload": 1, "later": True}, {"to": "all"}),
        ("/disconnect", {"user": "nobody", "v": 2}, {"user": "nobody", "code": 4003}),
        ("/unsubscribe", {"user": "nobody", "room": "r", "v": 2}, {"user": "nobody", "room": "r"}),
    ],
)
def test_unknown_body_fields_are_ignored_as_on_the_websocket(
    node: tuple[ServerProcess, str], path: str, body: Any, answer: Any
) -> None:
    """docs/protocol-choices.md: unknown fields are ignored (were 400 'a field that is not in the schema')."""
    assert run(call("POST", node[1] + path, body)) == (200, answer)
