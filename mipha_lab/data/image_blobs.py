"""Images stored inside other files: a member of a WebDataset tar shard, a cell of an Arrow table.

A record names such an image by where its bytes are (a few numbers), not by the bytes, so a mixture of
millions of samples indexes in memory and a DataLoader worker opens only what it loads. Every process
opens each shard or table once, on first use. Shards may be local paths or any fsspec URL (`s3://`,
`https://`, ...): a member is one ranged read.
"""

from __future__ import annotations

import functools
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec


@dataclass(frozen=True)
class TarMember:
    """The bytes of one member of a tar file: `size` bytes at `offset`."""

    shard: str  # local path or fsspec URL
    offset: int
    size: int
    member: str  # the member's name, for messages

    def read(self) -> bytes:
        handle = _open_shard(self.shard, os.getpid())
        handle.seek(self.offset)
        return handle.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"


@functools.lru_cache(maxsize=64)
def _open_shard(shard: str, pid: int) -> IO[bytes]:
    """One handle per shard and process: a forked DataLoader worker must not share its parent's file
    offset."""
    return fsspec.open(shard, "rb").open()


@dataclass(frozen=True)
class ArrowCell:
    """An image in a Hugging Face dataset's column (`datasets`' Image feature: `{bytes, path}`), or item
    `item` of a list of them."""

    location: str  # a save_to_disk folder, or the data files a parquet / arrow dataset was built from
    row: int
    column: str
    item: int | None = None

    def read(self) -> bytes | str:
        """The encoded bytes, or the path the dataset stored instead of bytes."""
        cell = open_table(self.location).column(self.column)[self.row].as_py()
        if self.item is not None:
            cell = cell[self.item]
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):
            return str(cell["path"])
        raise OSError(f"no bytes and no path in the cell (got {type(cell).__name__})")

    def __str__(self) -> str:
        where = f"[{self.item}]" if self.item is not None else ""
        return f"{self.location} row {self.row} column {self.column!r}{where}"


_TABLES: dict[str, Any] = {}


def load_dataset_at(location: str) -> Any:
    """A `datasets.Dataset` from a `save_to_disk` folder, or from parquet / arrow files by glob (sorted)."""
    import datasets

    if Path(location).is_dir():
        return datasets.load_from_disk(location)
    files = sorted(glob.glob(location))
    if not files:
        raise FileNotFoundError(f"no files match {location}")
    builder = "parquet" if files[0].endswith(".parquet") else "arrow"
    return datasets.load_dataset(builder, data_files=files, split="train")


def open_table(location: str) -> Any:
    """The Arrow table of a dataset location, memory-mapped; opened once per process."""
    if location not in _TABLES:
        _TABLES[location] = load_dataset_at(location).data
    return _TABLES[location]


Blob = TarMember | ArrowCell


def location(root: str | Path, value: str) -> str:
    """A card's path under the data root; URLs (`s3://`, `https://`, ...) as they are."""
    return value if "://" in value else str(Path(root) / value)


def image_source(entry: str | Blob, root: str | Path) -> str | Path | IO[bytes]:
    """What PIL opens for one of a record's images: a path under `root`, or the blob's bytes."""
    if isinstance(entry, str):
        return Path(root) / entry
    data = entry.read()
    if isinstance(data, str):  # a dataset that stores paths: relative to the source's image folder
        return Path(root) / data
    return io.BytesIO(data)
