"""Authentication on connect, room permissions, admission control and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import time

import aiohttp
import jwt
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.ports import free_port, wait_for_port
from helpers.rawws import RawWS, upgrade_head
from helpers.servers import ServerProcess

SECRET = "test-secret-that-is-long-enough-for-hs256!"
ADMIN = "admin-key-for-tests"


def token(sub: str = "alice", ttl: float = 600, secret: str = SECRET, alg: str = "HS256", **claims) -> str:
    body = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm=alg)


def unsigned_token(**claims) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.fixture(scope="module")
def auth_server():

    http_port = free_port()
    srv = ServerProcess(
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0",
        "--admin-key",
        ADMIN,
        "--http-port",
        str(http_port),
        "--rate-limit",
        "0",
    )
    srv.http = f"http://127.0.0.1:{http_port}"
    srv.start()
    wait_for_port(http_port)
    yield srv
    srv.kill()


async def upgrade_status(url: str, **kw) -> tuple[int, str, dict]:
    try:
        async with websockets.connect(url, **kw):
            return 101, "", {}
    except websockets.InvalidStatus as exc:
        r = exc.response
        return (
            r.status_code,
            r.body.decode(errors="replace"),
            {k.lower(): v for k, v in r.headers.raw_items()},
        )


# ---------------------------------------------------------------- 401 on connect


@pytest.mark.parametrize(
    "case, make",
    [
        ("missing", lambda: None),
        ("malformed", lambda: "not.a.jwt"),
        ("garbage", lambda: "x"),
        ("other secret", lambda: token(secret="another-secret-that-is-long-enough-too!")),
        ("alg none", lambda: unsigned_token(sub="mallory", exp=int(time.time()) + 600)),
        ("HS512", lambda: token(alg="HS512")),
        ("expired", lambda: token(ttl=-30)),
        ("no sub", lambda: token(sub=None)),
        ("no exp", lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")),
        ("rooms not a list", lambda: token(rooms="chat.*")),
    ],
)
async def test_bad_token_gets_401_and_no_websocket(auth_server, case, make):
    tok = make()
    url = auth_server.url + (f"?token={tok}" if tok else "")
    status, body, headers = await upgrade_status(url)
    assert status == 401, case
    assert body.startswith("unauthorized: ") and len(body) > len("unauthorized: ") + 3
    assert headers.get("www-authenticate") == "Bearer"


async def test_token_in_authorization_header_or_query(auth_server):
    tok = token("bob")
    c = await WebsocketsPeer.connect(auth_server.url, additional_headers={"Authorization": f"Bearer {tok}"})
    assert c.welcome["user"] == "bob" and c.welcome["conn"] != "bob"
    await c.close()
    c = await PicowsPeer.connect(f"{auth_server.url}?token={tok}")
    assert c.welcome["user"] == "bob"
    await c.close()


async def test_deliveries_name_the_token_subject(auth_server):
    a = await PicowsPeer.connect(f"{auth_server.url}?token={token('ann')}")
    b = await PicowsPeer.connect(f"{auth_server.url}?token={token('ben')}")
    for c in (a, b):
        await c.request("join", room="who")
    await a.request("publish", room="who", payload=1)
    assert (await b.recv())["from"] == "ann"
    await a.close()
    await b.close()


# ---------------------------------------------------------------- rooms claim


async def test_rooms_claim_allows_only_matching_rooms(auth_server):
    c = await PicowsPeer.connect(f"{auth_server.url}?token={token(rooms=['chat.*', 'news'])}")
    for room in ("chat.a", "chat.b.c", "news"):
        assert (await c.request("join", room=room))["type"] == "ack", room
    for room in ("newsroom", "chat", "admin", "xchat.a"):
        err = await c.request("join", room=room)
        assert err["code"] == "FORBIDDEN", room
    err = await c.request("publish", room="admin", payload=1)
    assert err["code"] == "FORBIDDEN"
    assert (await c.request("publish", room="chat.a", payload=1))["type"] == "ack"
    await c.close()


async def test_empty_rooms_claim_allows_nothing_and_absent_claim_allows_all(auth_server):
    none_allowed = await PicowsPeer.connect(f"{auth_server.url}?token={token(rooms=[])}")
    assert (await none_allowed.request("join", room="anything"))["code"] == "FORBIDDEN"
    all_allowed = await PicowsPeer.connect(f"{auth_server.url}?token={token()}")
    assert (await all_allowed.request("join", room="anything"))["type"] == "ack"
    await none_allowed.close()
    await all_allowed.close()


async def test_token_expiring_while_connected_closes_4001(auth_server):
    c = await PicowsPeer.connect(f"{auth_server.url}?token={token(ttl=1.5)}")
    assert (await c.request("ping"))["type"] == "pong"
    assert await c.wait_closed(6) == 4001


# ---------------------------------------------------------------- admission control


async def test_max_connections_refuses_with_503_and_retry_after(make_server):
    srv = make_server("--max-connections", "3").start()
    peers = [await PicowsPeer.connect(srv.url) for _ in range(3)]
    status, _, headers = await upgrade_status(srv.url)
    assert status == 503 and int(headers["retry-after"]) >= 1
    await peers[0].close()
    await asyncio.wait_for(peers[0].closed.wait(), 5)
    # The server frees the slot once it has seen the close: retry the upgrade until it is accepted.
    refused = 1
    async with asyncio.timeout(5):
        while (await upgrade_status(srv.url))[0] == 503:
            refused += 1
            await asyncio.sleep(0.02)
    for p in peers[1:]:
        await p.close()
    metrics = await fetch_metrics(f"http://127.0.0.1:{srv.port}/metrics")
    assert metrics[("wsfan_rejected_connections_total", (("reason", "max_connections"),))] == refused


def upgrade_from(srv: ServerProcess, source_ip: str) -> tuple[int, dict[str, str], socket.socket]:
    """An upgrade of /ws from ``source_ip`` (any 127.0.0.x reaches a loopback listener): status,
    headers, and the socket, left open (a 101 is a connection the server now counts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source_ip, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(upgrade_head("/ws"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, sock


async def test_max_connections_per_ip_refuses_that_address_only_with_503_and_retry_after(make_server):
    """--max-connections-per-ip 2: a third connection from 127.0.0.1 gets 503 + Retry-After while
    127.0.0.2 still connects; closing one frees its address's slot (counted per socket peername)."""
    srv = make_server("--max-connections-per-ip", "2").start()
    first = [upgrade_from(srv, "127.0.0.1") for _ in range(2)]
    assert [status for status, _, _ in first] == [101, 101]
    status, headers, third = upgrade_from(srv, "127.0.0.1")
    third.close()
    assert status == 503 and headers["retry-after"] == "1"
    other, _, other_sock = upgrade_from(srv, "127.0.0.2")
    assert other == 101, "another address keeps its own count"
    first[0][2].close()
    refused = 1
    async with asyncio.timeout(5):  # the slot frees once the server has seen the close
        while True:
            status, _, sock = upgrade_from(srv, "127.0.0.1")
            if status == 101:
                break
            sock.close()
            refused += 1
            await asyncio.sleep(0.02)
    for s in (sock, other_sock, first[1][2]):
        s.close()
    metrics = await fetch_metrics(f"http://127.0.0.1:{srv.port}/metrics")
    assert metrics[("wsfan_rejected_connections_total", (("reason", "max_connections_per_ip"),))] == refused


async def open_sse(http_port: int, source_ip: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """``GET /sse?room=r`` from ``source_ip``: the session and the response, left open (a 200 is a
    stream the server now counts; close the session to end it)."""
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source_ip, 0)))
    resp = await http.get(f"http://127.0.0.1:{http_port}/sse", params={"room": "r"})
    return http, resp


async def test_sse_streams_share_the_per_ip_budget_with_websocket_connections(make_server):
    """--max-connections-per-ip 2 counts SSE streams with upgrades: one of each from 127.0.0.1 and
    both a third stream and a third upgrade get the upgrade's 503 + Retry-After: 1 (the stream's
    as JSON, like the other refusals of that port), counted as max_connections_per_ip; 127.0.0.2
    is not affected, and the stream's end frees its place. Before, streams were not counted."""
    http_port = free_port()
    srv = make_server("--max-connections-per-ip", "2", "--http-port", str(http_port)).start()
    wait_for_port(http_port)
    status, _, ws = upgrade_from(srv, "127.0.0.1")
    assert status == 101
    first, stream = await open_sse(http_port, "127.0.0.1")
    assert stream.status == 200
    third, refused = await open_sse(http_port, "127.0.0.1")
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert await refused.json() == {"error": "too many connections from this address"}
    await third.close()
    status, headers, sock = upgrade_from(srv, "127.0.0.1")
    sock.close()
    assert status == 503 and headers["retry-after"] == "1", "the stream takes a WebSocket place too"
    other, elsewhere = await open_sse(http_port, "127.0.0.2")
    assert elsewhere.status == 200, "another address keeps its own count"
    await other.close()
    await first.close()  # the stream ends: its place is free again
    async with asyncio.timeout(5):
        while True:
            again, resp = await open_sse(http_port, "127.0.0.1")
            if resp.status == 200:
                break
            await again.close()
            await asyncio.sleep(0.02)
    await again.close()
    ws.close()
    metrics = await fetch_metrics(f"http://127.0.0.1:{srv.port}/metrics")
    assert metrics[("wsfan_rejected_connections_total", (("reason", "max_connections_per_ip"),))] >= 2


async def test_sse_streams_count_in_max_connections(make_server):
    """--max-connections counts open SSE streams with WebSocket connections (each holds an fd)."""
    http_port = free_port()
    srv = make_server("--max-connections", "2", "--http-port", str(http_port)).start()
    wait_for_port(http_port)
    peer = await PicowsPeer.connect(srv.url)
    http, stream = await open_sse(http_port, "127.0.0.1")
    assert stream.status == 200
    status, _, headers = await upgrade_status(srv.url)
    assert status == 503 and headers["retry-after"] == "1"
    other, refused = await open_sse(http_port, "127.0.0.1")
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert await refused.json() == {"error": "too many connections"}
    for session in (other, http):
        await session.close()
    await peer.close()


async def test_handshake_rate_refuses_with_503_and_retry_after(make_server):
    srv = make_server("--max-handshake-rate", "2").start()
    results = [await upgrade_status(srv.url) for _ in range(6)]
    statuses = [r[0] for r in results]
    assert statuses[:2] == [101, 101] and 503 in statuses[2:]
    refused = [r for r in results if r[0] == 503]
    assert all(int(h["retry-after"]) >= 1 for _, _, h in refused)
    await asyncio.sleep(1.1)
    assert (await upgrade_status(srv.url))[0] == 101, "the bucket refills"
    metrics = await fetch_metrics(f"http://127.0.0.1:{srv.port}/metrics")
    assert metrics[("wsfan_rejected_connections_total", (("reason", "handshake_rate"),))] == len(refused)


# ---------------------------------------------------------------- metrics


async def fetch_metrics(url: str) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_parse_and_move_with_traffic(auth_server):
    url = f"{auth_server.http}/metrics"
    before = await fetch_metrics(url)
    a = await PicowsPeer.connect(f"{auth_server.url}?token={token('m1')}")
    b = await PicowsPeer.connect(f"{auth_server.url}?token={token('m2', rooms=['x'])}")
    for c in (a, b):
        await c.request("join", room="metered")  # b: FORBIDDEN
    for i in range(5):
        await a.request("publish", room="metered", payload=i)
    after = await fetch_metrics(url)
    for name in ("wsfan_publishes_total", "wsfan_messages_received_total", "wsfan_connections_opened_total"):
        assert after[(name, ())] > before.get((name, ()), 0), name
    assert after[("wsfan_publishes_total", ())] - before.get(("wsfan_publishes_total", ()), 0) == 5
    assert after[("wsfan_errors_total", (("code", "FORBIDDEN"),))] >= 1
    assert after[("wsfan_connections", ())] >= 2
    assert ("wsfan_publish_to_flush_seconds_bucket", (("le", "+Inf"),)) in after
    # The main port serves the same metrics on a plain GET.
    same = await fetch_metrics(auth_server.url.replace("ws://", "http://").replace("/ws", "/metrics"))
    assert same[("wsfan_publishes_total", ())] == after[("wsfan_publishes_total", ())]
    await a.close()
    await b.close()


async def test_publish_to_flush_latency_is_observed(make_server):
    srv = make_server().start()
    a = await PicowsPeer.connect(srv.url)
    b = await PicowsPeer.connect(srv.url)
    for c in (a, b):
        await c.request("join", room="lat")
    for i in range(10):
        await a.request("publish", room="lat", payload=i)
    m = await fetch_metrics(f"http://127.0.0.1:{srv.port}/metrics")
    assert m[("wsfan_publish_to_flush_seconds_count", ())] == 10
    assert 0 < m[("wsfan_publish_to_flush_seconds_sum", ())] < 1
    await a.close()
    await b.close()


# ---------------------------------------------------------------- admin publish


async def admin_publish(base: str, body: bytes | dict, key: str | None = ADMIN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(f"{base}/publish", data=data, headers=headers) as r:
        return r.status, await r.json()


async def test_admin_publish_requires_the_key(auth_server):
    assert (await admin_publish(auth_server.http, {"room": "r", "payload": 1}, key=None))[0] == 401
    assert (await admin_publish(auth_server.http, {"room": "r", "payload": 1}, key="wrong"))[0] == 401


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "JSON"),
        ({"room": "bad room", "payload": 1}, "room"),
        ({"payload": 1}, "room"),
        ({"room": "r"}, "payload"),
    ],
)
async def test_admin_publish_bad_body_is_400_with_a_clear_message(auth_server, body, needle):
    status, reply = await admin_publish(auth_server.http, body)
    assert status == 400 and needle in reply["error"]


