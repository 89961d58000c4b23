"""The server's codecs over the wire schema (``server/wire.py``): decode, explain, encode, frame.

One ``Codec`` per encoding decodes a frame's memoryview straight into the tagged
union of client messages (built-in and application types alike) and turns a
schema failure into the protocol's error code and the request id to answer.

Frames are built here too: server frames are never masked, so one delivery's
frame is the same bytes for every subscriber and is built exactly once.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from wsfan.server.wire import BUILTIN_TYPES, ROOM_RULE, ErrorCode, Inbound, Outbound, Probe


class Encoding(enum.IntEnum):
    """One encoding per connection; the value is the WebSocket opcode it travels in."""

    JSON = 0x1  # text frames
    MSGPACK = 0x2  # binary frames
    SSE = 0x100  # not a WebSocket opcode: Server-Sent Events subscribers get `id:`/`data:` text


WIRE_ENCODINGS: Final = (Encoding.JSON, Encoding.MSGPACK)


# ---------------------------------------------------------------- codecs


class DecodeFailure(Exception):
    """A message that is valid WebSocket but not valid protocol; carries what the error reply needs."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# Our words for a field that fails the schema: msgspec's own text is a library's (and shows our regex).
FIELD_RULES: Final = {
    "room": ROOM_RULE,
    "since": "since must be a seq (an integer from 0 to 2^63-1) or null",
    "epoch": "epoch must be a string of at most 64 characters or null",
    "id": "id must be a string or null",
    "ts": "ts must be a number or null",
    "type": "type must be a string naming a message type",
}
# The field path: a schema field name, then (application types' nested Structs and lists) up to
# 16 more steps of ``.name`` or ``[index]``; whatever follows (e.g. a dict key) is not repeated.
_AT_PATH = re.compile(
    r" - at `\$\.?([A-Za-z_][A-Za-z0-9_]{0,63}(?:\[[0-9]{1,9}\]|\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,16})[^`]*`\Z"
)
_INDEX = re.compile(r"\[[0-9]+\]")
_MISSING = re.compile(r"^Object missing required field `([A-Za-z_][A-Za-z0-9_]{0,63})`")


def describe_invalid(exc: BaseException, what: str = "JSON", rules: Mapping[str, str] = FIELD_RULES) -> str:
    """A client-facing reason for a message that msgspec refused, in this project's words.

    Only the name of the offending field is taken from msgspec's error (it names a field
    of our schema, matched by pattern); the rest of its text never reaches a client.
    ``RecursionError`` (nesting past the interpreter's limit) is a decoder failure too.
    ``rules``: the sentence for a field (``FIELD_RULES`` for WebSocket messages; the HTTP API's
    own for its bodies); an item of a list field, ``rooms[3]``, is looked up as ``rooms[]``.
    """
    if isinstance(exc, RecursionError):
        return "not parseable: nested too deeply"
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return f"not parseable as {what}"
    if text.startswith("Object contains unknown field"):  # not "in": the rest may be a client's key
        return "the object has a field that is not in the schema"
    if (m := _MISSING.match(text)) is not None:
        return f"missing field {m.group(1)!r}"
    if (m := _AT_PATH.search(text)) is not None:
        path = m.group(1)
        rule = rules.get(path) or rules.get(_INDEX.sub("[]", path))
        return rule.format(path=path) if rule else f"invalid value for {path!r}"
    return f"the message must be a {what} object (map) with a 'type' field"


class PayloadRefused(ValueError):
    """A payload that cannot be delivered in every encoding (``payload_problem``); the text says why."""


