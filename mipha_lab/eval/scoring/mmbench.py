"""MMBench: the option letter of an answer (VLMEvalKit's rule: a single standalone option letter after
punctuation becomes spaces, else the one option whose text appears in the answer; otherwise
unparsed = wrong without an LLM judge), then CircularEval - a question (index mod 1,000,000) scores
only if every rotated variant is answered with its gold letter."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mipha_lab.eval.scoring.answers import ScoreInputError, check_ids, percent

LETTERS = ("A", "B", "C", "D", "E", "F")
CIRCULAR = 1_000_000


def read_table(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    csv.field_size_limit(1 << 30)  # the full tables carry base64 images
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for column in ("index", "answer", "A", "B"):
        if rows and column not in rows[0]:
            raise ScoreInputError(f"{path}: no '{column}' column (columns: {list(rows[0])})")
    return rows


def options(row: dict[str, str]) -> dict[str, str]:
    """The row's options up to the first missing one."""
    found = {}
    for letter in LETTERS:
        value = (row.get(letter) or "").strip()
        if not value or value.lower() == "nan":
            break
        found[letter] = value
    return found


def infer_letter(answer: str, choices: dict[str, str]) -> str | None:
    text = str(answer)
    for char in ".()[],:;!*#{}":
        text = text.replace(char, " ")
    tokens = [t.strip() for t in text.split()]
    standalone = [c for c in choices if c in tokens]
    if len(standalone) == 1:
        return standalone[0]
    lowered = str(answer).lower()
    by_text = [c for c, value in choices.items() if value.lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


def score_rows(
    rows: list[dict[str, str]], predictions: dict[int, str], records: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    correct: dict[int, bool] = {}
    for row in rows:
        index = int(row["index"])
        letter = infer_letter(predictions[index], options(row))
        correct[index] = letter == row["answer"].strip()
        if records is not None:
            records.append(
                {
                    "question_id": index,
                    "prediction": letter,
                    "gold": row["answer"].strip(),
                    "correct": correct[index],
                    "question": index % CIRCULAR,
                }
            )
    groups: dict[int, list[bool]] = {}
    for index, ok in correct.items():
        groups.setdefault(index % CIRCULAR, []).append(ok)
    original = [ok for index, ok in correct.items() if index < CIRCULAR]
    return {
        "circular": percent(sum(all(g) for g in groups.values()) / len(groups)),
        "all_rows": percent(sum(correct.values()) / len(correct)),
        "original_rows": percent(sum(original) / max(len(original), 1)),
    }


def score_mmbench_table(path: str | Path) -> dict[str, Any]:
    """A table that already has a `prediction` column (the file the MMBench server takes)."""
    rows = read_table(path)
    if rows and "prediction" not in rows[0]:
        raise ScoreInputError(f"{path}: no 'prediction' column; give --questions TABLE --answers ANSWERS instead")
    return score_rows(rows, {int(r["index"]): r["prediction"] for r in rows})


def score_mmbench(
    path: str | Path, answers: list[dict[str, Any]], records: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The question table plus LLaVA's answer file (question_id = the row's index)."""
    rows = read_table(path)
    check_ids([int(a["question_id"]) for a in answers], [int(r["index"]) for r in rows], "mmbench answers")
    return score_rows(rows, {int(a["question_id"]): a["text"] for a in answers}, records)
