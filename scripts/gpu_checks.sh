#!/bin/bash
# Every GPU check of the fine-tuning issue in one run, for a lent H100/H200 (the device tool); prints a table.
# Not run by the test suite (CI has no GPU). The GPU image lacks bitsandbytes and pydantic: carry them as wheels.
#
# Prepare here, once (wheels for the device's Python 3.12, in an ignored folder):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5
# Then: run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=540)
#
# Each line trains the same LoRA (r=16, all-linear) with llmfast and with a plain HF + PEFT loop on a
# random-weight model of a real shape (scripts/bench_finetune.py), same examples, one epoch, bf16,
# gradient checkpointing on both sides, and reports tokens/s and CUDA peak memory of each.
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
RESULTS=${OUT:-runs/gpu}
mkdir -p "$RESULTS" /tmp/models
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, bitsandbytes, transformers, peft; print('torch', torch.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 1

bench() {  # name, args...
  local name=$1; shift
  echo "== $name"
  timeout 240 python3 scripts/bench_finetune.py --models-dir /tmp/models --json "$RESULTS/finetune-$name.json" "$@" \
    2> "$RESULTS/finetune-$name.err" | tail -5 || tail -5 "$RESULTS/finetune-$name.err"
}
# 1.5B shape, 152k vocabulary, batch 8 x 1024: the memory goals (QLoRA well under LoRA; <= 40% of plain HF QLoRA)
L="--data long --max-length 1024 --batch-size 8 --examples 48 --gradient-checkpointing"
bench 1.5b-lora --shape llama-1.5b $L
bench 1.5b-qlora --shape llama-1.5b $L --quantization nf4
# the built-in model's shape: the same, and a realistic mix of lengths, where packing pays (tokens/s >= 2x)
bench smollm2-lora --shape smollm2 $L
bench smollm2-qlora --shape smollm2 $L --quantization nf4
bench smollm2-mix-lora --shape smollm2 --data mix --max-length 1024 --batch-size 8 --examples 400 --gradient-checkpointing
# last, in case time runs out: the 1.5B shape on mixed lengths (estimated: the plain loop computes 2.4x the FLOPs)
bench 1.5b-mix-lora --shape llama-1.5b --data mix --max-length 1024 --batch-size 8 --examples 200 --gradient-checkpointing

python3 - "$RESULTS" <<'PY'
import glob, json, sys
print(f"{'run':<22}{'ours tok/s':>11}{'HF tok/s':>10}{'ratio':>7}{'ours GiB':>10}{'HF GiB':>8}{'mem ratio':>10}")
for f in sorted(glob.glob(f"{sys.argv[1]}/finetune-*.json")):
    r = json.load(open(f)); o, b = r["ours"], r["baseline"]
    name = f.split("finetune-")[1][:-5]
    print(f"{name:<22}{o['tokens_per_s']:>11.0f}{b['tokens_per_s']:>10.0f}{r['tokens_per_s_ratio']:>7}"
          f"{o['peak_mem_gib']:>10.2f}{b['peak_mem_gib']:>8.2f}{r['peak_mem_ratio']:>10}")
PY
