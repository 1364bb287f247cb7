"""Batched greedy generation through the shared sequence builder.

Pages are sorted by expected answer length so a batch holds pages that finish
together, prompts are left-padded, and results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    new_tokens: int
    hit_max_tokens: bool  # no EOS before the cap: a truncated or looping output
    token_ids: tuple[int, ...] = ()  # the generated ids, EOS and padding removed
    prompt_tokens: int = 0  # ids before the answer (BOS, prompt, image placeholders), padding excluded


@torch.no_grad()
def generate_pages(model, builder, pages, batch_size: int, max_new_tokens: int, expected_lengths=None,
                   progress=None, guard=None, on_batch=None) -> list[Generation]:
    """`pages`: list of (id, PIL image). Returns one Generation per page, in order.
    `guard`: a finetune.decoding.RepetitionGuard, or None for plain greedy decoding.
    `on_batch`: called with [(index, Generation), ...] as each batch finishes (eval's journal)."""
    from transformers import LogitsProcessorList

    from finetune.decoding import NoRepeatNGramWindow

    order = list(range(len(pages)))
    if expected_lengths is not None:
        order.sort(key=lambda i: -expected_lengths[i])
    results: list[Generation | None] = [None] * len(pages)
    device = next(model.parameters()).device
    tokenizer = builder.tokenizer
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        examples = [builder.build(pages[i][0], pages[i][1]) for i in chunk]
        batch = builder.collate(examples, padding_side="left")
        batch.pop("ids")
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "pixel_values" in batch:
            dtype = next(model.parameters()).dtype
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            if "pixel_values_local" in batch:
                batch["pixel_values_local"] = batch["pixel_values_local"].to(dtype)
        processors = LogitsProcessorList()
        if guard is not None and guard.active:
            processors.append(NoRepeatNGramWindow(guard, batch["input_ids"].shape[1]))
        out = model.generate(
            **batch,
            logits_processor=processors,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=builder.eos_id,
            pad_token_id=builder.pad_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(chunk):
            ids = new[row].tolist()
            if builder.eos_id in ids:
                ids = ids[: ids.index(builder.eos_id)]
                hit = False
            else:  # no EOS: the row ran to the cap, so nothing after it is padding (a generated
                hit = True  # pad id is the model's own output and is kept, as vLLM keeps it)
            results[i] = Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids), hit, tuple(ids),
                                    int(batch["attention_mask"][row].sum()))
        if on_batch is not None:
            on_batch([(i, results[i]) for i in chunk])
        if progress is not None:
            progress.update(len(chunk))
    return results


def stream_page(model, builder, page, max_new_tokens: int, guard=None):
    """Greedy generation of one page, yielding text pieces as tokens arrive (for SSE), then
    the finished Generation as the last item. Same builder, decoding and guard as
    `generate_pages`, so the concatenated text equals its output for that page."""
    import threading

    from transformers import LogitsProcessorList, TextIteratorStreamer

    from finetune.decoding import NoRepeatNGramWindow

    batch = builder.collate([builder.build(page[0], page[1])], padding_side="left")
    batch.pop("ids")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    for key in ("pixel_values", "pixel_values_local"):
        if key in batch:
            batch[key] = batch[key].to(next(model.parameters()).dtype)
    processors = LogitsProcessorList()
    if guard is not None and guard.active:
        processors.append(NoRepeatNGramWindow(guard, batch["input_ids"].shape[1]))
    streamer = TextIteratorStreamer(builder.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        with torch.no_grad():
            result["out"] = model.generate(**batch, logits_processor=processors, max_new_tokens=max_new_tokens,
                                           do_sample=False, num_beams=1, eos_token_id=builder.eos_id,
                                           pad_token_id=builder.pad_id, streamer=streamer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for piece in streamer:
        if piece:
            yield piece
    thread.join()
    ids = result["out"][0, batch["input_ids"].shape[1]:].tolist()
    hit = builder.eos_id not in ids
    ids = ids[: ids.index(builder.eos_id)] if not hit else ids  # one row: no padding to remove
    yield Generation(builder.tokenizer.decode(ids, skip_special_tokens=True), len(ids), hit, tuple(ids),
                     int(batch["attention_mask"][0].sum()))
