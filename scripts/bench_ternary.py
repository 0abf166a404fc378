"""Ternary (BitNet b1.58) inference on a CPU against float32, in the same run, alternating, medians.

    python scripts/bench_ternary.py                    # layers at the built-in model's and Llama-8B's shapes
    python scripts/bench_ternary.py --decode           # also whole-model decode, batch 1, built-in model
    python scripts/bench_ternary.py --threads 2 --rounds 5 --json runs/bench/ternary.json

Layer rows: one Linear at batch 1 (a decode step): float32 `F.linear`, llmfast's TernaryLinear on oneDNN's int8
GEMM (the default), and TernaryLinear's float path (the same arithmetic as transformers' BitLinear, whose
weights it unpacks once instead of every call). The MLP row is gate, up and down of one decoder layer. Decode
rows: `generate` at batch 1 with greedy decoding and a fixed number of new tokens, float32 model against its
post-training ternary version (weights do not matter for speed), both through transformers in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llmfast.quant.bitnet.layers import TernaryLinear, ternarize
from llmfast.timing import alternate, timed

SHAPES = {"smollm2 gate/up 576->1536": (576, 1536), "smollm2 down 1536->576": (1536, 576),
          "llama-8b q/o 4096->4096": (4096, 4096), "llama-8b gate/up 4096->14336": (4096, 14336),
          "llama-8b down 14336->4096": (14336, 4096)}


def ternary_layer(k: int, n: int, fast: bool) -> TernaryLinear:
    layer = TernaryLinear(k, n)
    values, scale = ternarize(torch.randn(n, k))
    layer.weight.copy_(values)
    layer.weight_scale.copy_(scale)
    layer.fast = fast
    return layer


def bench_layers(rounds: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    for label, (k, n) in SHAPES.items():
        w = torch.randn(n, k)
        x = torch.randn(1, k)
        fast, slow = ternary_layer(k, n, True), ternary_layer(k, n, False)
        sides: dict[str, Callable[[], Any]] = {"fp32": lambda: F.linear(x, w), "ternary int8": lambda: fast(x),
                                               "ternary float": lambda: slow(x)}
        with torch.no_grad():
            med = {s: v * 1e6 for s, v in alternate({s: (lambda f=f: timed(f, seconds, warmup=5))
                                                     for s, f in sides.items()}, rounds).items()}
        rows.append({"case": label, **{f"{s} us": round(v, 1) for s, v in med.items()},
                     "speed-up int8": round(med["fp32"] / med["ternary int8"], 2),
                     "speed-up float": round(med["fp32"] / med["ternary float"], 2)})
    return rows


def bench_mlp(rounds: int, seconds: float) -> dict[str, Any]:
    dims = {"gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
    dense = {k: torch.randn(n, kk) for k, (kk, n) in dims.items()}
    tern = {k: ternary_layer(kk, n, True) for k, (kk, n) in dims.items()}
    x = torch.randn(1, 576)

    def mlp_fp32() -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, dense["gate"])) * F.linear(x, dense["up"]), dense["down"])

    def mlp_ternary() -> torch.Tensor:
        return tern["down"](F.silu(tern["gate"](x)) * tern["up"](x))

    t32, t3 = [], []
    with torch.no_grad():
        for r in range(rounds):
            pair = [(t32, mlp_fp32), (t3, mlp_ternary)]
            for store, fn in (pair if r % 2 == 0 else pair[::-1]):
                store.append(timed(fn, seconds, warmup=5))
    a, b = statistics.median(t32) * 1e6, statistics.median(t3) * 1e6
    return {"case": "smollm2 MLP (gate, up, down)", "fp32 us": round(a, 1), "ternary int8 us": round(b, 1),
            "speed-up int8": round(a / b, 2)}


def bench_decode(rounds: int, new_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from llmfast.models import resolve_model
    from llmfast.quant.bitnet.convert import replace_linears, to_ternary

    path = resolve_model("builtin:smollm2-135m")
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ternary = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    replace_linears(ternary, to_ternary)
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])

    def decode(model: Any) -> float:
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t)

    with torch.no_grad():
        decode(fp32), decode(ternary)  # warm-up
        a, b = [], []
        for r in range(rounds):
            pair = [(a, fp32), (b, ternary)]
            for store, model in (pair if r % 2 == 0 else pair[::-1]):
                store.append(decode(model))
    return {"case": f"built-in model decode, batch 1, {new_tokens} tokens", "fp32 tok/s": round(statistics.median(a), 1),
            "ternary int8 tok/s": round(statistics.median(b), 1),
            "speed-up int8": round(statistics.median(b) / statistics.median(a), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="timed calls per side and round, in seconds")
    p.add_argument("--decode", action="store_true", help="also time whole-model decode at batch 1")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default="runs/bench/ternary.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = bench_layers(args.rounds, args.seconds) + [bench_mlp(args.rounds, args.seconds)]
    if args.decode:
        rows.append(bench_decode(args.rounds, args.new_tokens))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"json: {out}")


if __name__ == "__main__":
    main()
