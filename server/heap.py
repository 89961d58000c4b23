"""Giving memory back after many rooms went away: what pins it, and the one call that unpins it.

Measured with ``python -m wsfan.bench rooms`` (200,000 one-shot rooms, then their TTL) and
``sys._debugmallocstats()`` / ``mallinfo2()`` in the server: once the sweep has forgotten
every room, the *live* data is back to what it was before them (pymalloc's allocated
bytes within 0.1 %, glibc's in-use bytes within 0.2 MiB), yet RSS stayed at ~3x the
cold server. The difference is memory that is free but cannot be returned, because a few
long-lived blocks allocated *during* the burst sit between the freed ones:

- pymalloc (objects up to 512 B) returns a 1 MiB arena to the OS only when every block in
  it is free. One survivor per arena keeps the whole MiB resident.
- glibc (larger blocks: dict tables, deque blocks) returns free pages only on
  ``malloc_trim``, and only whole 4 KiB pages: a survivor pins its page.

The survivors, found with tracemalloc started at the cold baseline:

1. CPython 3.11's type attribute cache. msgspec checks a ``pattern`` constraint (our room
   names, ``wire.RoomName``) with ``PyObject_CallMethod(regex, "search", ...)``, which
   creates a new ``"search"`` string per call; the cache keys entries by that string's
   *address* and keeps a reference, so up to 4,096 of these 55-byte strings, allocated at
   random moments of the burst, survive it: ~460 in the bench, one per pinned arena.
   ``sys._clear_type_cache()`` drops them (CPython 3.12 keys the cache by interned names
   only, so there it is a no-op that costs nothing).
2. Free lists (tuples, lists, dicts, floats...): blocks freed during the burst are kept for
   reuse, scattered over the arenas. Only a full collection (``gc.collect()``) empties them.
3. Tables that never shrink: a dict or set keeps the table it had at its largest
   (``compacted``).
4. Small objects that traffic rewrites, last made while the burst ran: every ``+= 1`` past 256
   is a new int and every timestamp a new float, so a node counter (``Stats``, histograms, the
   broker's), a connection's heartbeat timestamps and ping-rate bucket, a session's rate-limit
   bucket (made at its first message: during the burst), the flush queues and the periodic
   timers' handles (sweeps, fd recount) all sit wherever the allocator had a free block at that
   moment. Found by walking pymalloc's arenas and the traceback of every block allocated after
   the cold baseline (tracemalloc), 50,000 rooms: 128 such blocks (6.9 KB) held 12 arenas that
   had nothing else. Once the burst is freed, re-creating them gives the arenas back:
   pymalloc serves a size class from its partly used pools, which have live blocks, so a copy
   lands where memory is kept anyway and the old block's arena can go. ``relocate`` has each
   holder re-create them (and says why the copies are not steered elsewhere). The
   connection's frame counter is gone instead (a flag: a frame allocates nothing that outlives it).
5. Empty pools in an arena that a survivor keeps: pymalloc never gives a pool's pages back while
   its arena lives, so an arena kept by one block stays resident in full (every pool the burst
   touched). After 1-4, the first burst of 200,000 rooms still left 6-7 such arenas (bench
   ``rooms``: 4-7 MiB, 1.08-1.12x cold); which blocks keep them changes from run to run
   (tuples on the interpreter's free list, copies that ``relocate`` made in the only partly
   used pool of their size class). ``release_pools`` gives back every empty pool's pages but
   the first (the header, which links the arena's free pools), through a C module
   (``server/_pools.c``) that tracks the arenas made after ``track_arenas`` and reads the pool
   headers: 1.00x cold after the first burst in the probe run, 1.02x after the second.

``release_memory`` does 1, 2, ``malloc_trim(0)`` and 5, in that order. ``Compaction`` decides when:
every broker (``broker/memory.py`` after a sweep, ``broker/redis.py`` and through it the
cluster and sentinel brokers after an unsubscribe) counts the rooms it forgot and, past
``COMPACT_AFTER``, shrinks its tables, the hub's (a hook), calls ``release_memory``, then
``relocate`` with every mover (the broker's, the hub's, the connection registry's, the fd
budget's, the node's), then 5 again; never on the publish or fan-out path. Figures:
docs/protocol-choices.md, "Memory comes back when rooms go".
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

#: A table is rebuilt when it holds at most this fraction of the entries it has room for.
SHRINK_BELOW = 1 / 8
#: ... and only when it is at least this big (bytes, ``sys.getsizeof``): small ones are not worth it.
SHRINK_MIN_BYTES = 16 * 1024
#: Once a broker has forgotten at least this many rooms since its last compaction, and at least
#: as many as it has left, its tables and the hub's are compacted and memory is released.
COMPACT_AFTER = 1024

log = logging.getLogger("wsfan.heap")

_T = TypeVar("_T", dict, set)  # type: ignore[type-arg]
_V = TypeVar("_V")
#: A mover re-creates long-lived small objects (``relocate``) and appends what it replaced.
Mover = Callable[[list[object]], None]

try:  # the process's own symbols include the C library's (no ldconfig/gcc lookup at startup)
    _trim: Any = ctypes.CDLL(None).malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _trim = None

_clear_type_cache: Callable[[], None] | None = getattr(sys, "_clear_type_cache", None)

try:  # optional C module (pyproject.toml): absent where the install had no C compiler
    from wsfan.server import _pools  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - built on every machine the tests run on (test_heap checks)
    _pools = None


_said_unknown = False  # each warning once per process: a compaction calls release_pools twice
_said_stopped = False
_tracked = False  # track_arenas said True


def track_arenas() -> bool:
    """Know every pymalloc arena allocated from now on, so that ``release_pools`` can give their empty
    pools back; call once at startup, before traffic. False where that is not possible: the C
    module was not built (no compiler at install), the interpreter's pool headers are not the
    ones it knows (CPython 3.10-3.13 with the GIL), or other code replaced the arena allocator
    after an earlier call; the server then runs as before. True under ``PYTHONMALLOC=malloc``
    too, where no arena is ever made and nothing is given back."""
    global _tracked
    _tracked = bool(_pools is not None and _pools.track())
    return _tracked


def release_pools() -> int:
    """Give back the pages of every empty pool in the arenas tracked since ``track_arenas`` (all but
    the pool's first page, its header); the number of pools. 0 when not tracking.

    Only this interpreter's arenas, only 16 KiB pools; an arena whose pool headers do not look
    as pymalloc writes them is left alone (server/_pools.c lists what else the arena allocator
    serves, and how each is kept apart): the module never writes to memory it does not
    recognise. A warning, once per process, when no arena looked right or when other code
    replaced the arena allocator (tracking stops). Cost: one ``madvise`` per empty pool the
    first time (about 4 µs each: 47 ms for 12,378 pools), a header read per pool after that.
    """
    global _said_unknown, _said_stopped
    if _pools is None:
        return 0
    released, skipped, looked = _pools.release()
    if _tracked and not _said_stopped and not _pools.stats()["tracking"]:
        _said_stopped = True
        log.warning(
            "memory: other code replaced the arena allocator; empty pymalloc pools are no longer given back"
        )
    if skipped and skipped == looked:  # none looked right: pool headers this module does not know
        if not _said_unknown:
            _said_unknown = True
            log.warning(
                "memory: no pymalloc arena looked as expected (%d); none is touched, now or later", skipped
            )
    elif skipped:  # e.g. a frame's data-stack chunk of an arena's size: not pymalloc's
        log.debug(
            "memory: %d of %d tracked arenas did not look like pymalloc's and were left alone",
            skipped,
            looked,
        )
    return int(released)


def pool_stats() -> dict[str, Any]:
    """``_pools.stats()``: tracking (bool), arenas tracked, arena and pool size (bytes), totals; {} without it."""
    return dict(_pools.stats()) if _pools is not None else {}


def release_memory() -> None:
    """Drop what pins freed memory (see the module docstring) and return free heap pages to the OS.

    Costs one full garbage collection of the objects not frozen at startup (``gc.freeze`` in
    ``app.py``): milliseconds with tens of thousands of connections; call it after a sweep
    that removed many rooms, not per request.
    """
    if _clear_type_cache is not None:
        _clear_type_cache()
    gc.collect()  # a full collection also empties the interpreter's free lists
    if _trim is not None:
        _trim(0)
    release_pools()


def fresh(value: _V) -> _V:
    """A new object equal to ``value`` when it is an ``int`` or ``float`` that is not cached; else ``value``.

    ``x + 0`` and ``x * 1.0`` allocate a new block (``-0.0``, NaN and infinities keep their
    value); ints from -5 to 256 are the interpreter's shared objects and stay as they are,
    as does every other type (bool included).
    """
    kind = type(value)
    if kind is int:
        return value if -5 <= value <= 256 else value + 0  # type: ignore[operator,return-value]
    if kind is float:
        return value * 1.0  # type: ignore[operator,no-any-return]
    return value


def moved(value: _V, memo: dict[int, object], replaced: list[object]) -> _V:
    """``fresh(value)``, made once per object: ``memo`` maps an old object's id to its copy, so that
    values shared before (a sweep's timestamp in every connection) stay shared. The old one goes
    to ``replaced``, which keeps it alive (and its id unique) until every mover ran."""
    kind = type(value)
    if kind is not float and (kind is not int or -5 <= value <= 256):  # type: ignore[operator]
        return value
    known = memo.get(id(value))
    if known is not None:
        return known  # type: ignore[return-value]
    copy = memo[id(value)] = fresh(value)
    replaced.append(value)
    return copy


def move_slots(obj: object, names: tuple[str, ...], replaced: list[object]) -> None:
    """``fresh`` every int and float in ``obj``'s attributes ``names``, and in the values of its dicts
    and lists there (counters by key, bucket counts); the old ones go to ``replaced``."""
    for name in names:
        value = getattr(obj, name)
        kind = type(value)
        if kind is dict:  # its table too: a key added during a burst grew it then
            items = list(value.items())
            replaced.append(items)
            value.clear()
            for k, v in items:
                value[k] = fresh(v)
        elif kind is list:
            for i, old in enumerate(value):
                new = fresh(old)
                if new is not old:
                    replaced.append(old)
                    value[i] = new
        else:
            new = fresh(value)
            if new is not value:
                replaced.append(value)
                setattr(obj, name, new)


def relocate(movers: list[Mover]) -> None:
    """Re-create long-lived small objects that a burst of traffic made, so that they keep no arena of it.

    A block that outlives a burst keeps its whole 1 MiB pymalloc arena resident (the module
    docstring). Each mover makes new objects for what it holds and appends the replaced ones to
    a list that keeps them alive until all movers ran (otherwise a replaced float on the float
    free list would be the next copy's block). pymalloc serves a new block from a pool that has
    live blocks already, so a copy does not keep an arena that would otherwise be freed; a full
    collection then empties the free lists the replaced objects went to. Call after
    ``release_memory`` (free lists empty).

    Tried and measured worse: borrowing every free block of the pools in use first, so that the
    copies land in empty pools of pymalloc's fullest arena. When the older arenas have no empty
    pool that arena is one of the burst's, and the copies then keep it (bench ``rooms``, full
    size: 1.10, 1.12 and 1.15x cold with it, 1.085 and 1.09x without, same machine and hour).
    """
    replaced: list[object] = []
    try:
        for move in movers:
            move(replaced)
    finally:
        replaced.clear()
        gc.collect()
        if _trim is not None:
            _trim(0)
        release_pools()


def compacted(table: _T) -> _T:
    """``table`` itself, or a copy sized for its entries when it is mostly empty room.

    A dict or set never shrinks when entries are deleted: after a burst of 200,000 rooms
    the room dict keeps a 7.7 MB table for the few rooms left. Rebuilt when it is at least
    ``SHRINK_MIN_BYTES`` and its entries would fit in ``SHRINK_BELOW`` of it. The caller
    must replace every reference to the old table with the returned one.
    """
    size = sys.getsizeof(table)
    # An entry takes at least 16 bytes (a set slot; a dict's takes more): when even that much
    # is over the fraction, a copy cannot be small enough and is not made.
    if size < SHRINK_MIN_BYTES or len(table) * 16 > size * SHRINK_BELOW:
        return table
    fresh = type(table)(table)
    if sys.getsizeof(fresh) <= size * SHRINK_BELOW:
        return fresh
    return table


def compact_in_place(table: _T) -> None:
    """Shrink ``table`` itself (``compacted``'s rule) for holders that keep a reference to it.

    ``clear`` frees the old table and ``update`` from the compact copy sizes the new one for
    its entries; the object stays the same, so a loop holding it (the Redis broker's reader)
    sees the same entries before and after.
    """
    fresh = compacted(table)
    if fresh is not table:
        table.clear()
        table.update(fresh)  # type: ignore[arg-type]


class Compaction:
    """When a broker's per-room tables and the hub's are compacted, and what runs then (one per broker).

    A broker calls ``forgot(rooms, left)`` each time it forgets rooms (a sweep, an
    unsubscribe) and compacts when it returns True: ``COMPACT_AFTER`` rooms forgotten since
    the last compaction, and at least as many as the broker has ``left`` (the memory
    broker's rule since issue 14). ``run`` calls ``hooks`` (the broker's own tables first, the
    hub's ``Hub.compact``), then ``release_memory``; its cost is paid per thousand rooms.
    """

    __slots__ = ("forgotten", "hooks", "movers", "_scheduled")

    def __init__(self) -> None:
        self.forgotten = 0
        self.hooks: list[Callable[[], None]] = []
        #: ``relocate``'s movers: every holder of long-lived small state written by traffic.
        self.movers: list[Mover] = []
        self._scheduled = False

    def forgot(self, rooms: int, left: int) -> bool:
        """Count ``rooms`` forgotten (``left`` still held); True when a compaction is due."""
        self.forgotten += rooms
        return self.forgotten >= COMPACT_AFTER and self.forgotten >= left

    def run(self) -> None:
        """Compact now: every hook in order, then ``release_memory``, then ``relocate`` the movers."""
        self._scheduled = False
        self.forgotten = 0
        for hook in self.hooks:
            hook()
        release_memory()
        before = pool_stats()
        started = time.perf_counter()
        if self.movers:
            relocate(self.movers)
        else:
            release_pools()
        after = pool_stats()
        log.debug(
            "compacted: relocated in %.1f ms; empty pymalloc pools given back: %d, arenas tracked: %d",
            (time.perf_counter() - started) * 1e3,
            after.get("pools_released", 0) - before.get("pools_released", 0),
            after.get("arenas", 0),
        )

    def run_soon(self) -> None:
        """``run`` on the event loop's next turn (once however often asked before then).

        For a broker that forgets rooms inside a hub call (``unsubscribe`` from ``Hub.leave``):
        the hub's tables are replaced between callbacks, never under a caller.
        """
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.run)
