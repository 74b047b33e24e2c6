#!/usr/bin/env bash
# Lay out the official LLaDA2.0 model code (outside the repo) for make_tiny.py and record_golden.py.
#
#   tests/llada2/get_reference.sh DLLM_GIT [OUT=/tmp/llada2-ref]
#
# DLLM_GIT: a git directory (clone or bare mirror) holding ZHZisZZ/dllm commit d8cc119, whose
#   dllm/pipelines/llada2/models/ vendors the hub checkpoint's remote code of inclusionAI/LLaDA2.0-mini
#   (modeling_llada2_moe.py with LLaDA2MoeModelLM and its generate(), configuration_llada2_moe.py).
#   The hub itself was not reachable where the golden data was recorded; README.md says what was checked.
# The decoding reference (diffusers 0.42.1: LLaDA2Pipeline, BlockRefinementScheduler) is a pip package.
set -euo pipefail
G=${1:?DLLM_GIT}; OUT=${2:-/tmp/llada2-ref}
C=d8cc1190ddbe47a7c38fd0eb5d29d3a0b12043c5
mkdir -p "$OUT/hub"
for f in modeling_llada2_moe.py configuration_llada2_moe.py; do
  git --git-dir="$G" show "$C:dllm/pipelines/llada2/models/$f" > "$OUT/hub/$f"
done
sha256sum -c - <<SUMS
7ddce43e981f7db02a7228e27f18dc30df755fee6a52534ec1944ed870f9524e  $OUT/hub/modeling_llada2_moe.py
21c8ae7a3694e7dea425ca7858eac0fdd1276ebf60066bafc2e5665855f5e15a  $OUT/hub/configuration_llada2_moe.py
SUMS
