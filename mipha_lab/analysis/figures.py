"""Each benchmark's headline figure recomputed from per-question records, on any resample of the units its
questions come in. A unit is what is sampled together: a question; for MME an image (its two questions,
which the headline pairs for accuracy+); for MMBench a circular group (a question and its rotations).
Units are resampled within strata (POPE's splits, MME's subtasks), so every resample keeps the official
structure. On all units each figure equals the official scorer's headline (tests/test_analysis.py checks
that on LLaVA-1.5-13B's released predictions)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mipha_lab.errors import MiphaLabError
from mipha_lab.eval.scoring.mmbench import CIRCULAR
from mipha_lab.eval.scoring.mme import PERCEPTION

Record = dict[str, Any]


class RecordsError(MiphaLabError, ValueError):
    """A run's eval/<benchmark>/records.jsonl cannot give the benchmark's figure."""


def question_key(record: Record) -> tuple[Any, Any]:
    """A question's identity: its id and its text (MME's two questions of an image share the id)."""
    return record["question_id"], record.get("prompt", record.get("question"))


class Figure:
    """Questions -> units -> the headline figure; plain accuracy over questions unless a subclass says otherwise."""

    channels = 1

    def keep(self, record: Record) -> bool:
        return True

    def unit(self, record: Record) -> tuple[str, Hashable]:
        """(stratum, unit key) of a record."""
        return "", question_key(record)

    def values(self, records: list[Record], where: str) -> list[float]:
        """One unit's records -> its values (one per channel)."""
        return [correctness(records[0], where)]

    def compute(self, values: np.ndarray, strata: np.ndarray) -> np.ndarray:
        """values (..., units, channels) and the units' strata -> the figure (...)."""
        return 100 * values[..., 0].mean(-1)

    def full_scale(self, strata: int) -> float:
        """The figure's maximum: the aggregate puts every benchmark on 0-100 with it."""
        return 100.0


def correctness(record: Record, where: str) -> float:
    """VQA's soft accuracy (0, 0.3, 0.6, 0.9, 1) where the record has one, else right (1) or wrong (0)."""
    if "score" in record:
        return float(record["score"])
    if "correct" in record:
        return float(bool(record["correct"]))
    raise RecordsError(f"{where}: record {question_key(record)} has neither 'score' nor 'correct'")


class ImageQuestionAccuracy(Figure):
    """ScienceQA-IMG: accuracy over the questions that have an image."""

    def keep(self, record: Record) -> bool:
        return bool(record.get("image", True))


class PopeMeanF1(Figure):
    """POPE: F1 of "yes" within each split, then the mean over splits."""

    channels = 2

    def unit(self, record: Record) -> tuple[str, Hashable]:
        return str(record["split"]), question_key(record)

    def values(self, records: list[Record], where: str) -> list[float]:
        return [float(records[0]["prediction"] == "yes"), float(records[0]["label"] == "yes")]

    def compute(self, values: np.ndarray, strata: np.ndarray) -> np.ndarray:
        f1s = []
        for stratum in np.unique(strata):
            said, gold = values[..., strata == stratum, 0], values[..., strata == stratum, 1]
            tp, total = (said * gold).sum(-1), said.sum(-1) + gold.sum(-1)
            f1s.append(np.where(total > 0, 2 * tp / np.maximum(total, 1), 0.0))
        return 100 * np.mean(f1s, axis=0)


class MmePerception(Figure):
    """MME: per perception subtask, 100 x accuracy + 100 x accuracy+ (both questions of an image right),
    summed over subtasks (0-2000 with all ten). The unit is an image: its two questions go together."""

    channels = 2

    def keep(self, record: Record) -> bool:
        return record["subtask"] in PERCEPTION

    def unit(self, record: Record) -> tuple[str, Hashable]:
        return str(record["subtask"]), record["question_id"]

    def values(self, records: list[Record], where: str) -> list[float]:
        if len(records) != 2 or records[0].get("prompt") == records[1].get("prompt"):
            raise RecordsError(
                f"{where}: image {records[0]['question_id']} has {len(records)} records; MME asks two "
                "different questions per image"
            )
        return [correctness(r, where) for r in sorted(records, key=lambda r: str(r.get("prompt")))]

    def compute(self, values: np.ndarray, strata: np.ndarray) -> np.ndarray:
        total = np.zeros(values.shape[:-2])
        for stratum in np.unique(strata):
            first, second = values[..., strata == stratum, 0], values[..., strata == stratum, 1]
            total = total + 100 * (first + second).mean(-1) / 2 + 100 * (first * second).mean(-1)
        return total

    def full_scale(self, strata: int) -> float:
        return 200.0 * strata


