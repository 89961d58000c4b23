"""``--workers N``: a supervisor process and N workers sharing the port.

Why processes: one event loop uses one core. Each worker is a whole node (hub,
transport, its own broker connection) bound to the same port with SO_REUSEPORT,
so the kernel spreads new connections over them and nothing is handed between
processes. Workers share rooms, seq and history only through the broker, exactly
as nodes on different machines do, which is why more than one needs ``--broker``.

The supervisor stays off the data path. It

- restarts a worker that dies (at once the first time, with backoff when it keeps
  dying right after starting, and it gives up when one never manages to start,
  e.g. the port is taken);
- kills and restarts a worker whose event loop stopped beating for
  ``--worker-timeout`` seconds (gunicorn's ``--timeout``): each worker's loop
  writes ``time.monotonic()`` into a shared-memory double every
  ``--worker-timeout``/4 s (at most 1 s), the supervisor compares;
- serves ``/metrics`` (and ``/healthz``) on ``--metrics-port``: at each scrape it
  asks every worker for its metric families over the worker's socketpair and
  serves their merge (``metrics.merge``: counters summed, gauges per worker);
- on SIGHUP starts a new generation of workers (spawned, so they load the code
  and ``--config`` as they are on disk now), waits until they listen, then tells
  the old ones to hand over: stop accepting at once and close their connections
  with 1001 spread over ``--drain-spread`` seconds;
- on SIGTERM/SIGINT forwards SIGTERM so that every worker drains (close 1001)
  before exiting. Its exit code is 0 when every worker drained cleanly.

Workers are forked at start and on crash restarts: they start in milliseconds and
nothing needs to be pickled. The supervisor has no event loop and no threads
when it forks; its metrics listener is a stdlib ``HTTPServer`` polled from the
same ``wait`` loop as the workers' sentinels and sockets.
"""

from __future__ import annotations

import asyncio
import ctypes
import http.server
import io
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.sharedctypes
import os
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler

from wsfan.server import logs
from wsfan.server.config import Settings
from wsfan.server.handshake import (
    BARE_LF,
    MAX_HEAD_BYTES,
    Refusal,
    check_request_head,
    http_answer,
    request_start,
)
from wsfan.server.metrics import Family, Retired, decode_families, merge

if TYPE_CHECKING:
    from wsfan.server.app import Node

log = logging.getLogger("wsfan.workers")

# A worker that dies sooner than this after starting is failing to start, not crashing.
QUICK_DEATH_S = 5.0
# Quick deaths in a row of one worker before the supervisor stops everything and fails.
MAX_QUICK_DEATHS = 5
RESTART_BACKOFF_MAX_S = 5.0
# How long after the drain timeout a worker may take to exit before it is killed.
EXIT_GRACE_S = 5.0
# Exit codes of a worker that stopped as asked: drained (0), or SIGTERM before its loop was up.
CLEAN_EXITS = (0, -signal.SIGTERM)
# How long a scrape waits for the workers' families; a late worker contributes its previous ones.
SCRAPE_TIMEOUT_S = 2.0
# How long a worker may take to run its event loop at all (imports, before its first heartbeat).
STARTUP_TIMEOUT_S = 30.0
# How long a new generation (SIGHUP) may take to listen before the reload is given up.
RELOAD_READY_TIMEOUT_S = 30.0

_LEN = struct.Struct("!I")