async def test_admin_publish_reaches_websocket_and_sse_with_the_same_seq(auth_server):
    room = "admin.news"
    ws = await PicowsPeer.connect(f"{auth_server.url}?token={token()}")
    await ws.request("join", room=room)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{auth_server.http}/sse", params={"room": room, "token": token()}) as sse:
            assert sse.status == 200 and sse.headers["Content-Type"] == "text/event-stream"
            await sse.content.readuntil(b"\n\n")  # ": joined"
            status, reply = await admin_publish(
                auth_server.http, {"room": room, "payload": {"headline": "hi"}}
            )
            assert status == 200 and reply == {"room": room, "seq": 1}
            event = await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 5)
    msg = await ws.recv()
    assert msg == {"type": "message", "room": room, "seq": 1, "from": "server", "payload": {"headline": "hi"}}
    lines = event.decode().strip().split("\n")
    assert lines[0].startswith("id: ") and lines[0].endswith(":1")  # id: <epoch>:<seq>
    assert json.loads(lines[1].removeprefix("data: ")) == msg
    await ws.close()


async def test_admin_publish_is_off_without_a_key(make_server):
    port = free_port()
    srv = make_server("--http-port", str(port)).start()
    wait_for_port(port)
    status, reply = await admin_publish(f"http://127.0.0.1:{port}", {"room": "r", "payload": 1})
    assert status == 404 and "--admin-key" in reply["error"]
    assert srv.alive()


