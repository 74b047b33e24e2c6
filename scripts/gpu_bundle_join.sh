#!/usr/bin/env bash
# On the GPU machine: the second half of scripts/gpu_bundle_split.sh's three calls. With
# .gpu-bundle/two-a carried, it keeps the first half of vLLM's _C library; with
# .gpu-bundle/two-b carried, it joins both halves, checks them, installs the library
# where ../shared/gpu/setup.sh would, and (when sourced) exports vLLM's environment.
export VLLM_SITE=${VLLM_SITE:-$HOME/.cache/vllm-0.26-site}
_parts=$HOME/.cache/vllm-bundle-parts
mkdir -p "$_parts"
if [ -f .gpu-bundle/two-a/vllm_C.so.xz.1 ]; then
  cp .gpu-bundle/two-a/vllm_C.so.xz.1 "$_parts/"
  echo "gpu bundle: first half of part two kept; carry .gpu-bundle/two-b next"
fi
if [ -f .gpu-bundle/two-b/vllm_C.so.xz.2 ]; then
  if [ ! -f "$_parts/vllm_C.so.xz.1" ]; then
    echo "gpu bundle: the first half is missing (the machine went cold?): start again from call 1"
  else
    cat "$_parts/vllm_C.so.xz.1" .gpu-bundle/two-b/vllm_C.so.xz.2 > "$_parts/vllm_C.so.xz"
    if [ "$(sha256sum "$_parts/vllm_C.so.xz" | cut -d' ' -f1)" = \
         "$(cat .gpu-bundle/two-b/vllm_C.so.xz.sha256)" ]; then
      xz -dc "$_parts/vllm_C.so.xz" > "$VLLM_SITE/vllm/_C_stable_libtorch.abi3.so"
    else
      echo "gpu bundle: the joined part two does not match its checksum"
    fi
  fi
  source .gpu-bundle/two-b/env.sh
fi
