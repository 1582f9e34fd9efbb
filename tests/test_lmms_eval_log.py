"""lmms-eval sample logs scored by our official scorers. The logs are written by lmms-eval itself: its
`from_log` model replays LLaVA-1.5-13B's released answers (../shared/fixtures) through local tasks that
use lmms-eval's stock task functions (prompt, target, process_results) on the released questions, so
the rows hold exactly what lmms-eval 0.7.3 logs. Scored from those logs, POPE, MME, ScienceQA-IMG and
MMBench must give the official tools' published numbers; GQA and TextVQA are checked on answers the
official rules score differently from lmms-eval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'mipha-lab[lmms-eval]')")

from mipha_lab.eval.__main__ import main
from mipha_lab.eval.lmms_eval_log import score_harness_logs, score_log
from mipha_lab.eval.scoring.answers import ScoreInputError, read_json, read_jsonl
from mipha_lab.eval.scoring.mmbench import read_table
from mipha_lab.eval.scoring.mme import official_question, read_ground_truth

SHORT = "\\nAnswer the question using a single word or phrase."
LETTER = "\\nAnswer with the option's letter from the given choices directly."
TASK = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.no_image
doc_to_text: !function utils.{doc_to_text}
doc_to_target: {target}
{process}
metric_list:
{metrics}
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "{post}", format: default, ocr: false}}
"""
UTILS = """from lmms_eval.tasks.gqa.utils import gqa_doc_to_text
from lmms_eval.tasks.mmbench.cn_utils import mmbench_doc_to_text as mmbench_cn_doc_to_text
from lmms_eval.tasks.mmbench.cn_utils import mmbench_process_results as mmbench_cn_process_results
from lmms_eval.tasks.mmbench.en_utils import mmbench_doc_to_text, mmbench_process_results
from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_doc_to_text, mme_process_results
from lmms_eval.tasks.pope.utils import pope_aggregate_f1_score, pope_aggregate_yes_ratio, pope_doc_to_text
from lmms_eval.tasks.pope.utils import pope_process_results
from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_target, sqa_doc_to_text, sqa_process_results
from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text, textvqa_process_results


def no_image(doc):
    return []  # from_log answers without looking


def count(items):
    return len(items)
"""
POPE_METRICS = """  - {metric: pope_f1_score, aggregation: !function utils.pope_aggregate_f1_score}
  - {metric: pope_yes_ratio, aggregation: !function utils.pope_aggregate_yes_ratio}"""
MME_METRICS = """  - {metric: mme_perception_score, aggregation: !function utils.mme_aggregate_results}
  - {metric: mme_cognition_score, aggregation: !function utils.mme_aggregate_results}"""
EXACT = "  - {metric: exact_match, aggregation: mean, ignore_case: true, ignore_punctuation: true}"
COUNTED = "  - {{metric: {}, aggregation: !function utils.count}}"


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pope_docs(d: Path) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """lmms-lab's POPE fields per split; a split's n-th question has its n-th label (the official pairing)."""
    labels = {split: read_jsonl(d / f"coco/coco_pope_{split}.json") for split in ("adversarial", "popular", "random")}
    answers = {a["question_id"]: a["text"] for a in read_jsonl(d / "llava-v1.5-13b.jsonl")}
    docs: dict[str, list[dict]] = {split: [] for split in labels}
    said: dict[str, list[str]] = {split: [] for split in labels}
    for q in read_jsonl(d / "llava_pope_test.jsonl"):
        split = q["category"]
        label = labels[split][len(docs[split])]["label"]
        docs[split].append({"question_id": str(q["question_id"]), "question": q["text"].split("\n")[0],
                            "answer": label, "category": split, "image_source": q["image"][:-4]})  # fmt: skip
        said[split].append(answers[q["question_id"]])
    return docs, said


def mme_docs(d: Path) -> tuple[list[dict], list[str]]:
    gold = read_ground_truth(d / "ground_truth")
    docs = []
    for q in read_jsonl(d / "llava_mme.jsonl"):
        subtask, image = q["category"], q["question_id"].split("/")[-1]
        question = official_question(q["text"], subtask, image, gold)  # lmms-lab's MME keeps the official wording
        docs.append({"question_id": q["question_id"], "question": question, "answer": gold[(subtask, image, question)],
                     "category": subtask})  # fmt: skip
    return docs, [a["text"] for a in read_jsonl(d / "llava-v1.5-13b.jsonl")]