# ---------------------------------------------------------------- SSE


async def read_events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str, dict]]:
    """The next ``n`` events as (``id``, data): the id is ``<epoch>:<seq>``, the seq the data's."""
    out = []
    while len(out) < n:
        block = (await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)).decode()
        if block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
        msg = json.loads(fields["data"])
        assert fields["id"].endswith(f":{msg['seq']}"), fields
        out.append((fields["id"], msg))
    return out


async def test_sse_resumes_from_last_event_id_without_loss(auth_server):
    room = "sse.resume"
    pub = await PicowsPeer.connect(f"{auth_server.url}?token={token()}")
    await pub.request("join", room=room)
    async with aiohttp.ClientSession() as http:
        params = {"room": room, "token": token()}
        async with http.get(f"{auth_server.http}/sse", params=params) as sse:
            await sse.content.readuntil(b"\n\n")
            for i in range(3):
                await pub.request("publish", room=room, payload=i)
            first = await read_events(sse, 3)
        last_id = first[-1][0]
        for i in range(3, 7):  # published while the stream is away
            await pub.request("publish", room=room, payload=i)
        headers = {"Last-Event-ID": last_id}  # as an EventSource sends back the last id it saw
        async with http.get(f"{auth_server.http}/sse", params=params, headers=headers) as sse:
            await pub.request("publish", room=room, payload=7)
            rest = await read_events(sse, 5)
    seqs = [m["seq"] for _, m in first + rest]
    assert seqs == list(range(1, 9)), "every seq exactly once across the reconnect"
    assert [m["payload"] for _, m in first + rest] == list(range(8))
    await pub.close()


