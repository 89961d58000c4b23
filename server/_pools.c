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
 * in any public header. It is the same in 3.10 to 3.13; track() refuses other versions and
 * free-threaded builds (no pymalloc). What else goes through the arena allocator, and how it is
 * kept apart (a hostile review found each; tests/test_pools.py has one test per case):
 * - Only blocks of pymalloc's ARENA_SIZE are recorded (1 MiB on 64-bit, 256 KiB on 32-bit:
 *   USE_LARGE_ARENAS). CPython 3.11+ also takes each thread's frame data-stack chunks from
 *   this allocator (pystate.c allocate_chunk, 16 KiB and up); one of exactly ARENA_SIZE is
 *   recorded, fails the header check below and is left alone.
 * - Only 16 KiB pools are released (USE_LARGE_POOLS, set with the radix tree): every carved
 *   pool must say so (maxnextoffset + block size == 16 KiB, as pymalloc's pool initialisation
 *   writes). A 64-bit build without the radix tree has 1 MiB arenas of 4 KiB pools: every
 *   arena fails the check and nothing is written.
 * - An arena is released only by the interpreter whose pymalloc state it belongs to (see
 *   current_interp): since 3.12 an isolated sub-interpreter has its own under its own GIL,
 *   while the arena allocator is one per process. The table is under a mutex for the same
 *   reason. (An isolated interpreter cannot import this single-phase module, so release() runs
 *   in an interpreter that shares the main state or in the main one.)
 * - If other code replaces the arena allocator after track(), arenas may be freed without our
 *   free(): release() sees that the allocator is no longer ours and stops tracking for good.
 *   If it was put back before release() runs, release() skips (and forgets) every recorded
 *   arena that is no longer mapped (mincore), and an address recorded twice is kept once.
 *
 * release() runs with the GIL held (METH_NOARGS), which is pymalloc's own lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* 64-bit only: 32-bit builds have 4 KiB pools, nothing to give back but the header page. */
#if PY_VERSION_HEX >= 0x030A0000 && PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED) && \
    defined(MADV_DONTNEED) && SIZEOF_VOID_P > 4
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
/* CPython 3.10+ on 64-bit: ALIGNMENT 16, so size class i holds blocks of (i + 1) * 16 bytes (32
 * classes up to 512 bytes); on 32-bit ALIGNMENT is 8 (64 classes). */
#if SIZEOF_VOID_P > 4
#define ALIGNMENT_SHIFT 4
#define ARENA_SIZE ((size_t)1 << 20)
#else
#define ALIGNMENT_SHIFT 3
#define ARENA_SIZE ((size_t)1 << 18)
#endif
#define MAX_SIZE_CLASSES (512 >> ALIGNMENT_SHIFT)
#define POOL_SIZE ((size_t)1 << 14)

#if PY_VERSION_HEX >= 0x030D0000
#define CURRENT_TSTATE() PyThreadState_GetUnchecked()
#else
#define CURRENT_TSTATE() _PyThreadState_UncheckedGet()
#endif

struct known_arena {
    uintptr_t address;
    PyInterpreterState *interp; /* whose pymalloc state it belongs to; NULL: unknown, never released */
};

static PyObjectArenaAllocator previous, mine;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct known_arena *arenas = NULL; /* unordered */
static size_t n_arenas = 0, cap_arenas = 0;
static int tracking = 0;
/* Totals since track(), for stats(). */
static unsigned long long pools_released = 0, arenas_skipped = 0, releases = 0;

/* Whose pymalloc state an arena belongs to. Before 3.12 there is one for the process, under one
 * GIL: every arena is the main state's. Since 3.12 an isolated interpreter has its own (and its
 * own GIL), so the tag is the interpreter; a legacy sub-interpreter shares the main state but is
 * tagged with itself, so its arenas are given back only by release() called there: a missed
 * saving, never a race. NULL: no current thread state, never released. */
