"""DeepSeek-OCR (v1), natively: the official checkpoint read as published, no remote code.

    processor.py      tokenizer + processor_config.json; pages -> views and placeholder counts
    configuration.py  the in-memory config (transformers' OCR-2 text/SAM configs + CLIP-L)
    modeling.py       SAM -> CLIP-L -> projector -> DeepSeek MoE decoder, on transformers blocks
    checkpoint.py     the official key layout and config.json <-> the native modules

The checkpoint folder is read as published by deepseek-ai/DeepSeek-OCR: config.json
(model_type deepseek_vl_v2), *.safetensors under the remote-code key names, the tokenizer
files and processor_config.json. Nothing in it is executed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from finetune.models.deepseek_ocr import processor as _proc
from finetune.models.deepseek_ocr.processor import DeepseekOcrProcessor, VisionSettings
from finetune.models.family import DecoderLayout, ModelFamily, ModelNameError, VisionModeError

__all__ = ["DeepseekOcr", "DeepseekOcrProcessor", "VisionSettings"]

class DeepseekOcr(ModelFamily):
    MODEL_TYPE = "deepseek_ocr"
    # The published config.json's model_type, shared with DeepSeek-VL2 and OCR-2's
    # remote-code release; CLIP-L in its vision widths is what makes it v1.
    CONFIG_MODEL_TYPES = ("deepseek_vl_v2",)
    ARCHITECTURES = ("DeepseekOCRForCausalLM",)
    MODES = ("tiny", "small", "base", "large", "gundam")
    LAYOUT = DecoderLayout(
        decoder_layers="model.language_model.layers",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        dense_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        shared_experts=("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
        # Routed experts stacked into 3-D parameters (modeling.RoutedExperts), reached as
        # parameters; gate and up apart, so each is one LoRA per published per-expert Linear.
        routed_expert_modules="",
        routed_expert_params=("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"),
        router="mlp.gate",
        vision=("model.sam_model", "model.vision_model"),
        projector=("model.projector", "model.image_newline", "model.view_seperator"),
        projector_modules=("model.projector",),
        vision_lora=(r"model\.vision_model\.transformer\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)"
                     r"|mlp\.fc1|mlp\.fc2)"),
        fused_experts=(("gate_proj", ("gate_proj",)), ("up_proj", ("up_proj",)), ("down_proj", ("down_proj",))),
    )

    # Adapters are written under the published checkpoint's names (model.layers.N..., the
    # projector as model.projector.layers), which vLLM, Unsloth, ms-swift and the official code
    # share, and adapter_config.json's targets are read in those names.
    ADAPTER_CONFIG_PUBLISHED = True
    # Used to rewrite a target regex into published names; keys and module names go through
    # the checkpoint's full rename table (published_module_name, adapter_key_*).
    PUBLISHED_PREFIXES = (("model.language_model.", "model."), ("model.projector.", "model.projector.layers."))

    def published_module_name(self, native: str) -> tuple[str, bool]:
        from finetune.models.deepseek_ocr.checkpoint import official_module_name

        return official_module_name(native)

    def adapter_key_to_disk(self, key: str) -> str:
        from finetune.models.deepseek_ocr.checkpoint import to_official_key

        head = "base_model.model."
        return head + to_official_key(key[len(head):]) if key.startswith(head) else to_official_key(key)

    def adapter_key_from_disk(self, key: str) -> str:
        from finetune.models.deepseek_ocr.checkpoint import from_official_key

        head = "base_model.model."
        return head + from_official_key(key[len(head):]) if key.startswith(head) else from_official_key(key)

    def experts_implementation(self, model) -> str | None:
        """"grouped_mm" (torch's grouped GEMM: CUDA, bf16) or "padded_bmm" (elsewhere), as
        modeling.RoutedExperts picks it for the weights' device and dtype."""
        from finetune.models.deepseek_ocr.modeling import RoutedExperts, grouped_mm_kernel

        experts = next((m for m in model.modules() if isinstance(m, RoutedExperts)), None)
        if experts is None:
            return None
        return "grouped_mm" if grouped_mm_kernel(experts.gate_proj) is not None else "padded_bmm"

    def check_config(self, raw: dict, where: str) -> None:
        from finetune.models.deepseek_ocr.checkpoint import is_v1_config  # transformers' configs: imported on use

        if not is_v1_config(raw):
            raise ModelNameError(
                f"{where}: model_type 'deepseek_vl_v2' without CLIP-L in vision_config.width is not DeepSeek-OCR (v1), "
                "and its architectures do not name DeepseekOCR2ForCausalLM (DeepSeek-OCR-2's published layout)"
            )

    def save_full(self, model, folder, state_dict=None):
        model.save_pretrained(str(folder), state_dict=state_dict)  # modeling: the official layout

    def load(self, path, dtype=None, device=None):
        """The official layout -> (DeepseekOcrForConditionalGeneration, DeepseekOcrProcessor).
        Built on the meta device (no memory for random weights that are overwritten anyway),
        then every tensor is assigned from the checkpoint; a missing or unexpected key is an error."""
        # Imported here, not at the top: the modules pull in transformers' model code, which
        # `ocrtune validate` and the registry never need.
        from transformers import GenerationConfig

        from finetune.models.deepseek_ocr.checkpoint import check_keys, config_from_official, from_official, read_official
        from finetune.models.deepseek_ocr.modeling import DeepseekOcrForConditionalGeneration

        path = Path(path)
        processor = DeepseekOcrProcessor.from_pretrained(path)
        tok_id = processor.tokenizer.convert_tokens_to_ids(_proc.IMAGE_TOKEN)
        if tok_id is None or tok_id == processor.tokenizer.unk_token_id:
            raise ModelNameError(f"{path}: the tokenizer has no {_proc.IMAGE_TOKEN} token")
        raw = json.loads((path / "config.json").read_text())
        config = config_from_official(raw, str(path / "config.json"), tok_id)
        dtype = dtype or torch.float32
        with torch.device("meta"):
            model = DeepseekOcrForConditionalGeneration(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tensors = from_official(read_official(path, dtype))
        check_keys(expected, tensors, str(path))
        model.load_state_dict(tensors, strict=True, assign=True)
        model.reset_rotary()
        model.to(dtype)
        model.config.dtype = dtype
        if device is not None:
            model.to(device)
        model.eval()
        tok = processor.tokenizer
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        return model, processor

    def load_processor(self, path) -> DeepseekOcrProcessor:
        return DeepseekOcrProcessor.from_pretrained(Path(path))

    def vision_settings(self, processor: DeepseekOcrProcessor, mode=None, crop_to_patches=None, min_tiles=None,
                        max_tiles=None) -> VisionSettings:
        mode = mode or processor.default_mode
        if mode not in processor.modes:  # processor_config.json may define its own modes
            raise VisionModeError(f"resolution mode {mode!r}: DeepSeek-OCR has modes {', '.join(processor.modes)}")
        settings = _proc.settings_for_mode(processor, mode)
        changes = {"crop_to_patches": crop_to_patches, "min_tiles": min_tiles, "max_tiles": max_tiles}
        return replace(settings, **{k: v for k, v in changes.items() if v is not None})

    def encode_image(self, processor, image, vision):
        return _proc.encode_image(processor, image, vision)

    def collate_pixels(self, items):
        return _proc.collate_pixels(items)
