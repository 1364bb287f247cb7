"""An internal error ends in one line naming the stage and a log file that holds the traceback,
with a non-zero exit; never a bare traceback on the terminal. The fault is real: a copy of the
shipped tiny v1 model whose processor disagrees with the model on the image-token layout, so
every forward pass with an image fails inside the model (as every v1 generation did when a
transformers release renamed the cache keyword)."""

import json
import shutil

import pytest
from PIL import Image

from finetune.models import resolve_model
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken") / "tiny-v1-broken"
    shutil.copytree(resolve_model("builtin:tiny-random-deepseek-ocr").path, folder)
    config = folder / "processor_config.json"
    settings = json.loads(config.read_text())
    settings["downsample_ratio"] *= 2  # the processor now counts a quarter of the model's tokens
    config.write_text(json.dumps(settings))
    return folder


def _one_line(proc, stage: str, log) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"internal error in {stage}: RuntimeError: image placeholders"), last
    assert last.endswith(f"(traceback in {log})"), last
    text = log.read_text()
    assert text.startswith("=== ") and f"internal error in {stage}\n" in text
    assert "Traceback (most recent call last)" in text and "deepseek_ocr/modeling.py" in text
    assert "transformers 5." in text and "torch 2." in text  # versions for a bug report


def test_demo_checks_the_base_before_rendering(broken_model, tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--output", str(out), "--model", str(broken_model), "--no-progress")
    _one_line(proc, "check the base", out / "ocrtune-error.log")
    assert sorted(p.name for p in out.iterdir()) == ["check", "ocrtune-error.log"]  # nothing rendered or built


def test_eval_internal_error(broken_model, tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    proc = run_cli("eval", "--model", str(broken_model), "--data", str(tiny_dataset), "--output", str(out),
                   "--max-new-tokens", "4", "--no-progress")
    _one_line(proc, "eval", out / "ocrtune-error.log")


def test_train_internal_error(broken_model, tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"model.name={broken_model}",
                   f"data.path={tiny_dataset}", f"output_dir={run}", "train.max_steps=2", "--no-progress")
    _one_line(proc, "train", run / "ocrtune-error.log")
    assert not (run / "adapter").exists()


def test_predict_internal_error(broken_model, tmp_path):
    Image.new("RGB", (200, 60), "white").save(tmp_path / "page.png")
    out = tmp_path / "md"
    proc = run_cli("predict", "--model", str(broken_model), "--input", str(tmp_path / "page.png"), "--output",
                   str(out), "--no-progress")
    _one_line(proc, "predict", out / "ocrtune-error.log")
    assert not list(out.glob("*.md"))
