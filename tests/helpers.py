"""Test data the tests make themselves: rendered text lines and folders of scans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
TINY = "builtin:tiny-random-deepseek-ocr-2"

WORDS = ["line", "date", "total", "name", "invoice", "phone", "note", "item"]


def line_text(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} {i}"


def render_line(text: str, width: int = 220, height: int = 48) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(im).text((6, 14), text, fill="black")
    return im


def make_folder(root: Path, n: int, orphans: tuple[int, ...] = ()) -> Path:
    """n rendered line images with .md transcripts; indices in `orphans` get no transcript."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = line_text(i)
        render_line(text).save(root / f"page_{i:03d}.png")
        if i not in orphans:
            (root / f"page_{i:03d}.md").write_text(text + "\n", encoding="utf-8")
    return root


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `ocrtune ARGS` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def tree(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))
