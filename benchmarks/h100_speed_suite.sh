#!/usr/bin/env bash
# The issue-16 (LLaDA / Dream speed) GPU runs on one H100, in parts that each
# fit one device call (10 minutes). Logs collect in RUN; each part copies its
# results to OUT. MODELS holds the 8B/7B configs (../shared/models).
#
#   bash benchmarks/h100_speed_suite.sh llada   # LLaDA-8B: exact and dual, k = 1, 2, 4, batch
#                                               # 1 / 8 / 32, with the AR Llama twin
#   bash benchmarks/h100_speed_suite.sh long    # batch 1, k = 4, long prompts, with AR
#   bash benchmarks/h100_speed_suite.sh dream   # Dream-7B at batch 32 and 64
#   bash benchmarks/h100_speed_suite.sh fp8     # FP8 weights: token agreement on the golden
#                                               # prompts; speed next to bf16 at batch 1 and 32
#   bash benchmarks/h100_speed_suite.sh kernel  # attention: split keys against one program
#                                               # per tile, batch 1, prefixes 128 to 3072
#   bash benchmarks/h100_speed_suite.sh tests   # the golden and kernel tests on the GPU
#                                               # (VLLM_OMNI_GOLDEN: the golden folder)
#   bash benchmarks/h100_speed_suite.sh profile # where a batch-1 step's time goes, at
#                                               # prompt 128 / gen 256 and 3072 / 512
#   bash benchmarks/h100_speed_suite.sh ref     # the official generate (.refcode, see
#                                               # benchmarks/reference_hf.py) and our exact
#                                               # mode, batch 1, k = 1, 2, 4
#
# vLLM on the device: the bundle of ../shared/gpu/ (scripts/gpu_bundle_split.sh
# gives the calls).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run}
RUN=${RUN:-/tmp/h100-speed-suite}
MODELS=${MODELS:-../shared/models}
source benchmarks/suite_common.sh
bench() {  # name, limit, throughput.py arguments...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python3 benchmarks/throughput.py --gpu-memory-utilization 0.9 \
    --max-seconds-per-row 60 --json "$OUT/$name.json" "$@"
  grep -E "^\{|Error|error" "$RUN/logs/$name.log" | tail -24 | tee -a "$LOG"
}
LLADA="$MODELS/llada-8b-shape"
case "${1:?part: llada | long | dream | fp8 | kernel | tests | profile | ref}" in
llada) bench llada 560 --model "$LLADA" --batch 1 8 32 --modes none dual --tokens-per-step 1 2 4 ;;
long)
  for pg in "128 256" "1024 256" "1024 1024" "3072 512"; do
    set -- $pg
    bench "long_$1_$2" 150 --model "$LLADA" --batch 1 --modes none dual --tokens-per-step 4 \
      --prompt "$1" --gen "$2"
  done
  ;;
dream) bench dream 560 --model "$MODELS/dream-7b-shape" --batch 32 64 --modes none dual \
  --tokens-per-step 1 2 4 --no-ar --max-seconds-per-row 30 ;;
fp8)
  step fp8_agreement 200 python3 benchmarks/fp8_agreement.py --json "$OUT/fp8_agreement.json"
  grep -E "^\{|Error|error" "$RUN/logs/fp8_agreement.log" | tail -4 | tee -a "$LOG"
  bench fp8_speed 180 --model "$LLADA" --batch 1 32 --modes dual --tokens-per-step 4 --no-ar \
    --quantization fp8
  bench bf16_speed 180 --model "$LLADA" --batch 1 32 --modes dual --tokens-per-step 4 --no-ar
  ;;
kernel)
  # A 32-token block over 128-3072 paged prefix keys (+ its own 32 or a 512-key
  # suffix), as one launch and as CUDA graph replays (a split launch is two kernels).
  for extra in "--kv-lens 32" "--kv-lens 32 --graph" "--kv-lens 544 --graph"; do
    python3 benchmarks/attention_kernel.py --cached --batches 1 --block 32 --prefix-lens \
      128,1024,3072 --splits auto,1,2,4,8,16 $extra 2>&1 | tail -24
  done > "$RUN/logs/kernel.log"
  cat "$RUN/logs/kernel.log" | tee -a "$LOG"
  ;;
tests)
  step tests 540 python3 -m pytest -q -p no:cacheprovider tests/test_attention_kernel.py \
    tests/test_llada_golden.py tests/test_dream_golden.py tests/test_dream_commit.py
  tail -4 "$RUN/logs/tests.log" | tee -a "$LOG"
  ;;
profile)
  step profile 560 python3 benchmarks/profile_denoise.py --model "$LLADA" \
    --shapes 128/256 3072/512 --runs dual:4 none:4
  grep -E "=====|^request|^step|^cached|^refresh|^exact|^interval" "$RUN/logs/profile.log" \
    | tee -a "$LOG"
  cp "$RUN/logs/profile.log" "$OUT/profile.log"
  ;;
ref)
  python3 -m pip install -q --no-deps --no-index --target "$HOME/.cache/ref-site" .refcode/wheels/*.whl
  step ref_llada 300 env PYTHONPATH="$HOME/.cache/ref-site" python3 benchmarks/reference_hf.py \
    --ref-code .refcode --model .refcode/models/llada-8b-shape --impls llada/generate \
    --tokens-per-step 1 2 4 --json "$OUT/llada_reference.json"
  tail -5 "$RUN/logs/ref_llada.log" | tee -a "$LOG"
  bench exact 200 --model "$LLADA" --batch 1 --modes none --tokens-per-step 1 2 4 --no-ar
  ;;
esac
cp "$LOG" "$OUT/suite-$1.log"
