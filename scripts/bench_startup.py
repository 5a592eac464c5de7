"""What hf_int8's start-up hook costs every Python process of an environment where it is installed.

Runs ``python -c pass`` with and without ``hf_int8_autoload.pth`` (the file is parked under another name for the
"without" runs), alternating run by run so that a change of machine load hits both alike, and times the hook's own
import with ``python -X importtime``. ``--self-check-runs N`` also times, in N fresh processes, the self-check the
native CPU kernels run against the reference at the first op of a process. Prints a table; ``--json`` writes the
figures too.

    python scripts/bench_startup.py                      # the interpreter running this script
    python scripts/bench_startup.py --python VENV/bin/python --runs 200

Timings are figures to read, not a pass/fail check: the test suite checks what the hook imports instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PTH_NAME = "hf_int8_autoload.pth"
HOOK_MODULE = "hf_int8_autoload"


def _pth_of(python: str) -> Path:
    """The hook's .pth file in ``python``'s site-packages; a clear error when that environment has none."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    pth = site / PTH_NAME
    if not pth.is_file():
        raise SystemExit(f"no {PTH_NAME} in {site}: hf_int8 is not installed for {python!r}")
    return pth


# pip compiles installed modules to .pyc; a child that may not write bytecode would recompile the hook at every start
# and time the compiler instead (the first run below writes the .pyc where an install has not).
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall_ms(python: str) -> float:
    started = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True, env=CHILD_ENV)
    return (time.perf_counter() - started) * 1e3


def alternating_startup_ms(python: str, pth: Path, runs: int) -> tuple[list[float], list[float]]:
    """Wall time of ``python -c pass`` with and without the .pth, one of each per run (ms)."""
    parked = pth.with_name(pth.name + ".parked")
    with_hook, without = [], []
    try:
        for _ in range(runs):
            with_hook.append(_wall_ms(python))
            pth.rename(parked)
            try:
                without.append(_wall_ms(python))
            finally:
                parked.rename(pth)
    finally:
        if parked.exists():  # interrupted between the two renames
            parked.rename(pth)
    return with_hook, without


def hook_import_us(python: str, runs: int) -> list[float]:
    """Cumulative import time of the hook module per ``-X importtime`` (microseconds), one value per interpreter."""
    values = []
    for _ in range(runs):
        done = subprocess.run(
            [python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True, env=CHILD_ENV
        )
        line = next((ln for ln in done.stderr.splitlines() if ln.rstrip().endswith(HOOK_MODULE)), None)
        if line is None:
            raise SystemExit(f"{python!r} did not import {HOOK_MODULE} at start-up (HF_INT8_NO_AUTOLOAD set?)")
        values.append(float(line.split("|")[1]))
    return values


SELF_CHECK_CODE = """
import time, torch
from hf_int8.ops import OP_NAMES, _health
started = time.perf_counter()
problem = _health.self_check(torch.device("cpu"), set(OP_NAMES))
print((time.perf_counter() - started) * 1e3, problem is None)
"""


def self_check_ms(python: str, runs: int) -> list[float]:
    """The CPU self-check's wall time in each of ``runs`` fresh processes (ms); the check must pass."""
    values = []
    for _ in range(runs):
        done = subprocess.run(
            [python, "-c", SELF_CHECK_CODE], capture_output=True, text=True, check=True, env=CHILD_ENV
        )
        ms, passed = done.stdout.split()
        if passed != "True":
            raise SystemExit(
                f"the CPU self-check failed in {python!r}: the native kernels disagree with the reference"
            )
        values.append(float(ms))
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the environment to measure")
    parser.add_argument("--runs", type=int, default=100, help="alternating pairs of interpreter starts")
    parser.add_argument("--self-check-runs", type=int, default=0, help="fresh processes timing the CPU self-check")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs!r}")
    if args.self_check_runs < 0:
        parser.error(f"--self-check-runs must be >= 0, got {args.self_check_runs!r}")
    pth = _pth_of(args.python)
    _wall_ms(args.python)  # warm-up: page cache, and the hook's .pyc where it was missing
    import_us = hook_import_us(args.python, args.runs)
    with_hook, without = alternating_startup_ms(args.python, pth, args.runs)
    result = {
        "python": args.python,
        "runs": args.runs,
        "hook import median us (-X importtime)": statistics.median(import_us),
        "python -c pass with hook median ms": statistics.median(with_hook),
        "python -c pass without hook median ms": statistics.median(without),
    }
    result["difference of medians ms"] = (
        result["python -c pass with hook median ms"] - result["python -c pass without hook median ms"]
    )
    result["ratio with/without"] = (
        result["python -c pass with hook median ms"] / result["python -c pass without hook median ms"]
    )
    if args.self_check_runs:
        checks = self_check_ms(args.python, args.self_check_runs)
        result["CPU self-check runs"] = args.self_check_runs
        result["CPU self-check median ms"] = statistics.median(checks)
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
