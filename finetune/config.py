"""Run configuration: YAML -> typed dataclasses. Defaults live here and nowhere else.

    ocrtune train configs/runs/tiny_smoke.yaml train.max_steps=3 lora.r=4

Unknown keys and wrongly typed values are errors that name the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from finetune.errors import OcrtuneError


class ConfigError(OcrtuneError, ValueError):
    pass


@dataclass
class ModelConfig:
    name: str = ""  # builtin:NAME, a local checkpoint dir, or a Hub id (required)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    # QLoRA: nf4 stores the decoder's frozen Linear weights (attention, dense MLP, shared
    # experts) in 4 bits (bitsandbytes), about a quarter of their bf16 memory. The routed
    # experts (stacked 3-D parameters, most of an MoE decoder's weights), vision, projector and
    # LM head stay as loaded; the adapter is the same format. finetune/quantize.py.
    quantization: Literal["none", "nf4"] = "none"


@dataclass
class DataConfig:
    path: str = ""  # a directory written by `ocrtune data build` (required)
    train_split: str = "train"
    # None = the prompt recorded in the dataset (ocrtune data build --prompt), itself
    # defaulting to "<image>\nFree OCR.". The same prompt is stored with the adapter
    # so evaluation and serving reuse it.
    prompt: str | None = None
    # Targets longer than this many tokens (EOS included) are dropped and counted,
    # never truncated: a truncated label teaches the model to stop mid-page.
    max_target_tokens: int = 2048


@dataclass
class VisionConfig:
    # None = the checkpoint's processor setting. Tiling costs 144 tokens per tile on
    # OCR-2: more detail for dense pages, longer sequences and more memory.
    crop_to_patches: bool | None = None
    min_tiles: int | None = None
    max_tiles: int | None = None
    # None = the checkpoint's default. DeepSeek-OCR (v1): tiny (64 tokens), small (100),
    # base (256), large (400) or gundam (256 + 100 per tile; the official default): more
    # tokens read small print better and cost sequence length. OCR-2: base or gundam.
    mode: str | None = None


@dataclass
class LoraSettings:
    # attention: q,k,v,o of every decoder layer (smallest, safest).
    # attention+mlp: + dense layer-0 MLP and the shared experts (good default).
    # all: + every routed expert through PEFT target_parameters (~30x more
    #      parameters on the full model; most capacity, most memory).
    # full: no LoRA; every weight trains (vision too) and OUTPUT_DIR/model/ is a whole
    #      checkpoint. For pretraining a small model; on the 3B model it needs
    #      optimizer state for all weights (~16 bytes per parameter).
    preset: Literal["attention", "attention+mlp", "all", "full"] = "attention+mlp"
    r: int = 16  # rank: capacity of the update; parameters grow linearly with r
    alpha: int = 16  # scale = alpha / r; keep alpha = r unless you know why
    dropout: float = 0.0  # regularises small datasets; slows nothing
    # rsLoRA: scale alpha/sqrt(r) instead of alpha/r, so raising r keeps the update's size
    # (better at r >= 64). Costs nothing.
    use_rslora: bool = False
    # DoRA: learns a magnitude per output feature on top of the LoRA direction; often closer
    # to full fine-tuning at low r, ~20-40% slower steps. Not for preset "all" (PEFT has no
    # DoRA for the fused expert parameters).
    use_dora: bool = False
    # Also train the vision->text projector in full (saved inside the adapter). Off in every
    # public recipe; helps when the domain's images look unlike anything pretrained on.
    train_projector: bool = False
    # Also put LoRA (same r) on the vision encoder's attention and MLP. More capacity for
    # unusual scripts or scans; more memory (activations through the encoder are kept).
    vision_lora: bool = False


@dataclass
class TrainSettings:
    max_steps: int = 60  # optimizer steps (each = batch_size x grad_accum x processes samples)
    batch_size: int = 2  # per process, per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step: bigger effective batch, same memory
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float = 1.0
    seed: int = 42  # model init of LoRA weights and data order both follow it
    # auto = bf16 on a GPU that supports it, fp32 otherwise; or "no" / "bf16" / "fp16".
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Recompute activations in the backward pass: ~30% slower, far less activation memory.
    # None = on for real checkpoints, off for the builtin tiny models (too small to need it).
    gradient_checkpointing: bool | None = None
    # The LM head runs on this many answer tokens at a time, each block recomputed in the
    # backward pass, so full vocabulary-sized logits (129k columns on the real model) never
    # exist for the whole batch. 0 = plain loss (all answer logits at once: faster on tiny
    # vocabularies, gigabytes on the real one). Same loss and gradients either way.
    loss_chunk_tokens: int = 1024
    # Batches of similar answer length (within windows of 50 batches, order still from the
    # seed): less padding, faster steps; slightly less random batches.
    group_by_length: bool = False
    num_workers: int = 0  # DataLoader workers decoding images in parallel
    # Encode each training image once and reuse its vision features in later epochs and later
    # runs, kept on disk in DATA_PATH.vision_cache/ beside the dataset (keyed by the frozen
    # vision weights, mode and settings, and the image's bytes; delete it any time). Saves the
    # vision tower's share of every step after the first epoch, for disk (placeholders x hidden
    # floats per image). Only with a frozen vision tower and projector (no lora.vision_lora /
    # train_projector / preset full), not under FSDP/DeepSpeed.
    cache_vision_features: bool = False
    log_every: int = 1
    # Checkpoints under OUTPUT_DIR/checkpoints/ every this many steps (0 = none): adapter,
    # optimizer, RNG of every process and data position, complete only with its marker.
    save_steps: int = 0
    save_total_limit: int = 2  # complete checkpoints kept; older ones go only after a newer one is complete
    # "" = start fresh; "latest" = the newest complete checkpoint in OUTPUT_DIR (fresh if none);
    # or a checkpoint folder. Another seed, data, model, LoRA or batch layout is refused ...
    resume_from: str = ""
    resume_force: bool = False  # ... unless this is true


@dataclass
class ValidationSettings:
    # Every this many optimizer steps: loss and CER (greedy decoding, as `ocrtune eval`) on
    # the first max_samples pages of `split`; the best CER so far is kept in OUTPUT_DIR/best/.
    # 0 = no validation during training. Each run costs a generation pass: keep it small.
    every_steps: int = 0
    split: str = "validation"
    max_samples: int = 64
    batch_size: int = 8
    max_new_tokens: int = 512  # as eval's cap: a looping page costs at most this many tokens
    # Stop after this many validations in a row without a better CER (0 = never stop early).
    early_stopping_patience: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    output_dir: str = "runs/ocrtune"  # adapter/, config.yaml, metrics.jsonl land here
    report_to: list[str] = field(default_factory=list)  # [] or [wandb]


def _check_type(value, tp, key: str):
    """Return value coerced to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "no" in choices:  # YAML 1.1 reads a bare `no` as false
            value = "yes" if value else "no"
        if value not in choices:
            raise ConfigError(f"{key} {value!r}: choose one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept what users mean.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare `no` / `yes` (e.g. mixed_precision: no) as a boolean.
            return "yes" if value else "no"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}{key}"
            raise ConfigError(f"unknown config key {full!r} (known under {prefix or 'top level'}: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, key + ".")
        else:
            kwargs[f.name] = _check_type(data[f.name], tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (may be None for overrides only), apply `key=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    where = f"{path}: " if path else ""
    try:
        cfg = _build(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(where + str(exc)) from None
    for key, value in (("model.name", cfg.model.name), ("data.path", cfg.data.path)):
        if not value:
            raise ConfigError(f"{where}{key} is required")
    if cfg.lora.use_dora and cfg.lora.preset in ("all", "full"):
        raise ConfigError(f"{where}lora.use_dora: not available with lora.preset {cfg.lora.preset!r} "
                          "(PEFT has no DoRA for fused expert parameters); use attention or attention+mlp")
    if cfg.model.quantization != "none" and cfg.lora.preset == "full":
        raise ConfigError(f"{where}model.quantization {cfg.model.quantization}: lora.preset 'full' trains every "
                          "weight, and 4-bit weights cannot train; use a LoRA preset or model.quantization=none")
    for knob in ("train_projector", "vision_lora"):
        if getattr(cfg.lora, knob) and cfg.lora.preset == "full":
            raise ConfigError(f"{where}lora.{knob}: lora.preset 'full' already trains every weight")
    for i, name in enumerate(cfg.report_to):
        if name not in ("wandb",):
            raise ConfigError(f"{where}report_to[{i}] {name!r}: supported trackers are: wandb")
    trained_vision = [k for k, on in (("lora.vision_lora", cfg.lora.vision_lora),
                                      ("lora.train_projector", cfg.lora.train_projector),
                                      ("lora.preset full", cfg.lora.preset == "full")) if on]
    if cfg.train.cache_vision_features and trained_vision:
        raise ConfigError(f"{where}train.cache_vision_features: the vision features change while training with "
                          f"{', '.join(trained_vision)}; turn one or the other off")
    if cfg.lora.preset == "all" and cfg.lora.dropout > 0:
        raise ConfigError(f"{where}lora.dropout {cfg.lora.dropout}: must be 0 with lora.preset all (the routed experts "
                          "are fused parameters, and PEFT's wrapper for them takes no dropout)")
    if cfg.train.loss_chunk_tokens < 0:
        raise ConfigError(f"{where}train.loss_chunk_tokens must be >= 0 (0 = plain loss)")
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
