"""Run a model on benchmarks: answers (resumable), scores, a summary table in the paper's column order."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from mipha_lab.config import EvalConfig, Experiment, HarnessConfig
from mipha_lab.data.templates import get_template
from mipha_lab.distributed import Distributed
from mipha_lab.errors import ConfigError
from mipha_lab.eval.benchmarks import BENCHMARKS, PAPER_ORDER, Benchmark
from mipha_lab.eval.generate import answer_key, answer_questions
from mipha_lab.eval.harness import harness_headlines, run_harness
from mipha_lab.eval.lmms_eval_log import SCORERS, score_harness_logs
from mipha_lab.eval.scoring.answers import ScoreInputError, read_jsonl
from mipha_lab.model import load_model
from mipha_lab.model.image_processing import Strategy
from mipha_lab.runs.folder import RunFolder

log = logging.getLogger(__name__)
PARTIAL = "answers.partial.jsonl"  # answers.partial*.jsonl: one per rank, appended after every batch


def answered(out: Path) -> dict[str, dict[str, Any]]:
    """Answers an interrupted run already wrote (by any number of ranks)."""
    return {
        answer_key(a["question_id"], a["prompt"]): a
        for path in sorted(out.glob("answers.partial*.jsonl"))
        for a in read_jsonl(path)
    }


def run_benchmark(
    model: Any,
    benchmark: Benchmark,
    data_root: str | Path,
    out: Path,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    image_strategy: Strategy = "pad",
    model_id: str = "mipha-lab",
    template: str | None = None,
    max_new_tokens: int | None = None,
    dist: Distributed | None = None,
    check_batch_invariance: int = 0,
) -> dict[str, Any]:
    """Answer (skipping questions a previous, interrupted run answered; each rank of `dist` a share of
    the rest), write answers.jsonl in question order, score, write scores.json and records.jsonl (one
    row per question: prediction and correct or score, so analysis can bootstrap). A limited run is
    scored only where the scorer accepts a subset. Scores are returned on the main rank ({} elsewhere)."""
    dist = dist or Distributed(0, 1, 0, next(model.parameters()).device)
    paths = benchmark.paths(data_root)
    questions = benchmark.load(paths)[:limit] if limit else benchmark.load(paths)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    done = answered(out)
    dist.barrier()  # every rank has read the same answered set before any rank appends to it
    if done and dist.main:
        log.info("%s: %d answers of an interrupted run found in %s, not asked again", benchmark.name, len(done), out)
    remaining = [q for q in questions if answer_key(q.question_id, q.text) not in done]
    answer_questions(
        model,
        get_template(template or model.config.template or "plain"),
        remaining[dist.rank :: dist.world_size],
        strategy=image_strategy,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens or benchmark.max_new_tokens,
        model_id=model_id,
        partial=out / f"answers.partial.rank{dist.rank}.jsonl",
        desc=benchmark.name,
        progress=dist.main,
    )
    dist.barrier()
    if not dist.main:
        return {}
    done = answered(out)
    answers = [done[answer_key(q.question_id, q.text)] for q in questions]
    seconds = time.time() - started
    (out / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    for partial in out.glob("answers.partial*.jsonl"):
        partial.unlink()
    if check_batch_invariance:
        batch_invariance(
            model,
            benchmark,
            questions[:check_batch_invariance],
            answers,
            out,
            image_strategy=image_strategy,
            template=template,
            max_new_tokens=max_new_tokens,
        )
    if benchmark.submission is not None and not limit:
        print(f"{benchmark.name}: file for the benchmark's server: {benchmark.submission(paths, answers, out)}")
    scores: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    if benchmark.score is None:
        log.info("%s: no public ground truth; %s holds the answers to submit", benchmark.name, out / "answers.jsonl")
    else:
        try:
            scores = benchmark.score(paths, answers, records)
        except ScoreInputError as err:
            if not limit:
                raise
            log.warning("%s: not scored (--limit %d answers a subset): %s", benchmark.name, limit, err)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # per question, for bootstraps
    print(
        f"{benchmark.name}: {len(answers)} questions in {seconds:.0f} s ({len(answers) / max(seconds, 1e-9):.1f}/s); "
        f"{benchmark.headline} {scores.get(benchmark.headline, '-')}"
    )
    return scores


def batch_invariance(
    model: Any,
    benchmark: Benchmark,
    questions: list,
    batched: list[dict[str, Any]],
    out: Path,
    *,
    image_strategy: Strategy,
    template: str | None,
    max_new_tokens: int | None,
) -> float:
    """Answer a sample again at batch size 1 and report how many batched answers are identical
    (batched evaluation has moved scores by points in other toolkits); written to batch_invariance.json."""
    single = answer_questions(
        model,
        get_template(template or model.config.template or "plain"),
        questions,
        strategy=image_strategy,
        batch_size=1,
        max_new_tokens=max_new_tokens or benchmark.max_new_tokens,
        desc=f"{benchmark.name} batch 1",
    )
    differ = [b["question_id"] for a, b in zip(single, batched, strict=False) if a["text"] != b["text"]]  # the first K
    agreement = 1.0 - len(differ) / max(len(single), 1)
    (out / "batch_invariance.json").write_text(
        json.dumps({"questions": len(single), "agreement": agreement, "different": differ}, indent=2) + "\n"
    )
    print(f"{benchmark.name}: batched answers equal batch-1 answers on {agreement:.1%} of {len(single)} questions")
    return agreement


def run_benchmarks(model: Any, names: list[str], data_root: str | Path, out: Path, **options: Any) -> dict[str, dict]:
    results = {name: run_benchmark(model, BENCHMARKS.get(name), data_root, out / name, **options) for name in names}
    dist = options.get("dist")
    if dist is None or dist.main:
        write_summary(out, results)
    return results


def write_summary(folder: Path, results: dict[str, dict[str, Any]]) -> None:
    """Headline figures in the paper's column order (VQAv2, GQA, SQA-I, TextVQA, POPE, MME-P, MMB), then
    the others, then lmms-eval's tasks (marked); every figure of every benchmark in summary.csv."""
    order = [n for n in PAPER_ORDER if n in results] + [n for n in results if n not in PAPER_ORDER]
    harness = harness_headlines(folder)
    header = [f"{n} ({BENCHMARKS.get(n).headline})" for n in order]
    header += [key.replace(" (", f" ({metric}, ", 1) for key, (metric, _) in harness.items()]  # task (metric, mark)
    values = [str(results[n].get(BENCHMARKS.get(n).headline, "-")) for n in order]
    values += [f"{value:g}" for _, value in harness.values()]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---:|" * len(header), "| " + " | ".join(values) + " |"])
    table += "\n"
    (folder / "summary.md").write_text(table)
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["benchmark", "metric", "value"])
        for name in order:
            for metric, value in _flatten(results[name]):
                writer.writerow([name, metric, value])
    print(table, end="")


