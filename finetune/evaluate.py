"""Evaluate the base model and base + adapter on the same pages with the same decoding.

    ocrtune eval --model builtin:tiny-random-deepseek-ocr-2 --adapter runs/x/adapter \
        --data runs/data --split test --output runs/x/eval

Writes OUTPUT/report.json, report.md, report.html (pages with differences marked, worst
regressions and best gains first), predictions.jsonl, cer_histogram.png and, with an adapter,
cer_per_sample.png (before vs after). While it runs,
every finished batch is appended to OUTPUT/eval_progress.jsonl (flushed to disk); run the
same command again after a crash or kill and it continues from there, refusing if any
setting differs (`--restart` starts over). The journal is removed once the report is written.

    accelerate launch --num_processes 8 -m finetune.cli eval ...   (GPUs: pages sharded, gathered)
    torchrun --nproc_per_node 2 -m finetune.cli eval ...            (the same on CPU processes)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from finetune.decoding import NO_REPEAT_NGRAM, NO_REPEAT_WINDOW
from finetune.errors import OcrtuneError

JOURNAL = "eval_progress.jsonl"


class EvalError(OcrtuneError, RuntimeError):
    pass


def _journals(output: Path) -> list[Path]:
    return sorted(output.glob("eval_progress*.jsonl"))


class _Journal:
    """Append-only record of finished pages: a kill loses at most the batch in flight.

    One file per process (`eval_progress.jsonl`, or `eval_progress.rankN.jsonl` under
    `accelerate launch`); every process reads all of them, so a resume may use another
    number of processes."""

    def __init__(self, path: Path, state: dict):
        self.path = path
        self.done: dict[tuple[str, str], dict] = {}
        for file in _journals(path.parent):
            lines = file.read_text(encoding="utf-8").splitlines()
            saved = json.loads(lines[0]).get("state") if lines else None
            if saved != state:
                differing = sorted(k for k in set(state) | set(saved or {}) if (saved or {}).get(k) != state.get(k))
                raise EvalError(f"{file}: an unfinished eval with other settings ({', '.join(differing)} differ); "
                                "pass --restart to discard it, or use another --output")
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the process died
                self.done[(row["system"], row["id"])] = row
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"state": state}) + "\n", encoding="utf-8")

    def append(self, system: str, ids: list[str], finished) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            for i, g in finished:
                fh.write(json.dumps({"system": system, "id": ids[i], "text": g.text, "new_tokens": g.new_tokens,
                                     "hit_max_tokens": g.hit_max_tokens}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class _Subset:
    def __init__(self, pages, indices):
        self.pages, self.indices = pages, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.pages[self.indices[k]]


class _LazyPages:
    """(id, image) by index, decoded only when a batch needs it: memory stays flat."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return row["id"], row["image"]


