"""Command line: ``python -m forkguard demo`` and ``python -m forkguard run``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forkguard", description="forkguard: fork safety for locks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="run the QueueHandler + fork Pool deadlock without and with forkguard",
    )
    run = commands.add_parser(
        "run",
        help="run a program under forkguard.protect() from its first line",
        usage="python -m forkguard run [--protect] (script.py | -m module) [args ...]",
        description="Run a program as python would, with forkguard.protect() called before "
        "its first line.  --protect is the default (and so far the only mode).  Everything "
        "after the script or module name goes to the program.",
    )
    run.add_argument("--protect", action="store_true", help="call forkguard.protect() first")
    run.add_argument("-m", dest="module", help="run a library module as a script")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # The program's own options must reach it untouched, so only the part before
        # the script (or -m module) is parsed here.
        head, program = _split_run(argv[1:])
        args = parser.parse_args(["run", *head])
        from forkguard import _run

        return _run.run(args.module, program, parser=run)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from forkguard import _demo

        return _demo.run()
    return 2  # pragma: no cover - argparse rejects unknown commands


def _split_run(argv: list[str]) -> tuple[list[str], list[str]]:
    """(forkguard's options with -m module, the program's arguments)."""
    for i, arg in enumerate(argv):
        if arg == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if not arg.startswith("-"):
            return argv[:i], argv[i:]
    return argv, []


if __name__ == "__main__":
    sys.exit(main())
