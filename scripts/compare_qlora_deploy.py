"""A QLoRA adapter deployed two ways, measured in one run: (a) the 4-bit base with the adapter beside it, as it
was trained, against (b) the adapter merged in float32 into the dequantized base, then quantized again.

    .venv/bin/python scripts/compare_qlora_deploy.py                      # trains a small QLoRA adapter first
    .venv/bin/python scripts/compare_qlora_deploy.py --adapter runs/qlora-dates/adapter --ppl-tokens 8192

Variants (each made by llmfast's own verbs, then measured here):
  base-fp32      the built-in model, no adapter (context: what the adapter adds)
  merged-fp32    `llmfast export` of the adapter: NF4 base dequantized, adapter merged in float32
  merge-fp32     `llmfast merge` (task_arithmetic, weight 1) of the adapter: its delta added to the float32 base
                 itself, not to the NF4 base it was trained against (what merging task vectors does)
  c: nf4         `llmfast quantize` of merge-fp32 with bnb4 NF4 (double quant): off the base's NF4 grid, so its
                 rounding does not simply return the base's codes
  a: nf4+adapter the base quantized to NF4 while loading, the adapter on top (`llmfast eval --adapter
                 --set quantization=nf4`), what `llmfast finetune` trained
  b: nf4         `llmfast quantize` of merged-fp32 with bnb4 NF4 (double quant), a transformers 4-bit checkpoint
  b: w4          `llmfast quantize` of merged-fp32 with w4 (AutoRound, round to nearest unless --w4-iters)
Measured: perplexity on the first --ppl-tokens of the book (as `llmfast eval` computes it), dates accuracy on
the first --dates-limit rows of eval/tasks/dates/test.jsonl, linear-weight and weight-file bytes (for (a):
the NF4 checkpoint of the base plus the adapter), and for b: nf4 the share of the 4-bit codes that differ
from the base's (how much of the adapter survives the re-rounding). Prints a table, writes
runs/bench/qlora_deploy.json. Timings are not the point here and depend on the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "eval" / "text" / "persuasion.txt"
DATES = REPO / "eval" / "tasks" / "dates" / "test.jsonl"
BASE = "builtin:smollm2-135m"
SKIP_TOKENS = 16384  # calibration text starts here: the perplexity span must end before it


def run_verb(argv: list[str]) -> None:
    from llmfast.cli import main as llmfast

    print("+ llmfast " + " ".join(argv), file=sys.stderr)
    if llmfast(argv) != 0:
        raise SystemExit(f"llmfast {argv[0]} failed")


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))  # JSON is YAML
    return path


def train_adapter(work: Path, args: argparse.Namespace) -> Path:
    """A short QLoRA run (NF4 base, double quant) on the dates task; `export_merged` writes merged/ beside it."""
    run_verb(["tasks", "dates", "--out", str(work / "data"), "--train", "400", "--test", "20", "--seed", "0",
              "--overwrite"])
    recipe = write_json(work / "qlora.yaml", {
        "model": BASE, "quantization": {"method": "bnb4", "type": "nf4", "double_quant": True},
        "data": {"train": str(work / "data" / "dates" / "train.jsonl"), "max_length": 128, "too_long": "truncate",
                 "packing": True},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.1,
                  "log_every": 2,
                  "eval_every": 1000, "save_every": 1000},
        "output": str(work / "qlora"), "export_merged": True})
    shutil.rmtree(work / "qlora", ignore_errors=True)  # this script's own earlier run (finetune never overwrites)
    run_verb(["finetune", str(recipe)])
    return work / "qlora" / "adapter"


def quantize(work: Path, merged: Path, name: str, quant: dict, data: dict | None, reuse: bool) -> Path:
    if reuse and (work / name / "llmfast.json").is_file():  # complete: artifacts appear only when whole
        print(f"reusing {work / name}", file=sys.stderr)
        return work / name
    recipe = {"model": str(merged), "quantization": quant, "dtype": "float32", "output": str(work / name)}
    if data:
        recipe["data"] = data
    run_verb(["quantize", str(write_json(work / f"{name}.yaml", recipe)), "--overwrite"])
    return work / name


def merge_onto_base(work: Path, adapter: Path, reuse: bool) -> Path:
    """The adapter's task vector on the full-precision base, as `llmfast merge` builds it."""
    out = work / "merge-fp32"
    if reuse and (out / "llmfast.json").is_file():
        return out
    config = {"merge_method": "task_arithmetic", "base_model": BASE, "dtype": "float32",
              "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    run_verb(["merge", str(write_json(work / "merge-fp32.yaml", config)), str(out), "--overwrite", "--no-progress"])
    return out


def measure(model, tok, args: argparse.Namespace) -> dict:
    from llmfast.evaluate import perplexity, task_accuracy

    t0 = time.perf_counter()
    ppl = perplexity(model, tok, TEXT.read_text(encoding="utf-8"), args.context, args.stride, args.ppl_tokens)
    dates, _ = task_accuracy(model, tok, "dates", DATES, args.dates_limit, args.max_new_tokens, 16)
    return {"ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "dates_accuracy": dates["accuracy"],
            "dates_n": dates["n"], "measure_seconds": round(time.perf_counter() - t0, 1)}


def codes_changed(base_nf4, merged_nf4) -> float:
    """Share of weights whose NF4 value differs between the base and the re-quantized merge (read before any eval
    forward: on AVX512-BF16 CPUs that repacks the weights)."""
    import bitsandbytes as bnb
    import torch

    changed = total = 0
    layers = dict(merged_nf4.named_modules())
    for name, m in base_nf4.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            other = layers[name]
            a = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            b = bnb.functional.dequantize_4bit(other.weight.data, other.weight.quant_state)
            # a block's scale can move a little when its largest weight moves: compare the level, not the value
            sa = a.reshape(-1, 64).abs().amax(1, keepdim=True).clamp_min(1e-12)
            sb = b.reshape(-1, 64).abs().amax(1, keepdim=True).clamp_min(1e-12)
            changed += int(((a.reshape(-1, 64) / sa - b.reshape(-1, 64) / sb).abs() > 1e-3).sum())
            total += a.numel()
    return changed / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, help="a QLoRA adapter (bnb4 base) to use instead of training one")
    # A short run (8 s on 2 idle cores, minutes on a loaded machine) that already moves the dates accuracy;
    # raise it for a real adapter.
    ap.add_argument("--steps", type=int, default=8, help="QLoRA steps when training (rows of 128 tokens)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--dates-limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=20, help="an ISO date and its end token fit in 20")
    ap.add_argument("--w4-group", type=int, default=64)
    ap.add_argument("--w4-iters", type=int, default=0)
    ap.add_argument("--no-base", action="store_true", help="skip the base-fp32 row")
    ap.add_argument("--reuse", action="store_true", help="keep the merged and quantized models of an earlier run "
                    "(with --adapter: its merged/ sibling)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "qlora_deploy")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "qlora_deploy.json")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    bench_common.check_output(args.out, args.force, "--out")
    if args.ppl_tokens > SKIP_TOKENS:
        raise SystemExit(f"--ppl-tokens must be at most {SKIP_TOKENS}: the w4 calibration text starts there")

    from llmfast.artifacts import read_manifest
    from llmfast.bench.lineage import model_size
    from llmfast.finetune.export import base_of, export_merged
    from llmfast.models import load_model, load_tokenizer, resolve_model
    from llmfast.quant import manifest_quantization

    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    adapter = args.adapter or train_adapter(args.work, args)
    manifest = read_manifest(adapter) or {}
    quant = manifest_quantization(manifest)
    if quant is None or quant.method != "bnb4":
        raise SystemExit(f"{adapter}: not a QLoRA adapter (its llmfast.json records no bnb4 base)")
    merged = adapter.parent / "merged"  # export_merged's output, beside the adapter
    if not (args.reuse and (merged / "llmfast.json").is_file()) and (args.adapter or not merged.is_dir()):
        merged = export_merged(adapter, args.work / "merged", "float32", overwrite=True)
    base = base_of(adapter, manifest)
    tok = load_tokenizer(merged)
    calib = {"text": str(TEXT), "skip_tokens": SKIP_TOKENS, "calibration_tokens": 4096, "window": 256}
    t0 = time.perf_counter()
    nf4 = quantize(args.work, merged, "merged-nf4", {"method": "bnb4", "type": "nf4", "double_quant": True}, None,
                   args.reuse)
    nf4_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    w4 = quantize(args.work, merged, "merged-w4", {"method": "w4", "group_size": args.w4_group,
                                                   "iters": args.w4_iters}, calib, args.reuse)
    w4_s = time.perf_counter() - t0
    adapter_bytes = sum(f.stat().st_size for f in adapter.glob("*.safetensors"))
    nf4_size = model_size(nf4)

    rows: dict[str, dict] = {}
    if not args.no_base:
        src = Path(resolve_model(BASE))
        rows["base-fp32"] = {**measure(load_model(src), tok, args), **model_size(src)}
    rows["merged-fp32"] = {**measure(load_model(merged), tok, args), **model_size(merged)}
    onto = merge_onto_base(args.work, adapter, args.reuse)
    rows["merge-fp32"] = {**measure(load_model(onto), tok, args), **model_size(onto)}
    c_nf4 = quantize(args.work, onto, "merge-nf4", {"method": "bnb4", "type": "nf4", "double_quant": True}, None,
                     args.reuse)
    rows["c: nf4"] = {**measure(load_model(c_nf4), tok, args), **model_size(c_nf4),
                      "codes_changed": codes_changed(load_model(base, quantization=quant), load_model(c_nf4))}
    a = load_model(base, adapter=adapter, quantization=quant)
    rows["a: nf4+adapter"] = {**measure(a, tok, args),
                              "linear_weight_bytes": nf4_size["linear_weight_bytes"] + adapter_bytes,
                              "file_bytes": nf4_size["file_bytes"] + adapter_bytes}
    del a
    changed = codes_changed(load_model(base, quantization=quant), load_model(nf4))
    rows["b: nf4"] = {**measure(load_model(nf4), tok, args), **nf4_size, "codes_changed": changed,
                      "quantize_seconds": round(nf4_s, 1)}
    rows["b: w4"] = {**measure(load_model(w4), tok, args), **model_size(w4), "quantize_seconds": round(w4_s, 1)}

    print(f"\nQLoRA adapter {adapter} (NF4 base); perplexity on the first {args.ppl_tokens} tokens of the book, "
          f"dates accuracy on {args.dates_limit} rows")
    print(f"{'variant':<16}{'ppl':>9}{'dates':>8}{'linear MiB':>12}{'file MiB':>10}")
    for name, r in rows.items():
        print(f"{name:<16}{r['ppl']:>9.2f}{r['dates_accuracy']:>8.0%}{r['linear_weight_bytes'] / 2**20:>12.1f}"
              f"{r['file_bytes'] / 2**20:>10.1f}")
    print(f"b: nf4 differs from the base's NF4 codes in {changed:.2%} of the weights, "
          f"c: nf4 in {rows['c: nf4']['codes_changed']:.2%}")
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "adapter": str(adapter),
              "quantization": quant.manifest(), "args": {k: str(v) for k, v in vars(args).items()},
              "wall_seconds": round(time.perf_counter() - t_start, 1), "variants": rows}
    # Quality figures (the wall time is context only): provenance, no load check.
    print(f"wrote {bench_common.write_json(args.out, result, args.force, None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
