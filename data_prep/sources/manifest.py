"""`manifest` source: a JSONL file, one object per line.

    {"image": "pages/001.png", "markdown": "# Title\n...", "id": "001", "group": "writer-7"}

`image` is relative to the manifest's folder and may not leave it. `id` defaults to the
image path, `group` to the id; any other keys go into `meta`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.schema import Candidate
from data_prep.sources.paths import UnsafePath, resolve_inside
from data_prep.text import clean_text


def iter_manifest(manifest: Path) -> Iterator[Candidate]:
    manifest = Path(manifest)
    root = manifest.parent
    raw = manifest.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{manifest}: not valid UTF-8 at line {line}") from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{lineno}"
        cand = Candidate(id=where, image_path=root, markdown=None, source="manifest", meta={"line": lineno})
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            cand.problem = f"{where}: invalid JSON ({exc.msg})"
            yield cand
            continue
        if not isinstance(obj, dict):
            cand.problem = f"{where}: expected a JSON object"
            yield cand
            continue
        missing = [k for k in ("image", "markdown") if k not in obj]
        if missing:
            cand.problem = f"{where}: missing field(s) {', '.join(missing)}"
            yield cand
            continue
        try:
            cand.image_path = resolve_inside(root, obj["image"])
        except UnsafePath as exc:
            cand.problem = f"{where}: field 'image': {exc}"
            yield cand
            continue
        if not isinstance(obj["markdown"], str) or not obj["markdown"].strip():
            cand.problem = f"{where}: field 'markdown' is empty or not a string"
            yield cand
            continue
        cand.id = str(obj.get("id") or Path(obj["image"]).with_suffix("").as_posix())
        cand.group = str(obj["group"]) if obj.get("group") is not None else None
        cand.markdown = clean_text(obj["markdown"])
        cand.meta.update({k: v for k, v in obj.items() if k not in ("image", "markdown", "id", "group")})
        cand.meta["file"] = obj["image"]
        yield cand
