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

import math
from collections.abc import Iterable
from typing import Any, Final, Literal

import msgspec
from msgspec import Raw
from picows import WSMsgType

from wsfan.client.errors import InvalidPayload
from wsfan.server import wire
from wsfan.server.protocol import INT_MIN, MAX_PAYLOAD_DEPTH, UINT_MAX
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


def payload_problem(value: Any) -> str | None:
    """Why ``value`` would not reach every subscriber exactly as it is, or None (``InvalidPayload``).

    The protocol's payload rule (server.protocol.payload_problem: null, booleans, integers in
    -2^63..2^64-1, finite floats, strings, arrays, maps with string keys, at most
    ``MAX_PAYLOAD_DEPTH`` deep) on Python values, whose types must be exactly ``None``,
    ``bool``, ``int``, ``float``, ``str``, ``list``, ``dict``: those are what a subscriber
    decodes, in either encoding. Strings with a lone surrogate are refused by the encoder
    (``Codec.payload``). Never raises.
    """
    return _problem(value, MAX_PAYLOAD_DEPTH, "payload")


def _problem(value: Any, depth: int, where: str) -> str | None:
    t = type(value)
    if t is str or t is bool or value is None:
        return None
    if t is int:
        return None if INT_MIN <= value <= UINT_MAX else f"{where} is an integer outside -2^63..2^64-1"
    if t is float:
        return None if math.isfinite(value) else f"{where} is a NaN or infinite float"
    if t is list or t is dict:
        if depth == 0:
            return f"{where} is nested deeper than {MAX_PAYLOAD_DEPTH}"
        if t is list:
            for i, item in enumerate(value):
                ti = type(item)
                if ti is str or (ti is int and INT_MIN <= item <= UINT_MAX):
                    continue
                if (why := _problem(item, depth - 1, f"{where}[{i}]")) is not None:
                    return why
            return None
        for key, item in value.items():
            if type(key) is not str:
                return f"{where} has a map key that is not a string ({type(key).__name__}), which JSON cannot carry"
            ti = type(item)
            if ti is str or (ti is int and INT_MIN <= item <= UINT_MAX):
                continue
            if (why := _problem(item, depth - 1, f"{where}[{key[:40]!r}]")) is not None:
                return why
        return None
    if t is bytes or t is bytearray or t is memoryview:
        return f"{where} is binary data (MessagePack bin), which JSON cannot carry"
    if t is tuple:
        return f"{where} is a tuple, which arrives as an array (a list): send a list"
    return (
        f"{where} is a {t.__name__}, not a JSON value (None, bool, int, float, str, list, dict):"
        " convert it first (msgspec.to_builtins)"
    )


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

        A ``payload`` that is not already ``Raw`` is checked and encoded first (``payload``), so
        publishing or echoing ``None`` still sends ``"payload": null``. Raises ``InvalidPayload``
        for a payload the protocol refuses, ``KeyError`` for an unknown kind and ``TypeError``
        for a field the kind does not have.
        """
        if "payload" in fields:
            fields["payload"] = self.payload(fields["payload"])
        return self._encode(REQUEST_TYPES[kind](id=request_id, **fields))

    def payload(self, value: Any) -> Raw:
        """``value`` encoded once, after the payload rule (``payload_problem``); a ``Raw`` is taken as is.

        Raises ``InvalidPayload`` for a value the rule refuses, the same in both encodings
        (a pre-encoded ``Raw`` is the caller's bytes: the server judges those).
        """
        if isinstance(value, Raw):
            return value
        problem = payload_problem(value)
        if problem is not None:
            raise InvalidPayload(problem)
        try:
            return Raw(self._encode(value))
        except UnicodeEncodeError:
            raise InvalidPayload(
                "payload has a string with a lone surrogate, which is not UTF-8 text"
            ) from None

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
        """Pre-encode a payload once and publish it many times without paying for encoding again.

        The payload rule applies (``InvalidPayload``), as for ``payload``."""
        return self.payload(value)

    def decode_payload(self, payload: Any) -> Any:
        """Decode a ``Raw`` payload (from ``raw_payloads=True``); other values are returned unchanged."""
        if isinstance(payload, Raw):
            return self._decode_value(payload)
        return payload
