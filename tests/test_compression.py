"""permessage-deflate (RFC 7692) end to end: a real server with ``--compression``, raw sockets and the
``websockets`` library (which negotiates the extension by default) as independent peers.

Rules tested, one per test: negotiation and its answer; deliveries compressed once and shared;
small messages left plain; inbound compressed and fragmented compressed messages; the inflated
size limit (decompression bomb -> 1009) and the compressed one (padding -> 1009, its own reason);
RSV1 where it is not allowed (-> 1002); corrupt data and data after a final block (-> 1007);
the server's window honoured; off by default.
"""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from collections.abc import Iterator

import pytest
import websockets

from helpers.rawws import BINARY, CONT, PING, TEXT, RawWS
from helpers.servers import ServerProcess

OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
TAIL = b"\x00\x00\xff\xff"
RSV1 = 0x4  # rawws.Frame.rsv: RSV1 is the high bit of the three


def deflate(data: bytes, bits: int = 15) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def inflate(data: bytes, bits: int = 15) -> bytes:
    return zlib.decompressobj(-bits).decompress(data + TAIL)


@pytest.fixture(scope="module")
def zserver() -> Iterator[ServerProcess]:
    srv = ServerProcess("--compression", "--rate-limit", "0", "--compression-threshold", "120").start()
    yield srv
    srv.kill()


def connect(srv: ServerProcess, **kw: object) -> RawWS:
    return RawWS.connect("127.0.0.1", srv.port, **kw)  # type: ignore[arg-type]


def welcome(ws: RawWS) -> dict:
    op, data = ws.recv_message()
    msg = json.loads(data)
    assert msg["type"] == "welcome", msg
    return msg


def request(ws: RawWS, msg: dict) -> dict:
    ws.send_text(json.dumps(msg))
    while True:
        frame = ws.recv_frame()
        body = inflate(frame.payload) if frame.rsv & RSV1 else frame.payload
        reply = json.loads(body)
        if reply.get("requestId") == msg.get("id"):
            return reply


def test_offer_is_answered_without_context_takeover_either_way(zserver: ServerProcess) -> None:
    with connect(zserver, headers=OFFER) as ws:
        ext = ws.headers.get("sec-websocket-extensions", "")
        assert ext == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def test_without_the_flag_the_offer_is_ignored(server: ServerProcess) -> None:
    with RawWS.connect("127.0.0.1", server.port, headers=OFFER) as ws:
        assert "sec-websocket-extensions" not in ws.headers
        welcome(ws)


