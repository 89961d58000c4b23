"""A live dashboard fed by a background task: every ``TICK_S`` the server publishes a sample.

Run (from any directory): ``python examples/dashboard.py`` or ``wsfan run examples/dashboard.py:app`` (add ``--broker redis://...`` and ``--workers N``: each
worker has its own feed, tagged with its node). Clients ``join`` the room ``dashboard:load`` and
receive ``{"type":"message","room":"dashboard:load","from":"server","payload":{"tick","node","load1","connections"}}``.
A ``snapshot`` request (``{"type":"snapshot","id":"1"}``) answers the latest sample at once.

Operators (connections opened with ``?operator=<DASHBOARD_OPERATOR_KEY>``; none when the variable
is unset) may ``{"type":"announce","text":"..."}``: every connection on every node, watching the
dashboard or not, gets ``{"type":"broadcast","payload":{"announcement":text,"node":...}}`` once
(``app.broadcast``: no room, no history, so a screen that connects later does not see it).
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Annotated
from urllib.parse import parse_qs

import msgspec

import wsfan

app = wsfan.App()
ROOM = "dashboard:load"
TICK_S = float(os.environ.get("DASHBOARD_TICK_S", "0.2"))
latest: dict[str, object] = {}
_tasks: set[asyncio.Task[None]] = set()


OPERATOR_KEY = os.environ.get("DASHBOARD_OPERATOR_KEY", "")


class Snapshot(wsfan.Message, tag="snapshot"):
    pass


class Announce(wsfan.Message, tag="announce"):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


@app.on_connect
def operator(request: wsfan.ConnectRequest) -> dict[str, bool]:
    given = parse_qs(request.query.decode("latin-1")).get("operator", [""])[0]
    # Bytes, not str: compare_digest refuses a str with non-ASCII characters (TypeError), and
    # ?operator= is whatever a client sends.
    key = OPERATOR_KEY.encode()
    return {"operator": bool(key) and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key)}


@app.before_join
def dashboard_rooms_only(conn: wsfan.Conn, room: str) -> bool:
    return room.startswith("dashboard:")


@app.before_publish
def read_only(conn: wsfan.Conn, room: str) -> bool:
    return False  # only the feed publishes


@app.message(Snapshot)
def snapshot(conn: wsfan.Conn, msg: Snapshot) -> dict[str, object]:
    return latest


@app.message(Announce)
async def announce(conn: wsfan.Conn, msg: Announce) -> None:
    if not conn.data.get("operator"):
        raise wsfan.Error("FORBIDDEN", "only operators announce")
    await app.broadcast({"announcement": msg.text, "node": app.node_id})


async def feed() -> None:
    tick = 0
    while True:
        tick += 1
        latest.update(tick=tick, node=app.node_id, load1=os.getloadavg()[0], connections=app.connections)
        try:
            await app.publish(ROOM, latest)
        except wsfan.BrokerUnavailable:
            pass  # the broker is down: skip this sample, the next one tries again
        await asyncio.sleep(TICK_S)


@app.on_startup
def start_feed() -> None:
    task = asyncio.get_running_loop().create_task(feed(), name="dashboard-feed")
    _tasks.add(task)  # keep a reference: the loop holds tasks weakly


if __name__ == "__main__":
    app.run()
