"""YAML -> dataclasses: unknown keys and bad types are errors naming the key; shipped configs validate."""

import json
import re
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
        ("model.dtype=bf17", "model.dtype 'bf17': choose one of auto, float32, bfloat16, float16"),
        ("train.mixed_precision=fp8", "train.mixed_precision 'fp8': choose one of auto, no, bf16, fp16"),
        ("lora.preset=everything", "lora.preset 'everything': choose one of attention, attention+mlp, all, full"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, REQUIRED + [override])


def test_dropout_with_routed_expert_lora_is_refused():
    with pytest.raises(ConfigError, match=re.escape("lora.dropout 0.1: must be 0 with lora.preset all")):
        load_config(None, REQUIRED + ["lora.preset=all", "lora.dropout=0.1"])
    assert load_config(None, REQUIRED + ["lora.preset=attention", "lora.dropout=0.1"]).lora.dropout == 0.1


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
    # Measured figures live in BENCHMARKS.md: the header names its row there, and the row exists.
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f'BENCHMARKS.md, "Recipes", {path.name}' in " ".join(header.replace("#", " ").split()), path.name
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    recipes_table = benchmarks[benchmarks.index("## Recipes"):].split("\n## ")[0]
    assert f"`{path.name}`" in recipes_table, f"BENCHMARKS.md has no Recipes row for {path.name}"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b|\d+\.\d+ ?s/step|CER \d", header), f"{path.name}: a measured figure or date"
    for ref in re.findall(r"configs/\S+\.yaml", text):
        assert (REPO / ref).is_file(), ref
        if ref.startswith("configs/runs/"):
            load_config(REPO / ref)


@pytest.mark.integration  # a CLI subprocess or a training run
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


def test_preset_choices_are_the_resolvers():
    import typing

    from finetune.config import LoraSettings
    from finetune.lora import PRESET_CHOICES

    assert typing.get_args(typing.get_type_hints(LoraSettings)["preset"]) == PRESET_CHOICES


@pytest.mark.integration  # a CLI subprocess or a training run
def test_validate_checks_family_choices_without_weights(tmp_path):
    from tests.helpers import run_cli

    (tmp_path / "mode.yaml").write_text("model:\n  name: builtin:tiny-deepseek-ocr-2\ndata:\n  path: x\n"
                                        "vision:\n  mode: tiny\n")
    (tmp_path / "huge.yaml").write_text("model:\n  name: builtin:tiny-deepseek-ocr\ndata:\n  path: x\n"
                                        "vision:\n  mode: huge\n")
    (tmp_path / "dtype.yaml").write_text("model:\n  name: builtin:tiny-deepseek-ocr\n  dtype: bf17\ndata:\n  path: x\n")
    bad = run_cli("validate", *(str(tmp_path / f"{n}.yaml") for n in ("mode", "huge", "dtype")))
    assert bad.returncode == 2
    out = bad.stdout
    assert "mode.yaml: vision.mode 'tiny': deepseek_ocr2 has the modes base, gundam" in out
    assert "huge.yaml: vision.mode 'huge': deepseek_ocr has the modes tiny, small, base, large, gundam" in out
    assert "dtype.yaml: model.dtype 'bf17': choose one of auto, float32, bfloat16, float16" in out


@pytest.mark.integration  # a CLI subprocess or a training run
def test_train_bad_choice_exits_2_naming_the_key(tmp_path):
    from tests.helpers import run_cli

    proc = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), "data.path=x", "model.dtype=bf17",
                   f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "model.dtype 'bf17': choose one of auto, float32, bfloat16, float16")
    assert not (tmp_path / "run").exists()


@pytest.mark.integration  # a CLI subprocess or a training run
def test_train_print_config_shows_the_resolved_config(tmp_path):
    import yaml

    from tests.helpers import run_cli

    proc = run_cli("train", str(REPO / "configs/runs/demo_handwriting.yaml"), "train.max_steps=7", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["train"]["cache_vision_features"] is True
    assert printed["validation"]["every_steps"] == RunConfig().validation.every_steps  # defaults filled in
    assert load_config(None, [f"{k}.{kk}={json.dumps(vv)}" for k, v in printed.items() if isinstance(v, dict)
                              for kk, vv in v.items()] + [f"output_dir={printed['output_dir']}"]) \
        == load_config(REPO / "configs/runs/demo_handwriting.yaml", ["train.max_steps=7"])
