"""Two "nodes" on one host: the shipped configs/accelerate/multi_node.yaml launched twice, with
--machine_rank 0 and 1 and the main node's address pointed at 127.0.0.1, each node one CPU
process. The processes meet over TCP exactly as on two machines and train the same adapter
as one process at the same global batch."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, step_sample_ids, train_env
from tests.jobs import kill_job

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs

MULTI_NODE = REPO / "configs/accelerate/multi_node.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_same_adapter_as_one_process(tiny_dataset, tmp_path):
    """Node r runs what a user runs on machine r (README, "Scaling out"):
        accelerate launch --config_file configs/accelerate/multi_node.yaml --machine_rank r
            --main_process_ip MAIN --num_processes 2 -m finetune.train RUN.yaml ...
    with batch 1 per process against one process with batch 2: the same samples per optimizer
    step, the loss normalised over all their tokens. Tolerance as the DDP test (float32 sums
    in another order: atol 1e-5, rtol 1e-4)."""
    train = ["-m", "finetune.train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={tiny_dataset}",
             "train.max_steps=4", "train.grad_accum=2", "train.mixed_precision=no", "--no-progress"]
    one = subprocess.run([sys.executable, *train, "train.batch_size=2", f"output_dir={tmp_path / 'one'}"], cwd=REPO,
                         env=train_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_NODE),
                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--num_processes", "2",
                               *train, "train.batch_size=1", f"output_dir={tmp_path / 'two'}"],
                              cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:  # a node that did not finish: it and its worker go
                kill_job(node)
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert (summary["processes"], summary["topology"], summary["effective_batch"]) == (2, "MULTI_CPU", 4)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    one_ids, two_ids = step_sample_ids(tmp_path / "one"), step_sample_ids(tmp_path / "two")
    assert [sorted(x) for x in one_ids] == [sorted(x) for x in two_ids]  # the same samples in every step