static PyInterpreterState *
current_interp(void)
{
#if PY_VERSION_HEX < 0x030C0000
    return (PyInterpreterState *)&previous; /* any fixed non-NULL tag: the one pymalloc state */
#else
    PyThreadState *tstate = CURRENT_TSTATE();
    return tstate == NULL ? NULL : PyThreadState_GetInterpreter(tstate);
#endif
}

static void *
arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = previous.alloc(previous.ctx, size);
    if (p == NULL || size != ARENA_SIZE) {
        return p; /* not an arena (a frame data-stack chunk): not tracked, never released */
    }
    PyInterpreterState *interp = current_interp();
    pthread_mutex_lock(&table_lock);
    if (n_arenas == cap_arenas) {
        size_t cap = cap_arenas ? cap_arenas * 2 : 256;
        struct known_arena *grown = realloc(arenas, cap * sizeof(*arenas));
        if (grown == NULL) {
            pthread_mutex_unlock(&table_lock);
            return p; /* not tracked: its pools are never released, which is only a missed saving */
        }
        arenas = grown;
        cap_arenas = cap;
    }
    /* An address recorded before and freed without arena_free (the allocator was swapped out
     * meanwhile) is recorded once, with its new owner. */
    for (size_t i = 0; i < n_arenas; i++) {
        if (arenas[i].address == (uintptr_t)p) {
            arenas[i].interp = interp;
            pthread_mutex_unlock(&table_lock);
            return p;
        }
    }
    arenas[n_arenas].address = (uintptr_t)p;
    arenas[n_arenas].interp = interp;
    n_arenas++;
    pthread_mutex_unlock(&table_lock);
    return p;
}

static void
arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < n_arenas; i++) {
        if (arenas[i].address == (uintptr_t)ptr) {
            arenas[i] = arenas[--n_arenas];
            break;
        }
    }
    pthread_mutex_unlock(&table_lock);
    previous.free(previous.ctx, ptr, size);
}

/* The pools of the arena at a that pymalloc can have carved: the first starts at the first
 * pool-aligned address (pymalloc gives up the partial pool before it). */
#define FOR_POOLS(p, a)                                                                              \
    for (uintptr_t p = ((a) + POOL_SIZE - 1) & ~(uintptr_t)(POOL_SIZE - 1); p + POOL_SIZE <= (a) + ARENA_SIZE; \
         p += POOL_SIZE)

/* Every page of the arena is mapped (mincore fails with ENOMEM otherwise): an address freed
 * behind our back is not read. One mapped by someone else since must still pass the header
 * check before anything is written. */
static int
still_mapped(uintptr_t a, size_t page)
{
    unsigned char vec[ARENA_SIZE / 4096];
    if (ARENA_SIZE / page > sizeof(vec)) {
        return 0;
    }
    return mincore((void *)a, ARENA_SIZE, vec) == 0;
}

/* 1: every carved pool header of the arena is one pymalloc wrote for a 16 KiB pool of this arena;
 * 0: one is not (left alone, counted); -1: not an arena but a frame data-stack chunk. */
