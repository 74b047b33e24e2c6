#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md (issue 6), in one go, each step
# under its own time limit so a slow one cannot starve the rest. Writes JSON rows
# and logs to OUT (default benchmarks/results/run). Needs vLLM 0.26 and, for the
# reference step, transformers 4.46.3 in REF_SITE plus the reference checkout in
# REF_CODE (benchmarks/reference_hf.py says how; never part of this repo).
#
#   MODELS=../shared/models REF_CODE=.refcode REF_SITE=$HOME/.cache/ref-site \
#       bash benchmarks/h100_suite.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run}
MODELS=${MODELS:-../shared/models}
mkdir -p "$OUT"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?"; grep -A60 "^engine \|^impl \| seqs " "$OUT/$name.log" | head -60
}
# LLaDA-8B: every mode and k, with the AR Llama twin in the same run.
step llada 420 python3 benchmarks/throughput.py --model "$MODELS/llada-8b-shape" \
  --batch 1 8 32 64 --tokens-per-step 1 2 4 --max-seconds-per-row 20 \
  --gpu-memory-utilization 0.9 --json "$OUT/h100_llada8b_modes.json"
# Dream-7B: the same matrix, no AR twin (its GQA twin is a different model).
step dream 300 python3 benchmarks/throughput.py --model "$MODELS/dream-7b-shape" \
  --batch 1 8 32 64 --tokens-per-step 1 2 4 --max-seconds-per-row 12 --no-ar \
  --gpu-memory-utilization 0.9 --json "$OUT/h100_dream7b_modes.json"
# Our attention kernel against vLLM's FlashAttention: exact-mode and dual-cache shapes.
step kernel 120 bash -c "python3 benchmarks/attention_kernel.py --batches 1,8,32,64 --lens 384 \
  --rep 50 && python3 benchmarks/attention_kernel.py --cached --batches 1,8,32,64 --block 32 \
  --kv-lens 384 --rep 50"
# The official code at batch 1 (a process of its own, transformers 4.46.3).
if [ -n "${REF_CODE:-}" ]; then
  for family in llada-8b-shape dream-7b-shape; do
    step "ref-${family%%-*}" 240 env PYTHONPATH="${REF_SITE:-}" python3 benchmarks/reference_hf.py \
      --ref-code "$REF_CODE" --model "$MODELS/$family" --tokens-per-step 1 2 4 \
      --json "$OUT/h100_${family%%-*}_reference.json"
  done
fi
