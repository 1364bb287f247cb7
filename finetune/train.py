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
import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.compat import enable_activation_checkpointing, get_peft_model
from finetune.config import RunConfig, dump_yaml, load_config, to_dict
from finetune.errors import OcrtuneError, library_versions
from finetune.feature_cache import VisionFeatureCache, unsupported as unsupported_cache
from finetune.faults import SIGTERM_EXIT, StopRequested, StopSignal, nonfinite_message, oom_message
from finetune.loss import token_loss_sum
from finetune.sequence import IGNORE_INDEX


class TrainError(OcrtuneError, RuntimeError):
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


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation per epoch computed from (seed, epoch) alone: a resumed run can reach any
    epoch's order without replaying the ones before it.

    With `lengths`, each window of `window` consecutive samples of that permutation is
    sorted longest first, so consecutive batches hold pages of similar length (less padding)."""

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, window: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.window = lengths, window

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is not None and self.window > 1:
            order = [i for w in range(0, self.n, self.window)
                     for i in sorted(order[w : w + self.window], key=lambda i: -self.lengths[i])]
        return iter(order)


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
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, gather_object, set_seed
    from datasets import load_from_disk
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from data_prep.atomic import write_text_atomic
    from data_prep.build import is_dataset_dir, read_dataset_info
    from finetune.checkpoint import CheckpointError, latest_complete, load_checkpoint, save_checkpoint
    from finetune.decoding import RepetitionGuard, table_tag_ids
    from finetune.lora import FULL, format_ledger, lora_config, parameter_ledger, resolve_targets
    from finetune.models import BUILTIN_PREFIX, load_model
    from finetune.runtime import choose_prompt, resolve_dtype
    from finetune.sequence import builder_for
    from finetune.validation import validate

    t, v = cfg.train, cfg.validation
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
    # Under FSDP and DeepSpeed the weights and optimizer state may be sharded per process.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        gas = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps")
        if gas not in (None, "auto", t.grad_accum):
            raise TrainError(f"train.grad_accum={t.grad_accum} but the DeepSpeed config says "
                             f"gradient_accumulation_steps={gas}: make them equal")
    if sharded and (t.save_steps or t.resume_from):
        raise TrainError(f"train.save_steps / train.resume_from: checkpoints under {accelerator.distributed_type.value} "
                         "are not supported yet (the optimizer state is sharded per process); train with DDP "
                         "(configs/accelerate/multi_gpu.yaml: LoRA on the 3B decoder fits 24 GB GPUs) or set "
                         "train.save_steps=0")

    # --- Data ------------------------------------------------------------------------------
    data_path = Path(cfg.data.path)
    if not is_dataset_dir(data_path):
        raise TrainError(f"data.path {data_path}: not a dataset directory (build one with `ocrtune data build`)")
    splits = load_from_disk(str(data_path))
    if cfg.data.train_split not in splits:
        raise TrainError(f"data.train_split {cfg.data.train_split!r}: {data_path} has splits {', '.join(splits)}")
    train_split = splits[cfg.data.train_split]
    val_rows = None
    if v.every_steps:
        if v.split not in splits or len(splits[v.split]) == 0:
            raise TrainError(f"validation.split {v.split!r}: {data_path} has no such non-empty split "
                             f"(splits: {', '.join(f'{k} ({len(x)})' for k, x in splits.items())}); "
                             "set validation.every_steps=0 to train without validation")
        val_rows = splits[v.split].select(range(min(v.max_samples, len(splits[v.split]))))
    prompt = choose_prompt(cfg.data.prompt, None, read_dataset_info(data_path))

    # --- Model, frozen; LoRA on the decoder only ------------------------------------------
    resolved, model, processor = load_model(cfg.model.name, dtype=resolve_dtype(cfg.model.dtype, on_gpu))
    family = resolved.family
    try:
        vision = family.vision_settings(processor, cfg.vision.mode, cfg.vision.crop_to_patches, cfg.vision.min_tiles,
                                        cfg.vision.max_tiles)
    except ValueError as exc:
        raise TrainError(f"vision.mode: {exc}") from None
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
        targets = resolve_targets(model, cfg.lora.preset, family.LAYOUT, cfg.lora.vision_lora)
        extra = list(family.LAYOUT.projector_modules) if cfg.lora.train_projector else None
        model = get_peft_model(model, lora_config(targets, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                                  cfg.lora.use_rslora, cfg.lora.use_dora, extra))
        model.peft_config["default"].base_model_name_or_path = resolved.name
        ledger = parameter_ledger(model, family.LAYOUT)
        say(f"LoRA preset {cfg.lora.preset!r}, r={cfg.lora.r}, alpha={cfg.lora.alpha}\n{format_ledger(ledger)}")
    checkpointing = t.gradient_checkpointing
    if checkpointing is None:  # real checkpoints need it; the builtin tiny models do not
        checkpointing = not resolved.name.startswith(BUILTIN_PREFIX)
    if checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    lm_head = model.get_output_embeddings()  # frozen; the chunked loss runs it outside DDP's forward
    loss_fn = lambda m, batch: token_loss_sum(m, batch, lm_head, t.loss_chunk_tokens)  # noqa: E731
    feature_cache = None
    if t.cache_vision_features:  # load_config refused it with a trained vision side
        if (why := unsupported_cache(family.MODEL_TYPE)) is not None:
            raise TrainError(why)
        feature_cache = VisionFeatureCache(model.get_base_model().model.image_features)
        train_loss_fn = lambda m, batch: loss_fn(m, feature_cache.inputs(batch))  # noqa: E731
    else:
        train_loss_fn = loss_fn

    sampler = EpochShuffle(len(keep), t.seed, [lengths[i] for i in keep] if t.group_by_length else None,
                           t.batch_size * 50)
    loader = torch.utils.data.DataLoader(
        _PageDataset(train_split, keep, builder),
        batch_size=t.batch_size,
        sampler=sampler,
        collate_fn=lambda examples: builder.collate(examples, padding_side="right"),
        num_workers=t.num_workers,
        # Workers live across epochs: on a GPU a short epoch otherwise waits for N fresh
        # processes; pinned pages copy to the GPU without a staging copy.
        persistent_workers=t.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)

    # --- prepare once ----------------------------------------------------------------------
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.report_to:
        # The resolved config and library versions travel with the run; nothing from the
        # environment does (no token can reach the tracker through here).
        accelerator.init_trackers("ocrtune", config={**to_dict(cfg), "versions": library_versions()},
                                  init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name}})

    ckpt_root = output_dir / "checkpoints"
    # What a checkpoint must agree on to be resumed: the same data order and the same update.
    identity = {"seed": t.seed, "model": resolved.name, "data": str(data_path), "train_samples": len(keep),
                "lora": to_dict(cfg.lora), "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                "processes": accelerator.num_processes, "max_steps": t.max_steps, "lr": t.lr,
                "group_by_length": t.group_by_length}
    start_step = 0
    best = {"cer": None, "step": None, "stale": 0}  # best validation CER, and validations since it improved
    if t.resume_from:
        path = latest_complete(ckpt_root) if t.resume_from == "latest" else Path(t.resume_from)
        if path is None:
            say(f"train.resume_from=latest: no complete checkpoint in {ckpt_root}; starting fresh")
        else:
            try:
                state = load_checkpoint(path, model, optimizer, accelerator, identity, t.resume_force)
            except CheckpointError as exc:
                raise TrainError(str(exc)) from None
            start_step = state["step"]
            best = state.get("best", best)
            for _ in range(start_step):  # the schedule is a pure function of the step
                scheduler.step()
            say(f"resumed from {path} at step {start_step}")
    if main:
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

    unwrapped = accelerator.unwrap_model(model)
    guard = RepetitionGuard(whitelist=table_tag_ids(processor.tokenizer))  # eval's default decoding
    meta = {"base_model": resolved.name, "base_model_is_local_path": resolved.is_local_path,
            "family": family.MODEL_TYPE, "prompt": prompt, "vision": vision.as_dict(), "lora": to_dict(cfg.lora),
            "dataset": str(data_path)}

    def checkpoint(step: int) -> Path:
        try:
            return save_checkpoint(ckpt_root, step, model, optimizer,
                                   {"step": step, "micro_batches": step * t.grad_accum, "best": best,
                                    "processes": accelerator.num_processes, "run": identity},
                                   accelerator, t.save_total_limit)
        except CheckpointError as exc:
            raise TrainError(str(exc)) from None

    consumed = start_step * t.grad_accum  # micro-batches this process has taken
    batches = _forever(loader, sampler, consumed // len(loader), consumed % len(loader))
    bar = tqdm(total=t.max_steps, initial=start_step, desc="train", disable=not (main and progress))
    model.train()
    started = time.perf_counter()
    tokens_seen = 0
    last_loss = float("nan")
    stopped = "max_steps"
    step = start_step
    with StopSignal() as sigterm, bar, metrics_fh or contextlib.nullcontext():
        for step in range(start_step + 1, t.max_steps + 1):
            window = [next(batches) for _ in range(t.grad_accum)]
            sample_ids = [i for ids in gather_object([[x for b in window for x in b["ids"]]]) for i in ids]
            # Loss is normalised by the answer tokens of the whole effective batch (all
            # micro-batches, all processes), not averaged per micro-batch: long and short
            # pages weigh per token, as in one big batch.
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
            n_tokens = int(accelerator.gather(torch.tensor([local_tokens], device=accelerator.device)).sum())
            loss_sum_local = 0.0
            try:
                for batch in window:
                    with accelerator.accumulate(model):
                        loss_sum = train_loss_fn(model, batch)
                        # accelerate divides by grad_accum and DDP averages over processes: undo both.
                        accelerator.backward(loss_sum * (t.grad_accum * accelerator.num_processes / max(n_tokens, 1)))
                    loss_sum_local += float(loss_sum.detach())
            except torch.OutOfMemoryError:
                raise TrainError(oom_message(str(accelerator.device), t.batch_size, t.grad_accum, checkpointing,
                                             t.loss_chunk_tokens)) from None
            # The window's last micro-batch synchronised the gradients; check them before any
            # update: a non-finite loss must never reach the weights, a checkpoint or best/.
            total_loss = float(accelerator.gather(torch.tensor([loss_sum_local], device=accelerator.device)).sum())
            last_loss = total_loss / max(n_tokens, 1)
            norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
            if not math.isfinite(last_loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
                raise TrainError(nonfinite_message(step, last_loss, grad_norm, sample_ids, latest_complete(ckpt_root)))
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            tokens_seen += n_tokens
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": last_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                      "target_tokens": n_tokens, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed,
                      "sample_ids": sample_ids}
            if v.every_steps and (step % v.every_steps == 0 or step == t.max_steps):
                val = validate(model, unwrapped, builder, val_rows, v.batch_size, v.max_new_tokens, guard,
                               accelerator, loss_fn)
                record.update(val_loss=val.loss, val_cer=val.cer)
                if best["cer"] is None or val.cer < best["cer"]:
                    best = {"cer": val.cer, "step": step, "stale": 0}
                    if main:
                        _save_weights(unwrapped, output_dir / "best", full, processor, family,
                                      {**meta, "steps": step, "validation": {"split": v.split, "samples": val.samples,
                                                                             "cer": val.cer, "loss": val.loss}})
                else:
                    best["stale"] += 1
                say(f"step {step}: validation loss {val.loss:.4f}, CER {val.cer:.2%} "
                    f"(best {best['cer']:.2%} at step {best['step']})")
            if main and (step % t.log_every == 0 or step == t.max_steps or "val_cer" in record):
                metrics_fh.write(json.dumps(record) + "\n")
                metrics_fh.flush()
            if cfg.report_to:
                accelerator.log({k: x for k, x in record.items() if k not in ("step", "sample_ids")}, step=step)
            saved_now = bool(t.save_steps and step % t.save_steps == 0 and step < t.max_steps)
            if saved_now:
                checkpoint(step)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            # Every process must agree to stop at the same step (a signal reaches them apart).
            term = sigterm.received
            if accelerator.num_processes > 1:
                term = bool(accelerator.gather(torch.tensor([int(term)], device=accelerator.device)).max())
            if term and step < t.max_steps:
                path = ckpt_root / f"step-{step:06d}" if saved_now else checkpoint(step)
                raise StopRequested(f"SIGTERM at step {step}: checkpoint {path} written; continue with "
                                    "train.resume_from=latest")
            if v.early_stopping_patience and best["stale"] >= v.early_stopping_patience:
                stopped = "early_stopping"
                say(f"early stopping at step {step}: no better validation CER in {best['stale']} validations")
                break

    # --- save: adapter (or whole model) into a staging dir, then renamed into place ---------
    accelerator.wait_for_everyone()
    # Sharded topologies gather the full weights (a collective: every process calls it).
    gathered = accelerator.get_state_dict(model) if sharded else None
    saved_dir = output_dir / ("model" if full else "adapter")
    summary = {
        "base_model": resolved.name,
        "family": family.MODEL_TYPE,
        "steps": step,
        "max_steps": t.max_steps,
        "stopped": stopped,
        "final_loss": last_loss,
        "best_validation": {"cer": best["cer"], "step": best["step"], "dir": str(output_dir / "best")}
        if best["cer"] is not None else None,
        "train_samples": len(keep),
        "dropped_too_long": dropped,
        "processes": accelerator.num_processes,
        "effective_batch": t.batch_size * t.grad_accum * accelerator.num_processes,
        "gradient_checkpointing": checkpointing,
        "loss_chunk_tokens": t.loss_chunk_tokens,
        "vision_feature_cache": feature_cache.summary() if feature_cache is not None else None,
        "wall_s": time.perf_counter() - started,
        "ledger": ledger,
        "versions": library_versions(),
    }
    if main:
        _save_weights(unwrapped, saved_dir, full, processor, family, {**meta, "steps": step},
                      gathered)
        write_text_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        say(f"{'model' if full else 'adapter'} written to {saved_dir}")
    if cfg.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, saved_dir, summary, unwrapped)


def _save_weights(unwrapped, target: Path, full: bool, processor, family, meta: dict, state_dict=None) -> None:
    """The adapter (or, for preset full, the whole model) into a staging dir renamed onto
    `target`: a crash or a full disk leaves the previous `target` as it was."""
    import shutil

    from data_prep.atomic import replace_dir
    from finetune.lora import save_adapter
    from finetune.runtime import ADAPTER_META

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if full:
            unwrapped.save_pretrained(str(staging), state_dict=state_dict)
            processor.save_pretrained(str(staging))
        else:
            save_adapter(unwrapped, staging, family, state_dict)
            (staging / "README.md").unlink(missing_ok=True)  # `ocrtune push` writes the real card
            (staging / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise TrainError(f"could not write {target} ({exc}); the previous {target.name}/ is untouched") from None
    replace_dir(staging, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ocrtune train", description="Train a LoRA adapter from a YAML config.")
    parser.add_argument("config", help="YAML run config (see configs/runs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides + defaults) as YAML and exit")
    args = parser.parse_intermixed_args(argv)  # options may sit between overrides
    from finetune.errors import run_command

    cfg = None

    def body() -> int:
        nonlocal cfg
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        try:
            train(cfg, progress=not args.no_progress)
        except StopRequested as exc:
            print(f"stopped: {exc}", file=sys.stderr)
            return SIGTERM_EXIT
        return 0

    # An internal error's traceback goes to the run's output_dir (a temp file if the config
    # never loaded that far).
    return run_command("train", body, lambda: cfg.output_dir if cfg is not None else None)


if __name__ == "__main__":
    sys.exit(main())
