"""Run every benchmark of bench/ (each also runs on its own), one after the other so that they do not
compete for the cores, then print their result lines as a table. Exits non-zero, naming them, when
any benchmark fails. `gpu.py` needs a GPU and is run on its own.

    python -m bench [--smoke] [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_HERE = {"gpu"}


def benchmarks() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem not in NOT_HERE)


@dataclass
class Outcome:
    name: str
    seconds: float
    line: str | None  # the benchmark's `<name>: <ratio> (...)` line, None when it failed
    error: str = ""


def run(name: str, smoke: bool, out: Path | None) -> Outcome:
    command = [sys.executable, str(HERE / f"{name}.py")] + (["--smoke"] if smoke else [])
    command += ["--out", str(out)] if out else []
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **os.environ}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"{name}: ")]
    if done.returncode or not lines:
        return Outcome(name, seconds, None, f"exit code {done.returncode}\n{done.stderr[-3000:]}")
    return Outcome(name, seconds, lines[-1])


def table(outcomes: list[Outcome]) -> str:
    rows = ["| benchmark | result | seconds |", "|---|---|---:|"]
    for o in outcomes:
        result = o.line.split(": ", 1)[1].rsplit(" -> ", 1)[0] if o.line else "FAILED"
        rows.append(f"| {o.name} | {result} | {o.seconds:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    available = benchmarks()
    cli = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument("--smoke", action="store_true", help="every benchmark at its smoke size (what CI runs)")
    cli.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    cli.add_argument(
        "--only",
        nargs="+",
        choices=available,
        default=available,
        metavar="NAME",
        help=f"run only these ({', '.join(available)})",
    )
    args = cli.parse_args(argv)
    outcomes = []
    for name in args.only:
        print(f"bench: running {name}{' --smoke' if args.smoke else ''}", file=sys.stderr, flush=True)
        outcome = run(name, args.smoke, args.out)
        outcomes.append(outcome)
        print(outcome.line or f"{name}: FAILED ({outcome.error.splitlines()[0]})", flush=True)
        if outcome.error:
            print(outcome.error, file=sys.stderr, flush=True)
    print("\n" + table(outcomes))
    failed = [o.name for o in outcomes if o.line is None]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