class CircularAccuracy(Figure):
    """MMBench CircularEval: a question counts only if it and all its rotations are answered right."""

    def unit(self, record: Record) -> tuple[str, Hashable]:
        return "", int(record["question_id"]) % CIRCULAR

    def values(self, records: list[Record], where: str) -> list[float]:
        return [float(all(correctness(r, where) == 1 for r in records))]


FIGURES: dict[str, Figure] = {
    "scienceqa-img": ImageQuestionAccuracy(),
    "pope": PopeMeanF1(),
    "shapes-pope": PopeMeanF1(),
    "mme": MmePerception(),
    "mmbench": CircularAccuracy(),
    "mmbench-cn": CircularAccuracy(),
}


def figure_of(benchmark: str) -> Figure:
    """The benchmark's headline rule; any benchmark not listed is (soft) accuracy over its questions."""
    return FIGURES.get(benchmark, Figure())


@dataclass
class UnitTable:
    """The units every given run answered, with each run's values: what resamples are drawn from."""

    figure: Figure
    strata: np.ndarray  # (units,) stratum index of each unit, units sorted by stratum
    values: np.ndarray  # (runs, units, channels)

    @property
    def units(self) -> int:
        return len(self.strata)

    def figures(self, resamples: np.ndarray | None = None) -> np.ndarray:
        """Each run's figure on all units, (runs,); or on each row of unit indices, (runs, draws)."""
        if resamples is None:
            return self.figure.compute(self.values, self.strata)
        per_chunk = max(1, 4_000_000 // max(1, self.values.size))  # bounded memory on big benchmarks
        return np.concatenate(
            [
                self.figure.compute(self.values[:, rows], self.strata)
                for rows in np.array_split(resamples, max(1, -(-len(resamples) // per_chunk)))
            ],
            axis=1,
        )

    def resample(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        """(draws, units) unit indices drawn with replacement within each stratum."""
        columns = []
        for stratum in np.unique(self.strata):
            members = np.flatnonzero(self.strata == stratum)
            columns.append(members[rng.integers(0, len(members), size=(draws, len(members)))])
        return np.concatenate(columns, axis=1)

    def full_scale(self) -> float:
        return self.figure.full_scale(len(np.unique(self.strata)))


def unit_table(benchmark: str, runs: list[tuple[str, list[Record]]]) -> UnitTable:
    """(run name, records) of every run -> the table of the units all of them answered."""
    figure = figure_of(benchmark)
    grouped = []
    for name, records in runs:
        where = f"{name}: eval/{benchmark}/records.jsonl"
        units: dict[tuple[str, Hashable], list[Record]] = defaultdict(list)
        seen = set()
        for record in records:
            if "question_id" not in record:
                raise RecordsError(f"{where}: a record has no 'question_id'")
            if not figure.keep(record):
                continue
            key = question_key(record)
            if key in seen:
                raise RecordsError(f"{where}: two records for question {key}; expected one per question")
            seen.add(key)
            units[figure.unit(record)].append(record)
        grouped.append((where, units))
    common = sorted(set.intersection(*(set(units) for _, units in grouped)), key=lambda k: (k[0], str(k[1])))
    if not common:
        raise RecordsError(f"{benchmark}: the runs {[name for name, _ in runs]} share no question in their records")
    names = sorted({stratum for stratum, _ in common})
    values = np.array([[figure.values(units[key], where) for key in common] for where, units in grouped], dtype=float)
    return UnitTable(figure, np.array([names.index(stratum) for stratum, _ in common]), values)
