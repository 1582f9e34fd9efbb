"""Bad-sample policy: `error` stops at the first bad sample; `skip` (default) counts and reports."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mipha_lab.errors import InputError

BadSamplePolicy = Literal["skip", "error"]
REASONS = (
    "bad_json",
    "bad_encoding",
    "missing_image",
    "unreadable_image",
    "image_too_large",
    "image_tag_mismatch",
    "empty_conversation",
    "nothing_to_learn",
    "bad_conversation",
    "too_long",
    "mask_error",
)


class SampleError(InputError):
    """One sample cannot be used; `reason` is one of REASONS."""

    def __init__(self, sample_id: str, reason: str, detail: str) -> None:
        super().__init__(f"sample {sample_id}: {reason}: {detail}")
        self.sample_id, self.reason, self.detail = sample_id, reason, detail


@dataclass(frozen=True)
class Skipped:
    """What a dataset returns in place of a bad sample under the `skip` policy (crosses worker processes)."""

    sample_id: str
    reason: str
    detail: str


@dataclass
class SkipReport:
    """Skips per reason and the first sample ids of each, for the end-of-epoch summary and the run folder."""

    keep_ids: int = 10
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, skipped: Iterable[Skipped]) -> None:
        for item in skipped:
            self.counts[item.reason] += 1
            ids = self.examples.setdefault(item.reason, [])
            if len(ids) < self.keep_ids:
                ids.append(f"{item.sample_id} ({item.detail})")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state(self) -> dict:
        """Counts and examples so far (a checkpoint carries them across a resume)."""
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def restore(self, state: dict) -> None:
        self.counts, self.examples = Counter(state["counts"]), {k: list(v) for k, v in state["examples"].items()}

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(self.counts), "first": self.examples}

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        parts = ", ".join(f"{reason} {count}" for reason, count in self.counts.most_common())
        first = "; ".join(f"{reason}: {ids[0]}" for reason, ids in self.examples.items())
        return f"skipped {self.total} sample(s): {parts} (first: {first})"

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
