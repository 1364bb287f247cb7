"""The benchmark scripts keep running (numbers are recorded in BENCHMARKS.md, not asserted)."""

import importlib.util

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
