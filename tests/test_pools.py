"""pymalloc's empty pools given back to the OS (server/_pools.c, server/heap.py point 5).

The module writes into the allocator's own pool headers, so every test runs it in a fresh
interpreter (a subprocess) and checks what a wrong write would break: the contents of every
object that survived, objects made afterwards in the pools it gave back (every size class),
pymalloc's own statistics walk, and the debug allocator's checks (``PYTHONMALLOC=pymalloc_debug``
verifies the guard bytes around every block on free). RSS is read from /proc, not timed.

Where the C module could not be built the tests skip, except under ``WSFAN_REQUIRE_POOLS=1``
(set by ``.ci/run``): CI machines have a compiler, and a missing module there is a defect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import websockets

from helpers.servers import ServerProcess
from helpers.waiting import run, wait_until

ROOMS = 3_000

try:
    from wsfan.server import _pools  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - skipped or failed below
    _pools = None


def _needs_module() -> None:
    source = Path(__file__).resolve().parents[1] / "server" / "_pools.c"
    built = Path(_pools.__file__) if _pools is not None else None
    if built is not None and source.exists() and built.parent == source.parent:
        # an in-place build (make install) older than its source: these tests would test old code
        if built.stat().st_mtime < source.stat().st_mtime:
            pytest.fail(f"{built.name} is older than server/_pools.c: run `make install`", pytrace=False)
    if _pools is None:
        if os.environ.get("WSFAN_REQUIRE_POOLS") == "1":
            pytest.fail(
                "wsfan.server._pools was not built (server/_pools.c); WSFAN_REQUIRE_POOLS=1", pytrace=False
            )
        pytest.skip("wsfan.server._pools was not built (no C compiler at install)")


def _run(
    script: str, *, allocator: str | None = None, timeout: float = 120, prelude: bool = True
) -> list[str]:
    _needs_module()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "PYTHONTRACEMALLOC")}
    if allocator:
        env["PYTHONMALLOC"] = allocator
    done = subprocess.run(
        [sys.executable, "-c", (_PRELUDE if prelude else "") + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout.split()


_PRELUDE = r"""
import gc, os, random, re, sys, tempfile, zlib
from wsfan.server import _pools, heap

assert heap.track_arenas(), "not tracking"

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

def mallocstats():
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()  # walks every arena and pool header
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        return out.read().decode()

def arenas():
    found = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", mallocstats())
    return int(found.group(1).replace(",", ""))

def burst(n, keep_every, seed):
    # n objects of every pymalloc size class (bytes of 1..480 payload bytes, tuples, floats, strs),
    # every keep_every-th kept with its checksum
    rnd = random.Random(seed)
    made, kept = [], []
    for i in range(n):
        size = rnd.randrange(1, 480)
        obj = (rnd.randbytes(size), float(i), str(i) * (1 + i % 7))
        made.append(obj)
        if i % keep_every == 0:
            kept.append((obj, zlib.crc32(obj[0]), i))
    return made, kept

def intact(kept):
    return all(zlib.crc32(b) == crc and f == float(i) and s == str(i) * (1 + i % 7)
               for (b, f, s), crc, i in kept)
"""


def test_the_module_is_built_and_tracks_arenas_made_after_track() -> None:
    out = _run(
        r"""
before = _pools.stats()["arenas"]
made, kept = burst(100_000, 10**9, 1)
during = _pools.stats()
del made, kept
gc.collect()
after = _pools.stats()
print(before, during["arenas"], during["arena_size"], during["pool_size"], after["arenas"])
"""
    )
    before, during, arena_size, pool_size, after = map(int, out)
    assert before == 0, "arenas made before track() are not known"
    assert during > 10, "every arena the burst made is known"
    assert (arena_size, pool_size) == (1 << 20, 1 << 14), (
        "CPython 3.10+ on 64-bit: 1 MiB arenas, 16 KiB pools"
    )
    assert after < during, "arenas pymalloc freed are forgotten (the arena allocator's free is wrapped too)"


def test_release_gives_back_the_empty_pools_of_arenas_that_survivors_keep() -> None:
    """One survivor per few hundred objects keeps every arena of a burst; their empty pools come back."""
    out = _run(
        r"""
