"""Render sample scans (text lines + .md transcripts) to try ocrtune without data of your own.

    python -m data_prep.sample --output runs/sample-scans --n 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

WORDS = ["line", "date", "total", "name", "invoice", "phone", "note", "item"]


def line_text(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} {i}"


def render_line(text: str, width: int = 220, height: int = 48) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(im).text((6, 14), text, fill="black")
    return im


def make_folder(root: Path, n: int, orphans: tuple[int, ...] = ()) -> Path:
    """n rendered line images with .md transcripts; indices in `orphans` get no transcript."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = line_text(i)
        render_line(text).save(root / f"page_{i:03d}.png")
        if i not in orphans:
            (root / f"page_{i:03d}.md").write_text(text + "\n", encoding="utf-8")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--n", type=int, default=60)
    args = parser.parse_args(argv)
    make_folder(args.output, args.n)
    print(f"wrote {args.n} pages to {args.output}")


if __name__ == "__main__":
    main()
