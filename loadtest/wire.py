"""The load generator's codec: the schema's flat view of server messages, and its own payload.

Inbound frames decode into ``FlatMessage`` (``server/wire.py``: every server
message as one struct, tested against the schema): decoding into a struct is
several times faster than into dicts, and the delivery ``payload`` stays a
``msgspec.Raw`` so that only the few fields we need (the send timestamp) are
ever parsed. One :class:`Codec` per connection, JSON or MessagePack depending
on the negotiated subprotocol. Imports only msgspec and the standard library
(the gevent world of Locust).
"""

from __future__ import annotations

from typing import Any

import msgspec

from wsfan.server.wire import MSGPACK_SUBPROTOCOL, FlatMessage, Inbound


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
        self.binary = subprotocol == MSGPACK_SUBPROTOCOL
        if self.binary:
            self._enc: Any = msgspec.msgpack.Encoder()
            self._dec: Any = msgspec.msgpack.Decoder(FlatMessage)
            self._pdec: Any = msgspec.msgpack.Decoder(Payload)
        else:
            self._enc = msgspec.json.Encoder()
            self._dec = msgspec.json.Decoder(FlatMessage)
            self._pdec = msgspec.json.Decoder(Payload)
        self._penc = self._enc

    def encode(self, msg: Inbound) -> bytes:
        """Encode one client message of the schema (absent fields are left out)."""
        return self._enc.encode(msg)

    def encode_payload(self, payload: Payload) -> msgspec.Raw:
        """Encode a payload once, to embed it in an envelope without re-encoding it."""
        return msgspec.Raw(self._penc.encode(payload))

    def decode(self, data: bytes) -> FlatMessage:
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
