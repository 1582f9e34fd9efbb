"""Bad data: image modes PIL converts badly (scaled right here), images over the pixel limit, annotation
lines that are not UTF-8, and samples with nothing to learn - each a counted skip with its own reason
under `skip`, an error naming the file and line under `error`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mipha_lab.data.image_files import open_rgb
from mipha_lab.data.llava import read_records
from mipha_lab.data.problems import SampleError
from mipha_lab.errors import ConfigError

RAMP = np.linspace(0, 65535, 64 * 32).reshape(32, 64)  # a 16-bit greyscale ramp


def grey_expected(values_0_255: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(np.rint(values_0_255), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "scan16.png"
    Image.fromarray(RAMP.astype(np.uint16)).save(path)  # 16-bit PNG: PIL opens it as I;16 or I
    got = np.asarray(open_rgb(path))
    expected = grey_expected(RAMP.astype(np.uint16) / 257.0)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    clipped = np.asarray(Image.open(path).convert("RGB"))  # what PIL alone gives: white above 255
    assert (clipped == 255).mean() > 0.9 and (got == 255).mean() < 0.01


def test_32_bit_integer_and_float_greyscale(tmp_path):
    wide = (RAMP / 65535 * (2**32 - 1) - 2**31).astype(np.int32)  # PIL's I is signed 32-bit
    image = Image.fromarray(wide, mode="I")
    values = np.asarray(image, dtype=np.float64)
    top = values.max()
    assert top > 65535
    got = np.asarray(open_rgb_from(image, tmp_path / "wide.tiff"))
    assert np.abs(got.astype(int) - grey_expected(values / ((2**32 - 1) / 255.0)).astype(int)).max() <= 1
    unit = Image.fromarray((RAMP / 65535).astype(np.float32), mode="F")
    got = np.asarray(open_rgb_from(unit, tmp_path / "unit.tiff"))
    assert np.abs(got.astype(int) - grey_expected(RAMP / 65535 * 255).astype(int)).max() <= 1


def open_rgb_from(image: Image.Image, path: Path) -> Image.Image:
    image.save(path)
    return open_rgb(path)


@pytest.mark.parametrize("mode", ["P", "PA", "LA", "RGBA", "CMYK", "L", "1"])
def test_palette_cmyk_and_alpha_keep_their_colours(mode, tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 40, 90))
    image = rgb.convert("RGBA").convert(mode) if mode in ("PA", "LA") else rgb.convert(mode)
    suffix = ".tiff" if mode in ("CMYK", "PA") else ".png"
    got = open_rgb_from(image, tmp_path / f"x{suffix}")
    assert got.mode == "RGB" and got.size == (16, 16)
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(image.convert("RGB"), dtype=int)).max() <= 1


def samples(folder: Path, *records: dict, jsonl: bool = False) -> Path:
    path = folder / ("a.jsonl" if jsonl else "a.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(list(records), indent=1))
    return path


def turn(question: str, answer: str, image: str | None = None) -> dict:
    record = {
        "id": question,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + question},
            {"from": "gpt", "value": answer},
        ],
    }
    return {**record, "image": image} if image else record


def test_an_image_over_the_pixel_limit_is_a_counted_skip(tmp_path):
    from mipha_lab.data.llava import load_image

    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(SampleError) as caught:
        load_image("big.png", tmp_path, "s1", max_pixels=50_000)
    assert caught.value.reason == "image_too_large" and "60,000 pixels" in caught.value.detail
    assert load_image("big.png", tmp_path, "s1", max_pixels=60_000).size == (300, 200)


@pytest.mark.parametrize("jsonl", [True, False])
def test_a_line_that_is_not_utf8_is_skipped_by_file_and_line_or_an_error(tmp_path, jsonl):
    path = samples(tmp_path, turn("first?", "yes"), turn("second?", "no"), turn("third?", "yes"), jsonl=jsonl)
    lines = path.read_bytes().split(b"\n")
    bad_line = next(i for i, line in enumerate(lines) if b"second?" in line)
    lines[bad_line] = lines[bad_line].replace(b"second?", b"second\xff?")
    path.write_bytes(b"\n".join(lines))
    records, skipped = read_records(path)
    assert [r.sample_id for r in records] == ["first?", "third?"]
    assert [(s.reason, s.sample_id) for s in skipped] == [("bad_encoding", f"a.{path.suffix[1:]}:{bad_line + 1}")]
    with pytest.raises(ConfigError, match=rf"a\.jsonl?:{bad_line + 1}: not UTF-8"):
        read_records(path, policy="error")


def test_a_sample_with_nothing_to_learn_is_skipped_with_its_own_reason(tmp_path):
    no_answer = {"id": "asks-only", "conversations": [{"from": "human", "value": "hello?"}]}
    empty = turn("empty?", "  ")
    path = samples(tmp_path, turn("fine?", "yes"), no_answer, empty, jsonl=True)
    records, skipped = read_records(path)
    assert [r.sample_id for r in records] == ["fine?"]
    assert [(s.sample_id, s.reason) for s in skipped] == [
        ("asks-only", "nothing_to_learn"),
        ("empty?", "nothing_to_learn"),
    ]
    with pytest.raises(SampleError, match="nothing_to_learn"):
        read_records(path, policy="error")
