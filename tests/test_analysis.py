"""The analysis's statistics: each benchmark's figure from its records against the official headline
(LLaVA-1.5-13B's released predictions in ../shared/fixtures, scored by the official tools' numbers;
hand-made VQA cases by the official rule), the aggregate in points, seeds and one-seed cells, and a
seeded simulation that checks the intervals' coverage and false verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mipha_lab.analysis import compare, simulate, study, verdicts
from mipha_lab.analysis.figures import RecordsError, unit_table
from mipha_lab.analysis.intervals import ONE_SEED, QUESTION_ONLY
from mipha_lab.eval.scoring.answers import read_json, read_jsonl
from mipha_lab.eval.scoring.mmbench import score_mmbench
from mipha_lab.eval.scoring.mme import score_mme
from mipha_lab.eval.scoring.pope import score_pope, split_metrics
from mipha_lab.eval.scoring.scienceqa import score_scienceqa
from mipha_lab.eval.scoring.vqa import score_textvqa, score_vqav2

LLAVA = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llava-v1.5-13b"
needs_fixtures = pytest.mark.skipif(
    not LLAVA.is_dir(), reason=f"golden fixtures not found at {LLAVA}; the analysis's golden-figure tests are skipped"
)


def figure(benchmark: str, records: list[dict]) -> float:
    return float(unit_table(benchmark, [("run", records)]).figures()[0])


def mme_records(answers: list[dict]) -> list[dict]:
    records: list[dict] = []
    scores = score_mme(read_jsonl(LLAVA / "mme" / "llava_mme.jsonl"), answers, LLAVA / "mme" / "ground_truth", records)
    return records, scores


@needs_fixtures
def test_each_benchmark_figure_is_the_official_headline():
    mme, _ = mme_records(read_jsonl(LLAVA / "mme" / "llava-v1.5-13b.jsonl"))
    assert figure("mme", mme) == pytest.approx(1531.32, abs=0.005)  # both questions of every image count
    mmbench: list[dict] = []
    d = LLAVA / "mmbench"
    score_mmbench(d / "llava-v1.5-13b_dev_20230712.tsv", read_jsonl(d / "llava-v1.5-13b.jsonl"), mmbench)
    assert figure("mmbench", mmbench) == pytest.approx(67.69, abs=0.005)  # CircularEval, not per-row 76.45
    pope: list[dict] = []
    d = LLAVA / "pope"
    score_pope(read_jsonl(d / "llava_pope_test.jsonl"), read_jsonl(d / "llava-v1.5-13b.jsonl"), d / "coco", pope)
    assert figure("pope", pope) == pytest.approx(85.95, abs=0.005)
    scienceqa: list[dict] = []
    d = LLAVA / "scienceqa"
    score_scienceqa(read_json(d / "llava_test_CQM-A.json"), read_jsonl(d / "llava-v1.5-13b.jsonl"), scienceqa)
    assert figure("scienceqa-img", scienceqa) == pytest.approx(71.64, abs=0.005)  # image questions only


def test_vqa_figures_use_the_soft_score():
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
    records: list[dict] = []
    official = score_vqav2(
        annotations,
        {"questions": [{"question_id": 1}, {"question_id": 2}]},
        [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "two"}],
        records,
    )
    assert official["overall"] == 80.0 and figure("vqav2", records) == pytest.approx(80.0)  # 1.0 and 0.6
    suffix = "Answer the question using a single word or phrase."
    data = [
        {"image_id": "img1", "question": "What brand?", "answers": ["acme"] + ["other"] * 9},  # 0.3
        {"image_id": "img1", "question": "What year?", "answers": ["1999"] * 2 + ["2000"] * 8},  # 0.6
        {"image_id": "img2", "question": "What word?", "answers": ["stop"] * 4 + ["go"] * 6},
    ]  # 1.0
    answers = [
        {"question_id": "img1", "prompt": f"What brand?\n{suffix}", "text": "acme"},
        {"question_id": "img1", "prompt": f"What year?\n{suffix}", "text": "1999"},
        {"question_id": "img2", "prompt": f"What word?\n{suffix}", "text": "stop"},
    ]
    records = []
    assert score_textvqa({"data": data}, answers, records) == {"accuracy": 63.33}
    assert figure("textvqa", records) == pytest.approx(100 * 1.9 / 3)  # two questions of img1 both kept


def test_pope_figure_equals_the_official_mean_f1_on_any_records():
    rng = np.random.default_rng(1)
    rows = [
        {
            "question_id": f"{split}-{i}",
            "split": split,
            "label": rng.choice(["yes", "no"]),
            "prediction": rng.choice(["yes", "no"]),
        }
        for split in ("adversarial", "popular", "random")
        for i in range(60)
    ]
    official = np.mean(
        [
            split_metrics(
                [r["prediction"] for r in rows if r["split"] == s], [r["label"] for r in rows if r["split"] == s]
            )["f1"]
            for s in ("adversarial", "popular", "random")
        ]
    )
    assert figure("pope", rows) == pytest.approx(100 * official)


def fake_run(source: str, chain: list[str], seed: int, records: dict[str, list[dict]]) -> study.Run:
    config = {
        "source": source,
        "extends_chain": chain,
        "seed": seed,
        "run_name": Path(source).stem,
        "model": {"vision": "v", "llm": Path(source).stem},
    }
    scores = {b: figure(b, rows) for b, rows in records.items()}
    return study.Run(Path(f"{source}-{seed}"), config, [], scores, records)


def shapes(correct: np.ndarray) -> list[dict]:
    return [{"question_id": i, "correct": bool(c)} for i, c in enumerate(correct)]


@needs_fixtures
def test_mme_enters_the_aggregate_in_points_with_both_questions():
    answers = read_jsonl(LLAVA / "mme" / "llava-v1.5-13b.jsonl")
    worse = [
        dict(a, text="no" if a["text"].lower().startswith("yes") else "yes")
        if i % 5 == 0 and a["question_id"].split("/")[0] in ("existence", "color", "OCR")
        else a
        for i, a in enumerate(answers)
    ]
    (base, base_scores), (drop, drop_scores) = mme_records(answers), mme_records(worse)
    official = drop_scores["perception"] - base_scores["perception"]
    assert official < -50  # a real drop, in MME's 0-2000 units
    same = shapes(np.arange(300) % 3 == 0)
    runs = [fake_run("/s/base.yaml", ["/s/base.yaml"], s, {"mme": base, "shapes-vqa": same}) for s in (0, 1)]
    runs += [
        fake_run("/s/x/worse.yaml", ["/s/base.yaml", "/s/x/worse.yaml"], s, {"mme": drop, "shapes-vqa": same})
        for s in (0, 1)
    ]
    cells = study.assign_axes(study.group_cells(runs))
    mme = compare.delta(cells[1], cells[0], "mme", draws=200)
    assert mme.delta == pytest.approx(official, abs=0.02)  # every question of every image counted
    aggregate = compare.aggregate_delta(cells[1], cells[0], ["mme", "shapes-vqa"], draws=200)
    assert aggregate.delta == pytest.approx((official / 20 + 0) / 2, abs=0.01)  # 0-2000 -> 0-100, then the mean
    assert aggregate.high < 0 and mme.high < 0


def test_seeds_one_seed_cells_and_question_only_intervals():
    rng = np.random.default_rng(0)
    base = [rng.random(400) < 0.5 for _ in range(3)]
    better = [b | (rng.random(400) < 0.3) for b in base]  # right wherever the baseline is, and more
    runs = [fake_run("/s/base.yaml", ["/s/base.yaml"], s, {"shapes-vqa": shapes(c)}) for s, c in enumerate(base)]
    runs += [
        fake_run("/s/llm/big.yaml", ["/s/base.yaml", "/s/llm/big.yaml"], s, {"shapes-vqa": shapes(c)})
        for s, c in enumerate(better)
    ]
    runs += [fake_run("/s/llm/one.yaml", ["/s/base.yaml", "/s/llm/one.yaml"], 0, {"shapes-vqa": shapes(better[0])})]
    cells = study.assign_axes(study.group_cells(runs))
    assert [len(c.runs) for c in cells] == [3, 3, 1]  # seeds grouped
    members = study.axes(cells)["llm"]
    assert [c.name for c in members] == ["base", "big", "one"] and members[1].changed == ["model.llm"]
    big = compare.delta(members[1], members[0], "shapes-vqa", draws=300)
    expected = 100 * (np.mean(better) - np.mean(base))
    assert big.delta == pytest.approx(expected) and 0 < big.low < expected < big.high
    assert big.seeds == (3, 3) and big.units == 400 and big.detectable > big.high - big.delta
    one = compare.delta(members[2], members[0], "shapes-vqa", draws=300)
    assert one.low is None and one.method == ONE_SEED and "one seed" in one.text() and not one.excludes_zero()
    asked = compare.delta(members[2], members[0], "shapes-vqa", draws=300, question_only=True)
    assert asked.low < asked.delta < asked.high and QUESTION_ONLY in asked.text()
    rows = verdicts.axis_table(members, draws=200)
    assert rows[0]["baseline"] and rows[1]["shapes-vqa"]["z"] > rows[0]["shapes-vqa"]["z"]
    table = verdicts.format_axis_table("llm", rows)
    assert ONE_SEED in table and "| one | 1 |" in table
    assert QUESTION_ONLY.upper() in verdicts.format_axis_table("llm", verdicts.axis_table(members, 200, True))


def test_claims_state_seeds_questions_and_detectable_effect():
    rng = np.random.default_rng(3)
    answers = {name: [rng.random(300) < p for _ in range(2)] for name, p in (("base", 0.6), ("frozen", 0.4))}
    runs = [
        fake_run(
            f"/s/{'' if n == 'base' else 'vision_tuning/'}{n}.yaml",
            ["/s/base.yaml"] + ([] if n == "base" else [f"/s/vision_tuning/{n}.yaml"]),
            s,
            {"shapes-vqa": shapes(c)},
        )
        for n, seeds in answers.items()
        for s, c in enumerate(seeds)
    ]
    cells = study.assign_axes(study.group_cells(runs))
    rows = {r["axis"]: r for r in verdicts.claims_table(cells, draws=300)}
    crucial = rows["vision_tuning"]
    assert crucial["verdict"] == "supported"
    assert crucial["comparisons"][0]["seeds"] == [2, 2] and crucial["comparisons"][0]["questions"] == 300
    found = crucial["comparisons"][0]
    half = (found["high"] - found["low"]) / 2  # t(97.5%) x SE; detectable: (t(97.5%) + t(80%)) x SE
    assert 1.2 * half < found["detectable"] < 1.6 * half
    assert rows["backbone"]["verdict"] == "not run"
    assert "| 2 vs 2 | 300 |" in verdicts.format_claims(list(rows.values()))
    runs = [r for r in runs if not (r.name == "frozen" and r.config["seed"] == 1)]
    one = {r["axis"]: r for r in verdicts.claims_table(study.assign_axes(study.group_cells(runs)), draws=300)}
    assert one["vision_tuning"]["verdict"] == f"no verdict ({ONE_SEED})"


def test_records_that_cannot_give_the_figure_are_named():
    with pytest.raises(RecordsError, match="two records for question"):
        unit_table("gqa", [("runs/a", [{"question_id": 1, "correct": True}, {"question_id": 1, "correct": False}])])
    with pytest.raises(RecordsError, match="neither 'score' nor 'correct'"):
        unit_table("gqa", [("runs/a", [{"question_id": 1, "prediction": "cat"}])])
    with pytest.raises(RecordsError, match=r"image color/1.jpg has 1 records"):
        unit_table(
            "mme",
            [("runs/a", [{"question_id": "color/1.jpg", "prompt": "Is it red?", "subtask": "color", "correct": True}])],
        )
    with pytest.raises(RecordsError, match="share no question"):
        unit_table(
            "gqa",
            [("runs/a", [{"question_id": 1, "correct": True}]), ("runs/b", [{"question_id": 2, "correct": True}])],
        )


REGIMES = [
    simulate.Regime(3, 0.0, 1, 500),
    simulate.Regime(3, 0.05, 3, 300),
    simulate.Regime(5, 0.02, 1, 500),
    simulate.Regime(5, 0.2, 3, 300),
]


@pytest.mark.parametrize("regime", REGIMES, ids=lambda r: f"{r.seeds}seeds-sd{r.seed_sd:g}-{r.benchmarks}bench")
def test_simulated_coverage_and_false_verdicts(regime):
    planted = simulate.check(regime, replicates=300, draws=200, seed=11)
    null = simulate.check(
        simulate.Regime(regime.seeds, regime.seed_sd, regime.benchmarks, regime.questions, 0.0),
        replicates=300,
        draws=200,
        seed=12,
    )
    assert 0.925 <= planted.coverage <= 0.98, planted  # 93-97% asked; 300 replicates leave about 1% of noise
    assert null.excludes_zero <= 0.065, null  # at most 6% asked


def test_the_simulation_catches_intervals_that_ignore_seeds():
    regime = simulate.Regime(3, 0.05, 3, 300)
    assert simulate.check(regime, replicates=100, draws=200, seed=11, question_only=True).coverage < 0.6
