"""An App that joins and leaves connections itself, for tests/test_server_subs.py.

``?auto=a,b`` on the upgrade: ``on_open`` joins the connection to those rooms (``?auto_async=``:
an async ``on_open`` hook does, after an ``await``). ``enlist`` joins or leaves a room from a
handler, with an optional reason; ``kick`` closes the connection with a code.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import wsfan

app = wsfan.App()


class Enlist(wsfan.Message, tag="enlist"):
    room: str
    leave: bool = False
    reason: str = ""


class Kick(wsfan.Message, tag="kick"):
    code: int


def _rooms(query: dict[str, list[str]], key: str) -> list[str]:
    return [r for value in query.get(key, []) for r in value.split(",") if r]


@app.on_connect
def connect(request: wsfan.ConnectRequest) -> dict[str, list[str]]:
    query = parse_qs(request.query.decode())
    return {"auto": _rooms(query, "auto"), "auto_async": _rooms(query, "auto_async")}


@app.on_open
def opened(conn: wsfan.Conn) -> None:
    for room in conn.data["auto"]:
        conn.join(room)


@app.on_open
async def opened_later(conn: wsfan.Conn) -> None:
    if conn.data["auto_async"]:
        await asyncio.sleep(0.01)
        for room in conn.data["auto_async"]:
            conn.join(room)


@app.message(Enlist)
def enlist(conn: wsfan.Conn, msg: Enlist) -> list[str]:
    if msg.leave:
        conn.leave(msg.room, msg.reason)
    else:
        conn.join(msg.room)
    return sorted(conn.rooms)


@app.message(Kick)
def kick(conn: wsfan.Conn, msg: Kick) -> None:
    conn.close(msg.code)
