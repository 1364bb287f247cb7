"""The one record schema every source adapter produces, and the reject list."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets

# Columns of every split. `meta` is a JSON string so that sources with different
# metadata still share one Arrow schema.
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "markdown": datasets.Value("string"),
        "id": datasets.Value("string"),
        "group": datasets.Value("string"),
        "source": datasets.Value("string"),
        "meta": datasets.Value("string"),
    }
)


@dataclass
class Candidate:
    """A record before validation: the image is still a path on disk (or encoded bytes)."""

    id: str
    image_path: Path | None
    markdown: str | None  # None when the source could not produce text (reason in `problem`)
    group: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
    problem: str | None = None  # set by the adapter when the item is already known to be bad
    image_bytes: bytes | None = None  # encoded image when it has no file of its own (hf, pdf, synthetic)
    crop: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) to keep, after EXIF rotation

    @property
    def image_source(self) -> Path | bytes:
        return self.image_bytes if self.image_bytes is not None else self.image_path


@dataclass
class Reject:
    item: str  # the file, or manifest line, that was rejected
    reason: str

    def as_dict(self) -> dict:
        return {"item": self.item, "reason": self.reason}


def meta_json(meta: dict) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True)
