"""An App that hands the server a value of the test's choosing on every surface that encodes one,
for tests/test_app_values.py: a handler's result (sync and async), ``conn.send``, ``app.publish``,
``app.broadcast`` and a before_publish hook's payload (a publish of ``{"use": name}``)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import wsfan

VALUES: dict[str, Any] = {
    "nan": math.nan,
    "inf": math.inf,
    "ninf": -math.inf,
    "nested_nan": {"a": [1, {"b": math.nan}]},
    "big": 2**70,
    "bytes": b"x",
    "int_key": {1: "one"},
    "unencodable": object(),
    "overflow": 1e308 * 10,  # inf, as examples/rpc.py add(1e308, 1e308)
    "negzero": -0.0,
    "fine": {"x": 1.5, "n": [1, -2, 2**64 - 1], "s": "é"},
}

app = wsfan.App()


class Give(wsfan.Message, tag="give"):
    name: str


class Send(wsfan.Message, tag="send"):
    name: str


class Announce(wsfan.Message, tag="announce"):
    name: str
    broadcast: bool = False


class GiveNow(wsfan.Message, tag="give_now"):
    name: str


@app.message(Give)
async def give(conn: wsfan.Conn, msg: Give) -> Any:
    await asyncio.sleep(0)
    return VALUES[msg.name]


@app.message(GiveNow)
def give_now(conn: wsfan.Conn, msg: GiveNow) -> Any:
    return VALUES[msg.name]


@app.message(Send)
def send(conn: wsfan.Conn, msg: Send) -> str:
    try:
        conn.send({"type": "pushed", "value": VALUES[msg.name]})
    except ValueError as exc:
        return f"refused: {exc}"
    return "sent"


@app.message(Announce)
async def announce(conn: wsfan.Conn, msg: Announce) -> str:
    try:
        if msg.broadcast:
            await app.broadcast(VALUES[msg.name])
        else:
            await app.publish("r", VALUES[msg.name])
    except ValueError as exc:
        return f"refused: {exc}"
    return "sent"


@app.before_publish
def rewrite(conn: wsfan.Conn, room: str, payload: Any) -> Any:
    if isinstance(payload, dict) and "use" in payload:
        return wsfan.Publish(payload=VALUES[payload["use"]])
    return True
