"""`folder` source: images with a same-stem `.md` (preferred) or `.txt` transcript beside them.

    scans/
      page_001.png   page_001.md
      sub/page_002.jpg  sub/page_002.txt

The record id is the image path relative to the input folder, without extension.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.images import IMAGE_EXTENSIONS
from data_prep.schema import Candidate
from data_prep.sources.paths import UnsafePath, resolve_inside
from data_prep.text import TextError, read_transcript


def iter_folder(root: Path) -> Iterator[Candidate]:
    root = Path(root)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for image in images:
        rel = image.relative_to(root)
        rid = rel.with_suffix("").as_posix()
        cand = Candidate(id=rid, image_path=image, markdown=None, source="folder", meta={"file": rel.as_posix()})
        try:
            resolve_inside(root, rel.as_posix())
        except UnsafePath as exc:
            cand.problem = str(exc)
            yield cand
            continue
        sidecars = [image.with_suffix(ext) for ext in (".md", ".txt")]
        found = [s for s in sidecars if s.is_file()]
        if not found:
            cand.problem = f"no transcript: expected {rel.with_suffix('.md').as_posix()} or {rel.with_suffix('.txt').as_posix()}"
        else:
            try:
                cand.markdown = read_transcript(found[0])
                cand.meta["transcript"] = found[0].relative_to(root).as_posix()
            except TextError as exc:
                cand.problem = str(exc)
        yield cand
