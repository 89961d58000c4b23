/* wsfan.server._pools: give the pages of pymalloc's empty pools back to the OS.
 *
 * Why (server/heap.py has the whole story): after a burst of rooms is freed, pymalloc keeps a
 * 1 MiB arena resident while a single block in it is live, and every pool the burst touched in
 * that arena stays resident although it is empty. CPython has no call that returns those pages.
 *
 * How:
 * - track(): wraps the arena allocator (PyObject_SetArenaAllocator, public C API since 3.4)
 *   so that the address of every arena allocated from then on is known. The wrapper calls the
 *   previous allocator for the memory itself; arenas made before track() are not known (they
 *   hold what the process made at startup) and are never touched.
 * - release(): for every known arena, every pool whose header says it is empty (count 0, carved
 *   before) gets its pages after the first one returned with madvise(MADV_DONTNEED), and its size
 *   class set to "none" so that pymalloc initialises it from scratch when it takes it again
 *   (its block free list was in the pages given back). The first page stays: it holds the pool
 *   header, and with it the arena's list of free pools (nextpool).
 *
 * The pool header below repeats CPython's (Objects/obmalloc.c, struct pool_header), which is not
 * in any public header. It is the same in 3.10 to 3.13; track() refuses other versions, free-threaded
 * builds (no pymalloc) and arena sizes it does not know, and release() checks every arena's pool
 * headers for consistency before it writes to one: an arena that does not look as expected is
 * left alone and counted.
 *
 * Both calls need the GIL (pymalloc's own lock), which METH_NOARGS functions hold.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#if PY_VERSION_HEX >= 0x030A0000 && PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED) && defined(MADV_DONTNEED)
#define POOLS_KNOWN 1
#else
#define POOLS_KNOWN 0
#endif

typedef uint8_t pool_block;
struct pool_header {
    union {
        pool_block *_padding;
        unsigned int count; /* blocks in use */
    } ref;
    pool_block *freeblock;
    struct pool_header *nextpool;
    struct pool_header *prevpool;
    unsigned int arenaindex;
    unsigned int szidx; /* size class; DUMMY_SIZE_IDX: none */
    unsigned int nextoffset;
    unsigned int maxnextoffset;
};
#define DUMMY_SIZE_IDX 0xffff
/* Size classes: 512 bytes / 8-byte alignment at most (CPython 3.10+ uses 16: 32 classes). */
#define MAX_SIZE_CLASSES 64

static PyObjectArenaAllocator previous;
static void **arenas = NULL; /* known arenas, unordered */
static size_t n_arenas = 0, cap_arenas = 0;
static size_t arena_size = 0; /* every arena has the same size (ARENA_SIZE) */
static int tracking = 0;
/* Totals since track(), for stats(). */
static unsigned long long pools_released = 0, arenas_skipped = 0, releases = 0;

static void *
arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = previous.alloc(previous.ctx, size);
    if (p == NULL) {
        return NULL;
    }
    if (arena_size == 0) {
        arena_size = size;
    }
    if (size != arena_size) {
        return p; /* not an arena of the size we know: never released, still correct */
    }
    if (n_arenas == cap_arenas) {
        size_t cap = cap_arenas ? cap_arenas * 2 : 256;
        void **grown = realloc(arenas, cap * sizeof(void *));
        if (grown == NULL) {
            return p; /* not tracked: its pools are never released, which is only a missed saving */
        }
        arenas = grown;
        cap_arenas = cap;
    }
    arenas[n_arenas++] = p;
    return p;
}

static void
arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    for (size_t i = 0; i < n_arenas; i++) {
        if (arenas[i] == ptr) {
            arenas[i] = arenas[--n_arenas];
            break;
        }
    }
    previous.free(previous.ctx, ptr, size);
}

static size_t
pool_size_for(size_t arena)
{
    /* CPython 3.10+: 1 MiB arenas come with 16 KiB pools (USE_LARGE_ARENAS and USE_LARGE_POOLS are
     * both set by WITH_PYMALLOC_RADIX_TREE), 256 KiB arenas with 4 KiB pools. */
    if (arena == ((size_t)1 << 20)) {
        return (size_t)1 << 14;
    }
    if (arena == ((size_t)1 << 18)) {
        return (size_t)1 << 12;
    }
    return 0;
}

