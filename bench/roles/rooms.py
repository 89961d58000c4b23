"""Roles ``oneshot_rooms`` (many rooms used once, for memory after their TTL) and ``churn`` (join/leave loops).

Plain picows, like the other throughput roles: the point is the server's cost.

``oneshot_rooms``: ``connections`` connections; on each ``go`` (with ``rooms`` and a
room-name ``prefix``) they create that many rooms between them, each with one ``join``,
one ``publish`` and one ``leave`` (only the leave carries an id), keeping ``window``
rooms in flight per connection; ``done`` reports the rooms finished and the error replies.

``churn``: ``listeners`` connections join ``room`` and stay (they receive the room's
``joined``/``left`` events when its namespace has ``join_leave``); on ``go``,
``churners`` connections each join and leave ``room`` in a closed loop (the next
request on each ack) for ``duration`` seconds; ``done`` reports the joins completed and
the events the listeners received.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from picows import WSFrame, WSTransport

from wsfan.bench.roles.base import CLOSE, HEAD, TEXT, Base, Control, connect_many, disconnect_all, emit


class _Welcomed(Base):
    """Ready on the welcome; subclasses handle what follows."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is CLOSE:
            self._on_close(transport, frame)
        elif not self.ready.done():
            self.ready.set_result(None)
        else:
            self.on_message(frame.get_payload_as_bytes())

    def on_message(self, data: bytes) -> None:
        raise NotImplementedError


class OneShot(_Welcomed):
    """Creates rooms ``start, start + step, ...`` below ``stop``: join, publish once, leave."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.next = self.step = self.stop = 0
        self.prefix = ""
        self.outstanding = 0
        self.finished = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def go(self, start: int, step: int, stop: int, prefix: str) -> None:
        self.next, self.step, self.stop, self.prefix = start, step, stop, prefix
        self.finished = 0
        self.done = asyncio.get_running_loop().create_future()
        for _ in range(self.window):
            self._send_next()
        self._check_done()

    def _send_next(self) -> None:
        if self.next >= self.stop or self.transport is None:
            return
        room = f"{self.prefix}{self.next}"
        self.next += self.step
        self.outstanding += 1
        send = self.transport.send
        send(TEXT, b'{"type":"join","room":"%s"}' % room.encode())
        send(TEXT, b'{"type":"publish","room":"%s","payload":{"n":1}}' % room.encode())
        send(TEXT, b'{"type":"leave","id":"l","room":"%s"}' % room.encode())

    def on_message(self, data: bytes) -> None:
        r = self._cold(data)  # acks of leaves, or errors
        if r.type == "ack":
            self.outstanding -= 1
            self.finished += 1
            self._send_next()
            self._check_done()

    def _check_done(self) -> None:
        if self.outstanding == 0 and self.next >= self.stop and not self.done.done():
            self.done.set_result(None)


async def oneshot_rooms(cfg: dict[str, Any], control: Control) -> None:
    n, window = cfg["connections"], cfg.get("window", 20)
    conns: list[OneShot] = await connect_many(  # type: ignore[assignment]
        lambda: OneShot(window), cfg["url"], n, 50
    )
    emit("ready", connections=len(conns))
    while (cmd := await control.next()).get("cmd") != "quit":
        if cmd.get("cmd") != "go":
            continue
        t0 = time.perf_counter()
        errors0 = sum(c.errors for c in conns)
        for i, c in enumerate(conns):
            c.go(i, n, cmd["rooms"], cmd["prefix"])
        await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), cmd.get("timeout", 600))
        emit(
            "done",
            rooms=sum(c.finished for c in conns),
            errors=sum(c.errors for c in conns) - errors0,
            seconds=time.perf_counter() - t0,
        )
    disconnect_all(conns)  # type: ignore[arg-type]


class Listener(_Welcomed):
    """Stays in the room; counts joined/left events."""

    def __init__(self) -> None:
        super().__init__()
        self.events = 0

    def on_message(self, data: bytes) -> None:
        kind = HEAD.decode(data).type
        if kind == "joined" or kind == "left":
            self.events += 1
        elif kind == "error":
            self.errors += 1


class Churner(_Welcomed):
    """Join, leave, join...: each request sent on the previous one's ack."""

    def __init__(self, room: str) -> None:
        super().__init__()
        self.join = json.dumps({"type": "join", "id": "j", "room": room}).encode()
        self.leave = json.dumps({"type": "leave", "id": "l", "room": room}).encode()
        self.inside = False
        self.running = False
        self.joins = 0
        self.idle: asyncio.Future[None] | None = None

    def go(self) -> None:
        self.running = True
        self.transport.send(TEXT, self.join)  # type: ignore[union-attr]

    def on_message(self, data: bytes) -> None:
        r = HEAD.decode(data)
        if r.type == "error":
            self.errors += 1
        elif r.type != "ack":
            return  # joined/left events of the other churners
        if not self.inside:
            self.joins += 1
        self.inside = not self.inside
        if self.running or self.inside:  # always end outside the room
            self.transport.send(TEXT, self.leave if self.inside else self.join)  # type: ignore[union-attr]
        elif self.idle is not None and not self.idle.done():
            self.idle.set_result(None)


async def churn(cfg: dict[str, Any], control: Control) -> None:
    url, room = cfg["url"], cfg["room"]
    join = json.dumps({"type": "join", "room": room}).encode()
    listeners: list[Listener] = await connect_many(  # type: ignore[assignment]
        Listener,
        url,
        cfg["listeners"],
        50,
        lambda c: c.transport.send(TEXT, join),  # type: ignore[union-attr]
    )
    churners: list[Churner] = await connect_many(  # type: ignore[assignment]
        lambda: Churner(room), url, cfg["churners"], 50
    )
    await asyncio.sleep(0.2)  # the listeners' joins are acked; their own events are not counted
    for c in listeners:
        c.events = 0
    emit("ready", listeners=len(listeners), churners=len(churners))
    await control.wait_for("go")
    t0 = time.perf_counter()
    for c in churners:
        c.go()
    await asyncio.sleep(cfg["duration"])
    loop = asyncio.get_running_loop()
    for c in churners:
        c.running = False
        c.idle = loop.create_future()
    await asyncio.wait_for(asyncio.gather(*(c.idle for c in churners if c.idle)), 30)
    seconds = time.perf_counter() - t0
    await asyncio.sleep(0.2)  # the last events on their way to the listeners
    emit(
        "done",
        joins=sum(c.joins for c in churners),
        events=sum(c.events for c in listeners),
        errors=sum(c.errors for c in listeners + churners),  # type: ignore[operator]
        seconds=seconds,
    )
    await control.wait_for("quit")
    disconnect_all(listeners + churners)  # type: ignore[operator]
