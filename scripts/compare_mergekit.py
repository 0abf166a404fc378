#!/usr/bin/env python
"""`llmfast merge` against mergekit on the same configs: every tensor, the speed and the peak RSS.

mergekit is not a dependency of llmfast. It goes into its own virtual environment (created here when
missing), which sees this environment's packages through a .pth file so both tools run the same torch:
`pip install --no-deps mergekit==0.1.5 immutables` (mergekit's pins would replace our torch and
transformers otherwise).

The inputs are synthetic fine-tunes of a base: each variant is the base plus a dense rank-16 delta on
every linear layer (B @ A, like a merged LoRA), so the task vectors look like real ones (float32 deltas
on the base's rounding grid). `--shape 135m` uses the built-in model as the base (float32); `--shape 1.7b`
a random base of SmolLM2-1.7B's Llama shape (hidden 2048, 24 layers, vocab 49152: 1.7B parameters) in
bfloat16. Both tools run each method with the same thread count (`--threads`: our --threads, mergekit's
torch threads through OMP_NUM_THREADS), one untimed warm-up run each (`--warmup`), then `--rounds` rounds whose
tool order alternates, each run (after `settle_page_cache`) its own process under /usr/bin/time -v; the medians are
compared, each tool's spread over the rounds beside them. Then every tensor of the two outputs is
compared (max abs difference). DARE's drop is random in both tools, so for dare_linear the kept fraction
and the rescale factor are compared instead, on a one-model merge where both are visible.

    python scripts/compare_mergekit.py                              # 135m, all methods, 3 rounds
    python scripts/compare_mergekit.py --shape 1.7b --methods ties,task_arithmetic --rounds 2

Prints a table and writes runs/bench/merge_vs_mergekit-SHAPE.json (bench_common: provenance, the load average with a
warning when the machine is busy; an existing file is replaced only with --force, checked before anything runs).
The "GB/s" column is the bytes read (every input once) plus written, per second; "x floor" is llmfast's time over
the time one core takes to move those bytes at the copy bandwidth measured in the same run (the floor no merge can
beat).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bench_common

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHOD_PARAMS = {
    "linear": ({"weight": 0.5}, {"weight": 0.5}, None),
    "task_arithmetic": ({"weight": 1.0}, {"weight": 1.0}, None),
    "ties": ({"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}, None),
}
SHAPE_1_7B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 49152, "tie_word_embeddings": True,
              "max_position_embeddings": 8192, "rope_theta": 130000.0, "rms_norm_eps": 1e-5}


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit 0.1.5 into {venv} (over this environment's torch and transformers)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ours = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    theirs = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(theirs, "llmfast-env.pth").write_text(ours + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "mergekit==0.1.5",
                    "immutables"], check=True)
    return exe


# ---------------------------------------------------------------- inputs
def make_variant(base: Path, out: Path, seed: int, rank: int = 16, scale: float = 1e-3) -> Path:
    """base + a dense rank-`rank` delta (std ~ `scale` of the entries) on every 2-D layer weight, same dtype.

    In bfloat16 a delta of 1e-3 of an entry is below half its rounding step, so most entries stay as they
    were (as in a short bfloat16 fine-tune); 1e-2 changes most of them. The share changed is recorded.
    """
    import torch

    from llmfast.merge.io import ShardedWriter, TensorReader, ordered

    if (out / "llmfast-variant.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    reader = TensorReader(base)
    layout = [(n, shape, _dtype_name(tag)) for n, (shape, tag, _f) in ordered(reader.index).items()]
    writer = ShardedWriter(out, layout, 2**62)
    g = torch.Generator().manual_seed(seed)
    changed = total = 0
    for name, shape, _dt in layout:
        t = reader.get(name)
        if len(shape) == 2 and ".layers." in name:
            a = torch.randn(rank, shape[1], generator=g) / rank**0.5
            b = torch.randn(shape[0], rank, generator=g) * (scale * float(t.float().std()))
            new = (t.float() + b @ a).to(t.dtype)
            changed += int((new != t).sum())
            total += t.numel()
            t = new
        writer.write(name, t)
    writer.finish()
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".index.json")) and f.name != "llmfast.json":
            shutil.copy2(f, out / f.name)
    info = {"base": str(base), "seed": seed, "rank": rank, "scale": scale,
            "changed_fraction": round(changed / max(total, 1), 4)}
    (out / "llmfast-variant.json").write_text(json.dumps(info) + "\n")
    return out


def _dtype_name(tag: str) -> str:
    from llmfast.merge.io import st_dtype_name

    return st_dtype_name(tag)


def make_random_base(out: Path, tokenizer_from: Path) -> Path:
    """Random weights (std 0.02, norms 1) of SmolLM2-1.7B's shape in bfloat16, with the built-in's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmfast.merge.io import ShardedWriter

    if (out / "llmfast-variant.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = AutoConfig.from_pretrained(tokenizer_from)
    config.update(SHAPE_1_7B)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if k != "lm_head.weight"}
    config.save_pretrained(out)
    from llmfast.merge.io import ordered

    names = list(ordered(dict.fromkeys(shapes)))
    writer = ShardedWriter(out, [(n, shapes[n], "bfloat16") for n in names], 2**62)
    g = torch.Generator().manual_seed(0)
    for n in names:
        t = torch.ones(shapes[n]) if "norm" in n else torch.randn(shapes[n], generator=g) * 0.02
        writer.write(n, t.to(torch.bfloat16))
    writer.finish()
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy2(f, out / f.name)
    (out / "llmfast-variant.json").write_text(json.dumps({"shape": SHAPE_1_7B}) + "\n")
    return out


