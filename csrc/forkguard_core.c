/*
 * forkguard core: the registry and the one pthread_atfork registration.
 *
 * Two locks, always taken in this order (docs/design.md, "Lock order"):
 *
 *   win.lock   the fork window: held by a forking thread from forkguard's
 *              prepare handler to its parent handler (prepare hooks, holds,
 *              the fork, parent hooks), and briefly by code that adds or
 *              removes hooks or hold-policy objects.  Guards win.hooks and
 *              win.holds.
 *   reg.lock   the registry: slots, index, restore array.  Held only for
 *              short sections that run no foreign code and wait for nothing
 *              but malloc, and by a forking thread across fork() itself
 *              (from the end of its prepare handler to the start of its
 *              parent handler), so that the child inherits it untorn.
 *
 * Neither is ever held while waiting for the GIL or running Python: Python's
 * os.fork() hooks do not touch either, and C hooks must not call Python (the
 * forking thread of os.fork() holds the GIL throughout the window anyway).
 * Registering or unregistering a reset-policy object takes reg.lock only, so
 * it never waits for hooks or holds; hooks and hold-policy objects take
 * win.lock too, so they wait for a fork in progress (bounded by its holds'
 * timeouts and its hooks), which is what keeps a hook from running, or a held
 * lock from being unlocked, after its unregistration returned.
 *
 * Fork timeline:
 *   prepare  win.lock; prepare hooks (newest first); holds taken (oldest
 *            first, each bounded by its timeout); reg.lock
 *   parent   reg.lock released; holds released; parent hooks (oldest first);
 *            win.lock released
 *   child    every object restored (the forking thread keeps what it owned);
 *            holds released; both locks re-created; child hooks (oldest first)
 *
 * The child handler runs in a process whose other threads have vanished,
 * possibly while they held malloc's or any other lock.  It therefore
 * allocates nothing, takes no lock and calls no Python: it walks memory that
 * registration prepared in advance.  Where it calls a function that POSIX does
 * not list as async-signal-safe, a comment says why that is acceptable.
 */
#if defined(__linux__)
#define _GNU_SOURCE /* PTHREAD_MUTEX_ADAPTIVE_NP, pthread_rwlockattr_setkind_np */
#elif defined(__APPLE__)
#define _DARWIN_C_SOURCE
#endif

#include "forkguard_core.h"

#include <errno.h>
#include <limits.h> /* SEM_VALUE_MAX */
#include <sched.h>  /* sched_yield */
#include <stddef.h> /* offsetof */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

/*
 * How an object is restored in the child.  On Linux (glibc and musl) a freshly
 * initialised mutex, rwlock or semaphore holds no pointer to itself: a mutex is
 * zeroes plus its kind word, and a copy of an rwlock or semaphore initialised
 * at registration time is exactly what pthread_*_init would write.  Elsewhere
 * (macOS) the layout may depend on the object's address, so the child calls
 * the init function in place instead.  Defining FG_PORTABLE selects the second
 * path on Linux too, so it can be compiled and tested here.
 */
#if defined(__linux__) && !defined(FG_PORTABLE)
#define FG_RESET_BY_COPY 1
#define FG_HAVE_TIMEDLOCK 1
#else
#define FG_RESET_BY_COPY 0
#define FG_HAVE_TIMEDLOCK 0
#endif

/* Where the C library records who owns a mutex or write-holds an rwlock, so
 * that what the forking thread owns stays owned in the child.  glibc's public
 * struct names the fields; init_process() checks them at run time before the
 * owner rule is switched on (owner_rule).  Other C libraries: every held
 * object is released in the child. */
#if FG_RESET_BY_COPY && defined(__GLIBC__)
#define FG_OWNER_LAYOUT 1
#else
#define FG_OWNER_LAYOUT 0
#endif

#define NIL (-1)

/* Stores the child handler may observe half-way: a fork() from a signal
 * handler can interrupt this very thread inside a registry update, and the
 * child then walks the restore array as that update left it. */
#define PUBLISH(lvalue, value) __atomic_store_n(&(lvalue), (value), __ATOMIC_RELEASE)
#define OBSERVE(lvalue) __atomic_load_n(&(lvalue), __ATOMIC_ACQUIRE)

#if FG_RESET_BY_COPY
/* A freshly initialised rwlock or semaphore, shared by every registration
 * that needs the same bytes.  Never written after creation. */
typedef struct fg_template {
    struct fg_template *next;
    uint32_t refs;
    uint32_t size;
    union {
        pthread_rwlock_t rwlock;
        sem_t sem;
    } u;
} fg_template;
#endif

/* What the child handler needs per object, packed densely: it walks this
 * array and nothing else, so a fork with many registrations stays cheap.
 * `obj` is written last (PUBLISH) and NULL while an entry is being moved. */
typedef struct {
    void *obj;
#if FG_RESET_BY_COPY
    const fg_template *tpl; /* rwlocks and semaphores */
#endif
    uint8_t kind;
    int8_t mutex_type;
    int32_t slot; /* the entry this belongs to */
} fg_restore;

/* A registration that takes part in the fork window: hooks, or an object with
 * policy HOLD.  Allocated apart, so its address is stable while win.lock
 * holders use it; listed in win.hooks or win.holds. */
typedef struct {
    void *obj; /* the object, or the hooks' argument */
    forkguard_hook prepare, parent, child;
    double timeout;
    uint64_t hold_timeouts; /* written in the window, read under reg.lock: atomics */
    uint8_t kind;
    uint8_t held; /* taken for the fork in progress (win.lock) */
} fg_active;

typedef struct {
    uint32_t generation; /* part of the handle; bumped when the slot is freed */
    int32_t prev, next;  /* registration order; `next` also links free slots */
    int32_t restore_pos; /* index in reg.restore (objects) */
    uint8_t kind;        /* FG_KIND_*, or 0 for a free slot */
    uint8_t policy;
    uint8_t by_python;   /* made by fgpy_register(), not through the C API */
    int8_t mutex_type;
    unsigned int sem_value;
    double timeout;
    void *obj;          /* the registered object, or the hooks' argument */
    fg_active *active;  /* hooks and hold-policy objects, else NULL */
#if FG_RESET_BY_COPY
    fg_template *tpl;
#endif
    /* Allocated apart, and only when given (NULL otherwise): most registrations
     * have none, and 64 bytes inline were half of every entry, which each fork
     * copies page tables for. */
    char *name;
} fg_entry;

static struct {
    pthread_mutex_t lock;
    fg_entry *slots;
    uint32_t cap;  /* slots allocated */
    uint32_t used; /* slots ever handed out */
    int32_t free_head;
    int32_t obj_head, obj_tail;   /* mutexes, rwlocks, semaphores */
    int32_t hook_head, hook_tail; /* hooks */
    uint32_t count;               /* live registrations */
    uint32_t nobj;                /* live objects: entries in `index` and `restore` */
    uint32_t *index;              /* open addressing: slot + 1, keyed by obj */
    uint32_t index_mask;
    fg_restore *restore; /* one per live object, in no particular order */
    uint32_t restore_cap;
#if FG_RESET_BY_COPY
    fg_template *templates;
#endif
} reg = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .free_head = NIL,
    .obj_head = NIL,
    .obj_tail = NIL,
    .hook_head = NIL,
    .hook_tail = NIL,
};