/* The pools of the arena at a that pymalloc can have carved: the first starts at the first
 * pool-aligned address (pymalloc gives up the partial pool before it). */
#define FOR_POOLS(p, a, pool)                                                              \
    for (uintptr_t p = ((a) + (pool) - 1) & ~(uintptr_t)((pool) - 1); p + (pool) <= (a) + arena_size; \
         p += (pool))

static int
arena_looks_right(uintptr_t a, size_t pool)
{
    long index = -1;
    FOR_POOLS(p, a, pool)
    {
        const struct pool_header *h = (const struct pool_header *)p;
        if (h->nextoffset == 0) {
            continue; /* never carved: untouched zero pages */
        }
        if (h->nextoffset > pool || h->maxnextoffset > pool) {
            return 0;
        }
        if (h->szidx >= MAX_SIZE_CLASSES && h->szidx != DUMMY_SIZE_IDX) {
            return 0;
        }
        if (h->ref.count > pool / 16) {
            return 0;
        }
        if (index == -1) {
            index = (long)h->arenaindex;
        }
        else if ((long)h->arenaindex != index) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
pools_track(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    if (!POOLS_KNOWN) {
        Py_RETURN_FALSE;
    }
    if (!tracking) {
        PyObjectArenaAllocator mine = {NULL, arena_alloc, arena_free};
        PyObject_GetArenaAllocator(&previous);
        PyObject_SetArenaAllocator(&mine);
        tracking = 1;
    }
    Py_RETURN_TRUE;
}

static PyObject *
pools_release(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    size_t pool = pool_size_for(arena_size);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned long long released = 0, skipped = 0;
    if (!tracking || pool == 0 || page == 0 || page >= pool) {
        return Py_BuildValue("KK", released, skipped);
    }
    for (size_t i = 0; i < n_arenas; i++) {
        uintptr_t a = (uintptr_t)arenas[i];
        if (!arena_looks_right(a, pool)) {
            skipped++;
            continue;
        }
        FOR_POOLS(p, a, pool)
        {
            struct pool_header *h = (struct pool_header *)p;
            if (h->nextoffset == 0 || h->ref.count != 0 || h->szidx == DUMMY_SIZE_IDX) {
                continue; /* never carved, in use, or given back already */
            }
            if (madvise((void *)(p + page), pool - page, MADV_DONTNEED) == 0) {
                h->szidx = DUMMY_SIZE_IDX;
                released++;
            }
        }
    }
    pools_released += released;
    arenas_skipped += skipped;
    releases++;
    return Py_BuildValue("KK", released, skipped);
}

static PyObject *
pools_stats(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return Py_BuildValue("{s:O,s:n,s:n,s:n,s:K,s:K,s:K}", "tracking", tracking ? Py_True : Py_False,
                         "arenas", (Py_ssize_t)n_arenas, "arena_size", (Py_ssize_t)arena_size,
                         "pool_size", (Py_ssize_t)pool_size_for(arena_size), "pools_released",
                         pools_released, "arenas_skipped", arenas_skipped, "releases", releases);
}

static PyMethodDef methods[] = {
    {"track", pools_track, METH_NOARGS,
     "track() -> bool\n\nKnow every pymalloc arena allocated from now on; False where pool headers are not "
     "known (other CPython versions, free-threaded builds). Idempotent."},
    {"release", pools_release, METH_NOARGS,
     "release() -> (pools, arenas_skipped)\n\nGive back the pages of every empty pool of the known arenas "
     "(all but each pool's first page); arenas_skipped: arenas whose pool headers did not look as "
     "expected, left alone."},
    {"stats", pools_stats, METH_NOARGS, "stats() -> dict: tracking, arenas, arena_size, pool_size and totals."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pools", "Give the pages of pymalloc's empty pools back to the OS (server/heap.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__pools(void)
{
    return PyModule_Create(&module);
}
