"""``--workers N``: a supervisor process and N workers sharing the port.

Why processes: one event loop uses one core. Each worker is a whole node (hub,
transport, its own broker connection) bound to the same port with SO_REUSEPORT,
so the kernel spreads new connections over them and nothing is handed between
processes. Workers share rooms, seq and history only through the broker, exactly
as nodes on different machines do, which is why more than one needs ``--broker``.

The supervisor stays off the data path. It restarts a worker that dies (at once
the first time, with backoff when it keeps dying right after starting, and it
gives up when one never manages to start, e.g. the port is taken), and on
SIGTERM/SIGINT it forwards SIGTERM so that every worker drains (close 1001)
before exiting. Its exit code is 0 when every worker drained cleanly.

Workers are forked, not spawned: they start in milliseconds and nothing needs to
be pickled. The supervisor has no event loop and no threads when it forks.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType

import msgspec

from wsfan.server import logs
from wsfan.server.config import Settings

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


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; 0 after a clean drain of all of them."""
    return Supervisor(settings).run()


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base = settings.node_id or secrets.token_hex(3)
        self.ctx = multiprocessing.get_context("fork")
        self.procs: dict[int, BaseProcess] = {}
        self.started: dict[int, float] = {}
        self.restarts: dict[int, int] = {}
        self.quick_deaths: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.failed = False
        self.exit_codes: list[int | None] = []

    def run(self) -> int:
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("supervisor pid %d: %d workers on %s:%d", os.getpid(), s.workers, s.host, s.port)
        for i in range(s.workers):
            self._spawn(i)
        deadline: float | None = None
        while True:
            if self.stopping:
                if deadline is None:
                    deadline = time.monotonic() + s.drain_timeout + EXIT_GRACE_S
                    self.restart_at.clear()
                    self._forward(signal.SIGTERM)  # also reaches a worker forked while the signal arrived
                if not self.procs:
                    break
                if time.monotonic() > deadline:
                    log.error("workers %s did not exit after the drain; killing them", sorted(self.procs))
                    self._forward(signal.SIGKILL)
                    deadline = time.monotonic() + EXIT_GRACE_S
            now = time.monotonic()
            for i, when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[i]
                    self._spawn(i)
            timeout = min([0.5, *(max(0.0, t - now) for t in self.restart_at.values())])
            sentinels = {p.sentinel: i for i, p in self.procs.items()}
            for ready in multiprocessing.connection.wait(list(sentinels), timeout):
                self._reap(sentinels[ready])  # type: ignore[index]
        clean = not self.failed and all(code in CLEAN_EXITS for code in self.exit_codes)
        log.info("supervisor: all workers stopped%s", "" if clean else " (not cleanly)")
        return 0 if clean else 1

    def _spawn(self, index: int) -> None:
        generation = self.restarts.get(index, 0)
        # A restarted worker gets a new node id, so that its conn ids never repeat a dead worker's.
        node_id = f"{self.base}-{index}" + (f".{generation}" if generation else "")
        worker = msgspec.structs.replace(self.settings, node_id=node_id)
        p = self.ctx.Process(target=_worker_main, args=(worker, os.getpid(), index), name=f"wsfan-{node_id}")
        p.start()
        self.procs[index] = p
        self.started[index] = time.monotonic()
        if self.stopping:
            _kill(p, signal.SIGTERM)

    def _reap(self, index: int) -> None:
        p = self.procs.pop(index)
        p.join()
        code = p.exitcode
        if self.stopping:
            self.exit_codes.append(code)
            if code not in CLEAN_EXITS:
                log.warning("worker %d (pid %s) exited with %s while stopping", index, p.pid, code)
            return
        lived = time.monotonic() - self.started[index]
        quick = self.quick_deaths[index] = self.quick_deaths.get(index, 0) + 1 if lived < QUICK_DEATH_S else 0
        if quick >= MAX_QUICK_DEATHS:
            log.error("worker %d failed %d times right after starting; stopping all workers", index, quick)
            self.failed = True
            self.stopping = True
            return
        delay = min(0.1 * 2 ** (quick - 1), RESTART_BACKOFF_MAX_S) if quick > 1 else 0.0
        log.warning(
            "worker %d (pid %s) died with exit code %s after %.1fs; restarting it%s",
            index, p.pid, code, lived, f" in {delay:.1f}s" if delay else "",
        )  # fmt: skip
        self.restarts[index] = self.restarts.get(index, 0) + 1
        self.restart_at[index] = time.monotonic() + delay

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("supervisor: %s, draining %d workers", signal.Signals(signum).name, len(self.procs))
        self.stopping = True
        self._forward(signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        for p in list(self.procs.values()):
            _kill(p, sig)


def _kill(p: BaseProcess, sig: int) -> None:
    if p.pid is None:
        return
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


def _worker_main(settings: Settings, supervisor_pid: int, index: int = 0) -> None:
    # The supervisor's handlers were forked along: a worker must not forward signals to its siblings.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _exit_with_parent(supervisor_pid)
    logs.bind(worker=index)  # every log line of this worker says which one it is (and its pid)
    import uvloop

    from wsfan.server.app import serve

    sys.exit(uvloop.run(serve(settings)))


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
