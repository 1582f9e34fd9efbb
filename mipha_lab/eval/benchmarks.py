"""The benchmarks: where their files live under a data root (LLaVA's evaluation bundle layout,
`eval/<benchmark>/...`, the layout Mipha's scripts expect), how a question becomes a prompt, how many
tokens an answer may take, and which scorer reads the answers."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mipha_lab.data.image_files import open_rgb
from mipha_lab.errors import ConfigError
from mipha_lab.eval import submission
from mipha_lab.eval.harness import harness_headlines
from mipha_lab.eval.scoring.answers import read_json, read_jsonl
from mipha_lab.eval.scoring.gqa import score_gqa
from mipha_lab.eval.scoring.mmbench import options, read_table, score_mmbench
from mipha_lab.eval.scoring.mme import score_mme
from mipha_lab.eval.scoring.pope import score_pope
from mipha_lab.eval.scoring.scienceqa import score_scienceqa
from mipha_lab.eval.scoring.vqa import score_textvqa, score_vqav2
from mipha_lab.eval.shapes import score_vqa
from mipha_lab.registry import Registry

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"
LLAVA_EVAL = "LLaVA's evaluation bundle (eval.zip of haotian-liu/LLaVA, docs/Evaluation.md)"
SYNTHETIC = "the synthetic generator (python -m mipha_lab.data.synthetic)"


BENCHMARKS: Registry[Any] = Registry("benchmark", "evaluation benchmarks: files, prompts, scorer")


@dataclass(frozen=True)
class Question:
    """One prompt: the text after `<image>\\n` (None image: a text-only question) and its record fields."""

    question_id: Any
    text: str
    image: Callable[[], Image.Image] | None
    category: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's files live, how its questions are asked, and how its answers are scored."""

    name: str
    description: str
    files: dict[str, str]  # role -> path relative to the data root; "questions" is the one read to ask
    load: Callable[[dict[str, Path]], list[Question]]
    score: Callable[..., dict[str, Any]] | None  # (paths, answers, records list or None) -> scores
    headline: str  # the key of the figure the summary table shows
    score_files: tuple[str, ...] = ()  # the files (roles) the scorer reads besides the answers: `eval score` flags
    max_new_tokens: int = 128
    source: str = LLAVA_EVAL
    submission: Callable[[dict[str, Path], list[dict[str, Any]], Path], Path] | None = None  # a file for the server

    def paths(self, data_root: str | Path) -> dict[str, Path]:
        """The benchmark's files; a missing one is an error naming the expected path and the data's origin."""
        paths = {role: Path(data_root) / rel for role, rel in self.files.items()}
        for role, path in paths.items():
            if not path.exists():
                raise ConfigError(f"benchmark '{self.name}': {role} {path} does not exist (data from {self.source})")
        return paths


def _image_file(folder: Path, name: str) -> Callable[[], Image.Image]:
    return lambda: open_rgb(folder / name)


def _with_suffix(text: str, suffix: str) -> str:
    return text if text.rstrip().endswith(suffix) else text + "\n" + suffix


def llava_questions(paths: dict[str, Path]) -> list[Question]:
    """A LLaVA question file: {question_id, image, text, category}; the suffix is already in `text`."""
    return [
        Question(q["question_id"], q["text"], _image_file(paths["images"], q["image"]), q.get("category"))
        for q in read_jsonl(paths["questions"])
    ]


def scienceqa_questions(paths: dict[str, Path]) -> list[Question]:
    """llava_test_CQM-A.json: the first turn without `<image>`, plus the letter suffix; 2,224 have no image."""
    return [
        Question(
            q["id"],
            _with_suffix(q["conversations"][0]["value"].replace("<image>", "").strip(), LETTER),
            _image_file(paths["images"], q["image"]) if q.get("image") else None,
        )
        for q in read_json(paths["questions"])
    ]


def _base64_image(data: str) -> Callable[[], Image.Image]:
    return lambda: open_rgb(io.BytesIO(base64.b64decode(data)))


