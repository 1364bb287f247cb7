"""Train a LoRA adapter on the decoder.

    python -m finetune.train configs/runs/tiny_smoke.yaml [dotted.key=value ...]
    ocrtune train CONFIG.yaml ...                       (the same, in-process)
    accelerate launch -m finetune.train CONFIG.yaml ...  (any topology accelerate knows)
    torchrun --nproc_per_node N -m finetune.train CONFIG.yaml ...

Writes OUTPUT_DIR/adapter/ (adapter_model.safetensors, adapter_config.json,
ocrtune_adapter.json), OUTPUT_DIR/config.yaml (the resolved config),
OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/train_summary.json. With `lora.preset: full`
every weight trains and OUTPUT_DIR/model/ is a whole checkpoint instead of adapter/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.config import ConfigError, RunConfig, dump_yaml, load_config, to_dict
from finetune.sequence import IGNORE_INDEX


class TrainError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    saved_dir: Path  # OUTPUT_DIR/adapter, or OUTPUT_DIR/model for lora.preset=full
    summary: dict
    model: torch.nn.Module  # the unwrapped (PEFT) model, for in-process inspection


class _PageDataset(torch.utils.data.Dataset):
    """Rows of a split -> Example objects, built lazily so workers decode images in parallel."""

    def __init__(self, hf_split, indices, builder):
        self.split, self.indices, self.builder = hf_split, indices, builder

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        row = self.split[self.indices[i]]
        return self.builder.build(row["id"], row["image"], row["markdown"])


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropy over label positions.

    Logits are computed only from the first answer position on (`logits_to_keep`), so
    the hundreds of image-placeholder positions never materialise vocabulary-sized rows.
    """
    labels = batch["labels"]
    has_label = (labels != IGNORE_INDEX).any(dim=0)
    start = int(has_label.nonzero()[0]) if has_label.any() else labels.shape[1] - 1
    keep = torch.arange(start - 1, labels.shape[1] - 1, device=labels.device)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, start:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch computed from (seed, epoch) alone: a resumed run can reach any
    epoch's order without replaying the ones before it."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _forever(loader, sampler, start_epoch: int = 0, skip: int = 0):
    """Micro-batches across epochs, starting `skip` batches into `start_epoch` (a resume).

    Skipped batches are drawn and dropped rather than jumped over: slower on resume, but the
    batches that follow are exactly the uninterrupted run's, even at a ragged epoch end."""
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):  # accelerate's loader keeps its own epoch count and
            loader.set_epoch(epoch)       # pushes it into the sampler on every iter(): align it
        it = iter(loader)
        for _ in range(skip):
            next(it)
        skip = 0
        yield from it
        epoch += 1


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
    from datasets import load_from_disk
    from peft import get_peft_model
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from data_prep.atomic import replace_dir, write_text_atomic
    from data_prep.build import read_dataset_info
    from finetune.checkpoint import CheckpointError, latest_complete, load_checkpoint, save_checkpoint
    from finetune.lora import FULL, format_ledger, lora_config, parameter_ledger, resolve_targets, save_adapter
    from finetune.models import load_model
    from finetune.runtime import ADAPTER_META, choose_prompt, resolve_dtype, resolve_vision
    from finetune.sequence import builder_for

    t = cfg.train
    full = cfg.lora.preset == FULL
    # --- Accelerator first: it decides device, precision and process layout. -------------
    on_gpu = torch.cuda.is_available()
    mixed = t.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        # cpu=True without a GPU: accelerate then runs torchrun/accelerate-launch ranks
        # as multi-CPU (gloo) instead of N independent single-process runs.
        cpu=not on_gpu and not torch.backends.mps.is_available(),
        mixed_precision=mixed,
        # sync_with_dataloader=False: an epoch boundary must not end an accumulation window
        # early, or the per-token normalisation below would be wrong for that step.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        log_with=cfg.report_to or None,
    )
    set_seed(t.seed)
    main = accelerator.is_main_process
    say = accelerator.print

    # --- Data ------------------------------------------------------------------------------
    data_path = Path(cfg.data.path)
    if not (data_path / "dataset_dict.json").is_file():
        raise TrainError(f"data.path {data_path}: not a dataset directory (build one with `ocrtune data build`)")
    splits = load_from_disk(str(data_path))
    if cfg.data.train_split not in splits:
        raise TrainError(f"data.train_split {cfg.data.train_split!r}: {data_path} has splits {', '.join(splits)}")
    train_split = splits[cfg.data.train_split]
    prompt = choose_prompt(cfg.data.prompt, None, read_dataset_info(data_path))

    # --- Model, frozen; LoRA on the decoder only ------------------------------------------
    resolved, model, processor = load_model(cfg.model.name, dtype=resolve_dtype(cfg.model.dtype, on_gpu))
    family = resolved.family
    vision = resolve_vision(family, processor, cfg.vision.crop_to_patches, cfg.vision.min_tiles, cfg.vision.max_tiles)
    builder = builder_for(family, processor, model.config, prompt, vision)

    lengths = [builder.count_target_tokens(text) for text in list(train_split["markdown"])]
    keep = [i for i, n in enumerate(lengths) if n <= cfg.data.max_target_tokens]
    dropped = len(lengths) - len(keep)
    if dropped:
        say(f"dropped {dropped} of {len(lengths)} training samples longer than data.max_target_tokens="
            f"{cfg.data.max_target_tokens} (never truncated)")
    if not keep:
        raise TrainError(f"no training samples left in {data_path}:{cfg.data.train_split}")

    if full:
        model.requires_grad_(True)
        ledger = parameter_ledger(model, family.LAYOUT)
        say(f"full-parameter training (lora.preset {FULL!r})\n{format_ledger(ledger)}")
    else:
        model.requires_grad_(False)
        targets = resolve_targets(model, cfg.lora.preset, family.LAYOUT)
        model = get_peft_model(model, lora_config(targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout))
        model.peft_config["default"].base_model_name_or_path = resolved.name
        ledger = parameter_ledger(model, family.LAYOUT)
        say(f"LoRA preset {cfg.lora.preset!r}, r={cfg.lora.r}, alpha={cfg.lora.alpha}\n{format_ledger(ledger)}")
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    sampler = EpochShuffle(len(keep), t.seed)
    loader = torch.utils.data.DataLoader(
        _PageDataset(train_split, keep, builder),
        batch_size=t.batch_size,
        sampler=sampler,
        collate_fn=lambda examples: builder.collate(examples, padding_side="right"),
        num_workers=t.num_workers,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)

    # --- prepare once ----------------------------------------------------------------------
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if cfg.report_to:
        accelerator.init_trackers("ocrtune", config=to_dict(cfg))

    output_dir = Path(cfg.output_dir)
    ckpt_root = output_dir / "checkpoints"
    # What a checkpoint must agree on to be resumed: the same data order and the same update.
    identity = {"seed": t.seed, "model": resolved.name, "data": str(data_path), "train_samples": len(keep),
                "lora": to_dict(cfg.lora), "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                "processes": accelerator.num_processes, "max_steps": t.max_steps, "lr": t.lr}
    start_step = 0
    if t.resume_from:
        path = latest_complete(ckpt_root) if t.resume_from == "latest" else Path(t.resume_from)
        if path is None:
            say(f"train.resume_from=latest: no complete checkpoint in {ckpt_root}; starting fresh")
        else:
            try:
                start_step = load_checkpoint(path, model, optimizer, accelerator, identity, t.resume_force)["step"]
            except CheckpointError as exc:
                raise TrainError(str(exc)) from None
            for _ in range(start_step):  # the schedule is a pure function of the step
                scheduler.step()
            say(f"resumed from {path} at step {start_step}")
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "config.yaml", dump_yaml(cfg))
    metrics_file = output_dir / "metrics.jsonl"
    metrics_fh = None
    if main:
        # On resume keep the records up to the checkpoint; a killed run may have logged past it.
        kept_lines = []
        if start_step and metrics_file.is_file():
            kept_lines = [x for x in metrics_file.read_text().splitlines() if x and json.loads(x)["step"] <= start_step]
        metrics_fh = open(metrics_file, "w", encoding="utf-8")
        metrics_fh.write("".join(x + "\n" for x in kept_lines))

    consumed = start_step * t.grad_accum  # micro-batches this process has taken
    batches = _forever(loader, sampler, consumed // len(loader), consumed % len(loader))
    bar = tqdm(total=t.max_steps, initial=start_step, desc="train", disable=not (main and progress))
    model.train()
    started = time.perf_counter()
    tokens_seen = 0
    last_loss = float("nan")
    for step in range(start_step + 1, t.max_steps + 1):
        window = [next(batches) for _ in range(t.grad_accum)]
        sample_ids = [i for ids in gather_object([[x for b in window for x in b["ids"]]]) for i in ids]
        # Loss is normalised by the answer tokens of the whole effective batch (all
        # micro-batches, all processes), not averaged per micro-batch: long and short
        # pages weigh per token, as in one big batch.
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
        n_tokens = int(accelerator.gather(torch.tensor([local_tokens], device=accelerator.device)).sum())
        loss_sum_local = 0.0
        for batch in window:
            with accelerator.accumulate(model):
                loss_sum = token_loss_sum(model, batch)
                # accelerate divides by grad_accum and DDP averages over processes: undo both.
                scale = t.grad_accum * accelerator.num_processes / max(n_tokens, 1)
                accelerator.backward(loss_sum * scale)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum_local += float(loss_sum.detach())
        scheduler.step()
        total_loss = float(accelerator.gather(torch.tensor([loss_sum_local], device=accelerator.device)).sum())
        last_loss = total_loss / max(n_tokens, 1)
        if not math.isfinite(last_loss):
            raise TrainError(f"loss became {last_loss} at step {step}; stopping (nothing saved)")
        tokens_seen += n_tokens
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "target_tokens": n_tokens,
                  "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed, "sample_ids": sample_ids}
        if main and (step % t.log_every == 0 or step == t.max_steps):
            metrics_fh.write(json.dumps(record) + "\n")
            metrics_fh.flush()
        if cfg.report_to:
            accelerator.log({k: v for k, v in record.items() if k not in ("step", "sample_ids")}, step=step)
        if t.save_steps and step % t.save_steps == 0 and step < t.max_steps:
            save_checkpoint(ckpt_root, step, model, optimizer, {"step": step, "micro_batches": step * t.grad_accum,
                            "processes": accelerator.num_processes, "run": identity}, accelerator, t.save_total_limit)
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    if metrics_fh:
        metrics_fh.close()

    # --- save: adapter (or whole model) into a staging dir, then renamed into place ---------
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    saved_dir = output_dir / ("model" if full else "adapter")
    summary = {
        "base_model": resolved.name,
        "family": family.MODEL_TYPE,
        "steps": t.max_steps,
        "final_loss": last_loss,
        "train_samples": len(keep),
        "dropped_too_long": dropped,
        "processes": accelerator.num_processes,
        "effective_batch": t.batch_size * t.grad_accum * accelerator.num_processes,
        "wall_s": time.perf_counter() - started,
        "ledger": ledger,
        "versions": _versions(),
    }
    if main:
        staging = Path(tempfile.mkdtemp(prefix=f".{saved_dir.name}.tmp-", dir=output_dir))
        if full:
            unwrapped.save_pretrained(str(staging))
            processor.save_pretrained(str(staging))
        else:
            save_adapter(unwrapped, staging, family.ADAPTER_DISK_RENAMES)
            (staging / "README.md").unlink(missing_ok=True)  # `ocrtune push` writes the real card
            meta = {
                "base_model": resolved.name,
                "base_model_is_local_path": resolved.is_local_path,
                "family": family.MODEL_TYPE,
                "prompt": prompt,
                "vision": vision.as_dict(),
                "lora": to_dict(cfg.lora),
                "dataset": str(data_path),
                "steps": t.max_steps,
            }
            (staging / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        replace_dir(staging, saved_dir)
        write_text_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        say(f"{'model' if full else 'adapter'} written to {saved_dir}")
    if cfg.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, saved_dir, summary, unwrapped)


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    import finetune

    return {"ocrtune": finetune.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ocrtune train", description="Train a LoRA adapter from a YAML config.")
    parser.add_argument("config", help="YAML run config (see configs/runs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)  # options may sit between overrides
    from finetune.models import ModelNameError

    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, progress=not args.no_progress)
    except (ConfigError, TrainError, ModelNameError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
