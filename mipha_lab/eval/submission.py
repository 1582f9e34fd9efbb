"""Files for the benchmarks' servers, in the formats LLaVA's conversion scripts write: the VQAv2
test-dev upload (every test2015 question, EvalAI-processed answers, empty where not inferred), GQA's
predictions JSON, and the MMBench table with a prediction column."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mipha_lab.eval.scoring.answers import read_jsonl
from mipha_lab.eval.scoring.gqa import gqa_prediction
from mipha_lab.eval.scoring.mmbench import read_table
from mipha_lab.eval.scoring.vqa import normalize_evalai

MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def vqav2_upload(paths: dict[str, Path], answers: list[dict[str, Any]], out: Path) -> Path:
    predicted = {a["question_id"]: a["text"] for a in answers}
    rows = [
        {
            "question_id": q["question_id"],
            "answer": normalize_evalai(predicted[q["question_id"]]) if q["question_id"] in predicted else "",
        }
        for q in read_jsonl(paths["test_split"])
    ]
    target = out / "vqav2_test-dev_upload.json"
    target.write_text(json.dumps(rows))
    return target


def gqa_predictions(paths: dict[str, Path], answers: list[dict[str, Any]], out: Path) -> Path:
    target = out / "testdev_balanced_predictions.json"
    target.write_text(
        json.dumps([{"questionId": a["question_id"], "prediction": gqa_prediction(a["text"])} for a in answers])
    )
    return target


def mmbench_table(paths: dict[str, Path], answers: list[dict[str, Any]], out: Path) -> Path:
    """The question table without images and side columns, a prediction column added (TSV; the server
    takes it as .xlsx: `pandas.read_table(path).to_excel(...)`)."""
    predicted = {int(a["question_id"]): a["text"] for a in answers}
    rows = read_table(paths["questions"])
    columns = [c for c in rows[0] if c not in MMBENCH_DROPPED] if rows else []
    columns.insert(min(6, len(columns)), "prediction")
    target = out / f"{paths['questions'].stem}_submission.tsv"
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "prediction": predicted.get(int(row["index"]), "")})
    return target
