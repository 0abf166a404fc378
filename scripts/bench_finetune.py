#!/usr/bin/env python
"""Fine-tuning throughput and memory: llmfast vs a plain Hugging Face + PEFT loop, same run, same machine.

Both train the same LoRA (r=16, alpha=32, all-linear, fp32 on CPU) on the same examples, one pass, with
the same completion-only labels; each runs in its own process so peak RSS is its own.

- ours:     `llmfast finetune` (padding-free packing, loss only where there are labels, chunked)
- baseline: a plain loop a user would write: shuffled examples, batches padded to the longest, 
            `model(input_ids, attention_mask, labels).loss`, torch AdamW

Tokens/s counts real tokens (never padding) over the training loop's wall time, both sides including their first
step (the plain loop times every step, so llmfast's figure is metrics.json's `train_tokens_per_s_all_steps`, not
its `train_tokens_per_s`, which leaves the first step out). `--rounds` rounds, the sides'
order swapped every other round, each side with OMP_NUM_THREADS=--threads; the medians are compared and each side's
spread over the rounds is printed beside the ratio. The JSON (bench_common) carries provenance and the load average
and is replaced only with --force (checked before anything runs).
The data is a realistic mix: short task examples (dates, units, extract) and longer passages of the
eval book as "continue the text" completions (50-400 tokens).

    python scripts/bench_finetune.py                       # built-in model, 160 examples
    python scripts/bench_finetune.py --examples 64 --json runs/bench/finetune_cpu.json

On a GPU (scripts/gpu_checks.sh runs these), random weights with real shapes, since no real model fits there:

    python scripts/bench_finetune.py --shape llama-1.5b --data long --max-length 1024 --batch-size 8 \
        --gradient-checkpointing --quantization nf4 --examples 64

`--data long` makes every example about `--max-length` tokens, so both sides train at the same batch shape
(8 x 1024 above) and peak memory compares like with like; `mix` shows what packing buys on varied lengths.
On CUDA both sides use bf16 and report torch.cuda.max_memory_allocated; the baseline's QLoRA is the usual
recipe (`prepare_model_for_kbit_training`, which upcasts the non-quantized weights to float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent


# Random-weight models of real shapes (Llama architecture): the built-in model's, and a 1.5B one with a
# 152k vocabulary (Qwen2-1.5B's sizes), where the full-vocabulary logits dominate training memory.
SHAPES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256),
    "smollm2": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                    model_vocab_size=49152),
    "llama-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                       head_dim=128, model_vocab_size=151936),
}


def make_model(shape: str, work: Path) -> str:
    """A random-weight model directory of this shape under `work` (reused when already there)."""
    from llmfast.testing import build_tiny_llama

    out = work / f"random-{shape}"
    if not (out / "config.json").is_file():
        build_tiny_llama(out, vocab_size=4096, dtype="float32" if shape == "tiny" else "bfloat16", **SHAPES[shape])
    return str(out)


def make_data(path: Path, n: int, seed: int = 0, kind: str = "mix", max_length: int = 512) -> None:
    from llmfast.data.tasks import TASKS, generate

    rng = random.Random(seed)
    book = (REPO / "eval" / "text" / "persuasion.txt").read_text().split()
    short = [r for name in TASKS for r in generate(name, n, seed=seed + 5)]
    rows = []
    for i in range(n):
        if kind == "long":  # about max_length tokens each (the words are cut to fit; too_long truncates the rest)
            words = max_length  # ~1.3 tokens per word: longer than max_length, truncated to exactly it
            start = rng.randrange(0, len(book) - words - 60)
            rows.append({"messages": [
                {"role": "user", "content": "Continue the text: " + " ".join(book[start:start + 40])},
                {"role": "assistant", "content": " ".join(book[start + 40:start + 40 + words])}]})
        elif rng.random() < 0.7:
            rows.append(rng.choice(short))
        else:
            words = rng.randrange(40, 300)
            start = rng.randrange(0, len(book) - words - 60)
            rows.append({"messages": [
                {"role": "user", "content": "Continue the text: " + " ".join(book[start:start + 40])},
                {"role": "assistant", "content": " ".join(book[start + 40:start + 40 + words])}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _env(args: argparse.Namespace) -> dict:
    """The same thread setting for both sides' processes."""
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def run_ours(args: argparse.Namespace, data: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "ours.yaml"
    recipe.write_text(f"""
model: {args.model}
data: {{train: {data}, eval_fraction: 0, max_length: {args.max_length}, packing: true}}
lora: {{r: 16, alpha: 32, target_modules: all-linear}}
train: {{epochs: 1, batch_size: {args.batch_size}, lr: 2.0e-4, dtype: {"auto" if args.cuda else "float32"},
        gradient_checkpointing: {str(args.gradient_checkpointing).lower()}, log_every: 100000}}
output: {work / 'ours'}
""" + (f"quantization: {{type: {args.quantization}, double_quant: true}}\n" if args.quantization else ""))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "llmfast.cli", "finetune", str(recipe)], capture_output=True, text=True,
                       env=_env(args))
    if p.returncode != 0:
        sys.exit(f"llmfast finetune failed:\n{p.stderr[-3000:]}")
    m = json.loads((work / "ours" / "metrics.json").read_text())
    return {"tokens_per_s": m["train_tokens_per_s_all_steps"], "tokens": m["train_tokens"], "peak_mem_gib": m["peak_memory_gib"],
            "memory_kind": m["memory_kind"], "peak_reserved_gib": m.get("peak_memory_reserved_gib"), "steps": m["steps"],
            "mean_loss": m["final_train_loss"],
            "process_seconds": round(time.perf_counter() - t0, 1)}


