"""Cluster-wide commands: disconnect a user, unsubscribe a user from a room, broadcast to everyone,
and the survey behind ``GET /rooms`` (every node's rooms with their subscriber counts).

They travel as publications to one reserved room, ``CONTROL_ROOM``, which every node joins at
start with a member of its own: a ``Session`` whose peer, instead of writing frames to a
socket, reads each delivery's payload as a command and carries it out on this node. So the
commands use the broker exactly as publications do (in order, to every node; the in-process
broker delivers to this node only) and the fan-out path has no test for them. ``$`` is not
allowed in client room names (PROTOCOL.md), so no client can join or publish to the room.

The rooms survey is a request/reply, as Centrifugo's ``channels`` server API does it: the asking
node publishes a ``RoomsQuery`` to the control room; every node answers with a ``RoomsReply``
(its own rooms, a bounded page of them) published to the asking node's reply room
``$wsfan.reply.<node>``, which only that node's control member joins. Which nodes to wait for is
the control room's presence: each node's control member is an entry there (kept alive in Redis
with ``--presence-ttl`` like any presence entry, so a dead node drops out of it within the TTL),
less those with no subscriber to their reply room through the broker now (``Broker.listeners``):
a node killed -9 is still in presence until its TTL, but its broker connection is closed.
Nothing is kept or refreshed for the survey between queries: its cost is paid when asked.

Both rooms are reserved (``broker.reserved``): every broker delivers their publications without
a seq and keeps none of them (no history, no Redis key), so the control traffic is never stored,
and a node away from the broker when a command is sent misses it (no catch-up).
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from wsfan.server.broker import BroadcastPush, BrokerUnavailable, PresenceEntry, Publication
from wsfan.server.protocol import Codec, Encoding, PayloadRefused, frame_payload, payload_problem

if TYPE_CHECKING:
    from wsfan.server.hub import Hub, Session

log = logging.getLogger("wsfan.control")

CONTROL_ROOM = "$wsfan.control"
REPLY_PREFIX = "$wsfan.reply."  # + node id: the room a node's survey replies come to
# How long GET /rooms waits for every node's reply; the answer names the nodes that were late.
SURVEY_TIMEOUT_S = 2.0


class Disconnect(msgspec.Struct, tag="disconnect"):
    user: str
    code: int
    reason: str = ""


class Unsubscribe(msgspec.Struct, tag="unsubscribe"):
    user: str
    room: str
    reason: str = ""  # the unsubscribed push's (POST /unsubscribe)


class Broadcast(msgspec.Struct, tag="broadcast"):
    """A room-less push: every WebSocket connection of every node gets ``{"type":"broadcast","payload"}``."""

    payload: msgspec.Raw


class _Delivery(msgspec.Struct):
    """The part of a control-room delivery that matters: its payload, kept as sent (a command).

    ``type``: a ``left`` event of an expired presence entry (a dead node's) may come too.
    """

    payload: msgspec.Raw = msgspec.Raw(b"null")
    type: str = "message"


class RoomsQuery(msgspec.Struct, tag="rooms_query"):
    """``GET /rooms`` asks every node: its rooms named ``> after`` starting with ``prefix``, at most ``limit``."""

    id: str
    node: str  # the asking node: replies go to its reply room
    prefix: str = ""
    after: str = ""
    limit: int = 1000


class RoomsReply(msgspec.Struct, tag="rooms_reply"):
    """One node's answer: its first ``limit`` matching rooms by name, ``[name, subscribers]``; ``more``
    when it has further matching rooms."""

    id: str
    node: str
    rooms: list[tuple[str, int]]
    more: bool = False


Command = Disconnect | Unsubscribe | Broadcast | RoomsQuery | RoomsReply
_decode_delivery = msgspec.json.Decoder(_Delivery).decode
_to_command = msgspec.json.Decoder(Command).decode


class ControlPeer:
    """The hub ``Peer`` of this node's member of ``CONTROL_ROOM``: each delivered frame is a command."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.surveys: dict[str, Survey] = {}  # this node's GET /rooms in flight, by query id

    def flush(self, session: Session) -> None:
        frames = list(session.out)
        session.out.clear()
        loop = asyncio.get_running_loop()
        for frame in frames:
            try:
                delivery = _decode_delivery(frame_payload(frame))
                if delivery.type != "message":
                    continue
                command = _to_command(delivery.payload)
            except msgspec.DecodeError:
                log.error("unreadable control message in %s; ignored", CONTROL_ROOM)
                continue
            loop.call_soon(self.run, command)  # not while the hub is flushing

    def run(self, command: Command) -> None:
        hub = self.hub
        if isinstance(command, RoomsQuery):
            self._answer(command)
            return
        if isinstance(command, RoomsReply):
            survey = self.surveys.get(command.id)
            if survey is not None:
                survey.add(command)
            return
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
                    hub.leave(s, command.room, command.reason)  # with its unsubscribed push
                    n += 1
            log.info("unsubscribe %r from %r: %d connection(s) on this node", command.user, command.room, n)

    def _answer(self, query: RoomsQuery) -> None:
        """Publish this node's page of rooms to the asking node's reply room."""
        rooms, more = local_rooms(self.hub, query.prefix, query.after, query.limit)
        reply = RoomsReply(query.id, self.hub.node_id, rooms, more)
        try:
            result = self.hub.publish(
                reply_room(query.node), "server", msgspec.json.encode(reply), Encoding.JSON
            )
        except BrokerUnavailable:
            log.warning("rooms survey %s: broker unavailable, no reply from this node", query.id)
            return
        if inspect.isawaitable(result):
            self.hub._spawn(_replied(result, query.id))

    def close(self, code: int, reason: str) -> None:
        pass


async def _replied(pending: Any, query_id: str) -> None:
    try:
        await pending
    except BrokerUnavailable:
        log.warning("rooms survey %s: broker unavailable, no reply from this node", query_id)


def reply_room(node_id: str) -> str:
    return REPLY_PREFIX + node_id


def reserved(hub: Hub) -> int:
    """How many of ``hub.rooms`` are this node's control rooms (left out of wsfan_rooms and GET /rooms)."""
    return (CONTROL_ROOM in hub.rooms) + (reply_room(hub.node_id) in hub.rooms)


def local_rooms(
    hub: Hub, prefix: str = "", after: str = "", limit: int = 1000
) -> tuple[list[tuple[str, int]], bool]:
    """This node's rooms with local subscribers (WebSocket and SSE), ``[name, count]`` sorted by name.

    Only names starting with ``prefix`` and sorting after ``after``; the first ``limit`` of them,
    and whether there were more. Reserved rooms (``$...``) are left out.
    """
    names = [
        name
        for name, room in hub.rooms.items()
        if room and name > after and name.startswith(prefix) and not name.startswith("$")
    ]
    first = heapq.nsmallest(limit + 1, names)
    rooms = hub.rooms
    return [(name, len(rooms[name])) for name in first[:limit]], len(first) > limit


@dataclass
class Survey:
    """One ``GET /rooms`` in flight on the asking node: the replies so far, by node."""

    expected: set[str]
    replies: dict[str, RoomsReply] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, reply: RoomsReply) -> None:
        self.replies[reply.node] = reply
        if self.expected <= self.replies.keys():
            self.done.set()


