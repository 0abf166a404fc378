#!/usr/bin/env python
"""Working memory and wall time of a trimming or dropping merge (ties, magnitude_prune, dare_linear, dare_ties;
`--rescale`; `--no-native` for DARE on numpy's path) on one large tensor, old code against new.

The models are tiny Llamas whose embedding has the shape asked for (`--rows x --cols`, default 32768 x 4096, an
8B-class vocabulary's width): everything else is a few MB, so the merge's peak is the embedding's working set.
Each fine-tune is the base plus noise on the embedding: on a coarse grid (`--grid`, the default), so that many
entries tie at the trim threshold and the float32 merge replays mergekit's sort (the costly case), or continuous.

Each run is its own process (`llmfast merge --threads 1`, the code from `--code DIR`, one per version): its peak
RSS over the RSS after the imports (VmHWM, reset before the merge), the merge's wall time, and, in one extra run
per version under tracemalloc, the most bytes numpy held at once (deterministic). After `--warmup` untimed runs of
each version, rounds alternate the order of the versions; medians are printed per entry of the tensor, with each
version's wall-time ratio to the first --code's (median over median) and the spread of the rounds beside it, and
written as JSON (bench_common: provenance, each --code's commit, the load average; --force to replace the file,
checked before anything runs). Every run has OMP_NUM_THREADS=1 and the same --threads.

`--shape 135m` / `--shape 1.7b` merge whole models instead, those of `compare_mergekit.py` (its parameters: weights
1, density 0.5); the per-entry columns are then over the largest tensor (the embedding).

    git worktree add /tmp/llmfast-old OLD_COMMIT
    python scripts/merge_trim_memory.py --code old=/tmp/llmfast-old --code new=. --dtypes float32,bfloat16
    python scripts/merge_trim_memory.py --code old=/tmp/llmfast-old --code new=. --shape 135m --threads 2 --rounds 5
    python scripts/merge_trim_memory.py --code old=/tmp/llmfast-old --code new=. --methods dare_ties --no-native
    python scripts/merge_trim_memory.py --code old=/tmp/llmfast-old --code new=. --methods ties --rescale true
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import bench_common
from llmfast.provenance import git_commit, git_dirty

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUN = """
import re, sys, time
import numpy, yaml, safetensors
import llmfast.merge.merge, llmfast.merge.methods, llmfast.merge.io
from llmfast.cli import main
trace = sys.argv[3] == "trace"
if trace:
    import tracemalloc
    tracemalloc.start()
def kb(key): return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))
open('/proc/self/clear_refs', 'w').write('5')
before = kb('VmRSS')
t0 = time.perf_counter()
rc = main(['merge', sys.argv[1], sys.argv[2], '--no-progress', '--threads', sys.argv[4], '--overwrite'])
wall = time.perf_counter() - t0
traced = tracemalloc.get_traced_memory()[1] if trace else 0
print('RESULT', rc, (kb('VmHWM') - before) * 1024, wall, traced)
"""


def make_models(work: Path, rows: int, cols: int, dtype: str, models: int, grid: bool) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import load_file, save_file

    from llmfast.testing import build_tiny_llama

    base = work / f"base-{dtype}-{rows}x{cols}"
    if not (base / "model.safetensors").is_file():
        shutil.rmtree(base, ignore_errors=True)
        build_tiny_llama(base, hidden_size=cols, num_layers=1, intermediate_size=256, model_vocab_size=rows,
                         head_dim=cols // 2, dtype=dtype)
    sd = load_file(base / "model.safetensors")
    emb = next(k for k in sd if "embed" in k)
    assert tuple(sd[emb].shape) == (rows, cols), sd[emb].shape
    fts = []
    for i in range(models):
        ft = work / f"ft{i}-{dtype}-{rows}x{cols}-{'grid' if grid else 'noise'}"
        fts.append(ft)
        if (ft / "model.safetensors").is_file():
            continue
        shutil.rmtree(ft, ignore_errors=True)
        shutil.copytree(base, ft)
        g = torch.Generator().manual_seed(100 + i)
        w = sd[emb].float()
        if grid:  # multiples of 2^-10: exact in float32 at these magnitudes, so magnitudes tie in bulk
            noise = torch.randint(-8, 9, w.shape, generator=g).float() * 2.0**-10
        else:
            noise = torch.randn(w.shape, generator=g) * (0.05 * float(w.std()))
        save_file({**sd, emb: (w + noise).to(sd[emb].dtype)}, ft / "model.safetensors", metadata={"format": "pt"})
        del noise, w
    return base, fts


def compare_mergekit_models(work: Path, shape: str) -> tuple[Path, list[Path]]:
    """The base and the two rank-16 variants `compare_mergekit.py --shape SHAPE` merges (1.7b: --delta-scale 0.01)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from compare_mergekit import make_random_base, make_variant

    from llmfast.models import resolve_model

    base = resolve_model("builtin:smollm2-135m")
    if shape == "1.7b":
        base = make_random_base(work / "base-1.7b", base)
    scale = 1e-3 if shape == "135m" else 1e-2
    return base, [make_variant(base, work / f"ft-{t}-{shape}", i, scale=scale) for i, t in ((1, "a"), (2, "b"))]


