#!/usr/bin/env python
"""FSDP against DDP for LoRA on the built-in model: two processes each, same recipe, same run, same machine.

Both run `llmfast finetune` under torchrun on the same data and steps; FSDP (`train.fsdp: true`) shards the
decoder layers over the processes, DDP keeps a whole copy in each. Reported per side: the parameter bytes a
process holds while training (`param_bytes_per_process`), process 0's peak RSS (it includes loading the
whole base, which both sides do before FSDP shards it), tokens/s (real tokens; metrics.json's
`train_tokens_per_s`, after each run's first step) and the final loss; and the
largest difference between the two adapters, which should be rounding only. `--rounds` runs of each side, the order
swapped every other round, each process with OMP_NUM_THREADS=--threads (torchrun's own default, made explicit); the
figures are medians over the rounds with each ratio's spread beside it. The JSON (bench_common) carries provenance
and the load average and is replaced only with --force (checked before anything runs).

    llmfast tasks all --out data/tasks        # the training set the recipe points at
    python scripts/bench_fsdp.py              # 6 steps of 2 packed rows per process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent


def run(side: str, out: Path, args: argparse.Namespace) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "llmfast.cli", "finetune", args.recipe,
           "--set", f"output={out / side}", "--set", f"train.steps={args.steps}",
           "--set", f"train.batch_size={args.batch_size}", "--set", "train.eval_every=null",
           "--set", "train.save_every=null", "--set", "export_merged=false", "--set", "data.eval=null",
           "--set", "data.eval_fraction=0", "--set", f"train.fsdp={'true' if side == 'fsdp' else 'false'}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
    return json.loads((out / side / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/lora_smollm2_dates.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2, help="packed rows per micro-batch and process")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                    help="OMP_NUM_THREADS of every process of both sides (default: yours if set, else torchrun's 1)")
    bench_common.add_output_args(ap, "runs/bench/fsdp_cpu.json")
    args = ap.parse_args()
    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()
    if not (REPO / "data/tasks/dates/train.jsonl").is_file() and args.recipe.endswith("lora_smollm2_dates.yaml"):
        sys.exit("data/tasks/dates/train.jsonl is missing: run `llmfast tasks all --out data/tasks` first")

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
        for r in range(args.rounds):
            for side in bench_common.order(list(runs), r):
                runs[side].append(run(side, Path(tmp) / f"round{r}", args))
        a, b = (load_file(Path(tmp) / "round0" / s / "adapter" / "adapter_model.safetensors") for s in ("ddp", "fsdp"))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)

    rows = [("parameter MiB per process", "param_bytes_per_process", 2**-20),
            ("peak RSS GiB (process 0)", "peak_memory_gib", 1.0),
            ("tokens/s (both processes)", "train_tokens_per_s", 1.0),
            ("final train loss", "final_train_loss", 1.0)]
    cmp = {key: bench_common.compare([x[key] for x in runs["fsdp"]], [x[key] for x in runs["ddp"]])
           for _, key, _ in rows}
    print(f"{'':28} {'DDP':>10} {'FSDP':>10} {'FSDP/DDP':>9} {'spread':>7}")
    for label, key, scale in rows:
        c = cmp[key]
        print(f"{label:28} {c['baseline']['median'] * scale:10.3f} {c['ours']['median'] * scale:10.3f} "
              f"{c['ratio']:9.3f} {bench_common.pct(c['noise'], 1):>7}")
    print(f"medians of {args.rounds} alternating rounds; spread: the larger (max - min) / median of the two sides")
    print(f"largest adapter difference: {diff:.2e}")
    report = {"recipe": args.recipe, "steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
              "threads": args.threads, "ddp": runs["ddp"][0], "fsdp": runs["fsdp"][0], "runs": runs,
              "adapter_max_abs_diff": diff, "ratios": {key: c["ratio"] for key, c in cmp.items()}, "compare": cmp}
    print(f"wrote {bench_common.write_json(args.json, report, args.force, state, threads=args.threads)}")


if __name__ == "__main__":
    main()
