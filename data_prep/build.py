"""Build a dataset: `ocrtune data build --source folder|manifest --input PATH --output DIR`.

Validates every candidate (image decodes safely, transcript is clean UTF-8), rejects
what fails with a reason, splits by group and writes, atomically:

    DIR/                      datasets.load_from_disk(DIR) -> DatasetDict(train, validation, test)
    DIR/build_report.json     counts, every rejected item and why, split and leakage check
    DIR/README.md             dataset card
    DIR/ocrtune_dataset.json  the prompt and schema version training and eval read back
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from data_prep import DEFAULT_PROMPT
from data_prep.atomic import replace_dir
from data_prep.images import DEFAULT_MAX_PIXELS, ImageError, encode_png, load_image, pixel_hash
from data_prep.schema import FEATURES, Candidate, Reject, meta_json
from data_prep.sources.folder import iter_folder
from data_prep.sources.manifest import iter_manifest
from data_prep.split import assign_splits, check_fractions, merge_groups

SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")


class BuildError(RuntimeError):
    """The build cannot produce a dataset; nothing was written."""


@dataclass
class BuildResult:
    output: Path
    report: dict


def iter_source(source: str, input_path: Path) -> Iterator[Candidate]:
    if source == "folder":
        if not input_path.is_dir():
            raise BuildError(f"--input {input_path}: not a directory (the folder source needs a folder of images)")
        return iter_folder(input_path)
    if source == "manifest":
        if not input_path.is_file():
            raise BuildError(f"--input {input_path}: no such manifest file")
        return iter_manifest(input_path)
    raise BuildError(f"--source {source!r}: unknown source; choose one of folder, manifest")


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
        f"Source: `{report['source']}` from `{report['input']}`. Prompt: `{report['prompt']!r}`.",
        "",
        "| split | records |",
        "| --- | --- |",
        *[f"| {s} | {c[s]} |" for s in SPLITS],
        "",
        f"Candidates: {c['candidates']}, accepted: {c['accepted']}, rejected: {c['rejected']} "
        "(each listed with its reason in build_report.json).",
        "",
        f"Splits are grouped (declared groups merged with identical images), seed {report['split']['seed']}. "
        f"Leakage check: {report['leakage']['shared_groups']} groups and "
        f"{report['leakage']['shared_images']} images shared between splits.",
        "",
        "Columns: image (RGB, EXIF orientation applied), markdown (UTF-8, NFC, LF), id, group, source, meta (JSON).",
    ]
    return "\n".join(lines) + "\n"


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
) -> BuildResult:
    input_path, output = Path(input_path), Path(output)
    try:
        check_fractions(val_fraction, test_fraction)  # before any image is decoded
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    if "<image>" not in prompt:
        raise BuildError(f"--prompt {prompt!r}: must contain the <image> placeholder")
    if output.exists() and not overwrite:
        raise BuildError(f"--output {output} already exists; pass --overwrite to replace it")
    candidates = iter_source(source, input_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        rejects: list[Reject] = []
        kept: list[dict] = []  # light metadata only; pixels go straight to Arrow
        seen_ids: set[str] = set()
        n_candidates = 0

        def records():
            nonlocal n_candidates
            for cand in tqdm(candidates, desc="validating", unit="img", disable=not progress):
                n_candidates += 1
                item = str(cand.meta.get("file", cand.id))
                if cand.problem:
                    rejects.append(Reject(item, cand.problem))
                    continue
                if cand.id in seen_ids:
                    rejects.append(Reject(item, f"duplicate id {cand.id!r}"))
                    continue
                try:
                    im = load_image(cand.image_path, max_pixels=max_pixels)
                except ImageError as exc:
                    rejects.append(Reject(item, f"{cand.image_path}: {exc}"))
                    continue
                seen_ids.add(cand.id)
                kept.append({"id": cand.id, "group": cand.group or cand.id, "hash": pixel_hash(im)})
                yield {
                    "image": {"bytes": encode_png(im), "path": None},
                    "markdown": cand.markdown,
                    "id": cand.id,
                    "group": cand.group or cand.id,
                    "source": cand.source,
                    "meta": meta_json(cand.meta),
                }

        # Stream records straight into one Arrow file: memory stays flat however many pages.
        arrow_path = staging / "all.arrow"
        with ArrowWriter(features=FEATURES, path=str(arrow_path)) as writer:
            for rec in records():
                writer.write(FEATURES.encode_example(rec))
            writer.finalize()
        total = n_candidates
        if total == 0:
            raise BuildError(f"--input {input_path}: no images or manifest lines found")
        if len(rejects) / total > max_rejected:
            listing = "\n".join(f"  {r.item}: {r.reason}" for r in rejects[:50])
            raise BuildError(
                f"{len(rejects)} of {total} items rejected ({len(rejects) / total:.0%} > --max-rejected "
                f"{max_rejected:.0%}); nothing was written:\n{listing}"
            )
        if not kept:
            raise BuildError("every item was rejected; nothing was written")

        groups = merge_groups([k["group"] for k in kept], [k["hash"] for k in kept])
        split_names = assign_splits(groups, val_fraction, test_fraction, seed)
        full = datasets.Dataset.from_file(str(arrow_path))
        dd = datasets.DatasetDict(
            {s: full.select([i for i, name in enumerate(split_names) if name == s]) for s in SPLITS}
        )

        # Leakage check on what is actually written: no group or identical image in two splits.
        owner_g: dict[str, set] = {}
        owner_h: dict[str, set] = {}
        for k, g, s in zip(kept, groups, split_names):
            owner_g.setdefault(g, set()).add(s)
            owner_h.setdefault(k["hash"], set()).add(s)
        leakage = {
            "checked": True,
            "shared_groups": sum(len(v) > 1 for v in owner_g.values()),
            "shared_images": sum(len(v) > 1 for v in owner_h.values()),
            "duplicate_images_merged": len(kept) - len(owner_h),
        }
        if leakage["shared_groups"] or leakage["shared_images"]:
            raise BuildError(f"internal error: leakage between splits {leakage}")

        report = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "input": str(input_path),
            "prompt": prompt,
            "counts": {
                "candidates": total,
                "accepted": len(kept),
                "rejected": len(rejects),
                **{s: len(dd[s]) for s in SPLITS},
            },
            "rejected": [r.as_dict() for r in rejects],
            "split": {
                "seed": seed,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "groups": len(set(groups)),
            },
            "leakage": leakage,
        }
        data_dir = staging / "data"
        dd.save_to_disk(str(data_dir))
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


def read_dataset_info(path: str | Path) -> dict:
    """The prompt and schema version recorded by `build_dataset` (empty for foreign datasets)."""
    info = Path(path) / "ocrtune_dataset.json"
    return json.loads(info.read_text()) if info.is_file() else {}