def write_config(path: Path, method: str, base: Path, fts: list[Path], density: float, weights: list[float],
                 rescale: bool | None = None) -> Path:
    import yaml

    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": w, "density": density}} for f, w in zip(fts, weights)]}
    if rescale is not None:
        cfg["parameters"] = {"rescale": rescale}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_once(code: Path, cfg: Path, out: Path, trace: bool, threads: int, native: bool = True) -> dict:
    env = {"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())}
    if not native:  # the numpy path, as on a machine without a C compiler
        env["LLMFAST_NATIVE"] = "0"
    proc = subprocess.run([sys.executable, "-c", RUN, str(cfg), str(out), "trace" if trace else "plain", str(threads)],
                          capture_output=True, text=True, env=env, cwd=code)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"run failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    _, rc, growth, wall, traced = line.split()
    assert rc == "0", proc.stderr
    return {"rss_growth": int(growth), "wall_s": float(wall), "traced_peak": int(traced)}


def same_output(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", action="append", required=True, help="NAME=DIR: a checkout of llmfast to measure")
    ap.add_argument("--shape", choices=["one-tensor", "135m", "1.7b"], default="one-tensor",
                    help="135m / 1.7b: compare_mergekit.py's models (the built-in model, or a random base of "
                         "SmolLM2-1.7B's shape in bfloat16, with two rank-16 variants; 1.7b at --delta-scale 0.01)")
    ap.add_argument("--threads", type=int, default=1, help="llmfast merge --threads")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default="ties")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--noise", action="store_true", help="continuous noise instead of the tie-heavy grid")
    ap.add_argument("--rescale", choices=["default", "true", "false"], default="default",
                    help="the merge's `rescale` parameter (default: the method's own)")
    ap.add_argument("--no-native", action="store_true",
                    help="LLMFAST_NATIVE=0: DARE on the numpy path (as without a C compiler, or float16 inputs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each version before the rounds")
    ap.add_argument("--workdir", default="/tmp/merge-trim-memory")
    bench_common.add_output_args(ap, "runs/bench/merge_trim_memory.json", "--out")
    args = ap.parse_args()
    bench_common.check_output(args.out, args.force, "--out")
    state = bench_common.machine_state()
    codes = {c.split("=", 1)[0]: Path(c.split("=", 1)[1]).resolve() for c in args.code}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n = args.rows * args.cols
    results = []
    whole = {"135m": "float32", "1.7b": "bfloat16"}
    for dtype in (args.dtypes.split(",") if args.shape == "one-tensor" else [whole[args.shape]]):
        if args.shape in whole:
            base, fts = compare_mergekit_models(work, args.shape)
            n = 49152 * (576 if args.shape == "135m" else 2048)  # the largest tensor: the embedding
        else:
            base, fts = make_models(work, args.rows, args.cols, dtype, args.models, not args.noise)
        for method in args.methods.split(","):
            # 135m, 1.7b: compare_mergekit.py's parameters (weights 1); else weights that are not 1 (a multiply each)
            weights = [1.0] * len(fts) if args.shape in whole else [1.0, 0.6, 0.8, 0.5][: len(fts)]
            rescale = None if args.rescale == "default" else args.rescale == "true"
            cfg = write_config(work / f"{method}-{args.shape}-{dtype}.yaml", method, base, fts, args.density, weights,
                               rescale)
            native = not args.no_native
            runs: dict[str, list[dict]] = {name: [] for name in codes}
            names = list(codes)
            for r in range(-args.warmup, args.rounds):  # r < 0: warm-up runs, not recorded
                for name in bench_common.order(names, r):
                    got = run_once(codes[name], cfg, work / f"out-{name}", False, args.threads, native)
                    if r >= 0:
                        runs[name].append({**got, "round": r, "order": bench_common.order(names, r).index(name)})
            traced = {name: run_once(codes[name], cfg, work / f"out-{name}", True, args.threads, native)["traced_peak"]
                      for name in codes}
            identical = all(same_output(work / f"out-{names[0]}", work / f"out-{m}") for m in names[1:])
            row = {"shape": args.shape, "dtype": dtype, "method": method, "entries": n, "models": len(fts),
                   "density": args.density, "grid": not args.noise and args.shape not in whole,
                   "threads": args.threads, "rescale": args.rescale, "native": native,
                   "identical_outputs": identical, "versions": {}}
            for name in names:
                wall = bench_common.compare([x["wall_s"] for x in runs[name]], [x["wall_s"] for x in runs[names[0]]])
                row["versions"][name] = {
                    "wall_s_median": wall["ours"]["median"], "wall_s": wall["ours"],
                    f"wall_ratio_vs_{names[0]}": wall["ratio"], "noise": wall["noise"],
                    "rss_growth_median": statistics.median(x["rss_growth"] for x in runs[name]),
                    "rss_bytes_per_entry": statistics.median(x["rss_growth"] for x in runs[name]) / n,
                    "numpy_peak_bytes_per_entry": traced[name] / n, "runs": runs[name]}
            results.append(row)
            print_row(row)
    record = {"rows": args.rows, "cols": args.cols, "rounds": args.rounds, "warmup": args.warmup,
              "code": {name: {"path": str(c), "git_commit": git_commit(c), "git_dirty": git_dirty(c)}
                       for name, c in codes.items()},
              "results": results}
    print(f"wrote {bench_common.write_json(args.out, record, args.force, state, threads=args.threads)}")
    return 0


def print_row(row: dict) -> None:
    print(f"\n{row['shape']}: {row['method']} {row['dtype']}, {row['models']} models, {row['entries']:,} entries "
          f"(largest tensor), --threads {row['threads']}, density "
          f"{row['density']}, {'grid' if row['grid'] else 'noise'}, rescale {row['rescale']}"
          f"{'' if row['native'] else ', LLMFAST_NATIVE=0'}; outputs identical: {row['identical_outputs']}")
    first = next(iter(row["versions"]))
    print(f"| version | wall (median) | x {first} | spread | peak RSS growth | RSS bytes/entry "
          "| numpy peak bytes/entry |")
    print("|---|---|---|---|---|---|---|")
    for name, v in row["versions"].items():
        print(f"| {name} | {v['wall_s_median']:.2f} s | {v[f'wall_ratio_vs_{first}']:.2f} | "
              f"{bench_common.pct(v['noise'])} | "
              f"{v['rss_growth_median'] / 2**30:.2f} GiB | {v['rss_bytes_per_entry']:.1f} | "
              f"{v['numpy_peak_bytes_per_entry']:.1f} |")
    print(f"x {first}: median wall over {first}'s; spread: the larger (max - min) / median of the two over the rounds")


if __name__ == "__main__":
    raise SystemExit(main())
