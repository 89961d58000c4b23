"""PROTOCOL.md, rule by rule, against a real server process with two independent client libraries."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from helpers.peers import PEERS, Peer, PicowsPeer, WebsocketsPeer


@pytest.fixture(params=sorted(PEERS))
def Client(request):  # noqa: N802 - a class-valued fixture
    return PEERS[request.param]


async def joined(cls: type[Peer], url: str, room: str, **kw) -> Peer:
    peer = await cls.connect(url, **kw)
    ack = await peer.request("join", room=room)
    assert ack["type"] == "ack", ack
    return peer


# ---------------------------------------------------------------- on open


async def test_welcome_names_conn_user_heartbeat_and_node(server, Client):
    c = await Client.connect(server.url)
    w = c.welcome
    assert w["type"] == "welcome"
    assert set(w) == {"type", "conn", "user", "heartbeat", "node"}
    assert w["user"] == w["conn"], "without a secret the user is the conn id"
    assert w["heartbeat"] == 30000
    assert w["conn"].startswith(w["node"])
    other = await Client.connect(server.url)
    assert other.welcome["conn"] != w["conn"]
    await c.close()
    await other.close()


# ---------------------------------------------------------------- join / leave / publish


async def test_join_acks_room_seq_and_recovered(server, Client):
    c = await Client.connect(server.url)
    ack = await c.request("join", room="join-ack")
    assert ack == {
        "type": "ack",
        "requestId": ack["requestId"],
        "success": True,
        "data": {"room": "join-ack", "seq": 0, "recovered": False, "epoch": ack["data"]["epoch"]},
    }
    await c.close()


async def test_publish_reaches_every_subscriber_except_the_sender(server, Client):
    room = f"fanout-{Client.__name__}"
    pub = await joined(Client, server.url, room)
    subs = [await joined(Client, server.url, room) for _ in range(3)]
    ack = await pub.request("publish", room=room, payload={"n": 1})
    assert ack["type"] == "ack" and ack["success"] is True
    assert ack["data"] == {"room": room, "seq": 1}
    for s in subs:
        msg = await s.recv()
        assert msg == {
            "type": "message",
            "room": room,
            "seq": 1,
            "from": pub.welcome["user"],
            "payload": {"n": 1},
        }
    await pub.no_message()
    for c in (pub, *subs):
        await c.close()


async def test_payload_is_passed_through_byte_for_byte(server):
    """The delivery carries exactly the publisher's bytes: spacing, key order, escapes and number spelling."""
    import websockets

    payload = '{ "z":1,  "a" : [1.50, 2e3, "\\u00e9\\n", "é"], "t":true }'
    async with websockets.connect(server.url) as a, websockets.connect(server.url) as b:
        for ws in (a, b):
            await ws.recv()
            await ws.send('{"type":"join","id":"j","room":"verbatim"}')
            await ws.recv()
        await a.send('{"type":"publish","room":"verbatim","payload":' + payload + "}")
        text = await asyncio.wait_for(b.recv(), 5)
    assert text.endswith('"payload":' + payload + "}")
    assert json.loads(text)["payload"] == json.loads(payload)


async def test_publish_without_join_is_not_joined_and_delivers_nothing(server, Client):
    room = f"nj-{Client.__name__}"
    sub = await joined(Client, server.url, room)
    outsider = await Client.connect(server.url)
    err = await outsider.request("publish", room=room, payload=1)
    assert err["type"] == "error" and err["code"] == "NOT_JOINED" and err["success"] is False
    assert err["message"]
    await sub.no_message()
    # The refused publish consumed no seq.
    await outsider.request("join", room=room)
    ack = await outsider.request("publish", room=room, payload=2)
    assert ack["data"]["seq"] == 1
    assert (await sub.recv())["seq"] == 1
    await sub.close()
    await outsider.close()


async def test_leave_acks_and_stops_deliveries(server, Client):
    room = f"leave-{Client.__name__}"
    pub = await joined(Client, server.url, room)
    sub = await joined(Client, server.url, room)
    ack = await sub.request("leave", room=room)
    assert ack["type"] == "ack" and ack["data"] == {"room": room}
    await pub.request("publish", room=room, payload="after leave")
    await sub.no_message()
    # After leaving, publishing is NOT_JOINED again.
    err = await sub.request("publish", room=room, payload=1)
    assert err["code"] == "NOT_JOINED"
    await pub.close()
    await sub.close()


