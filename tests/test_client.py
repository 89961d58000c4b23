"""The reusable client (client/): unit rules first, then against a real server process.

Server-backed tests start ``python -m wsfan`` as a subprocess (tests/helpers/servers.py)
because reconnection is only meaningful against a process that can really die,
freeze (SIGSTOP) or come back on the same port with its history gone.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import uuid
from typing import Any

import msgspec
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.client_tools import assert_nothing_more, hold_reconnects, take
from helpers.peers import PicowsPeer
from helpers.ports import free_port
from helpers.servers import ServerProcess
from helpers.waiting import run, until
from wsfan.client import (
    TRANSIENT_CODES,
    Backoff,
    ClientError,
    Connected,
    ConnectionClosed,
    Disconnected,
    Forbidden,
    Gap,
    HandshakeRejected,
    InternalError,
    InvalidMessage,
    InvalidPayload,
    InvalidURL,
    Message,
    MessagesDropped,
    MessageTimeout,
    NotConnected,
    NotJoined,
    ProtocolError,
    RateLimited,
    Reconnecting,
    Recovered,
    RejoinFailed,
    RequestTimeout,
    ServerError,
    Unauthorized,
    Unavailable,
    connect,
    error_for,
    parse_retry_after,
)
from wsfan.client.codec import Codec
from wsfan.client.inbox import Inbox, Router
from wsfan.client.reconnect import Reconnector


def msg(room: str, seq: int, payload: object = None) -> Message:
    return Message(room=room, seq=seq, sender="u", payload=payload)


# ---------------------------------------------------------------- backoff


def test_backoff_is_full_jitter_with_cap():
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(7))
    reference = random.Random(7)
    delays = [backoff.next_delay() for _ in range(8)]
    expected = [reference.uniform(0, min(4.0, 0.5 * 2**i)) for i in range(8)]
    assert delays == expected
    assert all(0 <= d <= 4.0 for d in delays)
    assert backoff.attempt == 8


def test_backoff_reset_and_max_attempts():
    backoff = Backoff(base=1.0, cap=10.0, max_attempts=2, rng=random.Random(1))
    backoff.next_delay()
    backoff.next_delay()
    assert backoff.exhausted
    backoff.reset()
    assert not backoff.exhausted and backoff.attempt == 0
    assert Backoff(max_attempts=None).exhausted is False
    assert Backoff(base=1.0, cap=30.0).window(1000) == 30.0  # no float overflow on long outages


def test_backoff_adds_retry_after_to_the_jittered_delay():
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(3))
    jitter = random.Random(3).uniform(0, 0.5)
    assert backoff.next_delay(retry_after=2.0) == pytest.approx(2.0 + jitter)


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0
    now = 1_000_000_000.0
    assert parse_retry_after("Sun, 09 Sep 2001 01:46:50 GMT", now=now) == pytest.approx(10.0)


# ---------------------------------------------------------------- codec and errors


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_codec_omits_absent_fields_and_passes_raw_payload_verbatim(encoding):
    codec = Codec(encoding)
    mod = msgspec.json if encoding == "json" else msgspec.msgpack
    assert mod.decode(codec.request("leave", "1", room="r")) == {
        "type": "leave",
        "id": "1",
        "room": "r",
    }
    assert mod.decode(codec.request("echo", payload=None)) == {"type": "echo", "payload": None}
    raw = codec.encode_payload({"k": [1, 2]})
    wire = codec.request("publish", room="r", payload=raw)
    assert bytes(raw) in wire
    delivered = codec.decode(
        mod.encode({"type": "message", "room": "r", "seq": 4, "from": "u1", "payload": [1]})
    )
    assert isinstance(delivered, Message)
    assert (delivered.room, delivered.seq, delivered.sender, delivered.payload) == ("r", 4, "u1", [1])


def test_codec_rejects_unknown_encoding():
    with pytest.raises(ValueError):
        Codec("xml")  # type: ignore[arg-type]


def test_error_codes_map_to_typed_exceptions():
    assert isinstance(error_for("NOT_JOINED", "x"), NotJoined)
    assert isinstance(error_for("RATE_LIMITED"), RateLimited)
    future = error_for("SOMETHING_NEW", "m")
    assert type(future) is ProtocolError and future.code == "SOMETHING_NEW" and future.message == "m"
    assert isinstance(RequestTimeout("ping", 1.0), TimeoutError)
    # "not now" vs "never": what a rejoin retries and what makes it drop the room
    assert TRANSIENT_CODES == {"UNAVAILABLE", "RATE_LIMITED", "INTERNAL"}
    assert all(
        isinstance(e, (Unavailable, RateLimited, InternalError)) for e in map(error_for, TRANSIENT_CODES)
    )
    assert all(error_for(code).transient for code in TRANSIENT_CODES)
    assert not any(error_for(c).transient for c in ("FORBIDDEN", "INVALID_MESSAGE", "NOT_JOINED", "NEW"))


def test_codec_sends_epoch_only_when_given():
    codec = Codec("json")
    wire = codec.request("join", "1", room="r", since=9, epoch="5f0c2a9e")
    assert msgspec.json.decode(wire) == {
        "type": "join",
        "id": "1",
        "room": "r",
        "since": 9,
        "epoch": "5f0c2a9e",
    }
    assert "epoch" not in msgspec.json.decode(codec.request("join", "2", room="r"))


# ---------------------------------------------------------------- rooms: dedupe and recovery
# The numbering rules (gap, duplicate, reset, recovered:false) are shared vectors:
# tests/vectors/numbering.json, run by tests/test_numbering.py and by the JS client's tests.


# ---------------------------------------------------------------- buffers: overflow policy and routing


def test_inbox_drops_oldest_then_raises_once_and_stays_usable():
    async def body():
        reported = []
        inbox = Inbox(None, 3, lambda room, n: reported.append(n))
        for s in range(1, 6):
            inbox.put(msg("r", s))
        with pytest.raises(MessagesDropped) as info:
            await inbox.get()
        assert info.value.count == 2
        assert [(await inbox.get()).seq for _ in range(3)] == [3, 4, 5]
        assert reported == [1]  # one event per burst, not per message
        inbox.end(None)
        with pytest.raises(StopAsyncIteration):
            await inbox.get()

    run(body())


def test_router_room_stream_takes_its_backlog_and_ends_on_leave():
    async def body():
        router = Router(100)
        for m in (msg("a", 1), msg("b", 1), msg("a", 2)):
            router.route(m)
        stream_a = router.stream("a")
        assert [m.seq for m in (await stream_a.get(1), await stream_a.get(1))] == [1, 2]
        router.route(msg("a", 3))
        router.route(msg("b", 2))
        assert (await stream_a.get(1)).seq == 3
        everything = router.stream(None)
        assert [(await everything.get(1)).room for _ in range(2)] == ["b", "b"]
        router.end_room("a")
        assert [m async for m in stream_a] == []
        del stream_a
        router.route(msg("a", 4))  # no reader for "a" any more: back to the all-rooms buffer
        assert (await everything.get(1)).room == "a"

    run(body())


ROOMS = ("a", "b", "c")
# One step of an application reading the buffer: publish to a room; read one message through a
# stream made for that read (the README pattern) or a held one; make or drop a held stream; collect.
STEPS = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(ROOMS)),
    st.tuples(st.just("read"), st.sampled_from((*ROOMS, None))),
    st.tuples(st.just("read held"), st.integers(0, 3)),
    st.tuples(st.just("hold"), st.sampled_from((*ROOMS, None))),
    st.tuples(st.just("drop"), st.integers(0, 3)),
    st.tuples(st.just("collect"), st.none()),
)


class BufferModel:
    """What the buffer must do (client.inbox): one FIFO, a read takes the oldest message it may read.

    Full at ``maxsize``: the oldest is dropped and counted for its room until a read that could
    have returned it (a read of its room, or an all-rooms read) reports it, once.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: list[tuple[str, int]] = []
        self.lost: dict[str, int] = {}
        self.seqs = dict.fromkeys(ROOMS, 0)

    def publish(self, room: str) -> tuple[str, int]:
        if len(self.items) == self.maxsize:
            old_room, _ = self.items.pop(0)
            self.lost[old_room] = self.lost.get(old_room, 0) + 1
        self.seqs[room] += 1
        self.items.append((room, self.seqs[room]))
        return room, self.seqs[room]

    def read(self, room: str | None) -> tuple[str, int] | int | None:
        """The message the read returns, the count its MessagesDropped reports, or None (it would wait)."""
        if room is None and self.lost:
            count = sum(self.lost.values())
            self.lost.clear()
            return count
        if room is not None and room in self.lost:
            return self.lost.pop(room)
        for i, item in enumerate(self.items):
            if room is None or item[0] == room:
                return self.items.pop(i)
        return None


