#!/bin/bash
# The GPU side of the TRL benchmark: a Gemma-3-4B-shaped random model with LoRA, automodel
# against TRL's SFTTrainer on one CUDA device (benchmarks/vs_trl.py --gpu; ~10 minutes, most of it
# building the 17 GB random model once and loading it on each side).
#
# On a machine with this project's environment (scripts/env.sh):
#   scripts/gpu_vs_trl.sh
# On a machine whose Python already has torch, transformers, peft and accelerate but no network,
# first download the missing wheels where pip works (into .whl/, ignored by git):
#   scripts/gpu_vs_trl.sh --download      # here; then copy the clone with .whl/ over
#   scripts/gpu_vs_trl.sh                 # there: installs .whl/*.whl into /tmp/site first
set -euo pipefail
cd "$(dirname "$0")/.."
# Pure-Python packages the benchmark needs beyond a CUDA PyTorch image, pinned as in the lock.
PINS=(trl transformers datasets torchdata dill multiprocess huggingface_hub tokenizers)
if [ "${1:-}" = "--download" ]; then
  specs=()
  for name in "${PINS[@]}"; do
    specs+=("$(grep -i -E "^${name}==" requirements-lock.txt)")
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
  exit 0
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
elif [ -x "$(command -v nvidia-smi)" ] && python3 -c "import trl, torchdata" 2>/dev/null; then
  PY=python3
else
  PY="$(scripts/env.sh)/bin/python"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" benchmarks/vs_trl.py --gpu --work "${OUT:-/tmp}/automodel_vs_trl" "$@"