# ---------------------------------------------------------------- running and comparing
def timed(cmd: list[str], log: Path, threads: int) -> dict:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (GiB) of the process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    return {"seconds": round(secs, 2), "peak_rss_gib": round(rss / 2**20, 3)}


def weights(d: Path) -> dict[str, Path]:
    from llmfast.merge.io import tensor_index

    return {name: f for name, (_s, _t, f) in tensor_index(d).items()}


def model_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def compare(ours: Path, theirs: Path) -> dict:
    """Max abs difference over every tensor, read one at a time."""
    from llmfast.merge.io import TensorReader

    a, b = TensorReader(ours), TensorReader(theirs)
    if set(a.index) != set(b.index):
        return {"same_tensor_names": False, "only_ours": sorted(set(a.index) - set(b.index))[:5],
                "only_mergekit": sorted(set(b.index) - set(a.index))[:5]}
    worst, worst_name, dtypes = 0.0, "", set()
    for name in a.index:
        ta, tb = a.get(name), b.get(name)
        dtypes.add(f"{ta.dtype}/{tb.dtype}")
        diff = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
        if diff > worst:
            worst, worst_name = diff, name
    return {"same_tensor_names": True, "tensors": len(a.index), "max_abs_diff": worst, "worst_tensor": worst_name,
            "dtypes": sorted(dtypes)}


def dare_stats(base: Path, ft: Path, merged: Path) -> dict:
    """Kept fraction and rescale factor of a one-model dare_linear merge (weight 1)."""
    from llmfast.merge.io import TensorReader

    rb, rf, rm = TensorReader(base), TensorReader(ft), TensorReader(merged)
    kept = nonzero = 0
    factors = []
    for name in rb.index:
        b, f, m = rb.get(name).double(), rf.get(name).double(), rm.get(name).double()
        delta, got = f - b, m - b
        nz = delta != 0
        if not nz.any():
            continue
        k = (got != 0) & nz
        kept += int(k.sum())
        nonzero += int(nz.sum())
        # The factor by the L1 norms, robust to float32 rounding of tiny entries in base + delta - base.
        factors.append(float(got[k].abs().sum() / delta[k].abs().sum()))
    factors.sort()
    return {"kept_fraction": round(kept / nonzero, 5), "tensors": len(factors),
            "rescale_median": round(factors[len(factors) // 2], 4), "rescale_min": round(factors[0], 4),
            "rescale_max": round(factors[-1], 4)}


def settle_page_cache(inputs: list[Path]) -> bool:
    """Every run starts alike: dirty pages written, the page cache dropped (root only), the inputs read back in.

    A full page cache makes the kernel reclaim while a tool writes its output: at the 1.7B shape the same
    3.4 GB of writes took 1.5 s of system time with free memory and 6.4 s with the cache full. Returns
    whether the cache could be dropped.
    """
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        dropped = True
    except OSError:
        dropped = False
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with f.open("rb") as fh:
                while fh.read(64 * 2**20):
                    pass
    return dropped


def copy_bandwidth() -> float:
    """This machine's memory bandwidth in bytes/s (read + written) of one core copying 512 MB, best of 5."""
    import time

    import numpy as np

    src = np.ones(2**27, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def write_config(path: Path, method: str, base: Path, models: list[tuple[Path, dict]], params: dict | None,
                 dtype: str) -> None:
    import yaml

    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(m), "parameters": p} for m, p in models], "dtype": dtype}
    if method == "linear":
        del cfg["base_model"]  # a soup of the fine-tunes (with base_model, both tools average it in too)
    if params:
        cfg["parameters"] = params
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def commands(tool: str, cfg: Path, out: Path, threads: int, llmfast_exe: str, mergekit: Path) -> list[str]:
    if tool == "llmfast":
        return [llmfast_exe, "merge", str(cfg), str(out), "--no-progress", "--threads", str(threads)]
    return [str(mergekit), str(cfg), str(out), "--quiet", "--random-seed", "0"]