def scienceqa_docs(d: Path) -> tuple[list[dict], list[str]]:
    """The 2,017 image questions (scienceqa_img): choices as a list, the answer as the choice's index."""
    answers = {str(a["question_id"]): a["text"] for a in read_jsonl(d / "llava-v1.5-13b.jsonl")}
    docs, said = [], []
    for q in read_json(d / "llava_test_CQM-A.json"):
        if not q.get("image"):
            continue
        text, gold = q["conversations"][0]["value"].replace("<image>", "").strip(), q["conversations"][1]["value"]
        choices = re.findall(r"^[A-E]\. (.*)$", text, re.MULTILINE)
        question = text[: text.index("\nA. ")]
        docs.append({"question": question, "hint": "", "choices": choices, "answer": "ABCDE".index(gold)})
        said.append(answers[str(q["id"])])
    return docs, said


def mmbench_docs(d: Path) -> tuple[list[dict], list[str]]:
    answers = {a["question_id"]: a["text"] for a in read_jsonl(d / "llava-v1.5-13b.jsonl")}
    rows = read_table(d / "llava-v1.5-13b_dev_20230712.tsv")
    docs = [
        {"index": int(r["index"]), "question": r["question"], "hint": "nan", "answer": r["answer"], "category": "c",
         "L2-category": "l2", "source": "s", "split": "dev", **{letter: r[letter] or "nan" for letter in "ABCD"}}
        for r in rows
    ]  # fmt: skip
    return docs, [answers[int(r["index"])] for r in rows]


GQA_DOCS = [{"id": "1", "question": "Is it?", "answer": "yes"}, {"id": "2", "question": "What?", "answer": "t-shirt"},
            {"id": "3", "question": "Where?", "answer": "left"}]  # fmt: skip
GQA_SAID = ["Yes.", "tshirt", "Left"]
TEXTVQA = [
    {"image_id": "a1", "question": "what brand?", "question_id": 11, "answers": ["Nokia"] * 6 + ["nokia phone"] * 4},
    {"image_id": "b2", "question": "what year?", "question_id": 12, "answers": ["1999"] * 2 + ["2000"] * 8},
    {"image_id": "c3", "question": "not asked?", "question_id": 13, "answers": ["x"] * 10},
]
TEXTVQA_SAID = ["nokia", "1999"]


