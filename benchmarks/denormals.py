"""Training step time on CPU with and without flushing subnormal floats, side by side.

    python benchmarks/denormals.py --size ocr --steps 6 --batch-size 16

Builds the tiny model at the given size (random init, as pretraining starts), then times
full-parameter training steps on the same fixed batch twice: once with
torch.set_flush_denormal(False), once with True (what ocrtune's entry points set on CPU).
Prints seconds per step for each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> dict:
    from transformers import DeepseekOcr2ForConditionalGeneration

    from finetune.models.tiny import SIZES, build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="ocr")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    make_config, view, _ = SIZES[args.size]
    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    config = make_config(len(tok), image_id)
    gen = torch.Generator().manual_seed(0)
    b = args.batch_size
    ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), torch.full((b, 145), image_id),
                     torch.randint(10, len(tok), (b, args.answer_tokens), generator=gen)], dim=1)
    labels = ids.clone()
    labels[:, :146] = -100
    pixels = torch.randn(b, 3, view, view, generator=gen)

    def seconds_per_step(flush: bool) -> float:
        torch.set_flush_denormal(flush)
        torch.manual_seed(0)
        model = DeepseekOcr2ForConditionalGeneration(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels,
                         num_local_patches=torch.zeros(b, dtype=torch.long)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        return sum(times[1:]) / args.steps

    off = seconds_per_step(False)
    on = seconds_per_step(True)
    result = {"size": args.size, "batch_size": b, "steps": args.steps, "threads": torch.get_num_threads(),
              "s_per_step_denormals_kept": off, "s_per_step_flushed": on, "speedup": off / on}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
