"""Data mixtures: several annotation files, each with a sampling rule, resolved against a data root.

The list of samples depends only on the card, the data root's files and the seed - never on the
number of processes (ranks take their share of the batches later).
"""

from __future__ import annotations

import fcntl
import logging
import random
from pathlib import Path

from mipha_lab.data import synthetic
from mipha_lab.data.llava import Record, read_records
from mipha_lab.data.problems import BadSamplePolicy, Skipped
from mipha_lab.errors import ConfigError
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import FirstN, MixtureCard, RandomN, SourceSpec, Weight

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


def load_mixture(
    mixture: str | MixtureCard, data_root: str | Path, seed: int = 0, policy: BadSamplePolicy = "skip"
) -> tuple[list[Record], list[Skipped]]:
    """The mixture's records in a deterministic order, and the annotations skipped while reading."""
    card = MIXTURES.get(mixture) if isinstance(mixture, str) else mixture
    root = Path(data_root)
    ensure_generated(card, root)
    records: list[Record] = []
    skipped: list[Skipped] = []
    for source in card.sources:
        path = root / source.annotations
        if not path.is_file():
            origin = f" (get it from {card.url})" if card.url else ""
            raise ConfigError(f"mixture '{card.name}', source '{source.name}': {path} does not exist{origin}")
        found, bad = read_records(path, root / (source.images or "."), policy)
        records += [found[i] for i in sample_indices(len(found), source, seed)]
        skipped += bad
    return records, skipped
