"""Run folders -> cells and axes: which axis each run belongs to, and its seeds grouped.

A run's axis comes from its config: the parent of its experiment file (the previous entry of its
`extends` chain) is the axis baseline, and the keys in which the run's resolved config differs from
the baseline run's are what the axis changes. The axis is named by the folder of the cell's file
(`mipha_overhaul/backbone/...` -> `backbone`), else by those keys. Runs whose configs differ only in
the seed form one cell.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mipha_lab.config import config_differences
from mipha_lab.eval.benchmarks import PAPER_ORDER, headline_scores
from mipha_lab.eval.scoring.answers import read_jsonl
from mipha_lab.runs.folder import RunFolder

NOT_COMPARED = (
    "seed",
    "run_name",
    "runs_root",
    "data_root",
    "source",
    "extends_chain",
    "tracking",
    "resources",
    "sweep",
    "eval",
    "data_workers",
    "checkpoint",
)


@dataclass
class Run:
    """One run folder as the analysis reads it: its config, metrics, headline scores and per-question records."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    scores: dict[str, float]  # benchmark -> headline figure
    records: dict[str, list[dict[str, Any]]]  # benchmark -> one row per question (eval/<benchmark>/records.jsonl)

    @property
    def name(self) -> str:
        return self.config.get("run_name") or self.path.name

    @property
    def source(self) -> str | None:
        return self.config.get("source")

    @property
    def parent(self) -> str | None:
        chain = self.config.get("extends_chain") or []
        return chain[-2] if len(chain) > 1 else None


@dataclass
class Cell:
    """One configuration of the study, with every seed it was run with."""

    runs: list[Run]
    axis: str = ""
    changed: list[str] = field(default_factory=list)
    baseline: Cell | None = None

    @property
    def name(self) -> str:
        source = self.runs[0].source
        return Path(source).stem if source else self.runs[0].name

    @property
    def seeds(self) -> list[int]:
        return sorted(r.config.get("seed", 0) for r in self.runs)

    def score(self, benchmark: str) -> float | None:
        values = [r.scores[benchmark] for r in self.runs if benchmark in r.scores]
        return float(np.mean(values)) if values else None


def load_run(path: Path) -> Run:
    records = {}
    for file in sorted((path / "eval").glob("*/records.jsonl")):
        records[file.parent.name] = read_jsonl(file)
    return Run(
        path,
        yaml.safe_load((path / "config.yaml").read_text()),
        RunFolder(path).metrics(),
        headline_scores(path / "eval"),
        records,
    )


def load_runs(root: str | Path) -> list[Run]:
    """Every run folder under `root` (any depth) that holds a resolved config."""
    folders = sorted(
        p.parent
        for p in Path(root).rglob("config.yaml")
        if ".jobs" not in p.parts and "checkpoints" not in p.parts and (p.parent / "manifest.json").is_file()
    )
    return [load_run(folder) for folder in folders]


def group_cells(runs: list[Run]) -> list[Cell]:
    """Runs of one experiment file whose configs differ only in the seed form one cell."""
    cells: list[Cell] = []
    for run in runs:
        home = next(
            (
                c
                for c in cells
                if c.runs[0].source == run.source and not config_differences(c.runs[0].config, run.config, NOT_COMPARED)
            ),
            None,
        )
        if home is None:
            cells.append(Cell([run]))
        else:
            home.runs.append(run)
    return cells


def assign_axes(cells: list[Cell]) -> list[Cell]:
    """Each cell's baseline (the cell of its parent file), changed keys and axis name."""
    by_source = {c.runs[0].source: c for c in cells}
    for cell in cells:
        parent = cell.runs[0].parent
        base = by_source.get(parent)
        if base is None or base is cell:
            continue
        cell.baseline = base
        cell.changed = config_differences(base.runs[0].config, cell.runs[0].config, NOT_COMPARED)
        folder = Path(cell.runs[0].source or "").parent
        cell.axis = folder.name if folder != Path(parent or "").parent else "+".join(cell.changed) or "none"
    return cells


def study(root: str | Path) -> list[Cell]:
    return assign_axes(group_cells(load_runs(root)))


def benchmarks_of(cells: list[Cell]) -> list[str]:
    """The benchmarks any run of the cells was scored on, in the paper's column order."""
    found = {b for c in cells for r in c.runs for b in r.scores}
    return [b for b in PAPER_ORDER if b in found] + sorted(found - set(PAPER_ORDER))


def axes(cells: list[Cell]) -> dict[str, list[Cell]]:
    """Axis -> [its baseline, then its cells]."""
    table: dict[str, list[Cell]] = {}
    for cell in sorted(cells, key=lambda c: (c.axis, c.name)):
        if cell.baseline is not None:
            table.setdefault(cell.axis, [cell.baseline]).append(cell)
    return table


def run_costs(run: Run) -> dict[str, Any]:
    """Steps, mean tokens/s, mean MFU (GPUs with a known peak) and GPU-hours of a run's training steps."""
    manifest = json.loads((run.path / "manifest.json").read_text())
    seconds = sum(sum(m.get("time", {}).values()) for m in run.metrics)
    gpus = len(manifest.get("hardware", {}).get("gpus") or [])
    mfu = [m["mfu"] for m in run.metrics if m.get("mfu") is not None]
    return {
        "run": run.name,
        "steps": len(run.metrics),
        "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in run.metrics])) if run.metrics else math.nan,
        "mfu": float(np.mean(mfu)) if mfu else None,
        "gpu_hours": seconds * manifest.get("world_size", 1) / 3600 if gpus else 0.0,
        "train_seconds": seconds,
    }
