"""Limits and faults of PROTOCOL.md: rate limit, slow consumers, heartbeats, size, graceful shutdown."""

from __future__ import annotations

import asyncio
import socket

import pytest

from wsclients import PicowsPeer, WebsocketsPeer


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
    # A raw socket with a tiny receive buffer that never reads: the server's writes back up fast.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", srv.port))
    slow.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    mask = b"\x00\x00\x00\x00"
    join = b'{"type":"join","room":"flood"}'
    slow.sendall(bytes((0x81, 0x80 | len(join))) + mask + join)
    await asyncio.sleep(0.2)
    payload = "p" * 16000
    n = 600  # 9.6 MB towards the slow consumer: far past its 256 KiB limit plus kernel buffers (up to 4 MiB)
    for i in range(n):
        await pub.send({"type": "publish", "room": room, "payload": payload})
        if i % 50 == 0:
            await asyncio.sleep(0)
    # The server decides within the flood; the close frame then waits behind what the socket
    # already holds, for a grace period of 2 s: start reading as soon as the decision is logged.
    for _ in range(750):  # up to 15 s: a loaded CI machine works through 9.6 MB more slowly
        if "slow consumer" in srv.output():
            break
        await asyncio.sleep(0.02)
    assert "slow consumer" in srv.output()
    slow.settimeout(5)
    data = b""
    while True:
        try:
            chunk = slow.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    slow.close()
    code = _find_close_code(data)
    assert code == 4008, f"expected close 4008 in the slow consumer's stream, got {code}"
    seqs = [(await healthy.recv(10))["seq"] for _ in range(n)]
    assert seqs == list(range(1, n + 1)), "the healthy subscriber lost nothing"
    await pub.close()
    await healthy.close()


def _find_close_code(stream: bytes) -> int | None:
    """Walk server frames (after the HTTP response) and return the close code, if any."""
    head, _, rest = stream.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    i = 0
    while i + 2 <= len(rest):
        op = rest[i] & 0x0F
        n = rest[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n = int.from_bytes(rest[j : j + 2], "big")
            j += 2
        elif n == 127:
            n = int.from_bytes(rest[j : j + 8], "big")
            j += 8
        if op == 0x8:
            return int.from_bytes(rest[j : j + 2], "big")
        i = j + n
    return None


async def test_connection_that_answers_pings_survives_heartbeats(make_server):
    srv = make_server("--heartbeat", "200", "--heartbeat-timeout", "300").start()
    c = await WebsocketsPeer.connect(srv.url)
    assert c.welcome["heartbeat"] == 200
    await asyncio.sleep(1.5)
    assert (await c.request("ping"))["type"] == "pong"
    await c.close()


async def test_heartbeat_timeout_closes_4000(make_server):
    srv = make_server("--heartbeat", "200", "--heartbeat-timeout", "300").start()
    silent = await PicowsPeer.connect(srv.url, enable_auto_pong=False)
    live = await WebsocketsPeer.connect(srv.url)
    assert await silent.wait_closed(5) == 4000
    assert (await live.request("ping"))["type"] == "pong"
    await live.close()


async def test_heartbeat_off_with_zero(make_server):
    srv = make_server("--heartbeat", "0", "--heartbeat-timeout", "100").start()
    silent = await PicowsPeer.connect(srv.url, enable_auto_pong=False)
    await asyncio.sleep(0.6)
    assert not silent.closed.is_set()
    await silent.close()


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
    await c.close()
    await asyncio.wait_for(c.closed.wait(), 5)
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
