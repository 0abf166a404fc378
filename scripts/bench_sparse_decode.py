"""Batch-1 decode with llmfast's sparse MLP (llmfast/sparse/runtime.py) against the dense model, same run, same threads.

    python scripts/bench_sparse_decode.py                     # everything below, defaults (a few minutes)
    python scripts/bench_sparse_decode.py --decode-only --artifact runs/sparse/relufy --artifact runs/sparse/dejavu
    python scripts/bench_sparse_decode.py --no-8b --rounds 3 --new-tokens 16 --json runs/bench/sparse_decode.json
    python scripts/bench_sparse_decode.py --decode-only --targets 0.4,0.5 --teal-sites mlp --teal-sites mlp,attention
    python scripts/bench_sparse_decode.py --decode-only --dtype bfloat16 --targets 0.5 --teal-sites mlp,attention

Four tables, every row the median of alternating rounds (the sides swap order each round), warm-up calls excluded,
with `spread %`: the largest (max - min) / median of the row's sides over the rounds (a speed-up closer to 1 than
that is noise). The JSON (bench_common) carries provenance and the load average, and needs --force to replace a file.

1. gather: one token through gate|up stacked (hidden -> 2 x intermediate), q|k|v stacked and o_proj (TEAL's
   attention sites), with a fraction of the input kept:
   `F.embedding_bag` over the rows of W^T (the torch path; with several threads also split into a bag per
   thread, as that path does), `index_select` + matrix-vector product (built-in model's shapes only), llmfast's
   C kernel (`gather_gemv.c`, the float32 default), and the dense product. Where the dense product wins is the
   crossover (kernels.DENSE_ABOVE for torch's gathers, cpu_kernel.DENSE_ABOVE for the kernel).
2. mlp: one gated MLP for one token, the model's dense forward against SparseMLP on llmfast's C kernel (the
   float32 default; "torch" columns: the same runtime on torch's gathers) (TEAL with both thresholds at
   the target sparsity, CATS at 50% and 90%: a ReLU-fied model's sparsity), at the built-in model's shapes
   (576 -> 1536) and Llama-8B's (4096 -> 14336). Random weights and input; thresholds are quantiles of this
   input, so the target is met.
3. attention: one attention block's projections for one token (TEAL's attention sites), q/k/v and o_proj as
   four dense products against SparseProjections (q|k|v stacked, one gather; o_proj alone) with the
   thresholds at the target quantile of this input, at the built-in model's shapes and Llama-8B's.
4. decode: the built-in model (SmolLM2-135M, float32 or --dtype bfloat16, dense and sparse alike), transformers
   `generate`, greedy, batch 1, N new tokens:
   the dense model against TEAL artifacts at each target and each --teal-sites choice (`mlp`, `mlp,attention`,
   `attention`) loaded with the sparse runtime (built in-process from thresholds calibrated as `llmfast
   sparsify` does, or the --artifact(s) given), all in this process, each on the C kernel and on the torch
   path. The dense side is the built-in model itself: a dense step costs the same whatever the weights.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import bench_common
from llmfast.sparse import cpu_kernel
from llmfast.sparse.kernels import SparseMLP, SparseProjections, bag_sum
from llmfast.timing import timed

SHAPES = {"smollm2 576->1536": (576, 1536), "llama-8b 4096->14336": (4096, 14336)}
ATTENTION_SHAPES = {"smollm2 576, q 576, k/v 192": (576, 576, 192), "llama-8b 4096, q 4096, k/v 1024": (4096, 4096, 1024)}
# The stacked W^T (in, out) each gather reads: gate|up, q|k|v (9 heads / 3 kv heads of 64; 32 / 8 of 128), o_proj.
GATHER_SHAPES = {"smollm2 gate|up": (576, 2 * 1536), "smollm2 q|k|v": (576, 576 + 2 * 192),
                 "smollm2 o": (576, 576), "llama-8b gate|up": (4096, 2 * 14336),
                 "llama-8b q|k|v": (4096, 4096 + 2 * 1024), "llama-8b o": (4096, 4096)}


def bench_gather(shapes: dict[str, tuple[int, int]], rounds: int, seconds: float) -> list[dict[str, Any]]:
    kernel = cpu_kernel.gather_kernel()
    rows = []
    for label, (h, n) in shapes.items():
        wt = torch.randn(h, n)  # W transposed: column c of W is row c here
        x = torch.randn(h)
        for kept in (0.1, 0.3, 0.5, 0.6, 0.7):
            idx = torch.randperm(h)[: int(kept * h)].sort().values
            keep = torch.zeros(h, dtype=torch.bool)
            keep[idx] = True
            sides = {"embedding_bag": lambda: timed(lambda: bag_sum(idx, x.index_select(0, idx), wt, bags=1), seconds),
                     "dense": lambda: timed(lambda: torch.where(keep, x, 0.0) @ wt, seconds)}
            if h < 1024:  # copying the rows first is several times slower than dense at 8B's size: not repeated there
                sides["index_select+mv"] = lambda: timed(lambda: x.index_select(0, idx) @ wt.index_select(0, idx),
                                                         seconds)
            if torch.get_num_threads() > 1:  # what the torch path runs with several threads: a bag per thread
                sides["embedding_bag per thread"] = lambda: timed(lambda: bag_sum(idx, x.index_select(0, idx), wt),
                                                                  seconds)
            if kernel is not None:  # what the runtime runs in float32 on a CPU: llmfast's C kernel
                sides["kernel"] = lambda: timed(lambda: kernel.gather(idx, x.index_select(0, idx), wt), seconds)
            med, noise = bench_common.medians(sides, rounds)
            med = {k: v * 1e6 for k, v in med.items()}
            rows.append({"case": f"{label}, {kept:.0%} kept",
                         **{f"{k} us": round(v, 1) for k, v in med.items()},
                         "dense / embedding_bag": round(med["dense"] / med["embedding_bag"], 2),
                         **({"dense / kernel": round(med["dense"] / med["kernel"], 2)} if kernel else {}),
                         "spread %": bench_common.percent(noise)})
    return rows


def random_mlp(h: int, i: int) -> Any:
    from transformers.models.llama.modeling_llama import LlamaMLP

    class Cfg:
        hidden_size, intermediate_size, mlp_bias, hidden_act = h, i, False, "silu"

    mlp = LlamaMLP(Cfg())
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        torch.nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
    return mlp.eval()


def quantile_abs(x: torch.Tensor, q: float) -> float:
    return float(x.abs().flatten().float().kthvalue(max(1, round(q * x.numel()))).values)


def sparse_mlp(dense: Any, mode: str, target: float, x: torch.Tensor) -> SparseMLP:
    """SparseMLP on a copy of `dense` with thresholds at the `target` quantile of this input's values."""
    h, i = dense.gate_proj.in_features, dense.gate_proj.out_features
    mlp = random_mlp(h, i) if h < 1024 else dense  # the 8B copy would not fit twice; built from the same weights
    if mlp is not dense:
        mlp.load_state_dict(dense.state_dict())
    g = F.linear(x, dense.gate_proj.weight)
    if mode == "cats":
        return SparseMLP(mlp, "cats", t_gate=quantile_abs(F.silu(g), target))
    t_in = quantile_abs(x, target)
    xs = torch.where(x.abs() > t_in, x, 0.0)
    act = F.silu(F.linear(xs, dense.gate_proj.weight)) * F.linear(xs, dense.up_proj.weight)
    return SparseMLP(mlp, "teal", t_in=t_in, t_down=quantile_abs(act, target))


