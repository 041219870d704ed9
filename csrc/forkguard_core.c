/*
 * forkguard core: the registry and the one pthread_atfork registration.
 *
 * Fork timeline (see docs/design.md):
 *   prepare  registry locked; prepare hooks (newest first); holds taken
 *            (oldest first, each bounded by its timeout)
 *   parent   holds released; parent hooks (oldest first); registry unlocked
 *   child    every object restored to its initial state (oldest first); child
 *            hooks (oldest first); registry lock re-created
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
#include <stdlib.h>
#include <string.h>
#include <time.h>

/*
 * How an object is restored in the child.  On Linux (glibc and musl) a freshly
 * initialised mutex, rwlock or semaphore holds no pointer to itself, so a copy
 * of one initialised at registration time is exactly what pthread_*_init would
 * write, and copying it is a plain memcpy.  Elsewhere (macOS) the layout may
 * depend on the object's address, so the child calls the init function in
 * place instead.  Defining FG_PORTABLE selects the second path on Linux too, so
 * it can be compiled and tested here.
 */
#if defined(__linux__) && !defined(FG_PORTABLE)
#define FG_RESET_BY_COPY 1
#define FG_HAVE_TIMEDLOCK 1
#else
#define FG_RESET_BY_COPY 0
#define FG_HAVE_TIMEDLOCK 0
#endif

#define NIL (-1)

#if FG_RESET_BY_COPY
/* A freshly initialised object, shared by every registration that needs the
 * same bytes (all default mutexes share one).  Never written after creation. */
typedef struct fg_template {
    struct fg_template *next;
    uint32_t refs;
    uint32_t size;
    union {
        pthread_mutex_t mutex;
        pthread_rwlock_t rwlock;
        sem_t sem;
    } u;
} fg_template;
#endif

/* What the child handler needs per object, packed densely: it walks this
 * array and nothing else, so a fork with many registrations stays cheap. */
typedef struct {
    void *obj;
#if FG_RESET_BY_COPY
    const fg_template *tpl;
#else
    uint8_t kind;
    int8_t mutex_type;
#endif
    int32_t slot; /* the entry this belongs to */
} fg_restore;

typedef struct {
    uint32_t generation; /* part of the handle; bumped when the slot is freed */
    int32_t prev, next;  /* registration order; `next` also links free slots */
    int32_t hprev, hnext; /* the hold list (policy HOLD), registration order */
    int32_t restore_pos; /* index in reg.restore (objects) */
    uint8_t kind;        /* FG_KIND_*, or 0 for a free slot */
    uint8_t policy;
    uint8_t held;        /* the hold was taken for the fork in progress */
    int8_t mutex_type;
    unsigned int sem_value;
    double timeout;
    uint64_t hold_timeouts;
    void *obj; /* the registered object, or the hooks' argument */
#if FG_RESET_BY_COPY
    fg_template *tpl;
#endif
    struct {
        forkguard_hook prepare, parent, child;
    } hooks;
    char name[FG_NAME_MAX];
} fg_entry;

static struct {
    pthread_mutex_t lock;
    fg_entry *slots;
    uint32_t cap;  /* slots allocated */
    uint32_t used; /* slots ever handed out */
    int32_t free_head;
    int32_t obj_head, obj_tail;   /* mutexes, rwlocks, semaphores */
    int32_t hook_head, hook_tail; /* hooks */
    int32_t hold_head, hold_tail; /* objects with policy HOLD */
    uint32_t count;               /* live registrations */
    uint32_t nobj;                /* live objects (entries in `index`) */
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
    .hold_head = NIL,
    .hold_tail = NIL,
};

/* Per-thread fork state.  A thread that prepares a fork keeps the registry
 * locked until the parent or child handler; the flags let that same thread's
 * handlers (and hooks calling back in) know it already owns the lock. */
#define TLS_IN_FORK 1u  /* this thread holds reg.lock for a fork */
#define TLS_PRETAKEN 2u /* ...taken early by fg_prepare_begin() */
static _Thread_local unsigned int tls_state;

#if !FG_RESET_BY_COPY
static pthread_mutexattr_t mutex_attrs[FORKGUARD_MUTEX_ERRORCHECK + 1];
#endif

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

