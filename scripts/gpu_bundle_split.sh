#!/usr/bin/env bash
# The GPU bundle's part two (../shared/gpu/build_bundle.sh: vLLM's 56 MB _C library) no
# longer fits one device call beside this checkout (64 MiB per call, the tracked tree
# included). This splits it into two halves that do, three device calls in all:
#
#   ../shared/gpu/build_bundle.sh .gpu-bundle && scripts/gpu_bundle_split.sh .gpu-bundle
#   call 1: carry [".gpu-bundle/one"]    command: source .gpu-bundle/one/setup.sh
#   call 2: carry [".gpu-bundle/two-a"]  command: bash scripts/gpu_bundle_join.sh
#   call 3: carry [".gpu-bundle/two-b"]  command: source scripts/gpu_bundle_join.sh && <yours>
#
# (each within ~30 s of the last: the machine goes cold after that). Later calls while
# warm: carry [".gpu-bundle/env.sh"], start with `source .gpu-bundle/env.sh`.
set -euo pipefail
bundle=${1:?usage: gpu_bundle_split.sh BUNDLE_DIR}
lib="$bundle/two/vllm_C.so.xz"
[ -f "$lib" ] || { echo "no $lib: build the bundle first" >&2; exit 1; }
rm -rf "$bundle/two-a" "$bundle/two-b"
mkdir -p "$bundle/two-a" "$bundle/two-b"
half=$(( ($(stat -c %s "$lib") + 1) / 2 ))
head -c "$half" "$lib" > "$bundle/two-a/vllm_C.so.xz.1"
tail -c +"$((half + 1))" "$lib" > "$bundle/two-b/vllm_C.so.xz.2"
sha256sum "$lib" | cut -d' ' -f1 > "$bundle/two-b/vllm_C.so.xz.sha256"
cp "$bundle/two/env.sh" "$bundle/two-b/"
du -sh "$bundle/two-a" "$bundle/two-b"