def test_an_unacceptable_offer_falls_back_to_the_next_then_to_none(zserver: ServerProcess) -> None:
    two = {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=8, permessage-deflate"}
    with connect(zserver, headers=two) as ws:
        assert ws.headers["sec-websocket-extensions"].startswith("permessage-deflate")
        assert "server_max_window_bits" not in ws.headers["sec-websocket-extensions"]
    bad = {"Sec-WebSocket-Extensions": "permessage-deflate; mystery=1"}
    with connect(zserver, headers=bad) as ws:
        assert "sec-websocket-extensions" not in ws.headers  # declined, connection goes on plain
        welcome(ws)


def _join(ws: RawWS, room: str) -> None:
    welcome(ws)
    assert request(ws, {"type": "join", "room": room, "id": "j"})["success"]


def test_a_delivery_is_compressed_once_and_the_same_bytes_reach_every_subscriber(
    zserver: ServerProcess,
) -> None:
    payload = {"text": "hello compressed world " * 20}
    with (
        connect(zserver, headers=OFFER) as a,
        connect(zserver, headers=OFFER) as b,
        connect(zserver) as plain,
    ):
        for ws in (a, b, plain):
            _join(ws, "z.shared")
        with connect(zserver) as pub:
            _join(pub, "z.shared")
            assert request(pub, {"type": "publish", "room": "z.shared", "payload": payload, "id": "p"})[
                "success"
            ]
        fa, fb, fp = a.recv_frame(), b.recv_frame(), plain.recv_frame()
    assert fa.rsv == RSV1 and fb.rsv == RSV1 and fp.rsv == 0
    assert fa.payload == fb.payload  # one compressed frame, shared
    assert len(fa.payload) < len(fp.payload) / 3
    delivered = json.loads(inflate(fa.payload))
    assert delivered == json.loads(fp.payload)
    assert delivered["payload"] == payload and delivered["room"] == "z.shared"


def test_small_messages_stay_uncompressed(zserver: ServerProcess) -> None:
    with connect(zserver, headers=OFFER) as sub:
        _join(sub, "z.small")
        with connect(zserver) as pub:
            _join(pub, "z.small")
            request(pub, {"type": "publish", "room": "z.small", "payload": 1, "id": "p"})
        frame = sub.recv_frame()
    assert (
        frame.rsv == 0 and json.loads(frame.payload)["payload"] == 1
    )  # a ~75-byte delivery, below --compression-threshold 120


def test_history_replay_uses_the_compressed_frames(zserver: ServerProcess) -> None:
    with connect(zserver) as pub:
        _join(pub, "z.replay")
        for i in range(3):
            request(
                pub,
                {"type": "publish", "room": "z.replay", "payload": {"i": i, "pad": "x" * 200}, "id": f"{i}"},
            )
    with connect(zserver, headers=OFFER) as late:
        welcome(late)
        late.send_text(json.dumps({"type": "join", "room": "z.replay", "since": 0, "id": "j"}))
        ack = json.loads(late.recv_frame().payload)
        assert ack["data"]["recovered"] is True
        replayed = [late.recv_frame() for _ in range(3)]
    assert all(f.rsv == RSV1 for f in replayed)
    assert [json.loads(inflate(f.payload))["payload"]["i"] for f in replayed] == [0, 1, 2]


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_messagepack_and_json_subscribers_get_compressed_frames_of_their_encoding(
    zserver: ServerProcess, opcode: int
) -> None:
    protocols = ["msgpack"] if opcode == BINARY else None
    with connect(zserver, headers=OFFER, protocols=protocols) as sub:
        sub.recv_frame()  # welcome
        join = {"type": "join", "room": f"z.enc{opcode}", "id": "j"}
        if opcode == BINARY:
            import msgspec

            sub.send_binary(msgspec.msgpack.encode(join))
        else:
            sub.send_text(json.dumps(join))
        sub.recv_frame()  # ack
        with connect(zserver) as pub:
            _join(pub, f"z.enc{opcode}")
            request(
                pub, {"type": "publish", "room": f"z.enc{opcode}", "payload": {"t": "y" * 300}, "id": "p"}
            )
        frame = sub.recv_frame()
    assert frame.opcode == opcode and frame.rsv == RSV1
    body = inflate(frame.payload)
    if opcode == BINARY:
        import msgspec

        assert msgspec.msgpack.decode(body)["payload"] == {"t": "y" * 300}
    else:
        assert json.loads(body)["payload"] == {"t": "y" * 300}


def test_a_compressed_request_is_inflated(zserver: ServerProcess) -> None:
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        msg = json.dumps({"type": "echo", "id": "e", "payload": {"k": "v" * 500}}).encode()
        ws.send_frame(TEXT, deflate(msg), rsv=RSV1)
        reply = ws.recv_frame()
        body = inflate(reply.payload) if reply.rsv & RSV1 else reply.payload
        assert json.loads(body)["payload"] == {"k": "v" * 500}


def test_a_fragmented_compressed_request_is_reassembled_then_inflated(zserver: ServerProcess) -> None:
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        data = deflate(json.dumps({"type": "ping", "id": "frag", "ts": 7}).encode())
        ws.send_frame(TEXT, data[:3], fin=False, rsv=RSV1)  # RSV1 on the first frame only
        ws.send_frame(CONT, data[3:6], fin=False)
        ws.send_frame(CONT, data[6:])
        assert json.loads(ws.recv_frame().payload) == {"type": "pong", "requestId": "frag", "ts": 7}


def test_a_decompression_bomb_is_closed_with_1009_and_memory_stays_bounded(zserver: ServerProcess) -> None:
    bomb = deflate(b'{"type":"echo","payload":"' + b"0" * 30_000_000 + b'"}')
    assert len(bomb) < 64 * 1024  # passes the compressed-size check; inflates to 30 MB
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        ws.send_frame(TEXT, bomb, rsv=RSV1)
        assert ws.expect_close() == (1009, "message larger than 65536 bytes")
    with connect(zserver, headers=OFFER) as ws:  # the server is fine
        welcome(ws)


SMALL = 1024  # --max-message-size of the `zsmall` server


@pytest.fixture(scope="module")
def zsmall() -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--compression", "--echo-endpoint", "--rate-limit", "0", "--max-message-size", str(SMALL)
    )
    yield srv.start()
    srv.kill()