def add_task(folder: Path, logs: Path, name: str, docs: list[dict], said: list[str], **fields: str) -> None:
    """A local task (lmms-eval's stock functions on these documents) and from_log's record of the answers."""
    with (folder / f"{name}.jsonl").open("w") as out:
        out.writelines(json.dumps(doc) + "\n" for doc in docs)
    (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=folder / f"{name}.jsonl", **fields))
    record = {
        "args": {"model": "llava-v1.5-13b", "model_args": "", "limit": None},
        "model_configs": {"task": name},
        "time": "1207_1000",
        "logs": [{"doc_id": n, "resps": [[answer]]} for n, answer in enumerate(said)],
    }
    (logs / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def logged(shared_fixtures: Path, tmp_path_factory) -> dict[str, Path]:
    """{task: its sample log}, written by `python -m lmms_eval --model from_log` on the local tasks."""
    golden = shared_fixtures / "llava-v1.5-13b"
    folder, logs, out = (tmp_path_factory.mktemp(name) for name in ("tasks", "replay", "out"))
    (folder / "utils.py").write_text(UTILS)
    pope = "process_results: !function utils.pope_process_results"
    docs, said = pope_docs(golden / "pope")
    for split in docs:
        add_task(folder, logs, f"golden_pope_{split}", docs[split], said[split], doc_to_text="pope_doc_to_text",
                 target="answer", process=pope, metrics=POPE_METRICS, post=SHORT)  # fmt: skip
    add_task(folder, logs, "golden_mme", *mme_docs(golden / "mme"), doc_to_text="mme_doc_to_text", target="answer",
             process="process_results: !function utils.mme_process_results", metrics=MME_METRICS,
             post=SHORT)  # fmt: skip
    add_task(folder, logs, "golden_sqa", *scienceqa_docs(golden / "scienceqa"), doc_to_text="sqa_doc_to_text",
             target="!function utils.sqa_doc_to_target", process="process_results: !function utils.sqa_process_results",
             metrics=EXACT, post=LETTER)  # fmt: skip
    add_task(folder, logs, "golden_mmbench", *mmbench_docs(golden / "mmbench"), doc_to_text="mmbench_doc_to_text",
             target="answer", process="process_results: !function utils.mmbench_process_results",
             metrics=COUNTED.format("gpt_eval_score") + "\n" + COUNTED.format("submission"), post=LETTER)  # fmt: skip
    add_task(folder, logs, "golden_mmbench_cn", *mmbench_docs(golden / "mmbench"), doc_to_text="mmbench_cn_doc_to_text",
             target="answer", process="process_results: !function utils.mmbench_cn_process_results",
             metrics=COUNTED.format("gpt_eval_score") + "\n" + COUNTED.format("submission"),
             post="\\n请直接使用所提供的选项字母作为答案回答。")  # fmt: skip
    add_task(folder, logs, "toy_gqa", GQA_DOCS, GQA_SAID, doc_to_text="gqa_doc_to_text", target="answer", process="",
             metrics=EXACT, post=SHORT)  # fmt: skip
    add_task(folder, logs, "toy_textvqa", [{**d, "ocr_tokens": []} for d in TEXTVQA[:2]], TEXTVQA_SAID,
             doc_to_text="textvqa_doc_to_text", target="answer",
             process="process_results: !function utils.textvqa_process_results",
             metrics=EXACT + "\n" + COUNTED.format("submission"), post=SHORT)  # fmt: skip
    tasks = sorted(path.stem for path in folder.glob("*.yaml"))
    command = [sys.executable, "-m", "lmms_eval", "--model", "from_log", "--model_args", f"logs={logs}"]
    command += ["--tasks", ",".join(tasks), "--include_path", str(folder), "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = {path.stem.split("_samples_", 1)[1]: path for path in out.rglob("*_samples_*.jsonl")}
    assert sorted(found) == tasks
    return found


def test_pope_split_logs_give_the_official_numbers(logged):
    """Each split task's log: the official F1, accuracy and (predicted) yes-ratio of that split."""
    expected = {"adversarial": (84.46, 85.50, 43.30), "popular": (86.25, 87.43, 41.37), "random": (87.14, 88.01, 41.68)}
    for split, (f1, accuracy, yes_ratio) in expected.items():
        name, scores = score_log(logged[f"golden_pope_{split}"], "pope")
        assert (name, scores["f1"], scores["accuracy"], scores["yes_ratio"]) == ("pope", f1, accuracy, yes_ratio)


def test_mme_log_gives_the_official_numbers(logged):
    _, scores = score_log(logged["golden_mme"], "mme")
    assert (scores["perception"], scores["cognition"]) == (1531.32, 295.36)
    assert scores["subtasks"]["artwork"] == 117.75 and scores["subtasks"]["code_reasoning"] == 47.50


def test_scienceqa_img_log_gives_the_official_number(logged):
    assert score_log(logged["golden_sqa"], "scienceqa-img") == ("scienceqa-img", {"img_accuracy": 71.64})


def test_mmbench_log_gives_the_official_circular_numbers(logged, tmp_path):
    name, scores = score_log(logged["golden_mmbench"], "mmbench")
    assert (name, scores) == ("mmbench", {"circular": 67.69, "all_rows": 76.45, "original_rows": 75.43})
    rows = rows_of(logged["golden_mmbench"])
    originals = tmp_path / "x_samples_mmbench_en_dev.jsonl"  # a dev set without its rotated copies
    originals.write_text("".join(json.dumps(r) + "\n" for r in rows if r["gpt_eval_score"]["index"] < 1_000_000))
    assert score_log(originals) == ("mmbench", {"original_rows": 75.43})  # no CircularEval claimed


def test_mmbench_cn_log_reads_its_options_from_the_cn_prompt(logged):
    """The English dev rows through lmms-eval's MMBench-CN task functions (its prompt, its logged metric)."""
    scores = {"circular": 67.69, "all_rows": 76.45, "original_rows": 75.43}
    assert score_log(logged["golden_mmbench_cn"], "mmbench-cn") == ("mmbench-cn", scores)


def test_gqa_log_uses_the_official_exact_match_not_lmms_evals_punctuation_stripping(logged):
    """Official: `rstrip('.').lower()` then exact match ("Yes." is right, "tshirt" is not "t-shirt")."""
    assert score_log(logged["toy_gqa"], "gqa") == ("gqa", {"accuracy": 66.67})
    assert [row["exact_match"] for row in rows_of(logged["toy_gqa"])] == [
        1.0,
        1.0,
        1.0,
    ]  # lmms-eval's own rule, for contrast


def test_textvqa_log_reads_the_official_annotations_by_question_id(logged, tmp_path):
    with pytest.raises(ScoreInputError, match=r"TextVQA_0.5.1_val.json under --data-root"):
        score_log(logged["toy_textvqa"], "textvqa")
    root = tmp_path / "data"
    (root / "eval/textvqa").mkdir(parents=True)
    (root / "eval/textvqa/TextVQA_0.5.1_val.json").write_text(json.dumps({"data": TEXTVQA}))
    # "nokia" matches 6 of 10 -> 1; "1999" matches 2 -> (8 x 2/3 + 2 x 1/3) / 10 = 0.6
    assert score_log(logged["toy_textvqa"], "textvqa", root) == ("textvqa", {"accuracy": 80.0})


def test_a_log_the_scorer_cannot_use_is_named(tmp_path):
    row = {"doc_id": 0, "target": "A", "filtered_resps": "A"}
    (tmp_path / "x_samples_mmstar.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ScoreInputError, match="task 'mmstar' is none of"):
        score_log(tmp_path / "x_samples_mmstar.jsonl")
    (tmp_path / "x_samples_vqav2_val.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ScoreInputError, match="logs neither the question id"):
        score_log(tmp_path / "x_samples_vqav2_val.jsonl")
    bad = tmp_path / "x_samples_mme.jsonl"
    bad.write_text(json.dumps(row) + '\n{"doc_id": 1\n')
    with pytest.raises(ScoreInputError, match=r"x_samples_mme.jsonl, line 2: not JSON"):
        score_log(bad)
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ScoreInputError, match=r"line 1: the row has no 'mme_perception_score' or 'mme_"):
        score_log(bad)


def test_the_command_prints_the_official_scores_and_refuses_bad_input_without_a_traceback(logged, capsys):
    assert main(["score-lmms-eval", str(logged["golden_pope_random"]), "--as", "pope", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == 87.14
    assert main(["score-lmms-eval", str(logged["golden_pope_random"])]) == 2
    error = capsys.readouterr().err
    assert "name the benchmark" in error and "Traceback" not in error


def test_harness_logs_beside_a_results_file_are_scored_and_the_rest_left(logged, tmp_path, caplog):
    """Only logs of this results file's date, known tasks or those named in score_as; one that cannot be scored
    is reported and left out; earlier scores are kept."""
    folder = tmp_path / "lmms-eval/model"
    folder.mkdir(parents=True)
    text = logged["golden_pope_random"].read_text()
    for name in ("d1_samples_pope_random", "d1_samples_my_pope", "d1_samples_other", "d0_samples_pope_adv"):
        (folder / f"{name}.jsonl").write_text(text)
    (folder / "d1_samples_textvqa_val.jsonl").write_text(logged["toy_textvqa"].read_text())
    (folder / "d1_results.json").write_text("{}")
    (tmp_path / "lmms-eval/official.json").write_text(json.dumps({"earlier": {"metric": "f1", "value": 1.0}}))
    scored = score_harness_logs(folder / "d1_results.json", tmp_path, {"my_pope": "pope"}, None)
    assert {task: (row["metric"], row["value"]) for task, row in scored.items()} == {
        "my_pope": ("f1", 87.14),
        "pope_random": ("f1", 87.14),
    }
    assert "textvqa_val: not scored by the official scorer" in caplog.text
    assert sorted(json.loads((tmp_path / "lmms-eval/official.json").read_text())) == [
        "earlier",
        "my_pope",
        "pope_random",
    ]


def test_lmms_evals_own_figures_on_the_same_answers_differ_where_the_readme_says(logged):
    """The table "Which harness for which number", measured: on LLaVA-1.5-13B's clean Yes/No answers the POPE
    F1 and MME agree, while lmms-eval's yes-ratio counts ground-truth labels (50.00; official 43.30)."""
    (results,) = logged["golden_pope_adversarial"].parent.glob("*_results.json")
    figures = json.loads(results.read_text())["results"]
    adversarial = figures["golden_pope_adversarial"]
    assert round(100 * adversarial["pope_f1_score,none"], 2) == 84.46
    assert round(100 * adversarial["pope_yes_ratio,none"], 2) == 50.0
    assert round(figures["golden_mme"]["mme_perception_score,none"], 2) == 1531.32
    assert round(100 * figures["golden_sqa"]["exact_match,none"], 2) == 71.64
