"""WebDataset tar shards as mixture sources (`kind: webdataset`), local or at any fsspec URL.

Shards are named by a brace pattern (`shards/train-{000000..000127}.tar`). As WebDataset defines it, the
members of a tar that share a key (the name up to the first dot of its file name) form one sample, and
the rest of the name is the field: `000042.json` holds the LLaVA record, `000042.jpg` (or `000042.0.png`,
`000042.1.png` ...) its images. The record's `image` (a string or a list) names its images by field;
without it, the sample's image members are its images, in tar order. Indexing reads every member's
header and the `.json` members only; an image member is remembered by offset and read when its sample
loads. Shards must be uncompressed `.tar` (a compressed stream has no offsets to seek to).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
from braceexpand import braceexpand

from mipha_lab.data.image_blobs import TarMember
from mipha_lab.data.problems import SampleError
from mipha_lab.errors import ConfigError

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def split_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name, as WebDataset splits it."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def shard_urls(pattern: str) -> list[str]:
    return list(braceexpand(pattern))


def _members(shard: str) -> Iterator[tuple[str, list[tuple[str, tarfile.TarInfo, bytes | None]]]]:
    """(key, [(field, header, json bytes or None)]) per sample, in tar order."""
    if not shard.endswith(".tar"):
        raise ConfigError(f"shard {shard}: only uncompressed .tar shards can be indexed (members are read by offset)")
    try:
        handle = fsspec.open(shard, "rb").open()
    except FileNotFoundError:
        raise ConfigError(f"shard {shard} does not exist") from None
    try:
        with handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            key: str | None = None
            fields: list[tuple[str, tarfile.TarInfo, bytes | None]] = []
            for info in tar:
                if not info.isfile():
                    continue
                member_key, field = split_name(info.name)
                if member_key != key and key is not None:
                    yield key, fields
                    fields = []
                key = member_key
                payload = tar.extractfile(info).read() if field == "json" else None  # type: ignore[union-attr]
                fields.append((field, info, payload))
            if key is not None:
                yield key, fields
    except tarfile.TarError as err:
        raise ConfigError(f"shard {shard}: not a readable tar file ({err})") from None


def _record(shard: str, key: str, fields: list[tuple[str, tarfile.TarInfo, bytes | None]]) -> dict[str, Any]:
    sample_id = f"{shard.rsplit('/', 1)[-1]}:{key}"
    by_field = {field: (info, payload) for field, info, payload in fields}
    if "json" not in by_field:
        raise SampleError(sample_id, "bad_json", f"no {key}.json member (fields: {', '.join(by_field)})")
    try:
        record = json.loads(by_field["json"][1] or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(sample_id, "bad_json", f"{key}.json: {err}") from None
    if not isinstance(record, dict):
        raise SampleError(sample_id, "bad_json", f"{key}.json: expected an object")
    named = record.get("image", record.get("images"))
    wanted = (
        [named]
        if isinstance(named, str)
        else list(named or [])
        if named is not None
        else [f for f, _, _ in fields if f.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS]
    )
    images = []
    for field in wanted:
        if field not in by_field:
            raise SampleError(record.get("id", sample_id), "missing_image", f"{shard} has no member {key}.{field}")
        info = by_field[field][0]
        images.append(TarMember(shard, info.offset_data, info.size, info.name))
    return {**record, "id": str(record.get("id", sample_id)), "image": images}


def webdataset_rows(pattern: str, shards: list[str] | None = None) -> Iterator[dict[str, Any] | SampleError]:
    """Every sample of the shards (all of `pattern`'s, or `shards` in that order) as a LLaVA-style record
    whose images are TarMembers, or its SampleError. Reads one shard at a time, front to back."""
    for shard in shard_urls(pattern) if shards is None else shards:
        for key, fields in _members(shard):
            try:
                yield _record(shard, key, fields)
            except SampleError as err:
                yield err


def manifest_counts(pattern: str) -> dict[str, int]:
    """Samples per shard from the `manifest.json` beside the shards (`python -m mipha_lab.data.shards`
    writes it): what a streamed source needs to know its epoch length without reading every shard."""
    shards = shard_urls(pattern)
    folder = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    try:
        with fsspec.open(f"{folder}/manifest.json", "rt") as handle:
            listed = {row["name"]: int(row["samples"]) for row in json.load(handle)["shards"]}
    except FileNotFoundError:
        raise ConfigError(
            f"a streamed webdataset source needs {folder}/manifest.json with each shard's sample count "
            "(python -m mipha_lab.data.shards writes one)"
        ) from None
    missing = [s for s in shards if s.rsplit("/", 1)[-1] not in listed]
    if missing:
        raise ConfigError(f"{folder}/manifest.json does not list shard {missing[0]}")
    return {shard: listed[shard.rsplit("/", 1)[-1]] for shard in shards}
