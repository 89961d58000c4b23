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

``release_memory`` does 1, 2 and ``malloc_trim(0)``, in that order. ``Compaction`` decides when:
every broker (``broker/memory.py`` after a sweep, ``broker/redis.py`` and through it the
cluster and sentinel brokers after an unsubscribe) counts the rooms it forgot and, past
``COMPACT_AFTER``, shrinks its tables, the hub's (a hook) and calls ``release_memory``; never
on the publish or fan-out path.

What it cannot release: blocks that outlive the burst because they were last written during
it (every ``+= 1`` past 256 allocates a new int: per-connection and node counters) and
buffers grown under it; they pin about ten arenas. Bench ``rooms``, 200,000 rooms on a
loaded 2-core VM: 1.18x the cold RSS after the TTL (was 1.56x in the same conditions);
with ``PYTHONMALLOC=malloc``, where a survivor pins a 4 KiB page, 1.14x
(docs/protocol-choices.md, "Memory comes back when rooms go").
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import sys
from collections.abc import Callable
from typing import Any, TypeVar

#: A table is rebuilt when it holds at most this fraction of the entries it has room for.
SHRINK_BELOW = 1 / 8
#: ... and only when it is at least this big (bytes, ``sys.getsizeof``): small ones are not worth it.
SHRINK_MIN_BYTES = 16 * 1024
#: Once a broker has forgotten at least this many rooms since its last compaction, and at least
#: as many as it has left, its tables and the hub's are compacted and memory is released.
COMPACT_AFTER = 1024

_T = TypeVar("_T", dict, set)  # type: ignore[type-arg]

try:  # the process's own symbols include the C library's (no ldconfig/gcc lookup at startup)
    _trim: Any = ctypes.CDLL(None).malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _trim = None

_clear_type_cache: Callable[[], None] | None = getattr(sys, "_clear_type_cache", None)


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

    __slots__ = ("forgotten", "hooks", "_scheduled")

    def __init__(self) -> None:
        self.forgotten = 0
        self.hooks: list[Callable[[], None]] = []
        self._scheduled = False

    def forgot(self, rooms: int, left: int) -> bool:
        """Count ``rooms`` forgotten (``left`` still held); True when a compaction is due."""
        self.forgotten += rooms
        return self.forgotten >= COMPACT_AFTER and self.forgotten >= left

    def run(self) -> None:
        """Compact now: every hook in order, then ``release_memory``."""
        self._scheduled = False
        self.forgotten = 0
        for hook in self.hooks:
            hook()
        release_memory()

    def run_soon(self) -> None:
        """``run`` on the event loop's next turn (once however often asked before then).

        For a broker that forgets rooms inside a hub call (``unsubscribe`` from ``Hub.leave``):
        the hub's tables are replaced between callbacks, never under a caller.
        """
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.run)
