from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import forkguard

sys.path.insert(0, str(Path(__file__).parent))  # tests/forking.py, tests/native.py

import native

LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="session")
def ext(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The test-time C extension (see tests/native.py)."""
    return native.build(tmp_path_factory.mktemp("native"))


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    """Every test starts and ends with an empty registry."""
    for reg in forkguard.registrations():
        reg.unregister()
    yield
    leftover = forkguard.registrations()
    for reg in leftover:
        reg.unregister()
    assert not leftover, f"test left registrations behind: {leftover}"
