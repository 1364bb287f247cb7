"""Small helpers shared by the entry points: dtypes, vision settings, prompts, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_prep import DEFAULT_PROMPT

ADAPTER_META = "ocrtune_adapter.json"


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return table[name]


def resolve_vision(family, processor, crop_to_patches=None, min_tiles=None, max_tiles=None):
    """Explicit settings over the checkpoint's own."""
    base = family.default_vision(processor)
    return type(base)(
        crop_to_patches=base.crop_to_patches if crop_to_patches is None else crop_to_patches,
        min_tiles=base.min_tiles if min_tiles is None else min_tiles,
        max_tiles=base.max_tiles if max_tiles is None else max_tiles,
    )


def choose_prompt(explicit: str | None, adapter_meta: dict | None, dataset_info: dict) -> str:
    """One rule everywhere: explicit > the adapter's training prompt > the dataset's > default."""
    if explicit:
        return explicit
    if adapter_meta and adapter_meta.get("prompt"):
        return adapter_meta["prompt"]
    return dataset_info.get("prompt") or DEFAULT_PROMPT


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_META
    return json.loads(path.read_text()) if path.is_file() else {}
