"""Reading answer and question files, and refusing inputs that would give a silently wrong number."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Hashable, Iterable

from mipha_lab.errors import InputError


class ScoreInputError(InputError):
    """Answers that cannot be scored as given (missing, duplicate or misordered ids, bad lines)."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ScoreInputError(f"{path}, line {number}: not JSON ({err.msg})") from None
    return rows


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ScoreInputError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None


def _sample(values: Iterable[Any], limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f" ... ({len(values)} in all)" if len(values) > limit else "")


def check_ids(answer_keys: list[Hashable], expected: list[Hashable], what: str, ordered: bool = False) -> None:
    """Every expected key answered exactly once (and in order, where the scorer pairs by position)."""
    counts = Counter(answer_keys)
    duplicates = [k for k, n in counts.items() if n > 1]
    if duplicates:
        raise ScoreInputError(f"{what}: duplicate answers for {_sample(duplicates)}")
    missing = [k for k in expected if k not in counts]
    if missing:
        raise ScoreInputError(f"{what}: no answer for {_sample(missing)}")
    extra = [k for k in answer_keys if k not in set(expected)]
    if extra:
        raise ScoreInputError(f"{what}: answers for unknown questions {_sample(extra)}")
    if ordered and answer_keys != list(expected):
        wrong = [a for a, e in zip(answer_keys, expected) if a != e]
        raise ScoreInputError(f"{what}: answers are not in question-file order (this scorer pairs by position); "
                              f"first out of place: {_sample(wrong)}")


def percent(value: float) -> float:
    return round(100.0 * value, 2)
