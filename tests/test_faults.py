"""Faults an operator causes, against real processes: SIGTERM under load, dropped clients, fd exhaustion.

Every test drives a real ``python -m wsfan`` process over real sockets, with a real
redis-server where a broker is involved (tests/helpers/redis_server.py), and checks what the
operator sees: exit codes and times, kernel socket state (``/proc``), log lines and metrics.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from typing import Any

import msgspec
import pytest

from helpers.peers import PicowsPeer
from helpers.ports import free_port, wait_for_port
from helpers.rawws import RawWS, http_request, upgrade_head
from helpers.servers import ServerProcess
from helpers.waiting import wait_until
from wsfan.server.transport import CLOSE_GRACE_S

DRAIN_S = 1.0
SLOW_CONSUMER_CLOSES = 'wsfan_closes_total{code="4008"'
HEARTBEAT_CLOSES = 'wsfan_closes_total{code="4000"'


async def _publish_steadily(peer: PicowsPeer, room: str, every: float) -> None:
    """One publish every ``every`` seconds until the server closes the connection."""
    n = 0
    while not peer.closed.is_set():
        try:
            await peer.send({"type": "publish", "id": f"p{n}", "room": room, "payload": n})
        except Exception:  # noqa: BLE001 - the server closed the socket under us: that is the end
            return
        n += 1
        await asyncio.sleep(every)


async def _sigterm_under_load(srv: ServerProcess, publishers: int = 8) -> tuple[int | None, float]:
    """Publishers at a steady rate, then SIGTERM; the exit code (None: still running) and seconds to exit."""
    peers = [await PicowsPeer.connect(srv.url) for _ in range(publishers)]
    for p in peers:
        assert (await p.request("join", room="load"))["type"] == "ack"
    pumps = [asyncio.create_task(_publish_steadily(p, "load", 0.002)) for p in peers]
    # Publishes are flowing through Redis (acks come back) before the signal.
    for _ in range(20):
        await peers[0].recv_type("ack")
    assert srv.proc is not None
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    limit = DRAIN_S + 5.0
    try:
        code: int | None = await asyncio.to_thread(srv.proc.wait, limit)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: still running after the limit
        code = None
    took = time.monotonic() - started
    for t in pumps:
        t.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    if code is not None:
        for p in peers:
            assert await p.wait_closed(2.0) == 1001, "every client is told the server is going away"
    return code, took


async def test_sigterm_under_publish_load_with_redis_always_exits_0_within_the_drain_timeout(
    redis_server, make_server
):
    """10 SIGTERMs under load (two rounds of 5 nodes): each exits 0 within drain timeout + 5 s.

    On main before the fix, 1 run in 3 to 5 never exited: a broker loop swallowed its cancel.
    """
    flags = ("--broker", redis_server.url, "--rate-limit", "0", "--drain-timeout", str(DRAIN_S))
    for i in range(10):
        srv = make_server(*flags).start()
        code, took = await _sigterm_under_load(srv, publishers=4)
        assert code == 0, f"run {i}: exit {code} after {took:.1f}s\n{srv.output()[-3000:]}"
        assert "stopped" in srv.output()


async def test_sigterm_to_the_supervisor_under_load_exits_0(redis_server, make_server):
    """``--workers 2``: every worker stops in time, so the supervisor never kills one and exits 0."""
    for i in range(2):
        srv = make_server(
            "--workers",
            "2",
            "--broker",
            redis_server.url,
            "--rate-limit",
            "0",
            "--drain-timeout",
            str(DRAIN_S),
        )
        srv.start()
        code, took = await _sigterm_under_load(srv)
        out = srv.output()
        assert code == 0, f"run {i}: exit {code} after {took:.1f}s\n{out[-3000:]}"
        assert "killing them" not in out and "not cleanly" not in out


# ---------------------------------------------------------------- dropped peers leave nothing in the kernel

# /proc/net/tcp state codes (include/net/tcp_states.h)
_TCP_STATES = {
    "01": "ESTABLISHED",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0B": "CLOSING",
}


def server_side_sockets(
    port: int, states: tuple[str, ...] = ("FIN_WAIT1", "CLOSING", "LAST_ACK")
) -> list[dict]:
    """Sockets whose local port is the server's (only this test's server: other agents share the machine)."""
    found = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, state, queues, inode = cols[1], cols[2], cols[3], cols[4], cols[9]
            if int(local.split(":")[1], 16) != port:
                continue
            name = _TCP_STATES.get(state)
            if name in states:
                found.append(
                    {
                        "state": name,
                        "peer": int(remote.split(":")[1], 16),
                        "tx_queue": int(queues.split(":")[0], 16),
                        "inode": int(inode),
                    }
                )
    return found


def metric(port: int, series: str) -> float:
    """The value of the first series on ``/metrics`` that starts with ``series`` (a name, or a name and labels)."""
    status, _, body = http_request("127.0.0.1", port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(series):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")


def non_reading_subscriber(port: int, room: str) -> RawWS:
    """Joins ``room``, then never reads again: its receive window closes and stays closed."""
    ws = RawWS.connect("127.0.0.1", port)
    ws.recv_message()  # welcome
    ws.send_text(msgspec.json.encode({"type": "join", "id": "j", "room": room}))
    while b'"ack"' not in ws.recv_message()[1]:
        pass
    return ws


async def _flood(srv: ServerProcess, room: str, until: Any, timeout: float = 30.0) -> PicowsPeer:
    """Publish 60 KB messages to ``room`` in bursts until ``until()`` is true; the publisher reads its own."""
    publisher = await PicowsPeer.connect(srv.url)
    assert (await publisher.request("join", room=room))["type"] == "ack"
    payload = "x" * 60_000
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"flooding {room} did not get there in {timeout}s"
        for _ in range(20):
            await publisher.send({"type": "publish", "room": room, "payload": payload})
        await asyncio.sleep(0.05)
    return publisher


def assert_nothing_left(port: int) -> None:
    left = server_side_sockets(port)
    pinned = sum(s["tx_queue"] for s in left)
    assert not left, f"{len(left)} sockets still held by the kernel, {pinned} bytes unsent: {left[:3]}"


HELD = ("ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT1", "CLOSING", "LAST_ACK")


async def released(port: int, peers: list[Any], timeout: float) -> None:
    """Wait (at most ``timeout`` s) until the server holds no socket to ``peers`` in any state, then no orphan.

    Ends as soon as the kernel let go of them instead of sleeping the whole bound; a socket still
    held when the bound passes fails the test just as a fixed sleep would.
    """
    ports = {ws.sock.getsockname()[1] for ws in peers}
    deadline = time.monotonic() + timeout
    while any(s["peer"] in ports for s in server_side_sockets(port, HELD)):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert_nothing_left(port)


async def test_slow_consumers_dropped_with_4008_leave_no_orphaned_socket(make_server):
    """20 clients that stopped reading are closed with 4008 and, after the grace, reset: 5 s later the
    kernel holds no orphaned FIN-WAIT-1 socket (each used to pin its unsent queue, ~3.7 MiB)."""
    srv = make_server("--rate-limit", "0", "--slow-consumer-limit", "65536").start()
    subs = [non_reading_subscriber(srv.port, "flood") for _ in range(20)]
    try:
        await _flood(srv, "flood", lambda: metric(srv.port, SLOW_CONSUMER_CLOSES) >= 20)
        await released(srv.port, subs, CLOSE_GRACE_S + 5.0)
    finally:
        for ws in subs:
            ws.close()


async def test_heartbeat_timeout_of_a_peer_with_a_full_queue_leaves_no_orphaned_socket(make_server):
    """4000 to a peer that neither reads nor answers pings, queue full: reset after the grace too."""
    srv = make_server(
        "--rate-limit", "0", "--slow-consumer-limit", str(64 << 20), "--heartbeat", "500", "--heartbeat-timeout", "500"
    ).start()  # fmt: skip
    subs = [non_reading_subscriber(srv.port, "quiet") for _ in range(5)]
    try:
        sent = time.monotonic() + 1.0  # about 6 MB per subscriber: more than loopback's buffers hold
        await _flood(srv, "quiet", lambda: time.monotonic() > sent)
        deadline = time.monotonic() + 15
        while metric(srv.port, HEARTBEAT_CLOSES) < 5:
            assert time.monotonic() < deadline, "the silent peers were not closed with 4000"
            await asyncio.sleep(0.1)
        await released(srv.port, subs, CLOSE_GRACE_S + 3.0)
    finally:
        for ws in subs:
            ws.close()


async def test_drain_timeout_resets_peers_that_do_not_read_so_nothing_outlives_the_process(make_server):
    """SIGTERM with non-reading peers: after the drain timeout they are reset; orphans would outlive the exit."""
    srv = make_server(
        "--rate-limit", "0", "--slow-consumer-limit", str(64 << 20), "--drain-timeout", "1"
    ).start()
    subs = [non_reading_subscriber(srv.port, "stuck") for _ in range(5)]
    try:
        sent = time.monotonic() + 1.0
        publisher = await _flood(srv, "stuck", lambda: time.monotonic() > sent)
        assert await asyncio.to_thread(srv.stop, 10) == 0
        assert await publisher.wait_closed(1) == 1001
        await released(srv.port, subs, 1.0)
    finally:
        for ws in subs:
            ws.close()


@pytest.mark.parametrize("last_words", ["close", "oversize"])
async def test_a_peer_that_closes_or_breaks_the_framing_then_stops_reading_is_reset(make_server, last_words):
    """Two closes that wait for the peer: ours answering its close frame, and picows' own close after a
    framing error (1009). Both flush queued output first; a peer that stopped reading would hold the
    connection forever, so the close grace applies and the socket is reset."""
    srv = make_server(
        "--rate-limit", "0", "--slow-consumer-limit", str(64 << 20),
        "--heartbeat", "500", "--heartbeat-timeout", "5000",
    ).start()  # fmt: skip
    subs = [non_reading_subscriber(srv.port, "last") for _ in range(3)]
    ports = {ws.sock.getsockname()[1] for ws in subs}
    try:
        sent = time.monotonic() + 1.0
        await _flood(srv, "last", lambda: time.monotonic() > sent)
        for ws in subs:
            if last_words == "close":
                ws.send_close(1000)
            else:
                ws.send_frame(
                    0x2, b"y" * 70_000
                )  # one frame over --max-message-size: picows closes with 1009
        await released(srv.port, subs, 0.5 + CLOSE_GRACE_S + 2.0)  # a sweep tick, the grace, slack
        left = [s for s in server_side_sockets(srv.port, HELD) if s["peer"] in ports]
        assert not left, f"the server still holds {len(left)} of these connections: {left}"
    finally:
        for ws in subs:
            ws.close()


# ---------------------------------------------------------------- file descriptors


def try_client(port: int, timeout: float = 2.0) -> socket.socket | None:
    """One upgrade attempt: the open socket after a 101 (the caller keeps it), None after a refusal or a drop."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None
    try:
        sock.sendall(upgrade_head())
        head = sock.recv(4096)
    except OSError:
        head = b""
    if head.startswith(b"HTTP/1.1 101"):
        return sock
    sock.close()
    return None


