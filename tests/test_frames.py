"""RFC 6455 frame-level rules, checked with our own raw-socket client (tests/helpers/rawws.py).

Each test is named after the rule it checks, so a failure points at the rule the
server broke. Where a rule applies to both endpoints the test runs against ``/ws``
(the pub/sub protocol) and ``/echo`` (verbatim echo). Every bad-input test also
checks that the bad input hurt nobody else: a client connected before it still
works, and a fresh client can connect afterwards.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.rawws import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    RSV1,
    RSV2,
    RSV3,
    TEXT,
    ConnectionClosed,
    HandshakeFailed,
    RawWS,
    build_frame,
    close_payload,
    http_request,
)
from helpers.servers import ServerProcess

HOST = "127.0.0.1"
LIMIT = 1024  # --max-message-size of the `limited` server

PATHS = ["/ws", "/echo"]

_ids = itertools.count(1)


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerProcess]:
    """A server with a small message limit, for the size rules (module-scoped: started once)."""
    srv = ServerProcess("--echo-endpoint", "--rate-limit", "0", "--max-message-size", str(LIMIT)).start()
    yield srv
    srv.kill()


def connect(srv: ServerProcess, path: str = "/ws", protocols: list[str] | None = None) -> RawWS:
    """Open a connection; on /ws also read the welcome, so the next frame is a reply."""
    ws = RawWS.connect(HOST, srv.port, path, protocols=protocols)
    if path == "/ws":
        welcome = decode(ws, *ws.recv_message())
        assert welcome["type"] == "welcome", welcome
    return ws


def decode(ws: RawWS, opcode: int, data: bytes) -> dict[str, Any]:
    if ws.subprotocol == "msgpack":
        assert opcode == BINARY, f"msgpack connection got opcode {opcode:#x}"
        return msgspec.msgpack.decode(data)
    assert opcode == TEXT, f"JSON connection got opcode {opcode:#x}"
    return msgspec.json.decode(data)


def recv_obj(ws: RawWS) -> dict[str, Any]:
    return decode(ws, *ws.recv_message())


def next_id() -> int:
    return next(_ids)


def echo_request(payload: Any) -> tuple[str, bytes]:
    rid = f"r{next(_ids)}"
    return rid, msgspec.json.encode({"type": "echo", "id": rid, "payload": payload})


def assert_works(ws: RawWS, path: str) -> None:
    """One round trip on an open connection: echo on /ws, a text message on /echo."""
    if path == "/ws":
        rid, msg = echo_request({"alive": True})
        ws.send_text(msg)
        reply = recv_obj(ws)
        assert reply["type"] == "echo" and reply["requestId"] == rid, reply
    else:
        marker = f"alive {next_id()}"
        ws.send_text(marker)
        assert ws.recv_message() == (TEXT, marker.encode())


TOO_BIG = f"message larger than {LIMIT} bytes"
BAD_UTF8 = "invalid UTF-8 in a text message"


def expect_fail(ws: RawWS, code: int, reason: str) -> None:
    """The server's next frame is a close with ``code`` and ``reason``; after our close reply it closes the TCP connection.

    Next frame, not just some later one: nothing of a bad message may be acted upon (echoed, answered).
    The reason is the server's own sentence for the rule, whoever found it broken (transport.py or
    picows' frame parser, whose exception text must not reach the client).
    """
    f = ws.recv_frame()
    assert f.opcode == CLOSE, f"expected close {code}, got opcode {f.opcode:#x} with {f.payload[:60]!r}"
    got, said = f.close_info()
    assert (got, said) == (code, reason), f"expected close {code} {reason!r}, got {got} {said!r}"
    ws.send_close(code)
    assert ws.wait_eof(3.0), "server did not close the TCP connection after the close handshake"


@pytest.fixture
def bystanders(server: ServerProcess) -> Iterator[dict[str, RawWS]]:
    """Healthy clients on both endpoints, connected before the bad input arrives."""
    peers = {path: connect(server, path) for path in PATHS}
    yield peers
    for ws in peers.values():
        ws.close()


@pytest.fixture
def limited_bystanders(limited: ServerProcess) -> Iterator[dict[str, RawWS]]:
    """Like ``bystanders``, on the small-limit server."""
    peers = {path: connect(limited, path) for path in PATHS}
    yield peers
    for ws in peers.values():
        ws.close()


def assert_unaffected(srv: ServerProcess, bystanders: dict[str, RawWS] | None = None) -> None:
    """The server still serves: already-open connections keep working, fresh ones can connect."""
    assert srv.alive(), "server process died"
    for path, ws in (bystanders or {}).items():
        assert_works(ws, path)
    for path in PATHS:
        with connect(srv, path) as fresh:
            assert_works(fresh, path)


def exact_size_echo_request(size: int) -> tuple[str, bytes]:
    """A JSON echo request of exactly ``size`` bytes."""
    rid, base = echo_request("")
    msg = base.replace(b'"payload":""', b'"payload":"' + b"x" * (size - len(base)) + b'"')
    assert len(msg) == size
    return rid, msg


# ---------------------------------------------------------------- reassembly (RFC 6455 §5.4)


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
def test_fragmented_message_is_reassembled_on_echo(server, opcode):
    chunks = [b"Hello, ", b"", b"fragmented ", b"w\xc3\xb6rld"]  # an empty fragment is legal
    with connect(server, "/echo") as ws:
        ws.send_fragments(opcode, chunks)
        f = ws.recv_frame()
        assert (f.opcode, f.fin, f.payload) == (opcode, True, b"".join(chunks)), "not echoed as one message"
        assert not f.masked and f.rsv == 0, "server frames must be unmasked, with no reserved bits"


def test_fragmented_echo_request_is_reassembled_on_ws(server):
    rid, msg = echo_request({"k": "v" * 100})
    with connect(server, "/ws") as ws:
        ws.send_fragments(TEXT, [msg[:5], msg[5:40], msg[40:]])
        f = ws.recv_frame()
        assert f.opcode == TEXT and f.fin and not f.masked
        reply = msgspec.json.decode(f.payload)
        assert reply == {"type": "echo", "requestId": rid, "payload": {"k": "v" * 100}}


def test_fragmented_publish_is_delivered_whole_to_other_subscriber(server):
    room = f"frag-{next_id()}"
    with connect(server, "/ws") as pub, connect(server, "/ws") as sub:
        for i, ws in enumerate((pub, sub)):
            ws.send_text(msgspec.json.encode({"type": "join", "id": f"j{i}", "room": room}))
            assert recv_obj(ws)["type"] == "ack"
        payload = b'{"text":"' + b"z" * 300 + b'","n":[1,2,3]}'
        msg = b'{"type":"publish","id":"p1","room":"' + room.encode() + b'","payload":' + payload + b"}"
        pub.send_fragments(TEXT, [msg[i : i + 50] for i in range(0, len(msg), 50)])
        ack = recv_obj(pub)
        assert ack["type"] == "ack" and ack["requestId"] == "p1", ack
        f = sub.recv_frame()
        assert f.opcode == TEXT and f.fin, "delivery must be one unfragmented text frame"
        delivery = msgspec.json.decode(f.payload)
        assert delivery["type"] == "message" and delivery["room"] == room
        assert b'"payload":' + payload in f.payload, "payload bytes not passed through verbatim"


def test_fragmented_msgpack_message_is_reassembled_on_ws(server):
    rid = f"m{next_id()}"
    msg = msgspec.msgpack.encode({"type": "echo", "id": rid, "payload": {"blob": b"\x00\xff" * 200}})
    with connect(server, "/ws", protocols=["msgpack"]) as ws:
        ws.send_fragments(BINARY, [msg[:3], msg[3:100], msg[100:]])
        reply = recv_obj(ws)
        assert reply == {"type": "echo", "requestId": rid, "payload": {"blob": b"\x00\xff" * 200}}


# ---------------------------------------------------------------- control frames inside a message (§5.4, §5.5)


@pytest.mark.parametrize("path", PATHS)
def test_ping_between_fragments_is_answered_and_message_still_reassembled(server, path):
    if path == "/ws":
        rid, msg = echo_request("between pings")
    else:
        rid, msg = "", b"between pings"
    a, b, c = msg[:4], msg[4:9], msg[9:]
    with connect(server, path) as ws:
        ws.send_frame(TEXT, a, fin=False)
        ws.send_frame(PING, b"p1")
        ws.send_frame(CONT, b, fin=False)
        ws.send_frame(PONG, b"unsolicited")  # an unsolicited pong must be ignored (§5.5.3)
        ws.send_frame(PING, b"")
        ws.send_frame(CONT, c, fin=True)
        frames = [ws.recv_frame() for _ in range(3)]
        assert [(f.opcode, f.payload) for f in frames[:2]] == [(PONG, b"p1"), (PONG, b"")], (
            "each ping must get a pong with the same payload, before the message completes"
        )
        assert frames[2].opcode == TEXT and frames[2].fin
        if path == "/ws":
            assert msgspec.json.decode(frames[2].payload)["requestId"] == rid
        else:
            assert frames[2].payload == msg


@pytest.mark.parametrize("path", PATHS)
def test_ping_is_answered_with_pong_carrying_same_payload(server, path):
    with connect(server, path) as ws:
        ws.send_frame(PING, b"\x00binary\xffping")
        f = ws.recv_frame()
        assert (f.opcode, f.payload, f.fin, f.masked) == (PONG, b"\x00binary\xffping", True, False)


# ---------------------------------------------------------------- control-frame rate and fragment count (1008)

FRUGAL_CONTROL = 5  # --max-control-frames of the `frugal` server
FRUGAL_FRAGMENTS = 8  # --max-fragments of the `frugal` server


@pytest.fixture(scope="module")
def frugal() -> Iterator[ServerProcess]:
    """A server with small control-frame and fragment limits (module-scoped: started once)."""
    srv = ServerProcess(
        "--echo-endpoint",
        "--rate-limit",
        "0",
        "--max-control-frames",
        str(FRUGAL_CONTROL),
        "--max-fragments",
        str(FRUGAL_FRAGMENTS),
    ).start()
    yield srv
    srv.kill()


def count_pongs_then_close(ws: RawWS) -> tuple[int, tuple[int | None, str]]:
    """Read pongs until the close frame; the number of pongs and the close's code and reason."""
    pongs = 0
    while True:
        f = ws.recv_frame()
        if f.opcode == PONG:
            pongs += 1
            continue
        assert f.opcode == CLOSE, f"expected pongs then a close, got opcode {f.opcode:#x}"
        ws.send_close(1000)
        return pongs, f.close_info()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opcode", [PING, PONG], ids=["ping", "unsolicited-pong"])
