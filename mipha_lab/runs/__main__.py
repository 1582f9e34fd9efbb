"""`python -m mipha_lab.runs status RUNS_ROOT [--sweep NAME] [--json]`: one row per run folder (status.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mipha_lab.errors import exit_status
from mipha_lab.runs.status import print_status, run_folders, status_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="one row per run: state, stage, step, loss, time, scores")
    status.add_argument("root", help="the runs folder (runs_root of the experiments)")
    status.add_argument("--sweep", help="only the cells of this sweep (runs_root/<sweep>/)")
    status.add_argument("--json", action="store_true", help="stdout holds only the rows as one JSON list")
    args = parser.parse_args(argv)

    def show() -> int:
        root = Path(args.root)
        paths = run_folders(root, args.sweep)
        if args.json:
            print(json.dumps(status_rows(paths, root)))
        else:
            print_status(paths, root)
        return 0

    return exit_status(show)


if __name__ == "__main__":
    sys.exit(main())
