"""Property tests (Hypothesis) of everything a connection sends after the handshake.

Any bytes, in either encoding, and any message-shaped value (known and unknown types,
fields of every type, 64-bit-overflowing integers, NaN, binary, nesting past the
interpreter's recursion limit) get a documented reply or a documented error; the
connection stays open and other connections are unaffected.

In process (fast, many examples): ``Codec`` on any bytes, ``payload_problem`` against an
independent statement of the rule and against real transcoding, and the hub driven
sans-I/O with every handler. Against a real server process (fewer examples, each a
burst of messages over live picows connections, both encodings, checked with a ping
sentinel).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.peers import PicowsPeer
from helpers.servers import ServerProcess
from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.broker.publication import Publication
from wsfan.server.hub import Hub, Session
from wsfan.server.protocol import CODECS, MAX_PAYLOAD_DEPTH, DecodeFailure, Encoding, payload_problem
from wsfan.server.wire import ErrorCode, Inbound

REPLY_TYPES = {"welcome", "message", "ack", "error", "echo", "pong", "joined", "left"}
ERROR_CODES = {c.value for c in ErrorCode}
KNOWN = ["join", "leave", "publish", "echo", "ping", "presence", "presence_stats"]
SENTINEL = "sentinel-"
# Phrases of msgspec's own errors: a reply must never carry them (it names field and rule instead).
LIBRARY_TEXT = ("Expected `", "- at `$", "Object missing", "is malformed", "truncated", "Traceback")


def quotes_library(text: str) -> bool:
    if text.startswith("unknown message type "):
        return False  # the rest is the client's own type string, quoted
    return any(marker in text for marker in LIBRARY_TEXT)


# ---------------------------------------------------------------- strategies


def scalars(msgpack: bool) -> st.SearchStrategy[Any]:
    ints = st.integers(-(2**63), 2**64 - 1) if msgpack else st.integers(-(2**70), 2**70)
    base = [st.none(), st.booleans(), ints, st.integers(-5, 5), st.text(max_size=8)]
    base.append(st.floats(allow_nan=msgpack, allow_infinity=msgpack))
    if msgpack:
        base += [
            st.binary(max_size=4),
            st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=3)),
        ]
    return st.one_of(base)


def values(msgpack: bool) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.text(max_size=4), st.integers(0, 3)) if msgpack else st.text(max_size=4)
    return st.recursive(
        scalars(msgpack),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )


def deep(msgpack: bool) -> st.SearchStrategy[msgspec.Raw]:
    """A value nested ``n`` deep, written directly (no encoder recursion): up to past the recursion limit."""
    depth = st.sampled_from([1, MAX_PAYLOAD_DEPTH, MAX_PAYLOAD_DEPTH + 1, 999, 1200, 5000])
    if msgpack:
        return depth.map(lambda n: msgspec.Raw(b"\x91" * n + b"\xc0"))
    return depth.map(lambda n: msgspec.Raw(b"[" * n + b"]" * n))


def messages(msgpack: bool) -> st.SearchStrategy[dict[str, Any]]:
    v = values(msgpack)
    anything = st.one_of(v, deep(msgpack))
    return st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(KNOWN), st.text(max_size=6), st.integers(), st.none())},
        optional={
            "id": st.one_of(st.text(max_size=6).filter(lambda t: not t.startswith(SENTINEL)), st.integers()),
            "room": st.one_of(st.sampled_from(["fuzz-a", "fuzz-b", "room\n", ""]), st.text(max_size=10), v),
            "since": st.one_of(st.integers(-3, 2**64 - 1), st.booleans(), st.floats(), st.text(max_size=3)),
            "epoch": st.one_of(st.text(max_size=70), st.integers()),
            "ts": st.one_of(st.integers(-(2**63), 2**63), st.floats(allow_nan=msgpack), st.text(max_size=3)),
            "payload": anything,
            "extra": anything,
        },
    )


def encode(msg: dict[str, Any], msgpack: bool) -> bytes | None:
    try:
        return msgspec.msgpack.encode(msg) if msgpack else msgspec.json.encode(msg)
    except (TypeError, OverflowError, ValueError):
        return None  # not expressible in this encoding (e.g. a JSON integer past what msgspec writes)


# ---------------------------------------------------------------- in process: Codec


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200), encoding=st.sampled_from([Encoding.JSON, Encoding.MSGPACK]))
def test_codec_any_bytes_decode_to_a_message_or_a_documented_failure(data, encoding):
    codec = CODECS[encoding]
    rid = codec.request_id(data)
    assert rid is None or isinstance(rid, str)
    try:
        msg = codec.decode(data)
    except DecodeFailure as f:
        assert f.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.UNKNOWN_TYPE)
        assert not quotes_library(f.message), f.message
    else:
        assert isinstance(msg, Inbound)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_codec_any_message_shape_decodes_or_fails_documented(data):
    msgpack = data.draw(st.booleans())
    raw = encode(data.draw(messages(msgpack)), msgpack)
    if raw is None:
        return
    codec = CODECS[Encoding.MSGPACK if msgpack else Encoding.JSON]
    try:
        codec.decode(raw)
    except DecodeFailure as f:
        assert f.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.UNKNOWN_TYPE)
        assert not quotes_library(f.message), f.message


# ---------------------------------------------------------------- in process: payloads in every encoding


def portable(value: Any, depth: int = MAX_PAYLOAD_DEPTH) -> bool:
    """The rule of docs/protocol-choices.md, written independently of the server's walk."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return -(2**63) <= value <= 2**64 - 1
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return depth > 0 and all(portable(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return depth > 0 and all(isinstance(k, str) and portable(v, depth - 1) for k, v in value.items())
    return False  # bytes, Ext


def delivered(pub: Publication, encoding: Encoding) -> Any:
    frame = pub.frame(encoding)
    n = frame[1] & 0x7F
    body = frame[2 + (2 if n == 126 else 8 if n == 127 else 0) :]
    decode = msgspec.json.decode if encoding is Encoding.JSON else msgspec.msgpack.decode
    return decode(body)["payload"]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_payload_is_accepted_exactly_when_both_encodings_carry_it_and_then_it_crosses_exactly(data):
    msgpack = data.draw(st.booleans())
    value = data.draw(values(msgpack))
    raw = encode(value, msgpack)
    if raw is None:
        return
    encoding = Encoding.MSGPACK if msgpack else Encoding.JSON
    # A msgpack map with duplicate keys after decoding (1 and True...) is beside the point here.
    as_decoded = (msgspec.msgpack.decode if msgpack else msgspec.json.decode)(raw)
    problem = payload_problem(raw, encoding)
    assert (problem is None) is portable(as_decoded), (value, problem)
    if problem is None:
        pub = Publication("r", 1, "u", raw, encoding)
        assert delivered(pub, Encoding.JSON) == as_decoded
        assert delivered(pub, Encoding.MSGPACK) == as_decoded


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=100), encoding=st.sampled_from([Encoding.JSON, Encoding.MSGPACK]))
def test_payload_problem_never_raises_on_any_bytes(payload, encoding):
    problem = payload_problem(payload, encoding)
    assert problem is None or problem.startswith("payload ")


