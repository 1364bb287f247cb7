#!/usr/bin/env bash
# bash benchmarks/demo_sweep.sh BASE_MODEL OUT_DIR [NAME ...]
#
# Which adaptation settings move a printed-text base furthest on the demo's handwriting domain,
# and do lines or steps buy more? Trains the demo recipe (configs/runs/demo_handwriting.yaml)
# under each setting below, side by side, on the domain rendered at that setting's line count
# (seed 0, 15% test each), and scores each on its own held-out test lines: OUT_DIR/summary.tsv
# (name, lines, overrides, base CER, adapted CER). NAMEs pick a subset (default: all). The math is
# the same on a CPU and a GPU; made for a GPU (16 cores, one H100: a group of 6-8 runs ~5 min).
# Results, and which base each group ran on: BENCHMARKS.md.
set -uo pipefail
BASE=$1
OUT=$2
shift 2
PY=${PYTHON:-python3}
TLIM=${TLIM:-420}  # seconds a training may take before it is stopped (and left unscored)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
# name | lines | overrides of the demo recipe (each spells out r, alpha and lr: the recipe's change)
SETTINGS=(
  # learning rate, and every weight against decoder LoRA
  "dec-lr3e-3-800|3000|train.max_steps=800 lora.r=16 lora.alpha=32 train.lr=3e-3"
  "dec-lr1e-3-800|3000|train.max_steps=800 lora.r=16 lora.alpha=32 train.lr=1e-3"
  "dec-lr3e-4-800|3000|train.max_steps=800 lora.r=16 lora.alpha=32 train.lr=3e-4"
  "full-lr1e-3-800|3000|train.max_steps=800 train.lr=1e-3 lora.preset=full"
  # lines against steps, rank and rate
  "a|2000|train.max_steps=600 lora.r=16 lora.alpha=32 train.lr=3e-3"
  "b|2000|train.max_steps=1200 lora.r=16 lora.alpha=32 train.lr=3e-3"
  "c|6000|train.max_steps=600 lora.r=16 lora.alpha=32 train.lr=3e-3"
  "d|6000|train.max_steps=1200 lora.r=16 lora.alpha=32 train.lr=3e-3"
  "f|6000|train.max_steps=1200 lora.r=32 lora.alpha=64 train.lr=3e-3"
  "h|6000|train.max_steps=1200 lora.r=16 lora.alpha=32 train.lr=6e-3"
  "k|12000|train.max_steps=1500 lora.r=64 lora.alpha=128 train.lr=3e-3"
  "m|12000|train.max_steps=1500 lora.r=32 lora.alpha=64 train.lr=3e-3"
  # what fits the CPU demo's few minutes of training (<= ~1,000 steps of 16 lines)
  "p0|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3"
  "p1|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=6e-3"
  "p2|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=8e-3"
  "p3|12000|train.max_steps=900 lora.r=32 lora.alpha=128 train.lr=4e-3"
  "p4|12000|train.max_steps=900 lora.r=64 lora.alpha=128 train.lr=4e-3"
  "p5|12000|train.max_steps=1050 lora.r=32 lora.alpha=64 train.lr=4e-3"
  "p6|12000|train.max_steps=600 train.batch_size=24 lora.r=32 lora.alpha=64 train.lr=6e-3"
  "p7|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3 train.warmup_steps=80"
  "q0|16000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3"
  "q1|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3 lora.train_projector=true"
  "q2|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=3e-3"
  "q3|16000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3 lora.train_projector=true"
  "q4|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3 train.seed=1"
  "q5|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3 lora.preset=attention+mlp"
  "q6|12000|train.max_steps=900 lora.r=16 lora.alpha=32 train.lr=4e-3"
  "q7|12000|train.max_steps=900 lora.r=32 lora.alpha=64 train.lr=4e-3 train.max_grad_norm=0"
)
want() { local n; for n in "${NAMES[@]}"; do [ "$n" = "$1" ] && return 0; done; return 1; }
NAMES=("$@")
chosen=()
for s in "${SETTINGS[@]}"; do
  if [ ${#NAMES[@]} -eq 0 ] || want "${s%%|*}"; then chosen+=("$s"); fi
done
for n in $(printf '%s\n' "${chosen[@]}" | cut -d'|' -f2 | sort -un); do
  ( $PY -m data_prep.synthetic --domain handwriting --n "$n" --seed 0 --shards 8 --output "$OUT/scans$n" > /dev/null
    $PY -m finetune.cli data build --source manifest --input "$OUT/scans$n/manifest.jsonl" --output "$OUT/data$n" \
      --val-fraction 0.02 --test-fraction 0.15 --seed 0 --workers 8 --overwrite > "$OUT/build$n.log" 2>&1 ) &
done
wait
run_one() {
  local name lines overrides
  IFS='|' read -r name lines overrides <<< "$1"
  # shellcheck disable=SC2086
  timeout "$TLIM" $PY -m finetune.train configs/runs/demo_handwriting.yaml model.name="$BASE" \
    data.path="$OUT/data$lines" output_dir="$OUT/$name" train.gradient_checkpointing=false --no-progress \
    $overrides > "$OUT/$name.train.log" 2>&1 || { echo "$name: training stopped (see $OUT/$name.train.log)"; return 0; }
  local system=(--model "$BASE" --adapter "$OUT/$name/adapter")
  [ -d "$OUT/$name/model" ] && system=(--model "$OUT/$name/model")  # lora.preset=full writes a whole model
  $PY -m finetune.cli eval "${system[@]}" --data "$OUT/data$lines" \
    --output "$OUT/$name/eval" --max-new-tokens 48 --batch-size 128 > "$OUT/$name.eval.log" 2>&1 || return 0
  $PY - "$OUT/$name/eval/report.json" "$name" "$lines" "$overrides" >> "$OUT/summary.tsv" <<'PYEOF'
import json, sys
systems = json.load(open(sys.argv[1]))["systems"]
print(*sys.argv[2:5], *(f"{k}={v['cer']:.4f} (n={v['n']})" for k, v in systems.items()), sep="\t")
PYEOF
}
for s in "${chosen[@]}"; do run_one "$s" & done
wait
cat "$OUT/summary.tsv"