@pytest.mark.parametrize(
    "params, status",
    [
        ({"room": "r"}, 401),
        ({"room": "r", "token": "junk"}, 401),
        ({"room": "secret", "tok": "rooms"}, 403),
        ({"room": "bad room", "tok": "ok"}, 400),
    ],
)
async def test_sse_applies_the_same_auth_rules(auth_server, params, status):
    params = dict(params)
    if params.pop("tok", None):
        params["token"] = token(rooms=["public.*"])
    async with aiohttp.ClientSession() as http, http.get(f"{auth_server.http}/sse", params=params) as r:
        assert r.status == status
        assert (await r.json())["error"]


# ---------------------------------------------------------------- health


async def _status_becomes(http: aiohttp.ClientSession, url: str, status: int, timeout: float = 5.0) -> bool:
    """Poll ``url`` every 20 ms until it answers ``status`` (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(url) as r:
            if r.status == status:
                return True
        await asyncio.sleep(0.02)
    return False


async def test_healthz_is_503_while_draining(make_server):
    http_port = free_port()
    srv = make_server("--http-port", str(http_port), "--drain-timeout", "3").start()
    wait_for_port(http_port)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{http_port}/healthz") as r:
            assert r.status == 200
        # A client that never answers the close keeps the drain open for the grace period.
        stuck = RawWS.connect("127.0.0.1", srv.port)  # upgraded: the server holds this session
        srv.proc.send_signal(signal.SIGTERM)
        assert await _status_becomes(http, f"http://127.0.0.1:{http_port}/healthz", 503)
        # The WebSocket port keeps answering while draining: 503 for health and for new upgrades.
        async with http.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
            assert r.status == 503
        status, _, headers = await upgrade_status(srv.url)
        assert status == 503 and headers["retry-after"] == "1"
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, srv.proc.wait, 10) == 0
    stuck.close()