def test_control_frame_flood_closes_1008(frugal, path, opcode):
    """--max-control-frames N: a burst of N pings is answered, the flood behind it closes 1008."""
    with connect(frugal, path) as ws:
        ws.send_raw(b"".join(build_frame(opcode, b"f") for _ in range(200)))
        pongs, (code, reason) = count_pongs_then_close(ws)
        assert (code, reason) == (1008, f"more than {FRUGAL_CONTROL} control frames per second")
        if opcode == PING:
            # The bucket starts full (N); a slow run refills a token or two, never 200.
            assert FRUGAL_CONTROL <= pongs < 200, pongs
        else:
            assert pongs == 0, "an unsolicited pong is not answered"
        assert ws.wait_eof(3.0)
    assert_unaffected(frugal)


@pytest.mark.parametrize("path", PATHS)
def test_pings_within_the_control_frame_limit_are_all_answered(frugal, path):
    with connect(frugal, path) as ws:
        ws.send_raw(b"".join(build_frame(PING, str(i).encode()) for i in range(FRUGAL_CONTROL)))
        got = [ws.recv_frame() for _ in range(FRUGAL_CONTROL)]
        assert [(f.opcode, f.payload) for f in got] == [
            (PONG, str(i).encode()) for i in range(FRUGAL_CONTROL)
        ]
        assert_works(ws, path)


