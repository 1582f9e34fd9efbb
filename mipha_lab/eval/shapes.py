"""The synthetic shapes-vqa benchmark's scorer: exact-match accuracy per category (shapes-pope uses
the POPE scorer). Chance levels, for reading the figures."""

from __future__ import annotations

from typing import Any

from mipha_lab.eval.scoring.answers import check_ids, percent

CHANCE = {"color": 1 / 6, "shape": 1 / 3, "count": 1 / 2, "position": 1 / 3, "yes/no": 1 / 2}


def normalize(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def score_vqa(
    answers: list[dict[str, Any]], truth: list[dict[str, Any]], records: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Accuracy per question category and overall, as percentages rounded to 2 decimals; `records`, when
    given, receives one row per question."""

    gold = {row["question_id"]: row for row in truth}
    check_ids([a["question_id"] for a in answers], list(gold), "shapes-vqa answers")
    per: dict[str, list[int]] = {}
    for answer in answers:
        row = gold[answer["question_id"]]
        correct = normalize(answer["text"]) == normalize(row["answer"])
        per.setdefault(row["type"], []).append(int(correct))
        if records is not None:
            records.append(
                {
                    "question_id": answer["question_id"],
                    "category": row["type"],
                    "prediction": answer["text"],
                    "gold": row["answer"],
                    "correct": correct,
                }
            )
    scores = {f"{kind}_accuracy": percent(sum(hits) / len(hits)) for kind, hits in sorted(per.items())}
    scores["accuracy"] = percent(sum(sum(h) for h in per.values()) / max(1, sum(len(h) for h in per.values())))
    return scores