gc.collect(); heap.release_memory()
base = rss_kib()
made, kept = burst(300_000, 400, 2)
peak = rss_kib()
del made
gc.collect()
heap._trim(0)
held = rss_kib()
pools = heap.release_pools()
released = rss_kib()
again = heap.release_pools()
print(base, peak, held, pools, released, again, int(intact(kept)))
"""
    )
    base, peak, held, pools, released, again, ok = map(int, out)
    assert ok == 1, "a survivor's contents changed"
    assert held - base > (peak - base) // 2, "the cause is there: freed, yet most of the burst stays resident"
    assert pools > 100
    # Each empty pool keeps its first 4 KiB page of 16 KiB: at most a quarter stays, plus the survivors.
    assert released - base < (held - base) // 2, f"RSS {held} -> {released} KiB (cold {base})"
    assert again == 0, "a pool given back is not given back twice"


@pytest.mark.parametrize("allocator", [None, "pymalloc_debug"])
def test_pools_given_back_are_taken_again_by_every_size_class_intact(allocator: str | None) -> None:
    """Rounds of burst, release, burst: objects made in released pools and the survivors stay intact,
    pymalloc's statistics walk runs, and the debug allocator's guard bytes hold."""
    out = _run(
        r"""
survivors = []
for round_ in range(6):
    made, kept = burst(60_000, 97 + round_, 10 + round_)
    survivors.extend(kept)
    assert intact(made and [(m, zlib.crc32(m[0]), i) for i, m in enumerate(made)][::13]), round_
    del made
    gc.collect()
    heap.release_memory()  # gc, trim, and release_pools
    assert intact(survivors), round_
    if round_ % 2:
        survivors = survivors[::2]  # some survivors go too: their pools empty in later rounds
stats = mallocstats()
assert "# arenas allocated current" in stats
print(_pools.stats()["pools_released"], int(intact(survivors)))
""",
        allocator=allocator,
    )
    released, ok = map(int, out)
    assert released > 0 and ok == 1


def test_random_alloc_free_release_sequences_keep_every_object_intact() -> None:
    """Hypothesis: any sequence of making objects of random sizes, dropping some, releasing and
    collecting leaves every live object as it was made."""
    out = _run(
        r"""
from hypothesis import given, settings, strategies as st, HealthCheck

live = {}
serial = [0]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("make"), st.integers(1, 3_000), st.integers(0, 512)),
        st.tuples(st.just("drop"), st.floats(0, 1)),
        st.just(("release",)),
        st.just(("collect",)),
    ),
    min_size=1,
    max_size=30,
)

@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops)
def check(seq):
    for op in seq:
        if op[0] == "make":
            for _ in range(op[1]):
                serial[0] += 1
                data = os.urandom(op[2])
                live[serial[0]] = (data, zlib.crc32(data), [serial[0]] * (serial[0] % 5))
        elif op[0] == "drop":
            for k in [k for k in live if random.random() < op[1]]:
                del live[k]
        elif op[0] == "release":
            heap.release_pools()
        else:
            gc.collect()
        for k, (data, crc, lst) in live.items():
            assert zlib.crc32(data) == crc and lst == [k] * (k % 5), k

