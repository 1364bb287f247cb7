"""The benchmark scripts keep running (numbers are recorded in BENCHMARKS.md, not asserted)."""

import importlib.util

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