async def apply_step(step: tuple[str, Any], model: BufferModel, streams: Any, held: list[Any], publish: Any):
    """Run one step on the client (``streams(room)`` makes a stream) and check it against the model."""
    kind, arg = step
    if kind == "publish":
        await publish(*model.publish(arg))
        return
    if kind == "hold":
        held.append(streams(arg))
        return
    if kind == "drop":
        if held:
            del held[arg % len(held)]
        return
    if kind == "collect":
        gc.collect(0)  # the streams die by reference counting; a collection must not change anything either
        return
    if kind == "read held":
        if not held:
            return
        stream = held[arg % len(held)]
    else:
        stream = streams(arg)
    expected = model.read(stream.room)
    if expected is None:
        with pytest.raises(TimeoutError):
            await stream.get(0)
    elif isinstance(expected, int):
        with pytest.raises(MessagesDropped) as info:
            await stream.get(5)
        assert info.value.count == expected
    else:
        got = await stream.get(5)
        assert (got.room, got.seq) == expected


@settings(max_examples=300)
@given(steps=st.lists(STEPS, max_size=60), maxsize=st.sampled_from((3, 7, 10_000)))
def test_buffer_reads_every_message_once_whatever_streams_come_and_go(steps, maxsize):
    """Hypothesis over interleavings of publish / messages(room).get / holding and dropping streams.

    Nothing buffered is lost when a stream object goes away (newcomer finding 1: the room stream
    was weakly referenced and what it buffered died with it), each message is read once, in order,
    and overflow is counted and reported once per message.
    """

    async def body() -> None:
        router = Router(maxsize)
        model = BufferModel(maxsize)
        held: list[Any] = []

        async def publish(room: str, seq: int) -> None:
            router.route(msg(room, seq))

        for step in steps:
            await apply_step(step, model, router.stream, held, publish)
        while model.items or model.lost:  # and the rest is still there
            await apply_step(("read", None), model, router.stream, held, publish)

    run(body())


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_the_readme_pattern_reads_every_message(live_server, encoding):
    """README: ``await alice.messages(room).get(timeout=...)`` per message gets all N (was 1, then timeouts)."""

    async def body():
        async with connect(live_server.url, encoding=encoding) as alice, connect(live_server.url) as bob:
            await alice.join("chat.general")
            await bob.join("chat.general")
            for i in range(50):
                await bob.publish("chat.general", {"text": i})
            got = []
            for _ in range(50):
                got.append((await alice.messages("chat.general").get(timeout=2)).payload["text"])
            assert got == list(range(50)) and alice.stats.messages == 50
            with pytest.raises(MessageTimeout, match="no message in room 'chat.general' within 0.05s"):
                await alice.messages("chat.general").get(timeout=0.05)
            await bob.publish("chat.general", "late")  # a timeout loses nothing
            assert (await alice.messages().get(timeout=2)).payload == "late"

    run(body())


