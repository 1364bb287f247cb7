"""The whole loop through the `ocrtune` CLI on the shipped tiny model, as a user runs it:
data build -> eval -> train -> eval with adapter -> push --dry-run, then the adapter
loads with plain peft in a fresh process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from finetune.metrics import edit_counts
from tests.helpers import REPO, TINY, make_folder, run_cli, tree

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


STEPS = 30


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    work = tmp_path_factory.mktemp("loop")
    make_folder(work / "scans", 48, orphans=(5,))
    out = {"work": work}
    out["build"] = run_cli("data", "build", "--source", "folder", "--input", str(work / "scans"),
                           "--output", str(work / "data"), "--test-fraction", "0.25", "--no-progress")
    out["eval0"] = run_cli("eval", "--model", TINY, "--data", str(work / "data"), "--output", str(work / "eval0"),
                           "--max-new-tokens", "16", "--no-progress")
    out["train"] = run_cli("train", str(REPO / "configs/runs/tiny_smoke.yaml"), f"data.path={work / 'data'}",
                           f"output_dir={work / 'run'}", f"train.max_steps={STEPS}", "--no-progress")
    out["eval1"] = run_cli("eval", "--model", TINY, "--adapter", str(work / "run/adapter"), "--data", str(work / "data"),
                           "--output", str(work / "run/eval"), "--max-new-tokens", "16", "--batch-size", "4", "--no-progress")
    out["push"] = run_cli("push", str(work / "run/adapter"), "--repo-id", "someone/tiny-lines", "--dry-run",
                          str(work / "push"))
    return out


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_data_build_lists_orphan_and_keeps_rest(loop):
    _ok(loop["build"])
    report = json.loads((loop["work"] / "data/build_report.json").read_text())
    assert report["counts"]["accepted"] == 47 and report["counts"]["test"] == 12
    assert report["rejected"] == [{"item": "page_005.png", "reason": "no transcript: expected page_005.md or page_005.txt"}]
    assert "rejected page_005.png" in loop["build"].stdout


def test_base_eval_report_structure(loop):
    _ok(loop["eval0"])
    report = json.loads((loop["work"] / "eval0/report.json").read_text())
    assert set(report["systems"]) == {"base"}
    base = report["systems"]["base"]
    assert base["n"] == 12 and base["cer"] > 0 and base["cer_raw"] > 0
    assert report["normalization"]["headline"] == "L1"
    assert report["decoding"] == {"strategy": "greedy", "max_new_tokens": 16, "batch_size": 8,
                                  "repetition_guard": {"ngram_size": 30, "window": 90, "whitelist": []},
                                  "sorted_by": "reference token count"}
    lines = [json.loads(x) for x in (loop["work"] / "eval0/predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and set(lines[0]) == {"id", "reference", "predictions", "group", "hit_max_tokens"}
    assert set(lines[0]["predictions"]) == {"base"}
    assert sum(x["hit_max_tokens"]["base"] for x in lines) == base["hit_max_tokens"]
    # `ocrtune score` on eval's own predictions reproduces eval's numbers
    rescored = run_cli("score", str(loop["work"] / "eval0/predictions.jsonl"), "--output", str(loop["work"] / "rescored"))
    _ok(rescored)
    again = json.loads((loop["work"] / "rescored/report.json").read_text())["systems"]["base"]
    assert again == base


def test_train_writes_adapter_config_and_metrics(loop):
    _ok(loop["train"])
    run = loop["work"] / "run"
    assert tree(run / "adapter") == ["adapter_config.json", "adapter_model.safetensors", "ocrtune_adapter.json"]
    assert (run / "config.yaml").read_text().count(f"max_steps: {STEPS}") == 1
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    first, last = np.mean([m["loss"] for m in metrics[:3]]), np.mean([m["loss"] for m in metrics[-5:]])
    assert last < 0.9 * first  # the random tiny decoder plateaus near 5 nats; the drop is what matters
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["ledger"]["vision"]["trainable"] == 0 and summary["ledger"]["projector"]["trainable"] == 0
    assert summary["effective_batch"] == 4 and summary["train_samples"] == 47 - 12 - 4
    assert summary["experts_implementation"] == "grouped_mm"  # transformers' choice for OCR-2's experts here
    assert "LoRA preset 'attention+mlp'" in loop["train"].stdout + loop["train"].stderr


def test_adapted_eval_matches_recomputation_and_lowers_cer(loop):
    _ok(loop["eval1"])
    report = json.loads((loop["work"] / "run/eval/report.json").read_text())
    assert set(report["systems"]) == {"base", "adapted"}
    lines = [json.loads(x) for x in (loop["work"] / "run/eval/predictions.jsonl").read_text().splitlines()]
    refs = [x["reference"] for x in lines]
    for system in ("base", "adapted"):
        hyps = [x["predictions"][system] for x in lines]
        e, n = edit_counts(refs, hyps, "L1")
        assert report["systems"][system]["cer"] == pytest.approx(e.sum() / n.sum(), abs=1e-12)
        e0, n0 = edit_counts(refs, hyps, "L0")
        assert report["systems"][system]["cer_raw"] == pytest.approx(e0.sum() / n0.sum(), abs=1e-12)
    # The base system's outputs do not depend on whether an adapter is loaded beside it.
    first = {json.loads(x)["id"]: json.loads(x)["predictions"]["base"]
             for x in (loop["work"] / "eval0/predictions.jsonl").read_text().splitlines()}
    assert {x["id"]: x["predictions"]["base"] for x in lines} == first
    assert report["systems"]["adapted"]["cer"] < 0.5 * report["systems"]["base"]["cer"]
    assert report["comparison"]["cer_delta_ci95"][1] < 0


def test_push_dry_run_writes_exact_files_and_card(loop):
    _ok(loop["push"])
    push = loop["work"] / "push"
    assert tree(push) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "ocrtune_adapter.json",
                          "ocrtune_eval.json"]
    card = (push / "README.md").read_text()
    report = json.loads((loop["work"] / "run/eval/report.json").read_text())
    assert TINY in card
    assert f"| adapted | {100 * report['systems']['adapted']['cer']:.2f}% |" in card
    assert f"| base | {100 * report['systems']['base']['cer']:.2f}% |" in card
    assert (push / "adapter_model.safetensors").read_bytes() == (loop["work"] / "run/adapter/adapter_model.safetensors").read_bytes()


FRESH = r"""
import sys, warnings, torch
from peft import PeftModel
from transformers import AutoProcessor, DeepseekOcr2ForConditionalGeneration
from PIL import Image, ImageDraw
base_dir, adapter_dir = sys.argv[1], sys.argv[2]
proc = AutoProcessor.from_pretrained(base_dir)
model = DeepseekOcr2ForConditionalGeneration.from_pretrained(base_dir).eval()
im = Image.new("RGB", (220, 48), "white"); ImageDraw.Draw(im).text((6, 14), "note 3", fill="black")
pix = proc.image_processor([im], crop_to_patches=False, return_tensors="pt")["pixel_values"]
ids = torch.tensor([[0] + [model.config.image_token_id] * 145 + proc.tokenizer("\nFree OCR.", add_special_tokens=False).input_ids])
with torch.no_grad():
    before = model(input_ids=ids, pixel_values=pix).logits
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
with torch.no_grad():
    after = peft_model(input_ids=ids, pixel_values=pix).logits
