"""Check configs without weights or data: `ocrtune validate CONFIG.yaml [...]`.

    ocrtune validate configs/runs/ocr2_handwriting.yaml configs/accelerate/multi_gpu.yaml

A run config is loaded into the typed dataclasses (unknown keys, bad types and bad choices
are errors naming the key); its model name must resolve without downloading (builtin:NAME,
a local checkpoint folder, or a well-formed Hub id); a local model path or data.path that
does not exist yet is a warning (a recipe may build it first). An accelerate topology (a file with
`compute_environment`) is loaded with accelerate's own ClusterConfig. Exit 0 when every
file is valid, 2 otherwise.
"""

from __future__ import annotations

from pathlib import Path


def validate_file(path: str | Path) -> tuple[bool, list[str]]:
    """(valid, lines to print) for one config file."""
    import importlib.util

    import yaml

    from data_prep.build import is_dataset_dir
    from finetune.config import ConfigError, load_config
    from finetune.distributed import DEEPSPEED_INSTALL
    from finetune.feature_cache import unsupported as unsupported_cache
    from finetune.models import ModelNameError, looks_like_hub_id, resolve_model

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return False, [f"error {path}: cannot read YAML ({exc})"]
    if isinstance(raw, dict) and "compute_environment" in raw:
        from accelerate.commands.config.config_args import ClusterConfig

        try:
            cfg = ClusterConfig.from_yaml_file(str(path))
        except (TypeError, ValueError) as exc:
            return False, [f"error {path}: not a valid accelerate config ({exc})"]
        lines = [f"ok {path}: accelerate {cfg.distributed_type}, {cfg.num_processes} process(es), "
                 f"{cfg.num_machines} machine(s), mixed precision {cfg.mixed_precision}"]
        if cfg.distributed_type == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            # Valid, and meant for another machine perhaps; but here `accelerate launch` stops on it.
            lines.append(f"warning {path}: DeepSpeed is not installed here ({DEEPSPEED_INSTALL})")
        return True, lines
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return False, [f"error {path}: {exc}"]
    lines = []
    name = cfg.model.name
    if name.startswith("builtin:") or Path(name).exists():
        try:
            family = resolve_model(name).family
        except ModelNameError as exc:
            return False, [f"error {path}: model.name: {exc}"]
        # Choices that depend on the model's family, checked from its config.json alone.
        if cfg.vision.mode is not None and cfg.vision.mode not in family.MODES:
            return False, [f"error {path}: vision.mode {cfg.vision.mode!r}: {family.MODEL_TYPE} has the modes "
                           f"{', '.join(family.MODES)}"]
        if cfg.train.cache_vision_features and (why := unsupported_cache(family.MODEL_TYPE)) is not None:
            return False, [f"error {path}: {why}"]
    elif not looks_like_hub_id(name):  # a local path that is not there (yet)
        lines.append(f"warning {path}: model.name {name} does not exist yet (a local checkpoint path)")
    if not is_dataset_dir(cfg.data.path):
        lines.append(f"warning {path}: data.path {cfg.data.path} is not a built dataset yet (ocrtune data build)")
    t = cfg.train
    lines.append(f"ok {path}: model {name}, lora {cfg.lora.preset} r={cfg.lora.r}, {t.max_steps} steps of "
                 f"{t.batch_size} x {t.grad_accum} per process, lr {t.lr}")
    return True, lines


def main(paths: list[str]) -> int:
    ok = True
    for p in paths:
        valid, lines = validate_file(p)
        ok &= valid
        print("\n".join(lines))
    return 0 if ok else 2
