#!/usr/bin/env bash
# The issue-12 GPU runs on two H100s (lent `nvidia-h100-x2`), in parts that
# each fit one device call (10 minutes); every step has its own time limit.
# Rows and logs collect in RUN (kept on the machine while it stays warm, so a
# later part can merge an earlier part's rows); each part copies what it made
# to OUT, as few files as the device returns (at most 8).
#
#   bash benchmarks/h100x2_suite.sh tp      # tp1, then tp2
#   bash benchmarks/h100x2_suite.sh tp1     # TP=1 throughput: ours on GPU 0, AR twin on GPU 1
#   bash benchmarks/h100x2_suite.sh tp2     # TP=2 throughput, ours then AR; merges with tp1's rows
#   bash benchmarks/h100x2_suite.sh tests   # golden TP=2 / DP=2, lifecycle, executors
#   bash benchmarks/h100x2_suite.sh dp      # DP=2 vs one engine; sleep memory at 8B
#
# vLLM on the device: the bundle of ../shared/gpu/, with part two split in halves
# (scripts/gpu_bundle_split.sh says why and gives the three calls).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run}
RUN=${RUN:-/tmp/h100x2-suite}
MODEL=${MODEL:-../shared/models/llada-8b-shape}
source benchmarks/suite_common.sh
# Rows of the TP comparison: batch 1 (exact k=1 and 4, dual k=1 and 4) and
# batch 32 (dual k=4; the others go over the row budget and are skipped).
ROWS=(--modes none dual --tokens-per-step 1 4 --batch 1 32 --max-seconds-per-row 20
      --gpu-memory-utilization 0.85)
tp1() {
  step tp1 300 bash -c "CUDA_VISIBLE_DEVICES=0 python3 benchmarks/throughput.py --model $MODEL \
      ${ROWS[*]} --no-ar --json $RUN/tp1_diffusion.json > $RUN/logs/tp1_diffusion.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 python3 benchmarks/throughput.py --model $MODEL --batch 1 32 \
      --gpu-memory-utilization 0.85 --no-diffusion --json $RUN/tp1_ar.json \
      > $RUN/logs/tp1_ar.log 2>&1 & wait"
}
tp2() {
  step tp2 240 python3 benchmarks/throughput.py --model "$MODEL" "${ROWS[@]}" \
      --tensor-parallel-size 2 --no-ar --json "$RUN/tp2_diffusion.json"
  step tp2_ar 200 python3 benchmarks/throughput.py --model "$MODEL" --batch 1 32 \
      --gpu-memory-utilization 0.85 --tensor-parallel-size 2 --no-diffusion --json "$RUN/tp2_ar.json"
  python3 benchmarks/tp_speedup.py "$RUN"/tp1_*.json "$RUN"/tp2_*.json \
      --json "$OUT/h100x2_tp.json" | tee -a "$LOG"
}
case "${1:?part: tp | tp1 | tp2 | tests | dp}" in
tp1) tp1 ;;
tp2) tp2 ;;
tp) tp1; tp2 ;;
tests)
  step tests 560 python3 -m pytest -q -s tests/test_llada_golden.py tests/test_dream_golden.py \
      tests/test_parallel.py tests/test_lifecycle.py tests/test_executors.py
  grep -E "passed|failed|error|engine device memory" "$RUN/logs/tests.log" | tail -20 | tee -a "$LOG"
  ;;
dp)
  step dp 400 python3 benchmarks/dp_throughput.py --model "$MODEL" --data-parallel-size 1 2 \
      --batch 32 --tokens-per-step 4 --cache dual --log-dir "$RUN/logs" --json "$OUT/h100x2_dp.json"
  step sleep 180 python3 benchmarks/sleep_memory.py --model "$MODEL" \
      --json "$OUT/h100_sleep.json"
  tail -4 "$RUN/logs/dp.log" "$RUN/logs/sleep.log" | tee -a "$LOG"
  ;;
esac
# The logs so far in one file (the device returns at most 8), the rows too.
for f in "$RUN"/logs/*.log; do echo "##### $f"; tail -c 40000 "$f"; done > "$OUT/logs.txt"
cp "$RUN"/*.json "$OUT"/ 2>/dev/null || true
