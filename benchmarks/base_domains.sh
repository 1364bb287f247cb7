#!/usr/bin/env bash
# bash benchmarks/base_domains.sh OUT_DIR MODEL [MODEL ...]
#
# How each base reads the synthetic domains it may meet: 200 fresh lines (seed 777, never used in
# pretraining) of printed (DejaVu/STIX, light augmentation), printed-scan (22 typefaces, the
# handwriting domain's scanner degradation) and handwriting (the demo's domain), each scored with
# `ocrtune eval` (greedy, 48 new tokens). Writes OUT_DIR/summary.tsv (model, domain, lines, CER).
# Results: BENCHMARKS.md ("A second pretraining stage on degraded print").
set -euo pipefail
OUT=$1
shift
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/summary.tsv"
for domain in printed printed-scan handwriting; do
  $PY -m data_prep.synthetic --domain "$domain" --n 200 --seed 777 --output "$OUT/scans-$domain" > /dev/null 2> "$OUT/render-$domain.log"
  # no validation split; all but ~1% of the lines are test lines
  $PY -m finetune.cli data build --source manifest --input "$OUT/scans-$domain/manifest.jsonl" \
    --output "$OUT/data-$domain" --val-fraction 0.0 --test-fraction 0.99 --seed 0 --overwrite > "$OUT/build-$domain.log" 2>&1
  for model in "$@"; do
    tag=$(basename "$model" | tr ':' '-')
    $PY -m finetune.cli eval --model "$model" --data "$OUT/data-$domain" --output "$OUT/eval-$tag-$domain" \
      --max-new-tokens 48 --batch-size 32 --no-progress > "$OUT/eval-$tag-$domain.log" 2>&1
    $PY - "$OUT/eval-$tag-$domain/report.json" "$model" "$domain" >> "$OUT/summary.tsv" <<'PYEOF'
import json, sys
base = json.load(open(sys.argv[1]))["systems"]["base"]
print(sys.argv[2], sys.argv[3], base["n"], f"{100 * base['cer']:.2f}%", sep="\t")
PYEOF
  done
done
cat "$OUT/summary.tsv"
