"""The README's Python API example runs as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def blocks(language: str) -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def user_module(tmp_path_factory) -> Path:
    """The README's my_components.py, written as a user would."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_components.py").write_text(blocks("python")[0])
    return folder


def test_python_api_example_runs(user_module):
    env = {**os.environ, "PYTHONPATH": str(user_module), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", blocks("python")[1]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=user_module,
    )
    assert out.returncode == 0, out.stderr
    shape, loss = out.stdout.split(") ")
    assert shape == "torch.Size([1, 19, 1024]" and 5.0 < float(loss) < 9.0  # ~ln(1024) at random init


@pytest.mark.slow
def test_experiment_with_imports_trains_evaluates_and_chats(user_module, data_root):
    """The README's experiment and commands, as written (the experiment's `extends:` pointed at this checkout)."""
    experiment = blocks("yaml")[0].replace("experiments/micro.yaml", str(REPO / "experiments" / "micro.yaml"))
    (user_module / "my_experiment.yaml").write_text(experiment)
    env = {**os.environ, "PYTHONPATH": str(user_module), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    launch, chat = [" ".join(c.split()) for c in blocks("bash")[0].replace("\\\n", " ").splitlines() if c.strip()]
    for command, extra in ((launch, [f"data_root={data_root}", "tracking.wandb_mode=disabled"]), (chat, [])):
        words = shlex.split(command, comments=True)
        assert words[:2] == ["PYTHONPATH=.", "python"], command
        out = subprocess.run(
            [sys.executable, *words[2:], *extra], capture_output=True, text=True, timeout=600, env=env, cwd=user_module
        )
        assert out.returncode == 0, (command, out.stderr[-3000:])
    run = user_module / "runs" / "my_experiment"
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["vision"]["name"] == "patchify-16" and config["imports"] == ["my_components"]
    assert (run / "eval" / "shapes-vqa" / "scores.json").is_file() and out.stdout.strip()  # evaluated, then a reply
    unknown = subprocess.run(
        [sys.executable, "-m", "mipha_lab.serve.cli", "--model-path", str(run), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONPATH": ""},
    )
    assert unknown.returncode == 2 and "--import MODULE" in unknown.stderr  # without the module: said how to fix it


def test_quickstart_has_exactly_two_commands():
    block = README.read_text().split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[1] == "./test.sh"
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line.startswith("./")] == ["./test.sh"]  # CI calls exactly the README's command
