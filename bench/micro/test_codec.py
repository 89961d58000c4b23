"""Envelope decode (JSON and MessagePack) and delivery encode + frame build: the per-message hot paths.

Each benchmark times one call on realistic messages (100-byte payload, like the
load tests). ``make bench-micro`` stores every run under results/local/micro/ and
compares it with the previous one, so a regression shows as a ratio there.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from wsfan.server.broker.publication import Publication
from wsfan.server.protocol import CODECS, Encoding, build_frame, payload_problem
from wsfan.server.wire import Join, Publish

PAYLOAD = {"text": "x" * 88}  # 100 bytes as JSON, the load generators' payload size
PUBLISH = {"type": "publish", "id": "17", "room": "bench", "payload": PAYLOAD}
JOIN = {"type": "join", "id": "j1", "room": "bench", "since": 41}

ENCODED = {
    Encoding.JSON: {"publish": msgspec.json.encode(PUBLISH), "join": msgspec.json.encode(JOIN)},
    Encoding.MSGPACK: {"publish": msgspec.msgpack.encode(PUBLISH), "join": msgspec.msgpack.encode(JOIN)},
}


@pytest.mark.parametrize("encoding", [Encoding.JSON, Encoding.MSGPACK], ids=["json", "msgpack"])
def test_decode_publish(benchmark: Any, encoding: Encoding) -> None:
    """The message every publish costs: typed Struct with the payload kept as Raw (no re-encode)."""
    codec, data = CODECS[encoding], memoryview(ENCODED[encoding]["publish"])
    msg = benchmark(codec.decode, data)
    assert type(msg) is Publish and msg.room == "bench"


@pytest.mark.parametrize("encoding", [Encoding.JSON, Encoding.MSGPACK], ids=["json", "msgpack"])
def test_decode_join(benchmark: Any, encoding: Encoding) -> None:
    codec, data = CODECS[encoding], memoryview(ENCODED[encoding]["join"])
    msg = benchmark(codec.decode, data)
    assert type(msg) is Join and msg.since == 41


@pytest.mark.parametrize("encoding", [Encoding.JSON, Encoding.MSGPACK], ids=["json", "msgpack"])
def test_delivery_encode_and_frame(benchmark: Any, encoding: Encoding) -> None:
    """Once per publish and encoding in use: the Delivery struct encoded and wrapped in one frame."""
    payload = msgspec.json.encode(PAYLOAD) if encoding is Encoding.JSON else msgspec.msgpack.encode(PAYLOAD)

    def build() -> bytes:
        return Publication("bench", 12345, "user-1", payload, encoding, "n-1").frame(encoding)

    frame = benchmark(build)
    assert frame[0] == 0x80 | int(encoding) and payload in frame


CHAT = {
    "text": "hello, this is a chat message",
    "user": "alice",
    "n": 12345,
    "ts": 1764480000123,
    "tags": ["a"],
}


@pytest.mark.parametrize("encoding", [Encoding.JSON, Encoding.MSGPACK], ids=["json", "msgpack"])
@pytest.mark.parametrize("value", [PAYLOAD, CHAT], ids=["text100", "chat"])
def test_payload_check(benchmark: Any, encoding: Encoding, value: Any) -> None:
    """Once per publish, any encoding mix: is the payload deliverable in every encoding (one parse + walk)."""
    payload = msgspec.json.encode(value) if encoding is Encoding.JSON else msgspec.msgpack.encode(value)
    assert benchmark(payload_problem, payload, encoding) is None


@pytest.mark.parametrize("size", [100, 1000, 70000], ids=["100B", "1KB", "70KB"])
def test_build_frame(benchmark: Any, size: int) -> None:
    """Header + payload in one bytes object, for each of the three header lengths."""
    data = b"x" * size
    frame = benchmark(build_frame, 0x1, data)
    assert frame.endswith(data)
