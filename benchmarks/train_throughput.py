"""python benchmarks/train_throughput.py [--size tiny|full] [--device cpu|cuda] [--steps N] [--json OUT]

LoRA training throughput, side by side in one run: ocrtune's training path against the loop a
user would write with transformers + PEFT + accelerate, on the same data, batch, sequence
layout and LoRA targets, per family and resolution mode (base, gundam).

    python benchmarks/train_throughput.py --size tiny --steps 3 --json /tmp/tt.json     (any CPU: smoke)
    python benchmarks/train_throughput.py --size full --batch-size 8 --json OUT.json     (a GPU, bf16)

Rows:
  baseline  DeepSeek-OCR-2 only: transformers' DeepseekOcr2ForConditionalGeneration.from_pretrained,
            peft.get_peft_model(LoraConfig(...)), a plain accelerate loop (forward with labels,
            the model's own loss, backward, AdamW step). DeepSeek-OCR (v1) has no transformers
            class, so its rows are ocrtune's alone.
  ocrtune   finetune.train.train on a config built from the same settings: what `ocrtune train`
            runs (its loss, loop, accelerate setup and model loading).
Both read the same dataset from disk (page-shaped images, answers of --answer-tokens tokens),
build sequences with ocrtune's sequence builder (BOS, prompt, image placeholders, answer,
EOS; right-padded), take samples in the same seeded order, adapt the same modules (the
preset's anchored regex, r 16, alpha 16) and use the same dtype (bf16 weights and autocast on
a GPU that has it, fp32 on CPU) and activation-checkpointing setting.

--size tiny uses the shipped tiny random checkpoints. --size full first writes random-weight
checkpoints at the published sizes into --workdir (v1: benchmarks/v1_full_size.py's config;
OCR-2: the same decoder with SAM ViT-B and the Qwen2-0.5B-shaped encoder of transformers'
conversion script), and every row loads one the way its user would.

Each row runs in a fresh process. samples/s counts the --steps optimizer steps after
--warmup (each step ends in a host sync in both loops: the loss is read). Peak memory: on
CUDA, torch.cuda.max_memory_allocated over loading and training; on CPU, the peak resident
set size (ru_maxrss) minus the resident size before the model loaded (it includes the
weights; tracemalloc would not see torch's allocations). The first step's loss is printed
too: equal across the two loops when they see the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = {"v1": "builtin:tiny-random-deepseek-ocr", "ocr2": "builtin:tiny-random-deepseek-ocr-2"}
IMPLS = {"v1": ("ocrtune",), "ocr2": ("baseline", "ocrtune")}
PROMPT = "<image>\nFree OCR."
PAGE_SIZE = (1000, 1500)  # A4-shaped: Gundam tiles it 2 across x 3 down
# DeepSeek-OCR-2 at its published size. The decoder is v1's DeepSeek-3B-MoE (the fields of
# v1_full_size.FULL_CONFIG); the vision fields are those transformers'
# convert_deepseek_ocr2_weights_to_hf.py writes for deepseek-ai/DeepSeek-OCR-2.
OCR2_TEXT = {"vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848, "moe_intermediate_size": 896,
             "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
             "num_experts_per_tok": 6, "n_shared_experts": 2, "mlp_layer_types": ["dense"] + ["sparse"] * 11,
             "max_position_embeddings": 8192, "topk_method": "greedy", "bos_token_id": 0, "eos_token_id": 1}
OCR2_VISION = {
    "sam_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "global_attn_indexes": [2, 5, 8, 11], "downsample_channels": [512, 896]},
    "encoder_config": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                       "intermediate_size": 4864, "rms_norm_eps": 1e-6, "vocab_size": 1,
                       "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}},
}


def _import_sibling(name: str):
    """A module from benchmarks/ (not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_image(text: str):
    """A white page-shaped image with the answer's first lines drawn on it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", PAGE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(text.splitlines()[:40]):
        draw.text((60, 60 + 34 * k), line, fill="black")
    return image


def answers(tokenizer, n: int, answer_tokens: int) -> list[str]:
    """`n` different answers, each grown line by line until it has `answer_tokens` tokens."""
    from data_prep.sample import line_text

    texts = []
    for i in range(n):
        lines, k = [], i
        while len(tokenizer(("\n".join(lines)), add_special_tokens=False)["input_ids"]) < answer_tokens:
            lines.append(line_text(k))
            k += n
        ids = tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"][:answer_tokens]
        texts.append(tokenizer.decode(ids))
    return texts


def write_dataset(folder: Path, tokenizer, n: int, answer_tokens: int) -> Path:
    """A dataset directory as `ocrtune data build` writes one (its train split is all we read)."""
    from datasets import Dataset, DatasetDict

    texts = answers(tokenizer, n, answer_tokens)
    split = Dataset.from_dict({"id": [f"page-{i}" for i in range(n)], "image": [page_image(t) for t in texts],
                               "markdown": texts})
    DatasetDict({"train": split}).save_to_disk(str(folder))
    return folder


def _tiny_tokenizer():
    """The shipped tiny models' tokenizer (both families share it), which the full-size
    checkpoints reuse: the answers' token counts are the same at both sizes."""
    from finetune.models import resolve_model

    resolved = resolve_model(TINY["ocr2"])
    return resolved.family.load_processor(resolved.path).tokenizer


def write_checkpoint(family: str, folder: Path, device: str, dtype_name: str) -> None:
    """A random-weight checkpoint at the published size, in the layout its family loads."""
    import torch

    dtype = getattr(torch, dtype_name)
    if family == "v1":
        from finetune.models.deepseek_ocr.checkpoint import save_official

        model, processor = _import_sibling("v1_full_size").build("full", torch.device(device), dtype)
        save_official(model, folder)
        processor.save_pretrained(folder)
        return
    from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration, DeepseekOcr2Processor
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

    tokenizer = _tiny_tokenizer()  # ids < 512: valid in the full vocabulary
    config = DeepseekOcr2Config(text_config=OCR2_TEXT, vision_config=OCR2_VISION,
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    with torch.device(device):  # transformers' own initialisation, on the device (seconds on a GPU)
        model = DeepseekOcr2ForConditionalGeneration(config).to(dtype)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    # The published processor: 1024 global view (256 tokens), 768 tiles (144 tokens each).
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tokenizer,
                                      patch_size=16, downsample_ratio=4)
    processor.save_pretrained(str(folder))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Meter:
    """Peak memory over everything after it starts (see the module docstring for which)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_max_memory_allocated"
        else:
            self.start = _rss_mb()
            self.kind = "cpu_peak_rss_delta"

    def peak_mb(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else _peak_rss_mb() - self.start


class _Pages:
    """Rows -> sequences as the loader asks for them: images are encoded in every step, as in ocrtune's loop."""

    def __init__(self, rows, builder):
        self.rows, self.builder = rows, builder

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return self.builder.build(row["id"], row["image"], row["markdown"])


def sequence_tokens(model: str, data: Path, mode: str) -> float:
    """Mean sequence length (BOS, prompt, placeholders, answer, EOS) of the dataset's pages."""
    from datasets import load_from_disk

    from finetune.models import resolve_model
    from finetune.sequence import builder_for

    resolved = resolve_model(model)
    processor = resolved.family.load_processor(resolved.path)
    builder = builder_for(resolved.family, processor, None, PROMPT, resolved.family.vision_settings(processor, mode))
    pages = _Pages(load_from_disk(str(data))["train"], builder)
    return sum(len(pages[i].input_ids) for i in range(len(pages))) / len(pages)


def _import_libraries() -> None:
    """What both loops import, loaded before either starts measuring memory."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from transformers import DeepseekOcr2ForConditionalGeneration  # noqa: F401

    from finetune.models.deepseek_ocr import modeling  # noqa: F401


def run_baseline(model_path: str, data: Path, mode: str, preset: str, batch_size: int, steps: int, warmup: int,
                 seed: int, checkpointing: bool) -> dict:
    """The loop a transformers + PEFT + accelerate user writes (ocrtune supplies only the
    sequences, the sample order and the target regex, so that those are the same)."""
    import torch
    from accelerate import Accelerator
    from datasets import load_from_disk
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, DeepseekOcr2ForConditionalGeneration

    from finetune.compat import enable_activation_checkpointing
    from finetune.lora import resolve_targets
    from finetune.models import resolve_model
    from finetune.models.deepseek_ocr2 import DeepseekOcr2
    from finetune.sequence import builder_for
    from finetune.train import EpochShuffle

    _import_libraries()
    meter = _Meter()
    torch.manual_seed(seed)
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if bf16 else "no")
    path = str(resolve_model(model_path).path)  # a shipped tiny model's folder; a checkpoint folder as it is
    model = DeepseekOcr2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    family = DeepseekOcr2()
    targets = resolve_targets(model, preset, family.LAYOUT)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=targets.target_modules,
                                             target_parameters=targets.target_parameters or None))
    if checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    builder = builder_for(family, processor, model.config, PROMPT, family.vision_settings(processor, mode))
    dataset = _Pages(load_from_disk(str(data))["train"], builder)
    sampler = EpochShuffle(len(dataset), seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         collate_fn=lambda ex: builder.collate(ex, padding_side="right"))
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    ends, losses = [], []
    start = time.perf_counter()
    for _, batch in zip(range(warmup + steps), batches()):
        batch.pop("ids")
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        ends.append(time.perf_counter() - start)
    experts = getattr(model.config.get_text_config(), "_experts_implementation", None)
    return {"samples_per_s": batch_size * steps / (ends[-1] - ends[warmup - 1]), "peak_mem_mb": meter.peak_mb(),
            "peak_mem_kind": meter.kind, "first_loss": losses[0], "trainable_params": sum(p.numel() for p in trainable),
            "experts_implementation": experts}


def run_ocrtune(model_path: str, data: Path, mode: str, preset: str, batch_size: int, steps: int, warmup: int,
                seed: int, checkpointing: bool, output: Path) -> dict:
    """`ocrtune train` on the same settings; times from its metrics.jsonl."""
    from finetune.config import load_config
    from finetune.train import train

    _import_libraries()  # train() imports these on first use: outside the measured memory, as in the baseline
    meter = _Meter()
    cfg = load_config(None, [f"model.name={model_path}", f"data.path={data}", f"vision.mode={mode}",
                             f"lora.preset={preset}", "lora.r=16", "lora.alpha=16", "lora.dropout=0.0",
                             f"train.max_steps={warmup + steps}", f"train.batch_size={batch_size}",
                             "train.grad_accum=1",
                             "train.lr=2e-4", "train.warmup_steps=0", f"train.seed={seed}",
                             f"train.gradient_checkpointing={str(checkpointing).lower()}", "validation.every_steps=0",
                             f"output_dir={output}"])
    result = train(cfg, progress=False)
    peak = meter.peak_mb()
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in records]
    base = result.model.get_base_model()
    return {"samples_per_s": batch_size * steps / (ends[-1] - ends[warmup - 1]), "peak_mem_mb": peak,
            "peak_mem_kind": meter.kind, "first_loss": records[0]["loss"],
            "trainable_params": result.summary["ledger"]["total"]["trainable"],
            # transformers' experts kernel choice; v1's decoder is ocrtune's own modeling, not that switch
            "experts_implementation": getattr(base.config.get_text_config(), "_experts_implementation", None)
            if result.summary["family"] == "deepseek_ocr2" else None}


def _worker(args) -> dict:
    common = (args.model, Path(args.data), args.mode, args.preset, args.batch_size, args.steps, args.warmup,
              args.seed, args.checkpointing)
    if args.worker == "baseline":
        row = run_baseline(*common)
    else:
        row = run_ocrtune(*common, Path(args.output))
    import torch

    # Named here, not in the parent: a CUDA context there would sit beside every row's process.
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"family": args.family, "mode": args.mode, "impl": args.worker, "device": device, **row}


def _subprocess(argv: list[str], device: str) -> tuple[str, str | None]:
    """(the last line the process printed, None), or ("", the end of its stderr) when it failed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # ocrtune picks the GPU whenever it sees one
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], cwd=HERE.parent, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        return "", done.stderr[-3000:]
    return (done.stdout.strip().splitlines() or [""])[-1], None


