"""permessage-deflate (RFC 7692), sans-I/O: negotiation, compressing a message once, bounded inflate.

How wsfan uses the extension, and why:

- **The server keeps no compression context between messages**: every accepted
  offer is answered with ``server_no_context_takeover`` (RFC 7692 §7.1.1.1: the
  server may choose it unasked). A message compressed without context is the same
  bytes for every subscriber, so a publication is compressed **once per encoding**
  and that one frame is written to every subscriber that negotiated the extension,
  as uWebSockets' shared compressor does. (Context takeover would cost one zlib
  compressor, ~260 KB, per connection.)
- **Clients keep none either**: the answer also carries ``client_no_context_takeover``
  (§7.1.1.2: a server may include it even when the offer did not), so each inbound
  message inflates on its own and an idle connection holds no zlib state at all.
- **Small messages go uncompressed** (below the threshold; §6 lets a sender decide
  per message): deflate cannot shrink an ack, and costs ~20 µs.
- **Inflate is bounded**: the message-size limit applies to the inflated size; a
  decompression bomb stops at ``limit + 1`` bytes of output (close 1009).

An offer the server cannot honour is declined and the next one tried (§5.1); with
none acceptable the connection goes on without the extension. zlib cannot write a
raw deflate stream with an 8-bit window (it silently uses 9), so an offer of
``server_max_window_bits=8`` is declined rather than answered with a stream the
client cannot read.
"""

from __future__ import annotations

import zlib
from typing import Final, NamedTuple

from wsfan.server.protocol import build_frame, frame_payload

EXTENSION: Final = "permessage-deflate"
#: The four octets a sender strips from each compressed message and the receiver appends (§7.2.1, §7.2.2).
TAIL: Final = b"\x00\x00\xff\xff"
MIN_WINDOW_BITS: Final = 9  # zlib's floor for raw deflate output (it turns 8 into 9)
MAX_WINDOW_BITS: Final = 15
_PARAMS: Final = frozenset(
    (
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    )
)


class Agreement(NamedTuple):
    """What was negotiated for one connection.

    ``window_bits``: the LZ77 window the server compresses with (the offer's
    ``server_max_window_bits``, else 15). ``response``: the
    ``Sec-WebSocket-Extensions`` value of the 101 response.
    """

    window_bits: int
    response: str


def _window_bits(value: str | None) -> int | None:
    """A ``*_max_window_bits`` value: 8..15 in ASCII digits, optionally quoted (§7.1.2), else None."""
    if value is None:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not (1 <= len(value) <= 2 and value.isascii() and value.isdigit()) or value[0] == "0":
        return None
    bits = int(value)
    return bits if 8 <= bits <= MAX_WINDOW_BITS else None


def _acceptable(params: dict[str, str | None]) -> int | None:
    """The window to compress with if this offer can be accepted as is, else None (decline it)."""
    for flag in ("server_no_context_takeover", "client_no_context_takeover"):
        if params.get(flag, None) is not None:  # these take no value (§7.1.1)
            return None
    if "client_max_window_bits" in params:
        value = params["client_max_window_bits"]
        if value is not None and _window_bits(value) is None:  # no value is allowed for this one
            return None
    if "server_max_window_bits" not in params:
        return MAX_WINDOW_BITS
    bits = _window_bits(params["server_max_window_bits"])
    return bits if bits is not None and bits >= MIN_WINDOW_BITS else None


def _offers(header_values: list[str]) -> list[dict[str, str | None]]:
    """Every permessage-deflate element of the header lines, as parameter maps; invalid ones left out."""
    offers = []
    for line in header_values:
        for element in line.split(","):
            name, *raw_params = (part.strip() for part in element.split(";"))
            if name.lower() != EXTENSION:
                continue
            params: dict[str, str | None] = {}
            for raw in raw_params:
                key, eq, value = raw.partition("=")
                key = key.strip().lower()
                if key not in _PARAMS or key in params:  # unknown or repeated: decline the offer (§7)
                    break
                params[key] = value.strip() if eq else None
            else:
                offers.append(params)
    return offers


def negotiate(header_values: list[str]) -> Agreement | None:
    """The first acceptable permessage-deflate offer among ``Sec-WebSocket-Extensions`` header lines.

    ``header_values``: the raw values of every such line (RFC 6455 §9.1: they combine
    into one comma-separated list, in order of preference). Returns None when nothing
    acceptable is offered; never raises on malformed input.
    """
    for params in _offers(header_values):
        bits = _acceptable(params)
        if bits is None:
            continue
        response = f"{EXTENSION}; server_no_context_takeover; client_no_context_takeover"
        if bits != MAX_WINDOW_BITS:
            response += f"; server_max_window_bits={bits}"
        return Agreement(bits, response)
    return None


