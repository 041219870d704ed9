"""Fork hangs reported against real PyPI libraries, as whole programs
(tests/third_party_scenarios.py): loguru 0.4 (Delgan/loguru#231) and prometheus_client
in multiprocess mode (prometheus/client_python#431).

Both libraries are test extras, pinned to releases that still hang.  Each scenario runs
in its own interpreter, every child under a 2 s alarm; what must arrive is counted:
each child's "done" mark, exactly once, written only after its library call went
through.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest

from scenario_script import run_script

SCRIPT = str(Path(__file__).with_name("third_party_scenarios.py"))
FORKS = 30

# library -> (distribution, the first release that no longer hangs, or None)
LIBRARIES = {
    # loguru 0.5.0 takes every handler lock around fork() (os.register_at_fork).
    "loguru": ("loguru", (0, 5)),
    "prometheus": ("prometheus_client", None),
}


def require(library: str) -> None:
    """Fail with a clear message, not a skip: the libraries are test extras."""
    dist, fixed_in = LIBRARIES[library]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{dist} is a test extra: pip install '.[test]'", pytrace=False)
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if fixed_in is not None and release >= fixed_in:
        pytest.fail(f"{dist} {version} no longer hangs: pip install '.[test]'", pytrace=False)


def run(library: str, mode: str) -> dict[str, Any]:
    summary, _, done = run_script(SCRIPT, library, "--mode", mode, "--forks", str(FORKS))
    summary["done"] = re.findall(r"done (\d+)\n", done)
    return summary


def run_until_hang(library: str, attempts: int = 8) -> list[dict[str, Any]]:
    """Unprotected runs until one has a hung child (likely in a run, not certain)."""
    results: list[dict[str, Any]] = []
    while len(results) < attempts:
        results.append(run(library, "bare"))
        if results[-1]["hung"]:
            break
    return results


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_library_hangs_children_without_forkguard(library: str) -> None:
    require(library)
    results = run_until_hang(library)
    assert any(r["hung"] for r in results), results
    # A hung child never got its call through, so never reported.
    assert all(len(r["done"]) == FORKS - r["hung"] - r["failed"] for r in results), results


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_library_with_protect_never_hangs_and_every_child_gets_through(library: str) -> None:
    require(library)
    result = run(library, "protect")
    assert (result["hung"], result["failed"]) == (0, 0), result
    assert sorted(map(int, result["done"])) == list(range(FORKS)), result
