"""The design's chat: join/leave announcements, typed messages, ping (built in).

Run (from any directory, with the file's path): ``python examples/chat.py --port 8765`` (any server
flag) or ``wsfan run examples/chat.py:app --port 8765``, and connect with ``?name=alice``.

Client -> server (each may carry an ``id``; the ack's data is shown):
  {"type": "join", "room": "chat:lobby", "id": "1"}      -> built-in join; rooms outside chat:* are FORBIDDEN
  {"type": "enter", "room": "chat:lobby", "id": "2"}     -> ack {"room": "chat:lobby", "seq": N} (announced)
  {"type": "say", "room": "chat:lobby", "text": "hi", "id": "3"} -> ack {"seq": N}
  {"type": "exit", "room": "chat:lobby", "id": "4"}      -> ack {"room": "chat:lobby"} (announced, then left)
  {"type": "ping", "id": "5"}                            -> pong (built in)
``enter``/``say`` in a room not joined answer ``NOT_JOINED``; a disconnect is announced in every room
the connection was in. Everyone in the room, the sender included, gets room messages
``{"type":"message","room","seq","from":"server","payload":{"event": "joined"|"said"|"left", "user", "text"?}}``.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs

import msgspec

import wsfan

app = wsfan.App()

Room = Annotated[str, msgspec.Meta(pattern=r"^chat:[a-z0-9-]{1,32}\Z")]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,24}\Z")]


class Enter(wsfan.Message, tag="enter"):
    room: Room


class Exit(wsfan.Message, tag="exit"):
    room: Room


class Say(wsfan.Message, tag="say"):
    room: Room
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


@app.on_connect
def connect(request: wsfan.ConnectRequest) -> dict[str, str]:
    """Who is talking: the token's subject, else ``?name=``; neither is a 401."""
    names = parse_qs(request.query.decode("latin-1")).get("name", [])
    name = request.user or (names[0] if names else "")
    try:
        msgspec.convert(name, Name)
    except msgspec.ValidationError:
        raise wsfan.Error(
            "NO_NAME", "connect with ?name=<1-24 letters, digits, _ or ->", status=401
        ) from None
    return {"name": name}


@app.before_join
def chat_rooms_only(conn: wsfan.Conn, room: str) -> bool:
    return room.startswith("chat:")


def _joined(conn: wsfan.Conn, room: str) -> None:
    if room not in conn.rooms:
        raise wsfan.Error("NOT_JOINED", f"join {room!r} first")


@app.message(Enter)
async def enter(conn: wsfan.Conn, msg: Enter) -> dict[str, object]:
    _joined(conn, msg.room)
    seq = await app.publish(msg.room, {"event": "joined", "user": conn.data["name"]})
    return {"room": msg.room, "seq": seq}


@app.message(Say)
async def say(conn: wsfan.Conn, msg: Say) -> dict[str, int]:
    _joined(conn, msg.room)
    seq = await app.publish(msg.room, {"event": "said", "user": conn.data["name"], "text": msg.text})
    return {"seq": seq}


@app.message(Exit)
async def exit_(conn: wsfan.Conn, msg: Exit) -> dict[str, str]:
    if msg.room in conn.rooms:
        conn.leave(msg.room)
        await app.publish(msg.room, {"event": "left", "user": conn.data["name"]})
    return {"room": msg.room}


@app.on_disconnect
async def gone(conn: wsfan.Conn, code: int) -> None:
    for room in conn.rooms:
        await app.publish(room, {"event": "left", "user": conn.data["name"], "code": code})


if __name__ == "__main__":
    app.run()
