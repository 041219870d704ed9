"""A cffi extension built at test time: the "C extension" whose locks forkguard guards.

Its native threads hold mutexes, rwlocks and semaphores across a fork, it forks
from C (so no Python at-fork hook runs), and it provides C hooks that count
their calls.  It knows nothing of forkguard: it hands out plain cffi pointers,
exactly as a third-party extension would.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CDEF = """
#define PTHREAD_MUTEX_NORMAL ...
#define PTHREAD_MUTEX_RECURSIVE ...
#define PTHREAD_MUTEX_ERRORCHECK ...
#define EBUSY ...
#define EDEADLK ...
#define K_MUTEX ...
#define K_WRLOCK ...
#define K_RDLOCK ...
#define K_SEM ...

typedef struct { ...; } pthread_mutex_t;
typedef struct { ...; } pthread_rwlock_t;
typedef struct { ...; } sem_t;
typedef struct holder holder_t;
typedef struct pair pair_t;

pthread_mutex_t *mutex_new(int type, int pshared, int robust);
pthread_rwlock_t *rwlock_new(int pshared);
sem_t *sem_new(unsigned int value);
void lock_free(void *p);
int mutex_reinit(pthread_mutex_t *m, int type);

int pthread_mutex_init(pthread_mutex_t *m, void *attr);
int pthread_mutex_lock(pthread_mutex_t *m);
int pthread_mutex_trylock(pthread_mutex_t *m);
int pthread_mutex_unlock(pthread_mutex_t *m);
int pthread_mutex_destroy(pthread_mutex_t *m);
int pthread_rwlock_rdlock(pthread_rwlock_t *rw);
int pthread_rwlock_wrlock(pthread_rwlock_t *rw);
int pthread_rwlock_trywrlock(pthread_rwlock_t *rw);
int pthread_rwlock_tryrdlock(pthread_rwlock_t *rw);
int pthread_rwlock_unlock(pthread_rwlock_t *rw);
int sem_wait(sem_t *s);
int sem_trywait(sem_t *s);
int sem_post(sem_t *s);
int sem_getvalue(sem_t *s, int *value);

holder_t *holder_start(int n, int *kinds, void **objs, int *depths);
void holder_stop(holder_t *h);

int c_fork_lock_all(int n, int *kinds, void **objs, int *depths, int deadline_s);

pair_t *pair_start(int use_gap);
void pair_read(pair_t *p, long *a, long *b);
void pair_stop(pair_t *p);
int c_fork_pair_equal(pair_t *p, int deadline_s);
pthread_mutex_t *pair_mutex(pair_t *p);

void churn(int kind, void *obj, int depth, int rounds);

