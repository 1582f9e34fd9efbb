"""Reading answer and question files, and refusing inputs that would give a silently wrong number."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mipha_lab.errors import InputError


class ScoreInputError(InputError):
    """Answers that cannot be scored as given (missing, duplicate or misordered ids, bad lines)."""


def _numbered_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a line that is not JSON is an error naming it."""
    if not path.is_file():
        raise ScoreInputError(f"{path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ScoreInputError(f"{path}, line {number}: not JSON ({err.msg})") from None
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in _numbered_rows(Path(path))]


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """An answer file in LLaVA's format: every line an object with a `question_id` (integer or string) and
    the answer's `text` (a string); anything else is an error naming the line."""
    path = Path(path)
    rows = []
    for number, row in _numbered_rows(path):
        if not isinstance(row, dict) or "question_id" not in row:
            raise ScoreInputError(f"{path}, line {number}: expected an object with 'question_id' and 'text'")
        if not isinstance(row["question_id"], (int, str)) or isinstance(row["question_id"], bool):
            raise ScoreInputError(
                f"{path}, line {number}: question_id {row['question_id']!r} is neither an integer nor a string"
            )
        if not isinstance(row.get("text"), str):
            found = "missing" if "text" not in row else f"{row['text']!r}"
            raise ScoreInputError(
                f"{path}, line {number}: 'text' is {found}; expected the answer as a string "
                "(an empty string for no answer)"
            )
        rows.append(row)
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


def check_ids(answer_keys: Sequence[Hashable], expected: Sequence[Hashable], what: str, ordered: bool = False) -> None:
    """Every expected key answered exactly once (and in order, where the scorer pairs by position)."""
    _check_id_types(answer_keys, expected, what)
    counts = Counter(answer_keys)
    duplicates = [k for k, n in counts.items() if n > 1]
    if duplicates:
        raise ScoreInputError(f"{what}: duplicate answers for {_sample(duplicates)}")
    missing = [k for k in expected if k not in counts]
    if missing:
        raise ScoreInputError(f"{what}: no answer for {_sample(missing)}")
    known = set(expected)
    extra = [k for k in answer_keys if k not in known]
    if extra:
        raise ScoreInputError(f"{what}: answers for unknown questions {_sample(extra)}")
    if ordered and answer_keys != list(expected):
        wrong = [a for a, e in zip(answer_keys, expected, strict=True) if a != e]
        raise ScoreInputError(
            f"{what}: answers are not in question-file order (this scorer pairs by position); "
            f"first out of place: {_sample(wrong)}"
        )


def _kind(key: Hashable) -> str:
    value = key[0] if isinstance(key, tuple) and key else key
    return "integer" if isinstance(value, int) else "string" if isinstance(value, str) else type(value).__name__


def _check_id_types(answer_keys: Sequence[Hashable], expected: Sequence[Hashable], what: str) -> None:
    """Ids of one type where the questions have another ("12" for 12) would all go unmatched: say so."""
    if not expected:
        return
    wanted = _kind(expected[0])
    for index, key in enumerate(answer_keys):
        if _kind(key) != wanted:
            raise ScoreInputError(
                f"{what}: answer {index + 1} (line {index + 1} of a file without blank lines) has "
                f"question_id {key!r}, a {_kind(key)}, where the questions' ids are {wanted}s "
                f"(e.g. {expected[0]!r})"
            )


def percent(value: float) -> float:
    return round(100.0 * value, 2)
