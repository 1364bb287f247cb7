"""An adapter as the serving engines load it: `ocrtune export ADAPTER_DIR --output DIR [--merge]`.

    ocrtune export runs/receipts/adapter --output runs/receipts/vllm-adapter
    ocrtune export runs/receipts/adapter --merge --output runs/receipts/merged

Without --merge: the LoRA adapter as vLLM loads it for its family (tensors under the
published checkpoint's module names, which vLLM's weight mapper turns into its own; the
target modules listed by full published name; no modules_to_save). A pre-check refuses what
vLLM would reject or silently ignore (a trained projector, vision LoRA, DoRA, fused-expert
parameters), naming the tensors, and points to --merge.

With --merge: base + adapter merged into one full checkpoint in the family's published layout
(the deepseek_vl_v2 config.json and safetensors names of deepseek-ai/DeepSeek-OCR and
deepseek-ai/DeepSeek-OCR-2, whatever layout the base was read from), with the base's other files
(tokenizer, processor, code) copied unchanged; `--model DIR` and vLLM read it. Nothing is
half-written: the output is built in a staging folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from finetune.errors import InputError, OcrtuneError
from finetune.runtime import ADAPTER_META, read_adapter_meta


class ExportError(OcrtuneError, RuntimeError):
    pass


# The decoder's module prefixes in published names: all that vLLM's LoRA reaches.
DECODER_PREFIXES = ("base_model.model.model.layers.",)


def vllm_problems(adapter_config: dict, keys: list[str]) -> list[str]:
    """Why vLLM would refuse this adapter, or load it and leave part of it out (empty: ready).
    `keys`: the adapter's tensor names on disk (published names)."""
    problems = []
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter_config['modules_to_save']} (modules trained in full, e.g. "
                        "lora.train_projector): vLLM refuses them")
    if adapter_config.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    if adapter_config.get("target_parameters"):
        problems.append(f"target_parameters ({len(adapter_config['target_parameters'])} fused routed-expert "
                        "weights): vLLM's LoRA has no such form")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append("LoRA bias: vLLM does not support it")
    outside = sorted(k for k in keys if not k.startswith(DECODER_PREFIXES))
    if outside:
        problems.append(f"{len(outside)} tensors outside the language model (vision LoRA or a trained projector), "
                        f"e.g. {outside[0]}: vLLM's LoRA covers the language model only")
    return problems


def published_key(family, key: str) -> str:
    """An adapter tensor name in any naming ocrtune reads (its older native names included) ->
    the family's published one, which vLLM maps."""
    return family.adapter_key_to_disk(family.adapter_key_from_disk(key))


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict]:
    """(adapter_config.json, ocrtune_adapter.json or {}) of an adapter folder, which must also
    hold adapter_model.safetensors."""
    cfg_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise InputError(f"{adapter_dir}: expected adapter_config.json and adapter_model.safetensors "
                         "(a folder written by ocrtune train, or a PEFT LoRA adapter)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_file}: invalid JSON ({exc.msg})") from None
    return cfg, read_adapter_meta(adapter_dir)


def _family(meta: dict, model: str | None, adapter_dir: Path):
    from finetune.models import resolve_model
    from finetune.models.registry import family_named

    if model:
        return resolve_model(model).family
    if meta.get("family"):
        return family_named(meta["family"])
    raise InputError(f"{adapter_dir}: no {ADAPTER_META} says which model family the adapter is for: pass --model")


def export_adapter(adapter_dir: Path, output: Path, model: str | None = None, overwrite: bool = False) -> dict:
    """The vLLM-ready adapter in `output`; returns what was written. Refuses (ExportError) when
    vLLM would reject or ignore part of the adapter."""
    from safetensors.torch import load_file, save_file

    adapter_dir = Path(adapter_dir)
    cfg, meta = _read_adapter(adapter_dir)
    family = _family(meta, model, adapter_dir)
    on_disk = {published_key(family, k): v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    problems = vllm_problems(cfg, list(on_disk))
    if problems:
        raise ExportError(f"{adapter_dir}: not servable as a vLLM LoRA adapter: " + "; ".join(problems)
                          + ". Export a full checkpoint instead: ocrtune export ADAPTER_DIR --merge --output DIR")
    modules = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in on_disk})
    vllm_cfg = dict(cfg, target_modules=modules, modules_to_save=None)
    vllm_cfg["base_model_name_or_path"] = meta.get("base_model") or cfg.get("base_model_name_or_path")

    def write(staging: Path) -> None:
        save_file({k: v.contiguous() for k, v in on_disk.items()}, str(staging / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(vllm_cfg, indent=2, sort_keys=True) + "\n")
        if meta:
            (staging / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    _write_atomically(output, overwrite, write)
    return {"family": family.MODEL_TYPE, "tensors": len(on_disk), "modules": len(modules)}


def export_merged(adapter_dir: Path, output: Path, model: str | None = None, dtype: str = "float32",
                  overwrite: bool = False) -> dict:
    """Base + adapter merged into a full checkpoint in the family's published layout."""
    from finetune.lora import load_adapter
    from finetune.models import load_model
    from finetune.models.family import copy_side_files
    from finetune.runtime import resolve_dtype

    adapter_dir = Path(adapter_dir)
    _, meta = _read_adapter(adapter_dir)
    name = model or meta.get("base_model")
    if not name:
        raise InputError(f"{adapter_dir}: no {ADAPTER_META} names the base model: pass --model")
    resolved, base, _ = load_model(name, dtype=resolve_dtype(dtype, on_gpu=False), device="cpu")
    merged = load_adapter(base, adapter_dir, "default", resolved.family).merge_and_unload()

    def write(staging: Path) -> None:
        resolved.family.save_full(merged, staging)  # config.json + weights in the family's published layout
        copy_side_files(resolved.path, staging)  # everything else as the base has it, byte for byte

    _write_atomically(output, overwrite, write)
    return {"family": resolved.family.MODEL_TYPE, "base_model": resolved.name}


def _write_atomically(output: Path, overwrite: bool, write) -> None:
    from data_prep.atomic import replace_dir

    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"--output {output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, output)
