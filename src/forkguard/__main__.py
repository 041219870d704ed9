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
    )
    run.add_argument(
        "--protect",
        action="store_true",
        help="call forkguard.protect() before the program starts (the default, and so far "
        "the only mode)",
    )
    run.add_argument("-m", dest="module", help="run a module as a script, like python -m")
    run.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args ...]")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from forkguard import _demo

        return _demo.run()
    if args.command == "run":
        from forkguard import _run

        return _run.run(args.module, args.target, parser=run)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
