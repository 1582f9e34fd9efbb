"""The study's tables and the paper's claims judged: per axis, each cell's figures and its deltas against
the baseline with their intervals; per claim, supported / contradicted / inconclusive from the interval
of the mean delta over benchmarks, with the seeds and questions behind it and the smallest effect it
could have detected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mipha_lab.analysis.compare import aggregate_delta, delta
from mipha_lab.analysis.intervals import LEVEL, ONE_SEED, POWER, QUESTION_ONLY, Interval
from mipha_lab.analysis.study import Cell, axes, benchmarks_of


def axis_table(cells: list[Cell], draws: int = 1000, question_only: bool = False) -> list[dict[str, Any]]:
    """One row per cell of an axis (the baseline first): mean figure per benchmark over its seeds, the delta
    against the baseline with its interval, the mean delta over benchmarks (points), and the mean z-score
    across benchmarks."""
    baseline, names = cells[0], benchmarks_of(cells)
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"cell": cell.name, "seeds": cell.seeds, "baseline": cell is baseline}
        for benchmark in names:
            change = None if cell is baseline else delta(cell, baseline, benchmark, draws, question_only)
            row[benchmark] = {"mean": cell.score(benchmark), "delta": change}
        row["aggregate"] = None if cell is baseline else aggregate_delta(cell, baseline, names, draws, question_only)
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
    """Markdown: mean (delta [interval]) per benchmark, the mean delta in points, the mean z; a note says
    how intervals were made."""
    names = [k for k in rows[0] if k not in ("cell", "seeds", "baseline", "aggregate", "aggregate_z")]
    lines = [
        f"| {axis} | seeds | " + " | ".join(names) + " | mean delta (points) | mean z |",
        "|---|---|" + "---:|" * (len(names) + 2),
    ]
    methods = set()
    for r in rows:
        cells = []
        for b in names:
            mean, change = r[b]["mean"], r[b]["delta"]
            cells.append(("-" if mean is None else f"{mean:.2f}") + (f" ({change.text()})" if change else ""))
            methods |= {change.method} if change else set()
        cells.append(r["aggregate"].text() if r["aggregate"] else "-")
        label = f"**{r['cell']}** (baseline)" if r["baseline"] else r["cell"]
        z = "-" if r["aggregate_z"] is None else f"{r['aggregate_z']:+.2f}"
        lines.append(f"| {label} | {len(r['seeds'])} | " + " | ".join(cells) + f" | {z} |")
    return "\n".join(lines) + "\n\n" + interval_note(methods)


def interval_note(methods: set[str]) -> str:
    notes = [f"Deltas against the baseline with {LEVEL:.0%} intervals over seeds and questions."]
    if QUESTION_ONLY in methods:
        notes.append(
            "QUESTION-ONLY intervals (asked for): they leave seed variance out and are too narrow "
            "wherever seeds differ."
        )
    if ONE_SEED in methods:
        notes.append(
            f"A side with one seed gets no interval ({ONE_SEED}): run more seeds, or ask for question-only intervals."
        )
    return " ".join(notes)


@dataclass(frozen=True)
class Claim:
    """A conclusion of the paper as a test on an axis, judged on the mean delta over benchmarks: 'best' (the
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
    Claim(
        "vision_tuning",
        "fine-tuning the vision encoder (with the LM) is crucial for small models",
        "baseline_better",
        "frozen",
    ),
    Claim("llm", "Phi-2 is the best language model of those compared", "best"),
    Claim("lm_instruct", "instruction tuning of the LM is not essential", "similar", "phi-2-sft"),
    Claim("finetuning", "LoRA reaches performance similar to full fine-tuning", "similar", "lora-vision-full"),
)


def _comparisons(claim: Claim, members: list[Cell]) -> list[tuple[str, Cell, Cell]] | None:
    """(label, a, b) pairs whose delta a - b the claim is judged on; None when a cell was not run."""
    baseline, others = members[0], {c.name: c for c in members[1:]}
    if claim.kind == "beats":
        if claim.a not in others or claim.b not in others:
            return None
        return [(f"{claim.a} - {claim.b}", others[claim.a], others[claim.b])]
    targets = list(others) if claim.kind == "best" else [claim.a or ""]
    if not targets or any(t not in others for t in targets):
        return None
    return [(f"{t} - {baseline.name}", others[t], baseline) for t in targets]


def _verdict(claim: Claim, intervals: list[Interval]) -> str:
    bounds = [i.bounds for i in intervals if i.bounds is not None]
    if len(bounds) < len(intervals):
        return f"no verdict ({ONE_SEED})"
    if claim.kind == "similar":
        if all(-claim.margin <= low and high <= claim.margin for low, high in bounds):
            verdict = "supported"
        elif any(low > claim.margin or high < -claim.margin for low, high in bounds):
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
    else:
        wanted = +1 if claim.kind == "beats" else -1  # else the baseline should be better: deltas below zero
        if all((low > 0) if wanted > 0 else (high < 0) for low, high in bounds):
            verdict = "supported"
        elif any((high < 0) if wanted > 0 else (low > 0) for low, high in bounds):
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
    return verdict + (f" ({QUESTION_ONLY})" if intervals[0].method == QUESTION_ONLY else "")


def judge(claim: Claim, cells: list[Cell], draws: int = 1000, question_only: bool = False) -> dict[str, Any]:
    """The claim's verdict, its evidence and, per comparison, the seeds, questions and detectable effect."""
    row: dict[str, Any] = {
        "axis": claim.axis,
        "claim": claim.text,
        "verdict": "not run",
        "evidence": "",
        "comparisons": [],
    }
    members = axes(cells).get(claim.axis, [])
    pairs = _comparisons(claim, members) if members else None
    if not pairs:
        return row
    names = benchmarks_of(members)
    deltas = [(label, aggregate_delta(a, b, names, draws, question_only)) for label, a, b in pairs]
    found = [(label, i) for label, i in deltas if i is not None]
    if len(found) < len(deltas):
        return row
    row["verdict"] = _verdict(claim, [i for _, i in found])
    row["evidence"] = "; ".join(f"{label}: {i.text()}" for label, i in found)
    row["comparisons"] = [
        {
            "compared": label,
            "delta": i.delta,
            "low": i.low,
            "high": i.high,
            "seeds": list(i.seeds),
            "questions": i.units,
            "detectable": i.detectable,
            "method": i.method,
        }
        for label, i in found
    ]
    return row


def claims_table(cells: list[Cell], draws: int = 1000, question_only: bool = False) -> list[dict[str, Any]]:
    return [judge(claim, cells, draws, question_only) for claim in CLAIMS]


def format_claims(rows: list[dict[str, Any]]) -> str:
    """Markdown: verdict, evidence, and what stands behind each comparison (seeds, questions, the smallest
    mean delta it would find with POWER at LEVEL)."""
    lines = [
        "| axis | claim | verdict | evidence (mean delta over benchmarks, points) | seeds | questions | "
        f"detectable ({POWER:.0%} power) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seeds = ", ".join(f"{c['seeds'][0]} vs {c['seeds'][1]}" for c in r["comparisons"]) or "-"
        questions = ", ".join(f"{c['questions']:,}" for c in r["comparisons"]) or "-"
        detectable = (
            ", ".join("-" if c["detectable"] is None else f"{c['detectable']:.2f}" for c in r["comparisons"]) or "-"
        )
        lines.append(
            f"| {r['axis']} | {r['claim']} | {r['verdict']} | {r['evidence']} | {seeds} | {questions} | {detectable} |"
        )
    return "\n".join(lines)
