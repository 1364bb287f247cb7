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


def wandb_records(path: Path) -> list:
    """The protobuf Records in a wandb run file (`run-ID.wandb`), read without wandb's own
    reader (removed from the Python package in 0.2x). The file is a LevelDB-style log: a
    7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each
    [crc32 (4) | length (2, LE) | type (1): 1 full, 2 first, 3 middle, 4 last | data]."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path}: not a wandb run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        length = int.from_bytes(raw[pos + 4 : pos + 6], "little")
        kind = raw[pos + 6]
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path: Path) -> list[dict]:
    """The rows logged with wandb.log / accelerator.log, in order, as {key: value}."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def train_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def train_args(data, out, steps: int, *extra) -> list[str]:
    """`python -m finetune.train` on the tiny smoke config with checkpoints every 4 steps
    (batch 2 x accumulation 2): the run the resume and fault tests interrupt."""
    return [sys.executable, "-m", "finetune.train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={data}",
            f"output_dir={out}", f"train.max_steps={steps}", "train.batch_size=2", "train.grad_accum=2",
            "train.save_steps=4", "train.save_total_limit=2", "--no-progress", *extra]


def step_sample_ids(out: Path) -> list[list[str]]:
    """Each logged step's sample ids, from OUTPUT_DIR/metrics.jsonl."""
    return [r["sample_ids"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())]