/* The fork window's lists, in registration order. */
static struct {
    pthread_mutex_t lock;
    fg_active **hooks, **holds;
    uint32_t nhooks, nholds, hooks_cap, holds_cap;
} win = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Per-thread state.  A thread inside forkguard (holding either lock, or
 * running hooks for a fork) has a non-zero tls_state; a fork() it starts from
 * there (a hook, or a signal handler that interrupted a registration) cannot
 * take the window, so it "passes through": no hooks, no holds, objects still
 * restored in its child.  tls_pass counts those nested forks; bit k of
 * tls_pass_reg says whether level k took reg.lock. */
#define TLS_WINDOW 1u /* between forkguard's prepare and its parent/child handler */
#define TLS_GATE 2u   /* holds win.lock */
#define TLS_REG 4u    /* holds reg.lock */
#define TLS_INSTALL 8u /* installing the pthread_atfork handlers (ensure_handlers) */
/* The default TLS model: initial-exec would spare every child two copied pages
 * (__tls_get_addr's, and the block dlopen malloc'd), but it takes static TLS
 * room, and where other libraries have used it up, importing forkguard would
 * fail. */
static _Thread_local volatile unsigned int tls_state;
static _Thread_local unsigned int tls_pass;
static _Thread_local uint32_t tls_pass_reg;
static _Thread_local long tls_fork_tid;      /* the forking thread's id before fork */
static _Thread_local int tls_last_timeouts;  /* holds that timed out in this thread's last fork */

/* Checked by init_process(); see FG_OWNER_LAYOUT. */
static int owner_rule;

#if !FG_RESET_BY_COPY
static pthread_mutexattr_t mutex_attrs[FORKGUARD_MUTEX_ERRORCHECK + 1];
#endif

/* The calling thread's kernel id: what glibc records as a mutex's owner. */
static long current_tid(void)
{
#if defined(__linux__)
    return syscall(SYS_gettid); /* a bare system call: async-signal-safe in practice */
#else
    return 0;
#endif
}

/* A lock's flag is set before the lock is taken and cleared after it is
 * released, with compiler fences, so a signal handler in this thread that forks
 * never sees the lock held by this thread without its flag.  (The flag can be
 * seen a few instructions before the lock is held: a fork() from a signal
 * handler there runs without reg.lock; see docs/design.md.) */
static void tls_set(unsigned int bits)
{
    tls_state |= bits;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static void tls_clear(unsigned int bits)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    tls_state &= ~bits;
}

static void reg_lock(void)
{
    tls_set(TLS_REG);
    pthread_mutex_lock(&reg.lock);
}

static void reg_unlock(void)
{
    pthread_mutex_unlock(&reg.lock);
    tls_clear(TLS_REG);
}

static void win_lock(void)
{
    tls_set(TLS_GATE);
    pthread_mutex_lock(&win.lock);
}

static void win_unlock(void)
{
    pthread_mutex_unlock(&win.lock);
    tls_clear(TLS_GATE);
}

/* ------------------------------------------------------------------ */
/* Address index: finds an object's slot, so a second registration of the
 * same object is refused in O(1). Linear probing, load factor <= 1/2. */

static uint32_t hash_addr(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= UINT64_C(0xff51afd7ed558ccd);
    x ^= x >> 33;
    return (uint32_t)x;
}

/* Slot of `obj`, or NIL; *pos gets its index position or the empty one. */
static int32_t index_find(const void *obj, uint32_t *pos)
{
    if (pos)
        *pos = 0;
    if (reg.index == NULL)
        return NIL;
    for (uint32_t i = hash_addr(obj) & reg.index_mask;;
         i = (i + 1) & reg.index_mask) {
        uint32_t v = reg.index[i];
        if (v == 0 || reg.slots[v - 1].obj == obj) {
            if (pos)
                *pos = i;
            return v == 0 ? NIL : (int32_t)(v - 1);
        }
    }
}

static void index_put(int32_t slot)
{
    uint32_t i = hash_addr(reg.slots[slot].obj) & reg.index_mask;
    while (reg.index[i] != 0)
        i = (i + 1) & reg.index_mask;
    reg.index[i] = (uint32_t)slot + 1;
}

/* Make room for one more object; rebuilds the index when it would pass 1/2. */
static int index_reserve(void)
{
    uint32_t size = reg.index ? reg.index_mask + 1 : 0;
    if ((uint64_t)(reg.nobj + 1) * 2 <= size)
        return FORKGUARD_OK;
    uint32_t nsize = size ? size * 2 : 64;
    uint32_t *n = calloc(nsize, sizeof *n);
    if (n == NULL)
        return FORKGUARD_ENOMEM;
    free(reg.index);
    reg.index = n;
    reg.index_mask = nsize - 1;
    for (int32_t i = reg.obj_head; i != NIL; i = reg.slots[i].next)
        index_put(i);
    return FORKGUARD_OK;
}

/* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
static void index_remove(uint32_t pos)
{
    uint32_t mask = reg.index_mask, hole = pos, j = pos;
    for (;;) {
        reg.index[hole] = 0;
        for (;;) {
            j = (j + 1) & mask;
            uint32_t v = reg.index[j];
            if (v == 0)
                return;
            uint32_t home = hash_addr(reg.slots[v - 1].obj) & mask;
            /* v may fill the hole unless its home lies cyclically in (hole, j]. */
            int home_between = hole <= j ? (hole < home && home <= j)
                                         : (hole < home || home <= j);
            if (!home_between) {
                reg.index[hole] = v;
                hole = j;
                break;
            }
        }
    }
}

/* ------------------------------------------------------------------ */
/* Slots and lists. */

static int32_t slot_alloc(void)
{
    if (reg.free_head != NIL) {
        int32_t i = reg.free_head;
        reg.free_head = reg.slots[i].next;
        return i;
    }
    if (reg.used == reg.cap) {
        if (reg.cap >= FG_MAX_ENTRIES)
            return NIL;
        uint32_t ncap = reg.cap ? reg.cap * 2 : 16;
        if (ncap > FG_MAX_ENTRIES)
            ncap = FG_MAX_ENTRIES;
        fg_entry *n = realloc(reg.slots, (size_t)ncap * sizeof *n);
        if (n == NULL)
            return NIL;
        reg.slots = n;
        reg.cap = ncap;
    }
    reg.slots[reg.used].generation = 1;
    return (int32_t)reg.used++;
}

static void slot_free(int32_t i)
{
    fg_entry *e = &reg.slots[i];
    e->kind = 0;
    free(e->name);
    e->name = NULL;
    /* A slot whose generation would pass 2^31 is retired: no handle ever
     * matches two registrations, and handles fit in 63 bits. */
    if (++e->generation >= UINT32_C(1) << 31)
        return;
    e->next = reg.free_head;
    reg.free_head = i;
}

static void list_append(int32_t *head, int32_t *tail, int32_t i)
{
    reg.slots[i].prev = *tail;
    reg.slots[i].next = NIL;
    if (*tail != NIL)
        reg.slots[*tail].next = i;
    else
        *head = i;
    *tail = i;
}

static void list_unlink(int32_t *head, int32_t *tail, int32_t i)
{
    fg_entry *e = &reg.slots[i];
    if (e->prev != NIL)
        reg.slots[e->prev].next = e->next;
    else
        *head = e->next;
    if (e->next != NIL)
        reg.slots[e->next].prev = e->prev;
    else
        *tail = e->prev;
}

/* Room for one more object in the restore array.  The new array is filled
 * before it is published and the old one freed after, so a child forked at
 * any instant of this thread sees a complete array. */
