"""POPE: the text before the first '.', commas deleted, split on spaces; "no" if a token is No, no or
not, else "yes". Per split: accuracy, precision, recall, F1 and the predicted yes-ratio; the reported
figure is the mean F1. Labels pair with answers by position within each split (as the original
does), so the pairing is checked: the n-th answer of a split must be the n-th label's question."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mipha_lab.eval.scoring.answers import ScoreInputError, check_ids, percent, read_jsonl


def pope_prediction(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def split_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Fractions (not yet percentages) with yes as the positive class."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, g in pairs if p == "yes" and g == "yes")
    fp = sum(1 for p, g in pairs if p == "yes" and g == "no")
    tn = sum(1 for p, g in pairs if p == "no" and g == "no")
    fn = sum(1 for p, g in pairs if p == "no" and g == "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": f1,
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "yes_ratio": predictions.count("yes") / len(predictions),
    }


def split_name(path: Path) -> str:
    """`coco_pope_adversarial.json` -> adversarial (any `<prefix>_pope_<split>.json`)."""
    stem = path.stem
    return stem.split("_pope_")[-1] if "_pope_" in stem else stem


def score_pope(
    questions: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    annotation_dir: str | Path,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`records`, when given, receives one row per question (id, split, prediction, label, correct)."""
    files = sorted(Path(annotation_dir).glob("*.json"))
    if not files:
        raise ScoreInputError(f"pope: no annotation files (*_pope_<split>.json) in {annotation_dir}")
    by_id = {q["question_id"]: q for q in questions}
    check_ids([a["question_id"] for a in answers], [q["question_id"] for q in questions], "pope answers", ordered=True)
    result: dict[str, Any] = {}
    for path in files:
        split = split_name(path)
        labels = read_jsonl(path)
        mine = [a for a in answers if by_id[a["question_id"]]["category"] == split]
        if len(mine) != len(labels):
            raise ScoreInputError(f"pope: split '{split}' has {len(labels)} labels in {path} but {len(mine)} answers")
        for n, (answer, label) in enumerate(zip(mine, labels, strict=True)):
            question = by_id[answer["question_id"]]
            if question["image"] != label["image"] or not question["text"].startswith(label["text"]):
                raise ScoreInputError(
                    f"pope: split '{split}', position {n}: answer {answer['question_id']} is about {question['image']} "
                    f"{question['text'][:60]!r} but the label is for {label['image']} {label['text'][:60]!r}"
                )
        predictions = [pope_prediction(a["text"]) for a in mine]
        result[split] = split_metrics(predictions, [row["label"] for row in labels])
        if records is not None:
            records.extend(
                {
                    "question_id": a["question_id"],
                    "split": split,
                    "prediction": p,
                    "label": row["label"],
                    "correct": p == row["label"],
                }
                for a, p, row in zip(mine, predictions, labels, strict=True)
            )
    mean_f1 = sum(metrics["f1"] for metrics in result.values()) / len(result)
    return {
        **{split: {k: percent(v) for k, v in m.items()} for split, m in result.items()},
        "mean_f1": percent(mean_f1),
    }