void hook_prepare(void *arg);
void hook_parent(void *arg);
void hook_child(void *arg);
int hook_calls(int which);
int hook_log(int i);
int hook_log_len(void);
void hook_reset(void);
"""

SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define K_MUTEX 1
#define K_WRLOCK 2
#define K_RDLOCK 3
#define K_SEM 4

typedef struct holder holder_t;
typedef struct pair pair_t;

pthread_mutex_t *mutex_new(int type, int pshared, int robust)
{
    pthread_mutexattr_t a;
    pthread_mutex_t *m = calloc(1, sizeof *m);
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, type);
    if (pshared) pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
#ifdef __linux__
    if (robust) pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
#endif
    pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return m;
}

pthread_rwlock_t *rwlock_new(int pshared)
{
    pthread_rwlockattr_t a;
    pthread_rwlock_t *rw = calloc(1, sizeof *rw);
    pthread_rwlockattr_init(&a);
    if (pshared) pthread_rwlockattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_rwlock_init(rw, &a);
    pthread_rwlockattr_destroy(&a);
    return rw;
}

sem_t *sem_new(unsigned int value)
{
    sem_t *s = calloc(1, sizeof *s);
    sem_init(s, 0, value);
    return s;
}

void lock_free(void *p) { free(p); }

/* Destroy a mutex and initialise it again, in place, as another type. */
int mutex_reinit(pthread_mutex_t *m, int type)
{
    pthread_mutexattr_t a;
    int rc = pthread_mutex_destroy(m);
    if (rc != 0)
        return rc;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, type);
    rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

static void take(int kind, void *obj)
{
    switch (kind) {
    case K_MUTEX: pthread_mutex_lock(obj); break;
    case K_WRLOCK: pthread_rwlock_wrlock(obj); break;
    case K_RDLOCK: pthread_rwlock_rdlock(obj); break;
    default: while (sem_wait(obj) != 0 && errno == EINTR) {} break;
    }
}

static void give(int kind, void *obj)
{
    switch (kind) {
    case K_MUTEX: pthread_mutex_unlock(obj); break;
    case K_WRLOCK: case K_RDLOCK: pthread_rwlock_unlock(obj); break;
    default: sem_post(obj); break;
    }
}

/* Take and give back `rounds` times, `depth` deep, with a little work inside:
 * the storm's workload, called with the GIL released. */
void churn(int kind, void *obj, int depth, int rounds)
{
    for (int r = 0; r < rounds; r++) {
        for (int d = 0; d < depth; d++)
            take(kind, obj);
        for (volatile int spin = 0; spin < 200; spin++) {}
        for (int d = 0; d < depth; d++)
            give(kind, obj);
    }
}

/* A native thread that takes objects, then waits until told to give them back. */
struct holder {
    pthread_t thread;
    int n, kinds[8], depths[8];
    void *objs[8];
    pthread_mutex_t m;
    pthread_cond_t c;
    int held, release;
};

static void *holder_main(void *arg)
{
    struct holder *h = arg;
    for (int i = 0; i < h->n; i++)
        for (int d = 0; d < h->depths[i]; d++)
            take(h->kinds[i], h->objs[i]);
    pthread_mutex_lock(&h->m);
    h->held = 1;
    pthread_cond_broadcast(&h->c);
    while (!h->release)
        pthread_cond_wait(&h->c, &h->m);
    pthread_mutex_unlock(&h->m);
    for (int i = h->n - 1; i >= 0; i--)
        for (int d = 0; d < h->depths[i]; d++)
            give(h->kinds[i], h->objs[i]);
    return NULL;
}

holder_t *holder_start(int n, int *kinds, void **objs, int *depths)
{
    struct holder *h = calloc(1, sizeof *h);
    h->n = n;
    for (int i = 0; i < n; i++) {
        h->kinds[i] = kinds[i];
        h->objs[i] = objs[i];
        h->depths[i] = depths[i];
    }
    pthread_mutex_init(&h->m, NULL);
    pthread_cond_init(&h->c, NULL);
    pthread_create(&h->thread, NULL, holder_main, h);
    pthread_mutex_lock(&h->m);
    while (!h->held)
        pthread_cond_wait(&h->c, &h->m);
    pthread_mutex_unlock(&h->m);
    return h;
}

void holder_stop(holder_t *h)
{
    pthread_mutex_lock(&h->m);
    h->release = 1;
    pthread_cond_broadcast(&h->c);
    pthread_mutex_unlock(&h->m);
    pthread_join(h->thread, NULL);
    free(h);
}

/* fork() from C: no Python hook runs.  The child takes every object (blocking,
 * so a lock left held hangs it until the alarm) and exits 0. */
int c_fork_lock_all(int n, int *kinds, void **objs, int *depths, int deadline_s)
{
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL);
        alarm((unsigned)deadline_s);
        for (int i = 0; i < n; i++)
            for (int d = 0; d < depths[i]; d++)
                take(kinds[i] == K_RDLOCK ? K_WRLOCK : kinds[i], objs[i]);
        _exit(0);
    }
    int status = -1;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return status;
}

/* Two fields that must stay equal, updated under one mutex with a pause in
 * between: a child forked mid-update sees them differ unless the mutex is held
 * across the fork. */
struct pair {
    pthread_mutex_t m;
    volatile long a, b;
    volatile int stop;
    int gap;
    pthread_t thread;
};

static void nap_us(long us)
{
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

static void *pair_main(void *arg)
{
    struct pair *p = arg;
    while (!p->stop) {
        pthread_mutex_lock(&p->m);
        p->a++;
        nap_us(300);
        p->b++;
        pthread_mutex_unlock(&p->m);
        if (p->gap)
            nap_us(100);
    }
    return NULL;
}

pair_t *pair_start(int use_gap)
{
    struct pair *p = calloc(1, sizeof *p);
    pthread_mutex_init(&p->m, NULL);
    p->gap = use_gap;
    pthread_create(&p->thread, NULL, pair_main, p);
    return p;
}

pthread_mutex_t *pair_mutex(pair_t *p) { return &p->m; }

void pair_read(pair_t *p, long *a, long *b)
{
    *a = p->a;
    *b = p->b;
}

void pair_stop(pair_t *p)
{
    p->stop = 1;
    pthread_join(p->thread, NULL);
    free(p);
}

int c_fork_pair_equal(pair_t *p, int deadline_s)
{
    pid_t pid = fork();
    if (pid == 0) {
        alarm((unsigned)deadline_s);
        pthread_mutex_lock(&p->m);
        _exit(p->a == p->b ? 0 : 1);
    }
    int status = -1;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return status;
}

/* Hooks that record every call: which hook, and the argument it got. */
static volatile int calls[3];
static volatile int log_[256];
static volatile int log_len;

static void record(int which, void *arg)
{
    calls[which]++;
    if (log_len < 256)
        log_[log_len++] = which * 1000 + (int)(intptr_t)arg;
}

void hook_prepare(void *arg) { record(0, arg); }
void hook_parent(void *arg) { record(1, arg); }
void hook_child(void *arg) { record(2, arg); }
int hook_calls(int which) { return calls[which]; }
int hook_log(int i) { return log_[i]; }
int hook_log_len(void) { return log_len; }
void hook_reset(void) { memset((void *)calls, 0, sizeof calls); log_len = 0; }
"""


