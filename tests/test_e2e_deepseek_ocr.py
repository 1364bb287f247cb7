"""The foundation's end-to-end loop for DeepSeek-OCR (v1) on builtin:tiny-random-deepseek-ocr,
through the same CLI and entry points as OCR-2: data build -> eval -> train -> eval with
adapter -> push --dry-run; then the v1 resolution-mode sweep and a full-parameter run saved
in the official layout and loaded back."""

import json

import numpy as np
import pytest

from finetune.metrics import edit_counts
from tests.helpers import REPO, make_folder, run_cli, tree

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


TINY_V1 = "builtin:tiny-random-deepseek-ocr"
STEPS = 30


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    work = tmp_path_factory.mktemp("loop_v1")
    make_folder(work / "scans", 40)
    out = {"work": work}
    out["build"] = run_cli("data", "build", "--source", "folder", "--input", str(work / "scans"),
                           "--output", str(work / "data"), "--test-fraction", "0.25", "--no-progress")
    out["eval0"] = run_cli("eval", "--model", TINY_V1, "--data", str(work / "data"), "--output", str(work / "eval0"),
                           "--max-new-tokens", "16", "--no-progress")
    out["train"] = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"model.name={TINY_V1}",
                           f"data.path={work / 'data'}", f"output_dir={work / 'run'}", f"train.max_steps={STEPS}",
                           "--no-progress")
    out["eval1"] = run_cli("eval", "--model", TINY_V1, "--adapter", str(work / "run/adapter"), "--data",
                           str(work / "data"), "--output", str(work / "run/eval"), "--max-new-tokens", "16",
                           "--no-progress")
    out["push"] = run_cli("push", str(work / "run/adapter"), "--repo-id", "someone/tiny-v1", "--dry-run",
                          str(work / "push"))
    return out


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_loop_trains_evaluates_and_publishes(loop):
    for step in ("build", "eval0", "train", "eval1", "push"):
        _ok(loop[step])
    work = loop["work"]
    assert tree(work / "run/adapter") == ["adapter_config.json", "adapter_model.safetensors", "ocrtune_adapter.json"]
    summary = json.loads((work / "run/train_summary.json").read_text())
    assert summary["family"] == "deepseek_ocr" and summary["base_model"] == TINY_V1
    assert summary["experts_implementation"] == "padded_bmm"  # on a CPU; grouped_mm on CUDA in bf16
    assert summary["ledger"]["vision"]["trainable"] == 0 and summary["ledger"]["projector"]["trainable"] == 0
    meta = json.loads((work / "run/adapter/ocrtune_adapter.json").read_text())
    assert meta["vision"]["mode"] == "gundam"  # the checkpoint's default mode, recorded with the adapter
    metrics = [json.loads(x) for x in (work / "run/metrics.jsonl").read_text().splitlines()]
    assert np.mean([m["loss"] for m in metrics[-5:]]) < 0.9 * np.mean([m["loss"] for m in metrics[:3]])
    report = json.loads((work / "run/eval/report.json").read_text())
    lines = [json.loads(x) for x in (work / "run/eval/predictions.jsonl").read_text().splitlines()]
    refs = [x["reference"] for x in lines]
    for system in ("base", "adapted"):
        e, n = edit_counts(refs, [x["predictions"][system] for x in lines], "L1")
        assert report["systems"][system]["cer"] == pytest.approx(e.sum() / n.sum(), abs=1e-12)
    assert report["systems"]["adapted"]["cer"] < 0.5 * report["systems"]["base"]["cer"]
    assert report["comparison"]["cer_delta_ci95"][1] < 0
    assert tree(work / "push") == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                   "ocrtune_adapter.json", "ocrtune_eval.json"]
    assert TINY_V1 in (work / "push/README.md").read_text()


