"""The in-memory config of ocrtune's DeepSeek-OCR (v1) modules: transformers' OCR-2 text and
SAM configs plus CLIP-L's. Its own module so that checkpoint conversion (config.json both
ways) and the modules can both use it without importing each other."""

from __future__ import annotations

from transformers import CLIPVisionConfig, PreTrainedConfig
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import (
    DeepseekOcr2SamVisionConfig,
    DeepseekOcr2TextConfig,
)


class DeepseekOcrConfig(PreTrainedConfig):
    """In-memory config. On disk ocrtune writes (and reads) the official config.json
    layout instead; see checkpoint.py."""

    model_type = "ocrtune_deepseek_ocr"  # never written to disk; keeps transformers' rename tables away
    sub_configs = {"text_config": DeepseekOcr2TextConfig, "sam_config": DeepseekOcr2SamVisionConfig,
                   "clip_config": CLIPVisionConfig}

    def __init__(self, text_config=None, sam_config=None, clip_config=None, projector_input: int = 2048,
                 image_token_id: int = 128815, **kwargs):
        def build(cls, value):
            return value if isinstance(value, PreTrainedConfig) else cls(**(value or {}))

        self.text_config = build(DeepseekOcr2TextConfig, text_config)
        self.sam_config = build(DeepseekOcr2SamVisionConfig, sam_config)
        self.clip_config = build(CLIPVisionConfig, clip_config)
        self.projector_input = projector_input
        self.image_token_id = image_token_id
        kwargs.setdefault("tie_word_embeddings", False)  # DeepSeek-OCR has its own lm_head
        super().__init__(**kwargs)
