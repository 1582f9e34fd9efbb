"""Experiment files: schema errors name file and key, `extends` and overrides resolve as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from mipha_lab.config import apply_override, deep_merge, load_experiment
from mipha_lab.errors import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_shipped_experiments_validate():
    demo = load_experiment(EXPERIMENTS / "demo_shapes.yaml")
    micro = load_experiment(EXPERIMENTS / "micro.yaml")
    assert demo.run_name == "demo_shapes" and micro.run_name == "micro"
    assert [s.name for s in micro.stages] == ["align", "instruct"]
    assert micro.stage("instruct").max_steps == 15 and micro.stage("instruct").template == "phi"  # inherited
    assert micro.extends_chain == [str(EXPERIMENTS / "demo_shapes.yaml"), str(EXPERIMENTS / "micro.yaml")]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_path_and_allowed_keys(tmp_path):
    path = write(
        tmp_path,
        "bad.yaml",
        f"extends: {EXPERIMENTS / 'micro.yaml'}\nstages:\n  - name: instruct\n    optimzer: {{lr: 1}}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    message = str(err.value)
    assert "bad.yaml" in message and "unknown key 'stages.1.optimzer'" in message and "optimizer" in message


def test_wrong_type_and_literal_name_the_key_and_allowed_values(tmp_path):
    path = write(tmp_path, "bad.yaml", f"extends: {EXPERIMENTS / 'micro.yaml'}\nengine: {{zero_stage: 4}}\n")
    with pytest.raises(ConfigError, match=r"key 'engine.zero_stage': Input should be 0, 1, 2 or 3"):
        load_experiment(path)
    with pytest.raises(ConfigError, match=r"key 'seed'.*integer"):
        load_experiment(EXPERIMENTS / "micro.yaml", ["seed=abc"])


def test_policy_strings_and_checks(tmp_path):
    exp = load_experiment(EXPERIMENTS / "micro.yaml", ["stages.instruct.trainable.lm_body=lora"])
    assert exp.stage("instruct").trainable.lm_body.mode == "lora" and exp.stage("instruct").trainable.lm_body.r == 64
    with pytest.raises(ConfigError, match=r"missing required key 'stages.1.trainable.vision.partial.from_layer'"):
        load_experiment(EXPERIMENTS / "micro.yaml", ["stages.instruct.trainable.vision=partial"])
    with pytest.raises(
        ConfigError, match=r"unknown key 'stages.1.trainable.vision.full.r' \(allowed: lr, lr_scale, mode\)"
    ):
        load_experiment(EXPERIMENTS / "micro.yaml", ["stages.instruct.trainable.vision={mode: full, r: 8}"])
    with pytest.raises(
        ConfigError, match=r"trainable.vision': Input tag 'half' .* expected tags: 'frozen', 'full', 'lora', 'partial'"
    ):
        load_experiment(EXPERIMENTS / "micro.yaml", ["stages.instruct.trainable.vision=half"])
    with pytest.raises(ConfigError, match="not a multiple of micro_batch"):
        load_experiment(EXPERIMENTS / "micro.yaml", ["stages.align.global_batch=6"])


def test_overrides_address_stages_by_name_or_index():
    exp = load_experiment(
        EXPERIMENTS / "micro.yaml",
        ["stages.instruct.optimizer.lr=1e-5", "stages.0.max_steps=2", "model.projector_args={depth: 3}", "run_name=x"],
    )
    assert exp.stage("instruct").optimizer.lr == 1e-5 and exp.stage("align").max_steps == 2
    assert exp.model.projector_args == {"depth": 3} and exp.run_name == "x"
    with pytest.raises(ConfigError, match=r"stages.finetune names no item \(items: \['align', 'instruct'\]\)"):
        load_experiment(EXPERIMENTS / "micro.yaml", ["stages.finetune.optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"must look like key.sub=value"):
        apply_override({}, "seed")


def test_deep_merge_merges_named_lists_by_name():
    base = {"a": {"x": 1, "y": 2}, "stages": [{"name": "s1", "lr": 1}, {"name": "s2", "lr": 2}], "tags": [1, 2]}
    child = {"a": {"y": 3}, "stages": [{"name": "s2", "lr": 5}, {"name": "s3"}], "tags": [9]}
    merged = deep_merge(base, child)
    assert merged == {
        "a": {"x": 1, "y": 3},
        "stages": [{"name": "s1", "lr": 1}, {"name": "s2", "lr": 5}, {"name": "s3"}],
        "tags": [9],
    }


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="forms a cycle"):
        load_experiment(tmp_path / "a.yaml")
    write(tmp_path, "c.yaml", "extends: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: extends 'nope.yaml', but .*nope.yaml does not exist"):
        load_experiment(tmp_path / "c.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    write(tmp_path, "bad.yaml", "model:\n  vision: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_experiment(tmp_path / "bad.yaml")