@settings(max_examples=25)
@given(steps=st.lists(STEPS, max_size=25))
def test_interleavings_against_a_real_server_lose_nothing(live_server, steps):
    """The interleavings above through a real server: alice reads what bob publishes, each once, in order."""

    async def body() -> None:
        tag = f"i{uuid.uuid4().hex[:12]}"  # hypothesis seeds `random`: a fresh room per example
        async with connect(live_server.url) as alice, connect(live_server.url) as bob:
            for room in ROOMS:
                await alice.join(f"{tag}.{room}")
                await bob.join(f"{tag}.{room}")
            model = BufferModel(10_000)
            held: list[Any] = []

            def streams(room: str | None) -> Any:
                return Renamed(alice.messages(None if room is None else f"{tag}.{room}"), tag)

            async def publish(room: str, seq: int) -> None:
                assert (await bob.publish(f"{tag}.{room}", seq))["seq"] == seq

            for step in steps:
                await apply_step(step, model, streams, held, publish)
            while model.items:
                await apply_step(("read", None), model, streams, held, publish)

    run(body())


class Renamed:
    """A stream of ``<tag>.<room>`` rooms seen as ``<room>``: the model's names."""

    def __init__(self, stream: Any, tag: str) -> None:
        self.stream = stream
        self.prefix = f"{tag}."
        self.room = None if stream.room is None else stream.room.removeprefix(self.prefix)

    async def get(self, timeout: float) -> Message:
        got = await self.stream.get(timeout)
        return Message(room=got.room.removeprefix(self.prefix), seq=got.seq, sender=got.sender, payload=None)


# ---------------------------------------------------------------- payloads: the protocol's payload rule


def allowed(value: Any, depth: int = 64) -> bool:
    """The payload rule (PROTOCOL.md) on Python values, written apart from the client's own check."""
    if value is None or type(value) in (bool, str):
        return type(value) is not str or not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if type(value) is int:
        return -(2**63) <= value <= 2**64 - 1
    if type(value) is float:
        return value == value and value not in (float("inf"), float("-inf"))
    if type(value) is list:
        return depth > 0 and all(allowed(v, depth - 1) for v in value)
    if type(value) is dict:
        return depth > 0 and all(
            type(k) is str and allowed(k) and allowed(v, depth - 1) for k, v in value.items()
        )
    return False


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (1 == 1.0 == True in Python; -0.0 == 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b and str(a) == str(b)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 0]),
    st.floats(),  # NaN and infinities included
    st.sampled_from([-0.0, 1e308, 5e-324, 1.0]),
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb"]),  # lone surrogates
    st.binary(max_size=6),
    st.datetimes(),
    st.uuids(),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.frozensets(st.integers(0, 3), max_size=2),
)
PAYLOADS = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.tuples(kids, kids),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(-2, 2), st.sampled_from(["\udc00"])), kids, max_size=4
        ),
    ),
    max_leaves=16,
)


