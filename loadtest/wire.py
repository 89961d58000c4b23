"""Wire protocol v1 (``/work/shared/PROTOCOL.md``) as the load generator sees it.

Inbound frames are decoded with typed msgspec structs: decoding into a struct
is several times faster than into dicts, and the delivery ``payload`` stays a
``msgspec.Raw`` so that only the few fields we need (the send timestamp) are
ever parsed. One :class:`Codec` per connection, JSON or MessagePack depending
on the negotiated subprotocol.
"""

from __future__ import annotations

from typing import Any

import msgspec

MSGPACK = "msgpack"


class AckData(msgspec.Struct):
    """``data`` of an ack; only the fields of the join/publish acks matter here."""

    room: str | None = None
    seq: int | None = None
    recovered: bool | None = None
    epoch: str | None = None  # extension (docs/protocol-choices.md): the room's numbering


class Inbound(msgspec.Struct):
    """Every server -> client message type flattened into one struct (unknown fields are ignored)."""

    type: str
    requestId: str | None = None  # noqa: N815 - wire name
    success: bool | None = None
    code: str | None = None
    message: str | None = None
    data: AckData | None = None
    room: str | None = None
    seq: int | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    payload: msgspec.Raw = msgspec.Raw()
    conn: str | None = None
    user: str | None = None
    heartbeat: int | None = None
    node: str | None = None
    ts: float | None = None
    id: str | None = None  # the raw /echo endpoint echoes our own envelope, which carries "id"


class Payload(msgspec.Struct, omit_defaults=True):
    """What load-generator users publish: a send timestamp (epoch seconds) plus padding.

    ``ts`` is wall-clock time so that latency can be computed by another
    process or machine (see README: clocks must be synchronised for that).
    """

    ts: float = 0.0
    pub: str = ""
    n: int = 0
    pad: str = ""


class Codec:
    """Encoder/decoder pair for one connection's encoding."""

    __slots__ = ("binary", "_enc", "_dec", "_pdec", "_penc")

    def __init__(self, subprotocol: str | None) -> None:
        self.binary = subprotocol == MSGPACK
        if self.binary:
            self._enc: Any = msgspec.msgpack.Encoder()
            self._dec: Any = msgspec.msgpack.Decoder(Inbound)
            self._pdec: Any = msgspec.msgpack.Decoder(Payload)
        else:
            self._enc = msgspec.json.Encoder()
            self._dec = msgspec.json.Decoder(Inbound)
            self._pdec = msgspec.json.Decoder(Payload)
        self._penc = self._enc

    def encode(self, msg: dict[str, Any]) -> bytes:
        """Encode a client envelope (a dict; only a handful are built per second per user)."""
        return self._enc.encode(msg)

    def encode_payload(self, payload: Payload) -> msgspec.Raw:
        """Encode a payload once, to embed it in an envelope without re-encoding it."""
        return msgspec.Raw(self._penc.encode(payload))

    def decode(self, data: bytes) -> Inbound:
        """Decode one server message (raises ``msgspec.DecodeError`` / ``ValidationError``)."""
        return self._dec.decode(data)

    def decode_payload(self, raw: msgspec.Raw) -> Payload | None:
        """Return our payload struct, or None if the payload is not one of ours (no timestamp)."""
        if not len(raw):
            return None
        try:
            p = self._pdec.decode(raw)
        except Exception:  # noqa: BLE001 - not one of ours, however it fails (RecursionError too)
            return None
        return p if p.ts else None


def make_payload_pad(codec: Codec, size: int, pub: str) -> str:
    """Padding so that an encoded payload is about ``size`` bytes (never less than the bare fields)."""
    import time

    bare = len(codec.encode_payload(Payload(ts=time.time(), pub=pub, n=1_000_000)))
    return "x" * max(0, size - bare)