@pytest.mark.parametrize("fragmented", [False, True], ids=["one frame", "fragmented"])
def test_a_compressed_message_at_the_limit_is_accepted_though_longer_on_the_wire(
    zsmall: ServerProcess, fragmented: bool
) -> None:
    """The limit applies to the inflated message (PROTOCOL.md): incompressible bytes at the limit
    grow a little when deflated, and must still pass, in one frame as in several (before: one
    frame was closed 1009 by picows' frame-size check, several passed)."""
    plain = random.Random(7).randbytes(SMALL)  # nothing for deflate to find
    wire = deflate(plain)
    assert len(plain) == SMALL < len(wire)
    with connect(zsmall, path="/echo", headers=OFFER) as ws:
        if fragmented:
            ws.send_frame(BINARY, wire[:500], fin=False, rsv=RSV1)
            ws.send_frame(CONT, wire[500:])
        else:
            ws.send_frame(BINARY, wire, rsv=RSV1)
        op, data = ws.recv_message()
        assert (op, inflate(data)) == (BINARY, plain)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_one_byte_over_the_limit_is_1009_with_our_reason(zsmall: ServerProcess, compressed: bool) -> None:
    """Over the limit by one byte, inflated or plain, in one frame: 1009 and the documented reason
    (the server lets frames a little past the limit through picows for compressed messages, so a
    plain frame in that margin is ours to refuse)."""
    plain = b"x" * (SMALL + 1)
    with connect(zsmall, path="/echo", headers=OFFER) as ws:
        ws.send_frame(BINARY, deflate(plain) if compressed else plain, rsv=RSV1 if compressed else 0)
        assert ws.expect_close() == (1009, f"message larger than {SMALL} bytes")


@pytest.mark.parametrize(
    ("what", "send"),
    [
        (
            "rsv1 on a continuation",
            lambda ws: (ws.send_frame(TEXT, b"{", fin=False), ws.send_frame(CONT, b"}", rsv=RSV1)),
        ),
        ("rsv1 on a ping", lambda ws: ws.send_frame(PING, b"x", rsv=RSV1)),
        ("rsv2", lambda ws: ws.send_frame(TEXT, b"{}", rsv=0x2)),
    ],
)
def test_misuse_of_the_extension_fails_the_connection_with_1002(
    zserver: ServerProcess, what: str, send: object
) -> None:
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        send(ws)  # type: ignore[operator]
        assert ws.expect_close()[0] == 1002, what