def bench_method(method: str, base: Path, ft: list[Path], args: argparse.Namespace, work: Path, exes: dict,
                 dtype: str) -> dict:
    p1, p2, shared = METHOD_PARAMS[method]
    cfg = work / f"{method}.yaml"
    write_config(cfg, method, base, [(ft[0], p1), (ft[1], p2)], shared, dtype)
    runs: dict[str, list[dict]] = {"llmfast": [], "mergekit": []}
    for rnd in range(-args.warmup, args.rounds):  # rounds below 0: warm-up (the tools' code read and compiled once)
        for tool in bench_common.order(list(runs), rnd):
            out = work / f"{tool}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            args.cache_dropped = settle_page_cache(([base] if method != "linear" else []) + ft)
            # Not under `nice`: on a shared machine a niced run is starved by everyone else's, whichever tool it is.
            r = timed(commands(tool, cfg, out, args.threads, exes["llmfast"], exes["mergekit"]),
                      work / f"{tool}-{method}-{rnd}.log", args.threads)
            print(f"  {method:<16} {tool:<9} {'warm-up' if rnd < 0 else f'round {rnd + 1}'}: {r['seconds']:7.2f} s  "
                  f"{r['peak_rss_gib']:.2f} GiB  load {os.getloadavg()[0]:.1f}", flush=True)
            if rnd >= 0:
                runs[tool].append({**r, "order": bench_common.order(list(runs), rnd).index(tool)})
    moved = sum(model_bytes(p) for p in ([base] if method != "linear" else []) + ft) + \
        model_bytes(work / f"llmfast-{method}")
    entry: dict = {"rounds": runs, "bytes_read_and_written": moved}
    timing = bench_common.compare([r["seconds"] for r in runs["llmfast"]], [r["seconds"] for r in runs["mergekit"]])
    for tool, side in (("llmfast", "ours"), ("mergekit", "baseline")):
        secs = timing[side]["median"]
        entry[tool] = {"median_seconds": secs, "peak_rss_gib": max(r["peak_rss_gib"] for r in runs[tool]),
                       "gb_per_s": round(moved / secs / 1e9, 2), "seconds": timing[side]}
    entry["speedup"] = round(1 / timing["ratio"], 2)  # mergekit's median time over llmfast's
    entry["noise"] = None if timing["noise"] is None else round(timing["noise"], 3)  # None: one round, unknown
    entry["beyond_noise"] = timing["beyond_noise"]
    # The floor: every input read once and the output written once at one core's copy bandwidth.
    entry["bandwidth_floor_seconds"] = round(moved / args.bandwidth, 3)
    entry["llmfast_over_floor"] = round(entry["llmfast"]["median_seconds"] / entry["bandwidth_floor_seconds"], 1)
    entry["rss_ratio"] = round(entry["llmfast"]["peak_rss_gib"] / entry["mergekit"]["peak_rss_gib"], 3)
    entry["diff"] = compare(work / f"llmfast-{method}", work / f"mergekit-{method}")
    if method.startswith("dare"):
        entry["note"] = "random drop: tensors differ by design; see dare_linear_check"
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["135m", "1.7b"], default="135m")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties")
    ap.add_argument("--no-dare", action="store_true", help="skip dare_linear's kept fraction/rescale check")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per tool and method, alternating the order")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per tool and method before the rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both tools")
    ap.add_argument("--delta-scale", type=float, default=1e-3,
                    help="std of the variants' deltas relative to the entries' (bfloat16 keeps most at 1e-3)")
    ap.add_argument("--mergekit-venv", default="/tmp/mergekit-venv")
    ap.add_argument("--workdir", default="/tmp/merge-compare")
    ap.add_argument("--out", default=None, help="default runs/bench/merge_vs_mergekit-SHAPE.json")
    ap.add_argument("--force", action="store_true", help="replace the JSON file if it exists")
    args = ap.parse_args()
    out = REPO / (args.out or f"runs/bench/merge_vs_mergekit-{args.shape}.json")
    bench_common.check_output(out, args.force, "--out")
    state = bench_common.machine_state()

    from llmfast.models import resolve_model

    work = Path(args.workdir) / args.shape
    work.mkdir(parents=True, exist_ok=True)
    builtin = resolve_model("builtin:smollm2-135m")
    base = builtin if args.shape == "135m" else make_random_base(work / "base", builtin)
    dtype = "float32" if args.shape == "135m" else "bfloat16"
    tag = "" if args.delta_scale == 1e-3 else f"-s{args.delta_scale:g}"
    ft = [make_variant(base, work / f"ft-a{tag}", 1, scale=args.delta_scale),
          make_variant(base, work / f"ft-b{tag}", 2, scale=args.delta_scale)]
    changed = [json.loads((p / "llmfast-variant.json").read_text()).get("changed_fraction") for p in ft]
    exes = {"mergekit": ensure_mergekit(Path(args.mergekit_venv)),
            "llmfast": str(Path(sys.executable).parent / "llmfast")}
    args.bandwidth = copy_bandwidth()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = re.search(r"Model name:\s*(.+)", lscpu)
    results: dict = {"date": dt.date.today().isoformat(), "cpu": cpu.group(1).strip() if cpu else "?",
                     "cpus": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
                     "loadavg_at_start": os.getloadavg(), "copy_bandwidth_gb_s": round(args.bandwidth / 1e9, 2),
                     "shape": args.shape, "dtype": dtype, "base": str(base),
                     "fine_tuned": [str(p) for p in ft], "delta_scale": args.delta_scale,
                     "changed_fraction": changed, "mergekit": "0.1.5", "methods": {}}
    for method in [m for m in args.methods.split(",") if m]:
        results["methods"][method] = bench_method(method, base, ft, args, work, exes, dtype)
    results["loadavg_at_end"] = os.getloadavg()
    results["page_cache"] = ("dropped, then the inputs read back in, before every run" if getattr(args, "cache_dropped", False)
                             else "inputs read before every run (dropping the cache needs root)")
    if not args.no_dare:
        cfg = work / "dare_linear.yaml"
        write_config(cfg, "dare_linear", base, [(ft[0], {"weight": 1.0, "density": 0.5})], None, dtype)
        for tool in ("llmfast", "mergekit"):
            dare = work / f"{tool}-dare"
            shutil.rmtree(dare, ignore_errors=True)
            timed(commands(tool, cfg, dare, args.threads, exes["llmfast"], exes["mergekit"]), work / f"{tool}-dare.log",
                  args.threads)
        results["dare_linear_check"] = {"density": 0.5, **{tool: dare_stats(base, ft[0], work / f"{tool}-dare")
                                                           for tool in ("llmfast", "mergekit")}}
    bench_common.write_json(out, results, args.force, state, threads=args.threads)
    print_table(results)
    print(f"\nresults: {out}")
    return 0


