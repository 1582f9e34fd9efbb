"""VQA answer normalization (the official GT-Vision-Lab `vqaEval` and the EvalAI/m4c processor) and
VQA accuracy; VQAv2 (official result/annotation files) and TextVQA (LLaVA's answer file) scoring."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from mipha_lab.eval.scoring.answers import ScoreInputError, check_ids, percent
from mipha_lab.eval.scoring.vqa_tables import ARTICLES, CONTRACTIONS, NUMBER_MAP, PUNCTUATIONS

COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim from the official code (the lookbehind typo included)


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATIONS:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # count=re.UNICODE (32), as the official call passes it


def _digits_articles(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_official(text: str) -> str:
    """GT-Vision-Lab vqaEval: punctuation, then digits/articles/contractions."""
    return _digits_articles(_punctuation(clean(text)))


def normalize_evalai(text: str) -> str:
    """The EvalAI (m4c) answer processor used for the VQAv2 upload and for TextVQA."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_punctuation(clean(text)))


def vqa_accuracy(prediction: str, answers: list[str], normalize: Callable[[str], str], always: bool = True) -> float:
    """Mean over the ground-truth answers, leaving each one out by position, of min(1, matches / 3).
    With `always=False` (the official VQAv2 rule) nothing is normalized when the answers are unanimous."""
    if always or len({clean(a) for a in answers}) > 1:
        gold, pred = [normalize(a) for a in answers], normalize(prediction)
    else:
        gold, pred = [clean(a) for a in answers], clean(prediction)
    scores = [min(1.0, sum(1 for j, g in enumerate(gold) if j != i and g == pred) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores)


def score_vqav2(
    annotations: dict[str, Any],
    questions: dict[str, Any],
    results: list[dict[str, Any]],
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Official VQAv2 val scoring: overall, per answer type and per question type (x100, 2 decimals);
    `records`, when given, receives one row per question."""
    gold = {a["question_id"]: a for a in annotations["annotations"]}
    asked = [q["question_id"] for q in questions["questions"]]
    predicted = {r["question_id"]: r["answer"] for r in results}
    check_ids([r["question_id"] for r in results], asked, "vqav2 results")
    per_answer: dict[str, list[float]] = defaultdict(list)
    per_question: dict[str, list[float]] = defaultdict(list)
    scores = []
    for qid in asked:
        if qid not in gold:
            raise ScoreInputError(f"vqav2: question {qid} has no annotation")
        ann = gold[qid]
        acc = vqa_accuracy(predicted[qid], [a["answer"] for a in ann["answers"]], normalize_official, always=False)
        scores.append(acc)
        if records is not None:
            records.append(
                {"question_id": qid, "prediction": predicted[qid], "score": acc, "answer_type": ann["answer_type"]}
            )
        per_answer[ann["answer_type"]].append(acc)
        per_question[ann["question_type"]].append(acc)
    mean = lambda xs: percent(sum(xs) / len(xs))  # noqa: E731
    return {
        "overall": mean(scores),
        "per_answer_type": {k: mean(v) for k, v in sorted(per_answer.items())},
        "per_question_type": {k: mean(v) for k, v in sorted(per_question.items())},
    }


def textvqa_question(prompt: str) -> str:
    """The question inside LLaVA's TextVQA prompt (question / OCR tokens / suffix lines), lower-cased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ScoreInputError(f"textvqa: cannot find the question in prompt {prompt[:80]!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ScoreInputError(f"textvqa: prompt has an unknown layout: {prompt[:80]!r}")
    return question.lower()


def score_textvqa(
    annotations: dict[str, Any], answers: list[dict[str, Any]], records: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """LLaVA's TextVQA scoring: answers matched on (image id, question), both sides EvalAI-processed;
    `records`, when given, receives one row per question (its VQA accuracy as `score`)."""
    keys = [(a["question_id"], textvqa_question(a["prompt"])) for a in answers]
    gold = {(a["image_id"], a["question"].lower()): a for a in annotations["data"]}
    return score_textvqa_keyed(gold, answers, keys, records)


def score_textvqa_keyed(
    gold: Mapping[Any, dict[str, Any]],
    answers: list[dict[str, Any]],
    keys: Sequence[Hashable],
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The answers against the annotations (TextVQA_0.5.1_val.json's `data` rows) their keys name."""
    check_ids(keys, list(gold), "textvqa answers")
    scores = [vqa_accuracy(a["text"], gold[k]["answers"], normalize_evalai) for a, k in zip(answers, keys, strict=True)]
    if records is not None:
        records.extend(
            {
                "question_id": a["question_id"],
                "question": gold[k]["question"].lower(),
                "prediction": normalize_evalai(a["text"]),
                "score": score,
            }
            for a, k, score in zip(answers, keys, scores, strict=True)
        )
    return {"accuracy": percent(sum(scores) / len(scores))}
