#!/usr/bin/env bash
# bash benchmarks/demo_sweep.sh BASE_MODEL OUT_DIR [LINES]
#
# Which adaptation settings move a printed-text base furthest on the demo's handwriting domain?
# Renders the demo's domain (LINES lines, seed 0, 15% test), then trains the demo recipe
# (configs/runs/demo_handwriting.yaml) under several settings side by side and scores each on the
# same held-out test lines: OUT_DIR/summary.tsv (name, settings, base CER, adapted CER). The math
# is the same on a CPU and a GPU; a GPU only makes the sweep fast. Results: BENCHMARKS.md.
set -euo pipefail
BASE=$1
OUT=$2
LINES=${3:-3000}
PY=${PYTHON:-python3}
PARALLEL=${PARALLEL:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY -m data_prep.synthetic --domain handwriting --n "$LINES" --seed 0 --shards 8 --output "$OUT/scans"
$PY -m finetune.cli data build --source manifest --input "$OUT/scans/manifest.jsonl" --output "$OUT/data" \
  --val-fraction 0.02 --test-fraction 0.15 --seed 0 --workers 8 --overwrite > "$OUT/build.log" 2>&1

# name | overrides of the demo recipe
SETTINGS=(
  "dec-lr3e-3-800|train.max_steps=800 train.lr=3e-3"
  "dec-lr1e-3-800|train.max_steps=800 train.lr=1e-3"
  "dec-lr3e-4-800|train.max_steps=800 train.lr=3e-4"
  "vis-lr1e-3-800|train.max_steps=800 train.lr=1e-3 lora.vision_lora=true lora.train_projector=true"
  "vis-lr3e-3-800|train.max_steps=800 train.lr=3e-3 lora.vision_lora=true lora.train_projector=true"
  "vis-lr1e-3-1600|train.max_steps=1600 train.lr=1e-3 lora.vision_lora=true lora.train_projector=true"
  "full-lr1e-3-800|train.max_steps=800 train.lr=1e-3 lora.preset=full"
  "full-lr3e-4-1600|train.max_steps=1600 train.lr=3e-4 lora.preset=full"
)
run_one() {
  local name=${1%%|*} overrides=${1#*|}
  # shellcheck disable=SC2086
  $PY -m finetune.train configs/runs/demo_handwriting.yaml model.name="$BASE" data.path="$OUT/data" \
    output_dir="$OUT/$name" train.gradient_checkpointing=false $overrides > "$OUT/$name.train.log" 2>&1 || return 0
  if [ -d "$OUT/$name/model" ]; then
    $PY -m finetune.cli eval --model "$OUT/$name/model" --data "$OUT/data" --output "$OUT/$name/eval" \
      --max-new-tokens 48 --batch-size 64 > "$OUT/$name.eval.log" 2>&1 || return 0
  else
    $PY -m finetune.cli eval --model "$BASE" --adapter "$OUT/$name/adapter" --data "$OUT/data" \
      --output "$OUT/$name/eval" --max-new-tokens 48 --batch-size 64 > "$OUT/$name.eval.log" 2>&1 || return 0
  fi
  $PY - "$OUT/$name/eval/report.json" "$name" "$overrides" >> "$OUT/summary.tsv" <<'EOF'
import json, sys
systems = json.load(open(sys.argv[1]))["systems"]
cer = {k: v["cer"] for k, v in systems.items()} if isinstance(systems, dict) else {s["name"]: s["cer"] for s in systems}
print(sys.argv[2], sys.argv[3], *(f"{k}={v:.4f}" for k, v in cer.items()), sep="\t")
EOF
}
i=0
for s in "${SETTINGS[@]}"; do
  run_one "$s" &
  i=$((i + 1))
  if [ $((i % PARALLEL)) -eq 0 ]; then wait; fi
done
wait
cat "$OUT/summary.tsv"
