"""Role ``echo_lat``: echo round trips, open loop at a fixed rate or closed loop at the maximum.

Plain picows, not ``client/``: at 20,000 messages/s the client's per-request
future and timeout would cost more than the server's reply, and the load
generator would measure itself.

Commands:
- ``open`` (``phase``, ``t0``, ``rate``, ``count``, ``stride``, ``offset``, ``drain_s``):
  request ``i`` (``{"type":"echo","id":"<i>"}``) goes out on connection ``i % n`` at
  ``t0 + i / rate``; its latency is reply time minus that intended time.
- ``closed`` (``phase``, ``duration``): every connection keeps one request in flight;
  latency is reply time minus actual send time (a closed loop cannot offer more
  than the server answers, so this measures the maximum rate and the RTT there).
Both report ``done`` with counts and the path of the raw samples.
"""

from __future__ import annotations

import asyncio
from array import array
from typing import Any

import msgspec
from picows import WSFrame, WSTransport

from wsfan.bench.roles.base import CLOSE, TEXT, Base, Control, connect_many, disconnect_all, emit, payload_of
from wsfan.bench.roles.pacing import Pacer, clock, save_samples, summary_fields
from wsfan.server.wire import Head

ECHO_HEAD = msgspec.json.Decoder(Head)


class Phase:
    """State shared by every connection of this process during one measured phase."""

    def __init__(self) -> None:
        self.samples = array("d")
        self.received = 0
        self.errors = 0
        self.target = -1
        self.closed_loop = False
        self.running = False
        self.t0 = 0.0
        self.interval = 1.0
        self.complete: asyncio.Event = asyncio.Event()
        self.outstanding = 0

    def got(self) -> None:
        self.received += 1
        if self.received == self.target:
            self.complete.set()


class EchoConn(Base):
    def __init__(self, phase: Phase, prefix: bytes, suffix: bytes) -> None:
        super().__init__()
        self.phase = phase
        self.prefix = prefix
        self.suffix = suffix
        self.sent_at = 0.0

    def request(self, i: int) -> None:
        self.transport.send(TEXT, self.prefix + str(i).encode() + self.suffix)  # type: ignore[union-attr]

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = clock()
        if frame.msg_type is not TEXT:
            if frame.msg_type is CLOSE:
                self._on_close(transport, frame)
            return
        if not self.ready.done():
            self.ready.set_result(None)  # the welcome
            return
        ph = self.phase
        if ph.closed_loop:
            ph.samples.append(now - self.sent_at)
            ph.received += 1
            if ph.running:
                self.sent_at = clock()
                self.request(0)
            else:
                ph.outstanding -= 1
                if ph.outstanding == 0:
                    ph.complete.set()
            return
        head = ECHO_HEAD.decode(frame.get_payload_as_memoryview())
        if head.type != "echo" or head.requestId is None:
            ph.errors += 1
            return
        ph.samples.append(now - ph.t0 - int(head.requestId) * ph.interval)
        ph.got()


async def echo_lat(cfg: dict[str, Any], control: Control) -> None:
    payload = payload_of(cfg["payload_size"])
    prefix, suffix = b'{"type":"echo","id":"', b'","payload":' + payload + b"}"
    phase = Phase()
    conns: list[EchoConn] = await connect_many(  # type: ignore[assignment]
        lambda: EchoConn(phase, prefix, suffix),
        cfg["url"],
        cfg["connections"],
        cfg.get("concurrency", 50),
        read_buffer_init_size=4096,
    )
    emit("ready", connections=len(conns))
    n = len(conns)

    def send_to(i: int) -> None:
        conns[i % n].request(i)

    while True:
        cmd = await control.next()
        kind = cmd.get("cmd")
        if kind == "quit":
            break
        phase = Phase()
        for c in conns:
            c.phase = phase
        started = clock()
        pacer: Pacer | None = None
        if kind == "open":
            pacer = Pacer(cmd["t0"], cmd["rate"], cmd["count"], cmd.get("stride", 1), cmd.get("offset", 0))
            phase.t0, phase.interval = pacer.t0, pacer.interval
            phase.target = len(range(pacer.offset, pacer.count, pacer.stride))
            await pacer.run(send_to)
            end = pacer.t0 + pacer.count * pacer.interval + cmd.get("drain_s", 5.0)
            try:
                await asyncio.wait_for(phase.complete.wait(), max(0.1, end - clock()))
            except TimeoutError:
                pass
            sent = pacer.sent
        elif kind == "closed":
            phase.closed_loop = phase.running = True
            phase.outstanding = len(conns)
            for c in conns:
                c.sent_at = clock()
                c.request(0)
            await asyncio.sleep(cmd["duration"])
            phase.running = False
            try:
                await asyncio.wait_for(phase.complete.wait(), 10)
            except TimeoutError:
                pass
            sent = phase.received + max(0, phase.outstanding)
        else:
            continue
        path = save_samples(phase.samples, cfg["samples_dir"], f"{cfg['name']}-{cmd['phase']}")
        emit(
            "done",
            **summary_fields(
                {
                    "phase": cmd["phase"],
                    "connections": len(conns),
                    "sent": sent,
                    "received": phase.received,
                    "errors": phase.errors + sum(c.errors for c in conns),
                    "samples": path,
                    "seconds": clock() - started,
                    "disconnected": sum(
                        1 for c in conns if c.transport is None or c.transport.is_disconnected
                    ),
                },
                pacer,
            ),
        )
    disconnect_all(conns)  # type: ignore[arg-type]
