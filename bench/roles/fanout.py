"""Role ``fanout_lat``: subscribers in rooms of several sizes, one publisher, throughput and latency phases.

Plain picows, not ``client/``: subscribers receive up to a million deliveries a
second in total, and every microsecond the load generator spends per delivery
is a microsecond it cannot keep up; the client's decode into a ``Message``, dedupe
and callback would make the load generator the bottleneck of every figure.

Subscriber ``g`` (global index over all load-generator processes) joins every
room whose size is greater than ``g``, so one set of connections serves rooms of
10, 100, 1,000 and 10,000 members, measured one after another. Only one room
receives publishes at a time, so a subscriber tracks one sequence: the harness
tells each phase's first seq (``base``) and every subscriber of the room checks
that deliveries follow ``base + 1, base + 2, ...`` without a gap.

Phases: ``arm`` (every process resets its subscribers of the phase's room and
answers ``armed``), then ``closed`` or ``open`` to the publisher's process
(answered by ``published``), then ``expect`` (every process answers ``done`` once
its subscribers saw the last seq):
- ``closed``: the publisher keeps ``inflight`` publishes with an ``id`` outstanding
  (a new one per ack) up to ``limit`` or ``duration``: the maximum delivery rate.
- ``open``: publish ``i`` (no ``id``, no ack) leaves at ``t0 + i / rate``; a
  delivery's latency is its arrival minus that intended time. With one publisher
  per room, publish ``i`` is assigned seq ``base + 1 + i``, so the intended time
  follows from the seq alone and no timestamp has to be parsed from the payload.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from array import array
from typing import Any

import msgspec
from picows import WSFrame, WSTransport

from wsfan.bench.roles.base import (
    CLOSE,
    HEAD,
    TEXT,
    Base,
    Control,
    connect_many,
    disconnect_all,
    emit,
    payload_of,
)
from wsfan.bench.roles.pacing import Pacer, clock, save_samples, summary_fields
from wsfan.server.wire import Join


class Recording:
    """Where deliveries of the current phase go; one per process, swapped per phase."""

    def __init__(self, record: bool = False, t0: float = 0.0, interval: float = 1.0, base: int = 0) -> None:
        self.record = record
        # latency = arrival - (t0 + (seq - base - 1) * interval) = arrival - k - seq * interval
        self.k = t0 - (base + 1) * interval
        self.interval = interval
        self.samples = array("d")


class Subscriber(Base):
    def __init__(self, rec: list[Recording]) -> None:
        super().__init__()
        self.rec = rec  # a one-element list shared by all subscribers: the current phase
        self.rooms: list[str] = []
        self.acks = 0
        self.next_seq = 0
        self.count = 0
        self.gaps = 0
        self.wire_bytes = 0  # frame bytes received this phase (header + payload, compressed or not)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = clock()
        if frame.msg_type is not TEXT:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
            return
        data = frame.get_payload_as_memoryview()
        n = len(data)
        self.wire_bytes += n + (2 if n < 126 else 4 if n < 65536 else 10)
        if frame.rsv1:  # permessage-deflate, no context (RFC 7692 §7.2.2)
            data = zlib.decompressobj(-15).decompress(bytes(data) + b"\x00\x00\xff\xff")
        m = HEAD.decode(data)
        if m.type == "message":
            seq = m.seq
            if seq != self.next_seq:
                self.gaps += 1
            self.next_seq = seq + 1
            self.count += 1
            r = self.rec[0]
            if r.record:
                r.samples.append(now - r.k - seq * r.interval)
        elif m.type == "ack":
            self.acks += 1
            if self.acks == len(self.rooms) and not self.ready.done():
                self.ready.set_result(None)
        elif m.type != "welcome":
            self._cold(data)


class Publisher(Base):
    """Joined to every room; publishes to one room per phase."""

    def __init__(self, rooms: list[str], payload: bytes) -> None:
        super().__init__()
        self.rooms = rooms
        self.payload = payload
        self.acks = 0
        self.prefix = b""
        self.sent = self.acked = self.limit = 0
        self.first_seq = self.last_seq = 0
        self.deadline = 0.0
        self.closed_loop = False
        self.finished: asyncio.Future[None] | None = None

    def target(self, room: str, with_id: bool) -> None:
        self.prefix = (
            b'{"type":"publish","room":"' + room.encode() + b'","payload":' + self.payload + b',"id":"'
            if with_id
            else b'{"type":"publish","room":"' + room.encode() + b'","payload":' + self.payload + b"}"
        )

    def publish_with_id(self) -> None:
        self.sent += 1
        self.transport.send(TEXT, self.prefix + str(self.sent).encode() + b'"}')  # type: ignore[union-attr]

    def publish_no_id(self, _i: int) -> None:
        self.transport.send(TEXT, self.prefix)  # type: ignore[union-attr]

    def start_closed(self, inflight: int, limit: int, duration: float) -> asyncio.Future[None]:
        self.sent = self.acked = 0
        self.first_seq = self.last_seq = 0
        self.limit = limit
        self.deadline = clock() + duration
        self.closed_loop = True
        self.finished = asyncio.get_running_loop().create_future()
        for _ in range(min(inflight, limit)):
            self.publish_with_id()
        return self.finished

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
                if self.finished is not None and not self.finished.done():
                    self.finished.set_exception(ConnectionError(f"publisher closed with {self.close_code}"))
            return
        r = self._cold(frame.get_payload_as_memoryview())
        if r.type not in ("ack", "error"):
            return
        if not self.ready.done():
            if r.type == "ack":
                self.acks += 1
                if self.acks == len(self.rooms):
                    self.ready.set_result(None)
            return
        if not self.closed_loop:
            return  # an error to an open-loop publish: counted in self.errors
        self.acked += 1
        if r.data is not None:
            seq = r.data.seq
            if not self.first_seq or seq < self.first_seq:
                self.first_seq = seq
            self.last_seq = max(self.last_seq, seq)
        if self.sent < self.limit and clock() < self.deadline:
            self.publish_with_id()
        elif self.acked == self.sent and self.finished is not None and not self.finished.done():
            self.closed_loop = False
            self.finished.set_result(None)


_WORDS = (
    "the meeting moved to three so we can review the release notes and the open issues "
    "before lunch, ping me if the build is still red after your fix, thanks! "
    "sounds good, I will update the dashboard and share the link in this channel"
).split()


def chat_payload(size: int) -> bytes:
    """A chat-like JSON payload of about ``size`` bytes: words, a user, a timestamp (compresses like real chat).

    Deterministic, so every server in a run gets the same bytes; ``payload_of``'s run of
    one letter would compress a hundredfold and flatter every compressor.
    """
    words, i = [], 0
    while sum(len(w) + 1 for w in words) < max(8, size - 70):
        words.append(_WORDS[(i * 7 + i // 5) % len(_WORDS)])
        i += 1
    text = " ".join(words)
    return json.dumps(
        {"text": text, "user": "alice.smith", "ts": 1764489600.123, "thread": "release-2.4"}
    ).encode()


def _join(room: str) -> bytes:
    return msgspec.json.encode(Join(id=room, room=room))


async def fanout_lat(cfg: dict[str, Any], control: Control) -> None:
    url, first = cfg["url"], cfg["first_index"]
    sizes: dict[str, int] = cfg["rooms"]  # room name -> size
    rec = [Recording()]
    subs: list[Subscriber] = []
    joins = iter(range(first, first + cfg["subscribers"]))

    def join_rooms(c: Base) -> None:
        assert isinstance(c, Subscriber)
        g = next(joins)
        c.rooms = [room for room, size in sizes.items() if g < size]
        for room in c.rooms:
            c.transport.send(TEXT, _join(room))  # type: ignore[union-attr]
        if not c.rooms:
            c.ready.set_result(None)

    subs = await connect_many(  # type: ignore[assignment]
        lambda: Subscriber(rec),
        url,
        cfg["subscribers"],
        cfg.get("concurrency", 100),
        join_rooms,
        read_buffer_init_size=4096,
        # "compression": offer permessage-deflate, as browsers do on every connection
        extra_headers=[("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]
        if cfg.get("compression")
        else None,
    )
    publisher: Publisher | None = None
    if cfg.get("publisher"):

        def join_all(c: Base) -> None:
            for room in sizes:
                c.transport.send(TEXT, _join(room))  # type: ignore[union-attr]

        size = cfg["payload_size"]
        payload = chat_payload(size) if cfg.get("chat_payload") else payload_of(size)
        (publisher,) = await connect_many(  # type: ignore[assignment]
            lambda: Publisher(list(sizes), payload), url, 1, 1, join_all
        )
    emit("ready", subscribers=len(subs))
    members: list[Subscriber] = []
    while True:
        cmd = await control.next()
        kind = cmd.get("cmd")
        if kind == "quit":
            break
        if kind == "arm":
            # Every process resets its subscribers before the publisher starts, so no delivery is lost in between.
            room, base = cmd["room"], cmd["base"]
            members = [s for s in subs if room in s.rooms]
            for s in members:
                s.next_seq, s.count, s.gaps, s.wire_bytes = base + 1, 0, 0, 0
            rate = cmd.get("rate")
            rec[0] = Recording(True, cmd["t0"], 1.0 / rate, base) if rate else Recording()
            emit("armed")
        elif kind == "closed" and publisher is not None:
            started = clock()
            publisher.target(cmd["room"], with_id=True)
            await publisher.start_closed(cmd["inflight"], cmd["limit"], cmd["duration"])
            emit(
                "published",
                publishes=publisher.acked,
                first_seq=publisher.first_seq,
                last_seq=publisher.last_seq,
                errors=publisher.errors,
                seconds=clock() - started,
            )
        elif kind == "open" and publisher is not None:
            started = clock()
            base = cmd["base"]
            publisher.target(cmd["room"], with_id=False)
            pacer = Pacer(cmd["t0"], cmd["rate"], cmd["count"])
            errors_before = publisher.errors
            await pacer.run(publisher.publish_no_id)
            emit(
                "published",
                **summary_fields(
                    {
                        "publishes": pacer.sent,
                        "first_seq": base + 1,
                        "last_seq": base + pacer.sent,
                        "errors": publisher.errors - errors_before,
                        "seconds": clock() - started,
                    },
                    pacer,
                ),
            )
        elif kind == "expect":
            last = cmd["last_seq"]
            deadline = clock() + cmd.get("timeout", 60)
            while clock() < deadline:
                if all(
                    s.next_seq > last or s.transport is None or s.transport.is_disconnected for s in members
                ):
                    break
                await asyncio.sleep(0.01)
            r = rec[0]
            rec[0] = Recording()
            path = (
                save_samples(r.samples, cfg["samples_dir"], f"{cfg['name']}-{cmd['phase']}")
                if r.record
                else None
            )
            emit(
                "done",
                subscribers=len(members),
                received=sum(s.count for s in members),
                expected=(last - cmd["base"]) * len(members),
                gaps=sum(s.gaps for s in members),
                wire_bytes=sum(s.wire_bytes for s in members),
                incomplete=sum(1 for s in members if s.next_seq <= last),
                disconnected=sum(1 for s in members if s.transport is None or s.transport.is_disconnected),
                close_codes=sorted({s.close_code for s in subs if s.close_code is not None}),
                errors=sum(s.errors for s in subs),
                samples=path,
            )
    disconnect_all(subs + ([publisher] if publisher else []))  # type: ignore[operator]
