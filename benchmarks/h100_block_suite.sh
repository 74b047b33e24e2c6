#!/usr/bin/env bash
# The issue-14 (SDAR, Fast-dLLM v2) GPU runs on one H100, in parts that each fit
# one device call (10 minutes). Logs collect in RUN; each part copies its
# results to OUT.
#
#   CPU_JSON=sdar_cpu.json bash benchmarks/h100_block_suite.sh check
#                          # kernel and golden tests on the GPU; SDAR on the GPU
#                          # against the CPU's tokens (tests/sdar/gpu_check.py)
#   bash benchmarks/h100_block_suite.sh ar4b     # vLLM's Qwen3 twin, SDAR-4B dims
#   bash benchmarks/h100_block_suite.sh ours4b   # our engine, SDAR-4B shape
#   bash benchmarks/h100_block_suite.sh ar8b | ours8b   # the same at SDAR-8B
#   bash benchmarks/h100_block_suite.sh llada2 | arllada2
#                          # issue 15: LLaDA2.0-mini shape (block 32) and vLLM's
#                          # BailingMoeV2 twin; LLaDA2's golden tests on the GPU first
#
# vLLM on the device: the bundle of ../shared/gpu/ (scripts/gpu_bundle_split.sh
# gives the calls). LLaDA2 needs vLLM's MoE kernels, which the bundle leaves
# out: carry .gpu-bundle/moe (scripts/gpu_moe_part.sh builds and installs it).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run}
RUN=${RUN:-/tmp/h100-block-suite}
source benchmarks/suite_common.sh
bench() {  # name, model, limit, extra throughput.py arguments (after the defaults: they win)...
  local name=$1 model=$2 limit=$3; shift 3
  step "$name" "$limit" python3 benchmarks/throughput.py --model "benchmarks/models/$model" \
    --prompt 512 --gen 512 --block 4 --tokens-per-step 1 2 4 --batch 1 32 128 \
    --max-seconds-per-row 150 --gpu-memory-utilization 0.9 --json "$OUT/$name.json" "$@"
  grep -E "^\{|Error|error" "$RUN/logs/$name.log" | tail -14 | tee -a "$LOG"
}
case "${1:?part: check | ar4b | ours4b | ar8b | ours8b | llada2 | arllada2}" in
check)
  step tests 420 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention_kernel.py \
    tests/test_block_commit.py tests/test_fast_dllm_v2_golden.py tests/test_llada_golden.py \
    tests/test_dream_golden.py tests/test_dream_commit.py
  tail -3 "$RUN/logs/tests.log" | tee -a "$LOG"
  step sdar_gpu 150 python3 tests/sdar/gpu_check.py /tmp/sdar64 "$OUT/sdar_gpu.json"
  step sdar_gpu_graphs 150 python3 tests/sdar/gpu_check.py /tmp/sdar64 "$OUT/sdar_gpu_graphs.json" \
    --graphs
  for f in sdar_gpu sdar_gpu_graphs; do
    python3 tests/sdar/gpu_check.py --compare "${CPU_JSON:?}" "$OUT/$f.json" 2>&1 | tail -3 \
      | tee -a "$LOG"
  done
  ;;
ar4b) bench ar4b sdar-4b-shape 560 --no-diffusion ;;
ours4b) bench ours4b sdar-4b-shape 580 --no-ar ;;
ar8b) bench ar8b sdar-8b-shape 560 --no-diffusion ;;
ours8b) bench ours8b sdar-8b-shape 580 --no-ar ;;
llada2)
  step llada2_tests 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_llada2_golden.py
  tail -3 "$RUN/logs/llada2_tests.log" | tee -a "$LOG"
  bench llada2 llada2-mini-shape 300 --no-ar --block 32
  # Multi-block decoding on vs off at batch 1 (a block fully activated once the
  # one before it is half decoded: dummy weights never pass the semi-active
  # threshold).
  bench llada2_multi llada2-mini-shape 150 --no-ar --block 32 --batch 1 --tokens-per-step 2 4 \
    --blocks-in-flight 1 2 3 --decoded-token-threshold 0.5
  ;;
arllada2) bench arllada2 llada2-mini-shape 560 --no-diffusion --block 32 ;;
esac
cp "$LOG" "$OUT/suite-$1.log"
