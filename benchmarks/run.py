"""Run forkguard's benchmarks and write results, tables and plots.

    python benchmarks/run.py            # full run (about 20 minutes on 2 cores)
    python benchmarks/run.py --quick    # the same benchmarks, fewer samples (< 3 minutes)

Needs ``pip install ".[bench]"``.  Writes pyperf JSON for each suite, results.md
(tables, ratios, targets) and PNG plots to benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from common import NATIVE_ENV, RECORDS_ENV, RECORDS_FILE, build_native  # noqa: E402

SUITES = {
    "fork": "bench_fork.py",
    "register": "bench_register.py",
    "start": "bench_start.py",
    "protect": "bench_protect.py",
    "forward": "bench_forward.py",
    "fastpath": "bench_fastpath.py",  # not a pyperf Runner: interleaves its own processes
}
# pyperf settings per mode: worker processes per benchmark and values per process.
MODES = {
    "quick": ["--processes", "1", "--values", "3", "--warmups", "1", "--min-time", "0.05"],
    "full": ["--processes", "8", "--values", "5", "--warmups", "1"],
}
# bench_fastpath.py's own settings: interleaved rounds of forks, import samples.
FASTPATH_MODES = {
    "quick": ["--rounds", "4", "--batch", "5", "--processes", "2", "--import-samples", "4"],
    "full": ["--rounds", "60", "--batch", "10", "--processes", "8", "--import-samples", "40"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, < 3 minutes")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument(
        "--suite", action="append", choices=sorted(SUITES), help="run only these suites"
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as build:
        records = args.out / RECORDS_FILE
        env = dict(os.environ, **{NATIVE_ENV: str(build_native(Path(build)))})
        env[RECORDS_ENV] = str(records)
        for suite in args.suite or list(SUITES):
            output = args.out / f"{suite}.json"
            output.unlink(missing_ok=True)
            if suite == "start":
                records.unlink(missing_ok=True)
            cmd = [sys.executable, str(HERE / SUITES[suite]), "-o", str(output)]
            if suite == "fastpath":
                cmd += FASTPATH_MODES[mode]
            else:
                # pyperf workers get a clean environment
                cmd += ["--quiet", "--inherit-environ", f"{NATIVE_ENV},{RECORDS_ENV}"]
                cmd += MODES[mode]
            print(f"== {suite}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, env=env, check=True)
    written = report.write(args.out, mode=mode)
    print(f"== done in {time.monotonic() - started:.0f} s; wrote:")
    for path in written:
        print(f"   {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
