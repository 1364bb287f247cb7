#!/usr/bin/env bash
# Purpose:   pretrain the printed-text tiny bases on one GPU: builtin:tiny-deepseek-ocr-2 (1.4M parameters,
#            configs/runs/tiny_pretrain.yaml) and builtin:tiny-deepseek-ocr (v1, 0.86M,
#            configs/runs/tiny_pretrain_v1.yaml), every weight trained (lora.preset: full), then each read
#            back on the held-out printed test lines and on rendered handwriting (the demo's domain, never
#            trained on here). FAMILIES="ocr2 v1" trains both side by side on one GPU.
# Data:      N_PRINTED lines of DOMAIN (data_prep.synthetic --domain DOMAIN --seed SEED --shards 16), split
#            seed 0: 0.2% validation, 0.5% test; 1,000 handwriting lines (seed 99) for the domain check.
#            DOMAIN=printed: matplotlib's 11 DejaVu/STIX faces, light augmentation; DOMAIN=printed-scan:
#            22 typefaces (15 Google families from PyPI) under the handwriting domain's scanner degradation.
# Hardware:  one GPU and ~16 CPU cores (DataLoader workers prepare pixels; the tiny models are launch-bound).
# Steps:     STEPS_OCR2 / STEPS_V1; "auto" sizes each run to TRAIN_S seconds from a 60-step probe.
#            V1_FROM continues the v1 run from a model instead of the seeded init (LR_V1, WARMUP_V1).
# Shipped:   the settings that made the shipped bases (OUT_DIR per run):
#   builtin:tiny-deepseek-ocr-2  FAMILIES="ocr2 v1" TRAIN_S=300 N_PRINTED=64000 (the probe's step count is
#            STEPS_OCR2=2100, to repeat it exactly)
#   builtin:tiny-deepseek-ocr    three stages, each continuing the last:
#            (1) FAMILIES=v1 STEPS_V1=1500 N_PRINTED=24000, OUT_DIR runs/pt1
#            (2) FAMILIES=v1 DOMAIN=printed-scan N_PRINTED=40000 STEPS_V1=2000 V1_FROM=runs/pt1/v1/model LR_V1=1e-3
#                WARMUP_V1=100, OUT_DIR runs/pt2
#            (3) as (2) on fresh lines: SEED=3 STEPS_V1=1800 V1_FROM=runs/pt2/v1/model
# Wall time: minutes per stage on one H100; measured per stage: BENCHMARKS.md, "Recipes", tiny_pretrain_gpu.sh.
# Metric:    corpus CER on held-out printed (and printed-scan) lines and on the demo's handwriting domain;
#            reached, per stage, and what each stage bought the demo: the same row and the sections it names.
#            The same recipe on 2 CPU cores: recipes/tiny_pretrain.sh / tiny_pretrain_v1.sh (slower, weaker).
# Reproduce: bash recipes/tiny_pretrain_gpu.sh [OUT_DIR] with the settings above; copy OUT_DIR/ocr2/model to
#            finetune/builtin/tiny-deepseek-ocr-2 and OUT_DIR/v1/model to finetune/builtin/tiny-deepseek-ocr.
#            GPU kernels are not bit-deterministic: a re-run reads as well, not with identical weights.
set -euo pipefail
OUT=${1:-runs/tiny-pretrain-gpu}
PY=${PYTHON:-python3}
STEPS_OCR2=${STEPS_OCR2:-auto}
STEPS_V1=${STEPS_V1:-auto}
TRAIN_S=${TRAIN_S:-360}
FAMILIES=${FAMILIES:-ocr2 v1}  # which bases to train (both share the GPU side by side)
N_PRINTED=${N_PRINTED:-64000}  # fewer for a quick try of the recipe itself
DOMAIN=${DOMAIN:-printed}      # printed | printed-scan (see Data above)
SEED=${SEED:-2}                # render seed of the training lines: a later stage draws fresh ones
V1_FROM=${V1_FROM:-}           # empty: the seeded init; else a v1 model to continue from
LR_V1=${LR_V1:-2.0e-3}
WARMUP_V1=${WARMUP_V1:-300}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
stamp() { echo "[$(date +%T)] $*"; }

