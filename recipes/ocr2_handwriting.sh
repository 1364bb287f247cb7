#!/usr/bin/env bash
# Purpose:   adapt DeepSeek-OCR-2 to handwritten pages and publish the adapter with its CER gain.
# Data:      a folder of page scans with same-stem .md transcripts (first argument).
# Hardware:  written for one GPU with >= 24 GB (bf16, gradient checkpointing); not yet run on
#            real weights by the project (no GPU or weights in our CI), so no time or metric is
#            claimed here yet.
# Wall time: not measured yet; BENCHMARKS.md, "Recipes", ocr2_handwriting.sh gets the figures.
# Metric:    not measured yet (the same row); `ocrtune eval` prints CER before/after with a 95% CI.
set -euo pipefail
SCANS=${1:?usage: recipes/ocr2_handwriting.sh SCANS_DIR [OUT_DIR]}
OUT=${2:-runs/ocr2-handwriting}
ocrtune data build --source folder --input "$SCANS" --output "$OUT/data" --overwrite
accelerate launch --config_file configs/accelerate/single_gpu.yaml -m finetune.train configs/runs/ocr2_handwriting.yaml \
  data.path="$OUT/data" output_dir="$OUT/run"
ocrtune eval --model deepseek-ai/DeepSeek-OCR-2 --adapter "$OUT/run/adapter" --data "$OUT/data" \
  --output "$OUT/run/eval" --max-new-tokens 2048
ocrtune push "$OUT/run/adapter" --repo-id you/deepseek-ocr-2-handwriting --dry-run "$OUT/push-preview"
