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
import functools
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.compat import enable_activation_checkpointing, get_peft_model
from finetune.config import (DataConfig, LoraSettings, ModelConfig, RunConfig, TrainSettings, ValidationSettings,
                             VisionConfig, dump_yaml, load_config, to_dict)
from finetune.distributed import check_topology, make_accelerator
from finetune.errors import OcrtuneError, library_versions
from finetune.feature_cache import open_cache
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


@dataclass
class TrainState:
    """What the step loop changes: checkpoints, metrics.jsonl and the summary read it."""

    step: int = 0  # the last optimizer step taken
    # best validation CER, and validations since it improved
    best: dict = field(default_factory=lambda: {"cer": None, "step": None, "stale": 0})
    tokens_seen: int = 0
    last_loss: float = float("nan")
    stopped: str = "max_steps"  # or "early_stopping"
    started: float = 0.0  # time.perf_counter() when the loop started


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    from accelerate.utils import set_seed

    from data_prep.atomic import write_text_atomic
    from finetune.decoding import RepetitionGuard, table_tag_ids
    from finetune.lora import FULL
    from finetune.validation import validate

    t, v = cfg.train, cfg.validation
    full = cfg.lora.preset == FULL
    # --- Accelerator first: it decides device, precision and process layout. -------------
    on_gpu = torch.cuda.is_available()
    accelerator = make_accelerator(t, cfg.report_to, on_gpu)
    set_seed(t.seed)
    main, say = accelerator.is_main_process, accelerator.print
    sharded = check_topology(accelerator, t, v.every_steps, cfg.model.quantization)

    # --- Data ------------------------------------------------------------------------------
    data_path, train_split, val_rows, prompt = _load_data(cfg.data, v)

    # --- Model, frozen; LoRA on the decoder only ------------------------------------------
    resolved, model, processor, vision, builder = _load_model(cfg.model, cfg.vision, prompt, on_gpu)
    family = resolved.family
    lengths, keep, dropped = _short_enough(builder, train_split["markdown"], cfg.data.max_target_tokens, say)
    if not keep:
        raise TrainError(f"no training samples left in {data_path}:{cfg.data.train_split}")
    model, ledger, checkpointing = _trainable(model, cfg.lora, full, resolved.name, family.LAYOUT,
                                              t.gradient_checkpointing, say)
    feature_cache = None if not t.cache_vision_features else open_cache(
        model, family, processor, vision.as_dict(), data_path, train_split, keep, device_type=accelerator.device.type,
        precision=accelerator.mixed_precision, autocast=accelerator.autocast, sharded=sharded, say=say)
    loss_fn, train_loss_fn = _loss_fns(model, t.loss_chunk_tokens, feature_cache)
    sampler, loader = _loader(train_split, keep, lengths, builder, t)
    trainable, optimizer, scheduler = _optimizer(model, t)

    # --- prepare once ----------------------------------------------------------------------
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
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
    state = _resume(t.resume_from, t.resume_force, ckpt_root, model, optimizer, scheduler, accelerator, identity)
    if main:
        write_text_atomic(output_dir / "config.yaml", dump_yaml(cfg))
    metrics_fh = _open_metrics(output_dir / "metrics.jsonl", state.step) if main else None

    unwrapped = accelerator.unwrap_model(model)
    guard = RepetitionGuard(whitelist=table_tag_ids(processor.tokenizer))  # eval's default decoding
    meta = {"base_model": resolved.name, "base_model_is_local_path": resolved.is_local_path,
            "family": family.MODEL_TYPE, "prompt": prompt, "vision": vision.as_dict(), "lora": to_dict(cfg.lora),
            "dataset": str(data_path)}
    validate_now = functools.partial(validate, model, unwrapped, builder, val_rows, v.batch_size, v.max_new_tokens,
                                     guard, accelerator, loss_fn)
    save_best = functools.partial(_save_weights, unwrapped, output_dir / "best", full, processor, family)
    state = fit(state, accelerator, model, optimizer, scheduler, trainable, loader, sampler, train_loss_fn, t, v,
                validate_now=validate_now, save_best=save_best, meta=meta, ckpt_root=ckpt_root, identity=identity,
                checkpointing=checkpointing, metrics_fh=metrics_fh, report=bool(cfg.report_to), progress=progress)

    # --- save: adapter (or whole model) into a staging dir, then renamed into place ---------
    accelerator.wait_for_everyone()
    # Sharded topologies gather the full weights (a collective: every process calls it).
    gathered = accelerator.get_state_dict(model) if sharded else None
    summary = _summary(state, t, accelerator.num_processes, meta, output_dir, len(keep), dropped, checkpointing,
                       feature_cache, ledger)
    summary["experts_implementation"] = family.experts_implementation(unwrapped)
    summary["topology"] = accelerator.distributed_type.value  # NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
    summary["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated() if on_gpu else None  # this process's
    saved_dir = _finish(accelerator, unwrapped, gathered, summary, output_dir, full, processor,
                        family, meta, state.step, bool(cfg.report_to))
    return TrainResult(output_dir, saved_dir, summary, unwrapped)


def _load_data(data: DataConfig, v: ValidationSettings):
    """(dataset path, training split, validation rows or None, prompt)."""
    from datasets import load_from_disk

    from data_prep.build import is_dataset_dir, read_dataset_info
    from finetune.runtime import choose_prompt

    data_path = Path(data.path)
    if not is_dataset_dir(data_path):
        raise TrainError(f"data.path {data_path}: not a dataset directory (build one with `ocrtune data build`)")
    splits = load_from_disk(str(data_path))
    if data.train_split not in splits:
        raise TrainError(f"data.train_split {data.train_split!r}: {data_path} has splits {', '.join(splits)}")
    val_rows = None
    if v.every_steps:
        if v.split not in splits or len(splits[v.split]) == 0:
            raise TrainError(f"validation.split {v.split!r}: {data_path} has no such non-empty split "
                             f"(splits: {', '.join(f'{k} ({len(x)})' for k, x in splits.items())}); "
                             "set validation.every_steps=0 to train without validation")
        val_rows = splits[v.split].select(range(min(v.max_samples, len(splits[v.split]))))
    prompt = choose_prompt(data.prompt, None, read_dataset_info(data_path))
    return data_path, splits[data.train_split], val_rows, prompt


def _load_model(model_cfg: ModelConfig, vision_cfg: VisionConfig, prompt: str, on_gpu: bool):
    """(resolved name, model, processor, vision settings, sequence builder); the model as loaded."""
    from finetune.models import load_model
    from finetune.models.family import VisionModeError
    from finetune.quantize import check_available, quantize_decoder
    from finetune.runtime import resolve_dtype
    from finetune.sequence import builder_for

    if model_cfg.quantization == "nf4":
        check_available(on_gpu)
    resolved, model, processor = load_model(model_cfg.name, dtype=resolve_dtype(model_cfg.dtype, on_gpu))
    family = resolved.family
    if model_cfg.quantization == "nf4":  # before LoRA wraps the Linears it quantizes
        quantize_decoder(model, family.LAYOUT.decoder_layers, model.dtype)
    try:  # the config's vision section -> processor settings, in the family's one step
        vision = family.vision_settings(processor, vision_cfg.mode, vision_cfg.crop_to_patches, vision_cfg.min_tiles,
                                        vision_cfg.max_tiles)
    except VisionModeError as exc:
        raise TrainError(f"vision.mode: {exc}") from None
    return resolved, model, processor, vision, builder_for(family, processor, model.config, prompt, vision)


def _short_enough(builder, texts, max_target_tokens: int, say):
    """(target tokens of every sample, indices of those within max_target_tokens, how many dropped)."""
    lengths = [builder.count_target_tokens(text) for text in list(texts)]
    keep = [i for i, n in enumerate(lengths) if n <= max_target_tokens]
    dropped = len(lengths) - len(keep)
    if dropped:
        say(f"dropped {dropped} of {len(lengths)} training samples longer than data.max_target_tokens="
            f"{max_target_tokens} (never truncated)")
    return lengths, keep, dropped


def _trainable(model, lora: LoraSettings, full: bool, base_name: str, layout, gradient_checkpointing, say):
    """Every weight (preset full) or LoRA on the frozen model, activation checkpointing on or
    off; returns (model, parameter ledger, whether checkpointing is on)."""
    from finetune.lora import FULL, format_ledger, lora_config, parameter_ledger, resolve_targets
    from finetune.models import BUILTIN_PREFIX

    if full:
        model.requires_grad_(True)
        ledger = parameter_ledger(model, layout)
        say(f"full-parameter training (lora.preset {FULL!r})\n{format_ledger(ledger)}")
    else:
        model.requires_grad_(False)
        targets = resolve_targets(model, lora.preset, layout, lora.vision_lora)
        extra = list(layout.projector_modules) if lora.train_projector else None
        model = get_peft_model(model, lora_config(targets, lora.r, lora.alpha, lora.dropout,
                                                  lora.use_rslora, lora.use_dora, extra))
        model.peft_config["default"].base_model_name_or_path = base_name
        ledger = parameter_ledger(model, layout)
        say(f"LoRA preset {lora.preset!r}, r={lora.r}, alpha={lora.alpha}\n{format_ledger(ledger)}")
    checkpointing = gradient_checkpointing
    if checkpointing is None:  # real checkpoints need it; the builtin tiny models do not
        checkpointing = not base_name.startswith(BUILTIN_PREFIX)
    if checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    return model, ledger, checkpointing


def _loss_fns(model, chunk_tokens: int, feature_cache):
    """(loss for validation, loss for training): summed token losses; training's takes the
    vision features from `feature_cache` (train.cache_vision_features) when there is one."""
    lm_head = model.get_output_embeddings()  # frozen; the chunked loss runs it outside DDP's forward
    loss_fn = lambda m, batch: token_loss_sum(m, batch, lm_head, chunk_tokens)  # noqa: E731
    if feature_cache is None:
        return loss_fn, loss_fn
    return loss_fn, lambda m, batch: loss_fn(m, feature_cache.inputs(batch))


def _loader(train_split, keep: list[int], lengths: list[int], builder, t: TrainSettings):
    """(sampler, DataLoader) over the kept training samples."""
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
    return sampler, loader


def _optimizer(model, t: TrainSettings):
    """(trainable parameters, AdamW over them, linear warmup/decay schedule)."""
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    return trainable, optimizer, scheduler


def _resume(resume_from: str, force: bool, ckpt_root: Path, model, optimizer, scheduler, accelerator,
            identity: dict) -> TrainState:
    """A fresh TrainState, or the one of the checkpoint train.resume_from names (weights,
    optimizer, RNG and schedule restored)."""
    from finetune.checkpoint import CheckpointError, latest_complete, load_checkpoint

    state = TrainState()
    if not resume_from:
        return state
    path = latest_complete(ckpt_root) if resume_from == "latest" else Path(resume_from)
    if path is None:
        accelerator.print(f"train.resume_from=latest: no complete checkpoint in {ckpt_root}; starting fresh")
        return state
    try:
        saved = load_checkpoint(path, model, optimizer, accelerator, identity, force)
    except CheckpointError as exc:
        raise TrainError(str(exc)) from None
    state.step = saved["step"]
    state.best = saved.get("best", state.best)
    for _ in range(state.step):  # the schedule is a pure function of the step
        scheduler.step()
    accelerator.print(f"resumed from {path} at step {state.step}")
    return state


def _open_metrics(path: Path, start_step: int):
    """OUTPUT_DIR/metrics.jsonl, open for writing (the main process's job)."""
    # On resume keep the records up to the checkpoint; a killed run may have logged past it.
    kept_lines = []
    if start_step and path.is_file():
        kept_lines = [x for x in path.read_text().splitlines() if x and json.loads(x)["step"] <= start_step]
    metrics_fh = open(path, "w", encoding="utf-8")
    metrics_fh.write("".join(x + "\n" for x in kept_lines))
    return metrics_fh


def fit(state: TrainState, accelerator, model, optimizer, scheduler, trainable, loader, sampler, loss_fn,
        t: TrainSettings, v: ValidationSettings, *, validate_now, save_best, meta: dict, ckpt_root: Path,
        identity: dict, checkpointing: bool, metrics_fh, report: bool, progress: bool) -> TrainState:
    """Optimizer steps state.step+1 .. t.max_steps (fewer on early stopping; StopRequested after a
    checkpoint on SIGTERM); closes metrics_fh, returns `state`. `validate_now()` runs validation,
    `save_best(meta)` writes the weights to OUTPUT_DIR/best/."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from finetune.checkpoint import latest_complete

    main, say = accelerator.is_main_process, accelerator.print
    checkpoint = functools.partial(_checkpoint, ckpt_root, model, optimizer, accelerator, identity, t.grad_accum,
                                   t.save_total_limit)
    consumed = state.step * t.grad_accum  # micro-batches this process has taken
    batches = _forever(loader, sampler, consumed // len(loader), consumed % len(loader))
    bar = tqdm(total=t.max_steps, initial=state.step, desc="train", disable=not (main and progress))
    model.train()
    state.started = time.perf_counter()
    with StopSignal() as sigterm, bar, metrics_fh or contextlib.nullcontext():
        for step in range(state.step + 1, t.max_steps + 1):
            state.step = step
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
                        loss_sum = loss_fn(model, batch)
                        # accelerate divides by grad_accum and DDP averages over processes: undo both.
                        accelerator.backward(loss_sum * (t.grad_accum * accelerator.num_processes / max(n_tokens, 1)))
                    loss_sum_local += float(loss_sum.detach())
            except torch.OutOfMemoryError:
                raise TrainError(oom_message(str(accelerator.device), t.batch_size, t.grad_accum, checkpointing,
                                             t.loss_chunk_tokens)) from None
            # The window's last micro-batch synchronised the gradients; check them before any
            # update: a non-finite loss must never reach the weights, a checkpoint or best/.
            total_loss = float(accelerator.gather(torch.tensor([loss_sum_local], device=accelerator.device)).sum())
            state.last_loss = total_loss / max(n_tokens, 1)
            norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            grad_norm = None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
            if not math.isfinite(state.last_loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
                raise TrainError(nonfinite_message(step, state.last_loss, grad_norm, sample_ids,
                                                   latest_complete(ckpt_root)))
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            state.tokens_seen += n_tokens
            elapsed = time.perf_counter() - state.started
            record = {"step": step, "loss": state.last_loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                      "target_tokens": n_tokens, "tokens_per_s": state.tokens_seen / elapsed, "elapsed_s": elapsed,
                      "sample_ids": sample_ids}
            if v.every_steps and (step % v.every_steps == 0 or step == t.max_steps):
                val = validate_now()
                record.update(val_loss=val.loss, val_cer=val.cer)
                if state.best["cer"] is None or val.cer < state.best["cer"]:
                    state.best = {"cer": val.cer, "step": step, "stale": 0}
                    if main:
                        save_best({**meta, "steps": step, "validation": {"split": v.split, "samples": val.samples,
                                                                         "cer": val.cer, "loss": val.loss}})
                else:
                    state.best["stale"] += 1
                say(f"step {step}: validation loss {val.loss:.4f}, CER {val.cer:.2%} "
                    f"(best {state.best['cer']:.2%} at step {state.best['step']})")
            if main and (step % t.log_every == 0 or step == t.max_steps or "val_cer" in record):
                metrics_fh.write(json.dumps(record) + "\n")
                metrics_fh.flush()
            if report:
                accelerator.log({k: x for k, x in record.items() if k not in ("step", "sample_ids")}, step=step)
            saved_now = bool(t.save_steps and step % t.save_steps == 0 and step < t.max_steps)
            if saved_now:
                checkpoint(step, state.best)
            bar.set_postfix(loss=f"{state.last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            # Every process must agree to stop at the same step (a signal reaches them apart).
            term = sigterm.received
            if accelerator.num_processes > 1:
                term = bool(accelerator.gather(torch.tensor([int(term)], device=accelerator.device)).max())
            if term and step < t.max_steps:
                path = ckpt_root / f"step-{step:06d}" if saved_now else checkpoint(step, state.best)
                raise StopRequested(f"SIGTERM at step {step}: checkpoint {path} written; continue with "
                                    "train.resume_from=latest")
            if v.early_stopping_patience and state.best["stale"] >= v.early_stopping_patience:
                state.stopped = "early_stopping"
                say(f"early stopping at step {step}: no better validation CER in {state.best['stale']} validations")
                break
    return state


def _checkpoint(root: Path, model, optimizer, accelerator, identity: dict, grad_accum: int, keep: int, step: int,
                best: dict) -> Path:
    """OUTPUT_DIR/checkpoints/step-NNNNNN (every process calls this)."""
    from finetune.checkpoint import CheckpointError, save_checkpoint

    try:
        return save_checkpoint(root, step, model, optimizer,
                               {"step": step, "micro_batches": step * grad_accum, "best": best,
                                "processes": accelerator.num_processes, "run": identity},
                               accelerator, keep)
    except CheckpointError as exc:
        raise TrainError(str(exc)) from None


def _summary(state: TrainState, t: TrainSettings, processes: int, meta: dict, output_dir: Path, train_samples: int,
             dropped: int, checkpointing: bool, feature_cache, ledger) -> dict:
    """train_summary.json."""
    return {
        "base_model": meta["base_model"],
        "family": meta["family"],
        "steps": state.step,
        "max_steps": t.max_steps,
        "stopped": state.stopped,
        "final_loss": state.last_loss,
        "best_validation": {"cer": state.best["cer"], "step": state.best["step"], "dir": str(output_dir / "best")}
        if state.best["cer"] is not None else None,
        "train_samples": train_samples,
        "dropped_too_long": dropped,
        "processes": processes,
        "effective_batch": t.batch_size * t.grad_accum * processes,
        "gradient_checkpointing": checkpointing,
        "loss_chunk_tokens": t.loss_chunk_tokens,
        "vision_feature_cache": feature_cache.summary() if feature_cache is not None else None,
        "wall_s": time.perf_counter() - state.started,
        "ledger": ledger,
        "versions": library_versions(),
    }


def _finish(accelerator, unwrapped, gathered, summary: dict, output_dir: Path, full: bool, processor, family,
            meta: dict, steps: int, report: bool) -> Path:
    """The final adapter (or model) and train_summary.json (main process), the trackers closed;
    returns the weights' folder."""
    from data_prep.atomic import write_text_atomic

    saved_dir = output_dir / ("model" if full else "adapter")
    if accelerator.is_main_process:
        _save_weights(unwrapped, saved_dir, full, processor, family, {**meta, "steps": steps}, gathered)
        write_text_atomic(output_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        accelerator.print(f"{'model' if full else 'adapter'} written to {saved_dir}")
    if report:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return saved_dir


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
            family.save_full(unwrapped, staging, state_dict)
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