static int
arena_looks_right(uintptr_t a)
{
    long index = -1;
    /* A frame data-stack chunk (_PyStackChunk: previous, size, top, data) of exactly ARENA_SIZE.
     * In a pymalloc arena these bytes are a pool's freeblock pointer, or unused (the partial pool
     * before the first aligned one), never this small number. */
    if (((const size_t *)a)[1] == ARENA_SIZE) {
        return -1;
    }
    FOR_POOLS(p, a)
    {
        const struct pool_header *h = (const struct pool_header *)p;
        if (h->nextoffset == 0) {
            continue; /* never carved: untouched zero pages */
        }
        if (h->nextoffset > POOL_SIZE || h->maxnextoffset > POOL_SIZE || h->ref.count > POOL_SIZE / 16) {
            return 0;
        }
        if (h->szidx != DUMMY_SIZE_IDX) {
            if (h->szidx >= MAX_SIZE_CLASSES) {
                return 0;
            }
            /* pymalloc's pool initialisation: maxnextoffset = POOL_SIZE - size (4 KiB pools fail here) */
            if ((size_t)h->maxnextoffset + ((size_t)(h->szidx + 1) << ALIGNMENT_SHIFT) != POOL_SIZE) {
                return 0;
            }
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
        if (mine.alloc != NULL) {
            Py_RETURN_FALSE; /* stopped for good (the allocator was replaced): see release() */
        }
        mine.ctx = NULL;
        mine.alloc = arena_alloc;
        mine.free = arena_free;
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
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned long long released = 0, skipped = 0, looked = 0;
    if (!tracking || page == 0 || page >= POOL_SIZE) {
        return Py_BuildValue("KKK", released, skipped, looked);
    }
    PyObjectArenaAllocator now;
    PyObject_GetArenaAllocator(&now);
    if (now.alloc != arena_alloc || now.free != arena_free) {
        /* Replaced by other code: arenas may have been freed without arena_free, so the table
         * can hold unmapped addresses. Stop for good; the memory itself is not ours to manage. */
        pthread_mutex_lock(&table_lock);
        tracking = 0;
        n_arenas = 0;
        pthread_mutex_unlock(&table_lock);
        return Py_BuildValue("KKK", released, skipped, looked);
    }
    PyInterpreterState *interp = current_interp();
    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < n_arenas; i++) {
        if (arenas[i].interp == NULL || arenas[i].interp != interp) {
            continue; /* another interpreter's pymalloc state (its own GIL since 3.12) */
        }
        uintptr_t a = arenas[i].address;
        if (!still_mapped(a, page)) {
            /* freed without arena_free: the allocator was swapped out and back since track() */
            arenas[i--] = arenas[--n_arenas];
            continue;
        }
        int right = arena_looks_right(a);
        if (right < 0) {
            continue;
        }
        looked++;
        if (right == 0) {
            skipped++;
            continue;
        }
        FOR_POOLS(p, a)
        {
            struct pool_header *h = (struct pool_header *)p;
            if (h->nextoffset == 0 || h->ref.count != 0 || h->szidx == DUMMY_SIZE_IDX) {
                continue; /* never carved, in use, or given back already */
            }
            if (madvise((void *)(p + page), POOL_SIZE - page, MADV_DONTNEED) == 0) {
                h->szidx = DUMMY_SIZE_IDX;
                released++;
            }
        }
    }
    pthread_mutex_unlock(&table_lock);
    pools_released += released;
    arenas_skipped += skipped;
    releases++;
    return Py_BuildValue("KKK", released, skipped, looked);
}

static PyObject *
pools_stats(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    pthread_mutex_lock(&table_lock);
    Py_ssize_t known = (Py_ssize_t)n_arenas;
    pthread_mutex_unlock(&table_lock);
    return Py_BuildValue("{s:O,s:n,s:n,s:n,s:K,s:K,s:K}", "tracking", tracking ? Py_True : Py_False,
                         "arenas", known, "arena_size", (Py_ssize_t)ARENA_SIZE, "pool_size",
                         (Py_ssize_t)POOL_SIZE, "pools_released", pools_released, "arenas_skipped",
                         arenas_skipped, "releases", releases);
}

static PyMethodDef methods[] = {
    {"track", pools_track, METH_NOARGS,
     "track() -> bool\n\nKnow every pymalloc arena allocated from now on; False where pool headers are not "
     "known (other CPython versions, free-threaded builds). Idempotent."},
    {"release", pools_release, METH_NOARGS,
     "release() -> (pools, arenas_skipped, arenas_looked_at)\n\nGive back the pages of every empty pool of "
     "the known arenas of this interpreter (all but each pool's first page); arenas_skipped: those "
     "whose pool headers did not look as expected (left alone)."},
    {"stats", pools_stats, METH_NOARGS, "stats() -> dict: tracking, arenas, arena_size, pool_size and totals."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pools", "Give the pages of pymalloc's empty pools back to the OS (server/heap.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pools(void)
{
    return PyModule_Create(&module);
}