# ---------------------------------------------------------------- in process: the hub and every handler


class Recorder:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: list[int] = []

    def flush(self, session: Session) -> None:
        self.frames.extend(session.out)
        session.out.clear()

    def close(self, code: int, reason: str) -> None:
        self.closed.append(code)

    def take(self) -> list[dict[str, Any]]:
        out = []
        for frame in self.frames:
            n = frame[1] & 0x7F
            body = frame[2 + (2 if n == 126 else 8 if n == 127 else 0) :]
            out.append(msgspec.json.decode(body) if frame[0] & 0x0F == 1 else msgspec.msgpack.decode(body))
        self.frames.clear()
        return out


def check_replies(replies: list[dict[str, Any]], sent: dict[str, Any] | None) -> None:
    for r in replies:
        assert r.get("type") in REPLY_TYPES, r
        if r["type"] == "error":
            assert r["code"] in ERROR_CODES and r["code"] != "INTERNAL", r
            assert not quotes_library(r["message"]), r
    if sent is not None and isinstance(sent.get("id"), str) and sent.get("type") in KNOWN:
        answers = [r for r in replies if r.get("requestId") == sent["id"] and r["type"] != "message"]
        assert len(answers) <= 1, (sent, replies)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hub_answers_any_message_documented_and_other_connections_are_unaffected(data):
    scheduled: list[Callable[[], None]] = []
    hub = Hub(MemoryBroker(10), node_id="f", schedule=scheduled.append, rate_limit=0)

    def run() -> None:
        while scheduled:
            scheduled.pop(0)()

    observer, pub = Recorder(), Recorder()
    so = hub.open(observer, Encoding.MSGPACK)
    sp = hub.open(pub, Encoding.JSON)
    for s in (so, sp):
        hub.receive(s, s.codec.encode_value({"type": "join", "room": "fuzz-obs"}), s.codec.opcode)
    fuzzers = {False: (Recorder(), None), True: (Recorder(), None)}
    sessions = {m: hub.open(rec, Encoding.MSGPACK if m else Encoding.JSON) for m, (rec, _) in fuzzers.items()}
    for s in sessions.values():
        for room in ("fuzz-a", "fuzz-b"):  # both encodings in the fuzzed rooms: publishes must cross
            hub.receive(s, s.codec.encode_value({"type": "join", "room": room}), s.codec.opcode)
    run()
    observer.take()
    for _ in range(data.draw(st.integers(1, 6))):
        msgpack = data.draw(st.booleans())
        s, rec = sessions[msgpack], fuzzers[msgpack][0]
        if data.draw(st.integers(0, 9)) == 0:  # raw bytes, either opcode
            raw, opcode, sent = data.draw(st.binary(max_size=60)), data.draw(st.sampled_from([1, 2])), None
        else:
            sent = data.draw(messages(msgpack))
            raw, opcode = encode(sent, msgpack), s.codec.opcode
            if raw is None:
                continue
        rec.take()
        hub.receive(s, raw, opcode)
        run()
        check_replies(rec.take(), sent)
        assert rec.closed == []
    # The observer saw only what the room carried, and still gets the next publication.
    for msg in observer.take():
        assert msg["type"] in ("message", "joined", "left") and msg["room"] == "fuzz-obs", msg
    hub.receive(sp, b'{"type":"publish","room":"fuzz-obs","payload":"ok"}', 1)
    run()
    assert [m["payload"] for m in observer.take()] == ["ok"]


