"""The sans-I/O hub alone: corking, frame sharing, extension points and the INTERNAL error.

These are the properties a socket cannot show directly (which bytes object went
to whom, how many writes per loop iteration), so the hub is driven with a
recording peer, exactly as the architecture intends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from wsfan.server.broker.memory import MemoryBroker
from wsfan.server.hub import Hub, Session
from wsfan.server.protocol import Encoding
from wsfan.server.wire import ErrorCode, Inbound


class RecordingPeer:
    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.closed: list[tuple[int, str]] = []

    def flush(self, session: Session) -> None:
        self.writes.append(list(session.out))
        session.out.clear()

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def messages(self) -> list[dict]:
        return [msgspec.json.decode(_unframe(f)) for batch in self.writes for f in batch]


def _unframe(frame: bytes) -> bytes:
    n = frame[1] & 0x7F
    return frame[2 + (2 if n == 126 else 8 if n == 127 else 0) :]


class StreamRecordingPeer(RecordingPeer):
    """A ``StreamPeer``: records refusals of the stream's join."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[tuple[str, str]] = []

    def refused(self, code: str, message: str) -> None:
        self.refusals.append((code, message))


def make_hub(**kw) -> tuple[Hub, list[Callable[[], None]]]:
    scheduled: list[Callable[[], None]] = []
    hub = Hub(MemoryBroker(10), node_id="t", schedule=scheduled.append, rate_limit=0, **kw)
    return hub, scheduled


def run(scheduled: list[Callable[[], None]]) -> None:
    while scheduled:
        scheduled.pop(0)()


def send(hub: Hub, s: Session, obj: dict) -> None:
    hub.receive(s, msgspec.json.encode(obj), 0x1)


def test_one_write_per_connection_per_loop_iteration():
    hub, scheduled = make_hub()
    peers = [RecordingPeer() for _ in range(3)]
    sessions = [hub.open(p, Encoding.JSON) for p in peers]
    for s in sessions:
        send(hub, s, {"type": "join", "room": "r"})
    run(scheduled)
    for p in peers:
        p.writes.clear()
    for i in range(5):
        send(hub, sessions[0], {"type": "publish", "room": "r", "payload": i})
    assert len(scheduled) == 1, "one flush scheduled for the whole burst"
    run(scheduled)
    assert peers[0].writes == [], "the sender gets nothing"
    for p in peers[1:]:
        assert len(p.writes) == 1 and len(p.writes[0]) == 5, "five deliveries, one write"


def test_every_subscriber_gets_the_same_frame_object():
    hub, scheduled = make_hub()
    peers = [RecordingPeer() for _ in range(4)]
    sessions = [hub.open(p, Encoding.JSON) for p in peers]
    for s in sessions:
        send(hub, s, {"type": "join", "room": "r"})
    run(scheduled)
    for p in peers:
        p.writes.clear()
    send(hub, sessions[0], {"type": "publish", "room": "r", "payload": {"a": 1}})
    run(scheduled)
    frames = [p.writes[0][0] for p in peers[1:]]
    assert all(f is frames[0] for f in frames), "encoded and framed once, shared by all"
    assert hub.stats.deliveries == 3


def test_a_crashing_handler_is_internal_and_logged(caplog):
    class Boom(Inbound, tag="boom"):
        pass

    def explode(s: Session, m: Boom) -> None:
        raise RuntimeError("kaput")

    hub, scheduled = make_hub()
    hub.register(Boom, explode)
    peer = RecordingPeer()
    s = hub.open(peer, Encoding.JSON)
    with caplog.at_level(logging.ERROR, logger="wsfan.hub"):
        send(hub, s, {"type": "boom", "id": "b1"})
    run(scheduled)
    err = peer.messages()[-1]
    assert err == {
        "type": "error",
        "requestId": "b1",
        "success": False,
        "code": "INTERNAL",
        "message": "internal error",
    }
    assert "kaput" in caplog.text and "Traceback" in caplog.text
    # The connection carries on.
    send(hub, s, {"type": "ping", "id": "p"})
    run(scheduled)
    assert peer.messages()[-1]["type"] == "pong"
    assert peer.closed == []


def test_registered_message_type_gets_its_handler():
    class Whoami(Inbound, tag="whoami"):
        pass

    hub, scheduled = make_hub()

    def whoami(s: Session, m: Whoami) -> None:
        hub.ack(s, m.id, {"user": s.user})

    hub.register(Whoami, whoami)
    peer = RecordingPeer()
    s = hub.open(peer, Encoding.JSON)
    send(hub, s, {"type": "whoami", "id": "w"})
    run(scheduled)
    assert peer.messages()[-1]["data"] == {"user": s.user}


