"""Checkpoints and exact resume: a run killed with SIGKILL continues from its newest complete
checkpoint and ends bit-identical to an uninterrupted run, with the same sample order."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import MARKER, step_dirs
from tests.helpers import REPO, step_sample_ids, train_args, train_env

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


STEPS = 24


def _args(data, out, *extra):
    return train_args(data, out, STEPS, *extra)


_env, _ids = train_env, step_sample_ids


def test_sigkill_then_resume_is_bit_identical(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    done = subprocess.run(_args(tiny_dataset, full), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # rotation: only the newest two complete checkpoints remain, none incomplete
    assert [p.name for p in step_dirs(full / "checkpoints")] == ["step-000016", "step-000020"]
    assert all((p / MARKER).is_file() for p in step_dirs(full / "checkpoints"))
    assert sorted(p.name for p in (full / "checkpoints" / "step-000020").iterdir()) == [
        MARKER, "optimizer.pt", "rng-rank0.pt", "trainable.safetensors", "trainer_state.json"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_args(tiny_dataset, killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step-000008" / MARKER).is_file():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    # a checkpoint torn mid-write (no marker) is newer than every complete one: it must be ignored
    torn = killed / "checkpoints" / "step-000012"
    if torn.exists():
        shutil.rmtree(torn)
    torn.mkdir(parents=True)
    (torn / "trainable.safetensors").write_bytes(b"\x00" * 10)

    resumed = subprocess.run(_args(tiny_dataset, killed, "train.resume_from=latest"), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical
    assert _ids(killed) == _ids(full) and len(_ids(full)) == STEPS  # the same samples, in the same order
    assert not torn.exists()  # cleaned up once a newer checkpoint completed


def test_resume_refuses_another_run(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(_args(tiny_dataset, out, "train.max_steps=8"), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    other = subprocess.run(_args(tiny_dataset, out, "train.max_steps=8", "train.resume_from=latest", "train.seed=7"),
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "belongs to another run (seed differ)" in other.stderr
    forced = subprocess.run(_args(tiny_dataset, out, "train.max_steps=8", "train.resume_from=latest", "train.seed=7",
                                  "train.resume_force=true"), cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_two_cpu_processes_train_the_same_adapter_as_one(tiny_dataset, tmp_path):
    """torchrun --nproc_per_node 2 with batch 1 per process == one process with batch 2: the
    same samples per optimizer step, the loss normalised over all their tokens."""
    common = [str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={tiny_dataset}", "train.max_steps=6",
              "train.grad_accum=2", "train.mixed_precision=no", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "finetune.train", *common, "train.batch_size=2",
                          f"output_dir={tmp_path / 'one'}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "finetune.train",
                          *common, "train.batch_size=1", f"output_dir={tmp_path / 'two'}"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["processes"] == 2
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    ids_one = [sorted(x) for x in _ids(tmp_path / "one")]
    ids_two = [sorted(x) for x in _ids(tmp_path / "two")]
    assert ids_one == ids_two  # the same samples in every optimizer step
