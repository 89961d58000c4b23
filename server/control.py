"""Cluster-wide commands: disconnect a user, unsubscribe a user from a room, broadcast to everyone.

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

from wsfan.server.broker import BroadcastPush, Publication
from wsfan.server.protocol import Codec, Encoding, PayloadRefused, frame_payload, payload_problem

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


class Broadcast(msgspec.Struct, tag="broadcast"):
    """A room-less push: every WebSocket connection of every node gets ``{"type":"broadcast","payload"}``."""

    payload: msgspec.Raw


class _Delivery(msgspec.Struct):
    """The part of a control-room delivery that matters: its payload, kept as sent (a command)."""

    payload: msgspec.Raw


Command = Disconnect | Unsubscribe | Broadcast
_decode_delivery = msgspec.json.Decoder(_Delivery).decode
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
                command = _to_command(_decode_delivery(frame_payload(frame)).payload)
            except msgspec.DecodeError:
                log.error("unreadable control message in %s; ignored", CONTROL_ROOM)
                continue
            loop.call_soon(self.run, command)  # not while the hub is flushing

    def run(self, command: Command) -> None:
        hub = self.hub
        if isinstance(command, Broadcast):
            # bytes(): the Raw points into the control frame, which this push must not keep alive
            n = hub.broadcast(BroadcastPush(bytes(command.payload)))
            log.debug("broadcast to %d connection(s) on this node", n)
            return
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


def broadcast(hub: Hub, payload: bytes) -> Publication | Any:
    """Push JSON ``payload`` to every WebSocket connection of every node; the publication or its awaitable.

    Rides the control room like the other commands (its seq and the broker's copy are the
    control room's, never shown to clients). ``PayloadRefused`` when the payload is not a
    value both encodings carry (PROTOCOL.md, payload rule); ``BrokerUnavailable`` as for a publish.
    """
    problem = payload_problem(payload, Encoding.JSON)
    if problem is not None:
        raise PayloadRefused(problem)
    return send(hub, Broadcast(msgspec.Raw(payload)))


def send(hub: Hub, command: Command) -> Publication | Any:
    """Publish ``command`` to every node (this one included); the publication or its awaitable."""
    return hub.publish(CONTROL_ROOM, "server", msgspec.json.encode(command), Encoding.JSON)
