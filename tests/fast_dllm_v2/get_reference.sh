#!/usr/bin/env bash
# Lay out the official Fast-dLLM v2 files (outside the repo) for make_tiny.py and record_golden.py.
#
#   tests/fast_dllm_v2/get_reference.sh FASTDLLM_GIT DUALDIFFUSION_GIT [OUT=/tmp/fdv2-ref]
#
# FASTDLLM_GIT: a git directory (clone or bare mirror) holding NVlabs/Fast-dLLM commit 6cf2722
#   (upstream main, 2025-10-23; forks such as mgustineli/Fast-dLLM carry it too).
# DUALDIFFUSION_GIT: a git directory holding Satgoy152/DualDiffusion commit 189fa7a, whose
#   FastDLLM-inferencing/Fast_dLLM_v2_7B/ is a vendored copy of the hub checkpoint folder
#   Efficient-Large-Model/Fast_dLLM_v2_7B (all files but the weights). Its modeling.py carries a
#   third-party `steps=` argument in generate(); the sed below deletes exactly those 9 lines,
#   restoring the published generate() (README.md: provenance and the cross-check).
# If you have the hub folder itself, copy its files into OUT/hub/ instead and skip the sed.
set -euo pipefail
FD=${1:?FASTDLLM_GIT}; DD=${2:?DUALDIFFUSION_GIT}; OUT=${3:-/tmp/fdv2-ref}
FD_COMMIT=6cf27228858eb57c445e1fad764003543e72a0db
DD_COMMIT=189fa7a74a83119647dad36b24363cc4e89370ab
HUB=FastDLLM-inferencing/Fast_dLLM_v2_7B
mkdir -p "$OUT/hub" "$OUT/v2"
for f in generation_functions.py eval.py eval_script.sh run_chatbot.py app.py requirements.txt README.md; do
  git --git-dir="$FD" show "$FD_COMMIT:v2/$f" > "$OUT/v2/$f"
done
for f in modeling.py configuration.py config.json generation_config.json tokenizer_config.json \
         special_tokens_map.json added_tokens.json chat_template.jinja README.md; do
  git --git-dir="$DD" show "$DD_COMMIT:$HUB/$f" > "$OUT/hub/$f"
done
echo "d0ff084e2a1df206cb85a4a21f3e8bbc9c03d2bb82c0fa1a380f4f1657a14888  $OUT/hub/modeling.py" | sha256sum -c -
sed -i '665d;670d;694,695d;704d;716,717d;732d;736d;741d' "$OUT/hub/modeling.py"
! grep -n 'step' "$OUT/hub/modeling.py"
sha256sum -c - <<EOF
33bdbb53834ce183be97d84c1f94cfe43abd7d28eda8240d95f2c6f61c27dbd9  $OUT/hub/modeling.py
760e76af3a1fdf23e70868eea0d221aae186b41eafdfc35222e79e1d14b22f4c  $OUT/hub/configuration.py
49b3168403f411259e6fae74edcace17ac44f0c343b35830f92d94acd46de3a1  $OUT/v2/generation_functions.py
EOF
