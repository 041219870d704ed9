# Type stub for the cffi-compiled C core (csrc/forkguard_core.c).
from typing import Any

class _Lib:
    FORKGUARD_OK: int
    FORKGUARD_EINVAL: int
    FORKGUARD_ENULL: int
    FORKGUARD_EALIGN: int
    FORKGUARD_ENOMEM: int
    FORKGUARD_EEXIST: int
    FORKGUARD_ESTALE: int
    FORKGUARD_ENOTSUP: int
    FORKGUARD_ESHARED: int
    FORKGUARD_ETYPE: int
    FORKGUARD_EBUSY: int
    FORKGUARD_EATFORK: int
    FORKGUARD_ENOAPI: int
    FORKGUARD_EABI: int
    FORKGUARD_ABI_VERSION: int
    FORKGUARD_DEFAULT_TIMEOUT: float
    FORKGUARD_TIMEOUT_MAX: float
    FG_KIND_MUTEX: int
    FG_KIND_RWLOCK: int
    FG_KIND_SEM: int
    FG_KIND_HOOKS: int
    FORKGUARD_POLICY_RESET: int
    FORKGUARD_POLICY_HOLD: int
    FORKGUARD_MUTEX_DETECT: int
    FORKGUARD_MUTEX_NORMAL: int
    FORKGUARD_MUTEX_RECURSIVE: int
    FORKGUARD_MUTEX_ERRORCHECK: int
    FORKGUARD_MUTEX_ADAPTIVE: int
    FG_FEATURE_MUTEX_TYPE: int
    FG_FEATURE_SEM: int
    FG_FEATURE_TIMEDLOCK: int
    FG_FEATURE_OWNER: int
    FG_NAME_MAX: int
    FG_MAX_ENTRIES: int
    FG_SEM_VALUE_MAX: int
    FG_ALIGNOF_MUTEX: int
    FG_ALIGNOF_RWLOCK: int
    FG_ALIGNOF_SEM: int
    def fg_init(self) -> int: ...
    def fg_register_mutex(
        self, mutex: Any, mutex_type: int, policy: int, timeout: float, name: bytes, handle: Any
    ) -> int: ...
    def fg_register_rwlock(
        self, rwlock: Any, policy: int, timeout: float, name: bytes, handle: Any
    ) -> int: ...
    def fg_register_sem(
        self, sem: Any, value: int, policy: int, timeout: float, name: bytes, handle: Any
    ) -> int: ...
    def fg_register_hooks(
        self, prepare: Any, parent: Any, child: Any, arg: Any, name: bytes, handle: Any
    ) -> int: ...
    def fg_unregister(self, handle: int) -> int: ...
    def fg_is_active(self, handle: int) -> int: ...
    def fg_info(self, handle: int, info: Any) -> int: ...
    def fg_count(self) -> int: ...
    def fg_list(self, handles: Any, cap: int) -> int: ...
    def fg_api(self) -> Any: ...
    def fg_capsule_name(self) -> Any: ...
    def fgpy_register(
        self,
        kind: int,
        address: int,
        mutex_type: int,
        value: int,
        policy: int,
        timeout: float,
        name: bytes | None,
    ) -> int: ...
    def fgpy_find(self, address: int) -> int: ...
    def fgpy_reset_plain(self, plain: int) -> int: ...
    def fgpy_holds_hook(self, box: int, report: int) -> int: ...
    def fgpy_watch_install(
        self, box: int, look: int, state: int, lock_types: int, owner_at: int, every: int
    ) -> int: ...
    def fg_features(self) -> int: ...
    def fg_handlers_installed(self) -> int: ...
    def fg_mutex_type(self, mutex: Any, mutex_type: Any) -> int: ...
    def fg_mutex_owner(self, handle: int, owner: Any) -> int: ...
    def fg_mutex_fields(self, lock_at: Any, owner_at: Any) -> int: ...
    def fg_last_fork_timeouts(self) -> int: ...
    def fg_take_fork_timeouts(self) -> int: ...
    def fg_strerror(self, code: int) -> Any: ...
    def fg_sem_value(self, sem: Any, value: Any) -> int: ...

lib: _Lib
ffi: Any