def check_eval(e: EvalConfig) -> None:
    """The `eval:` block's names, checked before training: a typo must not cost a trained run."""
    for name in e.benchmarks:
        BENCHMARKS.get(name)  # an unknown name fails with suggestions
    if e.harness is not None:
        check_harness(e.harness)


def check_harness(harness: HarnessConfig) -> None:
    if importlib.util.find_spec("lmms_eval") is None:
        raise ConfigError("lmms-eval tasks need lmms-eval: pip install 'mipha-lab[lmms-eval]'")
    unknown = {task: name for task, name in harness.score_as.items() if name not in SCORERS}
    if unknown:
        raise ConfigError(f"eval.harness.score_as {unknown}: the official scorers here are {sorted(SCORERS)}")


def run_lmms_eval(
    model: Path, harness: HarnessConfig, eval_folder: Path, *, batch_size: int, data_root: str | Path | None
) -> None:
    """lmms-eval's tasks on the model, then our official scorers on the logs of those that are our benchmarks."""
    check_harness(harness)
    results = run_harness(
        model, harness.tasks, eval_folder, batch_size=batch_size, include_path=harness.include_path, limit=harness.limit
    )
    score_harness_logs(results, eval_folder, harness.score_as, Path(data_root) if data_root is not None else None)


def _flatten(scores: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in scores.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def evaluate_run(experiment: Experiment, run: RunFolder) -> None:
    """The experiment's `eval:` block on the run's final/ model; scores under <run>/eval/."""
    e = experiment.eval
    if not e.benchmarks and e.harness is None:
        return
    status = run.read_status() or {}
    run.status("evaluating", step=status.get("step"))
    if e.harness is not None:  # first: the summary our benchmarks write then shows its tasks too
        run_lmms_eval(run.path, e.harness, run.path / "eval", batch_size=e.batch_size, data_root=experiment.data_root)
    if not e.benchmarks:
        write_summary(run.path / "eval", {})  # lmms-eval's tasks alone
        run.status("done", step=status.get("step"))
        return
    run_benchmarks(
        load_model(run.path),
        e.benchmarks,
        experiment.data_root,
        run.path / "eval",
        batch_size=e.batch_size,
        image_strategy=e.image_strategy,
        model_id=run.path.name,
        template=experiment.stages[-1].template,
        max_new_tokens=e.max_new_tokens,
    )
    run.status("done", step=status.get("step"))
