"""The GPU half of compression, in one run on a lent H100/H200: correctness and speed of llmfast's Triton kernels.

    python3 scripts/gpu_compression_checks.py                 # prints tables, writes $OUT/gpu_compression.json
    python3 scripts/gpu_compression_checks.py --quick         # fewer configurations (about a minute)
    TRITON_INTERPRET=1 python3 scripts/gpu_compression_checks.py --smoke   # every code path, tiny, on a CPU

On the lent GPU (the device tool), whose image lacks pydantic: download the wheels as scripts/gpu_checks.sh
says (into the ignored .whl/), then
    run(command="pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
                "PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_compression_checks.py", carry=[".whl"], timeout_s=480)

1. The ternary (BitNet b1.58) decode kernel (`llmfast/quant/bitnet/triton_kernel.py`): checked against
   `TernaryLinear` on the GPU (float32: the same bits; bfloat16: exact integer sums, within one rounding), then
   timed against cuBLAS bfloat16 (`F.linear`) at Llama-8B shapes (in x out: 4096x4096, 4096x14336, 14336x4096)
   at 1, 4 and 16 tokens: one token over a grid of launch settings, more tokens over that grid's three best (the
   best is reported with its settings; --budget-s stops trying new ones).
   Goal (issue on quantization): >= 4x cuBLAS bfloat16 at one token on 4096x14336; the byte limit is 8x.
2. The sparse decode kernel (`llmfast/sparse/triton_kernel.py`): checked against the zeroed dense product and,
   inside the sparse runtime's MLP (which must pick it for CUDA weights), against that MLP's dense path; then
   one token through a Llama-8B MLP (4096 -> 14336, gate|up stacked) with TEAL thresholds at 50/70/90% of the
   entries of the MLP input and of the down projection's input, against the dense MLP in cuBLAS bfloat16.
   Goal (issue on sparsity): >= 2x dense at 90%.

Timing: every call reads its weights from GPU memory, not from L2: each side rotates through enough copies of its
weights (over 256 MiB in all) and the calls are captured in one CUDA graph (no Python launch costs in the time),
replayed after a warm-up; the time per call is the median over --repeats replays. Both sides are timed the same
way in the same run. Random weights: the speed of a matrix product does not depend on its values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROTATE_BYTES = 256 * 2**20
DEADLINE = float("inf")  # launch-setting grids stop trying new settings past this time.monotonic()
BUDGET_S = float("inf")  # --budget-s: seconds of new settings per ternary shape and per sparse matrix
SMOKE = False  # --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1, wall-clock timing: every code path but
# the CUDA graph, so a typo does not cost a GPU session its minutes
HIDDEN, INTER = 4096, 14336


def per_call_us(make_calls: Callable[[int], Callable[[], None]], copies: int, repeats: int) -> float:
    """Median microseconds per call: `make_calls(i)` is a call on weight copy i; all copies run in one graph."""
    calls = [make_calls(i) for i in range(copies)]
    if SMOKE:
        t0 = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - t0) * 1e6 / copies
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compile, allocate, autotune caches
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / copies)
    return statistics.median(times)


def over_budget() -> bool:
    return time.monotonic() > DEADLINE


def copies_for(nbytes: int) -> int:
    return 1 if SMOKE else max(4, -(-ROTATE_BYTES // nbytes))


def check_ternary(dev: str) -> dict:
    from llmfast.quant.bitnet.layers import TernaryLinear, quantize_activations, ternarize
    from llmfast.quant.bitnet.pack import pack_ternary
    from llmfast.quant.bitnet.triton_kernel import ternary_matmul

    torch.manual_seed(0)
    out = {}
    for k, n in [(HIDDEN, HIDDEN), (HIDDEN, INTER), (300, 128)]:
        vals, ws = ternarize(torch.randn(n, k, device=dev))
        for dtype in (torch.float32, torch.bfloat16):
            lin = TernaryLinear(k, n, dtype=dtype, device=dev)
            lin.weight.copy_(vals)
            lin.weight_scale.copy_(ws.to(dtype))
            for m in (1, 5, 16):
                x = (torch.randn(m, k, device=dev) * 3).to(dtype)
                TernaryLinear.fast = False  # torch's own ops
                ref = lin(x)
                TernaryLinear.fast = True  # on a GPU: the Triton kernel inside the layer
                through_layer = lin(x)
                y = ternary_matmul(x, pack_ternary(vals), lin.weight_scale)
                codes, a_scale = quantize_activations(x)
                exact = ((codes.double() @ vals.double().T).float() / (lin.weight_scale * a_scale).float()).to(dtype)
                out[f"{k}x{n} {str(dtype)[6:]} m={m}"] = {
                    "same_as_layer": torch.equal(y, ref), "same_as_exact": torch.equal(y, exact),
                    "layer_uses_kernel": torch.equal(through_layer, y),
                    "max_rel_to_layer": ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()}
    return out


def tile_grid(tiles: list[tuple[int, int]], iters: tuple[int, ...], k: int) -> list[dict]:
    """Launch settings: each (outputs, inputs) tile with the input split so that a program walks `iters` tiles;
    8 warps for large tiles."""
    out = []
    for bn, bk in tiles:
        for it in iters:
            split = max(1, -(-k // (bk * it)))
            if it > 1 and split == 1 and out and out[-1]["block_n"] == bn and out[-1]["block_k"] == bk \
                    and out[-1]["split_k"] == 1:
                continue  # the same launch as the previous one
            out.append({"block_n": bn, "block_k": bk, "split_k": split, "num_warps": 8 if bn * bk >= 8192 else 4})
    return out


def time_ternary(dev: str, quick: bool, repeats: int) -> list[dict]:
    from llmfast.quant.bitnet.triton_kernel import default_launch, ternary_matmul
    from llmfast.quant.bitnet.pack import pack_ternary
    from llmfast.quant.bitnet.layers import ternarize

    rows = []
    # 2026-12-04's first H200 run (few programs each walking the whole input) was latency-bound: the kernel now
    # splits the input (llmfast/triton_split.py); the grid is tiles of packed rows x inputs and tiles per program.
    tiles = [(8, 512), (16, 256), (16, 512), (32, 256), (32, 512), (64, 128), (64, 256)]
    iters = (1, 2, 4)
    fma_tiles, fma_iters = [(16, 256), (32, 128)], (1, 4)
    if quick:
        tiles, iters = [(8, 512), (16, 256), (32, 128)], (1, 4)
        fma_tiles, fma_iters = [(16, 256)], (1,)
    if SMOKE:  # every path once: a split and an unsplit tile, both token quantizations, both one-token products
        tiles, iters = [(16, 32)], (1, 4)
        fma_tiles, fma_iters = [(16, 32)], (1,)
    global DEADLINE
    for k, n in [(HIDDEN, INTER), (HIDDEN, HIDDEN), (INTER, HIDDEN)]:  # the goal's shape first
        DEADLINE = time.monotonic() + BUDGET_S  # each shape its own budget for new launch settings
        ranked: list[tuple[float, dict]] = []  # one token's times: more tokens try that grid's three best
        w_bf16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2))]
        packed = [pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, device=dev))
                  for _ in range(copies_for(n * k // 4))]
        scale = ternarize(w_bf16[0].float())[1].to(torch.bfloat16)
        timed: list[dict] = []  # every setting timed on this shape, for the record
        for m in (1, 4, 16):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            dense = per_call_us(lambda i: (lambda: F.linear(x, w_bf16[i])), len(w_bf16), repeats)
            ref = ternary_matmul(x, packed[0], scale, split_k=1, product="fma", prequant=False)
            if m == 1:  # dp4a over words of four bytes (tokens quantized in a first launch or in every program),
                # then float multiply-adds over bytes
                base = dict(default_launch(m, n // 4, k), num_warps=4)
                grid = [dict(base, prequant=False), dict(base, prequant=True)] + [
                    dict(c, product="dp4a", prequant=q) for q in (True, False) for c in tile_grid(tiles, iters, k)] + [
                    dict(c, product="fma", prequant=False) for c in tile_grid(fma_tiles, fma_iters, k)]
            else:  # the GEMV's best tiles, with tl.dot and with float multiply-adds (m x tile products in registers)
                best3 = [c for _, c in sorted(ranked, key=lambda r: r[0])[:3]]
                grid = [dict(default_launch(m, n // 4, k), num_warps=4)] + [dict(c, product="dot") for c in best3] + [
                    dict(c, product="fma") for c in best3 if c["block_n"] * c["block_k"] * m <= 16384]
                if SMOKE:  # the interpreter is slow: the default and the fma path once
                    grid = grid[:1] + grid[-1:]
            best, tried = None, 0
            for launch in grid:
                if best is not None and over_budget():
                    break
                try:
                    y = ternary_matmul(x, packed[0], scale, **launch)
                    if not torch.equal(y, ref):  # exact integer sums: every setting gives the same bits
                        print(f"  WRONG output with {launch}: max diff {(y.float() - ref.float()).abs().max().item():.3g}")
                        continue
                    t = per_call_us(lambda i: (lambda: ternary_matmul(x, packed[i], scale, **launch)), len(packed),
                                    repeats)
                except Exception as e:  # a launch setting this GPU or Triton refuses (shared memory, registers)
                    print(f"  skipped {k}x{n} m={m} {launch}: {type(e).__name__}: {str(e)[:160]}")
                    continue
                tried += 1
                timed.append({"tokens": m, "us": round(t, 2), **launch})
                if m == 1:
                    ranked.append((t, launch))
                if best is None or t < best[0]:
                    best = (t, launch)
            if best is None:
                rows.append({"in": k, "out": n, "tokens": m, "cublas_bf16_us": round(dense, 2), "error": "no setting ran"})
                continue
            # the split's counters and partial sums across many launches: every one must give the same bits
            repeats_same = sum(torch.equal(ternary_matmul(x, packed[i % len(packed)], scale, **best[1]),
                                           ternary_matmul(x, packed[i % len(packed)], scale, split_k=1,
                                                          product="fma", prequant=False))
                               for i in range(3 if SMOKE else 200))
            rows.append({"in": k, "out": n, "tokens": m, "cublas_bf16_us": round(dense, 2),
                         "ternary_us": round(best[0], 2), "speedup": round(dense / best[0], 2),
                         "ternary_GBps": round((n * k // 4) / (best[0] * 1e-6) / 1e9),
                         "cublas_GBps": round(n * k * 2 / (dense * 1e-6) / 1e9), "config": best[1],
                         "settings_tried": tried, "default_us": round(ranked[0][0], 2) if m == 1 and ranked else None,
                         "repeats_same": repeats_same, "repeats": 3 if SMOKE else 200,
                         "tried": [t for t in timed if t["tokens"] == m]})
            print(f"ternary {k}x{n} m={m}: cuBLAS bf16 {dense:.1f} us, ours {best[0]:.1f} us -> "
                  f"{dense / best[0]:.2f}x {best[1]} ({tried} settings; {repeats_same} of {rows[-1]['repeats']} "
                  f"repeats exact)", flush=True)
        del w_bf16, packed
        torch.cuda.empty_cache() if dev == "cuda" else None
    return rows


def check_sparse(dev: str) -> dict:
    from llmfast.sparse.triton_kernel import threshold_matvec

    torch.manual_seed(0)
    out = {}
    for k, n, t in [(HIDDEN, 2 * INTER, 0.7), (INTER, HIDDEN, 0.1), (300, 130, 1.0)]:
        for dtype in (torch.float32, torch.bfloat16):
            v = torch.randn(k, device=dev).to(dtype)
            wt = torch.randn(k, n, device=dev).to(dtype)
            keep = v.abs() > t
            ref = torch.where(keep, v, torch.zeros((), dtype=dtype, device=dev)).double() @ wt.double()
            bound = (v.double().abs() * keep)[None, :] @ wt.double().abs()
            for compact in (False, True):
                y = threshold_matvec(v, t, wt, compact=compact)
                out[f"{k}x{n} {str(dtype)[6:]}{' listed' if compact else ''}"] = {
                    "err_over_sum_abs": ((y.double() - ref).abs() / bound.squeeze(0).clamp(min=1e-30)).max().item()}
    out["runtime"] = check_sparse_runtime(dev)
    return out


def check_sparse_runtime(dev: str) -> dict:
    """The sparse runtime's MLP (`SparseMLP`, TEAL mode) on this device: the kernel native_for picks for its
    weights (on CUDA it must be the Triton one) and one token's output against its own dense path."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from llmfast.sparse import triton_kernel
    from llmfast.sparse.kernels import SparseMLP

    cfg = LlamaConfig(hidden_size=HIDDEN // 8, intermediate_size=INTER // 8, num_attention_heads=4)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        rt = SparseMLP(LlamaMLP(cfg).to(device=dev, dtype=dtype), "teal", t_in=0.7, t_down=0.01)
        picked = type(rt.native).__name__ if rt.native is not None else "torch path"
        if SMOKE:  # on the CPU native_for picks the C kernel (or torch's path): put the Triton one in its place
            rt.native = triton_kernel.gather_kernel(dev)
        x = torch.randn(1, 1, cfg.hidden_size, device=dev).to(dtype)
        with torch.no_grad():
            y, ref = rt(x).double(), rt.dense(x).double()
        out[str(dtype)[6:]] = {"picked": picked, "calls": dict(rt.calls),
                               "err_over_max": ((y - ref).abs().max() / ref.abs().max()).item()}
    return out


def time_sparse(dev: str, quick: bool, repeats: int) -> list[dict]:
    from llmfast.sparse.triton_kernel import default_launch, teal_mlp_token, threshold_matvec

    global DEADLINE
    hidden, inter = HIDDEN, INTER
    copies = copies_for(3 * hidden * inter * 2)
    gate_up = [torch.randn(2 * inter, hidden, device=dev, dtype=torch.bfloat16) / 64 for _ in range(copies)]
    down = [torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16) / 64 for _ in range(copies)]
    gate_up_t = [w.T.contiguous() for w in gate_up]
    down_t = [w.T.contiguous() for w in down]
    x = torch.randn(hidden, device=dev, dtype=torch.bfloat16)

    def dense_mlp(i: int) -> Callable[[], None]:
        def call() -> None:
            gu = F.linear(x, gate_up[i])
            F.linear(F.silu(gu[:inter]) * gu[inter:], down[i])
        return call

    dense = per_call_us(dense_mlp, copies, repeats)
    # wide output blocks make each kept input row one long contiguous read; split-K gives the GPU enough programs
    tiles = [(128, 32), (128, 64), (256, 16), (256, 32), (256, 64), (512, 16), (512, 32)]
    iters = (1, 2, 4)
    if quick or SMOKE:
        tiles, iters = [(256, 64), (128, 32)] if not SMOKE else [(32, 16)], (1, 2)
    rows = []
    ranked: dict[str, list] = {"up": [], "down": []}  # 90%'s times (measured first): other levels try the best 3
    for sparsity in (0.9, 0.7, 0.5):
        # Thresholds as TEAL calibrates them: the input's at its quantile, the down projection's on the activation
        # that the thresholded input gives (a sparse input shrinks the activation: calibrating on the dense one
        # would drop far more than the target there).
        t_in = torch.quantile(x.float().abs(), sparsity).item()
        xs = torch.where(x.abs() > t_in, x, torch.zeros((), dtype=x.dtype, device=dev))
        gu = F.linear(xs, gate_up[0])
        act = F.silu(gu[:inter]) * gu[inter:]
        t_down = torch.quantile(act.float().abs(), sparsity).item()
        kept = {"input": (x.abs() > t_in).float().mean().item(), "down_input": (act.abs() > t_down).float().mean().item()}
        best: dict[str, tuple] = {}
        tried: dict[str, list] = {"up": [], "down": []}
        for part, k, n, v, t, mats, gated in [("up", hidden, inter, x, t_in, gate_up_t, True),
                                                ("down", inter, hidden, act, t_down, down_t, False)]:
            DEADLINE = time.monotonic() + BUDGET_S  # each matrix its own budget
            ref = threshold_matvec(v, t, mats[0], gated=gated, split_k=1, block_n=64, block_k=64,
                                   compact=False).float()
            # the list of kept rows first (the masked walk's time followed all rows on the H200), then the masked walk
            grid = ([dict(default_launch(k, n), compact=True), dict(default_launch(k, n), compact=False)]
                    + [dict(c, compact=True) for c in tile_grid(tiles, iters, k)]
                    + [dict(c, compact=False) for c in tile_grid(tiles[:3], iters[:1], k)] if not ranked[part]
                    else [c for _, c in sorted(ranked[part], key=lambda r: r[0])[:3]])
            for launch in grid:
                if part in best and over_budget():
                    break
                try:
                    y = threshold_matvec(v, t, mats[0], gated=gated, **launch).float()
                    if not torch.allclose(y, ref, rtol=2 ** -6, atol=2 ** -6 * ref.abs().max().item()):
                        print(f"  WRONG {part} output with {launch}: max diff {(y - ref).abs().max().item():.3g}")
                        continue
                    us = per_call_us(lambda i: (lambda: threshold_matvec(v, t, mats[i], gated=gated, **launch)),
                                     copies, repeats)
                except Exception as e:
                    print(f"  skipped {part} {launch}: {type(e).__name__}: {str(e)[:160]}")
                    continue
                tried[part].append({"us": round(us, 2), **launch})
                if sparsity == 0.9:
                    ranked[part].append((us, launch))
                if part not in best or us < best[part][0]:
                    best[part] = (us, launch)
        if len(best) < 2:
            rows.append({"sparsity": sparsity, "dense_mlp_us": round(dense, 2), "error": "no setting ran"})
            continue
        ref = teal_mlp_token(x, t_in, gate_up_t[0], t_down, down_t[0]).float()
        y = teal_mlp_token(x, t_in, gate_up_t[0], t_down, down_t[0], best["up"][1], best["down"][1]).float()
        mlp = per_call_us(lambda i: (lambda: teal_mlp_token(x, t_in, gate_up_t[i], t_down, down_t[i], best["up"][1],
                                                            best["down"][1])), copies, repeats)
        down_dense = per_call_us(lambda i: (lambda: F.linear(act, down[i])), copies, repeats)
        rows.append({"sparsity": sparsity, "kept": {k: round(v, 4) for k, v in kept.items()},
                     "dense_mlp_us": round(dense, 2), "sparse_mlp_us": round(mlp, 2),
                     "speedup": round(dense / mlp, 2), "gate_up_us": round(best["up"][0], 2),
                     "down_dense_us": round(down_dense, 2), "down_sparse_us": round(best["down"][0], 2),
                     "config_up": best["up"][1], "config_down": best["down"][1],
                     "mlp_rel_err_vs_default": ((y - ref).abs().max() / ref.abs().max()).item(), "tried": tried})
        print(f"TEAL MLP {sparsity:.0%} (kept {kept['input']:.1%} / {kept['down_input']:.1%}): dense {dense:.1f} us, "
              f"sparse {mlp:.1f} us -> {dense / mlp:.2f}x (gate|up {best['up'][0]:.1f} us; down {down_dense:.1f} -> "
              f"{best['down'][0]:.1f} us) {best['up'][1]} {best['down'][1]}", flush=True)
    rows.sort(key=lambda r: r["sparsity"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few launch settings instead of the grid")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=60,
                    help="per ternary shape and per sparse matrix: stop trying new launch settings after this many "
                         "seconds (the best so far is kept)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    ap.add_argument("--only", choices=["ternary", "sparse"], default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; run with TRITON_INTERPRET=1")
    args = ap.parse_args()
    global SMOKE, HIDDEN, INTER
    if args.smoke:
        SMOKE, HIDDEN, INTER = True, 64, 224
        args.quick, args.repeats = True, 1
    elif not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine (the kernels are tested on a CPU under "
              "TRITON_INTERPRET=1 by tests/test_triton_kernels.py)", file=sys.stderr)
        return 2
    import triton

    global BUDGET_S
    BUDGET_S = args.budget_s
    dev = "cpu" if SMOKE else "cuda"
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "gpu": "smoke run on the CPU" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "command": " ".join(sys.argv), "repeats": args.repeats}
    print(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a session that runs out of time keeps what it measured
        (out / "gpu_compression.json").write_text(json.dumps(result, indent=2) + "\n")

    sections = []
    if args.only in (None, "ternary"):
        sections += [("ternary_checks", check_ternary), ("ternary", lambda d: time_ternary(d, args.quick, args.repeats))]
    if args.only in (None, "sparse"):
        sections += [("sparse_checks", check_sparse), ("sparse", lambda d: time_sparse(d, args.quick, args.repeats))]
    for name, run in sections:
        try:
            result[name] = run(dev)
        except Exception as e:  # report it and go on: the other kernel's numbers are still worth having
            import traceback

            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        save()
        if name == "ternary_checks" and "error" not in result[name]:
            bad = {k: v for k, v in result[name].items()
                   if not ((v["same_as_layer"] if "float32" in k else v["same_as_exact"])
                           and (SMOKE or v["layer_uses_kernel"]))}
            print(f"ternary kernel against TernaryLinear: {len(result[name]) - len(bad)} of {len(result[name])} as "
                  f"expected {bad or ''}", flush=True)
        if name == "sparse_checks" and "error" not in result[name]:
            print(f"sparse kernel, largest error over sum |terms|: "
                  f"{max(v['err_over_sum_abs'] for k, v in result[name].items() if k != 'runtime'):.2e}; "
                  f"SparseMLP: {result[name]['runtime']}", flush=True)
    print(f"\n| kernel | shape | tokens/sparsity | cuBLAS bf16 us | ours us | speed-up | settings |")
    print("|---|---|---|---|---|---|---|")
    for r in result.get("ternary", []) if isinstance(result.get("ternary"), list) else []:
        if "error" in r:
            continue
        print(f"| ternary | {r['in']}x{r['out']} | {r['tokens']} | {r['cublas_bf16_us']} | {r['ternary_us']} | "
              f"{r['speedup']}x | {r['config']} |")
    for r in result.get("sparse", []) if isinstance(result.get("sparse"), list) else []:
        if "error" in r:
            continue
        print(f"| TEAL MLP | {HIDDEN}->{INTER} | {r['sparsity']:.0%} | {r['dense_mlp_us']} | {r['sparse_mlp_us']} | "
              f"{r['speedup']}x | {r['config_up']} {r['config_down']} |")
    print(f"results: {out / 'gpu_compression.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
