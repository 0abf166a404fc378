#!/usr/bin/env python
"""Fine-tuning throughput and memory: llmfast vs a plain Hugging Face + PEFT loop, same run, same machine.

Both train the same LoRA (r=16, alpha=32, all-linear, fp32 on CPU) on the same examples, one pass, with
the same completion-only labels; each runs in its own process so peak RSS is its own.

- ours:     `llmfast finetune` (padding-free packing, loss only where there are labels, chunked)
- baseline: a plain loop a user would write: shuffled examples, batches padded to the longest, 
            `model(input_ids, attention_mask, labels).loss`, torch AdamW

Tokens/s counts real tokens (never padding) over the training loop's wall time.
The data is a realistic mix: short task examples (dates, units, extract) and longer passages of the
eval book as "continue the text" completions (50-400 tokens).

    python scripts/bench_finetune.py                       # built-in model, 160 examples
    python scripts/bench_finetune.py --examples 64 --json runs/bench/finetune_cpu.json
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

REPO = Path(__file__).resolve().parent.parent


def make_data(path: Path, n: int, seed: int = 0) -> None:
    from llmfast.data.tasks import TASKS, generate

    rng = random.Random(seed)
    book = (REPO / "eval" / "text" / "persuasion.txt").read_text().split()
    short = [r for name in TASKS for r in generate(name, n, seed=seed + 5)]
    rows = []
    for i in range(n):
        if rng.random() < 0.7:
            rows.append(rng.choice(short))
        else:
            words = rng.randrange(40, 300)
            start = rng.randrange(0, len(book) - words - 60)
            rows.append({"messages": [
                {"role": "user", "content": "Continue the text: " + " ".join(book[start:start + 40])},
                {"role": "assistant", "content": " ".join(book[start + 40:start + 40 + words])}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_ours(args: argparse.Namespace, data: Path, work: Path) -> dict:
    recipe = work / "ours.yaml"
    recipe.write_text(f"""
model: {args.model}
data: {{train: {data}, eval_fraction: 0, max_length: {args.max_length}, packing: true}}
lora: {{r: 16, alpha: 32, target_modules: all-linear}}
train: {{epochs: 1, batch_size: {args.batch_size}, lr: 2.0e-4, dtype: float32, log_every: 100000}}
output: {work / 'ours'}
""")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmfast.cli", "finetune", str(recipe)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = json.loads((work / "ours" / "metrics.json").read_text())
    return {"tokens_per_s": m["train_tokens_per_s"], "tokens": m["train_tokens"], "peak_rss_gib": m["peak_memory_gib"],
            "steps": m["steps"], "mean_loss": m["final_train_loss"], "process_seconds": round(time.perf_counter() - t0, 1)}


def baseline_main(args: argparse.Namespace) -> None:
    """The plain HF + PEFT loop (runs in its own process); prints a JSON line."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmfast.data.chat import IGNORE, load_examples
    from llmfast.models import load_tokenizer, resolve_model

    torch.manual_seed(0)
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    examples, _ = load_examples(args.data, tok, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    model.train()
    tokens, losses = 0, []
    t0 = time.perf_counter()
    for s in range(0, len(order), args.batch_size):
        batch = [examples[i] for i in order[s:s + args.batch_size]]
        width = max(len(e) for e in batch)
        ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e)) for e in batch])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in batch])
        labels = torch.tensor([e.labels + [IGNORE] * (width - len(e)) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += sum(len(e) for e in batch)
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": round(tokens / wall, 1), "tokens": tokens, "steps": len(losses),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "mean_loss": round(sum(losses) / len(losses), 4)}))


def run_baseline(args: argparse.Namespace, data: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--role", "baseline", "--data", str(data), "--model", args.model,
                        "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)],
                       check=True, capture_output=True, text=True)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", default="runs/bench/finetune_cpu.json")
    ap.add_argument("--role", default="both", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "baseline":
        return baseline_main(args)
    from llmfast.artifacts import atomic_write_json
    from llmfast.models import resolve_model

    resolve_model(args.model)  # convert once, outside both timings
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "mix.jsonl"
        make_data(data, args.examples)
        baseline = run_baseline(args, data)
        ours = run_ours(args, data, work)
    assert ours["tokens"] == baseline["tokens"], "both must train on the same real tokens"
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": args.model, "examples": args.examples, "batch_size": args.batch_size, "max_length": args.max_length,
        "baseline": baseline, "ours": ours,
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "peak_rss_ratio": round(ours["peak_rss_gib"] / baseline["peak_rss_gib"], 2),
    }
    atomic_write_json(args.json, result)
    print(f"{'':<22}{'tokens/s':>10}{'peak RSS GiB':>14}{'steps':>7}{'mean loss':>12}")
    for name in ("baseline", "ours"):
        r = result[name]
        label = "plain HF + PEFT" if name == "baseline" else "llmfast"
        print(f"{label:<22}{r['tokens_per_s']:>10.1f}{r['peak_rss_gib']:>14.2f}{r['steps']:>7}{r['mean_loss']:>12.4f}")
    print(f"ratio (ours/baseline): tokens/s {result['tokens_per_s_ratio']}x, peak RSS {result['peak_rss_ratio']}x")
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