async def test_leave_of_a_room_not_joined_is_acked(server):
    c = await PicowsPeer.connect(server.url)
    ack = await c.request("leave", room="never-joined")
    assert ack["type"] == "ack" and ack["data"] == {"room": "never-joined"}
    await c.close()


async def test_join_twice_keeps_one_membership(server):
    room = "twice"
    pub = await joined(PicowsPeer, server.url, room)
    sub = await joined(PicowsPeer, server.url, room)
    await sub.request("join", room=room)
    await pub.request("publish", room=room, payload=1)
    assert (await sub.recv())["seq"] == 1
    await sub.no_message()
    await pub.close()
    await sub.close()


# ---------------------------------------------------------------- echo and ping


async def test_echo_replies_to_the_sender_only_with_the_payload(server, Client):
    c = await Client.connect(server.url)
    other = await Client.connect(server.url)
    reply = await c.request("echo", payload={"deep": [1, {"x": None}]})
    assert reply == {"type": "echo", "requestId": reply["requestId"], "payload": {"deep": [1, {"x": None}]}}
    await c.send({"type": "echo", "payload": "no id"})
    assert await c.recv() == {"type": "echo", "payload": "no id"}
    await other.no_message()
    await c.close()
    await other.close()


async def test_ping_is_answered_with_pong_carrying_ts(server, Client):
    c = await Client.connect(server.url)
    pong = await c.request("ping", ts=1234.5)
    assert pong == {"type": "pong", "requestId": pong["requestId"], "ts": 1234.5}
    await c.send({"type": "ping", "ts": 7})
    assert await c.recv() == {"type": "pong", "ts": 7}
    await c.send({"type": "ping"})
    assert await c.recv() == {"type": "pong"}
    await c.close()


# ---------------------------------------------------------------- replies


async def test_every_message_with_an_id_gets_exactly_one_reply(server, Client):
    c = await Client.connect(server.url)
    sent = [
        {"type": "join", "id": "a", "room": "one-reply"},
        {"type": "publish", "id": "b", "room": "one-reply", "payload": 1},
        {"type": "echo", "id": "c", "payload": 2},
        {"type": "ping", "id": "d"},
        {"type": "leave", "id": "e", "room": "one-reply"},
        {"type": "publish", "id": "f", "room": "one-reply", "payload": 3},  # NOT_JOINED
        {"type": "what", "id": "g"},  # UNKNOWN_TYPE
        {"type": "join", "id": "h", "room": "bad room"},  # INVALID_MESSAGE
    ]
    for m in sent:
        await c.send(m)
    replies = [await c.recv() for _ in sent]
    await c.no_message()
    assert [r["requestId"] for r in replies] == list("abcdefgh")
    assert [r["type"] for r in replies] == ["ack", "ack", "echo", "pong", "ack", "error", "error", "error"]
    await c.close()


async def test_messages_without_id_get_no_reply_on_success(server, Client):
    c = await Client.connect(server.url)
    await c.send({"type": "join", "room": "quiet"})
    await c.send({"type": "publish", "room": "quiet", "payload": 1})
    await c.send({"type": "leave", "room": "quiet"})
    await c.no_message()
    # ...but still get one on error.
    await c.send({"type": "publish", "room": "quiet", "payload": 1})
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == "NOT_JOINED" and "requestId" not in err
    await c.close()


# ---------------------------------------------------------------- errors


async def test_unknown_type_is_unknown_type(server, Client):
    c = await Client.connect(server.url)
    err = await c.request("subscribe", room="x")
    assert err["type"] == "error" and err["code"] == "UNKNOWN_TYPE" and err["success"] is False
    assert "subscribe" in err["message"]
    await c.close()


@pytest.mark.parametrize(
    "raw",
    [
        "{",
        "not json",
        "[1,2]",
        '"just a string"',
        "{}",
        '{"type": 5}',
    ],
)
async def test_unparseable_or_untyped_message_is_invalid_message(server, raw):
    c = await PicowsPeer.connect(server.url)
    await c.send_raw(raw)
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE" and err["success"] is False
    assert "requestId" not in err
    await c.close()


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "join"},  # missing room
        {"type": "join", "room": 5},  # wrong type
        {"type": "join", "room": "ok", "since": -1},
        {"type": "join", "room": "ok", "since": "3"},
        {"type": "publish", "room": "ok"},  # missing payload
        {"type": "echo"},  # missing payload
        {"type": "ping", "ts": "now"},
        {"type": "join", "room": "ok", "id": 5},  # id must be a string
    ],
)
async def test_schema_violation_is_invalid_message_with_request_id(server, fields):
    c = await PicowsPeer.connect(server.url)
    await c.send({"id": "q", **fields} if "id" not in fields else fields)
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE", err
    if isinstance(fields.get("id", "q"), str):
        assert err["requestId"] == "q"
    await c.close()


