#!/usr/bin/env python
"""Check `llmfast merge` against mergekit on the same configs: every tensor, the speed and the peak RSS.

mergekit is not a dependency of llmfast: it goes into its own virtual environment (created here when
missing: `torch==2.13.0` first, so pip takes the local CPU build, then `mergekit==0.1.5`). For each method
both tools merge the same YAML config, one after the other, each in its own process under
`/usr/bin/time -v` (wall time and peak RSS). Then every tensor of the two outputs is compared (max abs
difference). DARE's drop is random in both and cannot match entry for entry, so for dare_linear the
kept fraction and the rescale factor are compared instead, on a one-model merge where both are visible.

    python scripts/compare_mergekit.py                         # defaults: the built-in model + two fine-tunes
    python scripts/compare_mergekit.py --methods ties --repeat 3

Writes runs/bench/merge_vs_mergekit.json and prints a table.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHOD_PARAMS = {
    "linear": ({"weight": 0.5}, {"weight": 0.5}, None),
    "task_arithmetic": ({"weight": 1.0}, {"weight": 1.0}, None),
    "ties": ({"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}, None),
}


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit 0.1.5 into {venv} (torch 2.13.0 pinned first)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return exe


def timed(cmd: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (GiB) of the process tree's largest process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
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


def compare(ours: Path, theirs: Path) -> dict:
    """Max abs difference over every tensor, read one at a time."""
    from safetensors import safe_open

    a, b = weights(ours), weights(theirs)
    if set(a) != set(b):
        return {"same_tensor_names": False, "only_ours": sorted(set(a) - set(b))[:5],
                "only_mergekit": sorted(set(b) - set(a))[:5]}
    worst, worst_name, dtypes = 0.0, "", set()
    for name in a:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        dtypes.add(f"{ta.dtype}/{tb.dtype}")
        diff = (ta.double() - tb.double()).abs().max().item()
        if diff > worst:
            worst, worst_name = diff, name
    return {"same_tensor_names": True, "tensors": len(a), "max_abs_diff": worst, "worst_tensor": worst_name,
            "dtypes": sorted(dtypes)}


def dare_stats(base: Path, ft: Path, merged: Path) -> dict:
    """Kept fraction and rescale factor of a one-model dare_linear merge (weight 1)."""
    from safetensors import safe_open

    bw, fw, mw = weights(base), weights(ft), weights(merged)
    kept = nonzero = 0
    factors = []
    for name in bw:
        with safe_open(bw[name], "pt") as fb, safe_open(fw[name], "pt") as ff, safe_open(mw[name], "pt") as fm:
            b, f, m = fb.get_tensor(name).double(), ff.get_tensor(name).double(), fm.get_tensor(name).double()
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


def write_config(path: Path, method: str, base: Path, models: list[tuple[Path, dict]], params: dict | None) -> None:
    import yaml

    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(m), "parameters": p} for m, p in models], "dtype": "float32"}
    if method == "linear":
        del cfg["base_model"]  # a soup of the fine-tunes (with base_model, both tools average it in too)
    if params:
        cfg["parameters"] = params
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="builtin:smollm2-135m")
    ap.add_argument("--ft", nargs=2, default=["runs/lora-dates/merged", "runs/lora-units/merged"],
                    help="two fine-tuned variants of the base (full model directories)")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties",
                    help="comma-separated; dare_linear's kept fraction/rescale check always runs unless --no-dare")
    ap.add_argument("--no-dare", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per tool and method (the best is reported)")
    ap.add_argument("--mergekit-venv", default="/tmp/mergekit-venv")
    ap.add_argument("--workdir", default="/tmp/merge-compare")
    ap.add_argument("--out", default="runs/bench/merge_vs_mergekit.json")
    args = ap.parse_args()

    from llmfast.models import resolve_model

    base = resolve_model(args.base)
    ft = [Path(p).resolve() for p in args.ft]
    mergekit = ensure_mergekit(Path(args.mergekit_venv))
    llmfast_exe = str(Path(sys.executable).parent / "llmfast")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict = {"date": dt.date.today().isoformat(), "machine": os.uname().nodename, "cpus": os.cpu_count(),
                     "loadavg_at_start": os.getloadavg(), "base": str(base), "fine_tuned": [str(p) for p in ft],
                     "mergekit": "0.1.5", "methods": {}}
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        p1, p2, shared = METHOD_PARAMS[method]
        cfg = work / f"{method}.yaml"
        write_config(cfg, method, base, [(ft[0], p1), (ft[1], p2)], shared)
        best: dict[str, dict] = {}
        for rep in range(args.repeat):
            for tool, cmd in (("llmfast", [llmfast_exe, "merge", str(cfg), str(work / f"ours-{method}"), "--no-progress"]),
                              ("mergekit", [str(mergekit), str(cfg), str(work / f"mk-{method}"), "--quiet",
                                            "--random-seed", "0"])):
                out_dir = Path(cmd[3] if tool == "llmfast" else cmd[2])
                shutil.rmtree(out_dir, ignore_errors=True)
                r = timed(["nice", "-n", "10"] + cmd, work / f"{tool}-{method}-{rep}.log")
                print(f"  {method:<16} {tool:<9} run {rep + 1}: {r['seconds']:7.2f} s  {r['peak_rss_gib']:.2f} GiB", flush=True)
                if tool not in best or r["seconds"] < best[tool]["seconds"]:
                    best[tool] = {**r, "peak_rss_gib": max(r["peak_rss_gib"], best.get(tool, {}).get("peak_rss_gib", 0))}
        entry = {"llmfast": best["llmfast"], "mergekit": best["mergekit"],
                 "speedup": round(best["mergekit"]["seconds"] / best["llmfast"]["seconds"], 2),
                 "rss_ratio": round(best["llmfast"]["peak_rss_gib"] / best["mergekit"]["peak_rss_gib"], 3)}
        if method.startswith("dare"):
            entry["note"] = "random drop: tensors differ by design; see dare_linear_check"
            entry["diff"] = compare(work / f"ours-{method}", work / f"mk-{method}")
        else:
            entry["diff"] = compare(work / f"ours-{method}", work / f"mk-{method}")
        results["methods"][method] = entry
        rows.append((method, entry))
    if not args.no_dare:
        cfg = work / "dare_linear.yaml"
        write_config(cfg, "dare_linear", base, [(ft[0], {"weight": 1.0, "density": 0.5})], None)
        timed([llmfast_exe, "merge", str(cfg), str(work / "ours-dare"), "--no-progress"], work / "llmfast-dare.log")
        timed([str(mergekit), str(cfg), str(work / "mk-dare"), "--quiet", "--random-seed", "0"], work / "mk-dare.log")
        results["dare_linear_check"] = {
            "density": 0.5,
            "llmfast": dare_stats(base, ft[0], work / "ours-dare"),
            "mergekit": dare_stats(base, ft[0], work / "mk-dare"),
        }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'method':<16} {'max abs diff':>13} {'llmfast s':>10} {'mergekit s':>11} {'speedup':>8} "
          f"{'llmfast RSS':>12} {'mergekit RSS':>13} {'RSS ratio':>9}")
    for method, e in rows:
        diff = e["diff"].get("max_abs_diff", "names differ")
        diff_s = f"{diff:.3g}" if isinstance(diff, float) else diff
        if method.startswith("dare"):
            diff_s += "*"
        print(f"{method:<16} {diff_s:>13} {e['llmfast']['seconds']:>10.2f} {e['mergekit']['seconds']:>11.2f} "
              f"{e['speedup']:>7.2f}x {e['llmfast']['peak_rss_gib']:>10.2f} G {e['mergekit']['peak_rss_gib']:>11.2f} G "
              f"{e['rss_ratio']:>9.2f}")
    if "dare_linear_check" in results:
        d = results["dare_linear_check"]
        for tool in ("llmfast", "mergekit"):
            s = d[tool]
            print(f"dare_linear density 0.5, {tool:<8}: kept fraction {s['kept_fraction']:.4f}, rescale median "
                  f"{s['rescale_median']} (min {s['rescale_min']}, max {s['rescale_max']}) over {s['tensors']} tensors")
    if any(m.startswith("dare") for m, _ in rows):
        print("* random drop: the two tools draw different masks, so tensors differ by design")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
