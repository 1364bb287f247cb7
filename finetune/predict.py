"""Images and PDFs to Markdown: `ocrtune predict --model M [--adapter DIR] --input PATH... --output DIR`.

    ocrtune predict --model builtin:tiny-random-deepseek-ocr-2 --adapter runs/tiny/adapter \\
        --input scans/ report.pdf --output runs/markdown

Every image becomes OUTPUT/<same relative path>.md; every PDF becomes OUTPUT/<name>.md with
its pages (rendered at --dpi) joined by a `<!-- pagebreak -->` line, the marker
`data build --source pdf` reads back. Grounding output
(`<|ref|>text<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>`) is kept as the model wrote it, or with
--strip-grounding reduced to its text. Same builder, decoding and repetition guard as eval.
Each file is written atomically; OUTPUT/predict_summary.json lists pages, outputs that hit
the token cap, and inputs that could not be read (the others are still written).
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

from data_prep.images import IMAGE_EXTENSIONS, DEFAULT_MAX_PIXELS, ImageError, open_image
from finetune.decoding import NO_REPEAT_NGRAM, NO_REPEAT_WINDOW
from finetune.errors import InputError, MissingPathError

_DET = re.compile(r"<\|det\|>.*?<\|/det\|>", re.S)
_REF = re.compile(r"<\|/?ref\|>")
PAGE_BREAK = "\n\n<!-- pagebreak -->\n\n"


def strip_grounding(text: str) -> str:
    """Layout boxes out, the text they label kept."""
    return _REF.sub("", _DET.sub("", text))


def find_inputs(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input root) for every image and PDF named or under a named folder."""
    found = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and (f.suffix.lower() in IMAGE_EXTENSIONS or f.suffix.lower() == ".pdf"):
                    found.append((f, f.relative_to(p)))
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise MissingPathError(f"--input {p}: no such file or folder")
    return found


def _pages(file: Path, dpi: int, max_pixels: int):
    """[(page id, image)] of one input; ImageError/ValueError when it cannot be read."""
    if file.suffix.lower() != ".pdf":
        return [(str(file), open_image(file, max_pixels)[0])]
    import pypdfium2 as pdfium

    from data_prep.sources.pdf import page_pixels, render_page

    try:
        doc = pdfium.PdfDocument(str(file))
    except pdfium.PdfiumError as exc:
        raise InputError(f"cannot open PDF ({exc})") from None
    try:
        pages = []
        for k in range(len(doc)):
            page = doc[k]
            if page_pixels(page, dpi) > max_pixels:
                raise InputError(f"page {k + 1} at {dpi} dpi exceeds the pixel cap of {max_pixels}")
            pages.append((f"{file}#page={k + 1}", render_page(page, dpi)))
            page.close()
        return pages
    finally:
        doc.close()


def predict(model_name: str, inputs: list[str | Path], output: str | Path, adapter: str | Path | None = None,
            prompt: str | None = None, batch_size: int = 8, max_new_tokens: int = 2048, dpi: int = 144,
            keep_grounding: bool = True, dtype: str = "auto", no_repeat_ngram: int = NO_REPEAT_NGRAM, no_repeat_window: int = NO_REPEAT_WINDOW,
            max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, engine: str = "transformers") -> dict:
    from tqdm.auto import tqdm

    from data_prep.atomic import write_text_atomic
    from finetune.generate import folded_lora, generate_pages
    from finetune.runtime import load_for_inference

    output = Path(output)
    files = find_inputs([Path(p) for p in inputs])
    if not files:
        raise MissingPathError(f"--input {' '.join(map(str, inputs))}: no images or PDFs found")
    from finetune.sequence import builder_for

    vllm = None
    if engine == "vllm":  # the same prompt ids, guard and decoding, through vLLM (finetune/vllm_engine.py)
        from finetune.runtime import load_for_engine
        from finetune.vllm_engine import VllmEngine

        inf, resolved = load_for_engine(model_name, adapter, prompt, no_repeat_ngram, no_repeat_window)
        vllm = VllmEngine(resolved.path, adapter, inf.guard, inf.family, inf.vision.as_dict(),
                          max_new_tokens, dtype)
    else:
        inf = load_for_inference(model_name, adapter, prompt, dtype, no_repeat_ngram, no_repeat_window)
    builder = builder_for(inf.family, inf.processor, inf.model.config if inf.model is not None else None, inf.prompt,
                          inf.vision)
    summary = {"model": inf.name, "adapter": str(adapter) if adapter else None, "engine": engine, "prompt": inf.prompt,
               "max_new_tokens": max_new_tokens, "repetition_guard": inf.guard.describe(), "dpi": dpi,
               "grounding": "kept" if keep_grounding else "stripped", "files": 0, "pages": 0,
               "hit_max_tokens": [], "failed": []}
    # The adapter merged once for the whole run: every page decodes without LoRA layers.
    with folded_lora(inf.model, adapted=True, exact_restore=False) if inf.model is not None else nullcontext():
        for file, rel in tqdm(files, desc="predict", unit="file", disable=not progress):
            try:
                pages = _pages(file, dpi, max_pixels)
            except (ImageError, ValueError, OSError) as exc:
                summary["failed"].append({"file": str(file), "reason": str(exc)})
                continue
            texts = []
            for start in range(0, len(pages), batch_size):  # a long PDF never holds more than a batch in the model
                chunk = pages[start:start + batch_size]
                if vllm is not None:
                    gens = vllm.generate(chunk, builder, max_new_tokens, adapted=adapter is not None)
                else:
                    gens = generate_pages(inf.model, builder, chunk, batch_size, max_new_tokens, guard=inf.guard)
                for (pid, _), g in zip(chunk, gens):
                    texts.append(g.text if keep_grounding else strip_grounding(g.text))
                    if g.hit_max_tokens:
                        summary["hit_max_tokens"].append(pid)
            write_text_atomic(output / rel.with_suffix(".md"), PAGE_BREAK.join(t.strip() for t in texts) + "\n")
            summary["files"] += 1
            summary["pages"] += len(pages)
    write_text_atomic(output / "predict_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