static int restore_reserve(void)
{
    if (reg.nobj < reg.restore_cap)
        return FORKGUARD_OK;
    uint32_t ncap = reg.restore_cap ? reg.restore_cap * 2 : 16;
    fg_restore *n = malloc((size_t)ncap * sizeof *n);
    if (n == NULL)
        return FORKGUARD_ENOMEM;
    fg_restore *old = reg.restore;
    if (old != NULL)
        memcpy(n, old, (size_t)reg.nobj * sizeof *n);
    PUBLISH(reg.restore, n);
    reg.restore_cap = ncap;
    free(old);
    return FORKGUARD_OK;
}

/* Append (pos == reg.nobj) or overwrite one entry: its fields first, then the
 * object pointer that makes it visible. */
static void restore_put(uint32_t pos, const fg_restore *src)
{
    fg_restore *r = &reg.restore[pos];
    PUBLISH(r->obj, (void *)NULL);
#if FG_RESET_BY_COPY
    r->tpl = src->tpl;
#endif
    r->kind = src->kind;
    r->mutex_type = src->mutex_type;
    r->slot = src->slot;
    PUBLISH(r->obj, src->obj);
    reg.slots[src->slot].restore_pos = (int32_t)pos;
}

/* Swap-remove: the last entry moves into the hole (briefly listed twice,
 * which only means a second, harmless restore), then the count drops. */
static void restore_remove(uint32_t pos)
{
    uint32_t last = reg.nobj - 1;
    if (pos != last) {
        fg_restore moved = reg.restore[last];
        restore_put(pos, &moved);
    }
    PUBLISH(reg.nobj, last);
}

#if FG_RESET_BY_COPY
/* The pool's copy of `want` (refs + 1), or NULL when out of memory. */
static fg_template *template_intern(const fg_template *want)
{
    for (fg_template *t = reg.templates; t != NULL; t = t->next) {
        if (t->size == want->size && memcmp(&t->u, &want->u, want->size) == 0) {
            t->refs++;
            return t;
        }
    }
    fg_template *t = malloc(sizeof *t);
    if (t == NULL)
        return NULL;
    *t = *want;
    t->refs = 1;
    t->next = reg.templates;
    reg.templates = t;
    return t;
}

static void template_release(fg_template *t)
{
    if (t == NULL || --t->refs > 0)
        return;
    for (fg_template **p = &reg.templates; *p != NULL; p = &(*p)->next) {
        if (*p == t) {
            *p = t->next;
            break;
        }
    }
    free(t);
}
#endif

static uint64_t make_handle(int32_t i)
{
    return ((uint64_t)reg.slots[i].generation << 32) | (uint64_t)(i + 1);
}

static int32_t handle_slot(uint64_t handle)
{
    uint64_t low = handle & 0xffffffffu;
    if (low == 0 || low > reg.used)
        return NIL;
    int32_t i = (int32_t)(low - 1);
    const fg_entry *e = &reg.slots[i];
    if (e->kind == 0 || e->generation != (uint32_t)(handle >> 32))
        return NIL;
    return i;
}

/* ------------------------------------------------------------------ */
/* Owners: what the C library records about who holds an object. */

#if FG_OWNER_LAYOUT
#define MUTEX_KIND_WORD(m) ((m)->__data.__kind)
#else
#define MUTEX_KIND_WORD(m) ((m)->__u.__i[0]) /* musl's _m_type */
#endif

static int mutex_is_recursive(const pthread_mutex_t *m)
{
#if FG_OWNER_LAYOUT
    return (((const volatile pthread_mutex_t *)m)->__data.__kind & 3) == PTHREAD_MUTEX_RECURSIVE;
#else
    (void)m;
    return 0;
#endif
}

/* Does thread `tid` own mutex `m` (and how deeply, for a recursive one)? */
static unsigned int mutex_owned_by(const pthread_mutex_t *m, long tid)
{
#if FG_OWNER_LAYOUT
    const volatile pthread_mutex_t *v = m;
    if (!owner_rule || tid == 0 || v->__data.__owner != tid)
        return 0;
    return mutex_is_recursive(m) ? v->__data.__count : 1;
#else
    (void)m;
    (void)tid;
    return 0;
#endif
}

static int rwlock_written_by(const pthread_rwlock_t *rw, long tid)
{
#if FG_OWNER_LAYOUT
    const volatile pthread_rwlock_t *v = rw;
    return owner_rule && tid != 0 && v->__data.__cur_writer == tid;
#else
    (void)rw;
    (void)tid;
    return 0;
#endif
}

/* ------------------------------------------------------------------ */
/* Holds: taken before fork, released on both sides. */