def test_authorize_hook_refuses_with_forbidden():
    hub, scheduled = make_hub()
    hub.authorize = lambda s, action, room: room.startswith("public.")
    peer = RecordingPeer()
    s = hub.open(peer, Encoding.JSON)
    send(hub, s, {"type": "join", "id": "1", "room": "secret"})
    send(hub, s, {"type": "join", "id": "2", "room": "public.x"})
    send(hub, s, {"type": "publish", "id": "3", "room": "secret", "payload": 1})
    run(scheduled)
    codes = [m.get("code", m["type"]) for m in peer.messages()[1:]]
    assert codes == ["FORBIDDEN", "ack", "FORBIDDEN"]
    assert set(s.rooms) == {"public.x"}


def test_closing_a_session_leaves_its_rooms_and_frees_empty_ones():
    hub, scheduled = make_hub()
    s = hub.open(RecordingPeer(), Encoding.JSON)
    send(hub, s, {"type": "join", "room": "a"})
    send(hub, s, {"type": "join", "room": "b"})
    assert set(hub.rooms) == {"a", "b"}
    hub.close(s)
    assert hub.rooms == {} and hub.sessions == {}


def test_cork_delay_batches_a_busy_connection_and_spares_a_quiet_one():
    now = [100.0]
    soon: list[Callable[[], None]] = []
    later: list[tuple[float, Callable[[], None]]] = []
    hub = Hub(
        MemoryBroker(10),
        node_id="t",
        schedule=soon.append,
        rate_limit=0,
        cork_delay=0.002,
        schedule_later=lambda d, f: later.append((d, f)),
        clock=lambda: now[0],
    )
    peers = [RecordingPeer(), RecordingPeer()]
    a, b = (hub.open(p, Encoding.JSON) for p in peers)
    run(soon)  # welcome frames: after a quiet spell the first flush is immediate
    assert later == []
    for s in (a, b):
        send(hub, s, {"type": "join", "id": "j", "room": "r"})
    assert later and abs(later[0][0] - 0.002) < 1e-9, (
        "a flush 0 ms after the last one waits for the cork delay"
    )
    later.pop()[1]()
    peers[1].writes.clear()
    now[0] += 0.0005
    for i in range(3):
        send(hub, a, {"type": "publish", "room": "r", "payload": i})
    delay, flush = later.pop()
    assert abs(delay - 0.0015) < 1e-9, "waits only for what is left of the delay"
    flush()
    assert len(peers[1].writes) == 1 and len(peers[1].writes[0]) == 3
    now[0] += 1.0
    send(hub, a, {"type": "publish", "room": "r", "payload": "quiet"})
    assert soon and not later, "after a quiet second the flush is immediate again"


def test_replies_are_written_before_fan_out():
    """The publisher's ack leaves first, so it can send its next publish while subscribers are written."""
    order: list[str] = []

    class OrderedPeer(RecordingPeer):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def flush(self, session: Session) -> None:
            order.append(self.name)
            super().flush(session)

    hub, scheduled = make_hub()
    subs = [OrderedPeer(f"sub{i}") for i in range(3)]
    pub_peer = OrderedPeer("publisher")
    sessions = [hub.open(p, Encoding.JSON) for p in subs]
    publisher = hub.open(pub_peer, Encoding.JSON)
    for s in (*sessions, publisher):
        send(hub, s, {"type": "join", "room": "r"})
    run(scheduled)
    order.clear()
    send(hub, publisher, {"type": "publish", "id": "p1", "room": "r", "payload": 1})
    run(scheduled)
    assert order == ["publisher", "sub0", "sub1", "sub2"]
    assert pub_peer.messages()[-1]["requestId"] == "p1"


