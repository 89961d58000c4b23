"""The client's codec over the wire schema (``server/wire.py``), for JSON and MessagePack alike.

Server messages decode through one reusable ``msgspec`` decoder into the tagged
union of server messages, straight from the frame's buffer, never through a
dict. Deliveries decode into the schema's client view ``Message`` (payload
decoded in the same pass), which *is* the object the application receives, so a
delivery costs one allocation on the hot path. Requests are the schema's own
client messages (``Join``, ``Publish``...); their payload is encoded once here
unless the caller already holds a ``Raw``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Literal

import msgspec
from msgspec import Raw
from picows import WSMsgType

from wsfan.server import wire
from wsfan.server.wire import (
    BUILTIN_TYPES,
    Ack,
    Broadcast,
    EchoReply,
    Error,
    Inbound,
    JoinedEvent,
    LeftEvent,
    Message,
    Outbound,
    Pong,
    RawBroadcast,
    RawMessage,
    Subscribed,
    Unsubscribed,
    Welcome,
)

Encoding = Literal["json", "msgpack"]

REQUEST_TYPES: Final[dict[str, type[Inbound]]] = {t.__struct_config__.tag: t for t in BUILTIN_TYPES}  # type: ignore[misc]

_JSON_DECODERS: dict[bool, Any] = {}
_MSGPACK_DECODERS: dict[bool, Any] = {}


def _union(raw_payloads: bool) -> Any:
    delivery = RawMessage if raw_payloads else Message
    broadcast = RawBroadcast if raw_payloads else Broadcast
    return (
        Welcome
        | delivery
        | broadcast
        | JoinedEvent
        | LeftEvent
        | Subscribed
        | Unsubscribed
        | Ack
        | Error
        | EchoReply
        | Pong
    )


# The ``type`` of every message the protocol defines from server to client (PROTOCOL.md): the
# server's own list, so a type added there is known here.
SERVER_TYPES: Final = frozenset(t.__struct_config__.tag for t in wire.SERVER_TYPES)  # type: ignore[misc]


class _Head(msgspec.Struct):
    type: Any = None


class NotAPush(ValueError):
    """A server message that is not an application push: one of the protocol's types that failed its schema."""


class Codec:
    """Encoder, decoder and frame opcode for one connection's encoding, built once and reused."""

    __slots__ = (
        "encoding",
        "opcode",
        "raw_payloads",
        "_encode",
        "_decode",
        "_decode_value",
        "_decode_head",
        "_push_decoders",
    )

    def __init__(
        self, encoding: Encoding = "json", raw_payloads: bool = False, push_types: Iterable[type] = ()
    ) -> None:
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
        self._decode_head = mod.Decoder(_Head).decode
        self._push_decoders: dict[str, Any] = {}
        for t in push_types:
            tag = getattr(getattr(t, "__struct_config__", None), "tag", None)
            if not isinstance(tag, str):
                raise TypeError(
                    f"push type {t!r} must be a msgspec Struct with a tag (its 'type' on the wire)"
                )
            if tag in SERVER_TYPES:
                raise ValueError(f"push type {t.__name__}: {tag!r} is a message type of the protocol")
            self._push_decoders[tag] = mod.Decoder(t).decode

    def request(self, kind: str, request_id: str | None = None, **fields: Any) -> bytes:
        """Encode one client message of a built-in ``kind`` (``join``, ``publish``...); absent fields are omitted.

        A ``payload`` that is not already ``Raw`` is encoded first, so publishing or
        echoing ``None`` still sends ``"payload": null``. Raises ``KeyError`` for an
        unknown kind and ``TypeError`` for a field the kind does not have.
        """
        if "payload" in fields:
            payload = fields["payload"]
            if not isinstance(payload, Raw):
                fields["payload"] = Raw(self._encode(payload))
        return self._encode(REQUEST_TYPES[kind](id=request_id, **fields))

    def encode(self, message: Inbound) -> bytes:
        return self._encode(message)

    def decode(self, data: bytes | memoryview) -> Outbound:
        """Decode one server message.

        Raises ``msgspec.DecodeError`` (incl. ValidationError) on bad input, and
        ``RecursionError`` for values nested deeper than the interpreter's recursion limit.
        """
        return self._decode(data)

    def decode_push(self, data: bytes | memoryview) -> Any:
        """A server message of a type the protocol does not define: an application's push (``conn.send``).

        Decoded into its push type when one was declared for its ``type`` (``push_types``),
        else into a dict. Raises ``NotAPush`` for a protocol type (it failed ``decode``) or a
        message without a string ``type``, and ``msgspec.DecodeError`` for bad input.
        """
        kind = self._decode_head(data).type
        if not isinstance(kind, str) or kind in SERVER_TYPES:
            raise NotAPush(kind)
        decode = self._push_decoders.get(kind)
        return decode(data) if decode is not None else self._decode_value(data)

    def encode_payload(self, value: Any) -> Raw:
        """Pre-encode a payload once and publish it many times without paying for encoding again."""
        return Raw(self._encode(value))

    def decode_payload(self, payload: Any) -> Any:
        """Decode a ``Raw`` payload (from ``raw_payloads=True``); other values are returned unchanged."""
        if isinstance(payload, Raw):
            return self._decode_value(payload)
        return payload