async def test_the_broker_comes_back_at_the_fd_limit_while_clients_keep_arriving(redis_server, make_server):
    """Under RLIMIT_NOFILE 256 full of clients, Redis restarts while clients keep arriving: the broker
    is back within 5 s, because the last --fd-reserve fds are kept for it (upgrades get 503)."""
    srv = make_server("--broker", redis_server.url, "--rate-limit", "0", nofile=256)
    srv.start()
    publisher = await PicowsPeer.connect(srv.url)
    assert (await publisher.request("join", room="fd"))["type"] == "ack"
    held: list[socket.socket] = []
    try:
        for _ in range(300):  # fill the server up to what it admits
            sock = await asyncio.to_thread(try_client, srv.port)
            if sock is None:
                break
            held.append(sock)
        assert len(held) < 250, "the server admitted clients into its last file descriptors"
        arriving = True

        def arrive() -> int:
            attempts = 0
            while arriving and attempts < 2000:
                attempts += 1
                sock = try_client(srv.port, timeout=0.5)
                if sock is not None:
                    held.append(sock)
                time.sleep(0.005)
            return attempts

        arrivals = asyncio.get_running_loop().run_in_executor(None, arrive)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_server.restart)
        back = time.monotonic()
        reply: dict = {}
        while time.monotonic() - back < 5.0:
            reply = await publisher.request("publish", room="fd", payload="after")
            if reply["type"] == "ack":
                break
            assert reply["code"] == "UNAVAILABLE", reply
            await asyncio.sleep(0.1)
        arriving = False
        attempts = await arrivals
        assert reply.get("type") == "ack", (
            f"the broker was not back 5 s after Redis ({attempts} arrivals): {reply}"
        )
        assert attempts > 20, "clients kept arriving meanwhile"
        assert metric(srv.port, 'wsfan_rejected_connections_total{reason="fd_reserve"}') > 0
    finally:
        for sock in held:
            sock.close()


