"""Data mixtures: several sources (LLaVA JSON, Hugging Face datasets, WebDataset shards), each with its
filters, sampling rule and cap, resolved against a data root.

The list of samples depends only on the card, the data root's files and the seed - never on the
number of processes (ranks take their share of the batches later).
"""

from __future__ import annotations

import fcntl
import glob
import logging
import operator
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mipha_lab.data import synthetic
from mipha_lab.data.hf_source import hf_rows
from mipha_lab.data.image_blobs import location
from mipha_lab.data.llava import Record, normalize_all, read_annotations
from mipha_lab.data.problems import BadSamplePolicy, SampleError, Skipped
from mipha_lab.data.streaming import StreamedRecords, check_streamed
from mipha_lab.data.webdataset_source import shard_urls, webdataset_rows
from mipha_lab.errors import ConfigError
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import ColumnFilter, FirstN, MixtureCard, RandomN, SourceSpec, Weight

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}

MIXTURES: Registry[MixtureCard] = Registry(
    "data mixture", "weighted training data sources (cards in registry/mixtures/)", cards="mixtures"
)

log = logging.getLogger(__name__)


def _source_seed(seed: int, name: str) -> int:
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


def sample_indices(count: int, rule: SourceSpec, seed: int) -> list[int]:
    """Which of a source's `count` samples enter the mixture, in file order (repeats for weight > 1)."""
    sample = rule.sample
    rng = random.Random(_source_seed(seed, rule.name))
    if sample == "all":
        return list(range(count))
    if isinstance(sample, FirstN):
        return list(range(min(sample.first, count)))
    if isinstance(sample, RandomN):
        return sorted(rng.sample(range(count), min(sample.random, count)))
    assert isinstance(sample, Weight)
    whole, fraction = divmod(sample.weight * count, count) if count else (0, 0)
    chosen = list(range(count)) * int(whole) + rng.sample(range(count), round(fraction))
    return sorted(chosen)


def ensure_generated(card: MixtureCard, data_root: Path) -> None:
    """Synthetic mixtures write their data into the data root the first time they are used."""
    if card.generate != "shapes":
        return

    def missing() -> bool:
        return not synthetic.is_complete(data_root / "shapes")

    if missing():
        # the jobs of a sweep may start together on a fresh data root: one generates, the others wait
        data_root.mkdir(parents=True, exist_ok=True)
        with open(data_root / ".shapes.generating.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if missing():
                log.info("generating the synthetic shapes data into %s", data_root / "shapes")
                synthetic.generate(data_root / "shapes")


def _rows(source: SourceSpec, root: Path, policy: BadSamplePolicy) -> tuple[list[Any], list[Skipped], str]:
    """The source's raw records (LLaVA-style dicts), the undecodable ones, and the folder images are under."""
    images = str(root / (source.images or "."))
    if source.kind == "llava":
        path = root / (source.annotations or "")
        if not path.is_file():
            raise FileNotFoundError(path)
        raw, skipped = read_annotations(path, policy)
        return raw, skipped, images
    assert source.path is not None
    where = location(root, source.path)
    rows = (
        hf_rows(where, source.format, source.columns, [f.column for f in source.where], source.name)
        if source.kind == "hf"
        else webdataset_rows(where)
    )
    raw, skipped = [], []
    for row in rows:
        if isinstance(row, SampleError):
            if policy == "error":
                raise SampleError(row.sample_id, row.reason, f"{row.detail} (in source '{source.name}')")
            skipped.append(Skipped(row.sample_id, row.reason, row.detail))
        else:
            raw.append(row)
    return raw, skipped, images


def _passes(raw: Any, rule: ColumnFilter, source: str, index: int) -> bool:
    if not isinstance(raw, dict) or rule.column not in raw:
        raise ConfigError(f"source '{source}', sample {index}: no column {rule.column!r} for the `where` filter")
    values = raw[rule.column] if isinstance(raw[rule.column], list) else [raw[rule.column]]
    try:
        return all(OPERATORS[rule.op](value, rule.value) for value in values)
    except TypeError:
        raise ConfigError(
            f"source '{source}', sample {index}: column {rule.column!r} holds {values!r}, "
            f"which cannot be compared with {rule.value!r}"
        ) from None


def _capped(chosen: list[int], cap: int | None, rng: random.Random) -> list[int]:
    if cap is None or len(chosen) <= cap:
        return chosen
    return [chosen[i] for i in sorted(rng.sample(range(len(chosen)), cap))]


def read_source(
    source: SourceSpec, root: Path, seed: int = 0, policy: BadSamplePolicy = "skip"
) -> tuple[list[Record], list[Skipped]]:
    """One source's records after its filters, sampling rule and cap, in a deterministic order."""
    raw, skipped, images = _rows(source, root, policy)
    kept = [row for i, row in enumerate(raw) if all(_passes(row, rule, source.name, i) for rule in source.where)]
    label = Path(source.annotations or "").name if source.kind == "llava" else source.name
    records, bad = normalize_all(kept, label, images, policy)
    chosen = sample_indices(len(records), source, seed)
    chosen = _capped(chosen, source.cap, random.Random(_source_seed(seed, source.name) + 1))
    return [records[i] for i in chosen], skipped + bad


def load_mixture(
    mixture: str | MixtureCard, data_root: str | Path, seed: int = 0, policy: BadSamplePolicy = "skip"
) -> tuple[list[Record] | StreamedRecords, list[Skipped]]:
    """The mixture's records in a deterministic order, and the samples skipped while reading (a streamed
    mixture's bad samples are met, and skipped, as training reaches them)."""
    card = MIXTURES.get(mixture) if isinstance(mixture, str) else mixture
    root = Path(data_root)
    ensure_generated(card, root)
    if check_streamed(card):
        return StreamedRecords(card, root, seed), []
    records: list[Record] = []
    skipped: list[Skipped] = []
    for source in card.sources:
        try:
            found, bad = read_source(source, root, seed, policy)
        except FileNotFoundError as err:
            origin = f" (get it from {card.url})" if card.url else ""
            raise ConfigError(f"mixture '{card.name}', source '{source.name}': {err} does not exist{origin}") from None
        records += found
        skipped += bad
    return records, skipped


def identity_files(source: SourceSpec, root: Path) -> list[Path]:
    """The small files that identify a source's contents, for the run's data fingerprint: the annotation
    file, a dataset folder's `state.json`, or the `manifest.json` beside local shards."""
    if source.kind == "llava":
        return [root / (source.annotations or "")]
    where = location(root, source.path or "")
    if "://" in where:
        return []
    if source.kind == "hf":
        return [Path(where) / "state.json"] if Path(where).is_dir() else []
    return [Path(shard_urls(where)[0]).parent / "manifest.json"]


def missing_inputs(source: SourceSpec, root: Path) -> list[str]:
    """What a source needs that is not there (URLs are not checked)."""
    if source.kind == "llava":
        wanted = [(root / (source.annotations or ""), "file"), (root / (source.images or "."), "folder")]
        return [f"{kind} {path}" for path, kind in wanted if not (path.is_file() if kind == "file" else path.is_dir())]
    where = location(root, source.path or "")
    if "://" in where:
        return []
    if source.kind == "hf":
        return [] if Path(where).is_dir() or glob.glob(where) else [f"dataset {where}"]
    return [f"shard {shard}" for shard in shard_urls(where)[:1] if not Path(shard).is_file()]
