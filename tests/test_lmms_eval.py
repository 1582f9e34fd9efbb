"""A mipha-lab model inside lmms-eval, offline: a local task built from the synthetic shapes (POPE-style
questions scored by lmms-eval's own stock POPE functions), `python -m lmms_eval --model mipha_lab` end to
end; its answers must be exactly our `answer_questions`' for the same prompts, and its scores follow from
them by lmms-eval's rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'mipha-lab[lmms-eval]')")

from mipha_lab.data.templates import get_template
from mipha_lab.eval.benchmarks import headline_scores, llava_questions
from mipha_lab.eval.generate import answer_questions
from mipha_lab.eval.scoring.answers import read_jsonl
from mipha_lab.eval.scoring.pope import score_pope, split_name
from mipha_lab.model import build_vlm, load_model
from tests.test_resume import launch

QUESTIONS = 24
SUFFIX = "\nAnswer the question using a single word or phrase."
TASK = """task: shapes_pope_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false}}
process_results: !function utils.pope_process_results
metric_list:
  - {{metric: pope_accuracy, aggregation: !function utils.pope_aggregate_accuracy, higher_is_better: true}}
  - {{metric: pope_f1_score, aggregation: !function utils.pope_aggregate_f1_score, higher_is_better: true}}
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "\\nAnswer the question using a single word or phrase."}}
"""
UTILS = """from PIL import Image
from lmms_eval.tasks.pope.utils import (  # lmms-eval's stock POPE scoring
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_doc_to_text,
    pope_process_results,
)


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory, data_root) -> Path:
    """The first QUESTIONS shapes-pope questions as an lmms-eval task folder (`--include_path`)."""
    folder = tmp_path_factory.mktemp("task")
    pope = data_root / "shapes/eval/shapes-pope"
    labels, splits = {}, {}
    for split in (pope / "annotations").glob("*.json"):
        for row in read_jsonl(split):
            labels[row["question_id"]], splits[row["question_id"]] = row["label"], split_name(split)
    rows = [json.loads(line) for line in (pope / "questions.jsonl").read_text().splitlines()][:QUESTIONS]
    with (folder / "test.jsonl").open("w") as out:
        for row in rows:
            assert row["text"].endswith(SUFFIX)
            doc = {
                "question_id": row["question_id"],
                "question": row["text"].removesuffix(SUFFIX),
                "answer": labels[row["question_id"]],
                "category": splits[row["question_id"]],  # as lmms-lab's POPE names the split
                "image_path": str(data_root / "shapes/images" / row["image"]),
            }
            out.write(json.dumps(doc) + "\n")
    (folder / "shapes_pope_local.yaml").write_text(TASK.format(data=folder / "test.jsonl"))
    (folder / "utils.py").write_text(UTILS)
    return folder


def logged(out: Path) -> tuple[dict, list[dict]]:
    """lmms-eval's results for the task and its per-sample log, by document."""
    (results,) = out.glob("*/*_results.json")
    (samples,) = out.glob("*/*_samples_shapes_pope_local.jsonl")
    rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda row: row["doc_id"])
    return json.loads(results.read_text())["results"]["shapes_pope_local"], rows


def our_answers(model_path: Path, data_root: Path) -> list[str]:
    model = load_model(model_path).eval()
    paths = {"questions": data_root / "shapes/eval/shapes-pope/questions.jsonl", "images": data_root / "shapes/images"}
    questions = llava_questions(paths)[:QUESTIONS]
    template = get_template(model.config.template)
    answers = answer_questions(model, template, questions, batch_size=8, max_new_tokens=8, progress=False)
    return [a["text"] for a in answers]


@pytest.mark.slow
def test_an_experiment_runs_lmms_eval_after_training_and_its_scores_follow_from_our_answers(tmp_path, data_root, task):
    """`eval.harness` on the micro experiment: lmms-eval's answers are `answer_questions`' for the same
    prompts, its accuracy is lmms-eval's rule applied to them, our official POPE scorer reads its log
    (`score_as`), and the run's scores show both, marked."""
    harness = f"eval.harness={{tasks: [shapes_pope_local], include_path: '{task}', limit: {QUESTIONS}, "
    harness += "score_as: {shapes_pope_local: pope}}"
    run = launch(tmp_path, data_root, "eval.benchmarks=[]", harness)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "runs/micro"
    scores, rows = logged(folder / "eval/lmms-eval")
    answers = [row["filtered_resps"] for row in rows]
    assert answers == our_answers(folder, data_root)
    targets = [row["target"] for row in rows]
    correct = [a.lower().strip() == t for a, t in zip(answers, targets, strict=True)]  # lmms-eval's POPE rule
    assert scores["pope_accuracy,none"] == pytest.approx(sum(correct) / QUESTIONS)
    ours = tmp_path / "ours/answers.jsonl"
    ours.parent.mkdir()
    ids = [row["pope_accuracy"]["question_id"] for row in rows]  # lmms-eval's stock POPE logs the question id
    ours.write_text(
        "".join(json.dumps({"question_id": i, "text": a}) + "\n" for i, a in zip(ids, answers, strict=True))
    )
    official = official_scores_of_our_answers(ours, data_root)
    assert headline_scores(folder / "eval") == {
        "shapes_pope_local (lmms-eval)": scores["pope_accuracy,none"],
        "shapes_pope_local (lmms-eval answers, official scorer)": official["f1"],
    }
    summary = (folder / "eval/summary.md").read_text()
    assert (
        "| shapes_pope_local (pope_accuracy, lmms-eval) | shapes_pope_local (f1, lmms-eval answers, official scorer) |"
        in summary
    )
    print(f"lmms-eval on the micro model: {scores}; official POPE scorer on its log: {official}")


