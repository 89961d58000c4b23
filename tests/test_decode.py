"""Every surface that decodes user bytes turns any decoder failure into its documented error.

And a payload is refused (INVALID_MESSAGE, before it gets a seq) unless every encoding the
protocol offers can carry it exactly (docs/protocol-choices.md, "Decoding" and "Encodings").
Against a real server process, with the picows peer and raw frames.
"""

from __future__ import annotations

import datetime
import json

import aiohttp
import msgspec
import pytest

from helpers.peers import PicowsPeer
from helpers.ports import free_port, wait_for_port
from helpers.servers import ServerProcess

ADMIN = "admin-key-for-decode-tests"
DEEP = 1000  # past the interpreter's recursion limit once inside msgspec


@pytest.fixture(scope="module")
def server():
    http_port = free_port()
    srv = ServerProcess(
        "--echo-endpoint", "--rate-limit", "0", "--admin-key", ADMIN, "--http-port", str(http_port)
    )  # fmt: skip
    srv.http = f"http://127.0.0.1:{http_port}"
    srv.start()
    wait_for_port(http_port)
    yield srv
    srv.kill()


def deep_json(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def deep_msgpack(levels: int) -> bytes:
    return b"\x91" * levels + b"\xc0"  # fixarray of one element, levels deep, around nil


def pack(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


async def assert_still_serves(c: PicowsPeer) -> None:
    pong = await c.request("ping")
    assert pong["type"] == "pong", "the connection stays open and answers"


# ---------------------------------------------------------------- decoder depth (issue 11 #2)


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
@pytest.mark.parametrize(
    "fields",
    [
        {"type": "ping", "id": "d1", "x": None},  # an ignored extra field
        {"type": "echo", "id": "d1", "payload": None},  # a Raw payload (skipped, not parsed)
        {"type": "publish", "id": "d1", "room": "deep", "payload": None},
        {"type": "ping", "id": None},  # the field the error reply would quote
    ],
    ids=["extra", "echo", "publish", "id"],
)
async def test_deep_nesting_anywhere_is_invalid_message_and_the_connection_stays(server, msgpack, fields):
    """~1,000 levels (2 KB of ``[``) used to escape msgspec as RecursionError and close with 1011."""
    c = await PicowsPeer.connect(server.url, msgpack=msgpack)
    deep = msgspec.Raw(deep_msgpack(DEEP) if msgpack else deep_json(DEEP))
    msg = {k: deep if v is None else v for k, v in fields.items()}
    await c.send_raw(pack(msg) if msgpack else msgspec.json.encode(msg).decode())
    err = await c.recv()
    assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE", err
    assert err["message"] == "not parseable: nested too deeply"
    await assert_still_serves(c)
    await c.close()


async def test_deep_rate_limited_message_is_answered_without_an_id(make_server):
    """The probe that reads a refused message's id survives nesting too (RATE_LIMITED path)."""
    srv = make_server("--rate-limit", "1", "--rate-burst", "1").start()
    c = await PicowsPeer.connect(srv.url)
    await c.send_raw('{"type":"ping"}')
    assert (await c.recv())["type"] == "pong"
    await c.send_raw(b'{"type":"ping","id":"r","x":' + deep_json(DEEP) + b"}")
    err = await c.recv()
    assert err["code"] == "RATE_LIMITED" and "requestId" not in err
    await c.close()


# ---------------------------------------------------------------- replies do not quote the decoder


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"type": "join", "room": "bad room"}, "room must be 1-128 characters of A-Z a-z 0-9 _ . : -"),
        (
            {"type": "join", "room": "ok", "since": -1},
            "since must be a seq (an integer from 0 to 2^63-1) or null",
        ),
        ({"type": "join"}, "missing field 'room'"),
        (
            {"type": "join", "room": "ok", "epoch": "e" * 65},
            "epoch must be a string of at most 64 characters or null",
        ),
        ({"type": "ping", "ts": "now"}, "ts must be a number or null"),
        ({"type": "publish", "room": "ok"}, "missing field 'payload'"),
    ],
)
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_schema_errors_name_the_field_and_rule_not_the_decoder_text(server, fields, expected, msgpack):
    c = await PicowsPeer.connect(server.url, msgpack=msgpack)
    fields = dict(fields)
    err = await c.request(fields.pop("type"), **fields)
    assert err["code"] == "INVALID_MESSAGE" and err["message"] == expected
    await c.close()


