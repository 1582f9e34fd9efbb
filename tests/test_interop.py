"""Interoperability: the released checkpoints' layouts load with every tensor in place and the same logits;
`export mipha-lab` writes our format; `export hf-llava` gives plain transformers the same logits and greedy tokens;
LoRA runs load unmerged and export merged with identical outputs; pickle files are refused unless allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mipha_lab.config import AnyresTiling
from mipha_lab.data.templates import get_template
from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel, build_vlm
from tests.interop_helpers import (
    QUESTION,
    example_size,
    gelu_gemma,
    hf_llava_outputs,
    inputs,
    logits,
    released_name,
    write_released,
)

LAYOUTS = {
    "mipha-3b (phi-2, siglip)": ("mipha_phi", "tiny-siglip-so400m-384", "tiny-phi-2", {}),
    "mipha-1.6b (phi-1.5, fused qkv)": ("mipha_phi", "tiny-siglip-so400m-384", "tiny-phi-1.5", {"fused_qkv": True}),
    "mipha-2.4b (gemma, tied head)": ("mipha_gemma", "tiny-siglip-so400m-384", gelu_gemma, {"gemma": True}),
    "llava-phi (clip)": ("llava_phi", "tiny-clip-vit-l-336", "tiny-phi-2", {}),
}


def reference(vision: str, llm, tiling=None) -> MultimodalModel:
    torch.manual_seed(0)
    return build_vlm(vision, llm() if callable(llm) else llm, tiling=tiling).eval()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_released_layouts_load_every_tensor_in_place_with_the_same_logits(layout, tmp_path):
    model_type, vision, llm, options = LAYOUTS[layout]
    ref = reference(vision, llm)
    folder = tmp_path / "gemma-named-folder-but-not-gemma"  # routing never reads the folder's name
    stored = write_released(ref, folder, model_type, **options)
    loaded = MultimodalModel.from_pretrained(folder)
    ours = loaded.state_dict()
    # key by key: every stored tensor sits where the reference model had it
    expected = {released_name(name): name for name in ref.state_dict()}
    heads = ref.language_model.config.num_attention_heads
    for name, tensor in stored.items():
        if ".query_key_value." in name:
            per_head = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
            layer, kind = name.split(".self_attn.query_key_value.")
            for i, proj in enumerate("qkv"):
                target = ours[f"language_model.{layer}.self_attn.{proj}_proj.{kind}"]
                assert torch.equal(target, per_head[:, i].reshape(target.shape)), name
        else:
            assert torch.equal(ours[expected[name]], tensor), name
    assert any(".head." in name for name in stored) == (model_type != "llava_phi")  # SigLIP's unused head loaded too
    assert loaded.config.template == ("gemma" if model_type == "mipha_gemma" else "phi")
    assert loaded.vision_tower.image_spec == ref.vision_tower.image_spec and loaded.vision_tower.feature_layer == -2
    assert loaded.language_model.config.eos_token_id == ref.tokenizer.eos_token_id  # not the config's wrong 2
    torch.testing.assert_close(logits(loaded), logits(ref), atol=1e-5, rtol=0)


def test_gemma_runs_the_exact_gelu_its_config_names(tmp_path):
    ref = reference("tiny-siglip-so400m-384", gelu_gemma)
    write_released(ref, tmp_path / "m", "mipha_gemma", gemma=True)
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    assert loaded.language_model.config.hidden_act == "gelu"
    x = torch.linspace(-4, 4, 101)
    for layer in loaded.language_model.model.layers:  # what runs, whatever key this transformers reads
        act = layer.mlp.act_fn
        torch.testing.assert_close(act(x), torch.nn.functional.gelu(x), atol=1e-7, rtol=0)
        assert (act(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() > 1e-4


def test_export_to_our_format_writes_it_and_refuses_pickle_unless_allowed(tmp_path):
    ref = reference("tiny-siglip-so400m-384", "tiny-phi-2")
    stored = write_released(ref, tmp_path / "released", "mipha_phi")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "mipha_lab.export", "mipha-lab"]
    out = subprocess.run(
        [*run, str(tmp_path / "released"), str(tmp_path / "ours")], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "ours/config.json").read_text())["format"] == "mipha-lab"
    torch.testing.assert_close(
        logits(MultimodalModel.from_pretrained(tmp_path / "ours")), logits(ref), atol=1e-5, rtol=0
    )

    pickled = tmp_path / "pickled"
    write_released(ref, pickled, "mipha_phi")
    (pickled / "model.safetensors").unlink()
    torch.save(stored, pickled / "pytorch_model.bin")
    refused = subprocess.run(
        [*run, str(pickled), str(tmp_path / "p")], capture_output=True, text=True, env=env, timeout=300
    )
    assert refused.returncode == 2 and "pytorch_model.bin" in refused.stderr and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "p").exists()
    allowed = subprocess.run(
        [*run, str(pickled), str(tmp_path / "p"), "--allow-pickle"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    torch.testing.assert_close(logits(MultimodalModel.from_pretrained(tmp_path / "p")), logits(ref), atol=1e-5, rtol=0)


def test_unknown_formats_and_misplaced_tensors_are_named(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        MultimodalModel.from_pretrained(tmp_path / "other")
    ref = reference("tiny-siglip-so400m-384", "tiny-phi-2")
    stored = write_released(ref, tmp_path / "extra", "mipha_phi")
    from safetensors.torch import save_file

    save_file({**stored, "model.mm_projector.4.weight": torch.zeros(2, 2)}, str(tmp_path / "extra/model.safetensors"))
    with pytest.raises(ConfigError, match=r"projector.4.weight"):
        MultimodalModel.from_pretrained(tmp_path / "extra")


# ------------------------------------------------------------------ export to transformers' Llava
ANYRES = AnyresTiling()  # LLaVA-NeXT's five grids; the example image (4:3) takes 2 x 2 tiles, unpadded
EXPORTS = {
    "siglip + phi-2": ("tiny-siglip-so400m-384", "tiny-phi-2", "phi", "<|endoftext|>", None),
    "clip + phi-2": ("tiny-clip-vit-l-336", "tiny-phi-2", "phi", "<|endoftext|>", None),
    "siglip + gemma (features scaled)": ("tiny-siglip-so400m-384", gelu_gemma, "gemma", "<eos>", None),
    "anyres clip + phi-2 -> LlavaNext": ("tiny-clip-vit-l-336", "tiny-phi-2", "phi", "<|endoftext|>", ANYRES),
    "anyres siglip + phi-2 -> LlavaNext": ("tiny-siglip-so400m-384", "tiny-phi-2", "phi", "<|endoftext|>", ANYRES),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_hf_llava_gives_plain_transformers_the_same_logits_and_tokens(case, tmp_path):
    vision, llm, template, end, tiling = EXPORTS[case]
    ref = reference(vision, llm, tiling)
    ref.save_pretrained(tmp_path / "ours")
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.export", "hf-llava", str(tmp_path / "ours"), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    prompt, hf_logits, hf_tokens = hf_llava_outputs(tmp_path / "hf", backend="pil")
    assert prompt == get_template(template).prompt([{"role": "user", "content": "<image>\n" + QUESTION}])
    assert (hf_logits - logits(ref)).abs().max() < 1e-4  # Phi's head bias, Gemma's feature scale folded in exactly
    ids, mask, pixels = inputs(ref)
    assert hf_tokens == ref.generate(ids, mask, pixels, max_new_tokens=8, image_sizes=example_size())[0].tolist()
    generation = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert generation["eos_token_id"] == ref.tokenizer.convert_tokens_to_ids(end)


def test_export_refuses_what_llava_cannot_express(tmp_path):
    from mipha_lab.export import export_hf_llava

    build_vlm("tiny-siglip-so400m-384", "tiny-phi-2", "ldp-v2").save_pretrained(tmp_path / "ldp")
    with pytest.raises(ConfigError, match="mlp2x_gelu"):
        export_hf_llava(tmp_path / "ldp", tmp_path / "out")
    build_vlm("tiny-timm-siglip-so400m-384", "tiny-phi-2").save_pretrained(tmp_path / "timm")
    with pytest.raises(ConfigError, match="SigLIP or CLIP"):
        export_hf_llava(tmp_path / "timm", tmp_path / "out")


# ------------------------------------------------------------------ LoRA
def test_lora_run_loads_unmerged_and_exports_merged_with_identical_outputs(tmp_path, data_root):
    from peft.tuners.lora import LoraLayer

    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[1]
    lora = "stages.instruct.trainable.lm_body={mode: lora, r: 4, alpha: 8, dropout: 0.0}"
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipha_lab.launch",
            str(repo / "experiments/micro.yaml"),
            lora,
            "eval.benchmarks=[]",
            f"runs_root={tmp_path}/runs",
            f"data_root={data_root}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    run = tmp_path / "runs" / "micro"
    adapters = json.loads((run / "final/config.json").read_text())["adapters"]
    assert [a["module"] for a in adapters] == ["lm_body"]
    from mipha_lab.model import load_model

    unmerged = load_model(run)
    assert any(isinstance(m, LoraLayer) for m in unmerged.modules())
    lora_b = [p for n, p in unmerged.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the adapters trained: merging changes weights
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.export", "merged", str(run), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    merged = MultimodalModel.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert json.loads((tmp_path / "merged/config.json").read_text())["adapters"] == []
    torch.testing.assert_close(logits(merged), logits(unmerged), atol=1e-5, rtol=0)
