#!/usr/bin/env bash
# benchmarks/gpu_vllm.py on the lent GPU machine (issue 20, item 6), from the repo root:
#   bash benchmarks/gpu_vllm.sh [more flags for gpu_vllm.py]
# Wheels in .whl/ (carried: what that machine's image lacks, README of the device tool) are
# installed into /tmp/site first. OUT (set there) receives gpu_vllm.json and gpu_vllm.log; the
# checkpoints go to /tmp. Ends within --budget-s (470 s) plus the install and interpreter start.
set -uo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu-vllm}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu_vllm.log" 2>&1 || true
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__,
"peft", peft.__version__)' >>"$OUT/gpu_vllm.log" 2>&1
exec python3 benchmarks/gpu_vllm.py --out "$OUT" "$@"
