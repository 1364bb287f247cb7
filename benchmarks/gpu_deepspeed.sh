#!/usr/bin/env bash
# DeepSpeed ZeRO-2/3 and QLoRA on one GPU, through the real training entry point, on DeepSeek-OCR
# (v1) with random weights: the tiny builtin model and the published size (3.4B, built from the
# official config; benchmarks/v1_full_size.py). Sized for 5 minutes on one H200 (not yet run there).
#
#   bash benchmarks/gpu_deepspeed.sh OUT_DIR                       # everything (a GPU, deepspeed, bitsandbytes)
#   bash benchmarks/gpu_deepspeed.sh OUT_DIR --sizes tiny          # the tiny path only (runs on a CPU too)
#   bash benchmarks/gpu_deepspeed.sh OUT_DIR --stages 3 --no-qlora
#
# Per size and ZeRO stage (configs/accelerate/deepspeed_zero{2,3}.yaml, 1 process): 3 steps with
# a checkpoint after steps 1 and 2; then the same run resumed from step 2 (train.resume_from=latest),
# whose adapter must equal the uninterrupted one bit for bit. QLoRA (full size only unless
# --sizes tiny): 2 steps of bf16 LoRA, 2 of model.quantization=nf4, their peak GPU memory, and the
# nf4 adapter loaded on the unquantized base with ocrtune's verified loader.
# Writes OUT_DIR/results.jsonl (one JSON object per check) and prints it; exits non-zero on the
# first failed check. Record the commands and results in BENCHMARKS.md.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
[[ $# -ge 1 && $1 != -* ]] || { usage; exit 2; }
OUT=$1; shift
SIZES=tiny,full; STAGES=2,3; QLORA=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --sizes) SIZES=$2; shift 2 ;;
    --stages) STAGES=$2; shift 2 ;;
    --no-qlora) QLORA=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage; exit 2 ;;
  esac
done
for s in ${SIZES//,/ }; do [[ $s == tiny || $s == full ]] || { echo "--sizes: tiny and/or full, not $s" >&2; exit 2; }; done
for z in ${STAGES//,/ }; do [[ $z == 2 || $z == 3 ]] || { echo "--stages: 2 and/or 3, not $z" >&2; exit 2; }; done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
cd "$REPO"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline

# Data: 40 rendered lines; models: the builtin tiny v1, and the full size written once in the
# official layout (random normal weights, bf16).
[[ -d $OUT/data ]] || "$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path
from data_prep.build import build_dataset
from data_prep.sample import make_folder
out = Path(sys.argv[1])
build_dataset("folder", make_folder(out / "scans", 40), out / "data", val_fraction=0.1, test_fraction=0.2,
              seed=0, progress=False)
EOF
model_for() {
  if [[ $1 == tiny ]]; then echo builtin:tiny-random-deepseek-ocr; return; fi
  if [[ ! -f $OUT/v1-full/config.json ]]; then
    "$PY" - "$OUT/v1-full" <<'EOF'
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("v1_full_size", "benchmarks/v1_full_size.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
model, proc = bench.build("full", torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16)
model.save_pretrained(sys.argv[1]); proc.save_pretrained(sys.argv[1])
EOF
  fi
  echo "$OUT/v1-full"
}
record() { echo "$1" | tee -a "$RESULTS"; }

# One process under a ZeRO stage. The shipped config with what a 1-GPU check changes: 1 process,
# accumulation 2 (train.grad_accum). ZeRO-3 needs the plain loss (distributed.py says why).
zero() {
  local stage=$1 model=$2 out=$3; shift 3
  "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/deepspeed_zero$stage.yaml" --num_processes 1 \
    --gradient_accumulation_steps 2 -m finetune.train configs/runs/tiny_smoke.yaml "data.path=$OUT/data" \
    "model.name=$model" model.dtype=auto "output_dir=$out" train.max_steps=3 train.batch_size=1 train.grad_accum=2 \
    train.save_steps=1 train.save_total_limit=2 train.loss_chunk_tokens=0 --no-progress "$@" > "$out.log" 2>&1 \
    || { tail -30 "$out.log" >&2; exit 1; }
}

for size in ${SIZES//,/ }; do
  model=$(model_for "$size")
  for stage in ${STAGES//,/ }; do
    run=$OUT/zero$stage-$size
    rm -rf "$run" "$run-resumed"
    start=$(date +%s)
    zero "$stage" "$model" "$run"
    mid=$(date +%s)
    cp -r "$run" "$run-resumed"
    rm -rf "$run-resumed/adapter" "$run-resumed/checkpoints/step-000002"  # resume from step 1's checkpoint
    zero "$stage" "$model" "$run-resumed" train.resume_from=latest
    record "$("$PY" - "$run" "$run-resumed" "$stage" "$size" "$start" "$mid" <<'EOF'
import json, sys, time
from pathlib import Path
from safetensors.torch import load_file
run, resumed, stage, size, start, mid = sys.argv[1:]
a = load_file(f"{run}/adapter/adapter_model.safetensors")
b = load_file(f"{resumed}/adapter/adapter_model.safetensors")
s = json.loads(Path(run, "train_summary.json").read_text())
same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
print(json.dumps({"check": f"zero{stage}", "size": size, "topology": s["topology"], "steps": s["steps"],
                  "final_loss": s["final_loss"], "peak_gpu_memory_bytes": s["peak_gpu_memory_bytes"],
                  "checkpoints": sorted(p.name for p in Path(run, "checkpoints").iterdir()),
                  "resumed_bit_identical": same, "train_s": int(mid) - int(start), "resume_s": int(time.time()) - int(mid)}))
sys.exit(0 if same and s["topology"] == "DEEPSPEED" else 1)
EOF
)"
  done
done

if [[ $QLORA == 1 ]]; then
  size=full; [[ $SIZES == tiny ]] && size=tiny
  model=$(model_for "$size")
  for quant in none nf4; do
    "$PY" -m finetune.train configs/runs/tiny_smoke.yaml "data.path=$OUT/data" "model.name=$model" \
      "output_dir=$OUT/qlora-$quant-$size" "model.quantization=$quant" model.dtype=auto train.max_steps=2 \
      train.batch_size=1 train.grad_accum=1 --no-progress > "$OUT/qlora-$quant-$size.log" 2>&1 \
      || { tail -30 "$OUT/qlora-$quant-$size.log" >&2; exit 1; }
  done
  record "$("$PY" - "$OUT" "$size" "$model" <<'EOF'
import json, sys
from pathlib import Path
from finetune.lora import load_adapter
from finetune.models import load_model
out, size, model = sys.argv[1:]
s = {q: json.loads(Path(out, f"qlora-{q}-{size}", "train_summary.json").read_text()) for q in ("none", "nf4")}
resolved, base, _ = load_model(model)  # unquantized
load_adapter(base, Path(out, f"qlora-nf4-{size}", "adapter"), "adapted", resolved.family)  # raises unless every tensor landed
print(json.dumps({"check": "qlora", "size": size,
                  "peak_gpu_memory_bytes": {q: s[q]["peak_gpu_memory_bytes"] for q in s},
                  "final_loss": {q: s[q]["final_loss"] for q in s}, "nf4_adapter_loads_on_unquantized_base": True}))
EOF
)"
fi
echo "results: $RESULTS"