def mmbench_questions(paths: dict[str, Path], suffix: str = LETTER) -> list[Question]:
    """`[hint\\n]question\\nA. ..\\nB. ..` (options up to the first missing one) + the letter suffix."""

    questions = []
    for row in read_table(paths["questions"]):
        hint = (row.get("hint") or "").strip()
        text = (hint + "\n" if hint and hint.lower() != "nan" else "") + row["question"]
        text += "".join(f"\n{letter}. {value}" for letter, value in options(row).items())
        image = _base64_image(row["image"]) if row.get("image") else None
        questions.append(Question(int(row["index"]), text + "\n" + suffix, image, row.get("category")))
    return questions


def vqav2_val_questions(paths: dict[str, Path]) -> list[Question]:
    """The official val questions with LLaVA's VQAv2 prompt (the question, then the short-answer suffix)."""
    return [
        Question(
            q["question_id"],
            _with_suffix(q["question"], SHORT),
            _image_file(paths["images"], f"COCO_val2014_{q['image_id']:012d}.jpg"),
        )
        for q in read_json(paths["questions"])["questions"]
    ]


def _vqav2_val_score(
    paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None
) -> dict[str, Any]:
    results = [{"question_id": a["question_id"], "answer": a["text"]} for a in answers]
    return score_vqav2(read_json(paths["annotations"]), read_json(paths["questions"]), results, records)


def _pope_score(paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None) -> dict[str, Any]:

    return score_pope(read_jsonl(paths["questions"]), answers, paths["annotations"], records)


def _mme_score(paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None) -> dict[str, Any]:

    return score_mme(read_jsonl(paths["questions"]), answers, paths["ground_truth"], records)


def _scienceqa_score(
    paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None
) -> dict[str, Any]:

    return score_scienceqa(read_json(paths["questions"]), answers, records)


def _textvqa_score(
    paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None
) -> dict[str, Any]:

    return score_textvqa(read_json(paths["annotations"]), answers, records)


def _gqa_score(paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None) -> dict[str, Any]:

    return score_gqa(read_json(paths["annotations"]), answers, records)


def _mmbench_score(
    paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None
) -> dict[str, Any]:

    return score_mmbench(paths["questions"], answers, records)


def _shapes_vqa_score(
    paths: dict[str, Path], answers: list[dict[str, Any]], records: list | None = None
) -> dict[str, Any]:

    return score_vqa(answers, read_jsonl(paths["truth"]), records)


