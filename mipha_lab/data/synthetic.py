"""Synthetic scenes of coloured shapes, laid out like LLaVA's data and evaluation bundle.

`python -m mipha_lab.data.synthetic --out DIR [--n-train N] [--n-eval M] [--seed S]` writes:
  DIR/images/train/*.png, DIR/images/eval/*.png
  DIR/captions.json                      stage-1 data (human "<image>", gpt caption)
  DIR/instruct.json                      stage-2 data, multi-turn colour / shape / count / position /
                                         yes-no existence questions
  DIR/eval/shapes-vqa/questions.jsonl    {question_id, image, text, category}
  DIR/eval/shapes-vqa/answers.jsonl      {question_id, answer, type}
  DIR/eval/shapes-pope/questions.jsonl   category = POPE split (random / popular / adversarial)
  DIR/eval/shapes-pope/annotations/shapes_pope_<split>.json   jsonl {question_id, image, text, label}
Image paths are relative to DIR/images. Each scene has one or two shapes of distinct kinds and
colours (two: one in each half; one: left, center or right), large enough to stay visible at a tiny
encoder's 32 px, so every question has one answer. Deterministic by seed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle")
PLACES = ("left", "center", "right")
SHORT = "\nAnswer the question using a single word or phrase."
POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class Shape:
    """One shape drawn on a synthetic image: its kind, colour and place."""

    kind: str
    color: str
    place: str


def random_scene(rng: random.Random) -> list[Shape]:
    count = rng.randint(1, 2)
    kinds, colors = rng.sample(KINDS, count), rng.sample(list(COLORS), count)
    places = ["left", "right"] if count == 2 else [rng.choice(PLACES)]
    return [Shape(k, c, p) for k, c, p in zip(kinds, colors, places, strict=True)]


def draw(scene: list[Shape], rng: random.Random) -> Image.Image:
    width, height = rng.randint(80, 176), rng.randint(64, 144)
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (width, height), (shade, shade, shade))
    canvas = ImageDraw.Draw(image)
    half = width / 2
    for shape in scene:
        size = rng.uniform(0.7, 0.95) * min(half, height)
        cx = {"left": half / 2, "center": width / 2, "right": width - half / 2}[shape.place]
        cx += rng.uniform(-0.5, 0.5) * (half - size)
        cy = height / 2 + rng.uniform(-0.5, 0.5) * (height - size)
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            canvas.ellipse(box, fill=fill)
        elif shape.kind == "square":
            canvas.rectangle(box, fill=fill)
        else:
            canvas.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def caption(scene: list[Shape]) -> str:
    parts = [f"a {s.color} {s.kind} {'in the center' if s.place == 'center' else 'on the ' + s.place}" for s in scene]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def absent_object(scene: list[Shape], rng: random.Random, split: str = "random") -> tuple[str, str]:
    """A (color, kind) not in the scene; `adversarial` keeps a present kind with another colour,
    `popular` picks from the most frequent colours first (red, blue)."""
    present = {(s.color, s.kind) for s in scene}
    candidates = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
    if split == "adversarial":
        kinds = {s.kind for s in scene}
        candidates = [(c, k) for c, k in candidates if k in kinds] or candidates
    elif split == "popular":
        candidates = [(c, k) for c, k in candidates if c in ("red", "blue")] or candidates
    return rng.choice(candidates)


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer) about one scene, one per category, in random order. (Asking a yes
    and a no existence question about one scene was tried: it lets a model answer the second from the
    first instead of from the image.)"""
    target = rng.choice(scene)
    place = "in the center" if target.place == "center" else f"on the {target.place}"
    absent = absent_object(scene, rng)
    present = (target.color, target.kind)
    exists = [rng.random() < 0.5]
    items = [
        ("color", f"What color is the {target.kind}?", target.color),
        ("shape", f"What shape is {place}?", target.kind),
        ("count", "How many shapes are there?", str(len(scene))),
        ("position", f"Where is the {target.color} {target.kind}?", target.place),
    ] + [
        ("yes/no", "Is there a {} {} in the image?".format(*(present if e else absent)), "Yes" if e else "No")
        for e in exists
    ]
    rng.shuffle(items)
    return items


