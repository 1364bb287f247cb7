#!/usr/bin/env bash
# Purpose:   issue 21's real-size rows on one GPU in <= 8 minutes (H200): LoRA training throughput, the
#            transformers + PEFT + accelerate baseline beside ocrtune (benchmarks/train_throughput.py: v1 and
#            OCR-2, base and gundam, batch 8), and greedy generation at batch 64 with ~500-token answers
#            through PEFT's LoRA layers vs with the adapter folded into the weights
#            (benchmarks/merged_generation.py: generated tokens/s, pages/s, identical token ids).
# Data:      page-shaped images with drawn text; random weights at the published sizes, written once into
#            $WORK as checkpoints (~7 GB each in bf16) that every row loads as its user would.
# Hardware:  one GPU, bf16. SIZE=tiny runs the same three stages on any CPU with the shipped tiny models
#            (fp32, smaller counts): the script's own test.
# Wall time: each stage runs under a time limit (PREP_S, GEN_S, TRAIN_S at full size) and both scripts
#            write their JSON after every row, so a slow stage costs its own rows, not the others';
#            the generation runs fit --budget-s by lowering the new-token cap (recorded as new_tokens_cap).
# Output:    $OUT/env.json (versions, device), $OUT/generation.json, $OUT/train_throughput.json, $OUT/log.
# Needs:     the repository root as working directory, python3 (PYTHON=...) with torch, transformers
#            (>=5.13,<5.25), peft (>=0.20), accelerate, datasets, pillow, pyyaml: the first stage checks and
#            names what is missing.
# Reproduce: OUT=/tmp/gts bash benchmarks/gpu_train_speed.sh          (a GPU)
#            SIZE=tiny OUT=/tmp/gts bash benchmarks/gpu_train_speed.sh (any machine)
set -euo pipefail
SIZE=${SIZE:-full}
OUT=${OUT:-runs/gpu-train-speed}
WORK=${WORK:-/tmp/gpu-train-speed-$SIZE}  # not under $OUT: the checkpoints are large and stay behind
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log") 2>&1
stamp() { echo "[$(date +%T)] $*"; }

if [ "$SIZE" = full ]; then
  PREP_S=${PREP_S:-150}; GEN_S=${GEN_S:-140}; TRAIN_S=${TRAIN_S:-180}
  TRAIN_ARGS=(--size full --batch-size 8 --steps 3 --warmup 2 --answer-tokens 256)
  GEN_ARGS=(--models "v1=$WORK/random-v1,ocr2=$WORK/random-ocr2" --dtype bfloat16 --pages 64 --batch-size 64
            --new-tokens 500 --repeats 1 --budget-s 20)
elif [ "$SIZE" = tiny ]; then
  PREP_S=${PREP_S:-600}; GEN_S=${GEN_S:-900}; TRAIN_S=${TRAIN_S:-900}
  TRAIN_ARGS=(--size tiny --device cpu --batch-size 8 --steps 2 --warmup 1 --answer-tokens 64)
  GEN_ARGS=(--dtype float32 --pages 16 --batch-size 16 --new-tokens 64 --repeats 1 --budget-s 20 --threads 1)
else
  echo "SIZE=$SIZE: choose full or tiny" >&2; exit 2
fi
# STATIC=1: also folded decoding with transformers' static cache, compiled on a GPU (not in the 8 minutes:
# compilation comes on top; raise GEN_S).
if [ "${STATIC:-0}" = 1 ]; then GEN_ARGS+=(--static-cache); fi

stamp "env ($SIZE)"
$PY - "$OUT/env.json" <<'EOF'
import importlib, importlib.util, json, platform, sys
need = ["torch", "transformers", "peft", "accelerate", "datasets", "PIL", "yaml"]
missing = [name for name in need if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (carry them as wheels; see the header)")
import torch
env = {"python": platform.python_version(), "cuda": torch.cuda.is_available(),
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
       **{name: importlib.import_module(name).__version__ for name in need if name not in ("PIL", "yaml")}}
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
print(json.dumps(env))
EOF
if [ "$SIZE" = full ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "SIZE=full needs a GPU (SIZE=tiny runs on a CPU)" >&2; exit 2
fi

stamp "prepare: dataset and (full size) random checkpoints in $WORK"
timeout "$PREP_S" $PY benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" --workdir "$WORK" --prepare-only \
  || { echo "prepare failed or ran past ${PREP_S}s"; exit 1; }

stamp "generation: wrapped vs folded"
timeout "$GEN_S" $PY benchmarks/merged_generation.py "${GEN_ARGS[@]}" --json "$OUT/generation.json" \
  || echo "generation stopped (exit $?): the rows in $OUT/generation.json are those that finished"

stamp "training throughput: baseline vs ocrtune"
timeout "$TRAIN_S" $PY benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" --workdir "$WORK" \
  --json "$OUT/train_throughput.json" \
  || echo "training rows stopped (exit $?): the rows in $OUT/train_throughput.json are those that finished"
stamp done
