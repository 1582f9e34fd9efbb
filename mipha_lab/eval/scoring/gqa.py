"""GQA testdev-balanced: the prediction is the output without trailing periods, lower-cased; exact match.
Binary = questions whose structural type is not `query`, open = those that are."""

from __future__ import annotations

from typing import Any

from mipha_lab.eval.scoring.answers import check_ids, percent


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def score_gqa(
    questions: dict[str, Any], answers: list[dict[str, Any]], records: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`questions`: the official testdev_balanced_questions.json (id -> question); `answers`: LLaVA's jsonl;
    `records`, when given, receives one row per question."""
    balanced = [qid for qid, q in questions.items() if q.get("isBalanced", True)]
    predicted = {str(a["question_id"]): gqa_prediction(a["text"]) for a in answers}
    check_ids([str(a["question_id"]) for a in answers], balanced, "gqa answers")
    hits: dict[str, list[float]] = {"all": [], "binary": [], "open": []}
    for qid in balanced:
        question = questions[qid]
        correct = float(predicted[qid] == question["answer"])
        hits["all"].append(correct)
        kind = "open" if question["types"]["structural"] == "query" else "binary"
        hits[kind].append(correct)
        if records is not None:
            records.append(
                {
                    "question_id": qid,
                    "prediction": predicted[qid],
                    "gold": question["answer"],
                    "correct": bool(correct),
                    "kind": kind,
                }
            )
    mean = lambda xs: percent(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    return {"accuracy": mean(hits["all"]), "binary": mean(hits["binary"]), "open": mean(hits["open"])}