async def test_without_a_reserve_running_out_of_fds_is_logged_and_counted(redis_server, make_server):
    """--fd-reserve 0: clients take every fd, Redis restarts, the broker's reconnects fail with EMFILE:
    a log line says so and ``wsfan_fd_exhausted_total`` counts it (the accept side as well)."""
    srv = make_server("--broker", redis_server.url, "--rate-limit", "0", "--fd-reserve", "0", nofile=128)
    srv.start()
    held: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = await asyncio.to_thread(try_client, srv.port)
            if sock is None:
                break
            held.append(sock)
        arriving = True

        def arrive() -> None:  # every fd the server frees is taken by the next client
            for _ in range(3000):
                if not arriving:
                    return
                sock = try_client(srv.port, timeout=0.5)
                if sock is not None:
                    held.append(sock)
                time.sleep(0.002)

        arrivals = asyncio.get_running_loop().run_in_executor(None, arrive)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_server.start)
        deadline = time.monotonic() + 10
        try:
            while "out of file descriptors (broker" not in srv.output():
                assert time.monotonic() < deadline, srv.output()[-3000:]
                await asyncio.sleep(0.1)
        finally:
            arriving = False
            await arrivals
    finally:
        for sock in held:
            sock.close()
        held.clear()

    def exhausted() -> float:  # the server frees the clients' fds as it sees them close
        try:
            return metric(srv.port, 'wsfan_fd_exhausted_total{where="broker"}')
        except OSError:
            return 0.0

    assert wait_until(exhausted, 5.0) > 0


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(make_server):
    """Started with soft 128 / hard 1024, the server runs with 1024 (process_max_fds on /metrics)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = make_server(nofile=(min(128, hard), hard))
    srv.start()
    assert metric(srv.port, "process_max_fds") == hard


# ---------------------------------------------------------------- handshakes cut short (client side)


async def _cutting_server() -> tuple[asyncio.AbstractServer, list[int]]:
    """A TCP server that reads each upgrade request and closes the socket without answering; counts them."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen[0] += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