@pytest.mark.parametrize("path", PATHS)
def test_message_at_the_fragment_limit_is_reassembled(frugal, path):
    if path == "/ws":
        rid, msg = echo_request("x" * 40)
    else:
        rid, msg = "", b"y" * 40
    step = -(-len(msg) // FRUGAL_FRAGMENTS)
    chunks = [msg[i : i + step] for i in range(0, len(msg), step)]
    chunks += [b""] * (FRUGAL_FRAGMENTS - len(chunks))
    assert len(chunks) == FRUGAL_FRAGMENTS
    with connect(frugal, path) as ws:
        ws.send_fragments(TEXT, chunks)
        f = ws.recv_frame()
        assert f.opcode == TEXT and f.fin
        if path == "/ws":
            assert msgspec.json.decode(f.payload)["requestId"] == rid
        else:
            assert f.payload == msg


@pytest.mark.parametrize("path", PATHS)
def test_message_in_more_fragments_than_the_limit_closes_1008(frugal, path):
    with connect(frugal, path) as ws:
        ws.send_fragments(TEXT, [b"{"] + [b" "] * FRUGAL_FRAGMENTS)  # one more than the limit
        expect_fail(ws, 1008, f"message in more than {FRUGAL_FRAGMENTS} fragments")
    assert_unaffected(frugal)


@pytest.mark.parametrize("path", PATHS)
def test_default_limits_close_a_one_byte_fragment_flood_and_a_ping_flood(server, path):
    """Defaults (--max-fragments 1024, --max-control-frames 50): 5000 one-byte fragments and 5000 pings."""
    with connect(server, path) as ws:
        ws.send_fragments(TEXT, [b" "] * 5000)
        expect_fail(ws, 1008, "message in more than 1024 fragments")
    with connect(server, path) as ws:
        ws.send_raw(b"".join(build_frame(PING) for _ in range(5000)))
        pongs, close = count_pongs_then_close(ws)
        assert close == (1008, "more than 50 control frames per second") and 50 <= pongs < 5000, pongs
    assert_unaffected(server)


# ---------------------------------------------------------------- size limit on the whole message


@pytest.mark.parametrize("path", PATHS)
def test_single_frame_over_limit_closes_1009(limited, limited_bystanders, path):
    with connect(limited, path) as ws:
        ws.send_frame(TEXT, b"a" * (LIMIT + 1))
        expect_fail(ws, 1009, TOO_BIG)
    assert_unaffected(limited, limited_bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_fragments_summing_over_limit_close_1009(limited, limited_bystanders, path):
    with connect(limited, path) as ws:
        ws.send_frame(TEXT, b"a" * 400, fin=False)
        ws.send_frame(CONT, b"a" * 400, fin=False)
        ws.send_frame(CONT, b"a" * 400, fin=True)  # each frame is under the limit, the message is not
        expect_fail(ws, 1009, TOO_BIG)
    assert_unaffected(limited, limited_bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_declared_length_over_limit_closes_1009_without_waiting_for_payload(
    limited, limited_bystanders, path
):
    with connect(limited, path) as ws:
        ws.send_frame(BINARY, b"", length=1 << 40)  # the header alone; 1 TiB never follows
        expect_fail(ws, 1009, TOO_BIG)
    assert_unaffected(limited, limited_bystanders)


@pytest.mark.parametrize("fragmented", [False, True], ids=["single", "fragmented"])
@pytest.mark.parametrize("path", PATHS)
def test_message_exactly_at_limit_is_accepted(limited, path, fragmented):
    if path == "/ws":
        rid, msg = exact_size_echo_request(LIMIT)
    else:
        rid, msg = "", bytes(range(256)) * (LIMIT // 256)
    assert len(msg) == LIMIT
    opcode = TEXT if path == "/ws" else BINARY
    with connect(limited, path) as ws:
        if fragmented:
            ws.send_fragments(opcode, [msg[:300], msg[300:301], msg[301:]])
        else:
            ws.send_frame(opcode, msg)
        op, data = ws.recv_message()
        if path == "/ws":
            assert msgspec.json.decode(data)["requestId"] == rid
        else:
            assert (op, data) == (BINARY, msg)


def test_default_limit_is_64_kib_with_64bit_length_encoding(server):
    """No --max-message-size: 65536 bytes (needs the 64-bit length form) pass, 65537 close with 1009."""
    msg = bytes(range(256)) * 256
    with connect(server, "/echo") as ws:
        ws.send_frame(BINARY, msg)
        assert ws.recv_message() == (BINARY, msg)
        ws.send_fragments(BINARY, [msg[:40000], msg[40000:], b"!"])
        expect_fail(ws, 1009, "message larger than 65536 bytes")


# ---------------------------------------------------------------- UTF-8 in text messages (§8.1)

INVALID_UTF8 = {
    "lone-0xff": b"abc\xff",
    "lone-continuation": b"\x80abc",
    "overlong-slash": b"\xc0\xaf",
    "surrogate": b"\xed\xa0\x80",
    "above-U+10FFFF": b"\xf4\x90\x80\x80",
    "truncated-at-end": b"euro \xe2\x82",
}


def text_with(bad: bytes, path: str) -> bytes:
    """``bad`` inside a text message that is otherwise valid for the endpoint."""
    if path == "/ws":
        return b'{"type":"echo","id":"u","payload":"' + bad + b'"}'
    return bad


@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
@pytest.mark.parametrize("path", PATHS)
def test_invalid_utf8_single_frame_closes_1007(server, bystanders, path, bad):
    with connect(server, path) as ws:
        ws.send_frame(TEXT, text_with(bad, path))
        expect_fail(ws, 1007, BAD_UTF8)
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_invalid_utf8_in_a_later_fragment_closes_1007(server, bystanders, path):
    msg = text_with(b"valid start \xce\xba\xe1\xbd\xb9 then \xed\xa0\x80 surrogate", path)
    with connect(server, path) as ws:
        ws.send_frame(TEXT, msg[:10], fin=False)
        ws.send_frame(CONT, msg[10:], fin=True)
        expect_fail(ws, 1007, BAD_UTF8)
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_incomplete_code_point_at_end_of_fragmented_message_closes_1007(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_frame(TEXT, b"fine so far", fin=False)
        ws.send_frame(CONT, b" but ends in \xf0\x9f\x98", fin=True)  # 3 of the 4 bytes of an emoji
        expect_fail(ws, 1007, BAD_UTF8)
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_invalid_utf8_fails_before_the_message_is_complete(server, bystanders, path):
    """Fail fast (§8.1 'MUST Fail'): an invalid fragment is enough; the rest never needs to arrive."""
    with connect(server, path) as ws:
        start = text_with(b"\xff", path)
        ws.send_frame(TEXT, start[: start.index(b"\xff") + 1], fin=False)
        expect_fail(ws, 1007, BAD_UTF8)
    assert_unaffected(server, bystanders)


CODE_POINT_SPLITS = {
    "2-byte": ("\u00e9", [1]),  # c3 | a9
    "3-byte": ("\u20ac", [1, 2]),  # e2 | 82 | ac
    "4-byte": ("\U0001f600", [1, 2, 3]),  # f0 | 9f | 98 | 80
    "4-byte-2+2": ("\U0001f600", [2]),
}


@pytest.mark.parametrize("text,cuts", CODE_POINT_SPLITS.values(), ids=CODE_POINT_SPLITS.keys())
@pytest.mark.parametrize("path", PATHS)
def test_code_point_split_across_fragments_is_valid(server, path, text, cuts):
    encoded = text.encode()
    if path == "/ws":
        rid, msg = echo_request("x")
        start = msg.index(b'"x"') + 1
        msg = msg[:start] + encoded + msg[start + 1 :]
    else:
        rid, msg, start = "", b"[" + encoded + b"]", 1
    points = [0, *(start + c for c in cuts), len(msg)]
    chunks = [msg[a:b] for a, b in itertools.pairwise(points)]
    with connect(server, path) as ws:
        ws.send_fragments(TEXT, chunks)
        op, data = ws.recv_message()
        assert op == TEXT
        if path == "/ws":
            assert msgspec.json.decode(data) == {"type": "echo", "requestId": rid, "payload": text}
        else:
            assert data == msg


def test_binary_message_is_not_utf8_validated(server):
    with connect(server, "/echo") as ws:
        ws.send_fragments(BINARY, [b"\xff\xfe", b"\xed\xa0\x80", b"\xf0"])
        assert ws.recv_message() == (BINARY, b"\xff\xfe\xed\xa0\x80\xf0")


# ---------------------------------------------------------------- reserved bits (§5.2)


@pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3, RSV1 | RSV2 | RSV3], ids=["rsv1", "rsv2", "rsv3", "all"])
@pytest.mark.parametrize("path", PATHS)
def test_rsv_bits_on_data_frame_close_1002(server, bystanders, path, rsv):
    with connect(server, path) as ws:
        ws.send_frame(TEXT, text_with(b"rsv", path), rsv=rsv)
        expect_fail(ws, 1002, "reserved bits set without a negotiated extension")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_rsv_bits_on_continuation_frame_close_1002(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_frame(BINARY, b"start", fin=False)
        ws.send_frame(CONT, b"end", rsv=RSV2)
        expect_fail(ws, 1002, "reserved bits set without a negotiated extension")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize(
    "opcode,payload",
    [
        pytest.param(PING, b"rsv", id="ping"),
        pytest.param(PONG, b"rsv", id="pong"),
        pytest.param(CLOSE, close_payload(1000), id="close"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_rsv_bits_on_control_frame_close_1002(server, bystanders, path, opcode, payload):
    with connect(server, path) as ws:
        ws.send_frame(opcode, payload, rsv=RSV1)
        expect_fail(ws, 1002, "reserved bits set without a negotiated extension")
    assert_unaffected(server, bystanders)


# ---------------------------------------------------------------- fragmentation errors (§5.4)


@pytest.mark.parametrize("fin", [True, False], ids=["fin", "nofin"])
@pytest.mark.parametrize("path", PATHS)
def test_orphan_continuation_frame_closes_1002(server, bystanders, path, fin):
    with connect(server, path) as ws:
        ws.send_frame(CONT, b"no message to continue", fin=fin)
        expect_fail(ws, 1002, "continuation frame without a message to continue")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("second", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("path", PATHS)
def test_new_data_frame_inside_fragmented_message_closes_1002(server, bystanders, path, second):
    with connect(server, path) as ws:
        ws.send_frame(TEXT, b"first half", fin=False)
        ws.send_frame(second, b"a new message", fin=True)
        expect_fail(ws, 1002, "data frame inside a fragmented message")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_continuation_after_complete_message_closes_1002(server, bystanders, path):
    """Once a message ends (FIN), a continuation is an orphan again: the assembler really reset."""
    with connect(server, path) as ws:
        ws.send_fragments(TEXT, [text_with(b"one", path)[:3], text_with(b"one", path)[3:]])
        ws.recv_message()
        ws.send_frame(CONT, b"orphan")
        expect_fail(ws, 1002, "continuation frame without a message to continue")
    assert_unaffected(server, bystanders)


# ---------------------------------------------------------------- framing errors picows catches (§5.1, §5.2, §5.5)


@pytest.mark.parametrize(
    "opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF], ids=lambda o: f"op{o:#x}"
)
@pytest.mark.parametrize("path", PATHS)
def test_unknown_opcode_closes_1002(server, bystanders, path, opcode):
    with connect(server, path) as ws:
        ws.send_frame(opcode, b"?")
        expect_fail(ws, 1002, "reserved opcode")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_unmasked_client_frame_closes_1002(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_frame(TEXT, text_with(b"naked", path), mask=False)
        expect_fail(ws, 1002, "client frames must be masked")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_fragmented_control_frame_closes_1002(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_frame(PING, b"half a ping", fin=False)
        expect_fail(ws, 1002, "fragmented control frame")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE], ids=["ping", "pong", "close"])
@pytest.mark.parametrize("path", PATHS)
def test_control_frame_payload_over_125_bytes_closes_1002(server, bystanders, path, opcode):
    with connect(server, path) as ws:
        ws.send_frame(opcode, b"\x03\xe8" + b"x" * 124)  # 126 bytes
        expect_fail(ws, 1002, "control frame payload over 125 bytes")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("form", ["16bit", "64bit"])
@pytest.mark.parametrize("path", PATHS)
def test_length_not_in_its_shortest_form_closes_1002(server, bystanders, path, form):
    """§5.2: the minimal number of bytes MUST be used to encode the length (5 bytes in 16 or 64 bits)."""
    head = b"\x81" + (b"\xfe" + struct.pack("!H", 5) if form == "16bit" else b"\xff" + struct.pack("!Q", 5))
    with connect(server, path) as ws:
        ws.send_raw(head + b"\0\0\0\0" + b"hello")  # a zero mask: the payload is as written
        expect_fail(ws, 1002, "invalid payload length: not in its shortest form, or 2^63 and up")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_64bit_length_with_most_significant_bit_set_closes_1002(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_frame(BINARY, b"", length=1 << 63)
        expect_fail(ws, 1002, "invalid payload length: not in its shortest form, or 2^63 and up")
    assert_unaffected(server, bystanders)


def test_server_frames_are_unmasked_and_unfragmented_without_rsv(server):
    with connect(server, "/echo") as ws:
        ws.send_frame(BINARY, b"b" * 300)
        f = ws.recv_frame()
        assert (f.masked, f.rsv, f.fin) == (False, 0, True)


# ---------------------------------------------------------------- closing handshake (§5.5.1, §7)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 3000, 4999])
@pytest.mark.parametrize("path", PATHS)
def test_client_close_is_echoed_with_same_code_then_tcp_closed(server, path, code):
    with connect(server, path) as ws:
        ws.send_close(code, "bye")
        f = ws.recv_frame()
        assert f.opcode == CLOSE, f"expected a close frame, got opcode {f.opcode:#x}"
        got, _ = f.close_info()
        assert got == code, f"close {code} answered with {got}"
        assert ws.wait_eof(3.0), "server did not close the TCP connection after answering the close"


@pytest.mark.parametrize("path", PATHS)
def test_empty_close_is_answered_with_empty_close(server, path):
    with connect(server, path) as ws:
        ws.send_close(None)
        f = ws.recv_frame()
        assert (f.opcode, f.payload) == (CLOSE, b""), f"got opcode {f.opcode:#x} payload {f.payload!r}"
        assert ws.wait_eof(3.0)


BAD_FRAMES = {
    "unmasked": (build_frame(TEXT, b"x", mask=False), True),
    "unknown-opcode": (build_frame(0x7, b"x"), True),
    "rsv1": (build_frame(TEXT, b"x", rsv=RSV1), False),
    "orphan-continuation": (build_frame(CONT, b"x"), False),
}


@pytest.mark.parametrize(
    "bad,picows_level",
    BAD_FRAMES.values(),
    ids=BAD_FRAMES.keys(),
)
@pytest.mark.parametrize("path", PATHS)
def test_no_data_frame_after_the_servers_close_frame(request, server, bystanders, path, bad, picows_level):
    """§5.5.1: after sending a close frame an endpoint MUST NOT send data frames.

    A valid request and a bad frame in one TCP write: the reply may come before the close or
    not at all, never after it.
    """
    rid, msg = echo_request("before the bad frame") if path == "/ws" else ("", b"before the bad frame")
    with connect(server, path) as ws:
        ws.send_raw(build_frame(TEXT, msg) + bad)
        frames = [ws.recv_frame()]
        if frames[0].opcode != CLOSE:
            frames.append(ws.recv_frame())
        ws.send_close(1000)  # answer the close, then collect everything up to EOF
        assert ws.wait_eof(3.0)
        while True:
            try:
                frames.append(ws.recv_frame(0.01))
            except (TimeoutError, ConnectionClosed):
                break
        kinds = [f.opcode for f in frames]
        assert CLOSE in kinds, f"no close frame at all: {kinds}"
        after = [f for f in frames[kinds.index(CLOSE) + 1 :] if not f.is_control]
        assert not after, f"data frame(s) after the close frame: {[f.payload[:60] for f in after]}"
        assert frames[kinds.index(CLOSE)].close_info()[0] == 1002
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_no_data_is_sent_after_the_close_handshake(server, path):
    """§5.5.1: after a close frame the peer must not be answered with data; a text behind it is dropped."""
    with connect(server, path) as ws:
        ws.send_raw(build_frame(CLOSE, close_payload(1000)) + build_frame(TEXT, text_with(b"late", path)))
        f = ws.recv_frame()
        assert f.opcode == CLOSE and f.close_info()[0] == 1000
        assert ws.wait_eof(3.0)
        assert not ws._buf, f"server sent data after its close frame: {bytes(ws._buf)!r}"


INVALID_CLOSE_CODES = [
    0,
    999,
    1004,
    1005,
    1006,
    1015,
    1016,
    1100,
    2000,
    2999,
    5000,
    65535,
]


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
@pytest.mark.parametrize("path", PATHS)
def test_close_with_invalid_code_closes_1002(server, bystanders, path, code):
    with connect(server, path) as ws:
        ws.send_close(code, "bad code")
        expect_fail(ws, 1002, "invalid close code")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_close_with_one_byte_payload_closes_1002(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_frame(CLOSE, b"\x03")
        expect_fail(ws, 1002, "close frame payload of 1 byte")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_close_with_invalid_utf8_reason_closes_1007(server, bystanders, path):
    with connect(server, path) as ws:
        ws.send_close(1000, b"bye \xff")
        expect_fail(ws, 1007, "invalid UTF-8 in the close reason")
    assert_unaffected(server, bystanders)


@pytest.mark.parametrize("path", PATHS)
def test_close_in_the_middle_of_a_fragmented_message_is_answered(server, path):
    with connect(server, path) as ws:
        ws.send_frame(TEXT, b"never finished", fin=False)
        ws.send_close(1000)
        got, _ = ws.expect_close(reply=False)
        assert got == 1000
        assert ws.wait_eof(3.0)


def test_server_initiated_close_then_peer_reply_closes_tcp(limited):
    """After the server's own close frame (1009 here), the client's close reply ends the TCP connection."""
    with connect(limited, "/echo") as ws:
        ws.send_fragments(BINARY, [b"a" * 600, b"a" * 600])
        got, _ = ws.expect_close(reply=False)
        assert got == 1009
        assert not ws.wait_eof(0.3), "server should wait for the close reply (2 s grace), not drop at once"
        ws.send_close(1009)
        assert ws.wait_eof(1.0), "server did not close TCP after receiving the close reply"


# ---------------------------------------------------------------- bad input hurts nobody else


def test_many_bad_clients_do_not_affect_a_healthy_subscriber(server):
    """A subscriber keeps receiving deliveries while a string of bad clients are thrown out around it."""
    room = f"healthy-{next_id()}"
    bad_inputs = [
        lambda ws: ws.send_frame(TEXT, b"x", rsv=RSV1),
        lambda ws: ws.send_frame(CONT, b"x"),
        lambda ws: ws.send_frame(TEXT, b"\xff"),
        lambda ws: ws.send_frame(0x5, b"x"),
        lambda ws: ws.send_frame(TEXT, b"x", mask=False),
        lambda ws: ws.send_raw(b"\x81\xfe\x00"),  # a truncated header, then the socket just closes
    ]
    with connect(server, "/ws") as sub, connect(server, "/ws") as pub:
        for i, ws in enumerate((sub, pub)):
            ws.send_text(msgspec.json.encode({"type": "join", "id": f"j{i}", "room": room}))
            assert recv_obj(ws)["type"] == "ack"
        for n, bad in enumerate(bad_inputs):
            with connect(server, "/ws") as villain:
                bad(villain)
            pub.send_text(msgspec.json.encode({"type": "publish", "room": room, "payload": n}))
            delivery = recv_obj(sub)
            assert delivery["type"] == "message" and delivery["payload"] == n, delivery
    assert_unaffected(server)


# ---------------------------------------------------------------- subprotocols


def test_msgpack_subprotocol_is_negotiated_and_uses_binary_frames(server):
    with RawWS.connect(HOST, server.port, "/ws", protocols=["msgpack"]) as ws:
        assert ws.subprotocol == "msgpack"
        f = ws.recv_frame()
        assert f.opcode == BINARY and f.fin, "welcome must be a binary frame on a msgpack connection"
        assert msgspec.msgpack.decode(f.payload)["type"] == "welcome"
        ws.send_binary(msgspec.msgpack.encode({"type": "echo", "id": "e1", "payload": [1, b"\x00"]}))
        f = ws.recv_frame()
        assert f.opcode == BINARY
        assert msgspec.msgpack.decode(f.payload) == {
            "type": "echo",
            "requestId": "e1",
            "payload": [1, b"\x00"],
        }


def test_msgpack_is_selected_from_a_list_of_offered_subprotocols(server):
    with RawWS.connect(HOST, server.port, "/ws", protocols=["v2.json", "msgpack"]) as ws:
        assert ws.subprotocol == "msgpack"
        assert ws.recv_frame().opcode == BINARY


@pytest.mark.parametrize("offered", [None, ["bogus"]], ids=["none", "unknown"])
def test_no_subprotocol_header_unless_msgpack_offered(server, offered):
    """§4.2.2: the server must not select a subprotocol the client did not offer; JSON text frames then."""
    with RawWS.connect(HOST, server.port, "/ws", protocols=offered) as ws:
        assert ws.subprotocol is None, f"unexpected Sec-WebSocket-Protocol: {ws.subprotocol}"
        assert ws.recv_frame().opcode == TEXT


def test_text_frame_on_msgpack_connection_gets_invalid_message_not_close(server):
    with connect(server, "/ws", protocols=["msgpack"]) as ws:
        ws.send_text(b'{"type":"echo","id":"t1","payload":1}')
        err = recv_obj(ws)
        assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE" and err["success"] is False, err
        assert_works_msgpack(ws)


def test_binary_frame_on_json_connection_gets_invalid_message_not_close(server):
    with connect(server, "/ws") as ws:
        ws.send_binary(msgspec.msgpack.encode({"type": "echo", "id": "b1", "payload": 1}))
        err = recv_obj(ws)
        assert err["type"] == "error" and err["code"] == "INVALID_MESSAGE" and err["success"] is False, err
        assert_works(ws, "/ws")


def assert_works_msgpack(ws: RawWS) -> None:
    ws.send_binary(msgspec.msgpack.encode({"type": "echo", "id": "after", "payload": "still here"}))
    assert recv_obj(ws) == {"type": "echo", "requestId": "after", "payload": "still here"}


def test_echo_endpoint_echoes_text_as_text_and_binary_as_binary(server):
    with connect(server, "/echo") as ws:
        ws.send_text("t\u00e9xt")
        ws.send_binary(b"\x00\x01")
        assert ws.recv_message() == (TEXT, "t\u00e9xt".encode())
        assert ws.recv_message() == (BINARY, b"\x00\x01")


# ---------------------------------------------------------------- plain HTTP beside the WebSocket


def test_healthz_returns_200(server):
    status, _, body = http_request(HOST, server.port, "/healthz")
    assert status == 200, body


@pytest.mark.parametrize("path", ["/nope", "/ws/extra", "/"])
def test_unknown_path_returns_404(server, path):
    status, _, _ = http_request(HOST, server.port, path)
    assert status == 404


def test_websocket_upgrade_on_unknown_path_returns_404(server):
    with pytest.raises(HandshakeFailed) as exc:
        RawWS.connect(HOST, server.port, "/nope")
    assert exc.value.status == 404


def test_echo_without_echo_endpoint_flag_returns_404(make_server):
    srv = make_server("--rate-limit", "0").start()
    status, _, _ = http_request(HOST, srv.port, "/echo")
    assert status == 404
    with pytest.raises(HandshakeFailed) as exc:
        RawWS.connect(HOST, srv.port, "/echo")
    assert exc.value.status == 404
    with connect(srv, "/ws") as ws:  # /ws is unaffected by the flag
        assert_works(ws, "/ws")


# ---------------------------------------------------------------- any frame header: our close reasons only

# Every close reason the server sends for a frame it refuses, by code (transport.py, and picows'
# parser through transport.framing_reason). The answer to a client's close (the test's own 1000,
# or a close frame drawn at random) repeats its code and has no reason.
CLOSE_REASONS = {
    1002: {
        "reserved bits set without a negotiated extension",
        "continuation frame without a message to continue",
        "data frame inside a fragmented message",
        "reserved opcode",
        "client frames must be masked",
        "fragmented control frame",
        "control frame payload over 125 bytes",
        "invalid payload length: not in its shortest form, or 2^63 and up",
        "invalid close code",
        "close frame payload of 1 byte",
        "second close frame",  # picows parses one frame ahead: a close right behind a bad close
    },
    1007: {BAD_UTF8, "invalid UTF-8 in the close reason"},
    1009: {TOO_BIG},
}


@st.composite
def frame_heads(draw: st.DrawFn) -> bytes:
    """One frame of any opcode, FIN, RSV bits, mask bit and length form (shortest, 16-bit, 64-bit,
    most significant bit set, over the limit with no payload following), then a close 1000."""
    first = draw(st.integers(0, 255))
    masked = draw(st.booleans())
    payload = draw(st.binary(max_size=140) | st.text(max_size=40).map(str.encode))
    form = draw(st.sampled_from(["shortest", "16bit", "64bit", "msb", "over"]))
    n = len(payload)
    if form == "shortest":
        length = bytes([n]) if n < 126 else b"\x7e" + struct.pack("!H", n)
    elif form == "16bit":
        length = b"\x7e" + struct.pack("!H", n)
    elif form == "64bit":
        length = b"\x7f" + struct.pack("!Q", n)
    elif form == "msb":
        length, payload = b"\x7f" + struct.pack("!Q", (1 << 63) | n), b""
    else:
        length, payload = b"\x7f" + struct.pack("!Q", draw(st.integers(LIMIT + 1, 1 << 62))), b""
    head = bytes([first, (0x80 if masked else 0) | length[0]]) + length[1:]
    return head + (b"\0\0\0\0" if masked else b"") + payload + build_frame(CLOSE, close_payload(1000))


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=frame_heads(), path=st.sampled_from(PATHS))
def test_any_frame_is_answered_with_one_of_our_close_reasons(limited, data, path):
    """Whatever a frame header says, the close the client gets carries a documented code and one of
    the server's own sentences (before: picows' parser text, "Received frame with invalid opcode=0x3"
    and the like, reached the client)."""
    with connect(limited, path) as ws:
        ws.send_raw(data)
        while True:
            try:
                f = ws.recv_frame()
            except ConnectionClosed:
                pytest.fail("connection dropped without a close frame")
            if f.opcode == CLOSE:
                break
        code, reason = f.close_info()
        if reason:
            assert reason in CLOSE_REASONS.get(code or 0, ()), (
                f"close {code} with a reason not ours: {reason!r}"
            )
        else:
            assert code is None or 1000 <= code < 5000, code
