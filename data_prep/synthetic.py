"""Synthetic OCR pages: lines of dates, amounts, phone numbers, names and `**Label:** value`
form fields, rendered in a domain's fonts with scan-like augmentation.

    python -m data_prep.synthetic --domain handwriting --n 1000 --seed 1 --output runs/hw-scans
    ocrtune data build --source manifest --input runs/hw-scans/manifest.jsonl --output runs/hw-data

Writes OUTPUT/images/NNNNN.png and OUTPUT/manifest.jsonl (image, markdown, id, group, and
how each line was drawn), the input the `manifest` source reads.

Domains:
  printed      computer fonts (DejaVu, STIX), light augmentation: what the tiny bases are
               pretrained on first.
  printed-scan the same plus 15 Google Fonts families from PyPI, under the handwriting
               domain's scanner degradation: the v1 base's second and third pretraining stages.
  handwriting  hand-drawn fonts from PyPI and real handwritten digits (scikit-learn's copy
               of the UCI digits, 8x8 scans by dozens of writers) composed into numbers,
               with scanner-like augmentation. Printed bold labels stay printed, as on a
               filled-in form.

Real handwritten digits are split into shards of consecutive scans, and every line drawn
from a shard carries the shard as its `group`: the dataset builder keeps a group inside
one split, so no digit scan seen in training appears in the test split.
"""

from __future__ import annotations

import argparse
import calendar
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.atomic import replace_dir
from data_prep.errors import ExistingPathError, InputError
from data_prep.images import encode_png
from data_prep.render import (
    AUGMENTS,
    BOLD_FONTS,
    HANDWRITING_FONTS,
    PRINTED_FONTS,
    TYPESET_FONTS,
    FontError,
    Span,
    capitals_only,
    compose,
    paste_glyphs,
    pick_font,
    text_glyph,
    text_mask,
)

