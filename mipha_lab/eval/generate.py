"""Batched greedy answers for a LLaVA question file, written in LLaVA's answer-file format."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mipha_lab.data.image_processing import ImageProcessor
from mipha_lab.data.llava import load_image
from mipha_lab.data.templates import Template, encode_prompt


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer_questions(
    model: Any,
    template: Template,
    questions: list[dict[str, Any]],
    image_root: Path,
    *,
    strategy: str = "pad",
    batch_size: int = 16,
    max_new_tokens: int = 16,
    model_id: str = "mipha-lab",
) -> list[dict[str, Any]]:
    """Answers in question order: {question_id, prompt, text, answer_id, model_id, metadata}."""
    processor = ImageProcessor(model.vision_tower.image_spec, strategy)
    tokenizer = model.tokenizer
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc="answering", unit="batch"):
        chunk = questions[start : start + batch_size]
        prompts = [encode_prompt(template, tokenizer, [{"role": "user", "content": "<image>\n" + q["text"]}]) for q in chunk]
        width = max(map(len, prompts))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
        pixels = torch.stack([processor(load_image(image_root / q["image"], str(q["question_id"]))) for q in chunk])
        out = model.generate(ids, mask, pixels, max_new_tokens=max_new_tokens, stop_strings=template.stop_strings)
        for question, tokens in zip(chunk, out):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in template.stop_strings:
                text = text.split(stop)[0]
            answers.append({"question_id": question["question_id"], "prompt": question["text"], "text": text.strip(),
                            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}})
    return answers
