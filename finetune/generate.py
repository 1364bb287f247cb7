"""Batched greedy generation through the shared sequence builder.

Pages are sorted by expected answer length so a batch holds pages that finish
together, prompts are left-padded, and results come back in input order.

`folded_lora` runs a PEFT model without its LoRA layers while it decodes: the adapter merged
into the weights (or left out, for the base), the wrappers swapped for the plain modules.
"""

from __future__ import annotations

from contextlib import contextmanager
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


def _plain_module(wrapper, adapted: bool, tuner_layer, save_wrapper):
    """The module a PEFT wrapper runs when merged (`adapted`) or disabled; None to keep the wrapper."""
    if isinstance(wrapper, tuner_layer):
        return wrapper.get_base_layer()  # merged or disabled, a LoRA layer calls exactly this
    if isinstance(wrapper, save_wrapper):
        active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
        # As its forward: the trained copy when an adapter of it is active, else the original.
        return wrapper.modules_to_save[active[0]] if adapted and active else wrapper.original_module
    return None  # another PEFT wrapper (trainable tokens, ...): it stays and runs as it does


@contextmanager
def folded_lora(model, adapted: bool = True, exact_restore: bool = True):
    """Inside the block `model` (a PEFT model; any other model is left as it is) decodes
    without its LoRA layers: each PEFT wrapper is swapped for the plain module under it, with
    the active adapter merged into that module's weights (`adapted`), or not merged (the base
    model, what `disable_adapter()` gives). A decode step then runs no LoRA matmuls (nor, for
    routed experts adapted through `target_parameters`, PEFT rebuilding the delta of the whole
    expert stack on every call) and no wrapper code. Greedy outputs equal the wrapped model's
    (tests/test_merged_generation.py). On exit the wrappers are back and the adapter unmerged.

    `exact_restore`: merging then unmerging rounds twice (W + BA - BA != W in floating point,
    in bf16 and in fp32 alike), and training after validation would continue from other
    weights: its losses part from those of a run without validation. With it, every weight
    merging touches is copied first (into CPU memory, so the accelerator's peak does not grow
    by the adapted layers' size) and copied back bit for bit after unmerging. Without it (eval
    and predict, which decode nothing with the adapter afterwards) no copy is kept and the
    weights come back within that rounding.

    Not for weights sharded over processes (FSDP, DeepSpeed ZeRO-3): a merge would see one shard.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(model, PeftModel):
        yield model
        return
    modules = dict(model.named_modules())
    layers = [m for m in modules.values() if isinstance(m, BaseTunerLayer)]
    if any(layer.merged for layer in layers):
        # Merged by someone else: the base could not be had by swapping, nor the merge undone here.
        raise ValueError("folded_lora: the model already has merged LoRA layers")
    plain = {n: _plain_module(m, adapted, BaseTunerLayer, ModulesToSaveWrapper) for n, m in modules.items()}
    plain = {n: m for n, m in plain.items() if m is not None}
    # Only outermost wrappers are swapped: nested ones (two expert parameters of one module wrap
    # each other) are merged as layers of their own but leave the tree with their parent.
    outer = [n for n in plain if not any(".".join(n.split(".")[:k]) in plain for k in range(1, n.count(".") + 1))]
    merged, saved, swapped = [], {}, []
    try:
        with torch.no_grad():  # the deltas are built from trainable LoRA weights: no graph
            for layer in layers if adapted else ():
                if exact_restore:
                    for p in layer.get_base_layer().parameters(recurse=False):
                        saved.setdefault(id(p), (p, p.detach().to("cpu", copy=True)))
                layer.merge()
                if layer.merged:  # False where no active adapter lives on this layer
                    merged.append(layer)
            for name in outer:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                swapped.append((parent, attr, modules[name]))
                setattr(parent, attr, plain[name])
        yield model
    finally:
        with torch.no_grad():
            for parent, attr, wrapper in reversed(swapped):
                setattr(parent, attr, wrapper)
            for layer in reversed(merged):
                layer.unmerge()  # PEFT's own bookkeeping: merged flags, DoRA's cached weight norms
            for p, copy in saved.values():
                p.data.copy_(copy)  # into whatever storage unmerge left (DoRA's gives the weight new storage)
