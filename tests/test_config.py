"""YAML -> dataclasses: unknown keys and bad types are errors naming the key; shipped configs validate."""

from pathlib import Path

import pytest

from finetune.config import ConfigError, RunConfig, load_config
from tests.helpers import REPO

REQUIRED = ["model.name=builtin:x", "data.path=d"]


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, REQUIRED + ["train.max_steps=3", "train.lr=1e-3", "vision.crop_to_patches=true", "report_to=[wandb]"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.vision.crop_to_patches, cfg.report_to) == (3, 1e-3, True, ["wandb"])
    assert cfg.lora.r == RunConfig().lora.r  # untouched keys keep the dataclass defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
        ("trian.max_steps=3", "unknown config key 'trian'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("lora.r=1.5", "lora.r: expected an integer"),
        ("train.gradient_checkpointing=1", "train.gradient_checkpointing: expected true or false"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, REQUIRED + [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  name: builtin:x\n  nmae: y\ndata:\n  path: d\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'model\.nmae'"):
        load_config(f)


def test_required_keys():
    with pytest.raises(ConfigError, match="model.name is required"):
        load_config(None, ["data.path=d"])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "runs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_validates(path: Path):
    cfg = load_config(path)
    assert cfg.model.name and cfg.data.path and cfg.train.max_steps > 0


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads_in_accelerate(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 1 and cfg.mixed_precision in ("no", "bf16")


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.sh")), ids=lambda p: p.name)
def test_every_recipe_parses_and_names_shipped_configs(path: Path):
    import re
    import subprocess

    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    for header in ("# Purpose:", "# Data:", "# Hardware:", "# Wall time:", "# Metric:"):
        assert header in text, f"{path.name} lacks {header}"
    for ref in re.findall(r"configs/\S+\.yaml", text):
        assert (REPO / ref).is_file(), ref
        if ref.startswith("configs/runs/"):
            load_config(REPO / ref)


def test_ocrtune_validate_cli(tmp_path):
    from tests.helpers import run_cli

    shipped = sorted(str(p) for p in (REPO / "configs").glob("*/*.yaml"))
    ok = run_cli("validate", *shipped)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("\nok ") + ok.stdout.startswith("ok ") == len(shipped)
    (tmp_path / "bad.yaml").write_text("model:\n  name: builtin:nope\ndata:\n  path: x\n")
    (tmp_path / "typo.yaml").write_text("model:\n  name: a/b\ndata:\n  path: x\ntrain:\n  max_stepz: 3\n")
    (tmp_path / "acc.yaml").write_text("compute_environment: LOCAL_MACHINE\nnum_processez: 2\n")
    bad = run_cli("validate", str(tmp_path / "bad.yaml"), str(tmp_path / "typo.yaml"), str(tmp_path / "acc.yaml"))
    assert bad.returncode == 2
    assert "bad.yaml: model.name: unknown model 'builtin:nope'" in bad.stdout
    assert "unknown config key 'train.max_stepz'" in bad.stdout
    assert "acc.yaml: not a valid accelerate config" in bad.stdout


def test_bare_no_is_the_string_no():
    cfg = load_config(None, ["model.name=builtin:x", "data.path=d", "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
