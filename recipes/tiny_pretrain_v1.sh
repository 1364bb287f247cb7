#!/usr/bin/env bash
# Purpose:   pretrain builtin:tiny-deepseek-ocr, the printed-text base of `ocrtune demo --family deepseek-ocr`:
#            a 0.86M-parameter model of the DeepSeek-OCR (v1) architecture (SAM -> CLIP -> projector -> MoE
#            decoder, native modules), every weight trained from a seeded random init (lora.preset: full).
#            This CPU run made the first v1 base; the SHIPPED base is now the GPU run of
#            recipes/tiny_pretrain_gpu.sh (same model and config, batch 128).
# Data:      24,000 printed synthetic lines (data_prep.synthetic --domain printed, seed 1: 40% random codes;
#            dates, amounts, phones, names, **Label:** fields), DejaVu/STIX fonts, light scan augmentation;
#            split seed 0 (0.5% validation, 1% test).
# Hardware:  2 CPU cores, no GPU, no network.
# Wall time: about an hour on 2 cores; measured (with the loss curve): BENCHMARKS.md, "Recipes",
#            tiny_pretrain_v1.sh.
# Metric:    corpus CER on the held-out printed test lines, greedy, 48 new tokens; reached: the same row.
# Reproduce: bash recipes/tiny_pretrain_v1.sh [OUT_DIR]; copy OUT_DIR/run/model to finetune/builtin/tiny-deepseek-ocr.
set -euo pipefail
OUT=${1:-runs/tiny-pretrain-v1}
mkdir -p "$OUT"
python -m finetune.models.tiny --family deepseek-ocr --size ocr --seed 0 --output "$OUT/init"
python -m data_prep.synthetic --domain printed --n 24000 --seed 1 --output "$OUT/scans"
ocrtune data build --source manifest --input "$OUT/scans/manifest.jsonl" --output "$OUT/data" \
  --val-fraction 0.005 --test-fraction 0.01 --overwrite
python -m finetune.train configs/runs/tiny_pretrain_v1.yaml model.name="$OUT/init" data.path="$OUT/data" \
  output_dir="$OUT/run"
ocrtune eval --model "$OUT/run/model" --data "$OUT/data" --output "$OUT/eval-printed" --max-new-tokens 48 --batch-size 32
