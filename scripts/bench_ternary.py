"""Ternary (BitNet b1.58) inference on a CPU against float32, in the same run, alternating, medians.

    python scripts/bench_ternary.py                    # layers at the built-in model's and Llama-8B's shapes
    python scripts/bench_ternary.py --decode           # also whole-model decode, batch 1, built-in model
    python scripts/bench_ternary.py --decode --decode-dtypes float32,bfloat16   # decode in each dtype
    python scripts/bench_ternary.py --rows 1,2,4,8,16  # where the C kernel stops paying against oneDNN
    python scripts/bench_ternary.py --threads 2 --rounds 5 --json runs/bench/ternary.json

Layer rows: one Linear at batch 1 (a decode step): float32 `nn.Linear` against llmfast's TernaryLinear three ways:
its default on a CPU (the fused C kernel, `ternary_gemv.c`), its oneDNN int8 GEMM path (`kernel = False`, what
it runs for prefill), and its float path (`fast = False`: the arithmetic of transformers' BitLinear, whose
weights it unpacks once instead of every call). The MLP row is gate, up and down of one decoder layer with the
SiLU gating between them. Decode rows: `generate` at batch 1 with greedy decoding and a fixed number of new
tokens, the model in float32 or bfloat16 against its post-training ternary version in the same dtype (weights do
not matter for speed), with and without the kernel and with transformers' arithmetic, all through transformers in
this process. Every cell is the median of alternating rounds (warm-up calls excluded); `spread %` is the largest
(max - min) / median of the row's sides over the rounds, so a ratio closer to 1 than that is noise. The JSON
(bench_common) carries provenance and the load average, and is not replaced without --force.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import bench_common
from llmfast.quant.bitnet import cpu_kernel
from llmfast.quant.bitnet.layers import TernaryLinear, ternarize
from llmfast.timing import timed

SHAPES = {"smollm2 gate/up 576->1536": (576, 1536), "smollm2 down 1536->576": (1536, 576),
          "llama-8b q/o 4096->4096": (4096, 4096), "llama-8b gate/up 4096->14336": (4096, 14336),
          "llama-8b down 14336->4096": (14336, 4096)}
SIDES = ("fp32", "ternary kernel", "ternary onednn", "ternary float")


def ternary_layer(k: int, n: int, side: str) -> TernaryLinear:
    layer = TernaryLinear(k, n)
    values, scale = ternarize(torch.randn(n, k))
    layer.weight.copy_(values)
    layer.weight_scale.copy_(scale)
    layer.fast = side != "ternary float"
    layer.kernel = side == "ternary kernel"
    return layer


def _medians(sides: dict[str, Callable[[], Any]], rounds: int, seconds: float) -> tuple[dict[str, float], float | None]:
    """Each side's median microseconds over alternating rounds, and the largest relative spread of the sides."""
    with torch.no_grad():
        med, noise = bench_common.medians({s: (lambda f=f: timed(f, seconds, warmup=5)) for s, f in sides.items()},
                                          rounds)
    return {s: v * 1e6 for s, v in med.items()}, noise


def _row(case: str, measured: tuple[dict[str, float], float | None]) -> dict[str, Any]:
    med, noise = measured
    row: dict[str, Any] = {"case": case, **{f"{s} us": round(v, 1) for s, v in med.items()},
                           "spread %": bench_common.percent(noise)}
    for s in med:
        if s != "fp32":
            row[f"x {s.removeprefix('ternary ')}"] = round(med["fp32"] / med[s], 2)
    return row


def bench_layers(rounds: int, seconds: float, batch: int) -> list[dict[str, Any]]:
    rows = []
    for label, (k, n) in SHAPES.items():
        dense = torch.nn.Linear(k, n, bias=False)  # a module call on both sides, as in a model
        x = torch.randn(batch, k)
        layers = {s: ternary_layer(k, n, s) for s in SIDES[1:]}
        sides: dict[str, Callable[[], Any]] = {"fp32": lambda: dense(x)}
        sides.update({s: (lambda m=m: m(x)) for s, m in layers.items()})
        rows.append(_row(label + (f", {batch} rows" if batch > 1 else ""), _medians(sides, rounds, seconds)))
    return rows