async def test_client_transport_reports_a_handshake_cut_short_as_a_closed_connection():
    """picows completes ``ws_connect`` with no listener when the socket closes before the answer: the
    client's transport raises ``ConnectionClosed(1006)``, which the reconnect loop retries."""
    from wsfan.client.codec import Codec
    from wsfan.client.errors import ConnectionClosed
    from wsfan.client.transport import open_connection

    server, seen = await _cutting_server()
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ConnectionClosed) as caught:
            await open_connection(
                f"ws://127.0.0.1:{port}/ws", Codec("json"),
                on_delivery=print, on_reply=print, on_lost=lambda *a: None, open_timeout=5.0,
            )  # fmt: skip
    assert caught.value.code == 1006 and seen[0] == 1


async def test_loadgen_retries_a_handshake_cut_short_then_fails_with_a_connection_error():
    """The benchmark's ``connect_many`` treats it as a failed connect: retried, then ``ConnectionResetError``."""
    from wsfan.bench.roles.base import Base, connect_many

    server, seen = await _cutting_server()
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ConnectionResetError):
            await connect_many(Base, f"ws://127.0.0.1:{port}/ws", 1, 1, socket_factory=None)
    assert seen[0] == 5, "every one of the 5 attempts reached the server"


def test_sse_streams_stop_at_the_fd_reserve_like_upgrades(make_server):
    """SSE streams hold an fd each for their lifetime: once only --fd-reserve fds are left, a new
    one is 503 with Retry-After, as a WebSocket upgrade is (before: streams were admitted until
    the process ran out of fds, the broker's reserve included, and accept failed unseen)."""
    http_port = free_port()
    srv = make_server("--http-port", str(http_port), "--fd-reserve", "64", nofile=128).start()
    wait_for_port(http_port)
    held: list[socket.socket] = []
    refused = b""
    try:
        for _ in range(128):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=5)
            sock.sendall(b"GET /sse?room=fd HTTP/1.1\r\nHost: x\r\n\r\n")
            head = sock.recv(4096)
            if not head.startswith(b"HTTP/1.1 200"):
                refused = head
                sock.close()
                break
            held.append(sock)
        assert refused.startswith(b"HTTP/1.1 503"), (len(held), refused)
        assert b"Retry-After: 1" in refused and b'{"error": "server at its connection capacity"}' in refused
        assert len(held) < 128 - 64
    finally:
        for sock in held:
            sock.close()
    assert metric(srv.port, 'wsfan_rejected_connections_total{reason="fd_reserve"}') >= 1


def test_a_new_sse_stream_while_draining_is_503(make_server):
    """Draining: no new WebSocket connections (503) and no new SSE streams either (before: a stream
    was opened on a server on its way out)."""
    http_port = free_port()
    srv = make_server("--http-port", str(http_port), "--drain-timeout", "10").start()
    wait_for_port(http_port)
    with RawWS.connect("127.0.0.1", srv.port) as holder:  # never answers the 1001: the drain lasts
        holder.recv_message()
        srv.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: http_request("127.0.0.1", http_port, "/healthz")[0] == 503)
        status, headers, body = http_request("127.0.0.1", http_port, "/sse?room=r")
        assert (status, headers.get("retry-after"), body) == (503, "1", b'{"error": "draining"}')
