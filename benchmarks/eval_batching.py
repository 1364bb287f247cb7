"""Batched vs one-at-a-time greedy generation, side by side in one run.

    python benchmarks/eval_batching.py --model builtin:tiny-random-deepseek-ocr-2 --pages 32 --batch-size 8

Checks that both give identical outputs, then prints pages/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> dict:
    from data_prep.sample import line_text, render_line
    from finetune.generate import generate_pages
    from finetune.models import load_model
    from finetune.sequence import builder_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-random-deepseek-ocr-2")
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per setting (best is kept)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved, model, processor = load_model(args.model, device=device)
    model.eval()
    builder = builder_for(resolved.family, processor, model.config, "<image>\nFree OCR.",
                          resolved.family.vision_settings(processor))
    pages = [(str(i), render_line(line_text(i))) for i in range(args.pages)]

    def timed(batch_size):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = generate_pages(model, builder, pages, batch_size, args.max_new_tokens)
            best = min(best, time.perf_counter() - start)
        return best, out

    generate_pages(model, builder, pages[:2], 2, 4)  # warm-up
    t_one, one = timed(1)
    t_batch, batched = timed(args.batch_size)
    result = {
        "model": resolved.name, "device": device, "pages": args.pages, "max_new_tokens": args.max_new_tokens,
        "identical_outputs": [g.text for g in one] == [g.text for g in batched],
        "one_at_a_time_pages_per_s": args.pages / t_one,
        f"batch_{args.batch_size}_pages_per_s": args.pages / t_batch,
        "speedup": t_one / t_batch,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
