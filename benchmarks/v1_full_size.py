"""DeepSeek-OCR (v1) at real size with random weights: one Gundam-mode LoRA training step
and one batched generation; peak memory and time.

    python benchmarks/v1_full_size.py --size full --dtype bfloat16      (a GPU: ~7 GB of weights)
    python benchmarks/v1_full_size.py --size tiny                      (any machine; CI runs this)

The full-size model is built on the meta device from the published config (the same
config_from_official the loader uses), then materialised on the device with random
weights (normal, std 0.02): no checkpoint needed. Pages are blank A4-shaped images at
1000 x 1500 px, which Gundam tiles 2 across x 3 down: 903 placeholder ids per page.
LoRA r=16 on q,k,v,o,gate,up,down of the decoder, every routed expert included
(77,509,632 trainable parameters at full size), gradient checkpointing on, answers of
`--target-tokens` tokens. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time


FULL_CONFIG = {  # deepseek-ai/DeepSeek-OCR config.json, the fields that shape the model
    "model_type": "deepseek_vl_v2",
    "language_config": {
        "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848, "moe_intermediate_size": 896,
        "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "max_position_embeddings": 8192,
        "topk_method": "greedy", "bos_token_id": 0, "eos_token_id": 1,
    },
    "projector_config": {"input_dim": 2048, "n_embed": 1280, "projector_type": "linear"},
    "vision_config": {"image_size": 1024, "width": {
        "clip-l-14-224": {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024},
        "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11], "heads": 12,
                      "layers": 12, "width": 768}}},
}


def build(size: str, device, dtype):
    import torch

    from finetune.models import load_model
    from finetune.models.deepseek_ocr import DeepseekOcrProcessor
    from finetune.models.deepseek_ocr.checkpoint import config_from_official
    from finetune.models.deepseek_ocr.modeling import DeepseekOcrForConditionalGeneration

    _, tiny, proc = load_model("builtin:tiny-random-deepseek-ocr")
    if size == "tiny":
        return tiny.to(device=device, dtype=dtype), proc
    config = config_from_official(FULL_CONFIG, "benchmark", image_token_id=128815)
    with torch.device("meta"):
        model = DeepseekOcrForConditionalGeneration(config)
    model.to(dtype)  # still on meta: the weights are allocated once, in the target dtype
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                              "pre_layrnorm.weight")):
                p.fill_(1.0)
            elif name.endswith("bias") or "rel_pos" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.reset_rotary(device)
    # The real model's token ids live in a 129,280 vocabulary; the tiny tokenizer's ids
    # (< 512) are valid there, and its <image> id is set as the placeholder.
    model.config.image_token_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    return model, DeepseekOcrProcessor(proc.tokenizer)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--target-tokens", type=int, default=256)
    parser.add_argument("--gen-pages", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from finetune.compat import enable_activation_checkpointing, get_peft_model
    from PIL import Image

    from finetune.generate import generate_pages
    from finetune.lora import lora_config, parameter_ledger, resolve_targets
    from finetune.loss import token_loss_sum
    from finetune.models.deepseek_ocr import DeepseekOcr
    from finetune.sequence import builder_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, proc = build(args.size, device, dtype)
    build_s = time.perf_counter() - t0
    vision = DeepseekOcr().vision_settings(proc, "gundam")
    builder = builder_for(DeepseekOcr(), proc, model.config, "<image>\nFree OCR.", vision)
    page = Image.new("RGB", (1000, 1500), "white")
    answer = " ".join(["word"] * args.target_tokens)

    model.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(resolve_targets(model, "all", DeepseekOcr.LAYOUT), r=16, alpha=16, dropout=0.0))
    trainable = parameter_ledger(peft_model, DeepseekOcr.LAYOUT)["total"]["trainable"]
    enable_activation_checkpointing(peft_model)
    peft_model.enable_input_require_grads()
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    examples = [builder.build(str(i), page, answer) for i in range(args.batch_size)]
    batch = builder.collate(examples)
    batch.pop("ids")
    batch = {k: v.to(device) for k, v in batch.items()}
    for key in ("pixel_values", "pixel_values_local"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):  # the first step includes kernel selection; report the later ones
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        n_tokens = int((batch["labels"] != -100).sum())
        loss = token_loss_sum(peft_model, batch, model.get_output_embeddings(), 1024) / n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    peft_model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.perf_counter()
    gens = generate_pages(peft_model, builder, [(str(i), page) for i in range(args.gen_pages)],
                          batch_size=args.gen_pages, max_new_tokens=args.new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t
    result = {
        "size": args.size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "parameters": sum(p.numel() for p in model.parameters()),
        "lora_trainable": trainable, "placeholder_ids_per_page": examples[0].input_ids.count(model.config.image_token_id),
        "sequence_length": int(batch["input_ids"].shape[1]), "batch_size": args.batch_size, "build_s": round(build_s, 1),
        "train_step_s": [round(x, 3) for x in times], "train_peak_gib": train_peak and round(train_peak, 2),
        "first_loss": float(loss.detach()) if times else None,
        "generate_pages": args.gen_pages, "generate_new_tokens": [g.new_tokens for g in gens], "generate_s": round(gen_s, 2),
        "generate_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
