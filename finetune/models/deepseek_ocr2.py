"""DeepSeek-OCR-2 through transformers' native classes (no remote code).

SAM ViT-B -> Qwen2-style encoder with learned queries -> linear projector -> the
DeepSeek MoE decoder. The vision model emits a fixed number of query tokens per view
(144 for a <=144-patch view, else 256); the placeholder count per image is computed
from the processor's patch size and downsample ratio, exactly as transformers'
processor does, plus one view separator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODEL_TYPE = "deepseek_ocr2"

# deepseek-ai/DeepSeek-OCR-2 is published in the remote-code layout (model_type
# deepseek_vl_v2); the same weights in transformers' layout live at this id.
HUB_ALIASES = {"deepseek-ai/DeepSeek-OCR-2": "deepseek-community/DeepSeek-OCR-2"}


@dataclass(frozen=True)
class DecoderLayout:
    """Where things live in the module tree; the LoRA resolver and the ledger read this."""

    decoder_layers: str = "model.language_model.layers"  # + .N.
    attention: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    dense_mlp: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    shared_experts: tuple[str, ...] = (
        "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj",
        "mlp.shared_experts.down_proj",
    )
    routed_expert_modules: str = ""  # experts are fused 3-D parameters here, reached as parameters
    routed_expert_params: tuple[str, ...] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    router: str = "mlp.gate"
    vision: tuple[str, ...] = ("model.vision_tower",)
    projector: tuple[str, ...] = ("model.multi_modal_projector", "model.view_separator")
    # Optional trainable extras (lora.train_projector, lora.vision_lora).
    projector_modules: tuple[str, ...] = ("model.multi_modal_projector",)
    vision_lora: str = (r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                        r"|mlp\.(gate_proj|up_proj|down_proj))")


LAYOUT = DecoderLayout()

# Adapter keys on disk use the original checkpoint naming (model.layers.N...), not the
# native one (model.language_model.layers.N...). PEFT on transformers v5 runs the
# checkpoint conversion renames over adapter keys when loading, and the rule
# `(^|model\.)layers\.` -> `language_model.layers.` also matches inside an already
# native `language_model.layers.`, mangling every key. Keys in the original naming come
# out of that conversion exactly right, so plain `PeftModel.from_pretrained` works.
ADAPTER_DISK_RENAMES = (("base_model.model.model.language_model.", "base_model.model.model."),)


@dataclass(frozen=True)
class VisionSettings:
    """How one page becomes views. OCR-2 has one mode: a global view plus optional tiles."""

    crop_to_patches: bool  # tile pages larger than one tile into local views
    min_tiles: int
    max_tiles: int

    @property
    def mode(self) -> str:
        """The family's mode these settings amount to (MODES): tiles or not."""
        return "gundam" if self.crop_to_patches else "base"

    def as_dict(self) -> dict:
        # The mode is recorded with adapters and reports, so inference reuses it as trained.
        return asdict(self) | {"mode": self.mode}


def default_vision(processor) -> VisionSettings:
    """The checkpoint's own settings, from its processor_config.json."""
    ip = processor.image_processor
    return VisionSettings(bool(ip.crop_to_patches), int(ip.min_patches), int(ip.max_patches))


# Resolution modes this family has. OCR-2's encoder carries query tables for a 1024 global
# view and 768 tiles only, so of DeepSeek-OCR's five modes two exist here: "base" (the
# global view alone: 256 image tokens on the real model) and "gundam" (global view + tiles
# by aspect ratio, 144 tokens per tile; the checkpoint's default). tiny/small/large are
# DeepSeek-OCR (v1) modes.
MODES = ("base", "gundam")


def mode_vision(processor, mode: str) -> VisionSettings:
    if mode not in MODES:
        raise ValueError(f"resolution mode {mode!r}: DeepSeek-OCR-2 has modes {', '.join(MODES)} "
                         "(tiny, small and large are DeepSeek-OCR v1 modes)")
    base = default_vision(processor)
    if mode == "base":
        return VisionSettings(False, base.min_tiles, base.max_tiles)
    return VisionSettings(True, base.min_tiles, base.max_tiles)


def load(path: str | Path, dtype=None, device=None):
    from transformers import AutoProcessor, DeepseekOcr2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(path))
    model = DeepseekOcr2ForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    tok_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if tok_id != model.config.image_token_id:
        raise ValueError(
            f"{path}: tokenizer maps {processor.image_token!r} to {tok_id} but config.image_token_id is "
            f"{model.config.image_token_id}"
        )
    return model, processor


def image_token_id(model_config) -> int:
    return int(model_config.image_token_id)


def placeholders_per_image(processor, num_local_patches: int) -> int:
    """Image placeholder ids for one image: global view + tiles + one view separator."""
    ip = processor.image_processor
    per_view = math.ceil(ip.size["height"] / processor.patch_size / processor.downsample_ratio)
    per_tile = math.ceil(ip.tile_size / processor.patch_size / processor.downsample_ratio)
    return per_view * per_view + per_tile * per_tile * num_local_patches + 1


def encode_image(processor, image, vision: VisionSettings) -> tuple[dict, int]:
    """Pixel tensors for one RGB page and its placeholder count."""
    out = processor.image_processor(
        [image],
        crop_to_patches=vision.crop_to_patches,
        min_patches=vision.min_tiles,
        max_patches=vision.max_tiles,
        return_tensors="pt",
    )
    n_local = int(out["num_local_patches"][0])
    pixels = {
        "pixel_values": out["pixel_values"],
        "pixel_values_local": out.get("pixel_values_local"),
        "num_local_patches": n_local,
    }
    return pixels, placeholders_per_image(processor, n_local)


def collate_pixels(items: list[dict]) -> dict:
    """Batch the per-image tensors from `encode_image` in the layout the model's forward takes."""
    batch = {
        "pixel_values": torch.cat([it["pixel_values"] for it in items]),
        "num_local_patches": torch.tensor([it["num_local_patches"] for it in items], dtype=torch.long),
    }
    local = [it["pixel_values_local"] for it in items if it["pixel_values_local"] is not None]
    if local:
        batch["pixel_values_local"] = torch.cat(local)
    return batch
