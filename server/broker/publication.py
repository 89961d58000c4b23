"""A published message, and a presence event, as they travel between brokers, history and the hub."""

from __future__ import annotations

from typing import NamedTuple

from msgspec import Raw

from wsfan.server.deflate import compressed_frame
from wsfan.server.protocol import CODECS, Encoding, build_frame, frame_payload
from wsfan.server.wire import BroadcastDelivery, Delivery, JoinedEvent, LeftEvent


class Publication:
    """One message of one room, with its delivery frames built lazily, once per encoding.

    The frame for an encoding is built the first time any subscriber of that
    encoding needs it and then shared by every subscriber and by history replay,
    so a publish costs one encode + one frame build per encoding in use, not per
    subscriber. A payload is transcoded only when it crosses encodings (a JSON
    publisher and a MessagePack subscriber); same-encoding payloads are copied
    byte for byte.
    """

    __slots__ = (
        "room",
        "seq",
        "sender",
        "payload",
        "encoding",
        "origin",
        "published_at",
        "epoch",
        "_json",
        "_msgpack",
        "_sse",
        "_compressed",
    )

    def __init__(
        self,
        room: str,
        seq: int,
        sender: str,
        payload: bytes,
        encoding: int,
        origin: str = "",
        published_at: float = 0.0,
    ) -> None:
        self.room = room
        self.seq = seq
        self.sender = sender
        self.payload = payload
        self.encoding = encoding
        self.origin = origin
        self.published_at = published_at
        # The room's epoch (its incarnation), for an SSE event's ``id:``; set by the hub before an
        # SSE frame is built (``Hub.deliver``, ``Hub._replay``), "" while unknown.
        self.epoch = ""
        self._json: bytes | None = None
        self._msgpack: bytes | None = None
        self._sse: bytes | None = None
        self._compressed: dict[int, bytes] | None = None

    def frame(self, encoding: int) -> bytes:
        """The delivery frame for a subscriber kind: an encoding, or a compressed kind (server/deflate.py)."""
        if encoding == Encoding.JSON:
            f = self._json
            if f is None:
                f = self._json = self._build(Encoding.JSON)
            return f
        if encoding == Encoding.SSE:
            f = self._sse
            if f is None:
                f = self._sse = sse_delivery(self.epoch, self.seq, self.json())
            return f
        if encoding == Encoding.MSGPACK:
            f = self._msgpack
            if f is None:
                f = self._msgpack = self._build(Encoding.MSGPACK)
            return f
        return self._compressed_frame(encoding)

    def _compressed_frame(self, kind: int) -> bytes:
        # Compressed once per kind (encoding + window) and shared, like the plain frames.
        cache = self._compressed
        if cache is None:
            cache = self._compressed = {}
        f = cache.get(kind)
        if f is None:
            f = cache[kind] = compressed_frame(self.frame(kind & 0xFF), kind)
        return f

    def payload_in(self, encoding: int) -> bytes:
        if encoding == self.encoding:
            return self.payload
        source, target = CODECS[Encoding(self.encoding)], CODECS[Encoding(encoding)]
        return target.encode_value(source.decode_payload(self.payload))

    def _build(self, encoding: Encoding) -> bytes:
        codec = CODECS[encoding]
        msg = Delivery(
            room=self.room, seq=self.seq, sender=self.sender, payload=Raw(self.payload_in(encoding))
        )
        return build_frame(codec.opcode, codec.encode(msg))

    def json(self) -> bytes:
        """The delivery as JSON text without a frame header (SSE and logs)."""
        return frame_payload(self.frame(Encoding.JSON))


class BroadcastPush:
    """One room-less push to every connection of this node, its frames built lazily, once per kind.

    The same sharing as ``Publication``: the first connection of a delivery kind (an encoding,
    or a compressed kind, ``server/deflate.py``) builds the frame, every other one of that kind
    gets the same bytes. ``payload`` is JSON or MessagePack as ``encoding`` says; it is copied
    byte for byte into frames of that encoding and transcoded once for the other. No seq: a
    broadcast is not numbered and not kept for replay.
    """

    __slots__ = ("payload", "encoding", "_frames")

    def __init__(self, payload: bytes, encoding: int = Encoding.JSON) -> None:
        self.payload = payload
        self.encoding = encoding
        self._frames: dict[int, bytes] = {}

    def frame(self, kind: int) -> bytes:
        """The ``{"type":"broadcast","payload"}`` frame for a connection of delivery ``kind``."""
        f = self._frames.get(kind)
        if f is None:
            plain = kind & 0xFF
            if kind == Encoding.SSE:
                f = sse_event(b"broadcast", frame_payload(self.frame(Encoding.JSON)))
            elif plain != kind:
                f = compressed_frame(self.frame(plain), kind)
            else:
                codec = CODECS[Encoding(plain)]
                payload = self.payload
                if plain != self.encoding:
                    payload = codec.encode_value(CODECS[Encoding(self.encoding)].decode_payload(payload))
                f = build_frame(codec.opcode, codec.encode(BroadcastDelivery(payload=Raw(payload))))
            self._frames[kind] = f
        return f


