"""Cluster-wide commands of the server API (disconnect a user, unsubscribe a user from a room).

They travel as publications to one reserved room, ``CONTROL_ROOM``, which every node joins at
start with a member of its own: a ``Session`` whose peer, instead of writing frames to a
socket, reads each delivery's payload as a command and carries it out on this node. So the
commands use the broker exactly as publications do (in order, to every node; the in-process
broker delivers to this node only) and the fan-out path has no test for them. ``$`` is not
allowed in client room names (PROTOCOL.md), so no client can join or publish to the room.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from wsfan.server.broker import Publication
from wsfan.server.protocol import Codec, Encoding, frame_payload

if TYPE_CHECKING:
    from wsfan.server.hub import Hub, Session

log = logging.getLogger("wsfan.control")

CONTROL_ROOM = "$wsfan.control"


class Disconnect(msgspec.Struct, tag="disconnect"):
    user: str
    code: int
    reason: str = ""


class Unsubscribe(msgspec.Struct, tag="unsubscribe"):
    user: str
    room: str


Command = Disconnect | Unsubscribe
_decode_delivery = msgspec.json.Decoder(dict[str, Any]).decode
_to_command = msgspec.json.Decoder(Command).decode


class ControlPeer:
    """The hub ``Peer`` of this node's member of ``CONTROL_ROOM``: each delivered frame is a command."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def flush(self, session: Session) -> None:
        frames = list(session.out)
        session.out.clear()
        loop = asyncio.get_running_loop()
        for frame in frames:
            try:
                delivery = _decode_delivery(frame_payload(frame))
                command = _to_command(msgspec.json.encode(delivery["payload"]))
            except (msgspec.DecodeError, KeyError, TypeError):
                log.error("unreadable control message in %s; ignored", CONTROL_ROOM)
                continue
            loop.call_soon(self.run, command)  # not while the hub is flushing

    def run(self, command: Command) -> None:
        hub = self.hub
        sessions = [s for s in hub.sessions.values() if s.user == command.user and s.peer is not self]
        if isinstance(command, Disconnect):
            for s in sessions:
                s.peer.close(command.code, command.reason)
            log.info(
                "disconnect %r: %d connection(s) on this node closed with %d",
                command.user, len(sessions), command.code,
            )  # fmt: skip
        else:
            n = 0
            for s in sessions:
                if command.room in s.rooms:
                    hub.leave(s, command.room)
                    n += 1
            log.info("unsubscribe %r from %r: %d connection(s) on this node", command.user, command.room, n)

    def close(self, code: int, reason: str) -> None:
        pass


def join_control(hub: Hub) -> None:
    """Give this node its member of ``CONTROL_ROOM`` (at start, after the broker, before any client).

    Added to the room directly (no history replay, no presence, not in ``hub.sessions``).
    """
    from wsfan.server.hub import Session

    s = Session(ControlPeer(hub), f"{hub.node_id}-control", "$control", Codec(Encoding.JSON), None)
    hub._add(s, CONTROL_ROOM)
    hub.stats.rooms_created -= 1  # not a room of the product: wsfan_rooms and GET /rooms leave it out too


def close_problem(code: int, reason: str) -> str | None:
    """Why a close a server may send (application or server API) is not allowed, or None.

    RFC 6455 7.4: 1000, 1001, 1008 and 1011 are the defined codes a server sends on purpose;
    4000-4999 are private. A close frame's reason is at most 123 bytes of UTF-8 (5.5).
    """
    if not (4000 <= code <= 4999 or code in (1000, 1001, 1008, 1011)):
        return "code must be 1000, 1001, 1008, 1011 or 4000-4999 (RFC 6455 7.4)"
    if len(reason.encode("utf-8", "surrogatepass")) > 123:
        return "reason is at most 123 bytes of UTF-8 (RFC 6455 5.5)"
    return None


def send(hub: Hub, command: Command) -> Publication | Any:
    """Publish ``command`` to every node (this one included); the publication or its awaitable."""
    return hub.publish(CONTROL_ROOM, "server", msgspec.json.encode(command), Encoding.JSON)