@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_unparseable_message_says_so_without_the_decoder_text(server, msgpack):
    c = await PicowsPeer.connect(server.url, msgpack=msgpack)
    await c.send_raw(b"\xc1" if msgpack else "{nope")
    err = await c.recv()
    assert err["message"] == ("not parseable as MSGPACK" if msgpack else "not parseable as JSON")
    await c.close()


# ---------------------------------------------------------------- numbers on the wire


@pytest.mark.parametrize("since", [True, False, 1.0, 0.0, -1, 2**63, 2**64 - 1, "3", [], {}])
@pytest.mark.parametrize("msgpack", [False, True], ids=["json", "msgpack"])
async def test_since_is_an_integer_from_0_to_2_63_minus_1_only(server, since, msgpack):
    c = await PicowsPeer.connect(server.url, msgpack=msgpack)
    err = await c.request("join", room="since-rule", since=since)
    assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE", (since, err)
    ok = await c.request("join", room="since-rule", since=2**63 - 1)
    assert ok["type"] == "ack" and ok["data"]["recovered"] is False
    await c.close()


async def test_json_since_written_as_a_float_is_refused(server):
    """1e2 and 3.0 are floats in JSON text, even when integral: not a seq."""
    c = await PicowsPeer.connect(server.url)
    for text in ("1e2", "3.0", "0.0", "-0.0"):
        await c.send_raw(f'{{"type":"join","id":"f","room":"r","since":{text}}}')
        err = await c.recv()
        assert err["code"] == "INVALID_MESSAGE", text
    await c.close()


# ---------------------------------------------------------------- payloads in every encoding (issue 11 #7)


async def mixed_room(
    server: ServerProcess, room: str
) -> tuple[PicowsPeer, PicowsPeer, PicowsPeer, PicowsPeer]:
    js_pub = await PicowsPeer.connect(server.url)
    mp_pub = await PicowsPeer.connect(server.url, msgpack=True)
    js_sub = await PicowsPeer.connect(server.url)
    mp_sub = await PicowsPeer.connect(server.url, msgpack=True)
    for c in (js_pub, mp_pub, js_sub, mp_sub):
        assert (await c.request("join", room=room))["type"] == "ack"
    return js_pub, mp_pub, js_sub, mp_sub


BAD_JSON_PAYLOADS = [
    "123456789012345678901234567890",  # the case: > 2^64
    '{"n":18446744073709551616}',  # 2^64
    "[-9223372036854775809]",  # -2^63 - 1
    "1e400",  # passes the message decoder (payload stays raw), no float can hold it
    "-1e309",
    "[" * 65 + "]" * 65,  # deeper than MAX_PAYLOAD_DEPTH
]
BAD_MSGPACK_PAYLOADS = [
    pack({"b": b"\x00\x01"}),  # bin
    pack(msgspec.msgpack.Ext(5, b"x")),  # ext
    pack(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)),  # timestamp ext -1
    pack({1: "int key"}),
    pack({"k": {(1, 2): "array key"}}),
    pack(float("nan")),
    pack([float("inf")]),
    pack({"x": float("-inf")}),
    b"\xa2\xff\xfe",  # a str that is not UTF-8
    deep_msgpack(65),
]


def publish_raw(kind_json: bool, room: str, payload: bytes | str, rid: str) -> bytes | str:
    if kind_json:
        return f'{{"type":"publish","id":"{rid}","room":"{room}","payload":{payload}}}'
    head = pack({"type": "publish", "id": rid, "room": room})
    return bytes([head[0] + 1]) + head[1:] + b"\xa7payload" + payload


