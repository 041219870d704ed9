from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
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


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding gilprobe (tests/gilprobe.c), a CPython extension that calls
    forkguard's C API with the GIL held, built against the installed forkguard.h."""
    out = tmp_path_factory.mktemp("gilprobe")
    target = out / f"gilprobe{sysconfig.get_config_var('EXT_SUFFIX')}"
    flags = ["-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Wextra", "-Werror"]
    includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{forkguard.get_include()}"]
    source = str(Path(__file__).parent / "gilprobe.c")
    cc = os.environ.get("CC", "cc")
    cmd = [cc, *flags, *includes, source, "-o", str(target), "-lpthread"]
    subprocess.run(cmd, check=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def gilprobe(probe_dir: Path) -> ModuleType:
    """gilprobe imported here, attached to forkguard's C API."""
    sys.path.insert(0, str(probe_dir))
    import gilprobe as module

    module.attach()
    return module


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
