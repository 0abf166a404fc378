#!/bin/bash
# The GPU checks of a lent H100/H200 in three device calls: the small CUDA checks (needs bitsandbytes, 43 MB), then
# the compression kernels and training (the 98 MB GGUF of the built-in model cannot travel in one call: a call
# carries 64 MiB, so it goes in two halves). 2026-12-04's second session ran `kernels` and `train` (BENCHMARKS.md).
# The device's image (docs of the device tool): Python 3.12, torch, transformers, peft, accelerate, triton; no
# pydantic, gguf, bitsandbytes, vllm: those three are carried as wheels.
#
# Here, once per checkout (ignored folders; wheels for the device's Python 3.12):
#   printf '/.whl/\n/.whl-bnb/\n/.gpu_a/\n/.gpu_b/\n' >> .git/info/exclude
#   W="python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_28_x86_64"
#   $W -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0
#   $W -d .whl-bnb bitsandbytes==0.50.2     # 41 MiB (2026-12-07): with .whl and the tree, ~51 of the 64 MiB
#   G=$(.venv/bin/python -c "from llmfast.models import BUILTINS, builtin_gguf_path as p; print(p(BUILTINS['smollm2-135m']))")
#   mkdir -p .gpu_a .gpu_b; head -c 49181216 $G > .gpu_a/part; tail -c +49181217 $G > .gpu_b/part
# Then, with the device tool, each call within 30 s of the previous one's end (the machine is held 30 s idle).
# 15 minutes of device time in all, start-up included, and the three calls at their full timeouts need more: run
# `small` first (never run on a GPU yet, the shortest), then `kernels`, then `train` with what `status` says is left
# (shrink its QAT_TIMEOUT/RELUFY_TIMEOUT, or skip `kernels`: BENCHMARKS.md has its 2026-12-04 numbers):
#   run(command="bash scripts/gpu_session.sh small", carry=[".whl", ".whl-bnb"], timeout_s=240)
#   run(command="bash scripts/gpu_session.sh kernels", carry=[".whl", ".gpu_a"], timeout_s=330)
#   run(command="bash scripts/gpu_session.sh train 700 4.5e-3 100 2e-3", carry=[".gpu_b"], timeout_s=585)
# `small`: installs the wheels into /tmp/site and runs scripts/gpu_small_checks.py (LoRA dropout kill+resume,
#   the chunked KL and cross-entropy under bf16 autocast, per-stage CUDA peaks and peak_memory_reserved_gib, QLoRA
#   export's merge on CUDA, loads without hub kernels, provenance's GPU names; a pass/fail table; about a minute
#   plus the wheels' install, not yet timed on a GPU; rc 1 when a check failed). Here, `--device cpu` runs it first
#   (tests/test_gpu_scripts.py does).
# `kernels`: installs the wheels into /tmp/site, keeps the first half of the GGUF, runs
#   scripts/gpu_compression_checks.py (ternary and sparse Triton kernels: checks and timings, about 3.5 minutes).
# `train QAT_STEPS QAT_LR RELUFY_SECONDS RELUFY_LR [QAT_TIMEOUT RELUFY_TIMEOUT RELUFY_TEACHER]`: joins and checks
#   the GGUF, converts it once, then 1.58-bit QAT (scripts/gpu_bitnet_qat.py, fixed steps; 400 steps took 217 s
#   with the conversion) and ReLU-fication (scripts/gpu_relufy.py, steps from its probe; 130 s of training took 200 s),
#   one after the other (two at once share the GPU no faster). Relufy distils on RELUFY_TEACHER teacher samples
#   (default 2048: 512 repeated each sample 31 times in 11M tokens, and its curve was flat after 8M). Everything
#   it writes is also packed into $OUT/results.tgz: the device tool returns at most 8 files.
set -u
export PYTHONPATH=/tmp/site:$PWD
install() {  # the carried wheels, into /tmp/site (on PYTHONPATH)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"
}
case "${1:-}" in
small)
  install .whl/*.whl .whl-bnb/*.whl || exit 1
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  # the table is the last lines; a check's traceback stays in small.err, which comes back with the JSON
  PYTHONUNBUFFERED=1 timeout 190 python3 scripts/gpu_small_checks.py --out "$OUT/small" 2>"$OUT/small.err" | tail -12
  echo "small rc ${PIPESTATUS[0]}"; grep -m5 "Error" "$OUT/small.err"
  ;;
kernels)
  install .whl/*.whl || exit 1
  cp .gpu_a/part /tmp/part-a || exit 1
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 scripts/gpu_compression_checks.py --out "$OUT/kernels" 2>&1 | grep -v "^  skipped" | tail -45
  ;;
train)
  QAT_STEPS=${2:-700}; QAT_LR=${3:-4.5e-3}; RELUFY_S=${4:-100}; RELUFY_LR=${5:-2e-3}; QAT_T=${6:-300}; REL_T=${7:-220}
  REL_TEACHER=${8:-2048}
  G=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  cat /tmp/part-a .gpu_b/part > $G || exit 1
  [ "$(sha256sum $G | cut -c1-64)" = b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 ] \
    || { echo "the joined GGUF's sha256 differs: were both halves carried?"; exit 1; }
  T0=$(date +%s)
  D=$(python3 -c "from llmfast.models import resolve_model; print(resolve_model('$G'))" 2>"$OUT/convert.err" | tail -1)
  echo "converted: $D ($(( $(date +%s) - T0 )) s)"; [ -d "$D" ] || { tail -5 "$OUT/convert.err"; exit 1; }
  timeout "$QAT_T" python3 scripts/gpu_bitnet_qat.py --model "$D" --steps "$QAT_STEPS" --lrs "$QAT_LR" \
    --teacher-samples 512 --out "$OUT/qat" > "$OUT/qat.log" 2>&1
  echo "qat rc $? at $(( $(date +%s) - T0 )) s"; tail -4 "$OUT/qat.log"
  timeout "$REL_T" python3 scripts/gpu_relufy.py --model "$D" --seconds "$RELUFY_S" --lrs "$RELUFY_LR" \
    --teacher-samples "$REL_TEACHER" --out "$OUT/relufy" > "$OUT/relufy.log" 2>&1
  echo "relufy rc $? at $(( $(date +%s) - T0 )) s"; tail -6 "$OUT/relufy.log"
  tar czf /tmp/results.tgz -C "$OUT" qat relufy && mv /tmp/results.tgz "$OUT/results.tgz"
  ;;
*)
  echo "usage: bash scripts/gpu_session.sh small | kernels | train QAT_STEPS QAT_LR RELUFY_SECONDS RELUFY_LR" >&2
  exit 2
  ;;
esac