stamp render
$PY -m data_prep.synthetic --domain "$DOMAIN" --n "$N_PRINTED" --seed "$SEED" --shards 16 --output "$OUT/scans"
$PY -m data_prep.synthetic --domain handwriting --n 1000 --seed 99 --shards 16 --output "$OUT/hw-scans"
stamp build
$PY -m finetune.cli data build --source manifest --input "$OUT/scans/manifest.jsonl" --output "$OUT/data" \
  --val-fraction 0.002 --test-fraction 0.005 --workers 16 --overwrite
$PY -m finetune.cli data build --source manifest --input "$OUT/hw-scans/manifest.jsonl" --output "$OUT/hw-data" \
  --val-fraction 0.0 --test-fraction 0.3 --workers 16 --overwrite
$PY -m finetune.models.tiny --size ocr --seed 0 --output "$OUT/init-ocr2"
$PY -m finetune.models.tiny --family deepseek-ocr --size ocr --seed 0 --output "$OUT/init-v1"

# Per-family overrides for a GPU: batch 128 (the step time of a model this small hardly grows with
# the batch), workers to keep the GPU fed (OCR-2's 384 px views cost ~8 ms each to prepare, v1's ~1 ms).
OCR2_ARGS=(configs/runs/tiny_pretrain.yaml model.name="$OUT/init-ocr2" data.path="$OUT/data"
  train.batch_size=128 train.lr=1.5e-3 train.warmup_steps=300 train.num_workers=9
  train.gradient_checkpointing=false train.log_every=50 train.save_steps=1000)
V1_ARGS=(configs/runs/tiny_pretrain_v1.yaml model.name="${V1_FROM:-$OUT/init-v1}" data.path="$OUT/data"
  train.batch_size=128 train.lr="$LR_V1" train.warmup_steps="$WARMUP_V1" train.num_workers=3
  train.log_every=50 train.save_steps=1000)

seconds_per_step() {  # metrics.jsonl -> seconds per step between the 20th and the last logged step
  $PY - "$1" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print((rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"]))
EOF
}
want() { [[ " $FAMILIES " == *" $1 "* ]]; }
if { want ocr2 && [ "$STEPS_OCR2" = auto ]; } || { want v1 && [ "$STEPS_V1" = auto ]; }; then
  stamp probe
  want ocr2 && $PY -m finetune.train "${OCR2_ARGS[@]}" output_dir="$OUT/probe-ocr2" train.max_steps=60 \
    train.log_every=20 train.save_steps=0 > "$OUT/probe-ocr2.log" 2>&1 &
  want v1 && $PY -m finetune.train "${V1_ARGS[@]}" output_dir="$OUT/probe-v1" train.max_steps=60 \
    train.log_every=20 train.save_steps=0 > "$OUT/probe-v1.log" 2>&1 &
  wait
  for fam in $FAMILIES; do
    var=STEPS_${fam^^}
    if [ "${!var}" = auto ]; then
      s=$(seconds_per_step "$OUT/probe-$fam/metrics.jsonl")
      printf -v "$var" '%s' "$($PY -c "print(int($TRAIN_S / $s) // 50 * 50)")"
      stamp "probe: $fam $s s/step -> ${!var} steps"
      if [ "${!var}" -lt 500 ]; then
        echo "error: TRAIN_S=$TRAIN_S s buys fewer than 500 $fam steps here: no GPU, or raise TRAIN_S" >&2; exit 2
      fi
    fi
  done
fi

stamp "train $FAMILIES (OCR-2: $STEPS_OCR2 steps, v1: $STEPS_V1 steps), side by side"
want ocr2 && $PY -m finetune.train "${OCR2_ARGS[@]}" output_dir="$OUT/ocr2" train.max_steps="$STEPS_OCR2" \
  > "$OUT/ocr2.log" 2>&1 &
want v1 && $PY -m finetune.train "${V1_ARGS[@]}" output_dir="$OUT/v1" train.max_steps="$STEPS_V1" > "$OUT/v1.log" 2>&1 &
wait
stamp eval
for fam in $FAMILIES; do
  $PY -m finetune.cli eval --model "$OUT/$fam/model" --data "$OUT/data" --output "$OUT/$fam/eval-printed" \
    --max-new-tokens 48 --batch-size 64 > "$OUT/$fam/eval-printed.log" 2>&1
  $PY -m finetune.cli eval --model "$OUT/$fam/model" --data "$OUT/hw-data" --output "$OUT/$fam/eval-handwriting" \
    --max-new-tokens 48 --batch-size 64 > "$OUT/$fam/eval-handwriting.log" 2>&1
done
stamp done
