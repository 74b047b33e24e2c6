#!/usr/bin/env bash
# vLLM 0.26.0's MoE kernels (_moe_C), which ../shared/gpu's bundle leaves out, as
# one more carry (~40 MB): the fused MoE layer's grouped top-k and block
# alignment live there (LLaDA2, and the BailingMoeV2 AR twin).
#
#   bash scripts/gpu_moe_part.sh build        # here: downloads the wheel (PyPI), ~1 min
#   bash scripts/gpu_moe_part.sh install      # on the GPU machine, after the bundle's
#                                             # first part, carrying .gpu-bundle/moe
set -euo pipefail
case "${1:?build | install}" in
build)
  work=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$work" "vllm==0.26.0"
  (cd "$work" && unzip -q -o ./*.whl "vllm/_moe_C_stable_libtorch.abi3.so")
  mkdir -p .gpu-bundle/moe
  xz -T0 -6 -c "$work/vllm/_moe_C_stable_libtorch.abi3.so" > .gpu-bundle/moe/vllm_moe_C.so.xz
  rm -rf "$work"
  ;;
install)
  site=${VLLM_SITE:-$HOME/.cache/vllm-0.26-site}
  xz -dc .gpu-bundle/moe/vllm_moe_C.so.xz > "$site/vllm/_moe_C_stable_libtorch.abi3.so"
  echo "gpu bundle: vLLM's MoE kernels installed"
  ;;
esac
