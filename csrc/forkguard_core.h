/*
 * forkguard core: one process-wide registry of C synchronisation objects and
 * hooks, restored in the child of every fork() by a single pthread_atfork
 * registration.
 *
 * This header is internal to the forkguard package (the cffi module and the
 * C API table are built on it).  Extension authors use the public header
 * <forkguard.h> instead and never compile these sources themselves: a second
 * copy of the core would be a second registry with its own atfork handlers.
 */
#ifndef FORKGUARD_CORE_H
#define FORKGUARD_CORE_H

#include <pthread.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdint.h>

/* Error codes, policies, mutex types, handles and hooks are the public ones,
 * from <forkguard.h>; what follows is internal. */
#include "forkguard.h"

/* Kinds of registration. */
#define FG_KIND_MUTEX 1
#define FG_KIND_RWLOCK 2
#define FG_KIND_SEM 3
#define FG_KIND_HOOKS 4

/* What this build can do (bits of fg_features()). */
#define FG_FEATURE_MUTEX_TYPE 1 /* mutex types are read from the mutex */
#define FG_FEATURE_SEM 2        /* unnamed semaphores can be registered */
#define FG_FEATURE_TIMEDLOCK 4  /* holds wait with timed lock calls (else polling) */
#define FG_FEATURE_OWNER 8      /* the forking thread keeps what it owns in the child
                                   (the C library's owner fields were verified) */

/* Longest name kept with a registration (longer names are truncated). */
#define FG_NAME_MAX 64

/* Most registrations the registry holds at once (16.7 million, a few GB of
 * entries); past it registering fails with FORKGUARD_ENOMEM.  The tests build
 * the core with a small limit to reach it. */
#ifndef FG_MAX_ENTRIES
#define FG_MAX_ENTRIES (1u << 24)
#endif

/* What a registration is, for diagnostics. */
typedef struct {
    int kind;
    int policy;
    int mutex_type;         /* FORKGUARD_MUTEX_* for mutexes, -1 otherwise */
    unsigned int sem_value; /* for semaphores */
    double timeout;
    uint64_t hold_timeouts; /* forks at which a hold timed out */
    uintptr_t address;      /* the object, or the hooks' argument */
    int by_python;          /* made by fgpy_register(), not through the C API */
    char name[FG_NAME_MAX];
} fg_info_t;

/* Install the atfork handlers; idempotent and thread-safe. */
int fg_init(void);

int fg_register_mutex(pthread_mutex_t *mutex, int mutex_type, int policy,
                      double timeout, const char *name, uint64_t *handle);
int fg_register_rwlock(pthread_rwlock_t *rwlock, int policy, double timeout,
                       const char *name, uint64_t *handle);
int fg_register_sem(sem_t *sem, unsigned int value, int policy,
                    double timeout, const char *name, uint64_t *handle);
int fg_register_hooks(forkguard_hook prepare, forkguard_hook parent, forkguard_hook child,
                      void *arg, const char *name, uint64_t *handle);
int fg_unregister(uint64_t handle);
int fg_is_active(uint64_t handle);
int fg_info(uint64_t handle, fg_info_t *info);
size_t fg_count(void);
int fg_features(void);
/* 1 once this process has its pthread_atfork handlers (its first C registration). */
int fg_handlers_installed(void);

/* Up to `cap` live handles (objects oldest first, then hooks oldest first);
 * returns how many there are. */
size_t fg_list(uint64_t *handles, size_t cap);

/* The C API table (the capsule "forkguard._C_API" points at it). */
const forkguard_api *fg_api(void);

/* The current count of an unnamed semaphore (FORKGUARD_ENOTSUP where there are none). */
int fg_sem_value(sem_t *sem, unsigned int *value);

/* The type of a mutex as the C library records it (FORKGUARD_ENOTSUP where the
 * library does not expose it, FORKGUARD_ESHARED for process-shared mutexes). */
int fg_mutex_type(const pthread_mutex_t *mutex, int *mutex_type);

/* Who holds the mutex of registration `handle` now, for forkguard.audit(): *owner
 * is 0 if it is free, the holder's thread id (the kernel's) if the C library
 * recorded one, -1 if it is held by an owner not recorded.  Read under the
 * registry's lock, so never after its owner unregistered it.  FORKGUARD_ESTALE for
 * a handle no longer registered, FORKGUARD_EINVAL for one that is not a mutex,
 * FORKGUARD_ENOTSUP where the C library's layout is not known and checked. */
int fg_mutex_owner(uint64_t handle, long *owner);

/* The offsets of a mutex's lock word and owner thread id, where the C library's
 * layout is known and checked (FORKGUARD_ENOTSUP elsewhere): forkguard.watch()
 * reads the owner of the mutex a hung child waits on. */
int fg_mutex_fields(size_t *lock_at, size_t *owner_at);

/* forkguard.register()'s path: like the fg_register_* functions, for an object of
 * kind FG_KIND_* at `address`, marked as Python's; the handle, or an error code < 0. */
int64_t fgpy_register(int kind, uintptr_t address, int mutex_type, unsigned int value,
                      int policy, double timeout, const char *name);

/* The handle of the registration of the object at `address` if fgpy_register()
 * made it; FORKGUARD_EEXIST if C code made it through the C API, FORKGUARD_ESTALE
 * if nothing is registered there: for a Python registration that found the
 * object registered already. */
int64_t fgpy_find(uintptr_t address);

/* How many holds timed out in the calling thread's most recent fork, not yet
 * taken: its os.fork() "after in parent" hook reads it (one call, no Python,
 * while it is 0) and takes it to warn, so two hooks never warn twice. */
int fg_last_fork_timeouts(void);
int fg_take_fork_timeouts(void);

const char *fg_strerror(int code);

#endif /* FORKGUARD_CORE_H */