def test_v1_modes_sweep_counts_placeholders_per_mode(tmp_path, loop):
    out = tmp_path / "modes"
    done = run_cli("eval", "--model", TINY_V1, "--adapter", str(loop["work"] / "run/adapter"), "--data",
                   str(loop["work"] / "data"), "--limit", "3", "--max-new-tokens", "8", "--bootstrap-resamples", "200",
                   "--modes", "tiny,small,base,large", "--output", str(out), "--no-progress")
    _ok(done)
    rows = json.loads((out / "modes.json").read_text())
    # Tiny model: views of 32/40/64/80 px, 16 px per token -> 2/3/4/5 tokens a side,
    # g x (g + 1) + 1 placeholder ids, on every page whatever its shape.
    assert [(r["mode"], r["vision_tokens_per_page"]) for r in rows] == [("tiny", 7), ("small", 13), ("base", 21),
                                                                         ("large", 31)]


def test_full_parameter_run_saves_official_layout_that_loads_back(tmp_path, loop):
    from safetensors import safe_open

    run = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"model.name={TINY_V1}",
                  f"data.path={loop['work'] / 'data'}", f"output_dir={tmp_path / 'full'}", "train.max_steps=2",
                  "lora.preset=full", "vision.mode=base", "--no-progress")
    _ok(run)
    model_dir = tmp_path / "full/model"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "deepseek_vl_v2"
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.vision_model.transformer.layers.0.self_attn.qkv_proj.weight" in keys
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys and "model.sam_model.net_2.weight" in keys
    again = run_cli("eval", "--model", str(model_dir), "--data", str(loop["work"] / "data"), "--limit", "2",
                    "--max-new-tokens", "4", "--output", str(tmp_path / "eval"), "--no-progress")
    _ok(again)
    assert json.loads((tmp_path / "eval/report.json").read_text())["systems"]["base"]["n"] == 2


def test_bad_mode_and_broken_checkpoint_are_clear_errors(tmp_path, loop):
    bad = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"model.name={TINY_V1}",
                  f"data.path={loop['work'] / 'data'}", f"output_dir={tmp_path / 'run'}", "vision.mode=huge")
    assert bad.returncode == 2
    assert "vision.mode: resolution mode 'huge': DeepSeek-OCR has modes tiny, small, base, large, gundam" in bad.stderr
    import shutil

    from safetensors.torch import load_file, save_file

    from finetune.models import BUILTIN_DIR

    broken = tmp_path / "broken"
    shutil.copytree(BUILTIN_DIR / "tiny-random-deepseek-ocr", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.sam_model.net_2.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    ev = run_cli("eval", "--model", str(broken), "--data", str(loop["work"] / "data"), "--output", str(tmp_path / "ev"))
    assert ev.returncode == 2 and "Traceback" not in ev.stderr
    assert "1 missing (model.sam_model.net_2.weight)" in ev.stderr


def test_export_for_vllm_and_merged_checkpoint_reproduce_the_adapter(tmp_path, loop):
    """`ocrtune export` (the vLLM layout) and `export --merge` (one full checkpoint), through the
    CLI: evaluating either gives the trained adapter's predictions."""
    work = loop["work"]
    _ok(loop["eval1"])
    _ok(run_cli("export", str(work / "run/adapter"), "--output", str(tmp_path / "vllm")))
    _ok(run_cli("export", str(work / "run/adapter"), "--merge", "--output", str(tmp_path / "merged")))
    assert tree(tmp_path / "vllm") == ["adapter_config.json", "adapter_model.safetensors", "ocrtune_adapter.json"]
    again = run_cli("export", str(work / "run/adapter"), "--output", str(tmp_path / "vllm"))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    _ok(run_cli("eval", "--model", TINY_V1, "--adapter", str(tmp_path / "vllm"), "--data", str(work / "data"),
                "--output", str(tmp_path / "eval-vllm"), "--max-new-tokens", "16", "--no-progress"))
    _ok(run_cli("eval", "--model", str(tmp_path / "merged"), "--data", str(work / "data"),
                "--output", str(tmp_path / "eval-merged"), "--max-new-tokens", "16", "--no-progress"))

    def predictions(folder, system):
        return [json.loads(x)["predictions"][system] for x in (folder / "predictions.jsonl").read_text().splitlines()]

    trained = predictions(work / "run/eval", "adapted")
    assert predictions(tmp_path / "eval-vllm", "adapted") == trained
    assert predictions(tmp_path / "eval-merged", "base") == trained
