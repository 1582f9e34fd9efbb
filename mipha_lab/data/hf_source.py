"""Hugging Face datasets as mixture sources (`kind: hf`): a `save_to_disk` folder, or parquet / arrow files
by glob, with images embedded (`datasets`' Image feature) or as paths.

Two layouts, named by the card's `format`:
- `llava`: a `conversations` column ([{from, value}], LLaVA's) and an `image` column (one image) or
  `images` (a list), as LLaVA-OneVision-Data ships;
- `cauldron`: `images` (a list) and `texts` ([{user, assistant}], The Cauldron's, FineVision's); the
  images' `<image>` tags go at the start of the first user turn.
`columns` in the card maps these names to the dataset's own. Only the text columns are read when the
mixture is indexed; an image is read from the memory-mapped table when its sample loads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from mipha_lab.constants import IMAGE_TOKEN
from mipha_lab.data.image_blobs import ArrowCell, load_dataset_at
from mipha_lab.data.problems import SampleError
from mipha_lab.errors import ConfigError

Layout = Literal["llava", "cauldron"]
TEXT_COLUMN = {"llava": "conversations", "cauldron": "texts"}
BLOCK_ROWS = 4096  # rows read at a time (and the unit a streamed source shuffles)


def block_count(rows: int) -> int:
    return -(-rows // BLOCK_ROWS)


def _image_column(table: Any, names: Mapping[str, str], layout: Layout) -> str | None:
    wanted = ["images"] if layout == "cauldron" else ["image", "images"]
    present = [names.get(key, key) for key in wanted if names.get(key, key) in table.column_names]
    return present[0] if present else None


def _images_of_rows(table: Any, column: str | None, location: str, start: int, stop: int) -> list[list[Any]]:
    """Per row, its images: ArrowCells for embedded images, strings for stored paths (no bytes read)."""
    if column is None:
        return [[] for _ in range(start, stop)]
    values = table.column(column).slice(start, stop - start)
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [[path] if path else [] for path in values.to_pylist()]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if pa.types.is_string(kind.value_type):
            return [list(paths or []) for paths in values.to_pylist()]
        counts = pc.fill_null(pc.list_value_length(values), 0).to_pylist()
        return [[ArrowCell(location, start + i, column, item) for item in range(n)] for i, n in enumerate(counts)]
    present = pc.is_valid(values).to_pylist()
    return [[ArrowCell(location, start + i, column)] if ok else [] for i, ok in enumerate(present)]


def _cauldron_turns(texts: Any, images: int, sample_id: str) -> list[dict[str, str]]:
    if not isinstance(texts, list) or not texts or not all(isinstance(t, dict) for t in texts):
        raise SampleError(sample_id, "bad_conversation", "expected 'texts' as a list of {user, assistant}")
    turns = []
    for index, turn in enumerate(texts):
        user, assistant = turn.get("user"), turn.get("assistant")
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise SampleError(sample_id, "bad_conversation", f"turn {index}: expected strings 'user' and 'assistant'")
        tags = f"{IMAGE_TOKEN}\n" * images if index == 0 else ""
        turns += [{"from": "human", "value": tags + user}, {"from": "gpt", "value": assistant}]
    return turns


def hf_rows(
    location: str,
    layout: Layout,
    columns: Mapping[str, str],
    extra: Sequence[str],
    label: str,
    blocks: Sequence[int] | None = None,
) -> Iterator[dict[str, Any] | SampleError]:
    """Each row as a LLaVA-style record (`id`, `conversations`, `image`: a list) plus the `extra` columns
    (for the card's filters), or the SampleError that makes it unusable; in row order, or block by block
    (BLOCK_ROWS rows each) in the order `blocks` gives."""
    try:
        table = load_dataset_at(location).data
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"source '{label}': cannot open {location} as a Hugging Face dataset ({err})") from None
    text = columns.get(TEXT_COLUMN[layout], TEXT_COLUMN[layout])
    image = _image_column(table, columns, layout)
    id_column = columns.get("id", "id")
    wanted = [text, *extra] + ([id_column] if id_column in table.column_names else [])
    missing = [name for name in wanted if name not in table.column_names]
    if missing:
        raise ConfigError(
            f"source '{label}': {location} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}; "
            f"map names with `columns:` in the card)"
        )
    text_table = table.select(list(dict.fromkeys(wanted)))  # the text columns only: no image bytes read
    for block in range(block_count(table.num_rows)) if blocks is None else blocks:
        start = block * BLOCK_ROWS
        stop = min(start + BLOCK_ROWS, table.num_rows)
        rows = text_table.slice(start, stop - start).to_pylist()
        row_images = _images_of_rows(table, image, location, start, stop)
        for offset, (row, images) in enumerate(zip(rows, row_images, strict=True)):
            sample_id = str(row.get(id_column, f"{label}#{start + offset}"))
            record = {"id": sample_id, "image": images, **{name: row[name] for name in extra}}
            if layout == "cauldron":
                try:
                    record["conversations"] = _cauldron_turns(row[text], len(images), sample_id)
                except SampleError as err:
                    yield err
                    continue
            else:
                record["conversations"] = row[text]
            yield record
