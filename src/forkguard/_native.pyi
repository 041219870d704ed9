# Type stub for the cffi-compiled C core (csrc/forkguard_core.c).
from typing import Any

class _Lib:
    FG_OK: int
    FG_EINVAL: int
    FG_ENULL: int
    FG_EALIGN: int
    FG_ENOMEM: int
    FG_EEXIST: int
    FG_ESTALE: int
    FG_ENOTSUP: int
    FG_ESHARED: int
    FG_ETYPE: int
    FG_EBUSY: int
    FG_EATFORK: int
    FG_KIND_MUTEX: int
    FG_KIND_RWLOCK: int
    FG_KIND_SEM: int
    FG_KIND_HOOKS: int
    FG_POLICY_RESET: int
    FG_POLICY_HOLD: int
    FG_MUTEX_DETECT: int
    FG_MUTEX_NORMAL: int
    FG_MUTEX_RECURSIVE: int
    FG_MUTEX_ERRORCHECK: int
    FG_MUTEX_ADAPTIVE: int
    FG_FEATURE_MUTEX_TYPE: int
    FG_FEATURE_SEM: int
    FG_FEATURE_TIMEDLOCK: int
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
    def fg_features(self) -> int: ...
    def fg_mutex_type(self, mutex: Any, mutex_type: Any) -> int: ...
    def fg_prepare_begin(self) -> int: ...
    def fg_parent_end(self) -> None: ...
    def fg_strerror(self, code: int) -> Any: ...
    def fg_sem_value(self, sem: Any, value: Any) -> int: ...

lib: _Lib
ffi: Any
