"""Tiled images through data, model, counts and plan: a split image's text is Idefics3's layout; images of mixed
sizes (a variable number of tokens each) give the same loss padded, packed and one sample at a time; the
dataset's lengths and loss counts are what the model splices; the FLOP count follows torch's; the planner
budgets LlavaNext's own token count; batched generation and chat; micro trains and answers with each
component of the design space (anyres, split, a fused encoder, pixel shuffle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from mipha_lab.config import AnyresTiling, SplitTiling
from mipha_lab.data.batching import collate_packed, collate_padded
from mipha_lab.data.llava import LlavaDataset, read_records
from mipha_lab.data.templates import get_template
from mipha_lab.model import build_vlm
from mipha_lab.model.splice import count_targets
from mipha_lab.train.flops import sample_flops
from mipha_lab.train.stage import sample_sizes
from mipha_lab.train.step import batch_forward

REPO = Path(__file__).resolve().parents[1]
TILINGS = {"anyres": AnyresTiling(), "split": SplitTiling(max_side=3)}
SIZES = [(40, 90), (100, 30), (64, 64), (20, 20), (33, 150)]  # (height, width): every grid, and one tile alone


def idefics3_prompt(rows: int, columns: int) -> str:
    """transformers' Idefics3 text for an image (one token per tile, no fake token around images)."""
    try:  # transformers 4
        from transformers.models.idefics3.processing_idefics3 import get_image_prompt_string

        return get_image_prompt_string(rows, columns, 1, "", "<image>", "<global-img>")
    except ImportError:  # transformers 5: a method of the processor
        from transformers import Idefics3Processor

        fields = SimpleNamespace(
            fake_image_token="", global_image_tag="<global-img>", image_token="<image>", image_seq_len=1
        )
        return Idefics3Processor.replace_image_token(fields, {"rows": [[rows]], "cols": [[columns]]}, 0)


@pytest.mark.parametrize("rows,columns", [(0, 0), (1, 2), (2, 1), (3, 3), (2, 4)])
def test_split_markup_is_idefics3s_layout(rows, columns):
    assert get_template("phi").split_markup(rows, columns) == idefics3_prompt(rows, columns)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list:
    """Images of mixed sizes: one per sample, two in one sample, and a text-only sample."""
    root = tmp_path_factory.mktemp("mixed")
    for index, (height, width) in enumerate(SIZES):
        Image.new("RGB", (width, height), (40 * index, 200 - 30 * index, 90)).save(root / f"{index}.png")
    rows = [
        {
            "id": f"s{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nshape {i}?"},
                {"from": "gpt", "value": f"a shape number {i}"},
            ],
        }
        for i in range(4)
    ]
    rows.append(
        {
            "id": "two",
            "image": ["4.png", "0.png"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: same?"},
                {"from": "gpt", "value": "no, they differ"},
            ],
        }
    )
    rows.append({"id": "text", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]})
    (root / "data.json").write_text(json.dumps(rows))
    return read_records(root / "data.json", root)[0]


def tiled(tiling, attention: str = "sdpa"):
    torch.manual_seed(0)
    return build_vlm("tiny-siglip-so400m-384", "tiny-phi-2", tiling=tiling, attn_implementation=attention).eval()


def dataset(model, records) -> LlavaDataset:
    return LlavaDataset(
        records, get_template("phi"), model.tokenizer, model.image_processor(), max_length=4096, layout=model.layout
    )


@pytest.mark.parametrize("kind", list(TILINGS))
@torch.no_grad()
def test_mixed_sizes_give_one_loss_padded_packed_and_alone_with_exact_counts(kind, records):
    model = tiled(TILINGS[kind])
    data = dataset(model, records)
    items = [data[i] for i in range(len(data))]
    alone = [batch_forward(model, collate_padded([item])) for item in items]
    for item, out, length in zip(items, alone, data.token_lengths(), strict=True):
        assert int(out.spliced.attention_mask.sum()) == length == item["length"]  # what packing budgets use
    tokens = [int(item["image_tokens"].sum()) for item in items[:4]]
    assert len(set(tokens)) > 1  # the images' sizes gave different token counts
    total = sum(float(out.loss_sum) for out in alone)
    supervised = sum(int(out.num_supervised) for out in alone)
    for collate in (collate_padded, collate_packed):
        batch = collate(items)
        out = batch_forward(model, batch)
        assert int(out.num_supervised) == supervised
        expected_count = count_targets(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            batch["image_tokens"],
            segment_ids=batch["segment_ids"],
        )
        assert int(expected_count) == supervised  # the loss count known before the forward
        assert abs(float(out.loss_sum) - total) < 1e-3 * abs(total)
        sizes = sample_sizes(batch)
        assert [text + visual for text, _, _, visual in sizes] == data.token_lengths()
        assert [frames for _, frames, _, _ in sizes] == [
            len(item["pixel_values"]) if item["pixel_values"] is not None else 0 for item in items
        ]


@pytest.mark.parametrize("kind", list(TILINGS))
def test_training_flops_of_a_tiled_image_match_torchs_count(kind, records):
    model = tiled(TILINGS[kind], "eager")  # the counter sees eager attention's matmuls
    for param in model.parameters():
        param.requires_grad_(True)
    batch = collate_padded([dataset(model, records)[0]])
    with FlopCounterMode(display=False) as counter:
        batch_forward(model, batch).loss.backward()
    ((text, frames, supervised, visual),) = sample_sizes(batch)
    ours = sample_flops(model, text, frames, supervised, visual_tokens=visual).useful
    measured = float(counter.get_total_flops())
    assert ours == pytest.approx(measured, rel=0.05)  # the tolerance of test_plan's untiled comparison