COMPLETE = ".complete"  # written last: a folder without it is not a finished dataset


def is_complete(out: Path) -> bool:
    return (out / COMPLETE).is_file()


def generate(out: Path, n_train: int = 16000, n_eval: int = 200, seed: int = 0, progress: bool = True) -> dict:
    """Write the whole layout; returns counts. Deterministic by seed. Written into a staging folder beside
    `out` and renamed into place when complete, so a kill never leaves a half dataset under `out`."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    counts = _write_layout(staging, n_train, n_eval, seed, progress)
    (staging / COMPLETE).write_text(json.dumps(counts) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return counts


def _write_layout(out: Path, n_train: int, n_eval: int, seed: int, progress: bool) -> dict:

    rng = random.Random(seed)
    start = time.time()
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    captions, instruct = [], []
    for i in tqdm(range(n_train), desc="shapes: training scenes", unit="scene", disable=not progress):
        scene = random_scene(rng)
        name = f"train/{i:06d}.png"
        draw(scene, rng).save(out / "images" / name)
        captions.append(
            {
                "id": f"cap-{i}",
                "image": name,
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(scene)}],
            }
        )
        turns = []
        for j, (_, question, answer) in enumerate(questions(scene, rng)[: rng.randint(2, 4)]):
            text = question + (SHORT if rng.random() < 0.7 else "")
            turns += [
                {"from": "human", "value": ("<image>\n" if j == 0 else "") + text},
                {"from": "gpt", "value": answer},
            ]
        instruct.append({"id": f"ins-{i}", "image": name, "conversations": turns})
    (out / "captions.json").write_text(json.dumps(captions))
    (out / "instruct.json").write_text(json.dumps(instruct))

    vqa_q: list[dict] = []
    vqa_a: list[dict] = []
    pope_q: list[dict] = []
    pope: dict[str, list] = {split: [] for split in POPE_SPLITS}
    for i in range(n_eval):
        scene = random_scene(rng)
        name = f"eval/{i:06d}.png"
        draw(scene, rng).save(out / "images" / name)
        for category, question, answer in questions(scene, rng):
            qid = len(vqa_q)
            vqa_q.append({"question_id": qid, "image": name, "text": question + SHORT, "category": category})
            vqa_a.append({"question_id": qid, "answer": answer, "type": category})
        for split in POPE_SPLITS:
            present = rng.choice(scene)
            for color, kind, label in [(present.color, present.kind, "yes"), (*absent_object(scene, rng, split), "no")]:
                qid = len(pope_q)
                text = f"Is there a {color} {kind} in the image?"
                pope[split].append({"question_id": qid, "image": name, "text": text, "label": label})
                pope_q.append({"question_id": qid, "image": name, "text": text + SHORT, "category": split})
    vqa, pope_dir = out / "eval" / "shapes-vqa", out / "eval" / "shapes-pope" / "annotations"
    vqa.mkdir(parents=True, exist_ok=True)
    pope_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(vqa / "questions.jsonl", vqa_q)
    write_jsonl(vqa / "answers.jsonl", vqa_a)
    write_jsonl(out / "eval" / "shapes-pope" / "questions.jsonl", pope_q)
    for split, rows in pope.items():
        write_jsonl(pope_dir / f"shapes_pope_{split}.json", rows)
    counts = {"train": n_train, "eval_images": n_eval, "vqa_questions": len(vqa_q), "pope_questions": len(pope_q)}
    if progress:
        print(f"shapes: wrote {counts} in {time.time() - start:.1f} s", file=sys.stderr)
    return counts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.data.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-train", type=int, default=16000)
    parser.add_argument("--n-eval", type=int, default=200, help="images per evaluation set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, args.n_train, args.n_eval, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