class Codec:
    """Decoder and encoder for one encoding, reused for every message of every connection.

    ``extra_types`` lets application code register its own message types (with
    their own handlers in the hub) without touching the built-in ones.
    """

    __slots__ = ("encoding", "opcode", "_decoder", "_probe", "_encoder", "_value_decoder", "known_types")

    def __init__(self, encoding: Encoding, extra_types: tuple[type[Inbound], ...] = ()) -> None:
        types = BUILTIN_TYPES + extra_types
        union = types[0] if len(types) == 1 else _union(types)
        self.encoding = encoding
        self.opcode = int(encoding)
        self.known_types = frozenset(t.__struct_config__.tag for t in types)
        if encoding is Encoding.JSON:
            self._decoder: Any = msgspec.json.Decoder(union)
            self._probe: Any = msgspec.json.Decoder(Probe)
            self._encoder: Any = msgspec.json.Encoder()
            self._value_decoder: Any = msgspec.json.Decoder()
        else:
            self._decoder = msgspec.msgpack.Decoder(union)
            self._probe = msgspec.msgpack.Decoder(Probe)
            self._encoder = msgspec.msgpack.Encoder()
            self._value_decoder = msgspec.msgpack.Decoder()

    def decode(self, data: bytes | memoryview) -> Inbound:
        """Decode one message or raise ``DecodeFailure`` with the protocol's error code.

        Any failure of the decoder is a ``DecodeFailure``: besides ``msgspec.DecodeError``,
        msgspec raises ``RecursionError`` for values nested deeper than the interpreter's
        recursion limit (even inside ignored fields), and could raise ``MemoryError``.
        """
        try:
            return self._decoder.decode(data)
        except Exception as exc:  # noqa: BLE001 - every decoder failure is the sender's fault
            raise self._explain(data, exc) from None

    def request_id(self, data: bytes | memoryview) -> str | None:
        """The id of a message that will not be handled (rate limited), to answer it all the same."""
        try:
            rid = self._probe.decode(data).id
        except Exception:  # noqa: BLE001 - not readable: answered without an id
            return None
        return rid if isinstance(rid, str) else None

    def _explain(self, data: bytes | memoryview, exc: Exception) -> DecodeFailure:
        # Cold path: a second, lenient decode finds the id to answer and tells an
        # unknown type apart from a malformed message. The reply never quotes the
        # decoder's own text: it names the field and the rule (docs/protocol-choices.md).
        try:
            probe = self._probe.decode(data)
        except Exception as probe_exc:  # noqa: BLE001 - RecursionError too
            return DecodeFailure(
                ErrorCode.INVALID_MESSAGE, describe_invalid(probe_exc, self.encoding.name), None
            )
        request_id = probe.id if isinstance(probe.id, str) else None
        if isinstance(probe.type, str) and probe.type not in self.known_types:
            shown = probe.type if len(probe.type) <= 64 else probe.type[:64] + "..."
            return DecodeFailure(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown!r}", request_id)
        return DecodeFailure(ErrorCode.INVALID_MESSAGE, describe_invalid(exc, self.encoding.name), request_id)

    def encode(self, msg: Outbound) -> bytes:
        return self._encoder.encode(msg)

    def frame(self, msg: Outbound) -> bytes:
        """Encode a message and wrap it in one complete, unmasked WebSocket frame."""
        return build_frame(self.opcode, self._encoder.encode(msg))

    def decode_payload(self, payload: bytes) -> Any:
        """Turn a raw payload into Python values (used only to transcode between encodings).

        Raises whatever the decoder raises (``msgspec.DecodeError``, ``RecursionError``);
        payloads that passed ``payload_problem`` never fail here.
        """
        return self._value_decoder.decode(payload)

    def encode_value(self, value: Any) -> bytes:
        return self._encoder.encode(value)


# ---------------------------------------------------------------- payloads in every encoding

MAX_PAYLOAD_DEPTH: Final = 64  # arrays/objects inside a payload, counting the outermost
INT_MIN: Final = -(2**63)  # the payload rule's integers: MessagePack int 64 ...
UINT_MAX: Final = 2**64 - 1  # ... and uint 64 (the client's own check uses these too)
_json_values: Final = msgspec.json.Decoder()
# One sentence for MessagePack's NaN and infinities and JSON's numbers past the float range (1e400).
NON_FINITE: Final = "payload has a NaN or infinite float (or a number past the float range)"
_msgpack_values: Final = msgspec.msgpack.Decoder()


def payload_problem(payload: bytes, encoding: int) -> str | None:
    """Why ``payload`` cannot be delivered in every encoding the protocol offers, or None.

    Every subscriber gets each publication, whatever its encoding (JSON, MessagePack,
    SSE, and later joins replaying history), so a payload must be a value both JSON and
    MessagePack carry exactly: null, booleans, integers in -2^63..2^64-1, finite floats,
    UTF-8 strings, arrays, and maps with string keys, nested at most
    ``MAX_PAYLOAD_DEPTH`` deep. MessagePack ``bin``, ``ext`` (timestamps included),
    non-string keys, NaN and infinities, JSON integers past 64 bits and JSON numbers out
    of float range are refused. One parse of the payload and a walk of the values; never
    raises. (Byte scans of JSON text to skip the parse were measured slower than it.)
    """
    try:
        value = (_json_values if encoding == Encoding.JSON else _msgpack_values).decode(payload)
    except RecursionError:
        return f"payload nested deeper than {MAX_PAYLOAD_DEPTH}"
    except msgspec.ValidationError:  # a JSON number past the float range (1e400): infinite as a float
        return NON_FINITE
    except Exception:  # noqa: BLE001 - DecodeError, invalid UTF-8
        return "payload is not a valid value"
    return _portable(value, MAX_PAYLOAD_DEPTH)


