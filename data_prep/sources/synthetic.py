"""`synthetic` source: render a text or Markdown corpus into scan-like images.

    ocrtune data build --source synthetic --input corpus.md --output runs/data \\
        --fonts package:font_intuitive,matplotlib:DejaVuSans.ttf --augment scan --seed 0

The corpus is split into samples at blank lines (a Markdown paragraph, heading or a
run of `**Label:** value` lines is one sample); `--unit line` makes every non-empty line
a sample instead. Each line of a sample is drawn on its own baseline in a font picked
per sample from `--fonts` (fonts that cannot draw the text are skipped; see
data_prep.render for font specs): `**bold**` spans in a bold printed font, `#` headings
larger. The target is the sample's Markdown as written. The same generator makes the
demo's handwriting domain (data_prep.synthetic).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from data_prep.errors import InputError
from data_prep.images import encode_png
from data_prep.render import AUGMENTS, BOLD_FONTS, PRINTED_FONTS, FontError, Span, compose, pick_font, text_mask
from data_prep.schema import Candidate
from data_prep.text import TextError, clean_text, read_transcript

UNITS = ("block", "line")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def samples(text: str, unit: str) -> list[str]:
    if unit not in UNITS:
        raise InputError(f"--unit {unit!r}: choose one of {', '.join(UNITS)}")
    if unit == "line":
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [clean_text(b) for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


def _spans(line: str, font: Path, bold_font: Path) -> tuple[list[Span], float]:
    """Drawable spans of one Markdown line (markup removed) and its size relative to body text."""
    scale = 1.0
    heading = re.match(r"^(#{1,6})\s+(.*)$", line)
    if heading:
        scale = 1.0 + 0.15 * (7 - len(heading.group(1))) / 2
        return [Span(heading.group(2), bold_font, bold=True)], scale
    spans, pos = [], 0
    for m in _BOLD.finditer(line):
        if m.start() > pos:
            spans.append(Span(line[pos:m.start()], font))
        spans.append(Span(m.group(1), bold_font, bold=True))
        pos = m.end()
    if pos < len(line):
        spans.append(Span(line[pos:], font))
    return [s for s in spans if s.text], scale


def render_sample(markdown: str, fonts: tuple[str, ...], augment: str, rng: random.Random) -> tuple[Image.Image, dict]:
    plain = _BOLD.sub(r"\1", markdown)
    font = pick_font(rng, fonts, re.sub(r"\s", "", plain) or "a")
    bold_font = pick_font(rng, BOLD_FONTS, re.sub(r"\s", "", plain) or "a")
    height = rng.randint(24, 44)
    masks = []
    for line in markdown.splitlines():
        spans, scale = _spans(line, font, bold_font)
        if spans:
            masks.append(text_mask(spans, int(height * scale), rng))
    width = max(m.width for m in masks)
    page = Image.new("L", (width, sum(m.height for m in masks)), 0)
    y = 0
    for m in masks:
        page.paste(m, (0, y))
        y += m.height
    return compose(page, rng, AUGMENTS[augment]), {"font": font.name, "height": height}


def iter_synthetic(corpus: Path, fonts: tuple[str, ...] = PRINTED_FONTS, augment: str = "light", seed: int = 0,
                   unit: str = "block") -> Iterator[Candidate]:
    corpus = Path(corpus)
    if augment not in AUGMENTS:
        raise InputError(f"--augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not corpus.is_file():
        raise InputError(f"--input {corpus}: the synthetic source renders a .txt or .md corpus file")
    try:
        text = read_transcript(corpus)
    except TextError as exc:
        raise InputError(str(exc)) from None
    rng = random.Random(seed)
    for i, markdown in enumerate(samples(text, unit)):
        rid = f"{corpus.stem}-{i:06d}"
        cand = Candidate(id=rid, image_path=None, markdown=markdown, group=rid, source="synthetic",
                         meta={"file": f"{corpus.name}#{i}", "augment": augment, "seed": seed})
        try:
            image, how = render_sample(markdown, fonts, augment, random.Random(rng.getrandbits(64)))
        except FontError as exc:
            cand.problem = f"{corpus.name} sample {i}: {exc}"
            yield cand
            continue
        cand.image_bytes = encode_png(image)
        cand.meta.update(how)
        yield cand
