"""Run folders -> the study's tables: which axis each run belongs to, seeds grouped, paired bootstrap
intervals over questions and seeds, an aggregate across benchmarks, and the paper's claims judged.

A run's axis comes from its config: the parent of its experiment file (the previous entry of its
`extends` chain) is the axis baseline, and the keys in which the run's resolved config differs from
the baseline run's are what the axis changes. The axis is named by the folder of the cell's file
(`mipha_overhaul/backbone/...` -> `backbone`), else by those keys. Runs whose configs differ only in
the seed form one cell. Notebooks in analysis/ call these functions and stay thin.
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
from mipha_lab.eval.benchmarks import headline_scores

NOT_COMPARED = ("seed", "run_name", "runs_root", "data_root", "source", "extends_chain", "tracking", "resources",
                "sweep", "eval", "data_workers", "checkpoint")
PAPER_ORDER = ("vqav2", "gqa", "scienceqa-img", "textvqa", "pope", "mme", "mmbench", "shapes-vqa", "shapes-pope")
FULL_SCALE = {"mme": 2000.0}  # headline / this = a 0-100 figure (MME perception sums 10 subtasks of 200)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    scores: dict[str, float]  # benchmark -> headline figure
    records: dict[str, list[dict[str, Any]]]  # benchmark -> one row per question

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
    baseline: "Cell | None" = None

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
        records[file.parent.name] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    metrics_file = path / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    return Run(path, yaml.safe_load((path / "config.yaml").read_text()), metrics, headline_scores(path / "eval"), records)


def load_runs(root: str | Path) -> list[Run]:
    """Every run folder under `root` (any depth) that holds a resolved config."""
    folders = sorted(p.parent for p in Path(root).rglob("config.yaml")
                     if ".jobs" not in p.parts and "checkpoints" not in p.parts and (p.parent / "manifest.json").is_file())
    return [load_run(folder) for folder in folders]


def group_cells(runs: list[Run]) -> list[Cell]:
    """Runs of one experiment file whose configs differ only in the seed form one cell."""
    cells: list[Cell] = []
    for run in runs:
        home = next((c for c in cells if c.runs[0].source == run.source
                     and not config_differences(c.runs[0].config, run.config, NOT_COMPARED)), None)
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
        cell.axis = folder.name if folder != Path(parent).parent else "+".join(cell.changed) or "none"
    return cells


def study(root: str | Path) -> list[Cell]:
    return assign_axes(group_cells(load_runs(root)))


def notebook_setup() -> tuple[list[Cell], Path, int]:
    """What every notebook starts from: the cells under $RUNS_ROOT (default runs), the output folder
    $OUT (default analysis/output, created) and $DRAWS bootstrap draws (default 1000)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    root = Path(os.environ.get("RUNS_ROOT", "runs"))
    out = Path(os.environ.get("OUT", "analysis/output"))
    out.mkdir(parents=True, exist_ok=True)
    cells = study(root)
    print(f"{sum(len(c.runs) for c in cells)} runs in {len(cells)} cells under {root}")
    return cells, out, int(os.environ.get("DRAWS", "1000"))


def axes(cells: list[Cell]) -> dict[str, list[Cell]]:
    """Axis -> [its baseline, then its cells]."""
    table: dict[str, list[Cell]] = {}
    for cell in sorted((c for c in cells if c.baseline is not None), key=lambda c: (c.axis, c.name)):
        table.setdefault(cell.axis, [cell.baseline]).append(cell)
    return table


# --- the paired bootstrap -----------------------------------------------------------------------------

def _question_table(runs: list[Run], benchmark: str, ids: list[Any]) -> dict[str, np.ndarray]:
    """Per run (rows) and question (columns): correct, and for POPE the prediction, label and split."""
    rows = [{r["question_id"]: r for r in run.records[benchmark]} for run in runs]
    table = {"correct": np.array([[bool(row[q]["correct"]) for q in ids] for row in rows], dtype=float)}
    if all("label" in rows[0][q] for q in ids):  # POPE: F1 of "yes" per split, then the mean
        table["yes"] = np.array([[row[q]["prediction"] == "yes" for q in ids] for row in rows], dtype=float)
        table["gold"] = np.array([rows[0][q]["label"] == "yes" for q in ids], dtype=float)
        splits = sorted({rows[0][q]["split"] for q in ids})
        table["split"] = np.array([splits.index(rows[0][q]["split"]) for q in ids])
    return table