_app_packer: Final = msgspec.msgpack.Encoder()


def encode_payload(value: Any, encoding: int) -> bytes:
    """A value from application code, encoded in ``encoding`` (JSON or MessagePack), held to the
    payload rule of ``payload_problem``: ``PayloadRefused`` (a ``ValueError``) saying why, else the
    bytes. The one gate for every value the application hands the server to send: a before_publish
    hook's payload, a handler's result, ``App.publish``, ``App.broadcast``, ``Conn.send``.

    msgspec writes NaN and infinities as JSON ``null`` and ``2**70`` not at all, so a value is not
    judged by its JSON: it is encoded as MessagePack first, which keeps every value as it is
    (a float stays a float, a datetime an extension, a key an integer), and that is checked; a JSON
    connection then gets the value's JSON. Any encodable Python value goes in (Structs, dataclasses,
    tuples...); what neither encoding carries is refused, never coerced.
    """
    try:
        packed = _app_packer.encode(value)
    except OverflowError:
        raise PayloadRefused("payload has an integer outside -2^63..2^64-1") from None
    except RecursionError:
        raise PayloadRefused(f"payload nested deeper than {MAX_PAYLOAD_DEPTH}") from None
    except Exception as exc:  # noqa: BLE001 - TypeError, msgspec.EncodeError: msgspec's text is not ours
        raise PayloadRefused(
            f"payload has a value neither JSON nor MessagePack carries ({_kind(exc)})"
        ) from None
    problem = payload_problem(packed, Encoding.MSGPACK)
    if problem is not None:
        raise PayloadRefused(problem)
    if encoding == Encoding.MSGPACK:
        return packed
    return CODECS[Encoding.JSON].encode_value(value)


def _kind(exc: Exception) -> str:
    """The type msgspec could not encode, named from its message (``Encoding objects of type X is
    unsupported``), or the exception's class."""
    text = str(exc)
    if text.startswith("Encoding objects of type ") and text.endswith(" is unsupported"):
        return "type " + text[len("Encoding objects of type ") : -len(" is unsupported")][:64]
    return type(exc).__name__


def _portable(value: Any, depth: int) -> str | None:
    t = type(value)
    if t is str or t is bool or value is None:
        return None
    if t is int:
        return None if INT_MIN <= value <= UINT_MAX else "payload has an integer outside -2^63..2^64-1"
    if t is float:
        return None if math.isfinite(value) else NON_FINITE
    if depth == 0:
        return f"payload nested deeper than {MAX_PAYLOAD_DEPTH}"
    # Strings and 64-bit integers, the common leaves, are checked inline: no call for them.
    if t is list:
        for item in value:
            ti = type(item)
            if ti is str or (ti is int and INT_MIN <= item <= UINT_MAX):
                continue
            if (why := _portable(item, depth - 1)) is not None:
                return why
        return None
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                return "payload has a map key that is not a string"
            ti = type(item)
            if ti is str or (ti is int and INT_MIN <= item <= UINT_MAX):
                continue
            if (why := _portable(item, depth - 1)) is not None:
                return why
        return None
    if t is bytes:
        return "payload has binary data (MessagePack bin), which JSON cannot carry"
    return "payload has a MessagePack extension type, which JSON cannot carry"


def _union(types: tuple[type[Inbound], ...]) -> Any:
    union: Any = types[0]
    for t in types[1:]:
        union = union | t
    return union


_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


RSV1: Final = 0x40  # first-byte bit of a frame whose message is compressed (RFC 7692 §6)


def build_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """One FIN frame, unmasked (RFC 6455 5.1: servers never mask), header + payload in one bytes object.

    ``rsv1`` marks a permessage-deflate message (RFC 7692 §6); the payload is then already compressed.
    """
    n = len(payload)
    b0 = 0x80 | opcode | (RSV1 if rsv1 else 0)
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return _H16.pack(b0, 126, n) + payload
    return _H64.pack(b0, 127, n) + payload


def frame_payload(frame: bytes) -> bytes:
    """The payload of an unmasked frame built by ``build_frame`` (its header stripped)."""
    n = frame[1]
    return frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]


CODECS: Final = {Encoding.JSON: Codec(Encoding.JSON), Encoding.MSGPACK: Codec(Encoding.MSGPACK)}