def build(directory: Path, name: str = "_fgtest_native") -> ModuleType:
    """Compile the extension into `directory` and import it."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(name, SOURCE, libraries=["pthread"] if sys.platform.startswith("linux") else [])
    path = ffi.compile(tmpdir=str(directory))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORE_CDEF = """
typedef ... pthread_mutex_t; typedef ... pthread_rwlock_t; typedef ... sem_t;
typedef void (*forkguard_hook)(void *arg);
int fg_register_mutex(pthread_mutex_t *, int, int, double, const char *, uint64_t *);
int fg_register_rwlock(pthread_rwlock_t *, int, double, const char *, uint64_t *);
int fg_register_sem(sem_t *, unsigned int, int, double, const char *, uint64_t *);
int fg_register_hooks(forkguard_hook, forkguard_hook, forkguard_hook, void *, const char *,
                      uint64_t *);
int fg_unregister(uint64_t);
int fg_is_active(uint64_t);
size_t fg_count(void);
int fg_features(void);
"""


def build_core(directory: Path, csrc: Path, macros: list[tuple[str, str]]) -> ModuleType:
    """A private copy of forkguard's C core compiled with `macros`, as module ``_fg_core``.

    It installs its own pthread_atfork handlers: use it in a process of its own.
    """
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(CORE_CDEF)
    ffi.set_source(
        "_fg_core",
        '#include "forkguard_core.h"',
        sources=[str(csrc / "forkguard_core.c")],
        include_dirs=[str(csrc), str(csrc.parent / "src" / "forkguard" / "include")],
        define_macros=macros,
        extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Werror"],
    )
    path = ffi.compile(tmpdir=str(directory))
    spec = importlib.util.spec_from_file_location("_fg_core", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
