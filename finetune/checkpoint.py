"""Training checkpoints that are either complete or ignored.

    OUTPUT_DIR/checkpoints/step-000040/
        trainable.safetensors   every trainable tensor (the LoRA weights; all weights for preset full)
        optimizer.pt            optimizer state: tensors and numbers only, read with weights_only=True
        rng-rank{R}.pt          python, numpy, torch and CUDA RNG states of process R
        trainer_state.json      step, micro-batches consumed, and the run's identity
        COMPLETE                written last; a folder without it is ignored and cleaned up

Under FSDP and DeepSpeed the weights and optimizer state are sharded over the processes, and
accelerate's own save_state/load_state write and read them: with FSDP2 (fsdp_state_dict_type
SHARDED_STATE_DICT) that is `pytorch_model_fsdp_0/` and `optimizer_0/` (torch.distributed.checkpoint,
one file per process each) and `random_states_{R}.pkl` (RNG of process R), in place of the
first three files above. trainer_state.json, the marker and the rotation are the same. Such a
checkpoint resumes with the number of processes that wrote it.

Older checkpoints are removed only after a newer one is complete, so a crash (SIGKILL,
power, disk full) at any moment leaves at least the previous complete checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from finetune.errors import OcrtuneError

MARKER = "COMPLETE"


class CheckpointError(OcrtuneError, RuntimeError):
    pass


def step_dirs(root: Path) -> list[Path]:
    return sorted((p for p in Path(root).glob("step-*") if p.is_dir()), key=lambda p: p.name)


def latest_complete(root: Path) -> Path | None:
    done = [p for p in step_dirs(root) if (p / MARKER).is_file()]
    return done[-1] if done else None


def _synced(path: Path, write) -> None:
    """Open `path`, let `write(fh)` fill it, fsync. Through a Python file object so a full
    disk surfaces as OSError (ENOSPC), not as an opaque error from a C++ writer."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _torch_bytes(obj) -> bytes:
    """torch.save into memory. Handing torch.save our file object directly failed once on a
    GPU machine ("unexpected pos ... vs ..." from PyTorch's zip writer, optimizer state on
    CUDA; cause not established); in memory, PyTorch's writer and our fsync'd file never
    share a file position."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _fsync_write(path: Path, text: str) -> None:
    _synced(path, lambda fh: fh.write(text.encode("utf-8")))


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`: accelerate's save_state writes without it, and the
    marker must not reach the disk before the files it vouches for."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model, optimizer, state: dict, accelerator, keep: int) -> Path:
    """Write step `step` (all processes call this); rotate to the newest `keep` complete ones.

    If any process fails to write (disk full, quota, permissions), every process learns it,
    the partial folder is removed, older checkpoints stay as they were, and CheckpointError
    says which checkpoint is still complete."""
    from accelerate.utils import gather_object
    from safetensors.torch import save as safetensors_bytes

    from finetune.distributed import sharded

    root = Path(root)
    target = root / f"step-{step:06d}"
    state = {**state, "sharded": sharded(accelerator)}
    error = ""
    if accelerator.is_main_process:
        try:
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of a crashed run
            target.mkdir(parents=True)
        except OSError as exc:
            error = f"{target}: {exc}"
    # Every process learns whether the folder exists: a sharded save is a collective that all
    # of them must enter, or none.
    error = next((e for e in gather_object([error]) if e), "")
    if not error and state["sharded"]:
        try:
            accelerator.save_state(str(target))  # every process: its shards of weights and optimizer, its RNG
            _fsync_tree(target)
            if accelerator.is_main_process:
                _fsync_write(target / "trainer_state.json", json.dumps(state, indent=2) + "\n")
        except (OSError, RuntimeError) as exc:
            error = f"process {accelerator.process_index}: {exc}"
    elif not error:
        try:
            _synced(target / f"rng-rank{accelerator.process_index}.pt", lambda fh: fh.write(_torch_bytes(_rng_state())))
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                tensors = {n: p.detach().to("cpu").contiguous() for n, p in unwrapped.named_parameters()
                           if p.requires_grad}
                _synced(target / "trainable.safetensors", lambda fh: fh.write(safetensors_bytes(tensors)))
                _synced(target / "optimizer.pt", lambda fh: fh.write(_torch_bytes(optimizer.state_dict())))
                _fsync_write(target / "trainer_state.json", json.dumps(state, indent=2) + "\n")
        except (OSError, RuntimeError) as exc:
            error = f"process {accelerator.process_index}: {exc}"
    # Every rank's files are on disk, or someone failed (each error once: all ranks may report the same).
    errors = list(dict.fromkeys(e for e in gather_object([error]) if e))
    if errors:
        if accelerator.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
        previous = latest_complete(root)
        kept = f"the previous complete checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {target} ({'; '.join(errors)}); {kept}. Free space on "
                              f"{root} or lower train.save_total_limit, then continue with train.resume_from=latest")
    if accelerator.is_main_process:
        _fsync_write(target / MARKER, f"step {step}\n")
        complete = [p for p in step_dirs(root) if (p / MARKER).is_file()]
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in step_dirs(root):
            if not (stale / MARKER).is_file():
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _layout(processes: int, is_sharded: bool) -> str:
    return f"{processes} process{'es' if processes > 1 else ''}{' (sharded)' if is_sharded else ''}"


def _same_layout(path: Path, state: dict, accelerator) -> None:
    """A sharded checkpoint resumes only as it was written: each process restores its own shard
    of weights and optimizer state, its own RNG and its own share of the data order. Refused
    even with train.resume_force: the restored run could not be the one that was saved."""
    from finetune.distributed import sharded

    written, now = state["processes"], accelerator.num_processes
    saved_sharded, now_sharded = state.get("sharded", False), sharded(accelerator)
    if written != now or saved_sharded != now_sharded:
        raise CheckpointError(
            f"train.resume_from {path}: written by {_layout(written, saved_sharded)}, this run has "
            f"{_layout(now, now_sharded)}. A sharded checkpoint (FSDP, DeepSpeed) resumes only with the topology "
            f"and number of processes that wrote it: launch with the same accelerate config and "
            f"--num_processes {written}")
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():  # accelerate's load_state would go on without it, silently
        raise CheckpointError(f"{path}: no RNG state for process {accelerator.process_index} ({rng_file.name})")


def load_checkpoint(path: Path, model, optimizer, accelerator, identity: dict, force: bool) -> dict:
    """Restore weights, optimizer and this process's RNG; returns trainer_state.json."""
    from safetensors.torch import load_file

    from finetune.distributed import sharded

    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"train.resume_from {path}: not a complete checkpoint (no {MARKER} marker)")
    state = json.loads((path / "trainer_state.json").read_text())
    written, now = state["processes"], accelerator.num_processes
    if state.get("sharded", False) or sharded(accelerator):
        _same_layout(path, state, accelerator)
    differing = sorted(k for k in set(identity) | set(state["run"]) if identity.get(k) != state["run"].get(k))
    if differing and not force:
        sizes = f"; it was written by {written} processes, this run has {now}" if written != now else ""
        raise CheckpointError(
            f"train.resume_from {path}: the checkpoint belongs to another run ({', '.join(differing)} differ{sizes}); "
            "set train.resume_force=true to resume anyway")
    if state.get("sharded", False):
        accelerator.load_state(str(path))  # weights, optimizer and this process's RNG, each from its shard
        return state
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{path}: no RNG state for process {accelerator.process_index} "
                              f"(written by {state['processes']} processes)")
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{path}: trainable tensors do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
