"""A naive pub/sub server on picows: the baseline the corked fan-out is measured against.

``python -m wsfan.bench.baselines.naive_picows --port PORT``

Same wire protocol subset as the real server (``welcome``; ``join``, ``publish``
with ack; deliveries ``{"type":"message","room","seq","from","payload"}`` to
every member but the sender; plus ``echo`` so the echo figure has a reference),
written the way a straightforward implementation would be: msgspec Structs,
the delivery encoded once per publish, then ``transport.send`` once per
subscriber. No queues, no corking, no pre-built frames: picows builds a frame
header and copies the message for every call, and uvloop tries a ``send()``
syscall for each one. No auth, rate limits, history, heartbeats or back-pressure
either; those would only make the baseline slower.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from typing import Any

import msgspec
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from wsfan.server.wire import Ack, Delivery, Echo, EchoReply, Error, Join, Publish, Welcome

TEXT = WSMsgType.TEXT


# The wire format is the project's own (server/protocol.py): the baseline differs in how it
# fans out, not in how it encodes, so the comparison isolates corking and frame sharing.
decoder = msgspec.json.Decoder(Join | Publish | Echo)
encode = msgspec.json.Encoder().encode
ids = itertools.count(1)
rooms: dict[str, dict[Connection, None]] = {}
seqs: dict[str, int] = {}


class Connection(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.user = f"naive-{next(ids):x}"
        self.rooms: set[str] = set()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(TEXT, encode(Welcome(conn=self.user, user=self.user, heartbeat=0, node="naive")))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for name in self.rooms:
            members = rooms.get(name)
            if members is not None:
                members.pop(self, None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        op = frame.msg_type
        if op is WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if op is not TEXT:
            return
        try:
            msg = decoder.decode(frame.get_payload_as_memoryview())
        except msgspec.DecodeError as exc:
            self.error(None, "INVALID_MESSAGE", str(exc))
            return
        if type(msg) is Publish:
            self.publish(msg)
        elif type(msg) is Join:
            rooms.setdefault(msg.room, {})[self] = None
            self.rooms.add(msg.room)
            self.ack(msg.id, {"room": msg.room, "seq": seqs.get(msg.room, 0), "recovered": False})
        else:
            transport.send(TEXT, encode(EchoReply(requestId=msg.id, payload=msg.payload)))

    def publish(self, msg: Publish) -> None:
        room = msg.room
        if room not in self.rooms:
            self.error(msg.id, "NOT_JOINED", f"join {room!r} before publishing to it")
            return
        seq = seqs[room] = seqs.get(room, 0) + 1
        data = encode(Delivery(room=room, seq=seq, sender=self.user, payload=msg.payload))
        for member in rooms[room]:
            if member is not self:
                member.transport.send(TEXT, data)  # type: ignore[union-attr]
        self.ack(msg.id, {"room": room, "seq": seq})

    def ack(self, request_id: str | None, data: Any) -> None:
        if request_id is not None:
            self.transport.send(TEXT, encode(Ack(requestId=request_id, success=True, data=data)))  # type: ignore[union-attr]

    def error(self, request_id: str | None, code: str, message: str) -> None:
        err = Error(requestId=request_id, success=False, code=code, message=message)
        self.transport.send(TEXT, encode(err))  # type: ignore[union-attr]


def route(request: WSUpgradeRequest) -> Connection:
    return Connection()


async def serve(host: str, port: int) -> None:
    server = await ws_create_server(route, host, port, enable_auto_pong=True, logger_name="naive")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for members in list(rooms.values()):
        for c in list(members):
            if c.transport is not None:
                c.transport.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
