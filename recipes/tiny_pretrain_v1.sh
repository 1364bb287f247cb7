#!/usr/bin/env bash
# Purpose:   pretrain builtin:tiny-deepseek-ocr, the v1 twin of the demo's future base: a 0.86M-parameter
#            model of the DeepSeek-OCR (v1) architecture (SAM -> CLIP -> projector -> MoE decoder, native
#            modules) meant to read printed lines. v1's vision tokens sit on a fixed grid over the image
#            (Gundam tiles a line into up to six 64 px squares of 4 x 4 tokens), which was the hope for a
#            from-scratch run converging where OCR-2's learned queries did not.
# Status:    DOES NOT CONVERGE ON A CPU YET (issue 3): 950 steps at batch 16 left the loss at 2.5-3.0 per
#            token, the language prior, as for the OCR-2 base. Needs a GPU's step count.
# Data:      8,000 printed synthetic lines (data_prep.synthetic --domain printed, seed 0), DejaVu/STIX fonts,
#            light scan augmentation.
# Hardware:  2 CPU cores, no GPU, no network.
# Wall time: 0.37 s per step at batch 16 (gradient checkpointing on) + ~1 min to render and build the data;
#            2-core CPU VM, 2026-11-22.
# Metric:    none yet (see Status); the eval step below reports printed-line CER when it runs.
# Reproduce: bash recipes/tiny_pretrain_v1.sh [OUT_DIR]; copy OUT_DIR/run/model to finetune/builtin/tiny-deepseek-ocr.
set -euo pipefail
OUT=${1:-runs/tiny-pretrain-v1}
mkdir -p "$OUT"
python -m finetune.models.tiny --family deepseek-ocr --size ocr --seed 0 --output "$OUT/init"
python -m data_prep.synthetic --domain printed --n 8000 --seed 0 --output "$OUT/scans"
ocrtune data build --source manifest --input "$OUT/scans/manifest.jsonl" --output "$OUT/data" \
  --val-fraction 0.01 --test-fraction 0.02 --overwrite
python -m finetune.train configs/runs/tiny_pretrain_v1.yaml model.name="$OUT/init" data.path="$OUT/data" \
  output_dir="$OUT/run"
ocrtune eval --model "$OUT/run/model" --data "$OUT/data" --output "$OUT/eval-printed" --max-new-tokens 48 --batch-size 32