def print_table(results: dict) -> None:
    print(f"\n{results['shape']} ({results['dtype']}), {results['threads']} threads each, median of "
          f"{results['rounds']} alternating rounds, load average {results['loadavg_at_start'][0]:.1f} at start")
    changed = [c for c in results.get("changed_fraction") or [] if c is not None]
    if changed:
        print(f"variants: deltas of std {results.get('delta_scale', 1e-3):g} x the entries'; share of layer entries "
              f"changed: {', '.join(f'{c:.1%}' for c in changed)}")
    print(f"memory bandwidth (one core copying): {results.get('copy_bandwidth_gb_s', '?')} GB/s; 'x floor': llmfast's "
          "time over reading every input and writing the output once at that bandwidth")
    print(f"{'method':<16} {'max abs diff':>13} {'llmfast s':>10} {'mergekit s':>11} {'speedup':>8} {'spread':>6} "
          f"{'llmfast GB/s':>12} {'x floor':>8} {'llmfast RSS':>12} {'mergekit RSS':>13} {'RSS ratio':>9}")
    for method, e in results["methods"].items():
        diff = e["diff"].get("max_abs_diff", "names differ")
        diff_s = (f"{diff:.3g}" if isinstance(diff, float) else diff) + ("*" if method.startswith("dare") else "")
        print(f"{method:<16} {diff_s:>13} {e['llmfast']['median_seconds']:>10.2f} "
              f"{e['mergekit']['median_seconds']:>11.2f} {e['speedup']:>7.2f}x {bench_common.pct(e.get('noise')):>6} "
              f"{e['llmfast']['gb_per_s']:>12.2f} "
              f"{e.get('llmfast_over_floor', float('nan')):>8.1f} "
              f"{e['llmfast']['peak_rss_gib']:>10.2f} G {e['mergekit']['peak_rss_gib']:>11.2f} G {e['rss_ratio']:>9.2f}")
    if "dare_linear_check" in results:
        d = results["dare_linear_check"]
        for tool in ("llmfast", "mergekit"):
            s = d[tool]
            print(f"dare_linear density 0.5, {tool:<8}: kept fraction {s['kept_fraction']:.4f}, rescale median "
                  f"{s['rescale_median']} (min {s['rescale_min']}, max {s['rescale_max']}) over {s['tensors']} tensors")
    print("spread: the larger (max - min) / median of the two tools' seconds over the rounds; a speedup closer to 1 "
          "than that is noise")
    if any(m.startswith("dare") for m in results["methods"]):
        print("* random drop: the two tools draw different masks, so tensors differ by design")


if __name__ == "__main__":
    sys.exit(main())