check()
print(_pools.stats()["pools_released"])
""",
        timeout=240,
    )
    assert int(out[0]) > 0, "the sequences never gave a pool back: the property checked nothing"


def test_a_server_gives_back_pools_when_it_compacts_after_many_rooms() -> None:
    """The real server tracks arenas from startup and tries to give pools back at each compaction:
    3,000 one-shot rooms (join, publish, leave), a 1 s TTL, then the debug line of
    ``heap.Compaction.run``. (How many pools come back depends on what survived; the tests above
    check that they do, the bench ``rooms`` scenario what it is worth.)"""
    _needs_module()

    async def rooms(url: str) -> None:
        async with websockets.connect(url) as ws:
            await ws.recv()  # welcome
            for i in range(ROOMS):
                room = f"p-{i}"
                await ws.send(json.dumps({"type": "join", "room": room}))
                await ws.send(json.dumps({"type": "publish", "room": room, "payload": i}))
                await ws.send(json.dumps({"type": "leave", "room": room, "id": str(i)}))
            acks = 0
            while acks < ROOMS:  # one reply per leave (the only messages with an id); errors fail below
                reply = json.loads(await ws.recv())
                assert reply["type"] == "ack", reply
                acks += 1

    with ServerProcess("--history-ttl", "1", "--log-level", "debug", "--rate-limit", "0") as srv:
        run(rooms(srv.url), timeout=60)
        line = wait_until(
            lambda: next((x for x in srv.output().splitlines() if "pools given back" in x), None),
            timeout=30,
        )
    assert line is not None, "no compaction ran, or it did not try to give pools back"
    tracked = int(line.rsplit("arenas tracked: ", 1)[1].split()[0])
    assert tracked > 0, f"the server did not track its arenas from startup: {line}"


# ---------------------------------------------------------------- what else the arena allocator serves
# (a hostile review of server/_pools.c found each case; one test per case)

_ARENA_API = r"""
import ctypes
# PYFUNCTYPE: called with the GIL held, as pymalloc calls its arena allocator (an arena made without
# a current thread state belongs to no known interpreter and is never released)
ALLOC = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
FREE = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

class ArenaAllocator(ctypes.Structure):  # PyObjectArenaAllocator, public C API
    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ALLOC), ("free", FREE)]

def arena_allocator():
    a = ArenaAllocator()
    ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(a))
    return a
"""


@pytest.mark.parametrize("first", ["thread", "recursion"])
def test_a_thread_or_a_deep_recursion_before_the_burst_does_not_turn_release_off(first: str) -> None:
    """CPython 3.11+ takes each thread's frame data-stack chunks (16 KiB and up) from the arena
    allocator too (pystate.c allocate_chunk); one of them came first and fixed the module's idea of
    the arena size at 16 KiB, and ``release`` then gave back nothing for the life of the process."""
    out = _run(
        f"first = {first!r}\n"
        + r"""
import threading
if first == "thread":
    t = threading.Thread(target=lambda: None); t.start(); t.join()
else:
    def down(n): return 0 if n == 0 else down(n - 1) + 1
    down(400)  # past the first 16 KiB chunk
made, kept = burst(200_000, 500, 3)
del made
gc.collect()
print(heap.release_pools(), _pools.stats()["arena_size"], int(intact(kept)))
"""
    )
    pools, arena_size, ok = map(int, out)
    assert arena_size == 1 << 20 and pools > 100 and ok == 1, out


def test_an_arena_of_4_kib_pools_is_left_alone() -> None:
    """A 64-bit CPython built without pymalloc's radix tree has 1 MiB arenas of 4 KiB pools
    (obmalloc.c: USE_LARGE_POOLS only with the radix tree). Such pool headers, laid out in a block
    from the (tracked) arena allocator: an empty pool at a 16 KiB boundary must not get the next
    12 KiB, three live pools, given back."""
    out = _run(
        _ARENA_API
        + r"""
import struct
junk = [bytes(40) for i in range(60_000)]; del junk
cur = arena_allocator()
SIZE, P4 = 1 << 20, 4096
a = cur.alloc(cur.ctx, SIZE)
first = (a + P4 - 1) & ~(P4 - 1)
pools = list(range(first, a + SIZE - P4 + 1, P4))
for p in pools:
    empty = p % 16384 == 0  # empty pools at 16 KiB boundaries, the others live
    szidx = 3
    size = (szidx + 1) * 16
    header = struct.pack("<QQQQIIII", 0 if empty else 5, 0, 0, 0, 7, szidx, 48 + 2 * size, P4 - size)
    ctypes.memmove(p, header, 48)
    if not empty:
        ctypes.memset(p + 48, 0xAB, P4 - 48)
