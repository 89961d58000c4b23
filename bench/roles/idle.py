"""Role ``idle_multi``: idle connections to several servers, pings counted.

Plain picows: this role opens tens of thousands of connections that do nothing,
so the cheapest listener wins; ``client/`` adds a session, a supervisor task and
its own heartbeat per connection, which would be measured instead of the server.

``idle_multi``: ``targets`` is a list of ``(slot, url, connections)``; pings are
answered here (auto-pong off) so that they can be counted per server: ``count``
reports the pings received and the connections still open per slot since the
last ``count``. A process holds at most ~19,000 connections (the machine's hard
open-file limit is 20,000 and cannot be raised), so the harness spreads targets
over several processes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from picows import WSFrame, WSMsgType, WSTransport

from wsfan.bench.roles.base import CLOSE, Base, Control, connect_many, disconnect_all, emit
from wsfan.bench.roles.pacing import clock

PING = WSMsgType.PING


class Idle(Base):
    def __init__(self, pings: list[int], slot: int) -> None:
        super().__init__()
        self.pings = pings
        self.slot = slot

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        op = frame.msg_type
        if op is PING:
            self.pings[self.slot] += 1
            transport.send_pong(frame.get_payload_as_bytes())
        elif op is CLOSE:
            self._on_close(transport, frame)
        elif not self.ready.done():
            self.ready.set_result(None)  # the welcome


async def idle_multi(cfg: dict[str, Any], control: Control) -> None:
    targets: list[tuple[int, str, int]] = [tuple(t) for t in cfg["targets"]]  # (slot, url, connections)
    slots = max((slot for slot, _, _ in targets), default=-1) + 1
    pings = [0] * slots
    started = clock()
    groups = await asyncio.gather(
        *(
            connect_many(
                lambda slot=slot: Idle(pings, slot),
                url,
                n,
                cfg.get("concurrency", 100),
                enable_auto_pong=False,
                read_buffer_init_size=256,
            )
            for slot, url, n in targets
        )
    )
    conns = [c for g in groups for c in g]
    emit("ready", connections=len(conns), seconds=clock() - started)
    while True:
        cmd = await control.next()
        if cmd.get("cmd") == "quit":
            break
        if cmd.get("cmd") == "count":
            open_by_slot = [0] * slots
            for (slot, _, _), g in zip(targets, groups, strict=True):
                open_by_slot[slot] += sum(
                    1 for c in g if c.transport is not None and not c.transport.is_disconnected
                )
            emit(
                "counts",
                pings=list(pings),
                open=open_by_slot,
                close_codes=sorted({c.close_code for c in conns if c.close_code is not None}),
            )
            pings[:] = [0] * slots
    disconnect_all(conns)
