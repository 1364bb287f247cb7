"""Build the tiny DeepSeek-OCR-2 checkpoints shipped in finetune/builtin/.

    python -m finetune.models.tiny --output finetune/builtin/tiny-random-deepseek-ocr-2
    python -m finetune.models.tiny --size ocr --output runs/tiny-pretrain/init   (then recipes/tiny_pretrain.sh)
    python -m finetune.models.tiny --family deepseek-ocr --output finetune/builtin/tiny-random-deepseek-ocr
    python -m finetune.models.tiny --family deepseek-ocr --size ocr --output runs/tiny-pretrain-v1/init   (then recipes/tiny_pretrain_v1.sh)

Real transformers classes at tiny dimensions with seeded random weights, and a
byte-level BPE tokenizer trained here on a small fixed corpus (any UTF-8 text encodes,
nothing maps to <unk>). The vision side is sized so that the counts agree: 192 px
views, SAM patch 4 -> 48x48 patches -> two stride-2 convs -> 12x12 = 144 patches,
which the model answers with its 144-query table and the processor counts as
ceil(192 / 4 / 4)^2 = 144 placeholders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>", "<|grounding|>"]

# A fixed corpus so the merges (and so the token ids) never change between builds.
_CORPUS = """
# Invoice 2024-031
**Date:** 12/03/1998  **Total:** 1,234.56 EUR  **Phone:** +44 20 7946 0958
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
- item one
- item two
| Name | Amount |
| --- | --- |
| Coffee | 3.50 |
Dear Sir or Madam, thank you for your letter of the 4th of June. Yours faithfully,
Free OCR. Convert the document to markdown. OCR this image.
0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}*#-_/+=%&@$'"
"""


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        # BOS on text encoded with special tokens, as the published tokenizer does: vLLM builds a
        # text prompt that way (ocrtune's sequence builder adds BOS itself and is unaffected).
        add_bos_token=True,
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_config(vocab_size: int, image_token_id: int):
    from transformers import DeepseekOcr2Config

    return DeepseekOcr2Config(
        vision_config={
            "sam_config": {
                "hidden_size": 32,
                "output_channels": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 192,
                "patch_size": 4,
                "window_size": 12,
                "global_attn_indexes": [1],
                "mlp_dim": 64,
                "downsample_channels": [32, 32],
            },
            "encoder_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": 1,
                "max_position_embeddings": 512,
            },
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse"],
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "max_position_embeddings": 2048,
        },
        image_token_id=image_token_id,
    )


def ocr_config(vocab_size: int, image_token_id: int):
    """Dimensions meant for builtin:tiny-deepseek-ocr-2, the printed-text tiny base (1.4M parameters).

    Sized for pretraining on two CPU cores: 384 px views with SAM patch 8 give the same
    48x48 patch grid (and 144 queries) as the real model's 768 px views with patch 16.
    SAM keeps windowed attention only: a global layer over 2,304 patches cost 4x the
    whole step on CPU, and the Qwen2-style encoder after the 16x compression already
    mixes the whole view.
    """
    from transformers import DeepseekOcr2Config

    return DeepseekOcr2Config(
        vision_config={
            "sam_config": {
                "hidden_size": 48,
                "output_channels": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 384,
                "patch_size": 8,
                "window_size": 12,
                "global_attn_indexes": [],
                # SAM's config defaults to 1e-10 (the real model is only ever loaded from its
                # checkpoint); from scratch that leaves the whole SAM stack outputting zeros.
                "initializer_range": 0.02,
                "mlp_dim": 96,
                "downsample_channels": [96, 128],
            },
            "encoder_config": {
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1,
                "max_position_embeddings": 512,
            },
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "max_position_embeddings": 2048,
        },
        image_token_id=image_token_id,
    )


SIZES = {"random": (tiny_config, 192, 4), "ocr": (ocr_config, 384, 8)}  # config, view px, SAM patch

# DeepSeek-OCR (v1) at tiny size: the official mode table scaled by 1/16 (SAM patch 4 instead
# of 16, so views of 32-80 px give 2-5 tokens a side, as 512-1280 px give 8-20 on the real model).
V1_TINY_MODES = {"tiny": (32, 32, True, False), "small": (40, 40, True, False), "base": (64, 64, False, False),
                 "large": (80, 80, False, False), "gundam": (64, 40, False, True)}


def v1_tiny_config(vocab_size: int, image_token_id: int):
    from finetune.models.deepseek_ocr.configuration import DeepseekOcrConfig

    return DeepseekOcrConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4,
                     "num_experts_per_tok": 2, "n_shared_experts": 1, "mlp_layer_types": ["dense", "sparse"],
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        sam_config={"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                    "patch_size": 4, "window_size": 4, "global_attn_indexes": [1], "mlp_dim": 32,
                    "output_channels": 16, "downsample_channels": [16, 32]},
        clip_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                     "image_size": 64, "patch_size": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        projector_input=64,
        image_token_id=image_token_id,
    )


# The printed-text v1 base (builtin:tiny-deepseek-ocr, pretrained by recipes/tiny_pretrain_v1.sh):
# 64 px tiles of 4 x 4 tokens, so a text line tiles into up to 6 squares read at full height.
V1_OCR_MODES = {"tiny": (32, 32, True, False), "small": (48, 48, True, False), "base": (64, 64, False, False),
                "large": (96, 96, False, False), "gundam": (64, 64, False, True)}


def v1_ocr_config(vocab_size: int, image_token_id: int):
    """Init of builtin:tiny-deepseek-ocr (~1M parameters). Unlike OCR-2's learned queries,
    v1's vision tokens sit on a fixed grid over the image, which a from-scratch run can use
    from the first step."""
    from finetune.models.deepseek_ocr.configuration import DeepseekOcrConfig

    return DeepseekOcrConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4,
                     "num_experts_per_tok": 2, "n_shared_experts": 1, "mlp_layer_types": ["dense", "sparse", "sparse"],
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        sam_config={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                    "patch_size": 4, "window_size": 8, "global_attn_indexes": [1], "mlp_dim": 96,
                    "output_channels": 32, "downsample_channels": [64, 64], "initializer_range": 0.02},
        clip_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                     "image_size": 64, "patch_size": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        projector_input=128,
        image_token_id=image_token_id,
    )


def build_tiny_v1(output: Path, seed: int = 0, size: str = "random") -> None:
    """builtin:tiny-random-deepseek-ocr (size random), or the init of the printed-text base
    (size ocr), written in the official DeepSeek-OCR layout."""
    from finetune.models.deepseek_ocr.processor import DeepseekOcrProcessor
    from finetune.models.deepseek_ocr.checkpoint import save_official
    from finetune.models.deepseek_ocr.modeling import DeepseekOcrForConditionalGeneration

    tokenizer = build_tokenizer()
    make = v1_tiny_config if size == "random" else v1_ocr_config
    config = make(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = DeepseekOcrForConditionalGeneration(config)
    if size == "random":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2 or name.endswith(("image_newline", "view_seperator")):
                    param.normal_(0.0, 0.2)  # large random weights, as for the OCR-2 test model
    output.mkdir(parents=True, exist_ok=True)
    save_official(model, output)
    modes = V1_TINY_MODES if size == "random" else V1_OCR_MODES
    processor = DeepseekOcrProcessor(tokenizer, patch_size=4, downsample_ratio=4, modes=dict(modes))
    processor.save_pretrained(output)


def build_tiny_random(output: Path, seed: int = 0, size: str = "random") -> None:
    from transformers import DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    make_config, view, patch = SIZES[size]
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = make_config(len(tokenizer), image_token_id)
    torch.manual_seed(seed)
    model = DeepseekOcr2ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if size == "random" and (param.dim() >= 2 or name.endswith("view_separator")):
                # Large random weights so outputs differ between images and LoRA updates
                # visibly change logits in tests.
                param.normal_(0.0, 0.2)
            elif size == "ocr" and float(param.abs().max()) == 0.0 and param.dim() >= 1 and "norm" not in name:
                # A starting point for pretraining: nothing left at exactly zero (the
                # query tables and view separator start there), at the usual 0.02 scale.
                param.normal_(0.0, 0.02)
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 2
    image_processor = DeepseekOcr2ImageProcessorPil(
        size={"height": view, "width": view}, tile_size=view, crop_to_patches=False, min_patches=2, max_patches=6
    )
    processor = DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, downsample_ratio=4)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output))
    processor.save_pretrained(str(output))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="random",
                        help="random: the 0.2M-parameter test model; ocr: the init of the pretrained tiny base")
    parser.add_argument("--family", choices=["deepseek-ocr-2", "deepseek-ocr"], default="deepseek-ocr-2",
                        help="deepseek-ocr: the v1 models, written in the official layout")
    args = parser.parse_args(argv)
    if args.family == "deepseek-ocr":
        build_tiny_v1(args.output, seed=args.seed, size=args.size)
    else:
        build_tiny_random(args.output, seed=args.seed, size=args.size)


if __name__ == "__main__":
    main()
