"""The scorers against the golden numbers of the official tools (LLaVA-1.5-13B's released predictions in
../shared/fixtures, read in place), hand-made VQA/GQA/TextVQA cases, and refused bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mipha_lab.eval.scoring.answers import ScoreInputError, read_jsonl
from mipha_lab.eval.scoring.gqa import score_gqa
from mipha_lab.eval.scoring.mmbench import score_mmbench_table
from mipha_lab.eval.scoring.mme import mme_prediction
from mipha_lab.eval.scoring.pope import pope_prediction, score_pope
from mipha_lab.eval.scoring.scienceqa import parse_letter
from mipha_lab.eval.scoring.vqa import (
    normalize_evalai,
    normalize_official,
    score_textvqa,
    score_vqav2,
    textvqa_question,
    vqa_accuracy,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LLAVA = FIXTURES / "llava-v1.5-13b"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"golden fixtures not found at {FIXTURES} (CI has ../shared beside the clone); golden scorer tests skipped",
)


def score_cli(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.eval", "score", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # stdout is only the JSON object


@needs_fixtures
def test_pope_golden():
    d = LLAVA / "pope"
    scores = score_cli(
        "pope",
        "--questions",
        d / "llava_pope_test.jsonl",
        "--answers",
        d / "llava-v1.5-13b.jsonl",
        "--annotations",
        d / "coco",
    )
    assert [scores[s]["f1"] for s in ("adversarial", "popular", "random")] == [84.46, 86.25, 87.14]
    assert [scores[s]["accuracy"] for s in ("adversarial", "popular", "random")] == [85.50, 87.43, 88.01]
    assert [scores[s]["precision"] for s in ("adversarial", "popular", "random")] == [90.99, 95.25, 97.44]
    assert [scores[s]["recall"] for s in ("adversarial", "popular", "random")] == [78.80] * 3
    assert [scores[s]["yes_ratio"] for s in ("adversarial", "popular", "random")] == [43.30, 41.37, 41.68]
    assert scores["mean_f1"] == 85.95


@needs_fixtures
def test_per_question_records_add_up_to_the_scores():
    from mipha_lab.eval.scoring.mme import score_mme

    d = LLAVA / "pope"
    records: list[dict] = []
    scores = score_pope(
        read_jsonl(d / "llava_pope_test.jsonl"), read_jsonl(d / "llava-v1.5-13b.jsonl"), d / "coco", records
    )
    assert len(records) == 8910
    for split in ("adversarial", "popular", "random"):
        mine = [r["correct"] for r in records if r["split"] == split]
        assert round(100 * sum(mine) / len(mine), 2) == scores[split]["accuracy"]
    d = LLAVA / "mme"
    records = []
    score_mme(read_jsonl(d / "llava_mme.jsonl"), read_jsonl(d / "llava-v1.5-13b.jsonl"), d / "ground_truth", records)
    assert len(records) == 2374 and {r["prediction"] for r in records} <= {"yes", "no", "other"}


@needs_fixtures
def test_mme_golden():
    d = LLAVA / "mme"
    scores = score_cli(
        "mme",
        "--questions",
        d / "llava_mme.jsonl",
        "--answers",
        d / "llava-v1.5-13b.jsonl",
        "--ground-truth",
        d / "ground_truth",
    )
    assert (scores["perception"], scores["cognition"]) == (1531.32, 295.36)
    assert scores["subtasks"] == {
        "existence": 185.00,
        "count": 155.00,
        "position": 133.33,
        "color": 170.00,
        "posters": 160.54,
        "celebrity": 152.94,
        "scene": 161.25,
        "landmark": 170.50,
        "artwork": 117.75,
        "OCR": 125.00,
        "commonsense_reasoning": 127.86,
        "numerical_calculation": 42.50,
        "text_translation": 77.50,
        "code_reasoning": 47.50,
    }


@needs_fixtures
def test_scienceqa_golden():
    d = LLAVA / "scienceqa"
    scores = score_cli(
        "scienceqa-img", "--questions", d / "llava_test_CQM-A.json", "--answers", d / "llava-v1.5-13b.jsonl"
    )
    assert scores == {"img_accuracy": 71.64, "accuracy": 74.39}


@needs_fixtures
def test_mmbench_golden_from_the_table_and_from_answers():
    d = LLAVA / "mmbench"
    expected = {"circular": 67.69, "all_rows": 76.45, "original_rows": 75.43}
    assert score_mmbench_table(d / "llava-v1.5-13b_dev_20230712.tsv") == expected  # the server's table
    assert (
        score_cli(
            "mmbench", "--questions", d / "llava-v1.5-13b_dev_20230712.tsv", "--answers", d / "llava-v1.5-13b.jsonl"
        )
        == expected
    )


@needs_fixtures
def test_all_normalization_vectors():
    rows = read_jsonl(FIXTURES / "vqa-normalization" / "vectors.jsonl")
    assert len(rows) == 32
    for row in rows:
        assert normalize_evalai(row["input"]) == row["evalai_processor"], row
        assert normalize_official(row["input"]) == row["official_vqa"], row


def test_vqa_accuracy_by_position():
    ten = ["red"] * 3 + ["blue"] * 7
    # m matches: 0, 0.3, 0.6, 0.9, then 1.0 (each left-out position counts the others)
    for m, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * m + ["dog"] * (10 - m)
        assert vqa_accuracy("cat", answers, normalize_official, always=False) == pytest.approx(expected)
    assert vqa_accuracy("red", ten, normalize_official, always=False) == pytest.approx(0.9)
    # unanimous answers are compared raw by the official rule: "Yes" vs ten "yes" scores 0
    assert vqa_accuracy("Yes", ["yes"] * 10, normalize_official, always=False) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"], normalize_official, always=False) == 1.0
    # the EvalAI variant (TextVQA) always normalizes
    assert vqa_accuracy("Yes", ["yes"] * 10, normalize_evalai) == 1.0


def test_vqav2_scores_with_answer_and_question_types():
    annotations = {
        "annotations": [
            {"question_id": 1, "answer_type": "yes/no", "question_type": "is the", "answers": [{"answer": "yes"}] * 10},
            {
                "question_id": 2,
                "answer_type": "number",
                "question_type": "how many",
                "answers": [{"answer": a} for a in ["2"] * 2 + ["3"] * 8],
            },
        ]
    }
    questions = {"questions": [{"question_id": 1}, {"question_id": 2}]}
    scores = score_vqav2(
        annotations, questions, [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}]
    )
    assert scores == {
        "overall": 80.0,
        "per_answer_type": {"number": 60.0, "yes/no": 100.0},
        "per_question_type": {"how many": 60.0, "is the": 100.0},
    }
    with pytest.raises(ScoreInputError, match="no answer for 2"):
        score_vqav2(annotations, questions, [{"question_id": 1, "answer": "yes"}])


def test_textvqa_recovers_the_question_from_the_prompt():
    suffix = "Answer the question using a single word or phrase."
    assert textvqa_question(f"What brand?\nReference OCR token: acme, co\n{suffix}") == "what brand?"
    assert textvqa_question(f"Reference OCR token: acme\nWhat brand?\n{suffix}") == "what brand?"
    assert textvqa_question(f"What Brand?\n{suffix}") == "what brand?"
    annotations = {"data": [{"image_id": "img1", "question": "What brand?", "answers": ["Acme"] * 6 + ["acme co"] * 4}]}
    answers = [{"question_id": "img1", "prompt": f"What brand?\nReference OCR token: acme\n{suffix}", "text": "ACME."}]
    assert score_textvqa(annotations, answers) == {"accuracy": 100.0}


def test_gqa_exact_match_after_trailing_periods_and_case():
    questions = {
        "q1": {"answer": "left", "types": {"structural": "query"}, "isBalanced": True},
        "q2": {"answer": "yes", "types": {"structural": "verify"}, "isBalanced": True},
        "q3": {"answer": "no", "types": {"structural": "logical"}, "isBalanced": True},
    }
    answers = [
        {"question_id": "q1", "text": "Left."},
        {"question_id": "q2", "text": "Yes"},
        {"question_id": "q3", "text": "no, it is not"},
    ]
    assert score_gqa(questions, answers) == {"accuracy": 66.67, "binary": 50.0, "open": 100.0}


def test_parsing_rules():
    assert [pope_prediction(t) for t in ("No", "no.", "Yes, there is", "NO", "Nope", "", "There is not.")] == [
        "no",
        "no",
        "yes",
        "yes",
        "yes",
        "yes",
        "no",
    ]
    assert [mme_prediction(t) for t in ("Yes", "no", "Yes, it is", "Not really", "maybe")] == [
        "yes",
        "no",
        "yes",
        "no",
        "other",
    ]
    assert [parse_letter(t) for t in ("B", "B. apostrophe", "b", "(B)", "The answer is C.", "B.")] == [
        "B",
        "B",
        "FAILED",
        "FAILED",
        "C",
        "FAILED",
    ]


def test_pope_refuses_misordered_or_missing_answers(tmp_path):
    (tmp_path / "ann").mkdir()
    labels = [{"question_id": i, "image": f"{i}.jpg", "text": f"Is there a cat {i}?", "label": "yes"} for i in range(3)]
    (tmp_path / "ann" / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in labels))
    questions = [{**r, "category": "random"} for r in labels]
    answers = [{"question_id": i, "text": "Yes"} for i in (0, 2, 1)]
    with pytest.raises(ScoreInputError, match="not in question-file order"):
        score_pope(questions, answers, tmp_path / "ann")
    with pytest.raises(ScoreInputError, match="no answer for 1"):
        score_pope(questions, answers[:2], tmp_path / "ann")
    with pytest.raises(ScoreInputError, match="duplicate answers for 0"):
        score_pope(questions, answers + answers[:1], tmp_path / "ann")


def test_cli_refuses_with_the_ids_and_exit_status_2(tmp_path):
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"id": "1", "conversations": [{"value": "A. x\nB. y"}, {"value": "A"}]})
    )
    (tmp_path / "q.json").write_text(
        json.dumps(
            [
                {"id": "1", "conversations": [{"value": "A. x\nB. y"}, {"value": "A"}]},
                {"id": "2", "conversations": [{"value": "A. x\nB. y"}, {"value": "B"}]},
            ]
        )
    )
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": "1", "text": "A"}) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipha_lab.eval",
            "score",
            "scienceqa-img",
            "--questions",
            str(tmp_path / "q.json"),
            "--answers",
            str(tmp_path / "a.jsonl"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert "no answer for 2" in out.stderr


def test_submission_files(tmp_path):
    from mipha_lab.eval.submission import gqa_predictions, mmbench_table, vqav2_upload

    split = tmp_path / "test2015.jsonl"
    split.write_text("".join(json.dumps({"question_id": i, "text": "?"}) + "\n" for i in (1, 2, 3)))
    upload = vqav2_upload(
        {"test_split": split}, [{"question_id": 1, "text": "Two dogs."}, {"question_id": 3, "text": "Yes"}], tmp_path
    )
    assert json.loads(upload.read_text()) == [
        {"question_id": 1, "answer": "2 dogs"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "yes"},
    ]
    gqa = gqa_predictions({}, [{"question_id": "q1", "text": "Left."}], tmp_path)
    assert json.loads(gqa.read_text()) == [{"questionId": "q1", "prediction": "left"}]
    table = tmp_path / "mmb.tsv"
    table.write_text("index\tquestion\thint\tA\tB\tanswer\timage\n7\tWhich?\tnan\tcat\tdog\tB\tAAAA\n")
    out = mmbench_table({"questions": table}, [{"question_id": 7, "text": "B"}], tmp_path)
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["index", "question", "A", "B", "answer", "prediction"]
    assert lines[1].split("\t") == ["7", "Which?", "cat", "dog", "B", "B"]


@needs_fixtures
@pytest.mark.parametrize(
    "name,folder,answers",
    [
        ("scienceqa-img", "scienceqa", "llava-v1.5-13b.jsonl"),
        ("mmbench", "mmbench", "llava-v1.5-13b.jsonl"),
    ],
)
def test_prompts_are_the_ones_llava_asked(name, folder, answers):
    """Our prompt construction reproduces the `prompt` field of LLaVA's released answer files (for MMBench
    LLaVA records the prompt before it appends the letter suffix, and the fixture table has no hint
    column, so a hinted prompt must end with ours)."""
    from mipha_lab.eval.benchmarks import LETTER, mmbench_questions, scienceqa_questions

    d = LLAVA / folder
    if name == "mmbench":
        questions = mmbench_questions({"questions": d / "llava-v1.5-13b_dev_20230712.tsv"})
    else:
        questions = scienceqa_questions({"questions": d / "llava_test_CQM-A.json", "images": d})
    asked = {str(a["question_id"]): a["prompt"].replace("<image>\n", "") for a in read_jsonl(d / answers)}
    ours = {str(q.question_id): q.text.removesuffix("\n" + LETTER) if name == "mmbench" else q.text for q in questions}
    assert ours.keys() == asked.keys()
    different = [
        k for k in ours if ours[k] != asked[k] and not (name == "mmbench" and asked[k].endswith("\n" + ours[k]))
    ]
    assert not different, (len(different), ours[different[0]][-300:], asked[different[0]][-300:])


def test_score_flags_come_from_each_benchmarks_files(tmp_path):
    """`eval score NAME` asks for the files NAME's scorer reads (its declared roles), then the answers."""
    annotations = {
        "annotations": [
            {"question_id": 1, "answer_type": "yes/no", "question_type": "is the", "answers": [{"answer": "yes"}] * 10},
            {
                "question_id": 2,
                "answer_type": "number",
                "question_type": "how many",
                "answers": [{"answer": a} for a in ["2"] * 2 + ["3"] * 8],
            },
        ]
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    (tmp_path / "q.json").write_text(
        json.dumps(
            {
                "questions": [
                    {"question_id": 1, "image_id": 7, "question": "Is it?"},
                    {"question_id": 2, "image_id": 7, "question": "How many?"},
                ]
            }
        )
    )
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps(a) + "\n" for a in [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "two"}])
    )
    scores = score_cli(
        "vqav2-val",
        "--questions",
        tmp_path / "q.json",
        "--annotations",
        tmp_path / "ann.json",
        "--answers",
        tmp_path / "a.jsonl",
    )
    assert scores["overall"] == 80.0  # 1.0 and 0.6 by the official rule
    help_text = subprocess.run(
        [sys.executable, "-m", "mipha_lab.eval", "score", "mme", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "--questions" in help_text and "--ground-truth" in help_text and "--answers" in help_text
    missing = subprocess.run(
        [sys.executable, "-m", "mipha_lab.eval", "score", "gqa", "--answers", str(tmp_path / "a.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "--annotations" in missing.stderr