@settings(max_examples=60)
@given(values=st.lists(PAYLOADS, min_size=1, max_size=8))
def test_a_payload_round_trips_exactly_in_both_encodings_or_is_refused_before_sending(server, values):
    """Newcomer finding 3: NaN and inf arrived as null, b"bytes" as base64, {1: 2} as {"1": 2} from JSON,
    and the same values were INVALID_MESSAGE from MessagePack. Now every value either reaches a JSON and
    a MessagePack subscriber exactly as published from either encoding, or both publishers refuse it
    with InvalidPayload before sending anything."""

    async def body() -> None:
        room = f"payload-{uuid.uuid4().hex[:12]}"
        async with (
            connect(server.url, encoding="json") as pub_json,
            connect(server.url, encoding="msgpack") as pub_msgpack,
            connect(server.url, encoding="json") as sub_json,
            connect(server.url, encoding="msgpack") as sub_msgpack,
        ):
            for c in (pub_json, pub_msgpack, sub_json, sub_msgpack):
                await c.join(room)
            for value in values:
                refusals = []
                for pub in (pub_json, pub_msgpack):
                    sent = pub.stats.sent
                    try:
                        await pub.publish(room, value)
                    except InvalidPayload as exc:
                        assert pub.stats.sent == sent  # nothing went out
                        refusals.append(exc.problem)
                        continue
                    for sub in (sub_json, sub_msgpack):
                        got = (await sub.messages(room).get(5)).payload
                        assert same(got, value), (pub.encoding, sub.encoding, value, got)
                if allowed(value):
                    assert refusals == [], (value, refusals)
                else:
                    assert len(refusals) == 2 and refusals[0] == refusals[1], (value, refusals)
            assert len(sub_json.messages(room)) == len(sub_msgpack.messages(room)) == 0

    run(body())


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_the_newcomers_payloads_are_refused_before_sending(server, encoding):
    async def body() -> None:
        async with connect(server.url, encoding=encoding) as pub, connect(server.url) as sub:
            await pub.join("conv")
            await sub.join("conv")
            cases = [
                b"bytes",
                float("nan"),
                float("inf"),
                float("-inf"),
                {1: 2},
                (1, 2),
                2**64,
                [[]] * 0 + [{"a": b""}],
            ]
            for value in cases:
                with pytest.raises(InvalidPayload):
                    await pub.publish("conv", value)
                with pytest.raises(InvalidPayload):
                    pub.publish_nowait("conv", value)
                with pytest.raises(InvalidPayload):
                    await pub.echo(value)
                with pytest.raises(InvalidPayload):
                    pub.encode_payload(value)
            deep, deeper = [], []
            for _ in range(63):
                deep = [deep]
            deeper = [deep]
            await pub.publish("conv", deep)  # 64 arrays deep: the limit, delivered
            assert same((await sub.messages("conv").get(5)).payload, deep)
            with pytest.raises(InvalidPayload, match="nested deeper than 64"):
                await pub.publish("conv", deeper)
            await pub.publish("conv", "marker")  # nothing else was sent
            assert (await sub.messages("conv").get(5)).payload == "marker"
            assert pub.stats.errors == {}

    run(body())


# ---------------------------------------------------------------- reconnect policy (fake connections)


class FakeConn:
    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()


def drive_reconnector(reconnector, first_close, outcomes, refresh=None):
    """Run Reconnector.run with scripted reopen outcomes; returns (events, stop reason, tokens, sleeps)."""

    async def body():
        events, stops, tokens, sleeps = [], [], [], []
        script = list(outcomes)

        async def fake_sleep(delay):
            sleeps.append(delay)

        async def reopen():
            outcome = script.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            conn = FakeConn()
            conn.closed.set_result((1000, "done"))  # end the session after this connection
            return conn

        reconnector.sleep = fake_sleep
        conn = FakeConn()
        conn.closed.set_result(first_close)
        state = {"closing": False}

        def stop(exc):
            stops.append(exc)
            state["closing"] = True

        await reconnector.run(
            conn,
            reopen=reopen,
            stop=stop,
            emit=events.append,
            use_token=tokens.append,
            closing=lambda: state["closing"],
        )
        return events, stops, tokens, sleeps

    return run(body())


def test_reconnect_not_after_normal_close_or_token_expiry():
    for code in (1000, 4001):
        events, stops, _, sleeps = drive_reconnector(Reconnector(Backoff()), (code, "bye"), [])
        assert events == [Disconnected(code, "bye", will_reconnect=False)]
        assert isinstance(stops[0], ConnectionClosed) and stops[0].code == code and sleeps == []


def test_reconnect_after_token_expiry_when_refresh_supplies_a_token():
    async def refresh(why):
        return f"new-token-{why}" if why == 4001 else None  # the scripted second close (1000) ends it

    r = Reconnector(Backoff(rng=random.Random(0)), refresh_token=refresh)
    events, stops, tokens, _ = drive_reconnector(r, (4001, "expired"), [None])
    assert tokens == ["new-token-4001"]
    assert events[0] == Disconnected(4001, "expired", will_reconnect=True)
    assert isinstance(events[1], Reconnecting) and events[1].attempt == 1


def test_reconnect_honours_retry_after_on_503_and_stops_on_401():
    r = Reconnector(Backoff(base=0.1, cap=0.1, rng=random.Random(5)))
    events, stops, _, sleeps = drive_reconnector(
        r, (1006, ""), [HandshakeRejected(503, retry_after=2.0), Unauthorized(401)]
    )
    jitter = random.Random(5)
    first, second = jitter.uniform(0, 0.1), jitter.uniform(0, 0.1)
    assert sleeps == [pytest.approx(first), pytest.approx(2.0 + second)]
    assert isinstance(stops[0], Unauthorized)
    assert [type(e) for e in events] == [Disconnected, Reconnecting, Reconnecting]


def test_reconnect_gives_up_after_max_attempts():
    r = Reconnector(Backoff(base=0.01, max_attempts=3))
    events, stops, _, sleeps = drive_reconnector(r, (1001, "going away"), [OSError("refused")] * 3)
    assert len(sleeps) == 3 and [e.attempt for e in events if isinstance(e, Reconnecting)] == [1, 2, 3]
    assert isinstance(stops[0], ConnectionClosed) and stops[0].code == 1006


