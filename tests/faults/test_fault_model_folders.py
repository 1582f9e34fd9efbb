"""Model folders: only the folder's own weight files are read, truncated weights are named, and no code
from a folder runs - not through serve, eval or export (to Llava or to our format), not even when "y" waits on stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel, build_vlm
from mipha_lab.model.weights import weight_files
from tests.interop_helpers import logits, write_released

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('code from the folder ran')\n"
AUTO_MAP = {
    "tokenizer_config.json": {"AutoTokenizer": ["evil.EvilTokenizer", None]},
    "preprocessor_config.json": {"AutoImageProcessor": "evil.EvilImageProcessor"},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "ours"
    build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").eval().save_pretrained(folder)
    return folder


def copy_of(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_only_the_folders_own_weight_files_are_read(saved, tmp_path):
    folder = copy_of(saved, tmp_path / "m")
    expected = logits(MultimodalModel.from_pretrained(folder))
    zeros = {k: torch.zeros_like(v) for k, v in MultimodalModel.from_pretrained(folder).weights_to_save().items()}
    save_file(zeros, str(folder / "adapter_model.safetensors"))  # a user's file beside the weights
    save_file({"something.else": torch.zeros(3)}, str(folder / "reference.safetensors"))
    assert weight_files(folder) == [folder / "model.safetensors"]
    torch.testing.assert_close(logits(MultimodalModel.from_pretrained(folder)), expected, atol=0, rtol=0)


def test_sharded_weights_by_index_and_by_name(saved, tmp_path):
    folder = copy_of(saved, tmp_path / "m")
    expected = logits(MultimodalModel.from_pretrained(folder))
    state = MultimodalModel.from_pretrained(folder).weights_to_save()
    names = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    (folder / "model.safetensors").unlink()
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / file))
    assert [p.name for p in weight_files(folder)] == sorted(halves)  # by name, no index
    torch.testing.assert_close(logits(MultimodalModel.from_pretrained(folder)), expected, atol=0, rtol=0)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"stray": torch.zeros(1)}, str(folder / "model-00009-of-00009.safetensors"))  # not in the index
    assert [p.name for p in weight_files(folder)] == sorted(halves)
    torch.testing.assert_close(logits(MultimodalModel.from_pretrained(folder)), expected, atol=0, rtol=0)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model-00002-of-00002.safetensors"):
        MultimodalModel.from_pretrained(folder)


def test_pickle_weights_only_with_allow_pickle(saved, tmp_path):
    folder = copy_of(saved, tmp_path / "m")
    state = MultimodalModel.from_pretrained(folder).weights_to_save()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="--allow-pickle"):
        MultimodalModel.from_pretrained(folder)
    MultimodalModel.from_pretrained(folder, allow_pickle=True)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        MultimodalModel.from_pretrained(folder)


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors_is_named(saved, tmp_path, cut):
    folder = copy_of(saved, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:6] if cut == "header" else data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"model.safetensors: not a readable safetensors file"):
        MultimodalModel.from_pretrained(folder)


def cli(*args: str, stdin: str = "y\ny\ny\n") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


COMMANDS = {
    "serve": lambda m, out, root: cli(
        "mipha_lab.serve.cli", "--model-path", str(m), "--prompt", "hi", "--temperature", "0"
    ),
    "eval": lambda m, out, root: cli(
        "mipha_lab.eval",
        "run",
        str(m),
        "--benchmarks",
        "shapes-vqa",
        "--data-root",
        str(root),
        "--limit",
        "2",
        "--out",
        str(out),
    ),
    "export": lambda m, out, root: cli("mipha_lab.export", "hf-llava", str(m), str(out)),
    "export-ours": lambda m, out, root: cli("mipha_lab.export", "mipha-lab", str(m), str(out)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(AUTO_MAP))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_folder_that_names_its_own_code_is_refused_and_nothing_runs(kind, command, tmp_path, data_root):
    torch.manual_seed(0)
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").eval()
    folder = tmp_path / "malicious"
    if command == "export-ours":
        write_released(model, folder, "mipha_phi")
    else:
        model.save_pretrained(folder)
    (folder / "evil.py").write_text(EVIL)
    config = json.loads((folder / kind).read_text())
    (folder / kind).write_text(json.dumps({**config, "auto_map": AUTO_MAP[kind]}))
    result = COMMANDS[command](folder, tmp_path / "out", data_root)
    assert not (folder / "RAN").exists(), "code from the model folder ran"
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{kind}: 'auto_map' points at code" in result.stderr and "Traceback" not in result.stderr