class Message(msgspec.Struct, omit_defaults=True):
    """One frame on a worker's socketpair (4-byte length, then msgpack).

    Supervisor to worker: ``scrape`` (reply ``metrics`` with the same id) or ``handoff``
    (stop accepting, close connections spread over ``spread`` s). Worker to supervisor:
    ``ready`` once listening, ``metrics`` (id -1: the final counts, sent after draining).
    """

    op: str
    id: int = 0
    spread: float = 0.0
    families: bytes = b""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def frame(msg: Message) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def supervise(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; 0 after a clean drain of all of them.

    ``reload`` re-reads the settings on SIGHUP (the same flags, environment and ``--config`` file).
    """
    return Supervisor(settings, reload).run()


@dataclass(eq=False)
class Worker:
    """The supervisor's view of one worker process."""

    index: int
    name: str  # its node id: the ``worker`` label in metrics
    proc: BaseProcess
    link: socket.socket  # the supervisor's end, non-blocking
    beat: Any  # shared c_double: the worker loop's last time.monotonic()
    started: float
    ready: bool = False
    timed_out: bool = False
    families: list[Family] = field(default_factory=list)
    answered: int = -1  # id of the last scrape it answered
    buffer: bytearray = field(default_factory=bytearray)

    def messages(self) -> Iterator[Message]:
        """Read what the socket has (non-blocking) and yield the complete frames."""
        while True:
            try:
                chunk = self.link.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.buffer += chunk
        while len(self.buffer) >= _LEN.size:
            (n,) = _LEN.unpack_from(self.buffer)
            if len(self.buffer) < _LEN.size + n:
                break
            body = bytes(self.buffer[_LEN.size : _LEN.size + n])
            del self.buffer[: _LEN.size + n]
            try:
                yield _decoder.decode(body)
            except msgspec.DecodeError:
                log.error("worker %s sent an undecodable frame; ignored", self.name)

    def send(self, msg: Message) -> bool:
        try:
            self.link.sendall(frame(msg))
        except (BlockingIOError, OSError):
            return False  # its buffer is full (a hung worker) or it is gone
        return True


class Supervisor:
    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.reload_settings = reload
        self.base = settings.node_id or secrets.token_hex(3)
        self.fork = multiprocessing.get_context("fork")
        self.spawn = multiprocessing.get_context("spawn")
        self.workers: dict[int, Worker] = {}  # the current generation, by index
        self.retiring: list[Worker] = []  # old generations handing over or draining
        self.incoming: dict[int, Worker] = {}  # a SIGHUP's new generation until all of it listens
        self.reload_deadline = 0.0
        self.running_settings = settings  # what the current generation runs with, while a new one starts
        self.generation: dict[int, int] = {}
        self.quick_deaths: dict[int, int] = {}
        # (group, index) -> when: a dead worker's replacement, in the group it belonged to
        self.restart_at: dict[tuple[str, int], float] = {}
        self.restarts: dict[str, int] = {"exit": 0, "timeout": 0}
        self.reloads = 0
        self.stopping = False
        self.reload_requested = False
        self.failed = False
        self.exit_codes: list[int | None] = []
        self.retired = Retired()
        self.scrape_id = 0
        self.http: MetricsListener | None = None

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        if s.metrics_port:
            self.http = MetricsListener(self, s.metrics_host or s.host, s.metrics_port, s.request_timeout)
        log.info(
            "supervisor pid %d: %d workers on %s:%d%s, worker timeout %gs",
            os.getpid(), s.workers, s.host, s.port,
            f", metrics on :{s.metrics_port}" if s.metrics_port else "", s.worker_timeout,
        )  # fmt: skip
        if not s.metrics_port:
            log.warning(
                "no --metrics-port: /metrics is off (with several workers only the supervisor serves it)"
            )
        for i in range(s.workers):
            self.workers[i] = self._spawn(i, self.fork)
        deadline: float | None = None
        while True:
            if self.stopping:
                if deadline is None:
                    deadline = time.monotonic() + s.drain_timeout + s.drain_spread + EXIT_GRACE_S
                    self.restart_at.clear()
                    self._forward(signal.SIGTERM)  # also reaches a worker forked while the signal arrived
                if not self._all():
                    break
                if time.monotonic() > deadline:
                    log.error("workers %s did not exit after the drain; killing them", self._names())
                    self._forward(signal.SIGKILL)
                    deadline = time.monotonic() + EXIT_GRACE_S
            elif self.reload_requested:
                self.reload_requested = False
                self._start_reload()
            now = time.monotonic()
            for (group, i), when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[group, i]
                    if group == "workers":
                        self.workers[i] = self._spawn(i, self.fork)
                    elif self.incoming:  # a new generation's worker: spawned like the rest of it
                        self.incoming[i] = self._spawn(i, self.spawn)
            self._check_liveness(now)
            self._check_reload(now)
            timeout = min([0.25, *(max(0.0, t - now) for t in self.restart_at.values())])
            self._wait(timeout)
        if self.http is not None:
            self.http.close()
        clean = not self.failed and all(code in CLEAN_EXITS for code in self.exit_codes)
        log.info("supervisor: all workers stopped%s", "" if clean else " (not cleanly)")
        return 0 if clean else 1

    def _all(self) -> list[Worker]:
        return [*self.workers.values(), *self.incoming.values(), *self.retiring]

    def _names(self) -> list[str]:
        return sorted(w.name for w in self._all())

    def _wait(self, timeout: float, scrape: bool = False) -> None:
        """Wait for a worker to exit or write, or a metrics request; handle what is ready."""
        waitables: dict[Any, tuple[str, Worker | None]] = {}
        for w in self._all():
            waitables[w.proc.sentinel] = ("exit", w)
            waitables[w.link] = ("link", w)
        if self.http is not None and not scrape:
            self.http.expire()
            for sock in self.http.sockets():
                waitables[sock] = ("http", None)
            if self.http.pending:  # wake up for the oldest connection's deadline
                timeout = max(0.0, min(timeout, self.http.next_deadline() - time.monotonic()))
        for ready in multiprocessing.connection.wait(list(waitables), timeout):
            kind, w = waitables[ready]
            if kind == "link" and w is not None:
                self._read(w)
            elif kind == "exit" and w is not None:
                self._read(w)  # its final counts arrive before its exit
                self._reap(w)
            elif kind == "http" and self.http is not None:
                self.http.readable(ready)

    def _read(self, w: Worker) -> None:
        for msg in w.messages():
            if msg.op == "ready":
                w.ready = True
            elif msg.op == "metrics":
                try:
                    w.families = decode_families(msg.families)
                except msgspec.DecodeError:
                    log.error("worker %s sent undecodable metrics; ignored", w.name)
                    continue
                w.answered = max(w.answered, msg.id)

    # ------------------------------------------------------------ processes

    def _spawn(self, index: int, ctx: Any) -> Worker:
        generation = self.generation.get(index, 0)
        self.generation[index] = generation + 1
        # A new worker gets a new node id, so that its conn ids never repeat an earlier worker's.
        name = f"{self.base}-{index}" + (f".{generation}" if generation else "")
        settings = msgspec.structs.replace(self.settings, node_id=name)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        beat = multiprocessing.sharedctypes.RawValue(ctypes.c_double, 0.0)  # 0: its loop has not run yet
        # A forked worker inherits every descriptor of the supervisor: it closes the ones it must not hold.
        inherited = [w.link.fileno() for w in self._all()] + [ours.fileno()]
        if self.http is not None:
            inherited += [sock.fileno() for sock in self.http.sockets()]
        args = (settings, os.getpid(), index, theirs, beat, inherited if ctx is self.fork else [])
        p = ctx.Process(target=_worker_main, args=args, name=f"wsfan-{name}")
        p.start()
        theirs.close()
        w = Worker(index, name, p, ours, beat, time.monotonic())
        if self.stopping:
            _kill(p, signal.SIGTERM)
        return w

    def _reap(self, w: Worker) -> None:
        w.proc.join()
        code = w.proc.exitcode
        w.link.close()
        self.retired.add(w.families)
        if w in self.retiring:
            self.retiring.remove(w)
            if code not in CLEAN_EXITS:
                log.warning("retired worker %s (pid %s) exited with %s", w.name, w.proc.pid, code)
            return
        group = "workers"
        if self.incoming.get(w.index) is w:
            group = "incoming"
            del self.incoming[w.index]
        elif self.workers.get(w.index) is w:
            del self.workers[w.index]
        if self.stopping:
            self.exit_codes.append(code)
            if code not in CLEAN_EXITS:
                log.warning("worker %s (pid %s) exited with %s while stopping", w.name, w.proc.pid, code)
            return
        if group == "incoming":  # a bad deploy must not take the running workers down with it
            self._abort_reload(f"new worker {w.name} died with exit code {code} before the handover")
            return
        i = w.index
        lived = time.monotonic() - w.started
        quick = self.quick_deaths[i] = self.quick_deaths.get(i, 0) + 1 if lived < QUICK_DEATH_S else 0
        if quick >= MAX_QUICK_DEATHS:
            log.error("worker %d failed %d times right after starting; stopping all workers", i, quick)
            self.failed = True
            self.stopping = True
            return
        delay = min(0.1 * 2 ** (quick - 1), RESTART_BACKOFF_MAX_S) if quick > 1 else 0.0
        reason = "timeout" if w.timed_out else "exit"
        if not w.timed_out:
            log.warning(
                "worker %s (pid %s) died with exit code %s after %.1fs; restarting it%s",
                w.name, w.proc.pid, code, lived, f" in {delay:.1f}s" if delay else "",
            )  # fmt: skip
        self.restarts[reason] += 1
        self.restart_at[group, i] = time.monotonic() + delay

    def _check_liveness(self, now: float) -> None:
        """Kill a worker whose loop has not beaten for ``--worker-timeout`` s; ``_reap`` restarts it."""
        limit = self.settings.worker_timeout
        for w in self._all():
            last = w.beat.value
            if not last:  # still importing and starting its loop (a spawned worker takes a while)
                last, limit = w.started, max(self.settings.worker_timeout, STARTUP_TIMEOUT_S)
            else:
                limit = self.settings.worker_timeout
            silent = now - last
            if not w.timed_out and silent > limit and w.proc.exitcode is None:
                w.timed_out = True
                log.error(
                    "worker %s (pid %s) missed its heartbeat for %.1fs (--worker-timeout %g); killing it",
                    w.name, w.proc.pid, silent, limit,
                )  # fmt: skip
                _kill(w.proc, signal.SIGKILL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("supervisor: %s, draining %d workers", signal.Signals(signum).name, len(self._all()))
        self.stopping = True
        self._forward(signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        for w in self._all():
            _kill(w.proc, sig)

    # ------------------------------------------------------------ SIGHUP: a new generation

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _start_reload(self) -> None:
        if self.incoming:
            log.warning("SIGHUP: a reload is already under way; ignored")
            return
        self.running_settings = self.settings
        if self.reload_settings is not None:
            try:
                fresh = self.reload_settings()
            except SystemExit:
                log.error("SIGHUP: the settings no longer load (see above); keeping the running workers")
                return
            if fresh.workers < 2:
                log.error("SIGHUP: the settings now ask for one worker; that needs a restart, not a reload")
                return
            self.settings = msgspec.structs.replace(fresh, node_id=self.settings.node_id)
        s = self.settings
        log.info("SIGHUP: starting %d new workers; the old ones hand over once they listen", s.workers)
        self.reloads += 1
        # Spawned, not forked: the new workers import the code as it is on disk now.
        self.incoming = {i: self._spawn(i, self.spawn) for i in range(s.workers)}
        self.reload_deadline = time.monotonic() + RELOAD_READY_TIMEOUT_S

    def _check_reload(self, now: float) -> None:
        if not self.incoming:
            return
        if all(w.ready for w in self.incoming.values()):
            old = list(self.workers.values())
            spread = self.settings.drain_spread
            for w in old:
                if not w.send(Message("handoff", spread=spread)):
                    _kill(w.proc, signal.SIGTERM)
            self.retiring.extend(old)
            self.workers, self.incoming = self.incoming, {}
            log.info(
                "reload: %d new workers listen; %d old ones close over %gs",
                len(self.workers),
                len(old),
                spread,
            )
        elif now > self.reload_deadline:
            self._abort_reload(f"the new workers did not listen within {RELOAD_READY_TIMEOUT_S:g}s")

    def _abort_reload(self, why: str) -> None:
        """Stop the new generation and keep serving with the running one, on its settings."""
        log.error("reload failed: %s; keeping the running workers", why)
        for w in self.incoming.values():
            _kill(w.proc, signal.SIGTERM)
        self.retiring.extend(self.incoming.values())
        self.incoming = {}
        self.settings = self.running_settings

    # ------------------------------------------------------------ metrics

    def collect(self) -> list[Metric]:
        """Ask every worker for its families, wait up to SCRAPE_TIMEOUT_S, merge with what is known."""
        self.scrape_id += 1
        sid = self.scrape_id
        asked = [w for w in self._all() if w.ready and w.send(Message("scrape", id=sid))]
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while any(w.answered < sid and w.proc.exitcode is None for w in asked):
            left = deadline - time.monotonic()
            if left <= 0:
                late = [w.name for w in asked if w.answered < sid]
                log.warning(
                    "scrape: workers %s did not answer in %gs; using their last counts",
                    late,
                    SCRAPE_TIMEOUT_S,
                )
                break
            self._wait(min(left, 0.25), scrape=True)
        per_worker = {w.name: w.families for w in self._all() if w.families}
        return merge(per_worker, self.retired, self._own())

    def _own(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("wsfan_workers", "Worker processes by state", labels=["state"])
        live.add_metric(["serving"], sum(1 for w in self.workers.values() if w.ready))
        live.add_metric(
            ["starting"], sum(1 for w in [*self.workers.values(), *self.incoming.values()] if not w.ready)
        )
        live.add_metric(["draining"], len(self.retiring))
        yield live
        restarts = CounterMetricFamily(
            "wsfan_worker_restarts",
            "Workers restarted by the supervisor: exit = it died, timeout = it missed its heartbeat",
            labels=["reason"],
        )
        for reason, n in sorted(self.restarts.items()):
            restarts.add_metric([reason], n)
        yield restarts
        yield CounterMetricFamily("wsfan_reloads", "SIGHUP reloads (new generation of workers)", self.reloads)
        for fam in ProcessCollector(registry=None).collect():
            for sample in fam.samples:
                sample.labels["worker"] = "supervisor"
            yield fam

    def healthy(self) -> bool:
        return not self.stopping and len(self.workers) == self.settings.workers


class MetricsListener:
    """The supervisor's internal listener (``/metrics`` merged over workers, ``/healthz``), driven
    by its wait loop without ever blocking it.

    A connection is read as it becomes readable, into its own buffer, and answered only once its
    whole request head is there, so a client that sends half a request line and waits holds no
    one up (the stdlib server's blocking read held the supervisor, worker restarts included, for
    5 s per such connection). The head passes :func:`check_request_head`, the WebSocket port's
    rules, and is refused in the same words; one that is not complete within ``timeout`` seconds
    (``--request-timeout``) is dropped.
    """

    def __init__(self, sup: Supervisor, host: str, port: int, timeout: float) -> None:
        self.server = _metrics_server(sup, host, port)
        self.server.socket.setblocking(False)
        self.timeout = timeout
        self.pending: dict[socket.socket, tuple[float, bytearray, Any]] = {}

    def sockets(self) -> list[socket.socket]:
        return [self.server.socket, *self.pending]

    def next_deadline(self) -> float:
        return min(deadline for deadline, _, _ in self.pending.values())

    def expire(self) -> None:
        now = time.monotonic()
        for sock in [s for s, (deadline, _, _) in self.pending.items() if deadline <= now]:
            self._drop(sock)

    def readable(self, sock: Any) -> None:
        if sock is self.server.socket:
            try:
                conn, addr = sock.accept()
            except OSError:  # gone before we got to it, or out of descriptors: nothing to answer
                return
            conn.setblocking(False)
            self.pending[conn] = (time.monotonic() + self.timeout, bytearray(), addr)
            return
        _, buf, addr = self.pending[sock]
        try:
            chunk = sock.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(sock)
            return
        buf += chunk
        start = request_start(
            buf, len(buf)
        )  # empty lines before the request line are skipped (RFC 9112 §2.2)
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if buf.count(b"\n") != buf.count(b"\r\n"):  # a bare LF: refused at once, even mid-head
                self._answer(sock, Refusal(400, BARE_LF))
            elif len(buf) >= MAX_HEAD_BYTES:
                self._answer(sock, Refusal(431, "request head larger than 16 KiB"))
            return
        refusal = check_request_head(bytes(buf[start:end]))
        if refusal is not None:
            self._answer(sock, refusal)
            return
        del self.pending[sock]
        sock.setblocking(True)
        sock.settimeout(1.0)  # the answer is small: a client that reads nothing is dropped
        try:
            self.server.finish_request(_Buffered(sock, bytes(buf[start:])), addr)  # type: ignore[arg-type]
        except OSError:
            pass
        finally:
            self.server.shutdown_request(sock)

    def _answer(self, sock: socket.socket, refusal: Refusal) -> None:
        try:
            sock.send(http_answer(refusal))
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self.pending.pop(sock, None)
        sock.close()

    def close(self) -> None:
        for sock in list(self.pending):
            self._drop(sock)
        self.server.server_close()


class _Buffered:
    """A connected socket whose request head was already read: the handler reads it from memory."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self.sock, self.head = sock, head

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> Any:
        return io.BytesIO(self.head) if "r" in mode else self.sock.makefile(mode, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _metrics_server(sup: Supervisor, host: str, port: int) -> http.server.HTTPServer:
    """The request handling of :class:`MetricsListener`: ``/metrics`` (merged) and ``/healthz``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SupervisorCollector(sup))

    class Handler(MetricsHandler):
        timeout = 1  # for writing the answer: its head was read before (MetricsListener)

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                super().do_GET()
                return
            if path == "/healthz":
                ok = sup.healthy()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok\n" if ok else b"workers missing\n")
                return
            self.send_error(404)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            super().send_error(code)  # the status's phrase only: the stdlib's message quotes the request

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics listener: " + format, *args)

    Handler.registry = registry
    server = http.server.HTTPServer((host, port), Handler)
    server.timeout = 0  # handle_request() is called only when the socket is readable
    return server


class _SupervisorCollector:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> list[Metric]:
        return self.sup.collect()


def _kill(p: BaseProcess, sig: int) -> None:
    if p.pid is None:
        return
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the worker's side


def _worker_main(
    settings: Settings, supervisor_pid: int, index: int, link: socket.socket, beat: Any, inherited: list[int]
) -> None:
    # The supervisor's handlers were forked along: a worker must not forward signals to its siblings.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's; a worker must not die of it
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    _exit_with_parent(supervisor_pid)
    if not logging.getLogger().handlers:  # spawned (SIGHUP): nothing of the supervisor's setup came along
        logs.setup(settings.log_level, settings.log_format)
    logs.bind(worker=index)  # every log line of this worker says which one it is (and its pid)
    import uvloop

    sys.exit(uvloop.run(_worker(settings, link, beat)))


async def _worker(settings: Settings, link: socket.socket, beat: Any) -> int:
    from wsfan.server.app import serve

    loop = asyncio.get_running_loop()
    interval = max(0.02, min(1.0, settings.worker_timeout / 4))

    def heartbeat() -> None:
        beat.value = time.monotonic()
        loop.call_later(interval, heartbeat)

    heartbeat()
    reader, writer = await asyncio.open_unix_connection(sock=link)
    nodes: list[Node] = []

    def attach(node: Node, stop: asyncio.Event) -> None:
        nodes.append(node)
        loop.create_task(_serve_link(node, stop, reader, writer))

    code = await serve(settings, attach)
    if nodes:  # the final counts, so that the supervisor's sums include the drain
        writer.write(frame(Message("metrics", id=-1, families=nodes[0].metrics.snapshot())))
        try:
            await writer.drain()
        except ConnectionError:
            pass
    return code


async def _serve_link(
    node: Node, stop: asyncio.Event, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await node.listening.wait()
    writer.write(frame(Message("ready")))
    try:
        while True:
            head = await reader.readexactly(_LEN.size)
            msg = _decoder.decode(await reader.readexactly(_LEN.unpack(head)[0]))
            if msg.op == "scrape":
                writer.write(frame(Message("metrics", id=msg.id, families=node.metrics.snapshot())))
            elif msg.op == "handoff":
                node.handoff_spread = msg.spread
                stop.set()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the supervisor is gone: PR_SET_PDEATHSIG sends SIGTERM


def _exit_with_parent(supervisor_pid: int) -> None:
    """Linux: a worker is sent SIGTERM (and drains) when the supervisor dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        sys.exit(0)
