#!/usr/bin/env bash
# Purpose:   adapt DeepSeek-OCR-2 to filled-in forms (reading order, question/answer pairs) and
#            publish the adapter with its CER and field-F1 gain.
# Data:      a FUNSD-style folder (annotations/*.json with entities and links, images/*.png),
#            first argument; targets are built as headings, `**question** answer` lines, paragraphs.
# Hardware:  written for one GPU with >= 24 GB (bf16, gradient checkpointing on by default for
#            the real model); not yet run on real weights by the project (no GPU or weights in
#            our CI), so no time or metric is claimed here yet.
# Wall time: not measured yet; BENCHMARKS.md, "Recipes", ocr2_forms.sh gets the figures.
# Metric:    not measured yet (the same row); `ocrtune eval` prints CER and form-field F1 before/after with 95% CIs.
set -euo pipefail
FORMS=${1:?usage: recipes/ocr2_forms.sh FUNSD_DIR [OUT_DIR]}
OUT=${2:-runs/ocr2-forms}
ocrtune data build --source funsd --input "$FORMS" --output "$OUT/data" --overwrite
accelerate launch --config_file configs/accelerate/single_gpu.yaml -m finetune.train configs/runs/ocr2_forms.yaml \
  data.path="$OUT/data" output_dir="$OUT/run"
ocrtune eval --model deepseek-ai/DeepSeek-OCR-2 --adapter "$OUT/run/best" --data "$OUT/data" \
  --output "$OUT/run/eval" --max-new-tokens 2048
ocrtune push "$OUT/run/best" --repo-id you/deepseek-ocr-2-forms --report "$OUT/run/eval/report.json" \
  --dry-run "$OUT/push-preview"