live = [p for p in pools if p % 16384]
before = sum(ctypes.string_at(p + 48, P4 - 48).count(0xAB) for p in live)
released, skipped, looked = _pools.release()
after = sum(ctypes.string_at(p + 48, P4 - 48).count(0xAB) for p in live)
cur.free(cur.ctx, a, SIZE)
print(before, after, skipped, looked)
"""
    )
    before, after, skipped, looked = map(int, out)
    assert before > 0 and after == before, f"{before - after} live bytes given back"
    assert skipped == 1 and looked >= 1, "the arena was looked at and refused"


def test_an_arena_allocator_replaced_after_track_stops_the_tracking_instead_of_reading_freed_arenas() -> None:
    """Code that saved the arena allocator before ``track`` and restores it later makes pymalloc free
    tracked arenas without telling the module; ``release`` then read unmapped memory (SIGSEGV).
    Now it sees the allocator is no longer its own and stops for good."""
    out = _run(
        _ARENA_API
        + r"""
import gc
saved = arena_allocator()  # what a tool saves before wsfan's track() ...
from wsfan.server import _pools, heap
assert heap.track_arenas()
made = [bytes(100) for _ in range(200_000)]
tracked = _pools.stats()["arenas"]
ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(saved))  # ... and restores when it stops
del made
gc.collect()  # pymalloc frees the tracked arenas through the restored allocator
released, skipped, looked = _pools.release()
print(tracked, released, looked, _pools.stats()["tracking"], _pools.track())
""",
        prelude=False,
    )
    assert int(out[0]) > 10 and out[1:] == ["0", "0", "False", "False"], out


def test_a_frame_data_stack_chunk_of_an_arenas_size_is_neither_touched_nor_counted() -> None:
    """A frame of more than 512 KiB (70,000 locals) gets a 1 MiB data-stack chunk from the arena
    allocator: it is recorded like an arena, but ``release`` must recognise it (its size field),
    leave it alone and not report it as an arena that did not look right."""
    out = _run(
        r"""
n = 70_000
src = "def big(release):\n" + "".join(f" v{i} = {i}\n" for i in range(n))
src += " r = release()\n return r, " + " + ".join(f"v{i}" for i in range(0, n, 1000)) + "\n"
ns = {}
exec(compile(src, "big", "exec"), ns)
made, kept = burst(100_000, 300, 4)
del made
gc.collect()
(released, skipped, looked), total = ns["big"](_pools.release)
print(skipped, total == sum(range(0, n, 1000)), int(intact(kept)))
""",
        timeout=180,
    )
    assert out == ["0", "True", "1"], out


def test_an_arena_allocator_swapped_out_and_back_between_releases_leaves_no_freed_arena_to_read() -> None:
    """Code that installs its own arena allocator for a while and then puts the module's back lets
    pymalloc free tracked arenas meanwhile; the allocator is the module's again when ``release``
    runs, which then read unmapped memory (SIGSEGV). Now it skips and forgets unmapped arenas."""
    out = _run(
        _ARENA_API
        + r"""
import gc
plain = arena_allocator()  # what a tool keeps before wsfan's track()
from wsfan.server import _pools, heap
assert heap.track_arenas()
made = [bytes(100) for _ in range(200_000)]
tracked = _pools.stats()["arenas"]
ours = arena_allocator()
ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(plain))  # the tool's window starts
del made
gc.collect()  # pymalloc frees the tracked arenas, not through the module
ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(ours))  # ... and ends
released, skipped, looked = _pools.release()
again = [bytes(100) for _ in range(200_000)]  # tracked again, pools reused
del again
gc.collect()
print(tracked, _pools.stats()["arenas"] < tracked, heap.release_pools() >= 0, _pools.stats()["tracking"])
""",
        prelude=False,
    )
    assert int(out[0]) > 10 and out[1:] == ["True", "True", "True"], out


def test_a_stopped_tracker_is_said_once_in_the_log() -> None:
    """When other code replaced the arena allocator, the node says once that memory is no longer
    given back (a compaction calls ``release_pools`` twice; every compaction after it too)."""
    out = _run(
        _ARENA_API
        + r"""
import gc, logging, sys
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(levelname)s|%(message)s")
plain = arena_allocator()
from wsfan.server import heap
assert heap.track_arenas()
ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(plain))
for _ in range(4):
    heap.release_pools()
""",
        prelude=False,
    )
    said = " ".join(out)
    assert said.count("WARNING|memory: other code replaced the arena allocator") == 1, said
