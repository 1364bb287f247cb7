#!/usr/bin/env bash
# Purpose:   adapt DeepSeek-OCR-2 to receipts and invoices (merchant, dates, item tables, totals).
# Data:      a manifest (JSONL or CSV with image and markdown/text fields, optional group such as
#            the merchant so one shop's receipts never straddle train and test), first argument.
# Hardware:  written for one GPU with >= 24 GB; for 8 GPUs use configs/accelerate/multi_gpu.yaml
#            (effective batch x8: lower train.max_steps accordingly). Not yet run on real weights
#            by the project (no GPU or weights in our CI), so no time or metric is claimed here yet.
# Wall time: not measured yet; BENCHMARKS.md, "Recipes", ocr2_receipts.sh gets the figures.
# Metric:    not measured yet (the same row); `ocrtune eval` prints CER before/after with a 95% CI.
set -euo pipefail
MANIFEST=${1:?usage: recipes/ocr2_receipts.sh MANIFEST.jsonl [OUT_DIR]}
OUT=${2:-runs/ocr2-receipts}
ocrtune data build --source manifest --input "$MANIFEST" --output "$OUT/data" --overwrite
accelerate launch --config_file configs/accelerate/single_gpu.yaml -m finetune.train configs/runs/ocr2_receipts.yaml \
  data.path="$OUT/data" output_dir="$OUT/run"
ocrtune eval --model deepseek-ai/DeepSeek-OCR-2 --adapter "$OUT/run/best" --data "$OUT/data" \
  --output "$OUT/run/eval" --max-new-tokens 1536
ocrtune push "$OUT/run/best" --repo-id you/deepseek-ocr-2-receipts --report "$OUT/run/eval/report.json" \
  --dry-run "$OUT/push-preview"