def finished(data: bytes) -> bytes:
    """``data`` deflated into one stream ended by a final block (BFINAL=1, zlib's Z_FINISH)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH)


PING_A = b'{"type":"ping","id":"a"}'
PING_B = b'{"type":"ping","id":"b"}'


@pytest.mark.parametrize(
    ("what", "payload", "reason"),
    [
        ("corrupt deflate data", b"\xff\xfe\xfd garbage", "invalid permessage-deflate data"),
        ("a second stream after a final block", finished(PING_A) + deflate(PING_B), "data after the final deflate block"),
        ("junk after a final block", finished(PING_A) + b"\x00\x01", "data after the final deflate block"),
        ("a final block, 0x00, then more", finished(PING_A) + b"\x00\x00\x00\xff\xff" + deflate(PING_B),
         "data after the final deflate block"),
    ],
    ids=["corrupt", "second stream", "junk", "0x00 then more"],
)  # fmt: skip
def test_invalid_deflate_data_fails_the_connection_with_1007(
    zserver: ServerProcess, what: str, payload: bytes, reason: str
) -> None:
    """A compressed message whose payload does not inflate, or goes on after its final block (the
    inflater stops there: before, the rest was dropped unseen and the first part handled as the
    message), is invalid payload data: 1007 (RFC 6455 §7.4.1) with a fixed reason, as Node's ws.
    Corrupt data was closed 1002 before."""
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        ws.send_frame(TEXT, payload, rsv=RSV1)
        assert ws.expect_close() == (1007, reason), what


@pytest.mark.parametrize(
    "payload",
    [finished(PING_A) + b"\x00", finished(PING_A)],
    ids=["rfc 7692 7.2.3.4: final block and 0x00", "final block alone"],
)
def test_a_message_ended_by_a_final_block_is_accepted(zserver: ServerProcess, payload: bytes) -> None:
    """RFC 7692 §7.2.3.4: a sender without an empty-stored-block flush may end a message with a final
    block and one 0x00 octet; one that sends the final block alone has nothing after it either."""
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        ws.send_frame(TEXT, payload, rsv=RSV1)
        assert json.loads(ws.recv_frame().payload) == {"type": "pong", "requestId": "a"}


def padded(data: bytes, blocks: int) -> bytes:
    """``data`` deflated, then ``blocks`` empty stored blocks (valid deflate that inflates to nothing)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH) + b"\x00\x00\x00\xff\xff" * blocks)[:-4]


WIRE = SMALL + SMALL // 64 + 1024  # deflate.compressed_limit(SMALL)


@pytest.mark.parametrize("fragmented", [False, True], ids=["one frame", "fragmented"])
def test_a_compressed_message_padded_past_its_wire_limit_is_1009_naming_that_limit(
    zsmall: ServerProcess, fragmented: bool
) -> None:
    """Empty blocks inflate to nothing: a 4-byte message padded to 5 KB on the wire is over the
    compressed limit, not the message limit. The reason names the limit passed (before: 'message
    larger than 1024 bytes' for a 4-byte message). One frame is refused on its header, where plain or
    compressed is not known yet: its reason names both limits. Padding under the limit passes."""
    assert zlib.decompressobj(-15).decompress(padded(b"tiny", 1000) + TAIL) == b"tiny"
    with connect(zsmall, path="/echo", headers=OFFER) as ws:
        ws.send_frame(BINARY, padded(b"tiny", 100), rsv=RSV1)  # 500 B of padding: under the limit
        op, data = ws.recv_message()
        assert (op, data) == (BINARY, b"tiny")
        wire = padded(b"tiny", 1000)
        if fragmented:
            ws.send_frame(BINARY, wire[:1000], fin=False, rsv=RSV1)  # each frame under picows' limit
            for at in range(1000, len(wire), 1000):
                ws.send_frame(CONT, wire[at : at + 1000], fin=at + 1000 >= len(wire))
            assert ws.expect_close() == (1009, f"compressed message larger than {WIRE} bytes")
        else:
            ws.send_frame(BINARY, wire, rsv=RSV1)
            assert ws.expect_close() == (
                1009,
                f"message larger than {SMALL} bytes (or {WIRE} bytes compressed)",
            )


