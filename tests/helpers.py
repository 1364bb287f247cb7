"""Test data the tests make themselves: rendered text lines and folders of scans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_prep.sample import line_text, make_folder, render_line  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
TINY = "builtin:tiny-random-deepseek-ocr-2"


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
