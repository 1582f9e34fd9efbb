"""Write any mixture as WebDataset tar shards, so a cluster reads a few hundred large files instead of
millions of small ones.

    python -m mipha_lab.data.shards MIXTURE OUT_DIR [--data-root ./data] [--shard-mb 512] [--seed 0]

MIXTURE is a card name (`llava-v1.5-mix665k`) or a card file. Every sample the mixture yields (after its
filters, sampling and caps) becomes one tar sample: `<key>.json` (the LLaVA record: id, conversations,
`image` naming its image fields) and its images with their original bytes (`<key>.jpg`, or
`<key>.0.png`, `<key>.1.png` ... for several). `manifest.json` lists every shard with its sample count,
size and sha256, and the brace pattern a `kind: webdataset` source reads them with.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mipha_lab.data.image_blobs import Blob, image_source
from mipha_lab.data.llava import Record
from mipha_lab.data.mixtures import MIXTURES, load_mixture
from mipha_lab.data.problems import SampleError, Skipped, SkipReport
from mipha_lab.errors import ConfigError, exit_status
from mipha_lab.registry.cards import MixtureCard, read_card

LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
SHARD_NAME = "shard-{:06d}.tar"


def _image_bytes(entry: str | Blob, root: str, sample_id: str) -> tuple[bytes, str]:
    """(the encoded bytes, their field extension) of one image, unchanged."""
    source = image_source(entry, root)
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
        with Image.open(io.BytesIO(data)) as image:
            kind = (image.format or "").lower()
    except FileNotFoundError:
        raise SampleError(sample_id, "missing_image", str(source)) from None
    except OSError as err:
        raise SampleError(sample_id, "unreadable_image", f"{entry} ({err})") from None
    return data, {"jpeg": "jpg", "": "bin"}.get(kind, kind)


def sample_members(record: Record) -> dict[str, bytes]:
    """The tar members of one record, by field: its JSON and its images."""
    images = [_image_bytes(entry, record.root, record.sample_id) for entry in record.images]
    fields = [ext if len(images) == 1 else f"{i}.{ext}" for i, (_, ext) in enumerate(images)]
    annotation: dict[str, Any] = {
        "id": record.sample_id,
        "conversations": [{"from": LLAVA_ROLES[m["role"]], "value": m["content"]} for m in record.messages],
    }
    if fields:
        annotation["image"] = fields[0] if len(fields) == 1 else fields
    members = {"json": json.dumps(annotation, ensure_ascii=False).encode()}
    members.update({field: data for field, (data, _) in zip(fields, images, strict=True)})
    return members


def write_shards(records: Sequence[Record], out: Path, shard_bytes: int) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """Shards of about `shard_bytes` each (a sample is never split); returns the manifest rows and the
    samples whose images could not be read."""
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    writer: Any = None
    written = 0
    for record in tqdm(records, total=len(records), desc="shards", unit="sample", disable=None):
        try:
            members = sample_members(record)
        except SampleError as err:
            skipped.append(Skipped(err.sample_id, err.reason, err.detail))
            continue
        size = sum(len(data) + 1024 for data in members.values())
        if writer is None or (shards[-1]["samples"] and shards[-1]["bytes"] + size > shard_bytes):
            if writer is not None:
                writer.close()
            name = SHARD_NAME.format(len(shards))
            writer = webdataset.TarWriter(str(out / name))
            shards.append({"name": name, "samples": 0, "bytes": 0})
        writer.write({"__key__": f"{written:09d}", **members})
        shards[-1]["samples"] += 1
        shards[-1]["bytes"] += size
        written += 1
    if writer is not None:
        writer.close()
    for shard in shards:
        path = out / shard["name"]
        shard["bytes"] = path.stat().st_size
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return shards, skipped


def shard_pattern(count: int) -> str:
    last = SHARD_NAME.format(max(count - 1, 0))
    return last if count == 1 else "shard-{000000.." + last.removeprefix("shard-").removesuffix(".tar") + "}.tar"


def mixture_card(name: str) -> MixtureCard:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        card = read_card(path, "mixtures")
        assert isinstance(card, MixtureCard)
        return card
    return MIXTURES.get(name)


def convert(mixture: str, out: Path, data_root: Path, shard_mb: float, seed: int) -> dict[str, Any]:
    """Write the mixture's samples as shards plus `manifest.json`; returns the manifest."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: shards go into a new or empty folder")
    start = time.time()
    card = mixture_card(mixture)
    records, unreadable = load_mixture(card, data_root, seed)
    shards, skipped = write_shards(records, out, int(shard_mb * 2**20))
    report = SkipReport()
    report.add(unreadable + skipped)
    manifest = {
        "mixture": card.name,
        "pattern": shard_pattern(len(shards)),
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped": report.to_dict(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"wrote {manifest['samples']:,} samples in {len(shards)} shard(s), {manifest['bytes'] / 2**20:,.1f} MiB, "
        f"to {out} in {time.time() - start:.1f} s" + (f"; skipped {report.summary()}" if report.total else "")
    )
    print(f"read them with a mixture source:  {{kind: webdataset, path: {out / manifest['pattern']}}}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.data.shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mixture", help="a mixture card name or card file")
    parser.add_argument("out", type=Path, help="a new or empty folder for the shards and manifest.json")
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="where the mixture's paths point")
    parser.add_argument("--shard-mb", type=float, default=512.0, help="about this many MiB per shard")
    parser.add_argument("--seed", type=int, default=0, help="the mixture's sampling seed (random / weight rules)")
    args = parser.parse_args(argv)

    def run() -> int:
        convert(args.mixture, args.out, args.data_root, args.shard_mb, args.seed)
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
