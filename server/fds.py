"""File descriptors: the soft limit raised at start, a reserve kept for the broker and the HTTP side.

Why a reserve: every client costs one fd, and so does every Redis connection and every
request on the HTTP side. When clients take the last fds, nothing else can connect: a
Redis restart frees the broker's fds, arriving clients take them, and every reconnect of
the broker fails with EMFILE for as long as clients keep arriving. So upgrades are refused
(503 + Retry-After) once fewer than ``--fd-reserve`` fds are left.

What the accept loop does at the limit (libuv ``uv__server_io``, used by uvloop): accept()
fails with EMFILE, libuv closes a spare fd it keeps for this, accepts and at once closes
every pending connection (clients see the connection closed before any HTTP answer), and
reports nothing to uvloop; if even that fails, uvloop's ``UVStreamServer._fatal_error``
closes the listening socket without a word. Neither can be observed from Python, so this
module counts what it can see: the fds in use (``/proc/self/fd``, read when close to the
limit) and each time the process was found at its limit, with a throttled log line.

Counting is cheap far from the limit: the last exact count plus the connections opened
since; ``/proc/self/fd`` is listed only within twice the reserve of the limit, at most
every ``RECOUNT_S``.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from collections.abc import Callable
from typing import Any

from wsfan.server.heap import move_slots

log = logging.getLogger("wsfan.fds")

RECOUNT_S = 0.05
# Far from the limit the estimate is still recounted this often (the broker's pool grows and shrinks).
STALE_S = 5.0
# One warning per this many seconds while the process keeps running into its limit.
WARN_EVERY_S = 10.0
EXHAUSTED_ERRNOS = (errno.EMFILE, errno.ENFILE)


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as most servers do; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("raised the open-files limit from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. RLIM_INFINITY not allowed on some systems
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def count_open() -> int | None:
    """File descriptors this process has open now (Linux: ``/proc/self/fd``); None when it cannot tell.

    At the limit listing the directory fails too (it needs an fd): the caller counts that as full.
    """
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself holds
    except OSError:
        return None


def is_exhausted(exc: BaseException | None) -> bool:
    """True when ``exc`` or one of its causes is EMFILE/ENFILE (redis-py wraps the OSError)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED_ERRNOS:
            return True
        if "Too many open files" in str(exc):  # redis-py's ConnectionError keeps only the text
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class FdBudget:
    """How many fds are left before the reserve; counts refusals and exhaustion by where it was seen."""

    def __init__(
        self, reserve: int, connections: Callable[[], int], clock: Callable[[], float] = time.monotonic
    ):
        self.reserve = reserve
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._connections = connections
        self._clock = clock
        self._base = (count_open() or 0) - connections()  # fds that are not client connections
        self._counted_at = clock()
        self.exhausted: dict[str, int] = {}
        self._warned_at = -WARN_EVERY_S
        self._watch: Any = None  # the recount timer's handle (watch)
        self._tick: Callable[[], None] = lambda: None

    def in_use(self) -> int:
        """Open fds: exact when near the limit (recounted at most every ``RECOUNT_S``), estimated far from it."""
        conns = self._connections()
        estimate = self._base + conns
        age = self._clock() - self._counted_at
        if age >= STALE_S or (self.limit - estimate <= 2 * self.reserve and age >= RECOUNT_S):
            counted = count_open()
            self._counted_at = self._clock()
            if counted is None:
                estimate = self.limit
            else:
                self._base = counted - conns
                estimate = counted
            if estimate >= self.limit - 1:
                # The accept loop is failing with EMFILE now (libuv drops those clients unseen).
                self.note_exhausted("accept", "at the open-files limit")
        return estimate

    def watch(self, every: float = 1.0) -> None:
        """Recount on a timer as well: at the limit no upgrade arrives to trigger a count (accept fails first)."""
        import asyncio

        loop = asyncio.get_running_loop()

        def tick() -> None:
            self._watch = None  # fired: nothing for ``relocate`` to move until the next one
            self.in_use()
            self._watch = loop.call_later(every, tick)

        self._tick = tick
        self._watch = loop.call_later(every, tick)

    def relocate(self, replaced: list[object]) -> None:
        """``heap.relocate``'s mover: the counts and the recount timer, each made anew."""
        move_slots(self, ("_base", "_counted_at", "_warned_at", "exhausted"), replaced)
        timer = self._watch
        if timer is not None:
            import asyncio

            timer.cancel()
            replaced.append(timer)
            self._watch = asyncio.get_running_loop().call_at(timer.when(), self._tick)

    def room_for_client(self) -> bool:
        """False once fewer than ``reserve`` fds are left: the upgrade is refused."""
        return self.reserve <= 0 or self.limit - self.in_use() > self.reserve

    def note_exhausted(self, where: str, what: str) -> None:
        """EMFILE/ENFILE seen by ``where`` (``broker``, ``accept``): count it, log it at most every 10 s."""
        self.exhausted[where] = self.exhausted.get(where, 0) + 1
        now = self._clock()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "out of file descriptors (%s: %s): %s open of %d; raise the limit (ulimit -n, LimitNOFILE) "
                "or --fd-reserve",
                where, what, count_open() or "all", self.limit,
            )  # fmt: skip
