#!/usr/bin/env bash
# Purpose:   prove the whole loop on a laptop: build data, eval, train, eval, publish preview.
# Data:      any folder of images with same-stem .md/.txt transcripts (first argument).
# Hardware:  2 CPU cores, no GPU, no network.
# Wall time: seconds on 2 cores for a few dozen pages; measured: BENCHMARKS.md, "Recipes", tiny_smoke.sh.
# Metric:    corpus CER (L1) before/after with a 95% CI, in OUT/eval-*/report.md; reached: the same row.
#            The tiny model is random: this shows the mechanics, not OCR quality.
set -euo pipefail
SCANS=${1:?usage: recipes/tiny_smoke.sh SCANS_DIR [OUT_DIR]}
OUT=${2:-runs/tiny-smoke}
ocrtune data build --source folder --input "$SCANS" --output "$OUT/data" --overwrite
accelerate launch --config_file configs/accelerate/cpu.yaml -m finetune.train configs/runs/tiny_smoke.yaml \
  data.path="$OUT/data" output_dir="$OUT/run"
ocrtune eval --model builtin:tiny-random-deepseek-ocr-2 --adapter "$OUT/run/adapter" --data "$OUT/data" \
  --output "$OUT/run/eval" --max-new-tokens 32
ocrtune push "$OUT/run/adapter" --repo-id you/tiny-smoke --dry-run "$OUT/push-preview"
