"""Build a dataset: `ocrtune data build --source KIND --input PATH --output DIR`.

KIND is one of data_prep.sources.SOURCES (folder, manifest, hf, pdf, iam, funsd,
synthetic). Validates every candidate (image decodes safely, transcript is clean UTF-8,
target within the token budget), rejects what fails with a reason, lists what it
repaired, groups exact and near-duplicate images, splits by group and writes, atomically:

    DIR/                      datasets.load_from_disk(DIR) -> DatasetDict(train, validation, test)
    DIR/build_report.json     counts, every rejected item and why, split and leakage check
    DIR/README.md             dataset card
    DIR/ocrtune_dataset.json  the prompt and schema version training and eval read back
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from data_prep import DEFAULT_PROMPT
from data_prep.atomic import replace_dir
from data_prep.errors import InputError, OcrtuneError
from data_prep.images import DEFAULT_MAX_PIXELS, NEAR_HASH_BITS, ImageError, encode_png, near_hash, open_image, pixel_hash
from data_prep.preprocess import Preprocess
from data_prep.schema import FEATURES, Reject, meta_json
from data_prep.sources import open_source
from data_prep.split import assign_splits, check_fractions, merge_groups, near_pairs

SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")


class BuildError(OcrtuneError, RuntimeError):
    """The build cannot produce a dataset; nothing was written."""


@dataclass
class BuildResult:
    output: Path
    report: dict


def _card(report: dict) -> str:
    c = report["counts"]
    lines = [
        "---",
        "task_categories: [image-to-text]",
        "tags: [ocr, ocrtune]",
        "---",
        "",
        "# OCR dataset built with ocrtune",
        "",
        *[f"**Warning:** {w}.\n" for w in report.get("warnings", [])],
        f"Source: `{report['source']}` from `{report['input']}`. Prompt: `{report['prompt']!r}`.",
        "",
        "| split | records |",
        "| --- | --- |",
        *[f"| {s} | {c[s]} |" for s in SPLITS],
        "",
        f"Candidates: {c['candidates']}, accepted: {c['accepted']}, rejected: {c['rejected']} "
        f"(each listed with its reason in build_report.json), repaired on load: {c['fixed']}.",
        "",
        "Preprocessing: " + (
            ", ".join(f"{k}={v}" for k, v in report["preprocess"].items()) if report["preprocess"] else "none"
        ) + ".",
        "",
        "Token budget: " + (
            f"targets of at most {report['token_budget']['max_target_tokens']} tokens under "
            f"`{report['token_budget']['tokenizer']}` (longer ones rejected, never truncated)."
            if report["token_budget"]["max_target_tokens"] else "not checked."
        ),
        "",
        f"Splits are grouped (declared groups merged with identical and near-duplicate images, "
        f"edge signatures at most {report['split']['near_duplicate_threshold']:.0%} apart), seed {report['split']['seed']}. "
        f"Leakage check: {report['leakage']['shared_groups']} groups, "
        f"{report['leakage']['shared_images']} images and {report['leakage']['shared_near_duplicates']} "
        "near-duplicate pairs shared between splits.",
        "",
        "Columns: image (RGB, EXIF orientation applied), markdown (UTF-8, NFC, LF), id, group, source, meta (JSON).",
    ]
    return "\n".join(lines) + "\n"


def _load_one(src, crop, max_pixels: int, preprocess: Preprocess):
    """Decode, repair, crop, preprocess and re-encode one image (runs in a worker process).

    Returns (png bytes, exact hash, near hash, repairs) or the error message."""
    try:
        im, fixes = open_image(src, max_pixels=max_pixels)
    except ImageError as exc:
        return str(exc)
    if crop:
        im = im.crop(crop)
        fixes.append(f"cropped to {list(crop)}")
    if preprocess.active:
        im, done = preprocess.apply(im)
        fixes.extend(done)
    return encode_png(im), pixel_hash(im), near_hash(im), fixes


def _load_in_order(checked, max_pixels: int, preprocess: Preprocess, workers: int):
    """(candidate, item, reason, loaded) in input order, decoding images on `workers` processes.

    At most 4 images per worker are in flight, so memory stays flat; items already
    rejected by the cheap checks are passed through without decoding."""
    if workers <= 1:
        for cand, item, reason in checked:
            yield cand, item, reason, None if reason else _load_one(cand.image_source, cand.crop, max_pixels, preprocess)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    window: deque = deque()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for cand, item, reason in checked:
            future = None if reason else pool.submit(_load_one, cand.image_source, cand.crop, max_pixels, preprocess)
            window.append((cand, item, reason, future))
            while len(window) > 4 * workers or (window and (window[0][3] is None or window[0][3].done())):
                c, i, r, f = window.popleft()
                yield c, i, r, None if f is None else f.result()
        while window:
            c, i, r, f = window.popleft()
            yield c, i, r, None if f is None else f.result()


def _token_counter(tokenizer: str | None, max_target_tokens: int | None):
    """target -> tokens the model is trained on (text + end-of-sequence), or None when unchecked."""
    if max_target_tokens is None:
        return None
    if max_target_tokens < 1:
        raise BuildError(f"--max-target-tokens {max_target_tokens}: must be at least 1")
    if not tokenizer:
        raise BuildError("--max-target-tokens needs --tokenizer (a model folder, builtin:NAME or Hub id)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad name
        raise BuildError(f"--tokenizer {tokenizer}: cannot load ({type(exc).__name__}: {exc})") from None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) + 1


def build_dataset(
    source: str,
    input_path: str | Path,
    output: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    max_rejected: float = 0.1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    progress: bool = True,
    source_options: dict | None = None,
    max_target_tokens: int | None = None,
    tokenizer: str | None = None,
    near_duplicate_threshold: float = 0.15,
    preprocess: Preprocess = Preprocess(),
    workers: int = 0,
) -> BuildResult:
    """`near_duplicate_threshold`: images whose edge signatures (data_prep.images.near_hash)
    differ in at most this share of their edges count as one page and always share a split
    (0 = identical pixels only). `workers`: processes decoding images (0 = one per CPU
    core, at most 8; 1 = decode in this process)."""
    input_path, output = Path(input_path), Path(output)
    try:
        check_fractions(val_fraction, test_fraction)  # before any image is decoded
        if not 0 <= near_duplicate_threshold < 1:
            raise InputError(f"--near-duplicate-threshold {near_duplicate_threshold}: choose a share in [0, 1)")
        options = dict(source_options or {})
        if source == "pdf":
            options.setdefault("max_pixels", max_pixels)  # refuse huge pages before rendering them
        candidates = open_source(source, input_path, options)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    if "<image>" not in prompt:
        raise BuildError(f"--prompt {prompt!r}: must contain the <image> placeholder")
    if output.exists() and not overwrite:
        raise BuildError(f"--output {output} already exists; pass --overwrite to replace it")
    count_tokens = _token_counter(tokenizer, max_target_tokens)
    if workers < 0:
        raise BuildError(f"--workers {workers}: must be 0 (one per core) or more")
    workers = workers or min(8, os.cpu_count() or 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        rejects: list[Reject] = []
        fixed: list[dict] = []  # accepted items that needed a repair, and which
        kept: list[dict] = []  # light metadata only; pixels go straight to Arrow
        seen_ids: set[str] = set()
        n_candidates = 0

        def checked():
            """(candidate, item, reason to reject or None) in input order: the cheap checks."""
            nonlocal n_candidates
            for cand in tqdm(candidates, desc="validating", unit="img", disable=not progress):
                n_candidates += 1
                item = str(cand.meta.get("file", cand.id))
                reason = cand.problem
                if reason is None and (not cand.markdown or not cand.markdown.strip()):
                    reason = "empty target"
                if reason is None and count_tokens is not None:
                    n_tokens = count_tokens(cand.markdown)
                    if n_tokens > max_target_tokens:
                        reason = (f"target has {n_tokens} tokens > --max-target-tokens {max_target_tokens} "
                                  "(never truncated; split the page or raise the limit)")
                yield cand, item, reason

        def records():
            for cand, item, reason, loaded in _load_in_order(checked(), max_pixels, preprocess, workers):
                if reason is None and cand.id in seen_ids:
                    reason = f"duplicate id {cand.id!r}"
                if reason is None and isinstance(loaded, str):
                    reason = f"{cand.image_path if cand.image_bytes is None else item}: {loaded}"
                if reason is not None:
                    rejects.append(Reject(item, reason))
                    continue
                png, exact, near, fixes = loaded
                if fixes:
                    fixed.append({"item": item, "fixes": fixes})
                seen_ids.add(cand.id)
                kept.append({"id": cand.id, "group": cand.group or cand.id, "hash": exact, "near": near})
                yield {
                    "image": {"bytes": png, "path": None},
                    "markdown": cand.markdown,
                    "id": cand.id,
                    "group": cand.group or cand.id,
                    "source": cand.source,
                    "meta": meta_json(cand.meta),
                }

        # Stream records straight into one Arrow file: memory stays flat however many pages.
        arrow_path = staging / "all.arrow"
        try:
            with ArrowWriter(features=FEATURES, path=str(arrow_path)) as writer:
                for rec in records():
                    writer.write(FEATURES.encode_example(rec))
                writer.finalize()
        except ValueError as exc:  # the source could not be read at all (layout, column, font)
            raise BuildError(str(exc)) from None
        total = n_candidates
        if total == 0:
            raise BuildError(f"--input {input_path}: no {source} items found")
        if len(rejects) / total > max_rejected:
            listing = "\n".join(f"  {r.item}: {r.reason}" for r in rejects[:50])
            raise BuildError(
                f"{len(rejects)} of {total} items rejected ({len(rejects) / total:.0%} > --max-rejected "
                f"{max_rejected:.0%}); nothing was written:\n{listing}"
            )
        if not kept:
            raise BuildError("every item was rejected; nothing was written")

        near = near_pairs([k["near"] for k in kept], near_duplicate_threshold, NEAR_HASH_BITS)
        groups = merge_groups([k["group"] for k in kept], [k["hash"] for k in kept], near)
        split_names = assign_splits(groups, val_fraction, test_fraction, seed)
        full = datasets.Dataset.from_file(str(arrow_path))
        dd = datasets.DatasetDict(
            {s: full.select([i for i, name in enumerate(split_names) if name == s]) for s in SPLITS}
        )

        # Leakage check on what is actually written: no group, identical or near-identical
        # image in two splits.
        owner_g: dict[str, set] = {}
        owner_h: dict[str, set] = {}
        for k, g, s in zip(kept, groups, split_names):
            owner_g.setdefault(g, set()).add(s)
            owner_h.setdefault(k["hash"], set()).add(s)
        by_hash: dict[str, list[str]] = {}
        for k in kept:
            by_hash.setdefault(k["hash"], []).append(k["id"])
        duplicates = [{"kind": "identical pixels", "ids": ids} for ids in by_hash.values() if len(ids) > 1]
        duplicates += [{"kind": "near-duplicate", "ids": [kept[i]["id"], kept[j]["id"]]} for i, j in near
                       if kept[i]["hash"] != kept[j]["hash"]]
        leakage = {
            "checked": True,
            "shared_groups": sum(len(v) > 1 for v in owner_g.values()),
            "shared_images": sum(len(v) > 1 for v in owner_h.values()),
            "shared_near_duplicates": sum(split_names[i] != split_names[j] for i, j in near),
            "duplicate_images_merged": len(kept) - len(owner_h),
            "near_duplicate_pairs": sum(1 for d in duplicates if d["kind"] == "near-duplicate"),
        }
        if leakage["shared_groups"] or leakage["shared_images"] or leakage["shared_near_duplicates"]:
            raise BuildError(f"internal error: leakage between splits {leakage}")

        report = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "input": str(input_path),
            "source_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
            "prompt": prompt,
            "counts": {
                "candidates": total,
                "accepted": len(kept),
                "rejected": len(rejects),
                "fixed": len(fixed),
                **{s: len(dd[s]) for s in SPLITS},
            },
            "rejected": [r.as_dict() for r in rejects],
            "fixed": fixed,
            "duplicates": duplicates,
            "token_budget": {"max_target_tokens": max_target_tokens, "tokenizer": tokenizer},
            "preprocess": preprocess.describe() if preprocess.active else None,
            "split": {
                "seed": seed,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "groups": len(set(groups)),
                "near_duplicate_threshold": near_duplicate_threshold,
            },
            "leakage": leakage,
        }
        report["warnings"] = empty_split_warnings(
            report["counts"], {"validation": val_fraction, "test": test_fraction}, len(set(groups)))
        data_dir = staging / "data"
        # An empty split must still be written as one (empty) shard: datasets saves it with
        # zero shards by default and then cannot load the folder back.
        dd.save_to_disk(str(data_dir), num_shards={s: 1 for s in SPLITS if len(dd[s]) == 0} or None)
        del dd, full
        arrow_path.unlink()
        for item in data_dir.iterdir():
            item.rename(staging / item.name)
        data_dir.rmdir()
        (staging / "build_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (staging / "README.md").write_text(_card(report))
        (staging / "ocrtune_dataset.json").write_text(
            json.dumps({"schema_version": SCHEMA_VERSION, "prompt": prompt}, indent=2) + "\n"
        )
        if output.exists() and not overwrite:  # appeared while we were building
            raise BuildError(f"--output {output} already exists; pass --overwrite to replace it")
        replace_dir(staging, output)
        return BuildResult(output=output, report=report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_dataset_dir(path: str | Path) -> bool:
    """A folder `datasets.load_from_disk` reads as a DatasetDict (what `build_dataset` writes)."""
    return (Path(path) / "dataset_dict.json").is_file()


def empty_split_warnings(counts: dict, fractions: dict, groups: int) -> list[str]:
    """One line per split asked for (fraction > 0) that came out empty: with few groups
    (writers, templates, duplicate images) a grouped split cannot honour small fractions."""
    return [f"the {split} split is empty though its fraction is {fraction:g}: the {counts['accepted']} accepted "
            f"items form only {groups} group(s) (declared groups, identical and near-duplicate images), and "
            f"whole groups go to one split; add items or groups, or raise the fraction"
            for split, fraction in fractions.items() if fraction > 0 and counts[split] == 0]


def read_dataset_info(path: str | Path) -> dict:
    """The prompt and schema version recorded by `build_dataset` (empty for foreign datasets)."""
    info = Path(path) / "ocrtune_dataset.json"
    return json.loads(info.read_text()) if info.is_file() else {}
