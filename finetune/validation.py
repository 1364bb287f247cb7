"""Validation during training: teacher-forced loss and greedy-decoded CER on a fixed subset.

The CER comes from the same pieces as `ocrtune eval` (the shared sequence builder,
`generate_pages` with the repetition guard, corpus CER at the headline normalisation), so
the number that picks the best checkpoint is the number the final report shows. Pages are
sharded over processes and gathered, like eval.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Validation:
    loss: float  # summed answer-token cross-entropy / answer tokens, over the subset
    cer: float  # corpus CER at the headline level (L1)
    samples: int


@torch.no_grad()
def validate(model, unwrapped, builder, rows, batch_size: int, max_new_tokens: int, guard, accelerator,
             loss_fn) -> Validation:
    """`model`: the prepared (maybe DDP) model for the loss; `unwrapped`: the module that
    generates. `rows`: a datasets split (id, image, markdown). `loss_fn(model, batch)` is
    train's token_loss_sum with its chunking bound."""
    from accelerate.utils import DistributedType, gather_object

    from finetune.generate import folded_lora, generate_pages
    from finetune.metrics import HEADLINE, corpus_cer, edit_counts
    from finetune.sequence import IGNORE_INDEX

    was_training = unwrapped.training
    model.eval()
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    loss_sum, tokens = 0.0, 0
    pages, references, examples = [], [], []
    for k in mine:
        row = rows[k]
        pages.append((row["id"], row["image"]))
        references.append(row["markdown"])
        examples.append(builder.build(row["id"], row["image"], row["markdown"]))
    device = accelerator.device
    for start in range(0, len(examples), batch_size):
        batch = builder.collate(examples[start : start + batch_size], padding_side="right")
        batch.pop("ids")
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum += float(loss_fn(model, batch))
        tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    gens = []
    if pages:
        # The adapter merged for decoding (no LoRA matmuls per step), and every weight restored
        # bit for bit after, so training continues exactly as it would have. Under FSDP and
        # DeepSpeed the weights may be sharded (a merge would see one shard): those decode
        # through the wrappers, as before.
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        with contextlib.nullcontext() if sharded else folded_lora(unwrapped, adapted=True, exact_restore=True):
            gens = generate_pages(unwrapped, builder, pages, batch_size, max_new_tokens,
                                  [builder.count_target_tokens(r) for r in references], guard=guard)
    pairs = gather_object([(references[i], gens[i].text) for i in range(len(pages))])
    totals = gather_object([(loss_sum, tokens)])
    if was_training:
        model.train()
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    edits, lengths = edit_counts(refs, hyps, HEADLINE)
    loss_total, token_total = sum(t[0] for t in totals), sum(t[1] for t in totals)
    return Validation(loss_total / max(token_total, 1), corpus_cer(edits, lengths), len(refs))
