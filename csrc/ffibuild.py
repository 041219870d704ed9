"""cffi build of forkguard's C core (API mode, out of line) as forkguard._native.

setup.py names this file in ``cffi_modules``.  Environment switches:

FORKGUARD_PORTABLE=1
    Compile the core's non-Linux code path (restore by re-initialising in
    place, holds by polling), so it can be tested on Linux.
FORKGUARD_SANITIZE=1
    Compile and link the core with AddressSanitizer and UndefinedBehaviorSanitizer
    (any report aborts).  Python itself is not instrumented, so the ASan runtime
    must be preloaded: see docs/testing.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
INCLUDE = HERE.parent / "src" / "forkguard" / "include"  # the public forkguard.h

CDEF = """
#define FORKGUARD_OK ...
#define FORKGUARD_EINVAL ...
#define FORKGUARD_ENULL ...
#define FORKGUARD_EALIGN ...
#define FORKGUARD_ENOMEM ...
#define FORKGUARD_EEXIST ...
#define FORKGUARD_ESTALE ...
#define FORKGUARD_ENOTSUP ...
#define FORKGUARD_ESHARED ...
#define FORKGUARD_ETYPE ...
#define FORKGUARD_EBUSY ...
#define FORKGUARD_EATFORK ...
#define FORKGUARD_ENOAPI ...
#define FORKGUARD_EABI ...
#define FORKGUARD_ABI_VERSION ...
#define FG_KIND_MUTEX ...
#define FG_KIND_RWLOCK ...
#define FG_KIND_SEM ...
#define FG_KIND_HOOKS ...
#define FORKGUARD_POLICY_RESET ...
#define FORKGUARD_POLICY_HOLD ...
#define FORKGUARD_MUTEX_DETECT ...
#define FORKGUARD_MUTEX_NORMAL ...
#define FORKGUARD_MUTEX_RECURSIVE ...
#define FORKGUARD_MUTEX_ERRORCHECK ...
#define FORKGUARD_MUTEX_ADAPTIVE ...
#define FG_FEATURE_MUTEX_TYPE ...
#define FG_FEATURE_SEM ...
#define FG_FEATURE_TIMEDLOCK ...
#define FG_FEATURE_OWNER ...
#define FG_NAME_MAX ...
#define FG_MAX_ENTRIES ...
#define FG_SEM_VALUE_MAX ...
#define FG_ALIGNOF_MUTEX ...
#define FG_ALIGNOF_RWLOCK ...
#define FG_ALIGNOF_SEM ...

typedef ... pthread_mutex_t;
typedef ... pthread_rwlock_t;
typedef ... sem_t;
typedef void (*forkguard_hook)(void *arg);
typedef ... forkguard_api;

typedef struct {
    int kind;
    int policy;
    int mutex_type;
    unsigned int sem_value;
    double timeout;
    uint64_t hold_timeouts;
    uintptr_t address;
    int by_python;
    char name[];
    ...;
} fg_info_t;

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
size_t fg_list(uint64_t *handles, size_t cap);
const forkguard_api *fg_api(void);
const char *fg_capsule_name(void);
int64_t fgpy_register(int kind, uintptr_t address, int mutex_type, unsigned int value,
                      int policy, double timeout, const char *name);
int64_t fgpy_find(uintptr_t address);
int fgpy_reset_plain(uintptr_t plain);
int fgpy_holds_hook(uintptr_t box, uintptr_t report);
int fgpy_watch_install(uintptr_t box, uintptr_t look, uintptr_t state, uintptr_t lock_types,
                       long owner_at, int every);
static const double FORKGUARD_DEFAULT_TIMEOUT;
static const double FORKGUARD_TIMEOUT_MAX;
int fg_features(void);
int fg_handlers_installed(void);
int fg_mutex_type(const pthread_mutex_t *mutex, int *mutex_type);
int fg_mutex_owner(uint64_t handle, long *owner);
int fg_mutex_fields(size_t *lock_at, size_t *owner_at);
int fg_sem_value(sem_t *sem, unsigned int *value);
int fg_last_fork_timeouts(void);
int fg_take_fork_timeouts(void);
const char *fg_strerror(int code);
"""

PREAMBLE = """
#include <limits.h>
#include "forkguard_core.h"
#define FG_SEM_VALUE_MAX SEM_VALUE_MAX
#define FG_ALIGNOF_MUTEX _Alignof(pthread_mutex_t)
#define FG_ALIGNOF_RWLOCK _Alignof(pthread_rwlock_t)
#define FG_ALIGNOF_SEM _Alignof(sem_t)
static const char *fg_capsule_name(void) { return FORKGUARD_CAPSULE_NAME; }
#include "forkguard_plain.c" /* the child's reset of plain Python locks */
#include "forkguard_holds.c" /* the C_HOLDS fork phase */
#include "forkguard_watch.c" /* watch()'s look before each fork */

"""


SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _flags() -> tuple[list[str], list[str], list[tuple[str, str | None]]]:
    compile_args = ["-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"]
    link_args: list[str] = []
    if sys.platform.startswith("linux"):
        # Bind every symbol at load: a function first called in a forked child (the
        # child handler's) would otherwise be resolved there, in every child, writing
        # the GOT page (a copy-on-write fault) after a symbol lookup.
        link_args.append("-Wl,-z,now")
        # And call them through the GOT, already filled: a call through a PLT stub
        # (errno's, in the child handler) would fault the stubs' page into every child.
        compile_args.append("-fno-plt")
    macros: list[tuple[str, str | None]] = []
    if os.environ.get("FORKGUARD_PORTABLE") == "1":
        macros.append(("FG_PORTABLE", "1"))
    if os.environ.get("FORKGUARD_SANITIZE") == "1":
        compile_args += [*SANITIZE, "-g", "-O1"]
        link_args += SANITIZE
    return compile_args, link_args, macros


_INCLUDED = ("forkguard_core.h", "forkguard_plain.c", "forkguard_holds.c", "forkguard_watch.c")

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_args, _link_args, _macros = _flags()
ffibuilder.set_source(
    "forkguard._native",
    # The switches are written into the generated C file: when they change, so does
    # the file, and setuptools recompiles instead of reusing an older build/.
    f"/* flags: {' '.join(_args + _link_args)} {_macros} */\n{PREAMBLE}",
    sources=[os.path.relpath(HERE / "forkguard_core.c")],
    depends=[os.path.relpath(HERE / name) for name in _INCLUDED]
    + [os.path.relpath(INCLUDE / "forkguard.h")],
    include_dirs=[os.path.relpath(HERE), os.path.relpath(INCLUDE)],
    extra_compile_args=_args,
    extra_link_args=_link_args,
    define_macros=_macros,
    libraries=["pthread"] if sys.platform.startswith("linux") else [],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
