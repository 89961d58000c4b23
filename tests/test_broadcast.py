"""Room-less broadcast to every connection: ``App.broadcast`` and ``POST /broadcast`` without rooms.

``{"type":"broadcast","payload"}`` (PROTOCOL.md) reaches every WebSocket connection once, on one
node, over ``--workers 2`` and over two nodes on a real redis-server, in each connection's
encoding and compression. Real server processes over real sockets.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_cluster import connect_until_nodes
from test_compression import OFFER, inflate
from test_server_api import ADMIN, call

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.ports import free_port
from helpers.rawws import RSV1, RawWS
from helpers.servers import ROOT, ServerProcess
from helpers.waiting import run, until

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
END = "end"


Peer = PicowsPeer | WebsocketsPeer
_ids = itertools.count()


def check(msg: dict[str, Any]) -> Any:
    assert set(msg) == {"type", "payload"}, msg  # no room, no seq, no from
    return msg["payload"]


async def broadcasts_until_end(p: Peer, seen: list[Any] | None = None) -> list[Any]:
    """Every broadcast payload ``p`` received (``seen``: those read while waiting for an ack) up to ``END``."""
    got = list(seen or [])
    while not got or got[-1] != END:
        got.append(check(await p.recv_type("broadcast")))
    return got


async def shout(p: Peer, payload: Any, seen: list[Any]) -> None:
    """Ask the probe app to ``app.broadcast(payload)``; returns once the broker took it (the ack).

    Broadcasts that arrive meanwhile go to ``seen``, in order (ours may come before our ack).
    """
    rid = f"s{next(_ids)}"
    await p.send({"type": "shout", "id": rid, "payload": payload})
    while True:
        msg = await p.recv()
        if msg.get("type") == "broadcast":
            seen.append(check(msg))
        elif msg.get("requestId") == rid:
            assert msg["type"] == "ack" and msg["success"], msg
            return


def test_app_broadcast_reaches_every_connection_once_in_its_encoding(
    make_server: type[ServerProcess],
) -> None:
    srv = make_server("--app", "apps.probe:app", "--rate-limit", "0", env=ENV).start()

    async def go() -> None:
        peers = [
            await PicowsPeer.connect(srv.url),
            await PicowsPeer.connect(srv.url, msgpack=True),
            await WebsocketsPeer.connect(srv.url),
            await WebsocketsPeer.connect(srv.url, msgpack=True),
        ]
        assert (await peers[0].request("join", room="busy"))["success"]  # in a room or not: all get it
        seen: list[Any] = []
        for payload in ({"n": 1}, [2, "two"], END):
            await shout(peers[1], payload, seen)
        for p in peers:
            got = await broadcasts_until_end(p, seen if p is peers[1] else None)
            assert got == [{"n": 1}, [2, "two"], END], got
        assert srv.metric("wsfan_broadcasts_total") == 3 * len(peers)
        for p in peers:
            await p.close()

    run(go())


def test_app_broadcast_refuses_a_payload_one_encoding_cannot_carry(make_server: type[ServerProcess]) -> None:
    srv = make_server("--app", "apps.probe:app", "--rate-limit", "0", env=ENV).start()

    async def go() -> None:
        p = await PicowsPeer.connect(srv.url)
        reply = await p.request("shout", payload=2**64)  # JSON carries it, MessagePack does not
        assert reply["type"] == "error" and reply["code"] == "INTERNAL", reply  # the app's bug: ValueError
        seen: list[Any] = []
        await shout(p, END, seen)
        assert await broadcasts_until_end(p, seen) == [END]  # nothing of the refused one
        await p.close()

    run(go())
    assert "PayloadRefused" in srv.output() and "payload has an integer outside" in srv.output()


def test_http_broadcast_without_rooms_to_compressed_and_plain(make_server: type[ServerProcess]) -> None:
    http_port = free_port()
    srv = make_server(
        "--admin-key", ADMIN, "--http-port", str(http_port), "--compression",
        "--compression-threshold", "120", "--rate-limit", "0",
    ).start()  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    payload = {"text": "server restarts in five minutes " * 10}
    with (
        RawWS.connect("127.0.0.1", srv.port, headers=OFFER) as a,
        RawWS.connect("127.0.0.1", srv.port, headers=OFFER) as b,
        RawWS.connect("127.0.0.1", srv.port) as plain,
    ):
        for ws in (a, b, plain):
            assert json.loads(ws.recv_message()[1])["type"] == "welcome"
        status, reply = run(call("POST", base + "/broadcast", {"payload": payload}))
        assert status == 200 and reply == {"to": "all"}
        fa, fb, fp = a.recv_frame(), b.recv_frame(), plain.recv_frame()
        assert fa.rsv == RSV1 and fb.rsv == RSV1 and fp.rsv == 0
        assert fa.payload == fb.payload  # one compressed frame, shared
        assert len(fa.payload) < len(fp.payload) / 3
        assert (
            json.loads(inflate(fa.payload))
            == json.loads(fp.payload)
            == {
                "type": "broadcast",
                "payload": payload,
            }
        )
        # A small one stays uncompressed (under the threshold), as deliveries do.
        assert run(call("POST", base + "/broadcast", {"payload": 1}))[0] == 200
        fa, fp = a.recv_frame(), plain.recv_frame()
        assert fa.rsv == 0 and fa.payload == fp.payload == b'{"type":"broadcast","payload":1}'


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"payload": 2**64}, "64"),
        ({}, "payload"),
        ({"rooms": "a", "payload": 1}, "rooms must be a list of 1 to 1000"),
    ],
)
def test_http_broadcast_without_rooms_bad_input(
    make_server: type[ServerProcess], body: Any, needle: str
) -> None:
    http_port = free_port()
    srv = make_server("--admin-key", ADMIN, "--http-port", str(http_port)).start()
    base = f"http://127.0.0.1:{http_port}"

    async def go() -> None:
        p = await PicowsPeer.connect(srv.url)
        status, reply = await call("POST", base + "/broadcast", body)
        assert status == 400 and needle in reply["error"], reply
        assert (await call("POST", base + "/broadcast", {"payload": END}))[0] == 200
        assert await broadcasts_until_end(p) == [END]  # the refused one never went out
        await p.close()

    run(go())


def test_broadcast_over_two_workers(redis_server, make_server: type[ServerProcess]) -> None:
    srv = make_server(
        "--workers",
        "2",
        "--broker",
        redis_server.url,
        "--app",
        "apps.probe:app",
        "--rate-limit",
        "0",
        env=ENV,
    ).start()

    async def go() -> None:
        peers = await connect_until_nodes(srv.url, 2, at_least=6)
        nodes = sorted({p.welcome["node"] for p in peers})
        assert len(nodes) == 2, f"connections spread over both workers: {nodes}"
        first, second = (next(p for p in peers if p.welcome["node"] == n) for n in nodes)
        seen: dict[Peer, list[Any]] = {first: [], second: []}
        # One after the other (each acked once the broker took it): the control room's order.
        await shout(first, "from-0", seen[first])
        await shout(second, "from-1", seen[second])
        await shout(first, END, seen[first])
        for p in peers:
            got = await broadcasts_until_end(p, seen.get(p))
            assert got == ["from-0", "from-1", END], (p.welcome["node"], got)
        for p in peers:
            await p.close()

    run(go())


def test_broadcast_over_two_nodes(redis_server, make_server: type[ServerProcess]) -> None:
    nodes = []
    for _ in range(2):
        http_port = free_port()
        srv = make_server(
            "--broker", redis_server.url, "--admin-key", ADMIN, "--http-port", str(http_port),
            "--app", "apps.probe:app", "--rate-limit", "0", env=ENV,
        ).start()  # fmt: skip
        nodes.append((srv, f"http://127.0.0.1:{http_port}"))

    async def go() -> None:
        (a, base_a), (b, _) = nodes
        peers = [
            await PicowsPeer.connect(a.url),
            await PicowsPeer.connect(a.url, msgpack=True),
            await WebsocketsPeer.connect(b.url),
            await WebsocketsPeer.connect(b.url, msgpack=True),
        ]
        assert len({p.welcome["node"] for p in peers}) == 2
        seen: list[Any] = []
        await shout(peers[2], {"by": "app on b"}, seen)
        assert (await call("POST", base_a + "/broadcast", {"payload": {"by": "http on a"}}))[0] == 200
        await shout(peers[2], END, seen)
        for p in peers:
            got = await broadcasts_until_end(p, seen if p is peers[2] else None)
            assert got == [{"by": "app on b"}, {"by": "http on a"}, END], got
        for srv, _ in nodes:
            assert srv.metric("wsfan_broadcasts_total") == 3 * 2  # two connections per node
        for p in peers:
            await p.close()

    run(go())


def test_a_connection_that_stops_reading_broadcasts_is_closed_4008(make_server: type[ServerProcess]) -> None:
    """Broadcasts queue like deliveries: the slow-consumer limit closes a connection that stopped
    reading (4008) while one that reads gets every broadcast, in order."""
    srv = make_server(
        "--app", "apps.probe:app", "--slow-consumer-limit", "262144", "--rate-limit", "0", env=ENV
    ).start()

    async def go() -> None:
        healthy = await PicowsPeer.connect(srv.url)  # sends the shouts and reads every broadcast
        slow = RawWS.connect("127.0.0.1", srv.port, rcvbuf=4096, timeout=5)  # never reads past its welcome
        assert json.loads(slow.recv_message()[1])["type"] == "welcome"
        pad = "b" * 16000
        got: list[int] = []
        for batch in range(
            12
        ):  # 600 x 16 KB = 9.6 MB towards the slow one, far past 256 KiB + kernel buffers
            for i in range(50):
                await healthy.send({"type": "shout", "payload": [batch * 50 + i, pad]})
            got += [check(await healthy.recv_type("broadcast", 10))[0] for _ in range(50)]
        await until(lambda: "slow consumer" in srv.output(), timeout=15)
        with slow:
            code, _ = slow.expect_close(timeout=10, reply=False)
        assert code == 4008
        assert got == list(range(600)), "the reading connection lost nothing"
        await healthy.close()

    run(go())
