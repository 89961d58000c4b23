"""An App whose before_join / before_publish hooks take every outcome, for tests/test_app_hooks.py.

The room name picks the hook and the outcome: ``s-<what>`` is decided by the sync hooks,
``a-<what>`` by the async ones (which await before deciding); ``<what>`` is one of
``allow``, ``deny``, ``refuse``, ``lobby`` (rewrite the room to ``<room>.eu``), ``censor``
(publish only: rewrite the payload), ``bad`` (rewrite to an invalid room name), ``escape``
(rewrite to ``secret.vault``, outside the test token's claim), ``crash`` (a plain exception),
``weird`` (a result that is not a verdict), ``also`` (join only: ``conn.join(<room>.also)``, then allow), ``huge`` / ``unsendable`` (publish only: a payload
that is not deliverable / not encodable). Any other room is let through untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

import wsfan

app = wsfan.App()


class Mine(wsfan.Message, tag="mine"):
    """Which rooms this connection is in (sorted): what a refused request must not have changed."""


def _join_outcome(room: str) -> Any:
    what = room[2:]
    if what == "deny":
        return False
    if what == "refuse":
        raise wsfan.Error("ROOM_FULL", "the room is full")
    if what == "lobby":
        return wsfan.Join(room=room + ".eu")
    if what == "bad":
        return wsfan.Join(room="bad room!")
    if what == "escape":
        return wsfan.Join(room="secret.vault")
    if what == "crash":
        raise RuntimeError(f"secret detail join-crash {room}")
    if what == "weird":
        return "somewhere"
    return True if what == "allow" else None


def _join_also(conn: wsfan.Conn, room: str) -> None:
    """``also``: the hook joins the connection to ``<room>.also`` too (``conn.join``), then allows."""
    if room[2:] == "also":
        conn.join(room + ".also")


def _publish_outcome(room: str, payload: Any) -> Any:
    what = room[2:]
    if what == "deny":
        return False
    if what == "refuse":
        raise wsfan.Error("TOO_LOUD", "keep it down")
    if what == "lobby":
        return wsfan.Publish(room=room + ".eu")
    if what == "censor":
        text = payload.get("text", "") if isinstance(payload, dict) else ""
        return wsfan.Publish(payload={"text": "***", "was": len(text)})
    if what == "bad":
        return wsfan.Publish(room="bad room!")
    if what == "escape":
        return wsfan.Publish(room="secret.vault")
    if what == "crash":
        raise RuntimeError(f"secret detail publish-crash {room}")
    if what == "weird":
        return wsfan.Join(room=room)  # a join's verdict from a publish hook
    if what == "huge":
        return wsfan.Publish(payload=2**64)  # no JSON/MessagePack integer carries it to both
    if what == "unsendable":
        return wsfan.Publish(payload=object())
    return None


@app.message(Mine)
def mine(conn: wsfan.Conn, msg: Mine) -> list[str]:
    return sorted(conn.rooms)


@app.before_join
def sync_join(conn: wsfan.Conn, room: str) -> Any:
    if room.startswith("s-"):
        _join_also(conn, room)
        return _join_outcome(room)
    return None


@app.before_join
async def async_join(conn: wsfan.Conn, room: str) -> Any:
    await asyncio.sleep(0.01)  # a real await: the connection's next request must wait for it
    if room.startswith("a-"):
        return _join_outcome(room)
    return None


@app.before_publish
def sync_publish(conn: wsfan.Conn, room: str, payload: Any) -> Any:
    if room.startswith("s-"):
        return _publish_outcome(room, payload)
    return None


@app.before_publish
async def async_publish(conn: wsfan.Conn, room: str, payload: Any) -> Any:
    await asyncio.sleep(0.01)
    if room.startswith("a-"):
        return _publish_outcome(room, payload)
    return None