async def _fake_http_server(
    status_line: bytes, headers: bytes, requests: list | None = None
) -> asyncio.Server:
    async def respond(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        if requests is not None:
            requests.append(request.decode().lower())
        writer.write(status_line + b"\r\n" + headers + b"Content-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(respond, "127.0.0.1", 0)


def test_upgrade_sends_token_and_subprotocol_and_surfaces_refusals():
    async def body():
        server = await _fake_http_server(b"HTTP/1.1 503 Service Unavailable", b"Retry-After: 7\r\n")
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeRejected) as info:
            await connect(f"ws://127.0.0.1:{port}/ws")
        assert info.value.status == 503 and info.value.retry_after == 7.0
        server.close()
        requests = []
        server = await _fake_http_server(b"HTTP/1.1 401 Unauthorized", b"", requests)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(Unauthorized):
            await connect(f"ws://127.0.0.1:{port}/ws", token="bad.jwt", encoding="msgpack")
        server.close()
        assert "authorization: bearer bad.jwt\r\n" in requests[0]
        assert "sec-websocket-protocol: msgpack\r\n" in requests[0]

    run(body())


# ---------------------------------------------------------------- against the real server


@pytest.fixture(scope="module")
def live_server():
    with ServerProcess() as server:
        yield server


@pytest.mark.parametrize("enc_a,enc_b", [("json", "json"), ("msgpack", "msgpack"), ("json", "msgpack")])
def test_publish_is_delivered_to_other_members_not_the_sender(live_server, enc_a, enc_b):
    async def body():
        room = f"pubsub-{enc_a}-{enc_b}"
        async with (
            connect(live_server.url, encoding=enc_a) as a,
            connect(live_server.url, encoding=enc_b) as b,
        ):
            assert a.welcome is not None and a.welcome.conn and a.welcome.node and a.welcome.heartbeat > 0
            assert b.encoding == enc_b
            await a.join(room)
            joined = await b.join(room)
            assert joined["room"] == room and isinstance(joined["seq"], int)
            ack = await b.publish(room, {"n": 1, "s": "héllo"})
            assert ack == {"room": room, "seq": joined["seq"] + 1}
            b.publish_nowait(room, [1, 2, 3])
            stream = a.messages(room)
            first, second = await stream.get(2), await stream.get(2)
            assert first.payload == {"n": 1, "s": "héllo"} and second.payload == [1, 2, 3]
            assert (first.seq, second.seq) == (ack["seq"], ack["seq"] + 1)
            assert first.sender == b.welcome.user and first.room == room
            assert 0 < first.received_at <= time.perf_counter()
            assert len(b.messages(room)) == 0  # the sender gets no copy

    run(body())


def test_client_runs_on_uvloop(live_server):
    async def body():
        async with connect(live_server.url, encoding="msgpack") as a, connect(live_server.url) as b:
            await a.join("uv")
            await b.join("uv")
            await b.publish("uv", {"loop": "uvloop"})
            assert (await a.messages().get(2)).payload == {"loop": "uvloop"}
            assert await a.echo(1) == 1

    uvloop.run(asyncio.wait_for(body(), 10))


def test_raw_payload_passes_through_byte_for_byte(live_server):
    async def body():
        async with connect(live_server.url, raw_payloads=True) as a, connect(live_server.url) as b:
            await a.join("raw")
            await b.join("raw")
            await b.publish("raw", msgspec.Raw(b'{"k": [1, 2],  "x":null}'))
            got = await a.messages("raw").get(2)
            assert bytes(got.payload) == b'{"k": [1, 2],  "x":null}'
            assert a.decode_payload(got.payload) == {"k": [1, 2], "x": None}

    run(body())


def test_echo_and_ping_reply_to_the_caller(live_server):
    async def body():
        async with connect(live_server.url, encoding="msgpack") as c:
            assert await c.echo({"deep": [1, {"x": None}]}) == {"deep": [1, {"x": None}]}
            assert await c.echo(None) is None
            assert 0 < await c.ping() < 1.0

    run(body())


def test_errors_are_typed_and_keep_the_connection_open(live_server):
    async def body():
        events = []
        async with connect(live_server.url, on_event=events.append) as c:
            with pytest.raises(NotJoined) as info:
                await c.publish("never-joined", 1)
            assert info.value.code == "NOT_JOINED" and info.value.message
            with pytest.raises(InvalidMessage):
                await c.join("bad room!")
            with pytest.raises(InvalidMessage):
                await c.join("x" * 129)
            c.publish_nowait("never-joined", 1)  # no id: the error arrives as an event
            c.send_raw(b'{"type":"bogus"}')
            await until(lambda: sum(isinstance(e, ServerError) for e in events) >= 2)
            codes = [e.code for e in events if isinstance(e, ServerError)]
            assert codes == ["NOT_JOINED", "UNKNOWN_TYPE"]
            assert c.stats.errors["NOT_JOINED"] == 2
            assert await c.echo("still open") == "still open"

    run(body())


def test_on_message_callback_replaces_buffering(live_server):
    async def body():
        got: list[Message] = []
        async with connect(live_server.url, on_message=got.append) as a, connect(live_server.url) as b:
            with pytest.raises(ClientError):
                a.messages()
            await a.join("cb")
            await b.join("cb")
            for i in range(20):
                b.publish_nowait("cb", i)
                if not b.writable:  # back-pressure hook for load generators
                    await b.drain()
            await until(lambda: len(got) == 20)
            assert [m.payload for m in got] == list(range(20))
            assert a.stats.messages == 20 and b.stats.sent == 21  # 20 publishes + the join

    run(body())


def test_slow_reader_overflow_drops_oldest_and_raises_once(live_server):
    async def body():
        events = []
        async with connect(live_server.url, max_buffered=5, on_event=events.append) as a:
            async with connect(live_server.url) as b:
                await a.join("slow")
                await b.join("slow")
                for i in range(12):
                    await b.publish("slow", i)
                await until(lambda: a.stats.messages == 12)
                stream = a.messages()
                with pytest.raises(MessagesDropped) as info:
                    await stream.get(1)
                assert info.value.count == 7
                assert [(await stream.get(1)).payload for _ in range(5)] == [7, 8, 9, 10, 11]
                assert [e.dropped for e in events if type(e).__name__ == "Overflow"] == [1]

    run(body())


def test_request_timeout_when_server_is_frozen_and_late_reply_is_dropped(live_server):
    async def body():
        async with connect(live_server.url, request_timeout=5.0) as c:
            live_server.pause()
            try:
                started = time.perf_counter()
                with pytest.raises(RequestTimeout) as info:
                    await c.echo("late", timeout=0.2)
                # the per-call 0.2 s timeout fired, not the client default of 5 s
                assert 0.15 < time.perf_counter() - started < 3.0
                assert info.value.kind == "echo" and c._pending == {}
            finally:
                live_server.resume()
            # The reply to "late" arrives now and must not be mistaken for this one's.
            assert await c.echo("fresh") == "fresh"
            assert c._pending == {}

    run(body())


def test_dead_connection_is_detected_by_ping_and_reconnected(live_server):
    async def body():
        events = []
        async with connect(
            live_server.url,
            ping_interval=0.2,
            ping_timeout=0.3,
            open_timeout=0.4,
            backoff_base=0.05,
            backoff_cap=0.2,
            on_event=events.append,
        ) as c:
            await c.join("alive")
            live_server.pause()
            try:
                await until(lambda: any(isinstance(e, Disconnected) for e in events), timeout=3)
                gone = next(e for e in events if isinstance(e, Disconnected))
                assert gone.code == 1006 and gone.will_reconnect and "pong" in gone.reason
                assert not c.connected
                with pytest.raises(NotConnected):
                    c.publish_nowait("alive", 1)
                with pytest.raises(RequestTimeout):  # waits for the reconnect, within its timeout
                    await c.ping(timeout=0.1)
            finally:
                live_server.resume()
            await until(lambda: c.connected, timeout=5)
            assert any(isinstance(e, Connected) and e.reconnect for e in events)
            assert c.rooms == ["alive"]
            assert await c.publish("alive", "back") == {"room": "alive", "seq": 1}

    run(body())


class MaxRandom(random.Random):
    """Always the top of the jitter window: a predictable reconnect delay."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_reconnect_rejoins_with_since_and_recovers_each_missed_message_once(live_server):
    async def body():
        events = []
        async with (
            connect(live_server.url, backoff_base=0.3, rng=MaxRandom(), on_event=events.append) as a,
            connect(live_server.url) as b,
        ):
            await a.join("rec")
            await b.join("rec")
            await b.publish("rec", "m1")
            await a.publish("rec", "own")  # a never gets its own message back, not even on replay
            await b.publish("rec", "m3")
            stream = a.messages("rec")
            assert [(await stream.get(2)).payload for _ in range(2)] == ["m1", "m3"]
            a._conn.abort()  # the socket dies under the client
            await until(lambda: not a.connected)
            for text in ("m4", "m5", "m6"):  # published while a is away (its reconnect waits 0.3 s)
                await b.publish("rec", text)
            await until(lambda: a.connected, timeout=5)
            assert [(await stream.get(2)).payload for _ in range(3)] == ["m4", "m5", "m6"]
            assert Recovered("rec", since=3, seq=6) in events
            kinds = [type(e) for e in events if not isinstance(e, Reconnecting)]
            assert kinds == [Connected, Disconnected, Connected, Recovered], events  # Connected first
            await b.publish("rec", "m7")
            assert (await stream.get(2)).seq == 7
            assert len(stream) == 0 and a._rooms.duplicates == 0

    run(body())


def test_server_restart_reconnects_rejoins_and_reports_the_seq_reset():
    async def body(server):
        events_a, events_b = [], []
        options = dict(backoff_base=0.05, backoff_cap=0.2, stable_after=0.0)
        async with (
            connect(server.url, on_event=events_a.append, **options) as a,
            connect(server.url, on_event=events_b.append, **options) as b,
        ):
            await a.join("restart")
            await b.join("restart")
            for i in range(3):
                await b.publish("restart", i)
            stream = a.messages("restart")
            assert [(await stream.get(2)).seq for _ in range(3)] == [1, 2, 3]
            assert await asyncio.to_thread(server.stop) == 0  # graceful: connections closed with 1001
            assert Disconnected(1001, "server going away", will_reconnect=True) in events_a
            await asyncio.to_thread(server.start)  # same port, empty history: seq starts over
            await until(lambda: a.connected and b.connected, timeout=10)
            assert Gap("restart", since=3, seq=0, reset=True) in events_a
            assert Gap("restart", since=3, seq=0, reset=True) in events_b  # b's own seqs count as seen
            for events in (events_a, events_b):  # Connected first, then what the rejoin found
                kinds = [type(e) for e in events if not isinstance(e, Reconnecting)]
                assert kinds == [Connected, Disconnected, Connected, Gap], events
                assert events[-2] == Connected(events[-2].welcome, reconnect=True)
            assert a.rooms == ["restart"] and b.rooms == ["restart"]
            assert await b.publish("restart", "after") == {"room": "restart", "seq": 1}
            after = await stream.get(2)
            assert (after.seq, after.payload) == (1, "after")

    with ServerProcess() as server:
        run(body(server))


def test_backoff_delays_follow_the_seeded_distribution_while_server_is_down():
    async def body(server):
        events = []
        c = await connect(
            server.url,
            backoff_base=0.02,
            backoff_cap=0.1,
            max_attempts=5,
            rng=random.Random(1234),
            stable_after=3600,
            on_event=events.append,
        )
        server.kill()  # no close frame: 1006
        with pytest.raises(ConnectionClosed) as info:
            await c.wait_closed()
        assert info.value.code == 1006
        reference = random.Random(1234)
        expected = [reference.uniform(0, min(0.1, 0.02 * 2**i)) for i in range(5)]
        attempts = [e for e in events if isinstance(e, Reconnecting)]
        assert [e.attempt for e in attempts] == [1, 2, 3, 4, 5]
        assert [e.delay for e in attempts] == expected
        assert all(isinstance(e.error, OSError) for e in attempts[1:])
        assert events[0] == Connected(c.welcome, reconnect=False)
        assert isinstance(events[1], Disconnected) and events[1].code == 1006
        with pytest.raises(ConnectionClosed):
            await c.ping()
        with pytest.raises(ConnectionClosed):
            await c.messages().get(1)
        await c.close()

    with ServerProcess(port=free_port()) as server:
        run(body(server))


def test_client_answers_server_heartbeat_pings():
    async def body(server):
        events = []
        async with connect(server.url, ping_interval=None, on_event=events.append) as c:
            assert c.welcome.heartbeat == 200
            # Control: a peer that never pongs is closed 4000, so pings do go out; by then the client,
            # which sends nothing itself, has been through at least two ping rounds.
            silent = await PicowsPeer.connect(server.url, enable_auto_pong=False)
            assert await silent.wait_closed(5) == 4000
            assert [type(e) for e in events] == [Connected]
            assert await c.echo("alive") == "alive"

    with ServerProcess("--heartbeat", "200", "--heartbeat-timeout", "300") as server:
        run(body(server))


# ---------------------------------------------------------------- rejoin: epochs and refusals


async def until_accepted(
    call: Any, *args: Any, retry: type[Exception] = RateLimited, timeout: float = 5.0
) -> Any:
    """``await call(*args)``, again every 50 ms while it raises ``retry``."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await call(*args)
            except retry:
                await asyncio.sleep(0.05)


def test_restarted_server_replays_its_new_numbering_to_a_client_that_rejoins_with_its_epoch():
    """The restarted node already has seq 1..3 of the room when the client rejoins with since=3.

    ``since`` alone looks fully recovered (3 == the room's seq); only the epoch the client
    sends back tells the server that those 3 are another numbering, which it then replays.
    """

    async def body(server: ServerProcess) -> None:
        events: list[Any] = []
        gate = asyncio.Event()
        async with connect(server.url, backoff_base=0.05, backoff_cap=0.2, on_event=events.append) as x:
            hold_reconnects(x, gate)
            first = await x.join("epoch")
            stream = x.messages("epoch")
            async with connect(server.url) as pub:
                await pub.join("epoch")
                for i in range(3):
                    await pub.publish("epoch", f"old {i}")
            assert [(await stream.get(2)).seq for _ in range(3)] == [1, 2, 3]
            assert await asyncio.to_thread(server.stop) == 0
            await until(lambda: not x.connected)
            await asyncio.to_thread(server.start)  # same port, new process: new epoch
            async with connect(server.url) as pub:  # another client publishes before x is back
                await pub.join("epoch")
                assert [(await pub.publish("epoch", f"new {i}"))["seq"] for i in range(3)] == [1, 2, 3]
                gate.set()
                await until(lambda: x.connected, 5)
                for i in range(2):
                    await pub.publish("epoch", f"live {i}")
            got = await take(stream, 5, 2)
            assert [(m.seq, m.payload) for m in got] == [
                (1, "new 0"),
                (2, "new 1"),
                (3, "new 2"),
                (4, "live 0"),
                (5, "live 1"),
            ]
            assert [e for e in events if isinstance(e, (Gap, Recovered))] == [
                Gap("epoch", since=3, seq=3, reset=True)
            ]
            assert x.epoch("epoch") not in (None, first["epoch"])
            await assert_nothing_more(stream, server.url, "epoch")  # exactly once
            assert x._rooms.duplicates == 0

    with ServerProcess() as server:
        run(body(server), timeout=20)


def test_rejoin_refused_with_rate_limited_is_retried_on_the_same_connection():
    """More rooms than the server's burst: a new connection would be refused the same way, so wait on this one."""

    async def body(server: ServerProcess) -> None:
        rooms = [f"limited-{i}" for i in range(4)]
        events: list[Any] = []
        x = await connect(
            server.url, backoff_base=0.05, backoff_cap=0.3, rng=random.Random(2), on_event=events.append
        )
        try:
            for room in rooms:  # 4 joins, burst 3
                await until_accepted(x.join, room)
            x._conn.abort()
            await until(lambda: any(isinstance(e, Connected) and e.reconnect for e in events), 8)
            assert x.rooms == rooms, "no room was dropped"
            assert not any(isinstance(e, RejoinFailed) for e in events)
            assert x.stats.errors["RATE_LIMITED"] >= 2  # once before the reconnect, then on the rejoin
            assert sum(isinstance(e, Reconnecting) for e in events) == 1, "paced on the same connection"
            assert sorted(e.room for e in events if isinstance(e, Recovered)) == rooms
            async with connect(server.url) as pub:
                for room in rooms:
                    await until_accepted(pub.join, room)
                    await until_accepted(pub.publish, room, room)
            for room in rooms:
                assert (await x.messages(room).get(3)).payload == room
        finally:
            await x.close()

    with ServerProcess("--rate-limit", "4", "--rate-burst", "3") as server:
        run(body(server), timeout=25)


def test_rejoin_refused_for_good_drops_the_room_and_its_stream_raises():
    """FORBIDDEN is "never": with the new token the room is dropped, the others are rejoined."""
    import jwt

    secret = "client-test-secret-of-at-least-32-bytes"

    def token(**claims: Any) -> str:
        return jwt.encode({"sub": "x", "exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")

    async def body(server: ServerProcess) -> None:
        events: list[Any] = []
        async with connect(server.url, token(), backoff_base=0.05, on_event=events.append) as x:
            await x.join("keep.1")
            await x.join("drop.1")
            dropped = x.messages("drop.1")
            x.token = token(rooms=["keep.*"])  # what a refresh could hand out
            x._conn.abort()
            await until(lambda: any(isinstance(e, Connected) and e.reconnect for e in events), 5)
            failed = [e for e in events if isinstance(e, RejoinFailed)]
            assert [e.room for e in failed] == ["drop.1"] and isinstance(failed[0].error, Forbidden)
            assert x.rooms == ["keep.1"]
            with pytest.raises(Forbidden):
                await dropped.get(1)
            assert sum(isinstance(e, Reconnecting) for e in events) == 1

    with ServerProcess("--jwt-secret", secret) as server:
        run(body(server), timeout=15)


def test_unauthorized_says_the_servers_reason():
    """str(Unauthorized) carries the server's fixed sentence (expired, bad signature), not only the status."""
    import jwt

    secret = "client-test-secret-of-at-least-32-bytes"

    def token(key: str = secret, ttl: int = 60) -> str:
        return jwt.encode({"sub": "x", "exp": int(time.time()) + ttl}, key, algorithm="HS256")

    async def body(server: ServerProcess) -> None:
        cases = [
            (token(ttl=-60), "token expired"),
            (token(key="another-secret-of-at-least-32-bytes!!"), "bad token signature"),
            (None, "missing token"),
        ]
        for bad, reason in cases:
            with pytest.raises(Unauthorized) as info:
                await connect(server.url, bad)
            assert str(info.value) == f"upgrade refused with HTTP 401: {info.value.reason}"
            assert reason in str(info.value), (str(info.value), info.value.body)
            assert info.value.status == 401
        async with connect(server.url, token()) as ok:
            assert await ok.echo(1) == 1

    with ServerProcess("--jwt-secret", secret) as server:
        run(body(server), timeout=15)


def test_a_refusal_body_from_another_server_is_cut_to_one_printable_line():
    async def body():
        async def respond(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            page = b"<html>\x1b[31mnope\r\n<body>" + b"x" * 5000 + b"</body></html>"
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(page) + page)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(respond, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeRejected) as info:
            await connect(f"ws://127.0.0.1:{port}/ws")
        server.close()
        assert str(info.value) == "upgrade refused with HTTP 403: <html> [31mnope"
        assert info.value.body.startswith(b"<html>")

    run(body())


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "http://127.0.0.1:9/ws",
        "ws://",
        "ws://127.0.0.1:99999/ws",
        "ws://[::1/ws",
        "ws://h:x/ws",
        "ws://h/ws#frag",
        "",
        b"ws://h/ws",
    ],
)
def test_a_bad_url_is_an_invalid_url_client_error_before_any_io(url):
    async def body():
        with pytest.raises(InvalidURL) as info:
            await connect(url)  # type: ignore[arg-type]
        assert isinstance(info.value, ClientError) and isinstance(info.value, ValueError)
        assert str(info.value).startswith("invalid WebSocket URL: ")
        if isinstance(url, str) and "?" not in url and url:
            assert url not in str(info.value)  # the URL (which may carry a token) is not quoted

    run(body())
