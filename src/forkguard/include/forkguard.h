/*
 * forkguard.h: the C API of forkguard, for extensions written in C, C++ or Cython.
 *
 * Register the pthread mutexes, rwlocks and semaphores your extension owns, and
 * hooks for other per-process state, with the one forkguard registry of the
 * process.  In every child of fork() forkguard restores them to their initial
 * state (policy RESET) or, having held them across the fork, releases them
 * (policy HOLD).  Full guide: docs/c-api.md.
 *
 *     #include <Python.h>      // before forkguard.h, for forkguard_import()
 *     #include <forkguard.h>   // compile with -I$(python -c "import forkguard; print(forkguard.get_include())")
 *
 *     if (forkguard_import() < 0)          // module init, with the GIL: 0 or -1 + exception
 *         return -1;
 *     forkguard_handle h;
 *     int rc = forkguard_register_mutex(&my_mutex, FORKGUARD_MUTEX_NORMAL,
 *                                       FORKGUARD_POLICY_RESET, FORKGUARD_DEFAULT_TIMEOUT,
 *                                       "mymodule.cache_lock", &h);
 *     ...
 *     forkguard_unregister(h);             // before the mutex's memory is freed
 *
 * Never link against forkguard and never compile its sources into your
 * extension: the function table below, found through the capsule
 * "forkguard._C_API", is the only way in, so that every library in a process
 * uses the same registry and the same fork handlers.
 *
 * The header needs POSIX's pthread and semaphore types: Python.h provides the
 * feature macros; a plain C file compiled with -std=c11 also needs
 * -D_POSIX_C_SOURCE=200809L (or -std=gnu11).
 *
 * The table only ever grows at its end; FORKGUARD_ABI_VERSION counts those
 * additions.  An extension built against this header runs with any forkguard
 * whose table is at least this version.
 */
#ifndef FORKGUARD_H
#define FORKGUARD_H

#include <pthread.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FORKGUARD_ABI_VERSION 1
#define FORKGUARD_CAPSULE_NAME "forkguard._C_API"

/* Return codes: FORKGUARD_OK or one of these, never anything else. */
#define FORKGUARD_OK 0
#define FORKGUARD_EINVAL (-1)  /* a value out of range: policy, timeout, type, count */
#define FORKGUARD_ENULL (-2)   /* a NULL object or handle pointer, or no hook at all */
#define FORKGUARD_EALIGN (-3)  /* the object's address is misaligned for its type */
#define FORKGUARD_ENOMEM (-4)  /* out of memory, or the registry is full */
#define FORKGUARD_EEXIST (-5)  /* this object is already registered */
#define FORKGUARD_ESTALE (-6)  /* unknown, stale or already unregistered handle */
#define FORKGUARD_ENOTSUP (-7) /* this object can't be restored here (robust mutex,
                                  sem_t on macOS, mutex type not given on macOS) */
#define FORKGUARD_ESHARED (-8) /* process-shared object: a reset would break peers */
#define FORKGUARD_ETYPE (-9)   /* the mutex type given differs from the mutex's own */
#define FORKGUARD_EBUSY (-10)  /* called from inside forkguard in this thread: a fork
                                  hook, or a signal handler that interrupted a call */
#define FORKGUARD_EATFORK (-11) /* pthread_atfork() failed */
#define FORKGUARD_ENOAPI (-12) /* forkguard_import()/forkguard_attach() not done */
#define FORKGUARD_EABI (-13)   /* the installed forkguard is older than this header */

/* Policies. */
#define FORKGUARD_POLICY_RESET 0 /* the child gets the object in its initial state */
#define FORKGUARD_POLICY_HOLD 1  /* held across fork, released on both sides */

/* Seconds a hold waits before that fork falls back to a reset, and the most a
 * registration may ask for (larger, negative or NaN: FORKGUARD_EINVAL).  The
 * Python API applies the same limit to Python objects. */
#define FORKGUARD_DEFAULT_TIMEOUT 1.0
#define FORKGUARD_TIMEOUT_MAX 1e9

/* Mutex types.  DETECT reads the type from the mutex (glibc, musl); on macOS
 * the type must be given. */
#define FORKGUARD_MUTEX_DETECT (-1)
#define FORKGUARD_MUTEX_NORMAL 0
#define FORKGUARD_MUTEX_RECURSIVE 1
#define FORKGUARD_MUTEX_ERRORCHECK 2
#define FORKGUARD_MUTEX_ADAPTIVE 3 /* glibc's PTHREAD_MUTEX_ADAPTIVE_NP */

/* A registration: opaque, never reused for another registration. */
typedef uint64_t forkguard_handle;

/* A hook.  prepare runs in the parent before fork (newest registration
 * first); parent and child run after it (oldest first).  A child hook runs in
 * a process where only the forking thread exists: async-signal-safe calls
 * only, no Python, no malloc, no locks. */
typedef void (*forkguard_hook)(void *arg);

