"""Presence, joined/left events and namespaces on a single node (real server process, real clients)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.peers import PicowsPeer, WebsocketsPeer
from helpers.ports import free_port, wait_for_port
from helpers.servers import ROOT, ServerProcess
from wsfan.server import config
from wsfan.server import namespaces as ns_config

SECRET = "presence-test-secret-long-enough-for-hs256"
ADMIN = "presence-admin-key"
NAMESPACES = (
    "chat:presence=true,join_leave=true;news:allow_publish=false;quiet:allow_history=false;"
    "brief:history_ttl=0.4;seen:presence=true"
)


def token(sub: str, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 600), **claims}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def ns_server():
    http_port = free_port()
    srv = ServerProcess(
        "--jwt-secret", SECRET, "--admin-key", ADMIN, "--http-port", str(http_port),
        "--rate-limit", "0", "--namespaces", NAMESPACES,
    )  # fmt: skip
    srv.http = f"http://127.0.0.1:{http_port}"
    srv.start()
    wait_for_port(http_port)
    yield srv
    srv.kill()


async def connect(srv: ServerProcess, user: str, cls: type = PicowsPeer, **kw) -> PicowsPeer:
    return await cls.connect(f"{srv.url}?token={token(user)}", **kw)


async def join(peer, room: str, **fields) -> dict:
    ack = await peer.request("join", room=room, **fields)
    assert ack["type"] == "ack", ack
    return ack["data"]


async def test_presence_lists_and_counts_after_joins_leaves_and_disconnects(ns_server):
    room = "chat:counts"
    a1, a2, b = [await connect(ns_server, u) for u in ("alice", "alice", "bob")]
    before = int(time.time() * 1000)
    for p in (a1, a2, b):
        await join(p, room)
    ack = await a1.request("presence", room=room)
    assert ack["type"] == "ack", ack
    entries = ack["data"]["presence"]
    assert ack["data"]["room"] == room
    assert sorted((e["conn"], e["user"]) for e in entries) == sorted(
        (p.welcome["conn"], p.welcome["user"]) for p in (a1, a2, b)
    )
    assert all(before - 1000 <= e["joined_at"] <= int(time.time() * 1000) for e in entries)
    stats = await a1.request("presence_stats", room=room)
    assert stats["data"] == {"room": room, "connections": 3, "users": 2}

    await b.request("leave", room=room)
    await a1.recv_type("left")  # b's leave reached the room: presence has changed
    stats = await a1.request("presence_stats", room=room)
    assert stats["data"] == {"room": room, "connections": 2, "users": 1}

    await a2.close()  # a disconnect leaves every room
    left = await a1.recv_type("left")
    assert left["conn"] == a2.welcome["conn"]
    ack = await a1.request("presence", room=room)
    assert [e["conn"] for e in ack["data"]["presence"]] == [a1.welcome["conn"]]
    stats = await b.request("presence_stats", room=room)
    assert stats["data"] == {"room": room, "connections": 1, "users": 1}, "asking needs no membership"
    for p in (a1, b):
        await p.close()


async def test_joined_and_left_events_reach_the_others_exactly_once(ns_server):
    room = "chat:events"
    a = await connect(ns_server, "ann")
    mp = await connect(ns_server, "max", WebsocketsPeer, msgpack=True)
    await join(a, room)
    await join(mp, room)
    assert await a.recv() == {"type": "joined", "room": room, "user": "max", "conn": mp.welcome["conn"]}
    c = await connect(ns_server, "cid")
    await join(c, room)
    expected = {"type": "joined", "room": room, "user": "cid", "conn": c.welcome["conn"]}
    assert await a.recv() == expected
    assert await mp.recv() == expected, "a MessagePack subscriber gets the same event in MessagePack"
    await join(c, room)  # joining again is not a new arrival
    await c.request("leave", room="chat:never-joined")  # nor is leaving a room one is not in
    await a.no_message()
    await c.no_message()  # nobody is told about their own arrival
    await c.request("leave", room=room)
    expected = {"type": "left", "room": room, "user": "cid", "conn": c.welcome["conn"]}
    assert await a.recv() == expected and await mp.recv() == expected
    await c.request("leave", room=room)
    await mp.close()
    assert await a.recv() == {"type": "left", "room": room, "user": "max", "conn": mp.welcome["conn"]}
    await a.no_message()
    # Events are not numbered: the room's seq is untouched.
    assert (await join(a, room))["seq"] == 0
    for p in (a, c):
        await p.close()


async def test_presence_and_events_only_where_the_namespace_turns_them_on(ns_server):
    a = await connect(ns_server, "ann")
    b = await connect(ns_server, "bob")
    for room in ("lobby", "seen:x"):
        await join(a, room)
        await join(b, room)
    err = await a.request("presence", room="lobby")
    assert err["type"] == "error" and err["code"] == "NOT_AVAILABLE", err
    err = await a.request("presence_stats", room="unknownns:x")
    assert err["code"] == "NOT_AVAILABLE", "an unconfigured prefix is the default namespace"
    ok = await a.request("presence_stats", room="seen:x")
    assert ok["data"] == {"room": "seen:x", "connections": 2, "users": 2}
    await b.close()
    await a.no_message()  # presence without join_leave sends no events; the default namespace neither
    await b.closed.wait()
    for _ in range(100):
        if (await a.request("presence_stats", room="seen:x"))["data"]["connections"] == 1:
            break
        await asyncio.sleep(0.02)
    assert (await a.request("presence_stats", room="seen:x"))["data"]["connections"] == 1
    await a.close()


async def test_presence_respects_the_rooms_claim(ns_server):
    peer = await PicowsPeer.connect(f"{ns_server.url}?token={token('eve', rooms=['chat:mine'])}")
    for kind in ("presence", "presence_stats"):
        err = await peer.request(kind, room="chat:theirs")
        assert err["type"] == "error" and err["code"] == "FORBIDDEN", err
        assert (await peer.request(kind, room="chat:mine"))["type"] == "ack"
    err = await peer.request("presence", room="bad room")
    assert err["code"] == "INVALID_MESSAGE"
    await peer.close()


async def test_http_presence_with_admin_key_or_token(ns_server):
    room = "chat:http"
    a = await connect(ns_server, "ann")
    await join(a, room)
    base = ns_server.http

    async def get(path: str, params: dict, headers: dict | None = None) -> tuple[int, dict]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(base + path, params=params, headers=headers) as r,
        ):
            return r.status, await r.json()

    admin = {"Authorization": f"Bearer {ADMIN}"}
    status, body = await get("/presence", {"room": room}, admin)
    assert status == 200 and body["room"] == room
    assert [(e["conn"], e["user"]) for e in body["presence"]] == [(a.welcome["conn"], "ann")]
    status, body = await get("/presence_stats", {"room": room, "token": token("x", rooms=["chat:*"])})
    assert (status, body) == (200, {"room": room, "connections": 1, "users": 1})
    assert (await get("/presence", {"room": room, "token": token("x", rooms=["news:*"])}))[0] == 403
    assert (await get("/presence", {"room": room}))[0] == 401
    assert (await get("/presence", {"room": room}, {"Authorization": "Bearer wrong"}))[0] == 401
    assert (await get("/presence_stats", {"room": "a b"}, admin))[0] == 400
    status, body = await get("/presence", {"room": "lobby"}, admin)
    assert status == 404 and "presence is off" in body["error"]
    await a.close()


async def test_allow_publish_off_takes_publications_from_the_admin_api_only(ns_server):
    room = "news:today"
    pub, sub = await connect(ns_server, "pub"), await connect(ns_server, "sub")
    await join(pub, room)
    await join(sub, room)
    err = await pub.request("publish", room=room, payload="x")
    assert err["type"] == "error" and err["code"] == "FORBIDDEN" and "POST /publish" in err["message"]
    await sub.no_message()
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{ns_server.http}/publish", json={"room": room, "payload": "y"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )  # fmt: skip
        assert r.status == 200 and (await r.json())["seq"] == 1, "the refused publish used no seq"
    msg = await sub.recv()
    assert (msg["seq"], msg["payload"], msg["from"]) == (1, "y", "server")
    for p in (pub, sub):
        await p.close()


async def test_allow_history_off_replays_nothing(ns_server):
    pub = await connect(ns_server, "pub")
    for room in ("quiet:r", "loud:r"):
        await join(pub, room)
        for i in range(3):
            assert (await pub.request("publish", room=room, payload=i))["type"] == "ack"
    late = await connect(ns_server, "late")
    data = await join(late, "quiet:r", since=0)
    assert (data["seq"], data["recovered"]) == (3, False)
    await late.no_message()
    data = await join(late, "loud:r", since=0)
    assert (data["seq"], data["recovered"]) == (3, True), "the default namespace keeps history"
    assert [(await late.recv())["payload"] for _ in range(3)] == [0, 1, 2]
    for p in (pub, late):
        await p.close()


async def recovered_after_ttl(srv: ServerProcess, room: str, since: int, epoch: str) -> dict:
    """Join with since until the history TTL has passed (the ack is no longer recovered), bounded."""
    deadline = time.monotonic() + 10
    while True:
        peer = await connect(srv, "probe")
        data = await join(peer, room, since=since, epoch=epoch)
        if data["recovered"] and time.monotonic() < deadline:
            await peer.close()
            await asyncio.sleep(0.1)
            continue
        replayed = []
        try:
            replayed.append(await peer.recv(0.2))
        except TimeoutError:
            pass
        await peer.close()
        return {**data, "replayed": replayed}


async def test_history_expires_after_its_ttl_and_is_never_wrongly_recovered(ns_server):
    pub = await connect(ns_server, "pub")
    # A room nobody stays in: after the TTL it is forgotten, seq and epoch too.
    gone = await join(pub, "brief:gone")
    for i in range(2):
        await pub.request("publish", room="brief:gone", payload=i)
    await pub.request("leave", room="brief:gone")
    fresh = await connect(ns_server, "fresh")
    data = await join(fresh, "brief:gone", since=0, epoch=gone["epoch"])
    assert (data["recovered"], data["seq"]) == (True, 2), "within the TTL history is there"
    await fresh.close()
    after = await recovered_after_ttl(ns_server, "brief:gone", 0, gone["epoch"])
    assert after["recovered"] is False and after["replayed"] == []
    assert after["epoch"] != gone["epoch"] and after["seq"] == 0, "a forgotten room comes back renumbered"

    # A room someone stays in keeps its seq and epoch; only its history goes.
    kept = await join(pub, "brief:kept")
    await pub.request("publish", room="brief:kept", payload="old")
    after = await recovered_after_ttl(ns_server, "brief:kept", 0, kept["epoch"])
    assert (after["recovered"], after["seq"], after["epoch"]) == (False, 1, kept["epoch"])
    assert after["replayed"] == []
    await pub.close()


async def test_max_rooms_refuses_new_rooms_until_idle_ones_expire(make_server):
    srv = make_server("--max-rooms", "2", "--history-ttl", "0.3", "--rate-limit", "0").start()
    p = await PicowsPeer.connect(srv.url)
    for room in ("r1", "r2"):
        assert (await p.request("join", room=room))["type"] == "ack"
    err = await p.request("join", room="r3")
    assert err["type"] == "error" and err["code"] == "UNAVAILABLE" and "room limit" in err["message"]
    await p.request("publish", room="r1", payload=1)
    await p.request("leave", room="r1")
    await p.request("leave", room="r2")
    deadline = time.monotonic() + 10
    while (reply := await p.request("join", room="r3"))["type"] != "ack" and time.monotonic() < deadline:
        assert reply["code"] == "UNAVAILABLE"
        await asyncio.sleep(0.1)
    assert reply["type"] == "ack", "idle rooms expired and made room"
    await p.close()


# ---------------------------------------------------------------- namespace configuration


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--namespaces", "a b:presence=true"], "namespace name 'a b'"),
        (["--namespaces", "chat:presense=true"], "presense"),
        (
            ["--namespaces", "chat:history_ttl=0"],
            "chat: history_ttl: expected a number of seconds > 0, got '0'",
        ),
        (["--namespaces", "chat:history_size=-1"], "history_size: expected a whole number >= 0, got '-1'"),
        (["--namespaces", "chat:presence=maybe"], "presence: expected true or false, got 'maybe'"),
        (["--namespaces", "chat"], "NAME:key=value"),
        (["--namespaces", "chat:presence"], "must be key=value"),
        (["--history-ttl", "0"], "--history-ttl: expected a number of seconds > 0, got '0'"),
        (["--presence-ttl", "0.5"], "presence-ttl"),
        (["--max-rooms", "0"], "max-rooms"),
    ],
)
def test_invalid_namespace_config_is_a_clear_startup_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        config.load(argv, environ={})
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_server_process_refuses_to_start_with_a_bad_namespace():
    r = subprocess.run(
        [sys.executable, "-m", "wsfan", "--namespaces", "chat:allow_publish=nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 2 and "--namespaces chat: allow_publish: expected true or false" in r.stderr, (
        r.stderr
    )


def test_namespaces_from_toml_env_and_flags_inherit_the_default(tmp_path):
    toml = tmp_path / "wsfan.toml"
    toml.write_text(
        "[server]\nhistory_size = 7\npresence = true\n"
        "[namespaces.chat]\njoin_leave = true\nhistory-ttl = 9\n[namespaces.news]\nallow_publish = false\n"
    )
    s = config.load(
        ["--config", str(toml), "--namespaces", "chat:history_size=3"],
        environ={"WSFAN_NAMESPACES": "chat:presence=false;ops:allow_history=false"},
    )
    spaces, problems = config.namespaces(s)
    assert problems == []
    chat, news, ops = (spaces.of(r) for r in ("chat:a", "news:b", "ops:c"))
    assert (chat.history_size, chat.history_ttl, chat.join_leave, chat.presence) == (3, 9.0, True, False)
    assert (news.allow_publish, news.presence, news.history_size) == (False, True, 7)
    assert (ops.allow_history, ops.kept_history) == (False, 0)
    assert spaces.of("lobby") is spaces.of("nons:x") is spaces.default
    assert spaces.of("chat") is spaces.default, "the namespace is the prefix before ':'"
    assert spaces.publish_restricted


# ---------------------------------------------------------------- the Python client


async def test_python_client_presence_and_join_leave_events(ns_server):
    from wsfan.client import Joined, Left, NotAvailable, connect

    seen: list = []
    arrived = asyncio.Event()
    room = "chat:client"
    async with (
        connect(
            ns_server.url, token=token("watcher"), on_event=lambda e: (seen.append(e), arrived.set())
        ) as w,
        connect(ns_server.url, token=token("guest"), encoding="msgpack") as g,
    ):
        await w.join(room)
        arrived.clear()
        await g.join(room)
        await asyncio.wait_for(arrived.wait(), 5)
        joined = [e for e in seen if isinstance(e, Joined)]
        assert joined == [Joined(room=room, user="guest", conn=g.welcome.conn)]
        entries = await g.presence(room)
        assert sorted(e["user"] for e in entries) == ["guest", "watcher"]
        assert await w.presence_stats(room) == {"connections": 2, "users": 2}
        with pytest.raises(NotAvailable):
            await w.presence("lobby")
        arrived.clear()
        await g.leave(room)
        await asyncio.wait_for(arrived.wait(), 5)
        assert [e for e in seen if isinstance(e, Left)] == [
            Left(room=room, user="guest", conn=g.welcome.conn)
        ]
        assert w.stats.presence_events == 2


def test_js_client_presence_and_join_leave_events_against_the_server(ns_server):
    import json
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = ROOT / "tests" / "browser" / "presence_real.mjs"
    done = subprocess.run(
        [node, "--experimental-websocket", "--no-warnings", str(script), ns_server.url, token("ann"), token("bob")],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    a, b = out["conns"]
    assert out["events"] == [
        {"type": "joined", "room": "chat:js", "user": "bob", "conn": b},
        {"type": "left", "room": "chat:js", "user": "bob", "conn": b},
    ]
    assert out["target"] == {"room": "chat:js", "user": "bob", "conn": b}
    assert out["presence"] == sorted([[a, "ann"], [b, "bob"]])
    assert out["stats"] == {"connections": 2, "users": 2}
    assert out["notAvailable"] == "NOT_AVAILABLE"
    assert out["counted"] == 2


async def test_an_sse_stream_refused_by_the_room_limit_ends_with_close_1013(make_server):
    http_port = free_port()
    srv = make_server("--max-rooms", "1", "--http-port", str(http_port), "--rate-limit", "0").start()
    wait_for_port(http_port)
    p = await PicowsPeer.connect(srv.url)
    assert (await p.request("join", room="taken"))["type"] == "ack"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{http_port}/sse", params={"room": "other"}) as r:
            assert r.status == 200
            body = await asyncio.wait_for(r.content.read(), 5)  # the server ends the stream
    refusal = b'event: error\ndata: {"code":"UNAVAILABLE","message":"room limit reached (1 rooms); '
    assert body.endswith(b'retry once idle rooms expire"}\n\nevent: close\ndata: 1013\n\n'), body
    assert refusal in body, body
    await p.close()


# ---------------------------------------------------------------- namespace parsing, property-tested


# Character classes as text strategies rather than st.from_regex: the same strings, generated several
# times faster (from_regex made the nested-dictionary test below one of the suite's slowest).
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_NS_NAME = st.text(alphabet=_ALNUM + "_.-", min_size=1, max_size=12)  # [A-Za-z0-9_.-]{1,12}
_KEYS = st.sampled_from(
    ["history_size", "history_ttl", "presence", "join_leave", "allow_publish", "allow_history"]
)
_VALUE = st.text(alphabet=_ALNUM + "_.+-", min_size=1, max_size=8)  # [A-Za-z0-9_.+-]{1,8}


@given(st.dictionaries(_NS_NAME, st.dictionaries(_KEYS, _VALUE, min_size=1), max_size=5))
def test_namespace_specs_parse_back_to_what_was_written(table):
    spec = ";".join(f"{n}:" + ",".join(f"{k}={v}" for k, v in opts.items()) for n, opts in table.items())
    assert ns_config.parse_specs(spec) == table


@given(st.text(max_size=80))
def test_any_namespace_spec_parses_or_is_refused_with_a_message(text):
    try:
        table = ns_config.parse_specs(text)
    except ValueError as exc:
        assert str(exc)
        return
    spaces, problems = ns_config.build(ns_config.Namespace(), table)
    assert all(isinstance(p, str) and p for p in problems)
    assert set(spaces.named) <= set(table)


@given(
    named=st.lists(_NS_NAME, max_size=4, unique=True),
    room=st.text(alphabet=_ALNUM + "_.:-", min_size=1, max_size=40),  # [A-Za-z0-9_.:-]{1,40}
)
def test_a_rooms_namespace_is_its_prefix_before_the_first_colon_or_the_default(named, room):
    spaces, problems = ns_config.build(ns_config.Namespace(), {n: {"presence": True} for n in named})
    assert problems == []
    prefix, sep, _ = room.partition(":")
    expected = spaces.named[prefix] if sep and prefix in spaces.named else spaces.default
    assert spaces.of(room) is expected
