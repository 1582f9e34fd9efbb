"""ScienceQA (LLaVA's llava_test_CQM-A.json): the first matching rule picks the letter - the whole output
is one option letter; it starts with "X. "; exactly one "The answer is X." - else FAILED. Case-sensitive;
a letter beyond the question's choices is wrong."""

from __future__ import annotations

import re
from typing import Any

from mipha_lab.eval.scoring.answers import check_ids, percent

OPTIONS = ("A", "B", "C", "D", "E")
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
CHOICE_LINE = re.compile(r"^([A-E])\. ", re.MULTILINE)


def parse_letter(text: str) -> str:
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def number_of_choices(question: str) -> int:
    letters = CHOICE_LINE.findall(question)
    count = 0
    while count < len(OPTIONS) and OPTIONS[count] in letters:
        count += 1
    return count


def score_scienceqa(
    questions: list[dict[str, Any]], answers: list[dict[str, Any]], records: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Accuracy over the image questions (the reported ScienceQA-IMG) and over all questions; `records`,
    when given, receives one row per question."""
    predicted = {str(a["question_id"]): a["text"] for a in answers}
    check_ids([str(a["question_id"]) for a in answers], [str(q["id"]) for q in questions], "scienceqa answers")
    items = []
    for q in questions:
        gold = q["conversations"][1]["value"].strip()
        items.append(
            {
                "question_id": str(q["id"]),
                "text": predicted[str(q["id"])],
                "gold": parse_letter(gold) if gold not in OPTIONS else gold,
                "choices": number_of_choices(q["conversations"][0]["value"]),
                "image": bool(q.get("image")),
            }
        )
    return score_letters(items, records)


def score_letters(items: list[dict[str, Any]], records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The official rule on items {question_id, text (the answer), gold letter, choices (how many), image}."""
    img, every = [], []
    for item in items:
        letter = parse_letter(item["text"])
        correct = float(letter in OPTIONS[: item["choices"]] and letter == item["gold"])
        every.append(correct)
        if records is not None:
            records.append(
                {
                    "question_id": item["question_id"],
                    "prediction": letter,
                    "gold": item["gold"],
                    "correct": bool(correct),
                    "image": item["image"],
                }
            )
        if item["image"]:
            img.append(correct)
    return {"img_accuracy": percent(sum(img) / max(len(img), 1)), "accuracy": percent(sum(every) / len(every))}
