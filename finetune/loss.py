"""The training loss: summed next-token cross-entropy over answer tokens.

Two ways to the same number (tests/test_loss.py checks loss and gradients agree):

- plain (`chunk_tokens=0`): logits for every position from the first answer token on
  (`logits_to_keep`), so the image placeholders never get vocabulary-sized rows. The
  answer part still costs batch x answer length x vocabulary floats: 2 x 2,048 x 129,280
  in fp32 is 2.1 GB, and autograd keeps it for the backward pass.
- chunked (`chunk_tokens=N`): the model returns its final (normed) hidden states and the
  LM head runs here on N labelled positions at a time, each chunk under activation
  checkpointing, so at most one chunk of logits exists at once in forward and backward.
  Padding and prompt positions are dropped before the head, not after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finetune.sequence import IGNORE_INDEX


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss_sum(model, batch: dict, lm_head: torch.nn.Module | None = None, chunk_tokens: int = 0) -> torch.Tensor:
    """Sum of next-token cross-entropy over the positions whose label is not IGNORE_INDEX.

    `model` may be wrapped (DDP, PEFT); `lm_head` is the unwrapped model's output embedding,
    needed only when `chunk_tokens > 0` (frozen, so calling it outside DDP's forward is safe).
    """
    labels = batch["labels"]
    has_label = (labels != IGNORE_INDEX).any(dim=0)
    start = int(has_label.nonzero()[0]) if has_label.any() else labels.shape[1] - 1
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    targets = labels[:, start:]
    if chunk_tokens <= 0:
        keep = torch.arange(start - 1, labels.shape[1] - 1, device=labels.device)
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="sum")
    if lm_head is None:
        raise ValueError("chunked loss needs the model's lm_head")
    # logits_to_keep=1: the model's own head runs on one position only; the rest is ours.
    out = model(**inputs, logits_to_keep=1, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, start - 1 : labels.shape[1] - 1]  # position t predicts label t+1
    mask = targets != IGNORE_INDEX
    hidden, targets = hidden[mask], targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_ce, lm_head, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens],
                                   use_reentrant=False)
    return total
