"""Small helpers shared by the entry points: dtypes, prompts, adapter metadata, loading for inference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep import DEFAULT_PROMPT
from finetune.errors import InputError

ADAPTER_META = "ocrtune_adapter.json"


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise InputError(f"model.dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return table[name]


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


@dataclass
class Inference:
    """A model ready to decode: what serve and predict share with eval."""

    name: str
    model: object
    processor: object
    family: object
    vision: object
    guard: object
    prompt: str


def load_for_engine(model_name: str, adapter: str | Path | None, prompt: str | None, no_repeat_ngram: int,
                    no_repeat_window: int, dataset_info: dict | None = None):
    """What an external engine (vLLM) decodes with, without loading the weights here: the
    resolved checkpoint, its processor, the adapter's recorded vision settings and prompt, the
    repetition guard. Returns (Inference with model=None, resolved checkpoint)."""
    from finetune.models import resolve_model

    meta = _adapter_meta(adapter)
    # The published repository itself (deepseek-ai/DeepSeek-OCR-2, not transformers' copy of
    # it): vLLM reads the published layout, and ocrtune reads its processor and tokenizer.
    resolved = resolve_model(model_name, hub_aliases=False)
    processor = resolved.family.load_processor(resolved.path)
    return _inference(resolved, None, processor, meta, prompt, no_repeat_ngram, no_repeat_window, dataset_info), resolved


def _inference(resolved, model, processor, meta: dict, prompt: str | None, no_repeat_ngram: int,
               no_repeat_window: int, dataset_info: dict | None) -> Inference:
    """The decoding settings both loaders share: the adapter's recorded vision settings and
    prompt, and the repetition guard."""
    from finetune.decoding import RepetitionGuard, table_tag_ids

    saved = meta.get("vision", {})
    vision = resolved.family.vision_settings(processor, saved.get("mode"), saved.get("crop_to_patches"),
                                             saved.get("min_tiles"), saved.get("max_tiles"))
    guard = RepetitionGuard(no_repeat_ngram, no_repeat_window, table_tag_ids(processor.tokenizer))
    return Inference(resolved.name, model, processor, resolved.family, vision, guard,
                     choose_prompt(prompt, meta, dataset_info or {}))


def _adapter_meta(adapter) -> dict:
    if adapter is None:
        return {}
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise InputError(f"--adapter {adapter}: no adapter_config.json (expected a directory written by ocrtune train)")
    return read_adapter_meta(adapter)


def load_for_inference(model_name: str, adapter: str | Path | None, prompt: str | None, dtype: str,
                       no_repeat_ngram: int, no_repeat_window: int, device=None,
                       dataset_info: dict | None = None) -> Inference:
    """Base model (+ adapter, active as "adapted"), its vision settings and prompt as trained,
    the repetition guard: what eval, predict and serve decode with."""
    import sys

    from finetune.models import load_model

    meta = _adapter_meta(adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    resolved, model, processor = load_model(model_name, dtype=resolve_dtype(dtype, on_gpu), device=device)
    if meta.get("base_model") not in (None, resolved.name):
        print(f"warning: adapter was trained on {meta['base_model']!r}, loaded on {resolved.name!r}", file=sys.stderr)
    if adapter is not None:
        from finetune.lora import load_adapter

        model = load_adapter(model, adapter, "adapted", resolved.family)
    model.eval()
    return _inference(resolved, model, processor, meta, prompt, no_repeat_ngram, no_repeat_window, dataset_info)
