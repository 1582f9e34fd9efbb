"""MME: LLaVA's answers matched to the official ground truth (image, question with " Please answer yes
or no." put back, allowing its double-space variant), then the official calculation: lower-case;
exactly yes/no, else yes/no found in the first four characters, else other (wrong); a subtask scores
100 x accuracy + 100 x accuracy+ (both questions of an image right). Answers pair by image in file
order, two per image, as the official tool reads them - checked rather than assumed."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from mipha_lab.eval.scoring.answers import ScoreInputError, check_ids

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SHORT = "Answer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def mme_prediction(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def read_ground_truth(folder: str | Path) -> dict[tuple[str, str, str], str]:
    """(subtask, image file, question) -> Yes/No from `<subtask>.txt` lines `image<TAB>question<TAB>answer`."""
    gold = {}
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise ScoreInputError(f"mme: no ground-truth files (<subtask>.txt) in {folder}")
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                parts = line.split("\t")
                if len(parts) != 3:
                    raise ScoreInputError(f"{path}, line {number}: expected image<TAB>question<TAB>answer")
                gold[(path.stem, parts[0], parts[1])] = parts[2].strip()
    return gold


def official_question(prompt: str, subtask: str, image: str, gold: dict) -> str:
    question = prompt.replace(SHORT, "").strip() if SHORT in prompt else prompt
    if YES_NO.strip() not in question:
        question = question + YES_NO
        if (subtask, image, question) not in gold:
            question = question.replace(YES_NO, " " + YES_NO)
    return question


def score_mme(
    questions: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    ground_truth: str | Path,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`records`, when given, receives one row per question (id, subtask, prediction, gold, correct)."""
    gold = read_ground_truth(ground_truth)
    key = lambda row, text: (row["question_id"], text)  # noqa: E731 - an image has two questions
    check_ids([key(a, a["prompt"]) for a in answers], [key(q, q["text"]) for q in questions], "mme answers")
    rows = []
    for answer in answers:
        subtask, image = answer["question_id"].split("/")[0], answer["question_id"].split("/")[-1]
        question = official_question(answer["prompt"], subtask, image, gold)
        if (subtask, image, question) not in gold:
            raise ScoreInputError(f"mme: no ground truth for {answer['question_id']} {question!r}")
        rows.append({**answer, "subtask": subtask, "image": image, "gold": gold[(subtask, image, question)]})
    return score_mme_answers(rows, records)


def score_mme_answers(rows: list[dict[str, Any]], records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The official calculation on rows {question_id, prompt, subtask, image, gold (Yes/No), text}, the two
    questions of an image one after the other within their subtask."""
    per_subtask: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for answer in rows:
        row = (answer["image"], answer["gold"].strip().lower(), mme_prediction(answer["text"]))
        per_subtask[answer["subtask"]].append(row)
        if records is not None:
            records.append(
                {
                    "question_id": answer["question_id"],
                    "prompt": answer["prompt"],
                    "subtask": answer["subtask"],
                    "prediction": row[2],
                    "gold": row[1],
                    "correct": row[1] == row[2],
                }
            )
    scores = {}
    for subtask, pairs in per_subtask.items():
        if len(pairs) % 2 or any(pairs[i][0] != pairs[i + 1][0] for i in range(0, len(pairs), 2)):
            raise ScoreInputError(f"mme: subtask '{subtask}': answers must come two per image, in pairs")
        correct = [gold_answer == predicted for _, gold_answer, predicted in pairs]
        both = [correct[i] and correct[i + 1] for i in range(0, len(pairs), 2)]
        scores[subtask] = 100 * sum(correct) / len(correct) + 100 * sum(both) / len(both)
    unknown = set(scores) - set(PERCEPTION) - set(COGNITION)
    if unknown:
        raise ScoreInputError(f"mme: unknown subtasks {sorted(unknown)}")
    return {
        "perception": round(sum(scores.get(s, 0.0) for s in PERCEPTION), 2),
        "cognition": round(sum(scores.get(s, 0.0) for s in COGNITION), 2),
        "subtasks": {s: round(v, 2) for s, v in sorted(scores.items())},
    }