print("WARNINGS", len(bad))
print("MAXDIFF", float((after - before).abs().max()))
"""


def test_adapter_loads_with_plain_peft_in_fresh_process_and_changes_logits(loop):
    from finetune.models import resolve_model

    base_dir = resolve_model(TINY).path
    proc = subprocess.run([sys.executable, "-c", FRESH, str(base_dir), str(loop["work"] / "run/adapter")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(("WARNINGS", "MAXDIFF")))
    assert out["WARNINGS"] == "0"
    assert float(out["MAXDIFF"]) > 1e-3


def test_batched_generation_equals_one_at_a_time(loop):
    from datasets import load_from_disk

    from finetune.generate import generate_pages
    from finetune.lora import load_adapter
    from finetune.models import load_model
    from finetune.sequence import builder_for

    resolved, model, processor = load_model(TINY)
    model = load_adapter(model, loop["work"] / "run/adapter", "adapted", resolved.family).eval()
    builder = builder_for(resolved.family, processor, model.config, "<image>\nFree OCR.", resolved.family.vision_settings(processor))
    rows = load_from_disk(str(loop["work"] / "data"))["test"]
    pages = [(r["id"], r["image"]) for r in rows]
    one = generate_pages(model, builder, pages, batch_size=1, max_new_tokens=16)
    many = generate_pages(model, builder, pages, batch_size=5, max_new_tokens=16,
                          expected_lengths=[len(r) for r in rows["markdown"]])
    assert [g.text for g in one] == [g.text for g in many]
    assert np.mean([g.hit_max_tokens for g in many]) < 1.0


def test_killed_eval_resumes_without_recomputing(tmp_path, loop):
    """SIGKILL an eval mid-way; the same command continues from the journal and ends with the
    same predictions as an uninterrupted run."""
    import os
    import signal
    import time

    data = loop["work"] / "data"
    args = ["eval", "--model", TINY, "--data", str(data), "--split", "train", "--batch-size", "1",
            "--max-new-tokens", "24", "--no-progress"]
    full = run_cli(*args, "--output", str(tmp_path / "full"))
    _ok(full)
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", *args, "--output", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "eval_progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 6:  # header + >= 5 pages
            break
        time.sleep(0.05)
    assert proc.poll() is None, "eval finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()
    done_before = len(journal.read_text().splitlines()) - 1
    resumed = run_cli(*args, "--output", str(out))
    _ok(resumed)
    report = json.loads((out / "report.json").read_text())
    n = report["systems"]["base"]["n"]
    assert report["resume"]["reused_predictions"] >= done_before >= 5
    assert report["resume"]["reused_predictions"] + report["resume"]["generated"] == n
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "full" / "predictions.jsonl").read_text()
    assert not journal.exists()
    # other settings on an unfinished journal are refused, not mixed
    journal.write_text(json.dumps({"state": {"model": "other"}}) + "\n")
    refused = run_cli(*args, "--output", str(out))
    assert refused.returncode == 2 and "unfinished eval with other settings" in refused.stderr


def test_eval_sharded_over_two_processes_matches_one(tmp_path, loop):
    """Two processes (torchrun here: `accelerate launch --cpu` starts one) shard the pages and
    gather: same predictions as one process."""
    import os

    data = loop["work"] / "data"
    args = ["eval", "--model", TINY, "--adapter", str(loop["work"] / "run/adapter"), "--data", str(data),
            "--max-new-tokens", "16", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "finetune.cli", *args, "--output", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two/report.json").read_text())["processes"] == 2
    one = loop["work"] / "run/eval"  # the single-process eval of the same adapter, settings and pages
    assert (tmp_path / "two/predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()


def test_modes_sweep_reports_vision_tokens_against_cer(tmp_path, loop):
    """`--modes base,gundam`: one eval per mode; the global view alone costs 145 placeholder
    ids on the tiny model (12 x 12 + separator), tiles add 144 each (wide line images tile)."""
    out = tmp_path / "modes"
    done = run_cli("eval", "--model", TINY, "--adapter", str(loop["work"] / "run/adapter"), "--data",
                   str(loop["work"] / "data"), "--limit", "3", "--max-new-tokens", "8", "--bootstrap-resamples", "200",
                   "--modes", "base,gundam", "--output", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "modes.json").read_text())
    assert [r["mode"] for r in rows] == ["base", "gundam"]
    assert rows[0]["vision_tokens_per_page"] == 145
    assert rows[1]["vision_tokens_per_page"] > 145 and (rows[1]["vision_tokens_per_page"] - 145) % 144 == 0
    for r in rows:
        report = json.loads((out / f"mode-{r['mode']}" / "report.json").read_text())
        assert report["mode"] == r["mode"] and set(r["cer"]) == {"base", "adapted"}
        assert report["systems"]["adapted"]["cer"] == r["cer"]["adapted"]
    assert json.loads((out / "mode-base" / "report.json").read_text())["vision"]["crop_to_patches"] is False
    assert "| base | 145.0 |" in (out / "modes.md").read_text()
    bad = run_cli("eval", "--model", TINY, "--data", str(loop["work"] / "data"), "--modes", "tiny",
                  "--output", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "DeepSeek-OCR-2 has modes base, gundam" in bad.stderr
    mixed = run_cli("eval", "--model", TINY, "--data", str(loop["work"] / "data"), "--modes", "base",
                    "--endpoint", "http://127.0.0.1:9/v1", "--endpoint-model", "x", "--output", str(tmp_path / "mixed"))
    assert mixed.returncode == 2 and "evaluate --endpoint without --modes" in mixed.stderr
    assert not (tmp_path / "mixed").exists()
