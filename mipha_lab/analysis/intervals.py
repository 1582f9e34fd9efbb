"""The interval of a delta between two cells: seed-level means with question-level sampling error, and a
t-interval on the few seeds (the model is written out in mipha_lab/analysis/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95  # two-sided interval; a verdict needs it to exclude zero (or to sit inside a margin)
POWER = 0.80  # the detectable effect: found with this probability at that level
ONE_SEED = "one seed: seed variance unmeasured"
QUESTION_ONLY = "question-only"
SEEDS_AND_QUESTIONS = "seeds and questions"


@dataclass
class Sample:
    """One cell's runs on a benchmark (or on the mean of several): each run's figure on all units, and on
    every resample of the units (the same resamples for both cells of a comparison: paired)."""

    figures: np.ndarray  # (seeds,)
    resampled: np.ndarray  # (seeds, draws)

    @property
    def seeds(self) -> int:
        return len(self.figures)

    def run_noise(self) -> float:
        """Question-level noise in one run's figure (the seed x question interaction over the number of
        units), from how each run moves against its cell's mean across resamples; needs two seeds."""
        deviation = self.resampled - self.resampled.mean(0)
        return float(deviation.var(axis=1, ddof=1).sum() / (self.seeds - 1))


def mean_of(samples: list[Sample], scales: list[float]) -> Sample:
    """The mean over benchmarks, each divided by its scale (its full scale / 100: 0-100 points), run by run:
    a seed's luck stays shared by all benchmarks of its run. Draw i of different benchmarks are independent
    resamples of different questions, so their mean is a resample of the mean."""
    return Sample(
        np.mean([s.figures / c for s, c in zip(samples, scales, strict=True)], axis=0),
        np.mean([s.resampled / c for s, c in zip(samples, scales, strict=True)], axis=0),
    )


@dataclass
class Interval:
    """A delta (a - b) with its interval; low/high are None where no interval is given (one seed)."""

    delta: float
    low: float | None
    high: float | None
    detectable: float | None  # the smallest |delta| this comparison finds with POWER
    seeds: tuple[int, int]
    units: int
    method: str

    @property
    def bounds(self) -> tuple[float, float] | None:
        return None if self.low is None or self.high is None else (self.low, self.high)

    def excludes_zero(self) -> bool:
        return self.bounds is not None and (self.bounds[0] > 0 or self.bounds[1] < 0)

    def text(self) -> str:
        if self.low is None:
            return f"{self.delta:+.2f} (one seed: no interval)"
        label = f", {QUESTION_ONLY}" if self.method == QUESTION_ONLY else ""
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}{label}]"


def _t_interval(delta: float, variance: float, df: float, seeds: tuple[int, int], units: int, method: str) -> Interval:
    se = float(np.sqrt(max(variance, 0.0)))
    half = stats.t.ppf(0.5 + LEVEL / 2, df) * se
    detectable = (stats.t.ppf(0.5 + LEVEL / 2, df) + stats.t.ppf(POWER, df)) * se
    return Interval(delta, delta - half, delta + half, float(detectable), seeds, units, method)


def interval(a: Sample, b: Sample, units: int, question_only: bool = False) -> Interval:
    """The delta of the seed-averaged figures with its LEVEL interval. Its variance is the question-level
    part (the paired resamples' spread, less the run noise they carry) plus each cell's spread of run
    figures over its seeds; degrees of freedom by Welch-Satterthwaite. With one seed on a side there is no
    interval unless `question_only`: then the paired resamples alone, labelled as such."""
    delta = float(a.figures.mean() - b.figures.mean())
    seeds = (a.seeds, b.seeds)
    paired = a.resampled.mean(0) - b.resampled.mean(0)
    questions = float(paired.var(ddof=1))
    if question_only:
        return _t_interval(delta, questions, units - 1, seeds, units, QUESTION_ONLY)
    if min(seeds) < 2:
        return Interval(delta, None, None, None, seeds, units, ONE_SEED)
    question_part = max(0.0, questions - sum(s.run_noise() / s.seeds for s in (a, b)))
    seed_parts = [float(s.figures.var(ddof=1)) / s.seeds for s in (a, b)]
    variance = question_part + sum(seed_parts)
    if variance <= 0:
        return Interval(delta, delta, delta, 0.0, seeds, units, SEEDS_AND_QUESTIONS)
    df = variance**2 / (
        question_part**2 / max(units - 1, 1)
        + sum(p**2 / (s.seeds - 1) for p, s in zip(seed_parts, (a, b), strict=True))
    )
    return _t_interval(delta, variance, df, seeds, units, SEEDS_AND_QUESTIONS)
