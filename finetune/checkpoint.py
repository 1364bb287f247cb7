"""Training checkpoints that are either complete or ignored.

    OUTPUT_DIR/checkpoints/step-000040/
        trainable.safetensors   every trainable tensor (the LoRA weights; all weights for preset full)
        optimizer.pt            optimizer state: tensors and numbers only, read with weights_only=True
        rng-rank{R}.pt          python, numpy, torch and CUDA RNG states of process R
        trainer_state.json      step, micro-batches consumed, and the run's identity
        COMPLETE                written last; a folder without it is ignored and cleaned up

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

    root = Path(root)
    target = root / f"step-{step:06d}"
    error = ""
    if accelerator.is_main_process:
        try:
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of a crashed run
            target.mkdir(parents=True)
        except OSError as exc:
            error = f"{target}: {exc}"
    accelerator.wait_for_everyone()
    if not error:
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
    errors = [e for e in gather_object([error]) if e]  # every rank's file is on disk, or someone failed
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


def load_checkpoint(path: Path, model, optimizer, accelerator, identity: dict, force: bool) -> dict:
    """Restore weights, optimizer and this process's RNG; returns trainer_state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"train.resume_from {path}: not a complete checkpoint (no {MARKER} marker)")
    state = json.loads((path / "trainer_state.json").read_text())
    differing = sorted(k for k in set(identity) | set(state["run"]) if identity.get(k) != state["run"].get(k))
    if differing and not force:
        raise CheckpointError(
            f"train.resume_from {path}: the checkpoint belongs to another run ({', '.join(differing)} differ); "
            "set train.resume_force=true to resume anyway")
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