def test_compressed_invalid_utf8_is_closed_with_1007(zserver: ServerProcess) -> None:
    with connect(zserver, headers=OFFER) as ws:
        welcome(ws)
        ws.send_frame(TEXT, deflate(b'{"type":"ping","x":"\xc3\x28"}' + b" " * 100), rsv=RSV1)
        assert ws.expect_close()[0] == 1007


def test_rsv1_without_negotiation_is_a_protocol_error(zserver: ServerProcess) -> None:
    with connect(zserver) as ws:
        welcome(ws)
        ws.send_frame(TEXT, deflate(b'{"type":"ping"}'), rsv=RSV1)
        assert ws.expect_close()[0] == 1002


def test_the_server_window_the_client_asked_for_is_honoured(zserver: ServerProcess) -> None:
    offer = {"Sec-WebSocket-Extensions": "permessage-deflate; server_max_window_bits=10"}
    with connect(zserver, headers=offer) as sub:
        assert ws_ext(sub).endswith("server_max_window_bits=10")
        _join(sub, "z.window")
        with connect(zserver, headers=OFFER) as wide:  # another kind in the same room: its own frame
            _join(wide, "z.window")
            with connect(zserver) as pub:
                _join(pub, "z.window")
                text = "".join(chr(65 + (i * 7919) % 26) for i in range(5000))  # needs back-references
                request(pub, {"type": "publish", "room": "z.window", "payload": text, "id": "p"})
            narrow_frame, wide_frame = sub.recv_frame(), wide.recv_frame()
    assert (
        json.loads(inflate(narrow_frame.payload, bits=10))["payload"] == text
    )  # a 10-bit reader can read it
    assert json.loads(inflate(wide_frame.payload))["payload"] == text


def ws_ext(ws: RawWS) -> str:
    return ws.headers.get("sec-websocket-extensions", "")


def test_the_websockets_library_negotiates_and_round_trips(zserver: ServerProcess) -> None:
    """An independent implementation: websockets offers permessage-deflate by default and compresses what it sends."""

    async def main() -> tuple[str, dict, dict]:
        async with websockets.connect(zserver.url) as a, websockets.connect(zserver.url) as b:
            ext = a.response.headers["Sec-WebSocket-Extensions"]
            for ws in (a, b):
                json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "join", "room": "z.lib", "id": "j"}))
                json.loads(await ws.recv())
            await a.send(
                json.dumps({"type": "publish", "room": "z.lib", "payload": {"n": "q" * 400}, "id": "p"})
            )
            ack = json.loads(await asyncio.wait_for(a.recv(), 5))
            got = json.loads(await asyncio.wait_for(b.recv(), 5))
            return ext, ack, got

    ext, ack, got = asyncio.run(main())
    assert "permessage-deflate" in ext and "server_no_context_takeover" in ext
    assert ack["success"] and got["payload"] == {"n": "q" * 400}


def _metric(srv: ServerProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def test_the_python_client_negotiates_and_inflates(zserver: ServerProcess) -> None:
    from wsfan.client import connect

    async def main() -> list[object]:
        async with connect(zserver.url, compression=True) as sub, connect(zserver.url) as pub:
            await sub.join("z.client")
            await pub.join("z.client")
            for i in range(3):
                await pub.publish("z.client", {"i": i, "text": "compress me " * 40})
            got = []
            async with asyncio.timeout(5):
                async for m in sub.messages("z.client"):
                    got.append(m.payload)
                    if len(got) == 3:
                        return got
        return got

    before = _metric(zserver, "wsfan_compressed_deliveries_total")
    got = asyncio.run(main())
    assert [p["i"] for p in got] == [0, 1, 2] and got[0]["text"] == "compress me " * 40  # type: ignore[index]
    assert _metric(zserver, "wsfan_compressed_deliveries_total") - before == 3  # they did go out compressed