def compress(data: bytes, window_bits: int = MAX_WINDOW_BITS, level: int = 6) -> bytes:
    """One message's payload as permessage-deflate data, without context (§7.2.1): deflate, sync flush, strip TAIL."""
    c = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(TAIL) else out


class TooLarge(Exception):
    """The inflated message would be larger than the size limit (the caller closes with 1009)."""


class CorruptData(Exception):
    """The payload of a compressed message is not valid permessage-deflate data; ``str()`` is the
    close reason (fixed sentences). The caller fails the connection with 1007, RFC 6455 §7.4.1's
    code for payload data not consistent with the message's type (Node's ``ws`` does the same)."""


#: After a final block (BFINAL=1), what may follow in the inflater's input: the tail the receiver
#: appended itself (a sender that ended with Z_FINISH), or the one 0x00 octet RFC 7692 §7.2.3.4
#: shows (an empty non-final stored block's header, which the tail completes) and the tail.
_AFTER_FINAL: Final = (TAIL, b"\x00" + TAIL)
INVALID: Final = "invalid permessage-deflate data"
AFTER_FINAL: Final = "data after the final deflate block"


def compressed_limit(limit: int) -> int:
    """The most bytes a compressed message may take on the wire when it inflates to at most ``limit``.

    Deflate may grow incompressible data a little (stored blocks: 5 bytes per 65535, RFC 1951
    §3.2.4), so a message at the limit can be a few bytes over it compressed; ``limit // 64 +
    1024`` covers that at any level. The real limit is :func:`inflate`'s, on the inflated size.
    """
    return limit + limit // 64 + 1024


def inflate(data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """Inflate one whole message sent without context; at most ``limit`` bytes of output.

    Raises ``TooLarge`` as soon as the output would pass ``limit`` (memory stays
    bounded by it, whatever the compression ratio) and ``CorruptData`` on invalid
    deflate data (``INVALID``) or on data after a final block (``AFTER_FINAL``): a deflate
    stream ends at its BFINAL block, so bytes of the message past it are not part of what it
    inflates to, and taking the first part as the message would drop the rest unseen. RFC 7692
    §7.2.3.4 allows a final block followed by one 0x00 octet (with the tail the receiver
    appends, an empty stored block; §7.2.2 inflates it "in the same manner"), and a sender that
    ended the stream with a final block and sent nothing after it leaves only that tail: both
    pass. Empty blocks before the end are valid deflate and cost no output: they pass too (the
    transport's limit on the compressed size, ``compressed_limit``, bounds them).
    """
    d = zlib.decompressobj(-MAX_WINDOW_BITS)
    try:
        out = d.decompress(bytes(data) + TAIL, limit + 1)
    except zlib.error:
        raise CorruptData(INVALID) from None
    if len(out) > limit or d.unconsumed_tail:
        raise TooLarge
    if d.eof and d.unused_data not in _AFTER_FINAL:
        raise CorruptData(AFTER_FINAL)
    return out


# ---------------------------------------------------------------- delivery kinds and the shared frame

#: A subscriber's *delivery kind* says which bytes fan-out hands it: the encoding's opcode
#: (``Encoding.JSON``, ``Encoding.MSGPACK``, or ``Encoding.SSE``) for plain frames, or the
#: opcode plus the negotiated window in bits 8-11 for compressed ones (JSON with a 15-bit
#: window is ``0xF01``). Subscribers of one kind share one frame per publication.
KIND_SHIFT: Final = 8


def delivery_kind(encoding: int, window_bits: int) -> int:
    """The kind of a subscriber with this encoding and negotiated window (0: no compression)."""
    return encoding | (window_bits << KIND_SHIFT) if window_bits else encoding


def is_compressed(kind: int) -> bool:
    return kind >> KIND_SHIFT >= MIN_WINDOW_BITS


class Policy:
    """Process-wide compression settings (``--compression-threshold``, ``--compression-level``).

    Set once at startup by the node; publications read them when they build a compressed frame.
    """

    __slots__ = ("threshold", "level")

    def __init__(self, threshold: int = 128, level: int = 6) -> None:
        self.threshold = threshold
        self.level = level


POLICY = Policy()


def compressed_frame(plain: bytes, kind: int) -> bytes:
    """The frame for compressed kind ``kind`` of a message whose plain frame is ``plain``.

    Below the threshold the plain frame itself is returned (RFC 7692 §6: a sender may
    leave any message uncompressed), so small deliveries stay shared with plain subscribers.
    """
    body = frame_payload(plain)
    if len(body) < POLICY.threshold:
        return plain
    return build_frame(plain[0] & 0x0F, compress(body, kind >> KIND_SHIFT, POLICY.level), rsv1=True)