async def test_untranslatable_payloads_are_refused_before_a_seq_in_both_directions(server):
    room = "portable"
    js_pub, mp_pub, js_sub, mp_sub = await mixed_room(server, room)
    for i, payload in enumerate(BAD_JSON_PAYLOADS):
        await js_pub.send_raw(publish_raw(True, room, payload, f"j{i}"))
        err = await js_pub.recv()
        assert err["code"] == "INVALID_MESSAGE" and err["requestId"] == f"j{i}", (payload, err)
        assert err["message"].startswith("payload ")
    for i, payload in enumerate(BAD_MSGPACK_PAYLOADS):
        await mp_pub.send_raw(publish_raw(False, room, payload, f"m{i}"))
        err = await mp_pub.recv()
        assert err["code"] == "INVALID_MESSAGE" and err["requestId"] == f"m{i}", (payload, err)
    for c in (js_sub, mp_sub, js_pub, mp_pub):
        await c.no_message(0.2)
    # Nothing was numbered: the next publish is seq 1 and reaches every encoding.
    ack = await js_pub.request("publish", room=room, payload={"n": 18446744073709551615})
    assert ack["data"]["seq"] == 1
    for c in (js_sub, mp_sub, mp_pub):
        assert (await c.recv())["payload"] == {"n": 18446744073709551615}
    late = await PicowsPeer.connect(server.url, msgpack=True)
    ack = await late.request("join", room=room, since=0)
    assert ack["data"]["recovered"] is True and ack["data"]["seq"] == 1
    assert (await late.recv())["seq"] == 1
    for c in (js_pub, mp_pub, js_sub, mp_sub, late):
        await c.close()


async def test_payloads_at_the_limits_cross_both_ways_exactly(server):
    room = "portable-limits"
    js_pub, mp_pub, js_sub, mp_sub = await mixed_room(server, room)
    nested: object = 1
    for _ in range(63):
        nested = [nested]
    values = [
        {"max": 2**64 - 1, "min": -(2**63), "f": 1.7976931348623157e308, "tiny": 5e-324},
        {"s": "é\U0001f600", "esc": "\\ud800 is text here", "none": None, "t": True, "f": -0.0},
        nested,
        "",
    ]
    for value in values:
        ack = await js_pub.request("publish", room=room, payload=value)
        assert ack["type"] == "ack", (value, ack)
        for c in (js_sub, mp_sub, mp_pub):
            assert (await c.recv())["payload"] == value
        await mp_pub.send_raw(publish_raw(False, room, pack(value), "m"))
        assert (await mp_pub.recv())["type"] == "ack"
        for c in (js_sub, mp_sub, js_pub):
            assert (await c.recv())["payload"] == value
    for c in (js_pub, mp_pub, js_sub, mp_sub):
        await c.close()


# ---------------------------------------------------------------- admin POST /publish


async def admin_publish(server: ServerProcess, body: bytes) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.http}/publish", data=body, headers=headers) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize(
    "body, reason",
    [
        (b'{"room":"a","payload":' + deep_json(DEEP) + b"}", "not parseable"),
        (b'{"room":"a","x":' + deep_json(DEEP) + b',"payload":1}', "nested too deeply"),
        (b'{"room":"a","payload":123456789012345678901234567890}', "payload has an integer"),
        (b'{"room":"a","payload":1e400}', "payload has a NaN or infinite float"),
        (b'{"room":"a","payload":{"x":[-1e400]}}', "payload has a NaN or infinite float"),
        (b'{"room":"a","payload":NaN}', "not parseable"),  # no NaN or Infinity in JSON (RFC 8259 section 6)
        (b'{"room":"a","payload":[Infinity]}', "not parseable"),
        (b'{"room":"a","payload":"\xff"}', "payload is not a valid value"),
        (b'{"room":"a","payload":' + deep_json(65) + b"}", "payload nested deeper than 64"),
        (b'{"room":"a\\n","payload":1}', "room must be"),
        (b'{"room":"a"}', "missing field 'payload'"),
        (b"[1]", "body must be a JSON object {'room','payload'}"),
    ],
)
async def test_admin_publish_refuses_bad_bodies_with_400_and_no_decoder_text(server, body, reason):
    status, reply = await admin_publish(server, body)
    assert status == 400, reply
    assert reason in reply["error"] and "Expected" not in reply["error"] and "`" not in reply["error"]


async def test_admin_publish_refusal_takes_no_seq(server):
    room = "admin-portable"
    sub = await PicowsPeer.connect(server.url, msgpack=True)
    await sub.request("join", room=room)
    status, _ = await admin_publish(server, b'{"room":"%s","payload":[18446744073709551616]}' % room.encode())
    assert status == 400
    status, reply = await admin_publish(
        server, b'{"room":"%s","payload":[18446744073709551615]}' % room.encode()
    )
    assert status == 200 and reply["seq"] == 1
    assert (await sub.recv())["payload"] == [18446744073709551615]
    await sub.close()


