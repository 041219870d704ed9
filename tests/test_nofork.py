"""Platforms without fork (Windows): registration validates its input and does nothing else.

Exercised here through a private Registry on the no-fork backend; it is what
``forkguard`` builds when ``os.fork`` does not exist.
"""

from __future__ import annotations

import threading

import pytest

from forkguard import _backend, _fork_phases, _registry


def test_nofork_registry_keeps_registrations_and_validates() -> None:
    reg = _registry.Registry(_backend.NoForkBackend())
    lock = threading.Lock()
    r = reg.register(lock, policy="hold")
    assert r.active and reg.registrations() == [r]
    c = reg.register(4096, kind="pthread_mutex")
    assert c.kind == "pthread_mutex_t" and reg.backend.count() == 1
    with pytest.raises(ValueError, match="already registered"):
        reg.register(4096, kind="pthread_mutex", policy="hold")
    with pytest.raises(TypeError, match="cannot register float"):
        reg.register(1.0)
    assert c.unregister() and not c.unregister()
    assert reg.backend.count() == 0
    hooks = reg.at_fork(before=lambda: None)
    assert reg.registrations() == [r, hooks]
    assert r.unregister() and hooks.unregister()
    assert reg.registrations() == []
    assert reg._phases.installed == 0  # no fork hook installed: there is no fork


def test_load_picks_the_nofork_backend_without_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_backend.os, "fork")
    assert isinstance(_backend.load(), _backend.NoForkBackend)
    monkeypatch.delattr(_fork_phases.os, "register_at_fork")
    reg = _registry.Registry(_backend.NoForkBackend())
    reg.register(threading.Lock())
    reg.at_fork(before=lambda: None)
    assert reg._phases.installed == 0  # nothing to hook: no-op
