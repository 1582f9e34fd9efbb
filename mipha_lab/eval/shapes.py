"""The synthetic benchmarks of the demo: exact-match accuracy per category (shapes-vqa) and yes/no
accuracy per POPE split (shapes-pope). The evaluation issue replaces this with its benchmark runner."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mipha_lab.data.templates import get_template
from mipha_lab.eval.generate import answer_questions, read_jsonl

CHANCE = {"color": 1 / 6, "shape": 1 / 3, "count": 1 / 2, "position": 1 / 3, "yes/no": 1 / 2}


def normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def score_vqa(answers: list[dict[str, Any]], truth: list[dict[str, Any]]) -> dict[str, Any]:
    gold = {row["question_id"]: row for row in truth}
    per: dict[str, list[int]] = {}
    for answer in answers:
        row = gold[answer["question_id"]]
        per.setdefault(row["type"], []).append(int(normalize(answer["text"]) == normalize(row["answer"])))
    scores = {f"{kind}_accuracy": sum(hits) / len(hits) for kind, hits in sorted(per.items())}
    scores["accuracy"] = sum(sum(h) for h in per.values()) / max(1, sum(len(h) for h in per.values()))
    return scores


def score_pope(answers: list[dict[str, Any]], questions: list[dict[str, Any]], labels: dict[int, str]) -> dict[str, Any]:
    split = {q["question_id"]: q["category"] for q in questions}
    per: dict[str, list[int]] = {}
    for answer in answers:
        said = "no" if normalize(answer["text"]).startswith("no") else "yes" if normalize(answer["text"]).startswith("yes") else ""
        per.setdefault(split[answer["question_id"]], []).append(int(said == labels[answer["question_id"]]))
    scores = {f"{name}_accuracy": sum(h) / len(h) for name, h in sorted(per.items())}
    scores["accuracy"] = sum(sum(h) for h in per.values()) / max(1, sum(len(h) for h in per.values()))
    return scores


def evaluate_run(run: Any, experiment: Any) -> dict[str, dict[str, Any]]:
    """Answer and score each shapes benchmark with the run's final model; write eval/ and its summary."""
    from mipha_lab.model import MultimodalModel

    model = MultimodalModel.from_pretrained(run.path / "final").eval()
    template = get_template(experiment.stages[-1].template)
    root = Path(experiment.data_root) / "shapes"
    results: dict[str, dict[str, Any]] = {}
    for benchmark in experiment.eval.benchmarks:
        folder = root / "eval" / benchmark
        questions = read_jsonl(folder / "questions.jsonl")
        answers = answer_questions(model, template, questions, root / "images", strategy=experiment.eval.image_strategy,
                                   batch_size=experiment.eval.batch_size,
                                   max_new_tokens=experiment.eval.max_new_tokens or 16, model_id=experiment.run_name or "")
        if benchmark == "shapes-vqa":
            scores = score_vqa(answers, read_jsonl(folder / "answers.jsonl"))
        elif benchmark == "shapes-pope":
            labels = {row["question_id"]: row["label"] for f in sorted((folder / "annotations").glob("*.json"))
                      for row in read_jsonl(f)}
            scores = score_pope(answers, questions, labels)
        else:
            raise ValueError(f"benchmark {benchmark!r} arrives with the evaluation issue (now: shapes-vqa, shapes-pope)")
        out = run.path / "eval" / benchmark
        out.mkdir(parents=True, exist_ok=True)
        (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
        (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        results[benchmark] = scores
    write_summary(run.path / "eval", results)
    return results


def write_summary(folder: Path, results: dict[str, dict[str, Any]]) -> None:
    rows = [(bench, metric, value) for bench, scores in results.items() for metric, value in scores.items()]
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["benchmark", "metric", "value"])
        writer.writerows(rows)
    def chance(metric: str) -> str:
        level = CHANCE.get(metric.removesuffix("_accuracy"))
        return f"{level:.3f}" if level is not None else ""

    lines = ["| benchmark | metric | value | chance |", "|---|---|---:|---:|"]
    lines += [f"| {b} | {m} | {v:.4f} | {chance(m)} |" for b, m, v in rows]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
