"""The benchmark scripts keep running (numbers are recorded in BENCHMARKS.md, not asserted)."""

import importlib.util
import json

import pytest

from tests.helpers import REPO


def test_eval_batching_benchmark_runs_and_outputs_match():
    spec = importlib.util.spec_from_file_location("eval_batching", REPO / "benchmarks" / "eval_batching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--pages", "4", "--batch-size", "4", "--max-new-tokens", "4", "--repeats", "1"])
    assert result["identical_outputs"] is True
    assert result["pages"] == 4 and result["speedup"] > 0


def test_data_build_benchmark_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("data_build", REPO / "benchmarks" / "data_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--pages", "12", "--workdir", str(tmp_path), "--workers", "1,2"])
    assert result["pages"] == 12 and [r["workers"] for r in result["runs"]] == [1, 2]
    assert all(r["accepted"] == 12 and len(r["rss_mb_peak_by_quarter"]) == 4 for r in result["runs"])
    assert result["speedup"] > 0


@pytest.mark.integration  # a CLI subprocess or a training run
def test_train_memory_benchmark_runs_every_setting_with_the_same_loss():
    spec = importlib.util.spec_from_file_location("train_memory", REPO / "benchmarks" / "train_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--batch-size", "2", "--steps", "2", "--target-chars", "120"])
    assert [(r["gradient_checkpointing"], r["loss_chunk_tokens"]) for r in rows] == module.SETTINGS
    first = rows[0]["first_loss"]
    assert all(abs(r["first_loss"] - first) < 1e-4 for r in rows)  # memory knobs, not different numbers
    assert all(r["samples_per_s"] > 0 and r["answer_tokens"] > 60 for r in rows)


def test_v1_full_size_benchmark_runs_at_tiny_size():
    spec = importlib.util.spec_from_file_location("v1_full_size", REPO / "benchmarks" / "v1_full_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.main(["--size", "tiny", "--target-tokens", "16", "--new-tokens", "4", "--gen-pages", "2"])
    # Gundam on a 1000 x 1500 page, tiny model (4-token global view, 3-token tiles, 2 x 3 tiles):
    # 4 x 5 + 1 + (3 x 2 + 1) x (3 x 3) = 84 placeholder ids.
    assert r["placeholder_ids_per_page"] == 84
    assert len(r["train_step_s"]) == 3 and r["generate_new_tokens"] == [4, 4]


@pytest.mark.integration  # training runs in subprocesses
def test_train_throughput_benchmark_runs_both_loops_on_the_same_batches(tmp_path):
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    module.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                 "--answer-tokens", "24", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["family"], r["mode"], r["impl"]) for r in rows] == [
        ("v1", "base", "ocrtune"), ("v1", "gundam", "ocrtune"), ("ocr2", "base", "baseline"),
        ("ocr2", "base", "ocrtune"), ("ocr2", "gundam", "baseline"), ("ocr2", "gundam", "ocrtune")]
    assert [r.get("error") for r in rows] == [None] * 6
    assert all(r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["peak_mem_kind"] == "cpu_peak_rss_delta"
               and r["device"] == "cpu" for r in rows)
    for mode in ("base", "gundam"):  # same modules adapted, same first batch through the same layout
        baseline, ours = [r for r in rows if r["family"] == "ocr2" and r["mode"] == mode]
        assert baseline["trainable_params"] == ours["trainable_params"]
        assert abs(baseline["first_loss"] - ours["first_loss"]) < 1e-4
        assert baseline["sequence_tokens"] == ours["sequence_tokens"]
    assert next(r for r in rows if r["mode"] == "gundam")["sequence_tokens"] > rows[0]["sequence_tokens"]  # tiles


@pytest.mark.integration  # generation runs
def test_merged_generation_benchmark_runs_and_outputs_match():
    spec = importlib.util.spec_from_file_location("merged_generation", REPO / "benchmarks" / "merged_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--lines", "--pages", "2", "--batch-size", "2", "--new-tokens", "4", "--repeats", "1",
                        "--static-cache"])
    assert [r["label"] for r in rows] == ["v1", "ocr2"]
    assert all(r["identical_token_ids"] and r["static_identical_token_ids"] for r in rows)
    assert all(r[k]["tokens_per_s"] > 0 for r in rows for k in ("wrapped", "folded", "folded_static"))
