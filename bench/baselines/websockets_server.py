"""The plain-Python baseline: the same protocol subset on the ``websockets`` library, written idiomatically.

``python -m wsfan.bench.baselines.websockets_server --port PORT [--ping-interval S] [--uvloop]``

What a competent developer would write with the most popular Python WebSocket
library, following its documentation: an ``async for`` loop per connection, the
standard ``json`` module, a set of connections per room and
``websockets.asyncio.server.broadcast()`` for fan-out (encode once, write to every
member without awaiting). Heartbeats are the library's own (``ping_interval``,
default 20 s; 0 turns them off). It runs on the default asyncio loop, as plain
Python does, unless ``--uvloop`` is given.

Protocol subset: ``welcome``; ``join`` and ``leave`` with ack; ``publish`` with ack
and deliveries ``{"type":"message","room","seq","from","payload"}`` to every member
but the sender; ``echo``; ``ping``; ``NOT_JOINED``/``INVALID_MESSAGE``/``UNKNOWN_TYPE``
errors. No auth, rate limits or history (they would only slow it down).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

rooms: dict[str, set[ServerConnection]] = {}
seqs: dict[str, int] = {}
ids = itertools.count(1)
PING_MS = 20_000


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def error(request_id: Any, code: str, message: str) -> str:
    out: dict[str, Any] = {"type": "error", "success": False, "code": code, "message": message}
    if request_id is not None:
        out["requestId"] = request_id
    return dumps(out)


def ack(request_id: Any, data: dict[str, Any]) -> str:
    return dumps({"type": "ack", "requestId": request_id, "success": True, "data": data})


async def handler(ws: ServerConnection) -> None:
    if ws.request is None or ws.request.path.split("?")[0] != "/ws":
        await ws.close(1008, "unknown path")
        return
    user = f"ws-{next(ids):x}"
    joined: set[str] = set()
    await ws.send(
        dumps({"type": "welcome", "conn": user, "user": user, "heartbeat": PING_MS, "node": "websockets"})
    )
    try:
        async for raw in ws:
            try:
                msg = json.loads(raw)
                kind, rid = msg["type"], msg.get("id")
            except (ValueError, TypeError, KeyError):
                await ws.send(error(None, "INVALID_MESSAGE", "not a protocol message"))
                continue
            if kind == "publish":
                room = msg.get("room")
                if room not in joined:
                    await ws.send(error(rid, "NOT_JOINED", f"join {room!r} before publishing to it"))
                    continue
                seq = seqs[room] = seqs.get(room, 0) + 1
                delivery = dumps(
                    {"type": "message", "room": room, "seq": seq, "from": user, "payload": msg.get("payload")}
                )
                broadcast((c for c in rooms[room] if c is not ws), delivery)
                if rid is not None:
                    await ws.send(ack(rid, {"room": room, "seq": seq}))
            elif kind == "join":
                room = msg.get("room")
                if not isinstance(room, str) or not room:
                    await ws.send(error(rid, "INVALID_MESSAGE", "room required"))
                    continue
                rooms.setdefault(room, set()).add(ws)
                joined.add(room)
                if rid is not None:
                    await ws.send(ack(rid, {"room": room, "seq": seqs.get(room, 0), "recovered": False}))
            elif kind == "leave":
                room = msg.get("room")
                joined.discard(room)
                rooms.get(room, set()).discard(ws)
                if rid is not None:
                    await ws.send(ack(rid, {"room": room}))
            elif kind == "echo":
                await ws.send(dumps({"type": "echo", "requestId": rid, "payload": msg.get("payload")}))
            elif kind == "ping":
                await ws.send(dumps({"type": "pong", "requestId": rid, "ts": msg.get("ts")}))
            else:
                await ws.send(error(rid, "UNKNOWN_TYPE", f"unknown message type {kind!r}"))
    except ConnectionClosed:
        pass  # a peer that went away without a close frame: nothing to answer
    finally:
        for room in joined:
            members = rooms.get(room)
            if members is not None:
                members.discard(ws)


async def main(host: str, port: int, ping_interval: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, host, port, ping_interval=ping_interval, ping_timeout=ping_interval and 10):
        await stop.wait()


def cli() -> None:
    global PING_MS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--ping-interval", type=float, default=20.0, help="seconds; 0 = no heartbeat")
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop instead of asyncio's default loop"
    )
    args = parser.parse_args()
    interval = args.ping_interval or None
    PING_MS = int((interval or 0) * 1000)
    coro = main(args.host, args.port, interval)
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    cli()