def prepare(size: str, families: list[str], workdir: Path, device: str, n_pages: int,
            answer_tokens: int) -> tuple[dict, Path]:
    """({family: model name or checkpoint folder}, dataset folder)."""
    models = dict(TINY)
    if size == "full":
        for family in families:
            folder = workdir / f"random-{family}"
            if not (folder / "config.json").is_file():  # a second run reuses the checkpoints
                start = time.perf_counter()
                _, error = _subprocess(["--write-checkpoint", family, "--output", str(folder), "--dtype",
                                        "bfloat16" if device == "cuda" else "float32"], device)
                if error:
                    raise SystemExit(f"writing the {family} checkpoint failed:\n{error}")
                print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            models[family] = str(folder)
    data = workdir / "data"
    if not (data / "dataset_dict.json").is_file():  # a second run reuses it (same pages for every row)
        write_dataset(data, _tiny_tokenizer(), n_pages, answer_tokens)
    return models, data


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when there is one")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel selection, caches)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--preset", default="attention+mlp")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both loops")
    parser.add_argument("--families", default="v1,ocr2")
    parser.add_argument("--modes", default="base,gundam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="data and checkpoints (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the dataset (and, at full size, the checkpoints) into --workdir, then stop")
    parser.add_argument("--worker", choices=["baseline", "ocrtune"], help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", choices=["v1", "ocr2"], help=argparse.SUPPRESS)
    for hidden in ("--family", "--mode", "--model", "--data", "--output", "--dtype"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_checkpoint:
        import torch

        write_checkpoint(args.write_checkpoint, Path(args.output), "cuda" if torch.cuda.is_available() else "cpu",
                         args.dtype)
        return []
    if args.worker:
        print(json.dumps(_worker(args)), flush=True)
        return []
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the timed steps are measured from the end of the last warmup step")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    families = args.families.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models, data = prepare(args.size, families, workdir, device, 2 * args.batch_size, args.answer_tokens)
    if args.prepare_only:
        print(json.dumps({"models": models, "data": str(data)}), flush=True)
        return []
    rows = []
    for family in families:
        for mode in args.modes.split(","):
            tokens = sequence_tokens(models[family], data, mode)
            for impl in IMPLS[family]:
                argv = ["--worker", impl, "--family", family, "--mode", mode, "--model", models[family], "--data",
                        str(data), "--output", str(workdir / f"run-{family}-{mode}-{impl}"), "--preset", args.preset,
                        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
                        str(args.warmup), "--seed", str(args.seed)]
                argv += ["--checkpointing"] if args.checkpointing else []
                start = time.perf_counter()
                line, error = _subprocess(argv, device)
                # A failed row (out of memory, say) is recorded with its error; the others still run.
                row = json.loads(line) if error is None else {"family": family, "mode": mode, "impl": impl,
                                                              "error": error}
                row["wall_s"] = time.perf_counter() - start  # the whole process: imports, loading, steps
                row.update(size=args.size, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                           preset=args.preset, answer_tokens=args.answer_tokens, sequence_tokens=tokens,
                           checkpointing=args.checkpointing)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:  # after every row: a run stopped by a time limit keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
