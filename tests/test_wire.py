"""The wire schema is written once (``server/wire.py``): every view and every writer agrees with it.

Each partial view a hot path uses (the client's ``Message``, the load generator's
``FlatMessage``, the benchmark's ``Head``, the server's ``Probe``) must read what
the schema writes, and every client-side writer (the asyncio client, the Locust
users) must write what the server's codec reads. Property tests: payloads,
rooms, seqs and ids are open-ended.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import Raw

from wsfan.client.codec import REQUEST_TYPES
from wsfan.client.codec import Codec as ClientCodec
from wsfan.loadtest.wire import Codec as LoadCodec
from wsfan.server.protocol import CODECS, Encoding
from wsfan.server.wire import (
    BUILTIN_TYPES,
    SERVER_TYPES,
    Ack,
    Broadcast,
    BroadcastDelivery,
    Delivery,
    Echo,
    EchoReply,
    Error,
    FlatMessage,
    Head,
    Join,
    JoinData,
    JoinedEvent,
    Leave,
    LeaveData,
    LeftEvent,
    Message,
    Outbound,
    Ping,
    Pong,
    PresenceData,
    PresenceInfo,
    PresenceRequest,
    PresenceStatsData,
    PresenceStatsRequest,
    Probe,
    Publish,
    PublishData,
    RawBroadcast,
    RawMessage,
    ReplyData,
    Subscribed,
    Unsubscribed,
    Welcome,
)

ENCODINGS = {"json": msgspec.json, "msgpack": msgspec.msgpack}
SERVER_ENCODING = {"json": Encoding.JSON, "msgpack": Encoding.MSGPACK}

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# [A-Za-z0-9_.:-]{1,128} as a text strategy: the same strings as st.from_regex, generated several times faster
rooms = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-", min_size=1, max_size=128
)
seqs = st.integers(min_value=0, max_value=2**53)
ids = st.none() | st.text(max_size=12)
words = st.text(max_size=16)


def server_messages(mod: Any) -> st.SearchStrategy[Outbound]:
    """Every server -> client message of the schema, with arbitrary field values."""
    payloads = values.map(lambda v: Raw(mod.encode(v)))
    acks = st.builds(
        lambda rid, data: Ack(requestId=rid, success=True, data=data),
        ids,
        st.none()
        | st.builds(JoinData, rooms, seqs, st.booleans(), words)
        | st.builds(PublishData, rooms, seqs)
        | st.builds(LeaveData, rooms)
        | st.builds(PresenceData, rooms, st.lists(st.builds(PresenceInfo, words, words, seqs), max_size=3))
        | st.builds(PresenceStatsData, rooms, seqs, seqs),
    )
    return st.one_of(
        st.builds(Welcome, words, words, st.integers(0, 2**31), words),
        st.builds(
            lambda r, s, f, p: Delivery(room=r, seq=s, sender=f, payload=p), rooms, seqs, words, payloads
        ),
        st.builds(lambda p: BroadcastDelivery(payload=p), payloads),
        st.builds(lambda r, u, c: JoinedEvent(room=r, user=u, conn=c), rooms, words, words),
        st.builds(lambda r, u, c: LeftEvent(room=r, user=u, conn=c), rooms, words, words),
        st.builds(lambda r, s, e: Subscribed(room=r, seq=s, epoch=e), rooms, seqs, words),
        st.builds(lambda r, why: Unsubscribed(room=r, reason=why), rooms, words),
        acks,
        st.builds(
            lambda rid, c, m: Error(requestId=rid, success=False, code=c, message=m), ids, words, words
        ),
        st.builds(lambda rid, p: EchoReply(requestId=rid, payload=p), ids, payloads),
        st.builds(lambda rid, ts: Pong(requestId=rid, ts=ts), ids, st.none() | st.integers(0, 2**53)),
    )


def wire_fields(mod: Any, msg: Outbound) -> dict[str, Any]:
    """A message as its receiver sees it: wire names, payloads decoded, absent fields absent."""
    return mod.decode(mod.encode(msg))


def test_every_server_type_is_covered():
    # A message type added to the schema without a strategy here would go untested.
    assert {t.__struct_config__.tag for t in SERVER_TYPES} == {
        "welcome",
        "message",
        "broadcast",
        "joined",
        "left",
        "subscribed",
        "unsubscribed",
        "ack",
        "error",
        "echo",
        "pong",
    }
    assert {t.__struct_config__.tag for t in BUILTIN_TYPES} == set(REQUEST_TYPES)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_client_reads_every_server_message_as_the_schema_wrote_it(encoding, data):
    mod = ENCODINGS[encoding]
    msg = data.draw(server_messages(mod))
    frame = CODECS[SERVER_ENCODING[encoding]].encode(msg)
    sent = wire_fields(mod, msg)
    for raw_payloads in (False, True):
        got = ClientCodec(encoding, raw_payloads=raw_payloads).decode(frame)
        if isinstance(msg, Delivery):
            assert type(got) is (RawMessage if raw_payloads else Message)
            assert (got.room, got.seq, got.sender) == (msg.room, msg.seq, msg.sender)
            if raw_payloads:
                assert bytes(got.payload) == bytes(msg.payload)
            else:
                assert got.payload == sent["payload"]
            assert got.received_at == 0.0  # not on the wire: the client stamps it
        elif isinstance(msg, BroadcastDelivery):
            assert type(got) is (RawBroadcast if raw_payloads else Broadcast)
            if raw_payloads:
                assert bytes(got.payload) == bytes(msg.payload)
            else:
                assert got.payload == sent["payload"]
        else:
            assert type(got) is type(msg)
            assert wire_fields(mod, got) == sent


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_flat_view_reads_every_field_the_schema_writes(encoding, data):
    mod = ENCODINGS[encoding]
    msg = data.draw(server_messages(mod))
    sent = wire_fields(mod, msg)
    flat = mod.Decoder(FlatMessage).decode(mod.encode(msg))
    seen = {name: value for name, value in msgspec.structs.asdict(flat).items() if value is not None}
    seen = {("from" if name == "from_" else name): value for name, value in seen.items()}
    if "payload" in seen:
        if len(seen["payload"]):
            seen["payload"] = mod.decode(seen["payload"])
        else:
            del seen["payload"]
    if isinstance(sent.get("data"), dict):
        # the view reads the fields of join and publish acks (ReplyData), and nothing else of data
        seen["data"] = {k: v for k, v in msgspec.structs.asdict(flat.data).items() if v is not None}
        sent["data"] = {k: v for k, v in sent["data"].items() if k in ReplyData.__struct_fields__}
    if isinstance(sent.get("ts"), int):
        sent["ts"] = float(sent["ts"])
    assert seen == sent


@pytest.mark.parametrize("encoding", ["json"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_bench_head_view_reads_type_seq_and_ack_seq(encoding, data):
    mod = ENCODINGS[encoding]
    msg = data.draw(server_messages(mod))
    head = msgspec.json.decode(mod.encode(msg), type=Head)
    sent = wire_fields(mod, msg)
    assert head.type == sent["type"]
    assert head.seq == sent.get("seq", 0)
    assert head.requestId == sent.get("requestId")
    assert head.code == sent.get("code")
    data_seq = sent["data"].get("seq", 0) if isinstance(sent.get("data"), dict) else None
    assert (head.data.seq if head.data is not None else None) == data_seq


requests = st.one_of(
    st.builds(
        lambda i, r, s, e: ("join", {"room": r, "since": s, "epoch": e}, i),
        ids,
        rooms,
        st.none() | seqs,
        st.none() | st.text(max_size=64),
    ),  # fmt: skip
    st.builds(lambda i, r: ("leave", {"room": r}, i), ids, rooms),
    st.builds(lambda i, r, p: ("publish", {"room": r, "payload": p}, i), ids, rooms, values),
    st.builds(lambda i, p: ("echo", {"payload": p}, i), ids, values),
    st.builds(lambda i, t: ("ping", {"ts": t}, i), ids, st.none() | st.floats(0, 1e13)),
    st.builds(lambda i, r: ("presence", {"room": r}, i), ids, rooms),
    st.builds(lambda i, r: ("presence_stats", {"room": r}, i), ids, rooms),
)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@settings(max_examples=150, deadline=None)
@given(request=requests)
def test_server_reads_what_the_client_and_the_load_generator_write(encoding, request):
    kind, fields, request_id = request
    mod = ENCODINGS[encoding]
    server = CODECS[SERVER_ENCODING[encoding]]
    client_bytes = ClientCodec(encoding).request(kind, request_id, **fields)
    wire = {k: v for k, v in fields.items() if v is not None or k == "payload"}
    # absent fields are left out, not sent as null; an explicit None payload is sent as null
    assert mod.decode(client_bytes) == {
        "type": kind,
        **wire,
        **({"id": request_id} if request_id is not None else {}),
    }
    load = LoadCodec("msgpack" if encoding == "msgpack" else None)
    struct_fields = {k: (Raw(mod.encode(v)) if k == "payload" else v) for k, v in fields.items()}
    load_bytes = load.encode(REQUEST_TYPES[kind](id=request_id, **struct_fields))
    for sent in (client_bytes, load_bytes):
        got = server.decode(sent)
        assert type(got) is REQUEST_TYPES[kind]
        assert got.id == request_id
        for name, value in fields.items():
            if name == "payload":
                assert mod.decode(got.payload) == value
            else:
                assert getattr(got, name) == value
        probe = mod.decode(sent, type=Probe)
        assert (probe.type, probe.id) == (kind, request_id)


def test_request_kinds_are_the_schemas_client_messages():
    assert REQUEST_TYPES == {
        "join": Join,
        "leave": Leave,
        "publish": Publish,
        "echo": Echo,
        "ping": Ping,
        "presence": PresenceRequest,
        "presence_stats": PresenceStatsRequest,
    }
    with pytest.raises(KeyError):
        ClientCodec("json").request("subscribe", room="r")