def baseline_prepare(model, quantization: str | None, gradient_checkpointing: bool):
    """What a plain HF + PEFT user does with the loaded base: the PEFT docs' recipe for LoRA and QLoRA."""
    from peft import LoraConfig, get_peft_model

    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model


def baseline_batch(batch: list, pad_id: int, device) -> dict:
    """Examples padded to the longest, with an attention mask and -100 labels on the padding."""
    import torch

    from llmfast.data.chat import IGNORE

    width = max(len(e) for e in batch)
    return {
        "input_ids": torch.tensor([e.input_ids + [pad_id] * (width - len(e)) for e in batch], device=device),
        "attention_mask": torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in batch], device=device),
        "labels": torch.tensor([e.labels + [IGNORE] * (width - len(e)) for e in batch], device=device),
    }


def baseline_main(args: argparse.Namespace) -> None:
    """The plain HF + PEFT loop (runs in its own process); prints a JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfast.data.chat import read_examples
    from llmfast.models import load_tokenizer, resolve_model

    torch.manual_seed(0)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    examples = read_examples(args.data, tok, args.max_length).examples
    dev = torch.device("cuda" if args.cuda else "cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32
    kw: dict = {"dtype": dtype}
    if args.quantization:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quantization,
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": dev.index or 0} if args.cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if not args.quantization:
        model.to(dev)
    model = baseline_prepare(model, args.quantization, args.gradient_checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    tokens, losses = 0, []
    t0 = time.perf_counter()
    for s in range(0, len(order), args.batch_size):
        batch = [examples[i] for i in order[s:s + args.batch_size]]
        loss = model(**baseline_batch(batch, tok.pad_token_id, dev)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += sum(len(e) for e in batch)
        losses.append(loss.item())
    wall = time.perf_counter() - t0  # loss.item() each step has synchronized CUDA already
    if args.cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda max allocated"
        reserved = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"
        reserved = None
    print(json.dumps({"tokens_per_s": round(tokens / wall, 1), "tokens": tokens, "steps": len(losses),
                      "peak_mem_gib": round(peak, 3), "memory_kind": kind, "peak_reserved_gib": reserved,
                      "mean_loss": round(sum(losses) / len(losses), 4)}))


def run_baseline(args: argparse.Namespace, data: Path) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--role", "baseline", "--data-file", str(data), "--model", args.model,
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
    cmd += ["--quantization", args.quantization] if args.quantization else []
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
    if p.returncode != 0:
        sys.exit(f"baseline failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m", help="with --shape builtin: any model llmfast loads")
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    bench_common.add_output_args(ap, "runs/bench/finetune_cpu.json")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
                    help="OMP_NUM_THREADS of both sides (default: yours if set, else the CPUs)")
    ap.add_argument("--shape", default="builtin", choices=["builtin", *SHAPES],
                    help="the built-in model, or random weights with these real shapes")
    ap.add_argument("--data", dest="data_kind", default="mix", choices=["mix", "long"])
    ap.add_argument("--quantization", choices=["nf4", "fp4"], help="QLoRA on a bitsandbytes 4-bit base (both sides)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    ap.add_argument("--models-dir", help="keep the random-weight models here for the next run (default: temporary)")
    ap.add_argument("--role", default="both", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", dest="data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    args.cuda = torch.cuda.is_available()
    if args.role == "baseline":
        return baseline_main(args)
    from llmfast.models import resolve_model

    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.shape != "builtin":
            args.model = make_model(args.shape, Path(args.models_dir) if args.models_dir else work)
        resolve_model(args.model)  # convert once, outside both timings
        data = work / "data.jsonl"
        make_data(data, args.examples, kind=args.data_kind, max_length=args.max_length)
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for r in range(args.rounds):
            for side in bench_common.order(list(runs), r):
                runs[side].append(run_baseline(args, data) if side == "baseline" else
                                  run_ours(args, data, work / f"round{r}"))
    assert all(x["tokens"] == runs["baseline"][0]["tokens"] for v in runs.values() for x in v), \
        "both must train on the same real tokens"
    speed, peak = (bench_common.compare([x[k] for x in runs["ours"]], [x[k] for x in runs["baseline"]])
                  for k in ("tokens_per_s", "peak_mem_gib"))
    # The table's figures: the first round's steps and loss (the same every round), the medians over the rounds.
    baseline, ours = ({**runs[side][0], "tokens_per_s": speed[side]["median"], "peak_mem_gib": peak[side]["median"]}
                      for side in ("baseline", "ours"))
    machine = torch.cuda.get_device_name() if args.cuda else f"{platform.machine()}, {os.cpu_count()} CPUs"
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine, "model": args.model, "shape": args.shape,
        "data": args.data_kind, "quantization": args.quantization, "gradient_checkpointing": args.gradient_checkpointing,
        "examples": args.examples, "batch_size": args.batch_size, "max_length": args.max_length,
        "baseline": baseline, "ours": ours,
        "tokens_per_s_ratio": round(speed["ratio"], 2), "peak_mem_ratio": round(peak["ratio"], 2),
        "tokens_per_s": speed, "peak_mem_gib": peak, "threads": args.threads, "rounds": args.rounds, "runs": runs,
    }
    bench_common.write_json(args.json, result, args.force, state, threads=args.threads)
    mem = "peak GiB" + (" (CUDA)" if args.cuda else " (RSS)")
    print(f"{args.shape} {args.quantization or 'lora'} gc={args.gradient_checkpointing} on {machine}")
    print(f"{'':<22}{'tokens/s':>10}{mem:>18}{'steps':>7}{'mean loss':>12}")
    for name in ("baseline", "ours"):
        r = result[name]
        label = "plain HF + PEFT" if name == "baseline" else "llmfast"
        print(f"{label:<22}{r['tokens_per_s']:>10.1f}{r['peak_mem_gib']:>18.2f}{r['steps']:>7}{r['mean_loss']:>12.4f}")
    print(f"ratio (ours/baseline, medians of {args.rounds} alternating rounds): "
          f"tokens/s {result['tokens_per_s_ratio']}x "
          f"(spread {bench_common.pct(speed['noise'])}), peak memory {result['peak_mem_ratio']}x "
          f"(spread {bench_common.pct(peak['noise'])})")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
