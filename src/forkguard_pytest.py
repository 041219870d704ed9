"""forkguard's pytest plugin (entry point ``pytest11: forkguard``): the ``fork_stress``
fixture and the ``--fork-storm-forks`` option.

A module of its own, outside the ``forkguard`` package, and forkguard is imported only
when a test asks for the fixture: installing forkguard adds no import and no fork
hook to a pytest run that does not use it.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from forkguard import testing


def _forks(text: str) -> int:
    number = int(text)
    if number < 0:
        raise ValueError(f"--fork-storm-forks must be >= 0, not {number}")
    return number


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("forkguard").addoption(
        "--fork-storm-forks",
        type=_forks,
        default=None,
        metavar="N",
        help="forks per storm made through the fork_stress fixture, where the test "
        "does not pass forks= (default: 500)",
    )


@pytest.fixture
def fork_stress(request: pytest.FixtureRequest) -> Callable[..., testing.StressReport]:
    """forkguard.testing.fork_stress, with ``forks`` defaulting to ``--fork-storm-forks``."""
    if not hasattr(os, "fork"):
        pytest.skip("fork_stress needs os.fork()")
    from forkguard import testing

    forks: Any = request.config.getoption("fork_storm_forks")
    if forks is None:
        return testing.fork_stress
    return functools.partial(testing.fork_stress, forks=forks)
