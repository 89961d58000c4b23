"""Server HTTP API beside POST /publish: POST /broadcast, GET /history, GET /rooms (admin key).

Real server processes over real sockets; the cluster cases run two nodes on a real redis-server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from helpers.peers import WebsocketsPeer
from helpers.ports import free_port
from helpers.servers import ServerProcess
from helpers.waiting import run

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


@pytest.fixture
def node(make_server: type[ServerProcess]) -> Iterator[tuple[ServerProcess, str]]:
    yield start(make_server)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/broadcast"), ("GET", "/history?room=r"), ("GET", "/rooms"), ("POST", "/publish")],
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
    for method, path in [("POST", "/broadcast"), ("GET", "/history?room=r"), ("GET", "/rooms")]:
        status, body = run(
            call(method, f"http://127.0.0.1:{http_port}{path}", {"rooms": ["r"], "payload": 1})
        )
        assert status == 404 and "--admin-key" in body["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "JSON"),
        ({"rooms": [], "payload": 1}, "rooms"),
        ({"rooms": ["bad room"], "payload": 1}, "room"),
        ({"rooms": ["a", "a"], "payload": 1}, "distinct"),
        ({"rooms": ["a"]}, "payload"),
        ({"rooms": ["a"], "payload": 1, "extra": 1}, "not in the schema"),
        ({"rooms": [f"r{i}" for i in range(1001)], "payload": 1}, "rooms"),
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


def test_broadcast_history_rooms(node: tuple[ServerProcess, str]) -> None:
    srv, base = node

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