typedef struct forkguard_api {
    uint32_t abi_version; /* FORKGUARD_ABI_VERSION of the installed forkguard */
    uint32_t size;        /* sizeof(forkguard_api) of the installed forkguard */
    int (*register_mutex)(pthread_mutex_t *mutex, int mutex_type, int policy,
                          double timeout, const char *name, forkguard_handle *handle);
    int (*register_rwlock)(pthread_rwlock_t *rwlock, int policy, double timeout,
                           const char *name, forkguard_handle *handle);
    int (*register_sem)(sem_t *sem, unsigned int value, int policy, double timeout,
                        const char *name, forkguard_handle *handle);
    int (*register_hooks)(forkguard_hook prepare, forkguard_hook parent,
                          forkguard_hook child, void *arg, const char *name,
                          forkguard_handle *handle);
    int (*unregister)(forkguard_handle handle);
    int (*is_active)(forkguard_handle handle); /* 1 or 0 */
    const char *(*strerror)(int code);
    /* New entries go here, and FORKGUARD_ABI_VERSION goes up by one. */
} forkguard_api;

/* The table this translation unit uses (each file that calls forkguard
 * imports it, as with datetime.h). */
static const forkguard_api *forkguard_api_table = NULL;

/* Use the table at `table` (for example forkguard._C_API_ADDRESS handed over
 * by cffi or ctypes code).  No Python needed.  FORKGUARD_OK, FORKGUARD_ENULL,
 * or FORKGUARD_EABI when the installed forkguard is older than this header. */
static inline int forkguard_attach(const void *table)
{
    const forkguard_api *api = (const forkguard_api *)table;
    if (api == NULL)
        return FORKGUARD_ENULL;
    if (api->abi_version < FORKGUARD_ABI_VERSION || api->size < sizeof(forkguard_api))
        return FORKGUARD_EABI;
    forkguard_api_table = api;
    return FORKGUARD_OK;
}

#ifdef Py_PYTHON_H
/* Import forkguard and attach to its table.  Call with the GIL held, e.g. in
 * module init.  0, or -1 with ImportError set.  Limited-API safe. */
static inline int forkguard_import(void)
{
    if (forkguard_api_table != NULL)
        return 0;
    const forkguard_api *api =
        (const forkguard_api *)PyCapsule_Import(FORKGUARD_CAPSULE_NAME, 0);
    if (api == NULL)
        return -1;
    if (forkguard_attach(api) != FORKGUARD_OK) {
        PyErr_Format(PyExc_ImportError,
                     "this extension was built against forkguard C API version %d, "
                     "but the installed forkguard provides version %d; upgrade forkguard",
                     FORKGUARD_ABI_VERSION, (int)api->abi_version);
        return -1;
    }
    return 0;
}
#endif

/* The calls.  Each returns FORKGUARD_ENOAPI until the table is attached. */

static inline int forkguard_register_mutex(pthread_mutex_t *mutex, int mutex_type,
                                           int policy, double timeout, const char *name,
                                           forkguard_handle *handle)
{
    if (forkguard_api_table == NULL)
        return FORKGUARD_ENOAPI;
    return forkguard_api_table->register_mutex(mutex, mutex_type, policy, timeout, name,
                                               handle);
}

static inline int forkguard_register_rwlock(pthread_rwlock_t *rwlock, int policy,
                                            double timeout, const char *name,
                                            forkguard_handle *handle)
{
    if (forkguard_api_table == NULL)
        return FORKGUARD_ENOAPI;
    return forkguard_api_table->register_rwlock(rwlock, policy, timeout, name, handle);
}

/* A semaphore comes back in the child with the count `value`. */
static inline int forkguard_register_sem(sem_t *sem, unsigned int value, int policy,
                                         double timeout, const char *name,
                                         forkguard_handle *handle)
{
    if (forkguard_api_table == NULL)
        return FORKGUARD_ENOAPI;
    return forkguard_api_table->register_sem(sem, value, policy, timeout, name, handle);
}

/* Any of the three hooks may be NULL, not all; `arg` is passed to each. */
static inline int forkguard_register_hooks(forkguard_hook prepare, forkguard_hook parent,
                                           forkguard_hook child, void *arg,
                                           const char *name, forkguard_handle *handle)
{
    if (forkguard_api_table == NULL)
        return FORKGUARD_ENOAPI;
    return forkguard_api_table->register_hooks(prepare, parent, child, arg, name, handle);
}

/* FORKGUARD_OK, or FORKGUARD_ESTALE for a handle that is not active. */
static inline int forkguard_unregister(forkguard_handle handle)
{
    if (forkguard_api_table == NULL)
        return FORKGUARD_ENOAPI;
    return forkguard_api_table->unregister(handle);
}

static inline int forkguard_is_active(forkguard_handle handle)
{
    return forkguard_api_table != NULL && forkguard_api_table->is_active(handle);
}

static inline const char *forkguard_strerror(int code)
{
    if (code == FORKGUARD_ENOAPI)
        return "forkguard_import() was not called or failed";
    if (code == FORKGUARD_EABI)
        return "the installed forkguard is older than this extension's forkguard.h";
    if (forkguard_api_table == NULL)
        return "forkguard error (call forkguard_import() for details)";
    return forkguard_api_table->strerror(code);
}

#ifdef __cplusplus
}
#endif

#endif /* FORKGUARD_H */
