"""Faults during training: SIGTERM, a non-finite loss, a full disk. Each leaves a run that
resumes to exactly the uninterrupted result, and never a broken checkpoint or best/."""

import hashlib
import json
import math
import resource
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import MARKER, step_dirs
from finetune.faults import SIGTERM_EXIT
from tests.helpers import REPO, TINY, step_sample_ids, train_args, train_env

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


STEPS = 16


def _args(data, out, *extra):
    return train_args(data, out, STEPS, *extra)


_env, _ids = train_env, step_sample_ids


def _run(args, **kw):
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, **kw)


def _same_adapter(a_dir, b_dir):
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    done = _run(_args(tiny_dataset, out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_sigterm_writes_a_checkpoint_exits_143_and_resumes_bit_identical(tiny_dataset, reference, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(_args(tiny_dataset, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:  # off the save grid: step 5 is not a multiple of save_steps
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        assert proc.poll() is None, "training ended before it could be signalled"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == SIGTERM_EXIT, stderr[-2000:]
    stopped_at = len(_ids(out))
    assert stopped_at < STEPS
    assert f"SIGTERM at step {stopped_at}" in stderr and "train.resume_from=latest" in stderr
    newest = step_dirs(out / "checkpoints")[-1]
    assert newest.name == f"step-{stopped_at:06d}" and (newest / MARKER).is_file()
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == stopped_at
    assert not (out / "adapter").exists()

    resumed = _run(_args(tiny_dataset, out, "train.resume_from=latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at}" in resumed.stdout + resumed.stderr
    assert _same_adapter(reference / "adapter", out / "adapter")
    assert _ids(out) == _ids(reference)


def _poisoned_model(tmp_path, tiny_dataset):
    """A copy of the tiny model whose embedding row for one token is NaN, the token chosen
    so that exactly one training sample contains it: the loss turns NaN at the step that
    draws that sample, and at no other."""
    from datasets import load_from_disk

    from finetune.models import load_model

    _, model, processor = load_model(TINY)
    rows = load_from_disk(str(tiny_dataset))
    tok = processor.tokenizer
    token_sets = {r["id"]: set(tok(r["markdown"], add_special_tokens=False)["input_ids"]) for r in rows["train"]}
    elsewhere = set()
    for split in ("validation", "test"):
        for r in rows[split]:
            elsewhere |= set(tok(r["markdown"], add_special_tokens=False)["input_ids"])
    for rid, ids in token_sets.items():
        others = set().union(*(s for k, s in token_sets.items() if k != rid)) | elsewhere
        unique = sorted(ids - others)
        if unique:
            break
    else:
        pytest.skip("no token occurs in exactly one training sample")
    with torch.no_grad():
        model.get_input_embeddings().weight[unique[0]] = float("nan")
    path = tmp_path / "poisoned"
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path, rid


def test_nan_loss_stops_within_the_step_and_is_never_saved(tiny_dataset, tmp_path):
    model_dir, poisoned_id = _poisoned_model(tmp_path, tiny_dataset)
    out = tmp_path / "nan"
    done = _run(_args(tiny_dataset, out, f"model.name={model_dir}", "train.save_steps=1", "train.save_total_limit=50",
                      "validation.every_steps=1", "validation.max_samples=2", "validation.max_new_tokens=8"))
    assert done.returncode == 2, done.stderr[-2000:]
    # The step that drew the poisoned sample is named, with the sample, and nothing of it landed.
    records = list(map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    bad_step = len(records) + 1
    assert f"step {bad_step}: loss nan" in done.stderr and poisoned_id in done.stderr
    assert "stopped before the optimizer applied it" in done.stderr
    assert all(poisoned_id not in r["sample_ids"] for r in records)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]) for r in records)
    assert [p.name for p in step_dirs(out / "checkpoints")] == [f"step-{s:06d}" for s in range(1, bad_step)]
    for ckpt in step_dirs(out / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())
    if bad_step > 1:  # best/ comes from a finished step, never from the NaN one
        meta = json.loads((out / "best" / "ocrtune_adapter.json").read_text())
        assert meta["steps"] < bad_step
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "best" / "adapter_model.safetensors")).values())
    assert not (out / "adapter").exists() and not (out / "train_summary.json").exists()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_dataset, reference, tmp_path):
    """A real write failure from the OS: RLIMIT_FSIZE caps every file the process writes at
    50 kB, so the checkpoint's optimizer state (~84 kB) cannot be written (EFBIG)."""
    out = tmp_path / "full-disk"
    shutil.copytree(reference, out)
    for extra in ("adapter", "train_summary.json"):
        shutil.rmtree(out / extra) if (out / extra).is_dir() else (out / extra).unlink()
    shutil.rmtree(out / "checkpoints" / "step-000012")  # resume from step 8; the next save is step 12
    previous = out / "checkpoints" / "step-000008"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in previous.iterdir()}
    assert (previous / "optimizer.pt").stat().st_size > 50_000

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    failed = _run(_args(tiny_dataset, out, "train.resume_from=latest"), preexec_fn=cap)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "could not write checkpoint" in failed.stderr and "step-000012" in failed.stderr
    assert f"the previous complete checkpoint {previous} is intact" in failed.stderr
    assert "File too large" in failed.stderr  # the OS's own error, passed on
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step-000008"]  # the partial one is gone
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in previous.iterdir()} == before
    assert not (out / "adapter").exists()

    again = _run(_args(tiny_dataset, out, "train.resume_from=latest"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert _same_adapter(reference / "adapter", out / "adapter")
    assert _ids(out) == _ids(reference)
