"""What training does when the world goes wrong: SIGTERM, non-finite loss, out of memory.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM before they kill; the run
finishes the optimizer step it is in, writes a checkpoint and exits with 143 (128 + 15),
so `train.resume_from=latest` continues exactly where it stopped.
"""

from __future__ import annotations

import signal
import threading

SIGTERM_EXIT = 128 + signal.SIGTERM


class StopRequested(RuntimeError):
    """SIGTERM arrived; a checkpoint was written (its path is in the message)."""


class StopSignal:
    """Turns SIGTERM into a flag checked once per optimizer step (restored on exit).

    Only the main thread may install handlers; elsewhere (a server thread calling train)
    the flag simply never rises and the default SIGTERM behaviour stays."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _handle(self, signum, frame):
        self.received = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def nonfinite_message(step: int, loss: float, grad_norm: float, sample_ids: list[str], last_checkpoint) -> str:
    where = f"the newest checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    shown = ", ".join(sample_ids[:8]) + (" ..." if len(sample_ids) > 8 else "")
    return (f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; stopped before the optimizer "
            f"applied it, nothing of this step was saved ({where}). Samples in this step: {shown}. Usual causes: "
            "train.lr too high, fp16 overflow (train.mixed_precision=bf16 or no), or a broken sample or base weight.")


def oom_message(device: str, batch_size: int, grad_accum: int, checkpointing: bool, chunk_tokens: int) -> str:
    knobs = [f"train.batch_size={max(batch_size // 2, 1)} with train.grad_accum={grad_accum * 2} "
             "(same effective batch, half the activations)"]
    if not checkpointing:
        knobs.append("train.gradient_checkpointing=true (activations recomputed in backward)")
    if chunk_tokens <= 0 or chunk_tokens > 512:
        knobs.append("train.loss_chunk_tokens=512 (smaller vocabulary-sized logit blocks)")
    knobs.append("vision.max_tiles lower or vision.crop_to_patches=false (fewer image tokens)")
    knobs.append("data.max_target_tokens lower (drops the longest pages)")
    return f"out of memory on {device}. Turn one of these knobs: " + "; ".join(knobs)