def test_a_stream_session_gets_deliveries_only_and_the_hub_never_reads_frame_bytes():
    """SSE is a property of the session (``open_stream``), not of the frame's first bytes; a stream
    gets no ack or error frame (its join's "ack" is the ``: joined`` comment)."""
    hub, scheduled = make_hub()
    pub_peer, stream_peer = RecordingPeer(), StreamRecordingPeer()
    publisher = hub.open(pub_peer, Encoding.JSON)
    send(hub, publisher, {"type": "join", "id": "j", "room": "r"})
    send(hub, publisher, {"type": "publish", "room": "r", "payload": {"n": 1}})
    stream = hub.open_stream(stream_peer)
    hub.join(stream, "r", since=0, request_id="sse-join")  # replays seq 1; its ack is not for a stream
    hub.error(stream, "x", ErrorCode.FORBIDDEN, "no")  # an error is the peer's refusal, not a frame
    assert stream_peer.refusals == [("FORBIDDEN", "no")]
    hub.ack(stream, "y", {})
    send(hub, publisher, {"type": "publish", "room": "r", "payload": {"n": 2}})
    # An SSE frame is whatever the session's encoding builds, even a text that does not
    # start with "id: ": the hub queues deliveries for a stream without looking at them.
    hub.send(stream, b"retry: 1000\n\n")
    run(scheduled)
    frames = [f for batch in stream_peer.writes for f in batch]
    epoch = hub.broker.history("r", None).epoch.encode()  # the id names the room's incarnation too
    assert frames == [
        b": joined r\n\n",  # the join took effect in r: the comment, before any delivery
        b"id: "
        + epoch
        + b':1\ndata: {"type":"message","room":"r","seq":1,"from":"'
        + publisher.user.encode()
        + b'","payload":{"n":1}}\n\n',
        b"id: "
        + epoch
        + b':2\ndata: {"type":"message","room":"r","seq":2,"from":"'
        + publisher.user.encode()
        + b'","payload":{"n":2}}\n\n',
        b"retry: 1000\n\n",
    ]
    assert [m["type"] for m in pub_peer.messages()] == ["welcome", "ack"]


def test_a_session_gets_its_rate_bucket_with_its_first_message_and_is_limited_from_there():
    """An idle connection holds no token bucket (issue 19, memory); the first message makes one,
    as full as one made at connect would be by then, so a burst past it is still refused."""
    scheduled: list[Callable[[], None]] = []
    hub = Hub(MemoryBroker(10), node_id="t", schedule=scheduled.append, rate_limit=0.001, rate_burst=2)
    peer = RecordingPeer()
    s = hub.open(peer, Encoding.JSON)
    idle = hub.open(RecordingPeer(), Encoding.JSON)
    assert s.bucket is idle.bucket  # one shared marker, no bucket per connection yet
    for i in range(3):
        send(hub, s, {"type": "ping", "id": str(i)})
    run(scheduled)
    assert s.bucket is not idle.bucket
    replies = peer.messages()[1:]  # after the welcome
    assert [r["type"] for r in replies] == ["pong", "pong", "error"]
    assert replies[2]["code"] == ErrorCode.RATE_LIMITED


def test_a_welcome_sent_with_the_101_is_not_queued_again():
    """The transport sends Hub.welcome(...) in the 101's write and opens the session with its id."""
    hub, scheduled = make_hub()
    peer = RecordingPeer()
    conn_id = hub.new_id()
    frame = hub.welcome(Encoding.JSON, conn_id)
    s = hub.open(peer, Encoding.JSON, conn_id=conn_id)
    run(scheduled)
    assert s.conn_id == conn_id and hub.sessions[conn_id] is s
    assert peer.writes == []
    welcome = msgspec.json.decode(_unframe(frame))
    assert (welcome["type"], welcome["conn"], welcome["user"]) == ("welcome", conn_id, conn_id)
    assert hub.new_id() != conn_id


def test_a_sessions_rooms_are_a_small_tuple_then_a_set_and_hold_the_rooms_own_names():
    """Membership per connection (issue 19, memory): a tuple up to 8 rooms (a set costs 216 B even for
    one), a set beyond, a tuple again below; each name is the room's own string, not the decoded one."""
    hub, scheduled = make_hub()
    first, s = RecordingPeer(), RecordingPeer()
    a = hub.open(first, Encoding.JSON)
    b = hub.open(s, Encoding.JSON)
    names = [f"room-{i}" for i in range(10)]
    for name in names:
        send(hub, a, {"type": "join", "room": name, "id": name})
        send(hub, b, {"type": "join", "room": name, "id": name})
        assert type(b.rooms) is (tuple if len(b.rooms) <= 8 else set)
    run(scheduled)
    assert set(b.rooms) == set(names)
    assert all(r is hub.rooms[r].name for r in b.rooms)
    assert {id(r) for r in a.rooms} == {id(r) for r in b.rooms}
    send(hub, b, {"type": "join", "room": "room-3", "id": "again"})  # a second join adds nothing
    for name in names[:3]:
        send(hub, b, {"type": "leave", "room": name})
    assert type(b.rooms) is tuple and sorted(b.rooms) == names[3:]
    send(hub, b, {"type": "publish", "room": "room-0", "payload": 1, "id": "p"})
    run(scheduled)
    assert s.messages()[-1]["code"] == ErrorCode.NOT_JOINED
    hub.close(b)
    assert all(b not in hub.rooms[n].json for n in names)


