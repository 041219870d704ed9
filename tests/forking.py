"""Fork under a deadline: forkguard.testing, under the names the tests use."""

from __future__ import annotations

from forkguard.testing import ChildResult, run_in_child
from forkguard.testing import verdict as wait_status

__all__ = ["ChildResult", "run_in_child", "wait_status"]
