"""Limits and faults of PROTOCOL.md: rate limit, slow consumers, heartbeats, size, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.rawws import CLOSE, PING, PONG, TEXT, RawWS, build_frame
from helpers.waiting import until


async def test_rate_limit_drops_messages_with_rate_limited(make_server):
    srv = make_server("--rate-limit", "2", "--rate-burst", "5", "--rate-abuse-strikes", "1000").start()
    c = await PicowsPeer.connect(srv.url)
    for i in range(8):
        await c.send({"type": "ping", "id": f"p{i}"})
    replies = [await c.recv() for _ in range(8)]
    assert [r["requestId"] for r in replies] == [f"p{i}" for i in range(8)], "one reply per id, in order"
    kinds = [r["type"] if r["type"] == "pong" else r["code"] for r in replies]
    assert kinds == ["pong"] * 5 + ["RATE_LIMITED"] * 3
    assert replies[-1]["success"] is False and "messages/s" in replies[-1]["message"]
    # A dropped message had no effect: a dropped join did not join.
    await c.send({"type": "join", "id": "j", "room": "rl"})
    assert (await c.recv())["code"] == "RATE_LIMITED"
    await asyncio.sleep(1.1)  # refills two tokens
    err = await c.request("publish", room="rl", payload=1)
    assert err["code"] == "NOT_JOINED"
    await c.close()


async def test_rate_limit_is_per_connection(make_server):
    srv = make_server("--rate-limit", "1", "--rate-burst", "3", "--rate-abuse-strikes", "1000").start()
    a = await PicowsPeer.connect(srv.url)
    b = await PicowsPeer.connect(srv.url)
    for _ in range(6):
        await a.send({"type": "ping"})
    codes = [(await a.recv()).get("code") for _ in range(6)]
    assert codes.count("RATE_LIMITED") == 3
    assert (await b.request("ping"))["type"] == "pong", "another connection keeps its own bucket"
    await a.close()
    await b.close()


async def test_persistent_rate_limit_abuse_closes_4029(make_server):
    srv = make_server("--rate-limit", "5", "--rate-burst", "5", "--rate-abuse-strikes", "20").start()
    c = await PicowsPeer.connect(srv.url)
    bystander = await PicowsPeer.connect(srv.url)
    for _ in range(60):
        await c.send({"type": "ping"})
    assert await c.wait_closed() == 4029
    limited = 0
    while not c.inbox.empty():
        if (await c.recv()).get("code") == "RATE_LIMITED":
            limited += 1
    assert limited == 20, "exactly the allowed refusals were reported before the close"
    assert (await bystander.request("ping"))["type"] == "pong"
    await bystander.close()


async def test_rate_limit_off_with_zero(make_server):
    srv = make_server("--rate-limit", "0", "--rate-burst", "1").start()
    c = await PicowsPeer.connect(srv.url)
    for i in range(300):
        await c.send({"type": "ping", "id": str(i)})
    replies = [await c.recv() for _ in range(300)]
    assert all(r["type"] == "pong" for r in replies)
    await c.close()


async def test_oversized_message_closes_1009(make_server):
    srv = make_server("--max-message-size", "1024").start()
    c = await WebsocketsPeer.connect(srv.url, max_size=None)
    ok = await c.request("echo", payload="x" * 900)
    assert ok["type"] == "echo"
    await c.send({"type": "echo", "payload": "x" * 2000})
    assert await c.wait_closed() == 1009
    fresh = await PicowsPeer.connect(srv.url)
    assert (await fresh.request("ping"))["type"] == "pong"
    await fresh.close()


async def test_slow_consumer_is_closed_4008_while_healthy_subscriber_gets_every_seq(make_server):
    srv = make_server("--slow-consumer-limit", "262144", "--rate-limit", "0").start()
    room = "flood"
    pub = await PicowsPeer.connect(srv.url)
    await pub.request("join", room=room)
    healthy = await PicowsPeer.connect(srv.url)
    await healthy.request("join", room=room)
    # A raw connection with a tiny receive buffer that stops reading once joined: the server's writes back up.
    slow = RawWS.connect("127.0.0.1", srv.port, rcvbuf=4096, timeout=5)
    slow.send_text(json.dumps({"type": "join", "room": room, "id": "slow-join"}))
    while (reply := json.loads(slow.recv_message()[1])).get("requestId") != "slow-join":
        pass
    assert reply["type"] == "ack", reply
    payload = "p" * 16000
    n = 600  # 9.6 MB towards the slow consumer: far past its 256 KiB limit plus kernel buffers (up to 4 MiB)
    seqs: list[int] = []
    for _ in range(n // 50):
        for _ in range(50):
            await pub.send({"type": "publish", "room": room, "payload": payload})
        # The healthy subscriber reads as it goes (never 800 KB behind, so never paused however
        # loaded the machine is); the slow one never reads.
        seqs += [(await healthy.recv(10))["seq"] for _ in range(50)]
    # The close frame waits behind what the socket already holds, for a grace period of
    # 2 s: start reading as soon as the decision is logged.
    await until(lambda: "slow consumer" in srv.output(), timeout=15)  # a loaded CI machine is slower
    with slow:
        code, _ = slow.expect_close(timeout=10, reply=False)
    assert code == 4008, f"expected close 4008 in the slow consumer's stream, got {code}"
    assert seqs == list(range(1, n + 1)), "the healthy subscriber lost nothing"
    await pub.close()
    await healthy.close()


async def test_a_burst_fanned_out_in_one_loop_iteration_still_closes_the_slow_consumer(make_server):
    """Every publish in one TCP write: the server fans them all out in the same loop iteration and
    writes them at once, so uvloop buffers megabytes before pause_writing; no later write comes.
    What uvloop holds counts against --slow-consumer-limit too (it used to be missed: no 4008)."""
    srv = make_server("--slow-consumer-limit", "262144", "--rate-limit", "0").start()
    room = "burst"
    with (
        RawWS.connect("127.0.0.1", srv.port) as pub,
        RawWS.connect("127.0.0.1", srv.port, rcvbuf=4096) as slow,
    ):
        for ws, rid in ((pub, "p"), (slow, "s")):
            ws.send_text(json.dumps({"type": "join", "room": room, "id": rid}))
            while json.loads(ws.recv_message()[1]).get("requestId") != rid:
                pass
        msg = json.dumps({"type": "publish", "room": room, "payload": "b" * 16000}).encode()
        pub.send_raw(b"".join(build_frame(TEXT, msg) for _ in range(400)))  # 6.4 MB in one write
        await until(lambda: "slow consumer" in srv.output(), timeout=15)
        code, _ = slow.expect_close(timeout=10, reply=False)
    assert code == 4008


def _answer_pings_for(ws: RawWS, seconds: float) -> list[int]:
    """Read for ``seconds``, answering every ping with its payload: the opcodes of every frame the server sent."""
    deadline = time.monotonic() + seconds
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = ws.recv_frame(left)
        except TimeoutError:
            break
        seen.append(frame.opcode)
        if frame.opcode == PING:
            ws.send_frame(PONG, frame.payload)
    return seen


async def test_connection_that_answers_pings_survives_heartbeats(make_server):
    srv = make_server("--heartbeat", "200", "--heartbeat-timeout", "300").start()
    with RawWS.connect("127.0.0.1", srv.port) as c:
        assert json.loads(c.recv_message()[1])["heartbeat"] == 200
        seen = await asyncio.to_thread(_answer_pings_for, c, 1.5)
        assert seen.count(PING) >= 3, f"one ping per 200 ms expected over 1.5 s, got frames {seen}"
        assert CLOSE not in seen
        c.send_text(json.dumps({"type": "ping", "id": "after"}))
        assert json.loads(c.recv_message()[1]) == {"type": "pong", "requestId": "after"}


async def test_heartbeat_timeout_closes_4000(make_server):
    srv = make_server("--heartbeat", "200", "--heartbeat-timeout", "300").start()
    silent = await PicowsPeer.connect(srv.url, enable_auto_pong=False)
    live = await WebsocketsPeer.connect(srv.url)
    assert await silent.wait_closed(5) == 4000
    assert (await live.request("ping"))["type"] == "pong"
    await live.close()


async def test_heartbeat_off_with_zero(make_server):
    """0 is "off", not "the default": advertised as 0, no ping, and a peer that never pongs stays."""
    srv = make_server("--heartbeat", "0", "--heartbeat-timeout", "100").start()
    with RawWS.connect("127.0.0.1", srv.port) as c:
        assert json.loads(c.recv_message()[1])["heartbeat"] == 0
        with pytest.raises(TimeoutError):
            frame = c.recv_frame(0.6)  # 6 heartbeat timeouts of 100 ms: no frame at all
            pytest.fail(f"heartbeat 0 still sent {frame}")
        c.send_text(json.dumps({"type": "ping", "id": "still-here"}))
        assert json.loads(c.recv_message()[1])["requestId"] == "still-here"


async def test_sigterm_closes_everyone_with_1001_and_exits_0(make_server):
    srv = make_server().start()
    peers = [await PicowsPeer.connect(srv.url), await WebsocketsPeer.connect(srv.url)]
    await peers[0].request("join", room="bye")
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, srv.stop)
    assert code == 0
    for p in peers:
        assert await p.wait_closed() == 1001
    assert not srv.alive()


async def test_sigterm_drains_without_clients_too(make_server):
    srv = make_server().start()
    assert srv.stop() == 0


@pytest.mark.parametrize("peer", [PicowsPeer, WebsocketsPeer])
async def test_client_close_is_answered_and_normal(make_server, peer):
    srv = make_server().start()
    c = await peer.connect(srv.url)
    assert await c.close_handshake(1000) == 1000, "the server answers a client's close with its code"
    assert srv.alive()


async def test_invalid_messages_count_against_the_rate_limit(make_server):
    srv = make_server("--rate-limit", "1", "--rate-burst", "3", "--rate-abuse-strikes", "1000").start()
    c = await PicowsPeer.connect(srv.url)
    for _ in range(3):
        await c.send_raw("{garbage")
    await c.send_raw('{"type":"ping","id":"late"}')
    replies = [await c.recv() for _ in range(4)]
    assert [r["code"] for r in replies] == ["INVALID_MESSAGE"] * 3 + ["RATE_LIMITED"]
    assert replies[-1]["requestId"] == "late", "a dropped message is still answered by its id"
    await c.close()
