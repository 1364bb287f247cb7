"""Greedy decoding with the LoRA adapter folded into the weights vs through PEFT's LoRA layers, side by side in one run.

    python benchmarks/merged_generation.py --pages 8 --batch-size 8 --new-tokens 32
    python benchmarks/merged_generation.py --models ocr2=CKPT --pages 64 --batch-size 64 --new-tokens 500 \\
        --dtype bfloat16 --budget-s 40 --json OUT.json                      (a GPU; see gpu_train_speed.sh)

For each model (default: the two shipped tiny random models, one per family) a LoRA adapter
(--preset, r 16) is put on the model with every lora_B drawn at random, so the adapted model
reads differently from the base. The same pages (page-shaped images as in
train_throughput.py, or --lines: rendered text lines) are then decoded by `generate_pages`,
eval's decoding with its repetition guard, twice per repeat, alternating: "wrapped" through
PEFT's layers (what validation, eval and predict ran before) and "folded" inside
finetune.generate.folded_lora (merged, wrappers swapped out). The best of --repeats is kept.
Prints, per model: generated tokens/s and pages/s of both, the ratio, and whether the greedy
token ids are identical (they must be).

--budget-s: the wrapped path's decode-step time is measured on a short run first, and the
new-token cap is lowered, where needed, so that one wrapped run fits the budget (random
weights rarely stop early: every page decodes to the cap). The cap used is in the output.

--static-cache adds a third variant, folded with transformers' static KV cache (on a GPU,
`generate` then compiles the decode step), after one untimed run that compiles; its token
ids are compared with the wrapped path's too. ocrtune's own decoding does not use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sibling(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def adapted_model(model_name: str, preset: str, dtype, device, seed: int = 0):
    """(family, processor, PEFT model in eval mode) with every lora_B random."""
    import torch

    from finetune.compat import get_peft_model
    from finetune.lora import lora_config, resolve_targets
    from finetune.models import load_model

    resolved, model, processor = load_model(model_name, dtype=dtype, device=device)
    model.requires_grad_(False)
    model = get_peft_model(model, lora_config(resolve_targets(model, preset, resolved.family.LAYOUT), 16, 16, 0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
    return resolved.family, processor, model.eval()


def measure(model_name: str, preset: str, dtype_name: str, pages: int, batch_size: int, new_tokens: int,
            repeats: int, budget_s: float, lines: bool, mode: str | None, use_guard: bool,
            static_cache: bool) -> dict:
    import torch

    from data_prep.sample import line_text, render_line
    from finetune.decoding import RepetitionGuard, table_tag_ids
    from finetune.generate import folded_lora, generate_pages
    from finetune.sequence import builder_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family, processor, model = adapted_model(model_name, preset, getattr(torch, dtype_name), device)
    vision = family.vision_settings(processor, mode)
    builder = builder_for(family, processor, model.config, "<image>\nFree OCR.", vision)
    # eval's default decoding; --no-guard: plain greedy, to see what the guard's per-step work costs
    guard = RepetitionGuard(whitelist=table_tag_ids(processor.tokenizer)) if use_guard else None
    page_image = _sibling("train_throughput").page_image
    docs = [(str(i), render_line(line_text(i)) if lines else page_image("\n".join(line_text(i * 40 + k)
                                                                                   for k in range(40))))
            for i in range(pages)]

    generation_config = model.get_base_model().generation_config
    checkpoint_cache = generation_config.cache_implementation

    def run(variant: str, cap: int, subset=docs):
        _sync(device)
        start = time.perf_counter()
        # exact_restore as validation folds (eval and predict skip the weight copy)
        wrapped = variant == "wrapped"
        with contextlib.nullcontext() if wrapped else folded_lora(model, adapted=True, exact_restore=True):
            if variant == "folded_static":  # transformers' static KV cache; on a GPU generate compiles the step
                generation_config.cache_implementation = "static"
            try:
                gens = generate_pages(model, builder, subset, batch_size, cap, guard=guard)
            finally:
                generation_config.cache_implementation = checkpoint_cache
        _sync(device)
        return time.perf_counter() - start, gens

    run("wrapped", 2, docs[:batch_size])  # warm-up of both paths: first calls pay one-off costs
    run("folded", 2, docs[:batch_size])
    cap = new_tokens
    if budget_s > 0:  # decode-step time from two short runs of the slower path on one batch
        short, longer = 4, 20
        t_short, _ = run("wrapped", short, docs[:batch_size])
        t_long, _ = run("wrapped", longer, docs[:batch_size])
        step = (t_long - t_short) / (longer - short)
        if step <= 0:  # timing noise (a busy CPU): the whole longer run per token, an overestimate
            step = t_long / longer
        batches = -(-pages // batch_size)
        prefill = max(t_short - short * step, 0.0)
        cap = max(short, min(new_tokens, int((budget_s / batches - prefill) / step)))
    variants = ("wrapped", "folded") + (("folded_static",) if static_cache else ())
    if static_cache:  # compilation and cache allocation happen in the first run of each shape: not timed
        run("folded_static", cap)
    best = {name: (float("inf"), None) for name in variants}
    for _ in range(repeats):
        for name in variants:
            seconds, gens = run(name, cap)
            if seconds < best[name][0]:
                best[name] = (seconds, gens)
    result = {"model": model_name, "preset": preset, "dtype": dtype_name, "mode": vision.mode,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "pages": pages, "batch_size": batch_size,
              "new_tokens_asked": new_tokens, "new_tokens_cap": cap, "repeats": repeats,
              "repetition_guard": guard.describe() if guard is not None else None}
    for name, (seconds, gens) in best.items():
        tokens = sum(g.new_tokens for g in gens)
        result[name] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
                        "pages_per_s": pages / seconds}
    result["speedup"] = result["folded"]["tokens_per_s"] / result["wrapped"]["tokens_per_s"]
    wrapped_ids = [g.token_ids for g in best["wrapped"][1]]
    result["identical_token_ids"] = wrapped_ids == [g.token_ids for g in best["folded"][1]]
    if static_cache:
        result["static_speedup"] = result["folded_static"]["tokens_per_s"] / result["wrapped"]["tokens_per_s"]
        result["static_identical_token_ids"] = wrapped_ids == [g.token_ids for g in best["folded_static"][1]]
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated LABEL=MODEL",
                        default="v1=builtin:tiny-random-deepseek-ocr,ocr2=builtin:tiny-random-deepseek-ocr-2")
    parser.add_argument("--preset", default="attention+mlp")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mode", default=None, help="resolution mode (default: the checkpoint's)")
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=0.0, help="seconds one wrapped run may take (0: no cap)")
    parser.add_argument("--lines", action="store_true", help="text-line images instead of pages")
    parser.add_argument("--no-guard", action="store_true", help="no repetition guard (eval decodes with it)")
    parser.add_argument("--static-cache", action="store_true",
                        help="also time folded decoding with transformers' static cache (compiled on a GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for item in args.models.split(","):
        label, name = item.split("=", 1)
        row = {"label": label, **measure(name, args.preset, args.dtype, args.pages, args.batch_size, args.new_tokens,
                                          args.repeats, args.budget_s, args.lines, args.mode, not args.no_guard,
                                          args.static_cache)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every model: a run stopped by a time limit keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
