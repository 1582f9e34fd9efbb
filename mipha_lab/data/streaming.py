"""Streamed mixtures: sources too large to index, read front to back, shuffled through a buffer.

A mixture whose sources say `stream: true` (WebDataset shards or Hugging Face datasets) is never indexed:
its epoch length comes from the shards' `manifest.json` (or the dataset's row count), and epoch `e` is one
deterministic sequence of samples: each source's shards (or 4096-row blocks) in an order drawn from
(seed, e), the sources interleaved at random in proportion to what each has left, and every sample passed
through a shuffle buffer of `BUFFER` samples, all drawn from (seed, e). Only the small JSON / text part of
a sample is held in the buffer; images are read when their sample loads.

So the guarantees of indexed sources hold: the order depends on the seed and the epoch only, never on the
number of processes (every rank walks the same sequence and takes its own batches), and a resumed run
(after a SIGKILL too) continues at the exact sample, because the checkpoint's (epoch, batches done) names
a position in that sequence. The price: every rank (and DataLoader worker) reads every sample's JSON
member, decoding only its own samples' images; resuming re-reads the epoch's annotations up to the
position; batching is `padded` (lengths are not known in advance).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from mipha_lab.data.hf_source import block_count, hf_rows
from mipha_lab.data.image_blobs import load_dataset_at, location
from mipha_lab.data.llava import Record, normalize
from mipha_lab.data.problems import SampleError
from mipha_lab.data.webdataset_source import manifest_counts, webdataset_rows
from mipha_lab.errors import ConfigError
from mipha_lab.registry.cards import MixtureCard, SourceSpec

BUFFER = 2048


def _rng(seed: int, epoch: int, salt: int = 0) -> random.Random:
    return random.Random((seed * 1_000_003 + epoch) * 7919 + salt)


def stream_count(source: SourceSpec, root: Path) -> int:
    """Samples the source gives per epoch: the manifest's or the dataset's count, at most `cap`."""
    where = location(root, source.path or "")
    if source.kind == "webdataset":
        total = sum(manifest_counts(where).values())
    else:
        try:
            total = load_dataset_at(where).num_rows
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"source '{source.name}': cannot open {where} ({err})") from None
    return min(total, source.cap) if source.cap else total


def _source_stream(source: SourceSpec, root: Path, seed: int, epoch: int, salt: int) -> Iterator[Any]:
    """The source's raw records in this epoch's shard (or block) order."""
    where = location(root, source.path or "")
    rng = _rng(seed, epoch, salt)
    if source.kind == "webdataset":
        shards = list(manifest_counts(where))
        rng.shuffle(shards)
        return webdataset_rows(where, shards)
    blocks = list(range(block_count(load_dataset_at(where).num_rows)))
    rng.shuffle(blocks)
    return hf_rows(where, source.format, source.columns, [], source.name, blocks)


class StreamedRecords(Sequence[Record]):
    """A streamed mixture's records of the current epoch, by position (a sequence read forward: asking for
    an earlier position than the last restarts the epoch's stream). A bad sample raises its SampleError
    where it stands, so positions never shift."""

    streamed = True

    def __init__(self, card: MixtureCard, root: Path, seed: int, buffer: int = BUFFER) -> None:
        self.card, self.root, self.seed, self.buffer = card, root, seed, buffer
        self.counts = [stream_count(source, root) for source in card.sources]
        self.epoch = 0
        self._cursor: Iterator[Record | SampleError] | None = None
        self._next = 0

    def __len__(self) -> int:
        return sum(self.counts)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self._cursor, self._next = epoch, None, 0

    def _interleaved(self) -> Iterator[tuple[SourceSpec, Any]]:
        rng = _rng(self.seed, self.epoch, salt=len(self.counts))
        sources = self.card.sources
        streams = [_source_stream(source, self.root, self.seed, self.epoch, s) for s, source in enumerate(sources)]
        left = list(self.counts)
        while sum(left):
            pick = rng.randrange(sum(left))
            index = next(i for i, acc in enumerate(itertools.accumulate(left)) if pick < acc)
            raw = next(streams[index], None)
            source = self.card.sources[index]
            if raw is None:
                raise ConfigError(
                    f"mixture '{self.card.name}', source '{source.name}': the stream ended after "
                    f"{self.counts[index] - left[index]} samples, but its count says {self.counts[index]}"
                )
            left[index] -= 1
            yield source, raw

    def _records(self) -> Iterator[Record | SampleError]:
        rng = _rng(self.seed, self.epoch, salt=-1)
        held: list[tuple[SourceSpec, Any]] = []
        for position, item in enumerate(self._interleaved()):
            if len(held) < self.buffer:
                held.append(item)
                continue
            slot = rng.randrange(len(held))
            out, held[slot] = held[slot], item
            yield self._record(out, position)
        rng.shuffle(held)
        for position, item in enumerate(held, len(self)):
            yield self._record(item, position)

    def _record(self, item: tuple[SourceSpec, Any], position: int) -> Record | SampleError:
        source, raw = item
        if isinstance(raw, SampleError):
            return raw
        try:
            return normalize(raw, position, source.name, str(self.root / (source.images or ".")))
        except SampleError as err:
            return err

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._cursor is None or index < self._next:
            self._cursor, self._next = self._records(), 0
        item: Record | SampleError | None = None
        while self._next <= index:
            item = next(self._cursor)
            self._next += 1
        if isinstance(item, SampleError):
            raise item
        assert item is not None
        return item

    def __iter__(self) -> Iterator[Record]:
        """The usable records of the current epoch (bad ones left out), for planning."""
        for item in self._records():
            if not isinstance(item, SampleError):
                yield item


def check_streamed(card: MixtureCard) -> bool:
    """Whether the mixture streams; its sources must agree."""
    streamed = {source.stream for source in card.sources}
    if len(streamed) > 1:
        raise ConfigError(f"mixture '{card.name}': either every source streams (`stream: true`) or none does")
    return streamed == {True}