def _statistic(table: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The benchmark's figure (0-100) of every run on every resample: shape (runs, draws)."""
    if "yes" not in table:
        return 100 * table["correct"][:, idx].mean(-1)
    yes, gold, split = table["yes"][:, idx], table["gold"][idx], table["split"][idx]
    f1s = []
    for s in np.unique(table["split"]):
        mask = split == s
        tp = (yes * gold * mask).sum(-1)
        predicted, positive = (yes * mask).sum(-1), (gold * mask).sum(-1)
        f1s.append(np.where(predicted + positive > 0, 2 * tp / np.maximum(predicted + positive, 1), 0.0))
    return 100 * np.mean(f1s, axis=0)


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    draws: np.ndarray = field(repr=False)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(cell: Cell, baseline: Cell, benchmark: str, draws: int = 1000, seed: int = 0) -> Interval | None:
    """Delta (cell - baseline) of the benchmark's figure, with a 95% interval from resampling the same
    questions for both (paired) and each cell's seeds. None when a side has no per-question records."""
    runs_c = [r for r in cell.runs if benchmark in r.records]
    runs_b = [r for r in baseline.runs if benchmark in r.records]
    if not runs_c or not runs_b:
        return None
    ids = sorted(set.intersection(*(set(x["question_id"] for x in r.records[benchmark]) for r in runs_c + runs_b)),
                 key=str)
    rng = np.random.default_rng(seed)
    table_c, table_b = _question_table(runs_c, benchmark, ids), _question_table(runs_b, benchmark, ids)
    questions = rng.integers(0, len(ids), size=(draws, len(ids)))  # the same questions for both sides
    chunks = np.array_split(questions, max(1, draws * len(ids) // 2_000_000))  # bounded memory on big benchmarks
    stat_c = np.concatenate([_statistic(table_c, q) for q in chunks], axis=1)  # (runs, draws)
    stat_b = np.concatenate([_statistic(table_b, q) for q in chunks], axis=1)
    pick_c = rng.integers(0, len(runs_c), size=(draws, len(runs_c)))  # and the seeds of each side
    pick_b = rng.integers(0, len(runs_b), size=(draws, len(runs_b)))
    delta = np.take_along_axis(stat_c.T, pick_c, 1).mean(1) - np.take_along_axis(stat_b.T, pick_b, 1).mean(1)
    everything = np.arange(len(ids))
    point = float(_statistic(table_c, everything).mean() - _statistic(table_b, everything).mean())
    return Interval(point, float(np.percentile(delta, 2.5)), float(np.percentile(delta, 97.5)), delta)


# --- tables and the aggregate ------------------------------------------------------------------------

def benchmarks_of(cells: list[Cell]) -> list[str]:
    found = {b for c in cells for r in c.runs for b in r.scores}
    return [b for b in PAPER_ORDER if b in found] + sorted(found - set(PAPER_ORDER))


def axis_table(cells: list[Cell], draws: int = 1000) -> list[dict[str, Any]]:
    """One row per cell of an axis (the baseline first): mean score per benchmark, the delta against the
    baseline with its bootstrap interval, and the aggregate (mean z-score across benchmarks)."""
    baseline, names = cells[0], benchmarks_of(cells)
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"cell": cell.name, "seeds": cell.seeds, "baseline": cell is baseline}
        for benchmark in names:
            interval = None if cell is baseline else paired_bootstrap(cell, baseline, benchmark, draws)
            row[benchmark] = {"mean": cell.score(benchmark), "delta": interval}
        rows.append(row)
    for benchmark in names:
        values = np.array([r[benchmark]["mean"] for r in rows if r[benchmark]["mean"] is not None])
        spread = values.std() if len(values) > 1 and values.std() > 0 else 1.0
        for r in rows:
            if r[benchmark]["mean"] is not None:
                r[benchmark]["z"] = (r[benchmark]["mean"] - values.mean()) / spread
    for r in rows:
        zs = [r[b]["z"] for b in names if "z" in r[b]]
        r["aggregate_z"] = float(np.mean(zs)) if zs else None
    return rows


def format_axis_table(axis: str, rows: list[dict[str, Any]]) -> str:
    names = [k for k in rows[0] if k not in ("cell", "seeds", "baseline", "aggregate_z")]
    lines = [f"| {axis} | seeds | " + " | ".join(names) + " | mean z |", "|---|---|" + "---:|" * (len(names) + 1)]
    for r in rows:
        cells = []
        for b in names:
            mean, delta = r[b]["mean"], r[b]["delta"]
            text = "-" if mean is None else f"{mean:.2f}"
            if delta is not None:
                text += f" ({delta.mean:+.2f} [{delta.low:+.2f}, {delta.high:+.2f}])"
            cells.append(text)
        label = f"**{r['cell']}** (baseline)" if r["baseline"] else r["cell"]
        z = "-" if r["aggregate_z"] is None else f"{r['aggregate_z']:+.2f}"
        lines.append(f"| {label} | {len(r['seeds'])} | " + " | ".join(cells) + f" | {z} |")
    return "\n".join(lines)


def aggregate_delta(cell: Cell, baseline: Cell, draws: int = 1000) -> Interval | None:
    """The mean over benchmarks of the paired deltas (each on a 0-100 scale): what the claims are judged on."""
    intervals = [(b, paired_bootstrap(cell, baseline, b, draws)) for b in benchmarks_of([cell, baseline])]
    intervals = [(b, i) for b, i in intervals if i is not None]
    if not intervals:
        return None
    scale = [100.0 / FULL_SCALE.get(b, 100.0) for b, _ in intervals]
    draws_all = np.mean([i.draws * s for (_, i), s in zip(intervals, scale)], axis=0)
    mean = float(np.mean([i.mean * s for (_, i), s in zip(intervals, scale)]))
    return Interval(mean, float(np.percentile(draws_all, 2.5)), float(np.percentile(draws_all, 97.5)), draws_all)


# --- the paper's claims ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A conclusion of the paper as a test on an axis, judged on the aggregate delta: 'best' (the
    baseline beats every other cell), 'baseline_better' (the baseline beats cell `a`), 'beats' (cell `a`
    beats cell `b`), 'similar' (cell `a` is within `margin` points of the baseline)."""

    axis: str
    text: str
    kind: str
    a: str | None = None
    b: str | None = None
    margin: float = 1.0


CLAIMS = (
    Claim("backbone", "SigLIP is the best visual backbone", "best"),
    Claim("resolution", "a higher resolution is not always better: 224 px beats 448 px", "beats", "224", "448"),
    Claim("vision_tuning", "fine-tuning the vision encoder (with the LM) is crucial for small models",
          "baseline_better", "frozen"),
    Claim("llm", "Phi-2 is the best language model of those compared", "best"),
    Claim("lm_instruct", "instruction tuning of the LM is not essential", "similar", "phi-2-sft"),
    Claim("finetuning", "LoRA reaches performance similar to full fine-tuning", "similar", "lora-vision-full"),
)


def judge(claim: Claim, cells: list[Cell], draws: int = 1000) -> dict[str, Any]:
    """supported / contradicted / inconclusive from the bootstrap intervals of the aggregate delta."""
    members = axes(cells).get(claim.axis)
    row = {"axis": claim.axis, "claim": claim.text, "verdict": "not run", "evidence": ""}
    if not members:
        return row
    baseline, others = members[0], {c.name: c for c in members[1:]}
    if claim.kind == "beats":
        if claim.a not in others or claim.b not in others:
            return row
        # a beats b: a - b through the baseline, with the same resamples (paired throughout)
        da, db = aggregate_delta(others[claim.a], baseline, draws), aggregate_delta(others[claim.b], baseline, draws)
        if da is None or db is None:
            return row
        diff = da.draws - db.draws
        intervals = {f"{claim.a} - {claim.b}": Interval(da.mean - db.mean, float(np.percentile(diff, 2.5)),
                                                        float(np.percentile(diff, 97.5)), diff)}
        wanted = +1
    else:
        targets = list(others) if claim.kind == "best" else [claim.a]
        if any(t not in others for t in targets):
            return row
        intervals = {f"{t} - {baseline.name}": aggregate_delta(others[t], baseline, draws) for t in targets}
        if any(i is None for i in intervals.values()):
            return row
        wanted = -1  # the baseline should be better: deltas below zero
    row["evidence"] = "; ".join(f"{k}: {i.mean:+.2f} [{i.low:+.2f}, {i.high:+.2f}]" for k, i in intervals.items())
    values = list(intervals.values())
    if claim.kind == "similar":
        if all(-claim.margin <= i.low and i.high <= claim.margin for i in values):
            row["verdict"] = "supported"
        elif any(i.low > claim.margin or i.high < -claim.margin for i in values):
            row["verdict"] = "contradicted"
        else:
            row["verdict"] = "inconclusive"
    elif all((i.high < 0) if wanted < 0 else (i.low > 0) for i in values):
        row["verdict"] = "supported"
    elif any((i.low > 0) if wanted < 0 else (i.high < 0) for i in values):
        row["verdict"] = "contradicted"
    else:
        row["verdict"] = "inconclusive"
    return row


def claims_table(cells: list[Cell], draws: int = 1000) -> list[dict[str, Any]]:
    return [judge(claim, cells, draws) for claim in CLAIMS]


# --- training curves ---------------------------------------------------------------------------------

def run_costs(run: Run) -> dict[str, Any]:
    """Steps, mean tokens/s, mean MFU (GPUs with a known peak) and GPU-hours of a run's training steps."""
    manifest = json.loads((run.path / "manifest.json").read_text())
    seconds = sum(sum(m.get("time", {}).values()) for m in run.metrics)
    gpus = len(manifest.get("hardware", {}).get("gpus") or [])
    mfu = [m["mfu"] for m in run.metrics if m.get("mfu") is not None]
    return {"run": run.name, "steps": len(run.metrics),
            "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in run.metrics])) if run.metrics else math.nan,
            "mfu": float(np.mean(mfu)) if mfu else None,
            "gpu_hours": seconds * manifest.get("world_size", 1) / 3600 if gpus else 0.0,
            "train_seconds": seconds}


def figure_grid(panels: int, columns: int = 4, size: tuple[float, float] = (3.4, 3.0)):
    """A matplotlib figure with `panels` axes wrapped into rows of `columns` (spare axes hidden)."""
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(panels / columns))
    cols = min(columns, max(panels, 1))
    fig, grid = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = [ax for row in grid for ax in row]
    for spare in flat[panels:]:
        spare.set_visible(False)
    return fig, flat[:panels]
