"""The client's view of the wire format (PROTOCOL.md v1), for JSON and MessagePack alike.

Server messages decode through one reusable ``msgspec`` decoder into a tagged
union on ``type``, straight from the frame's buffer, never through a dict. The
delivery struct *is* the public ``Message`` the application receives, so a
delivery costs one allocation on the hot path.

The client deliberately does not import ``server.protocol``: it must work
against any server speaking the protocol, and it is lenient where the server is
strict (unknown fields are ignored, optional fields default).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType, field
from picows import WSMsgType

Encoding = Literal["json", "msgpack"]
MSGPACK_SUBPROTOCOL: Final = "msgpack"


class ServerMessage(Struct, tag_field="type"):
    """Base of everything the server sends; the ``type`` field selects the subclass."""


class Welcome(ServerMessage, tag="welcome"):
    """Sent once when the connection opens; identifies the connection for logs and metrics."""

    conn: str
    user: str
    heartbeat: int = 0
    node: str = ""


class Message(ServerMessage, tag="message", kw_only=True):
    """One delivery of a room, as handed to the application.

    ``received_at`` is ``time.perf_counter()`` taken when the frame was read,
    before decoding, so benchmarks can measure publish-to-delivery latency
    without counting the time the message waited in the client's buffer.
    ``payload`` is the decoded value, or ``msgspec.Raw`` bytes when the client was
    created with ``raw_payloads=True``.
    """

    room: str
    seq: int
    sender: str = field(name="from")
    payload: Any = None
    received_at: float = 0.0


class RawMessage(Message, tag="message", kw_only=True):
    """A ``Message`` whose payload was left encoded (``raw_payloads=True``): decode only what you need."""

    payload: Raw = Raw(b"")


class Ack(ServerMessage, tag="ack", kw_only=True):
    requestId: str | None = None  # noqa: N815 - wire name
    success: bool = True
    data: Any = None


class ErrorReply(ServerMessage, tag="error", kw_only=True):
    requestId: str | None = None  # noqa: N815
    success: bool = False
    code: str = "INTERNAL"
    message: str = ""


class EchoReply(ServerMessage, tag="echo", kw_only=True):
    requestId: str | None = None  # noqa: N815
    payload: Any = None


class Pong(ServerMessage, tag="pong", kw_only=True):
    requestId: str | None = None  # noqa: N815
    ts: float | None = None


class Joined(ServerMessage, tag="joined", kw_only=True, frozen=True):
    """Another connection joined a room (namespaces with ``join_leave``); reported through ``on_event``."""

    room: str
    user: str
    conn: str


class Left(ServerMessage, tag="left", kw_only=True, frozen=True):
    """Another connection left a room (leave, disconnect, or its node died); reported through ``on_event``."""

    room: str
    user: str
    conn: str


class Request(Struct, omit_defaults=True, kw_only=True):
    """Every client -> server message. Absent fields are omitted from the wire, not sent as null.

    ``payload`` defaults to ``UNSET`` rather than ``None`` so that publishing or
    echoing an explicit ``None`` still sends ``"payload": null``.
    """

    type: str
    id: str | None = None
    room: str | None = None
    payload: Any | UnsetType = UNSET
    since: int | None = None
    # Extension to v1 (docs/protocol-choices.md, "Epochs"): the room's epoch from an earlier
    # join ack, sent back with ``since`` so that a room that was lost and renumbered is detected.
    epoch: str | None = None
    ts: float | None = None


_JSON_DECODERS: dict[bool, Any] = {}
_MSGPACK_DECODERS: dict[bool, Any] = {}


def _union(raw_payloads: bool) -> Any:
    delivery = RawMessage if raw_payloads else Message
    return Welcome | delivery | Ack | ErrorReply | EchoReply | Pong | Joined | Left


class Codec:
    """Encoder, decoder and frame opcode for one connection's encoding, built once and reused."""

    __slots__ = ("encoding", "opcode", "raw_payloads", "_encode", "_decode", "_decode_value")

    def __init__(self, encoding: Encoding = "json", raw_payloads: bool = False) -> None:
        self.encoding: Encoding = encoding
        self.raw_payloads = raw_payloads
        if encoding == "json":
            cache, mod, self.opcode = _JSON_DECODERS, msgspec.json, WSMsgType.TEXT
        elif encoding == "msgpack":
            cache, mod, self.opcode = _MSGPACK_DECODERS, msgspec.msgpack, WSMsgType.BINARY
        else:
            raise ValueError(f"unknown encoding {encoding!r}: use 'json' or 'msgpack'")
        decoder = cache.get(raw_payloads)
        if decoder is None:
            decoder = cache[raw_payloads] = mod.Decoder(_union(raw_payloads))
        self._encode = mod.Encoder().encode
        self._decode = decoder.decode
        self._decode_value = mod.Decoder().decode

    def encode(self, request: Request) -> bytes:
        return self._encode(request)

    def decode(self, data: bytes | memoryview) -> ServerMessage:
        """Decode one server message.

        Raises ``msgspec.DecodeError`` (incl. ValidationError) on bad input, and
        ``RecursionError`` for values nested deeper than the interpreter's recursion limit.
        """
        return self._decode(data)

    def encode_payload(self, value: Any) -> Raw:
        """Pre-encode a payload once and publish it many times without paying for encoding again."""
        return Raw(self._encode(value))

    def decode_payload(self, payload: Any) -> Any:
        """Decode a ``Raw`` payload (from ``raw_payloads=True``); other values are returned unchanged."""
        if isinstance(payload, Raw):
            return self._decode_value(payload)
        return payload
