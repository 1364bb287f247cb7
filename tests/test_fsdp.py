"""FSDP2 on 2 CPU processes (gloo) through `accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml`:
the same training as one process at the same global batch, the weights gathered whole and
written once by the main process, and sharded checkpoints that resume bit-identically.

Tolerances, one process (batch 2) against two FSDP processes (batch 1 each), same 4 samples
per optimizer step: the sums run in another order (two padded-to-their-own-length batches
whose gradients FSDP averages by reduce-scatter, against one batch padded to the longer
page), so float32 rounding differs from the first step on. Per-step loss: relative 1e-5
(rounding of ~1e-7 per operation, a few steps of drift). LoRA weights: atol 1e-5, rtol 1e-4,
as the DDP test. Whole-model training (preset full): Adam divides each update by the root
of its own squared gradient, so a weight whose gradient nearly cancels across samples (deep
in the random tiny vision tower) moves by about lr whatever its rounding; there the two runs
are compared by how far they moved the weights: the difference is under 1e-3 of the update.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import MARKER, step_dirs
from tests.helpers import REPO, TINY, step_sample_ids, train_env
from tests.jobs import kill_job, run_job


def _old_accelerate() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    from finetune.distributed import FSDP2_MIN_ACCELERATE

    return Version(version("accelerate")) < Version(FSDP2_MIN_ACCELERATE)


pytestmark = [
    pytest.mark.integration,  # CLI subprocesses, training and generation runs
    # CI's lowest-versions pass: train refuses FSDP there, naming the version (finetune/distributed.py)
    pytest.mark.skipif(_old_accelerate(), reason="FSDP needs a newer accelerate (distributed.FSDP2_MIN_ACCELERATE)"),
]

TINY_V1 = "builtin:tiny-random-deepseek-ocr"
FSDP_CPU = REPO / "configs/accelerate/fsdp_cpu.yaml"
STEPS = 4


def _train(data, out, model, steps, *extra) -> list[str]:
    return ["-m", "finetune.train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={data}",
            f"output_dir={out}", f"model.name={model}", f"train.max_steps={steps}", "train.grad_accum=2",
            "train.mixed_precision=no", "--no-progress", *extra]


def one_process(data, out, model, steps, *extra) -> list[str]:
    return [sys.executable, *_train(data, out, model, steps, "train.batch_size=2", *extra)]


def fsdp(data, out, model, steps, *extra) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml -m finetune.train ...`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU),
            *_train(data, out, model, steps, "train.batch_size=1", *extra)]


_run = run_job


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _same_training(one, two):
    """Per-step loss within rounding, and the same samples in every optimizer step."""
    a, b = _records(one), _records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert sorted(y["sample_ids"]) == sorted(x["sample_ids"]), x["step"]
    summary = json.loads((two / "train_summary.json").read_text())
    assert (summary["processes"], summary["topology"]) == (2, "FSDP")


@pytest.mark.parametrize("model, preset", [(TINY, "attention+mlp"), (TINY, "all"), (TINY_V1, "all")],
                         ids=["ocr2", "ocr2-experts", "v1-experts"])
def test_fsdp_lora_trains_like_one_process(tiny_dataset, tmp_path, model, preset):
    """preset all adds LoRA on the routed experts (PEFT target_parameters on the stacked
    expert tensors), which the adapter stores per expert from the gathered state."""
    one, two = tmp_path / "one", tmp_path / "fsdp"
    done = _run(one_process(tiny_dataset, one, model, STEPS, f"lora.preset={preset}"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(fsdp(tiny_dataset, two, model, STEPS, f"lora.preset={preset}"))
    assert done.returncode == 0, done.stderr[-3000:]
    _same_training(one, two)
    # Written once, whole, by the main process: one adapter folder, no staging folder left.
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "config.yaml", "metrics.jsonl", "train_summary.json"]
    assert sorted(p.name for p in (two / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "ocrtune_adapter.json"]
    a = load_file(str(one / "adapter/adapter_model.safetensors"))
    b = load_file(str(two / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].shape == a[k].shape and torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    _loads(model, two / "adapter", len(b), plain_peft=preset != "all")


def _loads(model_name, adapter_dir, n_tensors, plain_peft: bool):
    """OCR-2 without expert LoRA: plain PEFT on transformers' class; otherwise ocrtune's loader
    (it checks every tensor landed; plain PEFT skips per-expert pairs on fused experts)."""
    from finetune.models import load_model, resolve_model

    if model_name == TINY_V1 or not plain_peft:
        from finetune.lora import load_adapter

        resolved, base, _ = load_model(model_name)
        load_adapter(base, adapter_dir, "adapted", resolved.family)
        return
    from peft import PeftModel
    from transformers import DeepseekOcr2ForConditionalGeneration

    base = DeepseekOcr2ForConditionalGeneration.from_pretrained(str(resolve_model(model_name).path))
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora) == n_tensors
    # B starts at zero: every B non-zero means every trained tensor reached the model.
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)


@pytest.mark.parametrize("model", [TINY, TINY_V1], ids=["ocr2", "v1"])
def test_fsdp_full_preset_writes_the_published_layout_like_one_process(tiny_dataset, tmp_path, model):
    from finetune.models import load_model, resolve_model

    one, two = tmp_path / "one", tmp_path / "fsdp"
    extra = ("lora.preset=full", "train.lr=1e-3")
    done = _run(one_process(tiny_dataset, one, model, STEPS, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(fsdp(tiny_dataset, two, model, STEPS, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    _same_training(one, two)
    # The family's published layout, as one process writes it: same files, config and tensor names.
    assert sorted(p.name for p in (two / "model").iterdir()) == sorted(p.name for p in (one / "model").iterdir())
    assert json.loads((two / "model/config.json").read_text()) == json.loads((one / "model/config.json").read_text())
    a = load_file(str(one / "model/model.safetensors"))
    b = load_file(str(two / "model/model.safetensors"))
    base = load_file(str(resolve_model(model).path / "model.safetensors"))
    assert a.keys() == b.keys() == base.keys()
    moved = sum(float(((a[k] - base[k]) ** 2).sum()) for k in a) ** 0.5
    apart = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved
    resolved, _, _ = load_model(str(two / "model"))
    assert resolved.family.MODEL_TYPE == resolve_model(model).family.MODEL_TYPE


def test_fsdp_refuses_validation_during_training(tiny_dataset, tmp_path):
    done = _run(fsdp(tiny_dataset, tmp_path / "val", TINY, STEPS, "validation.every_steps=2"))
    assert done.returncode == 1  # torchrun ends with 1 when a worker fails; the worker itself exits 2
    assert "validation.every_steps=2: validation during training is not supported under FSDP" in done.stderr
    assert "exitcode  : 2" in done.stderr


# --- sharded checkpoints ---------------------------------------------------------------------

CKPT_STEPS = 8
CKPT = ("train.save_steps=2", "train.save_total_limit=2")


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-ckpt") / "full"
    done = _run(fsdp(tiny_dataset, out, TINY, CKPT_STEPS, *CKPT))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_fsdp_checkpoints_are_sharded_per_process_with_marker_and_rotation(uninterrupted):
    assert [p.name for p in step_dirs(uninterrupted / "checkpoints")] == ["step-000004", "step-000006"]
    newest = uninterrupted / "checkpoints/step-000006"
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    shards = [".metadata", "__0_0.distcp", "__1_0.distcp"]  # torch.distributed.checkpoint: one file per process
    assert files == [MARKER, *(f"optimizer_0/{s}" for s in shards), *(f"pytorch_model_fsdp_0/{s}" for s in shards),
                     "random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert (state["step"], state["processes"], state["sharded"]) == (6, 2, True)


def test_fsdp_sigkill_then_resume_is_bit_identical(tiny_dataset, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    args = fsdp(tiny_dataset, killed, TINY, CKPT_STEPS, *CKPT)
    proc = subprocess.Popen(args, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (killed / "checkpoints/step-000002" / MARKER).is_file():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    kill_job(proc)  # the launcher and both workers, as a dying machine
    assert not (killed / "adapter").exists()
    # a checkpoint torn mid-write (no marker) is newer than every complete one: it must be ignored
    torn = killed / "checkpoints/step-000007"
    torn.mkdir(parents=True)
    (torn / "random_states_0.pkl").write_bytes(b"\x00" * 10)

    resumed = _run(fsdp(tiny_dataset, killed, TINY, CKPT_STEPS, *CKPT, "train.resume_from=latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(str(uninterrupted / "adapter/adapter_model.safetensors"))
    b = load_file(str(killed / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical
    assert step_sample_ids(killed) == step_sample_ids(uninterrupted) and len(step_sample_ids(killed)) == CKPT_STEPS
    assert [r["loss"] for r in _records(killed)] == [r["loss"] for r in _records(uninterrupted)]
    assert not torn.exists()  # cleaned up once a newer checkpoint completed


def test_sharded_checkpoint_resumes_only_with_the_world_size_that_wrote_it(tiny_dataset, uninterrupted, tmp_path):
    out = tmp_path / "other-size"
    shutil.copytree(uninterrupted, out)
    # resume_force does not help: each process restores its own shard, RNG and share of the data
    one = _run(one_process(tiny_dataset, out, TINY, CKPT_STEPS, *CKPT, "train.resume_from=latest",
                           "train.resume_force=true"))
    assert one.returncode == 2, one.stderr[-3000:]
    assert (f"train.resume_from {out / 'checkpoints/step-000006'}: written by 2 processes (sharded), this run has "
            "1 process. A sharded checkpoint (FSDP, DeepSpeed) resumes only with the topology and number of "
            "processes that wrote it: launch with the same accelerate config and --num_processes 2") in one.stderr
    assert sorted(os.listdir(out / "checkpoints")) == sorted(os.listdir(uninterrupted / "checkpoints"))  # untouched
