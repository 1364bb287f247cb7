"""DeepSpeed ZeRO through the shipped configs/accelerate/deepspeed_zero{2,3}.yaml, on 2 CPU
processes: DeepSpeed's CPU accelerator runs ZeRO over gloo. Without the deepspeed package,
selecting it names the install command.

Tolerance against one process at the same global batch: as the FSDP tests (float32 sums in
another order: loss relative 1e-5, LoRA weights atol 1e-5, rtol 1e-4). Both sides use the plain
loss (train.loss_chunk_tokens=0), which ZeRO-3 needs.
"""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, run_cli, step_sample_ids, train_env
from tests.jobs import run_job

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
TINY_V1 = "builtin:tiny-random-deepseek-ocr"
STEPS = 4


def _train(data, out, *extra) -> list[str]:
    return ["-m", "finetune.train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={data}",
            f"output_dir={out}", f"model.name={TINY_V1}", f"train.max_steps={STEPS}", "train.grad_accum=2",
            "train.mixed_precision=no", "train.loss_chunk_tokens=0", "--no-progress", *extra]


def _zero(stage: int, data, out, *extra) -> list[str]:
    """The shipped config with what differs on this machine: 2 processes, fp32, accumulation 2."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / f"configs/accelerate/deepspeed_zero{stage}.yaml"), "--num_processes", "2",
            "--mixed_precision", "no", "--gradient_accumulation_steps", "2",
            *_train(data, out, "train.batch_size=1", *extra)]


def _run(args, env=None):
    return run_job(args, env=env)


@pytest.mark.skipif(HAVE_DEEPSPEED, reason="checks the message for a machine without deepspeed")
def test_deepspeed_selected_without_the_package_names_the_install_command(tiny_dataset, tmp_path):
    # What `accelerate launch` puts into every process it starts for a DeepSpeed config:
    # ocrtune stops before loading anything, exit 2, one line with the command.
    env = {**train_env(), "ACCELERATE_USE_DEEPSPEED": "true"}
    done = _run([sys.executable, *_train(tiny_dataset, tmp_path / "run", "train.batch_size=2")], env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the accelerate config selects DeepSpeed, which is not installed: pip install deepspeed, or pick "
        "another topology (configs/accelerate/multi_gpu.yaml, fsdp.yaml)")
    assert not (tmp_path / "run").exists()
    # `accelerate launch` itself checks first and stops with its own exit 1 and the same advice.
    launched = _run(_zero(2, tiny_dataset, tmp_path / "launched"))
    assert launched.returncode == 1 and "pip3 install deepspeed" in launched.stderr
    checked = run_cli("validate", str(REPO / "configs/accelerate/deepspeed_zero2.yaml"))
    assert checked.returncode == 0
    assert "deepspeed_zero2.yaml: DeepSpeed is not installed here (pip install deepspeed)" in checked.stdout


@pytest.fixture(scope="module")
def one_process(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero") / "one"
    done = _run([sys.executable, *_train(tiny_dataset, out, "train.batch_size=2")])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="the deepspeed package is not installed (pip install deepspeed)")
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_like_one_process_and_resumes_bit_identically(tiny_dataset, one_process, tmp_path, stage):
    out = tmp_path / "zero"
    done = _run(_zero(stage, tiny_dataset, out, "train.save_steps=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["processes"], summary["topology"]) == (2, "DEEPSPEED")
    for x, y in zip(_records(one_process), _records(out), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert sorted(y["sample_ids"]) == sorted(x["sample_ids"]), x["step"]
    a = load_file(str(one_process / "adapter/adapter_model.safetensors"))
    b = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # The engine's own sharded checkpoint inside ocrtune's marker; resumed, the same bits.
    ckpt = out / "checkpoints/step-000002"
    assert {"COMPLETE", "trainer_state.json", "random_states_0.pkl", "random_states_1.pkl", "pytorch_model"} <= {
        p.name for p in ckpt.iterdir()}
    assert sorted(p.name for p in (ckpt / "pytorch_model").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "adapter")
    again = _run(_zero(stage, tiny_dataset, resumed, "train.save_steps=2", "train.resume_from=latest"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints/step-000002'} at step 2" in again.stdout + again.stderr
    c = load_file(str(resumed / "adapter/adapter_model.safetensors"))
    assert all(b[k].equal(c[k]) for k in b)  # bit-identical
    assert step_sample_ids(resumed) == step_sample_ids(out)


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="the deepspeed package is not installed (pip install deepspeed)")
def test_zero3_refuses_the_chunked_loss(tiny_dataset, tmp_path):
    done = _run(_zero(3, tiny_dataset, tmp_path / "run", "train.loss_chunk_tokens=64"))
    assert done.returncode == 1  # torchrun's exit when a worker fails; the worker exits 2
    assert "train.loss_chunk_tokens=64: the chunked loss does not work under DeepSpeed ZeRO-3" in done.stderr


GPU_SCRIPT = REPO / "benchmarks/gpu_deepspeed.sh"


def test_gpu_script_parses_its_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_SCRIPT)]).returncode == 0
    shown = subprocess.run(["bash", str(GPU_SCRIPT), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "bash benchmarks/gpu_deepspeed.sh OUT_DIR --sizes tiny" in shown.stdout
    for bad, message in ((["--sizes", "huge"], "--sizes: tiny and/or full, not huge"),
                         (["--stages", "1"], "--stages: 2 and/or 3, not 1"), (["--fast"], "unknown option --fast")):
        done = subprocess.run(["bash", str(GPU_SCRIPT), str(tmp_path / "out"), *bad], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (HAVE_DEEPSPEED and importlib.util.find_spec("bitsandbytes")),
                    reason="needs deepspeed and bitsandbytes (pip install deepspeed bitsandbytes)")
def test_gpu_script_tiny_path_runs_here(tmp_path):
    """The GPU script's own checks at tiny size on this CPU: ZeRO-2 and ZeRO-3 resume bit-identically,
    the nf4 adapter loads on the unquantized base."""
    done = subprocess.run(["bash", str(GPU_SCRIPT), str(tmp_path), "--sizes", "tiny"], cwd=REPO,
                          env={**train_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["check"], r["size"]) for r in rows] == [("zero2", "tiny"), ("zero3", "tiny"), ("qlora", "tiny")]
    assert all(r["resumed_bit_identical"] for r in rows[:2])
    assert rows[2]["nf4_adapter_loads_on_unquantized_base"] is True
