"""Training-step memory and speed: gradient checkpointing on/off x plain/chunked loss, side by side.

    python benchmarks/train_memory.py --model builtin:tiny-random-deepseek-ocr-2 --batch-size 4 --steps 6
    python benchmarks/train_memory.py --model /path/to/real-size-checkpoint --dtype bfloat16 --target-chars 1500

Each setting runs in a fresh process (so peak memory is its own): LoRA (attention+mlp, r=16)
on the model, `--steps` optimizer steps on rendered pages whose answers are `--target-chars`
long, through the same loss function as `python -m finetune.train`. Prints one JSON line per
setting: peak memory (CUDA: max allocated; CPU: peak RSS growth over the loaded model),
samples/s over the steps after the first, and the first step's loss (equal across settings:
checkpointing and chunking change memory and speed, not the numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [  # (gradient checkpointing, loss_chunk_tokens)
    (False, 0),
    (False, 1024),
    (True, 0),
    (True, 1024),
]


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> dict:
    import torch
    from finetune.compat import enable_activation_checkpointing, get_peft_model

    from data_prep.sample import line_text, render_line
    from finetune.lora import lora_config, resolve_targets
    from finetune.loss import token_loss_sum
    from finetune.models import load_model
    from finetune.runtime import resolve_dtype
    from finetune.sequence import builder_for

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    resolved, model, processor = load_model(args.model, dtype=resolve_dtype(args.dtype, on_gpu), device=device)
    model.requires_grad_(False)
    model = get_peft_model(model, lora_config(resolve_targets(model, "attention+mlp", resolved.family.LAYOUT), 16, 16, 0.0))
    if args.checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    model.train()
    builder = builder_for(resolved.family, processor, model.config, "<image>\nFree OCR.",
                          resolved.family.vision_settings(processor))
    texts = []
    for i in range(args.batch_size):
        text = ""
        k = i
        while len(text) < args.target_chars:
            text += line_text(k) + "\n"
            k += args.batch_size
        texts.append(text[: args.target_chars])
    examples = [builder.build(str(i), render_line(texts[i][:40]), texts[i]) for i in range(args.batch_size)]
    batch = builder.collate(examples, padding_side="right")
    batch.pop("ids")
    dtype = next(model.parameters()).dtype
    batch = {k: (v.to(device, dtype) if k.startswith("pixel_values") else v.to(device)) for k, v in batch.items()}
    head = model.get_output_embeddings()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = int((batch["labels"] != -100).sum())

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    losses, times = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = token_loss_sum(model, batch, head, args.chunk) / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if on_gpu else _rss_mb()) - base
    timed = times[1:] or times
    return {"gradient_checkpointing": args.checkpointing, "loss_chunk_tokens": args.chunk, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "batch_size": args.batch_size, "answer_tokens": tokens,
            "peak_mem_mb": round(peak, 1), "samples_per_s": round(args.batch_size * len(timed) / sum(timed), 3),
            "first_loss": losses[0]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-random-deepseek-ocr-2")
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--target-chars", type=int, default=600, help="answer length per page")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return []
    results = []
    repo = Path(__file__).resolve().parent.parent
    for checkpointing, chunk in SETTINGS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--target-chars",
               str(args.target_chars), "--chunk", str(chunk)] + (["--checkpointing"] if checkpointing else [])
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"setting checkpointing={checkpointing} chunk={chunk} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
