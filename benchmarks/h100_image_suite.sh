#!/usr/bin/env bash
# The issue-13 (Qwen-Image) GPU runs on one H100, in parts that each fit one
# device call (10 minutes). Logs collect in RUN; each part copies its results
# to OUT (the device returns at most 8 files).
#
#   bash benchmarks/h100_image_suite.sh check     # kernel tests, float32 fidelity, attention sweep
#   bash benchmarks/h100_image_suite.sh diffusers # the anchor: diffusers' QwenImagePipeline
#   bash benchmarks/h100_image_suite.sh ours      # fused-kernel timings; our engine at the same
#                                                 # shapes, with the profile
#
# vLLM on the device: the bundle of ../shared/gpu/ (scripts/gpu_bundle_split.sh
# gives the calls). diffusers (a test extra) comes as wheels in WHEELS, installed
# into a directory of its own that only the test and anchor processes see.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/run}
RUN=${RUN:-/tmp/h100-image-suite}
WHEELS=${WHEELS:-.shared/wheels}
ANCHOR=${ANCHOR:-.shared/diffusers_qwenimage_bench.py}
source benchmarks/suite_common.sh
DIFFUSERS_SITE=/tmp/diffusers-site
[ -d "$DIFFUSERS_SITE/diffusers" ] || python3 -m pip install -q --no-index --no-deps \
  --target "$DIFFUSERS_SITE" "$WHEELS"/*.whl > "$RUN/logs/pip-diffusers.log" 2>&1
case "${1:?part: check | diffusers | ours}" in
check)
  step kernels 200 python3 -m pytest -q tests/test_attention_kernel.py tests/test_dit_kernels.py
  tail -3 "$RUN/logs/kernels.log" | tee -a "$LOG"
  # float32 on the GPU: golden pixels, embeddings and latents (bound 2e-3). The
  # live-diffusers drift check is CPU-exact at 1e-6 and stays in the CPU CI; the
  # TP=2 test wants two GPUs.
  step fidelity 300 env PYTHONPATH="${PYTHONPATH:-}:$DIFFUSERS_SITE" python3 -m pytest -q -s \
      tests/test_qwen_image_engine.py -k "not tensor_parallel" \
      -p no:cacheprovider
  grep -E "passed|failed|max pixel" "$RUN/logs/fidelity.log" | tail -12 | tee -a "$LOG"
  step sweep 150 python3 benchmarks/attention_kernel.py --heads 24 --lens 4224 --batches 2,8 \
      --sweep --rep 100
  cat "$RUN/logs/sweep.log" | tee -a "$LOG"
  ;;
diffusers)
  step diffusers 540 env PYTHONPATH="$DIFFUSERS_SITE" python3 "$ANCHOR"
  cat "$RUN/logs/diffusers.log" | tee -a "$LOG"
  ;;
ours)
  step dit_kernels 60 python3 benchmarks/dit_kernels.py
  cat "$RUN/logs/dit_kernels.log" | tee -a "$LOG"
  step ours 500 python3 benchmarks/image_throughput.py --profile --json "$OUT/h100_qwen_image.json"
  grep -E "^\{|Error|error|memory|took" "$RUN/logs/ours.log" | grep -v tokenizer | tail -30 \
    | tee -a "$LOG"
  ;;
esac
cp "$LOG" "$OUT/suite-$1.log"
