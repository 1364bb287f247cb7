#!/usr/bin/env bash
# Purpose:   pretrain builtin:tiny-deepseek-ocr, the printed-text base of `ocrtune demo --family deepseek-ocr`:
#            a 0.86M-parameter model of the DeepSeek-OCR (v1) architecture (SAM -> CLIP -> projector -> MoE
#            decoder, native modules), every weight trained from a seeded random init (lora.preset: full).
#            This CPU run made the first v1 base (32.6% printed CER); the SHIPPED base is now the GPU run of
#            recipes/tiny_pretrain_gpu.sh (same model and config, batch 128, 1,500 steps: 14.95%).
# Data:      24,000 printed synthetic lines (data_prep.synthetic --domain printed, seed 1: 40% random codes;
#            dates, amounts, phones, names, **Label:** fields), DejaVu/STIX fonts, light scan augmentation;
#            split seed 0: 23,640 train / 120 validation / 240 test.
# Hardware:  2 CPU cores, no GPU, no network.
# Wall time: 52.5 min of training (4,800 steps x 32 lines, 0.66 s/step) + ~3 min to render and build;
#            2-core CPU VM, 2026-11-22. The loss sits at the language prior (~2.0-2.4 per token) for the
#            first ~1,200 steps, then falls: 1.77 at 1,500, 1.08 at 3,000, 0.71 at 4,800.
# Metric:    corpus CER 32.60% (mean per-line 42.16%) on the 240 held-out printed test lines, greedy,
#            48 new tokens (the random init: several hundred %). 40% of lines are random character codes,
#            the hardest part; dates, phones and labelled fields mostly come out right or one digit off.
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