def evaluate(
    model_name: str,
    data: str | Path,
    output: str | Path,
    adapter: str | Path | None = None,
    split: str = "test",
    batch_size: int = 8,
    max_new_tokens: int = 512,
    prompt: str | None = None,
    limit: int | None = None,
    dtype: str = "auto",
    bootstrap_resamples: int = 10_000,
    progress: bool = True,
    no_repeat_ngram: int = NO_REPEAT_NGRAM,
    no_repeat_window: int = NO_REPEAT_WINDOW,
    restart: bool = False,
    endpoints: list[tuple[str, str]] = (),
    endpoint_key_env: str = "OPENAI_API_KEY",
    endpoint_concurrency: int = 4,
    mode: str | None = None,
    engine: str = "transformers",
) -> dict:
    """`endpoints`: (base URL, model name) pairs of OpenAI-compatible servers evaluated as
    systems `endpoint:NAME` on the same pages with the same prompt and max tokens."""
    from dataclasses import astuple

    from accelerate import PartialState
    from accelerate.utils import gather_object
    from datasets import load_from_disk
    from tqdm.auto import tqdm

    from data_prep.build import is_dataset_dir, read_dataset_info
    from finetune.endpoint import run_endpoint
    from finetune.generate import Generation, folded_lora, generate_pages
    from finetune.html_report import write_html
    from finetune.plots import plot_cer_histogram, plot_sample_cer
    from finetune.report import write_predictions, write_report
    from finetune.score import score_report
    from finetune.runtime import load_for_inference
    from finetune.sequence import builder_for

    data, output = Path(data), Path(output)
    if not is_dataset_dir(data):
        raise EvalError(f"--data {data}: not a dataset directory (build one with `ocrtune data build`)")
    splits = load_from_disk(str(data))
    if split not in splits:
        raise EvalError(f"--split {split!r}: {data} has splits {', '.join(splits)}")
    rows = splits[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise EvalError(f"{data}:{split} is empty")
    # Under `accelerate launch` every process takes a share of the pages; the main one gathers
    # and writes. Alone, this is one process on cuda:0 or the CPU.
    dist = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: several CPU processes form a gloo group
    progress = progress and dist.is_main_process
    vllm = None
    if engine == "vllm":
        from finetune.runtime import load_for_engine
        from finetune.vllm_engine import VllmEngine

        if dist.num_processes > 1:
            raise EvalError("--engine vllm runs as one process (vLLM spreads a model over GPUs itself); "
                            "launch it without accelerate/torchrun")
        inf, resolved = load_for_engine(model_name, adapter, prompt, no_repeat_ngram, no_repeat_window,
                                        dataset_info=read_dataset_info(data))
    else:
        inf = load_for_inference(model_name, adapter, prompt, dtype, no_repeat_ngram, no_repeat_window,
                                 device=dist.device, dataset_info=read_dataset_info(data))
    model, prompt, vision, guard = inf.model, inf.prompt, inf.vision, inf.guard
    if mode is not None:  # a resolution mode overrides the adapter's vision settings
        vision = inf.family.vision_settings(inf.processor, mode)  # VisionModeError names the modes
    builder = builder_for(inf.family, inf.processor, model.config if model is not None else None, prompt, vision)
    if engine == "vllm":
        vllm = VllmEngine(resolved.path, adapter, guard, inf.family, vision.as_dict(), max_new_tokens, dtype)
    systems = ["base"] + (["adapted"] if adapter is not None else [])
    endpoint_of = {f"endpoint:{name}": (url, name) for url, name in endpoints}
    systems += list(endpoint_of)

    ids = list(rows["id"])
    references = list(rows["markdown"])
    pages = _LazyPages(rows)
    expected = [builder.count_target_tokens(r) for r in references]
    state = {"model": inf.name, "adapter": str(adapter) if adapter is not None else None, "data": str(data),
             "split": split, "pages": hashlib.sha256("\n".join(ids).encode()).hexdigest(), "prompt": prompt, "max_new_tokens": max_new_tokens,
             "repetition_guard": guard.describe(), "vision": vision.as_dict(), "endpoints": sorted(endpoint_of),
             **({"engine": engine} if engine != "transformers" else {})}
    if restart and dist.is_main_process:
        for file in _journals(output):
            file.unlink()
    dist.wait_for_everyone()
    own = output / (JOURNAL if dist.num_processes == 1 else f"eval_progress.rank{dist.process_index}.jsonl")
    journal = _Journal(own, state)
    dist.wait_for_everyone()  # every process has read the journals before any appends
    reused = sum(1 for s in systems for i in ids if (s, i) in journal.done)
    predictions, generations = {}, {}
    for system in systems:
        gens: list = [None] * len(ids)
        for k, rid in enumerate(ids):
            row = journal.done.get((system, rid))
            if row is not None:
                gens[k] = Generation(row["text"], row["new_tokens"], row["hit_max_tokens"])
        remaining = [k for k in range(len(ids)) if gens[k] is None]
        todo = remaining[dist.process_index::dist.num_processes]  # this process's share
        bar = tqdm(total=len(pages), initial=len(pages) - len(remaining), desc=f"eval {system}", unit="page",
                   disable=not progress)
        record = lambda finished, system=system, todo=todo: journal.append(  # noqa: E731
            system, ids, [(todo[j], g) for j, g in finished])
        args = (model, builder, _Subset(pages, todo), batch_size, max_new_tokens, [expected[k] for k in todo], bar,
                guard, record)
        if todo and system in endpoint_of:
            url, name = endpoint_of[system]
            answers = run_endpoint(url, name, prompt, _Subset(pages, todo), max_new_tokens, endpoint_key_env,
                                   endpoint_concurrency, on_batch=lambda done, record=record: record(
                                       [(j, Generation(*a)) for j, a in done]), progress=bar)
            new = [Generation(*a) for a in answers]
        elif todo and vllm is not None:
            new = vllm.generate(_Subset(pages, todo), builder, max_new_tokens, adapted=system == "adapted")
            record(list(enumerate(new)))
            bar.update(len(new))
        elif todo:
            # Base (adapter left out) or adapted (merged), decoded without LoRA layers. Nothing
            # decodes with the adapter after its system, so no exact copy of the weights is kept.
            with folded_lora(model, adapted=system == "adapted", exact_restore=False):
                new = generate_pages(*args)
        else:
            new = []
        bar.close()
        finished = list(zip(todo, new))
        if dist.num_processes > 1:
            finished = [(k, Generation(*g)) for k, g in gather_object([(k, astuple(g)) for k, g in finished])]
        for k, g in finished:
            gens[k] = g
        generations[system] = gens
        predictions[system] = [g.text for g in gens]

    if not dist.is_main_process:
        return {}  # the main process writes the report
    groups = list(rows["group"]) if "group" in rows.column_names else None
    hits = {system: [g.hit_max_tokens for g in generations[system]] for system in systems}
    report = {
        "model": inf.name,
        "adapter": str(adapter) if adapter is not None else None,
        "data": str(data),
        "split": split,
        "prompt": prompt,
        "vision": vision.as_dict(),
        "mode": mode,
        "vision_tokens_per_page": sum(inf.family.encode_image(inf.processor, pages[i][1], vision)[1]
                                      for i in range(len(ids))) / len(ids),
        "engine": engine,
        "decoding": {"strategy": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                     "repetition_guard": guard.describe(), "sorted_by": "reference token count"},
        "processes": dist.num_processes,
        "resume": {"reused_predictions": reused, "generated": len(systems) * len(ids) - reused},
        **score_report(ids, references, predictions, hits, groups,
                       "base" if adapter is not None else None, "adapted" if adapter is not None else None,
                       bootstrap_resamples),
    }
    output.mkdir(parents=True, exist_ok=True)
    extra = {"hit_max_tokens": [{s: hits[s][i] for s in systems} for i in range(len(ids))]}
    if groups is not None:
        extra["group"] = groups
    write_predictions(output / "predictions.jsonl", ids, references, predictions, extra=extra)
    write_report(output, report)
    write_html(output / "report.html", report, ids, references, predictions, image_of=lambda i: pages[i][1])
    plot_cer_histogram(output / "predictions.jsonl", output / "cer_histogram.png")
    if "comparison" in report:
        plot_sample_cer(output / "predictions.jsonl", output / "cer_per_sample.png")
    for file in _journals(output):  # the report now holds everything the journals did
        file.unlink()
    return report


def sweep_modes(modes: list[str], output: str | Path, **kwargs) -> list[dict]:
    """`ocrtune eval --modes base,gundam`: the same eval once per resolution mode into
    OUTPUT/mode-NAME/, then OUTPUT/modes.json and modes.md: vision tokens per page against
    CER per system (the compression trade-off on the user's own pages)."""
    from data_prep.atomic import write_text_atomic

    output = Path(output)
    rows = []
    for mode in modes:
        report = evaluate(output=output / f"mode-{mode}", mode=mode, **kwargs)
        if not report:
            continue  # not the main process
        rows.append({"mode": mode, "vision_tokens_per_page": report["vision_tokens_per_page"],
                     "cer": {s: m["cer"] for s, m in report["systems"].items()}})
    if rows:
        systems = list(rows[0]["cer"])
        lines = ["| mode | vision tokens / page | " + " | ".join(f"CER {s}" for s in systems) + " |",
                 "| --- | --- | " + " | ".join("---" for _ in systems) + " |"]
        for r in rows:
            lines.append(f"| {r['mode']} | {r['vision_tokens_per_page']:.1f} | "
                         + " | ".join(f"{100 * r['cer'][s]:.2f}%" for s in systems) + " |")
        write_text_atomic(output / "modes.json", json.dumps(rows, indent=2) + "\n")
        write_text_atomic(output / "modes.md", "\n".join(lines) + "\n")
    return rows
