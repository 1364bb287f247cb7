"""`iam` source: the IAM Handwriting Database layout, at line or page level.

    iam/
      xml/a01-000u.xml          <form id="a01-000u" writer-id="000"> ... <line id="a01-000u-00" text="...">
                                  <word ...><cmp x= y= width= height=/></word> ... </line>
      lines/a01/a01-000u/a01-000u-00.png
      forms/a01-000u.png        (page level)
      ascii/lines.txt           used when xml/ is absent: "a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE|to|stop"
      ascii/forms.txt           writer ids for lines.txt: "a01-000u 000 2 prt 7 5 52 36"

`--iam-level line`: one record per line image, target the line's text.
`--iam-level page`: one record per form, the form image cropped to the handwritten lines
(union of their boxes plus a margin, which leaves out the printed prompt above them), target
the lines joined with newlines. The writer id is the group: no writer appears in two splits.
lines.txt stores IAM's tokenised text (`|` between tokens, so "tomorrow ." not
"tomorrow."); the xml `text` attribute is the natural text and is preferred.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import InputError
from data_prep.schema import Candidate
from data_prep.text import clean_text

LEVELS = ("line", "page")
PAGE_MARGIN = 20  # pixels kept around the handwritten block


@dataclass
class _Line:
    id: str
    text: str
    box: tuple[int, int, int, int] | None  # left, top, right, bottom on the form image
    segmentation: str


def _line_image(root: Path, line_id: str) -> Path:
    parts = line_id.split("-")
    return root / "lines" / parts[0] / f"{parts[0]}-{parts[1]}" / f"{line_id}.png"


def _union(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _forms_from_xml(root: Path) -> Iterator[tuple[str, str, list[_Line], str | None]]:
    """(form id, writer id, lines, problem) per xml file."""
    for xml in sorted((root / "xml").glob("*.xml")):
        try:
            form = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            yield xml.stem, "", [], f"xml/{xml.name}: not well-formed XML ({exc})"
            continue
        if form.tag != "form" or not form.get("id"):
            yield xml.stem, "", [], f"xml/{xml.name}: expected a <form id=...> root element"
            continue
        lines = []
        for el in form.iter("line"):
            boxes = [
                (int(c.get("x")), int(c.get("y")), int(c.get("x")) + int(c.get("width")), int(c.get("y")) + int(c.get("height")))
                for c in el.iter("cmp")
            ]
            lines.append(_Line(el.get("id", ""), el.get("text", ""), _union(boxes), el.get("segmentation", "ok")))
        yield form.get("id"), form.get("writer-id", ""), lines, None


def _forms_from_ascii(root: Path) -> Iterator[tuple[str, str, list[_Line], str | None]]:
    writers = {}
    forms_txt = root / "ascii" / "forms.txt"
    if forms_txt.is_file():
        for row in forms_txt.read_text(encoding="utf-8").splitlines():
            if row and not row.startswith("#"):
                fields = row.split()
                if len(fields) >= 2:
                    writers[fields[0]] = fields[1]
    by_form: dict[str, list[_Line]] = {}
    for row in (root / "ascii" / "lines.txt").read_text(encoding="utf-8").splitlines():
        if not row.strip() or row.startswith("#"):
            continue
        fields = row.split(" ", 8)
        if len(fields) < 9:
            continue
        line_id, seg, _grey, _n, x, y, w, h, text = fields
        box = (int(x), int(y), int(x) + int(w), int(y) + int(h)) if int(w) > 0 and int(h) > 0 else None
        form_id = "-".join(line_id.split("-")[:2])
        by_form.setdefault(form_id, []).append(_Line(line_id, text.replace("|", " "), box, seg))
    for form_id, lines in by_form.items():
        yield form_id, writers.get(form_id, ""), lines, None


def iter_iam(root: Path, level: str = "line") -> Iterator[Candidate]:
    root = Path(root)
    if level not in LEVELS:
        raise InputError(f"--iam-level {level!r}: choose one of {', '.join(LEVELS)}")
    if (root / "xml").is_dir():
        forms = _forms_from_xml(root)
    elif (root / "ascii" / "lines.txt").is_file():
        forms = _forms_from_ascii(root)
    else:
        raise InputError(f"--input {root}: not an IAM folder (expected xml/ or ascii/lines.txt)")
    for form_id, writer, lines, problem in forms:
        group = f"writer-{writer}" if writer else f"form-{form_id}"
        if problem:
            yield Candidate(id=form_id, image_path=None, markdown=None, source="iam", problem=problem,
                            meta={"file": f"xml/{form_id}.xml"})
            continue
        if level == "line":
            for line in lines:
                image = _line_image(root, line.id)
                text = clean_text(line.text)
                cand = Candidate(id=line.id, image_path=image, markdown=text or None, group=group, source="iam",
                                 meta={"file": image.relative_to(root).as_posix(), "form": form_id,
                                       "writer": writer, "segmentation": line.segmentation})
                if not image.is_file():
                    cand.problem = f"{image.relative_to(root).as_posix()}: line image missing"
                elif not text:
                    cand.problem = f"{line.id}: empty transcription"
                yield cand
            continue
        image = root / "forms" / f"{form_id}.png"
        text = clean_text("\n".join(line.text for line in lines))
        box = _union([line.box for line in lines if line.box])
        cand = Candidate(id=form_id, image_path=image, markdown=text or None, group=group, source="iam",
                         meta={"file": f"forms/{form_id}.png", "writer": writer, "lines": len(lines)})
        if box:
            cand.crop = (max(0, box[0] - PAGE_MARGIN), max(0, box[1] - PAGE_MARGIN), box[2] + PAGE_MARGIN, box[3] + PAGE_MARGIN)
            cand.meta["crop"] = list(cand.crop)
        if not image.is_file():
            cand.problem = f"forms/{form_id}.png: form image missing"
        elif not text:
            cand.problem = f"{form_id}: no transcribed lines"
        yield cand
