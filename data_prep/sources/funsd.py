"""`funsd` source: FUNSD-style forms, converted to Markdown in reading order.

    funsd/                       (or the dataset root holding training_data/ and testing_data/)
      annotations/0001.json      {"form": [{"id": 0, "box": [x0, y0, x1, y1], "text": "DATE:",
                                            "label": "question", "linking": [[0, 1]], "words": [...]}, ...]}
      images/0001.png

Markdown (`form_markdown`): entities in reading order (rows top to bottom, left to right
within a row); a `header` becomes `## text`; a `question` becomes `**question** answer`
with the answers linked to it in reading order (a question with no answer stays
`**question**`); `other` entities and answers linked to no question become paragraphs.
Blocks are separated by blank lines, as Markdown paragraphs are. Each form is its own
group (FUNSD names no templates); the original split goes into `meta`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import InputError
from data_prep.images import IMAGE_EXTENSIONS
from data_prep.schema import Candidate
from data_prep.text import clean_text


def reading_order(entities: list[dict]) -> list[dict]:
    """Rows first: boxes whose vertical centres are within half a median box height share a row."""
    boxed = [e for e in entities if len(e.get("box") or []) == 4]
    if not boxed:
        return []
    heights = sorted(max(1, e["box"][3] - e["box"][1]) for e in boxed)
    tolerance = heights[len(heights) // 2] / 2
    rows: list[list[dict]] = []
    for e in sorted(boxed, key=lambda e: (e["box"][1] + e["box"][3]) / 2):
        centre = (e["box"][1] + e["box"][3]) / 2
        if rows and abs(centre - rows[-1][0]["_centre"]) <= tolerance:
            rows[-1].append({**e, "_centre": rows[-1][0]["_centre"]})
        else:
            rows.append([{**e, "_centre": centre}])
    return [e for row in rows for e in sorted(row, key=lambda e: e["box"][0])]


def form_markdown(entities: list[dict]) -> str:
    by_id = {e["id"]: e for e in entities}
    order = reading_order(entities)
    rank = {e["id"]: i for i, e in enumerate(order)}
    answers_of: dict[int, list[int]] = {}
    linked_answers = set()
    for e in entities:
        for pair in e.get("linking") or []:
            if len(pair) != 2 or pair[0] not in by_id or pair[1] not in by_id:
                continue
            q, a = by_id[pair[0]], by_id[pair[1]]
            if q.get("label") == "question" and a.get("label") == "answer" and a["id"] not in answers_of.get(q["id"], []):
                answers_of.setdefault(q["id"], []).append(a["id"])
                linked_answers.add(a["id"])
    blocks = []
    for e in order:
        text = " ".join((e.get("text") or "").split())
        label = e.get("label")
        if label == "answer" and e["id"] in linked_answers:
            continue  # written beside its question
        if label == "question":
            answer = " ".join(
                " ".join((by_id[a].get("text") or "").split())
                for a in sorted(answers_of.get(e["id"], []), key=lambda a: rank.get(a, 0))
            ).strip()
            if text or answer:
                blocks.append(f"**{text}** {answer}".rstrip() if text else answer)
        elif not text:
            continue
        elif label == "header":
            blocks.append(f"## {text}")
        else:
            blocks.append(text)
    return "\n\n".join(blocks)


def iter_funsd(root: Path) -> Iterator[Candidate]:
    root = Path(root)
    ann_dirs = sorted(p for p in [root / "annotations", *root.rglob("annotations")] if p.is_dir())
    if not ann_dirs:
        raise InputError(f"--input {root}: no annotations/ folder (FUNSD layout: annotations/*.json + images/)")
    for ann_dir in dict.fromkeys(ann_dirs):
        split = ann_dir.parent.name if ann_dir.parent != root else ""
        images = ann_dir.parent / "images"
        for ann in sorted(ann_dir.glob("*.json")):
            rel = ann.relative_to(root).as_posix()
            stem_id = f"{split}/{ann.stem}" if split else ann.stem
            cand = Candidate(id=stem_id, image_path=None, markdown=None, group=stem_id, source="funsd",
                             meta={"file": rel, **({"split": split} if split else {})})
            found = [images / f"{ann.stem}{ext}" for ext in IMAGE_EXTENSIONS if (images / f"{ann.stem}{ext}").is_file()]
            if not found:
                cand.problem = f"{rel}: no image {images.relative_to(root).as_posix()}/{ann.stem}.png"
                yield cand
                continue
            cand.image_path = found[0]
            try:
                form = json.loads(ann.read_bytes().decode("utf-8-sig"))["form"]
                if not isinstance(form, list):
                    raise TypeError("'form' is not a list")
                cand.markdown = clean_text(form_markdown(form)) or None
                if cand.markdown is None:
                    cand.problem = f"{rel}: no text in any entity"
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                cand.problem = f"{rel}: not a FUNSD annotation ({type(exc).__name__}: {exc})"
            yield cand
