"""Logging: metrics.jsonl always, wandb in offline mode with no network, validation during
training through eval's decoding, best/ by validation CER, early stopping, and no token
value anywhere a run writes."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_cli, wandb_history, wandb_records

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


TOKEN = "hf_ocrtuneTestSecret0123456789abcdefXYZ"


def _train(data, out, *extra, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HF_TOKEN": TOKEN,
           "HUGGING_FACE_HUB_TOKEN": TOKEN, "WANDB_API_KEY": "0" * 40, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "finetune.train", str(REPO / "configs/runs/tiny_smoke.yaml"),
                           f"data.path={data}", f"output_dir={out}", "--no-progress", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_wandb_offline_run_has_the_metrics_and_no_token_is_written_anywhere(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    done = _train(tiny_dataset, out, "train.max_steps=6", "report_to=[wandb]", "validation.every_steps=3",
                  "validation.max_samples=3", "validation.max_new_tokens=12")
    assert done.returncode == 0, done.stderr[-3000:]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == [1, 2, 3, 4, 5, 6]
    local = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for logged, mine in zip(history, local):  # the same numbers as metrics.jsonl
        assert logged["loss"] == mine["loss"] and logged["lr"] == mine["lr"]
    assert [h["_step"] for h in history if "val_cer" in h] == [3, 6]
    assert [h["val_cer"] for h in history if "val_cer" in h] == [r["val_cer"] for r in local if "val_cer" in r]
    config = next(r.config for r in wandb_records(run_file) if r.WhichOneof("record_type") == "config")
    keys = {item.key for item in config.update}
    assert {"model", "data", "lora", "train", "validation", "versions"} <= keys  # resolved config + versions

    # best/ is the adapter of the best validation CER so far, with its numbers
    summary = json.loads((out / "train_summary.json").read_text())
    best_step = min((r for r in local if "val_cer" in r), key=lambda r: r["val_cer"])["step"]
    assert summary["best_validation"]["step"] == best_step
    meta = json.loads((out / "best" / "ocrtune_adapter.json").read_text())
    assert meta["steps"] == best_step and meta["validation"]["samples"] == 3

    # Everything the run wrote, plus the card and files `ocrtune push` would upload.
    preview = tmp_path / "push-preview"
    pushed = run_cli("push", str(out / "adapter"), "--repo-id", "me/tracking-test", "--dry-run", str(preview))
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    scanned = [p for root in (out, preview) for p in root.rglob("*") if p.is_file()]
    assert len(scanned) > 15
    leaks = [str(p) for p in scanned if TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    assert TOKEN not in done.stdout + done.stderr


def test_early_stopping_stops_at_the_patience_and_keeps_best(tiny_dataset, tmp_path):
    """lr=0 never improves the validation CER after the first validation: with patience 2 the
    run stops at the third validation (step 6 of 40) and best/ is from step 2."""
    out = tmp_path / "early"
    done = _train(tiny_dataset, out, "train.max_steps=40", "train.lr=0", "validation.every_steps=2",
                  "validation.max_samples=2", "validation.max_new_tokens=8", "validation.early_stopping_patience=2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stopped"] == "early_stopping" and summary["steps"] == 6
    assert summary["best_validation"]["step"] == 2
    assert json.loads((out / "adapter" / "ocrtune_adapter.json").read_text())["steps"] == 6
    assert json.loads((out / "best" / "ocrtune_adapter.json").read_text())["steps"] == 2
    assert "early stopping at step 6" in done.stdout + done.stderr


def test_validation_split_missing_is_named_before_training(tiny_dataset, tmp_path):
    done = _train(tiny_dataset, tmp_path / "x", "validation.every_steps=2", "validation.split=dev")
    assert done.returncode == 2
    assert "validation.split 'dev'" in done.stderr and "validation (3)" in done.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
