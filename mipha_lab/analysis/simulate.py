"""How the intervals hold on simulated runs with a planted difference: how often they cover the true
delta, and how often they exclude zero when there is no difference (a false verdict). Use it to check
the method, or to plan a study (how many seeds, how many questions) before GPU hours are spent.

A simulated question has a base accuracy (uniform 0.2-0.85); cell a adds the planted delta (spread over
questions); each run adds its seed's shift (normal, seed SD, the same for every benchmark of that run);
every answer is right with the resulting probability (clipped to 0-1). The true delta is that model's
expectation, computed on 400,000 draws.

    python -m mipha_lab.analysis.simulate [--seeds 3 5] [--seed-sd 0 0.02 0.05 0.2] [--benchmarks 1 3]
                                          [--questions 1000] [--replicates 400] [--draws 300]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mipha_lab.analysis.compare import paired_samples
from mipha_lab.analysis.figures import Figure, UnitTable
from mipha_lab.analysis.intervals import interval, mean_of


@dataclass(frozen=True)
class Regime:
    """One simulated setting: seeds per cell, the seeds' spread, benchmarks, questions, the planted delta."""

    seeds: int  # per cell
    seed_sd: float  # SD of a run's shift in accuracy (accuracy units)
    benchmarks: int = 1  # > 1: judged on the mean over benchmarks, as the claims are
    questions: int = 1000  # per benchmark
    delta: float = 0.05  # planted difference in accuracy (0.05 = 5 points)
    delta_sd: float = 0.05  # the planted difference's spread over questions

    def true_delta(self, rng: np.random.Generator) -> float:
        """a - b in points: the expectation over questions and seeds."""
        if self.delta == 0:
            return 0.0
        n = 400_000
        base, shift = rng.uniform(0.2, 0.85, n), rng.normal(0, self.seed_sd, n)
        change = rng.normal(self.delta, self.delta_sd, n)
        return float(100 * (np.clip(base + change + shift, 0, 1).mean() - np.clip(base + shift, 0, 1).mean()))

    def tables(self, rng: np.random.Generator) -> list[UnitTable]:
        """One simulated pair of cells: per benchmark, a table of cell a's runs then cell b's."""
        shifts = rng.normal(0, self.seed_sd, (2 * self.seeds, 1))  # a run's luck, shared by its benchmarks
        tables = []
        for _ in range(self.benchmarks):
            base = rng.uniform(0.2, 0.85, self.questions)
            change = rng.normal(self.delta, self.delta_sd, self.questions) if self.delta else np.zeros(self.questions)
            cell = np.repeat([1.0, 0.0], self.seeds)[:, None]
            chance = np.clip(base + cell * change + shifts, 0, 1)
            right = (rng.random(chance.shape) < chance).astype(float)
            tables.append(UnitTable(Figure(), np.zeros(self.questions, dtype=int), right[..., None]))
        return tables


@dataclass
class Outcome:
    """How the intervals did over the simulated comparisons of one regime."""

    regime: Regime
    truth: float
    coverage: float  # share of intervals that hold the true delta
    excludes_zero: float  # share that exclude zero: false verdicts when regime.delta == 0
    width: float  # mean width, points


def check(
    regime: Regime,
    replicates: int = 400,
    draws: int = 300,
    seed: int = 0,
    question_only: bool = False,
    progress: bool = False,
) -> Outcome:
    rng = np.random.default_rng(seed)
    truth = regime.true_delta(rng)
    covered, excluded, widths = 0, 0, []
    for _ in tqdm(
        range(replicates),
        desc=f"{regime.seeds} seeds, SD {regime.seed_sd:g}, {regime.benchmarks} benchmark(s), delta {regime.delta:g}",
        disable=not progress,
        leave=False,
    ):
        pairs = [paired_samples(table, regime.seeds, draws, rng) for table in regime.tables(rng)]
        scales = [1.0] * len(pairs)
        found = interval(
            mean_of([a for a, _ in pairs], scales),
            mean_of([b for _, b in pairs], scales),
            regime.benchmarks * regime.questions,
            question_only,
        )
        assert found.bounds is not None  # two seeds or more, or question-only: always an interval
        low, high = found.bounds
        covered += low <= truth <= high
        excluded += found.excludes_zero()
        widths.append(high - low)
    return Outcome(regime, truth, covered / replicates, excluded / replicates, float(np.mean(widths)))


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m mipha_lab.analysis.simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument("--seeds", type=int, nargs="+", default=[3, 5], help="seeds per cell")
    cli.add_argument(
        "--seed-sd",
        type=float,
        nargs="+",
        default=[0.0, 0.02, 0.05, 0.2],
        help="SD of a run's accuracy shift (accuracy units)",
    )
    cli.add_argument("--benchmarks", type=int, nargs="+", default=[1, 3], help="benchmarks averaged")
    cli.add_argument("--questions", type=int, default=1000, help="questions per benchmark")
    cli.add_argument("--delta", type=float, default=0.05, help="planted difference (accuracy units)")
    cli.add_argument("--replicates", type=int, default=400)
    cli.add_argument("--draws", type=int, default=300, help="resamples per interval")
    args = cli.parse_args(argv)
    if min(args.seeds) < 2:
        cli.error("--seeds: intervals need at least 2 seeds per cell (one seed leaves seed variance unmeasured)")
    print("| seeds | seed SD | benchmarks | true delta | coverage | mean width | false verdicts (no difference) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seeds in args.seeds:
        for sd in args.seed_sd:
            for benchmarks in args.benchmarks:
                planted = Regime(seeds, sd, benchmarks, args.questions, args.delta)
                found = check(planted, args.replicates, args.draws, seed=1, progress=True)
                null = check(
                    Regime(seeds, sd, benchmarks, args.questions, 0.0),
                    args.replicates,
                    args.draws,
                    seed=2,
                    progress=True,
                )
                print(
                    f"| {seeds} | {sd:g} | {benchmarks} | {found.truth:+.2f} | {found.coverage:.1%} | "
                    f"{found.width:.2f} | {null.excludes_zero:.1%} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
