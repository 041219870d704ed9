"""Command line: ``python -m forkguard demo``, ``run`` and ``doctor``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forkguard", description="forkguard: fork safety for locks."
    )
    parser.add_argument("--version", action="version", version=_version())
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
    doctor = commands.add_parser(
        "doctor",
        help="run a program, report each forked child that hangs on a lock, and why",
        usage="python -m forkguard doctor [--timeout S] [--json FILE] (script.py | -m module) "
        "[args ...]",
        description="Run a program with forkguard.watch() on and an audit() at every fork. "
        "A child stuck for --timeout seconds on a lock held at its fork reports the lock, "
        "the parent's thread that held it and the fix, and is ended (exit status 86).  A "
        "summary follows at the end; the exit status is 1 if a child hung, else the "
        "program's.",
    )
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds a child may be stuck (default 5)"
    )
    doctor.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    doctor.add_argument("-m", dest="module", help="run a library module as a script")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["run"], ["doctor"]):
        # The program's own options must reach it untouched, so only the part before
        # the script (or -m module) is parsed here.
        head, program = _split_run(argv[1:], takes_value={"--timeout", "--json"})
        args = parser.parse_args([argv[0], *head])
        if args.command == "doctor":
            from forkguard import _doctor

            return _doctor.run(
                args.module, program, timeout=args.timeout, json_file=args.json, parser=doctor
            )
        from forkguard import _run

        return _run.run(args.module, program, parser=run)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from forkguard import _demo

        return _demo.run()
    return 2  # pragma: no cover - argparse rejects unknown commands


def _version() -> str:
    import platform

    from forkguard import __version__

    where = f"{platform.python_implementation()} {platform.python_version()}"
    return f"forkguard {__version__} ({where}, {_core()})"


def _core() -> str:
    """Which C core this install has: compiled, or none (Windows, a pure-Python install)."""
    import importlib.util

    return "C core built" if importlib.util.find_spec("forkguard._native") else "no C core"


def _split_run(argv: list[str], takes_value: set[str]) -> tuple[list[str], list[str]]:
    """(forkguard's options with -m module, the program's arguments)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if not arg.startswith("-"):
            return argv[:i], argv[i:]
        i += 2 if arg in takes_value else 1
    return argv, []


if __name__ == "__main__":
    sys.exit(main())
