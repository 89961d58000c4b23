"""GET /rooms: active rooms with subscriber counts summed over every worker and node (admin key).

Real server processes: one node, ``--workers 2`` over a real redis-server, and two nodes on it
(one of them stopped, then paused, to show what the survey does without it).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_cluster import connect_until_nodes
from test_server_api import ADMIN, call, start

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.ports import free_port
from helpers.servers import ServerProcess
from helpers.waiting import run
from wsfan.server.control import SURVEY_TIMEOUT_S


def counts(reply: dict[str, Any]) -> dict[str, int]:
    return {r["room"]: r["subscribers"] for r in reply["rooms"]}


async def joined(url: str, *rooms: str) -> WebsocketsPeer:
    p = await WebsocketsPeer.connect(url)
    for room in rooms:
        assert (await p.request("join", room=room))["success"]
    return p


def test_one_node_filters_and_pages(make_server: type[ServerProcess]) -> None:
    srv, base = start(make_server)

    async def go() -> None:
        peers = [
            await joined(srv.url, "chat:a", "news"),
            await joined(srv.url, "chat:a", "chat:b"),
        ]
        status, reply = await call("GET", base + "/rooms")
        assert status == 200 and reply == {
            "node": peers[0].welcome["node"],
            "rooms": [
                {"room": "chat:a", "subscribers": 2},
                {"room": "chat:b", "subscribers": 1},
                {"room": "news", "subscribers": 1},
            ],  # the control rooms ($wsfan.*) are never shown
            "next": None,
            "nodes": [peers[0].welcome["node"]],
            "missing": [],
        }
        assert counts((await call("GET", base + "/rooms?prefix=chat:"))[1]) == {"chat:a": 2, "chat:b": 1}
        # Pages by name: each one's next is the following one's after.
        pages, after = [], ""
        while True:
            status, reply = await call("GET", base + f"/rooms?limit=2&after={after}")
            assert status == 200
            pages.append([r["room"] for r in reply["rooms"]])
            if reply["next"] is None:
                break
            after = reply["next"]
        assert pages == [["chat:a", "chat:b"], ["news"]]
        await peers[0].close()
        # Rooms without subscribers are gone from the answer.
        assert counts((await call("GET", base + "/rooms"))[1]) == {"chat:a": 1, "chat:b": 1}
        await peers[1].close()

    run(go())


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=10001", "limit=x", "limit=1&limit=2", "prefix=bad%20room", "after=a&after=b"],
)
def test_bad_parameters(make_server: type[ServerProcess], query: str) -> None:
    _, base = start(make_server)
    status, reply = run(call("GET", f"{base}/rooms?{query}"))
    assert status == 400 and query.split("=")[0] in reply["error"], reply


def test_summed_over_two_workers(redis_server, make_server: type[ServerProcess]) -> None:
    http_port = free_port()
    srv = make_server(
        "--workers", "2", "--broker", redis_server.url, "--admin-key", ADMIN,
        "--http-port", str(http_port), "--rate-limit", "0",
    ).start()  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"

    async def go() -> None:
        peers = await connect_until_nodes(srv.url, 2, at_least=4)
        workers = sorted({p.welcome["node"] for p in peers})
        assert len(workers) == 2, f"connections spread over both workers: {workers}"
        first = [p for p in peers if p.welcome["node"] == workers[0]]
        for p in peers:
            assert (await p.request("join", room="everyone"))["success"]
        for p in first:
            assert (await p.request("join", room="first-only"))["success"]
        expected = {"everyone": len(peers), "first-only": len(first)}
        # The kernel hands each HTTP connection to either worker: every answer is the sum.
        for _ in range(8):
            status, reply = await call("GET", base + "/rooms")
            assert status == 200 and counts(reply) == expected, reply
            assert reply["nodes"] == workers and reply["missing"] == []
        for p in peers:
            await p.close()

    run(go())


def test_summed_over_two_nodes(redis_server, make_server: type[ServerProcess]) -> None:
    a, base_a = start(make_server, "--broker", redis_server.url)
    b, base_b = start(make_server, "--broker", redis_server.url)

    async def go() -> None:
        on_a = [await joined(a.url, "shared") for _ in range(2)]
        on_b = [await joined(b.url, "shared", "b-only")]
        node_a, node_b = on_a[0].welcome["node"], on_b[0].welcome["node"]
        for base in (base_a, base_b):
            status, reply = await call("GET", base + "/rooms")
            assert status == 200 and counts(reply) == {"shared": 3, "b-only": 1}, reply
            assert reply["nodes"] == sorted([node_a, node_b]) and reply["missing"] == []

        # A node that stops cleanly leaves the control room's presence: no one waits for it.
        for p in on_b:
            await p.close()
        assert b.stop() == 0
        status, reply = await call("GET", base_a + "/rooms")
        assert counts(reply) == {"shared": 2} and reply["nodes"] == [node_a] and reply["missing"] == []
        for p in on_a:
            await p.close()

    run(go())


def test_a_node_that_does_not_answer_is_named(redis_server, make_server: type[ServerProcess]) -> None:
    a, base_a = start(make_server, "--broker", redis_server.url)
    b, _ = start(make_server, "--broker", redis_server.url)

    async def go() -> None:
        pa = await PicowsPeer.connect(a.url)
        pb = await PicowsPeer.connect(b.url)
        for p in (pa, pb):
            assert (await p.request("join", room="r"))["success"]
        b.pause()  # SIGSTOP: still in the control room's presence, answers nothing
        try:
            status, reply = await call("GET", base_a + "/rooms")  # comes back after the survey's timeout
            assert status == 200 and counts(reply) == {"r": 1}
            assert reply["nodes"] == [pa.welcome["node"]] and reply["missing"] == [pb.welcome["node"]]
        finally:
            b.resume()
        status, reply = await call("GET", base_a + "/rooms")
        assert counts(reply) == {"r": 2} and reply["missing"] == []
        await pa.close()
        await pb.close()

    run(go())


def test_a_killed_node_is_named_and_not_waited_for(redis_server, make_server: type[ServerProcess]) -> None:
    """kill -9 leaves a node in the control room's presence for --presence-ttl (60 s), but its Redis
    connection closes at once: GET /rooms answers as soon as the live nodes replied (before: after
    the whole 2 s survey timeout, on every request for a minute) and names it in ``missing``. A
    paused node (connection open, no answer) is still waited for: test above."""
    a, base_a = start(make_server, "--broker", redis_server.url)
    b, _ = start(make_server, "--broker", redis_server.url)
    c, _ = start(make_server, "--broker", redis_server.url)

    async def go() -> None:
        pa, pb, pc = [await joined(s.url, "r") for s in (a, b, c)]
        node_a, node_b, node_c = (p.welcome["node"] for p in (pa, pb, pc))
        status, reply = await call("GET", base_a + "/rooms")
        assert status == 200 and counts(reply) == {"r": 3} and reply["missing"] == [], reply
        c.kill()  # SIGKILL: no leave, its presence entry stays until its TTL
        for _ in range(3):
            started = time.monotonic()
            status, reply = await call("GET", base_a + "/rooms")
            took = time.monotonic() - started
            assert status == 200 and counts(reply) == {"r": 2}, reply
            assert reply["nodes"] == sorted([node_a, node_b]) and reply["missing"] == [node_c], reply
            assert took < SURVEY_TIMEOUT_S / 2, f"waited {took:.2f} s for a dead node"
        await pa.close()
        await pb.close()

    run(go())


def test_broker_down_is_503(redis_server, make_server: type[ServerProcess]) -> None:
    _, base = start(make_server, "--broker", redis_server.url)
    redis_server.stop()
    status, reply = run(call("GET", base + "/rooms"))
    assert status == 503 and reply["error"] == "broker unavailable; retry shortly"


def test_control_traffic_leaves_no_history_in_redis(redis_server, make_server: type[ServerProcess]) -> None:
    """GET /rooms (query and replies), a broadcast, a disconnect and an unsubscribe on two nodes:
    every command arrives, and Redis holds nothing of them: no history stream, no seq counter for
    any ``$wsfan.*`` room; the one key left (the control room's presence) expires by itself."""
    a, base_a = start(make_server, "--broker", redis_server.url)
    b, base_b = start(make_server, "--broker", redis_server.url)

    async def go() -> None:
        pa = await joined(a.url, "shared")
        pb = await joined(b.url, "shared")
        gone = await PicowsPeer.connect(b.url)
        for base in (base_a, base_b):
            status, reply = await call("GET", base + "/rooms")
            assert status == 200 and counts(reply) == {"shared": 2} and reply["missing"] == [], reply
        assert (await call("POST", base_a + "/broadcast", {"payload": {"n": 1}}))[0] == 200
        for p in (pa, pb):
            assert (await p.recv_type("broadcast"))["payload"] == {"n": 1}
        user_b = pb.welcome["user"]
        assert (await call("POST", base_a + "/unsubscribe", {"user": user_b, "room": "shared"}))[0] == 200
        assert (await call("POST", base_a + "/disconnect", {"user": gone.welcome["user"]}))[0] == 200
        await gone.closed.wait()
        assert gone.close_code == 4003
        status, reply = await call("GET", base_a + "/rooms")  # b's unsubscribe was carried out before
        assert counts(reply) == {"shared": 1}, reply

        keys = sorted(k.decode() for k in redis_server.command("KEYS", "*"))
        reserved = [k for k in keys if "$" in k]
        node_a, node_b = pa.welcome["node"], pb.welcome["node"]
        assert reserved == ["wsfan:{$wsfan.control}:p", "wsfan:{$wsfan.control}:x"], keys
        for key in keys:  # every key, reserved or not, expires by itself
            assert redis_server.command("TTL", key) > 0, key
        assert not any(node_a in k or node_b in k for k in keys), keys  # no reply room's key
        for p in (pa, pb):
            await p.close()

    run(go())