@dataclass
class RoomsPage:
    """``GET /rooms``'s answer: rooms summed over the nodes that answered, the nodes that did not."""

    rooms: list[tuple[str, int]]
    more: bool
    nodes: list[str]
    missing: list[str]


class Control:
    """This node's side of the control room: its member (``ControlPeer``) and its presence entry there."""

    def __init__(self, hub: Hub) -> None:
        from wsfan.server.hub import Session

        self.hub = hub
        self.peer = ControlPeer(hub)
        self.session = Session(self.peer, f"{hub.node_id}-control", "$control", Codec(Encoding.JSON), None)
        self.entry = PresenceEntry(self.session.conn_id, hub.node_id, int(time.time() * 1000))

    async def join(self) -> None:
        """Join ``CONTROL_ROOM`` and this node's reply room, and enter the control room's presence.

        Returns once the broker took the presence entry (a broker without its backend keeps it
        and writes it when back), so a survey started after this node listens waits for it.
        Neither room counts as a room of the product (wsfan_rooms, GET /rooms).
        """
        hub = self.hub
        for room in (CONTROL_ROOM, reply_room(hub.node_id)):
            hub._add(self.session, room)
            hub.stats.rooms_created -= 1
        done = hub.broker.join_presence(CONTROL_ROOM, self.entry, True, False)
        if inspect.isawaitable(done):
            await done

    async def leave(self) -> None:
        """Leave the control room's presence (at shutdown), so that surveys stop waiting for this node."""
        done = self.hub.broker.leave_presence(CONTROL_ROOM, self.entry, True, False)
        if inspect.isawaitable(done):
            await done

    async def nodes(self) -> set[str]:
        """Every node in the control room's presence (this one included). ``BrokerUnavailable`` as presence."""
        entries = self.hub.broker.presence(CONTROL_ROOM)
        if inspect.isawaitable(entries):
            entries = await entries
        return {e.user for e in entries} | {self.hub.node_id}

    async def reachable(self, nodes: set[str]) -> set[str]:
        """Of ``nodes``, this one and those subscribed to their reply room through the broker now
        (``Broker.listeners``). A node killed -9 stays in the control room's presence until its
        entry's TTL (``--presence-ttl``, 60 s) passes, but its broker connection closes with it:
        it cannot receive a query, so it is not waited for."""
        me = self.hub.node_id
        others = sorted(nodes - {me})
        if not others:
            return {me}
        counts = self.hub.broker.listeners([reply_room(n) for n in others])
        if inspect.isawaitable(counts):
            counts = await counts
        return {me} | {n for n in others if counts.get(reply_room(n), 0) > 0}

    async def rooms(
        self, prefix: str = "", after: str = "", limit: int = 1000, timeout: float = SURVEY_TIMEOUT_S
    ) -> RoomsPage:
        """Rooms with subscribers on every node, counts summed: the first ``limit`` named after ``after``.

        Asks every node in the control room's presence and waits for those reachable through the
        broker now (``reachable``), at most ``timeout`` s: the answer comes as soon as each of
        them replied. The page names the nodes that did not answer (unreachable or late: their
        rooms are not in it). Raises ``BrokerUnavailable`` when the query cannot be sent.
        """
        expected = await self.nodes()
        awaited = await self.reachable(expected)
        query = RoomsQuery(secrets.token_hex(8), self.hub.node_id, prefix, after, limit)
        survey = self.peer.surveys[query.id] = Survey(awaited)
        try:
            result = send(self.hub, query)
            if not isinstance(result, Publication):
                await result
            try:
                await asyncio.wait_for(survey.done.wait(), timeout)
            except TimeoutError:
                pass
        finally:
            del self.peer.surveys[query.id]
        totals: dict[str, int] = {}
        more = False
        for reply in survey.replies.values():
            more = more or reply.more
            for name, count in reply.rooms:
                totals[name] = totals.get(name, 0) + count
        names = sorted(totals)
        more = more or len(names) > limit
        page = [(name, totals[name]) for name in names[:limit]]
        answered = sorted(survey.replies)
        return RoomsPage(page, more, answered, sorted(expected - survey.replies.keys()))


async def join_control(hub: Hub) -> Control:
    """Give this node its member of ``CONTROL_ROOM`` (at start, after the broker, before any client).

    Added to the rooms directly (no history replay, not in ``hub.sessions``); its presence entry
    in the control room tells a survey that this node is there to answer.
    """
    control = Control(hub)
    await control.join()
    return control


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

    Rides the control room like the other commands (unnumbered and kept nowhere: the broker
    contract's "Reserved rooms"). ``PayloadRefused`` when the payload is not a
    value both encodings carry (PROTOCOL.md, payload rule); ``BrokerUnavailable`` as for a publish.
    """
    problem = payload_problem(payload, Encoding.JSON)
    if problem is not None:
        raise PayloadRefused(problem)
    return send(hub, Broadcast(msgspec.Raw(payload)))


def send(hub: Hub, command: Command) -> Publication | Any:
    """Publish ``command`` to every node (this one included); the publication or its awaitable."""
    return hub.publish(CONTROL_ROOM, "server", msgspec.json.encode(command), Encoding.JSON)