#if FG_HAVE_TIMEDLOCK
static struct timespec deadline_after(double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    time_t whole = (time_t)seconds; /* registration kept it <= FORKGUARD_TIMEOUT_MAX */
    ts.tv_sec += whole;
    ts.tv_nsec += (long)((seconds - (double)whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}
#else
static int try_once(const fg_active *a)
{
    switch (a->kind) {
    case FG_KIND_MUTEX:
        return pthread_mutex_trylock(a->obj);
    case FG_KIND_RWLOCK:
        return pthread_rwlock_trywrlock(a->obj);
    default:
        return EINVAL;
    }
}

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif

/* 1: taken; 0: nothing to take (the forking thread owns it already); -1:
 * timed out. */
static int hold_take(fg_active *a, long tid)
{
    int r;
    /* The forking thread's own lock: waiting for it would only time out (a
     * recursive mutex is simply taken once more). */
    if (a->kind == FG_KIND_MUTEX && mutex_owned_by(a->obj, tid) && !mutex_is_recursive(a->obj))
        return 0;
    if (a->kind == FG_KIND_RWLOCK && rwlock_written_by(a->obj, tid))
        return 0;
#if FG_HAVE_TIMEDLOCK
    struct timespec dl = deadline_after(a->timeout);
    switch (a->kind) {
    case FG_KIND_MUTEX:
        r = pthread_mutex_timedlock(a->obj, &dl);
        break;
    case FG_KIND_RWLOCK:
        r = pthread_rwlock_timedwrlock(a->obj, &dl);
        break;
    default:
        while ((r = sem_timedwait(a->obj, &dl)) != 0 && errno == EINTR)
            ;
        if (r != 0)
            r = errno;
        break;
    }
#else
    /* No timed variants here: poll with a growing sleep, on the monotonic
     * clock. */
    double deadline = monotonic_now() + a->timeout;
    long nap_ns = 50000;
    while ((r = try_once(a)) == EBUSY) {
        double left = deadline - monotonic_now();
        if (left <= 0) {
            r = ETIMEDOUT;
            break;
        }
        long ns = left * 1e9 < (double)nap_ns ? (long)(left * 1e9) : nap_ns;
        struct timespec nap = {ns / 1000000000L, ns % 1000000000L};
        nanosleep(&nap, NULL);
        if (nap_ns < 10000000L)
            nap_ns *= 2;
    }
#endif
    if (r == 0)
        return 1;
    return r == EDEADLK ? 0 : -1;
}

static void hold_release(const fg_active *a)
{
    switch (a->kind) {
    case FG_KIND_MUTEX:
        pthread_mutex_unlock(a->obj);
        break;
    case FG_KIND_RWLOCK:
        pthread_rwlock_unlock(a->obj);
        break;
    default:
        sem_post(a->obj);
        break;
    }
}

/* ------------------------------------------------------------------ */
/* Restoring objects in the child. */

/* The forking thread's id before the fork and in the child.  The second one
 * makes a restore idempotent: an object listed twice (the child of a fork that
 * interrupted a registry update) is found owned by the child's id the second
 * time, and kept. */
typedef struct {
    long before, now;
} fg_ids;

#if FG_RESET_BY_COPY
static unsigned int mutex_owned_by_ft(const pthread_mutex_t *m, const fg_ids *ids)
{
    unsigned int depth = mutex_owned_by(m, ids->before);
    return depth ? depth : mutex_owned_by(m, ids->now);
}
#endif

#if FG_RESET_BY_COPY
/* A mutex comes back as zeroes plus its *current* kind word, so one that was
 * destroyed and re-initialised with another type since registration comes
 * back as that type.  What the forking thread owned it owns again (as the
 * child's thread id, at the same depth); what vanished threads owned is
 * released.  A free mutex is only read, so its page is not copied. */
static void restore_mutex(pthread_mutex_t *m, const fg_ids *ids)
{
    volatile pthread_mutex_t *v = m;
#if FG_OWNER_LAYOUT
    if (v->__data.__lock == 0 && v->__data.__owner == 0 && v->__data.__nusers == 0)
        return;
    enum { ROBUST = 16, PP = 64, PSHARED = 128 };
#else
    if (v->__u.__vi[1] == 0 && v->__u.__vi[2] == 0) /* musl's _m_lock, _m_waiters */
        return;
    enum { ROBUST = 4, PP = 0, PSHARED = 128 };
#endif
    int word = MUTEX_KIND_WORD(v);
    if (word & (ROBUST | PP | PSHARED))
        return; /* re-initialised as a kind no template can restore: left alone */
    unsigned int depth = mutex_owned_by_ft(m, ids);
    memset(m, 0, sizeof *m);
    MUTEX_KIND_WORD(m) = word;
    if (depth > 0) {
        /* Not on POSIX's async-signal-safe list; on a free mutex of a
         * non-robust kind glibc's trylock is one atomic compare-and-swap and
         * a few stores (the child's id is already in the thread's TCB). */
        pthread_mutex_trylock(m);
#if FG_OWNER_LAYOUT
        if ((word & 3) == PTHREAD_MUTEX_RECURSIVE)
            v->__data.__count = depth;
#endif
    }
}
#endif

/* memcmp/memcpy are async-signal-safe (POSIX 2016). */
static void restore(const fg_restore *r, void *obj, const fg_ids *ids)
{
#if FG_RESET_BY_COPY
    if (r->kind == FG_KIND_MUTEX) {
        restore_mutex(obj, ids);
        return;
    }
    const fg_template *t = r->tpl;
    if (memcmp(obj, &t->u, t->size) == 0)
        return; /* already free: only read, so its page is not copied */
    int mine = r->kind == FG_KIND_RWLOCK &&
               (rwlock_written_by(obj, ids->before) || rwlock_written_by(obj, ids->now));
    memcpy(obj, &t->u, t->size);
    if (mine)
        pthread_rwlock_trywrlock(obj); /* one atomic operation on a free rwlock, as above */
#else
    (void)ids;
    /* Not on POSIX's async-signal-safe list, but on these systems (macOS)
     * initialising a mutex or rwlock only stores into the object: it neither
     * allocates nor locks. */
    if (r->kind == FG_KIND_MUTEX)
        pthread_mutex_init(obj, &mutex_attrs[r->mutex_type]);
    else
        pthread_rwlock_init(obj, NULL);
#endif
}

static void restore_all(long ft)
{
    uint32_t n = OBSERVE(reg.nobj);
    if (n == 0)
        return;
    fg_ids ids = {ft, current_tid()};
    const fg_restore *rs = OBSERVE(reg.restore);
    for (uint32_t k = 0; k < n; k++) {
        void *obj = OBSERVE(rs[k].obj);
        if (obj != NULL)
            restore(&rs[k], obj, &ids);
    }
}

/* ------------------------------------------------------------------ */
/* The atfork handlers. */

static int handlers_state; /* see ensure_handlers() */

static void atfork_prepare(void)
{
    int saved_errno = errno;
    long tid = current_tid();
    if (tls_state != 0) {
        /* A fork from inside forkguard in this thread (a hook, or a signal
         * handler): pass through.  The window's lists may be mid-change or
         * mid-walk; reg.lock is taken unless this thread holds it already
         * (then the registry is as the interrupted update left it, which the
         * restore array tolerates). */
        uint32_t bit = tls_pass < 32 ? UINT32_C(1) << tls_pass : 0;
        if (!(tls_state & TLS_REG) && bit) {
            reg_lock();
            tls_pass_reg |= bit;
        }
        tls_pass++;
        tls_fork_tid = tid;
        errno = saved_errno;
        return;
    }
    tls_set(TLS_WINDOW);
    win_lock();
    tls_fork_tid = tid;
    for (uint32_t k = win.nhooks; k-- > 0;) {
        fg_active *a = win.hooks[k];
        if (a->prepare)
            a->prepare(a->obj);
    }
    int timeouts = 0;
    for (uint32_t k = 0; k < win.nholds; k++) {
        fg_active *a = win.holds[k];
        int got = hold_take(a, tid);
        a->held = got == 1;
        if (got < 0) {
            __atomic_fetch_add(&a->hold_timeouts, 1, __ATOMIC_RELAXED);
            timeouts++;
        }
    }
    tls_last_timeouts = timeouts;
    reg_lock(); /* last: across fork() only, so the child inherits an untorn registry */
    errno = saved_errno;
}

/* A child's copy of a lock the forking thread held: a fresh one, which needs no
 * owner (an error-checking implementation would refuse the old owner's unlock).
 * Stored from immediates, not copied from a constant, whose page a child has
 * not touched. */
static void renew_lock(pthread_mutex_t *lock)
{
    *lock = (pthread_mutex_t)PTHREAD_MUTEX_INITIALIZER;
}

/* Leave a pass-through level; `child` re-creates the lock it took. */
static int pass_end(int child)
{
    if (tls_pass == 0)
        return 0;
    tls_pass--;
    uint32_t bit = tls_pass < 32 ? UINT32_C(1) << tls_pass : 0;
    if (tls_pass_reg & bit) {
        tls_pass_reg &= ~bit;
        if (child) {
            renew_lock(&reg.lock);
            tls_clear(TLS_REG);
        } else {
            reg_unlock();
        }
    }
    return 1;
}

static void atfork_parent(void)
{
    int saved_errno = errno;
    if (pass_end(0) || !(tls_state & TLS_WINDOW)) {
        errno = saved_errno;
        return;
    }
    reg_unlock();
    for (uint32_t k = win.nholds; k-- > 0;) {
        fg_active *a = win.holds[k];
        if (a->held) {
            hold_release(a);
            a->held = 0;
        }
    }
    for (uint32_t k = 0; k < win.nhooks; k++) {
        fg_active *a = win.hooks[k];
        if (a->parent)
            a->parent(a->obj);
    }
    win_unlock();
    tls_clear(TLS_WINDOW);
    errno = saved_errno;
}

static void atfork_child(void)
{
    int saved_errno = errno;
    /* Running, so installed (the parent may not have recorded it yet).  Written
     * only then: a store would copy this page into every child. */
    if (__atomic_load_n(&handlers_state, __ATOMIC_RELAXED) != -1)
        __atomic_store_n(&handlers_state, -1, __ATOMIC_RELAXED);
    long ft = tls_fork_tid;
    if (tls_pass > 0) {
        restore_all(ft);
        pass_end(1);
        /* A vanished thread may have held the window lock (this one does
         * not): free it for the child. */
        if (!(tls_state & TLS_GATE))
            renew_lock(&win.lock);
        errno = saved_errno;
        return;
    }
    if (!(tls_state & TLS_WINDOW)) {
        errno = saved_errno;
        return;
    }
    restore_all(ft);
    /* The holds are this thread's now (restore_all kept them, as the child's
     * thread id); the real unlock calls give them back.  Semaphores came back
     * with their registered count already. */
    for (uint32_t k = 0; k < win.nholds; k++) {
        fg_active *a = win.holds[k];
        if (a->held && owner_rule && a->kind != FG_KIND_SEM)
            hold_release(a); /* atomics on an uncontended lock, as in restore_mutex */
        a->held = 0;
    }
    /* This thread owns both locks, but an error-checking implementation would
     * refuse the unlock (the thread id changed); fresh copies need no owner. */
    renew_lock(&reg.lock);
    renew_lock(&win.lock);
    tls_state = TLS_WINDOW; /* hooks still may not register */
    for (uint32_t k = 0; k < win.nhooks; k++) {
        fg_active *a = win.hooks[k];
        if (a->child)
            a->child(a->obj);
    }
    tls_state = 0;
    errno = saved_errno;
}

int fg_last_fork_timeouts(void)
{
    return tls_last_timeouts;
}

int fg_take_fork_timeouts(void)
{
    int n = tls_last_timeouts;
    tls_last_timeouts = 0;
    return n;
}

/* ------------------------------------------------------------------ */
/* Initialisation. */

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_result = FORKGUARD_OK;

#if FG_OWNER_LAYOUT
/* The owner rule reads glibc's public struct fields; check on this very C
 * library that they mean what the rule assumes before switching it on. */
static int owner_layout_holds(void)
{
    long tid = current_tid();
    pthread_mutexattr_t attr;
    pthread_mutex_t m;
    pthread_rwlock_t rw;
    int ok = pthread_mutexattr_init(&attr) == 0;
    ok = ok && pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE) == 0;
    ok = ok && pthread_mutex_init(&m, &attr) == 0;
    if (!ok)
        return 0;
    pthread_mutexattr_destroy(&attr);
    /* A fresh mutex is zeroes plus its kind word. */
    pthread_mutex_t fresh;
    memset(&fresh, 0, sizeof fresh);
    fresh.__data.__kind = m.__data.__kind;
    ok = memcmp(&m, &fresh, sizeof m) == 0;
    ok = ok && pthread_mutex_lock(&m) == 0 && pthread_mutex_lock(&m) == 0;
    ok = ok && m.__data.__owner == tid && m.__data.__count == 2 && m.__data.__lock != 0;
    ok = ok && mutex_owned_by(&m, tid) == 0; /* owner_rule is still off */
    pthread_mutex_unlock(&m);
    pthread_mutex_unlock(&m);
    ok = ok && m.__data.__owner == 0 && m.__data.__lock == 0 && m.__data.__nusers == 0;
    pthread_mutex_destroy(&m);
    ok = ok && pthread_rwlock_init(&rw, NULL) == 0;
    if (!ok)
        return 0;
    ok = pthread_rwlock_wrlock(&rw) == 0 && rw.__data.__cur_writer == tid;
    pthread_rwlock_unlock(&rw);
    ok = ok && rw.__data.__cur_writer == 0;
    pthread_rwlock_destroy(&rw);
    return ok;
}
#endif

static void init_process(void)
{
#if FG_OWNER_LAYOUT
    owner_rule = owner_layout_holds();
#endif
#if !FG_RESET_BY_COPY
    static const int types[] = {PTHREAD_MUTEX_NORMAL, PTHREAD_MUTEX_RECURSIVE,
                                PTHREAD_MUTEX_ERRORCHECK};
    for (int t = 0; t <= FORKGUARD_MUTEX_ERRORCHECK; t++) {
        if (pthread_mutexattr_init(&mutex_attrs[t]) != 0 ||
            pthread_mutexattr_settype(&mutex_attrs[t], types[t]) != 0) {
            init_result = FORKGUARD_ENOMEM;
            return;
        }
    }
#endif
}

int fg_init(void)
{
    pthread_once(&init_once, init_process);
    return init_result;
}

/* The pthread_atfork handlers are installed by the first registration, not at load:
 * a process that registers nothing in C pays nothing at its forks (their code and
 * data pages would otherwise be faulted into every child).  -1: installed; 0: not
 * yet; a pid: that process's thread is installing them.  A child forked while its
 * parent was installing finds the parent's pid there: if the handlers made it in
 * before the fork, the child handler has already set -1; if not, the child's first
 * registration takes over.  (pthread_once would leave such a child waiting for ever.)
 * handlers_state is defined above atfork_prepare(). */

static int ensure_handlers(void)
{
    int me = 0;
    for (;;) {
        int s = __atomic_load_n(&handlers_state, __ATOMIC_ACQUIRE);
        if (s == -1)
            return FORKGUARD_OK;
        if (tls_state & TLS_INSTALL) /* a signal handler interrupted this thread's install */
            return FORKGUARD_EBUSY;
        if (me == 0)
            me = (int)getpid();
        if (s == me) { /* another thread of this process is installing them */
            sched_yield();
            continue;
        }
        if (!__atomic_compare_exchange_n(&handlers_state, &s, me, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        tls_set(TLS_INSTALL);
        int rc = pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
        __atomic_store_n(&handlers_state, rc == 0 ? -1 : 0, __ATOMIC_RELEASE);
        tls_clear(TLS_INSTALL);
        return rc == 0 ? FORKGUARD_OK : FORKGUARD_EATFORK;
    }
}

/* Nothing has been registered in this process (or its ancestors) until the handlers
 * are installed, so readers and fg_unregister() then answer without taking a lock:
 * a lock taken while no handler can repair it might be inherited held by a child. */
static int installed(void)
{
    return __atomic_load_n(&handlers_state, __ATOMIC_ACQUIRE) == -1;
}

int fg_handlers_installed(void)
{
    return installed();
}

/* Everything a registration needs before it takes a lock. */
static int ready(void)
{
    int rc = fg_init();
    return rc != FORKGUARD_OK ? rc : ensure_handlers();
}

/* ------------------------------------------------------------------ */
/* Registration. */

static int check_common(const void *obj, size_t align, int policy,
                        double timeout, const uint64_t *handle)
{
    if (obj == NULL || handle == NULL)
        return FORKGUARD_ENULL;
    if ((uintptr_t)obj % align != 0)
        return FORKGUARD_EALIGN;
    if (policy != FORKGUARD_POLICY_RESET && policy != FORKGUARD_POLICY_HOLD)
        return FORKGUARD_EINVAL;
    /* Also false for NaN and infinities. */
    if (!(timeout >= 0.0 && timeout <= FORKGUARD_TIMEOUT_MAX))
        return FORKGUARD_EINVAL;
    return ready();
}

/* `name` is only borrowed here: insert() copies it once the registration is
 * sure to be made. */
static void entry_init(fg_entry *e, int kind, void *obj, int policy,
                       double timeout, const char *name)
{
    memset(e, 0, sizeof *e);
    e->kind = (uint8_t)kind;
    e->obj = obj;
    e->policy = (uint8_t)policy;
    e->timeout = timeout;
    e->mutex_type = -1;
    e->name = (char *)name;
}

/* The entry's own copy of a name (truncated to FG_NAME_MAX - 1 bytes); NULL
 * for none or an empty one, and on ENOMEM (*ok cleared). */
static char *name_copy(const char *name, int *ok)
{
    *ok = 1;
    if (name == NULL || name[0] == '\0')
        return NULL;
    size_t n = strnlen(name, FG_NAME_MAX - 1);
    char *copy = malloc(n + 1);
    if (copy == NULL) {
        *ok = 0;
        return NULL;
    }
    memcpy(copy, name, n);
    copy[n] = '\0';
    return copy;
}

#if FG_RESET_BY_COPY
typedef fg_template fg_template_arg;
#else
typedef void fg_template_arg;
#endif

/* Room for one more pointer in a window list (win.lock held). */
static int list_reserve(fg_active ***list, uint32_t n, uint32_t *cap)
{
    if (n < *cap)
        return FORKGUARD_OK;
    uint32_t ncap = *cap ? *cap * 2 : 8;
    fg_active **grown = realloc(*list, (size_t)ncap * sizeof *grown);
    if (grown == NULL)
        return FORKGUARD_ENOMEM;
    *list = grown;
    *cap = ncap;
    return FORKGUARD_OK;
}

static void list_remove(fg_active **list, uint32_t *n, const fg_active *a)
{
    for (uint32_t k = 0; k < *n; k++) {
        if (list[k] == a) {
            memmove(&list[k], &list[k + 1], (size_t)(*n - k - 1) * sizeof *list);
            (*n)--;
            return;
        }
    }
}

/* Insert a prepared entry (and, for an object, its template) into the
 * registry, reg.lock held: every allocation before any change, so a failure
 * changes nothing. */
static int insert_locked(const fg_entry *proto, const fg_template_arg *tpl, fg_active *active,
                         uint64_t *handle)
{
    int is_obj = proto->kind != FG_KIND_HOOKS;
    int32_t i = NIL;
#if FG_RESET_BY_COPY
    fg_template *shared = NULL;
#else
    (void)tpl;
#endif
    if (is_obj && index_find(proto->obj, NULL) != NIL)
        return FORKGUARD_EEXIST;
    if (is_obj && (index_reserve() != FORKGUARD_OK || restore_reserve() != FORKGUARD_OK))
        return FORKGUARD_ENOMEM;
#if FG_RESET_BY_COPY
    if (is_obj && tpl != NULL && (shared = template_intern(tpl)) == NULL)
        return FORKGUARD_ENOMEM;
#endif
    int named;
    char *name = name_copy(proto->name, &named);
    if (!named || (i = slot_alloc()) == NIL) {
        free(name);
#if FG_RESET_BY_COPY
        template_release(shared);
#endif
        return FORKGUARD_ENOMEM;
    }

    fg_entry *e = &reg.slots[i];
    uint32_t generation = e->generation;
    *e = *proto;
    e->generation = generation;
    e->name = name;
    e->active = active;
    if (is_obj) {
        list_append(&reg.obj_head, &reg.obj_tail, i);
        index_put(i);
        fg_restore r;
        memset(&r, 0, sizeof r);
        r.obj = e->obj;
        r.kind = e->kind;
        r.mutex_type = e->mutex_type;
        r.slot = i;
#if FG_RESET_BY_COPY
        e->tpl = shared;
        r.tpl = shared;
#endif
        restore_put(reg.nobj, &r);
        PUBLISH(reg.nobj, reg.nobj + 1);
    } else {
        list_append(&reg.hook_head, &reg.hook_tail, i);
    }
    reg.count++;
    *handle = make_handle(i);
    return FORKGUARD_OK;
}

/* A registration: reset-policy objects take reg.lock only; hooks and
 * hold-policy objects also join the window's lists, under win.lock (so they
 * wait for a fork in progress).  `hooks` is NULL but for hooks. */
static int insert(const fg_entry *proto, const fg_template_arg *tpl, const fg_active *hooks,
                  uint64_t *handle)
{
    if (tls_state)
        return FORKGUARD_EBUSY;
    int rc;
    if (proto->kind != FG_KIND_HOOKS && proto->policy != FORKGUARD_POLICY_HOLD) {
        reg_lock();
        rc = insert_locked(proto, tpl, NULL, handle);
        reg_unlock();
        return rc;
    }
    fg_active *a = calloc(1, sizeof *a);
    if (a == NULL)
        return FORKGUARD_ENOMEM;
    if (hooks != NULL)
        *a = *hooks;
    a->obj = proto->obj;
    a->kind = proto->kind;
    a->timeout = proto->timeout;
    int is_hooks = proto->kind == FG_KIND_HOOKS;
    win_lock();
    rc = is_hooks ? list_reserve(&win.hooks, win.nhooks, &win.hooks_cap)
                  : list_reserve(&win.holds, win.nholds, &win.holds_cap);
    if (rc == FORKGUARD_OK) {
        reg_lock();
        rc = insert_locked(proto, tpl, a, handle);
        reg_unlock();
    }
    if (rc == FORKGUARD_OK) {
        if (is_hooks)
            win.hooks[win.nhooks++] = a;
        else
            win.holds[win.nholds++] = a;
    }
    win_unlock();
    if (rc != FORKGUARD_OK)
        free(a);
    return rc;
}

/* The mutex type and flags, read from the C library's public struct. */
#if defined(__linux__) && !defined(FG_PORTABLE)
#define FG_CAN_READ_MUTEX_TYPE 1
/* The mutex's kind word: its type (low 2 bits) and flags.  Both glibc and
 * musl initialise a mutex by zeroing it and storing this one word, so a zeroed
 * mutex carrying the same word is exactly a fresh mutex of the same kind. */
#if defined(__GLIBC__)
/* glibc's __kind: robust 16, prio-inherit 32, prio-protect 64, process-shared
 * 128, elision hints 256 and 512 (an explicit PTHREAD_MUTEX_NORMAL carries 512,
 * so only copying the whole word reproduces the mutex exactly). */
enum { KIND_ROBUST = 16, KIND_PP = 64, KIND_PSHARED = 128 };
#else
/* musl's _m_type: robust 4, prio-inherit 8, process-shared 128. */
enum { KIND_ROBUST = 4, KIND_PP = 0, KIND_PSHARED = 128 };
#endif

static int read_mutex(const pthread_mutex_t *m, int *type)
{
    int word = MUTEX_KIND_WORD((const volatile pthread_mutex_t *)m);
    /* Robust mutexes sit on their owner's robust list and priority-protect
     * ones keep their ceiling in the lock word: a reset would break both.
     * (Checked first: glibc also marks every robust mutex shared.) */
    if (word & (KIND_ROBUST | KIND_PP))
        return FORKGUARD_ENOTSUP;
    if (word & KIND_PSHARED)
        return FORKGUARD_ESHARED;
    *type = word & 3;
    return FORKGUARD_OK;
}
#else
#define FG_CAN_READ_MUTEX_TYPE 0
#endif

int fg_mutex_type(const pthread_mutex_t *mutex, int *mutex_type)
{
    if (mutex == NULL || mutex_type == NULL)
        return FORKGUARD_ENULL;
#if FG_CAN_READ_MUTEX_TYPE
    return read_mutex(mutex, mutex_type);
#else
    return FORKGUARD_ENOTSUP;
#endif
}

static int register_mutex(pthread_mutex_t *mutex, int mutex_type, int policy,
                          double timeout, const char *name, int by_python, uint64_t *handle)
{
    int rc = check_common(mutex, _Alignof(pthread_mutex_t), policy, timeout,
                          handle);
    if (rc != FORKGUARD_OK)
        return rc;
    if (mutex_type < FORKGUARD_MUTEX_DETECT || mutex_type > FORKGUARD_MUTEX_ADAPTIVE)
        return FORKGUARD_EINVAL;
#if FG_CAN_READ_MUTEX_TYPE
    int actual;
    if ((rc = read_mutex(mutex, &actual)) != FORKGUARD_OK)
        return rc;
    if (mutex_type != FORKGUARD_MUTEX_DETECT && mutex_type != actual)
        return FORKGUARD_ETYPE;
    mutex_type = actual;
#else
    if (mutex_type == FORKGUARD_MUTEX_DETECT || mutex_type == FORKGUARD_MUTEX_ADAPTIVE)
        return FORKGUARD_ENOTSUP;
#endif
    fg_entry e;
    entry_init(&e, FG_KIND_MUTEX, mutex, policy, timeout, name);
    e.mutex_type = (int8_t)mutex_type;
    e.by_python = (uint8_t)by_python;
    /* No template: the child rebuilds a mutex from its own kind word. */
    return insert(&e, NULL, NULL, handle);
}

static int register_rwlock(pthread_rwlock_t *rwlock, int policy, double timeout,
                           const char *name, int by_python, uint64_t *handle)
{
    int rc = check_common(rwlock, _Alignof(pthread_rwlock_t), policy, timeout,
                          handle);
    if (rc != FORKGUARD_OK)
        return rc;
    fg_entry e;
    entry_init(&e, FG_KIND_RWLOCK, rwlock, policy, timeout, name);
    e.by_python = (uint8_t)by_python;
#if FG_RESET_BY_COPY
    fg_template tpl;
    memset(&tpl, 0, sizeof tpl);
    tpl.size = sizeof(pthread_rwlock_t);
    pthread_rwlockattr_t attr;
    if (pthread_rwlockattr_init(&attr) != 0)
        return FORKGUARD_ENOMEM;
    const volatile pthread_rwlock_t *rw = rwlock;
#if defined(__GLIBC__)
    if (rw->__data.__shared)
        rc = FORKGUARD_ESHARED;
    else if (pthread_rwlockattr_setkind_np(&attr, (int)rw->__data.__flags) != 0)
        rc = FORKGUARD_ENOTSUP; /* a reader/writer preference this glibc lacks */
#else
    if (rw->__u.__i[2]) /* musl's _rw_shared */
        rc = FORKGUARD_ESHARED;
#endif
    if (rc == FORKGUARD_OK && pthread_rwlock_init(&tpl.u.rwlock, &attr) != 0)
        rc = FORKGUARD_ENOMEM;
    pthread_rwlockattr_destroy(&attr);
    if (rc != FORKGUARD_OK)
        return rc;
    return insert(&e, &tpl, NULL, handle);
#else
    return insert(&e, NULL, NULL, handle);
#endif
}

static int register_sem(sem_t *sem, unsigned int value, int policy,
                        double timeout, const char *name, int by_python, uint64_t *handle)
{
    int rc = check_common(sem, _Alignof(sem_t), policy, timeout, handle);
    if (rc != FORKGUARD_OK)
        return rc;
#if FG_RESET_BY_COPY
    if (value > (unsigned int)SEM_VALUE_MAX)
        return FORKGUARD_EINVAL;
    fg_entry e;
    entry_init(&e, FG_KIND_SEM, sem, policy, timeout, name);
    e.sem_value = value;
    e.by_python = (uint8_t)by_python;
    fg_template tpl;
    memset(&tpl, 0, sizeof tpl);
    tpl.size = sizeof(sem_t);
    if (sem_init(&tpl.u.sem, 0, value) != 0)
        return FORKGUARD_EINVAL;
    return insert(&e, &tpl, NULL, handle);
#else
    (void)value;
    (void)name;
    (void)by_python;
    return FORKGUARD_ENOTSUP; /* macOS has no unnamed semaphores (sem_init fails) */
#endif
}

int fg_register_mutex(pthread_mutex_t *mutex, int mutex_type, int policy,
                      double timeout, const char *name, uint64_t *handle)
{
    return register_mutex(mutex, mutex_type, policy, timeout, name, 0, handle);
}

int fg_register_rwlock(pthread_rwlock_t *rwlock, int policy, double timeout,
                       const char *name, uint64_t *handle)
{
    return register_rwlock(rwlock, policy, timeout, name, 0, handle);
}

int fg_register_sem(sem_t *sem, unsigned int value, int policy,
                    double timeout, const char *name, uint64_t *handle)
{
    return register_sem(sem, value, policy, timeout, name, 0, handle);
}

/* Python's registrations: marked, so that fgpy_find() tells them from the C
 * API's; the handle (> 0, handles fit in 63 bits) or an error code (< 0) as the
 * result, so that no out-parameter is allocated per call. */
int64_t fgpy_register(int kind, uintptr_t address, int mutex_type, unsigned int value,
                      int policy, double timeout, const char *name)
{
    uint64_t handle = 0;
    int rc;
    switch (kind) {
    case FG_KIND_MUTEX:
        rc = register_mutex((pthread_mutex_t *)address, mutex_type, policy, timeout, name, 1,
                            &handle);
        break;
    case FG_KIND_RWLOCK:
        rc = register_rwlock((pthread_rwlock_t *)address, policy, timeout, name, 1, &handle);
        break;
    case FG_KIND_SEM:
        rc = register_sem((sem_t *)address, value, policy, timeout, name, 1, &handle);
        break;
    default:
        rc = FORKGUARD_EINVAL;
    }
    return rc != FORKGUARD_OK ? rc : (int64_t)handle;
}


int fg_sem_value(sem_t *sem, unsigned int *value)
{
    if (sem == NULL || value == NULL)
        return FORKGUARD_ENULL;
#if FG_RESET_BY_COPY
    int v;
    if (sem_getvalue(sem, &v) != 0)
        return FORKGUARD_EINVAL;
    *value = v > 0 ? (unsigned int)v : 0; /* < 0 means "waiters" on some systems */
    return FORKGUARD_OK;
#else
    return FORKGUARD_ENOTSUP;
#endif
}

int fg_register_hooks(forkguard_hook prepare, forkguard_hook parent, forkguard_hook child,
                      void *arg, const char *name, uint64_t *handle)
{
    if (handle == NULL || (!prepare && !parent && !child))
        return FORKGUARD_ENULL;
    int rc = ready();
    if (rc != FORKGUARD_OK)
        return rc;
    fg_entry e;
    entry_init(&e, FG_KIND_HOOKS, arg, FORKGUARD_POLICY_RESET, 0.0, name);
    fg_active hooks;
    memset(&hooks, 0, sizeof hooks);
    hooks.prepare = prepare;
    hooks.parent = parent;
    hooks.child = child;
    return insert(&e, NULL, &hooks, handle);
}

/* Remove slot i from the registry (reg.lock held); its window record, if
 * any, is the caller's to unlist and free. */
static void remove_locked(int32_t i)
{
    fg_entry *e = &reg.slots[i];
    if (e->kind == FG_KIND_HOOKS) {
        list_unlink(&reg.hook_head, &reg.hook_tail, i);
    } else {
        uint32_t pos;
        index_find(e->obj, &pos);
        index_remove(pos);
        list_unlink(&reg.obj_head, &reg.obj_tail, i);
        restore_remove((uint32_t)e->restore_pos);
#if FG_RESET_BY_COPY
        template_release(e->tpl);
#endif
    }
    slot_free(i);
    reg.count--;
}

int fg_unregister(uint64_t handle)
{
    if (tls_state)
        return FORKGUARD_EBUSY;
    if (!installed())
        return FORKGUARD_ESTALE;
    reg_lock();
    int32_t i = handle_slot(handle);
    if (i != NIL && reg.slots[i].active == NULL) {
        remove_locked(i);
        reg_unlock();
        return FORKGUARD_OK;
    }
    reg_unlock();
    if (i == NIL)
        return FORKGUARD_ESTALE;
    /* Hooks or a hold: wait for a fork in progress (which may be running its
     * hooks or holding the object), then unlist it.  Lock order: win, reg. */
    win_lock();
    reg_lock();
    fg_active *a = NULL;
    i = handle_slot(handle); /* another thread may have ended it meanwhile */
    if (i != NIL) {
        a = reg.slots[i].active;
        remove_locked(i);
    }
    reg_unlock();
    if (a != NULL) {
        if (a->kind == FG_KIND_HOOKS)
            list_remove(win.hooks, &win.nhooks, a);
        else
            list_remove(win.holds, &win.nholds, a);
    }
    win_unlock();
    free(a);
    return a != NULL ? FORKGUARD_OK : FORKGUARD_ESTALE;
}

/* Readers lock the registry unless this thread holds it already. */
static int read_begin(void)
{
    if (tls_state & TLS_REG)
        return 0;
    reg_lock();
    return 1;
}

static void read_end(int locked)
{
    if (locked)
        reg_unlock();
}

int fg_is_active(uint64_t handle)
{
    if (!installed())
        return 0;
    int locked = read_begin();
    int active = handle_slot(handle) != NIL;
    read_end(locked);
    return active;
}

int64_t fgpy_find(uintptr_t address)
{
    if (!installed())
        return FORKGUARD_ESTALE;
    int locked = read_begin();
    int32_t i = index_find((const void *)address, NULL);
    int64_t found = i == NIL               ? FORKGUARD_ESTALE
                    : reg.slots[i].by_python ? (int64_t)make_handle(i)
                                             : FORKGUARD_EEXIST;
    read_end(locked);
    return found;
}

int fg_info(uint64_t handle, fg_info_t *info)
{
    if (info == NULL)
        return FORKGUARD_ENULL;
    if (!installed())
        return FORKGUARD_ESTALE;
    int locked = read_begin();
    int32_t i = handle_slot(handle);
    if (i != NIL) {
        const fg_entry *e = &reg.slots[i];
        memset(info, 0, sizeof *info);
        info->kind = e->kind;
        info->policy = e->policy;
        info->mutex_type = e->mutex_type;
        info->sem_value = e->sem_value;
        info->timeout = e->timeout;
        if (e->active != NULL)
            info->hold_timeouts = __atomic_load_n(&e->active->hold_timeouts, __ATOMIC_RELAXED);
        info->address = (uintptr_t)e->obj;
        info->by_python = e->by_python;
        if (e->name != NULL)
            strcpy(info->name, e->name); /* at most FG_NAME_MAX - 1 bytes, name_copy() */
    }
    read_end(locked);
    return i == NIL ? FORKGUARD_ESTALE : FORKGUARD_OK;
}

/* Where a mutex's lock word and owner sit, for forkguard.watch(): a hung child
 * finds the futex it waits on from the kernel and reads the owner beside it
 * (through /proc/self/mem, which cannot fault).  Only where owner_layout_holds()
 * checked those fields on this C library. */
int fg_mutex_fields(size_t *lock_at, size_t *owner_at)
{
    if (lock_at == NULL || owner_at == NULL)
        return FORKGUARD_ENULL;
    fg_init();
#if FG_OWNER_LAYOUT
    if (!owner_rule)
        return FORKGUARD_ENOTSUP;
    *lock_at = offsetof(pthread_mutex_t, __data.__lock);
    *owner_at = offsetof(pthread_mutex_t, __data.__owner);
    return FORKGUARD_OK;
#else
    return FORKGUARD_ENOTSUP;
#endif
}

int fg_mutex_owner(uint64_t handle, long *owner)
{
    if (owner == NULL)
        return FORKGUARD_ENULL;
#if FG_OWNER_LAYOUT
    if (!owner_rule)
        return FORKGUARD_ENOTSUP;
    if (!installed())
        return FORKGUARD_ESTALE;
    /* Read under the registry's lock: an owner that unregisters and then frees
     * the mutex waits for this read to end first. */
    int locked = read_begin();
    int32_t i = handle_slot(handle);
    int rc = FORKGUARD_ESTALE;
    if (i != NIL && reg.slots[i].kind == FG_KIND_MUTEX) {
        /* Two unsynchronised reads of a mutex other threads use: a snapshot,
         * which is all a report needs. */
        const volatile pthread_mutex_t *v = reg.slots[i].obj;
        int lock = v->__data.__lock;
        long tid = v->__data.__owner;
        *owner = lock == 0 ? 0 : tid > 0 ? tid : -1;
        rc = FORKGUARD_OK;
    } else if (i != NIL) {
        rc = FORKGUARD_EINVAL;
    }
    read_end(locked);
    return rc;
#else
    (void)handle;
    return FORKGUARD_ENOTSUP;
#endif
}

size_t fg_list(uint64_t *handles, size_t cap)
{
    if (!installed())
        return 0;
    int locked = read_begin();
    size_t n = 0;
    for (int32_t i = reg.obj_head; i != NIL; i = reg.slots[i].next, n++)
        if (n < cap && handles != NULL)
            handles[n] = make_handle(i);
    for (int32_t i = reg.hook_head; i != NIL; i = reg.slots[i].next, n++)
        if (n < cap && handles != NULL)
            handles[n] = make_handle(i);
    read_end(locked);
    return n;
}

static const forkguard_api api_table = {
    .abi_version = FORKGUARD_ABI_VERSION,
    .size = sizeof(forkguard_api),
    .register_mutex = fg_register_mutex,
    .register_rwlock = fg_register_rwlock,
    .register_sem = fg_register_sem,
    .register_hooks = fg_register_hooks,
    .unregister = fg_unregister,
    .is_active = fg_is_active,
    .strerror = fg_strerror,
};

const forkguard_api *fg_api(void)
{
    return &api_table;
}

size_t fg_count(void)
{
    if (!installed())
        return 0;
    int locked = read_begin();
    size_t n = reg.count;
    read_end(locked);
    return n;
}

int fg_features(void)
{
    fg_init();
    return (FG_CAN_READ_MUTEX_TYPE ? FG_FEATURE_MUTEX_TYPE : 0) |
           (FG_RESET_BY_COPY ? FG_FEATURE_SEM : 0) |
           (FG_HAVE_TIMEDLOCK ? FG_FEATURE_TIMEDLOCK : 0) |
           (owner_rule ? FG_FEATURE_OWNER : 0);
}

const char *fg_strerror(int code)
{
    switch (code) {
    case FORKGUARD_OK:
        return "success";
    case FORKGUARD_EINVAL:
        return "invalid argument";
    case FORKGUARD_ENULL:
        return "NULL object or no hook function";
    case FORKGUARD_EALIGN:
        return "misaligned object address";
    case FORKGUARD_ENOMEM:
        return "out of memory or registry full";
    case FORKGUARD_EEXIST:
        return "object already registered";
    case FORKGUARD_ESTALE:
        return "unknown, stale or already unregistered handle";
    case FORKGUARD_ENOTSUP:
        return "not supported for this object on this platform";
    case FORKGUARD_ESHARED:
        return "process-shared object";
    case FORKGUARD_ETYPE:
        return "mutex type does not match the mutex";
    case FORKGUARD_EBUSY:
        return "called from inside forkguard in this thread (a fork hook, or a signal handler)";
    case FORKGUARD_EATFORK:
        return "pthread_atfork failed";
    case FORKGUARD_ENOAPI:
        return "forkguard's C API table is not attached";
    case FORKGUARD_EABI:
        return "the installed forkguard is older than the caller's forkguard.h";
    default:
        return "unknown error";
    }
}