def sse_data(text: bytes) -> bytes:
    """JSON text as the value of SSE ``data:`` lines (WHATWG HTML 9.2.6).

    A JSON publisher's payload is passed through byte for byte, and JSON allows CR and
    LF between tokens; in an event stream either one ends the field, so each line of the
    text gets its own ``data:`` field. The browser joins them with LF: the same JSON.
    """
    if b"\n" in text or b"\r" in text:
        return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    return text


def sse_delivery(epoch: str, seq: int, text: bytes) -> bytes:
    """A delivery as an SSE event: ``id: <epoch>:<seq>`` (``id: <seq>`` without an epoch) and the
    delivery JSON ``text`` as ``data:`` (PROTOCOL.md, SSE).

    The id names the room's incarnation as well as the seq, so that an ``EventSource`` that
    reconnects with it (``Last-Event-ID``) after the room was lost and restarted is told so
    (``event: gap``), as a WebSocket join with ``since`` and ``epoch`` is (``recovered: false``),
    instead of being handed the new numbering's messages past that seq as a continuation.
    """
    if epoch:
        return b"id: %s:%d\ndata: %s\n\n" % (epoch.encode(), seq, sse_data(text))
    return b"id: %d\ndata: %s\n\n" % (seq, sse_data(text))


def sse_event(name: bytes, text: bytes) -> bytes:
    """An SSE event named ``name`` whose data is the JSON ``text``, with no ``id:`` field.

    For the pushes that are not a room's numbered deliveries (``broadcast``, ``joined``,
    ``left``, ``unsubscribed``): without an ``id:`` line the browser's last event ID stays the
    room's seq, which it sends back as ``Last-Event-ID`` on a reconnect (WHATWG HTML 9.2.6:
    only an ``id`` field changes it). The name keeps them out of ``onmessage`` and the data
    is the WebSocket push's JSON, ``type`` included (PROTOCOL.md, SSE).
    """
    return b"event: %s\ndata: %s\n\n" % (name, sse_data(text))


class PresenceEntry(NamedTuple):
    """One connection in a room's presence: its conn id, user, and when it joined (unix ms)."""

    conn: str
    user: str
    joined_at: int


class PresenceEvent:
    """A ``joined``/``left`` event of one room, with its frames built lazily, once per encoding.

    Fanned out like a publication (one frame per encoding shared by every subscriber) but
    never numbered: it has no seq and is not kept in history.
    """

    __slots__ = ("room", "joined", "user", "conn", "_json", "_msgpack", "_sse")

    def __init__(self, room: str, joined: bool, user: str, conn: str) -> None:
        self.room = room
        self.joined = joined
        self.user = user
        self.conn = conn
        self._json: bytes | None = None
        self._msgpack: bytes | None = None
        self._sse: bytes | None = None

    def frame(self, encoding: int) -> bytes:
        """The event's frame for an encoding: JSON, MessagePack, or an SSE ``event: joined|left``."""
        if encoding == Encoding.JSON:
            f = self._json
            if f is None:
                f = self._json = self._build(Encoding.JSON)
            return f
        if encoding == Encoding.SSE:
            f = self._sse
            if f is None:
                name = b"joined" if self.joined else b"left"
                f = self._sse = sse_event(name, frame_payload(self.frame(Encoding.JSON)))
            return f
        f = self._msgpack
        if f is None:
            f = self._msgpack = self._build(Encoding.MSGPACK)
        return f

    def _build(self, encoding: Encoding) -> bytes:
        codec = CODECS[encoding]
        kind = JoinedEvent if self.joined else LeftEvent
        return build_frame(codec.opcode, codec.encode(kind(room=self.room, user=self.user, conn=self.conn)))
