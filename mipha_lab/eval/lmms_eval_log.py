"""An lmms-eval per-sample log (`<date>_samples_<task>.jsonl`, written with --log_samples) scored by our
official scorers: a task that is one of the paper's benchmarks then shows both numbers, lmms-eval's and
the official tool's, on the same answers (README, "Which harness for which number").

What a row of lmms-eval 0.7.3's log holds decides what can be scored: `doc_id`, `target` (the task's
doc_to_target), `filtered_resps` (the answer), `input` (the prompt) and what the task's process_results
returned; the document itself is not kept. So:
- POPE: labels from `target`; the split is not logged, so `pope_adv` / `pope_pop` / `pope_random` are each one
  split and `pope` is pooled (the paper's figure is the mean F1 of the three split tasks).
- MME: gold from `target`, image and subtask from the logged metric (`question_id`, `category`).
- GQA: the official exact match against `target`; accuracy only (the structural types are not logged).
- ScienceQA-IMG: the gold letter from `target`, the number of choices from the prompt's `A. ...` lines.
- MMBench: gold from `target`, the row index from the logged metric, the options from the prompt.
- TextVQA: the question id from the logged submission; the ground truth from the official
  TextVQA_0.5.1_val.json under the data root (lmms-eval's target is not the ten answers).
- VQAv2: not scorable: `vqav2_val` logs neither the question id nor the ten answers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mipha_lab.eval.benchmarks import BENCHMARKS
from mipha_lab.eval.harness import OFFICIAL, read_if_present
from mipha_lab.eval.scoring.answers import ScoreInputError, percent, read_json
from mipha_lab.eval.scoring.gqa import gqa_prediction
from mipha_lab.eval.scoring.mmbench import CIRCULAR, score_rows
from mipha_lab.eval.scoring.mme import score_mme_answers
from mipha_lab.eval.scoring.pope import pope_prediction, split_metrics
from mipha_lab.eval.scoring.scienceqa import number_of_choices, score_letters
from mipha_lab.eval.scoring.vqa import score_textvqa_keyed

log = logging.getLogger(__name__)

TASKS = {  # lmms-eval 0.7.3's tasks for the paper's benchmarks -> ours
    "pope": "pope",
    "pope_adv": "pope",
    "pope_pop": "pope",
    "pope_random": "pope",
    "mme": "mme",
    "gqa": "gqa",
    "scienceqa_img": "scienceqa-img",
    "textvqa_val": "textvqa",
    "mmbench_en_dev": "mmbench",
    "mmbench_en_dev_static": "mmbench",
    "mmbench_cn_dev": "mmbench-cn",
}
UNSCORABLE = {
    "vqav2_val": "lmms-eval's vqav2_val logs neither the question id nor the ten answers; score VQAv2 val with "
    "`eval run --benchmarks vqav2-val` instead",
}
MME_METRICS = ("mme_perception_score", "mme_cognition_score")  # the subtask decides which one a row logs
OPTION_LINE = re.compile(r"^([A-F])\. (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    """One logged document: its row as lmms-eval wrote it, the answer, and where it was read (for messages)."""

    row: dict[str, Any]
    answer: str
    where: str

    def get(self, *keys: str) -> Any:
        """The first of `keys` the row holds (a task logs its metric under one of several names)."""
        for key in keys:
            if key in self.row:
                return self.row[key]
        raise ScoreInputError(
            f"{self.where}: the row has no {' or '.join(map(repr, keys))} (it has {sorted(self.row)})"
        )

    def logged(self, key: str, *metrics: str) -> Any:
        """`key` of the dict the task's process_results logged under (the first present of) `metrics`."""
        value = self.get(*metrics)
        if not isinstance(value, dict) or key not in value:
            raise ScoreInputError(f"{self.where}: the logged {' / '.join(metrics)} has no '{key}' ({value!r:.200})")
        return value[key]


def read_samples(path: Path) -> list[Sample]:
    """The log's rows in document order; a row that is not a generate_until sample is an error naming it."""
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScoreInputError(f"{where}: not JSON ({error.msg})") from None
        answer = row.get("filtered_resps") if isinstance(row, dict) else None
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        if not isinstance(answer, str) or not isinstance(row.get("doc_id"), int) or "target" not in row:
            raise ScoreInputError(
                f"{where}: expected an lmms-eval generate_until sample (doc_id, target, one answer string in "
                "filtered_resps)"
            )
        samples.append(Sample(row, answer, where))
    if not samples:
        raise ScoreInputError(f"{path}: no samples")
    return sorted(samples, key=lambda s: s.row["doc_id"])


def task_of(path: Path) -> str:
    """`20261207_101010_samples_pope.jsonl` -> pope."""
    if "_samples_" not in path.stem:
        raise ScoreInputError(f"{path}: not an lmms-eval sample log (<date>_samples_<task>.jsonl)")
    return path.stem.split("_samples_", 1)[1]


def _pope(samples: list[Sample], _: Path | None) -> dict[str, Any]:
    """The samples as one split (the log does not say which; a split task's name does)."""
    labels = [str(s.get("target")).strip().lower() for s in samples]
    metrics = split_metrics([pope_prediction(s.answer) for s in samples], labels)
    return {name: percent(value) for name, value in metrics.items()}


