"""Evaluation throughput: questions/s of batched greedy answering (batch 16 and 32) over batch 1 - the
way LLaVA/Mipha evaluate - on the synthetic shapes-vqa questions, measured in the same run, plus the
fraction of questions whose batched answer equals the batch-1 answer (fp32 on the CPU: 1.0 expected).

The model is a run folder or saved model given with --model, else one trained here briefly
(`experiments/micro.yaml`, about 20 s). Prints `eval_throughput: <speedup>x (...)` and writes
bench/results/eval_throughput.json (keys `speedup`, `agreement`).

    python bench/eval_throughput.py [--smoke] [--model RUN_OR_MODEL] [--questions N] [--out DIR]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import parser
from bench._results import report
from mipha_lab.data.templates import get_template
from mipha_lab.eval.benchmarks import (
    BENCHMARKS,
    llava_questions,
)
from mipha_lab.eval.generate import answer_questions
from mipha_lab.model import load_model


def trained_micro(workdir: Path) -> Path:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run(
        [sys.executable, "-m", "mipha_lab.launch", str(REPO / "experiments" / "micro.yaml"), "eval.benchmarks=[]"],
        cwd=workdir,
        check=True,
        capture_output=True,
        env=env,
    )
    return workdir / "runs" / "micro"


def timed_answers(model, questions, batch_size: int) -> tuple[float, list[str]]:
    template = get_template(model.config.template or "phi")
    start = time.perf_counter()
    answers = answer_questions(
        model, template, questions, batch_size=batch_size, max_new_tokens=8, desc=f"batch {batch_size}"
    )
    return len(questions) / (time.perf_counter() - start), [a["text"] for a in answers]


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "a hundred questions (what CI runs)")
    cli.add_argument("--model", type=Path, default=None)
    cli.add_argument("--questions", type=int, default=None)
    args = cli.parse_args(argv)
    count = args.questions or (96 if args.smoke else 480)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.model or trained_micro(Path(tmp))
        data_root = Path(tmp) / "data"  # where the micro run generated its data, else generated here
        if not (data_root / "shapes").is_dir():
            from mipha_lab.data.synthetic import generate

            generate(data_root / "shapes", n_train=1, n_eval=max(1, count // 5), progress=False)
        model = load_model(run)
        questions = llava_questions(BENCHMARKS.get("shapes-vqa").paths(data_root))[:count]
        rate_1, reference = timed_answers(model, questions, 1)
        rates, agreement = {}, {}
        for size in (16, 32):
            rates[size], texts = timed_answers(model, questions, size)
            agreement[size] = sum(a == b for a, b in zip(texts, reference, strict=True)) / len(reference)
    best = max(rates, key=rates.get)
    figures = {
        "speedup": rates[best] / rate_1,
        "agreement": min(agreement.values()),
        "questions": count,
        "questions_per_s": {"1": rate_1, **{str(k): v for k, v in rates.items()}},
        "agreement_per_batch": {str(k): v for k, v in agreement.items()},
        "smoke": args.smoke,
    }
    return report(
        "eval_throughput",
        figures,
        args.out,
        f"{figures['speedup']:.2f}x (questions/s at batch {best} over batch 1: {rates[best]:.1f} vs "
        f"{rate_1:.1f}, {count} shapes-vqa questions; answers equal to batch 1: {figures['agreement']:.1%})",
    )


if __name__ == "__main__":
    sys.exit(main())