# ---------------------------------------------------------------- against a real server process


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--rate-limit", "0", "--echo-endpoint").start()
    yield srv
    srv.kill()


async def through_sentinel(peer: PicowsPeer, n: int) -> list[dict[str, Any]]:
    """Everything the server sends until the pong of ping ``sentinel-n``: the replies to what came before.

    Fails at once (not after a timeout) when the server closes the connection instead.
    """
    await peer.send({"type": "ping", "id": f"{SENTINEL}{n}"})
    out = []
    closed = asyncio.ensure_future(peer.closed.wait())
    try:
        while True:
            reply = asyncio.ensure_future(peer.recv(10))
            await asyncio.wait({reply, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not reply.done():
                reply.cancel()
                raise AssertionError(f"the server closed the connection ({peer.close_code}) after {out}")
            msg = reply.result()
            if msg.get("type") == "pong" and msg.get("requestId") == f"{SENTINEL}{n}":
                return out
            out.append(msg)
    finally:
        closed.cancel()


def test_real_server_answers_any_message_in_both_encodings_and_stays_up(fuzz_server):
    loop = asyncio.new_event_loop()
    conns: dict[bool, PicowsPeer] = {}
    counter = iter(range(10**9))

    async def setup() -> PicowsPeer:
        for m in (False, True):
            conns[m] = await PicowsPeer.connect(fuzz_server.url, msgpack=m)
            # Both encodings in the fuzzed rooms, so every publish must cross encodings.
            for room in ("fuzz-a", "fuzz-b"):
                assert (await conns[m].request("join", room=room))["type"] == "ack"
        observer = await PicowsPeer.connect(fuzz_server.url)
        await observer.request("join", room="fuzz-obs")
        return observer

    observer = loop.run_until_complete(setup())

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.data())
    def one_burst(data):
        msgpack = data.draw(st.booleans())
        if conns[msgpack].closed.is_set():  # closed by an earlier (failing) example: start clean
            conns[msgpack] = loop.run_until_complete(PicowsPeer.connect(fuzz_server.url, msgpack=msgpack))
        peer = conns[msgpack]
        if data.draw(st.integers(0, 4)) == 0:
            raw: bytes | str | None = (
                data.draw(st.binary(max_size=80)) if msgpack else data.draw(st.text(max_size=80))
            )
            sent = None
        else:
            sent = data.draw(messages(msgpack))
            encoded = encode(sent, msgpack)
            if encoded is None:
                return
            raw = encoded if msgpack else encoded.decode()

        async def go() -> None:
            await peer.send_raw(raw)
            replies = await through_sentinel(peer, next(counter))
            check_replies(replies, sent)
            assert peer.close_code is None

        loop.run_until_complete(go())

    try:
        one_burst()

        async def others_unaffected() -> None:
            publisher = await PicowsPeer.connect(fuzz_server.url)
            await publisher.request("join", room="fuzz-obs")
            while True:  # what the fuzzers published to fuzz-obs, then ours
                try:
                    msg = await observer.recv(0.3)
                except TimeoutError:
                    break
                assert msg["type"] in ("message", "joined", "left"), msg
            assert (await publisher.request("publish", room="fuzz-obs", payload="ok"))["type"] == "ack"
            assert (await observer.recv_type("message"))["payload"] == "ok"
            await publisher.close()

        loop.run_until_complete(others_unaffected())
        assert fuzz_server.alive()
        assert "Traceback" not in fuzz_server.output(), fuzz_server.output()[-3000:]
    finally:

        async def teardown() -> None:
            for c in (*conns.values(), observer):
                await c.close()

        loop.run_until_complete(teardown())
        loop.close()