def _mme(samples: list[Sample], _: Path | None) -> dict[str, Any]:
    """The official tool pairs an image's two questions; the log's order is kept, an image's rows together."""
    first: dict[str, int] = {}
    rows = []
    for s in samples:
        image = s.logged("question_id", *MME_METRICS)
        first.setdefault(image, len(first))
        rows.append(
            {
                "question_id": image,
                "prompt": s.get("input"),
                "subtask": s.logged("category", *MME_METRICS),
                "image": image,
                "gold": str(s.get("target")),
                "text": s.answer,
            }
        )
    return score_mme_answers(sorted(rows, key=lambda row: first[row["image"]]))


def _gqa(samples: list[Sample], _: Path | None) -> dict[str, Any]:
    hits = [gqa_prediction(s.answer) == str(s.get("target")) for s in samples]
    return {"accuracy": percent(sum(hits) / len(hits))}


def _scienceqa(samples: list[Sample], _: Path | None) -> dict[str, Any]:
    """Every question of scienceqa_img has an image."""
    items = [
        {
            "question_id": s.row["doc_id"],
            "text": s.answer,
            "gold": str(s.get("target")).strip(),
            "choices": number_of_choices(s.get("input")),
            "image": True,
        }
        for s in samples
    ]
    return {"img_accuracy": score_letters(items)["img_accuracy"]}


def _mmbench(samples: list[Sample], _: Path | None) -> dict[str, Any]:
    """CircularEval needs the rotated copies (index >= 1,000,000); without them only the plain accuracy is kept."""
    rows = [
        {
            **dict(OPTION_LINE.findall(s.get("input"))),
            "index": int(s.logged("index", "gpt_eval_score", "submission")),
            "answer": str(s.get("target")),
        }
        for s in samples
    ]
    scores = score_rows(rows, {row["index"]: s.answer for row, s in zip(rows, samples, strict=True)})
    if not any(row["index"] >= CIRCULAR for row in rows):
        log.warning("mmbench: the log has no rotated rows (index >= %d): CircularEval is left out", CIRCULAR)
        scores = {"original_rows": scores["original_rows"]}
    return scores


def _textvqa(samples: list[Sample], data_root: Path | None) -> dict[str, Any]:
    relative = BENCHMARKS.get("textvqa").files["annotations"]
    path = Path(data_root) / relative if data_root is not None else None
    if path is None or not path.is_file():
        raise ScoreInputError(
            f"textvqa: lmms-eval logs no ground-truth answers, so the official scorer reads {relative} under "
            f"--data-root ({'no data root given' if path is None else f'{path} does not exist'})"
        )
    keys = [s.logged("question_id", "submission") for s in samples]
    asked = set(keys)
    gold = {a["question_id"]: a for a in read_json(path)["data"] if a["question_id"] in asked}
    answers = [{"question_id": k, "text": s.answer} for k, s in zip(keys, samples, strict=True)]
    return score_textvqa_keyed(gold, answers, keys)


SCORERS: dict[str, Callable[[list[Sample], Path | None], dict[str, Any]]] = {
    "pope": _pope,
    "mme": _mme,
    "gqa": _gqa,
    "scienceqa-img": _scienceqa,
    "textvqa": _textvqa,
    "mmbench": _mmbench,
    "mmbench-cn": _mmbench,
}


def headline(benchmark: str, scores: dict[str, Any]) -> tuple[str, float]:
    """The benchmark's headline where the log gives it, else the first figure (pope's f1, mmbench's original_rows)."""
    metric = BENCHMARKS.get(benchmark).headline
    metric = metric if metric in scores else next(iter(scores))
    return metric, float(scores[metric])


def score_log(path: Path, benchmark: str | None = None, data_root: Path | None = None) -> tuple[str, dict[str, Any]]:
    """(benchmark, official scores) of one sample log; the benchmark comes from the task's name unless given."""
    task = task_of(path)
    name = benchmark or TASKS.get(task)
    if name is None and task in UNSCORABLE:
        raise ScoreInputError(f"{path}: {UNSCORABLE[task]}")
    if name is None:
        raise ScoreInputError(
            f"{path}: lmms-eval task '{task}' is none of {sorted(TASKS)}; name the benchmark it is (one of "
            f"{sorted(SCORERS)})"
        )
    if name not in SCORERS:
        raise ScoreInputError(f"{path}: no official scorer for '{name}' reads lmms-eval logs; one of {sorted(SCORERS)}")
    return name, SCORERS[name](read_samples(path), data_root)


def score_harness_logs(
    results: Path, eval_folder: Path, score_as: dict[str, str], data_root: Path | None
) -> dict[str, dict[str, Any]]:
    """Official scores of every task logged beside lmms-eval's `results` file that maps to a benchmark, kept in
    `<eval_folder>/lmms-eval/official.json`; a log the scorer cannot read is reported and left out."""
    date = results.name.removesuffix("_results.json")
    scored = {}
    for path in sorted(results.parent.glob(f"{date}_samples_*.jsonl")):
        task = task_of(path)
        if task not in score_as and task not in TASKS and task not in UNSCORABLE:
            continue
        try:
            name, scores = score_log(path, score_as.get(task), data_root)
        except ScoreInputError as error:
            log.warning("%s: not scored by the official scorer: %s", task, error)
            continue
        metric, value = headline(name, scores)
        scored[task] = {"benchmark": name, "metric": metric, "value": value, "scores": scores, "samples": str(path)}
        log.info("%s: %s %s = %.2f by the official %s scorer", task, name, metric, value, name)
    file = eval_folder / OFFICIAL
    file.write_text(json.dumps({**read_if_present(file), **scored}, indent=2) + "\n")
    return scored
