"""Command line: ``python -m forkguard demo``."""

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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from forkguard import _demo

        return _demo.run()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