BAD_ROOMS = [
    "",
    "a b",
    "a/b",
    "é",
    "x" * 129,
    "room#1",
    "tab\t",
    "room\n",
    "room\r\n",
    "\nroom",
    "ok\x00",
    "٣",
]


@pytest.mark.parametrize("room", BAD_ROOMS)
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_bad_room_name_is_invalid_message(server, room, msgpack):
    """Every room-carrying request refuses the name, a trailing newline included (issue 11 #4)."""
    c = await PicowsPeer.connect(server.url, msgpack=msgpack)
    for kind, extra in (("join", {}), ("leave", {}), ("publish", {"payload": 1})):
        err = await c.request(kind, room=room, **extra)
        assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE" and "room" in err["message"], err
    assert (await c.request("ping"))["type"] == "pong", "the connection stays open"
    await c.close()


@pytest.mark.parametrize("room", ["a", "x" * 128, "AZaz09_.:-", "chat:room.1-b_2"])
async def test_valid_room_names_are_accepted(server, room):
    c = await PicowsPeer.connect(server.url)
    ack = await c.request("join", room=room)
    assert ack["type"] == "ack" and ack["data"]["room"] == room
    await c.close()


async def test_bad_input_changes_nothing_for_other_connections(server, Client):
    room = f"unaffected-{Client.__name__}"
    a = await joined(Client, server.url, room)
    b = await joined(Client, server.url, room)
    for raw in [
        "{",
        '{"type":"nope"}',
        '{"type":"join","room":""}',
        '{"type":"publish","room":"zz","payload":1}',
    ]:
        await a.send_raw(raw)
        assert (await a.recv())["type"] == "error"
    await b.no_message(0.2)
    ack = await a.request("publish", room=room, payload="still fine")
    assert ack["data"]["seq"] == 1
    assert (await b.recv())["payload"] == "still fine"
    fresh = await Client.connect(server.url)
    assert (await fresh.request("ping"))["type"] == "pong"
    for c in (a, b, fresh):
        await c.close()


# ---------------------------------------------------------------- seq and history


async def test_seq_increases_by_one_per_room_without_gaps(server):
    pubs = [await joined(PicowsPeer, server.url, "seq-a") for _ in range(3)]
    other = await joined(PicowsPeer, server.url, "seq-b")
    sub = await joined(PicowsPeer, server.url, "seq-a")
    n = 60
    for i in range(n):
        await pubs[i % 3].send({"type": "publish", "room": "seq-a", "payload": i})
    seqs = [(await sub.recv())["seq"] for _ in range(n)]
    assert seqs == list(range(1, n + 1))
    ack = await other.request("publish", room="seq-b", payload="x")
    assert ack["data"]["seq"] == 1, "seq is per room"
    for c in (*pubs, other, sub):
        await c.close()


async def test_join_with_since_replays_missed_messages_before_live_ones(server, Client):
    room = f"recover-{Client.__name__}"
    pub = await joined(Client, server.url, room)
    for i in range(10):
        await pub.request("publish", room=room, payload=i)
    late = await Client.connect(server.url)
    await late.send({"type": "join", "id": "j", "room": room, "since": 4})
    await pub.send({"type": "publish", "room": room, "payload": "live"})
    ack = await late.recv()
    assert ack["requestId"] == "j" and ack["data"] == {
        "room": room,
        "seq": 10,
        "recovered": True,
        "epoch": ack["data"]["epoch"],
    }
    got = [await late.recv() for _ in range(7)]
    assert [m["seq"] for m in got] == [5, 6, 7, 8, 9, 10, 11]
    assert [m["payload"] for m in got] == [4, 5, 6, 7, 8, 9, "live"]
    await pub.close()
    await late.close()


async def test_join_with_current_seq_recovers_nothing_missing(server):
    room = "recover-none"
    pub = await joined(PicowsPeer, server.url, room)
    await pub.request("publish", room=room, payload=1)
    c = await PicowsPeer.connect(server.url)
    ack = await c.request("join", room=room, since=1)
    assert ack["data"] == {"room": room, "seq": 1, "recovered": True, "epoch": ack["data"]["epoch"]}
    await c.no_message()
    await pub.close()
    await c.close()


