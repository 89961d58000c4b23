"""SSE streams against clients that misbehave (PROTOCOL.md, "HTTP beside the WebSocket"; README, logging).

A real server process and raw client sockets: a client that stops reading (a receive buffer of
4 KiB that it never empties) is dropped at ``--slow-consumer-limit`` or once its output stalls,
leaving its room at once and its socket soon after (reset once the close grace passed); a
client that resets mid-write costs one DEBUG line, not an ERROR traceback; a client that closes
its socket leaves its room at once. Loopback takes about 3 MB into the kernel's send queue of a
client that reads nothing (tcp_wmem 4 MB): the amounts published here are past that.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import time
from typing import Any

import jwt

from helpers.ports import free_port
from helpers.servers import ServerProcess

SECRET = "sse-robust-test-secret-0123456789abcdef"
ADMIN = "sse-robust-admin-key"
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (linux/tcp.h)


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 600)}, SECRET, algorithm="HS256")


def start(make_server: type[ServerProcess], *flags: str) -> tuple[ServerProcess, int]:
    """A server with an HTTP port, tokens and the admin key; returns it and its HTTP port."""
    port = free_port()
    args = ("--jwt-secret", SECRET, "--admin-key", ADMIN, "--http-port", str(port), "--rate-limit", "0")
    return make_server(*args, *flags).start(), port


def admin(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {ADMIN}"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def publish(port: int, room: str, count: int, size: int) -> None:
    payload = "x" * size
    for _ in range(count):
        status, _ = admin(port, "POST", "/publish", {"room": room, "payload": payload})
        assert status == 200


def subscribers(port: int, prefix: str) -> list[dict[str, Any]]:
    status, reply = admin(port, "GET", f"/rooms?prefix={prefix}")
    assert status == 200
    return reply["rooms"]


def open_stream(port: int, room: str, rcvbuf: int = 4096) -> socket.socket:
    """``GET /sse?room=`` from a socket with a ``rcvbuf``-byte receive buffer, read up to its
    ``: joined`` comment (the join took effect); nothing more is read from it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /sse?room={room}&token={token('eve')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b": joined" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    return s


def tcp_state(s: socket.socket) -> int:
    return struct.unpack("B", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


def until(check: Any, timeout: float, what: str) -> float:
    """Poll ``check()`` every 50 ms until true; the seconds it took (AssertionError after ``timeout``)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def read_to_end(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def counter(ws_port: int, series: str) -> float:
    """The value of ``series`` (name and labels, as written) in the WebSocket port's ``/metrics``, 0 when absent."""
    conn = http.client.HTTPConnection("127.0.0.1", ws_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def closes_4008(ws_port: int) -> float:
    """``wsfan_closes_total{code="4008"}`` from the WebSocket port's ``/metrics``."""
    return counter(ws_port, 'wsfan_closes_total{code="4008",reason="slow_consumer"}')


def test_a_stream_that_stops_reading_is_dropped_at_the_slow_consumer_limit(make_server):
    """Past --slow-consumer-limit (64 KiB here, counted over our queue and the transport's buffer)
    the stream leaves its room at once and its socket is reset once the 2 s close grace passed
    without the client reading; counted as a 4008 close. Before, the writer waited in aiohttp's
    drain forever: 4.8 MB later the stream was still subscribed and its socket established."""
    srv, port = start(make_server, "--slow-consumer-limit", "65536")
    s = open_stream(port, "slow")
    publish(port, "slow", 80, 60_000)
    until(lambda: subscribers(port, "slow") == [], 2, "the slow stream left its room")
    took = until(lambda: tcp_state(s) != TCP_ESTABLISHED, 8, "the slow stream's socket was dropped")
    assert took < 6
    s.close()
    assert closes_4008(srv.port) == 1
    assert "ending SSE stream of eve with 4008: slow consumer" in srv.output()


def test_a_slow_reader_reads_what_was_sent_then_close_4008_and_the_end(make_server):
    """A client that pauses past the limit and then reads gets a prefix of the room's deliveries (what
    the kernel and the transport held; the rest was dropped), then ``event: close`` / ``data: 4008``,
    then the end of the response: the stream is out of its room before the client read anything."""
    _, port = start(make_server, "--slow-consumer-limit", "65536")
    s = open_stream(port, "lag")
    publish(port, "lag", 80, 60_000)
    until(lambda: subscribers(port, "lag") == [], 2, "the slow stream left its room")
    body = read_to_end(s)
    s.close()
    text = re.sub(rb"\r\n[0-9a-f]+\r\n", b"", body).decode()  # chunk framing out (payloads are x only)
    ids = [int(i) for i in re.findall(r"^id: \S+:(\d+)$", text, re.M)]  # id: <epoch>:<seq>
    assert ids == list(range(1, len(ids) + 1)) and 0 < len(ids) < 80, ids
    # The last event, then the chunked body's end (RFC 9112 7.1: a chunk of size 0).
    assert body.endswith(b"event: close\ndata: 4008\n\n\r\n0\r\n\r\n"), body[-200:]


def test_a_stream_whose_output_stalls_under_the_limit_is_dropped_after_the_stall_limit(make_server):
    """Under the limit (4 MiB) but not read: the writer waits for the transport at most the stall limit
    (--heartbeat + --heartbeat-timeout + 2 s: 3 s here, a WebSocket connection's bound), then the
    stream ends with 4008 and, unread, is reset 2 s later. Before, it waited forever."""
    _, port = start(make_server, "--heartbeat", "500", "--heartbeat-timeout", "500")
    s = open_stream(port, "stall")
    publish(port, "stall", 85, 60_000)  # ~3 MB in the kernel, ~2 MB in the server: under 4 MiB
    t0 = time.monotonic()
    assert subscribers(port, "stall") == [{"room": "stall", "subscribers": 1}], "under the limit: kept"
    until(lambda: subscribers(port, "stall") == [], 6, "the stalled stream left its room")
    assert time.monotonic() - t0 > 2, "not before the stall limit"
    until(lambda: tcp_state(s) != TCP_ESTABLISHED, 6, "the stalled stream's socket was dropped")
    s.close()


def test_a_client_that_resets_mid_write_is_not_an_error(make_server):
    """A client that resets while the server holds output for it (the transport paused) costs no
    ERROR and no traceback: the stream leaves its room. Before, aiohttp's drain raised
    ConnectionError('Connection lost'), which the stream did not catch: 'Error handling request'
    with a traceback at ERROR, once per stream."""
    srv, port = start(make_server)
    for n in range(2):
        s = open_stream(port, f"rst{n}")
        publish(port, f"rst{n}", 85, 60_000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
        until(lambda n=n: subscribers(port, f"rst{n}") == [], 2, "the reset stream left its room")
    time.sleep(0.3)
    log = srv.output()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert closes_4008(srv.port) == 0, "the client left: not a slow consumer"


def test_streams_whose_clients_closed_leave_their_rooms_at_once(make_server):
    """50 streams whose clients close their sockets are out of their rooms within a second (the
    connection handler tells each stream; it waits for nothing the client sends, and aiohttp does
    not cancel it). Before 3489c4d they stayed until their next keepalive write, up to 15 s."""
    _, port = start(make_server)
    socks = [open_stream(port, f"gone{i}", rcvbuf=65536) for i in range(50)]
    assert len(subscribers(port, "gone")) == 50
    for s in socks:
        s.close()
    assert until(lambda: subscribers(port, "gone") == [], 5, "closed streams left their rooms") < 1


# ---------------------------------------------------------------- recovery across room incarnations


def dechunk(body: bytes) -> bytes:
    """A chunked body's data (RFC 9112 7.1), up to its last complete chunk."""
    out = b""
    while True:
        size_line, crlf, rest = body.partition(b"\r\n")
        if not crlf or not size_line:
            return out
        size = int(size_line, 16)
        if size == 0 or len(rest) < size:
            return out
        out, body = out + rest[:size], rest[size + 2 :]


def sse_events(
    port: int, room: str, last_event_id: str | None = None, wait: float = 1.0
) -> list[dict[str, str]]:
    """The events (``id``, ``event``, ``data`` fields; comments left out) a stream of ``room`` gets within
    ``wait`` seconds, reconnecting with ``last_event_id`` as an EventSource does."""
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
    s.sendall(f"GET /sse?room={room}&token={token('eve')} HTTP/1.1\r\nHost: x\r\n{resume}\r\n".encode())
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    text = dechunk(body).decode()
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append(fields)
    return events


def test_a_reconnect_after_the_room_restarted_is_told_the_gap_and_gets_the_new_numbering(make_server):
    """Event ids are ``<epoch>:<seq>``. A stream that reconnects with the id of a room that has since
    been forgotten and started over (new epoch, seq 1-5) gets ``event: gap`` (reset) and all five of
    the new incarnation, as a WebSocket join with since and epoch gets recovered false and them.
    Before, ids were the seq alone and Last-Event-ID 3 resumed the new numbering at 4: new1-new3
    were lost without a word (hostile finding 05)."""
    _, port = start(make_server, "--history-ttl", "1")
    for i in range(5):
        assert admin(port, "POST", "/publish", {"room": "ep", "payload": f"old{i + 1}"})[0] == 200
    old = [e for e in sse_events(port, "ep", "0") if "id" in e]  # all five (after a gap: a bare seq)
    old_epoch = admin(port, "GET", "/history?room=ep")[1]["epoch"]
    assert [e["id"] for e in old] == [f"{old_epoch}:{n}" for n in range(1, 6)]
    time.sleep(3)  # no subscriber, no publication for the history TTL: the room is forgotten
    for i in range(5):
        assert admin(port, "POST", "/publish", {"room": "ep", "payload": f"new{i + 1}"})[0] == 200
    new_epoch = admin(port, "GET", "/history?room=ep")[1]["epoch"]
    assert new_epoch != old_epoch
    events = sse_events(port, "ep", old[2]["id"])  # Last-Event-ID <old epoch>:3
    gap = {"type": "gap", "room": "ep", "since": 3, "seq": 5, "epoch": new_epoch, "reset": True}
    assert events[0] == {"event": "gap", "data": json.dumps(gap, separators=(",", ":"))}
    assert [e["id"] for e in events[1:]] == [f"{new_epoch}:{n}" for n in range(1, 6)]
    assert [json.loads(e["data"])["payload"] for e in events[1:]] == [f"new{n}" for n in range(1, 6)]


def test_a_resume_that_history_no_longer_reaches_is_a_gap_without_reset(make_server):
    """Same incarnation, but history keeps 2 publications: resuming after seq 1 is told ``event: gap``
    (reset false: the room is the same, history no longer reaches back), then what is kept (4, 5);
    resuming after 3 needs no gap. Before, the stream said nothing about 2 and 3."""
    _, port = start(make_server, "--history-size", "2")
    for i in range(5):
        assert admin(port, "POST", "/publish", {"room": "hs", "payload": i + 1})[0] == 200
    epoch = admin(port, "GET", "/history?room=hs")[1]["epoch"]
    events = sse_events(port, "hs", f"{epoch}:1")
    gap = {"type": "gap", "room": "hs", "since": 1, "seq": 5, "epoch": epoch, "reset": False}
    assert events[0] == {"event": "gap", "data": json.dumps(gap, separators=(",", ":"))}
    assert [e["id"] for e in events[1:]] == [f"{epoch}:4", f"{epoch}:5"]
    assert [e["id"] for e in sse_events(port, "hs", f"{epoch}:3")] == [f"{epoch}:4", f"{epoch}:5"]


def test_a_last_event_id_without_an_epoch_is_never_taken_as_a_continuation(make_server):
    """A bare seq (an id written before ids carried the epoch, or a page's own) counts in an unknown
    incarnation: after a restart it would pass for a seq of the new numbering (the finding's own
    repro sends Last-Event-ID 3), so it gets ``event: gap`` and everything kept, never the messages
    past it as a continuation; ``reset`` is true only when the seq is past the room's. Before, 3
    resumed at 4 (nothing said) and 9 got nothing at all."""
    _, port = start(make_server)
    for i in range(5):
        assert admin(port, "POST", "/publish", {"room": "plain", "payload": i + 1})[0] == 200
    epoch = admin(port, "GET", "/history?room=plain")[1]["epoch"]
    for since, reset in ((3, False), (9, True)):
        events = sse_events(port, "plain", str(since))
        gap = {"type": "gap", "room": "plain", "since": since, "seq": 5, "epoch": epoch, "reset": reset}
        assert events[0] == {"event": "gap", "data": json.dumps(gap, separators=(",", ":"))}
        assert [e["id"] for e in events[1:]] == [f"{epoch}:{n}" for n in range(1, 6)]


def test_event_ids_carry_the_redis_epoch_across_nodes(make_server, redis_server):
    """In a cluster the epoch is Redis's: a stream on node B of a room published on node A gets
    ``id: <epoch>:<seq>`` live and in a replay, resumes from it on B without a gap, and an id of
    another epoch is a gap (reset) with everything Redis keeps."""
    a_port, b_port = free_port(), free_port()
    for name, port in (("A", a_port), ("B", b_port)):
        make_server(
            "--broker", redis_server.url, "--node-id", name, "--jwt-secret", SECRET, "--admin-key", ADMIN,
            "--http-port", str(port), "--rate-limit", "0",
        ).start()  # fmt: skip
    live = open_stream(b_port, "cl", rcvbuf=65536)
    assert admin(a_port, "POST", "/publish", {"room": "cl", "payload": 1})[0] == 200
    epoch = admin(a_port, "GET", "/history?room=cl")[1]["epoch"]
    live.settimeout(5)
    got = b""
    while b"}\n\n" not in got:  # the end of the delivery's event
        got += live.recv(4096)
    live.close()
    assert f"id: {epoch}:1\n".encode() in got, got
    for n in (2, 3):
        assert admin(a_port, "POST", "/publish", {"room": "cl", "payload": n})[0] == 200
    assert [e["id"] for e in sse_events(b_port, "cl", f"{epoch}:1")] == [f"{epoch}:2", f"{epoch}:3"]
    events = sse_events(b_port, "cl", "0123abcd:1")
    gap = {"type": "gap", "room": "cl", "since": 1, "seq": 3, "epoch": epoch, "reset": True}
    assert events[0] == {"event": "gap", "data": json.dumps(gap, separators=(",", ":"))}
    assert [e["id"] for e in events[1:]] == [f"{epoch}:{n}" for n in (1, 2, 3)]


def test_a_draining_server_ends_its_streams_with_1001_after_what_was_queued(make_server):
    """SIGTERM: every SSE stream gets what was published before it, then ``event: close`` /
    ``data: 1001``, as every WebSocket connection gets a 1001 close frame (PROTOCOL.md, shutdown);
    before, the stream's task was cancelled and the body just stopped."""
    server, port = start(make_server, "--drain-timeout", "5")
    sock = open_stream(port, "drain-sse", rcvbuf=1 << 20)
    publish(port, "drain-sse", 1, 10)
    server.stop()  # SIGTERM, then waits for the exit
    data = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert server.proc is not None and server.proc.returncode == 0
    assert b"xxxxxxxxxx" in data, data
    assert b"event: close\ndata: 1001\n\n" in data, data
    assert data.index(b"xxxxxxxxxx") < data.index(b"event: close")
