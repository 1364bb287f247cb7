"""`manifest` source: a JSONL or CSV file, one record per line / row.

    pages.jsonl   {"image": "pages/001.png", "markdown": "# Title\n...", "id": "001", "group": "writer-7"}
    pages.csv     image,markdown,id,group            (header row required; quote multi-line Markdown)

`image` is relative to the manifest's folder and may not leave it. `id` defaults to the
image path, `group` to the id; any other keys/columns go into `meta`. The format is
chosen by the extension: `.csv` is CSV, anything else is JSON Lines.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import InputError
from data_prep.schema import Candidate
from data_prep.sources.paths import UnsafePath, resolve_inside
from data_prep.text import clean_text


def _decode(manifest: Path) -> str:
    raw = manifest.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{manifest}: not valid UTF-8 at line {line} (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8"
        ) from exc


def _rows(manifest: Path, text: str) -> Iterator[tuple[str, object]]:
    """(where, parsed row or an error message) per record."""
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            return
        end = reader.line_num  # the header's last line
        for row in reader:
            where = f"{manifest.name}:{end + 1}"  # the line the record starts on (values may span lines)
            end = reader.line_num
            if None in row:  # more cells than header columns
                yield where, "more cells than header columns"
                continue
            yield where, {k: v for k, v in row.items() if v not in (None, "")}
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, f"invalid JSON ({exc.msg})"
            continue
        yield where, obj if isinstance(obj, dict) else "expected a JSON object"


def iter_manifest(manifest: Path) -> Iterator[Candidate]:
    manifest = Path(manifest)
    root = manifest.parent
    for where, obj in _rows(manifest, _decode(manifest)):
        cand = Candidate(id=where, image_path=root, markdown=None, source="manifest", meta={"line": int(where.rsplit(":", 1)[1])})
        if isinstance(obj, str):
            cand.problem = f"{where}: {obj}"
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
