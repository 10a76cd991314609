#!/usr/bin/env bash
# The whole job, offline on a CPU: a small teacher that knows more than the distillation data shows ->
# its feature cache (vLLM where installed) -> a student of another family and tokenizer distilled with
# GenRecal (stages 1,2,3) and, beside it, the same student trained by SFT alone at the same budget ->
# teacher / SFT / GenRecal compared on held-out questions, with loss curves and an accuracy plot.
#
# Usage: bash scripts/demo.sh [OUT] [--quick]     OUT defaults to demo/; the teacher trained there is
#                                                reused by later runs (delete OUT to start over)
#   --quick (or GENRECAL_DEMO_QUICK=1)   tiny data and budget: checks that every step runs (numbers mean nothing)
#   GENRECAL_DEMO_BACKEND=transformers   extract the cache without vLLM (default: vllm where installed)
#   GENRECAL_DEMO_SEED=N                 the student's seed (initialisation and data order; default 0)
#   GENRECAL_DEMO_STEPS=N                optimizer steps of each student (default 600)
#   GENRECAL_BIN=DIR                     use the python and genrecal-* commands in DIR; skip scripts/setup.sh
set -euo pipefail

main() {  # one function, read whole before it runs, and `exit` on its line: editing this file cannot derail a running demo
  cd "$(dirname "$0")/.."
  OUT=demo
  QUICK=${GENRECAL_DEMO_QUICK:-0}
  for arg in "$@"; do
    case "$arg" in
      --quick) QUICK=1 ;;
      -*) echo "demo.sh: unknown option $arg (usage: bash scripts/demo.sh [OUT] [--quick])" >&2; exit 2 ;;
      *) OUT=$arg ;;
    esac
  done
  if [ -n "${GENRECAL_BIN:-}" ]; then BIN=$GENRECAL_BIN; else bash scripts/setup.sh; BIN=.venv/bin; fi
  export PYTHONPATH="$PWD/genrecal_cache/compat${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
  # Thread counts set the order of float sums, so they change the figures: pinned, so that a machine with more
  # cores (the same CPU) gets the README's table. 2 threads where one process runs (teacher training,
  # extraction), 1 for each of the processes side by side (the students, the evaluations); vLLM's worker on
  # core 0, one thread (its own choice on a 2-core machine). vLLM's batches follow its KV-cache size: the
  # backend's own, not a VLLM_CPU_KVCACHE_SPACE from the environment. Data order and initialisation follow
  # the seeds. `torch_threads` in each metrics.jsonl records what a run used.
  export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 VLLM_CPU_OMP_THREADS_BIND=0
  unset VLLM_CPU_KVCACHE_SPACE
  SEED=${GENRECAL_DEMO_SEED:-0}
  BACKEND=${GENRECAL_DEMO_BACKEND:-$("$BIN/python" -c 'import vllm' >/dev/null 2>&1 && echo vllm || echo transformers)}
  # The budget both students get: optimizer steps x samples per step. GenRecal shares its steps out over
  # stages 1/2/3 (--stage-split, default 4/76/20 %) with a 10 % LR warm-up per stage; SFT gets its better
  # schedule (no warm-up). Both: LR 1e-3 -> 1e-4, vision tower trained (the students start from random).
  if [ "$QUICK" = 1 ]; then STEPS=10 BATCH=4 QFLAG=--quick; else STEPS=600 BATCH=16 QFLAG=; fi
  STEPS=${GENRECAL_DEMO_STEPS:-$STEPS}
  T0=$SECONDS
  step() { printf '\n== [%3d s] %s\n' $((SECONDS - T0)) "$*"; }

  step "1/5 task data, teacher, student ($OUT/teacher is trained once, then reused)"
  # sets TEACHER STUDENT TRAIN TEST; an assignment, so that set -e stops here when it fails (`eval "$(...)"` would not)
  paths=$("$BIN/python" scripts/demo_task.py "$OUT" $QFLAG --seed "$SEED")
  eval "$paths"
  rm -rf "$OUT/cache" "$OUT/runs"
  mkdir -p "$OUT/runs"

  step "2/5 the teacher's cache ($BACKEND backend): hidden states, top-k logprobs and head of every distillation sample"
  set -x
  "$BIN/genrecal-cache" extract --teacher "$TEACHER" --data "$TRAIN" --out "$OUT/cache" --backend "$BACKEND"
  "$BIN/genrecal-cache" verify "$OUT/cache"
  { set +x; } 2>/dev/null

  step "3/5 two students side by side, $STEPS steps x $BATCH samples each (logs: $OUT/runs/*.log)"
  COMMON=(--cache "$OUT/cache" --student "$STUDENT" --batch-size "$BATCH" --lr 1e-3 --lr-end 1e-4 --train-vision
          --seed "$SEED" --checkpoint-every 100000)
  set -x
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$BIN/genrecal-train" "${COMMON[@]}" --out "$OUT/runs/genrecal" --stages 1,2,3 --total-steps "$STEPS" \
    --warmup 0.1 > "$OUT/runs/genrecal.log" 2>&1 &
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$BIN/genrecal-train" "${COMMON[@]}" --out "$OUT/runs/sft" --stages 3 --total-steps "$STEPS" \
    --warmup 0 > "$OUT/runs/sft.log" 2>&1 &
  { set +x; } 2>/dev/null
  for run in genrecal sft; do
    wait -n || { echo "training failed: see $OUT/runs/genrecal.log and $OUT/runs/sft.log" >&2; tail -5 "$OUT"/runs/*.log >&2; exit 1; }
  done

  step "4/5 held-out evaluation (greedy answers, exact match)"
  pids=()
  for model in "$OUT/teacher" "$OUT/runs/genrecal" "$OUT/runs/sft"; do
    [ -f "$model/eval.json" ] && continue  # the reused teacher keeps its evaluation
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$BIN/genrecal-eval" --model "$model/final" --data "$TEST" --out "$model/eval.json" \
      > "$model/eval.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "evaluation failed: see $OUT/*/eval.log" >&2; exit 1; }; done

  step "5/5 held-out accuracy (%) of teacher, SFT-only student, GenRecal student"
  "$BIN/genrecal-eval" --compare "$OUT/teacher" "$OUT/runs/sft" "$OUT/runs/genrecal" --out "$OUT/accuracy_by_type.png"
  echo
  echo "Loss curves: $OUT/runs/genrecal/curves.png (stages 1-3), $OUT/runs/sft/curves.png, $OUT/teacher/curves.png"
  echo "Accuracy per question type: $OUT/accuracy_by_type.png"
  echo "Total: $((SECONDS - T0)) s"
}

main "$@"; exit
