"""The two buffered-I/O hangs of real programs, as whole programs (tests/io_scenarios.py).

Each runs in its own interpreter with stdout on a pipe (block-buffered, as under a
process manager) and every child under a 2 s alarm; what must arrive is counted:
every child's line exactly once, and no line of the parent's twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from scenario_script import run_script

SCRIPT = str(Path(__file__).with_name("io_scenarios.py"))
FORKS = 30


def run(scenario: str, mode: str) -> dict[str, Any]:
    summary, out, done = run_script(SCRIPT, scenario, "--mode", mode, "--forks", str(FORKS))
    # Lines from several processes share one pipe, so a child's line can land inside
    # a thread's line: match the pieces, not whole lines.
    summary["children"] = re.findall(r"child (\d+)\n", out)
    # The parent's own lines (its thread's, or its main thread's): each must appear once.
    parent_lines = re.findall(r"((?:thread|parent) \d+)\n", out)
    summary["parent_repeats"] = len(parent_lines) - len(set(parent_lines))
    summary["done"] = re.findall(r"done (\d+)\n", done)
    return summary


def run_until_hang(scenario: str, mode: str, attempts: int = 8) -> list[dict[str, Any]]:
    """Unprotected runs until one has a hung child (likely in a run, not certain)."""
    results: list[dict[str, Any]] = []
    while len(results) < attempts and not any(r["hung"] for r in results):
        results.append(run(scenario, mode))
    return results


def _all_once(found: list[str]) -> bool:
    return sorted(map(int, found)) == list(range(FORKS))


def test_print_hangs_children_without_forkguard() -> None:
    results = run_until_hang("print", "bare")
    assert any(r["hung"] for r in results), results


@pytest.mark.parametrize("mode", ["register", "protect"])
def test_print_with_stdout_registered_never_hangs_and_writes_each_line_once(mode: str) -> None:
    result = run("print", mode)
    assert (result["hung"], result["failed"]) == (0, 0), result
    assert _all_once(result["children"]), result
    assert result["parent_repeats"] == 0, result


# The other half of the print scenario, apart: a child that does not hang writes the
# parent's buffered lines again.  Without a thread every fork finds lines buffered (a
# printing thread under load makes nearly every child hang instead, before it writes).
def test_children_write_the_parent_s_buffered_lines_again_without_forkguard() -> None:
    result = run("buffered", "bare")
    assert (result["hung"], result["failed"]) == (0, 0), result
    assert _all_once(result["children"]), result
    assert result["parent_repeats"] > 0, result


@pytest.mark.parametrize("mode", ["register", "protect"])
def test_children_never_write_the_parent_s_buffered_lines_with_stdout_registered(
    mode: str,
) -> None:
    result = run("buffered", mode)
    assert (result["hung"], result["failed"]) == (0, 0), result
    assert _all_once(result["children"]), result
    assert result["parent_repeats"] == 0, result


def test_shutdown_hangs_children_without_forkguard() -> None:
    results = run_until_hang("shutdown", "bare")
    assert any(r["hung"] for r in results), results


def test_shutdown_hangs_with_only_the_queue_registered() -> None:
    results = run_until_hang("shutdown", "queue")
    assert any(r["hung"] for r in results), results


@pytest.mark.parametrize("mode", ["register", "protect"])
def test_shutdown_with_queue_and_stream_registered_never_hangs(mode: str) -> None:
    result = run("shutdown", mode)
    assert (result["hung"], result["failed"]) == (0, 0), result
    assert _all_once(result["done"]), result