def test_planner_budgets_llava_nexts_own_token_count(tmp_path):
    from transformers import LlavaNextProcessor

    from mipha_lab.config import load_experiment
    from mipha_lab.plan import plan_experiment

    experiment = load_experiment(REPO / "experiments/llava_phi_clip_phi2.yaml", ["model.tiling={kind: anyres}"])
    plan = plan_experiment(experiment)
    # the largest grid (2 x 2 of 336 px tiles) of an image that fills it: nothing unpadded
    grids = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=grids), patch_size=14)
    processor.num_additional_image_tokens = 0  # CLIP's CLS, which the "default" strategy drops again
    processor._get_unpadded_features = LlavaNextProcessor._get_unpadded_features.__get__(processor)
    theirs = max(LlavaNextProcessor._get_number_of_features(processor, h, w, 336, 336) for h, w in grids)
    assert plan["visual_tokens"] == theirs == 2928 and plan["frames_per_image"] == 5


DESIGN_SPACE = {  # each component of the design space, an override away from micro.yaml
    "anyres": ["model.tiling={kind: anyres, grids: [[1, 2], [2, 2]]}"],
    "split": ["model.tiling={kind: split, max_side: 2}"],
    "fused encoder": ["model.vision=tiny-dinosiglip-384"],
    "pixel shuffle": ["model.projector=pixel-shuffle", "model.projector_args={ratio: 2}"],
}


@pytest.mark.parametrize("component", list(DESIGN_SPACE))
def test_micro_trains_and_answers_with_each_design_space_component(component, tmp_path, data_root):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipha_lab.launch",
            str(REPO / "experiments/micro.yaml"),
            *DESIGN_SPACE[component],
            "stages.0.max_steps=2",
            "stages.1.max_steps=4",
            "stages.0.max_length=320",
            f"runs_root={tmp_path}/runs",
            f"data_root={data_root}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "micro"
    config = json.loads((run / "final/config.json").read_text())
    assert "shapes-vqa,accuracy," in (run / "eval/summary.csv").read_text()  # answered through the same path
    assert json.loads((run / "skipped-align.json").read_text())["total"] == 0  # the captions fit 320 positions
    if component in ("anyres", "split"):
        assert config["tiling"]["kind"] == component
        assert not (run / "final/preprocessor_config.json").exists()  # transformers' processor would not tile
    else:
        assert component != "fused encoder" or config["vision"]["name"] == "tiny-dinosiglip-384"
        assert component != "pixel shuffle" or config["projector"]["name"] == "pixel-shuffle"


def test_a_micro_batch_of_skipped_samples_trains_on_nothing():
    """Tiles make samples long: a micro-batch whose samples were all too long must not stop the run, and
    every process must still run forward and backward (ZeRO-3 gathers collectively)."""
    from mipha_lab.data.problems import Skipped

    model = tiled(TILINGS["split"]).train()
    out = batch_forward(model, collate_padded([Skipped("s0", "too_long", "999 positions > max length 128")]))
    out.loss_sum.backward()
    assert float(out.loss_sum.detach()) == 0.0 and int(out.num_supervised) == 0
    assert all(p.grad is not None for p in model.projector.parameters())  # the tower and projector ran


@pytest.mark.parametrize("kind", list(TILINGS))
@torch.no_grad()
def test_a_batch_of_images_of_mixed_sizes_generates_as_each_alone(kind, records):
    """Left padding after splicing, with a different number of visual tokens per image: each sample's first
    generated logits equal its own, alone."""
    from mipha_lab.data.image_placement import image_markup
    from mipha_lab.data.templates import encode_prompt

    model, template = tiled(TILINGS[kind]), get_template("phi")
    images = [Image.new("RGB", (width, height), (60 * i, 90, 200 - 50 * i)) for i, (height, width) in enumerate(SIZES)]
    messages = [{"role": "user", "content": "<image>\nwhat is it?"}]
    prompts, frames, sizes = [], [], []
    for image in images[:3]:
        size = (image.height, image.width)
        prompts.append(encode_prompt(template, model.tokenizer, messages, image_markup(model.layout, template, [size])))
        frames.append(model.image_processor()(image))
        sizes.append(size)

    def first_logits(indices: list[int]) -> torch.Tensor:
        width = max(len(prompts[i]) for i in indices)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            ids[row, : len(prompts[i])], mask[row, : len(prompts[i])] = torch.tensor(prompts[i]), 1
        pixels = torch.cat([frames[i] for i in indices])
        out = model.generate(
            ids, mask, pixels, image_sizes=[sizes[i] for i in indices], max_new_tokens=1, output_scores=True
        )
        return out.logits[0]

    batched = first_logits([0, 1, 2])
    assert len({len(p) for p in prompts}) > 1 or kind == "anyres"  # split: different markup per image
    for row in range(3):
        torch.testing.assert_close(batched[row], first_logits([row])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(TILINGS))
def test_chat_answers_about_a_tiled_image(kind):
    from mipha_lab.serve.chat import Conversation

    chat = Conversation(tiled(TILINGS[kind]), get_template("phi"), temperature=0.0, max_new_tokens=4)
    chat.set_image(Image.new("RGB", (90, 40), (200, 30, 30)))
    assert isinstance(chat.reply("What color is it?"), str) and len(chat.messages) == 2
    assert isinstance(chat.reply("And the shape?"), str) and len(chat.messages) == 4