static void hold_append(int32_t i)
{
    reg.slots[i].hprev = reg.hold_tail;
    reg.slots[i].hnext = NIL;
    if (reg.hold_tail != NIL)
        reg.slots[reg.hold_tail].hnext = i;
    else
        reg.hold_head = i;
    reg.hold_tail = i;
}

static void hold_unlink(int32_t i)
{
    fg_entry *e = &reg.slots[i];
    if (e->hprev != NIL)
        reg.slots[e->hprev].hnext = e->hnext;
    else
        reg.hold_head = e->hnext;
    if (e->hnext != NIL)
        reg.slots[e->hnext].hprev = e->hprev;
    else
        reg.hold_tail = e->hprev;
}

/* Room for one more object in the restore array. */
static int restore_reserve(void)
{
    if (reg.nobj < reg.restore_cap)
        return FORKGUARD_OK;
    uint32_t ncap = reg.restore_cap ? reg.restore_cap * 2 : 16;
    fg_restore *n = realloc(reg.restore, (size_t)ncap * sizeof *n);
    if (n == NULL)
        return FORKGUARD_ENOMEM;
    reg.restore = n;
    reg.restore_cap = ncap;
    return FORKGUARD_OK;
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
/* Holds: taken before fork, released in the parent. */

#if FG_HAVE_TIMEDLOCK
static struct timespec deadline_after(double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (seconds > 1e9) /* far enough to be "never", small enough not to overflow */
        seconds = 1e9;
    time_t whole = (time_t)seconds;
    ts.tv_sec += whole;
    ts.tv_nsec += (long)((seconds - (double)whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}
#else
static int try_once(fg_entry *e)
{
    switch (e->kind) {
    case FG_KIND_MUTEX:
        return pthread_mutex_trylock(e->obj);
    case FG_KIND_RWLOCK:
        return pthread_rwlock_trywrlock(e->obj);
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

/* 1: taken; 0: nothing to take (this thread owns it already); -1: timed out. */
static int hold_take(fg_entry *e)
{
    int r;
#if FG_HAVE_TIMEDLOCK
    struct timespec dl = deadline_after(e->timeout);
    switch (e->kind) {
    case FG_KIND_MUTEX:
        r = pthread_mutex_timedlock(e->obj, &dl);
        break;
    case FG_KIND_RWLOCK:
        r = pthread_rwlock_timedwrlock(e->obj, &dl);
        break;
    default:
        while ((r = sem_timedwait(e->obj, &dl)) != 0 && errno == EINTR)
            ;
        if (r != 0)
            r = errno;
        break;
    }
#else
    /* No timed variants here: poll with a growing sleep, on the monotonic
     * clock. */
    double deadline = monotonic_now() + e->timeout;
    long nap_ns = 50000;
    while ((r = try_once(e)) == EBUSY) {
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

static void hold_release(fg_entry *e)
{
    switch (e->kind) {
    case FG_KIND_MUTEX:
        pthread_mutex_unlock(e->obj);
        break;
    case FG_KIND_RWLOCK:
        pthread_rwlock_unlock(e->obj);
        break;
    default:
        sem_post(e->obj);
        break;
    }
}

/* ------------------------------------------------------------------ */
/* The atfork handlers. */

/* Prepare hooks newest first, then holds oldest first (one global order, so
 * two holds never wait for each other in opposite orders). reg.lock held. */
static int prepare_locked(void)
{
    int timeouts = 0;
    for (int32_t i = reg.hook_tail; i != NIL; i = reg.slots[i].prev) {
        fg_entry *e = &reg.slots[i];
        if (e->hooks.prepare)
            e->hooks.prepare(e->obj);
    }
    for (int32_t i = reg.hold_head; i != NIL; i = reg.slots[i].hnext) {
        fg_entry *e = &reg.slots[i];
        int got = hold_take(e);
        e->held = got == 1;
        if (got < 0) {
            e->hold_timeouts++;
            timeouts++;
        }
    }
    return timeouts;
}

static void finish_parent(void)
{
    for (int32_t i = reg.hold_tail; i != NIL; i = reg.slots[i].hprev) {
        fg_entry *e = &reg.slots[i];
        if (e->held) {
            hold_release(e);
            e->held = 0;
        }
    }
    for (int32_t i = reg.hook_head; i != NIL; i = reg.slots[i].next) {
        fg_entry *e = &reg.slots[i];
        if (e->hooks.parent)
            e->hooks.parent(e->obj);
    }
    tls_state = 0;
    pthread_mutex_unlock(&reg.lock);
}

static void atfork_prepare(void)
{
    if (tls_state & TLS_PRETAKEN)
        return; /* fg_prepare_begin() already did it, in this thread */
    int saved_errno = errno;
    pthread_mutex_lock(&reg.lock);
    tls_state = TLS_IN_FORK;
    prepare_locked();
    errno = saved_errno;
}

static void atfork_parent(void)
{
    if (!(tls_state & TLS_IN_FORK))
        return;
    int saved_errno = errno;
    finish_parent();
    errno = saved_errno;
}

/* Copy the template over the object, but only where it differs: an object
 * already in its initial state (the usual case) is only read, so its page is
 * not copied by the kernel. memcmp/memcpy are async-signal-safe (POSIX 2016). */
static void restore(const fg_restore *r)
{
#if FG_RESET_BY_COPY
    if (memcmp(r->obj, &r->tpl->u, r->tpl->size) != 0)
        memcpy(r->obj, &r->tpl->u, r->tpl->size);
#else
    /* Not on POSIX's async-signal-safe list, but on these systems (macOS)
     * initialising a mutex or rwlock only stores into the object: it neither
     * allocates nor locks. */
    if (r->kind == FG_KIND_MUTEX)
        pthread_mutex_init(r->obj, &mutex_attrs[r->mutex_type]);
    else
        pthread_rwlock_init(r->obj, NULL);
#endif
}

static void atfork_child(void)
{
    static const pthread_mutex_t fresh_lock = PTHREAD_MUTEX_INITIALIZER;
    if (!(tls_state & TLS_IN_FORK))
        return;
    int saved_errno = errno;
    for (uint32_t k = 0; k < reg.nobj; k++)
        restore(&reg.restore[k]);
    for (int32_t i = reg.hook_head; i != NIL; i = reg.slots[i].next) {
        fg_entry *e = &reg.slots[i];
        if (e->hooks.child)
            e->hooks.child(e->obj);
    }
    /* This thread owns reg.lock, but an error-checking implementation would
     * refuse the unlock (the thread id changed); a fresh copy needs no owner. */
    memcpy(&reg.lock, &fresh_lock, sizeof reg.lock);
    tls_state = 0;
    errno = saved_errno;
}

int fg_prepare_begin(void)
{
    if (fg_init() != FORKGUARD_OK)
        return FORKGUARD_EATFORK;
    if (tls_state)
        return FORKGUARD_EBUSY;
    pthread_mutex_lock(&reg.lock);
    tls_state = TLS_IN_FORK | TLS_PRETAKEN;
    return prepare_locked();
}

void fg_parent_end(void)
{
    if (tls_state & TLS_IN_FORK)
        finish_parent();
}

/* ------------------------------------------------------------------ */
/* Initialisation. */

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_result = FORKGUARD_OK;

static void init_process(void)
{
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
    if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0)
        init_result = FORKGUARD_EATFORK;
}

int fg_init(void)
{
    pthread_once(&init_once, init_process);
    return init_result;
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
    /* Also false for NaN; +inf fails the upper bound. */
    if (!(timeout >= 0.0 && timeout <= 1e300))
        return FORKGUARD_EINVAL;
    return fg_init();
}

static void entry_init(fg_entry *e, int kind, void *obj, int policy,
                       double timeout, const char *name)
{
    memset(e, 0, sizeof *e);
    e->kind = (uint8_t)kind;
    e->obj = obj;
    e->policy = (uint8_t)policy;
    e->timeout = timeout;
    e->mutex_type = -1;
    if (name) {
        size_t n = strlen(name);
        if (n >= FG_NAME_MAX)
            n = FG_NAME_MAX - 1;
        memcpy(e->name, name, n);
    }
}

#if FG_RESET_BY_COPY
typedef fg_template fg_template_arg;
#else
typedef void fg_template_arg;
#endif

/* Insert a prepared entry (and, for an object, its template): one critical
 * section, every allocation before any change, so a fork sees all or none and
 * a failure changes nothing. */
static int insert(const fg_entry *proto, const fg_template_arg *tpl, uint64_t *handle)
{
    int is_obj = proto->kind != FG_KIND_HOOKS;
    int rc = FORKGUARD_OK;
    int32_t i = NIL;
    if (tls_state)
        return FORKGUARD_EBUSY;
    pthread_mutex_lock(&reg.lock);
#if FG_RESET_BY_COPY
    fg_template *shared = NULL;
#else
    (void)tpl;
#endif
    if (is_obj && index_find(proto->obj, NULL) != NIL)
        rc = FORKGUARD_EEXIST;
    else if (is_obj && (index_reserve() != FORKGUARD_OK || restore_reserve() != FORKGUARD_OK))
        rc = FORKGUARD_ENOMEM;
#if FG_RESET_BY_COPY
    else if (is_obj && (shared = template_intern(tpl)) == NULL)
        rc = FORKGUARD_ENOMEM;
#endif
    else if ((i = slot_alloc()) == NIL)
        rc = FORKGUARD_ENOMEM;
    if (rc != FORKGUARD_OK) {
#if FG_RESET_BY_COPY
        template_release(shared);
#endif
        pthread_mutex_unlock(&reg.lock);
        return rc;
    }

    fg_entry *e = &reg.slots[i];
    uint32_t generation = e->generation;
    *e = *proto;
    e->generation = generation;
    if (is_obj) {
        list_append(&reg.obj_head, &reg.obj_tail, i);
        if (e->policy == FORKGUARD_POLICY_HOLD)
            hold_append(i);
        index_put(i);
        fg_restore *r = &reg.restore[reg.nobj];
        r->obj = e->obj;
        r->slot = i;
#if FG_RESET_BY_COPY
        e->tpl = shared;
        r->tpl = shared;
#else
        r->kind = e->kind;
        r->mutex_type = e->mutex_type;
#endif
        e->restore_pos = (int32_t)reg.nobj++;
    } else {
        list_append(&reg.hook_head, &reg.hook_tail, i);
    }
    reg.count++;
    *handle = make_handle(i);
    pthread_mutex_unlock(&reg.lock);
    return FORKGUARD_OK;
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
#define MUTEX_KIND_WORD(m) ((m)->__data.__kind)
enum { KIND_ROBUST = 16, KIND_PP = 64, KIND_PSHARED = 128 };
#else
/* musl's _m_type: robust 4, prio-inherit 8, process-shared 128. */
#define MUTEX_KIND_WORD(m) ((m)->__u.__i[0])
enum { KIND_ROBUST = 4, KIND_PP = 0, KIND_PSHARED = 128 };
#endif

static int read_mutex(const pthread_mutex_t *m, int *type, int *word)
{
    *word = MUTEX_KIND_WORD((const volatile pthread_mutex_t *)m);
    /* Robust mutexes sit on their owner's robust list and priority-protect
     * ones keep their ceiling in the lock word: a template copy would break
     * both.  (Checked first: glibc also marks every robust mutex shared.) */
    if (*word & (KIND_ROBUST | KIND_PP))
        return FORKGUARD_ENOTSUP;
    if (*word & KIND_PSHARED)
        return FORKGUARD_ESHARED;
    *type = *word & 3;
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
    int word;
    return read_mutex(mutex, mutex_type, &word);
#else
    return FORKGUARD_ENOTSUP;
#endif
}

int fg_register_mutex(pthread_mutex_t *mutex, int mutex_type, int policy,
                      double timeout, const char *name, uint64_t *handle)
{
    int rc = check_common(mutex, _Alignof(pthread_mutex_t), policy, timeout,
                          handle);
    if (rc != FORKGUARD_OK)
        return rc;
    if (mutex_type < FORKGUARD_MUTEX_DETECT || mutex_type > FORKGUARD_MUTEX_ADAPTIVE)
        return FORKGUARD_EINVAL;
#if FG_CAN_READ_MUTEX_TYPE
    int actual, word;
    if ((rc = read_mutex(mutex, &actual, &word)) != FORKGUARD_OK)
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
#if FG_RESET_BY_COPY
    fg_template tpl;
    memset(&tpl, 0, sizeof tpl);
    tpl.size = sizeof(pthread_mutex_t);
    MUTEX_KIND_WORD(&tpl.u.mutex) = word;
    return insert(&e, &tpl, handle);
#else
    return insert(&e, NULL, handle);
#endif
}

int fg_register_rwlock(pthread_rwlock_t *rwlock, int policy, double timeout,
                       const char *name, uint64_t *handle)
{
    int rc = check_common(rwlock, _Alignof(pthread_rwlock_t), policy, timeout,
                          handle);
    if (rc != FORKGUARD_OK)
        return rc;
    fg_entry e;
    entry_init(&e, FG_KIND_RWLOCK, rwlock, policy, timeout, name);
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
    return insert(&e, &tpl, handle);
#else
    return insert(&e, NULL, handle);
#endif
}

int fg_register_sem(sem_t *sem, unsigned int value, int policy,
                    double timeout, const char *name, uint64_t *handle)
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
    fg_template tpl;
    memset(&tpl, 0, sizeof tpl);
    tpl.size = sizeof(sem_t);
    if (sem_init(&tpl.u.sem, 0, value) != 0)
        return FORKGUARD_EINVAL;
    return insert(&e, &tpl, handle);
#else
    (void)value;
    (void)name;
    return FORKGUARD_ENOTSUP; /* macOS has no unnamed semaphores (sem_init fails) */
#endif
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
    int rc = fg_init();
    if (rc != FORKGUARD_OK)
        return rc;
    fg_entry e;
    entry_init(&e, FG_KIND_HOOKS, arg, FORKGUARD_POLICY_RESET, 0.0, name);
    e.hooks.prepare = prepare;
    e.hooks.parent = parent;
    e.hooks.child = child;
    return insert(&e, NULL, handle);
}

int fg_unregister(uint64_t handle)
{
    if (tls_state)
        return FORKGUARD_EBUSY;
    int rc = FORKGUARD_OK;
    pthread_mutex_lock(&reg.lock);
    int32_t i = handle_slot(handle);
    if (i == NIL) {
        rc = FORKGUARD_ESTALE;
    } else if (reg.slots[i].kind == FG_KIND_HOOKS) {
        list_unlink(&reg.hook_head, &reg.hook_tail, i);
    } else {
        fg_entry *e = &reg.slots[i];
        uint32_t pos;
        index_find(e->obj, &pos);
        index_remove(pos);
        list_unlink(&reg.obj_head, &reg.obj_tail, i);
        if (e->policy == FORKGUARD_POLICY_HOLD)
            hold_unlink(i);
        /* Swap-remove: the restore array has no order to keep. */
        fg_restore *last = &reg.restore[--reg.nobj];
        reg.restore[e->restore_pos] = *last;
        reg.slots[last->slot].restore_pos = e->restore_pos;
#if FG_RESET_BY_COPY
        template_release(e->tpl);
#endif
    }
    if (i != NIL) {
        slot_free(i);
        reg.count--;
    }
    pthread_mutex_unlock(&reg.lock);
    return rc;
}

/* Readers lock the registry unless this thread already holds it for a fork. */
static int read_begin(void)
{
    if (tls_state)
        return 0;
    pthread_mutex_lock(&reg.lock);
    return 1;
}

static void read_end(int locked)
{
    if (locked)
        pthread_mutex_unlock(&reg.lock);
}

int fg_is_active(uint64_t handle)
{
    int locked = read_begin();
    int active = handle_slot(handle) != NIL;
    read_end(locked);
    return active;
}

int fg_info(uint64_t handle, fg_info_t *info)
{
    if (info == NULL)
        return FORKGUARD_ENULL;
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
        info->hold_timeouts = e->hold_timeouts;
        info->address = (uintptr_t)e->obj;
        memcpy(info->name, e->name, FG_NAME_MAX);
    }
    read_end(locked);
    return i == NIL ? FORKGUARD_ESTALE : FORKGUARD_OK;
}

size_t fg_list(uint64_t *handles, size_t cap)
{
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
    int locked = read_begin();
    size_t n = reg.count;
    read_end(locked);
    return n;
}

int fg_features(void)
{
    return (FG_CAN_READ_MUTEX_TYPE ? FG_FEATURE_MUTEX_TYPE : 0) |
           (FG_RESET_BY_COPY ? FG_FEATURE_SEM : 0) |
           (FG_HAVE_TIMEDLOCK ? FG_FEATURE_TIMEDLOCK : 0);
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
        return "called from a fork handler of the forking thread";
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
