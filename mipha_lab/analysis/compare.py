"""Two cells compared: on one benchmark, or on the mean over benchmarks in 0-100 points. The same resampled
units for both cells (paired by question); the run-level figures carry the seeds."""

from __future__ import annotations

import zlib

import numpy as np

from mipha_lab.analysis.figures import UnitTable, unit_table
from mipha_lab.analysis.intervals import Interval, Sample, interval, mean_of
from mipha_lab.analysis.study import Cell, Run


def paired_samples(table: UnitTable, seeds_a: int, draws: int, rng: np.random.Generator) -> tuple[Sample, Sample]:
    """A table of both cells' runs (cell a's first) -> each cell's figures on all units and on the same
    resamples."""
    full, resampled = table.figures(), table.figures(table.resample(draws, rng))
    return Sample(full[:seeds_a], resampled[:seeds_a]), Sample(full[seeds_a:], resampled[seeds_a:])


def _runs_with(cell: Cell, benchmarks: list[str]) -> list[Run]:
    return [r for r in cell.runs if all(b in r.records for b in benchmarks)]


def _table(runs: list[Run], benchmark: str) -> UnitTable:
    return unit_table(benchmark, [(str(r.path), r.records[benchmark]) for r in runs])


def _rng(seed: int, benchmark: str) -> np.random.Generator:
    """Resamples that depend on the benchmark, not on what else is compared: reproducible tables."""
    return np.random.default_rng([seed, zlib.crc32(benchmark.encode())])


def delta(
    a: Cell, b: Cell, benchmark: str, draws: int = 1000, question_only: bool = False, seed: int = 0
) -> Interval | None:
    """a - b on the benchmark's headline scale; None when a side has no per-question records of it."""
    runs_a, runs_b = _runs_with(a, [benchmark]), _runs_with(b, [benchmark])
    if not runs_a or not runs_b:
        return None
    table = _table(runs_a + runs_b, benchmark)
    sample_a, sample_b = paired_samples(table, len(runs_a), draws, _rng(seed, benchmark))
    return interval(sample_a, sample_b, table.units, question_only)


def aggregate_delta(
    a: Cell, b: Cell, benchmarks: list[str], draws: int = 1000, question_only: bool = False, seed: int = 0
) -> Interval | None:
    """a - b of the mean over benchmarks, each in 0-100 points (MME's 0-2000 headline divided by 20), on the
    runs that have records of every benchmark both cells share: a run's figures move together across
    benchmarks, so seeds are never resampled apart."""
    shared = [x for x in benchmarks if _runs_with(a, [x]) and _runs_with(b, [x])]
    runs_a, runs_b = _runs_with(a, shared), _runs_with(b, shared)
    if not shared or not runs_a or not runs_b:
        return None
    samples_a, samples_b, scales, units = [], [], [], 0
    for benchmark in shared:
        table = _table(runs_a + runs_b, benchmark)
        sample_a, sample_b = paired_samples(table, len(runs_a), draws, _rng(seed, benchmark))
        samples_a.append(sample_a)
        samples_b.append(sample_b)
        scales.append(table.full_scale() / 100)
        units += table.units
    return interval(mean_of(samples_a, scales), mean_of(samples_b, scales), units, question_only)