FIRST = ("Anna", "Ben", "Clara", "David", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kofi", "Lena",
         "Marta", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe")
LAST = ("Smith", "Novak", "Garcia", "Khan", "Muller", "Rossi", "Okafor", "Silva", "Tanaka", "Dubois", "Larsen",
        "Kowalski", "Haddad", "Byrne", "Ivanova", "Moreau", "Jensen", "Costa", "Weber", "Nakamura")
WORDS = ("invoice", "receipt", "total", "paid", "balance", "account", "order", "delivery", "address", "street",
         "road", "office", "coffee", "bread", "milk", "water", "paper", "ticket", "train", "hotel", "dinner",
         "lunch", "taxi", "rent", "deposit", "refund", "notes", "meeting", "call", "review", "draft", "final",
         "copy", "signed", "received", "approved", "pending", "urgent", "monday", "friday", "march", "july",
         "north", "south", "garden", "school", "market", "station", "bank", "card", "cash", "tax", "fee", "net")
LABELS = {
    "date": ("Date", "Due", "Issued", "Born"),
    "amount": ("Total", "Amount", "Paid", "Balance", "Tax"),
    "phone": ("Phone", "Tel", "Mobile", "Fax"),
    "name": ("Name", "Signed", "Client", "From"),
    "number": ("Invoice", "Account", "Order", "Ref"),
}
NUMERIC_KINDS = ("date", "amount", "phone", "number")


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    fmt = rng.choice(("dmy/", "dmy.", "ymd-", "dmy/short", "words"))
    if fmt == "dmy/":
        return f"{d:02d}/{m:02d}/{y}"
    if fmt == "dmy.":
        return f"{d:02d}.{m:02d}.{y}"
    if fmt == "ymd-":
        return f"{y}-{m:02d}-{d:02d}"
    if fmt == "dmy/short":
        return f"{d}/{m}/{y % 100:02d}"
    return f"{d} {calendar.month_name[m]} {y}"


def _amount(rng: random.Random) -> str:
    value = rng.choice((rng.uniform(0.5, 99), rng.uniform(100, 9999), rng.uniform(1000, 99999)))
    text = f"{value:,.2f}"
    return rng.choice((text, "$" + text, text + " EUR", text + " USD"))


def _phone(rng: random.Random) -> str:
    digits = lambda n: "".join(str(rng.randint(0, 9)) for _ in range(n))  # noqa: E731
    return rng.choice((
        f"+{rng.randint(1, 49)} {digits(2)} {digits(4)} {digits(4)}",
        f"({digits(3)}) {digits(3)}-{digits(4)}",
        f"{digits(3)}-{digits(4)}",
        f"0{digits(3)} {digits(6)}",
    ))


def _number(rng: random.Random) -> str:
    return rng.choice((str(rng.randint(100, 999999)), f"{rng.randint(10, 99)}-{rng.randint(1000, 99999)}"))


CODE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789" * 3 + "#-/.:+()&%"


def _code(rng: random.Random) -> str:
    """A reference code of random characters: no language prior helps, only reading does."""
    return "".join(rng.choice(CODE_CHARS) for _ in range(rng.randint(3, 10)))


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _words(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    return " ".join(words)


VALUES: dict[str, Callable[[random.Random], str]] = {
    "date": _date, "amount": _amount, "phone": _phone, "number": _number, "name": _name, "words": _words,
    "code": _code,
}


@dataclass(frozen=True)
class Line:
    label: str | None  # printed bold label ("Date:"), or None for a bare value
    value: str
    kind: str

    @property
    def markdown(self) -> str:
        return f"**{self.label}** {self.value}" if self.label else self.value


def random_line(rng: random.Random, code_share: float, max_chars: int | None = None) -> Line:
    """A line of a random kind; `code_share` of them are random-character codes.

    With `max_chars`, lines are drawn again until they fit (codes are cut to fit): short
    lines fill the view with large glyphs, an easy first stage when pretraining.
    """
    while True:
        kind = "code" if rng.random() < code_share else rng.choice(tuple(k for k in VALUES if k != "code"))
        value = VALUES[kind](rng)
        if kind == "code" and max_chars is not None:
            value = value[: rng.randint(1, max_chars)]
        label = None
        if kind in LABELS and rng.random() < 0.5:
            label = rng.choice(LABELS[kind]) + ":"
        line = Line(label, value, kind)
        if max_chars is None or len(line.markdown) <= max_chars:
            return line


@dataclass(frozen=True)
class Domain:
    """How a domain draws its lines."""

    value_fonts: tuple[str, ...]  # fonts for the written value
    label_fonts: tuple[str, ...]  # fonts for printed bold labels
    real_digit_share: float  # share of numeric lines drawn with real handwritten digit scans
    augment: str  # none | light | scan
    # Share of random-character codes. Pretraining needs many: with only dates and names
    # a model first learns to guess plausible lines and is slow to start reading.
    code_share: float


DOMAINS = {
    "printed": Domain(PRINTED_FONTS, BOLD_FONTS, 0.0, "light", code_share=0.4),
    # Printed text in 22 typefaces with the handwriting domain's scanner degradation: a base
    # pretrained on it reads noisy, blurred, faded print, so on the handwriting domain what
    # it lacks is the hands, the shift an adapter is there to learn.
    "printed-scan": Domain(PRINTED_FONTS + TYPESET_FONTS, BOLD_FONTS, 0.0, "scan", code_share=0.4),
    "handwriting": Domain(HANDWRITING_FONTS, BOLD_FONTS, 0.5, "scan", code_share=0.15),
}


class DigitScans:
    """scikit-learn's handwritten digits (shipped inside the package: no download), in shards."""

    def __init__(self, shard_size: int = 60):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = digits.images  # (1797, 8, 8), ink 0..16
        self.targets = digits.target
        n = len(self.targets)
        self.shards = [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
        if len(self.shards) > 1 and len(self.shards[-1]) < shard_size // 2:  # fold a short tail in
            tail = self.shards.pop()
            self.shards[-1] = range(self.shards[-1].start, tail.stop)
        self.by_shard = [
            {d: [i for i in shard if self.targets[i] == d] for d in range(10)} for shard in self.shards
        ]

    def glyph(self, shard: int, digit: int, height: int, rng: random.Random) -> Image.Image:
        pool = self.by_shard[shard][digit] or [i for s in self.by_shard for i in s[digit]]
        scan = self.images[rng.choice(pool)] / 16.0
        h = int(height * rng.uniform(0.62, 0.78))
        w = max(int(h * rng.uniform(0.6, 0.8)), 2)
        ink = Image.fromarray((np.clip((scan - 0.1) * 1.3, 0, 1) * 255).astype(np.uint8), "L")
        out = Image.new("L", (w, height), 0)
        out.paste(ink.resize((w, h), Image.BICUBIC), (0, int(height * 0.78) - h))
        return out


def render_line(line: Line, domain: Domain, rng: random.Random,
                digits: DigitScans | None) -> tuple[Image.Image, Line, dict]:
    """One line -> (RGB image, the line as drawn, how it was drawn).

    The line comes back changed only when its value's font draws capitals alone (see
    render.CAPITALS_ONLY): then the value is written, and its Markdown given, in capitals.
    """
    height = rng.randint(24, 44)
    label_font = pick_font(rng, domain.label_fonts, line.label) if line.label else None
    use_scans = (
        digits is not None
        and line.kind in NUMERIC_KINDS
        and any(ch.isdigit() for ch in line.value)
        and rng.random() < domain.real_digit_share
    )
    if use_scans:
        shard = rng.randrange(len(digits.shards))
        sep_font = pick_font(rng, domain.value_fonts, "".join(ch for ch in line.value if not ch.isdigit()) or "0")
        if capitals_only(sep_font):
            line = replace(line, value=line.value.upper())
        glyphs, gaps = [], []
        if line.label:
            glyphs.append(text_glyph(line.label, label_font, height))
            gaps.append(height * 0.4)
        for ch in line.value:
            if ch == " ":
                if gaps:
                    gaps[-1] += height * rng.uniform(0.25, 0.45)
                continue
            glyphs.append(digits.glyph(shard, int(ch), height, rng) if ch.isdigit() else text_glyph(ch, sep_font, height))
            gaps.append(height * rng.uniform(0.02, 0.12))
        mask = paste_glyphs(glyphs, gaps, height, rng)
        how = {"kind": line.kind, "digits_shard": shard, "font": sep_font.name}
    else:
        value_font = pick_font(rng, domain.value_fonts, line.value)
        if capitals_only(value_font):
            line = replace(line, value=line.value.upper())
        spans = ([Span(line.label + " ", label_font, bold=True)] if line.label else []) + [Span(line.value, value_font)]
        mask = text_mask(spans, height, rng)
        how = {"kind": line.kind, "font": value_font.name}
    return compose(mask, rng, AUGMENTS[domain.augment]), line, how


def _render_shard(job: tuple) -> list[dict]:
    """Render lines [start, stop) of a domain with their own seeded RNG into `folder`/images."""
    domain_name, rng_seed, start, stop, width, folder, max_chars, progress = job
    from tqdm.auto import tqdm

    domain = DOMAINS[domain_name]
    rng = random.Random(rng_seed)
    digits = DigitScans() if domain.real_digit_share > 0 else None
    rows = []
    for i in tqdm(range(start, stop), desc=f"render {domain_name}", unit="img", disable=not progress):
        line = random_line(rng, domain.code_share, max_chars)
        image, line, how = render_line(line, domain, rng, digits)
        rel = f"images/{i:0{width}d}.png"
        (Path(folder) / rel).write_bytes(encode_png(image))
        group = f"digits-shard-{how['digits_shard']}" if "digits_shard" in how else f"{domain_name}-{i:0{width}d}"
        rows.append({"image": rel, "markdown": line.markdown, "id": f"{domain_name}-{i:0{width}d}", "group": group,
                     "domain": domain_name, **how})
    return rows


def generate(domain_name: str, n: int, seed: int, output: str | Path, progress: bool = True,
             max_chars: int | None = None, shards: int = 1, workers: int | None = None) -> Path:
    """Render `n` lines of a domain into OUTPUT (images/ + manifest.jsonl), atomically.

    `shards` > 1 cuts the lines into that many consecutive blocks, each drawn from its own
    RNG seeded by (seed, shard), and renders them on `workers` processes (default: one per
    core). The pixels depend on (seed, n, shards) only, never on the number of workers;
    `shards=1` is one RNG seeded by `seed`, as before shards existed.
    """
    if domain_name not in DOMAINS:
        raise InputError(f"--domain {domain_name!r}: choose one of {', '.join(DOMAINS)}")
    if n < 1:
        raise InputError(f"--n {n}: must be at least 1")
    if max_chars is not None and max_chars < 1:
        raise InputError(f"--max-chars {max_chars}: must be at least 1")
    if not 1 <= shards <= n:
        raise InputError(f"--shards {shards}: choose 1 to --n ({n})")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: must be at least 1")
    output = Path(output)
    if output.exists():
        raise ExistingPathError(f"--output {output} already exists")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:  # a failed or interrupted render leaves nothing behind
        (staging / "images").mkdir()
        width = max(5, len(str(n - 1)))  # ids and file names sort in line order
        if shards == 1:
            rows = _render_shard((domain_name, seed, 0, n, width, str(staging), max_chars, progress))
        else:
            # str seeds are hashed deterministically (not by PYTHONHASHSEED)
            bounds = [n * k // shards for k in range(shards + 1)]
            jobs = [(domain_name, f"{seed}:{k}", bounds[k], bounds[k + 1], width, str(staging), max_chars,
                     False)
                    for k in range(shards)]
            procs = min(workers or os.cpu_count() or 1, shards)
            if procs == 1:
                parts = [_render_shard(job) for job in jobs]
            else:
                with multiprocessing.get_context("spawn").Pool(procs) as pool:
                    parts = pool.map(_render_shard, jobs)
            rows = [row for part in parts for row in part]
        (staging / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        replace_dir(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, choices=sorted(DOMAINS))
    parser.add_argument("--n", type=int, required=True, help="number of lines to render")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max-chars", type=int, default=None, help="only lines of at most this many characters")
    parser.add_argument("--shards", type=int, default=1,
                        help="blocks of lines with their own seeded RNG, rendered in parallel (output depends on it)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes rendering the shards (default one per core; output does not depend on it)")
    args = parser.parse_args(argv)
    try:
        generate(args.domain, args.n, args.seed, args.output, max_chars=args.max_chars, shards=args.shards,
                 workers=args.workers)
    except (ValueError, FileExistsError, FontError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} {args.domain} lines to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