async def test_since_older_than_history_is_not_recovered(make_server):
    srv = make_server("--history-size", "5", "--rate-limit", "0").start()
    pub = await joined(PicowsPeer, srv.url, "short")
    for i in range(12):
        await pub.request("publish", room="short", payload=i)
    c = await PicowsPeer.connect(srv.url)
    ack = await c.request("join", room="short", since=2)
    assert ack["data"] == {"room": "short", "seq": 12, "recovered": False, "epoch": ack["data"]["epoch"]}
    got = [await c.recv() for _ in range(5)]
    assert [m["seq"] for m in got] == [8, 9, 10, 11, 12], "what history still has is replayed"
    # since exactly at the edge of history is recovered
    c2 = await PicowsPeer.connect(srv.url)
    ack = await c2.request("join", room="short", since=7)
    assert ack["data"]["recovered"] is True
    assert [(await c2.recv())["seq"] for _ in range(5)] == [8, 9, 10, 11, 12]
    for p in (pub, c, c2):
        await p.close()


async def test_since_beyond_the_rooms_seq_is_not_recovered(server):
    """A seq this server never assigned (e.g. it restarted and lost history) must not look recovered."""
    c = await PicowsPeer.connect(server.url)
    ack = await c.request("join", room="from-the-future", since=50)
    assert ack["data"] == {
        "room": "from-the-future",
        "seq": 0,
        "recovered": False,
        "epoch": ack["data"]["epoch"],
    }
    await c.close()


# ---------------------------------------------------------------- MessagePack


async def test_msgpack_subprotocol_gets_binary_messagepack(server, Client):
    c = await Client.connect(server.url, msgpack=True)
    assert c.welcome["type"] == "welcome"
    pong = await c.request("ping", ts=3)
    assert pong["type"] == "pong" and pong["ts"] == 3
    if isinstance(c, WebsocketsPeer):
        assert c.ws.subprotocol == "msgpack"
    await c.close()


async def test_msgpack_payload_passes_through_and_crosses_to_json(server):
    room = "mixed"
    mp_pub = await joined(PicowsPeer, server.url, room, msgpack=True)
    mp_sub = await joined(WebsocketsPeer, server.url, room, msgpack=True)
    js_sub = await joined(PicowsPeer, server.url, room)
    payload = {"bin": "x", "list": [1, 2.5, None, True], "nested": {"k": "é"}}
    raw = msgspec.msgpack.encode({"type": "publish", "id": "p", "room": room, "payload": payload})
    await mp_pub.send_raw(raw)
    assert (await mp_pub.recv())["data"]["seq"] == 1
    assert (await mp_sub.recv())["payload"] == payload
    assert (await js_sub.recv())["payload"] == payload
    # and JSON to MessagePack
    await js_sub.request("publish", room=room, payload={"from": "json"})
    assert (await mp_sub.recv())["payload"] == {"from": "json"}
    assert (await mp_pub.recv())["payload"] == {"from": "json"}
    for c in (mp_pub, mp_sub, js_sub):
        await c.close()


async def test_msgpack_schema_errors_use_the_same_codes(server):
    c = await PicowsPeer.connect(server.url, msgpack=True)
    err = await c.request("join", room="bad room")
    assert err["code"] == "INVALID_MESSAGE"
    err = await c.request("nope")
    assert err["code"] == "UNKNOWN_TYPE"
    await c.send_raw(b"\xc1")  # never-used msgpack byte
    assert (await c.recv())["code"] == "INVALID_MESSAGE"
    await c.close()


async def test_frame_in_the_wrong_encoding_is_invalid_message_with_its_id(server):
    mp = await PicowsPeer.connect(server.url, msgpack=True)
    await mp.send_raw('{"type":"ping","id":"t1"}')  # text JSON on a MessagePack connection
    err = await mp.recv()
    assert err["code"] == "INVALID_MESSAGE" and err["requestId"] == "t1" and "binary" in err["message"]
    js = await PicowsPeer.connect(server.url)
    await js.send_raw(msgspec.msgpack.encode({"type": "ping", "id": "b1"}))  # binary on a JSON connection
    err = await js.recv()
    assert err["code"] == "INVALID_MESSAGE" and err["requestId"] == "b1" and "text" in err["message"]
    for c in (mp, js):
        assert (await c.request("ping"))["type"] == "pong", "the connection stays open"
        await c.close()