BENCHMARKS.register("vqav2")(
    Benchmark(
        "vqav2",
        "VQAv2 test-dev: answers for the EvalAI upload (no public ground truth; score val offline with "
        "`eval score vqav2`)",
        {
            "questions": "eval/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
            "images": "eval/vqav2/test2015",
            "test_split": "eval/vqav2/llava_vqav2_mscoco_test2015.jsonl",
        },
        llava_questions,
        None,
        "overall",
        submission=submission.vqav2_upload,
    )
)
BENCHMARKS.register("vqav2-val")(
    Benchmark(
        "vqav2-val",
        "VQAv2 val, the official VQA accuracy (offline: the val ground truth is public)",
        {
            "questions": "eval/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
            "images": "eval/vqav2/val2014",
            "annotations": "eval/vqav2/v2_mscoco_val2014_annotations.json",
        },
        vqav2_val_questions,
        _vqav2_val_score,
        "overall",
        score_files=("questions", "annotations"),
        source="the official VQAv2 val files (visualqa.org) and COCO val2014 images",
    )
)
BENCHMARKS.register("gqa")(
    Benchmark(
        "gqa",
        "GQA testdev-balanced, exact match",
        {
            "questions": "eval/gqa/llava_gqa_testdev_balanced.jsonl",
            "images": "eval/gqa/data/images",
            "annotations": "eval/gqa/data/testdev_balanced_questions.json",
        },
        llava_questions,
        _gqa_score,
        "accuracy",
        score_files=("annotations",),
        submission=submission.gqa_predictions,
    )
)
BENCHMARKS.register("scienceqa-img")(
    Benchmark(
        "scienceqa-img",
        "ScienceQA test, accuracy on the 2,017 image questions",
        {"questions": "eval/scienceqa/llava_test_CQM-A.json", "images": "eval/scienceqa/images/test"},
        scienceqa_questions,
        _scienceqa_score,
        "img_accuracy",
        score_files=("questions",),
        max_new_tokens=1024,
    )
)
BENCHMARKS.register("textvqa")(
    Benchmark(
        "textvqa",
        "TextVQA val with OCR tokens, VQA accuracy (EvalAI processor)",
        {
            "questions": "eval/textvqa/llava_textvqa_val_v051_ocr.jsonl",
            "images": "eval/textvqa/train_images",
            "annotations": "eval/textvqa/TextVQA_0.5.1_val.json",
        },
        llava_questions,
        _textvqa_score,
        "accuracy",
        score_files=("annotations",),
    )
)
BENCHMARKS.register("pope")(
    Benchmark(
        "pope",
        "POPE (COCO) adversarial / popular / random, mean F1",
        {
            "questions": "eval/pope/llava_pope_test.jsonl",
            "images": "eval/pope/val2014",
            "annotations": "eval/pope/coco",
        },
        llava_questions,
        _pope_score,
        "mean_f1",
        score_files=("questions", "annotations"),
    )
)
BENCHMARKS.register("mme")(
    Benchmark(
        "mme",
        "MME perception and cognition",
        {
            "questions": "eval/MME/llava_mme.jsonl",
            "images": "eval/MME/MME_Benchmark_release_version",
            "ground_truth": "eval/MME/eval_tool/Your_Results",
        },
        llava_questions,
        _mme_score,
        "perception",
        score_files=("questions", "ground_truth"),
    )
)
BENCHMARKS.register("mmbench")(
    Benchmark(
        "mmbench",
        "MMBench dev EN, CircularEval",
        {"questions": "eval/mmbench/mmbench_dev_20230712.tsv"},
        mmbench_questions,
        _mmbench_score,
        "circular",
        score_files=("questions",),
        max_new_tokens=1024,
        source="MMBench (opencompass) dev 20230712 TSV",
        submission=submission.mmbench_table,
    )
)
BENCHMARKS.register("mmbench-cn")(
    Benchmark(
        "mmbench-cn",
        "MMBench dev CN, CircularEval",
        {"questions": "eval/mmbench_cn/mmbench_dev_cn_20231003.tsv"},
        lambda paths: mmbench_questions(paths, LETTER_CN),
        _mmbench_score,
        "circular",
        score_files=("questions",),
        max_new_tokens=1024,
        source="MMBench-CN (opencompass) dev 20231003 TSV",
        submission=submission.mmbench_table,
    )
)
BENCHMARKS.register("shapes-vqa")(
    Benchmark(
        "shapes-vqa",
        "synthetic shapes: colour / shape / count / position / yes-no, exact match",
        {
            "questions": "shapes/eval/shapes-vqa/questions.jsonl",
            "images": "shapes/images",
            "truth": "shapes/eval/shapes-vqa/answers.jsonl",
        },
        llava_questions,
        _shapes_vqa_score,
        "accuracy",
        score_files=("truth",),
        max_new_tokens=8,
        source=SYNTHETIC,
    )
)
BENCHMARKS.register("shapes-pope")(
    Benchmark(
        "shapes-pope",
        "synthetic shapes existence questions in POPE's format, scored by the POPE scorer",
        {
            "questions": "shapes/eval/shapes-pope/questions.jsonl",
            "images": "shapes/images",
            "annotations": "shapes/eval/shapes-pope/annotations",
        },
        llava_questions,
        _pope_score,
        "mean_f1",
        score_files=("questions", "annotations"),
        max_new_tokens=8,
        source=SYNTHETIC,
    )
)

PAPER_ORDER = ("vqav2", "gqa", "scienceqa-img", "textvqa", "pope", "mme", "mmbench")


def headline_scores(eval_folder: Path) -> dict[str, float]:
    """The headline figure of each benchmark in a run's eval/summary.csv (written by eval.runner), then each
    lmms-eval task's, marked `(lmms-eval)`; {} without any."""

    summary = Path(eval_folder) / "summary.csv"
    harness = {task: value for task, (_, value) in harness_headlines(Path(eval_folder)).items()}
    if not summary.is_file():
        return harness
    with summary.open() as handle:
        rows = list(csv.DictReader(handle))
    ours = {
        r["benchmark"]: float(r["value"])
        for r in rows
        if r["benchmark"] in BENCHMARKS and BENCHMARKS.get(r["benchmark"]).headline == r["metric"]
    }
    return {**ours, **harness}
