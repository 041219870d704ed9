"""``python -m forkguard run``: a program run as ``python`` would, protected from its first line."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Callable


def run(
    module: str | None,
    target: list[str],
    *,
    parser: argparse.ArgumentParser,
    setup: Callable[[], object] | None = None,
) -> int:
    """Run `module` (-m) or the script `target[0]` with the rest as its arguments, as
    python would, after ``setup()`` (by default ``forkguard.protect()``)."""
    if module is None and not target:
        parser.error("give a script to run, or -m module")
    if module is not None:
        sys.argv = [module, *target]
    else:
        script, *rest = target
        if not os.path.exists(script):
            parser.error(f"can't open file {script!r}: no such file")
        sys.argv = [script, *rest]
        # As python script.py does: the script's folder comes first on sys.path.
        sys.path[0] = os.path.dirname(os.path.abspath(script))

    if setup is None:
        import forkguard

        setup = forkguard.protect
    setup()
    try:
        if module is not None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0
