"""The core scenario's roles (``bench/scenarios/core.py``): ``fanout``, ``idle`` and ``echo``, closed loop.

- ``fanout``: ``subscribers`` connections join ``room``; if ``publisher`` is
  true one more connection joins and, on ``go``, keeps ``inflight`` publishes
  in flight (a new one on every ack) until ``max_publishes`` or ``duration``
  seconds, then reports ``published`` with the seq range. On ``expect``
  (``last_seq``) it waits until every subscriber has seen that seq and reports
  ``done`` with delivery counts and seq gaps.
- ``idle``: ``connections`` connections that wait for the welcome and then do nothing.
- ``echo``: ``connections`` connections each doing echo round trips, one in
  flight, for ``duration`` seconds after ``go``; ``mode`` is ``protocol``
  (``{"type":"echo"}`` on ``/ws``) or ``raw`` (verbatim payload on ``/echo``).

They stay as they are because ``results/core-*.json`` were measured with them: the full
suite's roles (``fanout_lat``, ``echo_lat``, ``idle_multi``) add rooms of several sizes,
open-loop phases and latency on the same base (``roles/base.py``).
"""

from __future__ import annotations

import asyncio
import time
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
from wsfan.server.wire import Join


class Subscriber(Base):
    """Counts deliveries and checks that seqs follow each other without a gap."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.next_seq = -1
        self.gaps = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
            return
        data = frame.get_payload_as_memoryview()
        m = HEAD.decode(data)
        if m.type == "message":
            seq = m.seq
            if seq != self.next_seq:
                self.gaps += 1
            self.next_seq = seq + 1
            self.count += 1
        elif m.type == "ack":
            r = self._cold(data)
            if r.data is not None and not self.ready.done():
                self.next_seq = r.data.seq + 1  # the first live delivery must carry this seq
                self.ready.set_result(None)
        elif m.type != "welcome":
            self._cold(data)


class Publisher(Base):
    """Keeps ``inflight`` publishes outstanding: every ack (or error) releases the next one."""

    def __init__(self, room: str, payload: bytes) -> None:
        super().__init__()
        self.prefix = b'{"type":"publish","room":"' + room.encode() + b'","payload":' + payload + b',"id":"'
        self.sent = 0
        self.acked = 0
        self.first_seq = 0
        self.last_seq = 0
        self.limit = 0
        self.deadline = 0.0
        self.joined = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        if not self.finished.done():
            self.finished.set_exception(ConnectionError(f"publisher disconnected (close {self.close_code})"))

    def publish(self) -> None:
        self.sent += 1
        self.transport.send(TEXT, self.prefix + str(self.sent).encode() + b'"}')  # type: ignore[union-attr]

    def start(self, inflight: int, limit: int, duration: float) -> None:
        self.limit = limit
        self.deadline = time.monotonic() + duration
        for _ in range(min(inflight, limit)):
            self.publish()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
                if not self.finished.done():
                    self.finished.set_exception(ConnectionError(f"publisher closed with {self.close_code}"))
            return
        r = self._cold(frame.get_payload_as_memoryview())
        if not self.joined:
            if r.type == "ack":
                self.joined = True
                self.ready.set_result(None)
            return
        if r.type not in ("ack", "error"):
            return
        self.acked += 1
        if r.data is not None:
            seq = r.data.seq
            if not self.first_seq or seq < self.first_seq:
                self.first_seq = seq
            if seq > self.last_seq:
                self.last_seq = seq
        if self.sent < self.limit and time.monotonic() < self.deadline:
            self.publish()
        elif self.acked == self.sent and not self.finished.done():
            self.finished.set_result(None)


class EchoClient(Base):
    """One echo round trip in flight; the next request leaves when the reply arrives."""

    def __init__(self, request: bytes, protocol: bool) -> None:
        super().__init__()
        self.request = request
        self.protocol = protocol
        self.replies = 0
        self.running = False
        self.outstanding = False
        self.idle: asyncio.Future[None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        if not self.protocol:
            self.ready.set_result(None)

    def send(self) -> None:
        self.outstanding = True
        self.transport.send(TEXT, self.request)  # type: ignore[union-attr]

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
            return
        if self.protocol and not self.ready.done():
            self.ready.set_result(None)  # the welcome
            return
        self.outstanding = False
        self.replies += 1
        if self.running:
            self.send()
        elif self.idle is not None and not self.idle.done():
            self.idle.set_result(None)


async def fanout(cfg: dict[str, Any], control: Control) -> None:
    url, room = cfg["url"], cfg["room"]
    join = msgspec.json.encode(Join(id="j", room=room))

    def send_join(c: Base) -> None:
        c.transport.send(TEXT, join)  # type: ignore[union-attr]

    subs: list[Subscriber] = await connect_many(  # type: ignore[assignment]
        Subscriber, url, cfg["subscribers"], cfg.get("concurrency", 100), send_join
    )
    publisher: Publisher | None = None
    if cfg.get("publisher"):
        payload = payload_of(cfg["payload_size"])
        (publisher,) = await connect_many(  # type: ignore[assignment]
            lambda: Publisher(room, payload), url, 1, 1, send_join
        )
    emit("ready", subscribers=len(subs))
    await control.wait_for("go")
    t0 = time.perf_counter()
    if publisher is not None:
        publisher.start(cfg["inflight"], cfg["max_publishes"], cfg["duration"])
        await publisher.finished
        emit(
            "published",
            publishes=publisher.acked,
            first_seq=publisher.first_seq,
            last_seq=publisher.last_seq,
            errors=publisher.errors,
            seconds=time.perf_counter() - t0,
        )
    expect = await control.wait_for("expect")
    last, first = expect["last_seq"], expect["first_seq"]
    deadline = time.monotonic() + expect.get("timeout", 120)
    while time.monotonic() < deadline:
        if all(s.next_seq > last or s.transport is None or s.transport.is_disconnected for s in subs):
            break
        await asyncio.sleep(0.02)
    per_sub = last - first + 1 if last else 0
    emit(
        "done",
        subscribers=len(subs),
        received=sum(s.count for s in subs),
        expected=per_sub * len(subs),
        gaps=sum(s.gaps for s in subs),
        incomplete=sum(1 for s in subs if s.next_seq <= last),
        disconnected=sum(1 for s in subs if s.transport is None or s.transport.is_disconnected),
        close_codes=sorted({s.close_code for s in subs if s.close_code is not None}),
        errors=sum(s.errors for s in subs),
        seconds=time.perf_counter() - t0,
    )
    await control.wait_for("quit")
    disconnect_all(subs + ([publisher] if publisher else []))


async def idle(cfg: dict[str, Any], control: Control) -> None:
    class Idle(Base):
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
            elif not self.ready.done():
                self.ready.set_result(None)  # the welcome

    t0 = time.perf_counter()
    conns = await connect_many(Idle, cfg["url"], cfg["connections"], cfg.get("concurrency", 100))
    emit("ready", connections=len(conns), seconds=time.perf_counter() - t0)
    await control.wait_for("quit")
    disconnect_all(conns)


async def echo(cfg: dict[str, Any], control: Control) -> None:
    protocol = cfg["mode"] == "protocol"
    payload = payload_of(cfg["payload_size"])
    request = b'{"type":"echo","id":"e","payload":' + payload + b"}" if protocol else payload
    clients: list[EchoClient] = await connect_many(  # type: ignore[assignment]
        lambda: EchoClient(request, protocol), cfg["url"], cfg["connections"], cfg.get("concurrency", 100)
    )
    emit("ready", connections=len(clients))
    await control.wait_for("go")
    t0 = time.perf_counter()
    for c in clients:
        c.running = True
        c.send()
    await asyncio.sleep(cfg["duration"])
    loop = asyncio.get_running_loop()
    waits = []
    for c in clients:
        c.running = False
        if c.outstanding:
            c.idle = loop.create_future()
            waits.append(c.idle)
    if waits:
        await asyncio.wait_for(asyncio.gather(*waits), 30)
    emit(
        "done",
        replies=sum(c.replies for c in clients),
        errors=sum(c.errors for c in clients),
        seconds=time.perf_counter() - t0,
    )
    await control.wait_for("quit")
    disconnect_all(clients)  # type: ignore[arg-type]