def _torch_path(rt: Any) -> Any:
    """A shallow copy of a runtime object that takes torch's gathers instead of the C kernel (same weights)."""
    import copy

    other = copy.copy(rt)
    other.native = None
    other.calls = dict(rt.calls)
    return other


def _speed_row(case: str, measured: tuple[dict[str, float], float | None]) -> dict[str, Any]:
    med, noise = measured
    return {"case": case, "dense us": round(med["dense"] * 1e6, 1), "sparse us": round(med["sparse"] * 1e6, 1),
            "sparse torch us": round(med["sparse torch"] * 1e6, 1), "speed-up": round(med["dense"] / med["sparse"], 2),
            "speed-up torch": round(med["dense"] / med["sparse torch"], 2), "spread %": bench_common.percent(noise)}


def bench_mlp(shapes: dict[str, tuple[int, int]], targets: list[float], rounds: int,
              seconds: float) -> list[dict[str, Any]]:
    rows = []
    for label, (h, i) in shapes.items():
        dense = random_mlp(h, i)
        x = torch.randn(1, 1, h)
        plain = {n: getattr(dense, n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}

        def dense_fwd() -> torch.Tensor:  # LlamaMLP.forward on contiguous nn.Linear weights
            return F.linear(F.silu(F.linear(x, plain["gate_proj"])) * F.linear(x, plain["up_proj"]), plain["down_proj"])

        cases = [("teal", t) for t in targets] + [("cats", 0.5), ("cats", 0.9)]
        for mode, target in cases:
            rt = sparse_mlp(dense, mode, target, x)
            on_torch = _torch_path(rt)
            med = bench_common.medians({"dense": lambda: timed(dense_fwd, seconds),
                             "sparse": lambda: timed(lambda: rt(x), seconds),
                             "sparse torch": lambda: timed(lambda: on_torch(x), seconds)}, rounds)
            rows.append(_speed_row(f"{label} MLP, {mode} {target:.0%}", med))
        del dense, plain
    return rows


def bench_attention(shapes: dict[str, tuple[int, int, int]], targets: list[float], rounds: int,
                    seconds: float) -> list[dict[str, Any]]:
    rows = []
    for label, (h, nq, nkv) in shapes.items():
        lins = [torch.nn.Linear(h, n, bias=False) for n in (nq, nkv, nkv)]
        o = torch.nn.Linear(nq, h, bias=False)
        plain = [lin.weight.detach().clone() for lin in (*lins, o)]  # contiguous, as the dense model has them
        x, a = torch.randn(1, 1, h), torch.randn(1, 1, nq)

        def dense_fwd() -> Any:
            return [F.linear(x, w) for w in plain[:3]], F.linear(a, plain[3])

        for target in targets:
            qkv = SparseProjections(lins, quantile_abs(x, target))
            op = SparseProjections([o], quantile_abs(a, target))
            qkv_t, op_t = _torch_path(qkv), _torch_path(op)
            med = bench_common.medians({"dense": lambda: timed(dense_fwd, seconds),
                             "sparse": lambda: timed(lambda: ([qkv.part(j, x) for j in range(3)], op.part(0, a)),
                                                     seconds),
                             "sparse torch": lambda: timed(lambda: ([qkv_t.part(j, x) for j in range(3)],
                                                                    op_t.part(0, a)), seconds)}, rounds)
            rows.append(_speed_row(f"{label} q/k/v+o, teal {target:.0%}", med))
        del lins, o, plain
    return rows


def teal_artifact(src: Path, out: Path, target: float, calibration: torch.Tensor, model: Any,
                  sites: list[str]) -> Path:
    """A TEAL artifact of `src` at `target` on `sites` (mlp, attention), calibrated as `llmfast sparsify` does."""
    from safetensors.torch import save_file

    from llmfast.artifacts import write_manifest
    from llmfast.sparse.teal import Teal, TealConfig
    from llmfast.sparse.thresholds import THRESHOLDS_FILE, link_or_copy_model

    out.mkdir(parents=True)
    cfg = TealConfig(target=target, sites=sites)  # type: ignore[arg-type]  (checked by pydantic)
    thresholds = Teal().calibrate(model, calibration, target, Teal().sites_for(cfg))
    link_or_copy_model(src, out)
    save_file({s: v.contiguous() for s, v in thresholds.items()}, out / THRESHOLDS_FILE)
    write_manifest(out, stage="sparsify", parents=[str(src)],
                   sparsity={"method": "teal", "config": cfg.model_dump(mode="json")})
    return out


def bench_decode(targets: list[float], artifacts: list[str] | None, rounds: int,
                 new_tokens: int, teal_sites: list[list[str]], dtype: str = "float32") -> list[dict[str, Any]]:
    from llmfast.calibration import text_ids
    from llmfast.loading import from_pretrained
    from llmfast.models import load_tokenizer, resolve_model
    from llmfast.sparse.runtime import artifact_method, load_sparse_model, sparse_forwards

    src = resolve_model("builtin:smollm2-135m")
    dense = from_pretrained(src, dtype).eval()
    tok = load_tokenizer(src)
    ids = text_ids(tok, Path(__file__).resolve().parent.parent / "eval" / "text" / "persuasion.txt")
    prompt = ids[:32].view(1, -1)
    sparse: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as tmp:
        for artifact in artifacts or []:
            sparse[f"{artifact_method(artifact)} {Path(artifact).name}"] = load_sparse_model(artifact, dtype)
        if not artifacts:
            calibration = ids[16384 : 16384 + 2048].view(4, 512)  # after the span llmfast eval scores, as sparsify
            with torch.inference_mode():
                for sites in teal_sites:
                    for t in targets:
                        name = f"teal{round(t * 100)}-{'+'.join(sites)}"
                        art = teal_artifact(src, Path(tmp) / name, t, calibration, dense, sites)
                        sparse[f"teal {t:.0%} {'+'.join(sites)}"] = load_sparse_model(art, dtype)

    kernels = {id(rt): rt.native for m in sparse.values() for rt in sparse_forwards(m)}
    counts: dict[tuple[int, bool], dict[str, int]] = {}  # each runtime object's path counts, per path

    def decode(model: Any, native: bool = True) -> float:
        """Tokens per second; `native=False`: the runtime's torch path (its C kernel set aside for this run)."""
        for rt in sparse_forwards(model) if model is not dense else []:
            rt.native = kernels[id(rt)] if native else None
            rt.calls = counts.setdefault((id(rt), native), {k: 0 for k in rt.calls})
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - t)

    sides: dict[str, Callable[[], float]] = {"dense": lambda: decode(dense)}
    for name, m in sparse.items():
        sides[name] = lambda m=m: decode(m)
        sides[f"{name} (torch path)"] = lambda m=m: decode(m, native=False)
    with torch.inference_mode():
        for side in sides.values():
            side()  # warm-up
        for c in counts.values():
            c.update({k: 0 for k in c})
        got, _ = bench_common.rounds(sides, rounds)
    stats = {s: bench_common.spread(v) for s, v in got.items()}
    med = {s: v["median"] for s, v in stats.items()}
    rows = []
    for name, m in sparse.items():
        torch_path = med[f"{name} (torch path)"]
        # this row's sides
        noise = bench_common.largest(stats[s]["spread"] for s in ("dense", name, f"{name} (torch path)"))
        row = {"case": f"smollm2-135m {dtype} decode, {name}, {new_tokens} tokens",
               "dense tok/s": round(med["dense"], 1), "spread %": bench_common.percent(noise),
               "sparse tok/s": round(med[name], 1), "speed-up": round(med[name] / med["dense"], 2),
               "torch path tok/s": round(torch_path, 1), "speed-up torch path": round(torch_path / med["dense"], 2)}
        for native, path in ((True, "kernel"), (False, "torch")):
            for part in ("mlp", "attention"):
                calls = {"sparse": 0, "dense": 0}
                for rt in sparse_forwards(m, part):
                    for k in calls:
                        calls[k] += counts[(id(rt), native)][k]
                gathers = calls["sparse"] + calls["dense"]
                row[f"{part} dense fallbacks, {path}"] = f"{calls['dense'] / max(1, gathers):.0%} of {gathers}"
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.2, help="timed calls per side and round (tables 1, 2)")
    p.add_argument("--targets", default="0.4,0.5,0.7,0.9", help="TEAL sparsity targets")
    p.add_argument("--teal-sites", action="append", help="TEAL sites of the built artifacts, comma-separated "
                   "(mlp, attention; repeatable: one set of artifacts each; default mlp)")
    p.add_argument("--artifact", action="append", help="a teal/cats/relufy/dejavu artifact to decode with instead "
                   "of building TEAL ones (repeatable)")
    p.add_argument("--decode-only", action="store_true", help="skip the gather and MLP tables")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-8b", action="store_true", help="skip the Llama-8B shapes (2.8 GB of random weights)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="of the decode table's models, dense and sparse alike (the C kernel runs both)")
    bench_common.add_output_args(p, "runs/bench/sparse_decode.json")
    args = p.parse_args()
    bench_common.check_output(args.json, args.force)
    state = bench_common.machine_state()
    torch.set_num_threads(args.threads)  # one setting for the dense and the sparse side alike
    targets = [float(t) for t in args.targets.split(",")]
    teal_sites = [[s.strip() for s in x.split(",") if s.strip()] for x in (args.teal_sites or ["mlp"])]
    if bad := sorted({s for sites in teal_sites for s in sites} - {"mlp", "attention"}):
        p.error(f"--teal-sites: unknown site {', '.join(bad)} (known: mlp, attention)")
    shapes = {k: v for k, v in SHAPES.items() if not (args.no_8b and "8b" in k)}
    gather_shapes = {k: v for k, v in GATHER_SHAPES.items() if not (args.no_8b and "8b" in k)}
    attention_shapes = {k: v for k, v in ATTENTION_SHAPES.items() if not (args.no_8b and "8b" in k)}
    t0 = time.perf_counter()
    tables: dict[str, list[dict[str, Any]]] = {}
    if not args.decode_only:
        with torch.inference_mode():
            tables = {"gather": bench_gather(gather_shapes, args.rounds, args.seconds),
                      "mlp": bench_mlp(shapes, targets, args.rounds, args.seconds),
                      "attention": bench_attention(attention_shapes, targets, args.rounds, args.seconds)}
    if not args.no_decode:
        tables["decode"] = bench_decode(targets, args.artifact, args.rounds, args.new_tokens, teal_sites, args.dtype)
    for name, rows in tables.items():
        print(f"\n{name}")
        bench_common.print_rows(rows)
    record = {"threads": args.threads, "rounds": args.rounds, "wall_seconds": round(time.perf_counter() - t0, 1),
              **tables}
    out = bench_common.write_json(args.json, record, args.force, state)
    print(f"\njson: {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
