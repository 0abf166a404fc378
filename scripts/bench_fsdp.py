#!/usr/bin/env python
"""FSDP against DDP for LoRA on the built-in model: two processes each, same recipe, same run, same machine.

Both run `llmfast finetune` under torchrun on the same data and steps; FSDP (`train.fsdp: true`) shards the
decoder layers over the processes, DDP keeps a whole copy in each. Reported per side: the parameter bytes a
process holds while training (`param_bytes_per_process`), process 0's peak RSS (it includes loading the
whole base, which both sides do before FSDP shards it), tokens/s (real tokens) and the final loss; and the
largest difference between the two adapters, which should be rounding only.

    llmfast tasks all --out data/tasks        # the training set the recipe points at
    python scripts/bench_fsdp.py              # 6 steps of 2 packed rows per process
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(side: str, out: Path, args: argparse.Namespace) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "llmfast.cli", "finetune", args.recipe,
           "--set", f"output={out / side}", "--set", f"train.steps={args.steps}",
           "--set", f"train.batch_size={args.batch_size}", "--set", "train.eval_every=null",
           "--set", "train.save_every=null", "--set", "export_merged=false", "--set", "data.eval=null",
           "--set", "data.eval_fraction=0", "--set", f"train.fsdp={'true' if side == 'fsdp' else 'false'}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
    return json.loads((out / side / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/lora_smollm2_dates.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2, help="packed rows per micro-batch and process")
    ap.add_argument("--json", default="runs/bench/fsdp_cpu.json")
    args = ap.parse_args()
    if not (REPO / "data/tasks/dates/train.jsonl").is_file() and args.recipe.endswith("lora_smollm2_dates.yaml"):
        sys.exit("data/tasks/dates/train.jsonl is missing: run `llmfast tasks all --out data/tasks` first")

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result = {side: run(side, out, args) for side in ("ddp", "fsdp")}
        a, b = (load_file(out / s / "adapter" / "adapter_model.safetensors") for s in ("ddp", "fsdp"))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)

    ddp, fsdp = result["ddp"], result["fsdp"]
    rows = [("parameter MiB per process", "param_bytes_per_process", 2**-20),
            ("peak RSS GiB (process 0)", "peak_memory_gib", 1.0),
            ("tokens/s (both processes)", "train_tokens_per_s", 1.0),
            ("final train loss", "final_train_loss", 1.0)]
    print(f"{'':28} {'DDP':>10} {'FSDP':>10} {'FSDP/DDP':>9}")
    for label, key, scale in rows:
        x, y = ddp[key] * scale, fsdp[key] * scale
        print(f"{label:28} {x:10.3f} {y:10.3f} {y / x:9.3f}")
    print(f"largest adapter difference: {diff:.2e}")
    report = {"machine": platform.node(), "recipe": args.recipe, "steps": args.steps, "batch_size": args.batch_size,
              "ddp": ddp, "fsdp": fsdp, "adapter_max_abs_diff": diff,
              "ratios": {key: fsdp[key] / ddp[key] for _, key, _ in rows}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