def bench_rows(rounds: int, seconds: float, counts: list[int]) -> list[dict[str, Any]]:
    """The kernel against oneDNN as the rows per call grow (the kernel re-reads the weights for every row)."""
    k, n = SHAPES["smollm2 gate/up 576->1536"]
    layers = {s: ternary_layer(k, n, s) for s in ("ternary kernel", "ternary onednn")}
    layers["ternary onednn"].load_state_dict(layers["ternary kernel"].state_dict())
    out = []
    for count in counts:
        x = torch.randn(count, k)
        before = cpu_kernel.MAX_ROWS
        cpu_kernel.MAX_ROWS = max(count, before)  # let the kernel take every row count here
        try:
            med, noise = _medians({s: (lambda m=m: m(x)) for s, m in layers.items()}, rounds, seconds)
        finally:
            cpu_kernel.MAX_ROWS = before
        out.append({"case": f"smollm2 gate/up, {count} rows", **{f"{s} us": round(v, 1) for s, v in med.items()},
                    "kernel / onednn": round(med["ternary onednn"] / med["ternary kernel"], 2),
                    "spread %": bench_common.percent(noise)})
    return out


def bench_mlp(rounds: int, seconds: float) -> dict[str, Any]:
    dims = {"gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
    dense = {k: torch.randn(n, kk) for k, (kk, n) in dims.items()}
    x = torch.randn(1, 576)

    def mlp_fp32() -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, dense["gate"])) * F.linear(x, dense["up"]), dense["down"])

    sides: dict[str, Callable[[], Any]] = {"fp32": mlp_fp32}
    for side in SIDES[1:]:
        t = {k: ternary_layer(kk, n, side) for k, (kk, n) in dims.items()}
        sides[side] = lambda t=t: t["down"](F.silu(t["gate"](x)) * t["up"](x))
    return _row("smollm2 MLP (gate, up, down)", _medians(sides, rounds, seconds))


def bench_decode(rounds: int, new_tokens: int, dtype: str = "float32") -> dict[str, Any]:
    """`generate` at batch 1 of the built-in model in `dtype` against its post-training ternary version in the same
    dtype: with the C kernel (TernaryLinear's default), without it (oneDNN for every step), and with transformers'
    BitLinear arithmetic (`fast = False`: what a bfloat16 ternary model ran before the kernel took bfloat16)."""
    from transformers import AutoModelForCausalLM

    from llmfast.models import resolve_model
    from llmfast.quant.bitnet.convert import replace_linears, to_ternary

    path = resolve_model("builtin:smollm2-135m")
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ternary = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    replace_linears(ternary, to_ternary)
    ternary.to(getattr(torch, dtype))
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    base = "fp32" if dtype == "float32" else dtype

    def decode(model: Any, kernel: bool, fast: bool) -> float:
        TernaryLinear.kernel, TernaryLinear.fast = kernel, fast
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t)

    runs = {base: (dense, True, True), "ternary kernel": (ternary, True, True),
            "ternary onednn": (ternary, False, True), "ternary float": (ternary, True, False)}
    try:
        with torch.no_grad():
            med, noise = bench_common.medians({s: (lambda run=run: decode(*run)) for s, run in runs.items()},
                                              rounds, warmup=1)
    finally:
        TernaryLinear.kernel, TernaryLinear.fast = True, True
    row: dict[str, Any] = {"case": f"built-in model decode, batch 1, {new_tokens} tokens, {dtype}",
                           **{f"{s} tok/s": round(v, 1) for s, v in med.items()},
                           "spread %": bench_common.percent(noise)}
    for s in ("ternary kernel", "ternary onednn", "ternary float"):
        row[f"x {s.removeprefix('ternary ')}"] = round(med[s] / med[base], 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="timed calls per side and round, in seconds")
    p.add_argument("--batch", type=int, default=1, help="rows per layer call in the layer table")
    p.add_argument("--rows", default="", help="comma-separated row counts: kernel against oneDNN")
    p.add_argument("--decode", action="store_true", help="also time whole-model decode at batch 1")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-dtypes", default="float32", help="comma-separated: float32, bfloat16 (one row each)")
    bench_common.add_output_args(p, "runs/bench/ternary.json")
    args = p.parse_args()
    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()
    torch.set_num_threads(args.threads)
    kernel = cpu_kernel.ternary_kernel()
    if kernel is None:
        raise SystemExit("the ternary C kernel cannot be built here (see the message above)")
    print(f"ternary kernel: {kernel.path} path; {args.threads} torch threads\n")
    tables = [bench_layers(args.rounds, args.seconds, args.batch) + [bench_mlp(args.rounds, args.seconds)]]
    if args.decode:
        tables.append([bench_decode(args.rounds, args.new_tokens, d) for d in args.decode_dtypes.split(",")])
    if args.rows:
        tables.append(bench_rows(args.rounds, args.seconds, [int(c) for c in args.rows.split(",")]))
    for table in tables:
        bench_common.print_rows(table)
        print()
    record = {"threads": args.threads, "rounds": args.rounds, "kernel path": kernel.path,
              "rows": [r for t in tables for r in t]}
    out = bench_common.write_json(args.json, record, args.force, state)
    print(f"json: {out}")


if __name__ == "__main__":
    main()