# ---------------------------------------------------------------- SSE carries a multi-line JSON payload


async def test_sse_event_with_newlines_in_a_json_payload_is_one_event(server):
    room = "sse-lines"
    pub = await PicowsPeer.connect(server.url)
    await pub.request("join", room=room)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http}/sse", params={"room": room}) as sse:
            await sse.content.readuntil(b"\n\n")
            await pub.send_raw(
                f'{{"type":"publish","id":"p","room":"{room}","payload":{{"a":\n1,\r\n"b":\r2}}}}'
            )
            assert (await pub.recv())["type"] == "ack"
            block = (await sse.content.readuntil(b"\n\n")).decode()
    lines = block.rstrip("\n").split("\n")
    assert lines[0].startswith("id: ") and lines[0].endswith(":1"), lines  # id: <epoch>:<seq>
    assert all(line.startswith("data: ") for line in lines[1:]), lines
    event = json.loads("\n".join(line[len("data: ") :] for line in lines[1:]))  # as EventSource joins them
    assert event["payload"] == {"a": 1, "b": 2}
    await pub.close()


# ---------------------------------------------------------------- bytes from Redis (cluster mode)


async def test_malformed_envelopes_and_history_entries_are_skipped_not_fatal(redis_server, make_server):
    """What comes back from Redis is decoded too: junk on a room's channel or in its history
    stream (another program, a different version) is logged and skipped; the node keeps
    serving, and a join whose replay lost an entry is answered with ``recovered: false``."""
    import redis as redis_py

    from wsfan.server.broker.redis_layout import channel_name, history_key, meta_key

    node = make_server("--broker", redis_server.url, "--rate-limit", "0").start()
    room = "junk"
    pub = await PicowsPeer.connect(node.url)
    sub = await PicowsPeer.connect(node.url, msgpack=True)
    for c in (pub, sub):
        assert (await c.request("join", room=room))["type"] == "ack"
    assert (await pub.request("publish", room=room, payload="one"))["data"]["seq"] == 1
    assert (await sub.recv())["payload"] == "one"
    r = redis_py.Redis(port=redis_server.port)
    try:
        for junk in (b"\xc1", b"not msgpack", deep_msgpack(DEEP), pack([1, [1, 2]]), pack([1, 2, 3])):
            assert r.publish(channel_name(room), junk) == 1, "the node is subscribed"
        r.hincrby(meta_key(room), "s", 1)  # seq 2 is taken by an entry nobody can read
        r.xadd(history_key(room), {"m": deep_msgpack(DEEP)}, id="2-0")
    finally:
        r.close()
    assert (await pub.request("publish", room=room, payload="three"))["data"]["seq"] == 3
    assert (await sub.recv())["payload"] == "three", "the live path survived the junk"
    late = await PicowsPeer.connect(node.url)
    ack = await late.request("join", room=room, since=0)
    assert ack["type"] == "ack" and ack["data"]["recovered"] is False and ack["data"]["seq"] == 3
    assert [(await late.recv())["seq"] for _ in range(2)] == [1, 3]
    assert node.alive()
    for c in (pub, sub, late):
        await c.close()


# ---------------------------------------------------------------- the Python client, facing a hostile server


async def test_client_ignores_a_server_message_it_cannot_decode_and_keeps_working():
    """A server that nests a frame 1,000 deep (or sends junk) must not break the client's reader."""
    import websockets

    from wsfan.client import connect

    async def hostile(ws) -> None:
        await ws.send(
            json.dumps({"type": "welcome", "conn": "c1", "user": "u", "heartbeat": 30000, "node": "n"})
        )
        async for raw in ws:
            req = json.loads(raw)
            await ws.send((b'{"type":"pong","x":' + deep_json(DEEP) + b"}").decode())
            await ws.send("{not json")
            await ws.send('{"type":"pong","requestId":' + json.dumps(req.get("id")) + "}")

    async with websockets.serve(hostile, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/ws", reconnect=False) as c:
            assert await c.ping(timeout=5) >= 0
            assert await c.ping(timeout=5) >= 0, "still reading after the junk"
