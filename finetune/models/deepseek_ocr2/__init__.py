"""DeepSeek-OCR-2 through transformers' native classes (no remote code).

    processor.py   pages -> views through transformers' image processor; placeholder counts
    checkpoint.py  the published (remote-code) layout: config.json both ways, tensor names

SAM ViT-B -> Qwen2-style encoder with learned queries -> linear projector -> the DeepSeek
MoE decoder: transformers' DeepseekOcr2ForConditionalGeneration is the modeling code. Both
checkpoint layouts are read: transformers' (deepseek-community/DeepSeek-OCR-2) and the
published one (deepseek-ai/DeepSeek-OCR-2's config.json and names, which vLLM loads); full
checkpoints are written in the published one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.models.deepseek_ocr2 import processor as _proc
from finetune.models.deepseek_ocr2.processor import VisionSettings
from finetune.models.family import DecoderLayout, ModelFamily, ModelNameError, VisionModeError

__all__ = ["DeepseekOcr2", "VisionSettings"]


class DeepseekOcr2(ModelFamily):
    MODEL_TYPE = "deepseek_ocr2"
    # transformers' config.json, and the published one (shared with v1's, told apart by its
    # architectures: checkpoint.py).
    CONFIG_MODEL_TYPES = ("deepseek_ocr2", "deepseek_vl_v2")
    ARCHITECTURES = ("DeepseekOcr2ForConditionalGeneration", "DeepseekOCR2ForCausalLM")
    # OCR-2's encoder carries query tables for a 1024 global view and 768 tiles only, so of
    # DeepSeek-OCR's five modes two exist here: "base" (the global view alone: 256 image
    # tokens on the real model) and "gundam" (global view + tiles by aspect ratio, 144 tokens
    # per tile; the checkpoint's default). tiny/small/large are DeepSeek-OCR (v1) modes.
    MODES = ("base", "gundam")
    LAYOUT = DecoderLayout(
        decoder_layers="model.language_model.layers",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        shared_experts=("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
        routed_expert_modules="",  # experts are fused 3-D parameters here, reached as parameters
        routed_expert_params=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        router="mlp.gate",
        vision=("model.vision_tower",),
        projector=("model.multi_modal_projector", "model.view_separator"),
        projector_modules=("model.multi_modal_projector",),
        vision_lora=(r"model\.vision_tower\.vision_encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                     r"|mlp\.(gate_proj|up_proj|down_proj))"),
        fused_experts=(("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))),
    )
    # Adapter tensors on disk use the published (remote-code) checkpoint's names, the layout
    # vLLM, Unsloth and ms-swift share: model.layers.N... for the decoder, one pair per
    # routed expert (finetune/expert_lora.py), model.qwen2_model.model.model.layers.N... for the
    # vision encoder. The projector (modules_to_save) keeps transformers' name: PEFT renames
    # LoRA keys only, and vLLM takes no modules_to_save anyway. PEFT on transformers v5 runs the
    # checkpoint conversion renames over adapter keys when loading, and these names come out of
    # it exactly right (a native `language_model.layers.` would be mangled by the rule
    # `(^|model\.)layers\.` -> `language_model.layers.`), so plain `PeftModel.from_pretrained`
    # loads every adapter without routed-expert LoRA (per-expert pairs do not fit transformers'
    # fused experts: ocrtune's loader and vLLM apply those).
    PUBLISHED_PREFIXES = (("model.language_model.layers.", "model.layers."),
                          ("model.language_model.embed_tokens.", "model.embed_tokens."),
                          ("model.language_model.norm.", "model.norm."),
                          ("model.vision_tower.vision_encoder.layers.", "model.qwen2_model.model.model.layers."),
                          ("model.vision_tower.vision_encoder.norm.", "model.qwen2_model.model.model.norm."))
    # adapter_config.json's targets stay in transformers' names, which plain PEFT matches
    # against transformers' model; ocrtune reads targets in either naming.
    # deepseek-ai/DeepSeek-OCR-2 ships DeepSeek's processor_config.json and remote code beside
    # its weights; the same weights with transformers' processor files live at this id.
    HUB_ALIASES = {"deepseek-ai/DeepSeek-OCR-2": "deepseek-community/DeepSeek-OCR-2"}

    def check_config(self, raw: dict, where: str) -> None:
        from finetune.models.deepseek_ocr2.checkpoint import config_from_published, is_published_config

        if raw.get("model_type") == "deepseek_vl_v2":
            if not is_published_config(raw):
                raise ModelNameError(f"{where}: model_type 'deepseek_vl_v2' is DeepSeek-OCR-2's published layout "
                                     "only with architectures ['DeepseekOCR2ForCausalLM']")
            config_from_published(raw, where)  # refuses, naming the field, what this family can't run

    def save_full(self, model, folder, state_dict=None):
        from finetune.models.deepseek_ocr2.checkpoint import save_published

        save_published(model, Path(folder), state_dict)

    def published_checkpoint(self, path, scratch):
        import json

        from finetune.models.deepseek_ocr2.checkpoint import is_published_config, write_published_copy

        if is_published_config(json.loads((Path(path) / "config.json").read_text())):
            return Path(path)
        write_published_copy(Path(path), Path(scratch))
        return Path(scratch)

    def load(self, path, dtype=None, device=None):
        import json

        from transformers import DeepseekOcr2ForConditionalGeneration

        from finetune.models.deepseek_ocr2.checkpoint import config_from_published, is_published_config

        processor = self.load_processor(path)
        tok_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        raw = json.loads((Path(path) / "config.json").read_text())
        config = None  # transformers' config.json, read by from_pretrained itself
        if is_published_config(raw):
            config = config_from_published(raw, str(Path(path) / "config.json"), tok_id)
        # transformers renames the published tensor names (and fuses the experts) on load.
        model = DeepseekOcr2ForConditionalGeneration.from_pretrained(str(path), config=config,
                                                                     dtype=dtype or torch.float32)
        if device is not None:
            model.to(device)
        if tok_id != model.config.image_token_id:
            raise ModelNameError(
                f"{Path(path)}: tokenizer maps {processor.image_token!r} to {tok_id} but config.image_token_id is "
                f"{model.config.image_token_id}"
            )
        return model, processor

    def experts_implementation(self, model) -> str | None:
        """transformers' choice for the fused experts: "grouped_mm" where torch has a grouped
        GEMM for the device (its default), else "eager"; a later `set_experts_implementation`
        would show here too."""
        return getattr(model.config.get_text_config(), "_experts_implementation", None)

    def load_processor(self, path):
        """transformers' processor files; a folder with DeepSeek's own processor_config.json (the
        published repository's, for its remote code) gets transformers' processor with its
        defaults, which are the published model's settings, around the folder's tokenizer."""
        import json

        from transformers import AutoProcessor, AutoTokenizer, DeepseekOcr2ImageProcessor, DeepseekOcr2Processor
        from transformers.utils import logging as hf_logging

        settings = Path(path) / "processor_config.json"
        cls = json.loads(settings.read_text()).get("processor_class") if settings.is_file() else None
        # Loading a tokenizer, transformers reads config.json to guess its class; beside a
        # published config.json (model_type deepseek_vl_v2, unknown to it) it warns that the
        # model types differ. The class comes from tokenizer_config.json: the warning is noise.
        config_log = hf_logging.get_logger("transformers.configuration_utils")
        level = config_log.level
        config_log.setLevel(hf_logging.ERROR)
        try:
            if cls in (None, "DeepseekOcr2Processor"):
                return AutoProcessor.from_pretrained(str(path))
            return DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessor(),
                                         tokenizer=AutoTokenizer.from_pretrained(str(path)))
        finally:
            config_log.setLevel(level)

    def vision_settings(self, processor, mode=None, crop_to_patches=None, min_tiles=None,
                        max_tiles=None) -> VisionSettings:
        if mode is not None and mode not in self.MODES:
            raise VisionModeError(f"resolution mode {mode!r}: DeepSeek-OCR-2 has modes {', '.join(self.MODES)} "
                                  "(tiny, small and large are DeepSeek-OCR v1 modes)")
        ip = processor.image_processor  # the checkpoint's own settings, from processor_config.json
        tiles = bool(ip.crop_to_patches) if mode is None else mode == "gundam"
        if crop_to_patches is not None:
            tiles = crop_to_patches
        return VisionSettings(tiles, int(ip.min_patches if min_tiles is None else min_tiles),
                              int(ip.max_patches if max_tiles is None else max_tiles))

    def encode_image(self, processor, image, vision):
        return _proc.encode_image(processor, image, vision)

    def collate_pixels(self, items):
        return _proc.collate_pixels(items)
