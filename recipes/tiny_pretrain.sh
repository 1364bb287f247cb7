#!/usr/bin/env bash
# Purpose:   pretrain builtin:tiny-deepseek-ocr-2 on 2 CPU cores: a 1.4M-parameter model of the DeepSeek-OCR-2
#            architecture (real transformers classes) meant to read printed lines. The SHIPPED base was
#            trained on a GPU by recipes/tiny_pretrain_gpu.sh (same model and config, batch 128).
# Status:    on 2 CPU cores this does not get past the language prior in its step budget (it sees
#            far fewer lines than the GPU run needed to leave it): use tiny_pretrain_gpu.sh.
# Data:      12,000 printed synthetic lines (40% random codes; dates, amounts, phones, names, **Label:** fields) in
#            matplotlib's DejaVu/STIX fonts with light scan augmentation; seed 0.
# Hardware:  2 CPU cores, no GPU, no network.
# Wall time: tens of minutes; measured: BENCHMARKS.md, "Recipes", tiny_pretrain.sh.
# Metric:    printed-line CER from the eval step below; reached: the same row.
# Reproduce: bash recipes/tiny_pretrain.sh [OUT_DIR]; copy OUT_DIR/run/model to finetune/builtin/tiny-deepseek-ocr-2.
set -euo pipefail
OUT=${1:-runs/tiny-pretrain}
mkdir -p "$OUT"
python -m finetune.models.tiny --size ocr --seed 0 --output "$OUT/init"
python -m data_prep.synthetic --domain printed --n 12000 --seed 0 --output "$OUT/scans"
ocrtune data build --source manifest --input "$OUT/scans/manifest.jsonl" --output "$OUT/data" \
  --val-fraction 0.01 --test-fraction 0.02 --overwrite
python -m finetune.train configs/runs/tiny_pretrain.yaml model.name="$OUT/init" data.path="$OUT/data" \
  output_dir="$OUT/run"
ocrtune eval --model "$OUT/run/model" --data "$OUT/data" --output "$OUT/eval-printed" --max-new-tokens 48 --batch-size 32
