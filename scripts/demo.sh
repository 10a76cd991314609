#!/usr/bin/env bash
# The whole job on the built-in demo, offline on a CPU: demo data -> tiny teacher -> cache ->
# info/verify -> GenRecal stages 1-3 on a tiny student of another family -> eval.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default: demo/; it is recreated)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD/genrecal_cache/compat${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-demo}
BIN=.venv/bin
rm -rf "$OUT"
set -x
$BIN/genrecal-cache tiny-models --out "$OUT/models"
$BIN/genrecal-cache demo-data --out "$OUT/train" --n 200 --seed 0
$BIN/genrecal-cache demo-data --out "$OUT/test" --n 40 --seed 1
$BIN/genrecal-cache extract --teacher "$OUT/models/teacher" --data "$OUT/train/train.jsonl" --out "$OUT/cache" \
  --backend "${GENRECAL_DEMO_BACKEND:-transformers}"
$BIN/genrecal-cache info "$OUT/cache"
$BIN/genrecal-cache verify "$OUT/cache"
$BIN/genrecal-train --cache "$OUT/cache" --student "$OUT/models/student" --out "$OUT/run" \
  --stages 1,2,3 --max-steps 20 --batch-size 4 --checkpoint-every 10
$BIN/genrecal-eval --model "$OUT/run/final" --data "$OUT/test/train.jsonl" --out "$OUT/eval.json"