@pytest.mark.slow
def test_eval_run_puts_lmms_eval_beside_ours_with_the_same_answers_word_for_word(tmp_path, data_root, task):
    """A random-init tiny model answers with varied tokens: `eval run --benchmarks shapes-pope
    --lmms-eval-tasks ...` gives lmms-eval exactly the prompts and images our own answering gets."""
    torch.manual_seed(0)
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2-scratch", template="phi")
    model.save_pretrained(tmp_path / "random")
    command = ["mipha_lab.eval", "run", str(tmp_path / "random"), "--benchmarks", "shapes-pope"]
    command += ["--lmms-eval-tasks", "shapes_pope_local", "--lmms-eval-include-path", str(task)]
    command += ["--lmms-eval-score-as", "shapes_pope_local=pope"]
    command += [
        "--data-root",
        str(data_root),
        "--limit",
        str(QUESTIONS),
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "eval"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _, rows = logged(tmp_path / "eval/lmms-eval")
    theirs = [row["filtered_resps"] for row in rows]
    ours = [json.loads(line)["text"] for line in (tmp_path / "eval/shapes-pope/answers.jsonl").read_text().splitlines()]
    assert len(set(theirs)) > 3  # not a constant answer
    assert theirs == ours
    summary = (tmp_path / "eval/summary.md").read_text()
    assert "shapes-pope (mean_f1)" in summary and "shapes_pope_local (pope_accuracy, lmms-eval)" in summary
    assert "shapes_pope_local (f1, lmms-eval answers, official scorer)" in summary
    official = json.loads((tmp_path / "eval/lmms-eval/official.json").read_text())["shapes_pope_local"]
    assert official["scores"] == official_scores_of_our_answers(tmp_path / "eval/shapes-pope/answers.jsonl", data_root)


def official_scores_of_our_answers(answers: Path, data_root: Path) -> dict:
    """The POPE scorer on LLaVA's file layout (golden-tested) for the questions answered, pooled as one split
    (they mix splits; the lmms-eval log does not say which)."""
    pope = data_root / "shapes/eval/shapes-pope"
    questions = [{**q, "category": "all"} for q in read_jsonl(pope / "questions.jsonl")[:QUESTIONS]]
    labels = {row["question_id"]: row for split in (pope / "annotations").glob("*.json") for row in read_jsonl(split)}
    cut = answers.parent / "pooled"
    cut.mkdir()
    (cut / "shapes_pope_all.json").write_text("".join(json.dumps(labels[q["question_id"]]) + "\n" for q in questions))
    return score_pope(questions, read_jsonl(answers), cut)["all"]


def test_loglikelihood_is_the_language_models_own_log_probability(tmp_path):
    """Text-only documents: the continuation's log-probability after the templated prompt equals what the
    transformers LM itself gives for the same ids (log-softmax of its logits), and `is_greedy` agrees."""
    from lmms_eval.api.instance import Instance

    from mipha_lab.data.templates import encode_prompt
    from mipha_lab.eval.lmms_eval_model import MiphaLab

    torch.manual_seed(0)
    build_vlm("tiny-siglip-so400m-384", "tiny-phi-2-scratch", template="phi").save_pretrained(tmp_path / "m")
    harness = MiphaLab.create_from_arg_string(f"pretrained={tmp_path / 'm'},batch_size=4", {"batch_size": 1})
    assert harness.batch_size == 4  # the model args win over lmms-eval's --batch_size
    harness.task_dict = {"t": {"test": [{"answer": " yes"}, {"answer": " no"}]}}
    requests = [
        Instance(
            request_type="loglikelihood",
            arguments=("Is it red?", lambda doc: doc["answer"], lambda doc: [], i, "t", "test"),
            idx=i,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(2)
    ]
    results = harness.loglikelihood(requests)
    lm = harness.model.language_model
    for (logprob, greedy), doc in zip(results, harness.task_dict["t"]["test"], strict=True):
        prompt = encode_prompt(harness.template, harness.model.tokenizer, [{"role": "user", "content": "Is it red?"}])
        target = harness.model.tokenizer(doc["answer"], add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        expected = logits.gather(1, torch.tensor(target)[:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(target)).all())
