"""`python -m mipha_lab.eval run MODEL_OR_RUN --benchmarks pope,mme --data-root DIR [--batch-size N]
[--limit K] [--out DIR] [--cluster PROFILE [--wait]] [--lmms-eval-tasks mmstar,ai2d,pope]`: answer and score (as a
cluster job with --cluster), and run lmms-eval's tasks with the same model (their headlines marked; a task that
is one of the paper's benchmarks is also scored from its sample log by our official scorer);
`python -m mipha_lab.eval score BENCHMARK --answers A.jsonl --<file> PATH ...`: score an answer file (LLaVA's
format) with the official rules; the files each benchmark's scorer reads are its flags
(`python -m mipha_lab.eval score BENCHMARK --help`), for example

  score pope          --questions Q.jsonl --annotations DIR --answers A.jsonl
  score mme           --questions Q.jsonl --ground-truth DIR --answers A.jsonl
  score gqa           --annotations testdev_balanced_questions.json --answers A.jsonl
  score vqav2-val     --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations ANN.json --answers A.jsonl

`python -m mipha_lab.eval score-lmms-eval SAMPLES.jsonl [--as BENCHMARK] [--data-root DIR]`: an lmms-eval
per-sample log (`<date>_samples_<task>.jsonl`) scored by our official scorer (TextVQA reads the official
annotations under --data-root: its log has no ground-truth answers; a vqav2_val log cannot be scored).

Figures are percentages rounded to 2 decimals. With --json, stdout holds only one JSON object.
Answers that cannot be scored as given (missing, duplicate or misordered ids) are refused with the
ids named (exit status 2) rather than scored wrongly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mipha_lab.cluster.profile import load_profile
from mipha_lab.cluster.submit import submit_command
from mipha_lab.config import HarnessConfig
from mipha_lab.distributed import init_distributed
from mipha_lab.errors import ConfigError, exit_status
from mipha_lab.eval.benchmarks import BENCHMARKS
from mipha_lab.eval.lmms_eval_log import score_log
from mipha_lab.eval.runner import run_benchmarks, run_lmms_eval, write_summary
from mipha_lab.eval.scoring.answers import ScoreInputError, read_answers
from mipha_lab.model import load_model
from mipha_lab.registry.user_modules import import_modules


def format_scores(scores: dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in scores.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(format_scores(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value:.2f}" if isinstance(value, float) else f"{indent}{key}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Answers, scores and the summary under --out (default: <run>/eval for a run folder, else ./eval).
    With --nproc N (or under torchrun / SLURM) each process answers a share; rank 0 merges and scores."""

    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    tasks = [t.strip() for t in args.lmms_eval_tasks.split(",") if t.strip()]
    if not names and not tasks:
        raise ConfigError("name --benchmarks, --lmms-eval-tasks or both")
    for name in names:
        BENCHMARKS.get(name)  # an unknown name fails before the model loads, with suggestions
    model_path = Path(args.model)
    out = Path(args.out) if args.out else (model_path / "eval" if (model_path / "final").is_dir() else Path("eval"))
    if args.cluster:
        return submit(args, argv, out)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        child = without(argv, "--nproc")  # torchrun would take --nproc for its own option
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                "-m",
                "mipha_lab.eval",
                *child,
            ]
        )
    if tasks:  # its own process, before ours: the summary then shows both
        harness = HarnessConfig(
            tasks=tasks,
            include_path=args.lmms_eval_include_path,
            limit=args.limit,
            score_as=task_benchmarks(args.lmms_eval_score_as),
        )
        run_lmms_eval(model_path, harness, out, batch_size=args.batch_size, data_root=args.data_root)
        if not names:
            write_summary(out, {})
            return 0
    dist = init_distributed(process_group=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    import_modules(args.imports, "--import")
    model = load_model(model_path).to(dist.device)
    run_benchmarks(
        model,
        names,
        args.data_root,
        out,
        batch_size=args.batch_size,
        limit=args.limit,
        model_id=model_path.name,
        image_strategy=args.image_strategy,
        dist=dist,
        check_batch_invariance=args.check_batch_invariance,
    )
    return 0


def task_benchmarks(text: str) -> dict[str, str]:
    """`--lmms-eval-score-as shapes_pope=pope,my_mme=mme` as {task: benchmark}."""
    pairs = [pair.strip() for pair in text.split(",") if pair.strip()]
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--lmms-eval-score-as: expected TASK=BENCHMARK pairs, got {pair!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def without(argv: list[str], option: str, takes_value: bool = True) -> list[str]:
    """`argv` less `option` (as `--opt value` or `--opt=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = takes_value
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def submit(args: argparse.Namespace, argv: list[str], out: Path) -> int:
    """The same command as a cluster job (one task per --nproc), paths made absolute for the job."""

    child = without(without(without(argv, "--cluster"), "--wait", takes_value=False), "--nproc")
    child = [str(Path(a).resolve()) if a == args.model else a for a in child]
    child = [
        *without(without(child, "--out"), "--data-root"),
        "--out",
        str(Path(out).resolve()),
        "--data-root",
        str(Path(args.data_root).resolve()),
    ]
    job = submit_command(
        main,
        child,
        load_profile(args.cluster),
        Path(out).resolve() / ".jobs",
        f"eval-{Path(args.model).name}",
        tasks=args.nproc,
    )
    if args.wait:
        job.result()  # raises with the job's log when it failed
        print((Path(out) / "summary.md").read_text(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="answer and score benchmarks with a model or run folder")
    runner.add_argument("model", help="a run folder (its final/) or a saved model folder")
    runner.add_argument(
        "--benchmarks", default="", help="comma-separated names (python -m mipha_lab.registry list benchmark)"
    )
    runner.add_argument(
        "--lmms-eval-tasks",
        default="",
        metavar="TASKS",
        help="comma-separated lmms-eval tasks run with the mipha_lab model (needs the lmms-eval extra)",
    )
    runner.add_argument("--lmms-eval-include-path", default=None, help="a folder of local lmms-eval task YAMLs")
    runner.add_argument(
        "--lmms-eval-score-as",
        default="",
        metavar="TASK=BENCHMARK,...",
        help="lmms-eval tasks our official scorers read too, beyond lmms-eval's own pope, mme, gqa, ...",
    )
    runner.add_argument("--data-root", default="./data", help="holds eval/<benchmark>/ (LLaVA's layout) and shapes/")
    runner.add_argument("--batch-size", type=int, default=16)
    runner.add_argument("--limit", type=int, default=None, help="only the first K questions of each benchmark")
    runner.add_argument("--out", default=None)
    runner.add_argument("--image-strategy", default="pad", choices=["square", "pad", "resize-naive", "resize-crop"])
    runner.add_argument(
        "--check-batch-invariance",
        type=int,
        default=0,
        metavar="K",
        help="answer the first K questions again at batch 1 and report the agreement",
    )
    runner.add_argument(
        "--nproc", type=int, default=1, help="processes on this machine (torchrun), each answering a share"
    )
    runner.add_argument("--cluster", metavar="PROFILE", help="submit as a job: slurm/NAME.yaml or `local`")
    runner.add_argument("--wait", action="store_true", help="with --cluster: wait for the job and show the scores")
    runner.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first (it registers the model's own Python components)",
    )
    scorer = commands.add_parser("score", help="score an answer file").add_subparsers(dest="benchmark", required=True)
    for entry in BENCHMARKS:
        benchmark = entry.obj
        if benchmark.score is None:
            continue
        one = scorer.add_parser(entry.name, help=entry.description)
        for role in benchmark.score_files:
            one.add_argument(
                f"--{role.replace('_', '-')}",
                dest=role,
                type=Path,
                required=True,
                help=f"the benchmark's {role} (under a data root: {benchmark.files[role]})",
            )
        one.add_argument("--answers", type=Path, required=True, help="the answers, LLaVA's jsonl format")
        one.add_argument("--json", action="store_true", help="stdout holds only the scores as one JSON object")
    rescore = commands.add_parser("score-lmms-eval", help="score an lmms-eval sample log with our official scorer")
    rescore.add_argument("samples", type=Path, help="<date>_samples_<task>.jsonl, written by lmms-eval --log_samples")
    rescore.add_argument("--as", dest="benchmark", help="the benchmark, if the task's name is not a known one")
    rescore.add_argument("--data-root", type=Path, default=None, help="holds eval/textvqa/'s annotations")
    rescore.add_argument("--json", action="store_true", help="stdout holds only the scores as one JSON object")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "run":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        return exit_status(lambda: run(args, argv))
    if args.command == "score-lmms-eval":
        return exit_status(lambda: score_lmms_eval(args))
    return exit_status(lambda: score(args))


def score(args: argparse.Namespace) -> int:
    """The benchmark's own scorer on the given files (the same call `eval run` makes)."""
    benchmark = BENCHMARKS.get(args.benchmark)
    paths = {role: getattr(args, role) for role in benchmark.score_files}
    missing = [f"--{role.replace('_', '-')} {path}" for role, path in paths.items() if not path.exists()]
    if missing:
        raise ScoreInputError(f"{benchmark.name}: no such file or folder: {', '.join(missing)}")
    scores = benchmark.score(paths, read_answers(args.answers))
    print(json.dumps(scores) if args.json else format_scores(scores))
    return 0


def score_lmms_eval(args: argparse.Namespace) -> int:
    """An lmms-eval sample log through our official scorer for the benchmark it is."""
    name, scores = score_log(args.samples, args.benchmark, args.data_root)
    title = f"{name} (official scorer, lmms-eval's answers)"
    print(json.dumps(scores) if args.json else f"{title}\n{format_scores(scores)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
