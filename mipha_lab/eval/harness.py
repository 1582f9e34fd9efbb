"""lmms-eval's tasks on a model (an experiment's `eval.harness`, `eval run --lmms-eval-tasks`).

lmms-eval runs as its own process (`python -m lmms_eval --model mipha_lab`, the plugin in
lmms_eval_model.py), so its heavy imports and global state stay out of ours. Its output stays as it
wrote it under `<eval>/lmms-eval/`; each task's headline - the first metric lmms-eval reports for it - is
kept in `lmms-eval/headlines.json` and shown beside our benchmarks, marked `(lmms-eval)`: its scoring
rules are not the official tools'. A task that is one of the paper's benchmarks is scored again from its
per-sample log by our official scorer (lmms_eval_log.py, kept in `lmms-eval/official.json`) and shown
beside, marked `(lmms-eval answers, official scorer)` (README, "Which harness for which number").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mipha_lab.errors import MiphaLabError

HEADLINES = Path("lmms-eval") / "headlines.json"
OFFICIAL = Path("lmms-eval") / "official.json"
MARK = " (lmms-eval)"
OFFICIAL_MARK = " (lmms-eval answers, official scorer)"


def _headline(results: dict[str, Any]) -> tuple[str, float] | None:
    """The first numeric metric of a task's results (`metric,filter` keys; stderr and alias left out)."""
    for key, value in results.items():
        if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        return key.split(",")[0], float(value)
    return None


def run_harness(
    model: Path,
    tasks: list[str],
    eval_folder: Path,
    *,
    batch_size: int = 16,
    include_path: str | None = None,
    limit: int | None = None,
) -> Path:
    """Run the tasks, keep their headlines in `<eval_folder>/lmms-eval/headlines.json`; returns lmms-eval's
    results file (its sample logs lie beside it)."""
    out = eval_folder / "lmms-eval"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lmms_eval", "--model", "mipha_lab"]
    command += ["--model_args", f"pretrained={model},batch_size={batch_size}", "--tasks", ",".join(tasks)]
    command += ["--log_samples", "--output_path", str(out)]
    command += ["--include_path", include_path] if include_path else []
    command += ["--limit", str(limit)] if limit else []
    before = set(out.rglob("*_results.json"))
    done = subprocess.run(command, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    written = sorted(set(out.rglob("*_results.json")) - before, key=lambda p: p.stat().st_mtime)
    if done.returncode != 0 or not written:
        raise MiphaLabError(f"lmms-eval failed on {', '.join(tasks)} (exit status {done.returncode}; its log is above)")
    results = json.loads(written[-1].read_text())["results"]
    headlines = {}
    for task, figures in results.items():
        found = _headline(figures)
        if found is not None:
            headlines[task] = {"metric": found[0], "value": found[1], "results": str(written[-1])}
    kept = {**read_if_present(eval_folder / HEADLINES), **headlines}
    (eval_folder / HEADLINES).write_text(json.dumps(kept, indent=2) + "\n")
    return written[-1]


def harness_headlines(eval_folder: Path) -> dict[str, tuple[str, float]]:
    """{`task (lmms-eval)`: (metric, value)}, then {`task (lmms-eval answers, official scorer)`: ...} for the
    tasks our scorers read again (each beside its task), from a run's eval folder; {} without lmms-eval results."""
    marked = ((HEADLINES, MARK), (OFFICIAL, OFFICIAL_MARK))
    tables = [(read_if_present(Path(eval_folder) / file), mark) for file, mark in marked]
    tasks = dict.fromkeys(task for rows, _ in tables for task in rows)
    return {
        task + mark: (rows[task]["metric"], rows[task]["value"])
        for task in tasks
        for rows, mark in tables
        if task in rows
    }


def read_if_present(path: Path) -> dict[str, Any]:
    """A kept JSON table (headlines.json, official.json), {} before the first run wrote it."""
    return json.loads(path.read_text()) if path.is_file() else {}
