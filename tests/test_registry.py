"""The generic registry, card validation and discovery, and the `registry list` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mipha_lab.errors import ConfigError, UnknownNameError
from mipha_lab.model.language import LLM
from mipha_lab.model.projectors import PROJECTORS
from mipha_lab.model.vision import VISION
from mipha_lab.registry import Registry, add_card_dir, read_card
from mipha_lab.registry.__main__ import list_entries, main

REPO = Path(__file__).resolve().parents[1]
REQUIRED_VISION = [
    "siglip-so400m-384",
    "siglip-base-224",
    "clip-vit-l-336",
    "clip-vit-l-224",
    "dinov2-large",
    "timm-siglip-so400m-384",
    "openclip-vit-b-16-laion2b",
]
REQUIRED_LLM = ["phi-1.5", "phi-2", "gemma-2b", "qwen2.5-1.5b", "qwen2.5-0.5b", "smollm2-1.7b"]


def test_register_build_and_list():
    reg: Registry = Registry("widget", "test widgets")

    @reg.register("double")
    def double(x: int) -> int:
        """Twice x."""
        return 2 * x

    assert reg.build("double", x=4) == 8
    assert reg.names() == ["double"]
    assert reg.entry("double").description == "Twice x."
    with pytest.raises(ValueError, match="already registered"):
        reg.register("double")(double)

    @reg.register("times{factor}")
    def times(x: int, factor: int) -> int:
        return factor * x

    assert reg.build("times7", x=3) == 21  # a name family passes its integer fields on


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError) as err:
        VISION.get("siglip-so400m-38")
    message = str(err.value)
    assert "did you mean: siglip-so400m-384" in message
    assert "unknown vision encoder 'siglip-so400m-38'" in message


@pytest.mark.parametrize("name", REQUIRED_VISION)
def test_required_vision_cards_and_tiny_siblings(name):
    card, tiny = VISION.get(name), VISION.get(f"tiny-{name}")
    assert card.hub_id and tiny.hub_id is None
    assert card.builder == tiny.builder
    assert {"transformers", "timm", "open_clip"} == {VISION.get(n).builder for n in REQUIRED_VISION}


@pytest.mark.parametrize("name", REQUIRED_LLM)
def test_required_llm_cards_and_tiny_siblings(name):
    card, tiny = LLM.get(name), LLM.get(f"tiny-{name}")
    assert card.hub_id and tiny.hub_id is None
    assert card.architecture["model_type"] == tiny.architecture["model_type"]
    assert card.template == tiny.template


def test_projector_registry_resolves_general_mlp():
    assert {"linear", "mlp2x_gelu", "identity", "ldp-v2", "avgpool"} <= set(PROJECTORS.names())
    projector = PROJECTORS.build("mlp3x_gelu", in_dim=8, out_dim=4)
    assert len([m for m in projector if m.__class__.__name__ == "Linear"]) == 3


def test_list_command_shows_every_card():
    result = subprocess.run(
        [sys.executable, "-m", "mipha_lab.registry", "list"], capture_output=True, text=True, cwd="/", check=True
    )
    for name in REQUIRED_VISION + REQUIRED_LLM + ["mlp2x_gelu", "ldp-v2"]:
        assert f"  {name} " in result.stdout
        if name in REQUIRED_VISION + REQUIRED_LLM:
            assert f"  tiny-{name} " in result.stdout
    assert "llm (" in list_entries(["llm"]) and "template (" in result.stdout


def test_list_unknown_kind_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["list", "visoin"])


def _write_card(folder: Path, kind: str, name: str, text: str) -> Path:
    (folder / kind).mkdir(parents=True, exist_ok=True)
    path = folder / kind / f"{name}.yaml"
    path.write_text(text)
    return path


def _card_text(kind_line: str = "builder: transformers") -> str:
    base = (REPO / "registry" / "vision" / "tiny-siglip-so400m-384.yaml").read_text()
    return base.replace("builder: transformers", kind_line)


def test_card_with_unknown_field_names_path_and_field(tmp_path):
    path = _write_card(tmp_path, "vision", "bad", _card_text("builder: transformers\nhubid: x"))
    with pytest.raises(ConfigError) as err:
        read_card(path, "vision")
    assert str(path) in str(err.value) and "unknown key 'hubid'" in str(err.value)
    assert "hub_id" in str(err.value)  # the allowed fields are listed


def test_card_with_missing_field_names_path_and_field(tmp_path):
    text = "\n".join(line for line in _card_text().splitlines() if not line.startswith("hub_id"))
    path = _write_card(tmp_path, "vision", "bad", text)
    with pytest.raises(ConfigError, match=r"bad\.yaml: missing required key 'hub_id'"):
        read_card(path, "vision")


def test_card_with_wrong_nested_value(tmp_path):
    path = _write_card(tmp_path, "vision", "bad", _card_text().replace("resize: square", "resize: stretch"))
    with pytest.raises(ConfigError, match=r"key 'image.resize'.*'square' or 'shortest_edge'"):
        read_card(path, "vision")


def test_user_card_folder_from_environment(tmp_path):
    _write_card(tmp_path, "vision", "my-encoder", _card_text().replace("tiny random-init", "my own"))
    code = "from mipha_lab.model.vision import VISION; c = VISION.get('my-encoder'); print(c.description, c.source)"
    env = {**__import__("os").environ, "MIPHA_LAB_CARDS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.startswith("my own") and str(tmp_path) in out.stdout


def test_user_card_folder_added_in_code(tmp_path):
    _write_card(tmp_path, "llm", "my-lm", (REPO / "registry/llm/tiny-phi-2.yaml").read_text())
    add_card_dir(tmp_path)
    assert LLM.get("my-lm").source == str(tmp_path / "llm" / "my-lm.yaml")


def test_wheel_ships_the_cards(tmp_path):
    """A non-editable install finds the cards inside the package, from any working directory."""
    pytest.importorskip("hatchling")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mipha_lab-*.whl")
    site = tmp_path / "site"
    import zipfile

    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "mipha_lab/_cards/vision/siglip-so400m-384.yaml").is_file()
    code = "from mipha_lab.model.vision import VISION; print(VISION.get('siglip-so400m-384').source)"
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "mipha_lab/_cards/vision/siglip-so400m-384.yaml")
