"""An App touching every part of the application API, for tests/test_app_api.py.

Every connection event it observes is published to the room ``audit`` so a test can watch it.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec

import wsfan

app = wsfan.App()


class Item(msgspec.Struct):
    name: str
    qty: Annotated[int, msgspec.Meta(ge=1)]


class Add(wsfan.Message, tag="add"):
    a: int
    b: int


class Slow(wsfan.Message, tag="slow"):
    n: int
    delay: float


class Order(wsfan.Message, tag="order"):
    items: list[Item]


class Fail(wsfan.Message, tag="fail"):
    how: str  # "error" (wsfan.Error), "crash" (sync exception), "acrash" (async exception)


class Whoami(wsfan.Message, tag="whoami"):
    pass


class Push(wsfan.Message, tag="push"):
    text: str


class Enlist(wsfan.Message, tag="enlist"):
    room: str
    leave: bool = False


class Kick(wsfan.Message, tag="kick"):
    code: int
    reason: str = ""


@app.on_connect
def connect(request: wsfan.ConnectRequest) -> dict[str, object]:
    if request.headers.get("X-Refuse") == "401":
        raise wsfan.Error("WHO", "say who you are", status=401)
    if request.headers.get("X-Refuse") == "403":
        raise wsfan.Error("NOPE", "not you", status=403)
    claims = dict(request.claims or {})
    return {
        "agent": request.headers.get("X-Agent", ""),
        "path": request.path.decode(),
        "role": claims.get("role"),
    }


@app.on_disconnect
async def disconnected(conn: wsfan.Conn, code: int) -> None:
    await app.publish("audit", {"gone": conn.id, "code": code, "rooms": sorted(conn.rooms)})


@app.before_publish
def no_shouting(conn: wsfan.Conn, room: str) -> bool:
    return not room.startswith("quiet")


@app.before_join
def no_vault(conn: wsfan.Conn, room: str) -> bool:
    return room != "vault"


@app.message(Add)
def add(conn: wsfan.Conn, msg: Add) -> int:
    return msg.a + msg.b


@app.message(Slow)
async def slow(conn: wsfan.Conn, msg: Slow) -> dict[str, int]:
    await asyncio.sleep(msg.delay)
    return {"n": msg.n}


@app.message(Order)
def order(conn: wsfan.Conn, msg: Order) -> dict[str, int]:
    return {"total": sum(i.qty for i in msg.items)}


@app.message(Fail)
def fail(conn: wsfan.Conn, msg: Fail) -> Any:
    if msg.how == "error":
        raise wsfan.Error("OUT_OF_STOCK", "no more widgets")
    if msg.how == "aerror":
        return _raise(wsfan.Error("OUT_OF_STOCK", "none left"))
    if msg.how == "acrash":
        return _raise(RuntimeError("secret detail acrash"))
    raise KeyError("secret detail crash")


async def _raise(exc: Exception) -> None:
    await asyncio.sleep(0)
    raise exc


@app.message(Whoami)
def whoami(conn: wsfan.Conn, msg: Whoami) -> dict[str, object]:
    return {"id": conn.id, "user": conn.user, "data": conn.data}


@app.message(Push)
def push(conn: wsfan.Conn, msg: Push) -> None:
    conn.send({"type": "notice", "text": msg.text})


@app.message(Enlist)
def enlist(conn: wsfan.Conn, msg: Enlist) -> list[str]:
    try:
        if msg.leave:
            conn.leave(msg.room)
        else:
            conn.join(msg.room)
    except ValueError as exc:  # a name no client could send: the call says so (docs/app-api.md)
        raise wsfan.Error("BAD_ROOM", str(exc)) from None
    return sorted(conn.rooms)


class Announce(wsfan.Message, tag="announce"):
    room: str  # any string: the application API checks it, not the message schema
    payload: Any = None


@app.message(Announce)
async def announce(conn: wsfan.Conn, msg: Announce) -> int:
    try:
        return await app.publish(msg.room, msg.payload)
    except ValueError as exc:
        raise wsfan.Error("BAD_ROOM", str(exc)) from None


@app.message(Kick)
def kick(conn: wsfan.Conn, msg: Kick) -> None:
    conn.close(msg.code, msg.reason)


class Shout(wsfan.Message, tag="shout"):
    payload: Any


@app.message(Shout)
async def shout(conn: wsfan.Conn, msg: Shout) -> None:
    await app.broadcast(msg.payload)
