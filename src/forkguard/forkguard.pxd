# Cython declarations for forkguard's C API (forkguard.h); see docs/c-api.md.
#
#     from forkguard cimport forkguard_import, forkguard_register_mutex, ...
#
# Compile with include_dirs=[forkguard.get_include()].  Declare your locks with the
# pthread_mutex_t, pthread_rwlock_t and sem_t below, so their types match.

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_rwlock_t:
        pass


cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass


cdef extern from "forkguard.h" nogil:
    enum:
        FORKGUARD_ABI_VERSION
        FORKGUARD_OK
        FORKGUARD_EINVAL
        FORKGUARD_ENULL
        FORKGUARD_EALIGN
        FORKGUARD_ENOMEM
        FORKGUARD_EEXIST
        FORKGUARD_ESTALE
        FORKGUARD_ENOTSUP
        FORKGUARD_ESHARED
        FORKGUARD_ETYPE
        FORKGUARD_EBUSY
        FORKGUARD_EATFORK
        FORKGUARD_ENOAPI
        FORKGUARD_EABI
        FORKGUARD_POLICY_RESET
        FORKGUARD_POLICY_HOLD
        FORKGUARD_MUTEX_DETECT
        FORKGUARD_MUTEX_NORMAL
        FORKGUARD_MUTEX_RECURSIVE
        FORKGUARD_MUTEX_ERRORCHECK
        FORKGUARD_MUTEX_ADAPTIVE

    const double FORKGUARD_DEFAULT_TIMEOUT

    ctypedef uint64_t forkguard_handle
    ctypedef void (*forkguard_hook)(void *arg) noexcept nogil

    ctypedef struct forkguard_api:
        uint32_t abi_version
        uint32_t size

    int forkguard_attach(const void *table)
    int forkguard_register_mutex(pthread_mutex_t *mutex, int mutex_type, int policy,
                                 double timeout, const char *name,
                                 forkguard_handle *handle)
    int forkguard_register_rwlock(pthread_rwlock_t *rwlock, int policy, double timeout,
                                  const char *name, forkguard_handle *handle)
    int forkguard_register_sem(sem_t *sem, unsigned int value, int policy, double timeout,
                               const char *name, forkguard_handle *handle)
    int forkguard_register_hooks(forkguard_hook prepare, forkguard_hook parent,
                                 forkguard_hook child, void *arg, const char *name,
                                 forkguard_handle *handle)
    int forkguard_unregister(forkguard_handle handle)
    int forkguard_is_active(forkguard_handle handle)
    const char *forkguard_strerror(int code)


cdef extern from "forkguard.h":
    # Needs the GIL: imports forkguard; raises ImportError on failure.
    int forkguard_import() except -1
