"""A child forked while another thread imports a module (importlib's module locks).

The module's top-level code waits on a gate, so the importing thread is inside
the import, holding the module's lock, at the fork.  Without forkguard the child's
own import of that module waits for ever; under protect() it runs the module
afresh and gets it whole.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import forkguard
from forkguard import _import_locks

from forking import run_in_child

DEADLINE = 2.0

GATE = """
import threading
inside = threading.Event()
go = threading.Event()
"""
SLOW = """
import fg_gate
fg_gate.inside.set()
fg_gate.go.wait()
VALUE = 42
"""


@pytest.fixture
def importing(tmp_path: Path) -> Iterator[Any]:
    """A thread that is inside `import fg_slow` (its top level waits on a gate)."""
    (tmp_path / "fg_gate.py").write_text(GATE)
    (tmp_path / "fg_slow.py").write_text(SLOW)
    sys.path.insert(0, str(tmp_path))
    gate = importlib.import_module("fg_gate")
    thread = threading.Thread(target=importlib.import_module, args=("fg_slow",), daemon=True)
    thread.start()
    assert gate.inside.wait(5)
    yield gate
    gate.go.set()
    thread.join(5)
    sys.path.remove(str(tmp_path))
    for name in ("fg_gate", "fg_slow"):
        sys.modules.pop(name, None)


def _child_imports(gate: Any) -> bool:
    gate.go.set()  # a fresh run of the module must not wait for the parent's gate
    import fg_slow  # type: ignore[import-not-found]

    assert fg_slow.VALUE == 42
    return True


def test_a_child_importing_what_another_thread_was_importing_hangs(importing: Any) -> None:
    result = run_in_child(lambda: _child_imports(importing), deadline=DEADLINE)
    assert result.status == "hung", result


def test_under_protect_the_child_imports_the_module_afresh(importing: Any) -> None:
    with forkguard.protect():
        result = run_in_child(lambda: _child_imports(importing), deadline=DEADLINE)
    assert result, result


def test_the_module_locks_are_verified_on_this_interpreter() -> None:
    assert _import_locks.unverified() is None


def test_a_module_the_forking_thread_is_importing_stays_its_own(tmp_path: Path) -> None:
    # A module whose top level forks: the child is inside that import itself and
    # must finish it (its lock stays its own).
    (tmp_path / "fg_forks_at_import.py").write_text(
        "from forking import run_in_child\n"
        "import sys\n"
        "RESULT = run_in_child(lambda: 'fg_forks_at_import' in sys.modules, deadline=2.0)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with forkguard.protect():
            module = importlib.import_module("fg_forks_at_import")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fg_forks_at_import", None)
    assert module.RESULT, module.RESULT


def test_verified_in_a_program_that_never_imported_importlib() -> None:
    # "importlib._bootstrap" is listed in sys.modules only once the importlib package
    # is imported; a plain script has only the frozen module, which is the same one.
    import subprocess

    code = (
        "import sys, forkguard\n"
        "assert 'importlib' not in sys.modules, 'this check needs a program without it'\n"
        "from forkguard import _import_locks\n"
        "print(_import_locks.unverified())\n"
        "forkguard.protect()\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "None", "")