class TwoChannelBroker(MemoryBroker):
    """The in-memory broker with a broker's two channels to a node (Redis: a history read and the
    pub/sub stream): ``history`` answers through an awaitable at once, while live publications
    wait in ``in_flight`` until the test lets them reach the hub. The race a real Redis runs
    now and then (tests/test_server_subs.py, flooded), made to happen every time."""

    def __init__(self) -> None:
        super().__init__(100)
        self.in_flight: list[Any] = []
        self.to_hub: Callable[[Any], None] | None = None

    def bind(self, deliver: Callable[[Any], None]) -> None:
        self.to_hub = deliver
        super().bind(self.in_flight.append)

    def history(self, room: str, since: int | None, epoch: str | None = None) -> Any:
        hist = super().history(room, since, epoch)

        async def read() -> Any:
            return hist

        return read()

    def release(self) -> None:
        assert self.to_hub is not None
        pubs = list(self.in_flight)
        self.in_flight.clear()  # the same list: the broker appends to it
        for pub in pubs:
            self.to_hub(pub)


@pytest.mark.parametrize("server_join", [True, False], ids=["conn.join", "join request"])
def test_a_join_through_a_broker_waits_for_the_live_stream_to_reach_its_seq(server_join: bool) -> None:
    """The history read says the room is at 3 while 2 and 3 are still on their way to the node:
    the join takes effect (ack or ``subscribed`` at 3) only once they passed, so the first live
    delivery after it is 4, never 2 (which a client takes for a restarted room)."""

    async def go() -> list[dict[str, Any]]:
        broker = TwoChannelBroker()
        loop = asyncio.get_running_loop()
        hub = Hub(broker, node_id="t", schedule=loop.call_soon, rate_limit=0)
        pub_peer, peer = RecordingPeer(), RecordingPeer()
        publisher = hub.open(pub_peer, Encoding.JSON)
        s = hub.open(peer, Encoding.JSON)
        hub.join(publisher, "r")
        for _ in range(100):
            if "r" in publisher.rooms:
                break
            await asyncio.sleep(0)
        for n in (1, 2, 3):
            hub.publish("r", "p", msgspec.json.encode(n), Encoding.JSON, origin=publisher.conn_id)
            if n == 1:
                broker.release()  # 1 reached the node; 2 and 3 are in flight
        if server_join:
            hub.join(s, "r", trusted=True)
        else:
            send(hub, s, {"type": "join", "id": "j", "room": "r"})
        for _ in range(5):
            await asyncio.sleep(0)  # the history read answered (at 3); the join waits
        assert "r" not in s.rooms
        broker.release()  # 2 and 3 arrive: the join takes effect
        for _ in range(100):
            if "r" in s.rooms:
                break
            await asyncio.sleep(0)
        assert "r" in s.rooms
        hub.publish("r", "p", msgspec.json.encode(4), Encoding.JSON, origin=publisher.conn_id)
        broker.release()
        await asyncio.sleep(0)
        hub.flush()
        return peer.messages()[1:]  # after the welcome

    got = asyncio.run(go())
    first = got[0]
    if server_join:
        assert (first["type"], first["room"], first["seq"]) == ("subscribed", "r", 3), first
    else:
        assert (first["type"], first["data"]["seq"]) == ("ack", 3), first
    assert [(m["type"], m["seq"]) for m in got[1:]] == [("message", 4)]


def test_a_join_through_a_broker_does_not_wait_for_a_quiet_room() -> None:
    """A room with history but nothing delivered on this node since it subscribed (its stream's
    position unknown): the join takes effect when the history read answers, at its seq."""

    async def go() -> list[dict[str, Any]]:
        broker = TwoChannelBroker()
        loop = asyncio.get_running_loop()
        hub = Hub(broker, node_id="t", schedule=loop.call_soon, rate_limit=0)
        for n in (1, 2, 3):  # published before this node had the room: never on its stream
            broker.publish("r", "p", msgspec.json.encode(n), Encoding.JSON, "elsewhere")
        broker.in_flight.clear()
        peer = RecordingPeer()
        s = hub.open(peer, Encoding.JSON)
        hub.join(s, "r", trusted=True)
        for _ in range(100):
            if "r" in s.rooms:
                break
            await asyncio.sleep(0)
        assert "r" in s.rooms
        hub.flush()
        return peer.messages()[1:]

    assert [(m["type"], m["seq"]) for m in asyncio.run(go())] == [("subscribed", 3)]


def test_a_room_is_true_while_any_group_has_a_member() -> None:
    """Room.__bool__ (asked at every leave) agrees with its length over every delivery kind."""
    from wsfan.server.hub import Room

    room = Room("r")
    room.groups.append((99, {}))  # a compressed kind, appended at its first subscriber
    assert not room and len(room) == 0
    for _, members in room.groups:
        members["s"] = None  # type: ignore[index]
        assert room and len(room) == 1
        del members["s"]  # type: ignore[arg-type]
        assert not room
